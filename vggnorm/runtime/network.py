"""The only module that imports Keras: builds the network from an :class:`~vggnorm.core.archs.Arch`.

The network is rebuilt from the architecture table and the parsed weight arrays, so no code from a
model file ever runs. Images enter as uint8 RGB; preprocessing runs inside the compiled graph. The
stats model reduces every conv's post-ReLU activations to per-filter sum and sum of squares on the
device (along each image row in the activation's dtype, float64 beyond), so only a few KB per batch reach the host,
where :mod:`vggnorm.core.stats` accumulates them in float64.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ..core.archs import ActivationSpec, Arch, ConvSpec, DenseSpec, HeadSpec, NormSpec, PoolSpec
from ..core.errors import OutOfMemoryError, WeightFileError
from ..core.inputs import (
    CAFFE_MEAN_BGR,
    RGB255_MEAN,
    TORCH_MEAN,
    TORCH_STD,
    Precision,
    Preprocess,
)
from ..core.memory import (
    GPU_FRACTION,
    HOST_FRACTION,
    Budget,
    activation_bytes,
    fixed_bytes,
    format_bytes,
)
from ..core.stats import ImageMoments
from ..core.weightset import BN_ROLES, CONV_ROLES


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[None]:
    """Hold back what native code writes to fd 2 (TensorFlow's start-up log lines, which no
    environment variable silences); replay it if the block fails, so no real error is lost."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture, notebooks: nothing to do
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        except BaseException:
            os.dup2(saved, fd)
            held.seek(0)
            sys.stderr.write(held.read().decode("utf8", "replace"))
            raise
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def keras_module() -> Any:
    """Keras, imported on first use with TensorFlow's start-up log lines held back, and with
    TensorFloat-32 off: on Ampere and newer GPUs TensorFlow would otherwise run float32 convs
    with 10-bit mantissas (~5e-4 relative per product), far from the float32 statistics and
    function checks promise."""
    if "keras" in sys.modules:
        return sys.modules["keras"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # predict_on_batch on a last, smaller batch retraces; that warning is noise for users.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        with _native_stderr_captured():
            import keras
    except ImportError as e:
        raise ImportError(
            "the forward pass needs Keras and a backend (TensorFlow): pip install vggnorm"
        ) from e
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
    return keras


@contextlib.contextmanager
def out_of_memory(what: Callable[[], str]) -> Iterator[None]:
    """Turn running out of memory in the block (TensorFlow's ``ResourceExhaustedError``, a
    ``MemoryError``) into an :class:`OutOfMemoryError` whose message starts ``out of memory``
    and goes on with ``what()``."""
    errors: tuple[type[BaseException], ...] = (MemoryError,)
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        errors += (tf.errors.ResourceExhaustedError,)
    try:
        yield
    except errors as e:
        detail = next((line for line in str(e).splitlines() if line.strip()), "")[:200]
        raise OutOfMemoryError(
            f"out of memory {what()}: {type(e).__name__}{': ' if detail else ''}{detail}",
            fix="memory",
        ) from e


def _preprocess_layer(keras: Any, scheme: Preprocess) -> Any:
    ops = keras.ops

    class Preprocessing(keras.layers.Layer):  # type: ignore[misc]
        def call(self, x: Any) -> Any:
            x = ops.cast(x, "float32")
            if scheme == "caffe":
                return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR)
            if scheme == "unit":
                return x / 255.0
            if scheme == "rgb255":  # torchvision's VGG16 IMAGENET1K_FEATURES weights
                return x - ops.convert_to_tensor(RGB255_MEAN)
            mean = ops.convert_to_tensor(TORCH_MEAN)
            std = ops.convert_to_tensor(TORCH_STD)
            return (x / 255.0 - mean) / std

    return Preprocessing(name=f"preprocess_{scheme}", dtype="float32")


def _moments_layer(keras: Any, name: str) -> Any:
    ops = keras.ops

    class ChannelMoments(keras.layers.Layer):  # type: ignore[misc]
        def call(self, x: Any) -> Any:
            # A float32 sum over a whole batch (800k values per filter at 16 x 224^2) drifts by
            # ~1e-4 relative. Summing each image row (<= 224 values, ~1e-7 in float32) and the
            # rows in float64 keeps the statistics exact to float64 for 1/W of the extra cost.
            # Activations arrive in the compute dtype (autocast off): bf16 rows are summed in
            # bf16 (~1e-4 relative, far below bf16 activations' own ~0.4%) instead of paying a
            # float32 copy of every activation.
            # Per image, so that padding images can be left out on the host.
            rows = ops.stack([ops.sum(x, axis=2), ops.sum(x * x, axis=2)], axis=1)  # (B,2,H,C)
            return ops.sum(ops.cast(rows, "float64"), axis=2)  # (B, 2, C)

    return ChannelMoments(name=f"{name}_moments", dtype="float64", autocast=False)


