"""The steps every command shares: load and bind weights, tie stats to them, turn stats into
scales, check a rescaled function, rebuild the decoding settings a stats file was made with.
Outputs are guarded by :mod:`vggnorm.atomic`.

Commands (:mod:`~vggnorm.collect`, :mod:`~vggnorm.normalize`, :mod:`~vggnorm.verify`,
:mod:`~vggnorm.report`, :mod:`~vggnorm.bn`, :mod:`~vggnorm.export`, :mod:`~vggnorm.compare`) call
these and never each other. No framework import here: Keras stays in :mod:`vggnorm.model`.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from .data import Dataset, Decode, Resize, open_dataset
from .errors import StatsError, VggnormError
from .rescale import DEAD_THRESHOLD, Scales, compute_scales, rescale
from .statsfile import StatsMeta, StatsRecord, stats_by_conv
from .topology import Bound, bind, fingerprint
from .weightset import WeightFile, WeightSet

#: The function check of ``verify`` and ``report``: a normalized layer's activations times the
#: scales must equal the original's to this fraction of the layer's largest activation. float32
#: rounds each product of a K-term dot product (K <= 4608 in VGG) with error ~sqrt(K) * 2^-24
#: relative to the layer's scale, ~1e-6 per layer, compounding over 16 layers to ~1e-5 at worst.
FUNCTION_TOL = 1e-4


@dataclass(frozen=True)
class Progress:
    """Where a run stands, passed to the progress callback after every batch."""

    done: int  # items of the selection consumed (images counted + skipped)
    total: int
    images: int
    skipped: int


def now() -> str:
    """The current UTC time, ISO 8601 to the second (for provenance)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class Loaded:
    """A weight file's arrays bound to its architecture."""

    weights: WeightSet
    bound: Bound

    @property
    def arrays(self) -> Mapping[str, np.ndarray]:
        return self.weights.arrays

    @property
    def path(self) -> Path:
        return self.weights.file.path

    def fingerprint(self) -> str:
        return fingerprint(self.arrays, self.bound.arch.weighted_features)


def read_any_weights(path: str | os.PathLike[str]) -> WeightSet:
    """Read a Keras (``.h5``, ``.weights.h5``, ``.keras``; in a child process with a deadline,
    see :mod:`vggnorm.guard`) or PyTorch (``.safetensors``: parsed by the safetensors library,
    which bounds-checks its header; ``.pth``/``.pt``: ``torch.load(weights_only=True)``) file."""
    from .weightset import suffix_of

    p = Path(path)
    if suffix_of(p) in (".safetensors", ".pth", ".pt"):
        from .torch_io import read_torch_weights

        return read_torch_weights(p)
    from .weights_io import read_weights

    return read_weights(p)


def with_padding(loaded: Loaded, padding: str | None) -> Loaded:
    """``loaded`` with every conv padding its input as ``padding`` says (None: as the file's
    layout does): statistics for AdaIN are gathered with its reflection padding."""
    if padding is None or padding == loaded.bound.arch.padding:
        return loaded
    if padding not in ("zero", "reflect"):
        raise VggnormError(f"unknown padding {padding!r}; expected zero or reflect")
    arch = replace(loaded.bound.arch, padding=padding)  # type: ignore[arg-type]
    return Loaded(loaded.weights, Bound(arch, f"{loaded.bound.source}, {padding} padding"))


def write_any_weights(
    src: WeightFile,
    dst: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    provenance: Mapping[str, Any],
    extra: Mapping[str, np.ndarray] | None = None,
    *,
    force: bool = False,
) -> list[str]:
    """Write ``src`` to ``dst`` in its own format and layout with ``arrays`` replaced; returns
    the groups dropped (optimizer state). See :func:`vggnorm.weights_io.write_weights`."""
    if src.format in ("safetensors", "pth"):
        from .torch_io import write_torch_weights

        return write_torch_weights(src, dst, arrays, provenance, extra, force=force)
    from .weights_io import write_weights

    return write_weights(src, dst, arrays, provenance, extra, force=force)


def load(path: str | os.PathLike[str], model: str | None = None) -> Loaded:
    """Read a weight file and bind it to its architecture (``model`` checks it)."""
    ws = read_any_weights(path)
    return Loaded(ws, bind(ws.file, model))


def default_preprocess(loaded: Loaded) -> str:
    """The input convention of a weight file's layout: ``caffe`` for Keras's VGG (and Gatys's
    and AdaIN's files), ``torch`` for torchvision's."""
    return loaded.weights.file.preprocess or "caffe"


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
            "download them elsewhere and pass the file's path"
        ) from e


