"""The one step that turns images into statistics: decode a stretch of the selection, run it
through the network, reduce each conv's activations to float64 sums. ``stats`` runs it here,
``verify`` runs it again on the normalized network, and the Ray workers run it on a cluster.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.errors import DatasetError
from ..core.inputs import Decode
from ..core.memory import Batching, BatchPlan, plan_batch
from ..core.stats import LayerStats, accumulate, empty_stats, merge_stats
from ..core.statsrecord import StatsMeta
from ..core.topology import Loaded
from .data import Dataset, iter_batches

#: Items of the selection between a run's check points: every engine ends a batch (and Ray a
#: block) at each multiple, so the statistics at a check point never depend on the engine.
CHECK_EVERY = 128


@dataclass(frozen=True)
class Progress:
    """Where a run stands, passed to the progress callback after every batch."""

    done: int  # items of the selection consumed (images counted + skipped)
    total: int
    images: int
    skipped: int
    precision: float | None = None  # at the last check point: the figure a target bounds


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
    block: int | None = None,
) -> Generator[Counted, None, None]:
    """Decode ``items[start:]`` and run them through ``net`` batch by batch: one
    :class:`Counted` per batch, a batch ending at every multiple of ``block``. The single step
    both the local loop and the Ray workers run."""
    for batch in iter_batches(ds, items, decode, batch_size, start=start, workers=workers,
                              block=block):  # fmt: skip
        if strict and batch.skipped:
            _, reason, detail = batch.skipped[0]
            raise DatasetError(f"{reason}: {detail} (strict: skips are errors)")
        layers = empty_stats((c.name, c.filters) for c in net.arch.convs)
        if batch.items:
            sums = net.moments(batch.images)
            layers = accumulate(
                layers, {k: (s, sq) for k, (s, sq, _, _) in sums.items()},
                {k: n for k, (_, _, n, _) in sums.items()},
                {k: im for k, (_, _, _, im) in sums.items()},
            )  # fmt: skip
        yield Counted(layers, tuple(batch.items), tuple(batch.skipped), batch.end)


def resolve_batch(
    loaded: Loaded, meta: StatsMeta, batching: int | Batching, share: float = 1.0
) -> BatchPlan:
    """The batch that measures ``loaded`` with ``meta``'s settings on this process's device
    (its GPU, else the host; ``share`` of it by default), and its estimated peak memory
    (imports Keras)."""
    from .network import device_budget

    if not isinstance(batching, Batching):
        batching = Batching(batching)
    budget = device_budget(batching.max_memory, share)
    return plan_batch(loaded.bound.arch, meta.size, meta.precision, batching, budget)


def feature_net(loaded: Loaded, meta: StatsMeta, plan: BatchPlan) -> Any:
    """The network that measures ``loaded``'s conv statistics with ``meta``'s settings, in
    batches of exactly ``plan.batch`` images (imports Keras)."""
    from .network import FeatureNet, out_of_memory

    arch = loaded.bound.arch.without_head()
    with out_of_memory(lambda: f"building {arch.name} ({plan.describe()})"):
        return FeatureNet(arch, loaded.arrays, meta.size, meta.preprocess, meta.precision,  # type: ignore[arg-type]
                          batch_size=plan.batch, peak=plan.peak)  # fmt: skip
