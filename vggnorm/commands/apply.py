"""``vggnorm apply``: rescale a weight file with gathered statistics. numpy and h5py only: no
TensorFlow is loaded."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import StatsError, WeightFileError
from ..core.rescale import DEAD_THRESHOLD, Scales
from ..core.scaling import check_fingerprint, rescale_bound, scales_for
from ..core.statsrecord import StatsRecord
from ..core.topology import Bound, Loaded
from ..formats.outputs import output_lock
from ..formats.registry import check_target, load, write_weights
from ..formats.statsfile import read_stats
from ._common import file_record, provenance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` wrote: the file, its architecture, the scales, the groups dropped (optimizer
    state) and the provenance stored with it."""

    out: Path
    bound: Bound
    scales: Scales
    dropped: tuple[str, ...]
    provenance: dict[str, Any]

    def summary(self) -> list[str]:
        head = self.provenance["head_dense"]
        lines = [
            f"normalized {len(self.scales.layers)} conv layers of {self.bound.arch.name}"
            + (f", compensated {head}" if head else "")
            + f"; {self.scales.n_dead} dead filter(s) kept scale 1"
        ]
        for name, idx in self.scales.dead.items():
            if len(idx):
                more = " ..." if len(idx) > 20 else ""
                lines.append(f"  dead in {name}: {idx.tolist()[:20]}{more}")
        lines += [f"dropped {g}: optimizer state belongs to the old weights" for g in self.dropped]
        return [*lines, f"wrote {self.out}"]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.provenance)


def normalize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    stats: str | os.PathLike[str] | StatsRecord,
    *,
    model: str | None = None,
    force: bool = False,
    dead_threshold: float = DEAD_THRESHOLD,
) -> ApplyResult:
    """Write ``dst``: ``src`` rescaled so every conv filter's mean activation on the stats data is 1.

    Args:
        src: weight file in any supported format and layout; never modified.
        dst: output path in the same format as ``src``.
        stats: a stats file (or record) gathered on a model with the same conv weights.
        model: ``"vgg16"``/``"vgg19"`` if the file cannot tell.
        force: overwrite ``dst`` if it exists.
        dead_threshold: filters with a mean at or below this keep scale 1.

    Returns:
        What was written, the scales, and the provenance stored in the file.

    Raises:
        WeightFileError, ArchitectureError, StatsError: nothing is written then.

    Example:
        >>> normalize("vgg16.h5", "vgg16_norm.h5", "vggnorm-stats.h5")  # doctest: +SKIP
    """
    out = Path(dst)
    with output_lock(out):
        check_target(src, out, force)  # the output's format, place and space: before any work
        loaded = load(src, model)
        if loaded.weights.file.provenance is not None:
            raise WeightFileError(
                f"{src} was already normalized by vggnorm "
                f"{loaded.weights.file.provenance.get('tool_version', '?')}; apply it to the original"
            )
        record = stats if isinstance(stats, StatsRecord) else read_stats(stats)
        return _write(loaded, out, stats, record, force, dead_threshold)


def _write(
    loaded: Loaded, out: Path, stats: str | os.PathLike[str] | StatsRecord, record: StatsRecord,
    force: bool, dead_threshold: float,
) -> ApplyResult:  # fmt: skip
    check_fingerprint(loaded, record)
    if record.meta.padding != loaded.bound.arch.padding:
        log.warning(
            "the stats were gathered with %s padding, %s pads with %s: its means are 1 under %s "
            "padding (as intended when it will be exported to that layout)",
            record.meta.padding, loaded.path, loaded.bound.arch.padding, record.meta.padding,
        )  # fmt: skip
    try:
        scales = scales_for(record, loaded.bound, dead_threshold)
    except StatsError as e:
        where = "" if isinstance(stats, StatsRecord) else f"{stats}: "
        raise StatsError(f"{where}{e}", fix=e.fix) from e
    new = rescale_bound(loaded.arrays, loaded.bound, scales)
    changed = {k: v for k, v in new.items() if v is not loaded.arrays[k]}
    prov = _provenance(loaded, stats, record, scales, dead_threshold)
    extra = {f"scales/{i:02d}_{n}": scales.values[n] for i, n in enumerate(loaded.bound.conv_names)}
    dropped = write_weights(loaded.weights.file, out, changed, provenance=prov, extra=extra,
                            force=force)  # fmt: skip
    if dropped:
        log.warning("dropped %s: optimizer state belongs to the old weights", ", ".join(dropped))
    prov["dropped"] = dropped
    return ApplyResult(out, loaded.bound, scales, tuple(dropped), prov)


#: Where each container keeps the scales (Keras files: datasets ``vggnorm/scales/<NN>_<layer>``).
_SCALES_STORED = {"safetensors": "vggnorm.scales metadata (JSON)",
                  "pth": "vggnorm.scales in the .vggnorm.json sidecar",
                  "matconvnet": "the vggnorm_scales variable (JSON)",
                  "onnx": "vggnorm.scales in metadata_props (JSON)"}  # fmt: skip


def _provenance(
    loaded: Loaded, stats: str | os.PathLike[str] | StatsRecord, record: StatsRecord,
    scales: Scales, dead_threshold: float,
) -> dict[str, Any]:  # fmt: skip
    """What produced a normalized file, stored in it (and how to undo it)."""
    # a record knows the file it came from (collect_stats's output, read_stats's input), if any
    path = stats.path if isinstance(stats, StatsRecord) else stats
    stats_file = file_record(path) if path is not None and Path(path).is_file() else None
    meta = record.meta
    where = _SCALES_STORED.get(loaded.weights.file.format, "vggnorm/scales/<NN>_<layer>")
    return provenance(
        "normalize: conv filter means on the stats images are 1",
        source=file_record(loaded.path, loaded.weights.file.format),
        stats={
            "path": stats_file["path"] if stats_file else None,
            "sha256": stats_file["sha256"] if stats_file else None,
            "fingerprint": meta.fingerprint, "model": meta.model, "images": record.n_images,
            "skipped": len(record.skipped), "dataset": meta.dataset_path,
            "dataset_kind": meta.dataset_kind, "size": meta.size, "resize": meta.decode.resize,
            "preprocess": meta.preprocess, "precision": meta.precision, "draft": meta.decode.draft,
            "padding": meta.padding, "pooling": meta.pooling,
        },
        architecture=loaded.bound.source,
        conv_layers=list(loaded.bound.conv_names),
        head_dense=loaded.bound.arch.first_dense,
        dead_threshold=dead_threshold,
        dead_filters={k: v.tolist() for k, v in scales.dead.items() if len(v)},
        scales=f"{where}: float64 divisor of each filter (dead: 1)",
        undo="kernel[..., c] *= s[c] and bias[c] *= s[c]; next conv kernel[:, :, c, :] /= s[c]; "
        "first dense rows /= s_last in flatten order",
    )  # fmt: skip
