"""PyTorch files end to end: stats, apply, verify and compare on each layout, checked against the
stock torch modules; export from Keras to each layout.

Tolerances: two float32 implementations of the same network (Keras and torch, or a rescaled and
an original one) sum each conv's dot products (up to 4608 terms) in different orders, so their
activations differ by ~sqrt(K) * 2^-24 of the layer's scale per layer, compounding over at most
16 layers: below 1e-5 of each layer's largest activation. The checks use verify's bound, 1e-4 of
that scale (``vggnorm.commands._common.FUNCTION_TOL``), and means are judged as verify judges them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vggnorm.cli import EXIT_OK, EXIT_VERIFY, main
from vggnorm.core.inputs import Decode
from vggnorm.core.verdicts import FUNCTION_TOL
from vggnorm.formats.statsfile import read_stats
from vggnorm.runtime.data import load_image

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from fixtures.torch_vgg import build, relu_outputs  # noqa: E402

pytestmark = pytest.mark.keras
SIZE = 32
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
CASES = [("torchvision", "vgg16", ".safetensors"), ("gatys", "vgg19", ".pth"),
         ("adain", "vgg19", ".pth"), ("torchvision_bn", "vgg16", ".pth"),
         ("timm", "vgg16", ".safetensors"), ("features_bn", "vgg19", ".safetensors")]  # fmt: skip
#: Layouts with a classifier head whose logits are compared.
HEADS = ("torchvision", "torchvision_bn", "timm")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("timgs")
    rng = np.random.default_rng(7)
    for i in range(6):
        arr = rng.integers(0, 256, (int(rng.integers(32, 60)), int(rng.integers(32, 60)), 3))
        Image.fromarray(arr.astype(np.uint8)).save(root / f"{i}.png")
    return root


def _save(module: Any, path: Path) -> Path:
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _torch_input(layout: str, batch: np.ndarray) -> Any:
    """What each layout's users feed their module, from uint8 RGB."""
    x = batch.astype(np.float32)
    if layout.startswith(("torchvision", "timm", "features")):
        x = (x / 255.0 - TORCH_MEAN) / TORCH_STD
    elif layout == "gatys":
        x = x[..., ::-1] - CAFFE_MEAN_BGR
    else:  # adain: RGB in [0, 1]; its own first 1x1 conv does the rest
        x = x / 255.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _relus(layout: str, module: Any, batch: np.ndarray) -> list[np.ndarray]:
    return [o.numpy().transpose(0, 2, 3, 1) for o in relu_outputs(layout, module, _torch_input(layout, batch))]  # fmt: skip


def _batch(images: Path) -> np.ndarray:
    return np.stack([load_image(p, Decode(SIZE)) for p in sorted(images.iterdir())])


def _run(argv: list[str]) -> int:
    return main([*argv, "-q"])


@pytest.mark.parametrize(("layout", "arch", "suffix"), CASES, ids=[c[0] for c in CASES])
def test_stats_apply_verify_compare_against_the_stock_module(
    layout: str, arch: str, suffix: str, images: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from vggnorm.formats.registry import load
    from vggnorm.runtime.network import FeatureNet

    monkeypatch.chdir(tmp_path)
    module = build(layout, arch)
    src = _save(module, tmp_path / f"{layout}{suffix}")
    batch = _batch(images)

    # 1. vggnorm's network for the file is the stock module's function (preprocessing, padding).
    loaded = load(src)
    net = FeatureNet(loaded.bound.arch.without_head(), loaded.arrays, SIZE,
                     loaded.weights.file.preprocess, outputs="activations")  # type: ignore[arg-type]  # fmt: skip
    ours, theirs = net.activations(batch), _relus(layout, module, batch)
    for a, b in zip(ours, theirs, strict=True):
        assert np.max(np.abs(a - b)) <= FUNCTION_TOL * np.max(np.abs(b))

    # 2. stats -> apply -> verify, in the file's own format and layout.
    assert (
        _run(["stats", "--data", str(images), "--weights", str(src), "--size", str(SIZE)])
        == EXIT_OK
    )
    record = read_stats("vggnorm-stats.h5")
    assert record.meta.preprocess == loaded.weights.file.preprocess
    dst = tmp_path / f"{layout}_norm{suffix}"
    assert _run(["apply", "--in", str(src), "--out", str(dst)]) == EXIT_OK
    assert _run(["verify"]) == EXIT_OK

    # 3. The output loads into the stock module and computes the original function / scales,
    #    and its means on the stats images are 1, measured in torch.
    normed = build(layout, arch, seed=99)
    state = (torch.load(dst, weights_only=True) if suffix == ".pth" else
             __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(dst)))  # fmt: skip
    normed.load_state_dict(state, strict=True)
    after = _relus(layout, normed, batch)
    for conv, (layer_stats, a, b) in enumerate(zip(record.layers, theirs, after, strict=True)):
        m = layer_stats.mean
        s = np.where(m <= 1e-8, 1.0, m)
        assert np.max(np.abs(b * s - a)) <= FUNCTION_TOL * np.max(np.abs(a)), conv
        live = m > 1e-8
        got = b.reshape(-1, b.shape[-1]).astype(np.float64).mean(axis=0)
        assert np.max(np.abs(got[live] - 1) * s[live]) / np.median(s[live]) <= 1e-4, conv
    if layout in HEADS:  # the classifier is compensated: same logits
        x = _torch_input(layout, batch)
        with torch.no_grad():
            za, zb = module(x).numpy(), normed(x).numpy()
        assert np.max(np.abs(za - zb)) <= FUNCTION_TOL * np.max(np.abs(za))

    # 4. compare recognises the rescaling, and an unrelated network as not one.
    capsys.readouterr()
    assert main(["compare", str(src), str(dst), "--stats", "vggnorm-stats.h5", "--json"]) == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert result["report"]["is_rescaling"] and result["stats_matches_original"]
    for name, row in result["means"].items():
        assert row["median_ratio"] == pytest.approx(1.0, rel=1e-6), name
    other = _save(build(layout, arch, seed=5), tmp_path / f"other{suffix}")
    assert _run(["compare", str(src), str(other)]) == EXIT_VERIFY


