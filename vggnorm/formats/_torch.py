"""What the two PyTorch containers share: a state dict read into canonical arrays, and canonical
arrays turned back into a state dict of a layout. No torch import here (``.safetensors`` needs
none); the containers are :mod:`.safetensors_file` and :mod:`.pth`.

Stored dtypes are kept: float32/float16/float64 arrays are returned as stored, bfloat16 (which numpy
lacks) is widened exactly to float32 and narrowed back (round to nearest even) on writing. The one
integer tensor a state dict may hold is BatchNorm's ``num_batches_tracked`` (int64), passed through.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..core.archs import ARCHS
from ..core.errors import WeightFileError
from ..core.torch_layouts import (
    ADAIN_INPUT_CONV,
    LAYOUTS,
    TORCH_BN_EPSILON,
    Layout,
    LayoutInfo,
    detect_arch,
    detect_layout,
    from_canonical,
    head_key_map,
    native_layer_names,
    norm_layer,
    to_canonical,
)
from ..core.weightset import LayerEntry, WeightFile, WeightSet
from . import _patch
from ._patch import PROVENANCE_KEY, SCALES_KEY

Container = Literal["safetensors", "pth"]


@dataclass(frozen=True)
class TorchWeights:
    """A PyTorch VGG weight file, read.

    Attributes:
        path: the file.
        container: ``"safetensors"`` or ``"pth"``.
        layout: ``"torchvision"``, ``"gatys"`` or ``"adain"``.
        arch: ``"vgg16"`` or ``"vgg19"``.
        arrays: canonical Keras-layout arrays (see :mod:`vggnorm.core.torch_layouts`), dtype as stored
            (bfloat16 widened to float32).
        state: the whole state dict as numpy arrays, in the file's key order (source of the key
            order and of the tensors the canonical map does not name, e.g. AdaIN's ``0.*``).
        dtypes: state key -> stored dtype name (``"float32"``, ``"float16"``, ``"bfloat16"``, ...).
        metadata: the safetensors ``__metadata__`` header or the ``.pth`` sidecar, str -> str.
        head_dropped: the head was all NaN (torchvision's ``IMAGENET1K_FEATURES``): read as the
            features alone, the head passed through untouched.
    """

    path: Path
    container: Container
    layout: Layout
    arch: str
    arrays: Mapping[str, np.ndarray]
    state: Mapping[str, np.ndarray]
    dtypes: Mapping[str, str]
    metadata: Mapping[str, str] = field(default_factory=dict)
    head_dropped: bool = False

    @property
    def info(self) -> LayoutInfo:
        """Preprocessing, padding, pooling and flatten order of the layout."""
        return LAYOUTS[self.layout]


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits, to nearest even (what torch's ``.to(bfloat16)`` does)."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


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



#: The integer tensors a state dict may hold: BatchNorm's counters, passed through.
INT_KEY_SUFFIX = "num_batches_tracked"


def _all_nan_head(state: Mapping[str, np.ndarray], layout: Layout, arch: str) -> bool:
    """Whether the state dict's head is there and entirely NaN: torchvision's VGG16
    ``IMAGENET1K_FEATURES`` weights, whose classifier is NaN (only the features are valid)."""
    keys = [k for k in head_key_map(layout, arch).values() if k in state]
    return bool(keys) and all(bool(np.all(np.isnan(state[k]))) for k in keys)


def canonical(
    path: Path, container: Container, state: dict[str, np.ndarray], dtypes: dict[str, str],
    metadata: dict[str, str],
) -> TorchWeights:  # fmt: skip
    """A state dict as read from ``path``, checked and converted to canonical arrays.

    Raises:
        WeightFileError: non-finite weights (but a wholly NaN head, which is left out), an
            unknown layout, wrong shapes, or an integer tensor that is no BatchNorm counter.
    """
    for key, arr in state.items():
        if arr.dtype.kind in "iu" and not key.endswith(INT_KEY_SUFFIX):
            raise WeightFileError(f"{path}: {key} has dtype {arr.dtype}; expected floats")
    shapes = {k: tuple(int(n) for n in v.shape) for k, v in state.items()}
    try:
        layout = detect_layout(shapes)
        arch = detect_arch(shapes, layout)
    except WeightFileError as e:
        raise WeightFileError(f"{path}: {e}") from e
    dropped = _all_nan_head(state, layout, arch)
    heads = set(head_key_map(layout, arch).values()) if dropped else set()
    for key, arr in state.items():
        if key not in heads and not np.all(np.isfinite(arr)):
            raise WeightFileError(f"{path}: {key} holds NaN or infinite values")
    arrays = to_canonical(state, layout, arch, head=not dropped)
    return TorchWeights(path, container, layout, arch, arrays, state, dtypes, metadata, dropped)


def state_to_write(
    path: Path, layout: Layout, canonical_arrays: Mapping[str, np.ndarray],
    source: TorchWeights | None, metadata: Mapping[str, str] | None, arch: str | None,
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:  # fmt: skip
    """The state dict, stored dtypes and metadata to write for ``canonical_arrays`` in ``layout``
    (see :func:`vggnorm.formats.torch_files.write_torch`)."""
    meta = _checked_metadata({**(source.metadata if source else {}), **(metadata or {})})
    arch_name = arch or (source.arch if source else _arch_of(canonical_arrays))
    kept = source.state if source is not None else {}
    state = from_canonical(canonical_arrays, layout, arch_name, kept or None)
    # what vggnorm writes; tensors passed through are the source's (a NaN classifier stays)
    _patch.check_finite({k: a for k, a in state.items() if a is not kept.get(k)}, path)
    return state, dict(source.dtypes) if source is not None else {}, meta


def weight_set(tw: TorchWeights) -> WeightSet:
    """A PyTorch file as a :class:`~vggnorm.core.weightset.WeightSet` with Keras layer names, so
    that binding, statistics, rescaling and verification treat it like any Keras file.

    Raises:
        WeightFileError: unreadable vggnorm provenance, or an AdaIN input conv that is not the
            published one.
    """
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
    wf = WeightFile(tw.path, tw.container, layers, None, provenance, tw.layout, _preprocess(tw),
                    norms=_norms(tw), native_names=_native_names(tw), notes=_notes(tw))  # fmt: skip
    return WeightSet(wf, tw.arrays)


def _preprocess(tw: TorchWeights) -> str:
    if tw.layout == "adain":
        return _adain_preprocess(tw)
    if tw.head_dropped:  # torchvision's IMAGENET1K_FEATURES: "the original input standardization"
        return "rgb255"
    return tw.info.preprocessing


def _norms(tw: TorchWeights) -> tuple[tuple[str, str, float], ...]:
    """Where each BatchNorm of a ``_bn`` layout sits: after its conv, before the ReLU."""
    if not tw.info.batchnorm:
        return ()
    return tuple((c, norm_layer(c), TORCH_BN_EPSILON) for c in native_layer_names(tw.layout, tw.arch))


def _native_names(tw: TorchWeights) -> tuple[tuple[str, str], ...]:
    """vggnorm's conv names -> the module names the layout gives them (``features.0``)."""
    return tuple(native_layer_names(tw.layout, tw.arch).items())


def _notes(tw: TorchWeights) -> tuple[str, ...]:
    if not tw.head_dropped:
        return ()
    return (
        "its head is all NaN (torchvision's VGG16 IMAGENET1K_FEATURES): read as the features "
        "alone, the head written back as it was; its input is RGB 0-255 minus (123, 117, 104) "
        "(preprocessing rgb255)",
    )


def scales_of(metadata: Mapping[str, str], path: Path) -> dict[str, np.ndarray]:
    """The per-layer scales vggnorm stored in a file's metadata, by layer name."""
    if SCALES_KEY not in metadata:
        raise WeightFileError(f"{path} was not written by vggnorm apply (no scales recorded)")
    raw = json.loads(metadata[SCALES_KEY])
    return {key.split("_", 1)[1]: np.asarray(v) for key, v in sorted(raw.items())}
