"""Which architecture a weight file holds, and how its layers map onto it. No framework, no I/O.

Weights-only files say little: layer names and shapes. A stock VGG16/VGG19 is recognised by its
sequence of conv kernel shapes (13 or 16 convs of the published widths); the file's own layer
names are then bound to the table in :mod:`vggnorm.core.archs` by position, so ``conv2d_7`` in a
``.weights.h5`` works as well as ``block3_conv2``. Files with a model config (``.keras``, whole-model
``.h5``) are described from that config by :mod:`vggnorm.core.keras_config`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .archs import (
    ARCHS,
    Arch,
    ConvSpec,
    DenseSpec,
    FeatureLayer,
    HeadSpec,
    NormSpec,
    Padding,
    PoolKind,
    PoolSpec,
)
from .errors import ArchitectureError, VggnormError
from .weightset import BN_ROLES, CONV_ROLES, LayerEntry, WeightFile, WeightSet


@dataclass(frozen=True)
class Bound:
    """An architecture whose layer names are the weight file's own names.

    Attributes:
        arch: the architecture, named as the file names its layers.
        source: how it was determined, for messages and provenance.
        stock: ``"vgg16"``/``"vgg19"`` when the conv chain is that stock network's (whatever the
            file calls its layers and whatever head follows), else None. Set once, here; every
            command that needs "is this a stock VGG" reads it.
    """

    arch: Arch
    source: str
    stock: str | None = None

    @property
    def conv_names(self) -> tuple[str, ...]:
        return self.arch.conv_names


def _convs(layers: Sequence[LayerEntry]) -> list[LayerEntry]:
    return [e for e in layers if e.shapes and len(e.shapes[0]) == 4]


def _denses(layers: Sequence[LayerEntry]) -> list[LayerEntry]:
    return [e for e in layers if e.shapes and len(e.shapes[0]) == 2]


def detect_stock(wf: WeightFile) -> str | None:
    """``"vgg16"``/``"vgg19"`` when the conv kernels match that table exactly, else None."""
    shapes = [e.shapes[0] for e in _convs(wf.layers)]
    for name, arch in ARCHS.items():
        expected = []
        c_in = 3
        for conv in arch.convs:
            expected.append((*conv.kernel_size, c_in, conv.filters))
            c_in = conv.filters
        if shapes == expected:
            return name
    return None


def _refuse_conv_batchnorm(wf: WeightFile, stock: Arch) -> None:
    """A weights-only file cannot say where a BatchNormalization sits. One that could sit
    between a conv and its ReLU (before the first Dense in a file that keeps model order, or of
    a conv's width in a ``.weights.h5``, whose layers are grouped by class) would be left out of
    the rescaling and change the function: refuse it."""
    widths = {c.filters for c in stock.convs}
    first_dense = next((i for i, e in enumerate(wf.layers) if e in _denses(wf.layers)), None)
    ordered = wf.format in ("legacy-h5", "legacy-h5-model")
    placed = {bn for _, bn, _ in wf.norms}  # the file says where these sit
    for i, e in enumerate(wf.layers):
        if not set(e.roles) & set(BN_ROLES) or not e.shapes or e.name in placed:
            continue
        before_head = first_dense is None or i < first_dense
        if before_head if ordered else e.shapes[0][0] in widths:
            raise ArchitectureError(
                f"{wf.path}: layer {e.name!r} is a BatchNormalization that may sit between a "
                "conv and its ReLU, and a weights-only file does not say where it is; save the "
                "whole model (.keras or model.save('x.h5')) so vggnorm can read its config"
            )


def _bind_stock(wf: WeightFile, stock: Arch) -> Bound:
    _refuse_conv_batchnorm(wf, stock)
    convs = _convs(wf.layers)
    names = {c.name: e.name for c, e in zip(stock.convs, convs)}
    features = tuple(
        replace(layer, name=names[layer.name]) if isinstance(layer, ConvSpec) else layer
        for layer in stock.features
    )
    head = None
    denses = _denses(wf.layers)
    if denses:
        last = stock.convs[-1].filters
        rows = denses[0].shapes[0][0]
        stock_names = stock.head is not None and [e.name for e in denses] == [
            d.name for d in stock.head.dense
        ]
        # A 32x32 stock top flattens a 1x1 map: same rows as global pooling, but it is a Flatten.
        if rows == last and not stock_names:
            reduce = "gap"
            size = None
        elif rows % last == 0 and _is_square(rows // last):
            reduce = "flatten"
            side = int(round((rows // last) ** 0.5))
            size = side * 2 ** sum(isinstance(f, PoolSpec) for f in stock.features)
        else:
            raise ArchitectureError(
                f"{wf.path}: dense layer {denses[0].name!r} reads {rows} values, which is neither "
                f"{last} (global pooling) nor a square map of {last} channels (Flatten)"
            )
        # Activations of a weights-only head are unknown except for the stock top.
        stock_top = [d.name for d in stock.head.dense] if stock.head else []
        is_stock_top = len(denses) == len(stock_top) and reduce == "flatten"
        dense = tuple(
            DenseSpec(
                e.name,
                e.shapes[0][1],
                stock.head.dense[i].activation if (is_stock_top and stock.head) else "unknown",
                len(e.shapes) > 1,
            )
            for i, e in enumerate(denses)
        )
        head = HeadSpec(reduce, dense, size)  # type: ignore[arg-type]
    arch = Arch(stock.name, features, head)
    return Bound(arch, f"{stock.name} (recognised from conv shapes)", stock.name)


def stock_chain(arch: Arch) -> str | None:
    """``"vgg16"``/``"vgg19"`` when ``arch``'s features are that network's conv chain (plain 3x3
    ReLU convs, 2x2 max pooling, in the same places), whatever the layers are named."""

    def shape(layer: FeatureLayer) -> tuple[object, ...]:
        if isinstance(layer, ConvSpec):
            return ("conv", layer.filters, layer.kernel_size, layer.strides, layer.padding,
                    layer.use_bias, layer.norm is None)  # fmt: skip
        return ("pool", layer.kind, layer.pool_size, layer.strides)

    ours = [shape(f) for f in arch.features]
    for name, stock in ARCHS.items():
        if ours == [shape(f) for f in stock.features]:
            return name
    return None


def _is_square(n: int) -> bool:
    r = int(round(n**0.5))
    return r * r == n


def bind(wf: WeightFile, model: str | None = None) -> Bound:
    """The architecture of ``wf`` with the file's layer names.

    Args:
        wf: the weight file's description.
        model: ``"vgg16"``/``"vgg19"`` when the user named one; must agree with the file.

    Raises:
        ArchitectureError: the file is not a VGG this tool can normalize, or disagrees with
            ``model``.
    """
    if wf.arch is not None:
        return _bind_recorded(wf, wf.arch, model)
    if wf.config is not None:
        from .keras_config import arch_from_config

        stock = detect_stock(wf)
        if model is not None and stock not in (None, model):
            raise ArchitectureError(f"{wf.path} holds a {stock}, not the {model} asked for")
        arch = arch_from_config(wf.config, wf)
        return Bound(arch, "model config", stock_chain(arch))
    stock = detect_stock(wf)
    if stock is None:
        convs = _convs(wf.layers)
        raise ArchitectureError(
            f"{wf.path}: {len(convs)} conv layers with shapes that match neither VGG16 nor VGG19; "
            "a weights-only file of another VGG-like model carries no architecture: save the "
            "whole model (.keras or model.save('x.h5')) so vggnorm can read its config"
        )
    if model is not None and model != stock:
        raise ArchitectureError(
            f"{wf.path} holds {len(_convs(wf.layers))} conv layers, a {stock}, not the {model} asked for"
        )
    bound = _bind_stock(wf, ARCHS[stock])
    bound = _with_norms(bound, wf.norms) if wf.norms else bound
    return _torch_layout(bound, wf.layout) if wf.layout else bound


def _bind_recorded(wf: WeightFile, arch: Arch, model: str | None) -> Bound:
    """A file that records its architecture as data (an ONNX graph, a MatConvNet layer list)."""
    stock = stock_chain(arch)
    if model is not None and stock is not None and stock != model:
        raise ArchitectureError(f"{wf.path} holds a {stock}, not the {model} asked for")
    return Bound(arch, f"{wf.format} layers ({len(arch.convs)} convs)", stock)


def _with_norms(bound: Bound, norms: Sequence[tuple[str, str, float]]) -> Bound:
    """The BatchNorm a layout places between each conv and its ReLU (``vgg16_bn``). Such a chain
    is not the stock network (``stock`` is None): the BatchNorms are part of its function."""
    by_conv = {conv: NormSpec(bn, epsilon=eps) for conv, bn, eps in norms}
    features = tuple(
        replace(f, norm=by_conv[f.name]) if isinstance(f, ConvSpec) and f.name in by_conv else f
        for f in bound.arch.features
    )
    arch = replace(bound.arch, features=features)
    return Bound(arch, f"{bound.source}, BatchNorm between each conv and its ReLU", None)


def _torch_layout(bound: Bound, layout: str) -> Bound:
    """A PyTorch layout's differences from Keras's VGG: the head flattens (C, H, W) and ends in
    logits (torchvision's ``classifier.6`` and timm's ``head.fc`` have no softmax; timm's
    ``pre_logits`` alone ends in its ReLU); AdaIN pads by reflection."""
    arch = bound.arch
    head = arch.head
    if head is not None:
        n = len(head.layers)
        relu_last = layout.startswith("timm") and n == 2
        dense = tuple(
            replace(d, activation="relu" if i < n - 1 or relu_last else "linear")
            if isinstance(d, DenseSpec) else d
            for i, d in enumerate(head.layers)
        )  # fmt: skip
        # torchvision's AdaptiveAvgPool2d((7, 7)) is the identity on the 7x7 map of a 224 input,
        # and timm's 7x7 pre_logits.fc1 is a Dense on it (its global pooling then sees 1x1).
        head = replace(head, layers=dense, flatten_order="chw", input_size=224)
    padding: Padding = "reflect" if layout == "adain" else "zero"
    return replace(
        bound, arch=replace(arch, head=head, padding=padding), source=f"{bound.source}, {layout} layout"
    )


def fingerprint(arrays: Mapping[str, np.ndarray], layers: Sequence[str]) -> str:
    """sha256 over the weights of ``layers`` (convs, and BatchNorms between conv and ReLU) in
    network order, as little-endian float32.

    Independent of file layout, layer names and storage dtype, so stats gathered from one copy of
    a model match any other copy of the same weights. A BatchNorm's arrays are labelled by their
    position among those present (as in stats files written before roles had names).
    """
    h = hashlib.sha256()
    for name in layers:
        bn = [role for role in BN_ROLES if f"{name}/{role}" in arrays]
        labels = [(role, role) for role in CONV_ROLES] + [
            (role, str(i)) for i, role in enumerate(bn)
        ]
        for role, label in labels:
            key = f"{name}/{role}"
            if key in arrays:
                a = np.ascontiguousarray(arrays[key], dtype="<f4")
                h.update(f"{label}{a.shape}".encode())
                h.update(a.tobytes())
    return h.hexdigest()


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

    @property
    def preprocess(self) -> str:
        """The input convention of the file's layout: ``caffe`` for Keras's VGG (and Gatys's,
        AdaIN's and MatConvNet's files), ``torch`` for torchvision's and timm's.

        Raises:
            VggnormError: an ONNX file, which does not record it (``fix="preprocess"``).
        """
        wf = self.weights.file
        if wf.preprocess is None and wf.format == "onnx":
            raise VggnormError(
                f"{self.path}: an ONNX graph does not record how its input was preprocessed; "
                "name the preprocessing (caffe for Keras's VGG and tf2onnx exports of it, torch "
                "for torchvision's and timm's, unit for RGB / 255)",
                fix="preprocess",
            )
        return wf.preprocess or "caffe"

    def fingerprint(self) -> str:
        return fingerprint(self.arrays, self.bound.arch.weighted_features)

    def with_padding(self, padding: str | None) -> Loaded:
        """This file with every conv padding its input as ``padding`` says (None: as the file's
        layout does): statistics for AdaIN are gathered with its reflection padding.

        Raises:
            VggnormError: an unknown padding.
        """
        if padding is None or padding == self.bound.arch.padding:
            return self
        if padding not in ("zero", "reflect"):
            raise VggnormError(f"unknown padding {padding!r}; expected zero or reflect")
        arch = replace(self.bound.arch, padding=padding)  # type: ignore[arg-type]
        return Loaded(self.weights, replace(self.bound, arch=arch,
                                            source=f"{self.bound.source}, {padding} padding"))  # fmt: skip


    def with_pooling(self, pooling: str | None) -> Loaded:
        """This file with every pooling layer ``max`` or ``avg`` (None: as the file's). Both
        commute with a positive per-channel scale, so the rescaling is exact under either; the
        means after a pooling layer depend on which one runs.

        Raises:
            VggnormError: an unknown pooling.
        """
        if pooling is None:
            return self
        if pooling not in ("max", "avg"):
            raise VggnormError(f"unknown pooling {pooling!r}; expected max or avg")
        arch = self.bound.arch
        kind: PoolKind = "max" if pooling == "max" else "avg"
        features = tuple(replace(f, kind=kind) if isinstance(f, PoolSpec) else f
                         for f in arch.features)  # fmt: skip
        if features == arch.features:
            return self
        bound = replace(self.bound, arch=replace(arch, features=features),
                        source=f"{self.bound.source}, {pooling} pooling")  # fmt: skip
        return Loaded(self.weights, bound)

    @property
    def pooling(self) -> str:
        """``max`` or ``avg`` when every pooling layer is that kind, else ``mixed``."""
        kinds = {f.kind for f in self.bound.arch.features if isinstance(f, PoolSpec)}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def as_measured(self, padding: str | None, pooling: str | None) -> Loaded:
        """This file run with the padding and pooling a stats run recorded (a ``mixed`` pooling
        is the file's own)."""
        return self.with_padding(padding).with_pooling(pooling if pooling != "mixed" else None)


def named_as(other: Loaded, like: Loaded) -> dict[str, np.ndarray]:
    """``other``'s conv (and conv BatchNorm) arrays under ``like``'s layer names, matched by
    position: the same network saved in another format or layout names its layers otherwise.

    Raises:
        ArchitectureError: the two hold different conv chains.
    """
    a, b = like.bound.arch, other.bound.arch
    shapes_a = [(c.filters, c.kernel_size) for c in a.convs]
    shapes_b = [(c.filters, c.kernel_size) for c in b.convs]
    if shapes_a != shapes_b or len(a.weighted_features) != len(b.weighted_features):
        raise ArchitectureError(f"{other.path} is not the same network as {like.path}")
    return _renamed(other.arrays, dict(zip(b.weighted_features, a.weighted_features)))


def _renamed(arrays: Mapping[str, np.ndarray], names: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The arrays of the layers in ``names``, keyed by their new layer names."""
    out = {}
    for key, value in arrays.items():
        layer, role = key.rsplit("/", 1)
        if layer in names:
            out[f"{names[layer]}/{role}"] = value
    return out


def stock_with_norms(arch: Arch) -> str | None:
    """``"vgg16"``/``"vgg19"`` when ``arch`` is that network with a BatchNorm between every conv
    and its ReLU (``vgg16_bn``), else None."""
    if not arch.norms or len(arch.norms) != len(arch.convs):
        return None
    plain = tuple(replace(f, norm=None) if isinstance(f, ConvSpec) else f for f in arch.features)
    return stock_chain(replace(arch, features=plain))


def stock_named(loaded: Loaded) -> dict[str, np.ndarray]:
    """A stock VGG16/VGG19's arrays (``vgg16_bn``'s too) under Keras's layer names (files name
    their layers in many ways; a BatchNorm after conv ``X`` is ``X_bn``), with the first Dense's
    rows in PyTorch's (C, H, W) flatten order.

    Raises:
        ArchitectureError: the file is not a stock VGG16/VGG19, with or without BatchNorm.
    """
    from .torch_layouts import keras_rows_to_torch, norm_layer

    which = loaded.bound.stock or stock_with_norms(loaded.bound.arch)
    if which is None:
        raise ArchitectureError(f"{loaded.path}: not a stock VGG16/VGG19 conv chain")
    stock = ARCHS[which]
    names = dict(zip(loaded.bound.conv_names, stock.conv_names))
    norms = loaded.bound.arch.norms
    names.update({norms[c]: norm_layer(names[c]) for c in loaded.bound.conv_names if c in norms})
    head = loaded.bound.arch.head
    if head is not None and stock.head is not None:
        names.update(zip((d.name for d in head.dense), (d.name for d in stock.head.dense)))
    out = _renamed(loaded.arrays, names)
    if head is not None and head.flatten_order == "hwc" and "fc1/kernel" in out:
        out["fc1/kernel"] = keras_rows_to_torch(out["fc1/kernel"], stock.convs[-1].filters)
    return out
