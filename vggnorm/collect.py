"""``vggnorm stats``: stream a dataset through the network and gather per-filter statistics."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .atomic import check_output, output_lock
from .data import Dataset, Decode, items_sha256, open_dataset, select
from .errors import DatasetError, Interrupted, StatsError, VggnormError
from .measure import Counted, stretches
from .pipeline import (
    Loaded,
    Progress,
    default_preprocess,
    load,
    now,
    resolve_weights,
    with_padding,
)
from .rescale import DEAD_THRESHOLD
from .stats import empty_stats
from .statsfile import StatsMeta, StatsRecord, read_stats, same_settings, write_stats

if TYPE_CHECKING:
    from .archs import Padding
    from .model import Precision, Preprocess

log = logging.getLogger(__name__)


def collect_stats(
    weights: str | os.PathLike[str] | None,
    data: str | os.PathLike[str] | Dataset,
    *,
    model: str | None = None,
    annotations: str | os.PathLike[str] | None = None,
    split: str | None = None,
    decode: Decode | None = None,
    preprocess: Preprocess | None = None,
    padding: Padding | None = None,
    precision: Precision = "fp32",
    batch_size: int = 16,
    limit: int | None = None,
    shard: tuple[int, int] = (0, 1),
    workers: int = 2,
    out: str | os.PathLike[str] | None = None,
    checkpoint_seconds: float = 300.0,
    resume: bool = False,
    force: bool = False,
    strict: bool = False,
    progress: Callable[[Progress], None] | None = None,
    engine: Any = None,
) -> StatsRecord:
    """Gather exact per-filter activation statistics of a VGG over an image dataset.

    Args:
        weights: a Keras weight file (any supported layout); None for Keras's ImageNet weights.
        data: dataset path (COCO, ImageNet tree, folder, list file) or an opened Dataset.
        model: ``"vgg16"``/``"vgg19"``; checked against the file, needed only when it cannot tell.
        decode: image size, resize policy and JPEG draft decoding (default: 224, crop).
        preprocess: ``caffe`` (keras.applications VGG), ``unit`` or ``torch``; default: the
            weight file's layout's own (``torch`` for torchvision files, else ``caffe``).
        padding: ``zero`` or ``reflect`` borders for every conv; default: the layout's own
            (``reflect`` for AdaIN files, else ``zero``). Recorded in the stats file.
        precision: ``fp32`` or ``bf16`` (activations in bfloat16, reductions in float32).
        batch_size: images per forward pass; the last batch may be smaller and counts fully.
        limit: use only the first ``limit`` images of the dataset's deterministic order.
        shard: ``(i, n)``: this run covers every n-th image starting at i.
        workers: decoding threads.
        out: stats file to write; also checkpointed every ``checkpoint_seconds``.
        resume: continue the run saved in ``out``: a missing file starts a new run, a complete
            one with the same settings is returned unchanged; other settings are refused.
        force: overwrite an existing ``out`` (without ``resume``).
        strict: any unusable image is an error instead of a counted skip.
        progress: called after every batch.
        engine: where the batches run; None runs them here. :func:`vggnorm.ray_engine.engine`
            spreads them over a Ray cluster with the same result.

    Returns:
        The complete :class:`StatsRecord` (also written to ``out`` when given).

    Raises:
        DatasetError, WeightFileError, ArchitectureError, StatsError: bad input.
        Interrupted: KeyboardInterrupt/SIGTERM; the progress so far was saved to ``out``.
    """
    decode = decode or Decode()
    out_path = Path(out) if out is not None else None
    with output_lock(out_path) if out_path else contextlib.nullcontext():
        resuming = bool(resume and out_path is not None and out_path.exists())
        if out_path is not None:  # found now, not at the first checkpoint minutes later
            check_output(out_path, force=force or resuming, error=StatsError)
        loaded = with_padding(load(resolve_weights(weights, model), model), padding)
        arch = loaded.bound.arch
        if decode.size < arch.min_size():
            raise VggnormError(
                f"image size {decode.size} is too small for {arch.name}: at least {arch.min_size()}"
            )
        if arch.padding == "reflect" and decode.size % arch.min_size():
            # AdaIN pools with ceil_mode, which equals our floor pooling only on even maps.
            raise VggnormError(
                f"image size {decode.size}: the AdaIN layout needs a multiple of "
                f"{arch.min_size()} (its ceil-mode pooling differs on odd-sized maps)"
            )
        ds = (
            data
            if isinstance(data, Dataset)
            else open_dataset(data, annotations=annotations, split=split)
        )
        for note in ds.notes:
            log.warning("%s", note)
        items = select(ds.items, limit, shard)
        if not items:
            raise DatasetError(f"shard {shard[0]}/{shard[1]} of {ds.describe()} is empty")
        meta = new_meta(loaded, ds, items, decode=decode, precision=precision, limit=limit,
                        shard=shard, preprocess=preprocess or default_preprocess(loaded))  # fmt: skip
        start = StatsRecord(meta, empty_stats((c.name, c.filters) for c in arch.convs), ())
        if resuming:
            assert out_path is not None
            start = _resumed(out_path, meta)
            if start.meta.complete:
                log.warning("%s is already complete with these settings; nothing to do", out_path)
                return start
        return _run(loaded, ds, items, start, out_path, batch_size, workers, strict, progress,
                    checkpoint_seconds, engine)  # fmt: skip


def new_meta(
    loaded: Loaded,
    ds: Dataset,
    items: Sequence[str],
    *,
    decode: Decode,
    preprocess: str,
    precision: str,
    limit: int | None,
    shard: tuple[int, int],
) -> StatsMeta:
    """The identity of a run over ``items`` of ``ds`` (what resume and merge compare)."""
    return StatsMeta(
        model=loaded.bound.arch.name,
        padding=loaded.bound.arch.padding,
        fingerprint=loaded.fingerprint(),
        weights=str(loaded.path.resolve()),
        size=decode.size,
        resize=decode.resize,
        interpolation=decode.interpolation,
        draft=decode.draft,
        preprocess=preprocess,
        precision=precision,
        dataset_kind=ds.kind,
        dataset_path=str(Path(ds.source).resolve()),
        dataset_root=str(ds.root.resolve()),
        annotations=str(ds.annotations.resolve()) if ds.annotations else None,
        dataset_items=len(ds.items),
        selection_sha256=items_sha256(items),
        selection_size=len(items),
        limit=limit,
        shard=shard,
        tool_version=__version__,
        created=now(),
    )  # fmt: skip


def _resumed(out: Path, meta: StatsMeta) -> StatsRecord:
    previous = read_stats(out)
    differ = same_settings(previous.meta, meta)
    if previous.meta.selection_sha256 != meta.selection_sha256:
        differ.append("dataset/limit/shard")
    if differ:
        raise StatsError(
            f"cannot resume {out}: it was gathered with other settings ({', '.join(differ)}); "
            "use the original command line, or start afresh without --resume"
        )
    log.info("resuming %s at image %d of %d", out, previous.meta.position, meta.selection_size)
    resumed = replace(meta, position=previous.meta.position, created=previous.meta.created,
                      complete=previous.meta.complete, updated=previous.meta.updated)  # fmt: skip
    return StatsRecord(resumed, previous.layers, previous.images, previous.skipped)


def _run(
    loaded: Loaded, ds: Dataset, items: Sequence[str], start: StatsRecord, out: Path | None,
    batch_size: int, workers: int, strict: bool, progress: Callable[[Progress], None] | None,
    checkpoint_seconds: float, engine: Any,
) -> StatsRecord:  # fmt: skip
    from .model import backend_description

    record = start.with_meta(backend=backend_description())
    total = Counted(record.layers, record.images, record.skipped, record.meta.position)
    last_save = time.monotonic()

    def snapshot(complete: bool) -> StatsRecord:
        meta = replace(record.meta, position=total.end, complete=complete, updated=now())
        return StatsRecord(meta, total.layers, total.images, total.skipped)

    counts = stretches(loaded, ds, items, record.meta, batch_size, start=total.end,
                       workers=workers, strict=strict, engine=engine)  # fmt: skip
    try:
        for counted in counts:
            total = total.plus(counted)
            if progress:
                progress(Progress(total.end, len(items), len(total.images), len(total.skipped)))
            if out and time.monotonic() - last_save >= checkpoint_seconds:
                write_stats(out, snapshot(False))
                last_save = time.monotonic()
    except KeyboardInterrupt as e:
        if out is None:
            raise Interrupted(
                f"interrupted after {len(total.images)} images; nothing saved (no output file)"
            ) from e
        write_stats(out, snapshot(False))
        raise Interrupted(
            f"interrupted after {total.end} of {len(items)} images; progress saved to {out}: "
            "run the same command with --resume to continue"
        ) from e
    finally:
        counts.close()  # stops decoding threads or cluster workers
    if not total.images:
        raise DatasetError(
            f"none of the {len(items)} images could be used ({len(total.skipped)} skipped: "
            f"{sorted({r for _, r, _ in total.skipped})})"
        )
    final = snapshot(True)
    if out:
        write_stats(out, final)
    return final


def summary_lines(record: StatsRecord) -> list[str]:
    """Human-readable per-layer summary of a stats record."""
    lines = []
    for s in record.layers:
        m = s.mean if s.count else np.zeros(s.channels)
        lines.append(
            f"{s.name:<16} filters {s.channels:>4}  mean min {m.min():.4g}  "
            f"median {np.median(m):.4g}  max {m.max():.4g}  dead {int(np.sum(m <= DEAD_THRESHOLD))}"
        )
    return lines
