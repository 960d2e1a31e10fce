"""Streaming per-filter activation statistics. Pure numpy: no framework, no files.

A layer's statistics are the float64 sum and sum of squares of every post-ReLU activation of each
filter, and the exact number of values that went into them (images x positions). Means come from
sums, never from averaging per-batch means, so batches of any size (the last partial one too) and
images of any size weigh by their positions. Two disjoint runs merge exactly by adding.

Beside them, per filter, the sum and sum of squares of each *image's* mean (:class:`ImageMoments`):
positions within one image are strongly correlated, so the image is the sampling unit, and these
two sums give the standard error of the mean over images (:mod:`vggnorm.core.precision`). They add
across batches, shards and workers like the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ImageMoments:
    """Per filter, ``sum_i m_ic`` and ``sum_i m_ic**2`` over ``images`` images, ``m_ic`` being
    image i's mean of filter c over its positions (float64)."""

    sum: F64
    sumsq: F64
    images: int

    @classmethod
    def empty(cls, channels: int) -> ImageMoments:
        return cls(np.zeros(channels), np.zeros(channels), 0)

    @classmethod
    def of(cls, image_means: npt.ArrayLike) -> ImageMoments:
        """The moments of per-image means shaped (images, channels), added image by image (the
        same order whatever batch an image falls in)."""
        m = np.asarray(image_means, dtype=np.float64)
        total, total_sq = np.zeros(m.shape[1]), np.zeros(m.shape[1])
        for row in m:
            total += row
            total_sq += row * row
        return cls(total, total_sq, int(m.shape[0]))

    def plus(self, other: ImageMoments) -> ImageMoments:
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"image moments of {other.sum.shape} filters for {self.sum.shape}")
        return ImageMoments(self.sum + other.sum, self.sumsq + other.sumsq,
                            self.images + other.images)  # fmt: skip


@dataclass(frozen=True)
class LayerStats:
    """Sums over every activation of one conv layer's filters (channels last).

    ``per_image`` holds the per-image moments, or None where they are unknown (stats files of
    format version 1, and anything merged with one).
    """

    name: str
    sum: F64
    sumsq: F64
    count: int
    per_image: ImageMoments | None = None

    def __post_init__(self) -> None:
        if self.sum.shape != self.sumsq.shape or self.sum.ndim != 1:
            raise ValueError(f"{self.name}: sum and sumsq must be 1-D of equal length")
        if self.count < 0:
            raise ValueError(f"{self.name}: count must be >= 0, got {self.count}")
        if self.per_image is not None and self.per_image.sum.shape != self.sum.shape:
            raise ValueError(f"{self.name}: per-image moments for another number of filters")

    @property
    def channels(self) -> int:
        return int(self.sum.shape[0])

    @classmethod
    def empty(cls, name: str, channels: int) -> LayerStats:
        return cls(name, np.zeros(channels), np.zeros(channels), 0, ImageMoments.empty(channels))

    @classmethod
    def of(cls, name: str, activations: npt.ArrayLike) -> LayerStats:
        """Statistics of activations shaped (images, ..., channels), reduced in float64: every
        axis but the last counts as positions; the first one separates images."""
        a = np.asarray(activations, dtype=np.float64)
        flat = a.reshape(-1, a.shape[-1])
        per_image = None
        if a.ndim >= 2:
            positions = tuple(range(1, a.ndim - 1))
            per_image = ImageMoments.of(a.mean(axis=positions) if positions else a)
        return cls(name, flat.sum(axis=0), np.square(flat).sum(axis=0), int(flat.shape[0]),
                   per_image)  # fmt: skip

    def add(
        self, batch_sum: npt.ArrayLike, batch_sumsq: npt.ArrayLike, count: int,
        images: ImageMoments | None = None,
    ) -> LayerStats:  # fmt: skip
        """A new LayerStats with one batch's partial sums added in float64; without the batch's
        per-image moments the result's are unknown."""
        s = np.asarray(batch_sum, dtype=np.float64)
        sq = np.asarray(batch_sumsq, dtype=np.float64)
        if s.shape != self.sum.shape or sq.shape != self.sum.shape:
            # numpy would broadcast a wrong-length batch silently
            raise ValueError(
                f"{self.name}: batch sums of shape {s.shape} and {sq.shape} for "
                f"{self.channels} filters"
            )
        per_image = (
            self.per_image.plus(images) if self.per_image is not None and images is not None else None
        )
        return LayerStats(self.name, self.sum + s, self.sumsq + sq, self.count + int(count), per_image)

    def merge(self, other: LayerStats) -> LayerStats:
        if other.name != self.name or other.channels != self.channels:
            raise ValueError(
                f"cannot merge layer {other.name} ({other.channels} filters) into "
                f"{self.name} ({self.channels} filters)"
            )
        return self.add(other.sum, other.sumsq, other.count, other.per_image)

    @property
    def mean(self) -> F64:
        if self.count == 0:
            raise ValueError(f"{self.name}: no activation counted yet")
        return self.sum / self.count

    @property
    def variance(self) -> F64:
        """Population variance; clipped at 0 where cancellation makes it slightly negative."""
        m = self.mean
        return np.maximum(self.sumsq / self.count - m * m, 0.0)


def empty_stats(layers: Iterable[tuple[str, int]]) -> tuple[LayerStats, ...]:
    return tuple(LayerStats.empty(name, channels) for name, channels in layers)


def accumulate(
    stats: Sequence[LayerStats],
    batch: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]],
    counts: Mapping[str, int],
    images: Mapping[str, ImageMoments] | None = None,
) -> tuple[LayerStats, ...]:
    """Add one batch's per-layer (sum, sumsq), value counts and per-image moments; returns new
    stats (whose per-image moments are unknown where the batch's are not given)."""
    per_image = images or {}
    return tuple(
        s.add(batch[s.name][0], batch[s.name][1], counts[s.name], per_image.get(s.name))
        for s in stats
    )


def merge_stats(*runs: Sequence[LayerStats]) -> tuple[LayerStats, ...]:
    """Exact merge of runs over disjoint image sets, layer by layer."""
    if not runs:
        raise ValueError("nothing to merge")
    first = runs[0]
    for run in runs[1:]:
        if [s.name for s in run] != [s.name for s in first]:
            raise ValueError("runs cover different layers")
    merged = list(first)
    for run in runs[1:]:
        merged = [a.merge(b) for a, b in zip(merged, run)]
    return tuple(merged)


def means(stats: Sequence[LayerStats]) -> dict[str, F64]:
    return {s.name: s.mean for s in stats}
