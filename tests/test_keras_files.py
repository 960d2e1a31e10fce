"""Each writer in fixtures/keras_files.py produces a file Keras itself loads back unchanged."""

import json
import logging
import warnings
import zipfile

import h5py
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from fixtures import keras_files as kf  # noqa: E402

pytestmark = pytest.mark.keras

SIZE = 32
SHAPE = (SIZE, SIZE, 3)


@pytest.fixture(scope="module")
def notop():
    return kf.tiny_vgg(include_top=False, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def top():
    return kf.tiny_vgg(include_top=True, size=SIZE, seed=1)


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("keras_files")


def assert_same_weights(expected, actual):
    a, b = expected.get_weights(), actual.get_weights()
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def vgg_from(path, include_top=False):
    kwargs = dict(weights=str(path), include_top=include_top, input_shape=SHAPE)
    if include_top:
        kwargs["classes"] = 10
    return keras.applications.VGG16(**kwargs)


def load_into_fresh(path, include_top=False):
    kwargs = dict(weights=None, include_top=include_top, input_shape=SHAPE)
    if include_top:
        kwargs["classes"] = 10
    model = keras.applications.VGG16(**kwargs)
    model.load_weights(str(path))
    return model


def weight_layers(model):
    return [layer for layer in model.layers if layer.weights]


# --- downloaded layout ------------------------------------------------------


def check_downloaded_layout(path, model):
    with h5py.File(path, "r") as f:
        assert set(f.attrs) == {"layer_names"}
        names = [n.decode("utf8") for n in f.attrs["layer_names"]]
        assert names == [layer.name for layer in model.layers]
        assert names[0] == model.layers[0].name  # the input layer is listed
        assert set(f.keys()) == set(names)
        for layer in model.layers:
            group = f[layer.name]
            assert set(group.attrs) == {"weight_names"}
            wn = [n.decode("utf8") for n in group.attrs["weight_names"]]
            if not layer.weights:
                assert wn == [] and len(group) == 0
                continue
            assert wn == [f"{layer.name}_W_1:0", f"{layer.name}_b_1:0"]
            assert sorted(group.keys()) == sorted(wn)  # directly in the group
            kernel, bias = layer.get_weights()
            assert group[wn[0]].dtype == np.float32
            np.testing.assert_array_equal(group[wn[0]][()], kernel)
            np.testing.assert_array_equal(group[wn[1]][()], bias)


def test_downloaded_layout_notop(notop, outdir):
    path = kf.save_downloaded_layout(notop, outdir / "down_notop.h5")
    assert path == outdir / "down_notop.h5"
    check_downloaded_layout(path, notop)
    assert_same_weights(notop, vgg_from(path))
    assert_same_weights(notop, load_into_fresh(path))


def test_downloaded_layout_top(top, outdir):
    path = kf.save_downloaded_layout(top, outdir / "down_top.h5")
    check_downloaded_layout(path, top)
    with h5py.File(path, "r") as f:
        names = [n.decode("utf8") for n in f.attrs["layer_names"]]
        assert names[-4:] == ["flatten", "fc1", "fc2", "predictions"]
        assert f["fc1/fc1_W_1:0"].shape == (512, 4096)  # 1x1x512 flattened
    assert_same_weights(top, vgg_from(path, include_top=True))
    # A with-top file does not load into a notop model.
    with pytest.raises(ValueError):
        vgg_from(path, include_top=False)


# --- Keras 2 layout ---------------------------------------------------------


def test_keras2_layout_notop(notop, outdir):
    path = kf.save_keras2_layout(notop, outdir / "k2.h5")
    with h5py.File(path, "r") as f:
        assert set(f.attrs) == {"layer_names", "backend", "keras_version"}
        assert f.attrs["backend"] in (b"tensorflow", "tensorflow")
        assert f.attrs["keras_version"] in (b"2.15.0", "2.15.0")
        group = f["block1_conv1"]
        wn = [n.decode("utf8") for n in group.attrs["weight_names"]]
        assert wn == ["block1_conv1/kernel:0", "block1_conv1/bias:0"]
        assert isinstance(f["block1_conv1/block1_conv1"], h5py.Group)
        kernel = f["block1_conv1/block1_conv1/kernel:0"]
        assert kernel.dtype == np.float32 and kernel.shape == (3, 3, 3, 64)
        assert len(f["block1_pool"].attrs["weight_names"]) == 0
        assert len(f["top_level_model_weights"].attrs["weight_names"]) == 0
    assert_same_weights(notop, vgg_from(path))
    assert_same_weights(notop, load_into_fresh(path))


def small_bn_model():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    rng = np.random.default_rng(3)
    model.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in model.weights])
    return model


