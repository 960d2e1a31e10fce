"""compare_weights / compare_with_means: pure numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vggnorm.core.archs import VGG19
from vggnorm.core.compare import (
    _column_median,
    compare_weights,
    compare_with_means,
    ratio_tolerance,
)
from vggnorm.core.rescale import Scales, compute_scales, rescale
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
