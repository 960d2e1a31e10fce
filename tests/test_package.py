"""The package's shape, and the one API over every weight format.

The layering itself (core < formats < runtime < commands < cli, frameworks confined to one module
each, no cycles) is checked by ``lint-imports`` in CI from the contracts in pyproject.toml.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import vggnorm
from vggnorm.core.archs import VGG16
from vggnorm.core.torch_layouts import conv_key_map
from vggnorm.formats.registry import ADAPTERS, adapter_for, detect_format, load

PACKAGE = Path(vggnorm.__file__).parent
MAX_LINES = 60


def _functions() -> list[tuple[str, int]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                name = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"
                out.append((name, node.end_lineno - start + 1))  # type: ignore[operator]
    return out


def test_no_function_is_longer_than_sixty_lines() -> None:
    functions = _functions()
    assert len(functions) > 300  # the walk saw the package
    assert [f"{name} ({n} lines)" for name, n in functions if n > MAX_LINES] == []


def test_the_public_api_resolves() -> None:
    for name in vggnorm.__all__:
        assert getattr(vggnorm, name) is not None, name


def _stock_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A torchvision VGG16 features state dict (OIHW), random float32 values."""
    state: dict[str, np.ndarray] = {}
    c_in = 3
    keys = conv_key_map("torchvision", "vgg16")
    for conv in VGG16.convs:
        state[keys[f"{conv.name}/kernel"]] = rng.normal(size=(conv.filters, c_in, 3, 3)).astype(np.float32)
        state[keys[f"{conv.name}/bias"]] = rng.normal(size=conv.filters).astype(np.float32)
        c_in = conv.filters
    return state


def _expected(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = conv_key_map("torchvision", "vgg16")
    return {ours: state[theirs].transpose(2, 3, 1, 0) if state[theirs].ndim == 4 else state[theirs]
            for ours, theirs in keys.items()}  # fmt: skip


def test_read_weights_reads_a_torchvision_safetensors_file(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    state = _stock_state(np.random.default_rng(0))
    path = tmp_path / "vgg16.safetensors"
    save_file(state, str(path))
    assert detect_format(path) == "safetensors"  # not opened as HDF5
    ws = vggnorm.read_weights(path)
    assert (ws.file.format, ws.file.layout) == ("safetensors", "torchvision")
    expected = _expected(state)
    assert sorted(ws.arrays) == sorted(expected)
    for key, value in expected.items():
        assert np.array_equal(ws.arrays[key], value), key


def test_read_weights_reads_a_torchvision_pth_file(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    state = _stock_state(np.random.default_rng(1))
    path = tmp_path / "vgg16.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    ws = vggnorm.read_weights(path)
    assert (ws.file.format, ws.file.layout) == ("pth", "torchvision")
    for key, value in _expected(state).items():
        assert np.array_equal(ws.arrays[key], value), key


def test_write_weights_keeps_each_format(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    state = _stock_state(np.random.default_rng(2))
    src = tmp_path / "in.safetensors"
    save_file(state, str(src))
    ws = vggnorm.read_weights(src)
    bias = ws.arrays["block1_conv1/bias"] * np.float32(2)
    dropped = vggnorm.write_weights(ws, tmp_path / "out.safetensors", {"block1_conv1/bias": bias},
                                    {"tool": "test"})  # fmt: skip
    assert dropped == []
    out = vggnorm.read_weights(tmp_path / "out.safetensors")
    assert np.array_equal(out.arrays["block1_conv1/bias"], bias)
    assert out.file.provenance == {"tool": "test"}


def test_unknown_suffixes_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "weights.npy"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(vggnorm.WeightFileError, match=r"unknown weight file suffix.*\.safetensors"):
        vggnorm.read_weights(path)
    assert {adapter_for(tmp_path / n).__name__.rsplit(".", 1)[1] for n in
            ("a.h5", "a.weights.h5", "a.keras", "a.safetensors", "a.pth", "a.pt", "a.bin",
             "a.mat", "a.onnx")} == {
        a.__name__.rsplit(".", 1)[1] for a in ADAPTERS}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# export of a stock VGG16 saved as a whole model (its config says which layers it has)


@pytest.fixture(scope="module")
def whole_vgg16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    root = tmp_path_factory.mktemp("whole")
    model.save(root / "vgg16.keras")
    model.save(root / "vgg16.h5")
    return {"keras": root / "vgg16.keras", "h5": root / "vgg16.h5"}


@pytest.mark.keras
@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_export_accepts_a_whole_model_stock_vgg16(whole_vgg16: dict[str, Path], kind: str,
                                                  tmp_path: Path) -> None:  # fmt: skip
    from safetensors.numpy import load_file

    src = whole_vgg16[kind]
    loaded = load(src)
    assert loaded.weights.file.config is not None  # bound from its config, not its shapes
    assert loaded.bound.stock == "vgg16"
    result = vggnorm.export(src, tmp_path / "out.safetensors", "torchvision")
    assert result.layout == "torchvision" and result.input_convention == "caffe"
    state = load_file(str(tmp_path / "out.safetensors"))
    keys = conv_key_map("torchvision", "vgg16")
    assert sorted(state) == sorted(keys.values())
    for conv in VGG16.convs:
        kernel = loaded.arrays[f"{conv.name}/kernel"]
        assert np.array_equal(state[keys[f"{conv.name}/kernel"]], kernel.transpose(3, 2, 0, 1))
    prov = json.loads(_metadata(tmp_path / "out.safetensors")["vggnorm.provenance"])
    assert prov["source"]["format"] == ("keras-zip" if kind == "keras" else "legacy-h5-model")


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata())


def test_help_loads_no_framework(tmp_path: Path) -> None:
    import subprocess

    code = ("import sys, vggnorm.cli as c\ntry:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('keras', 'tensorflow', 'torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"



def test_a_record_remembers_its_file_for_the_provenance(tmp_path: Path) -> None:
    from fixtures.h5_layouts import STOCK_WIDTHS, vgg, write_downloaded
    from fixtures.records import make_record
    from vggnorm.core.topology import bind
    from vggnorm.formats.registry import inspect_weights
    from vggnorm.formats.statsfile import read_stats, write_stats

    src = write_downloaded(vgg("vgg16", STOCK_WIDTHS), tmp_path / "vgg16.h5")
    ws = vggnorm.read_weights(src)
    record = make_record(ws, bind(ws.file))
    assert record.path is None
    vggnorm.normalize(src, tmp_path / "a.h5", record)  # a record from nowhere: no file to name
    prov = inspect_weights(tmp_path / "a.h5").provenance
    assert prov is not None and prov["stats"]["path"] is None
    write_stats(tmp_path / "s.h5", record)
    read = read_stats(tmp_path / "s.h5")
    assert read.path == str((tmp_path / "s.h5").resolve()) and read.meta == record.meta
    vggnorm.normalize(src, tmp_path / "b.h5", read)  # verify finds the stats through it
    prov = inspect_weights(tmp_path / "b.h5").provenance
    assert prov is not None and prov["stats"]["path"] == read.path
    assert prov["stats"]["sha256"] == vggnorm.formats.sha256_file(tmp_path / "s.h5")
