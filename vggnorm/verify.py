"""``vggnorm verify``: prove a normalized file computes the same function and has unit means.

Two independent checks; either alone can be fooled:

1. *Same function.* On the first ``check_images`` stats images, every conv activation of the
   normalized network times the filter's scale equals the original's, and with a classifier head
   the predictions match. Scales are recomputed from the stats file, not read from the output.
2. *Normalized.* Re-measured over the stats images (the same decode and preprocessing), every live
   filter's mean activation is 1 and every dead filter's mean is unchanged.

Tolerances come from float32 rounding. An activation's rounding error is relative to the size of
the dot products that make its layer (up to 4608 terms, ~1e-6 relative, growing with depth), not
to the activation itself: a sparse filter whose few positive values sit just above the ReLU kink
has a mean far below its layer's typical scale and a large *relative* error. So both checks
measure errors in units of the layer: the function check allows 1e-4 of the layer's largest
activation; the means check allows ``|mean - 1| * s_c <= 1e-4 * median(s)`` for filter c of scale
s_c (an error of 1e-4 of the layer's typical mean, in original units). Statistics gathered in bf16
hold their own ~2% worst-filter error, so their means are checked against 5e-2.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .archs import ActivationSpec, Arch, DenseSpec
from .data import Dataset, Decode, iter_batches
from .errors import StatsError, WeightFileError
from .measure import Counted, stretches
from .pipeline import (
    FUNCTION_TOL,
    Loaded,
    Progress,
    check_fingerprint,
    decode_of,
    function_errors,
    load,
    scales_for,
    stats_dataset,
    with_padding,
)
from .rescale import DEAD_THRESHOLD, Scales
from .stats import LayerStats, empty_stats
from .statsfile import StatsRecord, read_stats

log = logging.getLogger(__name__)

MEANS_TOL = {"fp32": 1e-4, "bf16": 5e-2}
DEAD_TOL = 1e-6


@dataclass(frozen=True)
class LayerCheck:
    name: str
    filters: int
    dead: int
    function_rel_err: float  # max |a_norm * s - a_orig| / max |a_orig|
    mean_min: float  # over live filters, re-measured on the normalized network
    mean_median: float
    mean_max: float
    dead_max_err: float
    means_err: float  # max over live filters of |mean - 1| * s_c / median(s)
    function_ok: bool
    means_ok: bool | None  # None: means not checked (subset of the stats images)


@dataclass(frozen=True)
class VerifyReport:
    normalized: str
    original: str
    stats: str
    layers: tuple[LayerCheck, ...]
    function_images: int
    means_images: int
    stats_images: int
    means_checked: bool
    function_tol: float
    means_tol: float
    predictions: dict[str, float] | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def function_ok(self) -> bool:
        preds_ok = self.predictions is None or bool(self.predictions["ok"])
        return all(c.function_ok for c in self.layers) and preds_ok

    @property
    def means_ok(self) -> bool | None:
        if not self.means_checked:
            return None
        return all(bool(c.means_ok) for c in self.layers)

    @property
    def ok(self) -> bool:
        return self.function_ok and self.means_ok is not False

    def to_json(self) -> str:
        d = asdict(self)
        d.update(ok=self.ok, function_ok=self.function_ok, means_ok=self.means_ok)
        return json.dumps(d, indent=2)

    def summary(self) -> str:
        """The console report: the per-layer table, the predictions, notes and the verdict."""
        lines = [self.table()]
        if self.predictions:
            p = self.predictions
            lines.append(
                f"predictions on {int(p['images'])} images: max abs err {p['max_abs_err']:.3g}, "
                f"max rel err {p['max_rel_err']:.3g}, top-1 agreement {p['top1_agreement']:.1%}"
            )
        lines += [f"note: {note}" for note in self.notes]
        means = {True: "ok", False: "FAILED", None: "not judged"}[self.means_ok]
        lines.append(
            f"same function ({self.function_images} images, tol {self.function_tol:g}): "
            f"{'ok' if self.function_ok else 'FAILED'}; means = 1 ({self.means_images} of "
            f"{self.stats_images} stats images, tol {self.means_tol:g}): {means}"
        )
        return "\n".join(lines)

    def table(self) -> str:
        head = (
            f"{'layer':<16}{'filters':>8}{'dead':>6}{'func rel err':>14}"
            f"{'mean min':>11}{'median':>11}{'max':>11}{'mean err':>11}  result"
        )
        rows = [head, "-" * len(head)]
        for c in self.layers:
            if not c.function_ok or c.means_ok is False:
                verdict = "FAIL"
            else:
                verdict = "ok" if c.means_ok else "function ok"
            rows.append(
                f"{c.name:<16}{c.filters:>8}{c.dead:>6}{c.function_rel_err:>14.2e}"
                f"{c.mean_min:>11.6f}{c.mean_median:>11.6f}{c.mean_max:>11.6f}"
                f"{c.means_err:>11.2e}  {verdict}"
            )
        return "\n".join(rows)


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
    engine: Any = None,
) -> VerifyReport:
    """Check that ``normalized`` equals ``original`` as a function and has unit filter means.

    Args:
        normalized: a file written by :func:`vggnorm.normalize`.
        original: its source; default: the path recorded in its provenance.
        stats: the stats file used; default: the one recorded in its provenance.
        data: dataset path, if it moved since the stats were gathered.
        limit: re-measure means on only the first ``limit`` stats images (means then not judged).
        check_images: how many images the activation-by-activation comparison uses.
        engine: where the re-measuring pass runs (None: here; see :mod:`vggnorm.ray_engine`).

    Returns:
        A :class:`VerifyReport`; ``report.ok`` says whether both checks passed.

    Raises:
        WeightFileError, StatsError: the files cannot be compared (not vggnorm output, other
            model, stats not recorded).
    """
    norm = load(normalized)
    prov = norm.weights.file.provenance
    if prov is None:
        raise WeightFileError(
            f"{normalized} carries no vggnorm provenance; was it written by apply?"
        )
    original = original or prov["source"]["path"]
    stats = stats or prov["stats"]["path"]
    if stats is None:
        raise StatsError("the stats file is not recorded in the provenance; pass --stats")
    record = read_stats(stats)
    orig = load(original)
    check_fingerprint(orig, record, "--original")
    # both networks pad as the statistics were gathered (AdaIN: reflection)
    orig, norm = (with_padding(x, record.meta.padding) for x in (orig, norm))
    if dead_threshold is None:
        dead_threshold = float(prov.get("dead_threshold", DEAD_THRESHOLD))
    scales = scales_for(record, orig.bound, dead_threshold)
    ds = stats_dataset(record, data)
    items = record.images[:limit] if limit is not None else record.images
    notes: list[str] = []

    first = items[:check_images]
    worst, n_func = _function_check(orig, norm, scales, record, ds, first, batch_size, workers)
    predictions = _check_head(orig, norm, ds, first, decode_of(record.meta), record, notes)
    measured, seen = _remeasure(
        norm, record, ds, items, batch_size, workers, notes, progress, engine
    )
    full = seen == record.n_images
    if not full:
        notes.append(
            f"means re-measured on {seen} of the {record.n_images} stats images: they are expected "
            "near 1, not exactly 1, so the means check is not judged"
        )
    means_tol = MEANS_TOL.get(record.meta.precision, MEANS_TOL["bf16"])
    checks = tuple(
        _judge(conv.name, conv.filters, worst[conv.name], ls, before, scales, means_tol, full)
        for conv, ls, before in zip(orig.bound.arch.convs, measured, record.layers)
    )
    return VerifyReport(
        normalized=str(normalized), original=str(original), stats=str(stats), layers=checks,
        function_images=n_func, means_images=seen, stats_images=record.n_images,
        means_checked=full, function_tol=FUNCTION_TOL, means_tol=means_tol,
        predictions=predictions, notes=tuple(notes),
    )  # fmt: skip


def _function_check(
    orig: Loaded, norm: Loaded, scales: Scales, record: StatsRecord, ds: Dataset,
    items: Sequence[str], batch_size: int, workers: int,
) -> tuple[dict[str, float], int]:  # fmt: skip
    """Per conv, the worst ``max |a_norm * s - a| / max |a|`` over ``items``; and how many."""
    from .model import FeatureNet

    meta = record.meta
    nets = [
        FeatureNet(x.bound.arch.without_head(), x.arrays, meta.size, meta.preprocess,  # type: ignore[arg-type]
                   outputs="activations")
        for x in (orig, norm)
    ]  # fmt: skip
    convs = orig.bound.conv_names
    worst = dict.fromkeys(convs, 0.0)
    s = [scales.values[c].astype(np.float32) for c in convs]
    n = 0
    for batch in iter_batches(ds, items, decode_of(meta), batch_size, workers=workers):
        if batch.items:
            a, b = (net.activations(batch.images) for net in nets)
            for conv, err in zip(convs, function_errors(a, b, s)):
                worst[conv] = max(worst[conv], err)
            n += len(batch.items)
    if n == 0:
        raise StatsError("no stats image could be decoded for the function check")
    return worst, n


def _remeasure(
    norm: Loaded, record: StatsRecord, ds: Dataset, items: Sequence[str], batch_size: int,
    workers: int, notes: list[str], progress: Callable[[Progress], None] | None, engine: Any,
) -> tuple[tuple[LayerStats, ...], int]:  # fmt: skip
    """The normalized network's statistics over ``items``, measured in fp32 as ``stats`` did."""

    meta = replace(record.meta, precision="fp32")
    zero = empty_stats((c.name, c.filters) for c in norm.bound.arch.convs)
    total = Counted(zero, (), (), 0)
    counts = stretches(norm, ds, items, meta, batch_size, workers=workers, engine=engine)
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
    return total.layers, len(total.images)


