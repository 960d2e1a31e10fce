"""PyTorch layout tables and transforms: pure numpy, no torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vggnorm.core.archs import ARCHS
from vggnorm.core.errors import WeightFileError
from vggnorm.core.rescale import compute_scales, rescale
from vggnorm.core.torch_layouts import (
    LAYOUTS,
    compensate_head,
    conv_key_map,
    convert_flatten_rows,
    detect_arch,
    detect_layout,
    flatten_row_scale,
    from_canonical,
    head_key_map,
    keras_rows_to_torch,
    to_canonical,
    torch_rows_to_keras,
)

# The published indices (torchvision models/vgg.py cfgs 'D'/'E'; pytorch-AdaIN net.py).
TORCHVISION_INDICES = {
    "vgg16": [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
    "vgg19": [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34],
}
ADAIN_INDICES = [2, 5, 9, 12, 16, 19, 22, 25, 29, 32, 35, 38, 42, 45, 48, 51]


def state_shapes(
    layout: str, arch: str, head_rows: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Shapes of a stock state dict, written from the published module definitions."""
    shapes: dict[str, tuple[int, ...]] = {}
    convs = ARCHS[arch].convs
    c_in = 3
    if layout == "adain":
        shapes |= {"0.weight": (3, 3, 1, 1), "0.bias": (3,)}
    for k, conv in enumerate(convs):
        if layout == "torchvision":
            prefix = f"features.{TORCHVISION_INDICES[arch][k]}"
        elif layout == "adain":
            prefix = f"{ADAIN_INDICES[k]}"
        else:
            block, i = conv.name.removeprefix("block").split("_conv")
            prefix = f"conv{block}_{i}"
        shapes[f"{prefix}.weight"] = (conv.filters, c_in, 3, 3)
        shapes[f"{prefix}.bias"] = (conv.filters,)
        c_in = conv.filters
    if head_rows is not None:
        shapes |= {
            "classifier.0.weight": (16, head_rows),
            "classifier.0.bias": (16,),
            "classifier.3.weight": (16, 16),
            "classifier.3.bias": (16,),
            "classifier.6.weight": (10, 16),
            "classifier.6.bias": (10,),
        }
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


CASES = [
    ("torchvision", "vgg16", 512 * 49),
    ("torchvision", "vgg19", None),
    ("gatys", "vgg16", None),
    ("gatys", "vgg19", None),
    ("adain", "vgg19", None),
]


@pytest.mark.parametrize(("layout", "arch", "rows"), CASES)
def test_detect_each_layout(layout: str, arch: str, rows: int | None) -> None:
    shapes = state_shapes(layout, arch, rows)
    assert detect_layout(shapes) == layout
    assert detect_arch(shapes, detect_layout(shapes)) == arch


def test_key_maps_match_the_published_indices() -> None:
    for arch, indices in TORCHVISION_INDICES.items():
        keys = list(conv_key_map("torchvision", arch).values())[::2]
        assert keys == [f"features.{i}.weight" for i in indices]
    assert list(conv_key_map("adain", "vgg19").values())[::2] == [
        f"{i}.weight" for i in ADAIN_INDICES
    ]
    gatys = conv_key_map("gatys", "vgg19")
    assert gatys["block3_conv4/bias"] == "conv3_4.bias"
    assert gatys["block5_conv4/kernel"] == "conv5_4.weight"
    assert head_key_map("torchvision", "vgg16")["predictions/kernel"] == "classifier.6.weight"
    assert head_key_map("gatys", "vgg16") == {}


