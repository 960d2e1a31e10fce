"""vggnorm.formats.keras_h5 on every Keras weight layout, and vggnorm.commands.apply end to end.

Every layout is written by the helpers in ``keras_files.py`` from tiny (32x32) VGG models built
once per module. The writer must change only the datasets it is given, copy everything else
byte for byte, load back the way the input loads, and never leave a partial file behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from vggnorm.commands.apply import normalize
from vggnorm.core import topology
from vggnorm.core.errors import StatsError, VggnormError, WeightFileError
from vggnorm.core.inputs import Decode
from vggnorm.core.stats import LayerStats
from vggnorm.core.statsrecord import StatsMeta, StatsRecord
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

SIZE = 32
SHAPE = (SIZE, SIZE, 3)


@dataclass(frozen=True)
class Case:
    arch: str  # vgg16 | vgg19
    top: bool
    writer: str  # name of the keras_files writer
    filename: str
    format: str
    optimizer: bool = False
    chunked: bool = False

    @property
    def has_config(self) -> bool:
        return self.format in ("legacy-h5-model", "keras-zip")

    @property
    def suffix(self) -> str:
        for s in (".weights.h5", ".keras", ".h5"):
            if self.filename.endswith(s):
                return s
        raise AssertionError(self.filename)


CASES = {
    "downloaded": Case("vgg16", False, "save_downloaded_layout", "dl.h5", "legacy-h5"),
    "downloaded-top": Case("vgg16", True, "save_downloaded_layout", "dl_top.h5", "legacy-h5"),
    "downloaded-vgg19": Case("vgg19", False, "save_downloaded_layout", "dl19.h5", "legacy-h5"),
    "keras2": Case("vgg16", False, "save_keras2_layout", "k2.h5", "legacy-h5"),
    "keras3-legacy": Case("vgg16", False, "save_keras3_legacy_weights", "k3.h5", "legacy-h5"),
    "full-model": Case("vgg16", False, "save_full_model_h5", "full.h5", "legacy-h5-model"),
    "full-model-optimizer": Case(
        "vgg16", False, "save_full_model_h5", "full_opt.h5", "legacy-h5-model", optimizer=True
    ),
    "weights-h5": Case("vgg16", False, "save_weights_h5", "m.weights.h5", "weights-h5"),
    "weights-h5-top": Case("vgg16", True, "save_weights_h5", "m_top.weights.h5", "weights-h5"),
    "keras-zip": Case("vgg16", False, "save_keras_zip", "m.keras", "keras-zip"),
    "chunked": Case(
        "vgg16", False, "save_downloaded_layout", "chunked.h5", "legacy-h5", chunked=True
    ),
}


def case_params(names=None):
    return [pytest.param(name, id=name) for name in names or CASES]


# ---------------------------------------------------------------------------------------------
# Module fixtures: tiny models and one file per layout, built once


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


@pytest.fixture(scope="module")
def models(keras):
    import keras_files as kf

    built = {}

    def get(arch: str, top: bool):
        key = (arch, top)
        if key not in built:
            seed = {("vgg16", False): 0, ("vgg16", True): 1, ("vgg19", False): 2}[key]
            built[key] = kf.tiny_vgg(include_top=top, arch=arch, size=SIZE, seed=seed)
        return built[key]

    return get


@pytest.fixture(scope="module")
def layout_files(models, tmp_path_factory):
    import keras_files as kf

    folder = tmp_path_factory.mktemp("layouts")
    written: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in written:
            case = CASES[name]
            model = models(case.arch, case.top)
            path = folder / case.filename
            if case.writer == "save_full_model_h5":
                kf.save_full_model_h5(model, path, with_optimizer=case.optimizer)
            else:
                getattr(kf, case.writer)(model, path)
            if case.chunked:
                kf.chunked_layer_names(path, num_chunks=3)
            os.chmod(path, 0o444)  # the tests must never modify a source file
            written[name] = path
        return written[name]

    return get


@pytest.fixture
def src_of(layout_files, tmp_path):
    """A private, writable copy of a layout file in its own folder."""

    def get(name: str) -> Path:
        folder = tmp_path / "src"
        folder.mkdir(exist_ok=True)
        dst = folder / CASES[name].filename
        shutil.copyfile(layout_files(name), dst)
        return dst

    return get


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


# ---------------------------------------------------------------------------------------------
# Helpers


def weight_layers(model):
    return [layer for layer in model.layers if layer.weights]


def conv_names(model):
    return [layer.name for layer in model.layers if type(layer).__name__ == "Conv2D"]


def expected_arrays(model) -> dict[str, np.ndarray]:
    out = {}
    for layer in weight_layers(model):
        out[f"{layer.name}/kernel"] = np.asarray(layer.kernel.numpy())
        out[f"{layer.name}/bias"] = np.asarray(layer.bias.numpy())
    return out


def load_like_user(keras, path: Path, case: Case):
    """Load ``path`` the way a user loads a file of this layout."""
    if case.has_config:
        return keras.models.load_model(str(path))
    builder = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}[case.arch]
    kwargs = {"weights": str(path), "include_top": case.top, "input_shape": SHAPE}
    if case.top:
        kwargs["classes"] = 10
    return builder(**kwargs)


def model_arrays(model) -> dict[str, np.ndarray]:
    return expected_arrays(model)


def h5_objects(f) -> dict[str, object]:
    objects = {"/": f}

    def visit(name, obj):
        objects["/" + name] = obj  # returns None: a non-None return would stop the walk

    f.visititems(visit)
    return objects


def attr_items(obj) -> dict[str, tuple]:
    """Every attribute with its HDF5 type, shape and value."""
    out = {}
    for name in obj.attrs:
        aid = obj.attrs.get_id(name)
        out[name] = (aid.get_type(), aid.shape, obj.attrs[name])
    return out


def assert_same_attrs(a, b, where: str) -> None:
    attrs_a, attrs_b = attr_items(a), attr_items(b)
    assert sorted(attrs_a) == sorted(attrs_b), where
    for name, (type_a, shape_a, value_a) in attrs_a.items():
        type_b, shape_b, value_b = attrs_b[name]
        assert type_a == type_b, f"{where} attr {name}: HDF5 type changed"
        assert shape_a == shape_b, f"{where} attr {name}: shape changed"
        va, vb = np.asarray(value_a), np.asarray(value_b)
        assert va.dtype == vb.dtype, f"{where} attr {name}"
        assert va.shape == vb.shape, f"{where} attr {name}"
        assert va.tolist() == vb.tolist(), f"{where} attr {name}: value changed"


def is_optimizer_path(path: str) -> bool:
    return path.split("/")[1] in ("optimizer_weights", "optimizer")


def compare_h5(src: Path, out: Path, changed: dict[str, np.ndarray]) -> None:
    """``out`` equals ``src`` except for ``changed`` datasets, optimizer groups and provenance."""
    with h5py.File(src, "r") as fa, h5py.File(out, "r") as fb:
        objs_a, objs_b = h5_objects(fa), h5_objects(fb)
        expected = {p for p in objs_a if p == "/" or not is_optimizer_path(p)}
        got = {p for p in objs_b if not p.startswith(f"/{PROVENANCE_GROUP}")}
        assert got == expected
        assert not any(is_optimizer_path(p) for p in objs_b if p != "/")
        for path in sorted(expected):
            a, b = objs_a[path], objs_b[path]
            assert type(a) is type(b), path
            assert_same_attrs(a, b, path)
            if isinstance(a, h5py.Dataset):
                assert a.id.get_type() == b.id.get_type(), path
                assert a.shape == b.shape, path
                if path in changed:
                    np.testing.assert_array_equal(b[()], changed[path], err_msg=path)
                    assert b.dtype == changed[path].dtype
                else:
                    assert np.asarray(a[()]).tobytes() == np.asarray(b[()]).tobytes(), path


def inner_weights(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as z:
        z.extract("model.weights.h5", folder)
    return folder / "model.weights.h5"


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def changes_for(ws) -> dict[str, np.ndarray]:
    """New values for a few kernels and biases (plus the first dense kernel, if any)."""
    rng = np.random.default_rng(42)
    convs = [e.name for e in ws.file.layers if e.shapes and len(e.shapes[0]) == 4]
    keys = [f"{convs[0]}/kernel", f"{convs[0]}/bias", f"{convs[5]}/kernel", f"{convs[-1]}/bias"]
    denses = [e.name for e in ws.file.layers if e.shapes and len(e.shapes[0]) == 2]
    if denses:
        keys.append(f"{denses[0]}/kernel")
    out = {}
    for key in keys:
        old = ws.arrays[key]
        out[key] = (old * rng.uniform(0.5, 2.0, old.shape[-1])).astype(old.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Reading every layout


@pytest.mark.keras
@pytest.mark.parametrize("name", case_params())
def test_read_every_layout(name, layout_files, models):
    case = CASES[name]
    path = layout_files(name)
    model = models(case.arch, case.top)

    assert detect_format(path) == case.format
    ws = read_weights(path)
    assert ws.file.format == case.format
    assert ws.file.suffix == case.suffix
    assert ws.file.provenance is None
    assert (ws.file.config is not None) == case.has_config

    expected = expected_arrays(model)
    # Keys use the real layer names in every layout (.weights.h5/.keras: the vars' name attr).
    assert sorted(ws.arrays) == sorted(expected)
    for key, value in expected.items():
        assert ws.arrays[key].dtype == value.dtype, key
        np.testing.assert_array_equal(ws.arrays[key], value, err_msg=key)
    # Legacy files also list weightless layers (input, pooling) with no datasets.
    assert [e.name for e in ws.file.layers if e.datasets] == [
        layer.name for layer in weight_layers(model)
    ]

    assert topology.detect_stock(ws.file) == case.arch
    bound = topology.bind(ws.file)
    assert bound.arch.name == case.arch
    assert list(bound.conv_names) == conv_names(model)
    assert (bound.arch.first_dense is not None) == case.top


@pytest.mark.keras
def test_keys_of_weights_h5_come_from_vars_name(layout_files):
    path = layout_files("weights-h5")
    with h5py.File(path, "r") as f:
        assert f["layers/conv2d_7/vars"].attrs["name"] == "block4_conv1"
    wf = inspect_weights(path)
    entry = next(e for e in wf.layers if e.name == "block4_conv1")
    assert entry.datasets == ("layers/conv2d_7/vars/0", "layers/conv2d_7/vars/1")
    assert entry.keys() == ("block4_conv1/kernel", "block4_conv1/bias")


# ---------------------------------------------------------------------------------------------
# Round trip through write_weights


@pytest.mark.keras
@pytest.mark.parametrize("name", case_params())
def test_write_round_trip(name, layout_files, keras, tmp_path):
    case = CASES[name]
    src = layout_files(name)
    ws = read_weights(src)
    changed = changes_for(ws)
    provenance = {"tool": "vggnorm", "n": 3, "nested": {"list": [1, 2.5, "x"]}, "none": None}
    extra = {"scales/00_a": np.arange(4, dtype=np.float64), "note": np.array([1, 2], np.int32)}
    out = tmp_path / f"out{case.suffix}"

    dropped = write_weights(ws.file, out, changed, provenance, extra)

    assert dropped == (["optimizer_weights"] if case.optimizer else [])
    assert sorted(os.listdir(tmp_path)) == [out.name]  # no temp file left beside it
    assert detect_format(out) == case.format
    wf = inspect_weights(out)
    assert wf.suffix == case.suffix
    assert wf.provenance == provenance

    # Dataset paths of the changed keys, in the HDF5 file holding the weights.
    where = ws.file.entry_of_key()
    by_path = {"/" + where[k][0].datasets[where[k][1]]: v for k, v in changed.items()}
    if case.format == "keras-zip":
        compare_h5(inner_weights(src, tmp_path / "a"), inner_weights(out, tmp_path / "b"), by_path)
        with zipfile.ZipFile(src) as za, zipfile.ZipFile(out) as zb:
            assert za.namelist() == zb.namelist()
            for member in za.namelist():
                if member != "model.weights.h5":
                    assert za.read(member) == zb.read(member), member
        h5_out = tmp_path / "b" / "model.weights.h5"
    else:
        compare_h5(src, out, by_path)
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

    # Loaded by Keras the way the input would be.
    loaded = model_arrays(load_like_user(keras, out, case))
    assert sorted(loaded) == sorted(ws.arrays)
    for key, old in ws.arrays.items():
        np.testing.assert_array_equal(loaded[key], changed.get(key, old), err_msg=key)


@pytest.mark.keras
def test_keras_zip_of_a_trained_model_drops_optimizer_state(layout_files, keras, tmp_path):
    model = keras.models.load_model(str(layout_files("keras-zip")))
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mean_squared_error")
    model.optimizer.build(model.trainable_variables)  # the state a fit() leaves behind
    src = tmp_path / "trained.keras"
    model.save(str(src))
    ws = read_weights(src)
    changed = changes_for(ws)
    out = tmp_path / "out.keras"

    assert write_weights(ws.file, out, changed, {"tool": "vggnorm"}) == ["optimizer"]

    where = ws.file.entry_of_key()
    by_path = {"/" + where[k][0].datasets[where[k][1]]: v for k, v in changed.items()}
    compare_h5(inner_weights(src, tmp_path / "a"), inner_weights(out, tmp_path / "b"), by_path)
    # Keras builds a fresh optimizer and says so; the model weights are the new ones.
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
        loaded = model_arrays(keras.models.load_model(str(out)))
    for key, old in ws.arrays.items():
        np.testing.assert_array_equal(loaded[key], changed.get(key, old), err_msg=key)


@pytest.mark.keras
def test_write_keeps_float64_datasets(src_of, out_dir):
    src = src_of("downloaded")
    with h5py.File(src, "r+") as f:
        for group in f.values():
            for name in list(group):
                data = group[name][()].astype(np.float64)
                del group[name]
                group.create_dataset(name, data=data)
    ws = read_weights(src)
    assert ws.arrays["block1_conv1/kernel"].dtype == np.float64
    new = {"block1_conv1/bias": ws.arrays["block1_conv1/bias"] / 3.0}
    out = out_dir / "out.h5"
    write_weights(ws.file, out, new, {"tool": "vggnorm"})
    back = read_weights(out)
    assert back.arrays["block1_conv1/bias"].dtype == np.float64
    np.testing.assert_array_equal(back.arrays["block1_conv1/bias"], new["block1_conv1/bias"])
    with pytest.raises(WeightFileError, match="float32"):  # dtype must match the file's
        write_weights(
            ws.file, out_dir / "o2.h5", {"block1_conv1/bias": np.ones(64, np.float32)}, {}
        )
    assert sorted(os.listdir(out_dir)) == ["out.h5"]


# ---------------------------------------------------------------------------------------------
# normalize end to end


def make_record(ws, bound, *, seed=0) -> StatsRecord:
    """A complete stats record with chosen positive means and a few zero-mean (dead) filters."""
    rng = np.random.default_rng(seed)
    count = 1000
    layers = []
    for i, (name, conv) in enumerate(zip(bound.conv_names, bound.arch.convs)):
        means = rng.uniform(0.25, 4.0, conv.filters)
        if i in (0, 6, len(bound.conv_names) - 1):
            means[[1, 7]] = 0.0
        layers.append(LayerStats(name, means * count, means * means * count * 1.5, count))
    meta = StatsMeta(
        model=bound.arch.name,
        fingerprint=topology.fingerprint(ws.arrays, bound.conv_names),
        weights=str(ws.file.path),
        decode=Decode(size=SIZE, resize="crop", interpolation="bilinear", draft=True),



        preprocess="caffe",
        precision="fp32",
        dataset_kind="folder",
        dataset_path="/data/images",
        dataset_root="/data/images",
        annotations=None,
        dataset_items=10,
        selection_sha256="0" * 64,
        selection_size=10,
        position=10,
        complete=True,
        tool_version="test",
    )
    return StatsRecord(meta, tuple(layers), tuple(f"img{i}.jpg" for i in range(10)))


def record_for(path: Path, **meta_changes) -> StatsRecord:
    ws = read_weights(path)
    record = make_record(ws, topology.bind(ws.file))
    return record.with_meta(**meta_changes) if meta_changes else record


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


@pytest.mark.keras
@pytest.mark.parametrize(
    "name", case_params(["downloaded", "downloaded-top", "weights-h5", "keras-zip"])
)
def test_normalize_end_to_end(name, layout_files, keras, tmp_path):
    case = CASES[name]
    src = layout_files(name)
    ws = read_weights(src)
    record = make_record(ws, topology.bind(ws.file))
    out = tmp_path / f"norm{case.suffix}"
    src_sha = sha256_file(src)

    result = normalize(src, out, record)

    assert sha256_file(src) == src_sha  # the input is never modified

    assert result.out == out and out.is_file()
    assert sorted(os.listdir(tmp_path)) == [out.name]
    assert result.dropped == ()
    assert result.scales.n_dead == 6
    assert result.bound.arch.name == case.arch
    norm = read_weights(out)
    assert norm.file.format == case.format
    for key, value in norm.arrays.items():
        assert np.all(np.isfinite(value)), key
        assert value.dtype == ws.arrays[key].dtype
    prov = inspect_weights(out).provenance
    assert prov is not None and prov["tool"] == "vggnorm"
    assert prov["stats"]["fingerprint"] == record.meta.fingerprint
    assert prov["dead_filters"] == {
        n: [1, 7] for i, n in enumerate(result.bound.conv_names) if i in (0, 6, 12)
    }
    assert prov["head_dense"] == ("fc1" if case.top else None)

    names = list(result.bound.conv_names)
    scales = result.scales.values
    stored = read_scales(out)
    assert list(stored) == names
    for n in names:
        np.testing.assert_array_equal(stored[n], scales[n])
        means = record.layers[names.index(n)].mean
        np.testing.assert_array_equal(scales[n], np.where(means == 0, 1.0, means))

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
    if case.top:  # fc1 was compensated by the last conv's scales
        fc1 = "fc1/kernel"
        # vggnorm stores fl32(kernel * s) computed in float64: one float32 rounding (2**-24
        # relative) of a float64 product (2**-53); the expected product here is float64.
        np.testing.assert_allclose(
            norm.arrays[fc1],
            ws.arrays[fc1] * scales[names[-1]][:, None],
            rtol=2.0**-24 + 2.0**-52,
            atol=0,
        )


# ---------------------------------------------------------------------------------------------
# Errors: a VggnormError naming the file, and nothing written


def assert_nothing_written(folder: Path, before: list[str]) -> None:
    assert listing(folder) == before  # no output, no .tmp file, no temp directory


def _not_hdf5(path: Path) -> None:
    path.write_bytes(b"this is not an HDF5 file\n" * 10)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _soft_link(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["block2_conv1/block2_conv1_W_1:0"]
        f["block2_conv1/block2_conv1_W_1:0"] = h5py.SoftLink("/block2_conv2/block2_conv2_W_1:0")


def _external_link(path: Path) -> None:
    other = path.with_name("other.h5")
    with h5py.File(other, "w") as g:
        g["w"] = np.zeros((3, 3, 64, 128), np.float32)
    with h5py.File(path, "r+") as f:
        del f["block2_conv1/block2_conv1_W_1:0"]
        f["block2_conv1/block2_conv1_W_1:0"] = h5py.ExternalLink(str(other), "/w")


def _nan_kernel(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        ds = f["block3_conv2/block3_conv2_W_1:0"]
        data = ds[()]
        data[1, 1, 5, 7] = np.nan
        ds[...] = data


@pytest.mark.keras
@pytest.mark.parametrize(
    "corrupt, error, words",
    [
        pytest.param(_not_hdf5, WeightFileError, "not a readable HDF5", id="not-hdf5"),
        pytest.param(_truncated, WeightFileError, "not a readable HDF5", id="truncated"),
        pytest.param(_soft_link, WeightFileError, "SoftLink", id="soft-link"),
        pytest.param(_external_link, WeightFileError, "ExternalLink", id="external-link"),
        pytest.param(_nan_kernel, WeightFileError, "NaN", id="nan-kernel"),
    ],
)
def test_bad_input_file(corrupt, error, words, src_of, out_dir):
    src = src_of("downloaded")
    record = record_for(src)
    corrupt(src)
    with pytest.raises(error, match=words) as info:
        read_weights(src)
    assert str(src) in str(info.value)
    with pytest.raises(error, match=words) as info:
        normalize(src, out_dir / "out.h5", record)
    assert str(src) in str(info.value)
    assert_nothing_written(out_dir, [])


def test_not_hdf5_without_keras(tmp_path):
    src = tmp_path / "x.h5"
    _not_hdf5(src)
    for call in (detect_format, inspect_weights, read_weights):
        with pytest.raises(WeightFileError, match="not a readable HDF5") as info:
            call(src)
        assert str(src) in str(info.value)
    with pytest.raises(WeightFileError, match="no such file") as info:
        read_weights(tmp_path / "missing.h5")
    assert "missing.h5" in str(info.value)
    fake_zip = tmp_path / "m.keras"
    fake_zip.write_bytes(b"PK? no")
    with pytest.raises(WeightFileError, match="zip") as info:
        read_weights(fake_zip)
    assert str(fake_zip) in str(info.value)


@pytest.mark.keras
def test_output_exists_without_force(layout_files, out_dir):
    src = layout_files("downloaded")
    record = record_for(src)
    dst = out_dir / "out.h5"
    dst.write_bytes(b"precious")
    with pytest.raises(WeightFileError, match="already exists") as info:
        normalize(src, dst, record)
    assert str(dst) in str(info.value)
    assert dst.read_bytes() == b"precious"
    assert_nothing_written(out_dir, ["out.h5"])
    normalize(src, dst, record, force=True)  # with force it is replaced
    assert inspect_weights(dst).provenance is not None
    assert_nothing_written(out_dir, ["out.h5"])


@pytest.mark.keras
@pytest.mark.parametrize("force", [False, True])
def test_output_is_input(src_of, force):
    src = src_of("downloaded")
    record = record_for(src)
    before, listed = src.read_bytes(), listing(src.parent)
    for dst in (src, src.parent / "." / src.name):
        with pytest.raises(WeightFileError, match="is the input") as info:
            normalize(src, dst, record, force=force)
        assert src.name in str(info.value)
    assert src.read_bytes() == before
    assert_nothing_written(src.parent, listed)


@pytest.mark.keras
@pytest.mark.parametrize(
    "name, out_name",
    [
        pytest.param("downloaded", "out.weights.h5", id="h5-to-weights.h5"),
        pytest.param("downloaded", "out.keras", id="h5-to-keras"),
        pytest.param("weights-h5", "out.h5", id="weights.h5-to-h5"),
        pytest.param("keras-zip", "out.weights.h5", id="keras-to-weights.h5"),
    ],
)
def test_mismatched_suffix(name, out_name, layout_files, out_dir):
    src = layout_files(name)
    ws = read_weights(src)
    with pytest.raises(WeightFileError, match="must end in") as info:
        write_weights(ws.file, out_dir / out_name, {}, {"tool": "vggnorm"})
    assert out_name in str(info.value) and src.name in str(info.value)
    assert_nothing_written(out_dir, [])


@pytest.mark.keras
def test_h5_and_hdf5_suffixes_are_interchangeable(layout_files, out_dir):
    src = layout_files("downloaded")
    ws = read_weights(src)
    write_weights(ws.file, out_dir / "out.hdf5", {}, {"tool": "vggnorm"})
    assert detect_format(out_dir / "out.hdf5") == "legacy-h5"


@pytest.mark.keras
def test_refuses_already_normalized(layout_files, out_dir, tmp_path):
    src = layout_files("downloaded")
    record = record_for(src)
    once = tmp_path / "once.h5"
    normalize(src, once, record)
    with pytest.raises(WeightFileError, match="already normalized") as info:
        normalize(once, out_dir / "twice.h5", record)
    assert str(once) in str(info.value)
    assert_nothing_written(out_dir, [])


@pytest.mark.keras
def test_refuses_stats_of_another_model(layout_files, out_dir):
    src = layout_files("downloaded")
    record = record_for(src, fingerprint="f" * 64, weights="/elsewhere/other.h5")
    with pytest.raises(StatsError, match="fingerprint") as info:
        normalize(src, out_dir / "out.h5", record)
    assert str(src) in str(info.value)
    assert_nothing_written(out_dir, [])


@pytest.mark.keras
def test_refuses_stats_of_vgg19_on_vgg16(layout_files, out_dir):
    src = layout_files("downloaded")
    other = record_for(layout_files("downloaded-vgg19"))
    with pytest.raises(StatsError) as info:
        normalize(src, out_dir / "out.h5", other)
    assert str(src) in str(info.value)
    assert_nothing_written(out_dir, [])


@pytest.mark.keras
def test_refuses_incomplete_stats(layout_files, out_dir, tmp_path):
    src = layout_files("downloaded")
    stats = tmp_path / "stats.h5"
    write_stats(stats, record_for(src, complete=False, position=4))
    with pytest.raises(StatsError, match="unfinished"):
        normalize(src, out_dir / "out.h5", stats)
    with pytest.raises(StatsError, match="unfinished"):
        normalize(src, out_dir / "out.h5", record_for(src, complete=False))
    assert_nothing_written(out_dir, [])


@pytest.mark.keras
def test_incomplete_stats_message_names_the_stats_file(layout_files, out_dir, tmp_path):
    src = layout_files("downloaded")
    stats = tmp_path / "stats.h5"
    write_stats(stats, record_for(src, complete=False, position=4))
    with pytest.raises(StatsError) as info:
        normalize(src, out_dir / "out.h5", stats)
    assert str(stats) in str(info.value)


def _fail_dataset_write(monkeypatch):
    def boom(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", boom)


def _fail_fsync(monkeypatch):
    def boom(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)


def _fail_zip_write(monkeypatch):
    real = zipfile.ZipFile.write

    def boom(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "write", boom)


@pytest.mark.keras
@pytest.mark.parametrize("force", [False, True], ids=["new-target", "existing-target"])
@pytest.mark.parametrize(
    "name, fail",
    [
        pytest.param("downloaded", _fail_dataset_write, id="h5-dataset-write"),
        pytest.param("downloaded", _fail_fsync, id="h5-fsync"),
        pytest.param("full-model-optimizer", _fail_dataset_write, id="full-model-dataset-write"),
        pytest.param("weights-h5", _fail_dataset_write, id="weights.h5-dataset-write"),
        pytest.param("keras-zip", _fail_dataset_write, id="keras-dataset-write"),
        pytest.param("keras-zip", _fail_zip_write, id="keras-zip-write"),
    ],
)
def test_disk_full_mid_write(name, fail, force, layout_files, out_dir, monkeypatch):
    src = layout_files(name)
    ws = read_weights(src)
    changed = changes_for(ws)
    dst = out_dir / f"out{CASES[name].suffix}"
    if force:
        dst.write_bytes(b"the previous output")
    before = listing(out_dir)
    with monkeypatch.context() as m:
        fail(m)
        with pytest.raises(WeightFileError, match="No space left on device") as info:
            write_weights(ws.file, dst, changed, {"tool": "vggnorm"}, force=force)
    assert str(dst) in str(info.value)
    assert_nothing_written(out_dir, before)
    if force:
        assert dst.read_bytes() == b"the previous output"
    else:
        assert not dst.exists()
    # The failure left the source alone, and a retry works.
    assert read_weights(src).arrays.keys() == ws.arrays.keys()
    write_weights(ws.file, dst, changed, {"tool": "vggnorm"}, force=True)
    assert detect_format(dst) == CASES[name].format


@pytest.mark.keras
def test_disk_full_during_normalize(layout_files, out_dir, monkeypatch):
    src = layout_files("downloaded")
    record = record_for(src)
    _fail_dataset_write(monkeypatch)
    with pytest.raises(VggnormError, match="No space left") as info:
        normalize(src, out_dir / "out.h5", record)
    assert "out.h5" in str(info.value)
    assert_nothing_written(out_dir, [])


@pytest.mark.keras
def test_unknown_key_leaves_nothing(layout_files, out_dir):
    src = layout_files("downloaded")
    ws = read_weights(src)
    with pytest.raises(WeightFileError, match="no dataset for 'nope/kernel'"):
        write_weights(ws.file, out_dir / "out.h5", {"nope/kernel": np.ones(3)}, {})
    with pytest.raises(WeightFileError, match="block1_conv1/kernel"):
        write_weights(
            ws.file, out_dir / "out.h5", {"block1_conv1/kernel": np.ones((3, 3, 3, 2))}, {}
        )
    assert_nothing_written(out_dir, [])


@pytest.mark.keras
def test_output_permissions_follow_umask(layout_files, out_dir):
    ws = read_weights(layout_files("downloaded"))
    out = out_dir / "out.h5"
    write_weights(ws.file, out, {}, {"tool": "vggnorm"})
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
