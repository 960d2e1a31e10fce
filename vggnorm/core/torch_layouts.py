"""PyTorch VGG state-dict layouts as data, and exact transforms to and from vggnorm's arrays.

Pure numpy: no torch import, no files. The layouts found in the wild (docs/pytorch.md):

``torchvision`` / ``torchvision_bn``
    ``features.N.weight`` (OIHW) / ``features.N.bias``, N = the index in the ``features``
    Sequential (conv, ReLU, ..., MaxPool; ``_bn``: conv, BatchNorm2d, ReLU), optionally
    ``classifier.0/3/6`` Linear (out, in).
``features`` / ``features_bn``
    what ``vgg.features.state_dict()`` saves: the same Sequential without the ``features.``
    prefix (``0.weight``, ``2.weight``, ...).
``timm`` / ``timm_bn``
    timm's VGG: ``features.N`` as torchvision, then ``pre_logits.fc1`` (a 7x7 Conv2d reading the
    last conv map: torchvision's ``classifier.0`` in conv form), ``pre_logits.fc2`` (1x1 Conv2d)
    and ``head.fc`` (Linear, after global average pooling).
``gatys``
    ``conv1_1.weight`` ... ``conv5_4.bias`` (PytorchNeuralStyleTransfer ``vgg_conv.pth``).
``adain``
    one Sequential (pytorch-AdaIN ``net.vgg``): ``0`` is a fixed 1x1 preprocessing conv, then
    ReflectionPad2d, Conv2d, ReLU, ... with ``MaxPool2d(2, 2, ceil_mode=True)``.

vggnorm's canonical arrays use the Keras names of :mod:`vggnorm.core.archs`:
``block1_conv1/kernel`` (kh, kw, C_in, C_out), ``block1_conv1/bias``, ``fc1/kernel`` (in, out),
and for a BatchNorm after conv ``X`` the layer ``X_bn`` with roles ``gamma`` (``weight``),
``beta`` (``bias``), ``moving_mean`` (``running_mean``) and ``moving_variance``
(``running_var``); ``num_batches_tracked`` passes through untouched. Conv OIHW -> HWIO is
``w.transpose(2, 3, 1, 0)``; Linear (out, in) -> (in, out) is ``w.T``; timm's conv-form head
(out, C, k, k) -> (C*k*k, out) is ``w.reshape(out, -1).T``, rows in (C, H, W) order like
torchvision's ``classifier.0``. All are permutations or reshapes, so the round trip is
bit-exact. ``fc1/kernel`` keeps the file's own row order: torch flattens the last conv map as
(C, H, W) (``flatten_order == "chw"``), Keras as (H, W, C) (``"hwc"``), so the head
compensation must use :func:`flatten_row_scale` with the layout's order.

Index tables are derived from :mod:`vggnorm.core.archs`, not written out, so VGG19 is handled by
the same code as VGG16.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from .archs import ARCHS, Arch, ConvSpec, FlattenOrder
from .errors import WeightFileError
from .rescale import flatten_row_scale as flatten_row_scale

Layout = Literal[
    "torchvision", "torchvision_bn", "features", "features_bn", "timm", "timm_bn", "gatys",
    "adain",
]  # fmt: skip
Padding = Literal["zero", "reflect"]
Head = Literal["classifier", "timm"]
Kind = Literal["conv", "linear", "vector", "conv_linear"]

LAYOUT_NAMES: tuple[Layout, ...] = (
    "torchvision", "torchvision_bn", "features", "features_bn", "timm", "timm_bn", "gatys",
    "adain",
)  # fmt: skip

#: torchvision's BatchNorm2d epsilon (timm uses the same module).
TORCH_BN_EPSILON = 1e-5


@dataclass(frozen=True)
class LayoutInfo:
    """What a layout's users feed it and how its network differs from Keras's VGG.

    Attributes:
        name: the layout.
        preprocessing: vggnorm's preprocessing scheme for images fed to the first *rescaled*
            conv's input pipeline (``"torch"``, ``"caffe"`` or ``"unit"``; see
            :func:`vggnorm.core.inputs.preprocess_images`).
        padding: ``"zero"`` (Conv2d padding=1) or ``"reflect"`` (ReflectionPad2d(1) before a
            padding-0 conv).
        pool_ceil_mode: MaxPool2d's ``ceil_mode``; at even map sizes (32, 224, ...) it equals floor.
        flatten_order: row order of the first Dense after the convs (torch: ``"chw"``).
        fixed_keys: state-dict keys that hold fixed preprocessing and are never rescaled.
        description: one line for console output and metadata.
        batchnorm: a BatchNorm2d sits between every conv and its ReLU.
        head: the head the layout may carry: torchvision's ``classifier``, timm's conv-form
            ``pre_logits`` + ``head.fc``, or None (convs only).
        prefix: the Sequential's prefix (``"features."``, or ``""`` for a bare Sequential).
    """

    name: Layout
    preprocessing: str
    padding: Padding
    pool_ceil_mode: bool
    flatten_order: FlattenOrder
    fixed_keys: tuple[str, ...]
    description: str
    batchnorm: bool = False
    head: Head | None = None
    prefix: str = ""


_TV = "RGB / 255, then ImageNet mean/std normalisation; zero padding"
LAYOUTS: dict[Layout, LayoutInfo] = {
    "torchvision": LayoutInfo("torchvision", "torch", "zero", False, "chw", (),
                              f"torchvision VGG: {_TV}", False, "classifier", "features."),
    "torchvision_bn": LayoutInfo("torchvision_bn", "torch", "zero", False, "chw", (),
                                 f"torchvision VGG with BatchNorm: {_TV}", True, "classifier",
                                 "features."),
    "features": LayoutInfo("features", "torch", "zero", False, "chw", (),
                           f"torchvision VGG features alone: {_TV}", False, None, ""),
    "features_bn": LayoutInfo("features_bn", "torch", "zero", False, "chw", (),
                              f"torchvision VGG-BN features alone: {_TV}", True, None, ""),
    "timm": LayoutInfo("timm", "torch", "zero", False, "chw", (), f"timm VGG: {_TV}", False,
                       "timm", "features."),
    "timm_bn": LayoutInfo("timm_bn", "torch", "zero", False, "chw", (),
                          f"timm VGG with BatchNorm: {_TV}", True, "timm", "features."),
    "gatys": LayoutInfo("gatys", "caffe", "zero", False, "chw", (),
                        "Gatys vgg_conv: BGR in 0-255 minus the caffe ImageNet mean; zero padding"),
    "adain": LayoutInfo(
        "adain", "unit", "reflect", True, "chw", ("0.weight", "0.bias"),
        "AdaIN vgg_normalised: RGB in [0, 1] into a fixed 1x1 conv (to caffe BGR); "
        "reflection padding; max pooling with ceil_mode",
    ),
}  # fmt: skip

#: AdaIN's fixed first layer (``vgg_normalised.pth``): a 1x1 conv taking RGB in [0, 1] to caffe
#: input, BGR in [0, 255] minus the ImageNet mean.
ADAIN_INPUT_CONV: dict[str, np.ndarray] = {
    "0.weight": np.array([[0, 0, 255], [0, 255, 0], [255, 0, 0]], np.float32).reshape(3, 3, 1, 1),
    "0.bias": np.array([-103.939, -116.779, -123.68], np.float32),
}

#: torchvision ``classifier`` indices of the three Linear layers, in order.
_CLASSIFIER_INDICES = (0, 3, 6)
#: timm's head modules, in order: two conv-form layers, then the classifier.
_TIMM_HEAD = ("pre_logits.fc1", "pre_logits.fc2", "head.fc")
#: BatchNorm2d tensors -> vggnorm's roles (``num_batches_tracked`` passes through).
BN_KEYS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
           "running_var": "moving_variance"}  # fmt: skip


@dataclass(frozen=True)
class KeySpec:
    """Where a canonical array lives in a state dict and how it is stored there.

    ``kind``: ``conv`` (OIHW), ``linear`` ((out, in)), ``vector`` (1-D, as is) or
    ``conv_linear`` (a Dense stored as a conv reading ``in_channels`` channels: timm's head).
    """

    key: str
    kind: Kind
    in_channels: int = 0

    def __post_init__(self) -> None:
        if self.kind not in get_args(Kind):
            raise ValueError(f"{self.key}: unknown kind {self.kind!r}")


def norm_layer(conv: str) -> str:
    """vggnorm's name for the BatchNorm that follows conv ``conv`` in a PyTorch layout."""
    return f"{conv}_bn"


def _sequential_indices(layout: Layout, arch: Arch) -> list[int]:
    """Each conv's index in the layout's Sequential (AdaIN: after its 1x1 conv and a pad)."""
    info = LAYOUTS[layout]
    index, before, step = (1, 1, 3) if layout == "adain" else (0, 0, 3 if info.batchnorm else 2)
    out = []
    for layer in arch.features:
        if isinstance(layer, ConvSpec):
            out.append(index + before)
            index += step
        else:
            index += 1
    return out


def _conv_prefixes(layout: Layout, arch: Arch) -> tuple[str, ...]:
    """The state-dict prefix of each conv of ``arch`` in ``layout``, in network order."""
    if layout == "gatys":
        prefixes: list[str] = []
        block, i = 1, 0
        for layer in arch.features:
            if isinstance(layer, ConvSpec):
                i += 1
                prefixes.append(f"conv{block}_{i}")
            else:
                block, i = block + 1, 0
        return tuple(prefixes)
    prefix = LAYOUTS[layout].prefix
    return tuple(f"{prefix}{i}" for i in _sequential_indices(layout, arch))


def native_layer_names(layout: Layout, arch_name: str) -> dict[str, str]:
    """vggnorm's conv layer name -> the module name ``layout`` gives that conv (``features.0``).

    Example:
        >>> native_layer_names("torchvision_bn", "vgg16")["block1_conv2"]
        'features.3'
    """
    arch = ARCHS[arch_name]
    return dict(zip(arch.conv_names, _conv_prefixes(layout, arch)))


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
    out: dict[str, str] = {}
    for conv, prefix in native_layer_names(layout, arch_name).items():
        out[f"{conv}/kernel"] = f"{prefix}.weight"
        out[f"{conv}/bias"] = f"{prefix}.bias"
    return out


def norm_key_map(layout: Layout, arch_name: str) -> dict[str, str]:
    """Canonical key -> state-dict key for the BatchNorms of a ``_bn`` layout (else empty).

    Example:
        >>> norm_key_map("torchvision_bn", "vgg16")["block1_conv1_bn/moving_variance"]
        'features.1.running_var'
    """
    if not LAYOUTS[layout].batchnorm:
        return {}
    prefix = LAYOUTS[layout].prefix
    arch = ARCHS[arch_name]
    out: dict[str, str] = {}
    for conv, index in zip(arch.conv_names, _sequential_indices(layout, arch)):
        for theirs, role in BN_KEYS.items():
            out[f"{norm_layer(conv)}/{role}"] = f"{prefix}{index + 1}.{theirs}"
    return out


def head_key_map(layout: Layout, arch_name: str) -> dict[str, str]:
    """Canonical key -> state-dict key for the head (torchvision's classifier, timm's
    pre_logits and head; empty for the others)."""
    arch = ARCHS[arch_name]
    head = LAYOUTS[layout].head
    if head is None or arch.head is None:
        return {}
    modules = (
        [f"classifier.{i}" for i in _CLASSIFIER_INDICES] if head == "classifier" else _TIMM_HEAD
    )
    out: dict[str, str] = {}
    for dense, module in zip(arch.head.dense, modules):
        out[f"{dense.name}/kernel"] = f"{module}.weight"
        out[f"{dense.name}/bias"] = f"{module}.bias"
    return out


def key_specs(layout: Layout, arch_name: str) -> dict[str, KeySpec]:
    """Every canonical key of ``layout`` and where and how the state dict stores it."""
    specs: dict[str, KeySpec] = {}
    convs, norms = conv_key_map(layout, arch_name), norm_key_map(layout, arch_name)
    for conv in ARCHS[arch_name].conv_names:  # in module order: conv, then its BatchNorm
        for ours in (f"{conv}/kernel", f"{conv}/bias"):
            specs[ours] = KeySpec(convs[ours], "conv" if ours.endswith("/kernel") else "vector")
        for role in BN_KEYS.values():
            if (ours := f"{norm_layer(conv)}/{role}") in norms:
                specs[ours] = KeySpec(norms[ours], "vector")
    last = ARCHS[arch_name].convs[-1].filters
    for i, (ours, theirs) in enumerate(head_key_map(layout, arch_name).items()):
        if not ours.endswith("/kernel"):
            specs[ours] = KeySpec(theirs, "vector")
        elif LAYOUTS[layout].head == "timm" and i < 4:  # pre_logits.fc1 and fc2 are convs
            specs[ours] = KeySpec(theirs, "conv_linear", last if i == 0 else 0)
        else:
            specs[ours] = KeySpec(theirs, "linear")
    return specs


def passthrough_keys(layout: Layout, arch_name: str) -> tuple[str, ...]:
    """State-dict keys that are no canonical array but belong to the layout: AdaIN's fixed
    input conv, BatchNorm's ``num_batches_tracked``."""
    keys = LAYOUTS[layout].fixed_keys
    for key in norm_key_map(layout, arch_name).values():
        if key.endswith(".running_var"):
            keys += (_counter_key(key),)
    return keys


def _counter_key(running_var: str) -> str:
    """The ``num_batches_tracked`` key of the BatchNorm whose ``running_var`` key is given."""
    return running_var.removesuffix("running_var") + "num_batches_tracked"


def _summary(keys: Sequence[str], limit: int = 4) -> str:
    """``"6 keys (a, b, c, d, ...)"``: how many, and the first ``limit`` in sorted order."""
    if not keys:
        return "no keys"
    shown = ", ".join(sorted(keys)[:limit])
    return f"{len(keys)} keys ({shown}{', ...' if len(keys) > limit else ''})"


_GATYS_KEY = re.compile(r"^conv\d_\d\.(weight|bias)$")
_INDEX_KEY = re.compile(r"^\d+\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_BN_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def detect_layout(shapes: Mapping[str, tuple[int, ...]]) -> Layout:
    """Which PyTorch VGG layout a state dict is in, from its keys (and the first conv's shape).

    Args:
        shapes: state-dict key -> tensor shape.

    Returns:
        One of :data:`LAYOUT_NAMES`.

    Raises:
        WeightFileError: the keys match none of the layouts (the message shows some of them).

    Example:
        >>> detect_layout({"conv1_1.weight": (64, 3, 3, 3), "conv1_1.bias": (64,)})
        'gatys'
    """
    keys = list(shapes)
    bn = any(k.endswith(_BN_SUFFIXES) for k in keys)
    if keys and all(k.startswith(("features.", "classifier.")) for k in keys):
        return "torchvision_bn" if bn else "torchvision"
    if keys and all(k.startswith(("features.", "pre_logits.", "head.")) for k in keys):
        return "timm_bn" if bn else "timm"
    if keys and all(_GATYS_KEY.match(k) for k in keys):
        return "gatys"
    if keys and all(_INDEX_KEY.match(k) for k in keys) and "0.weight" in shapes:
        first = tuple(shapes["0.weight"])
        if first == (3, 3, 1, 1) and not bn:
            return "adain"
        if len(first) == 4 and first[1] == 3:
            return "features_bn" if bn else "features"
        raise WeightFileError(
            f"a bare nn.Sequential whose 0.weight has shape {first}: neither AdaIN's 1x1 input "
            "conv (3, 3, 1, 1) nor a VGG's first conv (reading 3 channels)"
        )
    raise WeightFileError(
        f"not a known PyTorch VGG state dict (torchvision features.N/classifier.N, timm "
        f"features.N/pre_logits/head, model.features N.weight, Gatys convB_I, AdaIN): found "
        f"{_summary(keys)}"
    )


def _expected_features(layout: Layout, arch: Arch) -> dict[str, tuple[int, ...]]:
    """State key -> shape for the convs, BatchNorms and fixed tensors of ``layout``."""
    shapes: dict[str, tuple[int, ...]] = {}
    c_in = 3
    keys = conv_key_map(layout, arch.name)
    norms = norm_key_map(layout, arch.name)
    for conv in arch.convs:
        shapes[keys[f"{conv.name}/kernel"]] = (conv.filters, c_in, *conv.kernel_size)
        shapes[keys[f"{conv.name}/bias"]] = (conv.filters,)
        for role in BN_KEYS.values():
            if (key := f"{norm_layer(conv.name)}/{role}") in norms:
                shapes[norms[key]] = (conv.filters,)
        c_in = conv.filters
    shapes.update({k: () for k in passthrough_keys(layout, arch.name) if k.endswith("tracked")})
    if layout == "adain":
        shapes.update({"0.weight": (3, 3, 1, 1), "0.bias": (3,)})
    return shapes


def _expected_head(
    shapes: Mapping[str, tuple[int, ...]], layout: Layout, arch: Arch
) -> dict[str, tuple[int, ...]]:
    """The head keys present, checked for completeness and for reading the last conv map."""
    head = head_key_map(layout, arch.name)
    present = [k for k in head.values() if k in shapes]
    if not present:
        return {}
    where = f"{layout} {arch.name}"
    timm = LAYOUTS[layout].head == "timm"
    # timm without a classifier (num_classes=0) keeps pre_logits alone
    needed = list(head.values())[:4] if timm and len(present) == 4 else list(head.values())
    if sorted(present) != sorted(needed):
        raise WeightFileError(f"{where}: partial head, missing {sorted(set(needed) - set(present))}")
    last = arch.convs[-1].filters
    first = tuple(shapes[head[f"{arch.first_dense}/kernel"]])
    if timm and (len(first) != 4 or first[1] != last or first[2] != first[3]):
        raise WeightFileError(
            f"{where}: pre_logits.fc1.weight has shape {first}, expected (units, {last}, k, k)"
        )
    if not timm and len(first) != 2:
        raise WeightFileError(
            f"{where}: classifier.0.weight has shape {first}, expected (units, inputs)"
        )
    if not timm and first[1] % last:
        raise WeightFileError(
            f"{where}: classifier.0 reads {first[1]} inputs, not a multiple of the last conv's "
            f"{last} filters"
        )
    return {k: tuple(shapes[k]) for k in present}


def detect_arch(shapes: Mapping[str, tuple[int, ...]], layout: Layout) -> str:
    """``"vgg16"`` or ``"vgg19"``: the architecture whose keys and shapes the state dict has exactly.

    Args:
        shapes: state-dict key -> tensor shape.
        layout: from :func:`detect_layout`.

    Returns:
        The name of an entry of :data:`vggnorm.core.archs.ARCHS`.

    Raises:
        WeightFileError: the convs do not match VGG16 or VGG19 in count or shape, a head is
            partial or does not read the last conv map, or unknown keys are present.
    """
    n_convs = sum(1 for k, s in shapes.items() if k.endswith(".weight") and len(s) == 4)
    n_convs -= sum(1 for k in head_key_map(layout, "vgg16").values()
                   if k in shapes and k.endswith(".weight") and len(shapes[k]) == 4)  # fmt: skip
    if layout == "adain":
        n_convs -= 1  # the 1x1 preprocessing conv
    for name, arch in ARCHS.items():
        if len(arch.convs) != n_convs:
            continue
        expected = {**_expected_features(layout, arch), **_expected_head(shapes, layout, arch)}
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


def _to_ours(w: np.ndarray, spec: KeySpec) -> np.ndarray:
    if spec.kind == "conv":
        w = w.transpose(2, 3, 1, 0)
    elif spec.kind == "linear":
        w = w.T
    elif spec.kind == "conv_linear":
        w = w.reshape(w.shape[0], -1).T
    return np.array(w, order="C", copy=True)


def _to_theirs(w: np.ndarray, spec: KeySpec) -> np.ndarray:
    if spec.kind == "conv":
        w = w.transpose(3, 2, 0, 1)
    elif spec.kind == "linear":
        w = w.T
    elif spec.kind == "conv_linear":
        channels = spec.in_channels or w.shape[0]
        side = math.isqrt(w.shape[0] // channels)
        w = w.T.reshape(w.shape[1], channels, side, side)
    return np.array(w, order="C", copy=True)


def to_canonical(
    state: Mapping[str, np.ndarray], layout: Layout, arch_name: str, *, head: bool = True
) -> dict[str, np.ndarray]:
    """State dict -> canonical Keras-layout arrays (new, C-contiguous copies).

    Args:
        state: state-dict key -> numpy array (as stored: OIHW convs, (out, in) Linear).
        layout: the state dict's layout.
        arch_name: ``"vgg16"`` or ``"vgg19"``.
        head: convert the head where present (False: leave it out, as for a NaN classifier).

    Returns:
        ``"<layer>/<role>"`` for every conv, BatchNorm and, where present, every head layer.
        ``fc1/kernel`` rows stay in the file's (C, H, W) flatten order. Fixed preprocessing
        tensors (AdaIN ``0.*``) and ``num_batches_tracked`` are not included.

    Raises:
        WeightFileError: a key of the layout is missing.
    """
    out: dict[str, np.ndarray] = {}
    heads = head_key_map(layout, arch_name)
    for ours, spec in key_specs(layout, arch_name).items():
        if spec.key not in state:
            if ours in heads:
                continue
            raise WeightFileError(f"{layout} {arch_name}: missing {spec.key!r}")
        if ours in heads and not head:
            continue
        out[ours] = _to_ours(np.asarray(state[spec.key]), spec)
    return out


def _fresh_state(
    canonical: Mapping[str, np.ndarray], layout: Layout, arch_name: str
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Without a source file: the state dict's keys in network order, and the tensors that no
    canonical array gives: the published fixed ones (AdaIN's input conv) and a fresh
    ``num_batches_tracked`` counter for every BatchNorm."""
    heads = head_key_map(layout, arch_name)
    fixed: dict[str, np.ndarray] = dict(ADAIN_INPUT_CONV) if layout == "adain" else {}
    keys = list(fixed)
    for ours, spec in key_specs(layout, arch_name).items():
        if ours in canonical or ours not in heads:
            keys.append(spec.key)
        if spec.key.endswith(".running_var"):
            counter = _counter_key(spec.key)
            fixed[counter] = np.zeros((), np.int64)
            keys.append(counter)
    return keys, fixed


def from_canonical(
    canonical: Mapping[str, np.ndarray],
    layout: Layout,
    arch_name: str,
    source: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Canonical arrays -> a state dict of ``layout``: the exact inverse of :func:`to_canonical`.

    Args:
        canonical: ``"<layer>/<role>"`` arrays as from :func:`to_canonical`.
        layout: target layout.
        arch_name: ``"vgg16"`` or ``"vgg19"``.
        source: the state dict that was read; its key order is kept and every tensor the canonical
            dict does not name (AdaIN's ``0.*``, ``num_batches_tracked``, a head left out of the
            canonical arrays) is passed through untouched. When None, the keys come out in
            network order, with AdaIN's published input conv and zero ``num_batches_tracked``.

    Returns:
        A new dict of C-contiguous arrays (OIHW convs, (out, in) Linear).

    Raises:
        WeightFileError: a canonical array is missing or its shape differs from ``source``'s.
    """
    specs = key_specs(layout, arch_name)
    inverse = {spec.key: ours for ours, spec in specs.items()}
    heads = head_key_map(layout, arch_name)
    if source is not None:
        keys, kept = list(source), source
    else:
        keys, kept = _fresh_state(canonical, layout, arch_name)
    out: dict[str, np.ndarray] = {}
    for key in keys:
        ours = inverse.get(key)
        if ours is None or (ours not in canonical and ours in heads and source is not None):
            out[key] = kept[key]
            continue
        if ours not in canonical:
            raise WeightFileError(f"{layout} {arch_name}: canonical arrays lack {ours!r}")
        w = _to_theirs(np.asarray(canonical[ours]), specs[ours])
        if source is not None and w.shape != np.shape(source[key]):
            raise WeightFileError(
                f"{layout} {arch_name}: {ours} gives {key} shape {w.shape}, "
                f"the source has {np.shape(source[key])}"
            )
        out[key] = w
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
        ValueError: rows not a multiple of ``channels``, or an order other than ``"chw"`` and
            ``"hwc"``.

    Example:
        >>> k = np.arange(4.0)[:, None]  # rows (c0p0, c0p1, c1p0, c1p1) in chw order
        >>> convert_flatten_rows(k, 2, "chw", "hwc").ravel().tolist()
        [0.0, 2.0, 1.0, 3.0]
    """
    for order in (src, dst):
        if order not in ("chw", "hwc"):
            raise ValueError(f"flatten order {order!r}: expected 'chw' or 'hwc'")
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

    Use after :func:`vggnorm.core.rescale.rescale` called with ``head_dense=None`` for a ``"chw"``
    head (``rescale``'s own head step assumes Keras's ``"hwc"`` order).

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