@pytest.mark.parametrize(
    ("mutate", "error", "words"),
    [
        (lambda s: s | {"fc.weight": (10, 512)}, WeightFileError, "not a known PyTorch VGG"),
        (lambda s: s | {"features.30.weight": (10,)}, WeightFileError, "unexpected keys"),
        (
            lambda s: s | {"features.2.weight": (64, 64, 5, 5)},
            WeightFileError,
            "expected (64, 64, 3, 3)",
        ),
        (
            lambda s: {k: v for k, v in s.items() if k != "features.28.bias"},
            WeightFileError,
            "missing",
        ),
        # a stray BatchNorm tensor: the file reads as a vgg16_bn whose convs are not where
        # the _bn Sequential has them
        (lambda s: s | {"features.1.running_mean": (64,)}, WeightFileError, "torchvision_bn"),
        (
            lambda s: s | {"classifier.0.weight": (16, 500), "classifier.0.bias": (16,)},
            WeightFileError,
            "partial",
        ),
        (
            lambda s: {
                k: v for k, v in s.items() if not k.startswith(("features.26", "features.28"))
            },
            WeightFileError,
            "11 convs",
        ),
    ],
    ids=[
        "foreign",
        "extra-conv",
        "bad-shape",
        "missing-bias",
        "batchnorm",
        "partial-head",
        "11-convs",
    ],
)
def test_refusals_name_what_was_found(mutate, error, words) -> None:  # type: ignore[no-untyped-def]
    shapes = mutate(state_shapes("torchvision", "vgg16"))
    with pytest.raises(error, match=None) as info:
        detect_arch(shapes, detect_layout(shapes))
    message = str(info.value)
    assert words in message
    assert "\n" not in message


def test_torchvision_features_saved_alone_is_not_taken_for_adain() -> None:
    shapes = {
        k.removeprefix("features."): v for k, v in state_shapes("torchvision", "vgg16").items()
    }
    assert detect_layout(shapes) == "features"
    shapes["0.weight"] = (64, 4, 3, 3)  # neither AdaIN's 1x1 conv nor a VGG's first conv
    with pytest.raises(WeightFileError, match=r"bare nn\.Sequential") as info:
        detect_layout(shapes)
    assert "(64, 4, 3, 3)" in str(info.value)


def test_head_rows_not_a_multiple_refused() -> None:
    shapes = state_shapes("torchvision", "vgg16", 500)
    with pytest.raises(WeightFileError, match="not a multiple"):
        detect_arch(shapes, "torchvision")


@pytest.mark.parametrize(("layout", "arch", "rows"), CASES)
def test_round_trip_is_bit_exact_and_leaves_the_input_alone(
    layout: str, arch: str, rows: int | None
) -> None:
    state = random_state(state_shapes(layout, arch, rows))
    before = {k: v.copy() for k, v in state.items()}
    canonical = to_canonical(state, layout, arch)
    k1 = canonical["block1_conv1/kernel"]
    assert k1.shape == (3, 3, 3, 64) and k1.flags.c_contiguous
    assert not np.shares_memory(k1, next(iter(state.values())))
    assert not any(k.startswith("0.") for k in canonical)  # AdaIN's fixed conv is not a layer
    back = from_canonical(canonical, layout, arch, source=state)
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert np.array_equal(back[key], value), key
        assert np.array_equal(state[key], before[key])
    # The HWIO/(in, out) transforms are the documented ones.
    first = next(k for k in state if k.endswith(".weight") and state[k].shape[2:] == (3, 3))
    assert np.array_equal(canonical["block1_conv1/kernel"], state[first].transpose(2, 3, 1, 0))
    if rows:
        assert np.array_equal(canonical["fc1/kernel"], state["classifier.0.weight"].T)


def test_adain_fixed_conv_passes_through_or_is_the_published_one() -> None:
    from vggnorm.core.torch_layouts import ADAIN_INPUT_CONV

    state = random_state(state_shapes("adain", "vgg19"))
    canonical = to_canonical(state, "adain", "vgg19")
    back = from_canonical(canonical, "adain", "vgg19", source=state)
    assert back["0.weight"] is state["0.weight"]
    fresh = from_canonical(canonical, "adain", "vgg19")  # an export: no source file
    assert list(fresh) == list(back)  # the Sequential's order, input conv first
    assert np.array_equal(fresh["0.weight"], ADAIN_INPUT_CONV["0.weight"])
    assert np.array_equal(fresh["0.bias"], ADAIN_INPUT_CONV["0.bias"])
    assert all(np.array_equal(fresh[k], back[k]) for k in back if not k.startswith("0."))


