"""How ``verify`` judges a normalized file: per-layer checks, tolerances and the report. Pure numpy.

Two independent checks; either alone can be fooled:

1. *Same function.* Every conv activation of the normalized network times the filter's scale
   equals the original's, and with a classifier head the logits match.
2. *Normalized.* Re-measured over the stats images, every live filter's mean activation is 1 and
   every dead filter's mean is unchanged.

Each failure is named apart (:meth:`VerifyReport.failures`): ``function`` (a conv layer's
activations), ``predictions`` (the head's logits), ``means`` (a live filter's mean is not 1),
``dead`` (a dead filter's mean changed: the stats called it dead, the images do not) and
``held-out`` (means on images the stats never saw, judged only with a tolerance).

Tolerances come from float32 rounding. An activation's rounding error is relative to the size of
the dot products that make its layer (up to 4608 terms, ~1e-6 relative, growing with depth), not
to the activation itself: a sparse filter whose few positive values sit just above the ReLU kink
has a mean far below its layer's typical scale and a large *relative* error. So both checks
measure errors in units of the layer: the function check allows :data:`FUNCTION_TOL` of the
layer's largest activation; the means check allows ``|mean - 1| * s_c <= 1e-4 * median(s)`` for
filter c of scale s_c (an error of 1e-4 of the layer's typical mean, in original units).
Statistics gathered in bf16 hold their own ~2% worst-filter error, so their means are checked
against 5e-2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .archs import ActivationSpec, Arch, DenseSpec
from .precision import filter_precision
from .rescale import Scales
from .stats import LayerStats

#: The function check of ``verify`` and ``report``: a normalized layer's activations times the
#: scales must equal the original's to this fraction of the layer's largest activation. float32
#: rounds each product of a K-term dot product (K <= 4608 in VGG) with error ~sqrt(K) * 2^-24
#: relative to the layer's scale, ~1e-6 per layer, compounding over 16 layers to ~1e-5 at worst.
FUNCTION_TOL = 1e-4
#: The means check, by the precision the statistics were gathered in.
MEANS_TOL = {"fp32": 1e-4, "bf16": 5e-2}
#: A dead filter (scale 1) must keep its mean to this absolute error.
DEAD_TOL = 1e-6


def function_errors(
    original: Sequence[np.ndarray], normalized: Sequence[np.ndarray], scales: Sequence[np.ndarray]
) -> list[float]:
    """Per layer, ``max |a_norm * s - a| / max |a|``: 0 for the same function up to rounding.

    Example:
        >>> function_errors([np.array([2.0, 4.0])], [np.array([1.0, 1.0])], [np.array([2.0, 4.0])])
        [0.0]
    """
    errors = []
    for a, b, s in zip(original, normalized, scales, strict=True):
        err = float(np.max(np.abs(b.astype(np.float64) * s - a), initial=0.0))
        errors.append(err / max(float(np.max(np.abs(a), initial=0.0)), 1e-30))
    return errors


@dataclass(frozen=True)
class LayerCheck:
    """One conv layer's verdicts and the numbers behind them."""

    name: str
    filters: int
    dead: int
    function_rel_err: float  # max |a_norm * s - a_orig| / max |a_orig|
    mean_min: float  # over live filters, re-measured on the normalized network
    mean_median: float
    mean_max: float
    dead_max_err: float  # max over dead filters of |mean - mean before|
    means_err: float  # max over live filters of |mean - 1| * s_c / median(s)
    function_ok: bool
    means_ok: bool | None  # live filters' means are 1 (None: not judged, a subset of the images)
    dead_ok: bool | None = None  # dead filters kept their means (None: not judged)

    @property
    def verdict(self) -> str:
        if not self.function_ok or self.means_ok is False or self.dead_ok is False:
            return "FAIL"
        return "ok" if self.means_ok else "function ok"


def judge_layer(
    name: str, function_err: float, measured: LayerStats, before: LayerStats, scales: Scales,
    means_tol: float, full: bool,
) -> LayerCheck:  # fmt: skip
    """The verdicts of one layer from its function error and its re-measured statistics.

    Args:
        name: the conv layer (its scales in ``scales``).
        function_err: the worst :func:`function_errors` value seen for it.
        measured: the normalized network's statistics on the stats images.
        before: the original statistics (dead filters must keep their means).
        scales: the scales the normalization used.
        means_tol: the means tolerance (:data:`MEANS_TOL`).
        full: whether ``measured`` covers every stats image (else the means are not judged).

    Raises:
        ValueError: nothing was re-measured.
    """
    if measured.count == 0:
        raise ValueError(f"{name}: no image re-measured")
    m = measured.mean
    dead = np.zeros(measured.channels, bool)
    dead[scales.dead[name]] = True
    live = m[~dead]
    s_live = scales.values[name][~dead]
    dead_err = float(np.max(np.abs(m[dead] - before.mean[dead]), initial=0.0))
    means_err = float(np.max(np.abs(live - 1.0) * s_live) / np.median(s_live)) if live.size else 0.0
    return LayerCheck(
        name=name, filters=measured.channels, dead=int(dead.sum()), function_rel_err=function_err,
        mean_min=float(live.min()) if live.size else float("nan"),
        mean_median=float(np.median(live)) if live.size else float("nan"),
        mean_max=float(live.max()) if live.size else float("nan"),
        dead_max_err=dead_err, means_err=means_err, function_ok=function_err <= FUNCTION_TOL,
        means_ok=bool(means_err <= means_tol) if full else None,
        dead_ok=bool(dead_err <= DEAD_TOL) if full else None,
    )  # fmt: skip


