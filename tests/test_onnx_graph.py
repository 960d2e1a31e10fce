"""ONNX graphs built by hand with onnx.helper (fixtures/onnx_vgg.py) in the two shapes exporters
write (torch.onnx's NCHW ``Flatten -> Gemm``; tf2onnx's NHWC input, ``Transpose`` back and
``Reshape -> MatMul + Add``): read into a chain, rewritten in their initializers only, run in
onnxruntime before and after, and refused naming the node. No Keras."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

from fixtures import onnx_vgg as ov  # noqa: E402
from fixtures.records import make_record  # noqa: E402
from vggnorm.commands.apply import normalize  # noqa: E402
from vggnorm.commands.compare import compare_files  # noqa: E402
from vggnorm.core.errors import ArchitectureError, VggnormError, WeightFileError  # noqa: E402
from vggnorm.formats.registry import load, read_scales  # noqa: E402

BLOCKS = [[4, 4], [8]]
HEAD = [6, 5]
SHAPES = [(nhwc, norm) for nhwc in (False, True) for norm in ("none", "bn", "muladd")]
IDS = [f"{'nhwc' if nhwc else 'nchw'}-{norm}" for nhwc, norm in SHAPES]


@pytest.mark.parametrize(("nhwc", "norm"), SHAPES, ids=IDS)
def test_graphs_are_read_into_a_chain(tmp_path: Path, nhwc: bool, norm: str) -> None:
    src = ov.save(ov.vgg_graph(BLOCKS, HEAD, nhwc=nhwc, norm=norm, softmax=True), tmp_path / "g.onnx")
    loaded = load(src)
    arch, wf = loaded.bound.arch, loaded.weights.file
    assert (wf.format, wf.layout) == ("onnx", "nhwc" if nhwc else "nchw")
    assert arch.conv_names == ("block1_conv1", "block1_conv2", "block2_conv1")
    assert [c.padding for c in arch.convs] == ["same"] * 3
    assert arch.head is not None
    assert (arch.head.reduce, arch.head.flatten_order, arch.head.input_size) == (
        "flatten", "hwc" if nhwc else "chw", 32)  # fmt: skip
    assert [d.activation for d in arch.head.layers] == ["relu", "softmax"]
    if norm == "none":
        assert arch.norms == {}
    else:  # a folded Mul/Add runs as a BatchNorm of mean 0, variance 1 and epsilon 0
        eps = {c.norm.epsilon for c in arch.convs if c.norm is not None}
        assert eps == ({0.0} if norm == "muladd" else {np.float32(1e-5)})
        assert arch.norms == {c: f"{c}_bn" for c in arch.conv_names}
    model = onnx.load(str(src))
    conv = ov.node_named(model, "Conv")
    assert dict(wf.native_names)["block1_conv1"] == conv.name
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == conv.input[1]))
    assert np.array_equal(loaded.arrays["block1_conv1/kernel"], w.transpose(2, 3, 1, 0))
    with pytest.raises(VggnormError, match="does not record how its input was preprocessed") as info:
        _ = loaded.preprocess
    assert info.value.fix == "preprocess"


def _relus_and_logits(path: Path, x: np.ndarray) -> list[np.ndarray]:
    return ov.run(path, x)


@pytest.mark.parametrize(("nhwc", "norm"), SHAPES, ids=IDS)
def test_apply_rewrites_only_initializers_and_onnxruntime_agrees(
    tmp_path: Path, nhwc: bool, norm: str
) -> None:
    pytest.importorskip("onnxruntime")
    model = ov.vgg_graph(BLOCKS, HEAD, nhwc=nhwc, norm=norm, relu_outputs=True)
    src = ov.save(model, tmp_path / "g.onnx")
    loaded = load(src)
    dst = tmp_path / "g_norm.onnx"
    result = normalize(src, dst, make_record(loaded.weights, loaded.bound))
    out = onnx.load(str(dst))
    # every node, name, attribute, input and output is kept; initializers keep name, dtype, shape
    assert [n.SerializeToString() for n in out.graph.node] == [
        n.SerializeToString() for n in model.graph.node]  # fmt: skip
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output
    assert [(t.name, t.data_type, list(t.dims)) for t in out.graph.initializer] == [
        (t.name, t.data_type, list(t.dims)) for t in model.graph.initializer]  # fmt: skip
    assert {p.key for p in out.metadata_props} == {"vggnorm.provenance", "vggnorm.scales"}
    rng = np.random.default_rng(1)
    x = rng.uniform(-120.0, 120.0, (2, 32, 32, 3) if nhwc else (2, 3, 32, 32))
    before, after = _relus_and_logits(src, x), _relus_and_logits(dst, x)
    # Float32: one rounding per stored weight, ~sqrt(72) * 2^-24 per dot product, three layers
    # (and a BatchNorm's rounding each): ~1e-6 of a layer's largest activation; 1e-5 is a margin.
    for conv, a, b in zip(loaded.bound.conv_names, before, after):
        s = result.scales.values[conv][None, :, None, None]
        assert np.max(np.abs(b * s - a)) <= 1e-5 * np.max(np.abs(a)), conv
    # The logits: fc1 sums 128 products of compensated rows, the rest is unchanged.
    assert np.max(np.abs(after[-1] - before[-1])) <= 1e-5 * np.max(np.abs(before[-1]))
    assert compare_files(src, dst).is_rescaling
    scales = read_scales(dst)
    assert all(np.allclose(scales[c], result.scales.values[c], rtol=1e-15) for c in scales)


def test_timm_like_conv_head_and_global_pooling_are_followed(tmp_path: Path) -> None:
    """A valid conv over the last map (timm's pre_logits.fc1), a 1x1 conv, global average
    pooling, Flatten and Gemm: a Dense head of three layers reading the map in (C, H, W) order."""
    b = ov._Builder(0)
    x = ov._conv(b, "images", 3, 4, "none")
    x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    rng = np.random.default_rng(0)
    x = b.node("Conv", [x, b.init("f1", rng.normal(size=(6, 4, 4, 4)).astype(np.float32))],
               kernel_shape=[4, 4])  # fmt: skip
    x = b.node("Relu", [x])
    x = b.node("Conv", [x, b.init("f2", rng.normal(size=(5, 6, 1, 1)).astype(np.float32))],
               kernel_shape=[1, 1])  # fmt: skip
    x = b.node("Flatten", [b.node("GlobalAveragePool", [b.node("Relu", [x])])])
    x = b.node("Gemm", [x, b.init("fc", rng.normal(size=(3, 5)).astype(np.float32))], transB=1)
    graph = helper.make_graph(b.nodes, "timm", [helper.make_tensor_value_info(
        "images", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])], [helper.make_tensor_value_info(
        x, onnx.TensorProto.FLOAT, None)], b.inits)  # fmt: skip
    src = ov.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                  tmp_path / "timm.onnx")  # fmt: skip
    arch = load(src).bound.arch
    assert arch.head is not None and arch.head.flatten_order == "chw"
    assert [(d.units, d.activation, d.use_bias) for d in arch.head.dense] == [
        (6, "relu", False), (5, "relu", False), (3, "linear", False)]  # fmt: skip
    assert arch.head.input_size == 8


def _edit(model: Any, fn: Callable[[Any], None]) -> Any:
    fn(model)
    return model


def _replace_op(op: str, new: str, **attrs: Any) -> Callable[[Any], None]:
    def edit(model: Any) -> None:
        node = ov.node_named(model, op)
        node.op_type = new
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    return edit


def _branch(model: Any) -> None:
    """A skip connection: the first ReLU's output also feeds an Add after the second conv."""
    relus = [n for n in model.graph.node if n.op_type == "Relu"]
    add = helper.make_node("Add", [relus[1].input[0], relus[0].output[0]], ["skip"], name="skip")
    relus[1].input[0] = "skip"
    model.graph.node.insert(list(model.graph.node).index(relus[1]), add)


def _shared(model: Any) -> None:
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    convs[2].input[1] = convs[1].input[1]  # conv2_1 reads conv1_2's weights (shapes differ too)


def _external(model: Any) -> None:
    init = model.graph.initializer[0]
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value="weights.bin")


