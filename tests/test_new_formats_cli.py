"""MatConvNet and ONNX files end to end: vggnorm's network for the file is the function the file's
own readers compute (the public MatConvNet readers' way, onnxruntime), then stats, apply, verify,
compare and scales through the CLI, on tiny hand-built VGG-like files and 32x32 images.

Tolerances: two float32 implementations of one network sum each dot product (here at most 72
terms) in different orders, so they differ by ~sqrt(K) * 2^-24 of a layer's scale per layer:
far below verify's bound, 1e-4 of each layer's largest activation (``FUNCTION_TOL``), used here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggnorm.cli import EXIT_ERROR, EXIT_OK, main
from vggnorm.core.inputs import Decode, preprocess_images
from vggnorm.core.verdicts import FUNCTION_TOL
from vggnorm.runtime.data import load_image

pytestmark = pytest.mark.keras
SIZE = 32


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(11)
    for i in range(5):
        arr = rng.integers(0, 256, (int(rng.integers(32, 50)), int(rng.integers(32, 50)), 3))
        Image.fromarray(arr.astype(np.uint8)).save(root / f"{i}.png")
    return root


def _ours(path: Path, batch: np.ndarray, preprocess: str) -> list[np.ndarray]:
    from vggnorm.formats.registry import load
    from vggnorm.runtime.network import FeatureNet

    loaded = load(path)
    net = FeatureNet(loaded.bound.arch.without_head(), loaded.arrays, SIZE, preprocess,  # type: ignore[arg-type]
                     outputs="activations")  # fmt: skip
    return net.activations(batch)


def _batch(images: Path) -> np.ndarray:
    return np.stack([load_image(p, Decode(SIZE)) for p in sorted(images.iterdir())])


def _job(src: Path, dst: Path, images: Path, extra: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """stats -> apply -> verify -> compare -> scales, each exit 0; verify's report."""
    args = ["--data", str(images), "--weights", str(src), "--size", str(SIZE), *extra, "-q"]
    assert main(["stats", *args]) == EXIT_OK
    assert main(["apply", "--in", str(src), "--out", str(dst), "-q"]) == EXIT_OK
    capsys.readouterr()
    assert main(["verify", "--in", str(dst)]) == EXIT_OK
    report = capsys.readouterr().out
    assert main(["compare", str(src), str(dst), "--stats", "vggnorm-stats.h5", "-q"]) == EXIT_OK
    assert main(["scales", "--out", "scales.json", "-q"]) == EXIT_OK
    return report


def test_matconvnet_file(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("scipy.io")
    torch = pytest.importorskip("torch")
    from fixtures import matconvnet as mc

    monkeypatch.chdir(tmp_path)
    src = mc.write_mat(tmp_path / "tiny.mat", mc.vgg_layers([[4, 4], [8]], head=[6, 5], side=8))
    batch = _batch(images)
    with torch.no_grad():
        theirs = mc.neural_style_relus(src, batch)
    for a, b in zip(_ours(src, batch, "caffe"), theirs, strict=True):
        assert np.max(np.abs(a - b)) <= FUNCTION_TOL * np.max(np.abs(b))
    report = _job(src, tmp_path / "tiny_norm.mat", images, [], capsys)
    assert "predictions on 5 images" in report  # fc6-fc7 compensated and run
    factors = json.loads((tmp_path / "scales.json").read_text())
    assert [k for k in factors if k != "__metadata__"] == ["conv1_1", "conv1_2", "conv2_1"]
    with torch.no_grad():  # the readers see the normalized function: features / means
        after = mc.neural_style_relus(tmp_path / "tiny_norm.mat", batch)
    for name, a, b in zip(("conv1_1", "conv1_2", "conv2_1"), theirs, after, strict=True):
        f = np.asarray(factors[name])
        assert np.max(np.abs(a * f - b)) <= FUNCTION_TOL * np.max(np.abs(b)), name


@pytest.mark.parametrize(("nhwc", "norm"), [(False, "bn"), (True, "muladd")], ids=["nchw-bn", "nhwc-muladd"])
def test_onnx_graph(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], nhwc: bool, norm: str,
) -> None:  # fmt: skip
    pytest.importorskip("onnxruntime")
    from fixtures import onnx_vgg as ov

    monkeypatch.chdir(tmp_path)
    model = ov.vgg_graph([[4, 4], [8]], [6, 5], nhwc=nhwc, norm=norm, softmax=True, relu_outputs=True)
    src = ov.save(model, tmp_path / "tiny.onnx")
    batch = _batch(images)
    x = preprocess_images(batch, "caffe")
    theirs = ov.run(src, x if nhwc else x.transpose(0, 3, 1, 2))[:-1]
    for a, b in zip(_ours(src, batch, "caffe"), theirs, strict=True):
        b = b if nhwc and b.shape[-1] == a.shape[-1] else b.transpose(0, 2, 3, 1)
        assert np.max(np.abs(a - b)) <= FUNCTION_TOL * np.max(np.abs(b))
    args = ["stats", "--data", str(images), "--weights", str(src), "--size", str(SIZE), "-q"]
    assert main(args) == EXIT_ERROR  # an ONNX file does not say how its input was preprocessed
    assert "pass --preprocess caffe, torch, unit or rgb255" in capsys.readouterr().err
    report = _job(src, tmp_path / "tiny_norm.onnx", images, ["--preprocess", "caffe"], capsys)
    assert "onnxruntime, both files on 5 images" in report and ": ok" in report
