"""Keras weight files of every layout: vggnorm.formats (detect, read, write), topology and apply.

The tests are parametrized over one list of layouts, :data:`LAYOUTS`. Most files are built by hand
(``fixtures/h5_layouts.py``: h5py, numpy and JSON, checked once against Keras 3.15.1 to be
identical to what it writes), at tiny widths (4-8 filters) and with a model config; the two
stock-width VGG16 files (60 MB each, built once per module) are only for what needs them:
recognising a weights-only file from its conv shapes. The ``keras/...`` layouts are written from
tiny (32x32) stock-width ``keras.applications`` VGGs (``fixtures/keras_files.py``) and are marked
``keras``: their tests also load each file back with Keras, the way a user would.

The writer must change only the datasets it is given, copy everything else byte for byte, load
back the way the input loads, and never leave a partial file behind.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import marshal
import os
import re
import shutil
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from fixtures import h5_checks as checks
from fixtures import h5_layouts as hl
from fixtures import keras_files as kf
from fixtures.records import DEAD_FILTERS, dead_filters, make_record
from vggnorm.commands.apply import normalize
from vggnorm.core import topology
from vggnorm.core.errors import ArchitectureError, StatsError, VggnormError, WeightFileError
from vggnorm.formats._h5 import PROVENANCE_GROUP
from vggnorm.formats.digest import sha256_file
from vggnorm.formats.registry import (
    detect_format,
    inspect_weights,
    read_scales,
    read_weights,
    write_weights,
)
from vggnorm.formats.statsfile import write_stats

# Two float32 values that each round the same real number (to nearest) differ by at most
# 2**-24 * |x| each, so by 2**-23 relative; the float64 arithmetic before the rounding adds ~1e-16.
F32_TWO_ROUNDINGS = 2.0**-23 * (1 + 2.0**-20)
# One float32 rounding (2**-24 relative) of a float64 product (2**-53).
F32_ONE_ROUNDING = 2.0**-24 + 2.0**-52

SIZE = 32  # input side of the Keras-built models
SHAPE = (SIZE, SIZE, 3)


@dataclass(frozen=True)
class Layout:
    model: str  # key of MODELS (built by hand) or of KERAS_MODELS (built by Keras)
    writer: str  # key of h5_layouts.WRITERS / KERAS_WRITERS
    filename: str
    format: str
    optimizer: bool = False
    chunked: bool = False

    @property
    def suffix(self) -> str:
        for s in (".weights.h5", ".keras", ".h5"):
            if self.filename.endswith(s):
                return s
        raise AssertionError(self.filename)

    @property
    def has_config(self) -> bool:
        return self.format in ("legacy-h5-model", "keras-zip")

    @property
    def keras(self) -> bool:
        """Written from a model Keras built: the test needs Keras."""
        return self.model in KERAS_MODELS

    @property
    def arch(self) -> str:
        return KERAS_MODELS[self.model][0]

    @property
    def top(self) -> bool:
        return KERAS_MODELS[self.model][1]


MODELS: dict[str, Callable[[], hl.Layer]] = {
    "vgg": lambda: hl.vgg("vgg16", size=32, seed=0),
    "vgg-top": lambda: hl.vgg("vgg16", size=32, top="stock", seed=1),
    "ft-flatten": lambda: hl.finetuned("flatten", seed=2),
    "ft-gap": lambda: hl.finetuned("gap", seed=3),
    "conv-bn-relu": lambda: hl.conv_bn_relu(seed=4),
    "stock": lambda: hl.vgg("vgg16", widths=hl.STOCK_WIDTHS, size=32, seed=5),
}
# keras.applications VGGs at SIZE (stock widths), kf.tiny_vgg: (arch, include_top, seed).
KERAS_MODELS: dict[str, tuple[str, bool, int]] = {
    "keras-vgg16": ("vgg16", False, 0),
    "keras-vgg16-top": ("vgg16", True, 1),
    "keras-vgg19": ("vgg19", False, 2),
}
KERAS_WRITERS: dict[str, Callable[..., Path]] = {
    "downloaded": kf.save_downloaded_layout,
    "keras2": kf.save_keras2_layout,
    "keras3-legacy": kf.save_keras3_legacy_weights,
    "full-model": kf.save_full_model_h5,
    "weights-h5": kf.save_weights_h5,
    "keras-zip": kf.save_keras_zip,
}

LAYOUTS = {
    "downloaded": Layout("vgg", "downloaded", "dl.h5", "legacy-h5"),
    "downloaded-top": Layout("vgg-top", "downloaded", "dl_top.h5", "legacy-h5"),
    "keras2": Layout("vgg", "keras2", "k2.h5", "legacy-h5"),
    "keras3-legacy": Layout("vgg", "keras3-legacy", "k3.h5", "legacy-h5"),
    "chunked": Layout("vgg", "downloaded", "chunked.h5", "legacy-h5", chunked=True),
    "full-model": Layout("vgg", "full-model", "full.h5", "legacy-h5-model"),
    "full-model-optimizer": Layout(
        "vgg", "full-model", "full_opt.h5", "legacy-h5-model", optimizer=True
    ),
    "full-model-chunked": Layout(
        "vgg", "full-model", "full_ch.h5", "legacy-h5-model", chunked=True
    ),
    "weights-h5": Layout("vgg", "weights-h5", "m.weights.h5", "weights-h5"),
    "keras-zip": Layout("vgg", "keras-zip", "m.keras", "keras-zip"),
    "keras-zip-optimizer": Layout("vgg", "keras-zip", "m_opt.keras", "keras-zip", optimizer=True),
    "nested-keras2": Layout("ft-flatten", "keras2", "ft_k2.h5", "legacy-h5"),
    "nested-keras3-legacy": Layout("ft-flatten", "keras3-legacy", "ft_k3.h5", "legacy-h5"),
    "nested-full-model": Layout("ft-flatten", "full-model", "ft_full.h5", "legacy-h5-model"),
    "nested-weights-h5": Layout("ft-gap", "weights-h5", "ft.weights.h5", "weights-h5"),
    "nested-keras-zip": Layout("ft-gap", "keras-zip", "ft.keras", "keras-zip"),
    "bn-full-model": Layout("conv-bn-relu", "full-model", "bn_full.h5", "legacy-h5-model"),
    "bn-keras-zip": Layout("conv-bn-relu", "keras-zip", "bn.keras", "keras-zip"),
    "stock-downloaded": Layout("stock", "downloaded", "stock.h5", "legacy-h5"),
    "stock-weights-h5": Layout("stock", "weights-h5", "stock.weights.h5", "weights-h5"),
    # Written from models Keras built (needs Keras):
    "keras/downloaded": Layout("keras-vgg16", "downloaded", "kb_dl.h5", "legacy-h5"),
    "keras/downloaded-top": Layout("keras-vgg16-top", "downloaded", "kb_dl_top.h5", "legacy-h5"),
    "keras/downloaded-vgg19": Layout("keras-vgg19", "downloaded", "kb_dl19.h5", "legacy-h5"),
    "keras/keras2": Layout("keras-vgg16", "keras2", "kb_k2.h5", "legacy-h5"),
    "keras/keras3-legacy": Layout("keras-vgg16", "keras3-legacy", "kb_k3.h5", "legacy-h5"),
    "keras/full-model": Layout("keras-vgg16", "full-model", "kb_full.h5", "legacy-h5-model"),
    "keras/full-model-optimizer": Layout(
        "keras-vgg16", "full-model", "kb_full_opt.h5", "legacy-h5-model", optimizer=True
    ),
    "keras/weights-h5": Layout("keras-vgg16", "weights-h5", "kb_m.weights.h5", "weights-h5"),
    "keras/weights-h5-top": Layout(
        "keras-vgg16-top", "weights-h5", "kb_m_top.weights.h5", "weights-h5"
    ),
    "keras/keras-zip": Layout("keras-vgg16", "keras-zip", "kb_m.keras", "keras-zip"),
    "keras/chunked": Layout(
        "keras-vgg16", "downloaded", "kb_chunked.h5", "legacy-h5", chunked=True
    ),
}
TINY = [n for n, c in LAYOUTS.items() if not c.keras and not n.startswith("stock")]
BY_KERAS = [n for n, c in LAYOUTS.items() if c.keras]


def layouts(names: list[str]) -> list[Any]:
    """``names`` as parameters; those written from Keras-built models are marked ``keras``."""
    return [
        pytest.param(n, id=n, marks=[pytest.mark.keras] if LAYOUTS[n].keras else []) for n in names
    ]


# ---------------------------------------------------------------------------------------------
# Module fixtures: models and one file per layout, built once


@pytest.fixture(scope="module")
def models() -> Callable[[str], Any]:
    """An hl.Layer (hand-built) or a Keras model, by MODELS / KERAS_MODELS key."""
    built: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in built:
            if name in KERAS_MODELS:
                pytest.importorskip("keras")
                arch, top, seed = KERAS_MODELS[name]
                built[name] = kf.tiny_vgg(include_top=top, arch=arch, size=SIZE, seed=seed)
            else:
                built[name] = MODELS[name]()
        return built[name]

    return get


@pytest.fixture(scope="module")
def layout_files(models, tmp_path_factory) -> Callable[[str], Path]:
    folder = tmp_path_factory.mktemp("layouts")
    written: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in written:
            case = LAYOUTS[name]
            path = folder / case.filename
            model = models(case.model)
            if case.keras:
                writer = KERAS_WRITERS[case.writer]
                if case.optimizer:
                    writer(model, path, with_optimizer=True)
                else:
                    writer(model, path)
                if case.chunked:
                    kf.chunked_layer_names(path, num_chunks=3)
            else:
                writer = hl.WRITERS[case.writer]
                if case.optimizer:
                    writer(model, path, optimizer=True)  # type: ignore[call-arg]
                else:
                    writer(model, path)
                if case.chunked:
                    hl.chunk_layer_names(path, 3)
            os.chmod(path, 0o444)  # no test may modify a source file
            written[name] = path
        return written[name]

    return get


@pytest.fixture
def src_of(layout_files, tmp_path) -> Callable[[str], Path]:
    """A private, writable copy of a layout file in its own folder."""

    def get(name: str) -> Path:
        folder = tmp_path / "src"
        folder.mkdir(exist_ok=True)
        dst = folder / LAYOUTS[name].filename
        shutil.copyfile(layout_files(name), dst)
        os.chmod(dst, 0o644)
        return dst

    return get


@pytest.fixture
def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


# ---------------------------------------------------------------------------------------------
# What a model holds, and Keras's view of a written file


@dataclass(frozen=True)
class Expected:
    arrays: dict[str, np.ndarray]  # what read_weights must return for these keys
    complete: bool  # and no other key
    weighted: list[str]  # weight-holding layers, network order
    convs: list[str]


def expected_of(case: Layout, model: Any) -> Expected:
    if case.keras:
        layers = [layer for layer in model.layers if layer.weights]
        return Expected(
            keras_arrays(model), True, [layer.name for layer in layers],
            [layer.name for layer in layers if type(layer).__name__ == "Conv2D"],
        )  # fmt: skip
    # A weights-only .weights.h5 cannot name a BN's vars.
    arrays = model.arrays()
    if case.format == "weights-h5":
        roles = {layer.name for layer in model.weighted() if layer.cls == "BatchNormalization"}
        arrays = {k: v for k, v in arrays.items() if k.split("/")[0] not in roles}
    return Expected(
        arrays, len(arrays) == len(model.arrays()), [x.name for x in model.weighted()],
        [x.name for x in model.weighted() if x.cls == "Conv2D"],
    )  # fmt: skip


def keras_arrays(model: Any) -> dict[str, np.ndarray]:
    """A Keras VGG's kernels and biases, keyed like read_weights."""
    out = {}
    for layer in model.layers:
        if layer.weights:
            out[f"{layer.name}/kernel"] = np.asarray(layer.kernel.numpy())
            out[f"{layer.name}/bias"] = np.asarray(layer.bias.numpy())
    return out


