"""ONNX VGG graphs (``.onnx``), read and rewritten with the ``onnx`` package: the only module that
imports onnx.

The graph is followed from its input as a chain, the way torch.onnx and the model zoo write a
VGG (``Conv -> Relu -> MaxPool ... Flatten -> Gemm``) and the way tf2onnx writes one from Keras
(an input ``Transpose`` NHWC -> NCHW, the same chain, a ``Transpose`` back to NHWC before a
``Reshape``, and ``MatMul`` + ``Add`` for each Dense):

* between a conv and its ReLU: nothing, a ``BatchNormalization``, or a folded ``Mul`` and/or
  ``Add`` of per-channel constants (``a * z + c``: run as a BatchNorm with gamma ``a``, beta
  ``c``, mean 0, variance 1 and epsilon 0, which is ``a * z + c`` exactly);
* pools: ``MaxPool``/``AveragePool`` 2x2 of stride 2 (a 1x1 pool of stride 1 is skipped);
* the head: ``Flatten`` (or ``Reshape`` to 2-D) of the NCHW map (rows in (C, H, W) order) or,
  after a ``Transpose`` to NHWC, of that (rows in (H, W, C) order), or global pooling; then
  ``Gemm`` or ``MatMul`` (+ ``Add``) layers with ``Relu``/``Softmax``; a conv without padding
  after the last pool (timm's ``pre_logits``, MatConvNet's fc6) is a Dense over the map;
* ``Identity`` and ``Dropout`` are skipped anywhere.

Anything else before the first head layer (a residual ``Add`` of two tensors, a branch, a
non-ReLU activation, grouped or dilated convs, an op vggnorm cannot follow) is refused naming the
node. Weights must be initializers stored in the file (float16/32/64). Writing rewrites only the
initializers whose values change, each with the same name, dtype and shape, and records vggnorm's
provenance and scales in the model's ``metadata_props``; every node, name and attribute else is
kept. Reads and writes run in a guarded child process (:mod:`._guard`).

vggnorm names the layers itself (``block1_conv1``, ..., ``fc1``); the node names are kept as the
file's own names (:attr:`~vggnorm.core.weightset.WeightFile.native_names`). An ONNX file does
not record how its input was preprocessed: statistics on it need the preprocessing named.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.archs import Arch, ConvSpec, DenseSpec, FlattenOrder, HeadSpec, NormSpec, PoolSpec
from ..core.errors import ArchitectureError, WeightFileError
from ..core.weightset import Format, LayerEntry, WeightFile, WeightSet
from . import _patch, _torch
from ._guard import run_guarded
from ._patch import Patch
from .outputs import atomic_path

SUFFIXES = (".onnx",)
FORMAT: Format = "onnx"
_INSTALL = "pip install 'vggnorm[onnx]'"
_PRELOAD = ("onnx",)
_SKIPPED = ("Identity", "Dropout")
_FLOATS = ("float16", "float32", "float64")


def detect(path: Path) -> bool:
    """Whether this adapter reads ``path``: an ``.onnx`` suffix."""
    return path.suffix.lower() in SUFFIXES


@dataclass(frozen=True)
class _Place:
    """Where a canonical array lives: the initializer, how it is stored, its stored shape.

    ``kind``: ``conv`` (OIHW), ``linear_t`` ((out, in): Gemm with transB), ``linear`` ((in, out)),
    ``conv_linear`` (a Dense stored as a conv over the map, NCHW: rows in (C, H, W) order),
    ``vector`` (any shape holding one value per channel), ``synth`` (not stored: a folded
    Mul/Add's mean 0 and variance 1).
    """

    init: str
    kind: str
    shape: tuple[int, ...]


@dataclass
class _Walk:
    """The graph being followed, and what the walk found so far."""

    path: Path
    nodes: list[Any]
    inits: dict[str, np.ndarray]
    consumers: dict[str, list[int]]
    constants: dict[str, np.ndarray]
    features: list[ConvSpec | PoolSpec] = field(default_factory=list)
    head: list[DenseSpec] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    places: dict[str, _Place] = field(default_factory=dict)
    native: dict[str, str] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    layout: str = "nchw"
    input_layout: str = "nchw"
    reduce: str | None = None
    order: FlattenOrder = "chw"
    block: int = 1
    index: int = 0
    channels: int = 3
    done: bool = False
    before: str = ""  # the tensor the last node followed read
    final: str = ""  # the tensor the chain ends in

    def label(self, i: int) -> str:
        node = self.nodes[i]
        return f"node {node.name or i!r} ({node.op_type})"

    def refuse(self, i: int, why: str) -> ArchitectureError:
        return ArchitectureError(f"{self.path}: {self.label(i)} {why}")


def _load(path: Path) -> Any:
    """The model proto, refusing weights stored in other files (run in the guarded child)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as e:
        raise WeightFileError(f"{path}: not an ONNX model ({_torch.one_line(e)})") from e
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise WeightFileError(
                f"{path}: initializer {init.name!r} is stored in an external file; vggnorm reads "
                "models whose weights are inside the .onnx file"
            )
    return model


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _graph(path: Path, model: Any) -> _Walk:
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for name, arr in inits.items():
        if arr.dtype.kind == "f" and arr.dtype.name not in _FLOATS:
            raise WeightFileError(f"{path}: initializer {name!r} has dtype {arr.dtype}")
    constants = dict(inits)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.output:
            value = _attrs(node).get("value")
            if value is not None:
                constants[node.output[0]] = numpy_helper.to_array(value)
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(i)
    return _Walk(path, list(graph.node), inits, consumers, constants)


def _input(walk: _Walk, model: Any) -> str:
    inputs = [v.name for v in model.graph.input if v.name not in walk.inits]
    if len(inputs) != 1:
        raise ArchitectureError(f"{walk.path}: {len(inputs)} graph inputs {inputs}; a VGG has one")
    return str(inputs[0])


def _next(walk: _Walk, tensor: str) -> int | None:
    """The one node that reads ``tensor`` (None at the end of the graph)."""
    users = walk.consumers.get(tensor, [])
    if len(users) > 1:
        names = ", ".join(walk.label(i) for i in users)
        raise ArchitectureError(
            f"{walk.path}: tensor {tensor!r} feeds {len(users)} nodes ({names}): the graph branches"
        )
    return users[0] if users else None


def _weight(walk: _Walk, i: int, name: str, what: str) -> np.ndarray:
    """An initializer the node reads; refused when it is computed or shared."""
    if name not in walk.inits:
        raise walk.refuse(i, f"reads its {what} {name!r} from another node, not an initializer")
    if name in walk.used or len(walk.consumers.get(name, [])) > 1:
        raise walk.refuse(i, f"shares the initializer {name!r} with another node")
    walk.used.add(name)
    return walk.inits[name]


def _keep(walk: _Walk, key: str, value: np.ndarray, place: _Place) -> None:
    walk.arrays[key] = np.array(value, order="C", copy=True)
    walk.places[key] = place


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _conv_padding(walk: _Walk, i: int, kh: int, kw: int) -> str:
    """``same`` or ``valid`` for a stride-1 conv; anything else is refused."""
    a = _attrs(walk.nodes[i])
    groups, dilations = a.get("group", 1), tuple(a.get("dilations", (1, 1)))
    if groups != 1 or set(dilations) != {1}:
        raise walk.refuse(i, f"is a grouped or dilated conv (group {groups}, dilations {dilations})")
    strides, pads = tuple(a.get("strides", (1, 1))), tuple(a.get("pads", (0, 0, 0, 0)))
    auto = _text(a.get("auto_pad", "NOTSET"))
    if strides != (1, 1):
        raise walk.refuse(i, f"has strides {strides}; VGG's convs have stride 1")
    if auto in ("SAME_UPPER", "SAME_LOWER") or (
        kh % 2 == kw % 2 == 1 and pads == ((kh - 1) // 2, (kw - 1) // 2) * 2 and any(pads)
    ):
        return "same"
    if auto in ("NOTSET", "VALID") and not any(pads):
        return "valid"
    raise walk.refuse(i, f"pads {pads} (auto_pad {auto}), neither 'same' nor none")


def _channel_const(walk: _Walk, i: int, tensor: str, channels: int) -> np.ndarray:
    """The per-channel constant a Mul or Add after a conv applies (NCHW: shape (1, C, 1, 1))."""
    node = walk.nodes[i]
    others = [n for n in node.input if n != tensor]
    if len(node.input) != 2 or len(others) != 1:
        raise walk.refuse(i, "adds or multiplies two computed tensors (a residual connection)")
    value = _weight(walk, i, others[0], "constant")
    shape = (1,) * (4 - value.ndim) + tuple(value.shape) if value.ndim <= 4 else value.shape
    if shape != (1, channels, 1, 1) or value.dtype.kind != "f":
        raise walk.refuse(i, f"applies a constant of shape {value.shape}, not one per channel "
                             f"(1, {channels}, 1, 1)")  # fmt: skip
    return value


def _affine(walk: _Walk, i: int, tensor: str, conv: str, channels: int) -> tuple[NormSpec, str]:
    """A folded BatchNorm after a conv: ``Mul`` and/or ``Add`` of per-channel constants."""
    found: dict[str, np.ndarray] = {}
    name = f"{conv}_bn"
    for op, role in (("Mul", "gamma"), ("Add", "beta")):
        node = walk.nodes[i]
        if node.op_type != op:
            continue
        value = _channel_const(walk, i, tensor, channels)
        init = next(n for n in node.input if n != tensor)
        _keep(walk, f"{name}/{role}", value.ravel(), _Place(init, "vector", tuple(value.shape)))
        found[role] = value
        tensor = node.output[0]
        nxt = _next(walk, tensor)
        if nxt is None:
            break
        i = nxt
    dtype = next(iter(found.values())).dtype
    for role, fill in (("moving_mean", 0.0), ("moving_variance", 1.0)):
        _keep(walk, f"{name}/{role}", np.full(channels, fill, dtype), _Place("", "synth", ()))
    return NormSpec(name, 0.0, center="beta" in found, scale="gamma" in found), tensor


def _batchnorm(walk: _Walk, i: int, conv: str, channels: int) -> tuple[NormSpec, str]:
    node = walk.nodes[i]
    a = _attrs(node)
    if a.get("training_mode", 0) or len(node.input) != 5:
        raise walk.refuse(i, "is a BatchNormalization in training mode")
    name = f"{conv}_bn"
    for init, role in zip(node.input[1:], ("gamma", "beta", "moving_mean", "moving_variance")):
        value = _weight(walk, i, init, role)
        if value.shape != (channels,):
            raise walk.refuse(i, f"has a {role} of shape {value.shape}, expected ({channels},)")
        _keep(walk, f"{name}/{role}", value, _Place(init, "vector", tuple(value.shape)))
    return NormSpec(name, float(a.get("epsilon", 1e-5))), str(node.output[0])


def _to_relu(walk: _Walk, i: int, tensor: str, conv: str, channels: int) -> tuple[NormSpec | None, str]:
    """What sits between conv node ``i`` and its ReLU; returns the norm and the ReLU's output."""
    norm = None
    j = _next(walk, tensor)
    while j is not None and walk.nodes[j].op_type in _SKIPPED:
        tensor, j = walk.nodes[j].output[0], _next(walk, walk.nodes[j].output[0])
    if j is not None and walk.nodes[j].op_type == "BatchNormalization":
        norm, tensor = _batchnorm(walk, j, conv, channels)
        j = _next(walk, tensor)
    elif j is not None and walk.nodes[j].op_type in ("Mul", "Add"):
        norm, tensor = _affine(walk, j, tensor, conv, channels)
        j = _next(walk, tensor)
    if j is None or walk.nodes[j].op_type != "Relu":
        what = "nothing" if j is None else walk.label(j)
        raise walk.refuse(i, f"is followed by {what}, not a ReLU: vggnorm rescales ReLU convs")
    return norm, str(walk.nodes[j].output[0])


def _conv(walk: _Walk, i: int, tensor: str) -> str:
    node = walk.nodes[i]
    if not node.input or node.input[0] != tensor:
        raise walk.refuse(i, "reads the chain's tensor as its weights")
    w = _weight(walk, i, node.input[1], "weights")
    if w.ndim != 4 or w.dtype.kind != "f" or w.shape[1] != walk.channels:
        raise walk.refuse(i, f"has weights of shape {w.shape}; it reads {walk.channels} channels")
    filters, _, kh, kw = (int(n) for n in w.shape)
    padding = _conv_padding(walk, i, kh, kw)
    after_pool = bool(walk.features) and isinstance(walk.features[-1], PoolSpec)
    if walk.head or (after_pool and padding == "valid" and kh > 1):
        return _head_conv(walk, i, w, padding)
    walk.index += 1
    name = f"block{walk.block}_conv{walk.index}"
    _keep(walk, f"{name}/kernel", w.transpose(2, 3, 1, 0), _Place(node.input[1], "conv", w.shape))
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        b = _weight(walk, i, bias, "bias")
        _keep(walk, f"{name}/bias", b.ravel(), _Place(bias, "vector", tuple(b.shape)))
    walk.native[name] = node.name or node.input[1]
    norm, out = _to_relu(walk, i, node.output[0], name, filters)
    walk.features.append(ConvSpec(name, filters, (kh, kw), (1, 1), padding, bias is not None, norm))
    walk.channels = filters
    return out


def _pool(walk: _Walk, i: int, tensor: str) -> str:
    node = walk.nodes[i]
    a = _attrs(node)
    kernel, strides = tuple(a.get("kernel_shape", ())), tuple(a.get("strides", (1, 1)))
    pads, auto = tuple(a.get("pads", (0, 0, 0, 0))), _text(a.get("auto_pad", "NOTSET"))
    plain = not any(pads) and auto in ("NOTSET", "VALID") and set(a.get("dilations", (1, 1))) == {1}
    if plain and kernel == (1, 1) and strides == (1, 1):  # an identity (adaptive pooling to 7x7)
        return str(node.output[0])
    if walk.head or walk.reduce or not plain or kernel != (2, 2) or strides != (2, 2):
        raise walk.refuse(i, f"pools {kernel} with strides {strides}, pads {pads}: vggnorm "
                             "follows 2x2 pooling of stride 2 in the conv chain")  # fmt: skip
    kind = "max" if node.op_type == "MaxPool" else "avg"
    walk.features.append(PoolSpec(f"block{walk.block}_pool", kind))  # type: ignore[arg-type]
    walk.block, walk.index = walk.block + 1, 0
    return str(node.output[0])


def _transpose(walk: _Walk, i: int) -> str:
    node = walk.nodes[i]
    perm = tuple(_attrs(node).get("perm", ()))
    if not walk.features and perm == (0, 3, 1, 2) and walk.input_layout == "nchw":
        walk.input_layout = "nhwc"  # tf2onnx: NHWC input to the NCHW convs
    elif walk.features and not walk.reduce and perm == (0, 2, 3, 1) and walk.layout == "nchw":
        walk.layout = "nhwc"  # tf2onnx: back to NHWC before Keras's Flatten
    else:
        raise walk.refuse(i, f"transposes with perm {perm} where vggnorm follows none")
    return str(node.output[0])


def _flatten(walk: _Walk, i: int) -> str:
    """``Flatten`` or ``Reshape`` to (N, rows): the head starts here (after global pooling or
    timm-like head convs it changes nothing)."""
    node = walk.nodes[i]
    if node.op_type == "Flatten" and _attrs(node).get("axis", 1) != 1:
        raise walk.refuse(i, f"flattens from axis {_attrs(node).get('axis')}, not 1")
    if node.op_type == "Reshape":
        shape = walk.constants.get(node.input[1]) if len(node.input) > 1 else None
        if shape is None or np.asarray(shape).size != 2:
            raise walk.refuse(i, f"reshapes to {None if shape is None else shape.tolist()}, not "
                                 "to (batch, values) from a constant shape")  # fmt: skip
    if not walk.features:
        raise walk.refuse(i, "flattens before any conv")
    if walk.reduce is None:
        walk.reduce, walk.order = "flatten", "hwc" if walk.layout == "nhwc" else "chw"
    return str(node.output[0])


def _global_pool(walk: _Walk, i: int) -> str:
    if walk.reduce is not None and not walk.head:
        raise walk.refuse(i, "pools a map that is already flattened")
    if walk.reduce is None:
        walk.reduce = "gap" if walk.nodes[i].op_type == "GlobalAveragePool" else "gmp"
    return str(walk.nodes[i].output[0])


def _dense(walk: _Walk, i: int, kernel: np.ndarray, kind: str, bias: str | None) -> str:
    """Head layer ``i`` with ``kernel`` in canonical (in, out) form; the next tensor."""
    node = walk.nodes[i]
    name = f"fc{len(walk.head) + 1}"
    if not walk.head:
        _first_dense_rows(walk, i, kernel.shape[0])
    _keep(walk, f"{name}/kernel", kernel, _Place(node.input[1], kind, walk.inits[node.input[1]].shape))
    if bias is not None:
        b = _weight(walk, i, bias, "bias")
        if b.size != kernel.shape[1]:
            raise walk.refuse(i, f"has {b.size} biases for {kernel.shape[1]} units")
        _keep(walk, f"{name}/bias", b.ravel(), _Place(bias, "vector", tuple(b.shape)))
    walk.head.append(DenseSpec(name, int(kernel.shape[1]), "linear", bias is not None))
    walk.native[name] = node.name or node.input[1]
    walk.channels = int(kernel.shape[1])
    return str(node.output[0])


def _first_dense_rows(walk: _Walk, i: int, rows: int) -> None:
    c = walk.channels
    side = int(round((rows // c) ** 0.5)) if rows % c == 0 else 0
    if walk.reduce is None:
        raise walk.refuse(i, "reads the conv map without a Flatten or a global pooling")
    if (walk.reduce == "flatten" and side * side * c != rows) or (walk.reduce != "flatten" and rows != c):
        raise walk.refuse(i, f"reads {rows} values, not a square map of the last conv's {c} channels")


def _gemm(walk: _Walk, i: int, tensor: str) -> str:
    node = walk.nodes[i]
    a = _attrs(node)
    if node.input[0] != tensor or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or (
        a.get("beta", 1.0) != 1.0 and len(node.input) > 2
    ):  # fmt: skip
        raise walk.refuse(i, "is a Gemm vggnorm does not follow (transA, alpha or beta set)")
    w = _weight(walk, i, node.input[1], "weights")
    trans = bool(a.get("transB", 0))
    kernel = w.T if trans else w
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return _dense(walk, i, kernel, "linear_t" if trans else "linear", bias)


def _matmul(walk: _Walk, i: int, tensor: str) -> str:
    node = walk.nodes[i]
    if node.input[0] != tensor:
        raise walk.refuse(i, "multiplies by the chain's tensor from the left")
    w = _weight(walk, i, node.input[1], "weights")
    if w.ndim != 2:
        raise walk.refuse(i, f"has weights of shape {w.shape}")
    j = _next(walk, str(node.output[0]))
    bias = None
    if j is not None and walk.nodes[j].op_type == "Add":
        others = [n for n in walk.nodes[j].input if n != node.output[0]]
        if len(others) == 1 and others[0] in walk.inits and walk.inits[others[0]].size == w.shape[1]:
            bias = others[0]
    out = _dense(walk, i, w, "linear", bias)
    return str(walk.nodes[j].output[0]) if bias is not None and j is not None else out


def _head_conv(walk: _Walk, i: int, w: np.ndarray, padding: str) -> str:
    """A conv after the last pool without padding: a Dense over the whole map (rows in
    (C, H, W) order); then 1x1 convs (timm's ``pre_logits``, MatConvNet's fc layers)."""
    node = walk.nodes[i]
    if padding != "valid" or (walk.head and w.shape[2:] != (1, 1)) or walk.layout != "nchw":
        raise walk.refuse(i, f"is a conv of shape {w.shape} in the head")
    if walk.reduce is None:
        walk.reduce, walk.order = "flatten", "chw"
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return _dense(walk, i, w.reshape(w.shape[0], -1).T, "conv_linear", bias)


def _activation(walk: _Walk, i: int) -> str:
    node = walk.nodes[i]
    if not walk.head or walk.head[-1].activation != "linear":
        raise walk.refuse(i, "is an activation that does not follow a head layer")
    last = walk.head[-1]
    act = "relu" if node.op_type == "Relu" else "softmax"
    walk.head[-1] = DenseSpec(last.name, last.units, act, last.use_bias)
    walk.done = act == "softmax"
    return str(node.output[0])


def _step(walk: _Walk, i: int, tensor: str) -> str:
    """Follow node ``i``, which reads ``tensor``; returns the tensor it writes."""
    op = walk.nodes[i].op_type
    if walk.done:
        raise walk.refuse(i, "follows the final softmax")
    if op in _SKIPPED:
        return str(walk.nodes[i].output[0])
    if op == "Conv":
        return _conv(walk, i, tensor)
    if op in ("MaxPool", "AveragePool"):
        return _pool(walk, i, tensor)
    if op == "Transpose":
        return _transpose(walk, i)
    if op in ("Flatten", "Reshape"):
        return _flatten(walk, i)
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        return _global_pool(walk, i)
    if op == "Gemm":
        return _gemm(walk, i, tensor)
    if op == "MatMul":
        return _matmul(walk, i, tensor)
    if op in ("Relu", "Softmax"):
        return _activation(walk, i)
    where = "in the head" if walk.head else "before the first head layer"
    raise walk.refuse(i, f"is an op vggnorm cannot follow {where} (a VGG chain: Conv, "
                         "BatchNormalization, Relu, MaxPool, Flatten, Gemm)")  # fmt: skip


def _follow(path: Path) -> tuple[Any, _Walk]:
    """Load the graph and follow it from its input to its end."""
    model = _load(path)
    walk = _graph(path, model)
    tensor = _input(walk, model)
    seen: set[int] = set()
    while (i := _next(walk, tensor)) is not None:
        if i in seen:
            raise walk.refuse(i, "is reached twice: the graph has a cycle")
        seen.add(i)
        walk.before = tensor
        tensor = _step(walk, i, tensor)
    if not any(isinstance(f, ConvSpec) for f in walk.features):
        raise ArchitectureError(f"{path}: no conv layer on the path from the graph's input")
    walk.final = tensor
    return model, walk


@dataclass(frozen=True)
class Runnable:
    """A graph ready for onnxruntime, with what comparing two of them needs.

    Attributes:
        model: the serialized model, with ``output`` among its outputs.
        input: the input's name; ``nhwc``: whether it takes NHWC images (tf2onnx).
        size: the input's height when the graph fixes it (square inputs), else None.
        output: the tensor to compare: the logits before a final softmax, or the last tensor.
        headless: the graph ends in the conv chain (its output carries the last conv's scales).
        output_nchw: a headless output's layout (channels on axis 1, else last).
    """

    model: bytes
    input: str
    nhwc: bool
    size: int | None
    output: str
    headless: bool
    output_nchw: bool


def _runnable(path: Path) -> Runnable:
    from onnx import helper

    model, walk = _follow(path)
    output = walk.before if walk.done else walk.final  # the logits, not the softmax
    if output not in {o.name for o in model.graph.output}:
        model.graph.output.append(helper.make_empty_tensor_value_info(output))
    graph_input = next(v for v in model.graph.input if v.name not in walk.inits)
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in graph_input.type.tensor_type.shape.dim]  # fmt: skip
    nhwc = walk.input_layout == "nhwc"
    size = dims[1 if nhwc else 2] if len(dims) == 4 else None
    return Runnable(model.SerializeToString(), graph_input.name, nhwc, size, output,
                    not walk.head, walk.layout == "nchw")  # fmt: skip


def runnable(path: str | os.PathLike[str]) -> Runnable:
    """The graph at ``path`` prepared for onnxruntime (read in a guarded child)."""
    p = Path(path)
    _need_onnx()
    return run_guarded(_runnable, p, what=p, preload=_PRELOAD)


def _arch(walk: _Walk) -> Arch:
    n = sum(isinstance(f, ConvSpec) for f in walk.features)
    head = None
    if walk.head:
        rows = walk.arrays["fc1/kernel"].shape[0]
        pools = sum(isinstance(f, PoolSpec) for f in walk.features)
        last = next(f.filters for f in reversed(walk.features) if isinstance(f, ConvSpec))
        side = int(round((rows // last) ** 0.5)) if walk.reduce == "flatten" else 0
        size = side * 2**pools if side else None
        head = HeadSpec(walk.reduce, tuple(walk.head), size, walk.order)  # type: ignore[arg-type]
    return Arch({13: "vgg16", 16: "vgg19"}.get(n, f"onnx-{n}convs"), tuple(walk.features), head)


def _layers(walk: _Walk) -> tuple[LayerEntry, ...]:
    by_layer: dict[str, list[str]] = {}
    for key in walk.arrays:
        layer, role = key.rsplit("/", 1)
        by_layer.setdefault(layer, []).append(role)
    return tuple(
        LayerEntry(name, tuple(f"{name}/{r}" for r in roles),
                   tuple(tuple(int(n) for n in walk.arrays[f"{name}/{r}"].shape) for r in roles),
                   tuple(str(walk.arrays[f"{name}/{r}"].dtype) for r in roles), tuple(roles))
        for name, roles in by_layer.items()
    )  # fmt: skip


def _metadata(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _read(path: Path) -> WeightSet:
    """The graph followed into vggnorm's arrays (run in the guarded child)."""
    model, walk = _follow(path)
    meta = _metadata(model)
    provenance = None
    if _patch.PROVENANCE_KEY in meta:
        try:
            provenance = json.loads(meta[_patch.PROVENANCE_KEY])
        except ValueError as e:
            raise WeightFileError(f"{path}: unreadable vggnorm provenance: {e}") from e
    wf = WeightFile(path, FORMAT, _layers(walk), None, provenance, walk.input_layout, None,
                    arch=_arch(walk), native_names=tuple(walk.native.items()))  # fmt: skip
    return WeightSet(wf, walk.arrays)


def _need_onnx() -> None:
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise ImportError(f"ONNX files need the onnx package: {_INSTALL}")


def read(path: str | os.PathLike[str]) -> WeightSet:
    """The graph as a :class:`~vggnorm.core.weightset.WeightSet` with its architecture
    (guarded child: a damaged file is one error line).

    Raises:
        WeightFileError: unreadable, damaged, external weights.
        ArchitectureError: the graph leaves the chain (the message names the node).
        ImportError: onnx is not installed.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightFileError(f"{p}: no such file")
    _need_onnx()
    return run_guarded(_read, p, what=p, preload=_PRELOAD)


def read_scales(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The per-layer scales vggnorm stored in the model's ``metadata_props``, by layer name."""
    p = Path(path)
    meta = run_guarded(_metadata_of, p, what=p, preload=_PRELOAD)
    return _torch.scales_of(meta, p)


def _metadata_of(path: Path) -> dict[str, str]:
    return _metadata(_load(path))


def _stored(value: np.ndarray, place: _Place) -> np.ndarray:
    """A canonical array in the initializer's own layout."""
    w = np.asarray(value)
    if place.kind == "conv":
        w = w.transpose(3, 2, 0, 1)
    elif place.kind in ("linear_t", "conv_linear"):
        w = w.T
    return np.ascontiguousarray(w.reshape(place.shape))


def _write_patched(src: Path, tmp: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> None:
    """Load ``src``, replace the changed initializers, record the metadata, save to ``tmp``
    (run in the guarded child)."""
    import onnx
    from onnx import numpy_helper

    model, walk = _follow(src)
    by_name = {t.name: t for t in model.graph.initializer}
    for key, value in arrays.items():
        place = walk.places[key]
        if place.kind == "synth":
            continue  # a folded Mul/Add's implied mean 0 (divided: still 0) and variance 1
        old = by_name[place.init]
        stored = _stored(value, place).astype(numpy_helper.to_array(old).dtype)
        new = numpy_helper.from_array(stored, place.init)
        new.doc_string = old.doc_string
        old.CopyFrom(new)
    props = {p.key: p for p in model.metadata_props}
    for key, text in meta.items():
        entry = props.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, text
    onnx.save(model, str(tmp))


def check_target(src: Path, dst: Path, force: bool) -> None:
    """Refuse an output of another format, over the input or an existing file, or unwritable."""
    _patch.check_target(src, dst, force, detect)


def write(src: WeightFile, dst: Path, patch: Patch, force: bool) -> list[str]:
    """``src`` with ``patch`` applied to its initializers; provenance and scales in
    ``metadata_props``. Returns ``[]``: nothing is dropped."""
    check_target(src.path, dst, force)
    meta = _patch.metadata(patch)
    with atomic_path(dst, suffix=".onnx") as tmp:
        run_guarded(_write_patched, src.path, tmp, dict(patch.arrays), meta, what=src.path,
                    preload=_PRELOAD)  # fmt: skip
    return []