@dataclass
class OutputComparison:
    """Two networks' outputs on the same images, batch by batch: the worst absolute and
    relative (to the batch's largest output) differences and the top-1 agreement."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    agree: int = 0
    images: int = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        """One batch: ``a`` the reference's outputs, ``b`` the other's, one row per image."""
        diff = float(np.max(np.abs(a - b)))
        self.max_abs = max(self.max_abs, diff)
        self.max_rel = max(self.max_rel, diff / max(float(np.max(np.abs(a))), 1e-30))
        rows_a, rows_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        self.agree += int(np.sum(rows_a.argmax(-1) == rows_b.argmax(-1)))
        self.images += len(a)

    def verdict(self) -> dict[str, float]:
        return judge_predictions(self.max_abs, self.max_rel, self.agree, self.images)


def judge_predictions(
    max_abs: float, max_rel: float, agree: int, n: int
) -> dict[str, float]:
    """The head's verdict from the worst logit errors and the top-1 agreement over ``n`` images:
    the logits must match to :data:`FUNCTION_TOL` of the largest logit."""
    return {
        "images": n,
        "max_abs_err": max_abs,
        "max_rel_err": max_rel,
        "top1_agreement": agree / max(n, 1),
        "ok": float(n > 0 and max_rel <= FUNCTION_TOL),
    }


def logits_arch(arch: Arch) -> Arch:
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


@dataclass(frozen=True)
class HeldOutCheck:
    """One layer's means re-measured on images the statistics never saw: how far the live
    filters' means are from 1, and how many 95% intervals of those means hold 1."""

    name: str
    images: int
    live: int
    median_dev: float  # median over live filters of |mean - 1|
    p99_dev: float
    worst_dev: float
    within: int | None  # live filters whose interval holds 1 (None: fewer than two images)
    median_half_width: float | None  # of those intervals, relative

    def ok(self, tol: float) -> bool:
        return self.median_dev <= tol


