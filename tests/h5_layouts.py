"""Hand-built Keras weight files in every layout, with h5py, numpy and JSON only (no Keras).

The fast lane (``pytest -m "not keras"``) tests the file-format and config logic on these. Each
writer reproduces what Keras 3.15.1 (or the keras.applications download, or Keras 2) writes, down
to HDF5 attribute types: structures were printed from real Keras files with ``h5py.visititems``
(docs/formats.md) and are summarised on each writer.

A model is described as data: :class:`Layer` objects with a Keras class name, a config dict in the
shape Keras 3.15 writes, and weights as ``(role, array)`` pairs in Keras's weight order; containers
(:func:`functional`, :func:`sequential`) hold layers and may nest. :func:`build` fills the weights
from a seed, tracking shapes through the chain.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

KERAS_VERSION = "3.15.1"
VLEN = h5py.string_dtype()  # Keras 3 writes its string lists as variable-length strings

# Keras 1 short names (the downloaded files): kernel -> W, bias -> b.
_KERAS1 = {"kernel": "W", "bias": "b", "gamma": "gamma", "beta": "beta",
           "moving_mean": "running_mean", "moving_variance": "running_std"}  # fmt: skip

_DTYPE_POLICY = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
                 "registered_name": None}  # fmt: skip


def _init(cls: str, **config: Any) -> dict[str, Any]:
    return {"module": "keras.initializers", "class_name": cls, "config": config,
            "registered_name": None}  # fmt: skip


@dataclass
class Layer:
    """One Keras layer (or, with ``layers``, a nested Functional/Sequential model)."""

    cls: str
    name: str
    config: dict[str, Any]
    weights: list[tuple[str, np.ndarray]] = field(default_factory=list)
    layers: list[Layer] | None = None
    input_shape: tuple[int, ...] | None = None  # containers: the model input; leaves: set by build
    output_shape: tuple[int, ...] | None = None  # set by build (without the batch axis)

    def leaves(self) -> Iterator[Layer]:
        for layer in self.layers or []:
            if layer.layers is not None:
                yield from layer.leaves()
            else:
                yield layer

    def weighted(self) -> list[Layer]:
        return [layer for layer in self.leaves() if layer.weights]

    def arrays(self) -> dict[str, np.ndarray]:
        """Every weight keyed ``<layer>/<role>`` (the keys vggnorm's read_weights returns)."""
        return {f"{layer.name}/{role}": a for layer in self.weighted() for role, a in layer.weights}

    def get(self, name: str) -> Layer:
        return next(layer for layer in self.leaves() if layer.name == name)


def _base(name: str, **config: Any) -> dict[str, Any]:
    return {"name": name, "trainable": True, "dtype": dict(_DTYPE_POLICY), **config}


# ---------------------------------------------------------------------------------------------
# Layers, configs as Keras 3.15 writes them


def conv(name: str, filters: int, *, activation: str = "relu", kernel_size: int = 3,
         padding: str = "same", strides: int = 1, use_bias: bool = True, **extra: Any) -> Layer:  # fmt: skip
    cfg = _base(
        name, filters=filters, kernel_size=[kernel_size, kernel_size], strides=[strides, strides],
        padding=padding, data_format="channels_last", dilation_rate=[1, 1], groups=1,
        activation=activation, use_bias=use_bias,
        kernel_initializer=_init("GlorotUniform", seed=None, input_axes=None, output_axes=None),
        bias_initializer=_init("Zeros"), kernel_regularizer=None, bias_regularizer=None,
        activity_regularizer=None, kernel_constraint=None, bias_constraint=None,
    )  # fmt: skip
    cfg.update(extra)
    return Layer("Conv2D", name, cfg)


def pool(name: str, kind: str = "max") -> Layer:
    cls = {"max": "MaxPooling2D", "avg": "AveragePooling2D"}[kind]
    cfg = _base(
        name, pool_size=[2, 2], padding="valid", strides=[2, 2], data_format="channels_last"
    )
    return Layer(cls, name, cfg)


def batchnorm(name: str, *, center: bool = True, scale: bool = True, axis: int = -1) -> Layer:
    cfg = _base(
        name, axis=axis, momentum=0.99, epsilon=0.001, center=center, scale=scale,
        beta_initializer=_init("Zeros"), gamma_initializer=_init("Ones"),
        moving_mean_initializer=_init("Zeros"), moving_variance_initializer=_init("Ones"),
        beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
        gamma_constraint=None, synchronized=False, renorm=False, renorm_clipping=None,
        renorm_momentum=0.99,
    )  # fmt: skip
    return Layer("BatchNormalization", name, cfg)


def relu(name: str, **extra: Any) -> Layer:
    return Layer(
        "ReLU", name, _base(name, max_value=None, negative_slope=0.0, threshold=0.0) | extra
    )


def activation(name: str, act: str) -> Layer:
    return Layer("Activation", name, _base(name, activation=act))


def dense(name: str, units: int, act: str = "linear", use_bias: bool = True) -> Layer:
    cfg = _base(
        name, units=units, activation=act, use_bias=use_bias,
        kernel_initializer=_init("GlorotUniform", seed=None, input_axes=None, output_axes=None),
        bias_initializer=_init("Zeros"), kernel_regularizer=None, bias_regularizer=None,
        kernel_constraint=None, bias_constraint=None, quantization_config=None,
    )  # fmt: skip
    return Layer("Dense", name, cfg)


def flatten(name: str = "flatten") -> Layer:
    return Layer("Flatten", name, _base(name, data_format="channels_last"))


def gap(name: str = "global_average_pooling2d") -> Layer:
    return Layer("GlobalAveragePooling2D", name,
                 _base(name, data_format="channels_last", keepdims=False))  # fmt: skip


def dropout(name: str = "dropout", rate: float = 0.3) -> Layer:
    return Layer("Dropout", name, _base(name, rate=rate, seed=None, noise_shape=None))


def other(cls: str, name: str, **config: Any) -> Layer:
    """Any layer class, for refusal tests (Add, LeakyReLU, ...)."""
    return Layer(cls, name, _base(name, **config))


def lambda_layer(name: str, func: Any) -> Layer:
    """A Lambda layer holding ``func``'s bytecode, serialized as Keras's ``func_dump`` does."""
    import codecs
    import marshal

    code = codecs.encode(marshal.dumps(func.__code__), "base64").decode("ascii")
    fn = {"class_name": "__lambda__", "config": {"code": code, "defaults": None, "closure": None}}
    return Layer("Lambda", name, _base(name, function=fn, output_shape=None, arguments={}))


def _input(name: str, shape: tuple[int, int, int]) -> Layer:
    cfg = {"batch_shape": [None, *shape], "dtype": "float32", "sparse": False, "ragged": False,
           "name": name, "optional": False}  # fmt: skip
    return Layer("InputLayer", name, cfg)


def functional(name: str, layers: list[Layer], input_shape: tuple[int, int, int],
               input_name: str = "input_layer") -> Layer:  # fmt: skip
    """A Functional model: its layers start with an InputLayer and form a chain."""
    return Layer("Functional", name, {"name": name}, layers=[_input(input_name, input_shape), *layers],
                 input_shape=input_shape)  # fmt: skip


def sequential(name: str, layers: list[Layer], input_shape: tuple[int, int, int],
               input_name: str = "input_layer") -> Layer:  # fmt: skip
    return Layer("Sequential", name, {"name": name}, layers=[_input(input_name, input_shape), *layers],
                 input_shape=input_shape)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Weights


def build(model: Layer, seed: int = 0, dtype: Any = np.float32) -> Layer:
    """Give every weighted layer of ``model`` deterministic, live weights (in place; returns it).

    Conv/Dense kernels He-normal, biases uniform(0, 0.1) (filters are alive); BatchNormalization
    gamma uniform(0.5, 2), beta and moving mean normal, moving variance uniform(0.5, 2).
    """
    rng = np.random.default_rng(seed)
    assert model.input_shape is not None
    shape: tuple[int, ...] = model.input_shape

    def walk(container: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
        for layer in container.layers or []:
            if layer.layers is not None:
                shape = walk(layer, shape)
                continue
            cfg = layer.config
            layer.input_shape = shape
            shape = step(layer, cfg, shape)
            layer.output_shape = shape
        return shape

    def step(layer: Layer, cfg: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, ...]:
        if layer.cls == "Conv2D":
            k, s = cfg["kernel_size"][0], cfg["strides"][0]
            h, w, c = shape
            kernel = rng.standard_normal((k, k, c, cfg["filters"]), dtype=np.float32)
            kernel *= np.float32(np.sqrt(2.0 / (k * k * c)))
            layer.weights = [("kernel", kernel.astype(dtype))]
            if cfg["use_bias"]:
                layer.weights.append(("bias", rng.uniform(0, 0.1, cfg["filters"]).astype(dtype)))
            if cfg["padding"] == "valid":
                h, w = h - k + 1, w - k + 1
            shape = (-(-h // s), -(-w // s), cfg["filters"])
        elif layer.cls in ("MaxPooling2D", "AveragePooling2D"):
            shape = (shape[0] // 2, shape[1] // 2, shape[2])
        elif layer.cls == "Flatten":
            shape = (int(np.prod(shape)),)
        elif layer.cls.startswith("Global"):
            shape = (shape[-1],)
        elif layer.cls == "Dense":
            units = cfg["units"]
            kernel = rng.standard_normal((shape[-1], units)).astype(np.float32)
            kernel *= np.float32(np.sqrt(2.0 / shape[-1]))
            layer.weights = [("kernel", kernel.astype(dtype))]
            if cfg["use_bias"]:
                layer.weights.append(("bias", rng.uniform(0, 0.1, units).astype(dtype)))
            shape = (*shape[:-1], units)
        elif layer.cls == "BatchNormalization":
            c = shape[-1]
            roles = [r for r, on in (("gamma", cfg["scale"]), ("beta", cfg["center"])) if on]
            layer.weights = [
                (r, (rng.uniform(0.5, 2, c) if r == "gamma" else rng.normal(0, 1, c)).astype(dtype))
                for r in roles
            ] + [("moving_mean", rng.normal(0, 1, c).astype(dtype)),
                 ("moving_variance", rng.uniform(0.5, 2, c).astype(dtype))]  # fmt: skip
        return shape

    walk(model, shape)
    return model


# ---------------------------------------------------------------------------------------------
# VGG-shaped models

VGG_BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
STOCK_WIDTHS = (64, 128, 256, 512, 512)


def vgg(arch: str = "vgg16", widths: tuple[int, ...] = (4, 5, 6, 7, 8), size: int = 32,
        top: str | None = None, seed: int = 0, name: str | None = None) -> Layer:  # fmt: skip
    """A keras.applications-named VGG (block<b>_conv<i>, block<b>_pool) as a Functional model.

    ``widths``: filters per block (:data:`STOCK_WIDTHS` for files recognised from shapes alone).
    ``top``: None, ``"stock"`` (flatten, fc1, fc2, predictions with 10 classes, tiny widths).
    """
    layers: list[Layer] = []
    for b, (n, width) in enumerate(zip(VGG_BLOCKS[arch], widths), start=1):
        layers += [conv(f"block{b}_conv{i}", width) for i in range(1, n + 1)]
        layers.append(pool(f"block{b}_pool"))
    if top == "stock":
        layers += [flatten("flatten"), dense("fc1", 16, "relu"), dense("fc2", 16, "relu"),
                   dense("predictions", 10, "softmax")]  # fmt: skip
    return build(functional(name or arch, layers, (size, size, 3)), seed)


def finetuned(head: str = "flatten", seed: int = 0, size: int = 32) -> Layer:
    """A tiny VGG16 nested in a Sequential, with a Flatten or GAP head: Dense -> BN -> Dense."""
    base = vgg("vgg16", size=size, seed=seed)
    reduce = flatten("flatten") if head == "flatten" else gap("global_average_pooling2d")
    model = sequential(
        "sequential",
        [base, reduce, dense("dense", 16, "relu"), batchnorm("batch_normalization"),
         dropout("dropout"), dense("dense_1", 5, "softmax")],
        (size, size, 3),
    )  # fmt: skip
    return build(model, seed + 1)


def conv_bn_relu(seed: int = 0, size: int = 8) -> Layer:
    """conv -> BN -> ReLU, conv -> BN(center=False) -> Activation('relu'), conv+relu, Flatten head."""
    model = sequential(
        "sequential",
        [conv("c1", 4, activation="linear"), batchnorm("bn1"), relu("r1"), pool("p1"),
         conv("c2", 5, activation="linear"), batchnorm("bn2", center=False),
         activation("r2", "relu"), pool("p2", "avg"),
         conv("c3", 6), dropout("drop"), flatten("flat"), dense("fc", 6, "relu"),
         dense("out", 3)],
        (size, size, 3),
    )  # fmt: skip
    return build(model, seed)


# ---------------------------------------------------------------------------------------------
# Model config JSON


def _tensor(layer: str, shape: list[Any]) -> dict[str, Any]:
    return {"class_name": "__keras_tensor__",
            "config": {"shape": shape, "dtype": "float32", "keras_history": [layer, 0, 0]}}  # fmt: skip


_BUILT = {
    "Conv2D",
    "BatchNormalization",
    "Flatten",
    "Dense",
}  # layers Keras records a build_config for


def config_of(model: Layer, style: str = "keras") -> dict[str, Any]:
    """The model's config as Keras 3.15 writes it: ``"keras"`` for a .keras ``config.json``
    (module/registered_name on each layer), ``"legacy"`` for a whole-model .h5 ``model_config``."""

    def layer_json(layer: Layer, in_container: str, prev: Layer | None) -> dict[str, Any]:
        if layer.layers is not None:
            body = container_json(layer)
        else:
            body = {"class_name": layer.cls, "config": dict(layer.config)}
            if style == "keras":
                body = {"module": "keras.layers", **body, "registered_name": None}
                if layer.cls in _BUILT and layer.input_shape is not None:
                    body["build_config"] = {"input_shape": [None, *layer.input_shape]}
        if in_container == "Functional":
            body["name"] = layer.name
            body["inbound_nodes"] = (
                [] if prev is None
                else [{"args": [_tensor(prev.name, [None, *(prev.output_shape or ())])],
                       "kwargs": {}}]
            )  # fmt: skip
        return body

    def container_json(m: Layer) -> dict[str, Any]:
        assert m.layers is not None and m.input_shape is not None
        items, prev = [], None
        for layer in m.layers:
            items.append(layer_json(layer, m.cls, prev))
            prev = layer
        if m.cls == "Functional":
            cfg = {"name": m.name, "trainable": True, "layers": items,
                   "input_layers": [m.layers[0].name, 0, 0], "output_layers": [prev.name, 0, 0]}  # fmt: skip
            out: dict[str, Any] = {"class_name": "Functional", "config": cfg}
            if style == "keras":
                out = {"module": "keras.src.models.functional", **out,
                       "registered_name": "Functional", "build_config": {"input_shape": None},
                       "compile_config": {}}  # fmt: skip
        else:
            cfg = {"name": m.name, "trainable": True, "dtype": dict(_DTYPE_POLICY), "layers": items,
                   "build_input_shape": [None, *m.input_shape]}  # fmt: skip
            out = {"class_name": "Sequential", "config": cfg}
            if style == "keras":
                out = {"module": "keras", **out, "registered_name": None,
                       "build_config": {"input_shape": [None, *m.input_shape]},
                       "compile_config": {}}  # fmt: skip
        return out

    return container_json(model)


# ---------------------------------------------------------------------------------------------
# Legacy h5 layouts


def _empty() -> np.ndarray:
    # What Keras's save_attributes_to_hdf5_group stores for an empty list.
    return np.asarray([])


def _var_path(model: Layer, owner: Layer, layer: Layer, role: str) -> str:
    """Keras 3 variable path: layers built inside a Sequential carry its name as a scope."""
    if owner.cls == "Sequential":
        return f"{owner.name}/{layer.name}/{role}"
    return f"{layer.name}/{role}"


def _top_level(model: Layer) -> list[tuple[Layer, list[tuple[Layer, Layer]]]]:
    """Top-level layers (Sequential: without its InputLayer) with their (owner, leaf) pairs."""
    assert model.layers is not None
    layers = model.layers[1:] if model.cls == "Sequential" else model.layers
    out = []
    for layer in layers:
        if layer.layers is not None:
            out.append((layer, _owned_leaves(layer)))
        else:
            out.append((layer, [(model, layer)] if layer.weights else []))
    return out


def _owned_leaves(container: Layer) -> list[tuple[Layer, Layer]]:
    """(innermost container, leaf) for every weighted leaf of a nested model, in order."""
    pairs: list[tuple[Layer, Layer]] = []
    for x in container.layers or []:
        if x.layers is not None:
            pairs += _owned_leaves(x)
        elif x.weights:
            pairs.append((container, x))
    return pairs


def _write_legacy_group(g: Any, model: Layer, style: str) -> None:
    """``layer_names`` plus one group per top-level layer, as Keras 3 (``"keras3"``), Keras 2
    (``"keras2"``) or the keras.applications download (``"download"``) writes it."""
    tops = _top_level(model)
    names = [t.name for t, _ in tops]
    if style == "keras3":
        g.attrs["layer_names"] = np.array(names, dtype=VLEN)
    else:
        g.attrs["layer_names"] = np.array([n.encode() for n in names])
    for top, pairs in tops:
        group = g.create_group(top.name)
        weight_names: list[str] = []
        for owner, leaf in pairs:
            for role, value in leaf.weights:
                if style == "download":
                    wname = f"{leaf.name}_{_KERAS1[role]}_1:0"
                elif style == "keras2":
                    wname = f"{leaf.name}/{role}:0"
                else:
                    wname = _var_path(model, owner, leaf, role)
                weight_names.append(wname)
                group.create_dataset(wname, data=value)
        if not weight_names:
            group.attrs["weight_names"] = _empty()
        elif style == "keras3":
            group.attrs["weight_names"] = np.array(weight_names, dtype=VLEN)
        else:
            group.attrs["weight_names"] = np.array([w.encode() for w in weight_names])


def write_downloaded(model: Layer, path: Path) -> Path:
    """The keras.applications download: root attr ``layer_names`` (fixed-length bytes) only;
    per layer ``weight_names`` like ``block1_conv1_W_1:0`` with the datasets directly in the
    group; layers without weights (input, pools) get an empty float64 ``weight_names``."""
    with h5py.File(path, "w") as f:
        _write_legacy_group(f, model, "download")
    return path


def write_keras2(model: Layer, path: Path) -> Path:
    """Keras 2 ``save_weights('x.h5')``: ``backend``, ``keras_version`` root attrs, names like
    ``block1_conv1/kernel:0`` (datasets at ``block1_conv1/block1_conv1/kernel:0``), and an empty
    ``top_level_model_weights`` group."""
    with h5py.File(path, "w") as f:
        f.attrs["backend"] = "tensorflow"
        f.attrs["keras_version"] = "2.15.0"
        _write_legacy_group(f, model, "keras2")
        f.create_group("top_level_model_weights").attrs["weight_names"] = _empty()
    return path


def write_keras3_legacy(model: Layer, path: Path) -> Path:
    """Keras 3 ``legacy_h5_format.save_weights_to_hdf5_group``: vlen-string attrs, datasets at
    ``block1_conv1/block1_conv1/kernel`` (no ``:0``), ``top_level_model_weights``."""
    with h5py.File(path, "w") as f:
        _write_keras3_weights(f, model)
    return path


def _write_keras3_weights(g: Any, model: Layer) -> None:
    g.attrs["backend"] = "tensorflow"
    g.attrs["keras_version"] = KERAS_VERSION
    _write_legacy_group(g, model, "keras3")
    g.create_group("top_level_model_weights").attrs["weight_names"] = _empty()


def write_full_model(model: Layer, path: Path, optimizer: bool = False) -> Path:
    """Keras 3 ``model.save('x.h5')``: root attrs ``backend``, ``keras_version``,
    ``model_config`` (legacy-style JSON); weights under ``model_weights/`` as in
    :func:`write_keras3_legacy`; with ``optimizer``, an ``optimizer_weights`` group of Adam state
    (``adam/iteration`` int64, ``adam/learning_rate``, ``adam/<layer>_<var>_momentum``/``_velocity``)."""
    with h5py.File(path, "w") as f:
        f.attrs["backend"] = "tensorflow"
        f.attrs["keras_version"] = KERAS_VERSION
        f.attrs["model_config"] = json.dumps(config_of(model, "legacy"))
        _write_keras3_weights(f.create_group("model_weights"), model)
        if optimizer:
            og = f.create_group("optimizer_weights")
            names = ["adam/iteration", "adam/learning_rate"]
            og.create_dataset("adam/iteration", data=np.int64(1))
            og.create_dataset("adam/learning_rate", data=np.float32(1e-4))
            for layer in model.weighted():
                for role, value in layer.weights:
                    for kind in ("momentum", "velocity"):
                        n = f"adam/{layer.name}_{role}_{kind}"
                        names.append(n)
                        og.create_dataset(n, data=np.full_like(value, 1e-3))
            og.attrs["weight_names"] = np.array(names, dtype=VLEN)
    return path


def chunk_layer_names(path: Path, chunks: int = 3) -> Path:
    """Split ``layer_names`` into ``layer_names0..`` as Keras does for long attribute lists
    (``np.array_split`` of the list, ``"%s%d" % (name, i)``), in place."""
    with h5py.File(path, "r+") as f:
        g = f.get("model_weights", f)
        data = g.attrs["layer_names"]
        del g.attrs["layer_names"]
        for i, chunk in enumerate(np.array_split(np.asarray(data), chunks)):
            g.attrs[f"layer_names{i}"] = chunk
    return path


# ---------------------------------------------------------------------------------------------
# Keras 3 native layouts


def to_snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case: the store key of a layer class."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _write_vars(g: Any, name: str, values: list[np.ndarray]) -> None:
    v = g.create_group("vars")
    v.attrs["name"] = name
    for i, value in enumerate(values):
        v.create_dataset(str(i), data=value)


def _write_store(g: Any, container: Layer, top: bool) -> None:
    _write_vars(g, container.name, [])
    layers_group = g.create_group("layers")
    counts: dict[str, int] = {}
    members = container.layers or []
    if container.cls == "Sequential":
        members = members[1:]  # a Sequential does not store its InputLayer
    for layer in members:
        base = to_snake_case(layer.cls)
        n = counts.get(base, 0)
        counts[base] = n + 1
        key = base if n == 0 else f"{base}_{n}"
        lg = layers_group.create_group(key)
        if layer.layers is not None:
            _write_store(lg, layer, False)
        else:
            _write_vars(lg, layer.name, [value for _, value in layer.weights])


def write_weights_h5(model: Layer, path: Path) -> Path:
    """Keras 3 ``model.save_weights('x.weights.h5')``: no root attrs; ``layers/<key>/vars/<i>``
    with keys from class names (``conv2d``, ``conv2d_1``, nested ``functional/layers/...``), a
    ``name`` attr (the layer's name) on every ``vars`` group, a root ``vars`` named after the
    model."""
    with h5py.File(path, "w") as f:
        _write_store(f, model, True)
    return path


def write_keras_zip(model: Layer, path: Path, optimizer: bool = False) -> Path:
    """Keras 3 ``model.save('x.keras')``: a stored (uncompressed) zip of ``metadata.json``,
    ``config.json`` and ``model.weights.h5``; a compiled model adds ``optimizer/vars/<i>``."""
    inner = path.with_name(path.name + ".weights.h5")
    write_weights_h5(model, inner)
    if optimizer:
        with h5py.File(inner, "r+") as f:
            values = [np.int64(1), np.float32(1e-4)]
            for layer in model.weighted():
                for _, value in layer.weights:
                    values += [np.full_like(value, 1e-3), np.full_like(value, 2e-3)]
            og = f.create_group("optimizer")
            _write_vars(og, "adam", values)
    meta = {"keras_version": KERAS_VERSION, "date_saved": "2026-11-25@17:22:41"}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo("metadata.json", (1980, 1, 1, 0, 0, 0)), json.dumps(meta))
        z.writestr(zipfile.ZipInfo("config.json", (1980, 1, 1, 0, 0, 0)),
                   json.dumps(config_of(model, "keras")))  # fmt: skip
        z.write(inner, "model.weights.h5")
    inner.unlink()
    return path


def edit_keras_config(path: Path, out: Path, edit: Any) -> Path:
    """Copy a .keras archive, passing its parsed config.json through ``edit`` (in place)."""
    with zipfile.ZipFile(path) as z_in, zipfile.ZipFile(out, "w") as z_out:
        for info in z_in.infolist():
            data = z_in.read(info.filename)
            if info.filename == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config).encode()
            z_out.writestr(info, data)
    return out


WRITERS = {
    "downloaded": write_downloaded,
    "keras2": write_keras2,
    "keras3-legacy": write_keras3_legacy,
    "full-model": write_full_model,
    "weights-h5": write_weights_h5,
    "keras-zip": write_keras_zip,
}
