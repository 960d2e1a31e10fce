"""vggnorm.core.topology: recognising stock VGG16/VGG19 from weight shapes alone, and fingerprints."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from vggnorm.core.archs import ARCHS, ConvSpec
from vggnorm.core.errors import ArchitectureError, VggnormError
from vggnorm.core.topology import bind, detect_stock, fingerprint
from vggnorm.core.weightset import LayerEntry, WeightFile

PATH = Path("/models/tuned.weights.h5")


def conv_entry(name: str, c_in: int, c_out: int, bias: bool = True) -> LayerEntry:
    shapes = ((3, 3, c_in, c_out), (c_out,))[: 2 if bias else 1]
    return LayerEntry(
        name, tuple(f"vars/{i}" for i in range(len(shapes))), shapes, ("float32",) * len(shapes)
    )


def dense_entry(name: str, rows: int, units: int) -> LayerEntry:
    return LayerEntry(name, ("vars/0", "vars/1"), ((rows, units), (units,)), ("float32", "float32"))


def keras3_name(kind: str, i: int) -> str:
    """Keras 3 ``.weights.h5`` keys: class name, then class name + index."""
    return kind if i == 0 else f"{kind}_{i}"


def stock_convs(model: str, names: str = "keras3") -> list[LayerEntry]:
    arch = ARCHS[model]
    entries, c_in = [], 3
    for i, conv in enumerate(arch.convs):
        name = keras3_name("conv2d", i) if names == "keras3" else conv.name
        entries.append(conv_entry(name, c_in, conv.filters))
        c_in = conv.filters
    return entries


def weight_file(layers: list[LayerEntry], fmt: str = "weights-h5") -> WeightFile:
    return WeightFile(PATH, fmt, tuple(layers))  # type: ignore[arg-type]


def top(rows: int, names: tuple[str, ...] = ("dense", "dense_1", "dense_2")) -> list[LayerEntry]:
    units = (4096, 4096, 1000)
    ins = (rows, 4096, 4096)
    return [dense_entry(n, r, u) for n, r, u in zip(names, ins, units)]


# --------------------------------------------------------------------------------------------
# detect_stock / bind
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["vgg16", "vgg19"])
def test_detect_stock_from_conv_shapes(model):
    assert detect_stock(weight_file(stock_convs(model))) == model
    assert detect_stock(weight_file(stock_convs(model) + top(7 * 7 * 512))) == model


@pytest.mark.parametrize("model", ["vgg16", "vgg19"])
def test_bind_notop_maps_the_files_names_by_position(model):
    stock = ARCHS[model]
    bound = bind(weight_file(stock_convs(model)))
    n = len(stock.convs)
    assert n == {"vgg16": 13, "vgg19": 16}[model]
    assert bound.arch.name == model
    assert bound.conv_names == ("conv2d", *(f"conv2d_{i}" for i in range(1, n)))
    assert bound.arch.head is None
    assert model in bound.source
    # the same block structure as the table: convs renamed, pools kept, widths unchanged
    assert [type(f) for f in bound.arch.features] == [type(f) for f in stock.features]
    for mine, theirs in zip(bound.arch.features, stock.features):
        if isinstance(theirs, ConvSpec):
            assert (mine.filters, mine.kernel_size, mine.padding) == (
                theirs.filters,
                theirs.kernel_size,
                theirs.padding,
            )
        else:
            assert mine == theirs
    # conv2d_10 comes after conv2d_9 although it sorts before conv2d_2: position, not name
    assert bound.conv_names[10] == "conv2d_10"
    assert stock.conv_names[10] == {"vgg16": "block5_conv1", "vgg19": "block4_conv3"}[model]


@pytest.mark.parametrize("model", ["vgg16", "vgg19"])
def test_bind_with_the_stock_names(model):
    bound = bind(
        weight_file(stock_convs(model, names="stock") + top(25088, ("fc1", "fc2", "predictions")))
    )
    assert bound.conv_names == ARCHS[model].conv_names
    assert bound.arch.first_dense == "fc1"


@pytest.mark.parametrize("model", ["vgg16", "vgg19"])
def test_bind_with_top_flatten(model):
    bound = bind(weight_file(stock_convs(model) + top(7 * 7 * 512)), model=model)
    head = bound.arch.head
    assert head is not None
    assert head.reduce == "flatten"
    assert head.input_size == 224
    assert [d.name for d in head.dense] == ["dense", "dense_1", "dense_2"]
    assert [d.units for d in head.dense] == [4096, 4096, 1000]
    assert [d.activation for d in head.dense] == ["relu", "relu", "softmax"]  # the stock top
    assert bound.arch.first_dense == "dense"


def test_bind_with_a_smaller_flatten_map_infers_the_input_size():
    bound = bind(weight_file(stock_convs("vgg16") + top(2 * 2 * 512)))
    assert bound.arch.head is not None
    assert (bound.arch.head.reduce, bound.arch.head.input_size) == ("flatten", 64)


@pytest.mark.parametrize("model", ["vgg16", "vgg19"])
def test_bind_with_global_pooling_head(model):
    denses = [dense_entry("dense", 512, 256), dense_entry("dense_1", 256, 10)]
    bound = bind(weight_file(stock_convs(model) + denses))
    head = bound.arch.head
    assert head is not None
    assert head.reduce == "gap"
    assert head.input_size is None
    assert [d.name for d in head.dense] == ["dense", "dense_1"]
    # a weights-only file does not say what follows the Dense
    assert [d.activation for d in head.dense] == ["unknown", "unknown"]
    assert not head.known


@pytest.mark.parametrize("rows", [1000, 3 * 512, 512 * 7 * 7 + 512])
def test_a_dense_that_reads_neither_a_square_map_nor_pooled_filters_raises(rows):
    wf = weight_file([*stock_convs("vgg16"), dense_entry("dense", rows, 10)])
    with pytest.raises(ArchitectureError) as info:
        bind(wf)
    message = str(info.value)
    assert str(PATH) in message
    assert f"'dense' reads {rows} values" in message
    assert "512" in message


@pytest.mark.parametrize(("actual", "claimed"), [("vgg16", "vgg19"), ("vgg19", "vgg16")])
def test_the_wrong_model_argument_raises(actual, claimed):
    wf = weight_file(stock_convs(actual) + top(7 * 7 * 512))
    with pytest.raises(ArchitectureError) as info:
        bind(wf, model=claimed)
    message = str(info.value)
    assert isinstance(info.value, VggnormError)
    assert str(PATH) in message
    assert f"a {actual}" in message
    assert f"not the {claimed} asked for" in message
    assert bind(wf, model=actual).arch.name == actual


def _unknown_layouts() -> dict[str, list[LayerEntry]]:
    vgg16 = stock_convs("vgg16")
    wider = list(vgg16)
    wider[0] = conv_entry("conv2d", 3, 65)
    wider[1] = conv_entry("conv2d_1", 65, 64)
    gray = list(vgg16)
    gray[0] = conv_entry("conv2d", 1, 64)
    return {
        "truncated": vgg16[:12],
        "extra-conv": [*vgg16, conv_entry("conv2d_13", 512, 512)],
        "wider-filter": wider,
        "grayscale-input": gray,
        "no-convs": [dense_entry("dense", 10, 2)],
    }


@pytest.mark.parametrize("layout", list(_unknown_layouts()))
def test_unknown_conv_shapes_raise_a_helpful_error(layout):
    layers = _unknown_layouts()[layout]
    wf = weight_file(layers)
    assert detect_stock(wf) is None
    with pytest.raises(ArchitectureError) as info:
        bind(wf)
    message = str(info.value)
    n_convs = sum(len(e.shapes[0]) == 4 for e in layers)
    assert str(PATH) in message
    assert f"{n_convs} conv layers" in message
    assert "match neither VGG16 nor VGG19" in message
    assert ".keras" in message  # says what to do instead


def test_layers_without_weights_do_not_disturb_binding():
    # e.g. a 1-D-only layer (a stray BatchNorm) and weightless entries are skipped by position
    convs = stock_convs("vgg16")
    bn = LayerEntry("batch_normalization", ("vars/0",), ((4096,),), ("float32",))
    empty = LayerEntry("flatten", (), (), ())
    wf = weight_file([*convs[:5], empty, *convs[5:], empty, *top(25088)[:1], bn])
    bound = bind(wf)
    assert bound.conv_names == tuple(e.name for e in convs)
    assert bound.arch.head is not None and bound.arch.head.reduce == "flatten"


# --------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------


def _arrays(dtype=np.float32, names=("c1", "c2")) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    out = {}
    c_in = 3
    for name, c in zip(names, (4, 5)):
        out[f"{name}/kernel"] = rng.normal(size=(3, 3, c_in, c)).astype(np.float32).astype(dtype)
        out[f"{name}/bias"] = rng.normal(size=c).astype(np.float32).astype(dtype)
        c_in = c
    out["fc/kernel"] = rng.normal(size=(5, 2)).astype(dtype)
    return out


def test_fingerprint_is_independent_of_storage_dtype_and_byte_order():
    f32 = _arrays(np.float32)
    f64 = _arrays(np.float64)
    big = {k: v.astype(">f4") for k, v in f32.items()}
    fortran = {k: np.asfortranarray(v) for k, v in f32.items()}
    ref = fingerprint(f32, ["c1", "c2"])
    assert re.fullmatch("[0-9a-f]{64}", ref)  # a sha256 hex digest
    assert fingerprint(f64, ["c1", "c2"]) == ref
    assert fingerprint(big, ["c1", "c2"]) == ref
    assert fingerprint(fortran, ["c1", "c2"]) == ref


def test_fingerprint_is_independent_of_layer_names():
    a = _arrays(names=("c1", "c2"))
    b = _arrays(names=("block1_conv1", "block1_conv2"))
    assert fingerprint(a, ["c1", "c2"]) == fingerprint(b, ["block1_conv1", "block1_conv2"])


@pytest.mark.parametrize("key", ["c1/kernel", "c1/bias", "c2/kernel", "c2/bias"])
def test_fingerprint_changes_when_one_weight_changes(key):
    a = _arrays()
    ref = fingerprint(a, ["c1", "c2"])
    b = dict(a)
    b[key] = a[key].copy()
    flat = b[key].reshape(-1)
    flat[-1] = np.nextafter(flat[-1], np.float32(np.inf))  # one float32 ulp
    assert fingerprint(b, ["c1", "c2"]) != ref
    assert fingerprint(a, ["c1", "c2"]) == ref  # the caller's arrays were not touched


def test_fingerprint_covers_only_the_named_layers_in_order():
    a = _arrays()
    ref = fingerprint(a, ["c1", "c2"])
    changed_head = {**a, "fc/kernel": a["fc/kernel"] + 1}
    assert fingerprint(changed_head, ["c1", "c2"]) == ref
    assert fingerprint(a, ["c2", "c1"]) != ref
    assert fingerprint(a, ["c1"]) != ref
    no_bias = {k: v for k, v in a.items() if k != "c2/bias"}
    assert fingerprint(no_bias, ["c1", "c2"]) != ref