def test_from_canonical_refuses_shape_changes() -> None:
    state = random_state(state_shapes("gatys", "vgg16"))
    canonical = to_canonical(state, "gatys", "vgg16")
    canonical["block1_conv1/bias"] = np.zeros(65, np.float32)
    with pytest.raises(WeightFileError, match=r"conv1_1\.bias"):
        from_canonical(canonical, "gatys", "vgg16", source=state)


def test_layout_defaults() -> None:
    assert LAYOUTS["torchvision"].preprocessing == "torch"
    assert LAYOUTS["gatys"].preprocessing == "caffe"
    assert LAYOUTS["adain"].padding == "reflect" and LAYOUTS["adain"].pool_ceil_mode
    assert LAYOUTS["adain"].fixed_keys == ("0.weight", "0.bias")
    assert all(info.flatten_order == "chw" for info in LAYOUTS.values())


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 5), h=st.integers(1, 4), w=st.integers(1, 4), units=st.integers(1, 3))
def test_flatten_orders_agree_with_reshaping_a_map(c: int, h: int, w: int, units: int) -> None:
    rng = np.random.default_rng(c * 100 + h * 10 + w)
    fmap = rng.standard_normal((c, h, w))
    m = rng.uniform(0.1, 10.0, c)
    x_chw, x_hwc = fmap.ravel(), fmap.transpose(1, 2, 0).ravel()
    k_chw = rng.standard_normal((c * h * w, units))
    k_hwc = torch_rows_to_keras(k_chw, c)
    # A permutation of rows: the products pair the same numbers.
    assert np.array_equal(np.sort(k_hwc, axis=0), np.sort(k_chw, axis=0))
    assert np.allclose(x_hwc @ k_hwc, x_chw @ k_chw, rtol=1e-12, atol=1e-12)
    assert np.array_equal(keras_rows_to_torch(k_hwc, c), k_chw)
    assert np.array_equal(convert_flatten_rows(k_chw, c, "chw", "chw"), k_chw)
    # Dividing channel c by m[c] and scaling the rows in the same order keeps the product.
    scaled = (fmap / m[:, None, None]).ravel()
    row = flatten_row_scale(m, c * h * w, "chw")
    assert np.allclose(scaled @ (k_chw * row[:, None]), x_chw @ k_chw, rtol=1e-12, atol=1e-12)
    row_hwc = flatten_row_scale(m, c * h * w, "hwc")
    scaled_hwc = (fmap / m[:, None, None]).transpose(1, 2, 0).ravel()
    assert np.allclose(
        scaled_hwc @ (k_hwc * row_hwc[:, None]), x_hwc @ k_hwc, rtol=1e-12, atol=1e-12
    )


def test_chw_and_hwc_row_scales_differ() -> None:
    # The test above could pass with either order for one channel; make sure the orders differ.
    assert flatten_row_scale([1.0, 2.0], 4, "chw").tolist() == [1.0, 1.0, 2.0, 2.0]
    assert flatten_row_scale([1.0, 2.0], 4, "hwc").tolist() == [1.0, 2.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="multiple"):
        flatten_row_scale([1.0, 2.0], 5, "chw")


def test_compensate_head_after_rescale_is_exact_in_chw() -> None:
    rng = np.random.default_rng(3)
    w = {
        "c1/kernel": rng.standard_normal((3, 3, 3, 4)),
        "c1/bias": rng.standard_normal(4),
        "fc1/kernel": rng.standard_normal((4 * 9, 5)),
        "fc1/bias": rng.standard_normal(5),
    }
    scales = compute_scales({"c1": rng.uniform(0.5, 2.0, 4)}, ["c1"])
    out = compensate_head(rescale(w, scales), "fc1", scales.values["c1"], "chw")
    fmap = rng.uniform(0.0, 1.0, (4, 3, 3))  # a post-ReLU map, C x H x W
    scaled = fmap / scales.values["c1"][:, None, None]
    assert np.allclose(
        scaled.ravel() @ out["fc1/kernel"], fmap.ravel() @ w["fc1/kernel"], rtol=1e-12
    )
    back = compensate_head(out, "fc1", scales.values["c1"], "chw", inverse=True)
    assert np.allclose(back["fc1/kernel"], w["fc1/kernel"], rtol=1e-15)
    assert out["fc1/bias"] is w["fc1/bias"]


