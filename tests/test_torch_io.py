"""Reading and writing PyTorch VGG files with the stock module definitions (fixtures/torch_vgg.py)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")

from fixtures import torch_vgg  # noqa: E402  (needs torch)
from vggnorm.core.compare import compare_weights  # noqa: E402
from vggnorm.core.errors import WeightFileError  # noqa: E402
from vggnorm.core.rescale import compute_scales, rescale  # noqa: E402
from vggnorm.core.torch_layouts import compensate_head, norm_layer  # noqa: E402
from vggnorm.formats._torch import f32_to_bf16 as _f32_to_bf16  # noqa: E402
from vggnorm.formats.pth import SIDECAR_SUFFIX  # noqa: E402
from vggnorm.formats.torch_files import read_provenance, read_torch, write_torch  # noqa: E402

CASES = [("torchvision", "vgg16"), ("gatys", "vgg16"), ("adain", "vgg19"),
         ("torchvision_bn", "vgg16"), ("features", "vgg19"), ("features_bn", "vgg16"),
         ("timm", "vgg16"), ("timm_bn", "vgg19")]  # fmt: skip
HEADS = ("torchvision", "torchvision_bn", "timm", "timm_bn")
SUFFIXES = [".pth", ".safetensors"]
MARKER: dict[str, bool] = {"ran": False}


def _mark_ran(*_: Any) -> dict[str, bool]:
    MARKER["ran"] = True
    return MARKER


class Evil:
    """Unpickling this would call _mark_ran: the attack torch.load(weights_only=True) stops."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[()]]:
        return (_mark_ran, ())


@pytest.fixture(scope="module")
def modules() -> dict[tuple[str, str], Any]:
    return {case: torch_vgg.build(*case) for case in CASES}


