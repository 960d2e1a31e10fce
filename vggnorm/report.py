"""``vggnorm report``: show how unequal VGG's layers were and how equal normalization makes them.

Three pieces, each usable alone:

* :func:`layer_summary`: per conv layer, the distribution of per-filter mean activations and the
  dead and near-dead filters, from a stats record. Pure numpy.
* :func:`style_loss`, :func:`content_loss`, :func:`loss_magnitudes`, :func:`spread`: the per-layer
  style (Gram matrix) and content losses of Gatys et al. between two images' activations, and
  how far apart the layers' magnitudes are. Pure numpy, so they test without Keras.
  :func:`style_content_spread` runs the original and normalized networks on a pair of images and
  compares the spreads before and after normalization.
* :func:`write_report`: a PNG figure (matplotlib, the ``plot`` extra) and a JSON summary.

Why the spread shrinks: scaling a layer's features by ``s`` scales its content loss by ``s**2``
and its Gram-matrix style loss by ``s**4``. VGG16's per-filter means range over orders of
magnitude between layers, so unnormalized style losses differ by many more orders; with every
filter's mean at 1, the layers' losses become comparable, which is why Gatys et al. normalize.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .atomic import atomic_path, check_output, output_lock
from .errors import DatasetError, StatsError, VerificationError
from .pipeline import FUNCTION_TOL, function_errors
from .rescale import DEAD_THRESHOLD, Scales, rescale
from .statsfile import StatsRecord

if TYPE_CHECKING:
    import os

    from .archs import Arch

F64 = npt.NDArray[np.float64]

#: A live filter whose mean is below this fraction of its layer's median mean is "near-dead".
NEAR_DEAD_FRACTION = 1e-3

# ---------------------------------------------------------------------------------------------
# Per-layer statistics


def layer_summary(
    record: StatsRecord, dead_threshold: float = DEAD_THRESHOLD
) -> list[dict[str, Any]]:
    """Per conv layer: filters, dead and near-dead filters, and the spread of the filter means.

    Args:
        record: statistics (complete or not; every layer must have counted something).
        dead_threshold: a filter whose mean is at or below this is dead (as in ``apply``).

    Returns:
        One dict per conv layer in network order: ``name``, ``filters``, ``dead`` and
        ``near_dead`` (counts), ``dead_filters`` and ``near_dead_filters`` (indices),
        ``mean_min``, ``mean_median``, ``mean_max`` (over all filters) and ``live_min`` (the
        smallest live mean, None if every filter is dead). A near-dead filter is live with a mean
        below ``NEAR_DEAD_FRACTION`` x the layer's median mean; dead filters are not counted again.

    Raises:
        StatsError: a layer has no activation counted.

    Example:
        >>> layer_summary(record)[0]["dead"]  # doctest: +SKIP
        0
    """
    out = []
    for s in record.layers:
        if s.count == 0:
            raise StatsError(f"stats layer {s.name} counted no activation")
        m = s.mean
        median = float(np.median(m))
        dead = m <= dead_threshold
        near = ~dead & (m < NEAR_DEAD_FRACTION * median)
        live = m[~dead]
        out.append(
            {
                "name": s.name,
                "filters": s.channels,
                "dead": int(dead.sum()),
                "near_dead": int(near.sum()),
                "dead_filters": np.flatnonzero(dead).tolist(),
                "near_dead_filters": np.flatnonzero(near).tolist(),
                "mean_min": float(m.min()),
                "mean_median": median,
                "mean_max": float(m.max()),
                "live_min": float(live.min()) if live.size else None,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# Loss magnitudes (Gatys et al., "A Neural Algorithm of Artistic Style", eqs. 1, 3 and 4)


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
    """Per-layer losses before/after and the spreads; the shape :func:`write_report` reads."""
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


def style_content_spread(
    arch: Arch,
    arrays: Mapping[str, np.ndarray],
    norm_arrays: Mapping[str, np.ndarray] | None,
    scales: Scales,
    images_uint8: npt.NDArray[np.uint8],
    preprocess: str = "caffe",
) -> dict[str, Any]:
    """Per-layer style and content losses between two images, before and after normalization.

    Args:
        arch: the conv chain (a head is ignored).
        arrays: the original weights, keyed ``"<layer>/kernel"``/``"<layer>/bias"``.
        norm_arrays: the normalized weights under the same keys, e.g. read from ``apply``'s
            output; None computes them with :func:`vggnorm.rescale.rescale`.
        scales: the per-filter scales of the normalization (from the stats file). They tie the
            two weight sets together: the normalized activations times the scales must give the
            original activations.
        images_uint8: the pair of images, ``(2, size, size, 3)`` uint8 RGB.
        preprocess: ``caffe``, ``unit`` or ``torch``, as the stats were gathered.

    Returns:
        :func:`spread_table`'s dict (``layers`` with ``style_before``/``after`` and
        ``content_before``/``after``; ``style`` and ``content`` with ``spread_before``,
        ``spread_after`` and ``factor`` = before / after), plus ``function_rel_err`` (worst layer
        of ``max |a_norm * s - a| / max |a|``), ``size`` and ``preprocess``.

    Raises:
        ValueError: not a pair of square uint8 RGB images.
        VerificationError: ``norm_arrays`` is not ``arrays`` normalized with ``scales``.

    Example:
        >>> r = style_content_spread(arch, ws.arrays, None, scales, pair)  # doctest: +SKIP
        >>> r["style"]["factor"]  # doctest: +SKIP
        3.1e+07
    """
    from .model import FeatureNet, Preprocess

    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.shape[0] != 2 or images.shape[3] != 3:
        raise ValueError(f"expected a pair of RGB images (2, size, size, 3), got {images.shape}")
    if images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        raise ValueError(f"images must be square uint8, got {images.shape} {images.dtype}")
    size = int(images.shape[1])
    features = arch.without_head()
    if norm_arrays is None:
        norm_arrays = rescale(arrays, scales, norms=features.norms)  # the convs: no head here
    scheme: Preprocess = preprocess  # type: ignore[assignment]
    orig = FeatureNet(features, arrays, size, scheme, outputs="activations").activations(images)
    norm = FeatureNet(features, norm_arrays, size, scheme, outputs="activations").activations(
        images
    )
    names = features.conv_names
    worst = max(function_errors(orig, norm, [scales.values[n] for n in names]))
    if worst > FUNCTION_TOL:
        raise VerificationError(
            f"the normalized weights times the scales differ from the original activations by "
            f"{worst:.3g} of a layer's largest activation: they are not this model normalized "
            "with these statistics"
        )
    before = loss_magnitudes(
        {n: a[0] for n, a in zip(names, orig)}, {n: a[1] for n, a in zip(names, orig)}
    )
    after = loss_magnitudes(
        {n: a[0] for n, a in zip(names, norm)}, {n: a[1] for n, a in zip(names, norm)}
    )
    table = spread_table(before, after)
    table.update(function_rel_err=worst, size=size, preprocess=preprocess)
    return table


# ---------------------------------------------------------------------------------------------
# Output


def _finite(x: Any) -> Any:
    """JSON has no inf/NaN: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def report_dict(
    record: StatsRecord,
    *,
    style: Mapping[str, Any] | None = None,
    dead_threshold: float = DEAD_THRESHOLD,
) -> dict[str, Any]:
    """The JSON summary :func:`write_report` writes (non-finite numbers as None)."""
    from . import __version__

    m = record.meta
    out: dict[str, Any] = _finite(
        {
            "format": "vggnorm-report",
            "tool_version": __version__,
            "model": m.model,
            "fingerprint": m.fingerprint,
            "images": record.n_images,
            "size": m.size,
            "preprocess": m.preprocess,
            "precision": m.precision,
            "dataset": m.dataset_path,
            "complete": m.complete,
            "dead_threshold": dead_threshold,
            "near_dead_fraction": NEAR_DEAD_FRACTION,
            "layers": layer_summary(record, dead_threshold),
            "style": dict(style) if style is not None else None,
        }
    )
    return out


