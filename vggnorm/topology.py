"""Which architecture a weight file holds, and how its layers map onto it. No framework, no I/O.

Weights-only files say little: layer names and shapes. A stock VGG16/VGG19 is recognised by its
sequence of conv kernel shapes (13 or 16 convs of the published widths); the file's own layer
names are then bound to the table in :mod:`vggnorm.archs` by position, so ``conv2d_7`` in a
``.weights.h5`` works as well as ``block3_conv2``. Files with a model config (``.keras``, whole-model
``.h5``) are described from that config by :mod:`vggnorm.keras_config`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .archs import ARCHS, Arch, ConvSpec, DenseSpec, HeadSpec, Padding, PoolSpec
from .errors import ArchitectureError
from .weightset import BN_ROLES, CONV_ROLES, LayerEntry, WeightFile


@dataclass(frozen=True)
class Bound:
    """An architecture whose layer names are the weight file's own names."""

    arch: Arch
    source: str  # how it was determined, for messages and provenance

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
    for i, e in enumerate(wf.layers):
        if not set(e.roles) & set(BN_ROLES) or not e.shapes:
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
    return Bound(Arch(stock.name, features, head), f"{stock.name} (recognised from conv shapes)")


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
    if wf.config is not None:
        from .keras_config import arch_from_config

        stock = detect_stock(wf)
        if model is not None and stock not in (None, model):
            raise ArchitectureError(f"{wf.path} holds a {stock}, but --model is {model}")
        return Bound(arch_from_config(wf.config, wf), "model config")
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
            f"{wf.path} holds {len(_convs(wf.layers))} conv layers, a {stock}, but --model is {model}"
        )
    bound = _bind_stock(wf, ARCHS[stock])
    return _torch_layout(bound, wf.layout) if wf.layout else bound


def _torch_layout(bound: Bound, layout: str) -> Bound:
    """A PyTorch layout's differences from Keras's VGG: the head flattens (C, H, W) and ends in
    logits (torchvision's ``classifier.6`` has no softmax); AdaIN pads by reflection."""
    arch = bound.arch
    head = arch.head
    if head is not None:
        dense = list(head.layers)
        last = dense[-1]
        if isinstance(last, DenseSpec) and last.activation == "softmax":
            dense[-1] = replace(last, activation="linear")
        # torchvision's AdaptiveAvgPool2d((7, 7)) is the identity on the 7x7 map of a 224 input.
        head = replace(head, layers=tuple(dense), flatten_order="chw", input_size=224)
    padding: Padding = "reflect" if layout == "adain" else "zero"
    return Bound(replace(arch, head=head, padding=padding), f"{bound.source}, {layout} layout")


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