def _reflect_pad_layer(keras: Any, name: str, dtype: str) -> Any:
    class ReflectionPad(keras.layers.Layer):  # type: ignore[misc]
        def call(self, x: Any) -> Any:
            return keras.ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="reflect")

    return ReflectionPad(name=name, dtype=dtype)


def build_features(
    keras: Any,
    arch: Arch,
    x: Any,
    dtype: str = "float32",
    after_relu: Callable[[ConvSpec, Any], Any] | None = None,
) -> tuple[Any, list[tuple[str, Any]]]:
    """The conv chain of ``arch`` on tensor ``x``: the one place the Keras graph is written.

    Args:
        keras: the Keras module.
        arch: the architecture; its layers keep their names so weights are set by name.
        x: the (preprocessed) input tensor.
        dtype: layer dtype policy (``"float32"`` or ``"mixed_bfloat16"``).
        after_relu: called with each conv and its post-ReLU tensor; returns the tensor the chain
            continues with (``vggnorm bn`` inserts a BatchNormalization there).

    Returns:
        The output of the last layer and, per conv, its post-ReLU tensor (before the hook).
    """
    L = keras.layers
    reflect = arch.padding == "reflect"
    taps = []
    for layer in arch.features:
        if isinstance(layer, ConvSpec):
            if reflect and layer.padding == "same":
                x = _reflect_pad_layer(keras, f"{layer.name}_pad", dtype)(x)
            x = L.Conv2D(
                layer.filters,
                layer.kernel_size,
                strides=layer.strides,
                padding="valid" if reflect else layer.padding,
                activation="relu" if layer.norm is None else None,
                use_bias=layer.use_bias,
                name=layer.name,
                dtype=dtype,
            )(x)
            if layer.norm is not None:
                n = layer.norm
                x = L.BatchNormalization(
                    epsilon=n.epsilon, center=n.center, scale=n.scale, name=n.name, dtype=dtype
                )(x)
                x = L.Activation("relu", name=f"{layer.name}_relu", dtype=dtype)(x)
            taps.append((layer.name, x))
            if after_relu is not None:
                x = after_relu(layer, x)
        elif isinstance(layer, PoolSpec):
            pool = L.MaxPooling2D if layer.kind == "max" else L.AveragePooling2D
            x = pool(layer.pool_size, layer.strides, layer.padding, name=layer.name, dtype=dtype)(x)
    return x, taps


def build_head(
    keras: Any, head: HeadSpec, x: Any, after: Callable[[DenseSpec, Any], Any] | None = None
) -> Any:
    """The head after the conv chain (Flatten or global pooling, then its layers), by name."""
    L = keras.layers
    if head.reduce == "flatten" and head.flatten_order == "chw":
        x = L.Permute((3, 1, 2), name="to_channels_first")(x)  # flatten as PyTorch does
    reduce = {"flatten": L.Flatten, "gap": L.GlobalAveragePooling2D, "gmp": L.GlobalMaxPooling2D}
    x = reduce[head.reduce](name="flatten" if head.reduce == "flatten" else "head_pool")(x)
    for h in head.layers:
        if isinstance(h, DenseSpec):
            x = L.Dense(h.units, activation=h.activation, use_bias=h.use_bias, name=h.name)(x)
            if after is not None:
                x = after(h, x)
        elif isinstance(h, NormSpec):
            x = L.BatchNormalization(
                epsilon=h.epsilon, center=h.center, scale=h.scale, name=h.name
            )(x)
        else:
            x = L.Activation(h.activation, name=h.name)(x)
    return x


def layer_values(arrays: Mapping[str, np.ndarray], name: str) -> list[np.ndarray]:
    """A layer's arrays in Keras's ``set_weights`` order, as float32."""
    return [
        np.asarray(arrays[f"{name}/{role}"], dtype=np.float32)
        for role in (*CONV_ROLES, *BN_ROLES)
        if f"{name}/{role}" in arrays
    ]


