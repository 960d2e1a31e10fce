"""The one step that turns images into statistics: decode a stretch of the selection, run it
through the network, reduce each conv's activations to float64 sums. ``stats`` runs it here,
``verify`` runs it again on the normalized network, and the Ray workers run it on a cluster.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from .data import Dataset, Decode, iter_batches
from .errors import DatasetError
from .pipeline import Loaded, decode_of
from .stats import LayerStats, accumulate, empty_stats, merge_stats
from .statsfile import StatsMeta


@dataclass(frozen=True)
class Counted:
    """What a stretch of the selection adds: sums over its good images, which images were
    counted and skipped, and where it ends (the position just after its last item)."""

    layers: tuple[LayerStats, ...]
    images: tuple[str, ...]
    skipped: tuple[tuple[str, str, str], ...]
    end: int

    def plus(self, other: Counted) -> Counted:
        """This stretch followed by ``other`` (sums add in float64, lists concatenate)."""
        layers = merge_stats(self.layers, other.layers)
        return Counted(layers, self.images + other.images, self.skipped + other.skipped, other.end)


def measure(
    net: Any,
    ds: Dataset,
    items: Sequence[str],
    decode: Decode,
    batch_size: int,
    *,
    start: int = 0,
    workers: int = 2,
    strict: bool = False,
) -> Generator[Counted, None, None]:
    """Decode ``items[start:]`` and run them through ``net`` batch by batch: one
    :class:`Counted` per batch. The single step both the local loop and the Ray workers run."""
    for batch in iter_batches(ds, items, decode, batch_size, start=start, workers=workers):
        if strict and batch.skipped:
            _, reason, detail = batch.skipped[0]
            raise DatasetError(f"{reason}: {detail} (strict: skips are errors)")
        layers = empty_stats((c.name, c.filters) for c in net.arch.convs)
        if batch.items:
            sums = net.moments(batch.images)
            layers = accumulate(
                layers, {k: (s, sq) for k, (s, sq, _) in sums.items()},
                {k: n for k, (_, _, n) in sums.items()},
            )  # fmt: skip
        yield Counted(layers, tuple(batch.items), tuple(batch.skipped), batch.end)


def feature_net(loaded: Loaded, meta: StatsMeta, batch_size: int) -> Any:
    """The network that measures ``loaded``'s conv statistics with ``meta``'s settings, in
    batches of exactly ``batch_size`` images (imports Keras)."""
    from .model import FeatureNet

    arch = loaded.bound.arch.without_head()
    return FeatureNet(arch, loaded.arrays, meta.size, meta.preprocess, meta.precision,  # type: ignore[arg-type]
                      batch_size=batch_size)  # fmt: skip


def stretches(
    loaded: Loaded, ds: Dataset, items: Sequence[str], meta: StatsMeta, batch_size: int, *,
    start: int = 0, workers: int = 2, strict: bool = False, engine: Any = None,
) -> Generator[Counted, None, None]:  # fmt: skip
    """``items[start:]`` measured with ``meta``'s settings, in order: here (:func:`measure` on
    :func:`feature_net`) or, with an ``engine``, wherever it runs them (:mod:`vggnorm.ray_engine`).
    Close the generator when done: it stops decoding threads or cluster workers."""
    if engine is not None:
        return engine(loaded, ds, items, meta, batch_size, start, strict)  # type: ignore[no-any-return]
    net = feature_net(loaded, meta, batch_size)
    return measure(net, ds, items, decode_of(meta), batch_size, start=start, workers=workers,
                   strict=strict)  # fmt: skip
