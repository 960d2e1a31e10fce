"""PyTorch state dicts in ``.pth``/``.pt``/``.bin`` files (``torch.save``; the Hugging Face hub's
``pytorch_model.bin``): the only module that imports torch.

Loaded with ``torch.load(weights_only=True)``, which refuses to unpickle code, in a guarded child
process (:mod:`._guard`: a damaged file ends in one error line, never a crash or a hang);
anything but a flat ``{str: floating tensor}`` state dict (BatchNorm's int64
``num_batches_tracked`` apart) is refused. Provenance goes into a JSON sidecar
``<file>.vggnorm.json`` that records the sha256 of the weight file it describes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import WeightFileError
from ..core.torch_layouts import Layout
from ..core.weightset import WeightFile, WeightSet
from . import _patch, _torch
from ._guard import run_guarded
from ._patch import Patch
from ._torch import INT_KEY_SUFFIX, TorchWeights, one_line
from .digest import sha256_file
from .outputs import atomic_path

logger = logging.getLogger(__name__)

SUFFIXES = (".pth", ".pt", ".bin")  # .bin: the Hugging Face hub's pytorch_model.bin
FORMAT = "pth"
#: Sidecar suffix appended to a ``.pth`` file's name for its provenance.
SIDECAR_SUFFIX = ".vggnorm.json"
#: Sidecar key holding the sha256 of the weight file it describes.
SIDECAR_HASH_KEY = "vggnorm.file_sha256"
_TORCH_INSTALL = "pip install 'vggnorm[torch]'"

def _import_torch(verb: str) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{verb} .pth needs torch: {_TORCH_INSTALL}") from e
    return torch


def _read_pth(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The state dict as numpy arrays and stored dtype names (run in the guarded child)."""
    torch = _import_torch("reading")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightFileError(
            f"{path}: cannot be loaded as a plain state dict with torch.load(weights_only=True) "
            f"({one_line(e)}); vggnorm never unpickles code"
        ) from e
    if not isinstance(obj, Mapping):
        raise WeightFileError(
            f"{path}: holds a {type(obj).__name__}, expected a state dict {{name: tensor}}"
        )
    state: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            hint = (
                f"; a checkpoint with a {key!r} entry: save its state dict alone"
                if key in ("state_dict", "model")
                else ""
            )
            raise WeightFileError(
                f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor "
                f"(only plain state dicts are read){hint}"
            )
        counter = key.endswith(INT_KEY_SUFFIX) and value.dtype == torch.int64
        if not value.is_floating_point() and not counter:
            raise WeightFileError(f"{path}: {key} has dtype {value.dtype}; expected floats")
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            state[key], dtypes[key] = t.float().numpy().copy(), "bfloat16"
        else:
            arr = t.numpy().copy()
            state[key], dtypes[key] = arr, arr.dtype.name
    return state, dtypes


def _write_pth(tmp: Path, state: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> None:
    torch = _import_torch("writing")
    tensors: dict[str, Any] = {}
    for key, arr in state.items():
        name = dtypes.get(key, arr.dtype.name)
        t = torch.from_numpy(np.array(arr, order="C", copy=True))  # 0-d stays 0-d
        tensors[key] = t.to(getattr(torch, name)).contiguous().clone()
    torch.save(tensors, tmp)



def write_tensors(path: Path, arrays: Mapping[str, np.ndarray], extra: Mapping[str, str]) -> None:
    """``torch.save`` of ``{name: tensor}`` plus the plain strings ``extra`` (what
    ``torch.load(weights_only=True)`` reads back), to ``path`` as it is (the caller makes the
    write atomic)."""
    torch = _import_torch("writing")
    out: dict[str, Any] = {k: torch.from_numpy(np.array(v, order="C", copy=True)) for k, v in arrays.items()}
    out.update(extra)
    torch.save(out, path)


def detect(path: Path) -> bool:
    """Whether this adapter reads ``path``: a ``.pth``, ``.pt`` or ``.bin`` suffix."""
    return path.suffix.lower() in SUFFIXES


def read_torch(path: Path) -> TorchWeights:
    """The state dict in canonical arrays (see :func:`vggnorm.formats.torch_files.read_torch`)."""
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    if importlib.util.find_spec("torch") is None:  # said here, not as damage from the child
        raise ImportError(f"reading .pth needs torch: {_TORCH_INSTALL}")
    state, dtypes = run_guarded(_read_pth, path, what=path, preload=("torch",))
    try:
        metadata = read_metadata(path)
    except WeightFileError as e:  # a stale sidecar must not make the weights unreadable
        logger.warning("ignoring provenance: %s", e)
        metadata = {}
    return _torch.canonical(path, "pth", state, dtypes, metadata)


def write_torch(
    path: Path, layout: Layout, arrays: Mapping[str, np.ndarray], source: TorchWeights | None,
    metadata: Mapping[str, str] | None, arch: str | None,
) -> Path:  # fmt: skip
    """Write canonical arrays as a ``layout`` state dict, atomically, with the sidecar (see
    :func:`vggnorm.formats.torch_files.write_torch`)."""
    state, dtypes, meta = _torch.state_to_write(path, layout, arrays, source, metadata, arch)
    meta.pop(SIDECAR_HASH_KEY, None)
    with atomic_path(path, suffix=path.suffix) as tmp:
        _write_pth(tmp, state, dtypes)
    sidecar = Path(str(path) + SIDECAR_SUFFIX)
    record = {**meta, SIDECAR_HASH_KEY: sha256_file(path)}
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The sidecar's provenance, ``{}`` without a sidecar.

    Raises:
        WeightFileError: an unreadable sidecar, or one whose recorded sha256 is not the file's
            (the file changed after vggnorm wrote it).
    """
    sidecar = Path(str(path) + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return {}
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightFileError(f"{sidecar}: unreadable provenance ({one_line(e)})") from e
    if not isinstance(record, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in record.items()
    ):
        raise WeightFileError(f"{sidecar}: provenance must be a JSON object of strings")
    recorded = record.pop(SIDECAR_HASH_KEY, None)
    if recorded != sha256_file(path):
        raise WeightFileError(
            f"{sidecar}: describes a file with sha256 {recorded}, but {path.name} differs; "
            f"the weights changed after vggnorm wrote them (delete the sidecar to proceed)"
        )
    return dict(record)


def read(path: str | os.PathLike[str]) -> WeightSet:
    """The file as a :class:`~vggnorm.core.weightset.WeightSet` with Keras layer names."""
    return _torch.weight_set(read_torch(Path(path)))


def read_scales(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The per-layer scales vggnorm stored in the sidecar, by layer name."""
    return _torch.scales_of(read_metadata(Path(path)), Path(path))


def check_target(src: Path, dst: Path, force: bool) -> None:
    """Refuse an output of another format, over the input or an existing file, or unwritable."""
    _patch.check_target(src, dst, force, detect)


def write(src: WeightFile, dst: Path, patch: Patch, force: bool) -> list[str]:
    """``src`` in its own layout with ``patch`` applied; provenance and scales in the sidecar.
    Returns ``[]``: nothing is ever dropped."""
    check_target(src.path, dst, force)
    tw = read_torch(src.path)
    write_torch(dst, tw.layout, {**tw.arrays, **patch.arrays}, tw, _patch.metadata(patch),
                tw.arch)  # fmt: skip
    return []
