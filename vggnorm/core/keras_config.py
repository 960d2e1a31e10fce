"""Read a VGG-like architecture from a Keras model config (JSON), without executing anything.

``.keras`` archives (``config.json``) and whole-model ``.h5`` files (``model_config``) describe
their layers as JSON. This module walks that JSON as plain data (nothing is deserialized, so a
Lambda's bytecode or a custom object is never run) and accepts exactly the chains the rescaling
is exact for: Conv2D + ReLU (inside the conv or as the next ReLU/Activation('relu') layer), with
max/average pooling and inference-time identities (Dropout...) between them, then a head starting
with Flatten or global pooling whose first Dense is compensated. Anything else is refused with the
layer's name and the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .archs import (
    ActivationSpec,
    Arch,
    ConvSpec,
    DenseSpec,
    FeatureLayer,
    HeadLayer,
    HeadSpec,
    NormSpec,
    PoolSpec,
)
from .errors import ArchitectureError
from .weightset import WeightFile

_CONTAINERS = {"Functional", "Sequential", "Model"}
_IDENTITY = {
    "InputLayer", "Dropout", "SpatialDropout2D", "GaussianDropout", "GaussianNoise",
    "AlphaDropout", "ActivityRegularization", "Identity",
}  # fmt: skip
_POOLS = {"MaxPooling2D": "max", "MaxPool2D": "max", "AveragePooling2D": "avg", "AvgPool2D": "avg"}
_REDUCE = {
    "Flatten": "flatten", "GlobalAveragePooling2D": "gap", "GlobalAvgPool2D": "gap",
    "GlobalMaxPooling2D": "gmp", "GlobalMaxPool2D": "gmp",
}  # fmt: skip
_UNSAFE = {"Lambda", "TFOpLambda", "SlicingOpLambda", "__lambda__"}


def _layers(config: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Leaf layers in order, descending into nested models (a base VGG inside a Sequential)."""
    for layer in config.get("config", {}).get("layers", []):
        cls = layer.get("class_name", "")
        if cls in _CONTAINERS:
            yield from _layers(layer)
        else:
            yield layer


def batchnorm_flags(config: dict[str, Any]) -> dict[str, tuple[bool, bool]]:
    """``{layer name: (scale, center)}`` of every BatchNormalization in a model config: which of
    gamma and beta its stored arrays include."""
    return {
        str(layer.get("config", {}).get("name")): (
            bool(layer.get("config", {}).get("scale", True)),
            bool(layer.get("config", {}).get("center", True)),
        )
        for layer in _layers(config)
        if layer.get("class_name") == "BatchNormalization"
    }


def _inbound(layer: dict[str, Any]) -> int:
    """How many tensors feed the layer (Keras 2 and Keras 3 inbound_nodes formats)."""
    count = 0

    def walk(x: Any) -> None:
        nonlocal count
        if isinstance(x, dict):
            if "keras_history" in x.get("config", {}):
                count += 1
                return
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            if len(x) >= 3 and isinstance(x[0], str) and isinstance(x[1], int):
                count += 1  # Keras 2: [layer_name, node_index, tensor_index, kwargs]
                return
            for v in x:
                walk(v)

    walk(layer.get("inbound_nodes", []))
    return count


def _activation(cfg: dict[str, Any], name: str) -> str:
    act = cfg.get("activation", "linear")
    if isinstance(act, dict):  # a serialized function or object: refuse, never import it
        act = (
            act.get("config", {}).get("name") if act.get("module") == "keras.activations" else None
        )
    if not isinstance(act, str):
        raise ArchitectureError(
            f"layer {name!r}: a custom activation function cannot be read safely"
        )
    return act


