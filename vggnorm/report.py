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

from .atomic import atomic_path
from .errors import StatsError, VerificationError
from .rescale import DEAD_THRESHOLD, Scales, compute_scales, rescale
from .statsfile import StatsRecord

if TYPE_CHECKING:
    import os

    from .archs import Arch

F64 = npt.NDArray[np.float64]

#: A live filter whose mean is below this fraction of its layer's median mean is "near-dead".
NEAR_DEAD_FRACTION = 1e-3

#: The normalized network's activations times the scales must reproduce the original's to this
#: fraction of each layer's largest activation, or the two weight sets do not belong together.
FUNCTION_TOL = 1e-3


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
    d = a.T @ a - b.T @ b
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
        norm_arrays = rescale(arrays, scales)
    scheme: Preprocess = preprocess  # type: ignore[assignment]
    orig = FeatureNet(features, arrays, size, scheme, outputs="activations").activations(images)
    norm = FeatureNet(features, norm_arrays, size, scheme, outputs="activations").activations(
        images
    )
    names = features.conv_names
    worst = 0.0
    for name, a, b in zip(names, orig, norm):
        s = scales.values[name]
        err = float(np.max(np.abs(b.astype(np.float64) * s - a)))
        worst = max(worst, err / max(float(np.max(np.abs(a))), 1e-30))
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
                f"{kind} loss spread across layers (max/min): {_g(s['spread_before'])} before, "
                f"{_g(s['spread_after'])} after: {_shrink(s['factor'])}"
            )
    return lines


