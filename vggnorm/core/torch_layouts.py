"""PyTorch VGG state-dict layouts as data, and exact transforms to and from vggnorm's arrays.

Pure numpy: no torch import, no files. Three layouts exist in the wild (docs/formats.md):

``torchvision``
    ``features.N.weight`` (OIHW) / ``features.N.bias``, N = the index in the ``features``
    Sequential (conv, ReLU, ..., MaxPool), optionally ``classifier.0/3/6`` Linear (out, in).
``gatys``
    ``conv1_1.weight`` ... ``conv5_4.bias`` (PytorchNeuralStyleTransfer ``vgg_conv.pth``).
``adain``
    one Sequential (pytorch-AdaIN ``net.vgg``): ``0`` is a fixed 1x1 preprocessing conv, then
    ReflectionPad2d, Conv2d, ReLU, ... with ``MaxPool2d(2, 2, ceil_mode=True)``.

vggnorm's canonical arrays use the Keras names of :mod:`vggnorm.archs`: ``block1_conv1/kernel``
(kh, kw, C_in, C_out), ``block1_conv1/bias``, ``fc1/kernel`` (in, out), ... Conv OIHW -> HWIO is
``w.transpose(2, 3, 1, 0)``; Linear (out, in) -> (in, out) is ``w.T``. Both are permutations, so
the round trip is bit-exact. ``fc1/kernel`` keeps the file's own row order: torch flattens the
last conv map as (C, H, W) (``flatten_order == "chw"``), Keras as (H, W, C) (``"hwc"``), so the
head compensation must use :func:`flatten_row_scale` with the layout's order.

Index tables are derived from :mod:`vggnorm.archs`, not written out, so VGG19 is handled by the
same code as VGG16.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from .archs import ARCHS, Arch, ConvSpec, FlattenOrder
from .errors import ArchitectureError, WeightFileError
from .rescale import flatten_row_scale as flatten_row_scale

Layout = Literal["torchvision", "gatys", "adain"]
Padding = Literal["zero", "reflect"]

LAYOUT_NAMES: tuple[Layout, ...] = ("torchvision", "gatys", "adain")


@dataclass(frozen=True)
class LayoutInfo:
    """What a layout's users feed it and how its network differs from Keras's VGG.

    Attributes:
        name: the layout.
        preprocessing: vggnorm's preprocessing scheme for images fed to the first *rescaled*
            conv's input pipeline (``"torch"``, ``"caffe"`` or ``"unit"``; see
            :func:`vggnorm.model.preprocess_images`).
        padding: ``"zero"`` (Conv2d padding=1) or ``"reflect"`` (ReflectionPad2d(1) before a
            padding-0 conv).
        pool_ceil_mode: MaxPool2d's ``ceil_mode``; at even map sizes (32, 224, ...) it equals floor.
        flatten_order: row order of the first Dense after the convs (torch: ``"chw"``).
        fixed_keys: state-dict keys that hold fixed preprocessing and are never rescaled.
        description: one line for console output and metadata.
    """

    name: Layout
    preprocessing: str
    padding: Padding
    pool_ceil_mode: bool
    flatten_order: FlattenOrder
    fixed_keys: tuple[str, ...]
    description: str


LAYOUTS: dict[Layout, LayoutInfo] = {
    "torchvision": LayoutInfo(
        "torchvision",
        "torch",
        "zero",
        False,
        "chw",
        (),
        "torchvision VGG: RGB / 255, then ImageNet mean/std normalisation; zero padding",
    ),
    "gatys": LayoutInfo(
        "gatys",
        "caffe",
        "zero",
        False,
        "chw",
        (),
        "Gatys vgg_conv: BGR in 0-255 minus the caffe ImageNet mean; zero padding",
    ),
    "adain": LayoutInfo(
        "adain",
        "unit",
        "reflect",
        True,
        "chw",
        ("0.weight", "0.bias"),
        "AdaIN vgg_normalised: RGB in [0, 1] into a fixed 1x1 conv (to caffe BGR); "
        "reflection padding; max pooling with ceil_mode",
    ),
}

#: AdaIN's fixed first layer (``vgg_normalised.pth``): a 1x1 conv taking RGB in [0, 1] to caffe
#: input, BGR in [0, 255] minus the ImageNet mean.
ADAIN_INPUT_CONV: dict[str, np.ndarray] = {
    "0.weight": np.array([[0, 0, 255], [0, 255, 0], [255, 0, 0]], np.float32).reshape(3, 3, 1, 1),
    "0.bias": np.array([-103.939, -116.779, -123.68], np.float32),
}

#: torchvision ``classifier`` indices of the three Linear layers, in order.
_CLASSIFIER_INDICES = (0, 3, 6)


def _conv_prefixes(layout: Layout, arch: Arch) -> tuple[str, ...]:
    """The state-dict prefix of each conv of ``arch`` in ``layout``, in network order."""
    prefixes: list[str] = []
    if layout == "gatys":
        block, i = 1, 0
        for layer in arch.features:
            if isinstance(layer, ConvSpec):
                i += 1
                prefixes.append(f"conv{block}_{i}")
            else:
                block, i = block + 1, 0
        return tuple(prefixes)
    # Sequential indices: torchvision is (conv, relu)* pool; AdaIN is 1x1 conv, (pad, conv, relu)* pool.
    index, before, step = (0, 0, 2) if layout == "torchvision" else (1, 1, 3)
    for layer in arch.features:
        if isinstance(layer, ConvSpec):
            prefixes.append(f"{'features.' if layout == 'torchvision' else ''}{index + before}")
            index += step
        else:
            index += 1
    return tuple(prefixes)


def conv_key_map(layout: Layout, arch_name: str) -> dict[str, str]:
    """Canonical key -> state-dict key for the convs, in network order.

    Args:
        layout: one of :data:`LAYOUT_NAMES`.
        arch_name: ``"vgg16"`` or ``"vgg19"``.

    Returns:
        e.g. ``{"block1_conv1/kernel": "features.0.weight", "block1_conv1/bias": "features.0.bias",
        ...}``.

    Example:
        >>> conv_key_map("adain", "vgg19")["block1_conv1/kernel"]
        '2.weight'
    """
    arch = ARCHS[arch_name]
    out: dict[str, str] = {}
    for conv, prefix in zip(arch.convs, _conv_prefixes(layout, arch)):
        out[f"{conv.name}/kernel"] = f"{prefix}.weight"
        out[f"{conv.name}/bias"] = f"{prefix}.bias"
    return out


def head_key_map(layout: Layout, arch_name: str) -> dict[str, str]:
    """Canonical key -> state-dict key for the classifier (torchvision only; else empty)."""
    arch = ARCHS[arch_name]
    if layout != "torchvision" or arch.head is None:
        return {}
    out: dict[str, str] = {}
    for dense, index in zip(arch.head.dense, _CLASSIFIER_INDICES):
        out[f"{dense.name}/kernel"] = f"classifier.{index}.weight"
        out[f"{dense.name}/bias"] = f"classifier.{index}.bias"
    return out


def _expected_conv_shapes(arch: Arch) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    c_in = 3
    for conv in arch.convs:
        shapes += [(conv.filters, c_in, *conv.kernel_size), (conv.filters,)]
        c_in = conv.filters
    return shapes


def _summary(keys: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return f"{len(keys)} keys ({shown}{', ...' if len(keys) > limit else ''})"


_GATYS_KEY = re.compile(r"^conv\d_\d\.(weight|bias)$")
_INDEX_KEY = re.compile(r"^\d+\.(weight|bias)$")


def detect_layout(shapes: Mapping[str, tuple[int, ...]]) -> Layout:
    """Which PyTorch VGG layout a state dict is in, from its keys alone.

    Args:
        shapes: state-dict key -> tensor shape.

    Returns:
        ``"torchvision"``, ``"gatys"`` or ``"adain"``.

    Raises:
        ArchitectureError: a batch-norm VGG (``vgg16_bn``: conv, BN, ReLU), which cannot be
            rescaled exactly without a fold.
        WeightFileError: the keys match none of the layouts (the message shows some of them).

    Example:
        >>> detect_layout({"conv1_1.weight": (64, 3, 3, 3), "conv1_1.bias": (64,)})
        'gatys'
    """
    keys = list(shapes)
    if any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in keys):
        raise ArchitectureError(
            "the state dict holds BatchNorm layers (a vgg*_bn model: conv -> BatchNorm -> ReLU); "
            "only plain VGG16/VGG19 layouts are supported"
        )
    if keys and all(k.startswith(("features.", "classifier.")) for k in keys):
        return "torchvision"
    if keys and all(_GATYS_KEY.match(k) for k in keys):
        return "gatys"
    if keys and all(_INDEX_KEY.match(k) for k in keys) and "0.weight" in shapes:
        if tuple(shapes["0.weight"]) == (3, 3, 1, 1):
            return "adain"
        raise WeightFileError(
            f"a bare nn.Sequential whose 0.weight has shape {tuple(shapes['0.weight'])}, but AdaIN's "
            f"starts with a 1x1 conv (3, 3, 1, 1); for torchvision save the whole model's "
            f"state_dict (features.N keys), not model.features"
        )
    raise WeightFileError(
        f"not a known PyTorch VGG state dict (torchvision features.N/classifier.N, Gatys "
        f"convB_I, AdaIN N.weight): found {_summary(keys)}"
    )


def detect_arch(shapes: Mapping[str, tuple[int, ...]], layout: Layout) -> str:
    """``"vgg16"`` or ``"vgg19"``: the architecture whose keys and shapes the state dict has exactly.

    Args:
        shapes: state-dict key -> tensor shape.
        layout: from :func:`detect_layout`.

    Returns:
        The name of an entry of :data:`vggnorm.archs.ARCHS`.

    Raises:
        WeightFileError: the convs do not match VGG16 or VGG19 in count or shape, a classifier is
            partial or of the wrong input width, or unknown keys are present.
    """
    n_convs = sum(1 for k, s in shapes.items() if k.endswith(".weight") and len(s) == 4)
    if layout == "adain":
        n_convs -= 1  # the 1x1 preprocessing conv
    for name, arch in ARCHS.items():
        if len(arch.convs) != n_convs:
            continue
        conv_keys = list(conv_key_map(layout, name).values())
        expected = dict(zip(conv_keys, _expected_conv_shapes(arch)))
        if layout == "adain":
            expected.update({"0.weight": (3, 3, 1, 1), "0.bias": (3,)})
        head = head_key_map(layout, name)
        present_head = [k for k in head.values() if k in shapes]
        if present_head:
            if len(present_head) != len(head):
                missing = sorted(set(head.values()) - set(shapes))
                raise WeightFileError(f"{layout} {name}: partial classifier, missing {missing}")
            last = arch.convs[-1].filters
            rows = shapes[head[f"{arch.first_dense}/kernel"]][1]
            if rows % last:
                raise WeightFileError(
                    f"{layout} {name}: classifier.0 reads {rows} inputs, not a multiple of the "
                    f"last conv's {last} filters"
                )
            expected.update({k: shapes[k] for k in present_head})
        unknown = sorted(set(shapes) - set(expected))
        if unknown:
            raise WeightFileError(f"{layout} {name}: unexpected keys {_summary(unknown)}")
        for key, shape in expected.items():
            if key not in shapes:
                raise WeightFileError(f"{layout} {name}: missing {key!r}")
            if tuple(shapes[key]) != tuple(shape):
                raise WeightFileError(
                    f"{layout} {name}: {key} has shape {tuple(shapes[key])}, expected {shape}"
                )
        return name
    raise WeightFileError(
        f"{layout} state dict with {n_convs} convs: expected 13 (VGG16) or 16 (VGG19)"
    )


def to_canonical(
    state: Mapping[str, np.ndarray], layout: Layout, arch_name: str
) -> dict[str, np.ndarray]:
    """State dict -> canonical Keras-layout arrays (new, C-contiguous copies).

    Args:
        state: state-dict key -> numpy array (as stored: OIHW convs, (out, in) Linear).
        layout: the state dict's layout.
        arch_name: ``"vgg16"`` or ``"vgg19"``.

    Returns:
        ``"<layer>/kernel"`` (HWIO or (in, out)) and ``"<layer>/bias"`` for every conv and, where
        present, every Linear. ``fc1/kernel`` rows stay in the file's (C, H, W) flatten order.
        Fixed preprocessing tensors (AdaIN ``0.*``) are not included.

    Raises:
        WeightFileError: a key of the layout is missing.
    """
    out: dict[str, np.ndarray] = {}
    mapping = {**conv_key_map(layout, arch_name), **head_key_map(layout, arch_name)}
    for ours, theirs in mapping.items():
        if theirs not in state:
            if ours in head_key_map(layout, arch_name):
                continue
            raise WeightFileError(f"{layout} {arch_name}: missing {theirs!r}")
        w = np.asarray(state[theirs])
        if w.ndim == 4:
            w = w.transpose(2, 3, 1, 0)
        elif w.ndim == 2:
            w = w.T
        out[ours] = np.array(w, order="C", copy=True)
    return out


def from_canonical(
    canonical: Mapping[str, np.ndarray],
    layout: Layout,
    arch_name: str,
    source: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Canonical arrays -> a state dict of ``layout``: the exact inverse of :func:`to_canonical`.

    Args:
        canonical: ``"<layer>/kernel"``/``"<layer>/bias"`` arrays as from :func:`to_canonical`.
        layout: target layout.
        arch_name: ``"vgg16"`` or ``"vgg19"``.
        source: the state dict that was read; its key order is kept and every tensor the canonical
            dict does not name (AdaIN's ``0.weight``/``0.bias``) is passed through untouched. When
            None, the keys come out in network order (AdaIN then needs ``source`` for ``0.*``).

    Returns:
        A new dict of C-contiguous arrays (OIHW convs, (out, in) Linear).

    Raises:
        WeightFileError: a canonical array is missing or its shape differs from ``source``'s.

    Example:
        >>> sd = {"conv1_1.weight": np.zeros((64, 3, 3, 3), np.float32)}  # doctest: +SKIP
        >>> from_canonical(to_canonical(sd, "gatys", "vgg16"), "gatys", "vgg16", sd)  # doctest: +SKIP
    """
    mapping = {**conv_key_map(layout, arch_name), **head_key_map(layout, arch_name)}
    inverse = {theirs: ours for ours, theirs in mapping.items()}
    if source is None:
        order = [
            t
            for o, t in mapping.items()
            if o in canonical or o not in head_key_map(layout, arch_name)
        ]
        if layout == "adain":  # the published fixed input conv first, then the rest
            source = {**ADAIN_INPUT_CONV, **{t: np.empty(0) for t in order}}
            order = list(source)
    else:
        order = list(source)
    out: dict[str, np.ndarray] = {}
    for key in order:
        ours = inverse.get(key)
        if ours is None:
            assert source is not None
            out[key] = source[key]
            continue
        if ours not in canonical:
            raise WeightFileError(f"{layout} {arch_name}: canonical arrays lack {ours!r}")
        w = np.asarray(canonical[ours])
        if w.ndim == 4:
            w = w.transpose(3, 2, 0, 1)
        elif w.ndim == 2:
            w = w.T
        if source is not None and np.size(source[key]) and w.shape != np.shape(source[key]):
            raise WeightFileError(
                f"{layout} {arch_name}: {ours} gives {key} shape {w.shape}, "
                f"the source has {np.shape(source[key])}"
            )
        out[key] = np.array(w, order="C", copy=True)
    return out


