"""vggnorm.core.stats: streaming per-filter sums are exact whatever the batching (docs/architecture.md, the math)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vggnorm.core.stats import (
    ImageMoments,
    LayerStats,
    accumulate,
    empty_stats,
    means,
    merge_stats,
)

PROPERTY = settings(database=None, deadline=None, max_examples=100)
REPO = Path(__file__).resolve().parents[1]


@st.composite
def activations(draw: st.DrawFn, max_n: int = 24) -> np.ndarray:
    """Post-ReLU activations (N, H, W, C): non-negative, float32 or float64."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = (
        draw(st.integers(1, max_n)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 6)),
    )
    elements = st.floats(0, 1e4, width=32)  # representable in both dtypes
    return draw(hnp.arrays(dtype, shape, elements=elements))


@st.composite
def splits(draw: st.DrawFn, n: int) -> list[slice]:
    """Cut range(n) into consecutive batches of random, unequal sizes (empty ones included)."""
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    bounds = [0, *cuts, n]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def batch_moments(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """What the device hands back per batch: per-channel sum, sum of squares, value count."""
    b = batch.astype(np.float64).reshape(-1, batch.shape[-1])
    return b.sum(axis=0), np.square(b).sum(axis=0), b.shape[0]


def assert_same_stats(got: LayerStats, want: LayerStats) -> None:
    assert got.name == want.name
    assert got.count == want.count
    np.testing.assert_allclose(got.sum, want.sum, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got.sumsq, want.sumsq, rtol=1e-12, atol=0)
    assert got.sum.dtype == got.sumsq.dtype == np.float64


# --------------------------------------------------------------------------------------------
# Chunked accumulation equals one-shot
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data(), acts=activations())
def test_chunked_accumulation_equals_one_shot(data, acts):
    batches = data.draw(splits(acts.shape[0]))
    c = acts.shape[-1]
    one_shot = LayerStats.of("conv", acts)
    assert one_shot.count == acts.size // c

    by_add = LayerStats.empty("conv", c)
    by_merge = LayerStats.empty("conv", c)
    for sl in batches:
        by_add = by_add.add(*batch_moments(acts[sl]))
        by_merge = by_merge.merge(LayerStats.of("conv", acts[sl]))
    assert_same_stats(by_add, one_shot)
    assert_same_stats(by_merge, one_shot)
    np.testing.assert_allclose(
        by_add.mean, acts.astype(np.float64).mean(axis=(0, 1, 2)), rtol=1e-12
    )


@PROPERTY
@given(data=st.data(), a=activations(), b=activations())
def test_accumulate_over_layers_equals_one_shot(data, a, b):
    # two layers of different widths and map sizes, batched together as collect does
    n = min(a.shape[0], b.shape[0])
    a, b = a[:n], b[:n]
    stats = empty_stats([("block1_conv1", a.shape[-1]), ("block1_conv2", b.shape[-1])])
    for sl in data.draw(splits(n)):
        ma, mb = batch_moments(a[sl]), batch_moments(b[sl])
        stats = accumulate(
            stats,
            {"block1_conv1": ma[:2], "block1_conv2": mb[:2]},
            {"block1_conv1": ma[2], "block1_conv2": mb[2]},
        )
    assert [s.name for s in stats] == ["block1_conv1", "block1_conv2"]
    assert_same_stats(stats[0], LayerStats.of("block1_conv1", a))
    assert_same_stats(stats[1], LayerStats.of("block1_conv2", b))
    m = means(stats)
    assert list(m) == ["block1_conv1", "block1_conv2"]
    np.testing.assert_allclose(
        m["block1_conv2"], b.astype(np.float64).mean(axis=(0, 1, 2)), rtol=1e-12
    )


def test_the_last_partial_batch_counts():
    rng = np.random.default_rng(0)
    acts = rng.uniform(0, 5, size=(10, 3, 3, 4))
    stats = LayerStats.empty("c", 4)
    for start in range(0, 10, 4):  # batches of 4, 4 and 2
        stats = stats.add(*batch_moments(acts[start : start + 4]))
    assert stats.count == 10 * 3 * 3
    np.testing.assert_allclose(stats.mean, acts.mean(axis=(0, 1, 2)), rtol=1e-14)


def test_images_of_different_sizes_weigh_by_their_positions():
    small = np.full((1, 2, 2, 1), 4.0)  # 4 positions of 4
    large = np.zeros((1, 4, 4, 1))  # 16 positions of 0
    stats = LayerStats.of("c", small).merge(LayerStats.of("c", large))
    assert stats.count == 20
    assert stats.mean.tolist() == [16.0 / 20]  # not (4 + 0) / 2 = 2, the mean of image means


