"""Where the measuring step runs. An :class:`Engine` turns ``items[start:]`` into
:class:`~vggnorm.runtime.measure.Counted` stretches, in order; :class:`LocalEngine` runs them in
this process, :class:`vggnorm.runtime.ray_engine.RayEngine` on a Ray cluster, with the same
result. Commands take any engine and never ask which one it is.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Protocol

from ..core.statsrecord import StatsMeta
from ..core.topology import Loaded
from .data import Dataset
from .measure import CHECK_EVERY, Counted, feature_net, measure


class Engine(Protocol):
    """``engine(loaded, ds, items, meta, batch_size, start, strict)``: the statistics of
    ``items[start:]`` under ``meta``'s settings, as a generator of stretches in item order.
    Closing the generator stops whatever it started (decoding threads, cluster workers)."""

    description: str

    def __call__(
        self, loaded: Loaded, ds: Dataset, items: Sequence[str], meta: StatsMeta,
        batch_size: int, start: int, strict: bool,
    ) -> Generator[Counted, None, None]: ...  # fmt: skip


class LocalEngine:
    """This process: one network, ``workers`` decoding threads."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self.description = "local"

    def __call__(
        self, loaded: Loaded, ds: Dataset, items: Sequence[str], meta: StatsMeta,
        batch_size: int, start: int, strict: bool,
    ) -> Generator[Counted, None, None]:  # fmt: skip
        net = feature_net(loaded, meta, batch_size)
        return measure(net, ds, items, meta.decode, batch_size, start=start,
                       workers=self.workers, strict=strict,
                       block=meta.check_every or CHECK_EVERY)  # fmt: skip
