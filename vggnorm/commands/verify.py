"""``vggnorm verify``: prove a normalized file computes the same function and has unit means.

The checks and their tolerances are :mod:`vggnorm.core.verdicts`; this module runs the networks
that feed them: the function check on the first ``check_images`` stats images (original and
normalized side by side, and their heads), then the means, re-measured over the stats images with
the same decode and preprocessing, on any engine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..core.errors import StatsError, WeightFileError
from ..core.rescale import DEAD_THRESHOLD, Scales
from ..core.scaling import check_fingerprint, scales_for
from ..core.stats import LayerStats, empty_stats
from ..core.statsrecord import StatsRecord
from ..core.topology import Loaded
from ..core.verdicts import (
    FUNCTION_TOL,
    MEANS_TOL,
    VerifyReport,
    function_errors,
    judge_layer,
    judge_predictions,
    logits_arch,
)
from ..formats.registry import load
from ..formats.statsfile import read_stats
from ..runtime.data import Dataset, iter_batches, stats_dataset
from ..runtime.engine import Engine, LocalEngine
from ..runtime.measure import Counted, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Inputs:
    """Everything both checks read: the two networks, the stats, the scales and the images."""

    orig: Loaded
    norm: Loaded
    record: StatsRecord
    scales: Scales
    ds: Dataset
    items: tuple[str, ...]
    original: str
    stats: str


def verify(
    normalized: str | os.PathLike[str],
    original: str | os.PathLike[str] | None = None,
    stats: str | os.PathLike[str] | None = None,
    *,
    data: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    check_images: int = 8,
    batch_size: int = 16,
    workers: int = 2,
    dead_threshold: float | None = None,
    progress: Callable[[Progress], None] | None = None,
    engine: Engine | None = None,
) -> VerifyReport:
    """Check that ``normalized`` equals ``original`` as a function and has unit filter means.

    Args:
        normalized: a file written by :func:`vggnorm.normalize`.
        original: its source; default: the path recorded in its provenance.
        stats: the stats file used; default: the one recorded in its provenance.
        data: dataset path, if it moved since the stats were gathered.
        limit: re-measure means on only the first ``limit`` stats images (means then not judged).
        check_images: how many images the activation-by-activation comparison uses.
        batch_size: images per forward pass.
        workers: decoding threads.
        dead_threshold: default: the one the file was normalized with.
        progress: called after every batch of the re-measuring pass.
        engine: where the re-measuring pass runs (default: here).

    Returns:
        A :class:`~vggnorm.core.verdicts.VerifyReport`; ``report.ok`` says whether both checks
        passed.

    Raises:
        WeightFileError, StatsError: the files cannot be compared (not vggnorm output, other
            model, stats not recorded).
    """
    inputs = _inputs(normalized, original, stats, data, limit, dead_threshold)
    notes: list[str] = []
    first = inputs.items[:check_images]
    worst, n_func = _function_check(inputs, first, batch_size, workers)
    predictions = _check_head(inputs, first, notes)
    engine = engine or LocalEngine(workers)
    measured, seen = _remeasure(inputs, batch_size, notes, progress, engine)
    record = inputs.record
    full = seen == record.n_images
    if not full:
        notes.append(f"means re-measured on {seen} of the {record.n_images} stats images: they "
                     "are expected near 1, not exactly 1, so the means check is not judged")  # fmt: skip
    means_tol = MEANS_TOL.get(record.meta.precision, MEANS_TOL["bf16"])
    checks = tuple(
        judge_layer(conv, worst[conv], ls, before, inputs.scales, means_tol, full)
        for conv, ls, before in zip(inputs.orig.bound.conv_names, measured, record.layers)
    )
    return VerifyReport(
        normalized=str(normalized), original=inputs.original, stats=inputs.stats, layers=checks, function_images=n_func, means_images=seen,
        stats_images=record.n_images, means_checked=full, function_tol=FUNCTION_TOL,
        means_tol=means_tol, predictions=predictions, notes=tuple(notes),
    )  # fmt: skip


def _inputs(
    normalized: str | os.PathLike[str], original: str | os.PathLike[str] | None,
    stats: str | os.PathLike[str] | None, data: str | os.PathLike[str] | None,
    limit: int | None, dead_threshold: float | None,
) -> _Inputs:  # fmt: skip
    norm = load(normalized)
    prov = norm.weights.file.provenance
    if prov is None:
        raise WeightFileError(
            f"{normalized} carries no vggnorm provenance; was it written by apply?"
        )
    stats = stats or prov["stats"]["path"]
    if stats is None:
        raise StatsError("the stats file is not recorded in the provenance", fix="stats")
    record = read_stats(stats)
    original = original or prov["source"]["path"]
    orig = load(original)
    check_fingerprint(orig, record)
    # both networks pad as the statistics were gathered (AdaIN: reflection)
    orig, norm = (x.with_padding(record.meta.padding) for x in (orig, norm))
    if dead_threshold is None:
        dead_threshold = float(prov.get("dead_threshold", DEAD_THRESHOLD))
    scales = scales_for(record, orig.bound, dead_threshold)
    items = record.images[:limit] if limit is not None else record.images
    ds = stats_dataset(record, data)
    return _Inputs(orig, norm, record, scales, ds, items, str(original), str(stats))


def _function_check(
    inputs: _Inputs, items: Sequence[str], batch_size: int, workers: int
) -> tuple[dict[str, float], int]:
    """Per conv, the worst ``max |a_norm * s - a| / max |a|`` over ``items``; and how many."""
    from ..runtime.network import FeatureNet

    meta = inputs.record.meta
    nets = [
        FeatureNet(x.bound.arch.without_head(), x.arrays, meta.size, meta.preprocess,  # type: ignore[arg-type]
                   outputs="activations")
        for x in (inputs.orig, inputs.norm)
    ]  # fmt: skip
    convs = inputs.orig.bound.conv_names
    worst = dict.fromkeys(convs, 0.0)
    s = [inputs.scales.values[c].astype(np.float32) for c in convs]
    n = 0
    for batch in iter_batches(inputs.ds, items, meta.decode, batch_size, workers=workers):
        if batch.items:
            a, b = (net.activations(batch.images) for net in nets)
            for conv, err in zip(convs, function_errors(a, b, s)):
                worst[conv] = max(worst[conv], err)
            n += len(batch.items)
    if n == 0:
        raise StatsError("no stats image could be decoded for the function check")
    return worst, n


def _remeasure(
    inputs: _Inputs, batch_size: int, notes: list[str],
    progress: Callable[[Progress], None] | None, engine: Engine,
) -> tuple[tuple[LayerStats, ...], int]:  # fmt: skip
    """The normalized network's statistics over the items, measured in fp32 as ``stats`` did."""
    meta = replace(inputs.record.meta, precision="fp32")
    zero = empty_stats((c.name, c.filters) for c in inputs.norm.bound.arch.convs)
    total = Counted(zero, (), (), 0)
    items = inputs.items
    counts = engine(inputs.norm, inputs.ds, items, meta, batch_size, 0, False)
    try:
        for counted in counts:
            total = total.plus(counted)
            if progress:
                progress(Progress(total.end, len(items), len(total.images), len(total.skipped)))
    finally:
        counts.close()
    if total.skipped:
        notes.append(
            f"{len(total.skipped)} stats image(s) could not be decoded now: {total.skipped[0][0]}"
        )
    if not total.images:
        raise StatsError("no image re-measured")
    return total.layers, len(total.images)