def _judge(
    name: str, filters: int, function_err: float, measured: LayerStats, before: LayerStats,
    scales: Scales, means_tol: float, full: bool,
) -> LayerCheck:  # fmt: skip
    if measured.count == 0:
        raise StatsError("no image re-measured")
    m = measured.mean
    dead = np.zeros(filters, bool)
    dead[scales.dead[name]] = True
    live = m[~dead]
    s_live = scales.values[name][~dead]
    dead_err = float(np.max(np.abs(m[dead] - before.mean[dead]), initial=0.0))
    means_err = float(np.max(np.abs(live - 1.0) * s_live) / np.median(s_live)) if live.size else 0.0
    return LayerCheck(
        name=name, filters=filters, dead=int(dead.sum()), function_rel_err=function_err,
        mean_min=float(live.min()) if live.size else float("nan"),
        mean_median=float(np.median(live)) if live.size else float("nan"),
        mean_max=float(live.max()) if live.size else float("nan"),
        dead_max_err=dead_err, means_err=means_err, function_ok=function_err <= FUNCTION_TOL,
        means_ok=bool(means_err <= means_tol and dead_err <= DEAD_TOL) if full else None,
    )  # fmt: skip


def _logits(arch: Arch) -> Arch:
    """``arch`` with a final softmax left out: predictions are compared as logits. A float32
    logit error of e (relative to the largest logit, as every layer is judged) moves a softmax
    output by up to 2 e |z|, which for the large logits of random or over-confident heads is
    far above e; the logits carry the function, the softmax only normalises them."""
    head = arch.head
    if head is None or not head.layers:
        return arch
    last = head.layers[-1]
    if isinstance(last, ActivationSpec) and last.activation == "softmax":
        layers = head.layers[:-1]
    elif isinstance(last, DenseSpec) and last.activation == "softmax":
        layers = (*head.layers[:-1], replace(last, activation="linear"))
    else:
        return arch
    return replace(arch, head=replace(head, layers=layers))


