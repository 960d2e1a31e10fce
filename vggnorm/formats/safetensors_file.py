"""PyTorch state dicts in ``.safetensors`` files, read and written with the ``safetensors``
package on numpy buffers: no torch needed, no code in the file. Reads run in a guarded child
process (:mod:`._guard`), like every weight file's. Provenance goes into the header metadata
(``__metadata__``, str -> str).
"""

from __future__ import annotations

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
from ._torch import INT_KEY_SUFFIX, TorchWeights, bf16_to_f32, f32_to_bf16, one_line
from .outputs import atomic_path

SUFFIXES = (".safetensors",)
FORMAT = "safetensors"

_SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",  # BatchNorm's num_batches_tracked only
}


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            stored = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        raw = safetensors.deserialize(path.read_bytes())  # type: ignore[no-untyped-call]
    except Exception as e:
        raise WeightFileError(f"{path}: not a readable safetensors file ({one_line(e)})") from e
    state: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for key, spec in sorted(raw, key=lambda item: item[0]):
        code = str(spec["dtype"])
        if code not in _SAFETENSORS_DTYPES or (code == "I64" and not key.endswith(INT_KEY_SUFFIX)):
            raise WeightFileError(f"{path}: {key} has dtype {code}; expected a float tensor")
        name = _SAFETENSORS_DTYPES[code]
        if code == "BF16":
            arr = bf16_to_f32(np.frombuffer(spec["data"], dtype="<u2"))
        else:
            arr = np.frombuffer(spec["data"], dtype=np.dtype(name).newbyteorder("<"))
            arr = arr.astype(np.dtype(name))  # native byte order, own writable copy
        state[key] = arr.reshape([int(n) for n in spec["shape"]])
        dtypes[key] = name
    if set(state) != set(stored):
        raise WeightFileError(f"{path}: header and data disagree on the tensor names")
    return state, dtypes, metadata


def _write_safetensors(
    tmp: Path, state: Mapping[str, np.ndarray], dtypes: Mapping[str, str], metadata: dict[str, str]
) -> None:
    import safetensors

    buffers: dict[str, np.ndarray] = {}
    specs: dict[str, Any] = {}
    for key, arr in state.items():
        name = dtypes.get(key, arr.dtype.name)
        if name == "bfloat16":
            buf = f32_to_bf16(arr)
        else:
            buf = np.ascontiguousarray(arr, dtype=np.dtype(name).newbyteorder("<"))
        buffers[key] = buf  # keeps the memory alive while serialize_file reads the pointers
        specs[key] = safetensors.TensorSpec(
            dtype=name, shape=list(arr.shape), data_ptr=buf.ctypes.data, data_len=buf.nbytes
        )
    safetensors.serialize_file(specs, tmp, metadata=metadata or None)



def write_arrays(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """``arrays`` (numpy dtypes) and header ``metadata`` to ``path`` as it is (the caller makes the
    write atomic)."""
    _write_safetensors(path, arrays, {k: v.dtype.name for k, v in arrays.items()}, dict(metadata))


def detect(path: Path) -> bool:
    """Whether this adapter reads ``path``: a ``.safetensors`` suffix."""
    return path.suffix.lower() in SUFFIXES


def read_torch(path: Path) -> TorchWeights:
    """The state dict in canonical arrays (see :func:`vggnorm.formats.torch_files.read_torch`)."""
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    state, dtypes, metadata = run_guarded(_read_safetensors, path, what=path)
    return _torch.canonical(path, "safetensors", state, dtypes, metadata)


def write_torch(
    path: Path, layout: Layout, arrays: Mapping[str, np.ndarray], source: TorchWeights | None,
    metadata: Mapping[str, str] | None, arch: str | None,
) -> Path:  # fmt: skip
    """Write canonical arrays as a ``layout`` state dict, atomically (see
    :func:`vggnorm.formats.torch_files.write_torch`)."""
    state, dtypes, meta = _torch.state_to_write(path, layout, arrays, source, metadata, arch)
    with atomic_path(path, suffix=path.suffix) as tmp:
        _write_safetensors(tmp, state, dtypes, meta)
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The header metadata alone."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise WeightFileError(f"{path}: not a readable safetensors file ({one_line(e)})") from e


def read(path: str | os.PathLike[str]) -> WeightSet:
    """The file as a :class:`~vggnorm.core.weightset.WeightSet` with Keras layer names."""
    return _torch.weight_set(read_torch(Path(path)))


def read_scales(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The per-layer scales vggnorm stored in the header, by layer name."""
    return _torch.scales_of(read_metadata(Path(path)), Path(path))


def check_target(src: Path, dst: Path, force: bool) -> None:
    """Refuse an output of another format, over the input or an existing file, or unwritable."""
    _patch.check_target(src, dst, force, detect)


def write(src: WeightFile, dst: Path, patch: Patch, force: bool) -> list[str]:
    """``src`` in its own layout with ``patch`` applied; provenance and scales in the header.
    Returns ``[]``: nothing is ever dropped."""
    check_target(src.path, dst, force)
    tw = read_torch(src.path)
    write_torch(dst, tw.layout, {**tw.arrays, **patch.arrays}, tw, _patch.metadata(patch),
                tw.arch)  # fmt: skip
    return []