def test_keras_export_to_each_layout(tmp_path: Path, images: Path) -> None:
    import keras

    from fixtures.keras_files import save_downloaded_layout, tiny_vgg
    from vggnorm.formats.registry import read_weights
    from vggnorm.formats.registry import read_weights as read_torch_weights

    model = tiny_vgg(arch="vgg19", size=SIZE)
    src = save_downloaded_layout(model, tmp_path / "vgg19.h5")
    batch = _batch(images)
    x_caffe = batch[..., ::-1].astype(np.float32) - CAFFE_MEAN_BGR
    relus = [layer.output for layer in model.layers if getattr(layer, "activation", None) is not None
             and layer.name.startswith("block") and "conv" in layer.name]  # fmt: skip
    keras_acts = keras.Model(model.inputs, relus).predict_on_batch(x_caffe)

    # gatys: the same function (caffe input, zero padding); arrays round-trip bit-exactly.
    out = tmp_path / "vgg_conv.pth"
    assert _run(["export", "--in", str(src), "--layout", "gatys", "--out", str(out)]) == EXIT_OK
    gatys = build("gatys", "vgg19", seed=3)
    gatys.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for a, b in zip(keras_acts, _relus("gatys", gatys, batch), strict=True):
        assert np.max(np.abs(a - b)) <= FUNCTION_TOL * np.max(np.abs(a))
    keras_arrays = read_weights(src).arrays
    for key, value in read_torch_weights(out).arrays.items():
        assert (
            value.dtype == keras_arrays[key].dtype
            and value.tobytes() == keras_arrays[key].tobytes()
        )

    # adain: same weights, reflection padding: equal inside, different at the border.
    out = tmp_path / "vgg_normalised.pth"
    assert _run(["export", "--in", str(src), "--layout", "adain", "--out", str(out)]) == EXIT_OK
    adain = build("adain", "vgg19", seed=3)
    adain.load_state_dict(torch.load(out, weights_only=True), strict=True)
    a, b = keras_acts[0], _relus("adain", adain, batch)[0]
    inner = (slice(None), slice(1, -1), slice(1, -1))
    assert np.max(np.abs(a[inner] - b[inner])) <= FUNCTION_TOL * np.max(np.abs(a))
    assert np.max(np.abs(a - b)) > FUNCTION_TOL * np.max(np.abs(a))  # the border differs

    # torchvision with the caffe convention folded into conv1_1: equal away from the border.
    out = tmp_path / "tv.safetensors"
    argv = [
        "export",
        "--in",
        str(src),
        "--layout",
        "torchvision",
        "--out",
        str(out),
        "--fold-input",
    ]
    assert _run(argv) == EXIT_OK
    tv = build("torchvision", "vgg19", seed=3)
    state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out))
    tv.features.load_state_dict({k[len("features.") :]: v for k, v in state.items()}, strict=True)
    a, b = keras_acts[0], _relus("torchvision", tv, batch)[0]
    assert np.max(np.abs(a[inner] - b[inner])) <= FUNCTION_TOL * np.max(np.abs(a))
    assert read_torch_weights(out).file.provenance["input"] == "torch"