def _check_head(
    orig: Loaded, norm: Loaded, ds: Dataset, items: Sequence[str], decode: Decode,
    record: StatsRecord, notes: list[str],
) -> dict[str, float] | None:  # fmt: skip
    """Compare the classifier outputs of both networks, when the head is fully known."""
    from .model import FeatureNet

    head = orig.bound.arch.head
    if head is None or not head.dense:
        return None
    if not head.known:
        notes.append("head activations unknown in a weights-only file: predictions not compared")
        return None
    size = head.input_size or decode.size
    d = replace(decode, size=size)
    nets = [
        FeatureNet(_logits(x.bound.arch), x.arrays, size, record.meta.preprocess,  # type: ignore[arg-type]
                   outputs="activations", with_head=True)
        for x in (orig, norm)
    ]  # fmt: skip
    max_abs, max_rel, agree, n = 0.0, 0.0, 0, 0
    for batch in iter_batches(ds, items, d, 16):
        if not batch.items:
            continue
        pa, pb = (net.activations(batch.images)[-1] for net in nets)
        diff = np.abs(pa - pb)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float(diff.max() / max(float(np.abs(pa).max()), 1e-30)))
        agree += int(np.sum(pa.argmax(-1) == pb.argmax(-1)))
        n += len(batch.items)
    return {
        "images": n,
        "max_abs_err": max_abs,
        "max_rel_err": max_rel,
        "top1_agreement": agree / max(n, 1),
        "ok": float(n > 0 and max_rel <= FUNCTION_TOL),
    }
