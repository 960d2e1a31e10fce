"""The stats file: one self-describing HDF5 file per run (DESIGN.md section 4).

Layout (``format_version`` 1)::

    /                    attrs: format="vggnorm-stats", format_version=1, meta=<JSON, see StatsMeta>
    /layers/<NN>_<name>  datasets sum, sumsq (float64, one value per filter); attrs name, count
    /images              the images counted, in processing order (UTF-8 strings)
    /skipped             one JSON object per skipped image: {"item", "reason", "detail"}

The same file is the checkpoint of a running ``stats`` (``meta.complete`` false, ``meta.position``
the number of dataset items consumed); it is always replaced atomically.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import StatsError
from .stats import LayerStats, means

FORMAT = "vggnorm-stats"
FORMAT_VERSION = 1
DEFAULT_STATS = "vggnorm-stats.h5"


@dataclass(frozen=True)
class StatsMeta:
    """Everything needed to reproduce, check, resume, merge and verify a statistics run."""

    model: str
    fingerprint: str
    weights: str
    size: int
    resize: str
    interpolation: str
    draft: bool
    preprocess: str
    precision: str
    dataset_kind: str
    dataset_path: str
    dataset_root: str
    annotations: str | None
    dataset_items: int  # images found in the dataset before --limit/--shard
    selection_sha256: str  # of the ordered items this run covers
    selection_size: int
    # how the convs padded their inputs: zero (Keras, torchvision) or reflect (AdaIN)
    padding: str = "zero"
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)
    position: int = 0  # items of the selection consumed so far
    complete: bool = False
    tool_version: str = ""
    backend: str = ""
    created: str = ""
    updated: str = ""
    merged_from: tuple[str, ...] = field(default=())

    def settings(self) -> dict[str, Any]:
        """What must agree for two runs to be resumed or merged."""
        return {
            k: getattr(self, k)
            for k in ("model", "fingerprint", "size", "resize", "interpolation", "draft",
                      "preprocess", "precision", "padding", "dataset_kind")
        }  # fmt: skip


@dataclass(frozen=True)
class StatsRecord:
    meta: StatsMeta
    layers: tuple[LayerStats, ...]
    images: tuple[str, ...]
    skipped: tuple[tuple[str, str, str], ...] = ()

    @property
    def n_images(self) -> int:
        return len(self.images)

    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason, _ in self.skipped))

    def means(self) -> dict[str, np.ndarray]:
        return means(self.layers)

    def with_meta(self, **changes: Any) -> StatsRecord:
        return replace(self, meta=replace(self.meta, **changes))


def write_stats(path: str | os.PathLike[str], record: StatsRecord) -> None:
    """Write ``record`` atomically (a temp file beside ``path``, then rename)."""
    import h5py

    target = Path(path)
    try:
        with atomic_path(target) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["meta"] = json.dumps(asdict(record.meta), sort_keys=True)
            layers = f.create_group("layers")
            for i, s in enumerate(record.layers):
                g = layers.create_group(f"{i:02d}_{s.name}")
                g.attrs["name"] = s.name
                g.attrs["count"] = np.int64(s.count)
                g.create_dataset("sum", data=s.sum.astype(np.float64))
                g.create_dataset("sumsq", data=s.sumsq.astype(np.float64))
            text = h5py.string_dtype("utf-8")
            f.create_dataset("images", data=np.array(record.images, dtype=object), dtype=text)
            skipped = [
                json.dumps({"item": i, "reason": r, "detail": d}) for i, r, d in record.skipped
            ]
            f.create_dataset("skipped", data=np.array(skipped, dtype=object), dtype=text)
    except OSError as e:
        raise StatsError(f"could not write {target}: {e.strerror or e}") from e


def read_stats(path: str | os.PathLike[str]) -> StatsRecord:
    """Read a stats file written by :func:`write_stats`.

    Read in a child process with a deadline (:mod:`vggnorm.guard`), and validated
    (:func:`validate`): a damaged file ends in one :class:`StatsError`, never a traceback or hang.

    Raises:
        StatsError: missing, damaged, not a vggnorm stats file, or from a newer format version.
    """
    p = Path(path)
    if not p.is_file():
        raise StatsError(f"{p}: no such stats file (run `vggnorm stats` first, or pass --stats)")
    from .guard import run_guarded

    return run_guarded(_read_stats, p, what=p, error=StatsError)


def _read_stats(path: Path) -> StatsRecord:
    import h5py

    p = Path(path)
    if not p.is_file():
        raise StatsError(f"{p}: no such stats file (run `vggnorm stats` first, or pass --stats)")
    try:
        with h5py.File(p, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise StatsError(f"{p}: not a vggnorm stats file")
            version = int(f.attrs.get("format_version", 0))
            if version > FORMAT_VERSION:
                raise StatsError(
                    f"{p}: stats format version {version} is newer than this vggnorm "
                    f"understands ({FORMAT_VERSION}); upgrade vggnorm"
                )
            raw = json.loads(f.attrs["meta"])
            raw["shard"] = tuple(raw.get("shard", (0, 1)))
            raw["merged_from"] = tuple(raw.get("merged_from", ()))
            meta = StatsMeta(**raw)
            layers = []
            for key in sorted(f["layers"]):
                g = f["layers"][key]
                layers.append(
                    LayerStats(
                        str(g.attrs["name"]),
                        np.asarray(g["sum"][()], dtype=np.float64),
                        np.asarray(g["sumsq"][()], dtype=np.float64),
                        int(g.attrs["count"]),
                    )
                )
            images = tuple(s.decode("utf8") if isinstance(s, bytes) else s for s in f["images"][()])
            skipped = []
            for s in f["skipped"][()]:
                d = json.loads(s)
                skipped.append((d["item"], d["reason"], d["detail"]))
    except StatsError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:  # h5py: corrupt file
        raise StatsError(f"{p}: unreadable stats file: {e}") from e
    record = StatsRecord(meta, tuple(layers), images, tuple(skipped))
    validate(record, str(p))
    return record


#: Relative slack for ``sum^2 <= count * sumsq`` (Cauchy-Schwarz): both sides are float64 sums of
#: up to ~1e12 terms whose rounding stays far below 1e-6 relative.
_CS_SLACK = 1e-6
#: Squares of values below sqrt(smallest normal float64) underflow, so sumsq can read 0 for them.
_TINY = float(np.sqrt(np.finfo(np.float64).tiny))


def validate(record: StatsRecord, where: str = "stats") -> None:
    """Refuse statistics no real run can produce (a damaged or edited file).

    Every sum and sum of squares is finite and >= 0 (activations are post-ReLU), counts are
    >= 0 and > 0 in a complete run, a layer that counted nothing has zero sums, and
    ``sum^2 <= count * sumsq`` per filter (Cauchy-Schwarz).

    Raises:
        StatsError: naming the file, the layer and what is wrong.
    """
    for s in record.layers:
        bad = None
        if not (np.all(np.isfinite(s.sum)) and np.all(np.isfinite(s.sumsq))):
            bad = "NaN or infinite sums"
        elif np.any(s.sum < 0) or np.any(s.sumsq < 0):
            bad = "negative sums of post-ReLU activations"
        elif s.count == 0 and (np.any(s.sum) or np.any(s.sumsq)):
            bad = "sums without any counted value"
        elif record.meta.complete and s.count == 0:
            bad = "no counted value in a complete run"
        elif np.any(s.sum > np.sqrt(float(s.count)) * (np.sqrt(s.sumsq) * (1 + _CS_SLACK) + _TINY)):
            bad = "sums of squares too small for the sums and count (sum^2 > count * sumsq)"
        if bad:
            raise StatsError(f"{where}: layer {s.name}: {bad}; the stats file is damaged")


def same_settings(a: StatsMeta, b: StatsMeta) -> list[str]:
    """Names of the settings in which two runs differ."""
    sa, sb = a.settings(), b.settings()
    return [k for k in sa if sa[k] != sb[k]]


def stats_by_conv(record: StatsRecord, convs: Sequence[tuple[str, int]]) -> dict[str, LayerStats]:
    """The record's layers matched to the model's ``(conv name, filters)`` by position: names
    differ between formats (``block1_conv1`` vs ``conv2d``); the fingerprint ties the weights."""
    if not record.meta.complete:
        raise StatsError(
            "the stats file is from an unfinished run; finish it with `vggnorm stats --resume`"
        )
    if len(record.layers) != len(convs):
        raise StatsError(
            f"stats cover {len(record.layers)} conv layers but the model has {len(convs)}"
        )
    out = {}
    for layer_stats, (name, filters) in zip(record.layers, convs, strict=True):
        if layer_stats.channels != filters:
            raise StatsError(
                f"stats layer {layer_stats.name} has {layer_stats.channels} filters, "
                f"the model's {name} has {filters}"
            )
        if layer_stats.count == 0:
            raise StatsError(f"stats layer {layer_stats.name} counted no activation")
        out[name] = layer_stats
    return out
