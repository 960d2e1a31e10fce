"""vggnorm.core.rescale against a pure-numpy reference ReLU conv stack (docs/architecture.md, the math)."""

from __future__ import annotations

import doctest
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vggnorm.core.rescale
from vggnorm.core.rescale import (
    DEAD_THRESHOLD,
    Scales,
    compute_scales,
    flatten_row_scale,
    rescale,
)
from vggnorm.core.stats import LayerStats

# No example database: tests write nothing into the working directory.
PROPERTY = settings(database=None, deadline=None, max_examples=60)

# --------------------------------------------------------------------------------------------
# Reference network: 3x3 'same' convs + ReLU, 2x2 max/avg pooling, Flatten/GAP/GMP + Dense.
# --------------------------------------------------------------------------------------------


def conv3x3_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """(N, H, W, C_in) * (3, 3, C_in, C_out) -> (N, H, W, C_out), zero padding, stride 1."""
    _, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = np.stack([[padded[:, i : i + h, j : j + w, :] for j in range(3)] for i in range(3)])
    y = np.einsum("ijnhwc,ijco->nhwo", windows, kernel)
    return y if bias is None else y + bias


def pool2x2(x: np.ndarray, kind: str) -> np.ndarray:
    """2x2, stride 2, 'valid' pooling (an odd last row/column is dropped, as in Keras)."""
    n, h, w, c = x.shape
    blocks = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    return blocks.max(axis=(2, 4)) if kind == "max" else blocks.mean(axis=(2, 4))


