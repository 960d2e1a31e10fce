"""``vggnorm bn``: a VGG with identity-initialised BatchNormalization after every ReLU conv.

Each conv's post-ReLU activation ``x`` (filter c) is followed by a Keras ``BatchNormalization``
whose four variables come from the statistics file (:func:`bn_params`)::

    moving_mean = mu_c,  moving_variance = var_c,  gamma = sqrt(var_c + eps),  beta = mu_c

so in inference mode ``BN(x) = gamma * (x - mu) / sqrt(var + eps) + beta = x`` exactly (up to one
float32 rounding): the model computes the same function as the original, and the BN layers' inputs
have, on the stats images, exactly the recorded mean and variance. In training mode BN normalises
with the batch's own moments, which start close to the recorded ones, so fine-tuning begins from
the pretrained function with the benefits of batch normalization.

Fine-tuning the written model::

    model = keras.models.load_model("vgg16_bn.keras")
    x = vggnorm.bn.preprocess_images(images_uint8, "caffe")  # the stats file's --preprocess
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss=...)
    model.fit(x, y, ...)

The input is a float32 batch ``(N, size, size, 3)`` that is already preprocessed with the scheme
the statistics were gathered with (``caffe`` for ``keras.applications`` VGG:
``keras.applications.vgg16.preprocess_input`` gives the same values). The preprocessing is not a
layer of the model, so the file holds only stock Keras layers and loads without custom objects.
BN's ``momentum`` (0.99) decides how fast the moving statistics follow the new data; freezing the
BN layers (``layer.trainable = False``) keeps them in inference mode, i.e. the identity.

For people converting from Caffe: Caffe splits this into a ``BatchNorm`` layer (mean, variance and
a moving-average scale factor, no affine part: ``(x - mean) / sqrt(var + eps)``) followed by a
``Scale`` layer (``gamma``, ``beta``). Keras's ``BatchNormalization`` holds all four in one layer,
in the order gamma, beta, moving_mean, moving_variance. To convert a Caffe pair: divide Caffe's
stored mean and variance by its scale factor (the third blob), then use them as
``moving_mean``/``moving_variance`` and the ``Scale`` blobs as ``gamma``/``beta``; mind that Caffe's
default ``eps`` is 1e-5 and Keras's is 1e-3.

Dense layers of the top: a BN after a ReLU Dense (``include_top_bn``) cannot be initialised from
the conv statistics, which do not cover the head; it gets ``gamma=1, beta=0, moving_mean=0,
moving_variance=1-eps``, also the identity in inference mode (but its training-mode batch moments
are then far from its moving ones).

:func:`bn_params` is pure numpy; :func:`build_bn_model` imports Keras through :mod:`vggnorm.model`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .archs import ActivationSpec, Arch, ConvSpec, DenseSpec
from .atomic import atomic_path, output_lock
from .errors import ArchitectureError, WeightFileError
from .model import preprocess_images as preprocess_images
from .stats import LayerStats
from .statsfile import StatsRecord, stats_by_conv

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]

#: Keras's BatchNormalization default.
DEFAULT_EPSILON = 1e-3


def bn_params(layer_stats: LayerStats, epsilon: float = DEFAULT_EPSILON) -> dict[str, F64]:
    """BatchNormalization variables that make BN the identity on this layer's activations.

    Args:
        layer_stats: the layer's sums over the stats images (at least one value counted).
        epsilon: the BN layer's epsilon; must be > 0.

    Returns:
        float64 arrays ``gamma = sqrt(var + eps)``, ``beta = mean``, ``moving_mean = mean`` and
        ``moving_variance = var`` (population variance from the sums of squares, clipped at 0), one
        value per filter, all finite. A zero-variance filter (e.g. dead) gets ``gamma = sqrt(eps)``.

    Raises:
        ValueError: ``epsilon <= 0`` or no activation counted.

    Example:
        >>> p = bn_params(LayerStats.of("c", [[1.0, 0.0], [3.0, 0.0]]))
        >>> p["moving_mean"].tolist(), p["moving_variance"].tolist()
        ([2.0, 0.0], [1.0, 0.0])
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    mean = np.asarray(layer_stats.mean, dtype=np.float64)
    var = np.asarray(layer_stats.variance, dtype=np.float64)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
        raise ValueError(f"{layer_stats.name}: statistics hold NaN or infinite values")
    return {
        "gamma": np.sqrt(var + epsilon),
        "beta": mean.copy(),
        "moving_mean": mean.copy(),
        "moving_variance": var.copy(),
    }


