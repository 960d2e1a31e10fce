"""Reading and writing PyTorch VGG weight files: ``.safetensors`` and ``.pth``/``.pt`` state dicts.

The only module that touches torch (STYLE.md practice 13), and only for ``.pth``: safetensors files
are read and written with the ``safetensors`` package on numpy buffers, so they need no torch.
``.pth`` files are loaded with ``torch.load(weights_only=True)``, which refuses to unpickle code;
anything but a flat ``{str: floating tensor}`` state dict is refused.

Stored dtypes are kept: float32/float16/float64 arrays are returned as stored, bfloat16 (which numpy
lacks) is widened exactly to float32 and narrowed back (round to nearest even) on writing.
Provenance goes into the safetensors header (``__metadata__``, str -> str) or, for ``.pth``, into a
JSON sidecar ``<file>.vggnorm.json`` that records the sha256 of the weight file it describes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .archs import ARCHS
from .atomic import atomic_path, check_output
from .errors import WeightFileError
from .torch_layouts import (
    ADAIN_INPUT_CONV,
    LAYOUTS,
    Layout,
    LayoutInfo,
    detect_arch,
    detect_layout,
    from_canonical,
    to_canonical,
)
from .weights_io import sha256_file
from .weightset import LayerEntry, WeightFile, WeightSet

Container = Literal["safetensors", "pth"]

logger = logging.getLogger(__name__)

#: Sidecar suffix appended to a ``.pth`` file's name for its provenance.
SIDECAR_SUFFIX = ".vggnorm.json"
#: Sidecar key holding the sha256 of the weight file it describes.
SIDECAR_HASH_KEY = "vggnorm.file_sha256"

_SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
}
_TORCH_INSTALL = "pip install 'vggnorm[torch]'"


@dataclass(frozen=True)
class TorchWeights:
    """A PyTorch VGG weight file, read.

    Attributes:
        path: the file.
        container: ``"safetensors"`` or ``"pth"``.
        layout: ``"torchvision"``, ``"gatys"`` or ``"adain"``.
        arch: ``"vgg16"`` or ``"vgg19"``.
        arrays: canonical Keras-layout arrays (see :mod:`vggnorm.torch_layouts`), dtype as stored
            (bfloat16 widened to float32).
        state: the whole state dict as numpy arrays, in the file's key order (source of the key
            order and of the tensors the canonical map does not name, e.g. AdaIN's ``0.*``).
        dtypes: state key -> stored dtype name (``"float32"``, ``"float16"``, ``"bfloat16"``, ...).
        metadata: the safetensors ``__metadata__`` header or the ``.pth`` sidecar, str -> str.
    """

    path: Path
    container: Container
    layout: Layout
    arch: str
    arrays: Mapping[str, np.ndarray]
    state: Mapping[str, np.ndarray]
    dtypes: Mapping[str, str]
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def info(self) -> LayoutInfo:
        """Preprocessing, padding, pooling and flatten order of the layout."""
        return LAYOUTS[self.layout]


def container_of(path: Path | str) -> Container:
    """The container a path's suffix selects.

    Args:
        path: a file name ending in ``.safetensors``, ``.pth`` or ``.pt``.

    Returns:
        ``"safetensors"`` or ``"pth"``.

    Raises:
        WeightFileError: any other suffix.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pth", ".pt"):
        return "pth"
    raise WeightFileError(
        f"{path}: unknown PyTorch weight suffix {suffix!r}; expected .safetensors, .pth or .pt"
    )


