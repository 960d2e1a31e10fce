"""MatConvNet files (``imagenet-vgg-verydeep-16.mat`` and its kin), built by hand with
``scipy.io.savemat`` (fixtures/matconvnet.py): read, rewritten with the same structure, run as the
public readers run them, and refused with one line. No Keras."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sio = pytest.importorskip("scipy.io")

from fixtures import matconvnet as mc  # noqa: E402
from fixtures.records import make_record  # noqa: E402
from vggnorm.commands.apply import normalize  # noqa: E402
from vggnorm.commands.compare import compare_files  # noqa: E402
from vggnorm.core.errors import VggnormError, WeightFileError  # noqa: E402
from vggnorm.core.rescale import compute_scales  # noqa: E402
from vggnorm.formats.registry import load, read_scales  # noqa: E402

TINY = [[4, 4], [8]]  # two blocks: 3 convs, 2 pools; fc6 is 2x2 over the 8x8 input's last map


def tiny(path: Path, newer: bool = False, **kwargs: Any) -> Path:
    return mc.write_mat(path, mc.vgg_layers(TINY, head=[6, 5], side=2, **kwargs), newer=newer)


@pytest.mark.parametrize("newer", [False, True], ids=["normalization", "meta.normalization"])
def test_the_layer_list_is_read_into_a_chain(tmp_path: Path, newer: bool) -> None:
    src = tiny(tmp_path / "tiny.mat", newer)
    loaded = load(src)
    arch, wf = loaded.bound.arch, loaded.weights.file
    assert (wf.format, wf.preprocess, loaded.bound.stock) == ("matconvnet", "caffe", None)
    assert arch.conv_names == ("block1_conv1", "block1_conv2", "block2_conv1")
    assert dict(wf.native_names) == {"block1_conv1": "conv1_1", "block1_conv2": "conv1_2",
                                     "block2_conv1": "conv2_1", "fc1": "fc6", "fc2": "fc7"}  # fmt: skip
    assert arch.head is not None
    assert (arch.head.reduce, arch.head.flatten_order, arch.head.input_size) == ("flatten", "hwc", 8)
    assert [(d.name, d.activation) for d in arch.head.layers] == [("fc1", "relu"), ("fc2", "softmax")]
    layers = sio.loadmat(str(src))["layers"][0]
    w1 = layers[0][0][0][0][0][0]  # the public readers' indexing: width x height x in x out
    # height x width, and the input channels reversed (RGB -> caffe's BGR): a permutation
    assert np.array_equal(loaded.arrays["block1_conv1/kernel"], w1.transpose(1, 0, 2, 3)[:, :, ::-1])
    w2 = layers[2][0][0][0][0][0]
    assert np.array_equal(loaded.arrays["block1_conv2/kernel"], w2.transpose(1, 0, 2, 3))
    fc6 = layers[8][0][0][0][0][0]  # (2, 2, 8, 6): rows in (H, W, C) order
    assert np.array_equal(loaded.arrays["fc1/kernel"], fc6.transpose(1, 0, 2, 3).reshape(32, 6))


def test_a_stock_vgg16_is_recognised_and_exports_exactly(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from vggnorm.commands.export import export

    src = mc.write_mat(tmp_path / "imagenet-vgg-verydeep-16.mat",
                       mc.stock_layers("vgg16", head=[16, 16, 10]))  # fmt: skip
    loaded = load(src)
    assert loaded.bound.stock == "vgg16" and loaded.bound.arch.head is not None
    assert loaded.bound.arch.head.input_size == 224  # fc6: 7x7 over the 7x7 map of 224 inputs
    export(src, tmp_path / "tv.safetensors", "torchvision")
    state = load_file(str(tmp_path / "tv.safetensors"))
    layers = sio.loadmat(str(src))["layers"][0]
    w = layers[0][0][0][0][0][0].transpose(1, 0, 2, 3)[:, :, ::-1]  # BGR, as Keras's VGG reads
    assert np.array_equal(state["features.0.weight"], w.transpose(3, 2, 0, 1))
    fc6 = layers[31][0][0][0][0][0]  # (7, 7, 512, 16) -> torch's (16, 512 * 7 * 7), rows (C, H, W)
    assert np.array_equal(state["classifier.0.weight"],
                          fc6.transpose(3, 2, 1, 0).reshape(16, -1))  # fmt: skip


def test_apply_keeps_the_structure_and_the_readers_get_the_same_function(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    src = tiny(tmp_path / "tiny.mat")
    loaded = load(src)
    record = make_record(loaded.weights, loaded.bound)
    dst = tmp_path / "tiny_norm.mat"
    result = normalize(src, dst, record)
    before, after = sio.loadmat(str(src)), sio.loadmat(str(dst))
    assert set(after) - set(before) == {"vggnorm_provenance", "vggnorm_scales"}
    assert np.array_equal(after["normalization"][0][0]["averageImage"],
                          before["normalization"][0][0]["averageImage"])  # fmt: skip
    for a, b in zip(before["layers"][0], after["layers"][0], strict=True):
        assert a.dtype.names == b.dtype.names  # same fields, same order: weights first
        if str(a[0][0]["type"][0]) == "conv":
            for x, y in zip(a[0][0][0][0], b[0][0][0][0], strict=True):
                assert x.shape == y.shape and x.dtype == y.dtype
    rgb = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    with torch.no_grad():
        original, normalized = mc.neural_style_relus(src, rgb), mc.neural_style_relus(dst, rgb)
    # Float32: one rounding per stored weight and ~sqrt(36) * 2^-24 per dot product, over three
    # layers: ~1e-6 of each layer's largest activation; 1e-5 leaves a margin (as for PyTorch).
    for conv, a, b in zip(loaded.bound.conv_names, original, normalized, strict=True):
        s = result.scales.values[conv]
        assert np.max(np.abs(b * s - a)) <= 1e-5 * np.max(np.abs(a)), conv
    report = compare_files(src, dst).report  # the fc6 rows carry the last conv's scales
    assert report.is_rescaling and report.head is not None, report.table()
    got = read_scales(dst)
    assert all(np.allclose(got[c], result.scales.values[c], rtol=1e-15) for c in got)


def test_an_output_of_another_format_is_refused(tmp_path: Path) -> None:
    src = tiny(tmp_path / "tiny.mat")
    loaded = load(src)
    with pytest.raises(WeightFileError, match=r"must end in \.mat like "):
        normalize(src, tmp_path / "out.h5", make_record(loaded.weights, loaded.bound))


def _insert(index: int, layer: np.ndarray) -> Callable[[list[np.ndarray]], None]:
    return lambda layers: layers.insert(index, layer)


def _set(index: int, **fields: Any) -> Callable[[list[np.ndarray]], None]:
    def edit(layers: list[np.ndarray]) -> None:
        names = layers[index].dtype.names or ()
        values = {k: layers[index][0, 0][k] for k in names}
        layers[index] = mc.struct(**{**values, **fields})
    return edit


REFUSALS = {
    "lrn": (_insert(2, mc.struct(type=np.array(["lrn"]), name=np.array(["norm1"]))),
            "layer 3 ('norm1') has type 'lrn'"),
    "bnorm": (_insert(1, mc.struct(type=np.array(["bnorm"]), name=np.array(["bn1"]))),
              "has type 'bnorm'"),
    "no-relu": (lambda layers: layers.pop(1), "('conv1_1') is a 3x3 conv"),
    "pool-3x3": (_set(4, pool=np.full((1, 2), 3.0)), "('pool1') is a max pool of size (3.0, 3.0)"),
    "dilated": (_set(0, dilate=np.full((1, 2), 2.0)), "dilate (2.0, 2.0)"),
    "relu-first": (_insert(0, mc.relu("relu0")), "('relu0') is a ReLU that does not follow a conv"),
    "after-softmax": (lambda layers: layers.append(mc.relu("late")), "('late') follows the softmax"),
}  # fmt: skip


@pytest.mark.parametrize("kind", REFUSALS)
def test_what_vggnorm_cannot_follow_is_refused_naming_the_layer(tmp_path: Path, kind: str) -> None:
    edit, words = REFUSALS[kind]
    layers = mc.vgg_layers(TINY, head=[6, 5], side=2)
    edit(layers)
    src = mc.write_mat(tmp_path / f"{kind}.mat", layers)
    with pytest.raises(WeightFileError) as info:
        load(src)
    message = str(info.value)
    assert words in message and str(src) in message and "\n" not in message


@pytest.mark.parametrize(
    ("write", "words"),
    [
        (lambda p: mc.write_mat(p, mc.vgg_layers(TINY), mean=(100.0, 100.0, 100.0)),
         "RGB minus (100.0, 100.0, 100.0), not the caffe ImageNet mean"),
        (lambda p: sio.savemat(str(p), {"net": np.zeros(3)}), "no 'layers' variable"),
        (lambda p: sio.savemat(str(p), {"layers": mc.conv("c", np.zeros((3, 3, 3, 2), np.float32),
                                                          np.zeros(2, np.float32))}),
         "expected a 1 x L cell array of structs"),
        (lambda p: p.write_bytes(b"MATLAB 7.3 MAT-file".ljust(124) + b"\x00\x02IM" + bytes(400)),
         "v7.3"),
        (lambda p: p.write_bytes(b"not a mat file at all" * 10), "unreadable or damaged"),
    ],
    ids=["other-mean", "no-layers", "struct-array", "v7.3", "garbage"],
)  # fmt: skip
def test_files_vggnorm_cannot_read_are_one_line(
    tmp_path: Path, write: Callable[[Path], Any], words: str
) -> None:
    src = tmp_path / "x.mat"
    write(src)
    with pytest.raises(VggnormError) as info:
        load(src)
    message = str(info.value)
    assert words in message and str(src) in message and "\n" not in message


def test_a_varying_average_image_is_refused(tmp_path: Path) -> None:
    src = tiny(tmp_path / "tiny.mat")
    data = {k: v for k, v in sio.loadmat(str(src)).items() if not k.startswith("__")}
    data["normalization"][0, 0]["averageImage"][0, 0, 0] += 5.0
    sio.savemat(str(src), data, oned_as="row")
    with pytest.raises(WeightFileError, match="varies across the image"):
        load(src)


def test_scales_follow_a_rescaling_of_the_stored_arrays(tmp_path: Path) -> None:
    # The chain's canonical arrays and the stored ones are one permutation apart: a rescaling
    # written and read back equals the rescaling of the arrays read (bit for bit).
    from vggnorm.core.scaling import rescale_bound
    from vggnorm.formats.registry import read_weights, write_weights

    src = tiny(tmp_path / "tiny.mat")
    loaded = load(src)
    rng = np.random.default_rng(3)
    scales = compute_scales({c.name: rng.uniform(0.1, 10.0, c.filters)
                             for c in loaded.bound.arch.convs}, loaded.bound.conv_names)  # fmt: skip
    new = rescale_bound(loaded.arrays, loaded.bound, scales)
    write_weights(loaded.weights, tmp_path / "out.mat", new, {"tool": "test"})
    back = read_weights(tmp_path / "out.mat")
    assert back.file.provenance == {"tool": "test"}
    for key, value in new.items():
        assert back.arrays[key].dtype == value.dtype and np.array_equal(back.arrays[key], value)


def test_export_writes_what_the_public_readers_run(tmp_path: Path) -> None:
    """Gatys's VGG19 (caffe input) exported to MatConvNet's layout: read back it is the same
    arrays, and the readers' function (RGB minus the average image, conv1_1 on RGB) is the
    module's on the same images."""
    torch = pytest.importorskip("torch")
    from fixtures.torch_vgg import build, relu_outputs
    from vggnorm.commands.export import export

    module = build("gatys", "vgg19")
    src = tmp_path / "vgg_conv.pth"
    torch.save(module.state_dict(), src)
    result = export(src, tmp_path / "imagenet-vgg-verydeep-19.mat", "matconvnet")
    assert result.input_convention == "caffe"
    back = load(tmp_path / "imagenet-vgg-verydeep-19.mat")
    assert back.bound.stock == "vgg19" and back.bound.arch.head is None
    assert back.weights.file.provenance is not None
    original = load(src)
    for key, value in original.arrays.items():
        assert np.array_equal(back.arrays[key], value), key
    rgb = np.random.default_rng(4).integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)
    caffe = torch.from_numpy((rgb[..., ::-1] - np.float32([103.939, 116.779, 123.68]))
                             .transpose(0, 3, 1, 2).copy())  # fmt: skip
    with torch.no_grad():
        theirs = mc.neural_style_relus(tmp_path / "imagenet-vgg-verydeep-19.mat", rgb)
        ours = [o.numpy().transpose(0, 2, 3, 1) for o in relu_outputs("gatys", module, caffe)]
    # the same weights and the same input up to the order of the mean's subtraction: float32
    # rounding of 16 layers of dot products, within 1e-5 of each layer's largest activation
    for a, b in zip(ours, theirs, strict=True):
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))


def test_export_of_a_torchvision_input_file_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from vggnorm.commands.export import export
    from vggnorm.core.archs import VGG16
    from vggnorm.core.torch_layouts import conv_key_map

    keys = conv_key_map("torchvision", "vgg16")
    rng = np.random.default_rng(0)
    state, c_in = {}, 3
    for conv in VGG16.convs:
        state[keys[f"{conv.name}/kernel"]] = rng.standard_normal((conv.filters, c_in, 3, 3), np.float32)
        state[keys[f"{conv.name}/bias"]] = np.zeros(conv.filters, np.float32)
        c_in = conv.filters
    save_file(state, str(tmp_path / "tv.safetensors"))
    with pytest.raises(WeightFileError, match="expects torch input; the matconvnet layout"):
        export(tmp_path / "tv.safetensors", tmp_path / "x.mat", "matconvnet")
