"""Keras 3 ``.keras`` archives: a zip of ``config.json``, ``metadata.json`` and ``model.weights.h5``.

The config is read as JSON data (never deserialized); the weights member is extracted to a scratch
folder and read like a ``.weights.h5`` (:mod:`._h5`), in a guarded child process. The writer
patches that member and copies every other member byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import WeightFileError
from ..core.weightset import Format, WeightFile, WeightSet, suffix_of
from . import _h5
from ._guard import run_guarded
from ._patch import Patch
from .keras_h5 import check_target as check_target
from .outputs import atomic_path, temp_dir_beside

SUFFIXES = (".keras",)
LAYOUT: Format = "keras-zip"
_WEIGHTS = "model.weights.h5"


def detect(path: Path) -> bool:
    """Whether this adapter reads ``path``: a ``.keras`` suffix."""
    return suffix_of(path) in SUFFIXES


def detect_layout(path: str | os.PathLike[str]) -> Format:
    """``keras-zip`` for a zip archive named ``.keras``.

    Raises:
        WeightFileError: missing, or not a zip archive.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightFileError(f"{p}: no such file")
    if not zipfile.is_zipfile(p):
        raise WeightFileError(f"{p}: a .keras file must be a zip archive; this one is not")
    return LAYOUT


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """A folder for the guarded child's copy of the weights member, owned by this process:
    removed even when the child is killed at its deadline."""
    with tempfile.TemporaryDirectory(prefix="vggnorm-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def _weights_h5(path: Path, scratch: Path) -> Iterator[Any]:
    """The archive's weights member, extracted and opened."""
    inner = scratch / _WEIGHTS
    try:
        with zipfile.ZipFile(path) as z, z.open(_WEIGHTS) as src, open(inner, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError as e:
        raise WeightFileError(f"{path}: .keras archive has no {_WEIGHTS}") from e
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise WeightFileError(f"{path}: not a readable .keras archive: {e}") from e
    with _h5.open_h5(inner) as f:
        yield f


def _config(path: Path) -> dict[str, Any] | None:
    try:
        with zipfile.ZipFile(path) as z:
            if "config.json" not in z.namelist():
                return None
            value = json.loads(z.read("config.json").decode("utf8"))
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightFileError(f"{path}: unreadable config.json in .keras archive: {e}") from e
    return value if isinstance(value, dict) else None


def inspect(path: str | os.PathLike[str]) -> WeightFile:
    """Describe the archive without its arrays (guarded child)."""
    with _scratch() as scratch:
        return run_guarded(_inspect, Path(path), scratch, what=Path(path))


def _inspect(p: Path, scratch: Path) -> WeightFile:
    detect_layout(p)
    with _weights_h5(p, scratch) as f:
        return _h5.describe(f, p, LAYOUT, _config(p))


def read(path: str | os.PathLike[str]) -> WeightSet:
    """Every weight array of the archive, keyed ``<layer>/<role>`` (guarded child)."""
    with _scratch() as scratch:
        return run_guarded(_read, Path(path), scratch, what=Path(path))


def _read(p: Path, scratch: Path | None = None) -> WeightSet:
    """The reader itself, run in the guarded child (or, for tests, in this process)."""
    if scratch is None:
        with _scratch() as own:
            return _read(p, own)
    detect_layout(p)
    with _weights_h5(p, scratch) as f:  # one extraction for the description and the arrays
        wf = _h5.describe(f, p, LAYOUT, _config(p))
        _h5.touch_all(f)
        return WeightSet(wf, _h5.read_arrays(f, wf))


def read_scales(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The per-layer scales stored in an archive vggnorm wrote, by layer name."""
    with _scratch() as scratch:
        return run_guarded(_read_scales, Path(path), scratch, what=Path(path))


def _read_scales(p: Path, scratch: Path) -> dict[str, np.ndarray]:
    with _weights_h5(p, scratch) as f:
        return _h5.read_scales(f)


def write(src: WeightFile, dst: Path, patch: Patch, force: bool) -> list[str]:
    """Write ``src`` to ``dst`` with ``patch`` applied to its weights member, atomically.

    Raises:
        WeightFileError: bad target, mismatched array or an I/O error; nothing is left under
            ``dst`` then.
    """
    _h5.need_h5py()
    check_target(src.path, dst, force)
    try:
        with atomic_path(dst) as tmp:
            return _write(src, tmp, dst, patch)
    except OSError as e:
        raise WeightFileError(f"could not write {dst}: {e.strerror or e}") from e
    except (RuntimeError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise WeightFileError(f"{src.path}: unreadable while copying it: {e}") from e


def _write(src: WeightFile, tmp: Path, target: Path, patch: Patch) -> list[str]:
    with temp_dir_beside(target) as work:
        inner_in, inner_out = Path(work) / "in.h5", Path(work) / "out.h5"
        with zipfile.ZipFile(src.path) as z_in:
            with z_in.open(_WEIGHTS) as s, open(inner_in, "wb") as d:
                shutil.copyfileobj(s, d, 1 << 20)
            dropped = _h5.patch_h5(inner_in, inner_out, src, patch)
            with zipfile.ZipFile(tmp, "w") as z_out:
                for info in z_in.infolist():
                    if info.filename == _WEIGHTS:
                        z_out.write(inner_out, _WEIGHTS, compress_type=info.compress_type)
                    else:
                        z_out.writestr(info, z_in.read(info.filename))
    return dropped
