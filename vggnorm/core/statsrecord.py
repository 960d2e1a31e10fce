"""A statistics run as data: its settings (:class:`StatsMeta`), its per-layer sums and the images
it counted (:class:`StatsRecord`), and the rules a record must satisfy. Pure numpy; the file that
holds a record is :mod:`vggnorm.formats.statsfile`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from .errors import StatsError
from .inputs import Decode
from .precision import LayerPrecision, classify, precision_table
from .rescale import DEAD_THRESHOLD
from .stats import LayerStats, means


@dataclass(frozen=True)
class StatsMeta:
    """Everything needed to reproduce, check, resume, merge and verify a statistics run."""

    model: str
    fingerprint: str
    weights: str
    decode: Decode
    preprocess: str
    precision: str
    dataset_kind: str
    dataset_path: str
    dataset_root: str
    annotations: str | None
    dataset_items: int  # images found in the dataset before --limit/--shard
    selection_sha256: str  # of the ordered items this run covers
    selection_size: int
    # how the convs padded their inputs: zero (Keras, torchvision) or reflect (AdaIN)
    padding: str = "zero"
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    position: int = 0  # items of the selection consumed so far
    complete: bool = False
    tool_version: str = ""
    backend: str = ""
    created: str = ""
    updated: str = ""
    merged_from: tuple[str, ...] = field(default=())
    # the pooling the network ran with: max (VGG's own) or avg (Gatys et al.'s for synthesis)
    pooling: str = "max"
    # --target-error: stop at the first check point where the precision reaches it
    target_error: float | None = None
    target_quantile: float | None = None
    min_images: int | None = None
    target_reached: bool | None = None  # None: no target; else whether the run stopped on it
    # the batch the run measured with, and the peak memory estimated for it (bytes)
    batch_size: int | None = None
    peak_memory: int | None = None
    # the check points of a run (where a target may stop it): every this many items
    check_every: int | None = None

    @property
    def size(self) -> int:
        return self.decode.size

    def settings(self) -> dict[str, Any]:
        """What must agree for two runs to be resumed or merged."""
        ident = {"model": self.model, "fingerprint": self.fingerprint}
        rest = ("preprocess", "precision", "padding", "pooling", "dataset_kind")
        return {**ident, **asdict(self.decode), **{k: getattr(self, k) for k in rest}}

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready fields (the decode settings beside the others, as stats files store
        them)."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "decode"}
        return {**flat, **asdict(self.decode)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StatsMeta:
        """The inverse of :meth:`to_dict`; raises TypeError/KeyError on unknown or missing keys."""
        data = dict(raw)
        decode = Decode(**{f.name: data.pop(f.name) for f in fields(Decode)})
        data["shard"] = tuple(data.get("shard", (0, 1)))
        data["merged_from"] = tuple(data.get("merged_from", ()))
        return cls(decode=decode, **data)


@dataclass(frozen=True)
class StatsRecord:
    """A statistics run: settings, per-conv-layer sums in network order, images counted and
    skipped (item, reason, detail)."""

    meta: StatsMeta
    layers: tuple[LayerStats, ...]
    images: tuple[str, ...]
    skipped: tuple[tuple[str, str, str], ...] = ()
    # the stats file the record was read from or written to, if any (not part of its content)
    path: str | None = field(default=None, compare=False)

    @property
    def n_images(self) -> int:
        return len(self.images)

    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason, _ in self.skipped))

    def means(self) -> dict[str, np.ndarray]:
        return means(self.layers)

    def precision(self) -> list[LayerPrecision] | None:
        """Per layer, how precisely its filters' means are known (median, 99th percentile and
        worst relative 95% half-width over live filters); None for a version-1 stats file."""
        return precision_table(self.layers)

    def intervals(self) -> list[dict[str, Any]] | None:
        """:meth:`precision` as JSON-ready rows (what ``--json``, reports and verify carry)."""
        table = self.precision()
        return None if table is None else [p.to_dict() for p in table]

    def with_meta(self, **changes: Any) -> StatsRecord:
        return replace(self, meta=replace(self.meta, **changes))

    def summary(self) -> list[str]:
        """The lines ``vggnorm stats`` prints: images and skips, then one line per layer."""
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(self.skip_counts().items())) or "none"
        lines = [f"{self.meta.model}: {self.n_images} images counted, skipped: {skipped}"]
        lines += [summary_line(row) for row in layer_summary(self)]
        return lines + precision_lines(self)

    def to_dict(self) -> dict[str, Any]:
        """Settings, per-layer summary and skips, JSON-ready (the sums stay in the file)."""
        return {
            "meta": self.meta.to_dict(),
            "images": self.n_images,
            "skipped": self.skip_counts(),
            "layers": layer_summary(self),
            # per layer, the 95% interval half-widths of the filters' means (None: unknown)
            "intervals": self.intervals(),
        }


def precision_lines(record: StatsRecord) -> list[str]:
    """How precisely the means are known, per layer, and whether a target was reached."""
    table = record.precision()
    if table is None:
        return ["precision: unknown (a version-1 stats file keeps no per-image sums)"]
    lines = [f"precision of the means over {record.n_images} images: relative half-width of the "
             "95% interval over live filters (median, 99th percentile, worst)"]  # fmt: skip
    for p in table:
        apart = f"; {p.near_dead} near-dead left out" if p.near_dead else ""
        lines.append(f"  {p.name:<16} ±{p.median:.2%}  ±{p.p99:.2%}  ±{p.worst:.2%}{apart}")
    m = record.meta
    if m.target_error is not None:
        verdict = "reached" if m.target_reached else "NOT reached"
        lines.append(f"target ±{m.target_error:.3g} at quantile {m.target_quantile:g} of live "
                     f"filters: {verdict} with {record.n_images} images")  # fmt: skip
    return lines


def summary_line(row: Mapping[str, Any]) -> str:
    """One layer of :func:`layer_summary` as a line of text."""
    return (
        f"{row['name']:<16} filters {row['filters']:>4}  mean min {row['mean_min']:.4g}  "
        f"median {row['mean_median']:.4g}  max {row['mean_max']:.4g}  dead {row['dead']}  "
        f"near-dead {row['near_dead']}"
    )


def layer_summary(record: StatsRecord, dead_threshold: float = DEAD_THRESHOLD) -> list[dict[str, Any]]:
    """Per conv layer: filters, dead and near-dead filters, and the spread of the filter means.

    Args:
        record: statistics (complete or not; every layer must have counted something).
        dead_threshold: a filter whose mean is at or below this is dead (as in ``apply``).

    Returns:
        One dict per conv layer in network order: ``name``, ``filters``, ``dead`` and
        ``near_dead`` (counts), ``dead_filters`` and ``near_dead_filters`` (indices),
        ``mean_min``, ``mean_median``, ``mean_max`` (over all filters) and ``live_min`` (the
        smallest live mean, None if every filter is dead). Dead and near-dead as
        :func:`vggnorm.core.precision.classify` says (near-dead: live, below
        ``NEAR_DEAD_FRACTION`` x the live filters' median mean).

    Raises:
        StatsError: a layer has no activation counted.
    """
    return [_layer_row(s, dead_threshold) for s in record.layers]


def _layer_row(s: LayerStats, dead_threshold: float) -> dict[str, Any]:
    if s.count == 0:
        raise StatsError(f"stats layer {s.name} counted no activation")
    m = s.mean
    median = float(np.median(m))
    dead, near = classify(m, dead_threshold)
    live = m[~dead]
    return {
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


#: Relative slack for ``sum^2 <= count * sumsq`` (Cauchy-Schwarz): both sides are float64 sums of
#: up to ~1e12 terms whose rounding stays far below 1e-6 relative.
_CS_SLACK = 1e-6
#: Squares of values below sqrt(smallest normal float64) underflow, so sumsq can read 0 for them.
_TINY = float(np.sqrt(np.finfo(np.float64).tiny))


def validate(record: StatsRecord, where: str) -> None:
    """Refuse statistics no real run can produce (a damaged or edited file).

    Every sum and sum of squares is finite and >= 0 (activations are post-ReLU), counts are
    >= 0 and > 0 in a complete run, a layer that counted nothing has zero sums, and
    ``sum^2 <= count * sumsq`` per filter (Cauchy-Schwarz).

    Raises:
        StatsError: naming the file, the layer and what is wrong.
    """
    for s in record.layers:
        bad = _damage(s, record.meta.complete) or _image_damage(s, record.n_images)
        if bad:
            raise StatsError(f"{where}: layer {s.name}: {bad}; the stats file is damaged")


def _damage(s: LayerStats, complete: bool) -> str | None:
    if not (np.all(np.isfinite(s.sum)) and np.all(np.isfinite(s.sumsq))):
        return "NaN or infinite sums"
    if np.any(s.sum < 0) or np.any(s.sumsq < 0):
        return "negative sums of post-ReLU activations"
    if s.count == 0 and (np.any(s.sum) or np.any(s.sumsq)):
        return "sums without any counted value"
    if complete and s.count == 0:
        return "no counted value in a complete run"
    if np.any(s.sum > np.sqrt(float(s.count)) * (np.sqrt(s.sumsq) * (1 + _CS_SLACK) + _TINY)):
        return "sums of squares too small for the sums and count (sum^2 > count * sumsq)"
    return None


def _image_damage(s: LayerStats, images: int) -> str | None:
    """What is wrong with a layer's per-image moments, if anything."""
    im = s.per_image
    if im is None:
        return None
    if not (np.all(np.isfinite(im.sum)) and np.all(np.isfinite(im.sumsq))):
        return "NaN or infinite per-image sums"
    if np.any(im.sum < 0) or np.any(im.sumsq < 0):
        return "negative per-image sums"
    if im.images != images:
        return f"per-image sums over {im.images} images, but {images} images counted"
    if np.any(im.sum > np.sqrt(float(im.images)) * (np.sqrt(im.sumsq) * (1 + _CS_SLACK) + _TINY)):
        return "per-image sums of squares too small for the sums (sum^2 > images * sumsq)"
    return None


def same_settings(a: StatsMeta, b: StatsMeta) -> list[str]:
    """Names of the settings in which two runs differ."""
    sa, sb = a.settings(), b.settings()
    return [k for k in sa if sa[k] != sb[k]]


def stats_by_conv(record: StatsRecord, convs: Sequence[tuple[str, int]]) -> dict[str, LayerStats]:
    """The record's layers matched to the model's ``(conv name, filters)`` by position: names
    differ between formats (``block1_conv1`` vs ``conv2d``); the fingerprint ties the weights."""
    if not record.meta.complete:
        raise StatsError("the stats file is from an unfinished run", fix="resume")
    if len(record.layers) != len(convs):
        raise StatsError(
            f"stats cover {len(record.layers)} conv layers but the model has {len(convs)}"
        )
    out = {}
    for layer_stats, (name, filters) in zip(record.layers, convs, strict=True):
        if layer_stats.channels != filters:
            raise StatsError(
                f"stats layer {layer_stats.name} has {layer_stats.channels} filters, "
                f"the model's {name} has {filters}"
            )
        if layer_stats.count == 0:
            raise StatsError(f"stats layer {layer_stats.name} counted no activation")
        out[name] = layer_stats
    return out
