"""``vggnorm merge``: combine stats files of disjoint image sets (shards) exactly."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..core.errors import StatsError
from ..core.stats import merge_stats
from ..core.statsrecord import StatsRecord, same_settings
from ..formats.outputs import check_output, output_lock
from ..formats.statsfile import read_stats, write_stats
from ..runtime.data import items_sha256, ordered_items


def merge_files(
    inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, force: bool = False
) -> StatsRecord:
    """Merge the stats files ``inputs`` into ``out`` (atomic); see :func:`merge_records`."""
    out_path = Path(out)
    with output_lock(out_path):
        check_output(out_path, force=force, inputs=[Path(p) for p in inputs], error=StatsError)
        merged = merge_records([read_stats(p) for p in inputs], [str(p) for p in inputs])
        write_stats(out_path, merged)
    return merged


def merge_records(records: Sequence[StatsRecord], names: Sequence[str] = ()) -> StatsRecord:
    """Exactly combine complete runs over disjoint images of the same model and settings.

    Sums, sums of squares and counts add; image and skip lists concatenate. Shards ``i/N`` of one
    selection that together cover every ``i`` merge into the equivalent unsharded run.

    Raises:
        StatsError: fewer than two runs, an unfinished run, different settings or models, or an
            image counted in two runs.
    """
    if len(records) < 2:
        raise StatsError("merge needs at least two stats files")
    names = list(names) or [f"#{i}" for i in range(len(records))]
    first = records[0]
    seen: dict[str, str] = {}
    for name, r in zip(names, records, strict=True):
        if not r.meta.complete:
            raise StatsError(f"{name} is from an unfinished run", fix="resume")
        differ = same_settings(first.meta, r.meta)
        if r.meta.dataset_root != first.meta.dataset_root:
            differ.append("dataset")
        if differ:
            raise StatsError(f"{name} differs from {names[0]} in {', '.join(differ)}; cannot merge")
        for image in r.images:
            if image in seen:
                raise StatsError(
                    f"{name} and {seen[image]} both counted {image!r}: overlapping runs would "
                    "count images twice"
                )
            seen[image] = name
    shards = {r.meta.shard for r in records}
    counts = {n for _, n in shards}
    covered = len(counts) == 1 and {i for i, _ in shards} == set(range(next(iter(counts))))
    covered = covered and len({r.meta.limit for r in records}) == 1
    images = tuple(i for r in records for i in r.images)
    # The selection is every item the runs consumed, counted or skipped, in dataset order: for
    # shards covering 0..N-1 this is exactly the unsharded selection, so its hash matches one.
    selection = ordered_items([*images, *(item for r in records for item, _, _ in r.skipped)])
    meta = replace(
        first.meta,
        shard=(0, 1) if covered else first.meta.shard,
        selection_size=len(selection),
        selection_sha256=items_sha256(selection),
        position=sum(r.meta.position for r in records),
        merged_from=tuple(names),
    )
    return StatsRecord(
        meta,
        merge_stats(*(r.layers for r in records)),
        images,
        tuple(s for r in records for s in r.skipped),
    )