def test_keras2_layout_batchnorm_names(outdir):
    model = small_bn_model()
    path = kf.save_keras2_layout(model, outdir / "k2_bn.h5")
    with h5py.File(path, "r") as f:
        wn = [n.decode("utf8") for n in f["bn"].attrs["weight_names"]]
        assert wn == [
            "bn/gamma:0",
            "bn/beta:0",
            "bn/moving_mean:0",
            "bn/moving_variance:0",
        ]
        assert f["bn/bn/moving_variance:0"].shape == (4,)
    fresh = small_bn_model()
    for w in fresh.weights:
        w.assign(np.zeros(w.shape, np.float32))
    fresh.load_weights(str(path))
    assert_same_weights(model, fresh)


# --- Keras 3 legacy writer --------------------------------------------------


def test_keras3_legacy_weights_notop(notop, outdir):
    path = kf.save_keras3_legacy_weights(notop, outdir / "k3.h5")
    with h5py.File(path, "r") as f:
        assert set(f.attrs) == {"layer_names", "backend", "keras_version"}
        assert "block1_conv1/block1_conv1/kernel" in f
        assert "block1_conv1/block1_conv1/bias" in f
        assert "top_level_model_weights" in f
        wn = list(f["block1_conv1"].attrs["weight_names"])
        assert [n.decode() if isinstance(n, bytes) else n for n in wn] == [
            "block1_conv1/kernel",
            "block1_conv1/bias",
        ]
    assert_same_weights(notop, vgg_from(path))
    assert_same_weights(notop, load_into_fresh(path))


def test_keras3_legacy_weights_top(top, outdir):
    path = kf.save_keras3_legacy_weights(top, outdir / "k3_top.h5")
    assert_same_weights(top, load_into_fresh(path, include_top=True))


# --- Keras 3 legacy full model ----------------------------------------------


def test_full_model_h5(notop, outdir):
    path = kf.save_full_model_h5(notop, outdir / "full.h5")
    with h5py.File(path, "r") as f:
        assert {"model_config", "keras_version", "backend"} <= set(f.attrs)
        assert "training_config" not in f.attrs
        assert "optimizer_weights" not in f
        assert "layer_names" in f["model_weights"].attrs
        assert "model_weights/block1_conv1/block1_conv1/kernel" in f
    assert_same_weights(notop, keras.models.load_model(str(path), compile=False))
    assert_same_weights(notop, vgg_from(path))
    assert_same_weights(notop, load_into_fresh(path))


def test_full_model_h5_with_optimizer(notop, outdir):
    before = notop.get_weights()
    path = kf.save_full_model_h5(notop, outdir / "full_opt.h5", with_optimizer=True)
    for x, y in zip(before, notop.get_weights()):  # input model untouched
        np.testing.assert_array_equal(x, y)
    with h5py.File(path, "r") as f:
        assert "training_config" in f.attrs
        assert "optimizer_weights" in f
        names = list(f["optimizer_weights"].attrs["weight_names"])
        names = [n.decode() if isinstance(n, bytes) else n for n in names]
        assert "adam/iteration" in names
        assert "adam/block1_conv1_kernel_momentum" in names
        assert f["optimizer_weights/adam/iteration"][()] == 1
        names = [
            n.decode() if isinstance(n, bytes) else n
            for n in f["model_weights"].attrs["layer_names"]
        ]
        assert names == [layer.name for layer in notop.layers]
    loaded = keras.models.load_model(str(path))
    assert loaded.optimizer is not None
    assert_same_weights(notop, loaded)
    assert_same_weights(notop, vgg_from(path))


# --- Keras 3 native ---------------------------------------------------------