def judge_held_out(name: str, measured: LayerStats, scales: Scales) -> HeldOutCheck:
    """The held-out verdict numbers of one layer (dead filters of the stats left out).

    Raises:
        ValueError: nothing was measured.
    """
    if measured.count == 0:
        raise ValueError(f"{name}: no held-out image measured")
    live = np.ones(measured.channels, bool)
    live[scales.dead[name]] = False
    dev = np.abs(measured.mean[live] - 1.0)
    median, p99, worst = ((float(np.quantile(dev, q)) for q in (0.5, 0.99, 1.0)) if dev.size
                          else (0.0, 0.0, 0.0))  # fmt: skip
    fp = filter_precision(measured)
    within, half = None, None
    if fp is not None:
        lo, hi = fp.interval
        within = int(np.sum(live & (lo <= 1.0) & (hi >= 1.0)))
        half = float(np.median(fp.half_width[live])) if live.any() else 0.0
    images = measured.per_image.images if measured.per_image is not None else 0
    return HeldOutCheck(name, images, int(live.sum()), median, p99, worst, within, half)


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found: per-layer checks, the predictions, notes and the verdict."""

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
    # per layer, how precisely the stats' means are known (None: a version-1 stats file)
    stats_precision: tuple[dict[str, Any], ...] | None = None
    # the means on images the stats never saw (None: not asked); judged only with a tolerance
    held_out: tuple[HeldOutCheck, ...] | None = None
    held_out_tol: float | None = None
    # ONNX files: both run in onnxruntime, outputs compared as ``predictions`` (None: not run)
    onnx: dict[str, float] | None = None

    @property
    def function_ok(self) -> bool:
        preds_ok = self.predictions is None or bool(self.predictions["ok"])
        onnx_ok = self.onnx is None or bool(self.onnx["ok"])
        return all(c.function_ok for c in self.layers) and preds_ok and onnx_ok

    @property
    def means_ok(self) -> bool | None:
        """The normalization check: live means 1 and dead means unchanged in every layer."""
        if not self.means_checked:
            return None
        return all(bool(c.means_ok) and c.dead_ok is not False for c in self.layers)

    @property
    def held_out_ok(self) -> bool | None:
        if self.held_out is None or self.held_out_tol is None:
            return None
        return all(c.ok(self.held_out_tol) for c in self.held_out)

    @property
    def ok(self) -> bool:
        return self.function_ok and self.means_ok is not False and self.held_out_ok is not False

    def failures(self) -> list[dict[str, str]]:
        """Every failed check, ``{"check": ..., "layer": name}``: ``function``, ``means`` and
        ``dead`` per conv layer, ``predictions`` for the ``head``, ``held-out`` per conv layer."""
        out = [{"check": "function", "layer": c.name} for c in self.layers if not c.function_ok]
        out += [{"check": "means", "layer": c.name} for c in self.layers if c.means_ok is False]
        out += [{"check": "dead", "layer": c.name} for c in self.layers if c.dead_ok is False]
        if self.predictions is not None and not self.predictions["ok"]:
            out.append({"check": "predictions", "layer": "head"})
        if self.onnx is not None and not self.onnx["ok"]:
            out.append({"check": "onnxruntime", "layer": "outputs"})
        if self.held_out_ok is False and self.held_out is not None and self.held_out_tol is not None:
            tol = self.held_out_tol
            out += [{"check": "held-out", "layer": c.name} for c in self.held_out if not c.ok(tol)]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ok=self.ok, function_ok=self.function_ok, means_ok=self.means_ok,
                 held_out_ok=self.held_out_ok, failures=self.failures())  # fmt: skip
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> list[str]:
        """The console report: the per-layer table, the predictions, notes and the verdict."""
        lines = self.table()
        if self.predictions:
            p = self.predictions
            lines.append(
                f"predictions on {int(p['images'])} images: max abs err {p['max_abs_err']:.3g}, "
                f"max rel err {p['max_rel_err']:.3g}, top-1 agreement {p['top1_agreement']:.1%}"
            )
        if self.onnx:
            o = self.onnx
            lines.append(
                f"onnxruntime, both files on {int(o['images'])} images: outputs max abs err "
                f"{o['max_abs_err']:.3g}, max rel err {o['max_rel_err']:.3g}: "
                f"{'ok' if o['ok'] else 'FAILED'}"
            )
        lines += [f"note: {note}" for note in self.notes]
        lines.append(self.precision_line())
        lines += self.held_out_lines()
        means = {True: "ok", False: "FAILED", None: "not judged"}[self.means_ok]
        lines.append(
            f"same function ({self.function_images} images, tol {self.function_tol:g}): "
            f"{'ok' if self.function_ok else 'FAILED'}; means = 1 ({self.means_images} of "
            f"{self.stats_images} stats images, tol {self.means_tol:g}): {means}"
        )
        return lines

    def precision_line(self) -> str:
        """How precisely the stats' means estimate the means of the image distribution: the
        worst layer's median and 99th-percentile relative 95% half-width."""
        if self.stats_precision is None:
            return "precision of the stats' means: unknown (a version-1 stats file)"
        median = max(float(p["median"]) for p in self.stats_precision)
        p99 = max(float(p["p99"]) for p in self.stats_precision)
        return (f"precision of the stats' means over {self.stats_images} images (95% interval, "
                f"worst layer): ±{median:.2%} median filter, ±{p99:.2%} 99th percentile: on new "
                "images of the same distribution the means are 1 within about that")  # fmt: skip

    def held_out_lines(self) -> list[str]:
        """Per layer, the means on held-out images, and the verdict when a tolerance is set."""
        if self.held_out is None:
            return []
        lines = [f"held-out images: means of the normalized network on {self.held_out[0].images} "
                 "images the stats never saw (live filters: |mean - 1| median, 99th percentile, "
                 "worst; intervals that hold 1)"]  # fmt: skip
        for c in self.held_out:
            within = "n/a" if c.within is None else f"{c.within}/{c.live}"
            half = "" if c.median_half_width is None else f" (±{c.median_half_width:.1%})"
            lines.append(f"  {c.name:<16} {c.median_dev:.2%}  {c.p99_dev:.2%}  {c.worst_dev:.2%}"
                         f"  {within}{half}")  # fmt: skip
        verdict = {True: "ok", False: "FAILED", None: "informational (no tolerance given)"}
        tol = "" if self.held_out_tol is None else f" (tol {self.held_out_tol:g} median)"
        return [*lines, f"held-out means{tol}: {verdict[self.held_out_ok]}"]

    def table(self) -> list[str]:
        head = (
            f"{'layer':<16}{'filters':>8}{'dead':>6}{'func rel err':>14}"
            f"{'mean min':>11}{'median':>11}{'max':>11}{'mean err':>11}  result"
        )
        rows = [head, "-" * len(head)]
        for c in self.layers:
            rows.append(
                f"{c.name:<16}{c.filters:>8}{c.dead:>6}{c.function_rel_err:>14.2e}"
                f"{c.mean_min:>11.6f}{c.mean_median:>11.6f}{c.mean_max:>11.6f}"
                f"{c.means_err:>11.2e}  {c.verdict}"
            )
        return rows