def test_averaging_per_batch_means_is_wrong_with_unequal_batches():
    batches = [np.zeros((3, 1, 1, 1)), np.full((1, 1, 1, 1), 6.0)]  # 3 zeros, then one 6
    stats = LayerStats.empty("c", 1)
    for b in batches:
        stats = stats.add(*batch_moments(b))
    mean_of_means = np.mean([b.mean() for b in batches])
    assert stats.mean.tolist() == [1.5]
    assert mean_of_means == 3.0
    assert stats.mean[0] != mean_of_means


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data(), a=activations(), b=activations())
def test_merge_of_disjoint_runs_equals_the_run_over_the_union(data, a, b):
    n = min(a.shape[0], b.shape[0])
    a, b = a[:n], b[:n]
    parts = [sl for sl in data.draw(splits(n)) if sl.stop > sl.start] or [slice(0, n)]
    runs = [(LayerStats.of("x", a[sl]), LayerStats.of("y", b[sl])) for sl in parts]
    merged = merge_stats(*runs)
    assert_same_stats(merged[0], LayerStats.of("x", a))
    assert_same_stats(merged[1], LayerStats.of("y", b))
    # the order of the runs does not matter
    reverse = merge_stats(*runs[::-1])
    for r, m in zip(reverse, merged):
        assert_same_stats(r, m)


def test_merge_does_not_modify_its_inputs():
    a = LayerStats("c", np.array([1.0, 2.0]), np.array([1.0, 4.0]), 3)
    b = LayerStats("c", np.array([5.0, 5.0]), np.array([9.0, 9.0]), 2)
    m = a.merge(b)
    assert (a.sum.tolist(), a.count) == ([1.0, 2.0], 3)
    assert (b.sum.tolist(), b.count) == ([5.0, 5.0], 2)
    assert (m.sum.tolist(), m.sumsq.tolist(), m.count) == ([6.0, 7.0], [10.0, 13.0], 5)


def test_merging_another_layer_raises():
    with pytest.raises(
        ValueError, match=r"cannot merge layer b \(2 filters\) into a \(2 filters\)"
    ):
        LayerStats.empty("a", 2).merge(LayerStats.empty("b", 2))


def test_merging_another_width_raises():
    with pytest.raises(
        ValueError, match=r"cannot merge layer a \(3 filters\) into a \(2 filters\)"
    ):
        LayerStats.empty("a", 2).merge(LayerStats.empty("a", 3))


def test_merging_runs_over_different_layers_raises():
    run1 = empty_stats([("a", 2), ("b", 2)])
    with pytest.raises(ValueError, match="different layers"):
        merge_stats(run1, empty_stats([("a", 2), ("c", 2)]))
    with pytest.raises(ValueError, match="different layers"):
        merge_stats(run1, empty_stats([("b", 2), ("a", 2)]))
    with pytest.raises(ValueError, match="different layers"):
        merge_stats(run1, empty_stats([("a", 2)]))
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_stats()


def test_a_batch_of_the_wrong_width_raises_instead_of_broadcasting():
    with pytest.raises(ValueError, match="3 filters"):
        LayerStats.empty("c", 3).add([6.0], [36.0], 1)
    with pytest.raises(ValueError, match="1 filters"):
        LayerStats.empty("c", 1).add([1.0, 2.0, 3.0], [1.0, 4.0, 9.0], 3)


# --------------------------------------------------------------------------------------------
# Mean and variance
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(acts=activations())
def test_variance_is_non_negative_and_matches_numpy(acts):
    s = LayerStats.of("c", acts)
    flat = acts.astype(np.float64).reshape(-1, acts.shape[-1])
    var = s.variance
    assert np.all(var >= 0)
    # sumsq/n - mean^2 cancels: its error scales with the second moment, not with the variance
    second = (s.sumsq / s.count).max()
    np.testing.assert_allclose(var, np.var(flat, axis=0), rtol=1e-7, atol=1e-12 * second)


@pytest.mark.parametrize("value", [0.1, 0.3, 1 / 3, 7.7, 1e-3])
def test_variance_of_constant_activations_is_zero_not_negative(value):
    s = LayerStats.of("c", np.full((7, 1, 1, 1), value))
    assert s.variance[0] >= 0.0
    assert s.variance[0] <= 1e-15 * value * value


def test_mean_of_nothing_raises():
    with pytest.raises(ValueError, match="no activation counted yet"):
        _ = LayerStats.empty("block1_conv1", 4).mean


@pytest.mark.parametrize(
    ("sum_", "sumsq", "count", "match"),
    [
        (np.zeros(2), np.zeros(3), 0, "sum and sumsq must be 1-D of equal length"),
        (np.zeros((2, 2)), np.zeros((2, 2)), 0, "sum and sumsq must be 1-D of equal length"),
        (np.zeros(2), np.zeros(2), -1, "count must be >= 0, got -1"),
    ],
    ids=["unequal", "2-D", "negative-count"],
)
def test_malformed_stats_are_refused(sum_, sumsq, count, match):
    with pytest.raises(ValueError, match=match):
        LayerStats("c", sum_, sumsq, count)


