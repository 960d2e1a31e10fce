"""Fine-tuned VGG-like models with their own heads, in every format they are saved in."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vggnorm.commands.apply import normalize
from vggnorm.commands.stats import collect_stats
from vggnorm.commands.verify import verify
from vggnorm.core.errors import ArchitectureError
from vggnorm.core.inputs import Decode
from vggnorm.core.topology import bind
from vggnorm.formats.registry import inspect_weights

pytestmark = pytest.mark.keras
SIZE = 32


def _finetuned(head: str, seed: int = 0) -> Any:
    """VGG16 base nested in a Sequential with a Flatten->Dense->BN->Dense or GAP head."""
    import keras

    from fixtures.keras_files import tiny_vgg

    base = tiny_vgg(include_top=False, size=SIZE, seed=seed)
    L = keras.layers
    reduce = L.Flatten() if head == "flatten" else L.GlobalAveragePooling2D()
    model = keras.Sequential(
        [keras.Input((SIZE, SIZE, 3)), base, reduce, L.Dense(16, activation="relu"),
         L.BatchNormalization(), L.Dropout(0.3), L.Dense(5, activation="softmax")]
    )  # fmt: skip
    rng = np.random.default_rng(seed + 1)
    bn = model.layers[-3]
    bn.set_weights([rng.uniform(0.5, 2, 16), rng.normal(0, 1, 16), rng.normal(0, 1, 16),
                    rng.uniform(0.5, 2, 16)])  # fmt: skip
    return model


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(3)
    for i in range(6):
        arr = rng.integers(0, 256, (int(rng.integers(32, 70)), int(rng.integers(32, 70)), 3))
        Image.fromarray(arr.astype(np.uint8)).save(root / f"{i}.png")
    return root


def _save(model: Any, path: Path) -> Path:
    if path.name.endswith(".weights.h5"):
        model.save_weights(path)
    else:
        model.save(path)
    return path


def _preprocessed(images: Path) -> np.ndarray:
    from vggnorm.runtime.data import load_image

    batch = np.stack([load_image(p, Decode(SIZE)) for p in sorted(images.iterdir())])
    return batch[..., ::-1].astype(np.float32) - np.array([103.939, 116.779, 123.68], np.float32)


def _logits(model: Any, x: np.ndarray) -> np.ndarray:
    """The Sequential ``model``'s output before its final softmax (a copy with a linear last layer)."""
    import keras

    config = model.get_config()
    config["layers"][-1]["config"]["activation"] = "linear"
    copy = keras.Sequential.from_config(config)
    copy.set_weights(model.get_weights())
    return np.asarray(copy.predict_on_batch(x), np.float64)


def _assert_same_logits(model: Any, loaded: Any, x: np.ndarray) -> None:
    """Keras float32 logits of the original and the normalized model agree within what float32
    promises, judged against the size of the terms that make each logit.

    Probabilities are not compared: softmax turns a logit error dz into a probability error of up
    to p * 2 * max|dz|, and a random head's logits are large (~1e2 here), so a fixed tolerance on
    probabilities is a guess (1e-4 failed at 1.04e-4 on a fresh machine). A logit
    z = h @ W + b computed in float32 errs by (error of h) @ W plus the rounding of the sum;
    |(error of h) @ W| <= max|dh| * sum_j |W_jk|, and max|dh| <= eps_h * max|h| in the units
    verify uses (errors relative to a layer's largest value: FUNCTION_TOL = 1e-4, asserted by the
    verify call for every conv of this model); the head layers between the last conv and h (Dense,
    BatchNorm) add float32 rounding of at most gamma_n = n*u/(1-n*u) (n <= 513, u = 2**-24:
    3.1e-5) each, and the last product's own rounding is below gamma_n * S too. So per image and
    logit k: |dz_k| <= 2e-4 * S_k with S_k = max|h| * sum_j |W_jk| + |b_k|.
    """
    expected, got = _logits(model, x), _logits(loaded, x)
    h = np.asarray(_penultimate(model, x), np.float64).reshape(len(x), -1)
    w, b = (np.asarray(v, np.float64) for v in model.layers[-1].get_weights())
    terms = np.abs(h).max(axis=1, keepdims=True) * np.abs(w).sum(axis=0) + np.abs(b)
    ratio = np.max(np.abs(got - expected) / terms)
    assert ratio <= 2e-4, ratio  # measured: 1e-7 to 4e-7 over seeds 0, 100, 200 (2 cores, CPU)