def set_weights(model: Any, names: Iterable[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Set each named layer's weights from ``arrays`` (keys ``<layer>/<role>``)."""
    for name in names:
        model.get_layer(name).set_weights(layer_values(arrays, name))


class FeatureNet:
    """A compiled VGG feature extractor over uint8 RGB batches.

    ``moments(batch)`` returns ``{conv: (sum, sumsq, count)}`` for one batch; ``activations(batch)``
    returns every conv's post-ReLU activation (float32) and, with a head, the predictions.
    """

    def __init__(
        self,
        arch: Arch,
        arrays: Mapping[str, np.ndarray],
        size: int,
        preprocess: Preprocess = "caffe",
        precision: Precision = "fp32",
        *,
        outputs: Literal["moments", "activations"] = "moments",
        with_head: bool = False,
        batch_size: int | None = None,
        peak: int | None = None,
    ) -> None:
        keras = keras_module()
        self.arch = arch
        self.batch_size = batch_size
        self.size = size
        self.precision = precision
        self.outputs = outputs
        self.peak = peak  # the run's estimated peak memory, named if it runs out
        inputs = keras.Input((size, size, 3), dtype="uint8", name="images")
        x = _preprocess_layer(keras, preprocess)(inputs)
        dtype = "mixed_bfloat16" if precision == "bf16" else "float32"
        x, taps = build_features(keras, arch, x, dtype)
        self._spatial = {}
        outs = []
        for name, t in taps:
            self._spatial[name] = int(t.shape[1]) * int(t.shape[2])
            outs.append(_moments_layer(keras, name)(t) if outputs == "moments" else t)
        self.has_head = bool(with_head and arch.head is not None)
        names = list(arch.weighted_features)
        if self.has_head and arch.head is not None:
            outs.append(build_head(keras, arch.head, x))
            names += [h.name for h in arch.head.layers if not isinstance(h, ActivationSpec)]
        self.model = keras.Model(inputs, outs, name=f"{arch.name}_{outputs}")
        set_weights(self.model, names, arrays)

    def moments(
        self, images: npt.NDArray[np.uint8]
    ) -> dict[str, tuple[np.ndarray, np.ndarray, int, ImageMoments]]:
        """Per conv, a 4-tuple: float64 (sum, sumsq) over the batch's activations, the value
        count, and the :class:`~vggnorm.core.stats.ImageMoments` of the images' own means.

        A batch smaller than ``batch_size`` is padded with black images that are left out of
        the sums: the CPU convolution kernels round differently for different batch sizes
        (~5e-7 relative), but identically for every image of a batch of one size, so each
        image's statistics are the same whichever batch, shard or Ray block it falls in.
        """
        n = int(images.shape[0])
        if self.batch_size is not None and n < self.batch_size:
            pad = np.zeros((self.batch_size - n, *images.shape[1:]), dtype=images.dtype)
            with out_of_memory(lambda: self._running(self.batch_size or n)):
                images = np.concatenate([images, pad])
        out = self._predict(images)
        sums = {}
        for name, o in zip((c.name for c in self.arch.convs), out):
            per_image = np.asarray(o, dtype=np.float64)[:n]
            total = np.zeros(per_image.shape[1:])
            for image in per_image:  # image by image: the same order in every grouping
                total += image
            spatial = self._spatial[name]
            sums[name] = (total[0], total[1], n * spatial, ImageMoments.of(per_image[:, 0] / spatial))
        return sums

    def activations(self, images: npt.NDArray[np.uint8]) -> list[np.ndarray]:
        out = self._predict(images)
        with out_of_memory(lambda: self._running(len(images))):
            return [np.asarray(o, dtype=np.float32) for o in out]

    def image_means(self, images: npt.NDArray[np.uint8]) -> dict[str, np.ndarray]:
        """Per conv, each image's mean of each filter over its positions, ``(images, filters)``
        float64: the per-image values whose moments :meth:`moments` sums (a moments network)."""
        out = self._predict(images)
        return {
            c.name: np.asarray(o, dtype=np.float64)[:, 0] / self._spatial[c.name]
            for c, o in zip(self.arch.convs, out)
        }

    def _predict(self, images: npt.NDArray[np.uint8]) -> Any:
        """The forward pass; running out of memory is an :class:`OutOfMemoryError` naming the
        image size, the batch and the estimated peak."""
        with out_of_memory(lambda: self._running(int(images.shape[0]))):
            return self.model.predict_on_batch(images)

    def _running(self, batch: int) -> str:
        peak = self.peak
        if peak is None:  # the network's own estimate (its arch has no head: no head weights)
            copies = 1 if self.outputs == "activations" else 0
            per_image = activation_bytes(self.arch, self.size, self.precision, copies)
            peak = fixed_bytes(self.arch) + batch * per_image
        return (f"running {self.arch.name} at {self.size}x{self.size} {self.precision}, batch "
                f"{batch} (estimated peak {format_bytes(peak)})")  # fmt: skip


def device_budget(max_memory: int | None = None, share: float = 1.0) -> Budget:
    """The memory a forward pass here may use: ``max_memory`` bytes when given; else
    :data:`~vggnorm.core.memory.GPU_FRACTION` of the GPU's memory where TensorFlow runs on a GPU,
    :data:`~vggnorm.core.memory.HOST_FRACTION` of the memory available to this process
    otherwise; of that, ``share`` (a Ray worker's part of a device it shares with others)."""
    if max_memory is not None:
        return Budget(max_memory, "the given maximum")
    part = "" if share >= 1 else f"this worker's {share:.0%} share of "
    gpu = gpu_memory()
    if gpu is not None:
        name, total = gpu
        if total is None:
            return Budget(None, f"unknown: the memory of {name} could not be read")
        return Budget(int(GPU_FRACTION * share * total),
                      f"{GPU_FRACTION:.0%} of {part}{name}'s {format_bytes(total)}")  # fmt: skip
    host = host_available()
    if host is None:
        return Budget(None, "unknown: the memory available could not be read")
    return Budget(int(HOST_FRACTION * share * host), f"{HOST_FRACTION:.0%} of {part}the "
                  f"{format_bytes(host)} available to this process")  # fmt: skip


@functools.cache
def gpu_memory() -> tuple[str, int | None] | None:
    """The GPU TensorFlow runs on (its first visible one) and the bytes it may allocate there;
    None where the forward pass runs on the CPU. Asked once per process: listing the devices is
    slow and initialises every GPU."""
    keras = keras_module()
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    name = "GPU:0"
    try:
        from tensorflow.python.client import device_lib

        details = tf.config.experimental.get_device_details(gpus[0])
        name = f"GPU:0 ({details.get('device_name', 'unknown')})"
        limits = [d.memory_limit for d in device_lib.list_local_devices() if d.device_type == "GPU"]
        return name, int(limits[0])
    except Exception:  # a private module that may move; the budget is then unknown, not wrong
        return name, None


def host_available() -> int | None:
    """Bytes this process could hold: what it holds now plus the host's available memory
    (``MemAvailable``), or within a cgroup memory limit what the limit leaves, if less. None
    where ``/proc`` cannot tell (not Linux)."""
    try:
        available = _kib_field("/proc/meminfo", "MemAvailable")
        held = _kib_field("/proc/self/status", "VmRSS")
    except (OSError, ValueError, StopIteration):
        return None
    left = _cgroup_left()
    return (available if left is None else min(available, left)) + held


def _kib_field(path: str, key: str) -> int:
    line = next(x for x in Path(path).read_text().splitlines() if x.startswith(f"{key}:"))
    return int(line.split()[1]) * 1024


#: cgroup v2 and v1: the memory limit, the usage, and the usage's reclaimable page cache.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current",
     "/sys/fs/cgroup/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)  # fmt: skip


def _cgroup_left() -> int | None:
    """What this cgroup's memory limit leaves (limit - usage + inactive page cache, as the
    kubelet counts a working set); None without a limit."""
    for limit_file, usage_file, stat_file, key in _CGROUP_FILES:
        try:
            text = Path(limit_file).read_text().strip()
            if text == "max" or int(text) >= 2**60:  # v1 writes "no limit" as ~2^63
                return None
            usage = int(Path(usage_file).read_text())
            lines = Path(stat_file).read_text().splitlines()
            stat = dict(line.split(maxsplit=1) for line in lines if line.strip())
            return max(0, int(text) - usage + int(stat.get(key, 0)))
        except (OSError, ValueError):
            continue
    return None


def backend_description() -> str:
    keras = keras_module()
    return f"keras {keras.__version__} ({keras.backend.backend()})"


def fetch_imagenet_weights(model: str, include_top: bool = False) -> str:
    """Path to Keras's ImageNet weights for ``model``, downloaded and cached as keras.applications does."""
    from ..core.archs import IMAGENET_WEIGHTS

    keras = keras_module()
    origin, md5 = IMAGENET_WEIGHTS[(model, include_top)]
    return str(
        keras.utils.get_file(
            origin.rsplit("/", 1)[-1], origin, cache_subdir="models", file_hash=md5
        )
    )


def resolve_weights(weights: str | os.PathLike[str] | None, model: str | None) -> Path:
    """``weights``, or Keras's cached ImageNet file for ``model`` (downloaded if missing).

    Raises:
        WeightFileError: no file given and the download failed (offline, say).
    """
    if weights is not None:
        return Path(weights)
    name = model or "vgg16"
    try:
        return Path(fetch_imagenet_weights(name, include_top=False))
    except Exception as e:  # network errors come in many types; all mean the same here
        raise WeightFileError(
            f"could not fetch Keras's ImageNet {name} weights ({type(e).__name__}: {e}); "
            "download them elsewhere and name the file"
        ) from e
