"""Gatys et al.'s per-layer losses and how far apart the layers' magnitudes are. Pure numpy.

Why normalization matters to them: scaling a layer's features by ``s`` scales its content loss by
``s**2`` and its Gram-matrix style loss by ``s**4``. VGG16's per-filter means range over orders of
magnitude between layers, so unnormalized style losses differ by many more orders; with every
filter's mean at 1, the layers' losses become comparable ("A Neural Algorithm of Artistic Style",
eqs. 1, 3 and 4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

def _flat(features: npt.ArrayLike) -> F64:
    """(positions, channels) in float64; every axis but the last is a position axis."""
    a = np.asarray(features, dtype=np.float64)
    if a.ndim < 2:
        raise ValueError(f"features must be (..., channels), got shape {a.shape}")
    return a.reshape(-1, a.shape[-1])


def gram(features: npt.ArrayLike) -> F64:
    """Gram matrix ``G = F F^T`` (channels x channels), F being channels x positions."""
    f = _flat(features)
    return f.T @ f


def _pair(fa: npt.ArrayLike, fb: npt.ArrayLike) -> tuple[F64, F64]:
    a, b = _flat(fa), _flat(fb)
    if a.shape != b.shape:
        raise ValueError(f"the two feature maps differ in shape: {a.shape} vs {b.shape}")
    return a, b


def style_loss(fa: npt.ArrayLike, fb: npt.ArrayLike) -> float:
    """Gatys's per-layer style loss ``E = 1/(4 N^2 M^2) sum (G_a - G_b)^2``.

    Args:
        fa, fb: one image's features each, ``(H, W, C)`` (any leading axes count as positions);
            N = C filters, M = H * W positions.

    Example:
        >>> style_loss([[[1.0, 0.0], [0.0, 2.0]]], [[[1.0, 1.0], [0.0, 0.0]]])
        0.171875
    """
    a, b = _pair(fa, fb)
    m, n = a.shape
    d = gram(a) - gram(b)
    return float(np.sum(d * d) / (4.0 * n * n * m * m))


def content_loss(fa: npt.ArrayLike, fb: npt.ArrayLike) -> float:
    """Gatys's per-layer content loss ``1/2 sum (F_a - F_b)^2``.

    Example:
        >>> content_loss([[[1.0, 0.0], [0.0, 2.0]]], [[[1.0, 1.0], [0.0, 0.0]]])
        2.5
    """
    a, b = _pair(fa, fb)
    d = a - b
    return float(0.5 * np.sum(d * d))


def loss_magnitudes(
    acts_a: Mapping[str, npt.ArrayLike], acts_b: Mapping[str, npt.ArrayLike]
) -> dict[str, dict[str, float]]:
    """Style and content loss between two images, per layer.

    Args:
        acts_a: per layer, image a's activations ``(H, W, C)`` under one network.
        acts_b: the same layers for image b under the same network.

    Returns:
        ``{layer: {"style": E_l, "content": C_l}}`` in ``acts_a``'s order.
    """
    if list(acts_a) != list(acts_b):
        raise ValueError("the two images' activations cover different layers")
    return {
        name: {
            "style": style_loss(acts_a[name], acts_b[name]),
            "content": content_loss(acts_a[name], acts_b[name]),
        }
        for name in acts_a
    }


def spread(values: Sequence[float]) -> float:
    """``max / min`` of positive per-layer magnitudes; ``inf`` if one is 0 (e.g. equal images)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or np.any(v < 0) or not np.all(np.isfinite(v)):
        raise ValueError("spread needs finite, non-negative values")
    lo, hi = float(v.min()), float(v.max())
    if lo == 0.0:
        return 0.0 if hi == 0.0 else math.inf
    return hi / lo


def _spreads(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    b, a = spread(before), spread(after)
    factor = b / a if a not in (0.0, math.inf) and b != math.inf else math.nan
    return {"spread_before": b, "spread_after": a, "factor": factor}


def spread_table(
    before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]]
) -> dict[str, Any]:
    """Per-layer losses before/after and the spreads; the shape
    :func:`vggnorm.commands.report.write_report` reads."""
    names = list(before)
    if list(after) != names:
        raise ValueError("before and after cover different layers")
    layers: list[dict[str, Any]] = [
        {
            "name": n,
            "style_before": before[n]["style"],
            "style_after": after[n]["style"],
            "content_before": before[n]["content"],
            "content_after": after[n]["content"],
        }
        for n in names
    ]
    return {
        "layers": layers,
        "style": _spreads([r["style_before"] for r in layers], [r["style_after"] for r in layers]),
        "content": _spreads(
            [r["content_before"] for r in layers], [r["content_after"] for r in layers]
        ),
    }


def finite(x: Any) -> Any:
    """JSON has no inf/NaN: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def format_number(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits; ``n/a`` for None, inf or NaN."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def shrink_text(factor: float | None) -> str:
    if factor is None or not math.isfinite(factor):
        return "factor undefined (a layer's loss is 0)"
    return f"{factor:.3g}x smaller" if factor >= 1 else f"{1 / factor:.3g}x larger"