def test_pure_modules_import_no_framework() -> None:
    code = (
        "import sys, vggnorm.core.torch_layouts, vggnorm.core.compare; "
        "bad = {'torch', 'keras', 'tensorflow', 'safetensors'} & set(sys.modules); "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------------------------------------
# BatchNorm, features-only and timm layouts (issue #17)

#: torchvision vgg16_bn / vgg19_bn: conv, BatchNorm2d, ReLU per conv (models/vgg.py make_layers).
TORCHVISION_BN_INDICES = {
    "vgg16": [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40],
    "vgg19": [0, 3, 7, 10, 14, 17, 20, 23, 27, 30, 33, 36, 40, 43, 46, 49],
}


def bn_shapes(arch: str, prefix: str = "features.") -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    c_in = 3
    for conv, i in zip(ARCHS[arch].convs, TORCHVISION_BN_INDICES[arch]):
        shapes |= {f"{prefix}{i}.weight": (conv.filters, c_in, 3, 3), f"{prefix}{i}.bias": (conv.filters,)}
        shapes |= {f"{prefix}{i + 1}.{k}": (conv.filters,) for k in ("weight", "bias", "running_mean", "running_var")}
        shapes[f"{prefix}{i + 1}.num_batches_tracked"] = ()
        c_in = conv.filters
    return shapes


def timm_head(hidden: int = 16, classes: int | None = 10) -> dict[str, tuple[int, ...]]:
    shapes = {"pre_logits.fc1.weight": (hidden, 512, 7, 7), "pre_logits.fc1.bias": (hidden,),
              "pre_logits.fc2.weight": (hidden, hidden, 1, 1), "pre_logits.fc2.bias": (hidden,)}
    if classes:
        shapes |= {"head.fc.weight": (classes, hidden), "head.fc.bias": (classes,)}
    return shapes


NEW_CASES = {
    "torchvision_bn-vgg16": (bn_shapes("vgg16"), "torchvision_bn", "vgg16"),
    "torchvision_bn-vgg19-head": (bn_shapes("vgg19") | {k.replace("features.", "classifier."): v for k, v in
                                  state_shapes("torchvision", "vgg19", 25088).items() if k.startswith("classifier")},
                                  "torchvision_bn", "vgg19"),
    "features-vgg16": ({k.removeprefix("features."): v for k, v in state_shapes("torchvision", "vgg16").items()},
                       "features", "vgg16"),
    "features_bn-vgg19": (bn_shapes("vgg19", ""), "features_bn", "vgg19"),
    "timm-vgg16": (state_shapes("torchvision", "vgg16") | timm_head(), "timm", "vgg16"),
    "timm-vgg16-pre-logits": (state_shapes("torchvision", "vgg16") | timm_head(classes=None), "timm", "vgg16"),
    "timm_bn-vgg19": (bn_shapes("vgg19") | timm_head(), "timm_bn", "vgg19"),
}  # fmt: skip


@pytest.mark.parametrize("case", NEW_CASES)
def test_new_layouts_are_detected_and_round_trip(case: str) -> None:
    shapes, layout, arch = NEW_CASES[case]
    assert (detect_layout(shapes), detect_arch(shapes, layout)) == (layout, arch)
    state = random_state({k: v for k, v in shapes.items() if not k.endswith("tracked")})
    state |= {k: np.array(3, np.int64) for k in shapes if k.endswith("tracked")}
    canonical = to_canonical(state, layout, arch)
    assert not any(k.endswith("tracked") for k in canonical)  # counters are no canonical arrays
    back = from_canonical(canonical, layout, arch, source=state)
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_batchnorm_keys_and_indices_are_torchvisions() -> None:
    from vggnorm.core.torch_layouts import native_layer_names, norm_key_map

    for arch, indices in TORCHVISION_BN_INDICES.items():
        assert list(native_layer_names("torchvision_bn", arch).values()) == [f"features.{i}" for i in indices]
        assert list(native_layer_names("features_bn", arch).values()) == [str(i) for i in indices]
    norms = norm_key_map("timm_bn", "vgg16")
    assert norms["block5_conv3_bn/gamma"] == "features.41.weight"
    assert norms["block1_conv1_bn/moving_mean"] == "features.1.running_mean"


def test_timms_conv_head_is_torchvisions_classifier_reshaped() -> None:
    """timm's pre_logits.fc1 is classifier.0 reshaped to (4096, 512, 7, 7) (timm's _filter_fn):
    both become the same canonical Dense kernel, rows in (C, H, W) order."""
    rng = np.random.default_rng(5)
    linear = rng.standard_normal((16, 512 * 49)).astype(np.float32)
    tv = random_state(state_shapes("torchvision", "vgg16", 512 * 49), seed=1)
    tv["classifier.0.weight"] = linear
    timm = {k: v for k, v in tv.items() if k.startswith("features.")}
    timm |= {"pre_logits.fc1.weight": linear.reshape(16, 512, 7, 7), "pre_logits.fc1.bias": tv["classifier.0.bias"],
             "pre_logits.fc2.weight": tv["classifier.3.weight"].reshape(16, 16, 1, 1),
             "pre_logits.fc2.bias": tv["classifier.3.bias"], "head.fc.weight": tv["classifier.6.weight"],
             "head.fc.bias": tv["classifier.6.bias"]}  # fmt: skip
    a, b = to_canonical(tv, "torchvision", "vgg16"), to_canonical(timm, "timm", "vgg16")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    back = from_canonical(b, "timm", "vgg16")  # an export: no source file
    assert back["pre_logits.fc1.weight"].shape == (16, 512, 7, 7)
    assert np.array_equal(back["pre_logits.fc1.weight"], timm["pre_logits.fc1.weight"])


@pytest.mark.parametrize(
    ("shapes", "words"),
    [
        (bn_shapes("vgg16") | {"features.1.running_var": (32,)}, "features.1.running_var has shape (32,)"),
        ({k: v for k, v in bn_shapes("vgg16").items() if k != "features.4.num_batches_tracked"},
         "missing 'features.4.num_batches_tracked'"),
        (state_shapes("torchvision", "vgg16") | timm_head() | {"pre_logits.fc1.weight": (16, 256, 7, 7)},
         "pre_logits.fc1.weight has shape (16, 256, 7, 7)"),
        (state_shapes("torchvision", "vgg16") | {k: v for k, v in timm_head().items() if "fc2" not in k},
         "partial head"),
    ],
    ids=["bn-shape", "bn-counter", "timm-fc1", "timm-partial"],
)  # fmt: skip
def test_new_layout_refusals_name_what_was_found(shapes: dict[str, tuple[int, ...]], words: str) -> None:
    with pytest.raises(WeightFileError) as info:
        detect_arch(shapes, detect_layout(shapes))
    assert words in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# What the refusals say, word for word (the mutation study: docs/testing.md)

_KNOWN = ("not a known PyTorch VGG state dict (torchvision features.N/classifier.N, timm "
          "features.N/pre_logits/head, model.features N.weight, Gatys convB_I, AdaIN): found ")  # fmt: skip
_TV16 = state_shapes("torchvision", "vgg16")


@pytest.mark.parametrize(
    ("shapes", "layout", "message"),
    [
        ({"fc.weight": (10, 512)}, None, _KNOWN + "1 keys (fc.weight)"),
        ({f"k{i}": (1,) for i in (5, 1, 0, 3, 2, 4)}, None, _KNOWN + "6 keys (k0, k1, k2, k3, ...)"),
        ({f"k{i}": (1,) for i in range(4)}, None, _KNOWN + "4 keys (k0, k1, k2, k3)"),
        ({}, None, _KNOWN + "no keys"),
        ({"0.weight": (64, 3, 3, 3), "fc.weight": (10, 64)}, None,
         _KNOWN + "2 keys (0.weight, fc.weight)"),
        ({"0.weight": (64, 4, 3, 3), "0.bias": (64,)}, None, "a bare nn.Sequential whose 0.weight "
         "has shape (64, 4, 3, 3): neither AdaIN's 1x1 input conv (3, 3, 1, 1) nor a VGG's first "
         "conv (reading 3 channels)"),
        (_TV16 | {"features.31.bias": (2,), "features.30.weight": (10,)}, "torchvision",
         "torchvision vgg16: unexpected keys 2 keys (features.30.weight, features.31.bias)"),
        ({k: v for k, v in _TV16.items() if k != "features.28.bias"}, "torchvision",
         "torchvision vgg16: missing 'features.28.bias'"),
        (_TV16 | {"features.2.weight": (64, 64, 5, 5)}, "torchvision",
         "torchvision vgg16: features.2.weight has shape (64, 64, 5, 5), expected (64, 64, 3, 3)"),
        ({k: v for k, v in _TV16.items() if not k.startswith(("features.26", "features.28"))},
         "torchvision", "torchvision state dict with 11 convs: expected 13 (VGG16) or 16 (VGG19)"),
        (_TV16 | {"classifier.0.weight": (16, 500), "classifier.0.bias": (16,)}, "torchvision",
         "torchvision vgg16: partial head, missing ['classifier.3.bias', 'classifier.3.weight', "
         "'classifier.6.bias', 'classifier.6.weight']"),
        (state_shapes("torchvision", "vgg16", 500), "torchvision", "torchvision vgg16: classifier.0 "
         "reads 500 inputs, not a multiple of the last conv's 512 filters"),
        (state_shapes("torchvision", "vgg16", 512 * 49) | {"classifier.0.weight": (16, 512, 49)},
         "torchvision", "torchvision vgg16: classifier.0.weight has shape (16, 512, 49), expected "
         "(units, inputs)"),
        (state_shapes("torchvision", "vgg16", 512 * 49) | {"classifier.0.weight": (16,)},
         "torchvision", "torchvision vgg16: classifier.0.weight has shape (16,), expected "
         "(units, inputs)"),
        (_TV16 | timm_head() | {"pre_logits.fc1.weight": (16,)}, "timm",
         "timm vgg16: pre_logits.fc1.weight has shape (16,), expected (units, 512, k, k)"),
        (_TV16 | timm_head() | {"pre_logits.fc1.weight": (16, 512, 7, 6)}, "timm",
         "timm vgg16: pre_logits.fc1.weight has shape (16, 512, 7, 6), expected (units, 512, k, k)"),
        (_TV16 | timm_head() | {"pre_logits.fc1.weight": (16, 512 * 49)}, "timm",
         "timm vgg16: pre_logits.fc1.weight has shape (16, 25088), expected (units, 512, k, k)"),
        (_TV16 | timm_head() | {"pre_logits.fc1.weight": (16, 256, 7, 7)}, "timm",
         "timm vgg16: pre_logits.fc1.weight has shape (16, 256, 7, 7), expected (units, 512, k, k)"),
    ],
)  # fmt: skip
def test_refusals_word_for_word(shapes: dict[str, tuple[int, ...]], layout: str | None,
                                message: str) -> None:  # fmt: skip
    with pytest.raises(WeightFileError) as info:
        detect_arch(shapes, layout) if layout else detect_layout(shapes)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_row_permutation_and_head_refusals_word_for_word() -> None:
    with pytest.raises(ValueError) as info:
        convert_flatten_rows(np.zeros((5, 2)), 2, "chw", "hwc")
    assert str(info.value) == "5 rows is not a multiple of 2 channels"
    with pytest.raises(ValueError) as info:
        convert_flatten_rows(np.zeros((4, 2)), 0, "chw", "hwc")
    assert str(info.value) == "4 rows is not a multiple of 0 channels"
    for src, dst in (("CHW", "hwc"), ("chw", None), ("hwc", "hwc ")):
        with pytest.raises(ValueError) as info:
            convert_flatten_rows(np.zeros((4, 2)), 2, src, dst)  # type: ignore[arg-type]
        bad = src if src not in ("chw", "hwc") else dst
        assert str(info.value) == f"flatten order {bad!r}: expected 'chw' or 'hwc'"
    with pytest.raises(ValueError) as info:
        compensate_head({"fc2/kernel": np.ones((2, 2))}, "fc1", [1.0], "chw")
    assert str(info.value) == "weights have no 'fc1/kernel'"


def test_export_without_a_source_writes_the_stock_order_and_fresh_counters() -> None:
    shapes = bn_shapes("vgg16") | {k: v for k, v in state_shapes("torchvision", "vgg16", 512 * 49).items()
                                   if k.startswith("classifier")}  # fmt: skip
    state = random_state({k: v for k, v in shapes.items() if not k.endswith("tracked")})
    state |= {k: np.array(9, np.int64) for k in shapes if k.endswith("tracked")}
    canonical = to_canonical(state, "torchvision_bn", "vgg16")
    fresh = from_canonical(canonical, "torchvision_bn", "vgg16")
    assert list(fresh) == list(shapes)  # conv, its BatchNorm (with its counter), ..., the head
    for key, value in fresh.items():
        if key.endswith("tracked"):  # a new file has counted no batches
            assert value.dtype == np.int64 and value.shape == () and value == 0, key
        else:
            assert value.dtype == state[key].dtype and np.array_equal(value, state[key]), key
        # new C-ordered arrays, never views of the canonical ones (a bias is stored as it is)
        assert value.flags.c_contiguous, key
        assert not any(np.may_share_memory(value, c) for c in canonical.values()), key
    convs_only = from_canonical(to_canonical(state, "torchvision_bn", "vgg16", head=False),
                                "torchvision_bn", "vgg16")  # fmt: skip
    assert list(convs_only) == [k for k in shapes if not k.startswith("classifier")]


def test_a_head_left_out_passes_through_from_the_source() -> None:
    state = random_state(state_shapes("torchvision", "vgg16", 512 * 49))
    canonical = to_canonical(state, "torchvision", "vgg16", head=False)
    assert not any(k.startswith(("fc", "predictions")) for k in canonical)
    back = from_canonical(canonical, "torchvision", "vgg16", source=state)
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state if k.startswith("classifier"))
    # a conv the canonical arrays lack is refused, the head's absence is not
    del canonical["block3_conv2/bias"]
    with pytest.raises(WeightFileError) as info:
        from_canonical(canonical, "torchvision", "vgg16", source=state)
    assert str(info.value) == "torchvision vgg16: canonical arrays lack 'block3_conv2/bias'"


