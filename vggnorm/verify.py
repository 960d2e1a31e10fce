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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .collect import Progress
from .data import Dataset, Decode, iter_batches, open_dataset
from .errors import StatsError, VerificationError
from .model import Preprocess
from .normalize import check_fingerprint, scales_for
from .rescale import DEAD_THRESHOLD
from .stats import accumulate, empty_stats
from .statsfile import read_stats
from .topology import bind
from .weights_io import read_weights

log = logging.getLogger(__name__)

FUNCTION_TOL = 1e-4
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


def _dataset_for(meta_root: str, data: str | os.PathLike[str] | None) -> Path:
    if data is None:
        return Path(meta_root)
    return open_dataset(data).root


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
) -> VerifyReport:
    """Check that ``normalized`` equals ``original`` as a function and has unit filter means.

    Args:
        normalized: a file written by :func:`vggnorm.normalize`.
        original: its source; default: the path recorded in its provenance.
        stats: the stats file used; default: the one recorded in its provenance.
        data: dataset path, if it moved since the stats were gathered.
        limit: re-measure means on only the first ``limit`` stats images (means then not judged).
        check_images: how many images the activation-by-activation comparison uses.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` says whether both checks passed.

    Raises:
        VerificationError: the files cannot be compared (not vggnorm output, other model).
    """
    from .model import FeatureNet

    norm = read_weights(normalized)
    prov = norm.file.provenance
    if prov is None:
        raise VerificationError(
            f"{normalized} carries no vggnorm provenance; was it written by apply?"
        )
    original = original or prov["source"]["path"]
    stats = stats or prov["stats"]["path"]
    if stats is None:
        raise VerificationError("the stats file is not recorded in the provenance; pass --stats")
    record = read_stats(stats)
    orig = read_weights(original)
    bound = bind(orig.file)
    bound_norm = bind(norm.file)
    check_fingerprint(orig, bound, record, "--original")
    if dead_threshold is None:
        dead_threshold = float(prov.get("dead_threshold", DEAD_THRESHOLD))
    scales = scales_for(record, bound, dead_threshold)
    meta = record.meta
    preprocess: Preprocess = meta.preprocess  # type: ignore[assignment]
    decode = Decode(meta.size, meta.resize, meta.interpolation, meta.draft)  # type: ignore[arg-type]
    root = _dataset_for(meta.dataset_root, data)
    ds = Dataset(meta.dataset_kind, root, record.images, root)  # type: ignore[arg-type]
    items = record.images[:limit] if limit is not None else record.images
    notes: list[str] = []

    # 1. Same function, layer by layer, on a few images.
    arch = bound.arch.without_head()
    a_net = FeatureNet(arch, orig.arrays, meta.size, preprocess, outputs="activations")
    b_net = FeatureNet(
        bound_norm.arch.without_head(),
        norm.arrays,
        meta.size,
        preprocess,
        outputs="activations",
    )
    worst = {c.name: 0.0 for c in arch.convs}
    n_func = 0
    first = items[:check_images]
    for batch in iter_batches(ds, first, decode, batch_size, workers=workers):
        if not batch.items:
            continue
        for conv, a, b in zip(
            arch.convs, a_net.activations(batch.images), b_net.activations(batch.images)
        ):
            s = scales.values[conv.name].astype(np.float32)
            err = float(np.max(np.abs(b * s - a)))
            worst[conv.name] = max(worst[conv.name], err / max(float(np.max(np.abs(a))), 1e-30))
        n_func += len(batch.items)
    if n_func == 0:
        raise VerificationError("no stats image could be decoded for the function check")

    predictions = _check_head(
        bound, bound_norm, orig.arrays, norm.arrays, ds, first, decode, preprocess, notes
    )

    # 2. Re-measure the normalized network's means over the stats images.
    net = FeatureNet(bound_norm.arch.without_head(), norm.arrays, meta.size, preprocess, "fp32")
    layers = empty_stats((c.name, c.filters) for c in bound_norm.arch.convs)
    seen = 0
    for batch in iter_batches(ds, items, decode, batch_size, workers=workers):
        if batch.skipped:
            notes.append(
                f"{len(batch.skipped)} stats image(s) could not be decoded now: {batch.skipped[0][0]}"
            )
        if batch.items:
            sums = net.moments(batch.images)
            layers = accumulate(
                layers,
                {k: (v[0], v[1]) for k, v in sums.items()},
                {k: v[2] for k, v in sums.items()},
            )
            seen += len(batch.items)
        if progress:
            progress(Progress(batch.end, len(items), seen, 0))
    full = seen == record.n_images
    if not full:
        notes.append(
            f"means re-measured on {seen} of the {record.n_images} stats images: they are expected "
            "near 1, not exactly 1, so the means check is not judged"
        )
    means_tol = MEANS_TOL.get(meta.precision, MEANS_TOL["bf16"])
    checks = []
    for conv, ls, orig_stats in zip(arch.convs, layers, record.layers):
        if ls.count == 0:
            raise StatsError("no image re-measured")
        m = ls.mean
        dead = np.zeros(conv.filters, bool)
        dead[scales.dead[conv.name]] = True
        live = m[~dead]
        s_live = scales.values[conv.name][~dead]
        dead_err = float(np.max(np.abs(m[dead] - orig_stats.mean[dead]), initial=0.0))
        means_err = (
            float(np.max(np.abs(live - 1.0) * s_live) / np.median(s_live)) if live.size else 0.0
        )
        means_ok = None
        if full:
            means_ok = bool(means_err <= means_tol and dead_err <= DEAD_TOL)
        checks.append(
            LayerCheck(
                conv.name,
                conv.filters,
                int(dead.sum()),
                worst[conv.name],
                float(live.min(initial=np.inf)) if live.size else float("nan"),
                float(np.median(live)) if live.size else float("nan"),
                float(live.max(initial=-np.inf)) if live.size else float("nan"),
                dead_err,
                means_err,
                worst[conv.name] <= FUNCTION_TOL,
                means_ok,
            )
        )
    return VerifyReport(
        str(normalized), str(original), str(stats), tuple(checks), n_func, seen, record.n_images,
        full, FUNCTION_TOL, means_tol, predictions, tuple(notes),
    )  # fmt: skip


def _check_head(
    bound: Any, bound_norm: Any, a_arrays: Any, b_arrays: Any, ds: Dataset, items: Any,
    decode: Decode, preprocess: Preprocess, notes: list[str],
) -> dict[str, float] | None:  # fmt: skip
    """Compare the classifier outputs of both networks, when the head is fully known."""
    from .model import FeatureNet

    head = bound.arch.head
    if head is None or not head.dense:
        return None
    if not head.known:
        notes.append("head activations unknown in a weights-only file: predictions not compared")
        return None
    size = head.input_size or decode.size
    d = Decode(size, decode.resize, decode.interpolation, decode.draft)
    a = FeatureNet(bound.arch, a_arrays, size, preprocess, outputs="activations", with_head=True)
    b = FeatureNet(
        bound_norm.arch, b_arrays, size, preprocess, outputs="activations", with_head=True
    )
    max_abs, max_rel, agree, n = 0.0, 0.0, 0, 0
    for batch in iter_batches(ds, items, d, 16):
        if not batch.items:
            continue
        pa = a.activations(batch.images)[-1]
        pb = b.activations(batch.images)[-1]
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
        "ok": float(max_rel <= FUNCTION_TOL),
    }