def save(state: dict[str, Any], path: Path) -> Path:
    if path.suffix == ".safetensors":
        st_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def load(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        return dict(st_torch.load_file(str(path)))
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def fresh(layout: str, arch: str) -> Any:
    return torch_vgg.build(layout, arch, seed=99)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(("layout", "arch"), CASES)
def test_round_trip_is_bit_exact_and_loads_strict(
    modules: dict[tuple[str, str], Any], tmp_path: Path, layout: str, arch: str, suffix: str
) -> None:
    state = modules[(layout, arch)].state_dict()
    src = save(state, tmp_path / f"in{suffix}")
    tw = read_torch(src)
    container = "pth" if suffix == ".pth" else "safetensors"
    assert (tw.layout, tw.arch, tw.container) == (layout, arch, container)
    out = write_torch(tmp_path / f"out{suffix}", tw.layout, tw.arrays, source=tw)
    back = load(out)
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    module = fresh(layout, arch)
    module.load_state_dict(back, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(("layout", "arch"), CASES)
def test_rescaled_file_computes_the_same_function(
    modules: dict[tuple[str, str], Any], tmp_path: Path, layout: str, arch: str
) -> None:
    original = modules[(layout, arch)]
    suffix = ".pth" if layout == "torchvision" else ".safetensors"
    tw = read_torch(save(original.state_dict(), tmp_path / f"in{suffix}"))
    names = [
        k.removesuffix("/kernel")
        for k in tw.arrays
        if k.endswith("/kernel") and tw.arrays[k].ndim == 4
    ]
    rng = np.random.default_rng(7)
    scales = compute_scales(
        {n: 10 ** rng.uniform(-2, 2, tw.arrays[f"{n}/bias"].shape[0]) for n in names}, names
    )
    norms = {n: norm_layer(n) for n in names} if tw.info.batchnorm else None
    new = rescale(tw.arrays, scales, norms=norms)
    if "fc1/kernel" in tw.arrays:
        new = compensate_head(new, "fc1", scales.values[names[-1]], tw.info.flatten_order)
    out = write_torch(tmp_path / f"out{suffix}", tw.layout, new, source=tw, metadata={"k": "v"})
    module = fresh(layout, arch)
    module.load_state_dict(load(out), strict=True)

    gen = torch.Generator().manual_seed(0)
    x = torch.rand((2, 3, 32, 32), generator=gen)
    if layout != "adain":  # adain is fed RGB in [0, 1]; the others centred input
        x = (x - 0.5) * 4
    before = torch_vgg.relu_outputs(layout, original, x)
    after = torch_vgg.relu_outputs(layout, module, x)
    assert len(before) == len(names)
    # Float32 bound: every weight is rounded once (relative 2**-24) and each layer sums up to
    # 9 * 512 products; rounding grows ~ sqrt(terms) * 2**-24 per layer and adds up along 16
    # layers: ~ (16 + 68) * 6e-8 = 5e-6 of the layer's largest activation, under 1e-5. A
    # BatchNorm adds one rounding of beta and of the running mean per layer (2 * 6e-8 more).
    for name, a, b in zip(names, before, after):
        s = torch.from_numpy(scales.values[name].astype(np.float32))[None, :, None, None]
        err = float((b * s - a).abs().max())
        assert err <= 1e-5 * float(a.abs().max()), (name, err, float(a.abs().max()))
    if layout in HEADS:
        with torch.no_grad():
            la, lb = original(x), module(x)
        # Logits: fc1 sums 25088 products: ~sqrt(25088) * 2**-24 = 1e-5 relative to the sum of
        # |terms| (typical, not worst case), which here is a few times max|logit|.
        assert float((la - lb).abs().max()) <= 1e-5 * float(la.abs().max())
    report = compare_weights(
        tw.arrays,
        read_torch(out).arrays,
        names,
        "fc1" if layout in HEADS else None,
        ("chw", 49) if layout in HEADS else None,
        norms=norms,
    )
    assert report.is_rescaling, report.table()
    for name in names:
        assert np.allclose(report.scales[name], scales.values[name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes_survive(tmp_path: Path, suffix: str, dtype: str) -> None:
    state = {
        k: v.to(getattr(torch, dtype))
        for k, v in torch_vgg.build("gatys", "vgg16").state_dict().items()
    }
    tw = read_torch(save(state, tmp_path / f"in{suffix}"))
    assert set(tw.dtypes.values()) == {dtype}
    assert tw.arrays["block1_conv1/kernel"].dtype == (
        np.float32 if dtype == "bfloat16" else np.float16
    )
    back = load(write_torch(tmp_path / f"out{suffix}", "gatys", tw.arrays, source=tw))
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_bf16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(10000).astype(np.float32)
            * 10 ** rng.uniform(-5, 5, 10000).astype(np.float32),
            np.array([1.00390625, 1.01171875, -1.00390625], np.float32),
        ]
    )  # ties
    ours = _f32_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv1_1.weight": torch.zeros(64, 3, 3, 3), "payload": Evil()}, path)
    MARKER["ran"] = False
    with pytest.raises(WeightFileError, match=r"evil\.pth") as info:
        read_torch(path)
    assert "\n" not in str(info.value) and "never unpickles" in str(info.value)
    assert MARKER["ran"] is False
    # The file really carries code: loading it unsafely runs it (so the check above can fail).
    torch.load(path, weights_only=False)
    assert MARKER["ran"] is True


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ({"state_dict": {"conv1_1.weight": "x"}}, "'state_dict' entry"),
        ([1, 2], "holds a list"),
        ({"conv1_1.weight": torch.zeros(3, dtype=torch.int64)}, "expected floats"),
    ],
    ids=["checkpoint", "list", "int-tensor"],
)
def test_non_state_dicts_refused(tmp_path: Path, obj: Any, words: str) -> None:
    path = tmp_path / "x.pth"
    torch.save(obj, path)
    with pytest.raises(WeightFileError, match=r"x\.pth") as info:
        read_torch(path)
    assert words in str(info.value)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_nan_and_foreign_files_refused(
    modules: dict[tuple[str, str], Any], tmp_path: Path, suffix: str
) -> None:
    state = modules[("torchvision", "vgg16")].state_dict()
    good = save(state, tmp_path / f"good{suffix}")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightFileError, match=f"cut{suffix}") as info:
        read_torch(cut)
    assert "\n" not in str(info.value)
    bad = {k: v.clone() for k, v in state.items()}
    bad["features.5.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(WeightFileError, match=r"features\.5\.weight holds NaN"):
        read_torch(save(bad, tmp_path / f"nan{suffix}"))
    foreign = {"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}
    with pytest.raises(WeightFileError, match="not a known PyTorch VGG"):
        read_torch(save(foreign, tmp_path / f"foreign{suffix}"))
    wrong = {k: v for k, v in state.items()} | {"features.7.weight": torch.zeros(128, 64, 5, 5)}
    with pytest.raises(WeightFileError, match=r"features.7.weight has shape \(128, 64, 5, 5\)"):
        read_torch(save(wrong, tmp_path / f"wrong{suffix}"))


def test_paths_and_missing_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WeightFileError, match="unknown PyTorch weight suffix"):
        read_torch(tmp_path / "x.npy")
    with pytest.raises(WeightFileError, match="no such file"):
        read_torch(tmp_path / "absent.pth")
    path = tmp_path / "w.pth"
    torch.save({"conv1_1.weight": torch.zeros(1)}, path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(
        ImportError, match=r"reading \.pth needs torch: pip install 'vggnorm\[torch\]'"
    ):
        read_torch(path)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_provenance(
    modules: dict[tuple[str, str], Any],
    tmp_path: Path,
    suffix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tw = read_torch(save(modules[("gatys", "vgg16")].state_dict(), tmp_path / f"in{suffix}"))
    out = write_torch(
        tmp_path / f"out{suffix}",
        "gatys",
        tw.arrays,
        source=tw,
        metadata={"vggnorm.version": "0.test", "scales": "[1.0]"},
    )
    assert read_provenance(out) == {"vggnorm.version": "0.test", "scales": "[1.0]"}
    assert read_torch(out).metadata == {"vggnorm.version": "0.test", "scales": "[1.0]"}
    with pytest.raises(TypeError, match="str to str"):
        write_torch(tmp_path / f"x{suffix}", "gatys", tw.arrays, source=tw, metadata={"n": 1})  # type: ignore[dict-item]
    if suffix == ".pth":
        sidecar = Path(str(out) + SIDECAR_SUFFIX)
        assert json.loads(sidecar.read_text())["vggnorm.version"] == "0.test"
        # Weights replaced behind vggnorm's back: the sidecar no longer describes them.
        torch.save(load(tmp_path / "in.pth"), out)
        with pytest.raises(WeightFileError, match="changed after vggnorm wrote them"):
            read_provenance(out)
        with caplog.at_level(logging.WARNING, logger="vggnorm.formats.torch_files"):
            assert read_torch(out).metadata == {}
        assert "ignoring provenance" in caplog.text


def test_failed_write_leaves_the_target_alone(
    modules: dict[tuple[str, str], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tw = read_torch(save(modules[("gatys", "vgg16")].state_dict(), tmp_path / "in.pth"))
    target = tmp_path / "out.pth"
    target.write_bytes(b"previous")

    def broken(*_: Any, **__: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        write_torch(target, "gatys", tw.arrays, source=tw)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth", "out.pth"]
    nan = dict(tw.arrays) | {"block1_conv1/bias": np.full(64, np.nan, np.float32)}
    with pytest.raises(WeightFileError, match="NaN"):
        write_torch(tmp_path / "nan.safetensors", "gatys", nan, source=tw)


def test_legacy_serialization_and_writing_without_a_source(
    modules: dict[tuple[str, str], Any], tmp_path: Path
) -> None:
    # AdaIN's published vgg_normalised.pth is in torch's legacy (pre-zip) format.
    state = modules[("gatys", "vgg16")].state_dict()
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    tw = read_torch(legacy)
    assert (tw.layout, tw.arch) == ("gatys", "vgg16")
    out = write_torch(tmp_path / "fresh.safetensors", "gatys", tw.arrays)  # arch from the names
    back = load(out)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------------------------
# torchvision's IMAGENET1K_FEATURES (a NaN classifier), and export between layouts (issue #17)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_nan_classifier_is_read_as_the_features_alone(tmp_path: Path, suffix: str) -> None:
    from fixtures.records import make_record
    from vggnorm.commands.apply import normalize
    from vggnorm.formats.registry import load as load_file

    module = torch_vgg.build("torchvision", "vgg16")
    with torch.no_grad():
        for p in module.classifier.parameters():
            p.fill_(float("nan"))  # as in vgg16_features-amdegroot-88682ab5.pth
    src = save(module.state_dict(), tmp_path / f"features{suffix}")
    loaded = load_file(src)
    wf = loaded.weights.file
    assert wf.preprocess == "rgb255" and "all NaN" in wf.notes[0]
    assert loaded.bound.arch.head is None and not any(k.startswith("fc") for k in loaded.arrays)
    dst = tmp_path / f"norm{suffix}"
    result = normalize(src, dst, make_record(loaded.weights, loaded.bound))
    back = load(dst)
    for key in (k for k in back if k.startswith("classifier.")):  # passed through, NaN and all
        assert torch.equal(back[key].isnan(), torch.ones_like(back[key], dtype=torch.bool)), key
    normed = fresh("torchvision", "vgg16")
    normed.load_state_dict(back, strict=True)
    x = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(1)) * 255 - 120
    a, b = (torch_vgg.relu_outputs("torchvision", m, x) for m in (module, normed))
    for name, before, after in zip(loaded.bound.conv_names, a, b, strict=True):
        s = torch.from_numpy(result.scales.values[name].astype(np.float32))[None, :, None, None]
        # float32, as test_rescaled_file_computes_the_same_function derives it
        assert float((after * s - before).abs().max()) <= 1e-5 * float(before.abs().max()), name


@pytest.mark.parametrize(
    ("source", "target", "module"),
    [("torchvision_bn", "timm_bn", lambda: torch_vgg.TimmVGG("vgg16", batch_norm=True)),
     ("timm", "torchvision", lambda: torch_vgg.TorchvisionVGG("vgg16")),
     ("features_bn", "torchvision_bn", lambda: torch_vgg.TorchvisionVGG("vgg16", batch_norm=True).features),
     ("torchvision", "features", lambda: torch_vgg.make_features("vgg16"))],
)  # fmt: skip
def test_export_between_layouts_is_exact(
    tmp_path: Path, source: str, target: str, module: Callable[[], Any]
) -> None:
    from vggnorm.commands.export import export

    original = torch_vgg.build(source, "vgg16")
    src = save(original.state_dict(), tmp_path / "src.pth")
    export(src, tmp_path / "out.safetensors", target)
    out = module().eval()
    state = load(tmp_path / "out.safetensors")
    if target == "torchvision_bn" and isinstance(out, torch.nn.Sequential):
        state = {k.removeprefix("features."): v for k, v in state.items()}
    out.load_state_dict(state, strict=True)
    x = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(2)) * 4 - 2
    a, b = (torch_vgg.relu_outputs(source, original, x), torch_vgg.relu_outputs(target, out, x))
    for before, after in zip(a, b, strict=True):  # the same weights: bit for bit
        assert torch.equal(before, after)
    if source == "timm":  # a head: the same logits (a reshape of the same numbers)
        # timm's 7x7 conv and torchvision's Linear sum the same 25088 products in another order:
        # ~sqrt(25088) * 2^-24 = 1e-5 of the sum of |terms| apart, a few times the logits here.
        with torch.no_grad():
            assert torch.allclose(original(x), out(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("source", "target", "words"),
    [("torchvision", "torchvision_bn", "has no BatchNorm; the torchvision_bn layout has one"),
     ("timm_bn", "gatys", "the gatys layout holds a VGG19"),
     ("torchvision_bn", "features", "has a BatchNorm after every conv; the features layout has none")],
)  # fmt: skip
def test_export_refuses_what_a_layout_cannot_hold(
    tmp_path: Path, source: str, target: str, words: str
) -> None:
    from vggnorm.commands.export import export
    from vggnorm.core.errors import ArchitectureError

    src = save(torch_vgg.build(source, "vgg16").state_dict(), tmp_path / "src.pth")
    with pytest.raises(ArchitectureError) as info:
        export(src, tmp_path / "out.pth", target)
    assert words in str(info.value) and not (tmp_path / "out.pth").exists()


def test_a_hub_pytorch_model_bin_is_a_torch_state_dict(tmp_path: Path) -> None:
    """timm's weights on the Hugging Face hub: ``model.safetensors`` and ``pytorch_model.bin``."""
    state = torch_vgg.build("timm", "vgg16").state_dict()
    src = tmp_path / "pytorch_model.bin"
    torch.save(state, src)
    tw = read_torch(src)
    assert (tw.container, tw.layout, tw.arch) == ("pth", "timm", "vgg16")
    out = write_torch(tmp_path / "copy.bin", tw.layout, tw.arrays, source=tw)
    assert all(torch.equal(load(out)[k], v) for k, v in state.items())