def test_from_canonical_names_the_shape_it_refuses() -> None:
    state = random_state(state_shapes("gatys", "vgg16"))
    canonical = to_canonical(state, "gatys", "vgg16")
    canonical["block1_conv1/bias"] = np.zeros(65, np.float32)
    with pytest.raises(WeightFileError) as info:
        from_canonical(canonical, "gatys", "vgg16", source=state)
    assert str(info.value) == ("gatys vgg16: block1_conv1/bias gives conv1_1.bias shape (65,), "
                               "the source has (64,)")  # fmt: skip


def test_row_permutations_and_compensation_copy_and_keep_the_dtype() -> None:
    k = np.arange(12, dtype=np.float32).reshape(6, 2)
    same = convert_flatten_rows(k, 3, "chw", "chw")
    assert np.array_equal(same, k) and not np.shares_memory(same, k)
    moved = convert_flatten_rows(k, 3, "chw", "hwc")  # 3 channels x 2 positions
    assert moved[:, 0].tolist() == [0.0, 4.0, 8.0, 2.0, 6.0, 10.0] and moved.flags.c_contiguous
    # one position (the permutation is the identity, and reshaping could return a view) and a
    # Fortran-ordered kernel: still a new C-ordered array, in either direction
    f = np.asfortranarray(k)
    for src, dst in (("chw", "hwc"), ("hwc", "chw"), ("hwc", "hwc"), ("chw", "chw")):
        for kernel, channels in ((k, 6), (f, 6), (f, 3)):
            out = convert_flatten_rows(kernel, channels, src, dst)  # type: ignore[arg-type]
            assert out.flags.c_contiguous and not np.shares_memory(out, kernel)
            assert np.array_equal(out, kernel if channels == 6 or src == dst else moved if
                                  src == "chw" else keras_rows_to_torch(k, 3))  # fmt: skip
    assert np.array_equal(torch_rows_to_keras(k, 3), moved)
    assert np.array_equal(keras_rows_to_torch(moved, 3), k)
    w = {"fc1/kernel": k.copy(), "fc1/bias": np.ones(2, np.float32)}
    out = compensate_head(w, "fc1", [1.0, 2.0, 4.0], "chw")
    assert out["fc1/kernel"].dtype == np.float32 and np.array_equal(w["fc1/kernel"], k)
    assert out["fc1/kernel"][:, 0].tolist() == [0.0, 2.0, 8.0, 12.0, 32.0, 40.0]
    back = compensate_head(out, "fc1", [1.0, 2.0, 4.0], "chw", inverse=True)
    assert np.array_equal(back["fc1/kernel"], k)