def _penultimate(model: Any, x: np.ndarray) -> np.ndarray:
    import keras

    return keras.Model(model.inputs, model.layers[-2].output).predict_on_batch(x)


@pytest.mark.parametrize(
    ("head", "suffix"),
    [("flatten", ".keras"), ("flatten", ".h5"), ("gap", ".keras"), ("gap", ".weights.h5")],
)
def test_finetuned_model_keeps_predictions_and_format(
    head: str, suffix: str, images: Path, tmp_path: Path
) -> None:
    import keras

    model = _finetuned(head)
    src = _save(model, tmp_path / f"ft{suffix}")
    dst = tmp_path / f"ft_norm{suffix}"
    stats = tmp_path / "stats.h5"
    record = collect_stats(src, images, decode=Decode(SIZE), out=stats, batch_size=4)
    assert record.n_images == 6
    result = normalize(src, dst, stats)
    assert inspect_weights(dst).format == inspect_weights(src).format

    x = _preprocessed(images)
    if suffix == ".weights.h5":
        loaded = _finetuned(head, seed=9)  # other weights: load_weights must replace them all
        loaded.load_weights(dst)
    else:
        loaded = keras.models.load_model(dst)
    _assert_same_logits(model, loaded, x)
    # The weights really changed: every conv now has unit means on these images.
    assert not np.allclose(loaded.get_weights()[0], model.get_weights()[0])
    first_dense = next(
        layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)
    )
    assert result.provenance["head_dense"] == first_dense

    report = verify(dst, src, stats)
    assert report.ok and report.means_ok
    if suffix != ".weights.h5":  # the head of a weights-only file has unknown activations
        assert report.predictions is not None and report.predictions["max_rel_err"] <= 1e-4


def test_keras_zip_members_other_than_weights_are_copied_byte_for_byte(
    images: Path, tmp_path: Path
) -> None:
    src = _save(_finetuned("gap"), tmp_path / "m.keras")
    stats = tmp_path / "s.h5"
    collect_stats(src, images, decode=Decode(SIZE), out=stats)
    normalize(src, tmp_path / "n.keras", stats)
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(tmp_path / "n.keras") as b:
        assert a.namelist() == b.namelist()
        for name in a.namelist():
            if name != "model.weights.h5":
                assert a.read(name) == b.read(name), name