def summary_text(report: Mapping[str, Any]) -> list[str]:
    """Human-readable lines of a :func:`report_dict` (for the console)."""
    lines = [
        f"{r['name']:<16} filters {r['filters']:>4}  mean min {r['mean_min']:.3g}  "
        f"median {r['mean_median']:.3g}  max {r['mean_max']:.3g}  "
        f"dead {r['dead']}  near-dead {r['near_dead']}"
        for r in report["layers"]
    ]
    style = report.get("style")
    if style:
        for kind in ("style", "content"):
            s = style[kind]
            lines.append(
                f"{kind} loss spread across layers (max/min): {format_number(s['spread_before'])} before, "
                f"{format_number(s['spread_after'])} after: {shrink_text(s['factor'])}"
            )
    return lines


def format_number(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def shrink_text(factor: float | None) -> str:
    if factor is None or not math.isfinite(factor):
        return "factor undefined (a layer's loss is 0)"
    return f"{factor:.3g}x smaller" if factor >= 1 else f"{1 / factor:.3g}x larger"


def write_report(
    record: StatsRecord,
    out_png: str | os.PathLike[str],
    out_json: str | os.PathLike[str] | None = None,
    *,
    style: Mapping[str, Any] | None = None,
    dead_threshold: float = DEAD_THRESHOLD,
    force: bool = True,
) -> dict[str, Any]:
    """Write the normalization figure (PNG, see :func:`vggnorm.report_plot.draw_report`) and its
    numbers (JSON, :func:`report_dict`), each atomically, each under its own lock.

    Args:
        record: the statistics.
        out_png: the figure; ``out_json`` defaults to it with a ``.json`` suffix.
        style: the result of :func:`style_content_spread`, or None.
        dead_threshold: as in ``apply``.
        force: overwrite existing outputs.

    Returns:
        The JSON summary (:func:`report_dict`).

    Raises:
        ImportError: matplotlib is not installed (``pip install 'vggnorm[plot]'``).
        StatsError: a layer has no activation counted.
        OutputError: an output exists (without ``force``) or cannot be written.
    """
    from .report_plot import draw_report, need_matplotlib

    png = Path(out_png)
    js = Path(out_json) if out_json is not None else png.with_suffix(".json")
    need_matplotlib("the report figure")
    with output_lock(png), output_lock(js):
        for path in (png, js):
            check_output(path, force=force)
        summary = report_dict(record, style=style, dead_threshold=dead_threshold)
        draw_report(record, summary, png, style=style, dead_threshold=dead_threshold)
        with atomic_path(js) as tmp:
            tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf8")
    return summary


def loss_spread_for(
    weights: str | os.PathLike[str],
    record: StatsRecord,
    *,
    images: Sequence[str | os.PathLike[str]] | None = None,
    normalized: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """:func:`style_content_spread` for a weight file and its stats: the first two stats images
    (or ``images``), the normalized file's weights (or the rescaling computed in memory).

    Raises:
        StatsError: stats of another model; DatasetError: fewer than two images.
    """
    from .data import load_image
    from .pipeline import (
        check_fingerprint,
        decode_of,
        load,
        named_as,
        scales_for,
        with_padding,
    )

    loaded = with_padding(load(weights), record.meta.padding)
    check_fingerprint(loaded, record, "--weights")
    paths = [Path(p) for p in images] if images else [
        Path(record.meta.dataset_root) / item for item in record.images[:2]
    ]  # fmt: skip
    if len(paths) < 2:
        raise DatasetError("the loss panel needs two images; pass --images A B")
    pair = np.stack([load_image(p, decode_of(record.meta)) for p in paths])
    norm = named_as(load(normalized), loaded) if normalized else None
    return style_content_spread(
        loaded.bound.arch, loaded.arrays, norm, scales_for(record, loaded.bound), pair,
        record.meta.preprocess,
    )  # fmt: skip