def check_fingerprint(loaded: Loaded, record: StatsRecord, what: str) -> None:
    """Refuse stats gathered on other conv weights than ``loaded``'s."""
    fp = loaded.fingerprint()
    if fp != record.meta.fingerprint:
        raise StatsError(
            f"{what} {loaded.path} is not the model the stats were gathered on (conv weights "
            f"fingerprint {fp[:12]} vs {record.meta.fingerprint[:12]} from {record.meta.weights}); "
            "gather stats on this file first"
        )


# ---------------------------------------------------------------------------------------------
# Stats -> scales -> weights


def scales_for(record: StatsRecord, bound: Bound, dead_threshold: float = DEAD_THRESHOLD) -> Scales:
    """Scales for ``bound``'s convs from ``record``, matched by position (names differ by format)."""
    matched = stats_by_conv(record, [(c.name, c.filters) for c in bound.arch.convs])
    means = {name: s.mean for name, s in matched.items()}
    return compute_scales(means, bound.conv_names, dead_threshold)


def rescale_bound(
    arrays: Mapping[str, np.ndarray], bound: Bound, scales: Scales, *, inverse: bool = False
) -> dict[str, np.ndarray]:
    """:func:`vggnorm.rescale.rescale` with everything the architecture says: the first Dense of
    the head and its flatten order, and the BatchNorms between convs and their ReLUs."""
    head = bound.arch.head
    dense = head is not None and bool(head.dense)
    return rescale(
        arrays,
        scales,
        head.dense[0].name if head is not None and dense else None,
        head.reduce if head is not None and dense else None,
        norms=bound.arch.norms,
        flatten_order=head.flatten_order if head is not None else "hwc",
        inverse=inverse,
    )


def function_errors(
    original: Sequence[np.ndarray], normalized: Sequence[np.ndarray], scales: Sequence[np.ndarray]
) -> list[float]:
    """Per layer, ``max |a_norm * s - a| / max |a|``: 0 for the same function up to rounding."""
    errors = []
    for a, b, s in zip(original, normalized, scales, strict=True):
        err = float(np.max(np.abs(b.astype(np.float64) * s - a), initial=0.0))
        errors.append(err / max(float(np.max(np.abs(a), initial=0.0)), 1e-30))
    return errors


# ---------------------------------------------------------------------------------------------
# What a stats file says about decoding and data


def decode_of(meta: StatsMeta) -> Decode:
    """The image decoding a stats run used, to decode the same images the same way again."""
    return Decode(meta.size, cast(Resize, meta.resize), meta.interpolation, meta.draft)


def stats_dataset(record: StatsRecord, data: str | os.PathLike[str] | None = None) -> Dataset:
    """The images a stats run counted, under its dataset root (or ``data``, if it moved)."""
    root = Path(record.meta.dataset_root) if data is None else open_dataset(data).root
    kind = record.meta.dataset_kind
    return Dataset(kind, root, record.images, root)  # type: ignore[arg-type]


def named_as(other: Loaded, like: Loaded) -> dict[str, np.ndarray]:
    """``other``'s conv (and conv BatchNorm) arrays under ``like``'s layer names, matched by
    position: the same network saved in another format or layout names its layers otherwise.

    Raises:
        ArchitectureError: the two hold different conv chains.
    """
    from .errors import ArchitectureError

    a, b = like.bound.arch, other.bound.arch
    shapes_a = [(c.filters, c.kernel_size) for c in a.convs]
    shapes_b = [(c.filters, c.kernel_size) for c in b.convs]
    if shapes_a != shapes_b or len(a.weighted_features) != len(b.weighted_features):
        raise ArchitectureError(f"{other.path} is not the same network as {like.path}")
    names = dict(zip(b.weighted_features, a.weighted_features))
    out = {}
    for key, value in other.arrays.items():
        layer, role = key.rsplit("/", 1)
        if layer in names:
            out[f"{names[layer]}/{role}"] = value
    return out


def stock_named(loaded: Loaded) -> dict[str, np.ndarray]:
    """A stock VGG16/VGG19's arrays under Keras's layer names (files name their layers in many
    ways), with the first Dense's rows in PyTorch's (C, H, W) flatten order."""
    from .archs import ARCHS

    stock = ARCHS[loaded.bound.arch.name]
    names = dict(zip(loaded.bound.conv_names, stock.conv_names))
    head = loaded.bound.arch.head
    if head is not None and stock.head is not None:
        names.update(zip((d.name for d in head.dense), (d.name for d in stock.head.dense)))
    out = {}
    for key, value in loaded.arrays.items():
        layer, role = key.rsplit("/", 1)
        if layer in names:
            out[f"{names[layer]}/{role}"] = value
    if head is not None and head.flatten_order == "hwc" and "fc1/kernel" in out:
        from .torch_layouts import keras_rows_to_torch

        out["fc1/kernel"] = keras_rows_to_torch(out["fc1/kernel"], stock.convs[-1].filters)
    return out