REFUSALS = {
    "branch": (_branch, ArchitectureError, "feeds 2 nodes"),
    "leaky": (_replace_op("Relu", "LeakyRelu"), ArchitectureError, "(LeakyRelu), not a ReLU"),
    "sigmoid-head": (lambda m: setattr(ov.node_named(m, "Relu", 3), "op_type", "Sigmoid"),
                     ArchitectureError, "(Sigmoid) is an op vggnorm cannot follow in the head"),
    "grouped": (lambda m: ov.node_named(m, "Conv", 1).attribute.append(
        helper.make_attribute("group", 2)), ArchitectureError, "grouped or dilated"),
    "stride": (lambda m: ov.node_named(m, "Conv", 1).attribute.append(
        helper.make_attribute("strides", [2, 2])), ArchitectureError, "has strides (2, 2)"),
    "pool-3x3": (lambda m: ov.node_named(m, "MaxPool").attribute[0].CopyFrom(
        helper.make_attribute("kernel_shape", [3, 3])), ArchitectureError, "pools (3, 3)"),
    "shared": (_shared, ArchitectureError, "shares the initializer"),
    "external": (_external, WeightFileError, "stored in an external file"),
    "unknown-op": (_replace_op("MaxPool", "LpPool"), ArchitectureError,
                   "(LpPool) is an op vggnorm cannot follow before the first head layer"),
}  # fmt: skip


