"""Is one set of VGG weights a per-filter positive rescaling of another? Pure numpy.

:func:`vggnorm.core.rescale.rescale` maps conv l's kernel to ``b_l = a_l * s_{l-1}[in] / s_l[out]`` and its
bias to ``a_b / s_l``, and multiplies the first Dense's input rows by ``s_last`` in flatten order.
:func:`compare_weights` recovers the ``s_l`` layer by layer from two weight sets and measures how
well every stored value fits them.

Tolerance, derived from the storage precision (unit roundoff ``u = eps / 2``, ``2**-24`` for
float32). Each stored value of ``a`` and ``b`` may have been rounded to its dtype up to twice (both
files may be rescalings of a common ancestor: one rounding per write), so a single ratio
``a / b`` is off from the true scale by at most ``4u`` (first order). Layer l divides out the
recovered ``s_{l-1}``, itself a median of such ratios, whose error grows by at most ``2u`` per layer
down the chain (each layer's median inherits the previous error and adds its own rounding), so
within a filter of layer l the ratios deviate from their median by at most
``2 * (4u + 2u * l) <= 4u * (L + 2)`` for a chain of L convs. float64 arithmetic adds ~1e-16 per
operation, negligible. For float32 VGG19 (L = 16) that is 4.3e-6; a different network gives
deviations of order 1. :func:`ratio_tolerance` computes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .archs import FlattenOrder
from .precision import FilterPrecision
from .rescale import DEAD_THRESHOLD  # dead filters, left out of the means comparison

F64 = npt.NDArray[np.float64]


def ratio_tolerance(dtypes: Sequence[np.dtype[Any]], n_layers: int) -> float:
    """Largest relative deviation of a stored ratio from its filter's scale for a true rescaling.

    Args:
        dtypes: the dtypes the compared arrays are stored in (the coarsest one decides).
        n_layers: convs in the chain (the recovered scales' error grows along it).

    Returns:
        ``4 * u * (n_layers + 2)`` with ``u`` the unit roundoff of the coarsest float dtype (see the
        module docstring for the derivation).

    Example:
        >>> f"{ratio_tolerance([np.dtype(np.float32)], 16):.2e}"
        '4.29e-06'
    """
    floats = [d for d in dtypes if np.issubdtype(d, np.floating)] or [np.dtype(np.float64)]
    u = max(float(np.finfo(d).eps) / 2 for d in floats)
    return 4.0 * u * (n_layers + 2)


@dataclass(frozen=True)
class LayerComparison:
    """How well conv layer ``name`` of b fits a rescaling of a.

    Attributes:
        name: the conv layer.
        scales: recovered per-filter scale (``a / b``), float64; 1 for all-zero filters.
        spread: max over filters of the max relative deviation of a kernel or bias ratio from the
            filter's scale.
        n_negative: ratios below zero (a sign flip: never a positive rescaling).
        n_zero_mismatch: entries zero in one set but not in the other.
        n_ratios: ratios compared.
    """

    name: str
    scales: F64
    spread: float
    n_negative: int
    n_zero_mismatch: int
    n_ratios: int

    def ok(self, tolerance: float) -> bool:
        return self.n_negative == 0 and self.n_zero_mismatch == 0 and self.spread <= tolerance


@dataclass(frozen=True)
class HeadComparison:
    """Whether the first Dense's rows carry the last conv's scales and its bias is unchanged."""

    name: str
    spread: float
    bias_equal: bool
    n_zero_mismatch: int


@dataclass(frozen=True)
class CompareReport:
    """Result of :func:`compare_weights`."""

    layers: tuple[LayerComparison, ...]
    tolerance: float
    head: HeadComparison | None = None
    other_changed: tuple[str, ...] = field(default=())
    missing: tuple[str, ...] = field(default=())

    @property
    def is_rescaling(self) -> bool:
        """b equals a rescaled per filter by positive scales, within :attr:`tolerance`."""
        head_ok = self.head is None or (
            self.head.spread <= self.tolerance
            and self.head.bias_equal
            and self.head.n_zero_mismatch == 0
        )
        return (
            not self.missing
            and not self.other_changed
            and head_ok
            and all(layer.ok(self.tolerance) for layer in self.layers)
        )

    @property
    def scales(self) -> dict[str, F64]:
        """The recovered per-filter scales of every conv layer."""
        return {layer.name: layer.scales for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (scales as lists)."""
        return {
            "is_rescaling": self.is_rescaling,
            "tolerance": self.tolerance,
            "layers": [
                {
                    "name": layer.name,
                    "spread": layer.spread,
                    "n_negative": layer.n_negative,
                    "n_zero_mismatch": layer.n_zero_mismatch,
                    "n_ratios": layer.n_ratios,
                    "scales": layer.scales.tolist(),
                }
                for layer in self.layers
            ],
            "head": None
            if self.head is None
            else {
                "name": self.head.name,
                "spread": self.head.spread,
                "bias_equal": self.head.bias_equal,
                "n_zero_mismatch": self.head.n_zero_mismatch,
            },
            "other_changed": list(self.other_changed),
            "missing": list(self.missing),
        }

    def table(self) -> str:
        """A fixed-width text table, one row per layer, then the verdict."""
        lines = [
            f"{'layer':<16}{'spread':>11}{'neg':>7}{'0-mism':>8}"
            f"{'min scale':>12}{'max scale':>12}  ok"
        ]
        for layer in self.layers:
            lo = float(layer.scales.min()) if layer.scales.size else float("nan")
            hi = float(layer.scales.max()) if layer.scales.size else float("nan")
            lines.append(
                f"{layer.name:<16}{layer.spread:>11.2e}{layer.n_negative:>7}"
                f"{layer.n_zero_mismatch:>8}{lo:>12.4g}{hi:>12.4g}  "
                f"{'yes' if layer.ok(self.tolerance) else 'NO'}"
            )
        if self.head is not None:
            lines.append(
                f"{self.head.name:<16}{self.head.spread:>11.2e}{'':>7}"
                f"{self.head.n_zero_mismatch:>8}  bias {'equal' if self.head.bias_equal else 'CHANGED'}"
            )
        if self.other_changed:
            lines.append(f"changed outside the convs: {', '.join(self.other_changed)}")
        if self.missing:
            lines.append(f"missing: {', '.join(self.missing)}")
        verdict = "a per-filter positive rescaling" if self.is_rescaling else "NOT a rescaling"
        lines.append(f"verdict: {verdict} (tolerance {self.tolerance:.2e})")
        return "\n".join(lines)


def _ratios(num: F64, den: F64) -> tuple[F64, int, int]:
    """Ratios where both are nonzero, and counts of one-sided zeros and negative ratios."""
    nz_n, nz_d = num != 0, den != 0
    both = nz_n & nz_d
    ratio = np.where(both, num / np.where(both, den, 1.0), np.nan)
    mismatch = int(np.count_nonzero(nz_n != nz_d))
    negative = int(np.count_nonzero(both & (ratio < 0)))
    return ratio, mismatch, negative


def _column_median(values: F64, counts: npt.NDArray[np.intp]) -> F64:
    """Median of each column's non-NaN entries (1 where none); faster than ``np.nanmedian``."""
    if counts.size and np.all(counts == counts[0]):  # the usual case: a partial sort will do
        k = int(counts[0])
        ordered = np.partition(values, sorted({max(k - 1, 0) // 2, max(k, 1) // 2}), axis=0)
    else:
        ordered = np.sort(values, axis=0)  # NaN sorts last
    lo = np.maximum(counts - 1, 0) // 2
    hi = np.maximum(counts, 1) // 2
    mid = 0.5 * (
        np.take_along_axis(ordered, lo[None, :], 0)[0]
        + np.take_along_axis(ordered, hi[None, :], 0)[0]
    )
    return np.where(counts > 0, mid, 1.0)


def _row_scale(s_last: F64, rows: int, flatten: tuple[FlattenOrder, int] | None) -> F64:
    c = s_last.shape[0]
    if flatten is None:
        if rows != c:
            raise ValueError(f"head has {rows} rows after global pooling, expected {c}")
        return s_last
    order, hw = flatten
    if rows != c * hw:
        raise ValueError(f"head has {rows} rows, expected {c} channels x {hw} positions")
    return np.repeat(s_last, hw) if order == "chw" else np.tile(s_last, hw)


def compare_weights(
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    conv_layers: Sequence[str],
    head_dense: str | None = None,
    flatten: tuple[FlattenOrder, int] | None = None,
    norms: Mapping[str, str] | None = None,
) -> CompareReport:
    """Decide whether ``b`` is ``a`` rescaled per filter by positive scales, and recover them.

    Per conv layer l (in order): divide ``s_{l-1}`` out of ``a``'s input axis, take the ratios
    ``a / b`` over every entry nonzero in both, the filter's scale is the median of its kernel
    ratios (its bias ratio when the kernel is all zero; 1 when both are), and the spread is the
    largest relative deviation of any kernel or bias ratio from that scale. Values in the
    subnormal range are treated as zero (their relative rounding error is unbounded).

    Args:
        a: reference weights, ``"<layer>/kernel"`` (kh, kw, C_in, C_out) and ``"<layer>/bias"``.
        b: the candidate, same keys and shapes.
        conv_layers: the conv chain in network order.
        head_dense: the first Dense after the convs (its rows should carry ``s_last``).
        flatten: ``(order, H*W)`` for a Flatten head (``"hwc"`` Keras, ``"chw"`` torch), None
            for global pooling.
        norms: conv -> its BatchNorm, whose beta and moving_mean are divided like the bias.

    Returns:
        :class:`CompareReport`; ``is_rescaling`` uses :func:`ratio_tolerance` of the arrays'
        dtypes. Keys other than the convs (and their BatchNorms' beta and moving_mean) and the
        head kernel must be bit-identical.

    Raises:
        ValueError: shapes differ between a and b, or do not chain.

    Example:
        >>> k = np.array([[[[1.0, 2.0]]]]); bias = np.array([1.0, 4.0])
        >>> a = {"c/kernel": k, "c/bias": bias}
        >>> b = {"c/kernel": k / [2.0, 4.0], "c/bias": bias / [2.0, 4.0]}
        >>> r = compare_weights(a, b, ["c"])
        >>> r.is_rescaling, r.scales["c"].tolist()
        (True, [2.0, 4.0])
    """
    missing = _missing(a, b)
    dtypes = [np.asarray(v).dtype for m in (a, b) for v in m.values()]
    tolerance = ratio_tolerance(dtypes, len(conv_layers))
    if {f"{n}/kernel" for n in [*conv_layers, head_dense] if n} & set(missing):  # no layer to compare
        return CompareReport((), tolerance, None, (), missing)
    tiny = min(float(np.finfo(d).tiny) for d in dtypes if np.issubdtype(d, np.floating))
    layers: list[LayerComparison] = []
    prev: F64 | None = None
    touched = {f"{n}/{p}" for n in conv_layers for p in ("kernel", "bias")}
    for name in conv_layers:
        like_bias = _like_bias((norms or {}).get(name))
        layers.append(_compare_conv(a, b, name, prev, tiny, like_bias))
        touched |= set(like_bias)
        prev = layers[-1].scales
    head = None
    if head_dense is not None and prev is not None:
        head = _compare_head(a, b, head_dense, prev, flatten, tiny)
        touched |= {f"{head_dense}/kernel", f"{head_dense}/bias"}
    return CompareReport(tuple(layers), tolerance, head, _changed(a, b, touched), missing)


def _like_bias(norm: str | None) -> tuple[str, ...]:
    """A BatchNorm's arrays that a rescaling divides like its conv's bias."""
    return (f"{norm}/beta", f"{norm}/moving_mean") if norm else ()


def _missing(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """The keys that one of the two sets lacks (a kernel, a bias, a BatchNorm array, any)."""
    return tuple(sorted(set(a) ^ set(b)))


def _changed(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], touched: set[str]) -> tuple[str, ...]:
    """Keys in both sets, outside ``touched``, whose arrays differ."""
    return tuple(sorted(
        k for k in set(a) & set(b)
        if k not in touched and not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))
    ))  # fmt: skip


def _flushed(x: npt.ArrayLike, tiny: float) -> F64:
    """float64 values with the subnormal range set to zero (its relative rounding is unbounded)."""
    v = np.asarray(x, dtype=np.float64)
    return np.where(np.abs(v) < tiny, 0.0, v)


def _compare_conv(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], name: str, prev: F64 | None,
    tiny: float, like_bias: Sequence[str] = (),
) -> LayerComparison:  # fmt: skip
    """One conv layer: the scales that map a's filters to b's (a's input axis already divided by
    the previous layer's scales), and how far every ratio is from them (its kernel's, its
    bias's and those of the ``like_bias`` arrays, a BatchNorm's, divided like the bias)."""
    ka, kb = _flushed(a[f"{name}/kernel"], tiny), _flushed(b[f"{name}/kernel"], tiny)
    if ka.shape != kb.shape or ka.ndim != 4:
        raise ValueError(f"{name}/kernel: shapes {ka.shape} and {kb.shape} differ or are not 4-D")
    if prev is not None:
        if prev.shape[0] != ka.shape[2]:
            raise ValueError(f"{name}: {ka.shape[2]} inputs, previous conv has {prev.shape[0]}")
        ka = ka * prev[None, None, :, None]
    n_out = ka.shape[3]
    ratio, mismatch, negative = _ratios(ka.reshape(-1, n_out), kb.reshape(-1, n_out))
    if f"{name}/bias" in a and f"{name}/bias" in b:
        ba, bb = _flushed(a[f"{name}/bias"], tiny), _flushed(b[f"{name}/bias"], tiny)
        bias_ratio, bm, bn = _ratios(ba, bb)
        mismatch, negative = mismatch + bm, negative + bn
    else:
        bias_ratio = np.full(n_out, np.nan)
    extra = [np.full(n_out, np.nan)]
    for key in (k for k in like_bias if k in a and k in b):
        r, m, n = _ratios(_flushed(a[key], tiny), _flushed(b[key], tiny))
        extra, mismatch, negative = [*extra, r], mismatch + m, negative + n
    counts = np.sum(~np.isnan(ratio), axis=0)
    kernel_med = _column_median(ratio, counts)
    scale = np.where(counts > 0, kernel_med, np.where(np.isnan(bias_ratio), 1.0, bias_ratio))
    # A nonpositive scale (sign flip) is already counted; keep the chain finite and positive.
    scale = np.where(scale > 0, scale, 1.0)
    all_ratios = np.vstack([ratio, bias_ratio[None, :], *(r[None, :] for r in extra)])
    dev = np.abs(all_ratios / scale[None, :] - 1.0)
    spread = float(np.nanmax(dev)) if np.any(~np.isnan(dev)) else 0.0
    n_ratios = int(np.count_nonzero(~np.isnan(all_ratios)))
    return LayerComparison(name, scale, spread, negative, mismatch, n_ratios)


def _compare_head(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], dense: str, s_last: F64,
    flatten: tuple[FlattenOrder, int] | None, tiny: float,
) -> HeadComparison:  # fmt: skip
    """The first Dense: b's rows must be a's times the last conv's scales, its bias unchanged."""
    ha = np.asarray(a[f"{dense}/kernel"], dtype=np.float64)
    hb = _flushed(b[f"{dense}/kernel"], tiny)
    if ha.shape != hb.shape or ha.ndim != 2:
        raise ValueError(f"{dense}/kernel: shapes {ha.shape} and {hb.shape} differ")
    expected = _flushed(ha * _row_scale(s_last, ha.shape[0], flatten)[:, None], tiny)
    ratio, mismatch, negative = _ratios(hb, expected)
    dev = np.abs(ratio - 1.0)
    spread = float(np.nanmax(dev)) if np.any(~np.isnan(dev)) else 0.0
    key = f"{dense}/bias"
    bias_equal = (key in a) == (key in b) and (key not in a or np.array_equal(a[key], b[key]))
    return HeadComparison(dense, spread, bias_equal, mismatch + negative)