def reduce_head(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "flatten":
        return x.reshape(x.shape[0], -1)  # channels-last, like keras.layers.Flatten
    return x.mean(axis=(1, 2)) if kind == "gap" else x.max(axis=(1, 2))


@dataclass(frozen=True)
class Stack:
    convs: tuple[str, ...]
    pools: dict[str, str]  # conv name -> "max"/"avg" pooling right after its ReLU
    head: str | None  # "flatten", "gap", "gmp" or no head
    weights: dict[str, np.ndarray]
    input_shape: tuple[int, int, int]


def forward(
    stack: Stack, weights: dict[str, np.ndarray], x: np.ndarray, *, bound: bool = False
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Every conv's post-ReLU activation and the head's output.

    With ``bound``, run |x| through |W| and |b| without ReLU instead: an upper bound on the
    magnitude of every term that went into each value, which scales rounding errors.
    """
    fix = np.abs if bound else (lambda a: a)
    acts = []
    a = fix(x)
    for name in stack.convs:
        bias = weights.get(f"{name}/bias")
        z = conv3x3_same(a, fix(weights[f"{name}/kernel"]), None if bias is None else fix(bias))
        a = z if bound else np.maximum(z, 0)
        acts.append(a)
        if name in stack.pools:
            a = pool2x2(a, stack.pools[name])
    if stack.head is None:
        return acts, None
    out = reduce_head(a, stack.head) @ fix(weights["fc/kernel"]) + fix(weights["fc/bias"])
    return acts, out


def head_args(stack: Stack) -> dict[str, str | None]:
    return {"head_dense": "fc" if stack.head else None, "head_reduce": stack.head}


def log_scales(draw: st.DrawFn, stack: Stack, lo: float = -3.0, hi: float = 3.0) -> Scales:
    """Scales from 10**U(lo, hi) per filter, through the public compute_scales."""
    means = {}
    for name in stack.convs:
        n = stack.weights[f"{name}/kernel"].shape[3]
        exps = draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n))
        means[name] = 10.0 ** np.array(exps)
    return compute_scales(means, stack.convs)


def inputs(stack: Stack, seed: int, n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, *stack.input_shape))


# --------------------------------------------------------------------------------------------
# rescale keeps the function
# --------------------------------------------------------------------------------------------


@st.composite
def stacks(draw: st.DrawFn, dtype: type = np.float64) -> Stack:
    """A stack whose pooling plan matches its input size (pools only where the map is >= 2x2)."""
    n_convs = draw(st.integers(2, 4))
    channels = draw(st.lists(st.integers(1, 5), min_size=n_convs, max_size=n_convs))
    c_in = draw(st.integers(1, 3))
    h0, w0 = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    head = draw(st.sampled_from([None, "flatten", "gap", "gmp"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weights: dict[str, np.ndarray] = {}
    convs, pools = [], {}
    prev, h, w = c_in, h0, w0
    for i, c in enumerate(channels):
        name = f"conv{i}"
        convs.append(name)
        weights[f"{name}/kernel"] = rng.normal(0, (9 * prev) ** -0.5, (3, 3, prev, c))
        if i == 0 or draw(st.booleans()):  # some convs without bias (use_bias=False)
            weights[f"{name}/bias"] = rng.normal(0, 0.3, c)
        pool = draw(st.sampled_from([None, "max", "avg"]))
        if pool is not None and h >= 2 and w >= 2:
            pools[name] = pool
            h, w = h // 2, w // 2
        prev = c
    if head is not None:
        rows = h * w * prev if head == "flatten" else prev
        units = draw(st.integers(1, 4))
        weights["fc/kernel"] = rng.normal(0, 1, (rows, units))
        weights["fc/bias"] = rng.normal(0, 1, units)
        weights["fc2/kernel"] = rng.normal(0, 1, (units, 2))  # after the first Dense: untouched
    weights["other/0"] = rng.normal(0, 1, 3)  # a key rescale does not know: untouched
    weights = {k: v.astype(dtype) for k, v in weights.items()}
    return Stack(tuple(convs), pools, head, weights, (h0, w0, c_in))


@PROPERTY
@given(data=st.data(), stack=stacks(), seed=st.integers(0, 2**16))
def test_rescale_divides_every_activation_and_keeps_the_head(data, stack, seed):
    scales = log_scales(data.draw, stack)
    x = inputs(stack, seed)
    acts, out = forward(stack, stack.weights, x)
    bounds, out_bound = forward(stack, stack.weights, x, bound=True)

    new = rescale(stack.weights, scales, **head_args(stack))
    new_acts, new_out = forward(stack, new, x)

    for name, a, b, bound in zip(stack.convs, acts, new_acts, bounds):
        s = scales.values[name]
        # a value produced by cancellation (near 0 next to large terms) is only exact up to
        # rounding of those terms: atol follows the size of the terms, rtol everything else
        np.testing.assert_allclose(b * s, a, rtol=1e-10, atol=1e-12 * bound.max(), err_msg=name)
    if stack.head is not None:
        np.testing.assert_allclose(new_out, out, rtol=1e-10, atol=1e-12 * out_bound.max())


@PROPERTY
@given(data=st.data(), stack=stacks())
def test_rescale_with_powers_of_two_round_trips_bitwise(data, stack):
    # Multiplying and dividing by powers of two is exact: inverse gives back the very bits.
    means = {
        name: 2.0 ** np.array(data.draw(st.lists(st.integers(-20, 20), min_size=n, max_size=n)))
        for name in stack.convs
        for n in [stack.weights[f"{name}/kernel"].shape[3]]
    }
    scales = compute_scales(means, stack.convs)
    for dtype in (np.float32, np.float64):
        weights = {k: v.astype(dtype) for k, v in stack.weights.items()}
        back = rescale(
            rescale(weights, scales, **head_args(stack)), scales, **head_args(stack), inverse=True
        )
        assert back.keys() == weights.keys()
        for k in weights:
            assert back[k].dtype == dtype
            np.testing.assert_array_equal(back[k], weights[k], err_msg=k)


@PROPERTY
@given(data=st.data(), stack=stacks())
def test_inverse_undoes_rescale(data, stack):
    scales = log_scales(data.draw, stack)
    args = head_args(stack)
    back = rescale(rescale(stack.weights, scales, **args), scales, **args, inverse=True)
    assert back.keys() == stack.weights.keys()
    for k, v in stack.weights.items():
        np.testing.assert_allclose(back[k], v, rtol=1e-13, atol=0, err_msg=k)


@PROPERTY
@given(stack=stacks(), dtype=st.sampled_from([np.float32, np.float64]))
def test_unit_scales_change_nothing(stack, dtype):
    weights = {k: v.astype(dtype) for k, v in stack.weights.items()}
    ones = compute_scales(
        {n: np.ones(weights[f"{n}/kernel"].shape[3]) for n in stack.convs}, stack.convs
    )
    args = head_args(stack)
    for inverse in (False, True):
        out = rescale(weights, ones, **args, inverse=inverse)
        assert out is not weights
        assert out.keys() == weights.keys()
        for k, v in weights.items():
            assert out[k].dtype == v.dtype
            np.testing.assert_array_equal(out[k], v, err_msg=k)
        touched = {f"{n}/{p}" for n in stack.convs for p in ("kernel", "bias")}
        touched |= {"fc/kernel"} if stack.head else set()
        for k in weights.keys() - touched:
            assert out[k] is weights[k], f"{k} should be the caller's own array"


@PROPERTY
@given(data=st.data(), stack=stacks(), inverse=st.booleans())
def test_callers_dict_and_arrays_are_never_modified(data, stack, inverse):
    weights = dict(stack.weights)
    ids = {k: id(v) for k, v in weights.items()}
    copies = {k: v.copy() for k, v in weights.items()}
    scales = log_scales(data.draw, stack)
    scale_copies = {k: v.copy() for k, v in scales.values.items()}

    out = rescale(weights, scales, **head_args(stack), inverse=inverse)

    assert out is not weights
    assert {k: id(v) for k, v in weights.items()} == ids
    for k, v in weights.items():
        np.testing.assert_array_equal(v, copies[k], err_msg=k)
    for k, v in scales.values.items():
        np.testing.assert_array_equal(v, scale_copies[k])
    # every array that changed is a new object, never a view written through
    for k in out:
        if not np.array_equal(out[k], weights[k]):
            assert out[k] is not weights[k]
            assert not np.shares_memory(out[k], weights[k])


@PROPERTY
@given(data=st.data(), stack=stacks())
def test_dtype_is_preserved_per_array(data, stack):
    scales = log_scales(data.draw, stack)
    for dtype in (np.float32, np.float64):
        weights = {k: v.astype(dtype) for k, v in stack.weights.items()}
        out = rescale(weights, scales, **head_args(stack))
        assert {k: v.dtype for k, v in out.items()} == {k: np.dtype(dtype) for k in weights}
        assert all(np.all(np.isfinite(v)) for v in out.values())
    # mixed storage (old files hold float64 next to float32): each array keeps its own dtype
    mixed = {
        k: v.astype(np.float32 if i % 2 else np.float64)
        for i, (k, v) in enumerate(stack.weights.items())
    }
    out = rescale(mixed, scales, **head_args(stack))
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in mixed.items()}


def test_float32_stack_keeps_the_function_to_float32_precision():
    rng = np.random.default_rng(7)
    w = {
        "a/kernel": rng.normal(0, 0.3, (3, 3, 3, 4)).astype(np.float32),
        "a/bias": rng.normal(0, 0.3, 4).astype(np.float32),
        "b/kernel": rng.normal(0, 0.2, (3, 3, 4, 5)).astype(np.float32),
        "b/bias": rng.normal(0, 0.3, 5).astype(np.float32),
        "fc/kernel": rng.normal(0, 1, (2 * 2 * 5, 3)).astype(np.float32),
        "fc/bias": rng.normal(0, 1, 3).astype(np.float32),
    }
    stack = Stack(("a", "b"), {"a": "max", "b": "avg"}, "flatten", w, (8, 8, 3))
    x = rng.normal(0, 1, (2, 8, 8, 3)).astype(np.float32)
    scales = compute_scales({"a": [1e-3, 0.5, 3.0, 1e3], "b": [0.01, 0.1, 1, 10, 100]}, ["a", "b"])
    new = rescale(w, scales, "fc", "flatten")
    acts, out = forward(stack, w, x)
    new_acts, new_out = forward(stack, new, x)
    assert new_out.dtype == np.float32
    # What float32 promises (Higham, eq. 3.5): a dot product of n terms (bias included) errs by at
    # most gamma_n = n*u/(1-n*u) (u = 2**-24) times the sum of its absolute terms, in any
    # summation order. Each run errs so, and each rescaled weight carries one more rounding (u),
    # so layer l's error per unit of magnitude is c = 2*gamma_n + u + 2*gamma_n*u. Errors travel
    # through |W| and 1-Lipschitz ReLU/pooling, so after l layers they are at most
    # ((1 + c)**l - 1) * B_l, with B_l the network of |W|, |b| on |x| (forward(bound=True)),
    # elementwise, in original units (a positive rescale scales values and bounds alike).
    u = 2.0**-24
    n = max(9 * w["a/kernel"].shape[2], 9 * w["b/kernel"].shape[2], w["fc/kernel"].shape[0]) + 1
    g = n * u / (1 - n * u)
    c = 2 * g + u + 2 * g * u
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    bounds, out_bound = forward(stack, w64, x.astype(np.float64), bound=True)
    for depth, (name, a, b, bound) in enumerate(zip(stack.convs, acts, new_acts, bounds), start=1):
        assert b.dtype == np.float32
        err = np.abs(b * scales.values[name] - a)
        assert np.all(err <= ((1 + c) ** depth - 1) * bound), name
    assert np.all(np.abs(new_out - out) <= ((1 + c) ** 3 - 1) * out_bound)


# --------------------------------------------------------------------------------------------
# compute_scales
# --------------------------------------------------------------------------------------------


def test_dead_and_near_dead_filters_get_scale_one_and_are_reported():
    means = [0.0, 5e-9, DEAD_THRESHOLD, 2e-8, 3.0, 0.0]
    s = compute_scales({"c": means, "d": [1.0, 2.0]}, ["c", "d"])
    assert s.values["c"].tolist() == [1.0, 1.0, 1.0, 2e-8, 3.0, 1.0]
    assert s.dead["c"].tolist() == [0, 1, 2, 5]
    assert s.dead["c"].dtype == np.int64
    assert s.dead["d"].tolist() == []
    assert s.n_dead == 4
    assert s.layers == ("c", "d")
    assert s.values["c"].dtype == np.float64


def test_dead_threshold_is_a_parameter():
    s = compute_scales({"c": [0.0, 0.05, 0.2]}, ["c"], dead_threshold=0.1)
    assert s.values["c"].tolist() == [1.0, 1.0, 0.2]
    assert s.dead["c"].tolist() == [0, 1]


@pytest.mark.parametrize(
    "bad",
    [np.nan, np.inf, -np.inf, -1.0, -1e-300],
    ids=["nan", "inf", "-inf", "negative", "tiny-negative"],
)
def test_non_finite_or_negative_means_raise(bad):
    with pytest.raises(ValueError, match=r"means of 'c2' hold negative, NaN or infinite"):
        compute_scales({"c1": [1.0], "c2": [1.0, bad, 2.0]}, ["c1", "c2"])


def test_missing_layer_raises_naming_it():
    with pytest.raises(ValueError, match=r"no statistics for conv layer 'block1_conv2'"):
        compute_scales({"block1_conv1": [1.0]}, ["block1_conv1", "block1_conv2"])


def test_means_must_be_one_dimensional():
    with pytest.raises(ValueError, match=r"must be 1-D, got shape \(2, 2\)"):
        compute_scales({"c": np.ones((2, 2))}, ["c"])


def test_the_caller_means_are_not_modified():
    m = np.array([0.0, 2.0])
    compute_scales({"c": m}, ["c"])
    assert m.tolist() == [0.0, 2.0]


@settings(database=None, deadline=None, max_examples=200)
@given(
    means=st.lists(
        st.floats(min_value=0.0, max_value=1e308, allow_subnormal=True), min_size=1, max_size=20
    ),
    threshold=st.sampled_from([DEAD_THRESHOLD, 0.0, 1.0]),
)
def test_scales_are_finite_positive_and_the_mean_where_live(means, threshold):
    s = compute_scales({"c": means}, ["c"], dead_threshold=threshold)
    v, m = s.values["c"], np.array(means)
    assert v.shape == m.shape
    assert np.all(np.isfinite(v)) and np.all(v > 0)
    live = m > threshold
    assert np.array_equal(v[live], m[live])
    assert np.all(v[~live] == 1.0)
    assert s.dead["c"].tolist() == np.flatnonzero(~live).tolist()


def test_doctests_pass():
    result = doctest.testmod(vggnorm.core.rescale, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4
    assert result.failed == 0


# --------------------------------------------------------------------------------------------
# The head: Flatten row order and global pooling
# --------------------------------------------------------------------------------------------

H, W, C, UNITS = 2, 3, 4, 5


def _head_case(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = np.array([0.5, 2.0, 7.0, 0.125])  # distinct per channel
    weights = {
        "c/kernel": rng.normal(size=(3, 3, 2, C)),
        "c/bias": rng.normal(size=C),
        "fc/kernel": rng.normal(size=(rows, UNITS)),
        "fc/bias": rng.normal(size=UNITS),
    }
    return rng, compute_scales({"c": means}, ["c"]), weights


def test_flatten_head_compensates_rows_in_channels_last_order():
    rng, scales, w = _head_case(H * W * C)
    s = scales.values["c"]
    a = rng.uniform(0, 3, size=(H, W, C))  # the last conv's map as the original network has it
    scaled = a / s  # what the rescaled conv produces: channel c divided by s[c]

    new = rescale(w, scales, "fc", "flatten")

    expected = a.reshape(-1) @ w["fc/kernel"] + w["fc/bias"]
    got = scaled.reshape(-1) @ new["fc/kernel"] + new["fc/bias"]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # row (i*W + j)*C + c carries channel c's scale
    for i in range(H):
        for j in range(W):
            for c in range(C):
                row = (i * W + j) * C + c
                np.testing.assert_allclose(new["fc/kernel"][row], w["fc/kernel"][row] * s[c])
    # a channels-first reading of the same map would not be compensated: order matters
    wrong = scaled.transpose(2, 0, 1).reshape(-1) @ new["fc/kernel"] + new["fc/bias"]
    right_cf = a.transpose(2, 0, 1).reshape(-1) @ w["fc/kernel"] + w["fc/bias"]
    assert not np.allclose(wrong, right_cf, rtol=1e-6)
    # the bias of the Dense and everything after it are untouched
    assert new["fc/bias"] is w["fc/bias"]


@pytest.mark.parametrize("reduce", ["gap", "gmp"])
def test_global_pooling_head_compensates_row_c_by_channel_c(reduce):
    rng, scales, w = _head_case(C)
    s = scales.values["c"]
    a = rng.uniform(0, 3, size=(1, H, W, C))
    new = rescale(w, scales, "fc", reduce)
    pooled = reduce_head(a, reduce)
    pooled_scaled = reduce_head(a / s, reduce)
    np.testing.assert_allclose(pooled_scaled * s, pooled, rtol=1e-14)
    np.testing.assert_allclose(
        pooled_scaled @ new["fc/kernel"] + new["fc/bias"],
        pooled @ w["fc/kernel"] + w["fc/bias"],
        rtol=1e-12,
    )
    np.testing.assert_allclose(new["fc/kernel"], w["fc/kernel"] * s[:, None], rtol=1e-15)


def test_flatten_head_with_a_row_count_not_a_multiple_of_the_filters_raises():
    _, scales, w = _head_case(H * W * C + 1)
    with pytest.raises(
        ValueError, match=r"fc: 25 input rows is not a multiple of the last conv's 4 filters"
    ):
        rescale(w, scales, "fc", "flatten")


@pytest.mark.parametrize("reduce", ["gap", "gmp"])
def test_global_pooling_head_with_more_rows_than_filters_raises(reduce):
    _, scales, w = _head_case(H * W * C)
    with pytest.raises(ValueError, match=r"fc: 24 input rows after global pooling, expected 4"):
        rescale(w, scales, "fc", reduce)


def test_head_dense_and_reduce_go_together():
    _, scales, w = _head_case(C)
    with pytest.raises(ValueError, match=r"^head_dense and head_reduce go together$"):
        rescale(w, scales, "fc", None)
    with pytest.raises(ValueError, match=r"^head_dense and head_reduce go together$"):
        rescale(w, scales, None, "gap")


def test_float32_means_give_float64_scales():
    # 1/3 in float32 is not 1/3 in float64: the scales keep the float32 value exactly, in float64
    m32 = np.array([1 / 3, 2.0, 0.0], dtype=np.float32)
    s = compute_scales({"c": m32}, ["c"])
    assert s.values["c"].dtype == np.float64
    assert s.values["c"].tolist() == [float(m32[0]), 2.0, 1.0]


def test_flatten_row_scale_is_float64_in_both_orders():
    s32 = np.array([1 / 3, 3.0], dtype=np.float32)
    for order, expected in (("hwc", [1 / 3, 3, 1 / 3, 3]), ("chw", [1 / 3, 1 / 3, 3, 3])):
        rows = flatten_row_scale(s32, 4, order)
        assert rows.dtype == np.float64
        np.testing.assert_array_equal(rows, np.asarray(expected, np.float32).astype(np.float64))
    assert flatten_row_scale([1, 2], 2, "chw").dtype == np.float64  # integers too


def test_flatten_row_scale_refuses_an_unknown_order():
    with pytest.raises(ValueError, match=r"^unknown flatten order 'whc'; expected 'hwc' or 'chw'$"):
        flatten_row_scale([1.0], 1, "whc")  # type: ignore[arg-type]


def test_missing_or_misshapen_weights_raise_naming_the_key():
    _, scales, w = _head_case(C)
    with pytest.raises(ValueError, match=r"weights have no 'dense/kernel'"):
        rescale(w, scales, "dense", "gap")
    with pytest.raises(ValueError, match=r"weights have no 'c/kernel'"):
        rescale({"fc/kernel": w["fc/kernel"]}, scales)
    with pytest.raises(ValueError, match=r"c/kernel must be 4-D"):
        rescale({**w, "c/kernel": np.ones((3, 4))}, scales)
    with pytest.raises(ValueError, match=r"c: 3 filters but 4 scales"):
        rescale({**w, "c/kernel": np.ones((3, 3, 2, 3))}, scales)


def test_convs_that_are_not_a_chain_raise():
    scales = compute_scales({"a": [1.0, 2.0], "b": [1.0]}, ["a", "b"])
    w = {"a/kernel": np.ones((3, 3, 1, 2)), "b/kernel": np.ones((3, 3, 3, 1))}
    with pytest.raises(ValueError, match=r"b: 3 input channels but the previous conv has 2"):
        rescale(w, scales)


# --------------------------------------------------------------------------------------------
# Normalized means are 1
# --------------------------------------------------------------------------------------------


def layer_means(stack: Stack, weights: dict[str, np.ndarray], x: np.ndarray):
    acts, _ = forward(stack, weights, x)
    return {name: LayerStats.of(name, a).mean for name, a in zip(stack.convs, acts)}, acts


@PROPERTY
@given(stack=stacks(), seed=st.integers(0, 2**16), kill=st.integers(0, 10**6))
def test_normalized_means_are_one_and_dead_filters_stay_zero(stack, seed, kill):
    # kill one filter for good: zero kernel column and a negative bias keep its ReLU at 0
    weights = dict(stack.weights)
    dead_conv = stack.convs[kill % len(stack.convs)]
    if f"{dead_conv}/bias" not in weights:
        dead_conv = stack.convs[0]  # the first conv always has a bias
    c = kill % weights[f"{dead_conv}/kernel"].shape[3]
    weights[f"{dead_conv}/kernel"] = weights[f"{dead_conv}/kernel"].copy()
    weights[f"{dead_conv}/kernel"][..., c] = 0.0
    weights[f"{dead_conv}/bias"] = weights[f"{dead_conv}/bias"].copy()
    weights[f"{dead_conv}/bias"][c] = -1.0

    x = inputs(stack, seed, n=6)
    means, _ = layer_means(stack, weights, x)
    assert means[dead_conv][c] == 0.0
    scales = compute_scales(means, stack.convs)
    assert c in scales.dead[dead_conv]

    new = rescale(weights, scales, **head_args(stack))
    assert all(np.all(np.isfinite(v)) for v in new.values())
    new_means, new_acts = layer_means(stack, new, x)
    for name in stack.convs:
        m = new_means[name]
        dead = scales.dead[name]
        live = np.setdiff1d(np.arange(m.shape[0]), dead)
        assert np.all(np.isfinite(new_acts[stack.convs.index(name)]))
        np.testing.assert_allclose(m[live], 1.0, rtol=1e-9, err_msg=name)
        # filters dead on these images stay dead (up to a rounding flip at exactly 0 pre-ReLU)
        np.testing.assert_allclose(m[dead], 0.0, atol=1e-12, err_msg=name)
    assert new_means[dead_conv][c] == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_normalized_means_in_float32_are_one_to_1e4(seed):
    rng = np.random.default_rng(seed)
    w = {
        "a/kernel": rng.normal(0, 0.3, (3, 3, 3, 6)),
        "a/bias": rng.normal(0.2, 0.1, 6),
        "b/kernel": rng.normal(0, 0.2, (3, 3, 6, 5)),
        "b/bias": rng.normal(0.2, 0.1, 5),
        "c/kernel": rng.normal(0, 0.2, (3, 3, 5, 4)),
        "c/bias": rng.normal(0.2, 0.1, 4),
    }
    w = {k: v.astype(np.float32) for k, v in w.items()}
    stack = Stack(("a", "b", "c"), {"a": "max", "b": "avg"}, None, w, (8, 8, 3))
    x = (rng.uniform(0, 255, (4, 8, 8, 3)) - 120.0).astype(np.float32)  # caffe-like inputs
    means, _ = layer_means(stack, w, x)
    scales = compute_scales(means, stack.convs)
    new_means, acts = layer_means(stack, rescale(w, scales), x)
    for name, a in zip(stack.convs, acts):
        assert a.dtype == np.float32
        live = np.setdiff1d(np.arange(len(means[name])), scales.dead[name])
        np.testing.assert_allclose(new_means[name][live], 1.0, rtol=1e-4, err_msg=name)
