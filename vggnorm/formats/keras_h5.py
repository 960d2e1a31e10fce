"""Keras weights in HDF5: every ``.h5`` layout and ``.weights.h5`` (h5py and the standard library).

Layouts (docs/formats.md), detected explicitly by :func:`detect_layout`:

``legacy-h5``
    ``save_weights('x.h5')`` of Keras 1/2/3 and the files ``keras.applications`` downloads: root
    attribute ``layer_names`` (possibly chunked ``layer_names0..N``), one group per layer with a
    ``weight_names`` attribute naming its datasets in order.
``legacy-h5-model``
    a whole model saved to ``.h5``: ``model_config`` at the root, weights as above under
    ``model_weights/``, maybe ``optimizer_weights/``.
``weights-h5``
    Keras 3 ``.weights.h5``: ``layers/<key>/vars/<i>``, keys made from class names, not layer names.

The writer never rebuilds a file from scratch: it copies every group, dataset and attribute of the
source, replaces only the datasets whose values changed (same shape, same dtype), drops optimizer
state (it belongs to the old weights) and adds a ``vggnorm`` provenance group. It writes to a
temporary file beside the target and renames it into place, so no half-written file is ever left
under the target's name. Reads run in a guarded child process (:mod:`._guard`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core.errors import WeightFileError
from ..core.weightset import Format, WeightFile, WeightSet, suffix_of
from . import _h5, _patch
from ._guard import run_guarded
from ._patch import Patch
from .outputs import atomic_path

SUFFIXES = (".h5", ".hdf5", ".weights.h5")


def detect(path: Path) -> bool:
    """Whether this adapter reads ``path`` (by its suffix, as Keras chooses its loader)."""
    return suffix_of(path) in SUFFIXES


def detect_layout(path: str | os.PathLike[str]) -> Format:
    """Which Keras HDF5 layout ``path`` holds.

    Raises:
        WeightFileError: missing file, not HDF5, or no known layout inside.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightFileError(f"{p}: no such file")
    with _h5.open_h5(p) as f:
        return _layout_of(f, p)


def _layout_of(f: object, p: Path) -> Format:
    if suffix_of(p) == ".weights.h5":
        if "layers" in f or "vars" in f:  # type: ignore[operator]
            return "weights-h5"
        raise WeightFileError(f"{p}: .weights.h5 file without a 'layers' group")
    if "model_weights" in f:  # type: ignore[operator]
        return "legacy-h5-model"
    if _h5.attr_list(f, "layer_names") is not None:
        return "legacy-h5"
    if "layers" in f:  # type: ignore[operator]
        raise WeightFileError(
            f"{p}: holds Keras 3 .weights.h5 data but is named {p.name}; Keras loads by "
            "suffix, so rename it to end in .weights.h5"
        )
    raise WeightFileError(
        f"{p}: no Keras weights found (expected a 'layer_names' attribute, 'model_weights' "
        "group or 'layers' group)"
    )


def inspect(path: str | os.PathLike[str]) -> WeightFile:
    """Describe the file (layout, layers, shapes, config, provenance) without its arrays, in a
    guarded child process: a damaged file ends in one :class:`WeightFileError`."""
    return run_guarded(_inspect, Path(path), what=Path(path))


def _inspect(p: Path) -> WeightFile:
    with _h5.open_h5(p) as f:
        fmt = _layout_of(f, p)
        return _h5.describe(f, p, fmt, _h5.model_config(f) if fmt == "legacy-h5-model" else None)


def read(path: str | os.PathLike[str]) -> WeightSet:
    """Every weight array of the file, keyed ``<layer>/<role>``, read in a guarded child."""
    return run_guarded(_read, Path(path), what=Path(path))


def _read(p: Path) -> WeightSet:
    if not p.is_file():
        raise WeightFileError(f"{p}: no such file")
    with _h5.open_h5(p) as f:  # one open for the description, the check and the arrays
        fmt = _layout_of(f, p)
        wf = _h5.describe(f, p, fmt, _h5.model_config(f) if fmt == "legacy-h5-model" else None)
        _h5.touch_all(f)  # every attribute the writer will copy is parsed here, in the child
        return WeightSet(wf, _h5.read_arrays(f, wf))


def read_scales(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The per-layer scales stored in a file vggnorm wrote, by layer name."""
    return run_guarded(_read_scales, Path(path), what=Path(path))


def _read_scales(p: Path) -> dict[str, np.ndarray]:
    with _h5.open_h5(p) as f:
        return _h5.read_scales(f)


def check_target(src: Path, dst: Path, force: bool) -> None:
    """Refuse outputs that would not load the way ``src`` does, overwrite it, or clobber a file."""

    def loads_alike(path: Path) -> bool:  # .h5 and .hdf5 load the same way
        pair = {suffix_of(path), suffix_of(src)}
        return len(pair) == 1 or pair == {".h5", ".hdf5"}

    why = "Keras picks the loader by suffix, so the output keeps the input's format"
    _patch.check_target(src, dst, force, loads_alike, why)


def write(src: WeightFile, dst: Path, patch: Patch, force: bool) -> list[str]:
    """Write ``src`` to ``dst`` with ``patch`` applied, atomically; returns the groups dropped.

    Raises:
        WeightFileError: bad target, mismatched array, or an I/O error (disk full...). Nothing is
            left under ``dst`` when this is raised.
    """
    _h5.need_h5py()
    check_target(src.path, dst, force)
    try:
        with atomic_path(dst) as tmp:
            return _h5.patch_h5(src.path, tmp, src, patch)
    except OSError as e:
        raise WeightFileError(f"could not write {dst}: {e.strerror or e}") from e
    except (RuntimeError, KeyError, ValueError) as e:  # h5py on a source damaged since it was read
        raise WeightFileError(f"{src.path}: unreadable while copying it: {e}") from e
