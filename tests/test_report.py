"""The report: per-layer summaries, style/content loss math, the figure and JSON."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vggnorm.commands.report import write_report
from vggnorm.core.losses import (
    content_loss,
    gram,
    loss_magnitudes,
    spread,
    spread_table,
    style_loss,
)
from vggnorm.core.precision import NEAR_DEAD_FRACTION
from vggnorm.core.stats import LayerStats
from vggnorm.core.statsrecord import StatsMeta, StatsRecord, layer_summary
from vggnorm.core.verdicts import FUNCTION_TOL

SIZE = 32
U64 = 2.0**-53  # one float64 rounding, relative
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _meta(**changes: Any) -> StatsMeta:
    fields: dict[str, Any] = {
        "model": "vgg16",
        "fingerprint": "0" * 64,
        "weights": "w.h5",
        "size": 32,
        "resize": "crop",
        "interpolation": "bilinear",
        "draft": True,
        "preprocess": "caffe",
        "precision": "fp32",
        "dataset_kind": "folder",
        "dataset_path": "images",
        "dataset_root": "images",
        "annotations": None,
        "dataset_items": 4,
        "selection_sha256": "0" * 64,
        "selection_size": 4,
        "complete": True,
    }
    fields.update(changes)
    return StatsMeta.from_dict(fields)


def _record(per_layer_means: dict[str, list[float]]) -> StatsRecord:
    layers = tuple(
        LayerStats.of(name, np.array([m, m], dtype=np.float64))
        for name, m in per_layer_means.items()
    )
    return StatsRecord(_meta(), layers, ("a.png", "b.png", "c.png", "d.png"))


# ---------------------------------------------------------------------------------------------
# Loss math (pure numpy)


def test_losses_of_a_hand_computed_example() -> None:
    # Image a: 2 positions x 2 filters, F_a rows (1, 0), (0, 2); image b: (1, 1), (0, 0).
    fa = np.array([[[1.0, 0.0], [0.0, 2.0]]])  # (H=1, W=2, C=2)
    fb = np.array([[[1.0, 1.0], [0.0, 0.0]]])
    np.testing.assert_array_equal(gram(fa), [[1.0, 0.0], [0.0, 4.0]])
    np.testing.assert_array_equal(gram(fb), [[1.0, 1.0], [1.0, 1.0]])
    # G_a - G_b = [[0, -1], [-1, 3]]: sum of squares 11; N = 2 filters, M = 2 positions.
    assert style_loss(fa, fb) == 11 / (4 * 2**2 * 2**2)
    # F_a - F_b = (0, -1), (0, 2): 1/2 (1 + 4).
    assert content_loss(fa, fb) == 2.5
    assert style_loss(fa, fa) == content_loss(fa, fa) == 0.0


def test_loss_magnitudes_per_layer() -> None:
    rng = np.random.default_rng(0)
    a = {"c1": rng.uniform(size=(4, 4, 3)), "c2": rng.uniform(size=(2, 2, 5))}
    b = {"c1": rng.uniform(size=(4, 4, 3)), "c2": rng.uniform(size=(2, 2, 5))}
    out = loss_magnitudes(a, b)
    assert list(out) == ["c1", "c2"]
    assert out["c2"] == {
        "style": style_loss(a["c2"], b["c2"]),
        "content": content_loss(a["c2"], b["c2"]),
    }
    with pytest.raises(ValueError, match="different layers"):
        loss_magnitudes(a, {"c1": b["c1"]})
    with pytest.raises(ValueError, match="differ in shape"):
        style_loss(a["c1"], b["c2"])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 6)),
    k=st.integers(-8, 8),
)
def test_scaling_features_by_a_power_of_two_scales_losses_exactly(
    seed: int, shape: tuple[int, int, int], k: int
) -> None:
    # s = 2**k: every product and sum scales without a new rounding, so the powers are exact.
    rng = np.random.default_rng(seed)
    fa, fb = np.maximum(rng.normal(size=(2, *shape)) * 10, 0)
    s = 2.0**k
    assert content_loss(s * fa, s * fb) == s**2 * content_loss(fa, fb)
    assert style_loss(s * fa, s * fb) == s**4 * style_loss(fa, fb)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), s=st.floats(1e-3, 1e3))
def test_scaling_features_by_any_factor_scales_losses_by_its_powers(seed: int, s: float) -> None:
    rng = np.random.default_rng(seed)
    fa, fb = rng.uniform(0, 5, (2, 3, 4, 6))
    assert math.isclose(content_loss(s * fa, s * fb), s**2 * content_loss(fa, fb), rel_tol=1e-12)
    assert math.isclose(style_loss(s * fa, s * fb), s**4 * style_loss(fa, fb), rel_tol=1e-12)


def test_spread_and_spread_table() -> None:
    assert spread([10.0, 1.0, 100.0]) == 100.0
    assert spread([0.0, 1.0]) == math.inf
    assert spread([0.0, 0.0]) == 0.0
    with pytest.raises(ValueError):
        spread([])
    with pytest.raises(ValueError):
        spread([1.0, math.nan])
    before = {"c1": {"style": 1e6, "content": 1e4}, "c2": {"style": 1.0, "content": 1.0}}
    after = {"c1": {"style": 20.0, "content": 5.0}, "c2": {"style": 2.0, "content": 1.0}}
    t = spread_table(before, after)
    assert [r["name"] for r in t["layers"]] == ["c1", "c2"]
    assert t["style"] == {"spread_before": 1e6, "spread_after": 10.0, "factor": 1e5}
    assert t["content"]["factor"] == 1e4 / 5.0


# ---------------------------------------------------------------------------------------------
# Summaries and output files (no Keras)


def test_layer_summary_counts_dead_and_near_dead_filters() -> None:
    record = _record({"c1": [0.0, 1e-5, 1.0, 2.0, 3.0], "c2": [4.0, 4.0]})
    s1, s2 = layer_summary(record)
    assert s1["name"] == "c1" and s1["filters"] == 5
    assert (s1["dead"], s1["dead_filters"]) == (1, [0])
    # 1e-5 < NEAR_DEAD_FRACTION x median (1.0); the dead filter is not counted again.
    assert (s1["near_dead"], s1["near_dead_filters"]) == (1, [1])
    assert (s1["mean_min"], s1["mean_median"], s1["mean_max"]) == (0.0, 1.0, 3.0)
    assert s1["live_min"] == 1e-5
    assert (s2["dead"], s2["near_dead"], s2["mean_min"], s2["mean_max"]) == (0, 0, 4.0, 4.0)
    assert NEAR_DEAD_FRACTION == 1e-3
    # A higher dead threshold turns the near-dead filter into a dead one.
    s1 = layer_summary(record, dead_threshold=1e-4)[0]
    assert (s1["dead"], s1["near_dead"]) == (2, 0)
    all_dead = layer_summary(_record({"c": [0.0, 0.0]}))[0]
    assert (all_dead["dead"], all_dead["live_min"]) == (2, None)


def test_write_report_without_style(tmp_path: Path) -> None:
    record = _record({"block1_conv1": [0.5, 2.0, 30.0], "block1_conv2": [0.0, 1e-4, 5.0, 7.0]})
    png, js = tmp_path / "r.png", tmp_path / "r.json"
    summary = write_report(record, png, js).to_dict()
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    data = json.loads(js.read_text())
    assert data == summary
    assert [r["name"] for r in data["layers"]] == ["block1_conv1", "block1_conv2"]
    assert data["layers"][1]["dead"] == 1 and data["style"] is None
    assert data["images"] == 4 and data["model"] == "vgg16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]  # no temp files


def test_write_report_with_style_writes_no_nan(tmp_path: Path) -> None:
    record = _record({"c1": [1.0, 2.0], "c2": [10.0, 300.0]})
    before = {"c1": {"style": 1e6, "content": 1e3}, "c2": {"style": 0.0, "content": 1.0}}
    after = {"c1": {"style": 2.0, "content": 3.0}, "c2": {"style": 1.0, "content": 1.0}}
    style = spread_table(before, after)  # style spread before is inf: a zero loss
    write_report(record, tmp_path / "r.png", tmp_path / "r.json", style=style)
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["style"]["style"]["spread_before"] is None
    assert data["style"]["content"]["factor"] == 1e3 / 3.0
    with Image.open(tmp_path / "r.png") as im:
        assert im.format == "PNG" and im.size[0] > 1000


def test_write_report_without_matplotlib_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'vggnorm\[plot\]'"):
        write_report(_record({"c": [1.0]}), tmp_path / "r.png", tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Keras: the tiny VGG16 with real statistics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg
    from fixtures.photos import write_photos
    from vggnorm.commands.apply import normalize
    from vggnorm.commands.report import style_content_spread
    from vggnorm.commands.stats import collect_stats
    from vggnorm.core.inputs import Decode
    from vggnorm.core.scaling import scales_for
    from vggnorm.core.topology import bind
    from vggnorm.formats.registry import read_weights
    from vggnorm.runtime.data import load_image

    root = tmp_path_factory.mktemp("report")
    write_photos(root / "images", [f"img{i}.png" for i in range(6)])
    weights = save_downloaded_layout(tiny_vgg(include_top=False, size=SIZE), root / "vgg16.h5")
    record = collect_stats(weights, root / "images", decode=Decode(SIZE), workers=1)
    normalize(weights, root / "vgg16_norm.h5", record)
    ws = read_weights(weights)
    bound = bind(ws.file)
    pair = np.stack([load_image(root / "images" / n, Decode(SIZE)) for n in record.images[:2]])
    norm_arrays = read_weights(root / "vgg16_norm.h5").arrays
    scales = scales_for(record, bound)
    return {
        "record": record,
        "arch": bound.arch,
        "arrays": ws.arrays,
        "norm_arrays": norm_arrays,
        "scales": scales,
        "pair": pair,
        # The two networks on the pair, once for the module: each FeatureNet takes a second.
        "style": style_content_spread(bound.arch, ws.arrays, norm_arrays, scales, pair, "caffe"),
    }


def _loss_bounds(fa: np.ndarray, fb: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    """How far the style and content losses of (fa, fb) can move when every value of filter c
    of either map moves by at most e[c], plus float64's own rounding of both computations.

    Content 1/2 sum d^2, d = fa - fb moving by <= 2e: by <= sum 2|d|e + 2e^2. Gram entries
    G_jk = sum_p F_pj F_pk move by <= g_jk = a_j e_k + e_j a_k + M e_j e_k (a = column sums of
    |F|), their difference D by ga + gb, so the style loss by sum(2|D|g + g^2) / (4 N^2 M^2).
    float64: a Gram entry carries M roundings of the sum of |terms|, the loss N^2 more.
    """
    a, b = fa.reshape(-1, fa.shape[-1]), fb.reshape(-1, fb.shape[-1])
    m, n = a.shape
    d = a - b
    content = float(np.sum(2 * np.abs(d) * e + 2 * e * e))
    content += 2 * (m * n + 4) * U64 * 0.5 * float(np.sum((np.abs(a) + np.abs(b)) ** 2))
    ca, cb = np.abs(a).sum(axis=0), np.abs(b).sum(axis=0)
    g = ca[:, None] * e + e[:, None] * ca + cb[:, None] * e + e[:, None] * cb
    g += 2 * m * np.outer(e, e)
    big = np.abs(a).T @ np.abs(a) + np.abs(b).T @ np.abs(b)
    dg = np.abs(a.T @ a - b.T @ b)
    style = float(np.sum(2 * dg * g + g * g)) / (4.0 * n * n * m * m)
    style += 2 * (m + n * n + 4) * U64 * float(np.sum(big * big)) / (4.0 * n * n * m * m)
    return style, content


@pytest.mark.keras
def test_style_content_spread_on_tiny_vgg16(tiny: dict[str, Any]) -> None:
    from vggnorm.runtime.network import FeatureNet

    arch, scales, result = tiny["arch"], tiny["scales"], tiny["style"]
    names = list(arch.conv_names)
    assert [r["name"] for r in result["layers"]] == names
    # The bound verify derives for a rescaled float32 network (and the one the function enforces).
    assert result["function_rel_err"] <= FUNCTION_TOL
    # What is guaranteed: the normalized losses are the original features divided by the scales.
    acts = FeatureNet(arch, tiny["arrays"], SIZE, outputs="activations").activations(tiny["pair"])
    divided = [a.astype(np.float64) / scales.values[n] for n, a in zip(names, acts)]
    expected = loss_magnitudes(
        {n: d[0] for n, d in zip(names, divided)}, {n: d[1] for n, d in zip(names, divided)}
    )
    # The normalized float32 features of filter c are a / s_c off by <= FUNCTION_TOL max|a| / s_c
    # (the function check above); _loss_bounds carries that through the losses.
    for name, a, d, row in zip(names, acts, divided, result["layers"], strict=True):
        e = FUNCTION_TOL * float(np.abs(a).max()) / np.asarray(scales.values[name], np.float64)
        style_tol, content_tol = _loss_bounds(d[0], d[1], e)
        assert abs(row["style_after"] - expected[name]["style"]) <= style_tol
        assert abs(row["content_after"] - expected[name]["content"]) <= content_tol
    # Not guaranteed in general, but true for this seeded model and these images (about 8x and
    # 18x): on real ImageNet VGG16 the shrink is orders of magnitude larger.
    assert result["style"]["factor"] > 1
    assert result["content"]["factor"] > 1


@pytest.mark.keras
def test_style_content_spread_checks_the_weights_belong_together(tiny: dict[str, Any]) -> None:
    from vggnorm.commands.report import style_content_spread
    from vggnorm.core.errors import VerificationError

    # Without norm_arrays the same normalization is computed from the scales.
    again = style_content_spread(tiny["arch"], tiny["arrays"], None, tiny["scales"], tiny["pair"])
    # rescale gives the very float32 arrays normalize wrote: the same computation, bit-equal.
    assert again["style"]["factor"] == tiny["style"]["style"]["factor"]

    with pytest.raises(VerificationError, match="not this model normalized"):
        style_content_spread(
            tiny["arch"], tiny["arrays"], tiny["arrays"], tiny["scales"], tiny["pair"]
        )
    with pytest.raises(ValueError, match="pair"):
        style_content_spread(tiny["arch"], tiny["arrays"], None, tiny["scales"], tiny["pair"][:1])


@pytest.mark.keras
def test_report_of_tiny_vgg16(tiny: dict[str, Any], tmp_path: Path) -> None:
    from vggnorm.commands.report import summary_text

    style = tiny["style"]
    png, js = tmp_path / "report.png", tmp_path / "report.json"
    write_report(tiny["record"], png, js, style=style)
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == PNG_SIGNATURE
    data = json.loads(js.read_text())
    assert [r["name"] for r in data["layers"]] == list(tiny["arch"].conv_names)
    assert len(data["style"]["layers"]) == 13
    assert data["style"]["style"]["factor"] > 1
    assert sum(r["filters"] for r in data["layers"]) == sum(c.filters for c in tiny["arch"].convs)
    lines = summary_text(data)
    # a line per layer, a line per layer's intervals, and the two loss spreads
    assert len(lines) == 13 + 13 + 2 and "smaller" in lines[-2]
    assert [r["name"] for r in data["intervals"]] == list(tiny["arch"].conv_names)