def _is_relu(layer: dict[str, Any]) -> bool:
    cls, cfg = layer.get("class_name"), layer.get("config", {})
    if cls == "ReLU":
        return (
            cfg.get("max_value") is None
            and float(cfg.get("negative_slope", 0.0) or 0.0) == 0.0
            and float(cfg.get("threshold", 0.0) or 0.0) == 0.0
        )
    return cls == "Activation" and _activation(cfg, cfg.get("name", "?")) == "relu"


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = value
    return (int(a), int(b))


def arch_from_config(config: dict[str, Any], wf: WeightFile) -> Arch:
    """The chain of ``config``; raises ArchitectureError naming the first layer that breaks it."""
    layers = list(_layers(config))
    if not layers:
        raise ArchitectureError(f"{wf.path}: the model config lists no layers")
    chain = _Chain()
    for layer in layers:
        cls, cfg = layer.get("class_name", "?"), layer.get("config", {})
        _refuse_unsafe(layer, cls, cfg)
        chain.add(layer, cls, cfg, str(cfg.get("name", "?")))
    if chain.pending_conv is not None:
        raise ArchitectureError(f"conv layer {chain.pending_conv['name']!r} has no ReLU after it")
    if not any(isinstance(f, ConvSpec) for f in chain.features):
        raise ArchitectureError(f"{wf.path}: no Conv2D layer in the model config")
    spec = None
    if chain.head_reduce is not None and chain.head:
        size = _input_size(layers) if chain.head_reduce == "flatten" else None
        spec = HeadSpec(chain.head_reduce, tuple(chain.head), size)  # type: ignore[arg-type]
    name = str(config.get("config", {}).get("name", "model"))
    return Arch(name, tuple(chain.features), spec)


def _refuse_unsafe(layer: dict[str, Any], cls: str, cfg: dict[str, Any]) -> None:
    """Layers no rescaling can follow: code to run, merges, channels-first data."""
    name = cfg.get("name", "?")
    if cls in _UNSAFE:
        raise ArchitectureError(
            f"layer {name!r} is a {cls}: its code would have to run; vggnorm never executes "
            "code from a model file"
        )
    if _inbound(layer) > 1:
        raise ArchitectureError(
            f"layer {name!r} ({cls}) merges several inputs (a residual or branch): the "
            "rescaling is exact only for a plain chain"
        )
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise ArchitectureError(f"layer {name!r} is channels_first, which is not supported")


