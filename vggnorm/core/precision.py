"""How precisely the per-filter means are known, from the per-image moments. Pure numpy.

The statistics are exact for the images counted; what users want is the mean of their image
*distribution*. Images are the sampling unit (positions within one image are strongly
correlated), and all images of a run have the same size, so filter c's mean is the average of
the per-image means ``m_ic`` over n images, with standard error ``sd_i(m_ic) / sqrt(n)`` and the
95% interval ``mean +- t * SE``, t Student's 0.975 quantile with n - 1 degrees of freedom. The
*relative half-width* ``t * SE / mean`` is what a target like 1% bounds.

Filters whose mean is tiny carry relative errors that mean nothing: dead filters (mean at or
below the dead threshold) and near-dead ones (below ``NEAR_DEAD_FRACTION`` of the layer's median
mean) are left out of the per-layer figures and counted apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .rescale import DEAD_THRESHOLD
from .stats import LayerStats

F64 = npt.NDArray[np.float64]

#: Confidence of the intervals.
CONFIDENCE = 0.95
#: A live filter below this fraction of its layer's median mean is near-dead.
NEAR_DEAD_FRACTION = 1e-3


def classify(
    means: npt.ArrayLike, dead_threshold: float = DEAD_THRESHOLD
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Which filters of a layer are dead (mean at or below ``dead_threshold``) and which are
    near-dead (live, below ``NEAR_DEAD_FRACTION`` of the live filters' median mean): the one
    definition every summary, figure and precision table uses.

    Example:
        >>> dead, near = classify([0.0, 1.0, 2.0, 1e-4])
        >>> dead.tolist(), near.tolist()
        ([True, False, False, False], [False, False, False, True])
    """
    m = np.asarray(means, dtype=np.float64)
    dead = m <= dead_threshold
    median = float(np.median(m[~dead])) if np.any(~dead) else 0.0
    return dead, ~dead & (m < NEAR_DEAD_FRACTION * median)


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _lgamma_ratio(a: float, b: float) -> float:
    """``lgamma(a + b) - lgamma(a)``, without the cancellation of two large lgammas when a is
    large (Stirling's series, differenced term by term; log1p keeps the leading term exact)."""
    if a < 20.0:
        return math.lgamma(a + b) - math.lgamma(a)

    def series(z: float) -> float:
        return 1 / (12 * z) - 1 / (360 * z**3) + 1 / (1260 * z**5)

    return (a - 0.5) * math.log1p(b / a) + b * math.log(a + b) - b + series(a + b) - series(a)


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    big, small = (a, b) if a >= b else (b, a)
    log_front = (_lgamma_ratio(big, small) - math.lgamma(small)
                 + a * math.log(x) + b * math.log1p(-x))  # fmt: skip
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile: the t with ``t_cdf(t, df) == p`` (bisection to float64 precision).

    Example:
        >>> round(t_quantile(0.975, 10), 4), round(t_quantile(0.975, 1e9), 4)
        (2.2281, 1.96)
    """
    if not (0.0 < p < 1.0 and df > 0):
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class FilterPrecision:
    """Per filter of one layer, over ``images`` images: the mean of the per-image means, its
    standard error, the relative half-width of its 95% interval, and which filters are judged
    (live: neither dead nor near-dead)."""

    name: str
    images: int
    mean: F64
    se: F64
    half_width: F64  # relative: t * se / mean (inf where the mean is 0)
    live: npt.NDArray[np.bool_]
    near_dead: npt.NDArray[np.bool_]
    t: float  # Student's quantile the intervals use

    @property
    def interval(self) -> tuple[F64, F64]:
        """The absolute 95% interval of each filter's mean: ``mean -+ t * se``."""
        h = self.t * self.se
        return self.mean - h, self.mean + h


def filter_precision(ls: LayerStats, confidence: float = CONFIDENCE) -> FilterPrecision | None:
    """The precision of each filter's mean; None when the per-image moments are unknown or fewer
    than two images were counted.

    Example:
        >>> from vggnorm.core.stats import ImageMoments
        >>> im = ImageMoments.of([[1.0], [3.0]])
        >>> fp = filter_precision(LayerStats("c", np.array([4.0]), np.array([10.0]), 2, im))
        >>> float(fp.se[0]), round(float(fp.half_width[0]), 3)
        (1.0, 6.353)
    """
    im = ls.per_image
    if im is None or im.images < 2:
        return None
    n = im.images
    mean = im.sum / n
    var = np.maximum(im.sumsq - n * mean * mean, 0.0) / (n - 1)
    se = np.sqrt(var / n)
    t = t_quantile(0.5 + confidence / 2.0, n - 1)
    half = np.full(mean.shape, np.inf)  # a filter that never fired: no relative precision
    fired = mean > 0
    half[fired] = t * se[fired] / mean[fired]
    dead, near = classify(mean)
    return FilterPrecision(ls.name, n, mean, se, half, ~dead & ~near, near, t)


@dataclass(frozen=True)
class LayerPrecision:
    """One layer's precision over its live filters: median, 99th percentile and worst relative
    half-width, and how many filters were left out as dead or near-dead."""

    name: str
    images: int
    live: int
    dead: int
    near_dead: int
    median: float
    p99: float
    worst: float
    half_widths: F64  # of the live filters

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the live filters' relative half-widths (0 without any)."""
        return float(np.quantile(self.half_widths, q)) if self.half_widths.size else 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        return {"name": self.name, "images": self.images, "live": self.live, "dead": self.dead,
                "near_dead": self.near_dead, "median": self.median, "p99": self.p99,
                "worst": self.worst}  # fmt: skip


def layer_precision(ls: LayerStats) -> LayerPrecision | None:
    """:class:`LayerPrecision` of one layer; None when its precision is unknown."""
    fp = filter_precision(ls)
    if fp is None:
        return None
    h = fp.half_width[fp.live]
    dead = int(np.sum(~fp.live & ~fp.near_dead))
    median, p99, worst = (float(np.quantile(h, q)) for q in (0.5, 0.99, 1.0)) if h.size else (
        0.0, 0.0, 0.0)  # fmt: skip
    return LayerPrecision(ls.name, fp.images, int(h.size), dead, int(fp.near_dead.sum()), median,
                          p99, worst, h)  # fmt: skip


def precision_table(layers: Sequence[LayerStats]) -> list[LayerPrecision] | None:
    """Every layer's precision, or None when any is unknown (a version-1 stats file)."""
    table = [layer_precision(ls) for ls in layers]
    return None if any(p is None for p in table) else [p for p in table if p is not None]


def worst_quantile(table: Sequence[LayerPrecision], q: float) -> float:
    """The largest, over layers, of the ``q`` quantile of live filters' relative half-widths:
    the figure a target error bounds."""
    return max((p.quantile(q) for p in table), default=0.0)


def target_reached(
    layers: Sequence[LayerStats], target: float, quantile: float, min_images: int
) -> tuple[bool, float | None]:
    """Whether every layer's ``quantile`` of live filters' relative half-widths is at or under
    ``target`` with at least ``min_images`` images; and the worst layer's figure (None when the
    precision is unknown)."""
    table = precision_table(layers)
    if table is None:
        return False, None
    worst = worst_quantile(table, quantile)
    return bool(table and table[0].images >= min_images and worst <= target), worst
