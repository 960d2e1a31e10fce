"""``vggnorm scales``: the per-filter factors of a stats file, for code that cannot change its
weights.

A factor is ``1 / mean`` of the filter's activation on the stats images (1 for a dead filter),
so that at every ReLU output ``normalized activation = original activation x factor``, exactly:
what ``apply`` writes into the weights, applied to the features instead. The factors are keyed
by the layer names of a layout: the file's own (default), Keras's ``block1_conv1``,
torchvision's and timm's ``features.N`` (with or without BatchNorm), a bare Sequential's ``N``,
Gatys's ``conv1_1``, AdaIN's Sequential indices.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.archs import ARCHS
from ..core.errors import ArchitectureError, VggnormError, WeightFileError
from ..core.rescale import DEAD_THRESHOLD, compute_scales
from ..core.statsrecord import StatsRecord, stats_by_conv
from ..core.torch_layouts import LAYOUT_NAMES, native_layer_names
from ..formats.outputs import check_output, output_lock
from ..formats.registry import load
from ..formats.scalesfile import check_suffix, write_scales_file
from ..formats.statsfile import read_stats
from ._common import file_record, provenance

log = logging.getLogger(__name__)

#: What the factors are, said with every file.
RELATION = (
    "normalized activation = original activation x factor, exactly, at every ReLU output "
    "(factor = 1 / the filter's mean on the stats images; 1 for a dead filter)"
)
#: Layer-name layouts: the stats file's weights' own names, Keras's, or a PyTorch layout's.
NAMINGS = ("file", "keras", *LAYOUT_NAMES)


@dataclass(frozen=True)
class ScalesResult:
    """What ``scales`` wrote: the factors by layer name, the dead filters, how to use them."""

    out: Path
    layout: str
    factors: dict[str, np.ndarray]
    dead: dict[str, list[int]]
    example: str
    notes: tuple[str, ...] = ()

    def summary(self) -> list[str]:
        n_dead = sum(len(v) for v in self.dead.values())
        return [
            f"factors of {len(self.factors)} conv layers ({self.layout} names: "
            f"{', '.join(list(self.factors)[:3])}, ...); {n_dead} dead filter(s) keep factor 1",
            f"relation: {RELATION}",
            *(f"note: {note}" for note in self.notes),
            "example (PyTorch, NCHW features):",
            *(f"  {line}" for line in self.example.splitlines()),
            f"wrote {self.out}",
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "layout": self.layout, "relation": RELATION,
                "layers": {k: int(v.size) for k, v in self.factors.items()},
                "dead": self.dead, "example": self.example, "notes": list(self.notes)}  # fmt: skip


def write_scales(
    stats: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layout: str = "file",
    force: bool = False,
    dead_threshold: float = DEAD_THRESHOLD,
) -> ScalesResult:
    """Write the per-filter factors of ``stats`` to ``out`` (``.json``, ``.npz``,
    ``.safetensors``, ``.pt`` or ``.pth``), keyed by the layer names of ``layout``.

    Args:
        stats: a complete stats file.
        out: the file to write; its suffix picks the container.
        layout: one of :data:`NAMINGS`: ``file`` (the names of the weight file the stats were
            gathered on, read again; the stats' own names when it is gone), ``keras``, or a
            PyTorch layout (``torchvision``, ``timm_bn``, ``gatys``, ...).
        force: overwrite ``out``.
        dead_threshold: means at or below this keep factor 1.

    Returns:
        What was written, with the relation the factors satisfy and an example.

    Raises:
        StatsError: an unreadable or unfinished stats file.
        ArchitectureError: a stock layout's names for stats of another network.
        OutputError: an unknown suffix, an existing ``out`` without ``force``.

    Example:
        >>> write_scales("vggnorm-stats.h5", "scales.pt", layout="torchvision")  # doctest: +SKIP
    """
    target = Path(out)
    check_suffix(target)
    if layout not in NAMINGS:
        raise VggnormError(f"unknown layout {layout!r}; expected one of {', '.join(NAMINGS)}")
    with output_lock(target):
        check_output(target, force=force, inputs=[Path(stats)])
        record = read_stats(stats)
        matched = stats_by_conv(record, [(s.name, s.channels) for s in record.layers])
        names, notes = _names(record, layout)
        scales = compute_scales({n: s.mean for n, s in matched.items()}, list(matched), dead_threshold)
        factors = {new: 1.0 / scales.values[old] for old, new in zip(matched, names)}
        dead = {new: scales.dead[old].tolist() for old, new in zip(matched, names)
                if len(scales.dead[old])}  # fmt: skip
        meta = provenance(
            "per-filter factors of a stats file", stats=file_record(stats), model=record.meta.model,
            layout=layout, relation=RELATION, dead_threshold=dead_threshold, dead_filters=dead,
            preprocess=record.meta.preprocess, padding=record.meta.padding,
            pooling=record.meta.pooling,
        )  # fmt: skip
        write_scales_file(target, factors, meta)
    return ScalesResult(target, layout, factors, dead, _example(target, names[0]), tuple(notes))


def _names(record: StatsRecord, layout: str) -> tuple[list[str], list[str]]:
    """Each stats layer's name in ``layout``, in order, and notes on how they were found."""
    ours = [s.name for s in record.layers]
    if layout == "file":
        return _file_names(record)
    model = record.meta.model
    arch = ARCHS.get(model)
    if arch is None or len(arch.convs) != len(ours):
        raise ArchitectureError(
            f"the stats are of {model!r} with {len(ours)} convs, not a stock VGG16/VGG19: the "
            f"{layout} layout has no names for it; name its layers as its own file does"
        )
    if layout == "keras":
        return list(arch.conv_names), []
    return list(native_layer_names(layout, model).values()), []  # type: ignore[arg-type]


def _file_names(record: StatsRecord) -> tuple[list[str], list[str]]:
    """The module, node or layer names of the weight file the stats were gathered on."""
    ours = [s.name for s in record.layers]
    path = Path(record.meta.weights)
    try:
        loaded = load(path)
    except (WeightFileError, ArchitectureError, ImportError) as e:
        return ours, [f"the stats' weight file cannot be read ({e}): the stats' own layer names"]
    if loaded.fingerprint() != record.meta.fingerprint:
        return ours, [f"{path} changed since the stats were gathered: the stats' own layer names"]
    native = dict(loaded.weights.file.native_names)
    convs = loaded.bound.conv_names
    if len(convs) != len(ours):
        return ours, [f"{path} has {len(convs)} convs, the stats {len(ours)}: their own names"]
    return [native.get(c, c) for c in convs], []


def _example(out: Path, first: str) -> str:
    """How PyTorch code multiplies its features by the factors of ``out``."""
    suffix = out.suffix.lower()
    load_line = {
        ".json": f'f = {{k: torch.tensor(v) for k, v in json.load(open("{out.name}")).items() '
        f'if k != "__metadata__"}}',
        ".npz": f'f = {{k: torch.from_numpy(v) for k, v in np.load("{out.name}").items() '
        f'if k != "__metadata__"}}',
        ".safetensors": f'f = safetensors.torch.load_file("{out.name}")',
    }.get(suffix, f'f = torch.load("{out.name}", weights_only=True)')
    return (
        f"{load_line}\n"
        f"relu = ...  # the ReLU output of layer {first!r} of the original weights, (N, C, H, W)\n"
        f'normalized = relu * f["{first}"].view(1, -1, 1, 1).to(relu.dtype)'
    )
