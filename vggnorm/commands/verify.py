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
from typing import Any

import numpy as np

from ..core.archs import Arch
from ..core.errors import DatasetError, StatsError, WeightFileError
from ..core.memory import Batching, BatchPlan, BatchSize, batching_for, plan_batch
from ..core.rescale import DEAD_THRESHOLD, Scales
from ..core.scaling import check_fingerprint, scales_for
from ..core.stats import LayerStats, empty_stats
from ..core.statsrecord import StatsRecord
from ..core.topology import Loaded
from ..core.verdicts import (
    FUNCTION_TOL,
    MEANS_TOL,
    HeldOutCheck,
    OutputComparison,
    VerifyReport,
    function_errors,
    judge_held_out,
    judge_layer,
    logits_arch,
)
from ..formats.registry import load
from ..formats.statsfile import read_stats
from ..runtime.data import Dataset, iter_batches, open_dataset, stats_dataset
from ..runtime.engine import Engine, LocalEngine
from ..runtime.measure import Counted, Progress
from ..runtime.onnx_run import check_onnx_files

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


@dataclass(frozen=True)
class VerifyOptions:
    """How ``verify`` runs.

    Attributes:
        data: dataset path, if it moved since the stats were gathered.
        limit: re-measure means on only the first ``limit`` stats images (means then not judged).
        check_images: how many images the activation-by-activation comparison uses.
        batch_size: images per forward pass, or ``"auto"``: the most whose estimated peak fits
            ``max_memory``, at most 16 (:mod:`vggnorm.core.memory`).
        max_memory: the memory budget in bytes for ``"auto"``; default: a share of the device's.
        workers: decoding threads.
        dead_threshold: default: the one the file was normalized with.
        held_out: also measure the normalized means on images the statistics never saw: a
            dataset path, or ``"stats"`` for the images of the stats' own dataset that they did
            not count.
        held_out_limit: at most this many held-out images (default 256).
        held_out_tol: judge the held-out means: every layer's median ``|mean - 1|`` over live
            filters at or under this (default: reported, not judged).
    """

    data: str | os.PathLike[str] | None = None
    limit: int | None = None
    check_images: int = 8
    batch_size: BatchSize = "auto"
    max_memory: int | None = None
    workers: int = 2
    dead_threshold: float | None = None
    held_out: str | os.PathLike[str] | None = None
    held_out_limit: int = 256
    held_out_tol: float | None = None


def verify(
    normalized: str | os.PathLike[str],
    original: str | os.PathLike[str] | None = None,
    stats: str | os.PathLike[str] | None = None,
    options: VerifyOptions | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
    engine: Engine | None = None,
    **settings: Any,
) -> VerifyReport:
    """Check that ``normalized`` equals ``original`` as a function and has unit filter means.

    Args:
        normalized: a file written by :func:`vggnorm.normalize`.
        original: its source; default: the path recorded in its provenance.
        stats: the stats file used; default: the one recorded in its provenance.
        options: how to run (:class:`VerifyOptions`); ``settings`` replace its fields.
        progress: called after every batch of the re-measuring passes.
        engine: where the re-measuring passes run (default: here).

    Returns:
        A :class:`~vggnorm.core.verdicts.VerifyReport`; ``report.ok`` says whether every judged
        check passed.

    Raises:
        WeightFileError, StatsError: the files cannot be compared (not vggnorm output, other
            model, stats not recorded).
        OutOfMemoryError: a forward pass ran out of memory (a smaller batch or budget helps).
    """
    opts = replace(options or VerifyOptions(), **settings)
    inputs = _inputs(normalized, original, stats, opts)
    notes: list[str] = []
    first = inputs.items[:opts.check_images]
    batching = batching_for(opts.batch_size, opts.max_memory)
    worst, n_func = _function_check(inputs, first, batching, opts.workers)
    predictions = _check_head(inputs, first, notes, batching)
    onnx = check_onnx_files(inputs.orig, inputs.norm, inputs.ds, first, inputs.record.meta,
                            inputs.scales, notes)  # fmt: skip
    engine = engine or LocalEngine(opts.workers)
    measured, seen = _remeasure(inputs, inputs.ds, inputs.items, batching, notes, progress,
                                engine)  # fmt: skip
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
    held_out = _held_out(inputs, opts, notes, progress, engine) if opts.held_out else None
    return VerifyReport(
        normalized=str(normalized), original=inputs.original, stats=inputs.stats, layers=checks,
        function_images=n_func, means_images=seen, stats_images=record.n_images,
        means_checked=full, function_tol=FUNCTION_TOL, means_tol=means_tol,
        predictions=predictions, notes=tuple(notes), stats_precision=_precision(record),
        held_out=held_out, held_out_tol=opts.held_out_tol, onnx=onnx,
    )  # fmt: skip