def load_like_user(keras: Any, path: Path, case: Layout) -> Any:
    """Load ``path`` the way a user loads a file of this layout."""
    if case.has_config:
        return keras.models.load_model(str(path))
    builder = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}[case.arch]
    kwargs = {"weights": str(path), "include_top": case.top, "input_shape": SHAPE}
    if case.top:
        kwargs["classes"] = 10
    return builder(**kwargs)


def changes_for(ws) -> dict[str, np.ndarray]:
    """New values for a few kernels and biases (plus the first dense kernel, if any)."""
    rng = np.random.default_rng(42)
    convs = [e.name for e in ws.file.layers if e.shapes and len(e.shapes[0]) == 4]
    denses = [e.name for e in ws.file.layers if e.shapes and len(e.shapes[0]) == 2]
    middle = convs[min(5, len(convs) - 1)]
    keys = [f"{convs[0]}/kernel", f"{convs[0]}/bias", f"{middle}/kernel", f"{convs[-1]}/bias"]
    keys += [f"{d}/kernel" for d in denses[:1]]
    return {k: (ws.arrays[k] * rng.uniform(0.5, 2.0, ws.arrays[k].shape[-1])).astype(
        ws.arrays[k].dtype) for k in keys}  # fmt: skip


def changed_paths(ws, changed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``changed`` keyed by the HDF5 dataset path of each key, in the file holding the weights."""
    where = ws.file.entry_of_key()
    return {"/" + where[k][0].datasets[where[k][1]]: v for k, v in changed.items()}


# ---------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("name", layouts(TINY + BY_KERAS))
def test_detect_and_read_every_layout(name, layout_files, models):
    case = LAYOUTS[name]
    path = layout_files(name)
    model = models(case.model)
    expected = expected_of(case, model)

    assert detect_format(path) == case.format
    ws = read_weights(path)
    wf = ws.file
    assert (wf.format, wf.suffix, wf.provenance) == (case.format, case.suffix, None)
    assert (wf.config is not None) == case.has_config
    if case.has_config and not case.keras:
        assert wf.config == hl.config_of(model, "keras" if case.format == "keras-zip" else "legacy")
    for key, value in expected.arrays.items():
        assert key in ws.arrays, key
        assert ws.arrays[key].dtype == value.dtype, key
        np.testing.assert_array_equal(ws.arrays[key], value, err_msg=key)
    if expected.complete:
        # Keys use the real layer names in every layout (.weights.h5/.keras: the vars' name attr).
        assert sorted(ws.arrays) == sorted(expected.arrays)
    # Weight-holding layers under their own names (legacy files also list weightless layers,
    # input and pooling, with no datasets), in network order except in Keras 3 stores, whose keys
    # are class names (the order within a class is kept: conv2d, conv2d_1, ...). A Keras-built VGG
    # holds Conv2D layers, then Dense ones: network order either way.
    names = [e.name for e in wf.layers if e.datasets]
    if case.format in ("weights-h5", "keras-zip") and not case.keras:
        assert sorted(names) == sorted(expected.weighted)
        assert [n for n in names if n in expected.convs] == expected.convs
    else:
        assert names == expected.weighted
    assert inspect_weights(path) == wf
    if case.keras:  # stock widths: recognised from the conv shapes, or bound from the config
        assert topology.detect_stock(wf) == case.arch
        bound = topology.bind(wf)
        assert bound.arch.name == case.arch
        assert list(bound.conv_names) == expected.convs
        assert (bound.arch.first_dense is not None) == case.top


def test_downloaded_layout_datasets_and_root_attrs(layout_files):
    path = layout_files("downloaded")
    wf = inspect_weights(path)
    entry = next(e for e in wf.layers if e.name == "block3_conv2")
    assert entry.datasets == ("block3_conv2/block3_conv2_W_1:0", "block3_conv2/block3_conv2_b_1:0")
    assert entry.keys() == ("block3_conv2/kernel", "block3_conv2/bias")

    def root_attrs(p: Path) -> tuple[str, ...]:
        with h5py.File(p, "r") as f:
            return tuple(sorted(f.attrs))

    assert root_attrs(path) == ("layer_names",)
    assert root_attrs(layout_files("keras2")) == ("backend", "keras_version", "layer_names")
    chunked = layout_files("chunked")
    assert root_attrs(chunked) == ("layer_names0", "layer_names1", "layer_names2")
    assert [e.name for e in inspect_weights(chunked).layers] == [e.name for e in wf.layers]


@pytest.mark.parametrize("name", layouts(["weights-h5", "keras/weights-h5"]))
def test_weights_h5_keys_come_from_the_vars_name(name, layout_files):
    path = layout_files(name)
    with h5py.File(path, "r") as f:
        assert f["layers/conv2d_7/vars"].attrs["name"] == "block4_conv1"
    wf = inspect_weights(path)
    entry = next(e for e in wf.layers if e.name == "block4_conv1")
    assert entry.datasets == ("layers/conv2d_7/vars/0", "layers/conv2d_7/vars/1")
    assert entry.keys() == ("block4_conv1/kernel", "block4_conv1/bias")


def test_nested_weights_h5_keys_come_from_the_vars_name(layout_files):
    nested = inspect_weights(layout_files("nested-weights-h5"))
    entry = next(e for e in nested.layers if e.name == "block1_conv1")
    assert entry.datasets[0] == "layers/functional/layers/conv2d/vars/0"


def test_batchnorm_arrays_are_keyed_by_role(layout_files, models):
    # center=False: no beta; the others keep their names, not their positions.
    for name in ("bn-full-model", "bn-keras-zip"):
        ws = read_weights(layout_files(name))
        assert sorted(k for k in ws.arrays if k.startswith("bn")) == [
            "bn1/beta", "bn1/gamma", "bn1/moving_mean", "bn1/moving_variance",
            "bn2/gamma", "bn2/moving_mean", "bn2/moving_variance",
        ]  # fmt: skip
        np.testing.assert_array_equal(
            ws.arrays["bn2/moving_mean"],
            dict(models("conv-bn-relu").get("bn2").weights)["moving_mean"],
        )
    ws = read_weights(layout_files("nested-keras2"))  # Keras 2 names: batch_normalization/gamma:0
    assert "batch_normalization/moving_variance" in ws.arrays


@pytest.mark.parametrize("name", ["stock-downloaded", "stock-weights-h5"])
def test_stock_vgg16_is_recognised_from_conv_shapes(name, layout_files):
    wf = inspect_weights(layout_files(name))
    assert topology.detect_stock(wf) == "vgg16"
    bound = topology.bind(wf)
    assert bound.arch.name == "vgg16" and "recognised from conv shapes" in bound.source
    assert list(bound.conv_names) == [e.name for e in wf.layers if e.datasets]
    assert topology.bind(wf, model="vgg16").arch.name == "vgg16"
    with pytest.raises(ArchitectureError, match="a vgg16, not the vgg19 asked for"):
        topology.bind(wf, model="vgg19")


@pytest.mark.parametrize("name", ["downloaded", "keras2", "weights-h5", "chunked"])
def test_a_weights_only_file_of_a_non_stock_vgg_is_refused(name, layout_files):
    wf = inspect_weights(layout_files(name))
    with pytest.raises(
        ArchitectureError, match="13 conv layers with shapes that match neither"
    ) as e:
        topology.bind(wf)
    assert str(wf.path) in str(e.value) and ".keras" in str(e.value)


@pytest.mark.parametrize(
    "name, reduce, first_dense",
    [("nested-full-model", "flatten", "dense"), ("nested-keras-zip", "gap", "dense"),
     ("bn-keras-zip", "flatten", "fc"), ("full-model", None, None)],
)  # fmt: skip
def test_config_models_are_bound_from_their_config(name, reduce, first_dense, layout_files):
    bound = topology.bind(inspect_weights(layout_files(name)))
    assert bound.source == "model config"
    assert bound.arch.first_dense == first_dense
    assert (bound.arch.head.reduce if bound.arch.head else None) == reduce
    if name == "bn-keras-zip":
        assert [(c.name, c.norm.name if c.norm else None) for c in bound.arch.convs] == [
            ("c1", "bn1"), ("c2", "bn2"), ("c3", None)]  # fmt: skip
        assert bound.arch.weighted_features == ("c1", "bn1", "c2", "bn2", "c3")
        assert bound.arch.head is not None and bound.arch.head.input_size == 8
    if name == "nested-full-model":
        head = bound.arch.head
        assert head is not None and head.input_size == 32 and head.known
        assert [type(x).__name__ for x in head.layers] == ["DenseSpec", "NormSpec", "DenseSpec"]


# ---------------------------------------------------------------------------------------------
# Writing


@pytest.mark.parametrize("name", layouts(TINY + BY_KERAS))
def test_write_round_trip_changes_only_the_given_datasets(name, layout_files, tmp_path):
    case = LAYOUTS[name]
    src = layout_files(name)
    ws = read_weights(src)
    changed = changes_for(ws)
    provenance = {"tool": "vggnorm", "n": 3, "nested": {"list": [1, 2.5, "x"]}, "none": None}
    extra = {"scales/00_a": np.arange(4, dtype=np.float64), "note": np.array([1, 2], np.int32)}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"out{case.suffix}"

    dropped = write_weights(ws.file, out, changed, provenance, extra)

    optimizer_group = "optimizer" if case.format == "keras-zip" else "optimizer_weights"
    assert dropped == ([optimizer_group] if case.optimizer else [])
    assert os.listdir(out_dir) == [out.name]  # no temporary file left beside it
    assert detect_format(out) == case.format
    wf = inspect_weights(out)
    assert (wf.suffix, wf.provenance) == (case.suffix, provenance)
    by_path = changed_paths(ws, changed)
    if case.format == "keras-zip":
        a, b = checks.inner_weights(src, tmp_path / "a"), checks.inner_weights(out, tmp_path / "b")
        checks.compare_h5(a, b, by_path)
        with zipfile.ZipFile(src) as za, zipfile.ZipFile(out) as zb:
            assert za.namelist() == zb.namelist()
            for member in za.namelist():
                if member != "model.weights.h5":
                    assert za.read(member) == zb.read(member), member
        h5_out = b
    else:
        checks.compare_h5(src, out, by_path)
        h5_out = out
    with h5py.File(h5_out, "r") as f:
        g = f[PROVENANCE_GROUP]
        assert json.loads(g.attrs["provenance"]) == provenance
        np.testing.assert_array_equal(g["scales/00_a"][()], extra["scales/00_a"])
        np.testing.assert_array_equal(g["note"][()], extra["note"])
        assert g["note"].dtype == np.int32

    # Read back by vggnorm: new values where changed, old ones elsewhere.
    back = read_weights(out)
    assert sorted(back.arrays) == sorted(ws.arrays)
    for key, old in ws.arrays.items():
        np.testing.assert_array_equal(back.arrays[key], changed.get(key, old), err_msg=key)
        assert back.arrays[key].dtype == old.dtype

    if case.keras:  # loaded by Keras the way the input would be
        keras = pytest.importorskip("keras")
        loaded = keras_arrays(load_like_user(keras, out, case))
        assert sorted(loaded) == sorted(ws.arrays)
        for key, old in ws.arrays.items():
            np.testing.assert_array_equal(loaded[key], changed.get(key, old), err_msg=key)


@pytest.mark.keras
def test_keras_zip_of_a_trained_model_drops_optimizer_state(layout_files, keras, tmp_path):
    model = keras.models.load_model(str(layout_files("keras/keras-zip")))
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mean_squared_error")
    model.optimizer.build(model.trainable_variables)  # the state a fit() leaves behind
    src = tmp_path / "trained.keras"
    model.save(str(src))
    ws = read_weights(src)
    changed = changes_for(ws)
    out = tmp_path / "out.keras"

    assert write_weights(ws.file, out, changed, {"tool": "vggnorm"}) == ["optimizer"]

    a, b = checks.inner_weights(src, tmp_path / "a"), checks.inner_weights(out, tmp_path / "b")
    checks.compare_h5(a, b, changed_paths(ws, changed))
    # Keras builds a fresh optimizer and says so; the model weights are the new ones.
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
        loaded = keras_arrays(keras.models.load_model(str(out)))
    for key, old in ws.arrays.items():
        np.testing.assert_array_equal(loaded[key], changed.get(key, old), err_msg=key)


def test_write_keeps_float64_datasets_and_refuses_another_dtype(tmp_path, out_dir):
    model = hl.build(hl.vgg(seed=7), seed=7, dtype=np.float64)  # old files hold float64
    src = hl.write_downloaded(model, tmp_path / "f64.h5")
    ws = read_weights(src)
    assert ws.arrays["block1_conv1/kernel"].dtype == np.float64
    new = {"block1_conv1/bias": ws.arrays["block1_conv1/bias"] / 3.0}
    write_weights(ws.file, out_dir / "out.h5", new, {"tool": "vggnorm"})
    back = read_weights(out_dir / "out.h5").arrays["block1_conv1/bias"]
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back, new["block1_conv1/bias"])
    with pytest.raises(WeightFileError, match=r"block1_conv1/bias: new array is float32\[4\], "
                       r"the file holds float64\[4\]"):  # fmt: skip
        write_weights(ws.file, out_dir / "o2.h5", {"block1_conv1/bias": np.ones(4, np.float32)}, {})
    with pytest.raises(WeightFileError, match="no dataset for 'nope/kernel'"):
        write_weights(ws.file, out_dir / "o3.h5", {"nope/kernel": np.ones(3)}, {})
    assert os.listdir(out_dir) == ["out.h5"]


@pytest.mark.parametrize("name", layouts(["downloaded", "keras/downloaded"]))
def test_unknown_key_or_wrong_shape_leaves_nothing(name, layout_files, out_dir):
    ws = read_weights(layout_files(name))
    with pytest.raises(WeightFileError, match="no dataset for 'nope/kernel'"):
        write_weights(ws.file, out_dir / "out.h5", {"nope/kernel": np.ones(3)}, {})
    with pytest.raises(WeightFileError, match="block1_conv1/kernel"):
        write_weights(
            ws.file, out_dir / "out.h5", {"block1_conv1/kernel": np.ones((3, 3, 3, 2))}, {}
        )
    assert os.listdir(out_dir) == []


# ---------------------------------------------------------------------------------------------
# normalize end to end


def expected_after(model_arrays: dict[str, np.ndarray], bound, means: dict[str, np.ndarray],
                   dead: float = 1e-8) -> dict[str, np.ndarray]:  # fmt: skip
    """The rescaling of docs/architecture.md, written out independently of vggnorm.core.rescale, in float64."""
    out = {k: v.astype(np.float64) for k, v in model_arrays.items()}
    prev = None
    for c in bound.arch.convs:
        s = np.where(means[c.name] <= dead, 1.0, means[c.name])
        k = out[f"{c.name}/kernel"]
        if prev is not None:
            k = k * prev[None, None, :, None]
        out[f"{c.name}/kernel"] = k / s
        if f"{c.name}/bias" in out:
            out[f"{c.name}/bias"] = out[f"{c.name}/bias"] / s
        if c.norm is not None:  # BN(z/s) with beta/s and mean/s is BN(z)/s; gamma, var stay
            for role in ("beta", "moving_mean"):
                if f"{c.norm.name}/{role}" in out:
                    out[f"{c.norm.name}/{role}"] = out[f"{c.norm.name}/{role}"] / s
        prev = s
    head = bound.arch.head
    if head is not None and head.dense:
        key = f"{head.dense[0].name}/kernel"
        rows = out[key].shape[0]
        out[key] = out[key] * np.tile(prev, rows // len(prev))[:, None]
    return out


NORMALIZE_CASES = [
    "stock-downloaded", "full-model", "full-model-optimizer",
    "full-model-chunked", "keras-zip", "keras-zip-optimizer", "nested-full-model",
    "nested-keras-zip", "bn-full-model", "bn-keras-zip",
    "keras/downloaded", "keras/downloaded-top", "keras/weights-h5", "keras/keras-zip",
]  # fmt: skip


def logits_of(keras, model):
    """``model`` with a linear ``predictions`` layer (the same model if it has none)."""
    config = model.get_config()
    layers = [x for x in config["layers"] if x["config"].get("name") == "predictions"]
    if not layers:
        return model
    layers[0]["config"]["activation"] = "linear"
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def conv_outputs(keras, model, names, x):
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    return [np.asarray(a) for a in probe(x, training=False)]


@pytest.mark.parametrize("name", layouts(NORMALIZE_CASES))
def test_normalize_end_to_end(name, layout_files, tmp_path):
    case = LAYOUTS[name]
    src = layout_files(name)
    ws = read_weights(src)
    bound = topology.bind(ws.file)
    record = make_record(ws, bound)
    stats = tmp_path / "stats.h5"
    write_stats(stats, record)
    out = tmp_path / "out" / f"norm{case.suffix}"
    out.parent.mkdir()
    src_sha = sha256_file(src)

    result = normalize(src, out, stats)

    assert sha256_file(src) == src_sha  # the input is never modified
    assert result.out == out and os.listdir(out.parent) == [out.name]
    assert result.dropped == ((("optimizer" if case.format == "keras-zip" else "optimizer_weights"),)
                              if case.optimizer else ())  # fmt: skip
    assert result.bound.arch.name == bound.arch.name
    norm = read_weights(out)
    assert norm.file.format == case.format
    means = {lay.name: lay.mean for lay in record.layers}
    expected = expected_after(ws.arrays, bound, means)
    for key, value in norm.arrays.items():
        assert value.dtype == ws.arrays[key].dtype, key
        assert np.all(np.isfinite(value)), key
        np.testing.assert_allclose(
            value, expected[key], rtol=F32_TWO_ROUNDINGS, atol=0, err_msg=key
        )
        if np.array_equal(expected[key], ws.arrays[key]):  # untouched arrays are copied bit for bit
            assert value.tobytes() == ws.arrays[key].tobytes(), key
    first_dense = bound.arch.first_dense
    if first_dense is not None:  # compensated for the last conv's scales
        # vggnorm stores fl32(kernel * s) computed in float64: one float32 rounding (2**-24
        # relative) of a float64 product (2**-53); the expected product here is float64.
        key = f"{first_dense}/kernel"
        np.testing.assert_allclose(norm.arrays[key], expected[key], rtol=F32_ONE_ROUNDING, atol=0)
    assert result.scales.n_dead == 3 * len(DEAD_FILTERS)
    prov = inspect_weights(out).provenance
    assert prov is not None and prov["tool"] == "vggnorm"
    assert prov["stats"]["sha256"] == sha256_file(stats)
    assert prov["stats"]["fingerprint"] == record.meta.fingerprint
    assert prov["dead_filters"] == dead_filters(bound)
    assert prov["head_dense"] == first_dense
    assert prov["source"] == {"path": str(src.resolve()), "sha256": src_sha, "format": case.format}
    names = list(bound.conv_names)
    scales = result.scales.values
    stored = read_scales(out)
    assert list(stored) == names
    for n in names:
        np.testing.assert_array_equal(stored[n], np.where(means[n] == 0, 1.0, means[n]))
        np.testing.assert_array_equal(stored[n], scales[n])
    if case.keras:
        assert result.bound.arch.name == case.arch
        assert_same_function_in_keras(case, src, out, names, scales)


def assert_same_function_in_keras(case: Layout, src: Path, out: Path, names, scales) -> None:
    """Keras computes the same function with both files: logits equal, each conv's ReLU output
    divided by its scales."""
    keras = pytest.importorskip("keras")
    original = load_like_user(keras, src, case)
    normalized = load_like_user(keras, out, case)
    rng = np.random.default_rng(7)
    x = rng.normal(0.0, 60.0, (4, *SHAPE)).astype(np.float32)
    # Tolerances: float32 rounding errors of a layer, in units of its largest value, behave like
    # sums of independent roundings, ~sqrt(n)*u per layer (n <= 4608 terms, u = 2**-24: 4e-6),
    # so ~5e-5 after 13 layers; the worst case (gamma_n = n*u per layer, propagated through |W|)
    # exceeds the activations themselves at this depth and bounds nothing. 1e-4 of the layer's
    # (or output's) largest value is verify's FUNCTION_TOL, which this test holds Keras to.
    p0 = np.asarray(logits_of(keras, original)(x, training=False), dtype=np.float64)
    p1 = np.asarray(logits_of(keras, normalized)(x, training=False), dtype=np.float64)
    assert np.all(np.isfinite(p1))
    if not case.top:  # notop: the output is the last conv's pooled map, scaled down
        p1 = p1 * scales[names[-1]]
    # With the top: logits, not probabilities: softmax maps a logit error dz to a probability
    # error up to 2*p*max|dz|, so probabilities near 1 would be judged against 1, not against
    # the logits' scale (test_finetuned failed so at 1.04e-4).
    assert np.max(np.abs(p1 - p0)) <= 1e-4 * np.max(np.abs(p0))

    a0 = conv_outputs(keras, original, names, x)
    a1 = conv_outputs(keras, normalized, names, x)
    for n, o, r in zip(names, a0, a1):
        assert np.max(np.abs(o)) > 0, n  # the layer is alive, so the check means something
        back = r.astype(np.float64) * scales[n]
        assert np.max(np.abs(back - o)) <= 1e-4 * np.max(np.abs(o)), n


# ---------------------------------------------------------------------------------------------
# Refusals: keras_config (nothing is ever executed)


def _base_layers(config: dict[str, Any]) -> list[dict[str, Any]]:
    inner = [x for x in config["config"]["layers"] if x["class_name"] == "Functional"]
    return (inner[0] if inner else config)["config"]["layers"]


def _set(index: int, **cfg: Any) -> Callable[[dict[str, Any]], None]:
    return lambda c: _base_layers(c)[index]["config"].update(cfg)


def _insert(index: int, layer: hl.Layer) -> Callable[[dict[str, Any]], None]:
    def edit(c: dict[str, Any]) -> None:
        body = {"module": "keras.layers", "class_name": layer.cls, "config": layer.config,
                "registered_name": None, "name": layer.name, "inbound_nodes": []}  # fmt: skip
        _base_layers(c).insert(index, body)

    return edit


def _residual(c: dict[str, Any]) -> None:
    add = {"class_name": "Add", "config": {"name": "res"}, "name": "res", "inbound_nodes": [
        {"args": [[hl._tensor("block1_conv1", [None]), hl._tensor("block1_conv2", [None])]],
         "kwargs": {}}]}  # fmt: skip
    _base_layers(c).insert(3, add)


def _keras2_residual(c: dict[str, Any]) -> None:
    add = {"class_name": "Add", "config": {"name": "res"}, "name": "res",
           "inbound_nodes": [[["block1_conv1", 0, 0, {}], ["block1_conv2", 0, 0, {}]]]}  # fmt: skip
    _base_layers(c).insert(3, add)


def _clear(c: dict[str, Any]) -> None:
    c["config"]["layers"] = []


def _only_pools(c: dict[str, Any]) -> None:
    layers = _base_layers(c)
    layers[:] = [x for x in layers if x["class_name"] != "Conv2D"]


CONFIG_REFUSALS = {
    "tanh-conv": (_set(2, activation="tanh"), "conv layer 'block1_conv2' uses activation 'tanh'"),
    "custom-activation": (
        _set(2, activation={"module": "my.module", "class_name": "function",
                            "config": "evil", "registered_name": "evil"}),
        "layer 'block1_conv2': a custom activation function cannot be read safely"),
    "linear-conv-then-conv": (
        _set(1, activation="linear"),
        "conv layer 'block1_conv1' is followed by 'block1_conv2' (Conv2D), not a ReLU"),
    "leaky-relu": (
        lambda c: (_set(1, activation="linear")(c),
                   _insert(2, hl.other("LeakyReLU", "leaky", negative_slope=0.3))(c)),
        "conv layer 'block1_conv1' is followed by 'leaky' (LeakyReLU), not a ReLU"),
    "relu6": (
        lambda c: (_set(1, activation="linear")(c), _insert(2, hl.relu("r6", max_value=6.0))(c)),
        "conv layer 'block1_conv1' is followed by 'r6' (ReLU), not a ReLU"),
    "bn-after-relu": (
        _insert(2, hl.batchnorm("bn_after")),
        "layer 'bn_after' (BatchNormalization) cannot be normalized exactly"),
    "residual-add": (_residual, "layer 'res' (Add) merges several inputs"),
    "residual-add-keras2-nodes": (_keras2_residual, "layer 'res' (Add) merges several inputs"),
    "grouped-conv": (_set(2, groups=2), "conv layer 'block1_conv2': grouped or dilated convs"),
    "dilated-conv": (_set(2, dilation_rate=[2, 2]), "conv layer 'block1_conv2': grouped or dilated"),
    "channels-first": (
        _set(2, data_format="channels_first"), "layer 'block1_conv2' is channels_first"),
    "zero-padding": (
        _insert(3, hl.other("ZeroPadding2D", "pad", padding=[[1, 1], [1, 1]])),
        "layer 'pad' (ZeroPadding2D) cannot be normalized exactly"),
    "no-relu-at-the-end": (
        lambda c: (_base_layers(c)[-2]["config"].update(activation="linear"),
                   _base_layers(c).pop()),
        "conv layer 'block5_conv3' has no ReLU after it"),
    "no-layers": (_clear, "the model config lists no layers"),
    "no-conv": (_only_pools, "no Conv2D layer in the model config"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(CONFIG_REFUSALS))
def test_config_refusals_name_the_layer(kind, layout_files, tmp_path, out_dir):
    edit, message = CONFIG_REFUSALS[kind]
    path = hl.edit_keras_config(layout_files("keras-zip"), tmp_path / "edited.keras", edit)
    with pytest.raises(ArchitectureError) as info:
        topology.bind(inspect_weights(path))
    assert message in str(info.value)
    if kind in ("no-layers", "no-conv"):
        assert str(path) in str(info.value)
    with pytest.raises(ArchitectureError):
        normalize(path, out_dir / "n.keras", tmp_path / "unused-stats.h5")
    assert os.listdir(out_dir) == []


def test_layer_between_last_conv_block_and_first_dense_is_refused(layout_files, tmp_path):
    def edit(c: dict[str, Any]) -> None:
        layers = c["config"]["layers"]
        i = next(i for i, x in enumerate(layers) if x["class_name"] == "GlobalAveragePooling2D")
        layers.insert(i + 1, {"class_name": "BatchNormalization",
                              "config": {"name": "bn_pooled", "axis": -1}})  # fmt: skip

    path = hl.edit_keras_config(layout_files("nested-keras-zip"), tmp_path / "e.keras", edit)
    with pytest.raises(ArchitectureError, match=r"layer 'bn_pooled' \(BatchNormalization\) sits "
                       r"between the last conv block and the first Dense"):  # fmt: skip
        topology.bind(inspect_weights(path))


def test_lambda_is_refused_and_its_code_never_runs(layout_files, tmp_path, out_dir):
    witness = tmp_path / "witness.txt"
    namespace: dict[str, Any] = {}
    exec(
        f"def evil(x):\n    with open({str(witness)!r}, 'w') as f:\n        f.write('ran')\n"
        "    return x\n",
        namespace,
    )
    layer = hl.lambda_layer("evil", namespace["evil"])
    path = hl.edit_keras_config(layout_files("keras-zip"), tmp_path / "lambda.keras",
                                _insert(2, layer))  # fmt: skip
    with pytest.raises(ArchitectureError, match="layer 'evil' is a Lambda: its code would have to "
                       "run; vggnorm never executes code from a model file"):  # fmt: skip
        topology.bind(inspect_weights(path))
    with pytest.raises(ArchitectureError, match="never executes code"):
        normalize(path, out_dir / "n.keras", tmp_path / "stats.h5")
    assert not witness.exists()
    assert os.listdir(out_dir) == []
    # The witness works: the bytecode stored in the file does write it when someone runs it.
    with zipfile.ZipFile(path) as z:
        config = json.loads(z.read("config.json"))
    stored = next(x for x in config["config"]["layers"] if x["class_name"] == "Lambda")
    import codecs

    code = marshal.loads(
        codecs.decode(stored["config"]["function"]["config"]["code"].encode(), "base64")
    )
    types.FunctionType(code, {"__builtins__": __builtins__})(0)
    assert witness.read_text() == "ran"


def test_bn_between_conv_and_relu_on_another_axis_is_refused(layout_files, tmp_path):
    def edit(c: dict[str, Any]) -> None:
        next(x for x in c["config"]["layers"] if x["config"]["name"] == "bn1")["config"]["axis"] = 1

    path = hl.edit_keras_config(layout_files("bn-keras-zip"), tmp_path / "e.keras", edit)
    with pytest.raises(ArchitectureError, match="'c1' is followed by 'bn1'"):
        topology.bind(inspect_weights(path))


# ---------------------------------------------------------------------------------------------
# Refusals: weights_io


def _soft_link(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["block2_conv1/block2_conv1_W_1:0"]
        f["block2_conv1/block2_conv1_W_1:0"] = h5py.SoftLink("/block2_conv2/block2_conv2_W_1:0")


def _soft_link_unused(path: Path) -> None:  # a link no weight name points at: still refused
    with h5py.File(path, "r+") as f:
        f["block1_pool/sneaky"] = h5py.SoftLink("/block2_conv2")


def _external_link(path: Path) -> None:
    other = path.with_name("other.h5")
    with h5py.File(other, "w") as g:
        g["w"] = np.zeros((3, 3, 4, 5), np.float32)
    with h5py.File(path, "r+") as f:
        del f["block2_conv1/block2_conv1_W_1:0"]
        f["block2_conv1/block2_conv1_W_1:0"] = h5py.ExternalLink(str(other), "/w")


def _set_value(dataset: str, value: float) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            data = f[dataset][()]
            data.flat[7] = value
            f[dataset][...] = data

    return corrupt


def _not_hdf5(path: Path) -> None:
    path.write_bytes(b"this is not an HDF5 file\n" * 10)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _no_layer_names(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f.attrs["layer_names"]


def _no_weights(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"input_layer", b"pool"])
        for n in ("input_layer", "pool"):
            f.create_group(n).attrs["weight_names"] = np.asarray([])


def _duplicate_names(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        names = list(f.attrs["layer_names"])
        f.attrs["layer_names"] = np.array([*names, b"block1_conv1"])


def _mixed_weight_names(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        g = f["block1_conv1"]
        g.attrs["weight_names"] = np.array([b"a/kernel:0", b"block1_conv1_b_1:0"])


def _missing_dataset(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["block1_conv1/block1_conv1_b_1:0"]


WEIGHTS_REFUSALS = {
    "soft-link": (_soft_link, "/block2_conv1/block2_conv1_W_1:0 is an HDF5 SoftLink; links are refused"),
    "soft-link-unused": (_soft_link_unused, "/block1_pool/sneaky is an HDF5 SoftLink"),
    "external-link": (_external_link, "is an HDF5 ExternalLink; links are refused"),
    "nan-kernel": (_set_value("block3_conv2/block3_conv2_W_1:0", np.nan),
                   "block3_conv2/block3_conv2_W_1:0 holds NaN or infinite weights"),
    "inf-bias": (_set_value("block5_conv3/block5_conv3_b_1:0", np.inf),
                 "block5_conv3/block5_conv3_b_1:0 holds NaN or infinite weights"),
    "not-hdf5": (_not_hdf5, "not a readable HDF5 file"),
    "truncated": (_truncated, "not a readable HDF5 file"),
    "no-layer-names": (_no_layer_names, "no Keras weights found"),
    "no-weights": (_no_weights, "the file holds no layer with weights"),
    "duplicate-names": (_duplicate_names, "two layers are both named 'block1_conv1'"),
    "mixed-weight-names": (_mixed_weight_names, "layer 'block1_conv1': cannot tell which weights"),
    "missing-dataset": (_missing_dataset, "missing /block1_conv1/block1_conv1_b_1:0"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(WEIGHTS_REFUSALS))
def test_bad_weight_files_are_refused_naming_the_file(kind, src_of, out_dir, tmp_path):
    corrupt, message = WEIGHTS_REFUSALS[kind]
    src = src_of("downloaded")
    corrupt(src)
    with pytest.raises(WeightFileError) as info:
        read_weights(src)
    assert message in str(info.value)
    assert str(src) in str(info.value)
    with pytest.raises(WeightFileError, match=re.escape(message.split(";")[0])) as info:
        normalize(src, out_dir / "out.h5", tmp_path / "no-stats-needed.h5")
    assert str(src) in str(info.value)
    assert os.listdir(out_dir) == []


def test_weights_h5_data_under_a_plain_h5_name_is_refused(layout_files, tmp_path):
    misnamed = tmp_path / "model.h5"
    shutil.copyfile(layout_files("weights-h5"), misnamed)
    with pytest.raises(WeightFileError, match=re.escape("holds Keras 3 .weights.h5 data but is named "
                       "model.h5; Keras loads by suffix, so rename it to end in .weights.h5")):  # fmt: skip
        read_weights(misnamed)


def test_legacy_data_under_a_weights_h5_name_is_refused(layout_files, tmp_path):
    misnamed = tmp_path / "model.weights.h5"
    shutil.copyfile(layout_files("keras3-legacy"), misnamed)
    with pytest.raises(
        WeightFileError, match=re.escape(".weights.h5 file without a 'layers' group")
    ):
        detect_format(misnamed)


def test_unreadable_files(tmp_path):
    not_hdf5 = tmp_path / "x.h5"
    _not_hdf5(not_hdf5)
    for call in (detect_format, inspect_weights, read_weights):
        with pytest.raises(WeightFileError, match="not a readable HDF5") as info:
            call(not_hdf5)
        assert str(not_hdf5) in str(info.value)
    with pytest.raises(WeightFileError, match=re.escape("missing.h5: no such file")):
        read_weights(tmp_path / "missing.h5")
    fake = tmp_path / "m.keras"
    fake.write_bytes(b"PK? no")
    with pytest.raises(
        WeightFileError, match=re.escape("a .keras file must be a zip archive")
    ) as info:
        read_weights(fake)
    assert str(fake) in str(info.value)
    no_weights = tmp_path / "no_weights.keras"
    with zipfile.ZipFile(no_weights, "w") as z:
        z.writestr("config.json", "{}")
    with pytest.raises(WeightFileError, match=re.escape("archive has no model.weights.h5")):
        read_weights(no_weights)


def test_bad_json_is_refused(layout_files, src_of, tmp_path):
    src = src_of("full-model")
    with h5py.File(src, "r+") as f:
        f.attrs["model_config"] = "{not json"
    with pytest.raises(WeightFileError, match="attribute 'model_config' is not valid JSON"):
        read_weights(src)
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(layout_files("keras-zip")) as z_in, zipfile.ZipFile(bad, "w") as z_out:
        for info in z_in.infolist():
            z_out.writestr(info, b"{oops" if info.filename == "config.json" else z_in.read(info))
    with pytest.raises(
        WeightFileError, match=re.escape("unreadable config.json in .keras archive")
    ):
        read_weights(bad)


# ---------------------------------------------------------------------------------------------
# Refusals: output paths and stats


@pytest.mark.parametrize(
    "name, out_name",
    [("downloaded", "out.weights.h5"), ("downloaded", "out.keras"), ("weights-h5", "out.h5"),
     ("keras-zip", "out.weights.h5"), ("keras-zip", "out.h5")],
)  # fmt: skip
def test_output_suffix_must_load_like_the_input(name, out_name, layout_files, out_dir):
    ws = read_weights(layout_files(name))
    with pytest.raises(WeightFileError, match=f"{out_name} must end in {LAYOUTS[name].suffix} "
                       f"like {LAYOUTS[name].filename}"):  # fmt: skip
        write_weights(ws.file, out_dir / out_name, {}, {"tool": "vggnorm"})
    write_weights(ws.file, out_dir / f"ok{LAYOUTS[name].suffix}", {}, {"tool": "vggnorm"})
    assert os.listdir(out_dir) == [f"ok{LAYOUTS[name].suffix}"]


def test_h5_and_hdf5_are_interchangeable(layout_files, out_dir):
    ws = read_weights(layout_files("downloaded"))
    write_weights(ws.file, out_dir / "out.hdf5", {}, {"tool": "vggnorm"})
    assert detect_format(out_dir / "out.hdf5") == "legacy-h5"


def test_output_exists_without_force(layout_files, tmp_path, out_dir):
    src = layout_files("full-model")
    ws = read_weights(src)
    stats = tmp_path / "stats.h5"
    write_stats(stats, make_record(ws, topology.bind(ws.file)))
    dst = out_dir / "out.h5"
    dst.write_bytes(b"precious")
    with pytest.raises(WeightFileError, match=f"{dst} already exists") as info:
        normalize(src, dst, stats)
    assert info.value.fix == "force"
    assert dst.read_bytes() == b"precious" and os.listdir(out_dir) == ["out.h5"]
    normalize(src, dst, stats, force=True)
    assert inspect_weights(dst).provenance is not None and os.listdir(out_dir) == ["out.h5"]


@pytest.mark.parametrize("force", [False, True])
def test_output_is_input(src_of, tmp_path, force):
    src = src_of("full-model")
    ws = read_weights(src)
    record = make_record(ws, topology.bind(ws.file))
    before = src.read_bytes()
    for dst in (src, src.parent / "." / src.name):
        with pytest.raises(WeightFileError, match="is the input file; vggnorm never writes over"):
            write_weights(ws.file, dst, {}, {"tool": "vggnorm"}, force=force)
        with pytest.raises(WeightFileError, match="is the input") as info:
            normalize(src, dst, record, force=force)
        assert src.name in str(info.value)
    assert src.read_bytes() == before and os.listdir(src.parent) == [src.name]


def test_missing_output_directory(layout_files, tmp_path):
    ws = read_weights(layout_files("keras-zip"))
    with pytest.raises(WeightFileError, match="nowhere: output directory does not exist"):
        write_weights(ws.file, tmp_path / "nowhere" / "out.keras", {}, {"tool": "vggnorm"})
    assert not (tmp_path / "nowhere").exists()


def test_refuses_stats_of_another_model(layout_files, tmp_path, out_dir):
    src = layout_files("keras-zip")
    ws = read_weights(src)
    record = make_record(ws, topology.bind(ws.file))
    other = record.with_meta(fingerprint="f" * 64, weights="/elsewhere/other.h5")
    pattern = re.escape(f"{src} is not the model the stats were gathered on (conv weights "
                        "fingerprint ") + "[0-9a-f]{12}" + re.escape(
                        " vs ffffffffffff from /elsewhere/other.h5)")  # fmt: skip
    with pytest.raises(StatsError, match=pattern):
        normalize(src, out_dir / "out.keras", other)
    assert os.listdir(out_dir) == []


@pytest.mark.keras
def test_refuses_stats_of_vgg19_on_vgg16(layout_files, out_dir):
    src = layout_files("keras/downloaded")
    other_ws = read_weights(layout_files("keras/downloaded-vgg19"))
    other = make_record(other_ws, topology.bind(other_ws.file))
    with pytest.raises(StatsError) as info:
        normalize(src, out_dir / "out.h5", other)
    assert str(src) in str(info.value)
    assert os.listdir(out_dir) == []


def test_fingerprint_covers_the_batchnorm_between_conv_and_relu(layout_files, src_of, out_dir):
    src = src_of("bn-full-model")
    ws = read_weights(src)
    record = make_record(ws, topology.bind(ws.file))
    with h5py.File(src, "r+") as f:  # one moving mean changes what the ReLU sees
        ds = f["model_weights/bn1/sequential/bn1/moving_mean"]
        ds[0] = ds[0] + 1
    with pytest.raises(StatsError, match="is not the model the stats were gathered on"):
        normalize(src, out_dir / "out.h5", record)


def test_refuses_unfinished_stats(layout_files, tmp_path, out_dir):
    src = layout_files("keras-zip")
    ws = read_weights(src)
    record = make_record(ws, topology.bind(ws.file)).with_meta(complete=False, position=4)
    stats = tmp_path / "stats.h5"
    write_stats(stats, record)
    with pytest.raises(StatsError, match="the stats file is from an unfinished run") as info:  # fmt: skip
        normalize(src, out_dir / "out.keras", stats)
    assert str(stats) in str(info.value) and info.value.fix == "resume"
    with pytest.raises(StatsError, match="unfinished run"):
        normalize(src, out_dir / "out.keras", record)
    assert os.listdir(out_dir) == []


def test_refuses_stats_with_another_conv_count_or_width(layout_files, out_dir):
    src = layout_files("keras-zip")
    ws = read_weights(src)
    record = make_record(ws, topology.bind(ws.file))
    fewer = dataclasses.replace(record, layers=record.layers[:-1])
    with pytest.raises(StatsError, match="stats cover 12 conv layers but the model has 13"):
        normalize(src, out_dir / "out.keras", fewer)
    layers = list(record.layers)
    first = layers[0]
    layers[0] = type(first)(first.name, first.sum[:3], first.sumsq[:3], first.count)
    narrower = dataclasses.replace(record, layers=tuple(layers))
    with pytest.raises(StatsError, match="stats layer block1_conv1 has 3 filters, the model's "
                       "block1_conv1 has 4"):  # fmt: skip
        normalize(src, out_dir / "out.keras", narrower)
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("name", ["full-model", "keras-zip"])
def test_refuses_an_already_normalized_file(name, layout_files, tmp_path, out_dir):
    src = layout_files(name)
    suffix = LAYOUTS[name].suffix
    ws = read_weights(src)
    record = make_record(ws, topology.bind(ws.file))
    once = tmp_path / f"once{suffix}"
    normalize(src, once, record)
    with pytest.raises(WeightFileError, match=f"{once} was already normalized by vggnorm"):
        normalize(once, out_dir / f"twice{suffix}", record)
    assert os.listdir(out_dir) == []


def _fail_dataset_write(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", boom)


def _fail_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)


def _fail_zip_write(monkeypatch: pytest.MonkeyPatch) -> None:
    real = zipfile.ZipFile.write

    def boom(self: Any, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "write", boom)


@pytest.mark.parametrize("force", [False, True], ids=["new-target", "existing-target"])
@pytest.mark.parametrize(
    "name, fail",
    [pytest.param("downloaded", _fail_dataset_write, id="h5-dataset-write"),
     pytest.param("downloaded", _fail_fsync, id="h5-fsync"),
     pytest.param("full-model-optimizer", _fail_dataset_write, id="full-model-dataset-write"),
     pytest.param("weights-h5", _fail_dataset_write, id="weights.h5-dataset-write"),
     pytest.param("keras-zip", _fail_dataset_write, id="keras-dataset-write"),
     pytest.param("keras-zip", _fail_zip_write, id="keras-zip-write")],
)  # fmt: skip
def test_disk_full_mid_write_leaves_nothing(name, fail, force, layout_files, out_dir, monkeypatch):
    src = layout_files(name)
    ws = read_weights(src)
    changed = changes_for(ws)
    dst = out_dir / f"out{LAYOUTS[name].suffix}"
    if force:
        dst.write_bytes(b"the previous output")
    with monkeypatch.context() as m:
        fail(m)
        with pytest.raises(WeightFileError, match="No space left on device") as info:
            write_weights(ws.file, dst, changed, {"tool": "vggnorm"}, force=force)
    assert str(dst) in str(info.value)
    assert os.listdir(out_dir) == ([dst.name] if force else [])
    if force:
        assert dst.read_bytes() == b"the previous output"
    # The failure left the source alone, and a retry works.
    assert read_weights(src).arrays.keys() == ws.arrays.keys()
    write_weights(ws.file, dst, changed, {"tool": "vggnorm"}, force=True)
    assert detect_format(dst) == LAYOUTS[name].format


@pytest.mark.parametrize("name", layouts(["full-model", "keras/downloaded"]))
def test_disk_full_during_normalize(name, layout_files, out_dir, monkeypatch):
    src = layout_files(name)
    ws = read_weights(src)
    record = make_record(ws, topology.bind(ws.file))
    _fail_dataset_write(monkeypatch)
    with pytest.raises(VggnormError, match="No space left") as info:
        normalize(src, out_dir / "out.h5", record)
    assert "out.h5" in str(info.value)
    assert os.listdir(out_dir) == []


def test_output_permissions_follow_umask(layout_files, out_dir):
    ws = read_weights(layout_files("downloaded"))
    out = out_dir / "out.h5"
    write_weights(ws.file, out, {}, {"tool": "vggnorm"})
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