@pytest.mark.parametrize("kind", REFUSALS)
def test_graphs_leaving_the_chain_are_refused_naming_the_node(tmp_path: Path, kind: str) -> None:
    edit, error, words = REFUSALS[kind]
    src = ov.save(_edit(ov.vgg_graph(BLOCKS, HEAD), edit), tmp_path / f"{kind}.onnx")
    with pytest.raises(error) as info:
        load(src)
    message = str(info.value)
    assert words in message and str(src) in message and "\n" not in message


def test_a_file_that_is_not_onnx_is_one_line(tmp_path: Path) -> None:
    src = tmp_path / "x.onnx"
    src.write_bytes(b"\x08\x07" + b"\xff" * 64)
    with pytest.raises(WeightFileError) as info:
        load(src)
    assert str(src) in str(info.value) and "\n" not in str(info.value)


def test_verify_runs_both_graphs_in_onnxruntime(tmp_path: Path) -> None:
    """The onnxruntime check of ``verify`` passes on a normalized copy and fails on a copy whose
    head was not compensated (the chain alone cannot tell)."""
    pytest.importorskip("onnxruntime")
    from PIL import Image

    from vggnorm.core.rescale import compute_scales
    from vggnorm.runtime.data import open_dataset
    from vggnorm.runtime.onnx_run import check_onnx_files

    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3)).astype(np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png")  # fmt: skip
    src = ov.save(ov.vgg_graph(BLOCKS, HEAD, nhwc=True, softmax=True), tmp_path / "g.onnx")
    loaded = load(src)
    record = make_record(loaded.weights, loaded.bound)
    normalize(src, tmp_path / "n.onnx", record)
    ds = open_dataset(tmp_path / "imgs")
    scales = compute_scales(record.means(), loaded.bound.conv_names)
    notes: list[str] = []
    good = check_onnx_files(loaded, load(tmp_path / "n.onnx"), ds, ds.items, record.meta, scales,
                            notes)  # fmt: skip
    assert good is not None and good["ok"] and good["images"] == 3 and notes == []
    model = onnx.load(str(tmp_path / "n.onnx"))
    gemm_w = ov.node_named(model, "MatMul").input[1]
    init = next(t for t in model.graph.initializer if t.name == gemm_w)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(
        next(t for t in onnx.load(str(src)).graph.initializer if t.name == gemm_w)), gemm_w))  # fmt: skip
    ov.save(model, tmp_path / "bad.onnx")
    bad = check_onnx_files(loaded, load(tmp_path / "bad.onnx"), ds, ds.items, record.meta,
                           scales, notes)  # fmt: skip
    assert bad is not None and not bad["ok"]
