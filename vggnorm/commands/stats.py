"""``vggnorm stats``: stream a dataset through the network and gather per-filter statistics."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .._version import __version__
from ..core.archs import Arch, Padding, PoolKind
from ..core.errors import DatasetError, Interrupted, StatsError, VggnormError
from ..core.inputs import Decode, Precision, Preprocess
from ..core.memory import Batching, BatchPlan, BatchSize, batching_for
from ..core.precision import target_reached
from ..core.stats import empty_stats
from ..core.statsrecord import StatsMeta, StatsRecord, same_settings
from ..core.topology import Loaded
from ..formats.outputs import check_output, output_lock
from ..formats.registry import load
from ..formats.statsfile import read_stats, write_stats
from ..runtime.data import Dataset, items_sha256, open_dataset, select
from ..runtime.engine import Engine, LocalEngine
from ..runtime.measure import CHECK_EVERY, Counted, Progress
from ._common import now

log = logging.getLogger(__name__)

#: The default quantile of live filters a target error bounds (docs/precision.md says why).
DEFAULT_QUANTILE = 0.9
#: No run stops on a target before this many images (docs/precision.md says why).
DEFAULT_MIN_IMAGES = 128


@dataclass(frozen=True)
class StatsOptions:
    """The settings of a statistics run (all but the weights, the data and the output).

    Attributes:
        model: ``"vgg16"``/``"vgg19"``; checked against the file, needed only when it cannot tell.
        annotations: a COCO ``instances_*.json`` (default: found under the dataset's
            ``annotations/``).
        split: which COCO split when several exist.
        decode: image size, resize policy and JPEG draft decoding (default: 224, crop).
        preprocess: ``caffe`` (keras.applications VGG), ``unit``, ``torch`` or ``rgb255``;
            default: the weight file's layout's own (``torch`` for torchvision files, ``rgb255``
            for torchvision's features-only ImageNet file, else ``caffe``; ONNX files say none).
        padding: ``zero`` or ``reflect`` borders for every conv; default: the layout's own
            (``reflect`` for AdaIN files, else ``zero``).
        pooling: ``max`` or ``avg`` for every pooling layer (Gatys et al. synthesise images
            with average pooling; the means after a pooling layer depend on it); default: the
            file's own.
        precision: ``fp32`` or ``bf16`` (activations in bfloat16, each image row summed in
            bfloat16, everything beyond in float64).
        batch_size: images per forward pass, or ``"auto"``: the most whose estimated peak fits
            ``max_memory``, at most 16 (:mod:`vggnorm.core.memory`); a resumed run keeps the
            batch it started with unless given a number. Statistics do not depend on it beyond
            float32 rounding.
        max_memory: the memory budget in bytes for ``"auto"``; default: a share of the GPU's
            memory where the forward pass runs on a GPU, of the available host memory otherwise.
        limit: use only the first ``limit`` images of the dataset's deterministic order.
        shard: ``(i, n)``: this run covers every n-th image starting at i.
        workers: decoding threads.
        checkpoint_seconds: how often progress is saved to the output.
        resume: continue the run saved in the output: a missing file starts a new run, a
            complete one with the same settings is returned unchanged; other settings are refused.
        force: overwrite an existing output (without ``resume``).
        strict: any unusable image is an error instead of a counted skip.
        target_error: stop at the first check point where every layer's ``target_quantile``
            of live filters' relative 95% half-widths is at or under this (0.01: 1%), with at
            least ``min_images`` images; ``limit`` stays the maximum.
        target_quantile: which quantile of live filters must reach the target (default
            :data:`DEFAULT_QUANTILE`).
        min_images: no stop before this many images (default :data:`DEFAULT_MIN_IMAGES`).
        check_every: the check points, every this many items of the selection: where a run
            stops depends only on the data and the settings, not on the engine or a resume.
    """

    model: str | None = None
    annotations: str | os.PathLike[str] | None = None
    split: str | None = None
    decode: Decode = field(default_factory=Decode)
    preprocess: Preprocess | None = None
    padding: Padding | None = None
    pooling: PoolKind | None = None
    precision: Precision = "fp32"
    batch_size: BatchSize = "auto"
    max_memory: int | None = None
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    workers: int = 2
    checkpoint_seconds: float = 300.0
    resume: bool = False
    force: bool = False
    strict: bool = False
    target_error: float | None = None
    target_quantile: float = DEFAULT_QUANTILE
    min_images: int = DEFAULT_MIN_IMAGES
    check_every: int = CHECK_EVERY

    def __post_init__(self) -> None:
        if self.target_error is not None and not 0 < self.target_error < 1:
            raise StatsError(f"target error {self.target_error!r}: expected a fraction in (0, 1)")
        if not 0 < self.target_quantile <= 1:
            raise StatsError(f"target quantile {self.target_quantile!r}: expected (0, 1]")
        if self.min_images < 2 or self.check_every < 1:
            raise StatsError("at least 2 images before a stop, and a check every 1 image or more")
        try:
            Batching(self.batch_size, self.max_memory)
        except ValueError as e:
            raise StatsError(str(e)) from e
        if self.target_error is not None and self.shard != (0, 1):
            raise StatsError(
                "a shard cannot know the precision of the merged statistics, so it cannot stop "
                "on a target error", fix="ray"
            )


def collect_stats(
    weights: str | os.PathLike[str] | None,
    data: str | os.PathLike[str] | Dataset,
    options: StatsOptions | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    progress: Callable[[Progress], None] | None = None,
    engine: Engine | None = None,
    on_plan: Callable[[BatchPlan], None] | None = None,
    **settings: Any,
) -> StatsRecord:
    """Gather exact per-filter activation statistics of a VGG over an image dataset.

    Args:
        weights: a weight file in any supported format; None for Keras's ImageNet VGG weights.
        data: dataset path (COCO, ImageNet tree, folder, list file) or an opened Dataset.
        options: the run's settings (:class:`StatsOptions`).
        out: stats file to write; also the checkpoint, saved every ``checkpoint_seconds``.
        progress: called after every batch.
        engine: where the batches run; default here (:class:`~vggnorm.runtime.engine.LocalEngine`).
            :class:`~vggnorm.runtime.ray_engine.RayEngine` spreads them over a Ray cluster with
            the same result.
        on_plan: called before the first image with the batch and its estimated peak memory.
        **settings: fields of :class:`StatsOptions` that replace those of ``options``.

    Returns:
        The complete :class:`~vggnorm.core.statsrecord.StatsRecord` (also written to ``out``).

    Raises:
        DatasetError, WeightFileError, ArchitectureError, StatsError: bad input.
        Interrupted: KeyboardInterrupt/SIGTERM; the progress so far was saved to ``out``.
        OutOfMemoryError: the device or the host ran out of memory; the progress so far was
            saved to ``out``.

    Example:
        >>> record = collect_stats("vgg16.h5", "coco/", out="s.h5", limit=500)  # doctest: +SKIP
    """
    opts = _options(options, settings)
    out_path = Path(out) if out is not None else None
    with output_lock(out_path) if out_path else contextlib.nullcontext():
        resuming = bool(opts.resume and out_path is not None and out_path.exists())
        if out_path is not None:  # found now, not at the first checkpoint minutes later
            check_output(out_path, force=opts.force or resuming, error=StatsError)
        loaded, ds, items, start = _prepare(weights, data, opts)
        if resuming:
            assert out_path is not None
            start = _resumed(out_path, start.meta)
            if start.meta.complete:
                log.warning("%s is already complete with these settings; nothing to do", out_path)
                return start
        run = _Run(loaded, ds, items, out_path, opts, progress, on_plan)
        return run.go(start, engine or LocalEngine(opts.workers))


def _options(options: StatsOptions | None, settings: dict[str, Any]) -> StatsOptions:
    known = {f.name for f in fields(StatsOptions)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"collect_stats() got unknown settings {unknown}")
    return replace(options or StatsOptions(), **settings)


def _prepare(
    weights: str | os.PathLike[str] | None, data: str | os.PathLike[str] | Dataset,
    opts: StatsOptions,
) -> tuple[Loaded, Dataset, tuple[str, ...], StatsRecord]:  # fmt: skip
    """The bound weights, the dataset, the selection and an empty record of the run."""
    from ..runtime.network import resolve_weights

    loaded = load(resolve_weights(weights, opts.model), opts.model)
    loaded = loaded.with_padding(opts.padding).with_pooling(opts.pooling)
    arch = loaded.bound.arch
    _check_size(arch, opts.decode.size)
    ds = data if isinstance(data, Dataset) else open_dataset(
        data, annotations=opts.annotations, split=opts.split)  # fmt: skip
    for note in ds.notes:
        log.warning("%s", note)
    items = select(ds.items, opts.limit, opts.shard)
    if not items:
        raise DatasetError(f"shard {opts.shard[0]}/{opts.shard[1]} of {ds.describe()} is empty")
    meta = new_meta(loaded, ds, items, opts)
    return loaded, ds, items, StatsRecord(meta, empty_stats((c.name, c.filters) for c in arch.convs), ())


def _check_size(arch: Arch, size: int) -> None:
    if size < arch.min_size():
        raise VggnormError(f"image size {size} is too small for {arch.name}: at least {arch.min_size()}")
    if arch.padding == "reflect" and size % arch.min_size():
        # AdaIN pools with ceil_mode, which equals our floor pooling only on even maps.
        raise VggnormError(
            f"image size {size}: the AdaIN layout needs a multiple of "
            f"{arch.min_size()} (its ceil-mode pooling differs on odd-sized maps)"
        )


def new_meta(loaded: Loaded, ds: Dataset, items: Sequence[str], opts: StatsOptions) -> StatsMeta:
    """The identity of a run over ``items`` of ``ds`` (what resume and merge compare)."""
    return StatsMeta(
        model=loaded.bound.arch.name,
        padding=loaded.bound.arch.padding,
        pooling=loaded.pooling,
        fingerprint=loaded.fingerprint(),
        weights=str(loaded.path.resolve()),
        decode=opts.decode,
        preprocess=opts.preprocess or loaded.preprocess,
        precision=opts.precision,
        dataset_kind=ds.kind,
        dataset_path=str(Path(ds.source).resolve()),
        dataset_root=str(ds.root.resolve()),
        annotations=str(ds.annotations.resolve()) if ds.annotations else None,
        dataset_items=len(ds.items),
        selection_sha256=items_sha256(items),
        selection_size=len(items),
        limit=opts.limit,
        shard=opts.shard,
        target_error=opts.target_error,
        target_quantile=opts.target_quantile,
        min_images=opts.min_images if opts.target_error is not None else None,
        check_every=opts.check_every,
        batch_size=None if opts.batch_size == "auto" else opts.batch_size,
        tool_version=__version__,
        created=now(),
    )


def _resumed(out: Path, meta: StatsMeta) -> StatsRecord:
    previous = read_stats(out)
    differ = same_settings(previous.meta, meta)
    if previous.meta.selection_sha256 != meta.selection_sha256:
        differ.append("dataset/limit/shard")
    for key in ("target_error", "target_quantile", "min_images", "check_every"):
        if getattr(previous.meta, key) != getattr(meta, key):
            differ.append(key)
    if differ:
        raise StatsError(
            f"cannot resume {out}: it was gathered with other settings ({', '.join(differ)})",
            fix="settings",
        )
    log.info("resuming %s at image %d of %d", out, previous.meta.position, meta.selection_size)
    resumed = replace(meta, position=previous.meta.position, created=previous.meta.created,
                      complete=previous.meta.complete, updated=previous.meta.updated,
                      target_reached=previous.meta.target_reached,
                      batch_size=previous.meta.batch_size,  # a resume keeps the run's batch
                      peak_memory=previous.meta.peak_memory)  # fmt: skip
    return StatsRecord(resumed, previous.layers, previous.images, previous.skipped)


@dataclass
class _Run:
    """One statistics run from a start record to the end of the selection, checkpointing."""

    loaded: Loaded
    ds: Dataset
    items: tuple[str, ...]
    out: Path | None
    opts: StatsOptions
    progress: Callable[[Progress], None] | None
    on_plan: Callable[[BatchPlan], None] | None = None

    def go(self, start: StatsRecord, engine: Engine) -> StatsRecord:
        """Measure the rest of the selection after ``start``, checkpointing; the final record."""
        from ..runtime.network import backend_description

        self.engine, self.backend = engine, backend_description()
        self.meta = start.meta
        self.total = Counted(start.layers, start.images, start.skipped, start.meta.position)
        batching = batching_for(self.opts.batch_size, self.opts.max_memory, start.meta.batch_size)
        counts = engine(self.loaded, self.ds, self.items, self.meta, batching, self.total.end,
                        self.opts.strict, on_plan=self._planned)  # fmt: skip
        try:
            reached = self._accumulate(counts)
        except KeyboardInterrupt as e:
            raise self._interrupted() from e
        finally:
            counts.close()  # stops decoding threads, cluster workers; drops blocks past a stop
        if not self.total.images:
            raise DatasetError(
                f"none of the {len(self.items)} images could be used ({len(self.total.skipped)} "
                f"skipped: {sorted({r for _, r, _ in self.total.skipped})})"
            )
        if self.meta.target_error is not None:
            self.meta = replace(self.meta, target_reached=reached)
        return self._save(self.total, complete=True)

    def _accumulate(self, counts: Generator[Counted, None, None]) -> bool:
        """Add the stretches in order; True when the target was reached at a check point."""
        last_save = time.monotonic()
        precision: float | None = None
        while True:
            try:
                counted = next(counts)
            except StopIteration:
                return False
            except VggnormError as e:  # a failed engine (a lost cluster): keep what was counted
                raise self._failed(e) from e
            self.total = total = self.total.plus(counted)
            watched = self.meta.target_error is not None or self.progress is not None
            if watched and self._is_check_point(total.end):  # the precision only when wanted
                reached, precision = self._check(total)
                if reached:
                    return True
            if self.progress:
                self.progress(Progress(total.end, len(self.items), len(total.images),
                                       len(total.skipped), precision))  # fmt: skip
            if self.out and time.monotonic() - last_save >= self.opts.checkpoint_seconds:
                self._save(total, complete=False)
                last_save = time.monotonic()

    def _planned(self, plan: BatchPlan) -> None:
        """Record the batch and its estimated peak memory before the first image."""
        log.info("%s", plan.describe())
        self.meta = replace(self.meta, batch_size=plan.batch, peak_memory=plan.peak)
        if self.on_plan is not None:
            self.on_plan(plan)

    def _is_check_point(self, position: int) -> bool:
        return position % (self.meta.check_every or CHECK_EVERY) == 0 or position == len(self.items)

    def _check(self, total: Counted) -> tuple[bool, float | None]:
        """At a check point: whether the target is reached, and the figure it bounds."""
        quantile = self.meta.target_quantile or DEFAULT_QUANTILE
        if self.meta.target_error is None:
            return False, target_reached(total.layers, 1.0, quantile, 2)[1]
        return target_reached(total.layers, self.meta.target_error, quantile,
                              self.meta.min_images or DEFAULT_MIN_IMAGES)  # fmt: skip

    def _failed(self, error: VggnormError) -> VggnormError:
        """Save what was counted before an engine failed, and say so in the error."""
        if self.out is None or self.total.end == self.meta.position:
            return error
        self._save(self.total, complete=False)
        fix = f"{error.fix}+resume" if error.fix and error.fix != "resume" else "resume"
        return type(error)(f"{error}; progress saved to {self.out}", fix=fix)

    def _save(self, total: Counted, complete: bool) -> StatsRecord:
        # where it ran: Keras's backend, and the engine (Ray names its version and workers)
        backend = f"{self.backend}; {self.engine.description}"
        meta = replace(self.meta, position=total.end, complete=complete, updated=now(),
                       backend=backend)  # fmt: skip
        record = StatsRecord(meta, total.layers, total.images, total.skipped)
        if self.out:
            write_stats(self.out, record)
            record = replace(record, path=str(self.out.resolve()))
        return record

    def _interrupted(self) -> Interrupted:
        """Save what was counted (when there is an output) and say so."""
        total = self.total
        if self.out is None:
            return Interrupted(
                f"interrupted after {len(total.images)} images; nothing saved (no output file)"
            )
        self._save(total, complete=False)
        return Interrupted(
            f"interrupted after {total.end} of {len(self.items)} images; progress saved to "
            f"{self.out}", fix="resume"
        )
