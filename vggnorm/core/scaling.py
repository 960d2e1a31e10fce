"""From a stats record to rescaled weights: tie the stats to the weights, turn means into scales,
rescale with everything the architecture says. Pure numpy."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import StatsError
from .rescale import DEAD_THRESHOLD, Scales, compute_scales, rescale
from .statsrecord import StatsRecord, stats_by_conv
from .topology import Bound, Loaded


def check_fingerprint(loaded: Loaded, record: StatsRecord) -> None:
    """Refuse stats gathered on other conv weights than ``loaded``'s.

    Raises:
        StatsError: naming both fingerprints and the file the stats were gathered on.
    """
    fp = loaded.fingerprint()
    if fp != record.meta.fingerprint:
        raise StatsError(
            f"{loaded.path} is not the model the stats were gathered on (conv weights "
            f"fingerprint {fp[:12]} vs {record.meta.fingerprint[:12]} from {record.meta.weights}); "
            "gather stats on this file first"
        )


def scales_for(record: StatsRecord, bound: Bound, dead_threshold: float = DEAD_THRESHOLD) -> Scales:
    """Scales for ``bound``'s convs from ``record``, matched by position (names differ by format)."""
    matched = stats_by_conv(record, [(c.name, c.filters) for c in bound.arch.convs])
    means = {name: s.mean for name, s in matched.items()}
    return compute_scales(means, bound.conv_names, dead_threshold)


def rescale_bound(
    arrays: Mapping[str, np.ndarray], bound: Bound, scales: Scales, *, inverse: bool = False
) -> dict[str, np.ndarray]:
    """:func:`vggnorm.core.rescale.rescale` with everything the architecture says: the first
    Dense of the head and its flatten order, and the BatchNorms between convs and their ReLUs."""
    head = bound.arch.head
    dense = bound.arch.first_dense
    return rescale(
        arrays,
        scales,
        dense,
        head.reduce if head is not None and dense is not None else None,
        norms=bound.arch.norms,
        flatten_order=head.flatten_order if head is not None else "hwc",
        inverse=inverse,
    )