def convert_flatten_rows(
    kernel: np.ndarray, channels: int, src: FlattenOrder, dst: FlattenOrder
) -> np.ndarray:
    """Permute a (rows, units) Dense kernel's rows between flatten orders (exact: a permutation).

    Args:
        kernel: (C*H*W, units) kernel, rows in ``src`` order.
        channels: C, the last conv's filters.
        src: the kernel's row order.
        dst: the wanted row order.

    Returns:
        A new C-contiguous array, rows in ``dst`` order.

    Raises:
        ValueError: rows not a multiple of ``channels``.

    Example:
        >>> k = np.arange(4.0)[:, None]  # rows (c0p0, c0p1, c1p0, c1p1) in chw order
        >>> convert_flatten_rows(k, 2, "chw", "hwc").ravel().tolist()
        [0.0, 2.0, 1.0, 3.0]
    """
    rows = kernel.shape[0]
    if channels <= 0 or rows % channels:
        raise ValueError(f"{rows} rows is not a multiple of {channels} channels")
    if src == dst:
        return np.array(kernel, order="C", copy=True)
    hw = rows // channels
    rest = kernel.shape[1:]
    if src == "hwc":
        out = kernel.reshape(hw, channels, *rest).swapaxes(0, 1)
    else:
        out = kernel.reshape(channels, hw, *rest).swapaxes(0, 1)
    return np.array(out.reshape(rows, *rest), order="C", copy=True)


