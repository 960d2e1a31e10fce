"""How precise the means are: per-image accumulators, intervals, target stops, version-1 files
and average pooling.

The interval arithmetic is checked against an independent float64 computation (numpy and scipy
on the per-image means themselves); its coverage on simulated data against a bound derived from
the binomial distribution; the stop point of a run against a run limited to that point.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from scipy import special as sps_special
from scipy import stats as sps

from fixtures.photos import write_photos
from vggnorm.core.errors import StatsError
from vggnorm.core.inputs import Decode
from vggnorm.core.precision import (
    NEAR_DEAD_FRACTION,
    LayerPrecision,
    betainc,
    classify,
    filter_precision,
    layer_precision,
    precision_table,
    t_cdf,
    t_quantile,
    target_reached,
    worst_quantile,
)
from vggnorm.core.rescale import DEAD_THRESHOLD
from vggnorm.core.stats import ImageMoments, LayerStats, merge_stats
from vggnorm.core.statsrecord import StatsMeta, StatsRecord
from vggnorm.formats.statsfile import read_stats, write_stats

SIZE = 32
CHECK = 4  # check points every 4 items in the Keras runs below


def _layer(image_means: np.ndarray, positions: int = 4, name: str = "c") -> LayerStats:
    """A layer whose images each had ``positions`` equal activations with these means."""
    m = np.asarray(image_means, dtype=np.float64)
    return LayerStats(name, m.sum(0) * positions, (m * m).sum(0) * positions,
                      m.shape[0] * positions, ImageMoments.of(m))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The arithmetic (pure numpy)


@pytest.mark.parametrize("df", [1, 2, 3, 7, 30, 127, 1000, 50_000])
@pytest.mark.parametrize("p", [0.975, 0.995])
def test_t_quantile_matches_scipy(df: int, p: float) -> None:
    # Bisection down to adjacent float64s on a CDF whose tail is computed to ~1e-14 absolute
    # (continued fraction to 1e-15, lgamma differences without cancellation): at these tail
    # probabilities the density is >= 0.002, so the quantile is good to well under 1e-11.
    assert t_quantile(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-11, abs=0)


# betainc in both of its continued fractions (x below and above (a + 1) / (a + b + 2)), on both
# sides of the switch to Stirling's series (a >= 20), and with an argument of 1e9, where
# lgamma(a + b) - lgamma(a) taken directly would cancel (lgamma(1e9) ~ 2e10 rounds to 4e-6).
# Against scipy, relative to the smaller tail min(I, 1 - I): the continued fractions stop at 1e-15
# per term, and the series is cut after its z^-5 term, whose successor 1/(1680 z^7) is 5e-13 at
# the switch (z = 20): 1e-12 covers both.
BETAINC_CASES = [(2.0, 3.0, 0.3), (2.0, 3.0, 0.8), (5.0, 0.5, 0.95), (20.0, 20.0, 0.4),
                 (20.0, 0.5, 0.97), (25.0, 30.0, 0.5), (40.0, 3.0, 0.9), (1e9, 0.5, 1 - 1e-9),
                 (0.5, 2e9, 1e-10)]  # fmt: skip


@pytest.mark.parametrize(("a", "b", "x"), BETAINC_CASES)
def test_betainc_matches_scipy(a: float, b: float, x: float) -> None:
    ref = float(sps_special.betainc(a, b, x))
    assert abs(betainc(a, b, x) - ref) <= 1e-12 * min(ref, 1 - ref)


def test_betainc_at_and_beyond_its_ends() -> None:
    assert betainc(2.0, 3.0, 0.0) == 0.0 and betainc(2.0, 3.0, -0.5) == 0.0
    assert betainc(2.0, 3.0, 1.0) == 1.0 and betainc(2.0, 3.0, 1.5) == 1.0


@pytest.mark.parametrize("df", [1, 3, 10, 40, 200])
def test_t_cdf_matches_scipy_on_both_sides(df: int) -> None:
    # small |t| reach betainc's second continued fraction, negative t the lower tail; the same
    # bound as betainc's, relative to the smaller tail
    for t in (-3.0, -0.3, 0.05, 0.3, 0.7, 1.5, 3.0):
        ref = float(sps.t.cdf(t, df))
        assert abs(t_cdf(t, df) - ref) <= 1e-12 * min(ref, 1 - ref), t
    assert t_cdf(0.0, df) == 0.5


def test_t_quantile_below_the_median_and_at_it() -> None:
    for df in (1, 10, 127):
        assert t_quantile(0.025, df) == -t_quantile(0.975, df)
        assert t_quantile(0.6, df) == pytest.approx(sps.t.ppf(0.6, df), rel=1e-11, abs=0)
    # the bisection halves [0, 1] 200 times towards 0: 2**-201
    assert 0.0 <= t_quantile(0.5, 5) <= 2.0**-200


@pytest.mark.parametrize(("p", "df"), [(0.0, 5.0), (1.0, 5.0), (0.5, 0.0)])
def test_t_quantile_refuses_what_has_no_quantile(p: float, df: float) -> None:
    with pytest.raises(ValueError, match=rf"^need 0 < p < 1 and df > 0, got p={p}, df={df}$"):
        t_quantile(p, df)


def test_layer_figures_and_their_json() -> None:
    lp = layer_precision(_layer(np.array([[1.0, 2.0, 0.0], [3.0, 2.5, 0.0]])))
    assert lp is not None
    assert lp.to_dict() == {"name": "c", "images": 2, "live": 2, "dead": 1, "near_dead": 0,
                            "median": lp.median, "p99": lp.p99, "worst": lp.worst}  # fmt: skip
    assert lp.quantile(1.0) == lp.worst == float(lp.half_widths.max())
    empty = LayerPrecision("c", 2, 0, 3, 0, 0.0, 0.0, 0.0, np.zeros(0))
    assert empty.quantile(0.5) == 0.0 and worst_quantile([empty], 0.5) == 0.0
    assert worst_quantile([], 0.5) == 0.0


def test_classify_at_its_two_boundaries() -> None:
    # a mean at the dead threshold is dead; one at exactly 1e-3 of the live median is not near-dead
    dead, near = classify([DEAD_THRESHOLD, 1.0, 1000.0, 1000.0, 1000.0])
    assert dead.tolist() == [True, False, False, False, False]
    assert NEAR_DEAD_FRACTION * 1000.0 == 1.0 and near.tolist() == [False] * 5
    dead, near = classify([DEAD_THRESHOLD, np.nextafter(1.0, 0.0), 1000.0, 1000.0, 1000.0])
    assert near.tolist() == [False, True, False, False, False]
    assert [a.tolist() for a in classify([0.0, 0.0])] == [[True, True], [False, False]]


def test_filter_precision_names_its_layer_and_takes_small_means() -> None:
    # means below 1 (the half-width is relative to the mean, whatever its size) and a filter that
    # never fired (no relative precision: infinite)
    fp = filter_precision(_layer(np.array([[0.25, 0.0], [0.75, 0.0]]), name="block1_conv1"))
    assert fp is not None and fp.name == "block1_conv1"
    t = t_quantile(0.975, 1)
    assert fp.se.tolist() == [0.25, 0.0]
    assert fp.half_width.tolist() == [t * 0.25 / 0.5, math.inf]
    assert fp.live.tolist() == [True, False]


def test_a_layer_without_live_filters_has_zero_figures() -> None:
    lp = layer_precision(_layer(np.zeros((3, 2))))
    assert lp is not None and (lp.live, lp.dead, lp.near_dead) == (0, 2, 0)
    assert (lp.median, lp.p99, lp.worst) == (0.0, 0.0, 0.0)


def test_filter_precision_equals_an_independent_float64_computation() -> None:
    rng = np.random.default_rng(0)
    means = rng.gamma(2.0, 1.5, size=(37, 6))  # 37 images, 6 filters
    fp = filter_precision(_layer(means))
    assert fp is not None and fp.images == 37
    mean = means.mean(axis=0)
    se = means.std(axis=0, ddof=1) / math.sqrt(37)
    half = sps.t.ppf(0.975, 36) * se / mean
    # sums of 37 terms in float64 and one subtraction: ~1e-14 relative
    np.testing.assert_allclose(fp.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(fp.se, se, rtol=1e-11)
    np.testing.assert_allclose(fp.half_width, half, rtol=1e-11)
    lo, hi = fp.interval
    np.testing.assert_allclose(hi - lo, 2 * half * mean, rtol=1e-11)


def test_interval_coverage_on_simulated_data_is_95_percent() -> None:
    # 5000 independent intervals, each from 10 images of normal per-image means around a known
    # mean. Coverage is exactly 0.95 for Student's interval, so the count of intervals holding
    # the true mean is Binomial(5000, 0.95): 4750 +- 15.4. The bounds below are its 1e-6 and
    # 1 - 1e-6 quantiles (the test fails once in a million for a correct interval; the seed is
    # fixed, so it passes or fails the same way every run). An interval built with 1.96 instead
    # of t(9) = 2.262 covers only 91.8% (4592 expected), far outside them.
    rng = np.random.default_rng(1)
    trials, images = 100, 10
    mu = rng.uniform(1.0, 5.0, size=50)
    sigma = rng.uniform(0.2, 2.0, size=50)
    lo_bound, hi_bound = sps.binom.ppf(1e-6, 5000, 0.95), sps.binom.ppf(1 - 1e-6, 5000, 0.95)
    covered = 0
    for _ in range(trials):
        means = mu + sigma * rng.standard_normal((images, 50))
        fp = filter_precision(_layer(means))
        assert fp is not None
        lo, hi = fp.interval
        covered += int(np.sum((lo <= mu) & (mu <= hi)))
    assert lo_bound <= covered <= hi_bound, (covered, lo_bound, hi_bound)
    assert sps.binom.cdf(4592 + 75, 5000, 0.95) < 1e-6  # the 1.96 interval would fail here


def test_dead_and_near_dead_filters_are_left_out_of_the_layer_figures() -> None:
    rng = np.random.default_rng(2)
    means = rng.uniform(1.0, 2.0, size=(20, 5))
    means[:, 1] = 0.0  # dead
    means[:, 2] *= 1e-4  # near-dead: below 1e-3 of the layer's median mean
    means[3, 2] = 0.5e-4  # (with a huge relative spread, which would otherwise dominate)
    lp = layer_precision(_layer(means))
    assert lp is not None
    assert (lp.live, lp.dead, lp.near_dead) == (3, 1, 1)
    fp = filter_precision(_layer(means))
    assert fp is not None
    expected = np.sort(fp.half_width[[0, 3, 4]])
    assert lp.worst == expected[-1] and lp.median == expected[1]
    assert lp.p99 == float(np.quantile(expected, 0.99))


def test_unknown_precision() -> None:
    v1 = LayerStats("c", np.ones(3), np.ones(3), 1)  # no per-image moments
    assert filter_precision(v1) is None and precision_table([v1]) is None
    assert target_reached([v1], 0.5, 0.5, 2) == (False, None)
    one = _layer(np.ones((1, 3)))
    assert filter_precision(one) is None  # one image: no spread to estimate


def test_target_needs_the_minimum_number_of_images() -> None:
    rng = np.random.default_rng(3)
    layer = _layer(rng.uniform(1.0, 1.01, size=(30, 4)))  # ~0.2% half-widths
    reached, figure = target_reached([layer], 0.01, 0.9, 30)
    assert reached and figure is not None and figure < 0.01
    assert target_reached([layer], 0.01, 0.9, 31) == (False, figure)
    assert target_reached([layer], figure, 0.9, 30)[0]  # at the target: reached
    assert target_reached([layer], figure / 2, 0.9, 2)[0] is False


def test_per_image_moments_merge_and_are_lost_with_a_version_1_run() -> None:
    rng = np.random.default_rng(4)
    means = rng.uniform(0.5, 2.0, size=(12, 3))
    whole = _layer(means)
    parts = merge_stats([_layer(means[:5])], [_layer(means[5:])])[0]
    assert parts.per_image is not None and whole.per_image is not None
    np.testing.assert_allclose(parts.per_image.sum, whole.per_image.sum, rtol=1e-15)
    np.testing.assert_allclose(parts.per_image.sumsq, whole.per_image.sumsq, rtol=1e-15)
    v1 = LayerStats("c", whole.sum, whole.sumsq, whole.count)
    assert merge_stats([whole], [v1])[0].per_image is None


# ---------------------------------------------------------------------------------------------
# The stats file (format version 2; version 1 still reads)


def _record(layers: tuple[LayerStats, ...], images: int) -> StatsRecord:
    meta = StatsMeta(
        model="vgg16", fingerprint="0" * 64, weights="w.h5", decode=Decode(SIZE),
        preprocess="caffe", precision="fp32", dataset_kind="folder", dataset_path="d",
        dataset_root="d", annotations=None, dataset_items=images, selection_sha256="0" * 64,
        selection_size=images, position=images, complete=True,
    )  # fmt: skip
    return StatsRecord(meta, layers, tuple(f"{i}.jpg" for i in range(images)))


def test_precision_lines_word_for_word() -> None:
    from dataclasses import replace

    from vggnorm.core.statsrecord import precision_lines

    # layer a: means 1 and 3 over two images each filter (half-widths t*se/mean), the third
    # filter near-dead (1e-4 of the median), the fourth dead; layer b: one live filter
    a = _layer(np.array([[0.5, 2.0, 1e-4, 0.0], [1.5, 4.0, 1e-4, 0.0]]), name="block1_conv1")
    b = _layer(np.array([[2.0], [2.0]]), name="b")
    record = _record((a, b), 2)
    t = t_quantile(0.975, 1)
    ha, hb = t * 0.5 / 1.0, t * 1.0 / 3.0  # se = |x1 - x2| / 2 for two images
    head = ("precision of the means over 2 images: relative half-width of the 95% interval "
            "over live filters (median, 99th percentile, worst)")  # fmt: skip
    med, p99 = (ha + hb) / 2, float(np.quantile([ha, hb], 0.99))
    assert precision_lines(record) == [
        head,
        f"  block1_conv1     ±{med:.2%}  ±{p99:.2%}  ±{ha:.2%}; 1 near-dead left out",
        "  b                ±0.00%  ±0.00%  ±0.00%",
    ]
    reached = replace(record, meta=replace(record.meta, target_error=0.05, target_quantile=0.9,
                                           target_reached=True))  # fmt: skip
    assert precision_lines(reached)[-1] == (
        "target ±0.05 at quantile 0.9 of live filters: reached with 2 images")
    missed = replace(reached, meta=replace(reached.meta, target_reached=False))
    assert precision_lines(missed)[-1] == (
        "target ±0.05 at quantile 0.9 of live filters: NOT reached with 2 images")
    assert precision_lines(missed)[:3] == precision_lines(record)
    assert record.summary()[-3:] == precision_lines(record)


def _plain(sum_: list[float], sumsq: list[float], count: int) -> LayerStats:
    return LayerStats("a", np.array(sum_), np.array(sumsq), count)


@pytest.mark.parametrize(
    ("layer", "complete", "reason"),
    [
        (_plain([1.0], [-1.0], 4), True, "negative sums of post-ReLU activations"),
        (_plain([-1.0], [1.0], 4), True, "negative sums of post-ReLU activations"),
        (_plain([1.0], [0.0], 0), False, "sums without any counted value"),
        (_plain([0.0], [1.0], 0), False, "sums without any counted value"),
        (_plain([0.0], [0.0], 0), True, "no counted value in a complete run"),
        (_plain([4.0], [3.0], 4), True,
         r"sums of squares too small for the sums and count \(sum\^2 > count \* sumsq\)"),
    ],
)
def test_impossible_sums_are_refused_word_for_word(
    layer: LayerStats, complete: bool, reason: str
) -> None:
    from dataclasses import replace

    from vggnorm.core.statsrecord import validate

    record = _record((layer,), 4)
    record = replace(record, meta=replace(record.meta, complete=complete), images=())
    with pytest.raises(StatsError, match=rf"^s.h5: layer a: {reason}; the stats file is damaged$"):
        validate(record, "s.h5")
    validate(replace(record, layers=(_plain([1.0], [1.0], 1),)), "s.h5")  # one value: fine


def _with_moments(sum_: list[float], sumsq: list[float], images: int) -> LayerStats:
    """Plain sums that pass (four values per filter, each the filter's per-image sum) with
    these per-image moments."""
    sums = np.full(len(sum_), 4.0)
    return LayerStats("a", sums, sums * sums, 4, ImageMoments(np.array(sum_), np.array(sumsq), images))


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (_with_moments([1.0, np.nan], [1.0, 1.0], 4), "NaN or infinite per-image sums"),
        (_with_moments([1.0, 1.0], [1.0, np.inf], 4), "NaN or infinite per-image sums"),
        (_with_moments([-1.0, 1.0], [1.0, 1.0], 4), "negative per-image sums"),
        (_with_moments([1.0, 1.0], [1.0, -1.0], 4), "negative per-image sums"),
        (_with_moments([1.0], [1.0], 8), "per-image sums over 8 images, but 4 images counted"),
        # sum 4 over 4 images needs sumsq >= 4; 3 is 13% short (within twice the bound)
        (_with_moments([4.0, 0.0], [3.0, 0.0], 4),
         r"per-image sums of squares too small for the sums \(sum\^2 > images \* sumsq\)"),
    ],
)
def test_impossible_per_image_sums_are_refused_word_for_word(layer: LayerStats, reason: str) -> None:
    from vggnorm.core.statsrecord import validate

    with pytest.raises(StatsError, match=rf"^s.h5: layer a: {reason}; the stats file is damaged$"):
        validate(_record((layer,), 4), "s.h5")


def test_per_image_sums_at_the_cauchy_schwarz_bound_pass() -> None:
    """Images with equal means meet sum^2 = images * sumsq exactly (up to rounding, far inside
    the slack); a dead filter's zeros, and means whose squares underflow to 0, pass too."""
    from vggnorm.core.statsrecord import validate

    means = np.array([[0.1, 0.0, 1e-170, 7.3]] * 3)
    layer = _layer(means, name="a")
    assert layer.per_image is not None and layer.per_image.sumsq[2] == 0.0
    validate(_record((layer,), 3), "s.h5")
    # 2e-6 relative past the bound is refused: the slack is 1e-6
    past = ImageMoments(layer.per_image.sum * (1 + 2e-6), layer.per_image.sumsq, 3)
    with pytest.raises(StatsError, match="per-image sums of squares too small"):
        validate(_record((LayerStats("a", layer.sum, layer.sumsq, layer.count, past),), 3), "s.h5")


def test_summary_word_for_word() -> None:
    from dataclasses import replace

    from vggnorm.core.statsrecord import layer_summary, precision_lines, summary_line

    record = _record((_layer(np.array([[0.5, 2.0], [1.5, 4.0]]), name="a"),), 2)
    rows = [summary_line(row) for row in layer_summary(record)]
    assert record.summary() == ["vgg16: 2 images counted, skipped: none", *rows,
                                *precision_lines(record)]  # fmt: skip
    skipped = (("x.jpg", "unreadable", "truncated"), ("y.gif", "unreadable", "no frame"),
               ("z.png", "too small", "8x8"))  # fmt: skip
    assert replace(record, skipped=skipped).summary()[0] == (
        "vgg16: 2 images counted, skipped: 1 too small, 2 unreadable")
    old = replace(record, layers=(replace(record.layers[0], per_image=None),))
    assert precision_lines(old) == [
        "precision: unknown (a version-1 stats file keeps no per-image sums)"]


def test_layers_that_counted_one_value_are_used_and_none_refused() -> None:
    from dataclasses import replace

    from vggnorm.core.statsrecord import layer_summary, stats_by_conv

    one = _record((_plain([2.0], [4.0], 1),), 1)
    assert stats_by_conv(one, [("conv", 1)])["conv"].count == 1
    assert layer_summary(one)[0]["mean_max"] == 2.0
    none = replace(one, layers=(_plain([0.0], [0.0], 0),))
    with pytest.raises(StatsError, match=r"^stats layer a counted no activation$"):
        stats_by_conv(none, [("conv", 1)])
    with pytest.raises(StatsError, match=r"^stats layer a counted no activation$"):
        layer_summary(none)
    unfinished = replace(one, meta=replace(one.meta, complete=False))
    with pytest.raises(StatsError, match=r"^the stats file is from an unfinished run$"):
        stats_by_conv(unfinished, [("conv", 1)])


def test_settings_without_a_shard_are_the_whole_dataset() -> None:
    raw = _record((), 1).meta.to_dict()
    del raw["shard"]
    assert StatsMeta.from_dict(raw).shard == (0, 1)


def test_stats_file_round_trips_the_per_image_sums(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    layers = (_layer(rng.uniform(0.5, 2, (9, 4)), name="a"), _layer(rng.uniform(1, 3, (9, 2)), name="b"))
    write_stats(tmp_path / "s.h5", _record(layers, 9))
    back = read_stats(tmp_path / "s.h5")
    for x, y in zip(back.layers, layers, strict=True):
        assert x.per_image is not None and y.per_image is not None
        assert x.per_image.images == 9
        assert np.array_equal(x.per_image.sum, y.per_image.sum)
        assert np.array_equal(x.per_image.sumsq, y.per_image.sumsq)
    with h5py.File(tmp_path / "s.h5") as f:
        assert int(f.attrs["format_version"]) == 2


def _as_version_1(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
        for g in f["layers"].values():
            del g["img_sum"], g["img_sumsq"]
            del g.attrs["images"]


def test_a_version_1_file_reads_with_unknown_precision(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    layers = (_layer(rng.uniform(0.5, 2, (9, 4)), name="a"),)
    write_stats(tmp_path / "s.h5", _record(layers, 9))
    _as_version_1(tmp_path / "s.h5")
    back = read_stats(tmp_path / "s.h5")
    assert back.layers[0].per_image is None and back.precision() is None
    assert "precision: unknown" in "\n".join(back.summary())
    np.testing.assert_array_equal(back.layers[0].sum, layers[0].sum)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda g: g["img_sum"].__setitem__(0, -1.0), "negative per-image sums"),
        (lambda g: g["img_sumsq"].__setitem__(0, 0.0), "per-image sums of squares too small"),
        (lambda g: g.attrs.__setitem__("images", 8), "per-image sums over 8 images"),
        (lambda g: g["img_sum"].__setitem__(1, np.nan), "NaN or infinite per-image sums"),
    ],
)
def test_damaged_per_image_sums_are_refused(tmp_path: Path, damage: Any, message: str) -> None:
    rng = np.random.default_rng(7)
    write_stats(tmp_path / "s.h5", _record((_layer(rng.uniform(0.5, 2, (9, 4)), name="a"),), 9))
    with h5py.File(tmp_path / "s.h5", "r+") as f:
        damage(f["layers/00_a"])
    with pytest.raises(StatsError, match=message):
        read_stats(tmp_path / "s.h5")


# ---------------------------------------------------------------------------------------------
# Runs (Keras, 32x32)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    root = tmp_path_factory.mktemp("precision")
    write_photos(root / "images", [f"{i:02d}.jpg" for i in range(30)], seed=11, max_side=70)
    weights = save_downloaded_layout(tiny_vgg(size=SIZE), root / "vgg16.h5")
    return {"root": root, "images": root / "images", "weights": weights}


def _stats(data: dict[str, Any], **kw: Any) -> StatsRecord:
    from vggnorm.commands.stats import collect_stats

    kw = {"decode": Decode(SIZE), "batch_size": 3, "workers": 1, "check_every": CHECK,
          "target_quantile": 0.5, **kw}  # fmt: skip
    return collect_stats(data["weights"], data["images"], **kw)


def _check_points(data: dict[str, Any]) -> list[tuple[int, float]]:
    """(position, worst layer's median half-width) at every check point of a full run."""
    seen: dict[int, float] = {}

    def progress(p: Any) -> None:
        if p.done % CHECK == 0 and p.precision is not None:
            seen[p.done] = p.precision

    _stats(data, progress=progress)
    return sorted(seen.items())


def _target_for(points: list[tuple[int, float]], min_images: int) -> tuple[float, int]:
    """A target that the run reaches first at a middle check point, far (1e-6 relative) from
    every check point's figure, and that check point."""
    for k in range(2, len(points) - 1):
        position, figure = points[k]
        before = min(f for _, f in points[:k])
        if position >= min_images and figure < before * (1 - 1e-5):
            return figure + (before - figure) / 2, position
    raise AssertionError(f"no usable check point in {points}")


@pytest.fixture(scope="module")
def target(data: dict[str, Any]) -> tuple[float, int]:
    return _target_for(_check_points(data), min_images=8)


def _same(a: StatsRecord, b: StatsRecord) -> None:
    assert a.images == b.images
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.count == y.count and x.per_image is not None and y.per_image is not None
        for u, v in ((x.sum, y.sum), (x.sumsq, y.sumsq), (x.per_image.sum, y.per_image.sum),
                     (x.per_image.sumsq, y.per_image.sumsq)):  # fmt: skip
            np.testing.assert_allclose(u, v, rtol=1e-12)


@pytest.mark.keras
def test_a_target_stops_at_a_check_point_with_the_limited_run_s_statistics(
    data: dict[str, Any], target: tuple[float, int], tmp_path: Path
) -> None:
    error, stop = target
    record = _stats(data, target_error=error, min_images=8, out=tmp_path / "s.h5")
    assert record.meta.position == stop and record.meta.complete
    assert record.meta.target_reached is True and record.meta.target_error == error
    assert read_stats(tmp_path / "s.h5").meta.target_reached is True
    _same(record, _stats(data, limit=stop))
    text = "\n".join(record.summary())
    assert f"reached with {record.n_images} images" in text
    # the same target with a larger minimum stops later: never before min_images
    later = _stats(data, target_error=error, min_images=stop + 1)
    assert later.meta.position > stop


@pytest.mark.keras
def test_a_target_not_reached_says_so(data: dict[str, Any]) -> None:
    record = _stats(data, target_error=1e-6, limit=12)
    assert record.meta.position == 12 and record.meta.target_reached is False
    assert "NOT reached" in "\n".join(record.summary())


@pytest.mark.keras
def test_a_killed_run_resumes_to_the_same_stop(
    data: dict[str, Any], target: tuple[float, int], tmp_path: Path
) -> None:
    error, stop = target
    out = tmp_path / "s.h5"
    code = (
        "import os, signal, sys\n"
        "from vggnorm.commands.stats import collect_stats\n"
        "from vggnorm.core.inputs import Decode\n"
        "def kill(p):\n"
        f"    if p.done >= {stop // 2}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "if __name__ == '__main__':\n"
        f"    collect_stats({str(data['weights'])!r}, {str(data['images'])!r}, decode=Decode({SIZE}),"
        f" batch_size=3, workers=1, check_every={CHECK}, target_error={error!r}, min_images=8,"
        f" target_quantile=0.5,"
        f" out={str(out)!r}, checkpoint_seconds=0, progress=kill)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    saved = read_stats(out)
    assert not saved.meta.complete and 0 < saved.meta.position < stop
    resumed = _stats(data, target_error=error, min_images=8, out=out, resume=True)
    assert resumed.meta.position == stop and resumed.meta.target_reached is True
    _same(resumed, _stats(data, limit=stop))


@pytest.mark.keras
def test_average_pooling_changes_the_means_after_the_first_pool_only(
    data: dict[str, Any], tmp_path: Path
) -> None:
    from vggnorm.commands.apply import normalize
    from vggnorm.commands.verify import verify

    mx = _stats(data, limit=9)
    avg = _stats(data, limit=9, pooling="avg", out=tmp_path / "avg.h5")
    assert (mx.meta.pooling, avg.meta.pooling) == ("max", "avg")
    for a, b in zip(mx.layers, avg.layers, strict=True):
        if a.name.startswith("block1_"):  # before the first pooling: the very same network
            assert np.array_equal(a.sum, b.sum) and np.array_equal(a.sumsq, b.sumsq)
        else:
            assert not np.allclose(a.sum, b.sum, rtol=1e-3)
    normalize(data["weights"], tmp_path / "n.h5", tmp_path / "avg.h5")
    report = verify(tmp_path / "n.h5", batch_size=3, workers=1)
    assert report.ok and report.means_checked  # exact under average pooling too


@pytest.mark.keras
def test_a_version_1_stats_file_still_applies_and_verifies(
    data: dict[str, Any], tmp_path: Path
) -> None:
    from vggnorm.commands.apply import normalize
    from vggnorm.commands.verify import verify

    stats = tmp_path / "v1.h5"
    _stats(data, limit=6, out=stats)
    _as_version_1(stats)
    assert read_stats(stats).precision() is None
    normalize(data["weights"], tmp_path / "n.h5", stats)
    report = verify(tmp_path / "n.h5", batch_size=3, workers=1)
    assert report.ok and report.stats_precision is None
    assert any("precision of the stats' means: unknown" in line for line in report.summary())


@pytest.mark.keras
def test_held_out_images_report_the_means_the_stats_never_saw(
    data: dict[str, Any], tmp_path: Path
) -> None:
    from vggnorm.commands.apply import normalize
    from vggnorm.commands.verify import verify
    from vggnorm.core.scaling import scales_for

    stats = tmp_path / "s.h5"
    record = _stats(data, limit=12, out=stats)
    normalize(data["weights"], tmp_path / "n.h5", stats)
    report = verify(tmp_path / "n.h5", batch_size=3, workers=1, held_out="stats")
    assert report.held_out is not None and report.held_out_ok is None and report.ok
    assert {c.images for c in report.held_out} == {30 - 12}  # the images the stats skipped over
    # the same means, measured independently: the original network on those 18 images, divided
    # by the scales. float32 rounding moves a normalized mean by ~1e-5 of its layer's scale
    # (verify's means check bounds it at 1e-4); 1e-3 on a median of |mean - 1| leaves room for
    # filters ten times below their layer's median scale.
    others = tmp_path / "others.txt"
    others.write_text("\n".join(str(data["images"] / i) for i in sorted(
        set(p.name for p in data["images"].iterdir()) - set(record.images))) + "\n")  # fmt: skip
    held = _stats(data | {"images": others})
    from vggnorm.formats.registry import load

    scales = scales_for(record, load(data["weights"]).bound)
    for check, ls in zip(report.held_out, held.layers, strict=True):
        live = np.ones(ls.channels, bool)
        live[scales.dead[check.name]] = False
        expected = float(np.median(np.abs(ls.mean / scales.values[check.name] - 1)[live]))
        assert abs(check.median_dev - expected) <= 1e-3, check.name
        assert check.within is not None and 0 <= check.within <= check.live
    judged = verify(tmp_path / "n.h5", batch_size=3, workers=1, held_out="stats",
                    held_out_tol=1e-9)  # fmt: skip
    assert judged.held_out_ok is False and not judged.ok
    assert {f["check"] for f in judged.failures()} == {"held-out"}
    assert verify(tmp_path / "n.h5", batch_size=3, workers=1, held_out="stats",
                  held_out_tol=10.0).ok  # fmt: skip


@pytest.mark.keras
def test_compare_states_a_difference_in_units_of_the_sampling_error(
    data: dict[str, Any], tmp_path: Path
) -> None:
    from vggnorm.commands.apply import normalize
    from vggnorm.commands.compare import compare_files

    first = tmp_path / "first.txt"
    names = sorted(p.name for p in data["images"].iterdir())
    first.write_text("\n".join(str(data["images"] / n) for n in names[:15]) + "\n")
    second = tmp_path / "second.txt"
    second.write_text("\n".join(str(data["images"] / n) for n in names[15:]) + "\n")
    s1 = _stats(data | {"images": first}, out=tmp_path / "s1.h5")
    _stats(data | {"images": second}, out=tmp_path / "s2.h5")
    normalize(data["weights"], tmp_path / "n2.h5", tmp_path / "s2.h5")
    result = compare_files(data["weights"], tmp_path / "n2.h5", tmp_path / "s1.h5")
    assert result.is_rescaling and result.stats_matches_original
    for layer in s1.layers:
        row = result.means[layer.name]
        im = layer.per_image
        assert im is not None
        n = im.images
        mean = im.sum / n
        se = np.sqrt(np.maximum(im.sumsq - n * mean**2, 0) / (n - 1) / n)
        half = sps.t.ppf(0.975, n - 1) * se
        s = result.report.scales[layer.name]
        median = np.median(mean[mean > 1e-8])
        live = (mean > 1e-8) & (mean >= 1e-3 * median) & (se > 0)
        inside = live & (np.abs(s - mean) <= half)
        # scales are recovered to 4e-6 relative: only a filter that close to an interval's edge
        # could be counted differently
        edge = live & np.isclose(np.abs(s - mean), half, rtol=1e-5)
        assert abs(row["within"] - int(inside.sum())) <= int(edge.sum()), layer.name
        assert row["live"] == int(live.sum())
    text = "\n".join(result.summary())
    assert "in the 95% interval" in text
