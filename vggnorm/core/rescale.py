"""Exact rescaling of a ReLU conv chain. Pure numpy: no framework, no files.

Weights are a flat ``dict[str, ndarray]`` keyed ``"<layer>/kernel"`` and ``"<layer>/bias"``
(Keras channels-last shapes: conv kernels (kh, kw, C_in, C_out), dense kernels (rows, units)).
Dividing filter c of conv l by s_l[c] divides its post-ReLU output by s_l[c] (ReLU is positively
homogeneous, pooling commutes with a positive per-channel scale); multiplying conv l+1's input
channel c by s_l[c] undoes it, so the network computes the same function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .archs import FlattenOrder, Reduce

F64 = npt.NDArray[np.float64]

#: Filters whose mean activation is at or below this are dead on the data and keep scale 1.
DEAD_THRESHOLD = 1e-8


@dataclass(frozen=True)
class Scales:
    """Per-filter divisors for each conv layer, in network order, and which filters were dead."""

    layers: tuple[str, ...]
    values: Mapping[str, F64]
    dead: Mapping[str, npt.NDArray[np.int64]]

    @property
    def n_dead(self) -> int:
        return int(sum(len(d) for d in self.dead.values()))


def compute_scales(
    means: Mapping[str, npt.ArrayLike],
    layers: Sequence[str],
    dead_threshold: float = DEAD_THRESHOLD,
) -> Scales:
    """Scales from per-filter means: the mean itself, or 1 for a dead filter.

    Args:
        means: per-layer mean activation of each filter (non-negative, finite).
        layers: conv layer names in network order; every one must be in ``means``.
        dead_threshold: means at or below this keep scale 1 and are reported as dead.

    Returns:
        Scales, float64, all finite and strictly positive.

    Raises:
        ValueError: a layer is missing, or a mean is negative, NaN or infinite.

    Example:
        >>> s = compute_scales({"c1": [2.0, 0.0]}, ["c1"])
        >>> s.values["c1"].tolist(), s.dead["c1"].tolist()
        ([2.0, 1.0], [1])
    """
    values: dict[str, F64] = {}
    dead: dict[str, npt.NDArray[np.int64]] = {}
    for name in layers:
        if name not in means:
            raise ValueError(f"no statistics for conv layer {name!r}")
        m = np.asarray(means[name], dtype=np.float64)
        if m.ndim != 1:
            raise ValueError(f"means of {name!r} must be 1-D, got shape {m.shape}")
        if not np.all(np.isfinite(m)) or np.any(m < 0):
            raise ValueError(f"means of {name!r} hold negative, NaN or infinite values")
        is_dead = m <= dead_threshold
        values[name] = np.where(is_dead, 1.0, m)
        dead[name] = np.flatnonzero(is_dead).astype(np.int64)
    return Scales(tuple(layers), values, dead)


def _checked(weights: Mapping[str, np.ndarray], key: str, ndim: int) -> np.ndarray:
    if key not in weights:
        raise ValueError(f"weights have no {key!r}")
    w = weights[key]
    if w.ndim != ndim:
        raise ValueError(f"{key} must be {ndim}-D, got shape {w.shape}")
    return w


def rescale(
    weights: Mapping[str, np.ndarray],
    scales: Scales,
    head_dense: str | None = None,
    head_reduce: Reduce | None = None,
    *,
    norms: Mapping[str, str] | None = None,
    flatten_order: FlattenOrder = "hwc",
    inverse: bool = False,
) -> dict[str, np.ndarray]:
    """Divide each conv's filters by their scale and compensate the next consumer.

    Args:
        weights: ``"<layer>/kernel"`` and ``"<layer>/bias"`` arrays; not modified.
        scales: from :func:`compute_scales`; ``scales.layers`` is the conv chain in order.
        head_dense: the first Dense after the last conv, whose input rows are compensated.
        head_reduce: how the head reads the last conv map: ``"flatten"`` or ``"gap"``/``"gmp"``
            (row ``c`` gets scale ``c``).
        norms: conv -> the BatchNormalization between it and its ReLU. BN in inference is
            ``gamma * (z - moving_mean) / sqrt(moving_variance + eps) + beta``; dividing z,
            ``moving_mean`` and ``beta`` by s divides its output by s, so gamma and the variance
            stay.
        flatten_order: the order Flatten reads the last map in: ``"hwc"`` (Keras, channels last:
            row ``p*C + c`` reads channel c) or ``"chw"`` (PyTorch: row ``c*H*W + p``).
        inverse: undo a previous rescale with the same scales.

    Returns:
        A new dict with the same keys; changed arrays are new, computed in float64 and cast back
        to each array's dtype; untouched arrays are the caller's objects.

    Example:
        >>> w = {"c/kernel": np.ones((1, 1, 1, 2)), "c/bias": np.zeros(2)}
        >>> s = compute_scales({"c": [2.0, 4.0]}, ["c"])
        >>> rescale(w, s)["c/kernel"].ravel().tolist()
        [0.5, 0.25]
    """
    if (head_dense is None) != (head_reduce is None):
        raise ValueError("head_dense and head_reduce go together")
    out = dict(weights)
    power = -1.0 if inverse else 1.0
    prev: F64 | None = None
    for name in scales.layers:
        s = scales.values[name] ** power
        out.update(_conv_rescaled(weights, name, s, prev, (norms or {}).get(name)))
        prev = s
    if head_dense is not None and prev is not None:
        out[f"{head_dense}/kernel"] = _head_compensated(
            weights, head_dense, prev, head_reduce, flatten_order
        )
    return out


def _divided(weights: Mapping[str, np.ndarray], key: str, s: F64) -> np.ndarray:
    """A 1-D array divided by the scales in float64, cast back to its dtype."""
    w = _checked(weights, key, 1)
    return (w.astype(np.float64) / s).astype(w.dtype)


def _conv_rescaled(
    weights: Mapping[str, np.ndarray], name: str, s: F64, prev: F64 | None, norm: str | None
) -> dict[str, np.ndarray]:
    """Conv ``name``'s new arrays: filters divided by ``s``, input channels multiplied by the
    previous conv's ``prev``, and its BatchNorm's ``beta``/``moving_mean`` divided by ``s``."""
    kernel = _checked(weights, f"{name}/kernel", 4)
    if kernel.shape[3] != s.shape[0]:
        raise ValueError(f"{name}: {kernel.shape[3]} filters but {s.shape[0]} scales")
    k = kernel.astype(np.float64)
    if prev is not None:
        if kernel.shape[2] != prev.shape[0]:
            raise ValueError(
                f"{name}: {kernel.shape[2]} input channels but the previous conv has "
                f"{prev.shape[0]} filters; the convs are not a chain"
            )
        k = k * prev[None, None, :, None]
    out = {f"{name}/kernel": (k / s[None, None, None, :]).astype(kernel.dtype)}
    keys = [f"{name}/bias"] + ([f"{norm}/beta", f"{norm}/moving_mean"] if norm else [])
    out.update({key: _divided(weights, key, s) for key in keys if key in weights})
    return out


def _head_compensated(
    weights: Mapping[str, np.ndarray], dense: str, s_last: F64, reduce: Reduce | None,
    order: FlattenOrder,
) -> np.ndarray:  # fmt: skip
    """The first Dense's kernel with its input rows multiplied by the last conv's scales."""
    kernel = _checked(weights, f"{dense}/kernel", 2)
    rows, channels = kernel.shape[0], s_last.shape[0]
    if rows % channels:
        raise ValueError(
            f"{dense}: {rows} input rows is not a multiple of the last conv's {channels} filters"
        )
    if reduce != "flatten" and rows != channels:
        raise ValueError(f"{dense}: {rows} input rows after global pooling, expected {channels}")
    row_scale = flatten_row_scale(s_last, rows, order)
    return (kernel.astype(np.float64) * row_scale[:, None]).astype(kernel.dtype)


def flatten_row_scale(channel_scale: npt.ArrayLike, rows: int, order: FlattenOrder = "hwc") -> F64:
    """The scale of each input row of the Dense after Flatten (or global pooling: ``rows = C``).

    Args:
        channel_scale: the last conv's per-filter scales (length C).
        rows: the Dense's input rows (C * H * W).
        order: ``"hwc"`` (Keras: row ``p*C + c`` reads channel c, ``np.tile``) or ``"chw"``
            (PyTorch: row ``c*H*W + p`` reads channel c, ``np.repeat``).

    Raises:
        ValueError: ``rows`` is not a multiple of C, or an unknown order.

    Example:
        >>> flatten_row_scale(np.array([1.0, 2.0]), 4).tolist()
        [1.0, 2.0, 1.0, 2.0]
        >>> flatten_row_scale(np.array([1.0, 2.0]), 4, "chw").tolist()
        [1.0, 1.0, 2.0, 2.0]
    """
    m = np.asarray(channel_scale, dtype=np.float64).ravel()
    if m.size == 0 or rows % m.size:
        raise ValueError(f"{rows} rows is not a multiple of {m.size} channels")
    if order == "hwc":
        return np.tile(m, rows // m.size)
    if order == "chw":
        return np.repeat(m, rows // m.size)
    raise ValueError(f"unknown flatten order {order!r}; expected 'hwc' or 'chw'")