@dataclass
class _Chain:
    """The architecture as the config's layers are read, one at a time."""

    features: list[FeatureLayer] = field(default_factory=list)
    head_reduce: str | None = None
    head: list[HeadLayer] = field(default_factory=list)
    pending_conv: dict[str, Any] | None = None  # a linear conv waiting for its ReLU
    pending_norm: NormSpec | None = None  # a BatchNormalization between that conv and its ReLU

    def add(self, layer: dict[str, Any], cls: str, cfg: dict[str, Any], name: str) -> None:
        if self.head_reduce is not None:
            self._add_head(cls, cfg, name)
        elif self.pending_conv is None or not self._close_conv(layer, cls, cfg, name):
            self._add_feature(cls, cfg, name)

    def _add_head(self, cls: str, cfg: dict[str, Any], name: str) -> None:
        if cls == "Dense":
            units, bias = int(cfg["units"]), bool(cfg.get("use_bias", True))
            self.head.append(DenseSpec(name, units, _activation(cfg, name), bias))
        elif cls in _IDENTITY:
            pass
        elif not self.head:
            raise ArchitectureError(
                f"layer {name!r} ({cls}) sits between the last conv block and the first "
                "Dense; only pooling, Flatten and Dropout may sit there"
            )
        else:
            self.head.append(_head_layer(cls, cfg, name))

    def _close_conv(self, layer: dict[str, Any], cls: str, cfg: dict[str, Any], name: str) -> bool:
        """Whether ``layer`` belongs to the pending linear conv (its ReLU, its BatchNorm, or an
        identity between them)."""
        assert self.pending_conv is not None
        if _is_relu(layer):
            self.features.append(_conv(self.pending_conv, self.pending_norm))
            self.pending_conv, self.pending_norm = None, None
            return True
        if cls == "BatchNormalization" and self.pending_norm is None and _channel_axis(cfg):
            self.pending_norm = _norm(cfg, name)
            return True
        if cls not in _IDENTITY:
            raise ArchitectureError(
                f"conv layer {self.pending_conv['name']!r} is followed by {name!r} ({cls}), not "
                "a ReLU: the rescaling needs a ReLU right after every conv"
            )
        return False

    def _add_feature(self, cls: str, cfg: dict[str, Any], name: str) -> None:
        if cls == "Conv2D":
            self._add_conv(cfg, name)
        elif cls in _POOLS:
            self.features.append(
                PoolSpec(name, _POOLS[cls], _pair(cfg.get("pool_size", 2)),  # type: ignore[arg-type]
                         _pair(cfg.get("strides") or cfg.get("pool_size", 2)), cfg.get("padding", "valid"))
            )  # fmt: skip
        elif cls in _REDUCE:
            self.head_reduce = _REDUCE[cls]
        elif cls not in _IDENTITY:
            raise ArchitectureError(
                f"layer {name!r} ({cls}) cannot be normalized exactly (supported: Conv2D+ReLU, "
                "pooling, Dropout, then Flatten/global pooling and Dense layers)"
            )

    def _add_conv(self, cfg: dict[str, Any], name: str) -> None:
        if int(cfg.get("groups", 1)) != 1 or _pair(cfg.get("dilation_rate", 1)) != (1, 1):
            raise ArchitectureError(f"conv layer {name!r}: grouped or dilated convs are not supported")
        act = _activation(cfg, name)
        if act == "relu":
            self.features.append(_conv(cfg))
        elif act == "linear":
            self.pending_conv = cfg
        else:
            raise ArchitectureError(
                f"conv layer {name!r} uses activation {act!r}; the rescaling is exact only "
                "for ReLU (positively homogeneous)"
            )


def _head_layer(cls: str, cfg: dict[str, Any], name: str) -> HeadLayer:
    """A head layer after the first Dense: runs unchanged; unknown kinds only stop `verify`
    from comparing predictions (the rescaling never touches them)."""
    if cls == "BatchNormalization" and cfg.get("axis", -1) in (-1, [-1], 1, [1]):
        return _norm(cfg, name)
    if cls == "Activation":
        return ActivationSpec(name, _activation(cfg, name))
    if cls == "ReLU" and _is_relu({"class_name": cls, "config": cfg}):
        return ActivationSpec(name, "relu")
    if cls == "Softmax" and cfg.get("axis", -1) in (-1, [-1]):
        return ActivationSpec(name, "softmax")
    return ActivationSpec(name, "unknown")


def _input_size(layers: list[dict[str, Any]]) -> int | None:
    """The square input size the config declares, if any (a Flatten head depends on it)."""
    for layer in layers:
        cfg = layer.get("config", {})
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        if shape and len(shape) == 4 and shape[1] and shape[1] == shape[2]:
            return int(shape[1])
    return None


def _channel_axis(cfg: dict[str, Any]) -> bool:
    return cfg.get("axis", -1) in (-1, [-1], 3, [3])


def _norm(cfg: dict[str, Any], name: str) -> NormSpec:
    return NormSpec(name, float(cfg.get("epsilon", 1e-3)), bool(cfg.get("center", True)),
                    bool(cfg.get("scale", True)))  # fmt: skip


def _conv(cfg: dict[str, Any], norm: NormSpec | None = None) -> ConvSpec:
    return ConvSpec(
        cfg["name"],
        int(cfg["filters"]),
        _pair(cfg.get("kernel_size", 3)),
        _pair(cfg.get("strides", 1)),
        str(cfg.get("padding", "valid")),
        bool(cfg.get("use_bias", True)),
        norm,
    )