def _held_out(
    inputs: _Inputs, opts: VerifyOptions, notes: list[str],
    progress: Callable[[Progress], None] | None, engine: Engine,
) -> tuple[HeldOutCheck, ...]:  # fmt: skip
    """The normalized network's means on images the statistics never saw."""
    meta = inputs.record.meta
    if str(opts.held_out) == "stats":
        ds = open_dataset(opts.data or meta.dataset_path, annotations=meta.annotations)
        used = set(inputs.record.images) | {item for item, _, _ in inputs.record.skipped}
        items = tuple(i for i in ds.items if i not in used)
    else:
        ds = open_dataset(opts.held_out)  # type: ignore[arg-type]
        same = ds.root.resolve() == inputs.ds.root.resolve()  # the stats' images, wherever now
        used = set(inputs.record.images) if same else set()
        items = tuple(i for i in ds.items if i not in used)
    if not items:
        raise DatasetError(f"no held-out image: every image of {ds.describe()} was counted")
    items = items[: opts.held_out_limit]
    batching = batching_for(opts.batch_size, opts.max_memory)
    measured, _ = _remeasure(inputs, ds, items, batching, notes, progress, engine)
    return tuple(judge_held_out(conv, ls, inputs.scales)
                 for conv, ls in zip(inputs.orig.bound.conv_names, measured))  # fmt: skip


def _precision(record: StatsRecord) -> tuple[dict[str, Any], ...] | None:
    rows = record.intervals()
    return None if rows is None else tuple(rows)


def _inputs(
    normalized: str | os.PathLike[str], original: str | os.PathLike[str] | None,
    stats: str | os.PathLike[str] | None, opts: VerifyOptions,
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
    # both networks pad and pool as the statistics were gathered (AdaIN: reflection)
    orig, norm = (x.as_measured(record.meta.padding, record.meta.pooling) for x in (orig, norm))
    dead_threshold = opts.dead_threshold
    if dead_threshold is None:
        dead_threshold = float(prov.get("dead_threshold", DEAD_THRESHOLD))
    scales = scales_for(record, orig.bound, dead_threshold)
    items = record.images[: opts.limit] if opts.limit is not None else record.images
    ds = stats_dataset(record, opts.data)
    return _Inputs(orig, norm, record, scales, ds, items, str(original), str(stats))


def _side_by_side(arch: Arch, size: int, batching: Batching) -> BatchPlan:
    """The batch of a pass through two networks side by side, which keeps both networks'
    activations on the host (fp32)."""
    from ..runtime.network import device_budget

    plan = plan_batch(arch, size, "fp32", batching, device_budget(batching.max_memory), 2)
    log.info("%s", plan.describe())
    return plan


def _function_check(
    inputs: _Inputs, items: Sequence[str], batching: Batching, workers: int
) -> tuple[dict[str, float], int]:
    """Per conv, the worst ``max |a_norm * s - a| / max |a|`` over ``items``; and how many."""
    from ..runtime.network import FeatureNet

    meta = inputs.record.meta
    plan = _side_by_side(inputs.orig.bound.arch, meta.size, batching)
    nets = [
        FeatureNet(x.bound.arch.without_head(), x.arrays, meta.size, meta.preprocess,  # type: ignore[arg-type]
                   outputs="activations", peak=plan.peak)
        for x in (inputs.orig, inputs.norm)
    ]  # fmt: skip
    convs = inputs.orig.bound.conv_names
    worst = dict.fromkeys(convs, 0.0)
    s = [inputs.scales.values[c].astype(np.float32) for c in convs]
    n = 0
    for batch in iter_batches(inputs.ds, items, meta.decode, plan.batch, workers=workers):
        if batch.items:
            a, b = (net.activations(batch.images) for net in nets)
            for conv, err in zip(convs, function_errors(a, b, s)):
                worst[conv] = max(worst[conv], err)
            n += len(batch.items)
    if n == 0:
        raise StatsError("no stats image could be decoded for the function check")
    return worst, n


def _remeasure(
    inputs: _Inputs, ds: Dataset, items: Sequence[str], batching: Batching, notes: list[str],
    progress: Callable[[Progress], None] | None, engine: Engine,
) -> tuple[tuple[LayerStats, ...], int]:  # fmt: skip
    """The normalized network's statistics over ``items`` of ``ds``, measured in fp32 as
    ``stats`` did."""
    meta = replace(inputs.record.meta, precision="fp32")
    zero = empty_stats((c.name, c.filters) for c in inputs.norm.bound.arch.convs)
    total = Counted(zero, (), (), 0)
    counts = engine(inputs.norm, ds, items, meta, batching, 0, False,
                    on_plan=lambda plan: log.info("%s", plan.describe()))  # fmt: skip
    try:
        for counted in counts:
            total = total.plus(counted)
            if progress:
                progress(Progress(total.end, len(items), len(total.images), len(total.skipped)))
    finally:
        counts.close()
    if total.skipped:
        notes.append(
            f"{len(total.skipped)} image(s) could not be decoded now: {total.skipped[0][0]}"
        )
    if not total.images:
        raise StatsError("no image re-measured")
    return total.layers, len(total.images)


def _check_head(
    inputs: _Inputs, items: Sequence[str], notes: list[str], batching: Batching
) -> dict[str, float] | None:
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
    plan = _side_by_side(inputs.orig.bound.arch, decode.size, batching)
    nets = [
        FeatureNet(logits_arch(x.bound.arch), x.arrays, decode.size, meta.preprocess,  # type: ignore[arg-type]
                   outputs="activations", with_head=True, peak=plan.peak)
        for x in (inputs.orig, inputs.norm)
    ]  # fmt: skip
    outputs = OutputComparison()
    for batch in iter_batches(inputs.ds, items, decode, plan.batch):
        if batch.items:
            outputs.add(*(net.activations(batch.images)[-1] for net in nets))
    return outputs.verdict()