@dataclass(frozen=True)
class ScalesVsMeans:
    """How a layer's recovered scales relate to measured per-filter means.

    Attributes:
        median_ratio: median of ``scale / mean`` (1 when b was normalized with these means);
            None without live filters.
        iqr_ratio: interquartile range of ``scale / mean`` (0 for a perfect match); None likewise.
        log_correlation: Pearson correlation of ``log scale`` and ``log mean``; None with fewer
            than two live filters or no variation.
        n_filters: live filters used (mean above :data:`DEAD_THRESHOLD`).
    """

    median_ratio: float | None
    iqr_ratio: float | None
    log_correlation: float | None
    n_filters: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_ratio": self.median_ratio,
            "iqr_ratio": self.iqr_ratio,
            "log_correlation": self.log_correlation,
            "n_filters": self.n_filters,
        }


def compare_with_means(
    implied_scales: Mapping[str, npt.ArrayLike],
    means: Mapping[str, npt.ArrayLike],
    dead_threshold: float = DEAD_THRESHOLD,
) -> dict[str, ScalesVsMeans]:
    """Compare recovered scales with measured means, layer by layer (dead filters left out).

    Args:
        implied_scales: per-layer scales, e.g. :attr:`CompareReport.scales`.
        means: per-layer per-filter mean activations of the *reference* network on some data.
        dead_threshold: means at or below this are dead and excluded.

    Returns:
        Layer -> :class:`ScalesVsMeans`, for the layers present in both with matching lengths.

    Raises:
        ValueError: a layer's arrays differ in length.

    Example:
        >>> r = compare_with_means({"c": [2.0, 4.0, 8.0]}, {"c": [1.0, 2.0, 4.0]})
        >>> r["c"].median_ratio, r["c"].iqr_ratio, round(r["c"].log_correlation or 0, 6)
        (2.0, 0.0, 1.0)
    """
    out: dict[str, ScalesVsMeans] = {}
    for name, s in implied_scales.items():
        if name not in means:
            continue
        sv = np.asarray(s, dtype=np.float64).ravel()
        mv = np.asarray(means[name], dtype=np.float64).ravel()
        if sv.shape != mv.shape:
            raise ValueError(f"{name}: {sv.size} scales but {mv.size} means")
        live = (mv > dead_threshold) & np.isfinite(mv) & (sv > 0) & np.isfinite(sv)
        if not np.any(live):
            out[name] = ScalesVsMeans(None, None, None, 0)
            continue
        ratio = sv[live] / mv[live]
        q25, q50, q75 = np.percentile(ratio, [25, 50, 75])
        corr: float | None = None
        ls, lm = np.log(sv[live]), np.log(mv[live])
        if ls.size >= 2 and np.std(ls) > 0 and np.std(lm) > 0:
            corr = float(np.corrcoef(ls, lm)[0, 1])
        out[name] = ScalesVsMeans(float(q50), float(q75 - q25), corr, int(ls.size))
    return out