def identity_bn_params(units: int, epsilon: float = DEFAULT_EPSILON) -> dict[str, F64]:
    """BN variables that are the identity in inference mode without any statistics."""
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    return {
        "gamma": np.ones(units),
        "beta": np.zeros(units),
        "moving_mean": np.zeros(units),
        "moving_variance": np.full(units, 1.0 - epsilon),
    }


def _set_bn(layer: Any, params: Mapping[str, F64]) -> None:
    layer.set_weights(
        [
            np.asarray(params[k], dtype=np.float32)
            for k in ("gamma", "beta", "moving_mean", "moving_variance")
        ]
    )


def build_bn_model(
    arch: Arch,
    arrays: Mapping[str, np.ndarray],
    record: StatsRecord,
    *,
    size: int,
    include_top_bn: bool = False,
    epsilon: float = DEFAULT_EPSILON,
) -> Any:
    """A Keras VGG with an identity-initialised BatchNormalization after every ReLU conv.

    Args:
        arch: the architecture (from :func:`vggnorm.topology.bind`).
        arrays: its weights, ``"<layer>/kernel"``/``"<layer>/bias"``.
        record: complete statistics gathered on these conv weights; matched to the convs by
            position.
        size: square input size. A Flatten head fixes it (``arch.head.input_size``).
        include_top_bn: also put a BN after every ReLU Dense of the head, initialised to the
            identity without statistics (gamma 1, beta 0, mean 0, variance 1 - eps).
        epsilon: the BN layers' epsilon.

    Returns:
        An uncompiled ``keras.Model`` from a float32 input ``(size, size, 3)``, already preprocessed
        as ``record.meta.preprocess`` says (see :func:`preprocess_images`), to the last pooling's
        output, or to the head's output when the head's activations are known. Layers keep the
        weight file's names; each conv's BN is ``<conv>_bn``, each ReLU Dense's ``<dense>_bn``. In
        inference mode it computes what the network without BN computes.

    Raises:
        StatsError: statistics that do not fit the convs or are unfinished.
        ArchitectureError: ``size`` does not fit the Flatten head or the pooling chain.

    Example:
        >>> ws = read_weights("vgg16.h5"); arch = bind(ws.file).arch  # doctest: +SKIP
        >>> model = build_bn_model(arch, ws.arrays, read_stats("s.h5"), size=224)  # doctest: +SKIP
    """
    from .model import build_features, build_head, keras_module, set_weights

    stats = stats_by_conv(record, [(c.name, c.filters) for c in arch.convs])
    if size < arch.min_size():
        raise ArchitectureError(
            f"size {size} is too small for {arch.name}: at least {arch.min_size()}"
        )
    head = arch.head
    if head is not None and any(d.activation == "unknown" for d in head.dense):
        log.warning(
            "the head's activations are unknown (a weights-only file of a non-stock head): "
            "the BN model ends at the last conv block"
        )
        head = None
    if head is not None and head.reduce == "flatten" and head.input_size not in (None, size):
        raise ArchitectureError(
            f"the Flatten head of {arch.name} reads a {head.input_size}x{head.input_size} input, "
            f"not {size}x{size}; build at size {head.input_size}"
        )
    keras = keras_module()
    L = keras.layers

    def conv_bn(conv: ConvSpec, x: Any) -> Any:
        return L.BatchNormalization(epsilon=epsilon, name=f"{conv.name}_bn")(x)

    def dense_bn(dense: DenseSpec, x: Any) -> Any:
        if include_top_bn and dense.activation == "relu":
            return L.BatchNormalization(epsilon=epsilon, name=f"{dense.name}_bn")(x)
        return x

    inputs = keras.Input((size, size, 3), dtype="float32", name="images")
    x, _ = build_features(keras, arch, inputs, after_relu=conv_bn)
    if head is not None:
        x = build_head(keras, head, x, after=dense_bn)
    model = keras.Model(inputs, x, name=f"{arch.name}_bn")
    names = list(arch.conv_names)
    if head is not None:
        names += [h.name for h in head.layers if not isinstance(h, ActivationSpec)]
    for name in names:
        try:
            set_weights(model, [name], arrays)
        except ValueError as e:
            raise ArchitectureError(
                f"layer {name!r}: the weights do not fit a {size}x{size} input ({e})"
            ) from e
    for conv in arch.convs:
        _set_bn(model.get_layer(f"{conv.name}_bn"), bn_params(stats[conv.name], epsilon))
    if head is not None and include_top_bn:
        for d in head.dense:
            if d.activation == "relu":
                _set_bn(model.get_layer(f"{d.name}_bn"), identity_bn_params(d.units, epsilon))
    return model