def test_stats_of_float32_activations_are_summed_in_float64():
    # 2**24 + 1 is not a float32: summing in float32 would lose the ones
    acts = np.ones((3, 1, 1, 1), dtype=np.float32)
    big = np.full((1, 1, 1, 1), 2.0**24, dtype=np.float32)
    s = LayerStats.of("c", acts).merge(LayerStats.of("c", big))
    assert s.sum.dtype == np.float64
    assert s.sum.tolist() == [2.0**24 + 3]


# --------------------------------------------------------------------------------------------
# Per-image moments, refusals word for word, what the sums are kept in
# --------------------------------------------------------------------------------------------


def test_per_image_moments_of_activations():
    # two images of 2 x 1 positions, two filters: image means (1, 3) and (2, 5)
    acts = np.array([[[[0.0, 2.0]], [[2.0, 4.0]]], [[[1.0, 5.0]], [[3.0, 5.0]]]])
    im = LayerStats.of("c", acts).per_image
    assert im is not None and im.images == 2
    assert (im.sum.tolist(), im.sumsq.tolist()) == ([3.0, 8.0], [5.0, 34.0])


def test_per_image_moments_of_one_value_per_image_and_of_no_image_axis():
    s = LayerStats.of("c", [[1.0, 2.0], [3.0, 4.0]])  # (images, channels): no positions
    assert s.count == 2 and s.per_image is not None and s.per_image.images == 2
    assert (s.per_image.sum.tolist(), s.per_image.sumsq.tolist()) == ([4.0, 6.0], [10.0, 20.0])
    flat = LayerStats.of("c", [1.0, 2.0])  # one value per filter: no image axis, no moments
    assert flat.count == 1 and flat.sum.tolist() == [1.0, 2.0] and flat.per_image is None


def test_image_moments_add_and_refuse_another_width():
    both = ImageMoments.of([[1.0]]).plus(ImageMoments.of([[2.0], [3.0]]))
    assert (both.sum.tolist(), both.sumsq.tolist(), both.images) == ([6.0], [14.0], 3)
    with pytest.raises(ValueError, match=r"^image moments of \(2,\) filters for \(1,\)$"):
        ImageMoments.of([[1.0]]).plus(ImageMoments.of([[1.0, 2.0]]))


def test_image_moments_of_float32_means_square_in_float64():
    # a float32 per-image mean squared in float32 loses its low bits; in float64 it is exact
    # (a 24-bit mantissa squared fits in 53 bits)
    m = np.array([[1 + 2.0**-20], [3.0]], dtype=np.float32)
    im = ImageMoments.of(m)
    assert im.sumsq.dtype == np.float64
    assert im.sumsq.tolist() == [(1 + 2.0**-20) ** 2 + 9.0]
    assert np.float32(m[0, 0]) * np.float32(m[0, 0]) == np.float32(1 + 2.0**-19)  # float32 rounds


def test_layer_stats_refuse_per_image_moments_of_another_width():
    with pytest.raises(ValueError, match=r"^a: per-image moments for another number of filters$"):
        LayerStats("a", np.zeros(2), np.zeros(2), 1, ImageMoments.of([[1.0]]))


def test_batches_carry_their_per_image_moments_or_lose_them():
    stats = empty_stats([("a", 1)])
    im = ImageMoments.of([[2.0]])
    kept = accumulate(stats, {"a": ([2.0], [4.0])}, {"a": 1}, {"a": im})[0].per_image
    assert kept is not None and (kept.sum.tolist(), kept.images) == ([2.0], 1)
    assert accumulate(stats, {"a": ([2.0], [4.0])}, {"a": 1})[0].per_image is None
    assert stats[0].add([2.0], [4.0], 1).per_image is None


@pytest.mark.parametrize("batch", [np.array([1.0], dtype=np.longdouble), [Fraction(1, 3)]],
                         ids=["longdouble", "fractions"])  # fmt: skip
def test_sums_stay_float64_whatever_the_batch_holds(batch):
    # numpy would add a longdouble (80-bit on x86-64) or an object array to the float64 sums in
    # that wider type; the sums are converted first
    s = LayerStats.empty("c", 1).add(batch, batch, 1)
    assert s.sum.dtype == s.sumsq.dtype == np.float64


def test_refusals_word_for_word():
    with pytest.raises(ValueError, match=r"^c: batch sums of shape \(2,\) and \(1,\) for 2 filters$"):
        LayerStats.empty("c", 2).add([1.0, 2.0], [1.0], 1)
    run = empty_stats([("a", 2)])
    with pytest.raises(ValueError, match=r"^runs cover different layers$"):
        merge_stats(run, empty_stats([("b", 2)]))
    with pytest.raises(ValueError, match=r"^nothing to merge$"):
        merge_stats()


# --------------------------------------------------------------------------------------------
# Purity
# --------------------------------------------------------------------------------------------


def test_the_math_imports_no_framework_and_no_hdf5():
    code = (
        "import sys, vggnorm.core.stats, vggnorm.core.rescale; "
        "print(sorted(m for m in ('keras', 'tensorflow', 'h5py', 'torch', 'jax') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
