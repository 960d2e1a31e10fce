"""``vggnorm apply``: rescale a weight file with gathered statistics. numpy and h5py only."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .collect import now
from .errors import StatsError, WeightFileError
from .rescale import DEAD_THRESHOLD, Scales, compute_scales, rescale
from .statsfile import StatsRecord, read_stats, stats_by_conv
from .topology import Bound, bind, fingerprint
from .weights_io import WeightSet, read_weights, sha256_file, write_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyResult:
    out: Path
    bound: Bound
    scales: Scales
    dropped: tuple[str, ...]
    provenance: dict[str, Any]


def scales_for(record: StatsRecord, bound: Bound, dead_threshold: float = DEAD_THRESHOLD) -> Scales:
    """Scales for ``bound``'s convs from ``record``, matched by position (names may differ by format)."""
    matched = stats_by_conv(record, [(c.name, c.filters) for c in bound.arch.convs])
    means = {name: s.mean for name, s in matched.items()}
    return compute_scales(means, bound.conv_names, dead_threshold)


def check_fingerprint(ws: WeightSet, bound: Bound, record: StatsRecord, what: str) -> None:
    fp = fingerprint(ws.arrays, bound.arch.weighted_features)
    if fp != record.meta.fingerprint:
        raise StatsError(
            f"{what} {ws.file.path} is not the model the stats were gathered on (conv weights "
            f"fingerprint {fp[:12]} vs {record.meta.fingerprint[:12]} from {record.meta.weights}); "
            "run `vggnorm stats --weights` on this file"
        )


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
    ws = read_weights(src)
    if ws.file.provenance is not None:
        raise WeightFileError(
            f"{ws.file.path} was already normalized by vggnorm "
            f"{ws.file.provenance.get('tool_version', '?')}; apply it to the original file"
        )
    bound = bind(ws.file, model)
    record = stats if isinstance(stats, StatsRecord) else read_stats(stats)
    check_fingerprint(ws, bound, record, "--in")
    try:
        scales = scales_for(record, bound, dead_threshold)
    except StatsError as e:
        raise StatsError(f"{stats}: {e}" if not isinstance(stats, StatsRecord) else str(e)) from e
    head = bound.arch.head
    norms = {
        c.name: (c.norm.name, c.norm.weight_index("beta"), c.norm.weight_index("moving_mean") or 0)
        for c in bound.arch.convs
        if c.norm is not None
    }
    new = rescale(
        ws.arrays,
        scales,
        head.dense[0].name if head and head.dense else None,
        head.reduce if head and head.dense else None,
        norms=norms,
    )
    changed = {k: v for k, v in new.items() if v is not ws.arrays[k]}
    for key, value in changed.items():
        if not np.all(np.isfinite(value)):  # cannot happen with finite positive scales; be sure
            raise WeightFileError(f"rescaling {key} produced non-finite values; nothing written")
    provenance = {
        "tool": "vggnorm",
        "tool_version": __version__,
        "created": now(),
        "operation": "normalize: conv filter means on the stats images are 1",
        "source": {
            "path": str(Path(src).resolve()),
            "sha256": sha256_file(src),
            "format": ws.file.format,
        },
        "stats": {
            "path": str(Path(stats).resolve()) if not isinstance(stats, StatsRecord) else None,
            "sha256": sha256_file(stats) if not isinstance(stats, StatsRecord) else None,
            "fingerprint": record.meta.fingerprint,
            "model": record.meta.model,
            "images": record.n_images,
            "skipped": len(record.skipped),
            "dataset": record.meta.dataset_path,
            "dataset_kind": record.meta.dataset_kind,
            "size": record.meta.size,
            "resize": record.meta.resize,
            "preprocess": record.meta.preprocess,
            "precision": record.meta.precision,
        },
        "architecture": bound.source,
        "conv_layers": list(bound.conv_names),
        "head_dense": head.dense[0].name if head and head.dense else None,
        "dead_threshold": dead_threshold,
        "dead_filters": {k: v.tolist() for k, v in scales.dead.items() if len(v)},
        "scales": "vggnorm/scales/<NN>_<layer>: float64 divisor of each filter (dead: 1)",
        "undo": "kernel[..., c] *= s[c] and bias[c] *= s[c]; next conv kernel[:, :, c, :] /= s[c]; "
        "first dense rows /= np.tile(s_last, rows // C)",
    }
    extra = {f"scales/{i:02d}_{n}": scales.values[n] for i, n in enumerate(bound.conv_names)}
    dropped = write_weights(ws.file, dst, changed, provenance, extra, force=force)
    if dropped:
        log.warning("dropped %s: optimizer state belongs to the old weights", ", ".join(dropped))
    provenance["dropped"] = dropped
    return ApplyResult(Path(dst), bound, scales, tuple(dropped), provenance)


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
