"""``vggnorm apply``: rescale a weight file with gathered statistics. numpy and h5py only."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import check_output, output_lock
from .errors import StatsError, WeightFileError
from .pipeline import (
    Loaded,
    check_fingerprint,
    load,
    now,
    rescale_bound,
    scales_for,
    write_any_weights,
)
from .rescale import DEAD_THRESHOLD, Scales
from .statsfile import StatsRecord, read_stats
from .topology import Bound
from .weights_io import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyResult:
    out: Path
    bound: Bound
    scales: Scales
    dropped: tuple[str, ...]
    provenance: dict[str, Any]


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
        src: weight file in any supported layout; never modified.
        dst: output path with the same suffix as ``src``.
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
        check_output(out, force=force, inputs=[Path(src)], error=WeightFileError)
        return _normalize(src, out, stats, model, force, dead_threshold)


def _normalize(
    src: str | os.PathLike[str],
    dst: Path,
    stats: str | os.PathLike[str] | StatsRecord,
    model: str | None,
    force: bool,
    dead_threshold: float,
) -> ApplyResult:
    loaded = load(src, model)
    if loaded.weights.file.provenance is not None:
        raise WeightFileError(
            f"{src} was already normalized by vggnorm "
            f"{loaded.weights.file.provenance.get('tool_version', '?')}; apply it to the original"
        )
    record = stats if isinstance(stats, StatsRecord) else read_stats(stats)
    check_fingerprint(loaded, record, "--in")
    if record.meta.padding != loaded.bound.arch.padding:
        log.warning(
            "the stats were gathered with %s padding, %s pads with %s: its means are 1 under %s "
            "padding (as intended when it will be exported to that layout)",
            record.meta.padding, src, loaded.bound.arch.padding, record.meta.padding,
        )  # fmt: skip
    try:
        scales = scales_for(record, loaded.bound, dead_threshold)
    except StatsError as e:
        raise StatsError(f"{stats}: {e}" if not isinstance(stats, StatsRecord) else str(e)) from e
    new = rescale_bound(loaded.arrays, loaded.bound, scales)
    changed = {k: v for k, v in new.items() if v is not loaded.arrays[k]}
    for key, value in changed.items():
        if not np.all(np.isfinite(value)):  # cannot happen with finite positive scales; be sure
            raise WeightFileError(f"rescaling {key} produced non-finite values; nothing written")
    provenance = _provenance(src, stats, record, loaded, scales, dead_threshold)
    extra = {f"scales/{i:02d}_{n}": scales.values[n] for i, n in enumerate(loaded.bound.conv_names)}
    dropped = write_any_weights(loaded.weights.file, dst, changed, provenance, extra, force=force)
    if dropped:
        log.warning("dropped %s: optimizer state belongs to the old weights", ", ".join(dropped))
    provenance["dropped"] = dropped
    return ApplyResult(Path(dst), loaded.bound, scales, tuple(dropped), provenance)


def _provenance(
    src: str | os.PathLike[str],
    stats: str | os.PathLike[str] | StatsRecord,
    record: StatsRecord,
    loaded: Loaded,
    scales: Scales,
    dead_threshold: float,
) -> dict[str, Any]:
    """What produced a normalized file, stored in it (and how to undo it)."""
    stats_path = None if isinstance(stats, StatsRecord) else Path(stats)
    head = loaded.bound.arch.head
    meta = record.meta
    return {
        "tool": "vggnorm",
        "tool_version": __version__,
        "created": now(),
        "operation": "normalize: conv filter means on the stats images are 1",
        "source": {"path": str(Path(src).resolve()), "sha256": sha256_file(src),
                   "format": loaded.weights.file.format},
        "stats": {
            "path": str(stats_path.resolve()) if stats_path else None,
            "sha256": sha256_file(stats_path) if stats_path else None,
            "fingerprint": meta.fingerprint, "model": meta.model, "images": record.n_images,
            "skipped": len(record.skipped), "dataset": meta.dataset_path,
            "dataset_kind": meta.dataset_kind, "size": meta.size, "resize": meta.resize,
            "preprocess": meta.preprocess, "precision": meta.precision, "draft": meta.draft,
        },
        "architecture": loaded.bound.source,
        "conv_layers": list(loaded.bound.conv_names),
        "head_dense": head.dense[0].name if head and head.dense else None,
        "dead_threshold": dead_threshold,
        "dead_filters": {k: v.tolist() for k, v in scales.dead.items() if len(v)},
        "scales": (
            "vggnorm.scales metadata (JSON): float64 divisor of each filter (dead: 1)"
            if loaded.weights.file.format in ("safetensors", "pth")
            else "vggnorm/scales/<NN>_<layer>: float64 divisor of each filter (dead: 1)"
        ),
        "undo": "kernel[..., c] *= s[c] and bias[c] *= s[c]; next conv kernel[:, :, c, :] /= s[c]; "
        "first dense rows /= s_last in flatten order",
    }  # fmt: skip


def read_scales(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The per-layer scales stored in a file written by :func:`normalize`."""
    import h5py

    from .weights_io import PROVENANCE_GROUP, _h5_of, inspect_weights

    wf = inspect_weights(path)
    if wf.provenance is None:
        raise WeightFileError(f"{path} was not written by vggnorm (no provenance)")
    with _h5_of(wf.path, wf.format) as f:
        g = f[f"{PROVENANCE_GROUP}/scales"]
        return {
            key.split("_", 1)[1]: np.asarray(g[key][()])
            for key in sorted(g)
            if isinstance(g[key], h5py.Dataset)
        }