def _import_torch(verb: str) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{verb} .pth needs torch: {_TORCH_INSTALL}") from e
    return torch


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits, to nearest even (what torch's ``.to(bfloat16)`` does)."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            stored = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        raw = safetensors.deserialize(path.read_bytes())  # type: ignore[no-untyped-call]
    except Exception as e:
        raise WeightFileError(f"{path}: not a readable safetensors file ({_one_line(e)})") from e
    state: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for key, spec in sorted(raw, key=lambda item: item[0]):
        code = str(spec["dtype"])
        if code not in _SAFETENSORS_DTYPES:
            raise WeightFileError(f"{path}: {key} has dtype {code}; expected a float tensor")
        name = _SAFETENSORS_DTYPES[code]
        if code == "BF16":
            arr = _bf16_to_f32(np.frombuffer(spec["data"], dtype="<u2"))
        else:
            arr = np.frombuffer(spec["data"], dtype=np.dtype(name).newbyteorder("<"))
            arr = arr.astype(np.dtype(name))  # native byte order, own writable copy
        state[key] = arr.reshape([int(n) for n in spec["shape"]])
        dtypes[key] = name
    if set(state) != set(stored):
        raise WeightFileError(f"{path}: header and data disagree on the tensor names")
    return state, dtypes, metadata


def _read_pth(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    torch = _import_torch("reading")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightFileError(
            f"{path}: cannot be loaded as a plain state dict with torch.load(weights_only=True) "
            f"({_one_line(e)}); vggnorm never unpickles code"
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
        if not value.is_floating_point():
            raise WeightFileError(f"{path}: {key} has dtype {value.dtype}; expected floats")
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            state[key], dtypes[key] = t.float().numpy().copy(), "bfloat16"
        else:
            arr = t.numpy().copy()
            state[key], dtypes[key] = arr, arr.dtype.name
    return state, dtypes


def read_torch(path: Path | str) -> TorchWeights:
    """Read a PyTorch VGG state dict and convert it to canonical arrays.

    Args:
        path: a ``.safetensors``, ``.pth`` or ``.pt`` file.

    Returns:
        :class:`TorchWeights`; ``metadata`` is the safetensors header metadata or the sidecar's.

    Raises:
        WeightFileError: missing, corrupt or truncated file, a pickle holding anything but tensors,
            non-float or non-finite weights, an unknown layout or wrong shapes.
        ArchitectureError: a batch-norm VGG.
        ImportError: a ``.pth`` file and torch is not installed.

    Example:
        >>> tw = read_torch("vgg16.safetensors")  # doctest: +SKIP
        >>> tw.layout, tw.arch, tw.arrays["block1_conv1/kernel"].shape  # doctest: +SKIP
        ('torchvision', 'vgg16', (3, 3, 3, 64))
    """
    path = Path(path)
    container = container_of(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    if container == "safetensors":
        state, dtypes, metadata = _read_safetensors(path)
    else:
        state, dtypes = _read_pth(path)
        try:
            metadata = read_provenance(path)
        except WeightFileError as e:  # a stale sidecar must not make the weights unreadable
            logger.warning("ignoring provenance: %s", e)
            metadata = {}
    for key, arr in state.items():
        if not np.all(np.isfinite(arr)):
            raise WeightFileError(f"{path}: {key} holds NaN or infinite values")
    shapes = {k: tuple(int(n) for n in v.shape) for k, v in state.items()}
    try:
        layout = detect_layout(shapes)
        arch = detect_arch(shapes, layout)
    except WeightFileError as e:
        raise WeightFileError(f"{path}: {e}") from e
    arrays = to_canonical(state, layout, arch)
    return TorchWeights(path, container, layout, arch, arrays, state, dtypes, metadata)


def _arch_of(canonical: Mapping[str, np.ndarray]) -> str:
    for name, arch in ARCHS.items():
        names = {f"{c}/kernel" for c in arch.conv_names}
        convs = {k for k, v in canonical.items() if k.endswith("/kernel") and np.ndim(v) == 4}
        if convs == names:
            return name
    raise WeightFileError("canonical arrays match neither VGG16 nor VGG19 conv names")


def _checked_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str; {k!r} -> {type(v).__name__}")
    return dict(metadata)


def _write_safetensors(
    tmp: Path, state: Mapping[str, np.ndarray], dtypes: Mapping[str, str], metadata: dict[str, str]
) -> None:
    import safetensors

    buffers: dict[str, np.ndarray] = {}
    specs: dict[str, Any] = {}
    for key, arr in state.items():
        name = dtypes.get(key, arr.dtype.name)
        if name == "bfloat16":
            buf = _f32_to_bf16(arr)
        else:
            buf = np.ascontiguousarray(arr, dtype=np.dtype(name).newbyteorder("<"))
        buffers[key] = buf  # keeps the memory alive while serialize_file reads the pointers
        specs[key] = safetensors.TensorSpec(
            dtype=name, shape=list(arr.shape), data_ptr=buf.ctypes.data, data_len=buf.nbytes
        )
    safetensors.serialize_file(specs, tmp, metadata=metadata or None)


def _write_pth(tmp: Path, state: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> None:
    torch = _import_torch("writing")
    tensors: dict[str, Any] = {}
    for key, arr in state.items():
        name = dtypes.get(key, arr.dtype.name)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        tensors[key] = t.to(getattr(torch, name)).contiguous().clone()
    torch.save(tensors, tmp)


def write_torch(
    path: Path | str,
    layout: Layout,
    canonical_arrays: Mapping[str, np.ndarray],
    *,
    source: TorchWeights | None = None,
    metadata: Mapping[str, str] | None = None,
    arch: str | None = None,
) -> Path:
    """Write canonical arrays as a ``layout`` state dict, atomically, in the container of the suffix.

    Args:
        path: target ``.safetensors``, ``.pth`` or ``.pt``.
        layout: the state-dict layout to write.
        canonical_arrays: ``"<layer>/kernel"``/``"<layer>/bias"`` arrays; not modified.
        source: the file that was read: its key order, stored dtypes, untouched tensors (AdaIN's
            ``0.*``) and metadata are kept; without it AdaIN gets the published input conv.
        metadata: provenance, str -> str; merged over the source's metadata. For safetensors it
            goes into the header, for ``.pth`` into ``<path>.vggnorm.json`` (with the sha256 of
            the written file).
        arch: ``"vgg16"``/``"vgg19"``; default: the source's, or read off the conv names.

    Returns:
        The written path.

    Raises:
        WeightFileError: missing arrays, shapes that differ from the source, non-finite values.
        ImportError: ``.pth`` without torch installed.
        TypeError: metadata that is not str -> str.
    """
    path = Path(path)
    container = container_of(path)
    meta = _checked_metadata({**(source.metadata if source else {}), **(metadata or {})})
    meta.pop(SIDECAR_HASH_KEY, None)
    arch_name = arch or (source.arch if source else _arch_of(canonical_arrays))
    state = from_canonical(
        canonical_arrays, layout, arch_name, source.state if source is not None else None
    )
    for key, arr in state.items():
        if not np.all(np.isfinite(arr)):
            raise WeightFileError(f"{path}: refusing to write {key}: NaN or infinite values")
    dtypes = dict(source.dtypes) if source is not None else {}
    with atomic_path(path, suffix=path.suffix) as tmp:
        if container == "safetensors":
            _write_safetensors(tmp, state, dtypes, meta)
        else:
            _write_pth(tmp, state, dtypes)
    if container == "pth":
        sidecar = Path(str(path) + SIDECAR_SUFFIX)
        record = {**meta, SIDECAR_HASH_KEY: sha256_file(path)}
        with atomic_path(sidecar) as tmp:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_provenance(path: Path | str) -> dict[str, str]:
    """The provenance vggnorm wrote with a PyTorch weight file, or ``{}`` when there is none.

    Args:
        path: a ``.safetensors`` file (header metadata) or ``.pth``/``.pt`` (its sidecar).

    Returns:
        str -> str; for ``.pth`` without the internal file-hash key.

    Raises:
        WeightFileError: an unreadable header or sidecar, or a sidecar whose recorded sha256 is not
            the file's (the file changed after vggnorm wrote it).
    """
    path = Path(path)
    if container_of(path) == "safetensors":
        import safetensors

        try:
            with safetensors.safe_open(str(path), framework="numpy") as f:
                return dict(f.metadata() or {})
        except Exception as e:
            raise WeightFileError(
                f"{path}: not a readable safetensors file ({_one_line(e)})"
            ) from e
    sidecar = Path(str(path) + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return {}
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightFileError(f"{sidecar}: unreadable provenance ({_one_line(e)})") from e
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


# ---------------------------------------------------------------------------------------------
# The weight-file interface every command uses (vggnorm.pipeline.read_any_weights/write_any_weights)

#: Metadata keys vggnorm writes: its provenance (JSON) and the per-layer scales (JSON lists).
PROVENANCE_KEY = "vggnorm.provenance"
SCALES_KEY = "vggnorm.scales"


def _adain_preprocess(tw: TorchWeights) -> str:
    """AdaIN's fixed 1x1 conv is caffe preprocessing of 0-255 RGB when it is the published one;
    statistics then run it as ``caffe`` preprocessing. Any other first layer is refused."""
    stock = ADAIN_INPUT_CONV
    w, b = (np.asarray(tw.state[k], np.float64).ravel() for k in ("0.weight", "0.bias"))
    # float32 storage of the published values: equal to a few ulps of 255 and 124
    if np.allclose(w, stock["0.weight"].ravel(), rtol=0, atol=1e-4) and np.allclose(
        b, stock["0.bias"], rtol=0, atol=1e-4
    ):
        return "caffe"
    raise WeightFileError(
        f"{tw.path}: the AdaIN layout's first 1x1 conv is not the published RGB [0, 1] -> caffe "
        "BGR conversion; vggnorm cannot tell what input it expects"
    )


def read_torch_weights(path: Path | str) -> WeightSet:
    """A PyTorch file as a :class:`~vggnorm.weightset.WeightSet` with Keras layer names, so that
    binding, statistics, rescaling and verification treat it like any Keras file.

    Raises:
        WeightFileError, ArchitectureError, ImportError: as :func:`read_torch`.
    """
    tw = read_torch(path)
    by_layer: dict[str, list[str]] = {}
    for key in tw.arrays:
        layer, role = key.rsplit("/", 1)
        by_layer.setdefault(layer, []).append(role)
    layers = tuple(
        LayerEntry(
            name,
            tuple(f"{name}/{r}" for r in roles),
            tuple(tuple(int(n) for n in tw.arrays[f"{name}/{r}"].shape) for r in roles),
            tuple(str(tw.arrays[f"{name}/{r}"].dtype) for r in roles),
            tuple(roles),
        )
        for name, roles in by_layer.items()
    )
    provenance = None
    if PROVENANCE_KEY in tw.metadata:
        try:
            provenance = json.loads(tw.metadata[PROVENANCE_KEY])
        except ValueError as e:
            raise WeightFileError(f"{tw.path}: unreadable vggnorm provenance: {e}") from e
    preprocess = _adain_preprocess(tw) if tw.layout == "adain" else tw.info.preprocessing
    wf = WeightFile(tw.path, tw.container, layers, None, provenance, tw.layout, preprocess)
    return WeightSet(wf, tw.arrays)


def write_torch_weights(
    src: WeightFile,
    dst: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    provenance: Mapping[str, Any],
    extra: Mapping[str, np.ndarray] | None = None,
    *,
    force: bool = False,
) -> list[str]:
    """Write ``src`` (a PyTorch file) to ``dst`` in its own container and layout with ``arrays``
    (Keras names) replaced; provenance and ``extra`` arrays go into the metadata (safetensors
    header, or the ``.pth`` sidecar). Returns ``[]`` (nothing is ever dropped)."""
    dst_path = Path(dst)
    if container_of(dst_path) != container_of(src.path):
        raise WeightFileError(
            f"--out {dst_path.name} must be a {src.path.suffix} file like --in {src.path.name}: "
            "apply keeps the input's format (use `vggnorm export` to convert)"
        )
    check_output(dst_path, force=force, inputs=[src.path], error=WeightFileError)
    tw = read_torch(src.path)
    merged = {**tw.arrays, **arrays}
    metadata = {PROVENANCE_KEY: json.dumps(dict(provenance), sort_keys=True)}
    if extra:
        metadata[SCALES_KEY] = json.dumps({k: np.asarray(v).tolist() for k, v in extra.items()})
    write_torch(dst_path, tw.layout, merged, source=tw, metadata=metadata, arch=tw.arch)
    return []