def keras_rows_to_torch(kernel: np.ndarray, channels: int) -> np.ndarray:
    """Keras (H, W, C)-ordered Dense rows -> torch (C, H, W) order; see :func:`convert_flatten_rows`."""
    return convert_flatten_rows(kernel, channels, "hwc", "chw")


def torch_rows_to_keras(kernel: np.ndarray, channels: int) -> np.ndarray:
    """Torch (C, H, W)-ordered Dense rows -> Keras (H, W, C) order; see :func:`convert_flatten_rows`."""
    return convert_flatten_rows(kernel, channels, "chw", "hwc")


def compensate_head(
    weights: Mapping[str, np.ndarray],
    head_dense: str,
    m_last: npt.ArrayLike,
    order: FlattenOrder,
    *,
    inverse: bool = False,
) -> dict[str, np.ndarray]:
    """Multiply the first Dense's input rows by the last conv's scales, in ``order``.

    Use after :func:`vggnorm.rescale.rescale` called with ``head_dense=None`` for a ``"chw"`` head
    (``rescale``'s own head step assumes Keras's ``"hwc"`` order).

    Args:
        weights: canonical arrays; not modified.
        head_dense: the Dense layer's name (``"fc1"``).
        m_last: the last conv's scales (``scales.values[last_conv]``).
        order: the kernel's flatten order.
        inverse: divide instead (undo).

    Returns:
        A new dict; only ``<head_dense>/kernel`` is a new array (float64 math, cast back).

    Raises:
        ValueError: the kernel is missing or its rows do not fit ``m_last``.
    """
    key = f"{head_dense}/kernel"
    if key not in weights:
        raise ValueError(f"weights have no {key!r}")
    kernel = weights[key]
    scale = flatten_row_scale(m_last, kernel.shape[0], order)
    if inverse:
        scale = 1.0 / scale
    out = dict(weights)
    out[key] = (kernel.astype(np.float64) * scale[:, None]).astype(kernel.dtype)
    return out