def _check_head(inputs: _Inputs, items: Sequence[str], notes: list[str]) -> dict[str, float] | None:
    """Compare the classifier logits of both networks, when the head is fully known."""
    from ..runtime.network import FeatureNet

    head = inputs.orig.bound.arch.head
    if head is None or not head.dense:
        return None
    if not head.known:
        notes.append("head activations unknown in a weights-only file: predictions not compared")
        return None
    meta = inputs.record.meta
    decode = replace(meta.decode, size=head.input_size or meta.size)
    nets = [
        FeatureNet(logits_arch(x.bound.arch), x.arrays, decode.size, meta.preprocess,  # type: ignore[arg-type]
                   outputs="activations", with_head=True)
        for x in (inputs.orig, inputs.norm)
    ]  # fmt: skip
    max_abs, max_rel, agree, n = 0.0, 0.0, 0, 0
    for batch in iter_batches(inputs.ds, items, decode, 16):
        if not batch.items:
            continue
        pa, pb = (net.activations(batch.images)[-1] for net in nets)
        diff = np.abs(pa - pb)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float(diff.max() / max(float(np.abs(pa).max()), 1e-30)))
        agree += int(np.sum(pa.argmax(-1) == pb.argmax(-1)))
        n += len(batch.items)
    return judge_predictions(max_abs, max_rel, agree, n)