def test_weights_h5(notop, outdir):
    path = kf.save_weights_h5(notop, outdir / "m.weights.h5")
    with h5py.File(path, "r") as f:
        assert set(f.attrs) == set()
        assert f["layers/conv2d/vars"].attrs["name"] == "block1_conv1"
        assert f["layers/conv2d/vars/0"].shape == (3, 3, 3, 64)
        assert f["layers/conv2d/vars/1"].shape == (64,)
        assert f["layers/conv2d_12/vars"].attrs["name"] == "block5_conv3"
        assert len(f["layers/max_pooling2d/vars"]) == 0
        assert "layers/input_layer/vars" in f
    assert_same_weights(notop, vgg_from(path))
    assert_same_weights(notop, load_into_fresh(path))
    with pytest.raises(ValueError):
        kf.save_weights_h5(notop, outdir / "wrong.h5")


def test_keras_zip(notop, outdir):
    path = kf.save_keras_zip(notop, outdir / "m.keras")
    with zipfile.ZipFile(path) as z:
        assert set(z.namelist()) == {"config.json", "metadata.json", "model.weights.h5"}
    assert_same_weights(notop, keras.models.load_model(str(path)))
    assert_same_weights(notop, vgg_from(path))


# --- chunked layer_names ----------------------------------------------------


@pytest.mark.parametrize("writer", ["downloaded", "keras3", "full"])
def test_chunked_layer_names(notop, outdir, writer):
    path = outdir / f"chunk_{writer}.h5"
    if writer == "downloaded":
        kf.save_downloaded_layout(notop, path)
    elif writer == "keras3":
        kf.save_keras3_legacy_weights(notop, path)
    else:
        kf.save_full_model_h5(notop, path)
    assert kf.chunked_layer_names(path, num_chunks=3) == path
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if writer == "full" else f
        assert "layer_names" not in group.attrs
        chunks = [group.attrs[f"layer_names{i}"] for i in range(3)]
        assert "layer_names3" not in group.attrs
        names = [n.decode() if isinstance(n, bytes) else n for c in chunks for n in c]
        assert names == [layer.name for layer in notop.layers]
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "r") as f:
        group = f["model_weights"] if writer == "full" else f
        got = legacy_h5_format.load_attributes_from_hdf5_group(group, "layer_names")
        assert got == [layer.name for layer in notop.layers]
    assert_same_weights(notop, vgg_from(path))
    assert_same_weights(notop, load_into_fresh(path))
    if writer == "full":
        assert_same_weights(notop, keras.models.load_model(str(path), compile=False))


# --- extra vggnorm content is tolerated by Keras's loaders -----------------


def add_provenance(path):
    with h5py.File(path, "r+") as f:
        f.create_group("vggnorm").create_dataset("means", data=np.ones(3))
        f.attrs["vggnorm_provenance"] = json.dumps({"tool": "vggnorm"})


@pytest.mark.parametrize(
    "writer, name",
    [
        (kf.save_downloaded_layout, "prov_down.h5"),
        (kf.save_full_model_h5, "prov_full.h5"),
        (kf.save_weights_h5, "prov_m.weights.h5"),
    ],
)
def test_extra_provenance_loads_silently(notop, outdir, writer, name, caplog):
    path = writer(notop, outdir / name)
    add_provenance(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_weights(notop, vgg_from(path))
        assert_same_weights(notop, load_into_fresh(path))
        if name == "full.h5":
            assert_same_weights(notop, keras.models.load_model(str(path), compile=False))
    assert [r.getMessage() for r in caplog.records] == []  # absl warnings too


# --- tiny_vgg ---------------------------------------------------------------


def test_tiny_vgg_deterministic_and_alive(notop):
    again = kf.tiny_vgg(include_top=False, size=SIZE, seed=0)
    assert_same_weights(notop, again)
    other = kf.tiny_vgg(include_top=False, size=SIZE, seed=5)
    assert not np.array_equal(notop.weights[0].numpy(), other.weights[0].numpy())
    for layer in weight_layers(notop):
        kernel, bias = layer.get_weights()
        assert kernel.dtype == np.float32
        assert np.all((bias >= 0) & (bias < 0.1))
        expected = np.sqrt(2.0 / np.prod(kernel.shape[:-1]))
        assert abs(kernel.std() / expected - 1) < 0.2
    x = np.random.default_rng(0).uniform(0, 255, (1, *SHAPE)).astype(np.float32)
    assert np.count_nonzero(notop.predict(x, verbose=0)) > 0


def test_tiny_vgg19():
    model = kf.tiny_vgg(include_top=False, arch="vgg19", size=SIZE)
    assert len(weight_layers(model)) == 16
    with pytest.raises(ValueError):
        kf.tiny_vgg(arch="resnet50")
