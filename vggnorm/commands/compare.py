"""``vggnorm compare``: is one weight file a per-filter positive rescaling of another? The math is
:mod:`vggnorm.core.compare`; this module reads the files, names their layers alike and sets the
recovered scales against a stats file's means."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..core.archs import ARCHS, FlattenOrder
from ..core.compare import CompareReport, compare_weights, compare_with_means, scales_in_intervals
from ..core.errors import ArchitectureError, StatsError
from ..core.losses import format_number
from ..core.precision import filter_precision
from ..core.scaling import check_fingerprint
from ..core.statsrecord import stats_by_conv
from ..core.topology import Loaded, stock_named
from ..formats.registry import load
from ..formats.statsfile import read_stats


@dataclass(frozen=True)
class CompareResult:
    """The comparison of two files and, with a stats file, the scales against its means.

    Attributes:
        original, other: the two files.
        report: the per-layer comparison; ``report.is_rescaling`` is the verdict.
        means: per layer, the implied scales against the stats' means (median ratio, its
            interquartile range, correlation of logs); empty without stats.
        stats_matches_original: whether the stats were gathered on ``original``; None without.
    """

    original: str
    other: str
    report: CompareReport
    means: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats_matches_original: bool | None = None

    @property
    def is_rescaling(self) -> bool:
        return self.report.is_rescaling

    def summary(self) -> list[str]:
        lines = self.report.table().splitlines()
        for name, row in self.means.items():
            num = {k: format_number(v, 4) for k, v in row.items() if not isinstance(v, bool)}
            within = (f"  in the 95% interval: {row['within']}/{row['live']}, median |z| "
                      f"{num.get('median_z', 'n/a')}" if "within" in row else "")  # fmt: skip
            lines.append(f"{name:<16} scale/mean median {num['median_ratio']}  IQR "
                         f"{num['iqr_ratio']}  corr(log) {num['log_correlation']}{within}")  # fmt: skip
        if self.stats_matches_original is False:
            lines.append("note: the stats were not gathered on ORIGINAL (fingerprints differ)")
        verdict = "is" if self.is_rescaling else "is NOT"
        return [*lines, f"{self.other} {verdict} a per-filter positive rescaling of {self.original}"]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"original": self.original, "other": self.other,
                               "report": self.report.to_dict(), "table": self.report.table()}  # fmt: skip
        if self.stats_matches_original is not None:
            out["means"] = self.means
            out["stats_matches_original"] = self.stats_matches_original
        return out


def compare_files(
    original: str | os.PathLike[str],
    other: str | os.PathLike[str],
    stats: str | os.PathLike[str] | None = None,
) -> CompareResult:
    """``vggnorm compare``: is ``other`` a per-filter positive rescaling of ``original``?

    Any two supported files (Keras or PyTorch, any layout) of the same stock VGG, or two files of
    one fine-tuned architecture with the same layer names. With ``stats`` (gathered on
    ``original``), the implied scales are set against the stats' means.

    Raises:
        ArchitectureError: the files hold different architectures.
        StatsError: an unreadable or unfinished stats file.

    Example:
        >>> compare_files("vgg19.h5", "vgg_normalised.pth").is_rescaling  # doctest: +SKIP
        True
    """
    a, b = load(original), load(other)
    if (a.bound.stock or a.bound.arch.name) != (b.bound.stock or b.bound.arch.name):
        raise ArchitectureError(
            f"{original} is a {a.bound.stock or a.bound.arch.name}, {other} a "
            f"{b.bound.stock or b.bound.arch.name}"
        )
    wa, wb, convs, dense, flatten = _aligned(a, b)
    try:
        report = compare_weights(wa, wb, convs, dense, flatten, norms=a.bound.arch.norms)
    except ValueError as e:  # shapes that differ or do not chain
        raise ArchitectureError(f"{original} and {other} are not the same network: {e}") from e
    result = CompareResult(str(original), str(other), report)
    if stats is None:
        return result
    record = read_stats(stats)
    try:
        check_fingerprint(a, record)
        matches = True
    except StatsError:
        matches = False
    matched = stats_by_conv(record, [(c, wa[f"{c}/kernel"].shape[3]) for c in convs])
    vs = compare_with_means(report.scales, {c: s.mean for c, s in matched.items()})
    means = {k: asdict(v) for k, v in vs.items()}
    precision = {c: fp for c, s in matched.items() if (fp := filter_precision(s)) is not None}
    for name, agreement in scales_in_intervals(report.scales, precision).items():
        means[name].update(asdict(agreement))
    return CompareResult(str(original), str(other), report, means, matches)


def _aligned(a: Loaded, b: Loaded) -> tuple[
    dict[str, np.ndarray], dict[str, np.ndarray], tuple[str, ...], str | None,
    tuple[FlattenOrder, int] | None,
]:  # fmt: skip
    """Both files' arrays under one set of layer names (Keras's for stock VGGs, which then
    flatten in PyTorch's order), the conv chain, the first Dense and the flatten order."""
    stock = a.bound.stock is not None and a.bound.stock == b.bound.stock
    if stock:
        wa, wb = stock_named(a), stock_named(b)
        convs = ARCHS[a.bound.stock].conv_names  # type: ignore[index]
    else:
        wa, wb, convs = dict(a.arrays), dict(b.arrays), a.bound.arch.conv_names
    head_a = a.bound.arch.head
    if head_a is None or not head_a.dense or b.bound.arch.head is None:  # compare the convs
        keep = {*convs, *a.bound.arch.norms.values()}  # and the BatchNorms after them
        wa = {k: v for k, v in wa.items() if k.rsplit("/", 1)[0] in keep}
        wb = {k: v for k, v in wb.items() if k.rsplit("/", 1)[0] in keep}
        return wa, wb, convs, None, None
    dense = "fc1" if stock else head_a.dense[0].name
    rows = wa[f"{dense}/kernel"].shape[0]
    last = wa[f"{convs[-1]}/kernel"].shape[3]
    order: FlattenOrder = "chw" if stock else head_a.flatten_order
    flatten = (order, rows // last) if head_a.reduce == "flatten" else None
    return wa, wb, convs, dense, flatten