@dataclass(frozen=True)
class IntervalAgreement:
    """How a layer's recovered scales sit in the sampling error of measured means.

    Attributes:
        within: live filters whose scale lies inside the 95% interval of their measured mean.
        live: live filters compared (neither dead nor near-dead in the measurement).
        median_z: median over them of ``|scale - mean| / SE``: about 0.95 (0.674 x sqrt(2))
            when the scales are the means of another sample of the same size from the same
            distribution, whose own error adds to SE's; None without any.
    """

    within: int
    live: int
    median_z: float | None


def scales_in_intervals(
    implied_scales: Mapping[str, npt.ArrayLike], precision: Mapping[str, FilterPrecision]
) -> dict[str, IntervalAgreement]:
    """Set recovered scales against the intervals of measured means, layer by layer: states a
    difference between two normalizations in units of the sampling error.

    Example:
        >>> from vggnorm.core.precision import filter_precision
        >>> from vggnorm.core.stats import ImageMoments, LayerStats
        >>> im = ImageMoments.of([[1.0], [3.0], [2.0]])
        >>> fp = filter_precision(LayerStats("c", im.sum, im.sumsq, 3, im))
        >>> a = scales_in_intervals({"c": [2.5]}, {"c": fp})["c"]
        >>> a.within, a.live, round(a.median_z, 12)
        (1, 1, 0.866025403784)
    """
    out: dict[str, IntervalAgreement] = {}
    for name, s in implied_scales.items():
        fp = precision.get(name)
        if fp is None:
            continue
        sv = np.asarray(s, dtype=np.float64).ravel()
        if sv.shape != fp.mean.shape:
            raise ValueError(f"{name}: {sv.size} scales but {fp.mean.size} means")
        live = fp.live & np.isfinite(sv) & (sv > 0) & (fp.se > 0)
        lo, hi = fp.interval
        within = int(np.sum(live & (lo <= sv) & (sv <= hi)))
        z = np.abs(sv[live] - fp.mean[live]) / fp.se[live]
        out[name] = IntervalAgreement(within, int(live.sum()), float(np.median(z)) if z.size else None)
    return out