def _g(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _shrink(factor: float | None) -> str:
    if factor is None or not math.isfinite(factor):
        return "factor undefined (a layer's loss is 0)"
    return f"{factor:.3g}x smaller" if factor >= 1 else f"{1 / factor:.3g}x larger"


def write_report(
    record: StatsRecord,
    out_png: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    *,
    style: Mapping[str, Any] | None = None,
    dead_threshold: float = DEAD_THRESHOLD,
) -> dict[str, Any]:
    """Write the normalization figure (PNG) and its numbers (JSON), each atomically.

    The figure shows, per conv layer, the distribution of per-filter mean activations before
    normalization (box and points, log scale) and after (every live filter at 1), with dead and
    near-dead filters counted; with ``style`` (from :func:`style_content_spread`) a second row
    shows the per-layer style and content losses before and after, with the spread factors.

    Args:
        record: the statistics.
        out_png, out_json: output paths (overwritten).
        style: the result of :func:`style_content_spread`, or None.
        dead_threshold: as in ``apply``.

    Returns:
        The JSON summary (:func:`report_dict`).

    Raises:
        ImportError: matplotlib is not installed (``pip install 'vggnorm[plot]'``).
        StatsError: a layer has no activation counted.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise ImportError("the report figure needs matplotlib: pip install 'vggnorm[plot]'") from e

    summary = report_dict(record, style=style, dead_threshold=dead_threshold)
    means = record.means()
    scales = compute_scales(means, [s.name for s in record.layers], dead_threshold)
    names = [s.name for s in record.layers]
    rows = 2 if style is not None else 1
    fig = Figure(figsize=(max(12.0, 0.75 * len(names) * 1.5 + 4), 5.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, 1)
    top = grid[0].subgridspec(1, 2, width_ratios=(3, 2))
    ax_before = fig.add_subplot(top[0, 0])
    ax_after = fig.add_subplot(top[0, 1], sharey=ax_before)
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    after = {n: means[n] / scales.values[n] for n in names}
    for ax, values, title in (
        (ax_before, means, "before: per-filter mean activation"),
        (ax_after, after, "after normalization: mean / scale"),
    ):
        _means_panel(ax, names, values, summary["layers"], dead_threshold, rng)
        ax.set_title(title)
    ax_before.set_ylabel("mean activation over images and positions (log)")
    live = np.concatenate([means[n][means[n] > dead_threshold] for n in names] + [np.ones(1)])
    # Head room above the data for the dead/near-dead counts.
    # Room below 1 too: the legend goes under the "after" panel's line at 1.
    ax_before.set_ylim(min(float(live.min()), 1e-2) / 3, float(live.max()) * 40)
    # Every live filter sits at 1 after normalization: the space below is free for the legend.
    ax_after.legend(
        handles=[
            Line2D([], [], ls="none", marker="o", ms=4, color="#08519c", label="live filter"),
            Line2D(
                [],
                [],
                ls="none",
                marker="o",
                ms=4,
                color="#e6550d",
                label=f"near-dead (mean < {NEAR_DEAD_FRACTION:g} x layer median)",
            ),
            Line2D(
                [],
                [],
                ls="none",
                label=f"red, at the top: counts of dead filters\n(mean <= {dead_threshold:g}, "
                "off the log axis) and near-dead ones",
            ),
        ],
        loc="lower center",
        fontsize=8,
    )
    ax_after.axhline(1.0, color="0.5", lw=0.8, ls="--", zorder=0)
    ax_after.tick_params(labelleft=False)
    fig.suptitle(
        f"{record.meta.model}: per-filter mean activations over {record.n_images} images "
        f"({record.meta.size}x{record.meta.size}, {record.meta.preprocess})"
    )
    if style is not None:
        bottom = grid[1].subgridspec(1, 2)
        _loss_panel(fig.add_subplot(bottom[0, 0]), style, "style", "Gram-matrix style loss")
        _loss_panel(fig.add_subplot(bottom[0, 1]), style, "content", "content loss (feature L2)")
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    with atomic_path(Path(out_json)) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf8")
    return summary


def _means_panel(
    ax: Any,
    names: Sequence[str],
    values: Mapping[str, F64],
    summary: Sequence[Mapping[str, Any]],
    dead_threshold: float,
    rng: np.random.Generator,
) -> None:
    positions = np.arange(1, len(names) + 1)
    live = [values[n][values[n] > dead_threshold] for n in names]
    filled = [(p, v) for p, v in zip(positions, live) if v.size]
    if filled:
        ax.boxplot(
            [v for _, v in filled],
            positions=[p for p, _ in filled],
            widths=0.6,
            whis=(0, 100),  # whiskers to min and max: every live filter is inside them
            showfliers=False,
            patch_artist=True,
            boxprops={"facecolor": "#c6dbef", "edgecolor": "#2b5d8a"},
            medianprops={"color": "#08306b", "lw": 1.5},
            whiskerprops={"color": "#2b5d8a"},
            capprops={"color": "#2b5d8a"},
        )
    for p, v, n, row in zip(positions, live, names, summary):
        x = p + rng.uniform(-0.22, 0.22, v.size)
        near = np.zeros(v.size, dtype=bool)
        if row["near_dead"]:
            idx = np.flatnonzero(values[n] > dead_threshold)
            near = np.isin(idx, row["near_dead_filters"])
        ax.scatter(x[~near], v[~near], s=4, color="#08519c", alpha=0.35, lw=0, zorder=3)
        if near.any():
            ax.scatter(x[near], v[near], s=10, color="#e6550d", lw=0, zorder=4)
        notes = []
        if row["dead"]:
            notes.append(f"{row['dead']} dead")
        if row["near_dead"]:
            notes.append(f"{row['near_dead']} near")
        if notes:
            ax.annotate(
                "\n".join(notes),
                (p, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(0, -3),
                textcoords="offset points",
                ha="center",
                va="top",
                fontsize=7,
                color="#a50f15",
            )
    ax.set_yscale("log")
    ax.set_xticks(positions, names, rotation=60, ha="right", fontsize=8)
    ax.set_xlim(0.4, len(names) + 0.6)
    ax.grid(axis="y", which="major", alpha=0.3)


def _loss_panel(ax: Any, style: Mapping[str, Any], kind: str, label: str) -> None:
    rows = style["layers"]
    x = np.arange(len(rows))
    for when, color, marker in (("before", "#2b5d8a", "o"), ("after", "#e6550d", "s")):
        y = np.array([r[f"{kind}_{when}"] for r in rows], dtype=np.float64)
        ok = y > 0  # a zero loss (identical features) has no place on a log axis
        ax.plot(x[ok], y[ok], marker=marker, color=color, lw=1.2, ms=4, label=when)
    s = style[kind]
    ax.set_yscale("log")
    ax.set_xticks(x, [r["name"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"{kind} loss (log)")
    shrink = _shrink(s["factor"])
    ax.set_title(
        f"{label} per layer\nspread across layers (max/min): {_g(s['spread_before'])} before, "
        f"{_g(s['spread_after'])} after: {shrink}",
        fontsize=10,
    )
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=8)


def write_verify_figure(report: Any, out_png: str | Path) -> None:
    """The per-layer table of a :class:`vggnorm.verify.VerifyReport` as a figure (PNG, atomic):
    re-measured means after normalization (min/median/max of live filters, around 1) and the two
    errors against their tolerances, on a log axis."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the verify figure needs matplotlib: pip install 'vggnorm[plot]'") from e

    layers = report.layers
    names = [c.name for c in layers]
    x = np.arange(len(layers))
    fig = Figure(figsize=(max(8.0, 0.7 * len(layers) + 3), 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    med = np.array([c.mean_median for c in layers])
    lo = med - np.array([c.mean_min for c in layers])
    hi = np.array([c.mean_max for c in layers]) - med
    top.errorbar(x, med, yerr=[lo, hi], fmt="o", capsize=4, color="tab:blue",
                 label="live filters: median, min..max")  # fmt: skip
    top.axhline(1.0, color="grey", lw=0.8, ls="--")
    judged = "judged" if report.means_checked else "not judged (subset of the stats images)"
    top.set_title(
        f"re-measured mean activation after normalization, {report.means_images} of "
        f"{report.stats_images} stats images: {judged}"
    )
    top.set_ylabel("mean / 1")
    top.legend(loc="best")
    floor = 1e-12
    func = np.maximum([c.function_rel_err for c in layers], floor)
    means = np.maximum([c.means_err for c in layers], floor)
    bottom.semilogy(x, func, "o-", label="same function: max |a_norm*s - a| / max |a|")
    bottom.semilogy(x, means, "s-", label="means: max |mean-1| * s / median(s)")
    bottom.axhline(
        report.function_tol, color="tab:blue", ls=":", label=f"tolerance {report.function_tol:g}"
    )
    if report.means_tol != report.function_tol:
        bottom.axhline(
            report.means_tol,
            color="tab:orange",
            ls=":",
            label=f"means tolerance {report.means_tol:g}",
        )
    bottom.set_ylabel("error (log)")
    bottom.set_xticks(x, names, rotation=60, ha="right")
    verdict = "PASSED" if report.ok else "FAILED"
    bottom.set_title(f"errors per layer, against tolerances: {verdict}")
    bottom.legend(loc="best", fontsize="small")
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