def test_timm_head_with_a_narrower_second_layer_exports_its_shapes() -> None:
    """timm's ConvMlp makes fc2 (out, hidden, 1, 1), square only when mlp_ratio is 1."""
    head = timm_head() | {"pre_logits.fc2.weight": (8, 16, 1, 1), "pre_logits.fc2.bias": (8,),
                          "head.fc.weight": (10, 8)}  # fmt: skip
    shapes = state_shapes("torchvision", "vgg16") | head
    assert detect_arch(shapes, detect_layout(shapes)) == "vgg16"
    state = random_state(shapes)
    canonical = to_canonical(state, "timm", "vgg16")
    assert canonical["fc2/kernel"].shape == (16, 8)
    fresh = from_canonical(canonical, "timm", "vgg16")  # an export: shapes from the arrays alone
    assert {k: v.shape for k, v in fresh.items()} == shapes
    assert all(np.array_equal(fresh[k], state[k]) for k in state)


def test_to_canonical_copies_converts_the_head_present_and_names_a_missing_conv() -> None:
    from vggnorm.core.torch_layouts import KeySpec

    state = random_state(state_shapes("torchvision", "vgg16", 512 * 49))
    canonical = to_canonical(state, "torchvision", "vgg16")
    for key, value in canonical.items():  # biases too: new arrays, never views of the file's
        assert value.flags.c_contiguous and not any(np.may_share_memory(value, v) for v in state.values()), key
    # the head where present: the layers after a missing one are still converted
    partial = {k: v for k, v in state.items() if not k.startswith("classifier.0")}
    out = to_canonical(partial, "torchvision", "vgg16")
    assert sorted(k for k in out if not k.startswith("block")) == [
        "fc2/bias", "fc2/kernel", "predictions/bias", "predictions/kernel"]
    assert sorted(to_canonical(state, "torchvision", "vgg16", head=False)) == sorted(
        k for k in canonical if k.startswith("block"))
    del partial["features.5.bias"]
    with pytest.raises(WeightFileError) as info:
        to_canonical(partial, "torchvision", "vgg16")
    assert str(info.value) == "torchvision vgg16: missing 'features.5.bias'"
    with pytest.raises(ValueError) as bad:
        KeySpec("x.weight", "matrix")  # type: ignore[arg-type]
    assert str(bad.value) == "x.weight: unknown kind 'matrix'"
