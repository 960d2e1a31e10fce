"""How much memory a forward pass takes, and the batch that fits a budget: pure arithmetic on an
:class:`~vggnorm.core.archs.Arch`.

The estimate of a run's peak is ``fixed + batch x per_image``:

* ``per_image`` (:func:`activation_bytes`): every tensor the features make for one image, in the
  compute dtype (4 bytes in fp32, 2 in bf16): each conv's output (and, with a BatchNorm before its
  ReLU, the BN's and the ReLU's; with reflection padding, the padded input), each pooling's
  output, once more the largest conv output (the square the moments reduction forms), and the
  input: uint8 images (:data:`INPUT_COPIES`: decoded ahead, stacked, padded) and their float32
  preprocessed copy (plus its bf16 cast). Callers that keep every conv activation on the host
  (``verify``'s function check, ``report``) add float32 copies of the conv outputs.
* ``fixed`` (:func:`fixed_bytes`): the Python, TensorFlow and Keras runtime
  (:data:`RUNTIME_BYTES`), :data:`WEIGHT_COPIES` float32 copies of the conv weights, and one of
  the head's (read from the file, never built).

Where the constants come from: ``scripts/bench_batch.py`` on EPYC-BF16 (AMD EPYC, 2 cores,
AVX-512 with AVX512-BF16, no AMX; TensorFlow 2.21, Keras 3.15; docs/benchmarks.md, "Memory by
image size", 2026-11-30). The measured peak resident memory of ``collect_stats`` was 0.67-0.88 of
this estimate over 224, 512 and 1024 px, VGG16 and VGG19, fp32 and bf16: an upper bound by
design, since the batch must fit. docs/memory.md has the rule and the figures.

The batch (:func:`choose_batch`): ``floor((budget - fixed) / per_image)``, at least 1 and at most
:data:`MAX_BATCH` (the batch vggnorm always used before it chose one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, Union

from .archs import Arch, ConvSpec, DenseSpec, NormSpec, PoolSpec

#: The largest batch ``auto`` chooses: what every run used before batches were chosen.
MAX_BATCH = 16
#: Python with TensorFlow, Keras and vggnorm imported: 547 MiB resident on EPYC-BF16, rounded up
#: to leave room for the decoding threads, the decoded images' buffers and the accumulators.
RUNTIME_BYTES = 640 * 2**20
#: Float32 copies of the conv weights a built network holds: the arrays read from the file, the
#: Keras variables, and a transient copy while they are set. Measured: building the network
#: added 2.79x (VGG16) and 2.82x (VGG19) of their conv weights to the resident memory.
WEIGHT_COPIES = 3
#: uint8 copies of each image: the decoded image waiting in the queue (two batches are decoded
#: ahead), the stacked batch, and the batch padded to its full size.
INPUT_COPIES = 4
#: The default budget: this share of the GPU's memory (as TensorFlow reports what it may
#: allocate there) where the forward pass runs on a GPU; of the memory available to this process
#: (the host's available memory, within a cgroup limit if any, plus what the process holds)
#: otherwise. The estimate is itself an upper bound (above), so these leave a margin twice.
GPU_FRACTION = 0.8
HOST_FRACTION = 0.7

#: A batch size as asked: a number of images, or ``"auto"`` (chosen from the memory budget).
BatchSize = Union[int, Literal["auto"]]

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_memory(text: str) -> int:
    """Bytes from ``"8GB"``, ``"512MiB"``, ``"1.5 GB"`` or a plain number of bytes.

    kB, MB, GB and TB are powers of 1000; KiB, MiB, GiB and TiB powers of 1024 (case is ignored).
    A bare ``G`` or ``M`` is refused: it means 10^9 to some tools and 2^30 to others.

    Raises:
        ValueError: not an amount of memory, or not positive.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = (m.group(2) or "b").lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"expected an amount of memory such as 8GB or 512MiB, got {text!r}")
    value = float(m.group(1)) * _UNITS[unit]
    if not 1 <= value < 2**63:
        raise ValueError(f"expected at least 1 byte, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """``1.50 GiB``, ``512 MiB``: binary units, three significant figures."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def _out(n: int, kernel: int, stride: int, padding: str) -> int:
    return math.ceil(n / stride) if padding == "same" else (n - kernel) // stride + 1


def feature_tensors(arch: Arch, size: int) -> Iterator[tuple[str, int]]:
    """Every tensor the features make for one ``size`` x ``size`` image: ``(kind, values)``,
    kind ``"conv"`` (a conv's post-ReLU output), ``"extra"`` (a padded input, a BatchNorm's
    output, a pre-ReLU output) or ``"pool"``, in network order."""
    h = w = size
    channels = 3
    for layer in arch.features:
        if isinstance(layer, ConvSpec):
            (kh, kw), (sh, sw) = layer.kernel_size, layer.strides
            if arch.padding == "reflect" and layer.padding == "same":
                yield "extra", (h + 2) * (w + 2) * channels
            h, w = _out(h, kh, sh, layer.padding), _out(w, kw, sw, layer.padding)
            channels = layer.filters
            if layer.norm is not None:
                yield from (("extra", h * w * channels), ("extra", h * w * channels))
            yield "conv", h * w * channels
        elif isinstance(layer, PoolSpec):
            (ph, pw), (sh, sw) = layer.pool_size, layer.strides
            h, w = _out(h, ph, sh, layer.padding), _out(w, pw, sw, layer.padding)
            yield "pool", h * w * channels


def _dtype_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def activation_bytes(arch: Arch, size: int, precision: str = "fp32", host_copies: int = 0) -> int:
    """Bytes one image adds to the peak of a forward pass (module docstring).

    Args:
        arch: the architecture (its features; a head is not run by the statistics network).
        size: the square input size.
        precision: ``fp32`` or ``bf16`` (activations in bfloat16).
        host_copies: float32 copies of every conv output the caller keeps on the host.
    """
    e = _dtype_bytes(precision)
    tensors = list(feature_tensors(arch, size))
    convs = [n for kind, n in tensors if kind == "conv"]
    pixels = size * size * 3
    inputs = pixels * (INPUT_COPIES + 4 + (e if precision == "bf16" else 0))
    return inputs + e * (sum(n for _, n in tensors) + max(convs)) + 4 * host_copies * sum(convs)


def weight_bytes(arch: Arch) -> tuple[int, int]:
    """Float32 bytes of the conv weights (with their BatchNorms) and of the head's Dense and
    BatchNorm weights."""
    convs, channels = 0, 3
    for c in arch.convs:
        kh, kw = c.kernel_size
        convs += kh * kw * channels * c.filters + (c.filters if c.use_bias else 0)
        convs += 4 * c.filters if c.norm is not None else 0
        channels = c.filters
    head = 0
    if arch.head is not None:
        pools = sum(1 for layer in arch.features if isinstance(layer, PoolSpec))
        side = arch.head.input_size // 2**pools if arch.head.input_size else 1
        width = side * side * channels if arch.head.reduce == "flatten" else channels
        for layer in arch.head.layers:
            if isinstance(layer, DenseSpec):
                head += width * layer.units + (layer.units if layer.use_bias else 0)
                width = layer.units
            elif isinstance(layer, NormSpec):
                head += 4 * width
    return 4 * convs, 4 * head


def fixed_bytes(arch: Arch) -> int:
    """What a run holds whatever its batch: the runtime and the weights (module docstring)."""
    convs, head = weight_bytes(arch)
    return RUNTIME_BYTES + WEIGHT_COPIES * convs + head


def choose_batch(budget: int, fixed: int, per_image: int, cap: int = MAX_BATCH) -> int:
    """The most images per batch whose estimated peak ``fixed + batch x per_image`` stays within
    ``budget``: at least 1 (a run always tries one image), at most ``cap``."""
    if per_image < 1 or cap < 1:
        raise ValueError("per_image and cap must be at least 1")
    return max(1, min(cap, (budget - fixed) // per_image))


@dataclass(frozen=True)
class Batching:
    """How a run gets its batch: ``size`` images, or ``"auto"``: the most that fit ``max_memory``
    bytes (None: the default share of the device's memory), at most ``cap``. ``kept``: the size
    is a saved run's, kept by a resume."""

    size: BatchSize = "auto"
    max_memory: int | None = None
    cap: int = MAX_BATCH
    kept: bool = False

    def __post_init__(self) -> None:
        if self.size != "auto" and not (isinstance(self.size, int) and self.size >= 1):
            raise ValueError(f"batch size {self.size!r}: expected 'auto' or a whole number >= 1")
        if self.max_memory is not None and self.max_memory < 1:
            raise ValueError(f"memory budget {self.max_memory!r}: expected a number of bytes >= 1")


def batching_for(requested: BatchSize | Batching, max_memory: int | None = None,
                 recorded: int | None = None) -> Batching:  # fmt: skip
    """A run's :class:`Batching`: a given size wins; ``"auto"`` keeps ``recorded`` (the batch a
    resumed run started with), or with a budget chooses again, never above ``recorded``."""
    if isinstance(requested, Batching):
        return requested
    if requested != "auto":
        return Batching(requested, max_memory)
    if recorded is None:
        return Batching("auto", max_memory)
    if max_memory is None:
        return Batching(recorded, kept=True)
    return Batching("auto", max_memory, cap=min(recorded, MAX_BATCH))


@dataclass(frozen=True)
class Budget:
    """The memory a run may use, in bytes (None: unknown), and where the figure comes from."""

    limit: int | None
    source: str


@dataclass(frozen=True)
class BatchPlan:
    """The batch a run measures with, its estimated peak memory, and why."""

    batch: int
    peak: int  # bytes: fixed + batch x per_image
    per_image: int
    fixed: int
    size: int
    precision: str
    budget: Budget
    how: Literal["chosen", "given", "kept"]

    @property
    def fits(self) -> bool:
        return self.budget.limit is None or self.peak <= self.budget.limit

    def describe(self) -> str:
        """One line: the batch, the estimated peak and the budget."""
        line = (f"batch {self.batch} at {self.size}x{self.size} {self.precision}: estimated "
                f"peak memory {format_bytes(self.peak)}")  # fmt: skip
        limit = self.budget.limit
        budget = f"{format_bytes(limit)}, {self.budget.source}" if limit else self.budget.source
        if self.how == "chosen":
            line += f" (chosen for a budget of {budget})"
        else:
            line += f" ({'kept from the saved run' if self.how == 'kept' else 'as given'}; "
            line += f"budget {budget})"
        if not self.fits:
            line += "; more than the budget: the run may run out of memory"
        return line

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_batch(arch: Arch, size: int, precision: str, batching: Batching, budget: Budget,
               host_copies: int = 0) -> BatchPlan:  # fmt: skip
    """The batch for ``batching`` under ``budget`` and its estimated peak.

    ``arch`` is the file's architecture: its head counts in the fixed part (its weights are read)
    but is not run.
    """
    per_image = activation_bytes(arch, size, precision, host_copies)
    fixed = fixed_bytes(arch)
    how: Literal["chosen", "given", "kept"] = "chosen"
    if batching.size != "auto":
        batch, how = batching.size, "kept" if batching.kept else "given"
    elif budget.limit is None:
        batch = batching.cap
    else:
        batch = choose_batch(budget.limit, fixed, per_image, batching.cap)
    return BatchPlan(batch, fixed + batch * per_image, per_image, fixed, size, precision,
                     budget, how)  # fmt: skip