def write_bn_model(
    src_weights_path: str | os.PathLike[str],
    stats_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    force: bool = False,
    model: str | None = None,
    size: int | None = None,
    include_top_bn: bool = False,
    epsilon: float = DEFAULT_EPSILON,
) -> Path:
    """Build the identity-initialised BN VGG of a weight file and save it as ``.keras``.

    Args:
        src_weights_path: weight file in any layout :func:`vggnorm.read_weights` reads; the
            statistics must have been gathered on its conv weights (checked by fingerprint).
        stats_path: a complete stats file.
        out_path: where to write; must end in ``.keras``.
        force: overwrite ``out_path`` if it exists.
        model: ``"vgg16"``/``"vgg19"`` when the file cannot tell.
        size: input size; default the Flatten head's size, else the stats' image size.
        include_top_bn, epsilon: as in :func:`build_bn_model`.

    Returns:
        ``out_path``, written atomically (a temporary ``.keras`` beside it, then renamed).

    Raises:
        WeightFileError: wrong suffix, existing output without ``force``, or the output is the
            input.
        StatsError, ArchitectureError: statistics of another model, unfinished, or a bad size.

    Example:
        >>> write_bn_model("vgg16.h5", "vggnorm-stats.h5", "vgg16_bn.keras")  # doctest: +SKIP
    """
    from .atomic import check_output

    src, out = Path(src_weights_path), Path(out_path)
    if out.suffix != ".keras":
        raise WeightFileError(
            f"--out {out.name} must end in .keras: the BN model is a whole Keras model "
            "(architecture and weights), which Keras saves only as .keras"
        )
    with output_lock(out):
        check_output(out, force=force, inputs=[src], error=WeightFileError)
        _write_bn(src, stats_path, out, model, size, include_top_bn, epsilon)
    return out


def _write_bn(
    src: Path, stats_path: str | os.PathLike[str], out: Path, model: str | None,
    size: int | None, include_top_bn: bool, epsilon: float,
) -> None:  # fmt: skip
    from .pipeline import check_fingerprint, load
    from .statsfile import read_stats

    loaded = load(src, model)
    if loaded.bound.arch.padding != "zero":
        raise ArchitectureError(
            f"{src} pads by reflection (AdaIN layout); the BN model is built from stock Keras "
            "layers, which pad with zeros"
        )
    with_norm = list(loaded.bound.arch.norms)
    if with_norm:
        raise ArchitectureError(
            f"conv layer {with_norm[0]!r} already has a BatchNormalization before its ReLU; "
            "vggnorm bn builds BatchNorm VGGs from plain ones"
        )
    record = read_stats(stats_path)
    check_fingerprint(loaded, record, "--in")
    bound = loaded.bound
    ws = loaded.weights
    arch = bound.arch
    if size is None:
        head = arch.head
        flat = head is not None and head.reduce == "flatten" and head.input_size is not None
        size = head.input_size if flat and head is not None else record.meta.size
        assert size is not None
    net = build_bn_model(
        arch, ws.arrays, record, size=size, include_top_bn=include_top_bn, epsilon=epsilon
    )
    _save_keras_atomic(net, out)
    log.info(
        "wrote %s: input (%d, %d, 3) float32, preprocessed with %r",
        out,
        size,
        size,
        record.meta.preprocess,
    )


def _save_keras_atomic(net: Any, out: Path) -> None:
    # Keras picks the writer by suffix, so the temporary file must end in .keras too.
    try:
        with output_lock(out), atomic_path(out, suffix=".keras") as tmp:
            net.save(str(tmp), overwrite=True)
    except OSError as e:
        raise WeightFileError(f"could not write {out}: {e.strerror or e}") from e