def _config_with(layers_patch: Any, tmp_path: Path) -> Path:
    """A .keras file whose config.json was edited (the weights stay loadable as data)."""
    src = _save(_finetuned("gap"), tmp_path / "m.keras")
    out = tmp_path / "edited.keras"
    with zipfile.ZipFile(src) as z_in, zipfile.ZipFile(out, "w") as z_out:
        for info in z_in.infolist():
            data = z_in.read(info.filename)
            if info.filename == "config.json":
                config = json.loads(data)
                base = next(
                    x for x in config["config"]["layers"] if x["class_name"] == "Functional"
                )
                layers_patch(base["config"]["layers"])
                data = json.dumps(config).encode()
            z_out.writestr(info, data)
    return out


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        pytest.param(
            lambda layers: layers[2]["config"].update(activation="tanh"),
            "uses activation 'tanh'", id="tanh-conv"),
        pytest.param(
            lambda layers: layers.insert(2, {"class_name": "Lambda", "config": {
                "name": "evil", "function": {"class_name": "__lambda__", "config": {"code": "AA=="}}}}),
            "never executes code", id="lambda"),
        pytest.param(
            lambda layers: layers.insert(2, {"class_name": "BatchNormalization", "config": {
                "name": "bn_between"}}),
            "'bn_between' (BatchNormalization) cannot be normalized exactly", id="bn-after-relu"),
        pytest.param(
            lambda layers: layers[1]["config"].update(activation="linear"),
            "followed by 'block1_conv2' (Conv2D), not a ReLU", id="linear-conv"),
        pytest.param(
            lambda layers: layers.insert(3, {"class_name": "Add", "config": {"name": "res"},
                "inbound_nodes": [{"args": [[{"class_name": "__keras_tensor__", "config": {
                    "keras_history": ["a", 0, 0]}}, {"class_name": "__keras_tensor__", "config": {
                    "keras_history": ["b", 0, 0]}}]]}]}),
            "merges several inputs", id="residual"),
    ],
)  # fmt: skip
def test_architectures_that_cannot_be_normalized_are_refused(
    patch: Any, message: str, tmp_path: Path
) -> None:

    path = _config_with(patch, tmp_path)
    with pytest.raises(ArchitectureError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bind(inspect_weights(path))


def _conv_bn_relu_model(seed: int = 0) -> Any:
    """A small VGG-like net with BatchNorm between each conv and its ReLU, and a ReLU layer."""
    import keras

    L = keras.layers
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((SIZE, SIZE, 3)),
         L.Conv2D(8, 3, padding="same", name="c1"), L.BatchNormalization(name="bn1"), L.ReLU(name="r1"),
         L.MaxPooling2D(2, name="p1"),
         L.Conv2D(12, 3, padding="same", name="c2"), L.BatchNormalization(name="bn2", center=False),
         L.Activation("relu", name="r2"), L.AveragePooling2D(2, name="p2"),
         L.Conv2D(16, 3, padding="same", activation="relu", name="c3"), L.Dropout(0.1),
         L.Flatten(name="flat"), L.Dense(6, activation="relu", name="fc"), L.Dense(3, name="out")]
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    for bn in (model.get_layer("bn1"), model.get_layer("bn2")):
        # Non-trivial inference statistics, negative gammas included: still exact.
        bn.set_weights([rng.uniform(-1.5, 2, w.shape) if i == 0 else rng.normal(0, 3, w.shape)
                        if i < len(bn.get_weights()) - 1 else rng.uniform(0.5, 4, w.shape)
                        for i, w in enumerate(bn.get_weights())])  # fmt: skip
    return model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_batchnorm_between_conv_and_relu_is_rescaled_exactly(
    suffix: str, images: Path, tmp_path: Path
) -> None:
    import keras

    model = _conv_bn_relu_model()
    src = _save(model, tmp_path / f"m{suffix}")
    stats = tmp_path / "s.h5"
    collect_stats(src, images, decode=Decode(SIZE), out=stats, batch_size=4)
    normalize(src, tmp_path / f"n{suffix}", stats)
    x = _preprocessed(images)
    loaded = keras.models.load_model(tmp_path / f"n{suffix}")
    _assert_same_logits(model, loaded, x)
    report = verify(tmp_path / f"n{suffix}", src, stats)
    assert report.ok and report.means_ok and report.predictions is not None
    assert [c.name for c in report.layers] == ["c1", "c2", "c3"]
    # gamma and moving variance are untouched; beta and moving mean carry the scale.
    before, after = inspect_weights(src), inspect_weights(tmp_path / f"n{suffix}")
    assert [e.name for e in before.layers] == [e.name for e in after.layers]


def test_report_loss_panel_on_a_conv_batchnorm_relu_model(images: Path, tmp_path: Path) -> None:
    """The loss panel rescales with the architecture's BatchNorm mapping, as apply does: the
    in-memory rescaling and apply's file give the same losses, and the function check holds."""
    from vggnorm.commands.report import loss_spread_for
    from vggnorm.core.verdicts import FUNCTION_TOL

    src = _save(_conv_bn_relu_model(), tmp_path / "m.keras")
    stats = tmp_path / "s.h5"
    record = collect_stats(src, images, decode=Decode(SIZE), out=stats, batch_size=4)
    normalize(src, tmp_path / "n.keras", stats)
    in_memory = loss_spread_for(src, record)
    from_file = loss_spread_for(src, record, normalized=tmp_path / "n.keras")
    assert in_memory["function_rel_err"] <= FUNCTION_TOL
    assert from_file["function_rel_err"] <= FUNCTION_TOL
    # the file holds rescale's float32 arrays exactly, so both runs compute the same activations
    assert [r["name"] for r in in_memory["layers"]] == ["c1", "c2", "c3"]
    for a, b in zip(in_memory["layers"], from_file["layers"], strict=True):
        assert a == b
