"""``vggnorm scales``: per-filter factors from a stats file, keyed by a layout's layer names, in
each container; and the relation they satisfy, checked against torch modules. No Keras."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures.records import DEAD_FILTERS, dead_layers, make_record
from vggnorm.cli import EXIT_ERROR, EXIT_OK, main
from vggnorm.commands.scales import RELATION, write_scales
from vggnorm.core.archs import VGG16
from vggnorm.core.errors import ArchitectureError, OutputError
from vggnorm.core.torch_layouts import key_specs, native_layer_names, passthrough_keys
from vggnorm.formats.registry import load
from vggnorm.formats.statsfile import write_stats

TV_BN_VGG16 = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]  # the published indices


def bn_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A torchvision vgg16_bn features state dict, random float32 (num_batches_tracked int64)."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    c_in = 3
    specs = key_specs("torchvision_bn", "vgg16")
    for conv in VGG16.convs:
        for ours, spec in specs.items():
            if ours.startswith(f"{conv.name}/"):
                state[spec.key] = rng.standard_normal((conv.filters, c_in, 3, 3), np.float32)
            elif ours.startswith(f"{conv.name}_bn/"):
                state[spec.key] = rng.uniform(0.5, 1.5, conv.filters).astype(np.float32)
        state[specs[f"{conv.name}/bias"].key] = rng.standard_normal(conv.filters, np.float32)
        c_in = conv.filters
    state.update({k: np.array(5, np.int64) for k in passthrough_keys("torchvision_bn", "vgg16")})
    return state


@pytest.fixture()
def stats(tmp_path: Path) -> tuple[Path, Any]:
    from safetensors.numpy import save_file

    src = tmp_path / "vgg16_bn.safetensors"
    save_file(bn_state(), str(src))
    loaded = load(src)
    record = make_record(loaded.weights, loaded.bound)
    write_stats(tmp_path / "stats.h5", record)
    return tmp_path / "stats.h5", record


def _read(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix
    if suffix == ".json":
        raw = json.loads(path.read_text())
        return {k: np.asarray(v) for k, v in raw.items() if k != "__metadata__"}
    if suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files if k != "__metadata__"}
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    torch = pytest.importorskip("torch")
    raw = torch.load(path, weights_only=True)
    return {k: v.numpy() for k, v in raw.items() if k != "__metadata__"}


@pytest.mark.parametrize("suffix", [".json", ".npz", ".safetensors", ".pt"])
def test_factors_are_one_over_the_means_keyed_by_the_files_names(
    stats: tuple[Path, Any], tmp_path: Path, suffix: str
) -> None:
    if suffix == ".pt":
        pytest.importorskip("torch")
    path, record = stats
    out = tmp_path / f"scales{suffix}"
    result = write_scales(path, out)
    got = _read(out)
    names = [f"features.{i}" for i in TV_BN_VGG16]  # the file's own module names
    assert sorted(got) == sorted(names)  # safetensors lists its tensors sorted
    dead = set(dead_layers(load(record.meta.weights).bound))
    for name, layer in zip(names, record.layers, strict=True):
        factors, mean = got[name], layer.mean
        expected = np.where(mean <= 1e-8, 1.0, 1.0 / np.where(mean <= 1e-8, 1.0, mean))
        # float64 in JSON and .npz (exact); float32 in the PyTorch containers (one rounding)
        rtol = 0 if suffix in (".json", ".npz") else 2**-24
        assert np.allclose(factors, expected, rtol=rtol, atol=0), name
        if layer.name in dead:
            assert factors[DEAD_FILTERS].tolist() == [1.0, 1.0]
    assert set(result.dead) == {f"features.{TV_BN_VGG16[i]}" for i in (0, 6, 12)}
    assert RELATION in "\n".join(result.summary())


@pytest.mark.parametrize(
    ("layout", "first", "last"),
    [("keras", "block1_conv1", "block5_conv3"), ("torchvision", "features.0", "features.28"),
     ("timm_bn", "features.0", "features.40"), ("features", "0", "28"),
     ("gatys", "conv1_1", "conv5_3"), ("adain", "2", "42")],
)  # fmt: skip
def test_layouts_name_the_layers(
    stats: tuple[Path, Any], tmp_path: Path, layout: str, first: str, last: str
) -> None:
    out = tmp_path / "s.json"
    write_scales(stats[0], out, layout=layout)
    names = [k for k in json.loads(out.read_text()) if k != "__metadata__"]
    assert (names[0], names[-1], len(names)) == (first, last, 13)


def test_the_stats_names_when_the_weight_file_is_gone(stats: tuple[Path, Any], tmp_path: Path) -> None:
    path, record = stats
    Path(record.meta.weights).unlink()
    result = write_scales(path, tmp_path / "s.json")
    assert next(iter(result.factors)) == "block1_conv1"
    assert "cannot be read" in result.notes[0]


def test_the_cli_writes_json_and_says_what_it_did(
    stats: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.npz"
    assert main(["scales", "--stats", str(stats[0]), "--out", str(out), "--json"]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed["relation"] == RELATION and printed["layers"]["features.0"] == 64
    with np.load(out) as z:
        meta = json.loads(str(z["__metadata__"]))
    assert meta["layout"] == "file" and meta["relation"] == RELATION
    assert main(["scales", "--stats", str(stats[0]), "--out", str(out)]) == EXIT_ERROR
    assert "already exists; pass --force" in capsys.readouterr().err


def test_refusals(stats: tuple[Path, Any], tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"a scales file ends in \.json"):
        write_scales(stats[0], tmp_path / "s.txt")
    record = stats[1]
    other = record.with_meta(model="vgg-like")
    write_stats(tmp_path / "other.h5", other)
    with pytest.raises(ArchitectureError, match="not a stock VGG16/VGG19"):
        write_scales(tmp_path / "other.h5", tmp_path / "s.json", layout="torchvision")


def test_factors_turn_the_original_features_into_the_normalized_ones(
    stats: tuple[Path, Any], tmp_path: Path
) -> None:
    """The relation, in torch: the stock vgg16_bn features, original and normalized by apply,
    on the same input: original ReLU output x factor = normalized ReLU output."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from fixtures.torch_vgg import make_features, sequential_relu_outputs
    from vggnorm.commands.apply import normalize

    path, record = stats
    src = Path(record.meta.weights)
    normalize(src, tmp_path / "norm.safetensors", record)
    write_scales(path, tmp_path / "f.pt")
    factors = torch.load(tmp_path / "f.pt", weights_only=True)
    nets = []
    for file in (src, tmp_path / "norm.safetensors"):
        net = make_features("vgg16", batch_norm=True).eval()
        state = {k.removeprefix("features."): v for k, v in load_file(str(file)).items()}
        net.load_state_dict(state, strict=True)
        nets.append(net)
    x = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 4 - 2
    with torch.no_grad():
        before, after = (sequential_relu_outputs(n, x) for n in nets)
    names = native_layer_names("torchvision_bn", "vgg16").values()
    # Float32 as in tests/test_torch_io.py: the weights' and the factor's roundings and the
    # layers' dot products keep every layer within 1e-5 of its largest activation.
    for name, a, b in zip(names, before, after, strict=True):
        scaled = a * factors[name].view(1, -1, 1, 1)
        assert float((scaled - b).abs().max()) <= 1e-5 * float(b.abs().max()), name
