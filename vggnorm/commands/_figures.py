"""The figures of ``vggnorm report`` and ``vggnorm verify --plot`` (matplotlib, the ``plot``
extra). The numbers they show come from :mod:`vggnorm.commands.report` and :mod:`vggnorm.core.verdicts`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.losses import F64, format_number, shrink_text
from ..core.precision import NEAR_DEAD_FRACTION, LayerPrecision
from ..core.rescale import DEAD_THRESHOLD, compute_scales
from ..core.statsrecord import StatsRecord
from ..formats.outputs import atomic_path


def need_matplotlib(what: str) -> None:
    """Fail before any work when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{what} needs matplotlib: pip install 'vggnorm[plot]'") from e


def draw_report(
    record: StatsRecord,
    summary: Mapping[str, Any],
    out_png: str | os.PathLike[str],
    *,
    style: Mapping[str, Any] | None = None,
    dead_threshold: float = DEAD_THRESHOLD,
) -> None:
    """Draw the normalization figure (PNG, atomic): per conv layer, the distribution of
    per-filter mean activations before normalization (box and points, log scale) and after (every
    live filter at 1), with dead and near-dead filters counted; with ``style`` a second row shows
    the per-layer style and content losses before and after, with the spread factors."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the report figure needs matplotlib: pip install 'vggnorm[plot]'") from e

    table = record.precision()
    names = [s.name for s in record.layers]
    rows = 1 + (table is not None) + (style is not None)
    fig = Figure(figsize=(max(12.0, 0.75 * len(names) * 1.5 + 4), 5.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, 1)
    _means_row(fig, grid[0], record, summary, dead_threshold)
    fig.suptitle(
        f"{record.meta.model}: per-filter mean activations over {record.n_images} images "
        f"({record.meta.size}x{record.meta.size}, {record.meta.preprocess})"
    )
    if table is not None:
        _precision_panel(fig.add_subplot(grid[1]), table, record.n_images)
    if style is not None:
        bottom = grid[rows - 1].subgridspec(1, 2)
        _loss_panel(fig.add_subplot(bottom[0, 0]), style, "style", "Gram-matrix style loss")
        _loss_panel(fig.add_subplot(bottom[0, 1]), style, "content", "content loss (feature L2)")
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _means_row(
    fig: Any, cell: Any, record: StatsRecord, summary: Mapping[str, Any], dead_threshold: float
) -> None:
    """Per-filter means before normalization and after (every live filter at 1)."""
    means = record.means()
    names = [s.name for s in record.layers]
    scales = compute_scales(means, names, dead_threshold)
    top = cell.subgridspec(1, 2, width_ratios=(3, 2))
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
    ax_after.legend(handles=_means_legend(dead_threshold), loc="lower center", fontsize=8)
    ax_after.axhline(1.0, color="0.5", lw=0.8, ls="--", zorder=0)
    ax_after.tick_params(labelleft=False)


def _precision_panel(ax: Any, table: Sequence[LayerPrecision], images: int) -> None:
    """Per layer, the relative half-width of the 95% interval of the live filters' means."""
    x = np.arange(len(table))
    for key, label, marker in (("median", "median filter", "o"), ("p99", "99th percentile", "s"),
                               ("worst", "worst filter", "^")):  # fmt: skip
        y = np.array([getattr(p, key) for p in table], dtype=np.float64) * 100
        ok = np.isfinite(y) & (y > 0)
        ax.plot(x[ok], y[ok], marker=marker, lw=1.0, ms=4, label=label)
    ax.set_yscale("log")
    ax.set_xticks(x, [p.name for p in table], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("95% interval half-width, % of the mean (log)")
    ax.set_title(f"how precisely {images} images estimate each filter's mean on the image "
                 "distribution (live filters; dead and near-dead left out)", fontsize=10)  # fmt: skip
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _means_legend(dead_threshold: float) -> list[Any]:
    from matplotlib.lines import Line2D

    near = f"near-dead (mean < {NEAR_DEAD_FRACTION:g} x layer median)"
    dead = (f"red, at the top: counts of dead filters\n(mean <= {dead_threshold:g}, off the log "
            "axis) and near-dead ones")  # fmt: skip
    return [
        Line2D([], [], ls="none", marker="o", ms=4, color="#08519c", label="live filter"),
        Line2D([], [], ls="none", marker="o", ms=4, color="#e6550d", label=near),
        Line2D([], [], ls="none", label=dead),
    ]


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
    shrink = shrink_text(s["factor"])
    ax.set_title(
        f"{label} per layer\nspread across layers (max/min): {format_number(s['spread_before'])} before, "
        f"{format_number(s['spread_after'])} after: {shrink}",
        fontsize=10,
    )
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=8)


def write_verify_figure(report: Any, out_png: str | Path) -> None:
    """The per-layer table of a :class:`vggnorm.core.verdicts.VerifyReport` as a figure (PNG, atomic):
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
