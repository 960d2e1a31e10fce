"""The stats file: one self-describing HDF5 file per run (docs/files.md).

Layout (``format_version`` 2)::

    /                    attrs: format="vggnorm-stats", format_version=2, meta=<JSON, see StatsMeta>
    /layers/<NN>_<name>  datasets sum, sumsq (float64, one value per filter); attrs name, count;
                         img_sum, img_sumsq (float64: sums of each image's mean and of its
                         square) and attr images (how many images they cover)
    /images              the images counted, in processing order (UTF-8 strings)
    /skipped             one JSON object per skipped image: {"item", "reason", "detail"}

Version 1 files (no per-image sums) still read: their precision is unknown. A version-2 layer
without the per-image datasets (merged with a version-1 file) reads the same way.

The same file is the checkpoint of a running ``stats`` (``meta.complete`` false, ``meta.position``
the number of dataset items consumed); it is always replaced atomically. What a record holds and
the rules it obeys are :mod:`vggnorm.core.statsrecord`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import StatsError
from ..core.stats import ImageMoments, LayerStats
from ..core.statsrecord import StatsMeta, StatsRecord, validate
from ._guard import run_guarded
from .outputs import atomic_path

FORMAT = "vggnorm-stats"
FORMAT_VERSION = 2
DEFAULT_STATS = "vggnorm-stats.h5"


def write_stats(path: str | os.PathLike[str], record: StatsRecord) -> None:
    """Write ``record`` atomically (a temp file beside ``path``, then rename).

    Raises:
        StatsError: the file cannot be written (no space, no permission); nothing is left under
            ``path`` then.
    """
    import h5py

    target = Path(path)
    try:
        with atomic_path(target) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["meta"] = json.dumps(record.meta.to_dict(), sort_keys=True)
            _write_layers(f.create_group("layers"), record.layers)
            text = h5py.string_dtype("utf-8")
            f.create_dataset("images", data=np.array(record.images, dtype=object), dtype=text)
            skipped = [
                json.dumps({"item": i, "reason": r, "detail": d}) for i, r, d in record.skipped
            ]
            f.create_dataset("skipped", data=np.array(skipped, dtype=object), dtype=text)
    except OSError as e:
        raise StatsError(f"could not write {target}: {e.strerror or e}") from e


def _write_layers(group: Any, layers: tuple[LayerStats, ...]) -> None:
    for i, s in enumerate(layers):
        g = group.create_group(f"{i:02d}_{s.name}")
        g.attrs["name"] = s.name
        g.attrs["count"] = np.int64(s.count)
        g.create_dataset("sum", data=s.sum.astype(np.float64))
        g.create_dataset("sumsq", data=s.sumsq.astype(np.float64))
        if s.per_image is not None:
            g.attrs["images"] = np.int64(s.per_image.images)
            g.create_dataset("img_sum", data=s.per_image.sum.astype(np.float64))
            g.create_dataset("img_sumsq", data=s.per_image.sumsq.astype(np.float64))


def read_stats(path: str | os.PathLike[str]) -> StatsRecord:
    """Read a stats file written by :func:`write_stats`.

    Read in a child process with a deadline (:mod:`vggnorm.formats._guard`), and validated
    (:func:`vggnorm.core.statsrecord.validate`): a damaged file ends in one :class:`StatsError`,
    never a traceback or hang.

    Raises:
        StatsError: missing, damaged, not a vggnorm stats file, or from a newer format version.
    """
    p = Path(path)
    if not p.is_file():
        raise StatsError(f"{p}: no such stats file", fix="gather")
    return run_guarded(_read_stats, p, what=p, error=StatsError)


def _read_stats(path: Path) -> StatsRecord:
    import h5py

    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            _check_header(f, p)
            meta = StatsMeta.from_dict(json.loads(f.attrs["meta"]))
            layers = [_read_layer(f["layers"][key]) for key in sorted(f["layers"])]
            images = tuple(s.decode("utf8") if isinstance(s, bytes) else s for s in f["images"][()])
            skipped = []
            for s in f["skipped"][()]:
                d = json.loads(s)
                skipped.append((d["item"], d["reason"], d["detail"]))
    except StatsError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:  # h5py: corrupt file
        raise StatsError(f"{p}: unreadable stats file: {e}") from e
    record = StatsRecord(meta, tuple(layers), images, tuple(skipped), str(p.resolve()))
    validate(record, str(p))
    return record


def _check_header(f: Any, p: Path) -> None:
    if f.attrs.get("format") != FORMAT:
        raise StatsError(f"{p}: not a vggnorm stats file")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise StatsError(
            f"{p}: stats format version {version} is newer than this vggnorm "
            f"understands ({FORMAT_VERSION}); upgrade vggnorm"
        )


def _read_layer(g: Any) -> LayerStats:
    per_image = None
    if "img_sum" in g:
        per_image = ImageMoments(
            np.asarray(g["img_sum"][()], dtype=np.float64),
            np.asarray(g["img_sumsq"][()], dtype=np.float64),
            int(g.attrs["images"]),
        )
    return LayerStats(
        str(g.attrs["name"]),
        np.asarray(g["sum"][()], dtype=np.float64),
        np.asarray(g["sumsq"][()], dtype=np.float64),
        int(g.attrs["count"]),
        per_image,
    )
