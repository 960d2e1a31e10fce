"""Identity-initialised BatchNorm VGG: the pure BN math, then a tiny real VGG16 end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vggnorm.commands.bn import write_bn_model
from vggnorm.core.bnparams import bn_params, identity_bn_params
from vggnorm.core.errors import ArchitectureError, StatsError, WeightFileError
from vggnorm.core.inputs import preprocess_images
from vggnorm.core.stats import LayerStats
from vggnorm.core.verdicts import FUNCTION_TOL

SIZE = 32
U32 = 2.0**-24  # one float32 rounding, relative
U64 = 2.0**-53  # one float64 rounding, relative


def _bn(x: np.ndarray, p: dict[str, np.ndarray], eps: float) -> np.ndarray:
    """Keras BatchNormalization in inference mode, in float64."""
    return p["gamma"] * (x - p["moving_mean"]) / np.sqrt(p["moving_variance"] + eps) + p["beta"]


# ---------------------------------------------------------------------------------------------
# Pure numpy


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    channels=st.integers(1, 8),
    eps=st.sampled_from([1e-3, 1e-5, 0.1]),
)
def test_bn_params_make_bn_the_identity(seed: int, channels: int, eps: float) -> None:
    rng = np.random.default_rng(seed)
    # Post-ReLU activations: mostly positive, some zeros, one channel of very different scale.
    acts = np.maximum(rng.normal(1.0, 2.0, (50, channels)), 0) * rng.uniform(1e-2, 1e3, channels)
    p = bn_params(LayerStats.of("c", acts), eps)
    x = np.maximum(rng.normal(0.0, 3.0, (20, channels)), 0) * 100
    # float64: gamma and sqrt(var + eps) are the same rounded value, so y = fl(fl(fl(g * fl(x - mu))
    # / g) + mu) carries 3 roundings of |x - mu| <= 2M and one of |x|, M = max(|x|, |mu|): <= 7 u M.
    big = max(np.abs(x).max(), np.abs(p["moving_mean"]).max())
    np.testing.assert_allclose(_bn(x, p, eps), x, rtol=0, atol=8 * U64 * big)
    # Two orderings of N = 50 non-negative float64 terms, then / N: each <= N u of the mean.
    n = len(acts)
    np.testing.assert_allclose(p["moving_mean"], acts.mean(axis=0), rtol=2 * (n + 1) * U64)
    # sumsq/N - mean^2 (sum: N u of E[x^2], mean^2: 2(N+1) u of mean^2 <= E[x^2], 3 more
    # roundings) against numpy's two-pass variance ((N + 3) u of var <= E[x^2]): <= (4N+8) u E[x^2]
    # per filter, in float64.
    bound = (4 * n + 8) * U64 * np.mean(acts * acts, axis=0)
    assert np.all(np.abs(p["moving_variance"] - acts.var(axis=0)) <= bound)
    assert p["beta"] is not p["moving_mean"]  # independent arrays: a caller may change one


def test_zero_variance_filters_give_no_nan() -> None:
    acts = np.zeros((10, 3))
    acts[:, 1] = 2.5  # constant: variance 0, mean 2.5
    acts[:, 2] = np.arange(10)  # a live filter beside them
    eps = 1e-3
    p = bn_params(LayerStats.of("c", acts), eps)
    for v in p.values():
        assert np.all(np.isfinite(v))
    assert p["moving_variance"][:2].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(p["gamma"][:2], np.sqrt(eps))
    assert p["beta"][:2].tolist() == [0.0, 2.5]
    x = np.array([[0.0, 2.5, 3.0], [7.0, 0.0, 1.0]])
    np.testing.assert_allclose(_bn(x, p, eps), x, rtol=1e-12, atol=1e-12)


def test_rounding_cannot_make_the_variance_negative() -> None:
    # sumsq/count - mean^2 cancels to a tiny negative number for a constant filter of this value.
    s = LayerStats("c", np.array([0.1 * 3]), np.array([0.1 * 0.1 * 3]), 3)
    p = bn_params(s)
    assert p["moving_variance"][0] >= 0.0
    assert np.isfinite(p["gamma"][0])


def test_bn_params_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        bn_params(LayerStats.of("c", np.ones((2, 2))), 0.0)
    with pytest.raises(ValueError, match="no activation"):
        bn_params(LayerStats.empty("c", 2))


def test_identity_bn_params_is_the_identity_without_stats() -> None:
    eps = 1e-3
    p = identity_bn_params(4, eps)
    x = np.random.default_rng(0).uniform(0, 50, (5, 4))
    np.testing.assert_allclose(_bn(x, p, eps), x, rtol=1e-12)


def test_preprocess_images_schemes() -> None:
    img = np.array([[[255, 0, 10]]], dtype=np.uint8)
    np.testing.assert_allclose(
        preprocess_images(img, "caffe")[0, 0], [10 - 103.939, 0 - 116.779, 255 - 123.68], rtol=1e-6
    )
    np.testing.assert_allclose(preprocess_images(img, "unit")[0, 0], [1.0, 0.0, 10 / 255])
    torch = preprocess_images(img, "torch")[0, 0]
    np.testing.assert_allclose(torch[0], (1.0 - 0.485) / 0.229, rtol=1e-6)
    assert preprocess_images(img).dtype == np.float32
    with pytest.raises(ValueError, match="unknown preprocessing"):
        preprocess_images(img, "tf")


def test_importing_bn_and_report_loads_neither_keras_nor_matplotlib() -> None:
    code = (
        "import sys, vggnorm.commands.bn, vggnorm.commands.report; "
        "bad = [m for m in ('keras', 'tensorflow', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_write_bn_model_refuses_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(WeightFileError, match=r"must end in \.keras"):
        write_bn_model(tmp_path / "in.h5", tmp_path / "s.h5", tmp_path / "out.h5")


def test_write_bn_model_refuses_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "out.keras"
    out.write_bytes(b"precious")
    with pytest.raises(WeightFileError, match="already exists") as info:
        write_bn_model(tmp_path / "in.h5", tmp_path / "s.h5", out)
    assert info.value.fix == "force"  # the CLI turns it into "pass --force"
    assert out.read_bytes() == b"precious"


# ---------------------------------------------------------------------------------------------
# Keras: a tiny VGG16 with real statistics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg
    from fixtures.photos import write_photos
    from vggnorm.commands.stats import collect_stats
    from vggnorm.core.inputs import Decode
    from vggnorm.core.topology import bind
    from vggnorm.formats.registry import read_weights
    from vggnorm.runtime.data import load_image

    root = tmp_path_factory.mktemp("bn")
    write_photos(root / "images", [f"img{i}.png" for i in range(6)])
    weights = save_downloaded_layout(
        tiny_vgg(include_top=False, size=SIZE),
        root / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    )
    stats = root / "stats.h5"
    record = collect_stats(weights, root / "images", decode=Decode(SIZE), out=stats, workers=1)
    ws = read_weights(weights)
    images = np.stack([load_image(root / "images" / name, Decode(SIZE)) for name in record.images])
    return {
        "root": root,
        "weights": weights,
        "stats": stats,
        "record": record,
        "arch": bind(ws.file).arch,
        "arrays": ws.arrays,
        "images": images,
        "x": preprocess_images(images, record.meta.preprocess),
    }


def _bn_model(tiny: dict[str, Any], **kwargs: Any) -> Any:
    from vggnorm.runtime.bn_network import build_bn_model

    return build_bn_model(tiny["arch"], tiny["arrays"], tiny["record"], size=SIZE, **kwargs)


def _taps(model: Any, names: list[str], attr: str) -> Any:
    import keras

    return keras.Model(model.inputs, [getattr(model.get_layer(n), attr) for n in names])


@pytest.mark.keras
def test_bn_model_computes_the_original_function(tiny: dict[str, Any]) -> None:
    from vggnorm.runtime.network import FeatureNet

    model = _bn_model(tiny)
    convs = list(tiny["arch"].conv_names)
    assert [layer.name for layer in model.layers if layer.name.endswith("_bn")] == [
        f"{c}_bn" for c in convs
    ]
    bn_out = _taps(model, [f"{c}_bn" for c in convs], "output").predict_on_batch(tiny["x"])
    ref = FeatureNet(tiny["arch"], tiny["arrays"], SIZE, outputs="activations").activations(
        tiny["images"]
    )
    # Each float32 BN (x * rsqrt(var + eps) * gamma + (beta - mu * inv)) is off the identity by ~10
    # roundings of max(|x|, |mu|) <= the layer's largest activation: the same per-layer size as
    # verify's function check, compounding over 13 layers, so FUNCTION_TOL bounds it (see there).
    for name, a, b in zip(convs, ref, bn_out):
        err = np.max(np.abs(np.asarray(b) - a)) / np.max(np.abs(a))
        assert err <= FUNCTION_TOL, f"{name}: {err:.2e}"
    # The model's output (after the last pooling) too: max pooling picks one of the values (a
    # near-tie may pick another within the same error), so the last conv's bound holds.
    last = np.asarray(model.predict_on_batch(tiny["x"]))
    pooled = ref[-1].max(axis=(1, 2), keepdims=True)  # block5_pool of a 2x2 map
    np.testing.assert_allclose(last, pooled, rtol=0, atol=FUNCTION_TOL * np.abs(ref[-1]).max())


@pytest.mark.keras
def test_bn_inputs_have_the_recorded_moments(tiny: dict[str, Any]) -> None:
    model = _bn_model(tiny)
    convs = list(tiny["arch"].conv_names)
    inputs = _taps(model, [f"{c}_bn" for c in convs], "input").predict_on_batch(tiny["x"])
    for s, a in zip(tiny["record"].layers, inputs):
        flat = np.asarray(a, dtype=np.float64).reshape(-1, s.channels)
        width, amax = a.shape[2], float(flat.max())
        # The BN inputs are the stats run's activations off by <= FUNCTION_TOL * amax (the earlier
        # BNs, see above); the stats sum each row of `width` float32 values (<= width u of the
        # row, all >= 0), then float64. Mean: <= (FUNCTION_TOL + width u) amax. Variance
        # E[x^2] - mean^2: the perturbation moves each term by <= 2 FUNCTION_TOL amax^2, the rows
        # of x and x*x by <= width u E[x^2] and 2 width u mean^2, both <= amax^2.
        np.testing.assert_allclose(
            flat.mean(axis=0), s.mean, rtol=0, atol=(FUNCTION_TOL + width * U32) * amax
        )
        np.testing.assert_allclose(
            flat.var(axis=0),
            s.variance,
            rtol=0,
            atol=(4 * FUNCTION_TOL + 3 * width * U32) * amax**2,
        )
        bn = model.get_layer(f"{s.name}_bn")
        # set_weights stores the float32 cast unchanged.
        np.testing.assert_array_equal(bn.moving_variance.numpy(), s.variance.astype(np.float32))


@pytest.mark.keras
def test_three_training_steps_stay_finite(tiny: dict[str, Any]) -> None:
    model = _bn_model(tiny)
    model.compile(optimizer="sgd", loss="mse")
    y = np.random.default_rng(0).normal(size=(len(tiny["x"]), *model.output_shape[1:]))
    history = model.fit(tiny["x"], y.astype(np.float32), batch_size=len(y), epochs=3, verbose=0)
    assert len(history.history["loss"]) == 3
    assert np.all(np.isfinite(history.history["loss"]))
    for w in model.weights:
        assert np.all(np.isfinite(np.asarray(w.numpy()))), w.path


@pytest.mark.keras
def test_written_keras_file_loads_and_matches(tiny: dict[str, Any], tmp_path: Path) -> None:
    import keras

    out = tmp_path / "vgg16_bn.keras"
    result = write_bn_model(tiny["weights"], tiny["stats"], out)
    assert (result.out, result.size, result.preprocess) == (out, 32, "caffe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vgg16_bn.keras"]  # no temp left
    loaded = keras.models.load_model(out)
    expected = _bn_model(tiny).predict_on_batch(tiny["x"])
    # The same float32 weights through the same layers and kernels: the same roundings, bit-equal.
    np.testing.assert_array_equal(loaded.predict_on_batch(tiny["x"]), expected)
    assert loaded.get_layer("block3_conv2_bn").epsilon == 1e-3
    with pytest.raises(WeightFileError, match="already exists"):
        write_bn_model(tiny["weights"], tiny["stats"], out)
    write_bn_model(tiny["weights"], tiny["stats"], out, force=True, epsilon=1e-2)
    assert keras.models.load_model(out).get_layer("block3_conv2_bn").epsilon == 1e-2


@pytest.mark.keras
def test_stats_of_another_model_are_refused(tiny: dict[str, Any], tmp_path: Path) -> None:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    other = save_downloaded_layout(tiny_vgg(include_top=False, seed=1), tmp_path / "other.h5")
    with pytest.raises(StatsError, match="fingerprint"):
        write_bn_model(other, tiny["stats"], tmp_path / "out.keras")
    assert not (tmp_path / "out.keras").exists()


@pytest.mark.keras
def test_top_with_identity_dense_bn(tiny: dict[str, Any], tmp_path: Path) -> None:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg
    from vggnorm.core.topology import bind, fingerprint
    from vggnorm.formats.registry import read_weights
    from vggnorm.runtime.bn_network import build_bn_model
    from vggnorm.runtime.network import FeatureNet

    # Same seed: the same conv weights as the notop model, so the same stats apply.
    ws = read_weights(save_downloaded_layout(tiny_vgg(include_top=True), tmp_path / "top.h5"))
    arch = bind(ws.file).arch
    assert fingerprint(ws.arrays, arch.conv_names) == tiny["record"].meta.fingerprint
    model = build_bn_model(arch, ws.arrays, tiny["record"], size=SIZE, include_top_bn=True)
    assert {"fc1_bn", "fc2_bn"} <= {layer.name for layer in model.layers}
    assert "predictions_bn" not in {layer.name for layer in model.layers}
    ref = FeatureNet(arch, ws.arrays, SIZE, outputs="activations", with_head=True)
    # Compared as logits (softmax squashes differences into saturated probabilities): each
    # network's input to `predictions` h times its float64 kernel. fc2 is one more layer of the
    # chain (the identity dense BNs add ~3 roundings each), so |dh| <= FUNCTION_TOL max|h| and
    # logit j moves by <= that times sum_i |W_ij|; float64's own K u is ~1e-12 of it.
    kernel = ws.arrays["predictions/kernel"].astype(np.float64)
    h_bn = _taps(model, ["predictions"], "input").predict_on_batch(tiny["x"])
    h_ref = _taps(ref.model, ["predictions"], "input").predict_on_batch(tiny["images"])
    h_bn, h_ref = (
        np.asarray(h[0] if isinstance(h, list) else h, np.float64) for h in (h_bn, h_ref)
    )
    bound = FUNCTION_TOL * np.abs(h_ref).max() * np.abs(kernel).sum(axis=0)
    assert np.all(np.abs(h_bn @ kernel - h_ref @ kernel) <= bound)
    with pytest.raises(ArchitectureError, match="Flatten head"):
        build_bn_model(arch, ws.arrays, tiny["record"], size=64)
