"""``vggnorm stats``: stream a dataset through the network and gather per-filter statistics."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from . import __version__
from .data import Dataset, Decode, items_sha256, iter_batches, open_dataset, select
from .errors import DatasetError, Interrupted, StatsError, VggnormError
from .model import Precision, Preprocess
from .stats import accumulate, empty_stats
from .statsfile import StatsMeta, StatsRecord, read_stats, same_settings, write_stats
from .topology import Bound, bind, fingerprint
from .weights_io import WeightSet, read_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where a run stands, passed to the progress callback after every batch."""

    done: int  # items of the selection consumed (images counted + skipped)
    total: int
    images: int
    skipped: int


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def resolve_weights(weights: str | os.PathLike[str] | None, model: str | None) -> Path:
    """``weights``, or Keras's cached ImageNet file for ``model`` (downloaded if missing)."""
    if weights is not None:
        return Path(weights)
    from .model import fetch_imagenet_weights

    name = model or "vgg16"
    try:
        return Path(fetch_imagenet_weights(name, include_top=False))
    except Exception as e:  # network errors come in many types; all mean the same here
        raise VggnormError(
            f"could not fetch Keras's ImageNet {name} weights ({type(e).__name__}: {e}); "
            "download them elsewhere or pass --weights PATH"
        ) from e


def load_model_weights(
    weights: str | os.PathLike[str] | None, model: str | None
) -> tuple[WeightSet, Bound]:
    ws = read_weights(resolve_weights(weights, model))
    return ws, bind(ws.file, model)


def collect_stats(
    weights: str | os.PathLike[str] | None,
    data: str | os.PathLike[str] | Dataset,
    *,
    model: str | None = None,
    annotations: str | os.PathLike[str] | None = None,
    split: str | None = None,
    decode: Decode | None = None,
    preprocess: Preprocess = "caffe",
    precision: Precision = "fp32",
    batch_size: int = 16,
    limit: int | None = None,
    shard: tuple[int, int] = (0, 1),
    workers: int = 2,
    out: str | os.PathLike[str] | None = None,
    checkpoint_seconds: float = 300.0,
    resume: bool = False,
    strict: bool = False,
    progress: Callable[[Progress], None] | None = None,
) -> StatsRecord:
    """Gather exact per-filter activation statistics of a VGG over an image dataset.

    Args:
        weights: a Keras weight file (any supported layout); None for Keras's ImageNet weights.
        data: dataset path (COCO, ImageNet tree, folder, list file) or an opened Dataset.
        model: ``"vgg16"``/``"vgg19"``; checked against the file, needed only when it cannot tell.
        decode: image size, resize policy and JPEG draft decoding (default: 224, crop).
        preprocess: ``caffe`` (keras.applications VGG), ``unit`` or ``torch``.
        precision: ``fp32`` or ``bf16`` (activations in bfloat16, reductions in float32).
        batch_size: images per forward pass; the last batch may be smaller and counts fully.
        limit: use only the first ``limit`` images of the dataset's deterministic order.
        shard: ``(i, n)``: this run covers every n-th image starting at i.
        workers: decoding threads.
        out: stats file to write; also checkpointed every ``checkpoint_seconds``.
        resume: continue the incomplete run in ``out``.
        strict: any unusable image is an error instead of a counted skip.
        progress: called after every batch.

    Returns:
        The complete :class:`StatsRecord` (also written to ``out`` when given).

    Raises:
        DatasetError, WeightFileError, ArchitectureError, StatsError: bad input.
        Interrupted: KeyboardInterrupt/SIGTERM; the progress so far was saved to ``out``.
    """
    from .model import FeatureNet, backend_description

    decode = decode or Decode()
    ws, bound = load_model_weights(weights, model)
    arch = bound.arch
    if decode.size < arch.min_size():
        raise VggnormError(
            f"--size {decode.size} is too small for {arch.name}: at least {arch.min_size()}"
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
    meta = StatsMeta(
        model=arch.name,
        fingerprint=fingerprint(ws.arrays, arch.weighted_features),
        weights=str(Path(ws.file.path).resolve()),
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
    )
    conv_filters = [(c.name, c.filters) for c in arch.convs]
    record = StatsRecord(meta, empty_stats(conv_filters), (), ())
    out_path = Path(out) if out is not None else None
    if out_path is not None and not out_path.parent.is_dir():
        raise StatsError(f"{out_path.parent}: output directory does not exist")
    if resume:
        record = _resumed(out_path, meta)
    net = FeatureNet(arch, ws.arrays, decode.size, preprocess, precision)
    record = record.with_meta(backend=backend_description())

    layers, images, skipped = list(record.layers), list(record.images), list(record.skipped)
    position = record.meta.position
    last_save = time.monotonic()

    def snapshot(complete: bool) -> StatsRecord:
        meta = replace(record.meta, position=position, complete=complete, updated=now())
        return StatsRecord(meta, tuple(layers), tuple(images), tuple(skipped))

    try:
        for batch in iter_batches(ds, items, decode, batch_size, start=position, workers=workers):
            if strict and batch.skipped:
                _, reason, detail = batch.skipped[0]
                raise DatasetError(f"{reason}: {detail} (--strict turns skips into errors)")
            if len(batch.items):
                sums = net.moments(batch.images)
                layers = list(
                    accumulate(
                        layers,
                        {k: (v[0], v[1]) for k, v in sums.items()},
                        {k: v[2] for k, v in sums.items()},
                    )
                )
            # Only after the batch is fully counted does the position move past it.
            images += batch.items
            skipped += batch.skipped
            position = batch.end
            if progress:
                progress(Progress(position, len(items), len(images), len(skipped)))
            if out_path and time.monotonic() - last_save >= checkpoint_seconds:
                write_stats(out_path, snapshot(False))
                last_save = time.monotonic()
    except KeyboardInterrupt as e:
        if out_path is None:
            raise Interrupted(
                f"interrupted after {len(images)} images; nothing saved (no --out)"
            ) from e
        write_stats(out_path, snapshot(False))
        raise Interrupted(
            f"interrupted after {position} of {len(items)} images; progress saved to {out_path}: "
            "run the same command with --resume to continue"
        ) from e
    if not images:
        raise DatasetError(
            f"none of the {len(items)} images could be used ({len(skipped)} skipped: "
            f"{sorted({r for _, r, _ in skipped})})"
        )
    final = snapshot(True)
    if out_path:
        write_stats(out_path, final)
    return final


def _resumed(out: Path | None, meta: StatsMeta) -> StatsRecord:
    if out is None:
        raise StatsError("--resume needs the stats file (--out) of the interrupted run")
    previous = read_stats(out)
    if previous.meta.complete:
        raise StatsError(f"{out} is already complete; nothing to resume")
    differ = same_settings(previous.meta, meta)
    if previous.meta.selection_sha256 != meta.selection_sha256:
        differ.append("dataset/limit/shard")
    if differ:
        raise StatsError(
            f"cannot resume {out}: it was gathered with other settings ({', '.join(differ)}); "
            "use the original command line, or start afresh without --resume"
        )
    log.info("resuming %s at image %d of %d", out, previous.meta.position, meta.selection_size)
    resumed = replace(meta, position=previous.meta.position, created=previous.meta.created)
    return StatsRecord(resumed, previous.layers, previous.images, previous.skipped)
