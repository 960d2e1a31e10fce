"""Where the measuring step runs. An :class:`Engine` turns ``items[start:]`` into
:class:`~vggnorm.runtime.measure.Counted` stretches, in order; :class:`LocalEngine` runs them in
this process, :class:`vggnorm.runtime.ray_engine.RayEngine` on a Ray cluster, with the same
result. Commands take any engine and never ask which one it is.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Protocol

from ..core.memory import Batching, BatchPlan
from ..core.statsrecord import StatsMeta
from ..core.topology import Loaded
from .data import Dataset
from .measure import CHECK_EVERY, Counted, feature_net, measure, resolve_batch


class Engine(Protocol):
    """``engine(loaded, ds, items, meta, batch, start, strict, on_plan)``: the statistics of
    ``items[start:]`` under ``meta``'s settings, as a generator of stretches in item order.
    Closing the generator stops whatever it started (decoding threads, cluster workers).

    ``batch`` is a number of images or a :class:`~vggnorm.core.memory.Batching` (``"auto"``:
    chosen from the memory of the device each forward pass runs on); ``on_plan`` is called with
    the batch and its estimated peak before the first image (where several workers choose, with
    the smallest batch).
    """

    description: str

    def __call__(
        self, loaded: Loaded, ds: Dataset, items: Sequence[str], meta: StatsMeta,
        batch: int | Batching, start: int, strict: bool,
        on_plan: Callable[[BatchPlan], None] | None = None,
    ) -> Generator[Counted, None, None]: ...  # fmt: skip


class LocalEngine:
    """This process: one network, ``workers`` decoding threads."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self.description = "local"

    def __call__(
        self, loaded: Loaded, ds: Dataset, items: Sequence[str], meta: StatsMeta,
        batch: int | Batching, start: int, strict: bool,
        on_plan: Callable[[BatchPlan], None] | None = None,
    ) -> Generator[Counted, None, None]:  # fmt: skip
        plan = resolve_batch(loaded, meta, batch)
        if on_plan is not None:
            on_plan(plan)
        net = feature_net(loaded, meta, plan)
        return measure(net, ds, items, meta.decode, plan.batch, start=start,
                       workers=self.workers, strict=strict,
                       block=meta.check_every or CHECK_EVERY)  # fmt: skip
