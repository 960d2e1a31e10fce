"""compare_weights / compare_with_means: pure numpy."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vggnorm.core.archs import VGG19
from vggnorm.core.compare import (
    CompareReport,
    HeadComparison,
    IntervalAgreement,
    LayerComparison,
    ScalesVsMeans,
    _column_median,
    _ratios,
    compare_weights,
    compare_with_means,
    ratio_tolerance,
    scales_in_intervals,
)
from vggnorm.core.precision import FilterPrecision, filter_precision
from vggnorm.core.rescale import Scales, compute_scales, rescale
from vggnorm.core.stats import ImageMoments, LayerStats
from vggnorm.core.torch_layouts import compensate_head

WIDTHS = (3, 8, 16, 16, 32)
CONVS = [f"c{i}" for i in range(1, len(WIDTHS))]
HW = 4  # fc1 reads a 2x2 map


def tiny_weights(seed: int, dtype: type = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}
    for name, c_in, c_out in zip(CONVS, WIDTHS, WIDTHS[1:]):
        w[f"{name}/kernel"] = rng.normal(0, 0.1, (3, 3, c_in, c_out)).astype(dtype)
        w[f"{name}/bias"] = rng.normal(0, 0.05, c_out).astype(dtype)
    w["fc1/kernel"] = rng.normal(0, 0.1, (WIDTHS[-1] * HW, 6)).astype(dtype)
    w["fc1/bias"] = rng.normal(0, 0.1, 6).astype(dtype)
    w["fc2/kernel"] = rng.normal(0, 0.1, (6, 3)).astype(dtype)
    return w


def log_uniform_scales(layers: list[str], widths: list[int], seed: int) -> Scales:
    rng = np.random.default_rng(seed)
    return compute_scales({n: 10 ** rng.uniform(-3, 3, c) for n, c in zip(layers, widths)}, layers)


def chw_rescale(w: dict[str, np.ndarray], scales: Scales) -> dict[str, np.ndarray]:
    out = rescale(w, scales)
    return compensate_head(out, "fc1", scales.values[scales.layers[-1]], "chw")


def test_recovers_known_scales_on_a_tiny_chain() -> None:
    a = tiny_weights(0)
    scales = log_uniform_scales(CONVS, list(WIDTHS[1:]), 1)
    b = chw_rescale(a, scales)
    report = compare_weights(a, b, CONVS, "fc1", ("chw", HW))
    assert report.is_rescaling, report.table()
    for name in CONVS:
        assert np.allclose(report.scales[name], scales.values[name], rtol=1e-6, atol=0)
    assert all(layer.spread < report.tolerance / 4 for layer in report.layers)
    json.dumps(report.to_dict())  # serialisable
    assert "verdict: a per-filter positive rescaling" in report.table()


def test_recovers_known_scales_at_vgg19_widths() -> None:
    rng = np.random.default_rng(5)
    a: dict[str, np.ndarray] = {}
    c_in = 3
    for conv in VGG19.convs:
        a[f"{conv.name}/kernel"] = rng.normal(0, 0.05, (3, 3, c_in, conv.filters)).astype(
            np.float32
        )
        a[f"{conv.name}/bias"] = rng.normal(0, 0.05, conv.filters).astype(np.float32)
        c_in = conv.filters
    names = list(VGG19.conv_names)
    scales = log_uniform_scales(names, [c.filters for c in VGG19.convs], 6)
    b = rescale(a, scales)
    report = compare_weights(a, b, names)
    assert report.is_rescaling, report.table()
    worst = max(float(np.max(np.abs(report.scales[n] / scales.values[n] - 1.0))) for n in names)
    assert worst < 1e-6
    # Float32 storage: ratios scatter by a few units of 2**-24, well inside the derived bound.
    assert max(layer.spread for layer in report.layers) < 8 * 2.0**-24 < report.tolerance


@pytest.mark.parametrize(
    "kind", ["unrelated", "sign-flip", "hwc-head", "bias-shift", "fc2-changed"]
)
def test_not_a_rescaling(kind: str) -> None:
    a = tiny_weights(0)
    scales = log_uniform_scales(CONVS, list(WIDTHS[1:]), 1)
    if kind == "unrelated":
        b = tiny_weights(1)
    elif kind == "sign-flip":
        b = {k: -v for k, v in a.items()}
    elif kind == "hwc-head":  # Keras's tile order on a torch (chw) kernel
        b = rescale(a, scales, "fc1", "flatten")
    elif kind == "bias-shift":
        b = chw_rescale(a, scales)
        b["c2/bias"] = b["c2/bias"] + np.float32(1e-3)
    else:
        b = chw_rescale(a, scales)
        b["fc2/kernel"] = b["fc2/kernel"] * np.float32(2)
    report = compare_weights(a, b, CONVS, "fc1", ("chw", HW))
    assert not report.is_rescaling
    assert "NOT a rescaling" in report.table()
    if kind == "sign-flip":
        assert all(layer.n_negative > 0 for layer in report.layers)
    if kind == "unrelated":
        assert all(layer.spread > 0.1 for layer in report.layers)
    if kind == "fc2-changed":
        assert report.other_changed == ("fc2/kernel",)


def test_identical_weights_are_unit_rescaling_and_missing_layers_are_reported() -> None:
    a = tiny_weights(2)
    report = compare_weights(a, dict(a), CONVS, "fc1", ("chw", HW))
    assert report.is_rescaling
    assert all(np.all(layer.scales == 1.0) for layer in report.layers)
    missing = compare_weights(a, {k: v for k, v in a.items() if k != "c3/kernel"}, CONVS)
    assert not missing.is_rescaling and missing.missing == ("c3/kernel",)


def test_tolerance_is_derived_from_the_dtype() -> None:
    u32 = 2.0**-24
    assert ratio_tolerance([np.dtype(np.float32)], 16) == pytest.approx(4 * u32 * 18)
    assert ratio_tolerance([np.dtype(np.float32), np.dtype(np.float16)], 2) == pytest.approx(
        4 * 2.0**-11 * 4
    )
    a16 = tiny_weights(0, np.float16)
    scales = compute_scales({n: np.full(c, 3.0) for n, c in zip(CONVS, WIDTHS[1:])}, CONVS)
    assert compare_weights(a16, rescale(a16, scales), CONVS).is_rescaling


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_property_any_positive_scales_are_recovered(seed: int) -> None:
    a = tiny_weights(seed % 1000)
    scales = log_uniform_scales(CONVS, list(WIDTHS[1:]), seed)
    report = compare_weights(a, chw_rescale(a, scales), CONVS, "fc1", ("chw", HW))
    assert report.is_rescaling
    for name in CONVS:
        assert np.allclose(report.scales[name], scales.values[name], rtol=1e-6, atol=0)


def test_compare_with_means() -> None:
    rng = np.random.default_rng(4)
    means = {"c1": rng.uniform(0.1, 5.0, 8)}
    means["c1"][2] = 0.0  # dead: excluded
    scales = {"c1": np.where(means["c1"] > 0, means["c1"], 1.0) * 2.0}
    out = compare_with_means(scales, means)["c1"]
    assert out.n_filters == 7
    assert out.median_ratio == pytest.approx(2.0, rel=1e-12)
    assert out.iqr_ratio == pytest.approx(0.0, abs=1e-12)
    assert out.log_correlation == pytest.approx(1.0, abs=1e-12)
    shuffled = compare_with_means({"c1": rng.permutation(scales["c1"])}, means)["c1"]
    assert shuffled.iqr_ratio is not None and shuffled.iqr_ratio > 0.1
    json.dumps(out.to_dict())
    assert compare_with_means({"c1": np.ones(2)}, {"c1": np.zeros(2)})["c1"].median_ratio is None
    with pytest.raises(ValueError, match="3 means"):
        compare_with_means({"c1": np.ones(2)}, {"c1": np.ones(3)})


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), nan_per_column=st.integers(0, 3), seed=st.integers(0, 1000))
def test_column_median_equals_nanmedian(rows: int, nan_per_column: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, 4))
    for col in range(4):  # equal NaN counts per column: the partial-sort path
        values[rng.permutation(rows)[: min(nan_per_column, rows)], col] = np.nan
    values[0, 3] = np.nan if rows > 1 and seed % 2 else values[0, 3]  # sometimes unequal counts
    counts = np.sum(~np.isnan(values), axis=0)
    expected = np.array(
        [np.median(values[~np.isnan(values[:, j]), j]) if counts[j] else 1.0 for j in range(4)]
    )
    assert np.array_equal(_column_median(values, counts), expected)


# ---------------------------------------------------------------------------------------------
# compare --stats: implied scales against measured means and their intervals, exactly


def test_compare_with_means_figures_exactly() -> None:
    # ratios scale / mean 1, 2, 3, 4, 5: median 3, quartiles 2 and 4 (numpy's linear rule)
    means = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    out = compare_with_means({"c": means * [1, 2, 3, 4, 5]}, {"c": means})["c"]
    assert (out.median_ratio, out.iqr_ratio, out.n_filters) == (3.0, 2.0, 5)
    assert out.to_dict() == {"median_ratio": 3.0, "iqr_ratio": 2.0,
                             "log_correlation": out.log_correlation, "n_filters": 5}  # fmt: skip
    # two filters are enough for a correlation; its sign is kept
    two = compare_with_means({"c": [2.0, 1.0]}, {"c": [1.0, 2.0]})["c"]
    assert two.log_correlation == pytest.approx(-1.0, abs=1e-12)


def test_compare_with_means_leaves_out_what_has_no_ratio() -> None:
    from vggnorm.core.rescale import DEAD_THRESHOLD

    # a mean at the dead threshold, a zero scale, a non-finite scale: three filters left out
    out = compare_with_means({"c": [5.0, 0.0, np.inf, 2.0, 6.0]},
                             {"c": [DEAD_THRESHOLD, 1.0, 1.0, 1.0, 2.0]})["c"]  # fmt: skip
    assert (out.n_filters, out.median_ratio) == (2, 2.5)
    # layers only one side knows are skipped, the others still compared
    both = compare_with_means({"x": [1.0], "dead": [1.0, 1.0], "c": [2.0]},
                              {"dead": [0.0, 0.0], "c": [1.0]})  # fmt: skip
    assert list(both) == ["dead", "c"] and both["c"].median_ratio == 2.0
    assert both["dead"] == ScalesVsMeans(None, None, None, 0)


@pytest.mark.parametrize(("scales", "means"), [
    ([3.0], [1.0]),  # one filter
    ([2.0, 2.0], [1.0, 3.0]),  # scales all equal
    ([1.0, 3.0], [2.0, 2.0]),  # means all equal
])  # fmt: skip
def test_no_correlation_without_spread(scales: list[float], means: list[float]) -> None:
    assert compare_with_means({"c": scales}, {"c": means})["c"].log_correlation is None


def test_compare_with_means_of_float32_arrays_works_in_float64() -> None:
    scales = np.array([0.1, 0.7, 0.3, 1.3], np.float32)
    means = np.array([0.3, 0.9, 1.1, 0.2], np.float32)
    out = compare_with_means({"c": scales}, {"c": means})["c"]
    s64, m64 = scales.astype(np.float64), means.astype(np.float64)
    assert out.median_ratio == float(np.median(s64 / m64))
    assert out.log_correlation == float(np.corrcoef(np.log(s64), np.log(m64))[0, 1])


def _precision() -> FilterPrecision:
    # three images; per-image means of seven filters: f0 mean 2 (se 1/sqrt 3), f1 constant
    # (se 0), f2 dead, f3 dead with some spread, f4 mean 4 (se 2/sqrt 3), f5 mean 11, f6 mean 4
    im = ImageMoments.of(np.array([[1.0, 1.0, 0.0, 0.0, 2.0, 10.0, 3.0],
                                   [2.0, 1.0, 0.0, 0.0, 4.0, 11.0, 4.0],
                                   [3.0, 1.0, 0.0, 2.4e-8, 6.0, 12.0, 5.0]]))  # fmt: skip
    fp = filter_precision(LayerStats("c", im.sum, im.sumsq, 3, im))
    assert fp is not None and fp.live.tolist() == [True, True, False, False, True, True, True]
    return fp


def test_scales_in_intervals_counts_live_filters_with_a_spread() -> None:
    fp = _precision()
    # f0 inside, f1 no spread, f2/f3 dead, f4 above its interval, f5 inside, f6 zero scale
    got = scales_in_intervals({"x": [1.0], "c": [0.5, 1.0, 5.0, 1.0, 20.0, 9.0, 0.0],
                               "e": [1.0] * 7}, {"c": fp, "e": replace(fp, live=fp.live & False)})  # fmt: skip
    assert list(got) == ["c", "e"]
    c = got["c"]
    assert (c.within, c.live) == (2, 3)  # f0, f4, f5 compared; f0 and f5 inside
    # |scale - mean| / se: 1.5 sqrt 3, 8 sqrt 3, 2 sqrt 3
    assert c.median_z == pytest.approx(2 * np.sqrt(3), rel=1e-12)
    assert got["e"] == IntervalAgreement(0, 0, None)
    with pytest.raises(ValueError, match=r"^c: 2 scales but 7 means$"):
        scales_in_intervals({"c": [1.0, 2.0]}, {"c": fp})


def test_an_interval_holds_its_ends() -> None:
    fp = _precision()
    lo, hi = fp.interval
    at_ends = np.where(lo > 0, lo, hi)  # f5's lower end, the upper end of the others
    got = scales_in_intervals({"c": at_ends}, {"c": fp})["c"]
    assert (got.within, got.live) == (4, 4)  # f0, f4, f5, f6


# ---------------------------------------------------------------------------------------------
# What compare prints and writes, word for word


def test_table_and_json_word_for_word() -> None:
    ok = LayerComparison("block1_conv1", np.array([0.5, 2.0, 1234.5678]), 1.5e-7, 0, 0, 36)
    bad = LayerComparison("c2", np.array([], dtype=np.float64), 0.25, 1, 2, 10)
    report = CompareReport((ok, bad), 1e-5, HeadComparison("fc1", 3e-7, False, 1),
                           ("fc2/bias", "fc2/kernel"))  # fmt: skip
    assert report.table().split("\n") == [
        "layer                spread    neg  0-mism   min scale   max scale  ok",
        "block1_conv1       1.50e-07      0       0         0.5        1235  yes",
        "c2                 2.50e-01      1       2         nan         nan  NO",
        "fc1                3.00e-07              1  bias CHANGED",
        "changed outside the convs: fc2/bias, fc2/kernel",
        "verdict: NOT a rescaling (tolerance 1.00e-05)",
    ]
    assert report.to_dict() == {
        "is_rescaling": False, "tolerance": 1e-5,
        "layers": [
            {"name": "block1_conv1", "spread": 1.5e-7, "n_negative": 0, "n_zero_mismatch": 0,
             "n_ratios": 36, "scales": [0.5, 2.0, 1234.5678]},
            {"name": "c2", "spread": 0.25, "n_negative": 1, "n_zero_mismatch": 2, "n_ratios": 10,
             "scales": []},
        ],
        "head": {"name": "fc1", "spread": 3e-7, "bias_equal": False, "n_zero_mismatch": 1},
        "other_changed": ["fc2/bias", "fc2/kernel"], "missing": [],
    }  # fmt: skip
    good = CompareReport((ok,), 1e-6, HeadComparison("fc1", 0.0, True, 0))
    assert good.table().split("\n")[2:] == [
        "fc1                0.00e+00              0  bias equal",
        "verdict: a per-filter positive rescaling (tolerance 1.00e-06)",
    ]
    missing = CompareReport((), 2e-6, None, (), ("c3/kernel", "fc1/kernel"))
    assert missing.table().split("\n")[1:] == [
        "missing: c3/kernel, fc1/kernel", "verdict: NOT a rescaling (tolerance 2.00e-06)"]
    assert missing.to_dict() == {"is_rescaling": False, "tolerance": 2e-6, "layers": [],
                                 "head": None, "other_changed": [],
                                 "missing": ["c3/kernel", "fc1/kernel"]}  # fmt: skip


def _gap_weights(seed: int) -> dict[str, np.ndarray]:
    """tiny_weights with a global-pooling head: fc1 reads one row per last-conv channel."""
    w = tiny_weights(seed)
    w["fc1/kernel"] = w["fc1/kernel"][: WIDTHS[-1]]
    return w


def test_a_global_pooling_head_carries_the_last_scales_once_per_row() -> None:
    a = _gap_weights(0)
    scales = log_uniform_scales(CONVS, list(WIDTHS[1:]), 1)
    b = rescale(a, scales)
    b["fc1/kernel"] = (a["fc1/kernel"] * scales.values[CONVS[-1]][:, None]).astype(np.float32)
    report = compare_weights(a, b, CONVS, "fc1", None)
    assert report.is_rescaling, report.table()
    assert report.head is not None and report.head.spread < report.tolerance
    b["fc1/kernel"] = a["fc1/kernel"]  # left uncompensated
    assert not compare_weights(a, b, CONVS, "fc1", None).is_rescaling
    # a head of zeros has no ratio to compare: nothing deviates
    a["fc1/kernel"] = b["fc1/kernel"] = np.zeros_like(a["fc1/kernel"])
    zeros = compare_weights(a, b, CONVS, "fc1", None)
    assert zeros.is_rescaling and zeros.head is not None and zeros.head.spread == 0.0


def test_a_head_that_does_not_fit_is_refused_naming_it() -> None:
    a = tiny_weights(0)
    scales = log_uniform_scales(CONVS, list(WIDTHS[1:]), 1)
    b = chw_rescale(a, scales)
    with pytest.raises(ValueError, match=r"^head has 128 rows after global pooling, expected 32$"):
        compare_weights(a, b, CONVS, "fc1", None)
    with pytest.raises(ValueError, match=r"^head has 128 rows, expected 32 channels x 3 positions$"):
        compare_weights(a, b, CONVS, "fc1", ("chw", 3))
    wider = {**b, "fc1/kernel": np.zeros((128, 7), np.float32)}
    with pytest.raises(ValueError, match=r"^fc1/kernel: shapes \(128, 6\) and \(128, 7\) differ$"):
        compare_weights(a, wider, CONVS, "fc1", ("chw", HW))
    flat = {**a, "fc1/kernel": a["fc1/kernel"][:, 0]}
    with pytest.raises(ValueError, match=r"^fc1/kernel: shapes \(128,\) and \(128,\) differ$"):
        compare_weights(flat, {**b, "fc1/kernel": b["fc1/kernel"][:, 0]}, CONVS, "fc1", ("chw", HW))


def test_ratios_count_one_sided_zeros_and_sign_flips() -> None:
    num = np.array([2.0, 0.0, 3.0, -4.0, 0.0, 1e-300])
    den = np.array([1.0, 5.0, 0.0, 2.0, 0.0, 1e300])
    ratio, mismatch, negative = _ratios(num, den)
    np.testing.assert_array_equal(ratio, [2.0, np.nan, np.nan, -2.0, np.nan, 0.0])
    # a ratio that underflows to 0 is tiny, not a sign flip
    assert (mismatch, negative) == (2, 1)


def test_the_tolerance_ignores_integer_arrays() -> None:
    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
    assert ratio_tolerance([f32, i64], 4) == ratio_tolerance([f32], 4) == 4 * 2.0**-24 * 6
    assert ratio_tolerance([i64], 4) == 4 * 2.0**-53 * 6


def test_a_spread_at_the_tolerance_passes() -> None:
    at = LayerComparison("c", np.ones(2), 1e-5, 0, 0, 4)
    assert at.ok(1e-5) and not at.ok(np.nextafter(1e-5, 0))


def test_batchnorm_arrays_divided_like_the_bias_and_integer_counters() -> None:
    a = tiny_weights(3)
    rng = np.random.default_rng(4)
    for name, c in zip(CONVS, WIDTHS[1:]):
        for role in ("gamma", "beta", "moving_mean", "moving_variance"):
            a[f"{name}_bn/{role}"] = rng.uniform(0.5, 2, c).astype(np.float32)
        a[f"{name}_bn/num_batches_tracked"] = np.array(7, np.int64)
    norms = {name: f"{name}_bn" for name in CONVS}
    scales = log_uniform_scales(CONVS, list(WIDTHS[1:]), 1)
    b = compensate_head(rescale(a, scales, norms=norms), "fc1", scales.values[CONVS[-1]], "chw")
    # the rescaling divided beta and the moving mean like the bias, and left gamma alone
    m = scales.values["c1"]
    for role in ("beta", "moving_mean"):
        np.testing.assert_array_equal(b[f"c1_bn/{role}"], (a[f"c1_bn/{role}"] / m).astype(np.float32))
    np.testing.assert_array_equal(b["c1_bn/gamma"], a["c1_bn/gamma"])
    report = compare_weights(a, b, CONVS, "fc1", ("chw", HW), norms=norms)
    assert report.is_rescaling, report.table()
    assert report.tolerance == ratio_tolerance([np.dtype(np.float32)], len(CONVS))
    # beta left undivided: its ratios are 1, not the filters' scales
    undivided = {**b, "c2_bn/beta": a["c2_bn/beta"]}
    bad = compare_weights(a, undivided, CONVS, "fc1", ("chw", HW), norms=norms)
    assert not bad.is_rescaling and bad.layers[1].spread > 0.5 and not bad.other_changed


def test_the_head_bias_must_be_unchanged_and_every_head_mismatch_counts() -> None:
    a = tiny_weights(0)
    scales = log_uniform_scales(CONVS, list(WIDTHS[1:]), 1)
    b = chw_rescale(a, scales)
    good = compare_weights(a, b, CONVS, "fc1", ("chw", HW))
    assert good.head is not None and good.head.bias_equal
    shifted = {**b, "fc1/bias": b["fc1/bias"] + np.float32(1e-3)}
    report = compare_weights(a, shifted, CONVS, "fc1", ("chw", HW))
    assert report.head is not None and not report.head.bias_equal and not report.is_rescaling
    no_bias = {k: v for k, v in b.items() if k != "fc1/bias"}
    report = compare_weights(a, no_bias, CONVS, "fc1", ("chw", HW))
    assert report.head is not None and not report.head.bias_equal
    both = compare_weights({k: v for k, v in a.items() if k != "fc1/bias"}, no_bias, CONVS, "fc1",
                           ("chw", HW))  # fmt: skip
    assert both.head is not None and both.head.bias_equal and both.is_rescaling
    head = b["fc1/kernel"].copy()
    head[0, 0], head[1, 0], head[2, 1] = 0.0, -head[1, 0], -head[2, 1]
    report = compare_weights(a, {**b, "fc1/kernel": head}, CONVS, "fc1", ("chw", HW))
    assert report.head is not None and report.head.n_zero_mismatch == 3


def test_missing_kernels_are_reported_before_any_comparison() -> None:
    a = tiny_weights(0)
    b = {k: v for k, v in a.items() if k not in ("c3/kernel", "fc1/kernel")}
    report = compare_weights(a, b, CONVS, "fc1", ("chw", HW))
    assert report.missing == ("c3/kernel", "fc1/kernel") and not report.is_rescaling
    assert report.to_dict() == {
        "is_rescaling": False, "tolerance": ratio_tolerance([np.dtype(np.float32)], len(CONVS)),
        "layers": [], "head": None, "other_changed": [], "missing": ["c3/kernel", "fc1/kernel"],
    }  # fmt: skip
    only_head = compare_weights(a, {k: v for k, v in a.items() if k != "fc1/kernel"}, CONVS, "fc1",
                                ("chw", HW))  # fmt: skip
    assert only_head.missing == ("fc1/kernel",)


def test_scales_are_float64_quotients_and_the_subnormal_range_counts_as_zero() -> None:
    f32 = np.finfo(np.float32)
    a = {"c/kernel": np.array([[[[1.0, f32.tiny, 1e-40, 3.0]]]], np.float32)}
    b = {"c/kernel": np.array([[[[3.0, f32.tiny, 0.0, 1.0]]]], np.float32)}
    (layer,) = compare_weights(a, b, ["c"]).layers
    # 1/3 in float64, not float32's; the smallest normal float32 is a value, a subnormal is 0
    np.testing.assert_array_equal(layer.scales, [1.0 / 3.0, 1.0, 1.0, 3.0])
    assert (layer.n_ratios, layer.n_zero_mismatch, layer.n_negative) == (3, 0, 0)


def test_keys_in_one_set_only_are_missing_and_keys_in_both_changed() -> None:
    a = {**tiny_weights(0), "extra/y": np.zeros(2, np.float32)}
    b = {**a, "extra/x": np.zeros(2, np.float32), "extra/y": np.ones(2, np.float32)}
    del b["fc2/kernel"]
    report = compare_weights(a, b, CONVS, "fc1", ("chw", HW))
    assert report.missing == ("extra/x", "fc2/kernel") and not report.is_rescaling
    assert report.other_changed == ("extra/y",)
    assert len(report.layers) == len(CONVS)  # the convs were compared all the same
    assert report.table().split("\n")[-3:-1] == ["changed outside the convs: extra/y",
                                                 "missing: extra/x, fc2/kernel"]  # fmt: skip


def test_kernels_that_do_not_chain_are_refused_naming_them() -> None:
    a = tiny_weights(0)
    with pytest.raises(ValueError, match=r"^c4: 16 inputs, previous conv has 8$"):
        compare_weights(a, a, ["c1", "c4"])
    flat = {"c/kernel": np.ones((2, 3), np.float32)}
    with pytest.raises(ValueError, match=r"^c/kernel: shapes \(2, 3\) and \(2, 3\) differ or are not 4-D$"):
        compare_weights(flat, flat, ["c"])
    with pytest.raises(ValueError, match=r"^c1/kernel: shapes \(3, 3, 3, 8\) and \(3, 3, 3, 9\) differ"):
        compare_weights(a, {**a, "c1/kernel": np.ones((3, 3, 3, 9), np.float32)}, ["c1"])


@pytest.mark.parametrize("rows", [1, 2, 3, 64, 101, 600])
@pytest.mark.parametrize("columns", [0, 1, 3])
def test_column_median_of_any_count_of_rows_and_columns(rows: int, columns: int) -> None:
    """Equal counts per column (the partial-sort path) at sizes the drawn cases rarely reach:
    one filter, no filter, hundreds of ratios, odd and even."""
    values = np.random.default_rng(rows * 10 + columns).standard_normal((rows, columns))
    counts = np.full(columns, rows, dtype=np.intp)
    expected = np.median(values, axis=0)
    assert np.array_equal(_column_median(values, counts), expected)


def test_filters_without_kernel_ratios_take_the_bias_s_or_one() -> None:
    """Per filter: an ordinary one (2), a zero kernel with a bias (4), zeros only (1), a sign
    flip (counted, kept at 1 to keep the chain positive), a ratio that underflows to 0 (1)."""
    a = {"c/kernel": np.array([[[[2.0, 0.0, 0.0, -3.0, 1e-300]]]]),
         "c/bias": np.array([4.0, 8.0, 0.0, 3.0, 0.0])}  # fmt: skip
    b = {"c/kernel": np.array([[[[1.0, 0.0, 0.0, 1.0, 1e300]]]]),
         "c/bias": np.array([2.0, 2.0, 0.0, 1.0, 0.0])}  # fmt: skip
    (layer,) = compare_weights(a, b, ["c"]).layers
    np.testing.assert_array_equal(layer.scales, [2.0, 4.0, 1.0, 1.0, 1.0])
    assert (layer.n_negative, layer.n_zero_mismatch, layer.n_ratios) == (1, 0, 6)
    zeros = {"c/kernel": np.zeros((1, 1, 1, 2)), "c/bias": np.zeros(2)}
    (layer,) = compare_weights(zeros, zeros, ["c"]).layers
    assert layer.spread == 0.0 and layer.n_ratios == 0
    np.testing.assert_array_equal(layer.scales, [1.0, 1.0])


def test_bias_and_batchnorm_zeros_and_sign_flips_count() -> None:
    k = np.ones((1, 1, 1, 3))
    a = {"c/kernel": k, "c/bias": np.array([1.0, 0.0, 1.0]),
         "n/beta": np.array([1.0, 1.0, 0.0]), "n/moving_mean": np.array([1.0, -1.0, 1.0])}  # fmt: skip
    b = {"c/kernel": k, "c/bias": np.array([1.0, 1.0, 1.0]),
         "n/beta": np.array([1.0, 1.0, 1.0]), "n/moving_mean": np.array([1.0, 1.0, 1.0])}  # fmt: skip
    (layer,) = compare_weights(a, b, ["c"], norms={"c": "n"}).layers
    assert (layer.n_zero_mismatch, layer.n_negative) == (2, 1)


def test_a_bias_or_batchnorm_array_one_set_lacks_is_reported() -> None:
    k = np.ones((1, 1, 1, 2))
    a = {"c/kernel": k, "c/bias": np.ones(2), "n/beta": np.ones(2), "n/moving_mean": np.ones(2)}
    for key in ("c/bias", "n/beta"):
        b = {name: v for name, v in a.items() if name != key}
        for x, y in ((a, b), (b, a)):
            report = compare_weights(x, y, ["c"], norms={"c": "n"})
            assert report.missing == (key,) and not report.is_rescaling
            assert report.other_changed == () and report.layers[0].ok(report.tolerance)
