"""Negative tests: each breaks exactly one thing and asserts which check fails.

``verify`` proves two things (same function; means of 1), and either alone can be fooled, so each
check is shown failing on its own: a file is made wrong in one way only, ``verify --json`` exits 3
and its ``failures`` name exactly the check and the layer that catch it. Likewise ``compare``
(a file that is not a rescaling) and ``apply`` (stats of another model).

The fast-lane tests build their files by hand (no Keras); the tests marked ``keras`` share one
tiny VGG16 with a top at 32x32, six images, its stats and its normalized file (and the same for
a torchvision VGG16 in a ``.safetensors`` file), each tampered with in its own copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures.h5_layouts import vgg, write_full_model
from fixtures.records import make_record
from vggnorm.cli import EXIT_ERROR, EXIT_OK, EXIT_VERIFY, main
from vggnorm.core import topology
from vggnorm.core.stats import ImageMoments, LayerStats
from vggnorm.core.statsrecord import StatsRecord
from vggnorm.formats.registry import read_weights, write_weights
from vggnorm.formats.statsfile import read_stats, write_stats

SIZE = 32


def _json_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main([*argv, "--json", "-q"])
    return code, json.loads(capsys.readouterr().out)


def _tampered(src: Path, dst: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> Path:
    """A copy of ``src`` (provenance included) whose arrays ``edit`` changed in place."""
    ws = read_weights(src)
    arrays = {k: np.array(v) for k, v in ws.arrays.items()}
    edit(arrays)
    changed = {k: v for k, v in arrays.items() if not np.array_equal(v, ws.arrays[k])}
    assert changed, "the edit changed nothing"
    write_weights(ws, dst, changed, ws.file.provenance)
    return dst


def _layer_scaled(layer: LayerStats, factor: float) -> LayerStats:
    """The layer's sums (and each image's) times ``factor``, its sums of squares times its square:
    a self-consistent stats layer whose means are ``factor`` times the true ones."""
    im = layer.per_image
    assert im is not None
    return replace(layer, sum=layer.sum * factor, sumsq=layer.sumsq * factor**2,
                   per_image=ImageMoments(im.sum * factor, im.sumsq * factor**2, im.images))  # fmt: skip


def _filter_zeroed(layer: LayerStats, c: int) -> LayerStats:
    """The layer with filter ``c``'s sums (and each image's) zero: the stats call it dead."""
    im = layer.per_image
    assert im is not None
    zero = [a.copy() for a in (layer.sum, layer.sumsq, im.sum, im.sumsq)]
    for a in zero:
        a[c] = 0.0
    return replace(layer, sum=zero[0], sumsq=zero[1], per_image=ImageMoments(zero[2], zero[3],
                                                                             im.images))  # fmt: skip


def _with_layer(record: StatsRecord, i: int, layer: LayerStats) -> StatsRecord:
    return replace(record, layers=(*record.layers[:i], layer, *record.layers[i + 1 :]))


# ---------------------------------------------------------------------------------------------
# The fast lane: compare and apply refuse, on hand-built files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A hand-built VGG16 (4..8 filters, a Flatten head) with its config, a stats file made up
    for it, and its normalized copy."""
    root = tmp_path_factory.mktemp("tiny")
    src = write_full_model(vgg("vgg16", top="stock"), root / "vgg16.h5")
    ws = read_weights(src)
    write_stats(root / "stats.h5", make_record(ws, topology.bind(ws.file)))
    from vggnorm.commands.apply import normalize

    normalize(src, root / "norm.h5", root / "stats.h5")
    return {"src": src, "stats": root / "stats.h5", "norm": root / "norm.h5"}


def _compare_failures(report: Mapping[str, Any]) -> list[str]:
    """The layers compare's JSON reports as not fitting the rescaling (its table says NO)."""
    tol = report["tolerance"]
    bad = [row["name"] for row in report["layers"]
           if row["spread"] > tol or row["n_negative"] or row["n_zero_mismatch"]]  # fmt: skip
    head = report["head"]
    if head is not None and (head["spread"] > tol or not head["bias_equal"] or head["n_zero_mismatch"]):
        bad.append(head["name"])
    return bad


def test_compare_accepts_the_normalized_file(
    tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = _json_of(["compare", str(tiny["src"]), str(tiny["norm"])], capsys)
    assert code == EXIT_OK and result["report"]["is_rescaling"]
    assert _compare_failures(result["report"]) == []


@pytest.mark.parametrize(("key", "index", "layer"), [
    ("block3_conv2/bias", (2,), "block3_conv2"),  # one filter's bias off its kernel's scale
    ("block1_conv1/kernel", (1, 1, 0, 3), "block1_conv1"),  # one weight off its filter's scale
    ("fc1/kernel", (5, 0), "fc1"),  # one row of the first Dense off its channel's scale
])  # fmt: skip
def test_compare_refuses_a_file_that_is_not_a_rescaling_naming_the_layer(
    key: str, index: tuple[int, ...], layer: str, tiny: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    def nudge(arrays: dict[str, np.ndarray]) -> None:
        arrays[key][index] *= np.float32(1.01)  # 1% off: far above the 3.6e-6 tolerance

    other = _tampered(tiny["norm"], tmp_path / "other.h5", nudge)
    code, result = _json_of(["compare", str(tiny["src"]), str(other)], capsys)
    assert code == EXIT_VERIFY and not result["report"]["is_rescaling"]
    assert _compare_failures(result["report"]) == [layer]
    rows = [line for line in result["table"].splitlines() if line.endswith("NO")]
    assert [row.split()[0] for row in rows] == ([layer] if layer != "fc1" else [])
    capsys.readouterr()
    assert main(["compare", str(tiny["src"]), str(other)]) == EXIT_VERIFY
    assert "NOT a rescaling" in capsys.readouterr().out


def test_compare_refuses_a_sign_flip(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def flip(arrays: dict[str, np.ndarray]) -> None:  # filter 1 of block4_conv1, whole
        arrays["block4_conv1/kernel"][..., 1] *= -1
        arrays["block4_conv1/bias"][1] *= -1

    other = _tampered(tiny["norm"], tmp_path / "flip.h5", flip)
    code, result = _json_of(["compare", str(tiny["src"]), str(other)], capsys)
    assert code == EXIT_VERIFY
    rows = {row["name"]: row for row in result["report"]["layers"]}
    assert rows["block4_conv1"]["n_negative"] == rows["block4_conv1"]["n_ratios"] // 7
    assert _compare_failures(result["report"])[0] == "block4_conv1"


def test_apply_refuses_stats_of_another_model(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    other = write_full_model(vgg("vgg16", top="stock", seed=1), tmp_path / "other.h5")
    capsys.readouterr()
    code = main(["apply", "--in", str(other), "--out", "o.h5", "--stats", str(tiny["stats"]), "-q"])
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"ERROR {other} is not the model the stats were gathered on")
    assert err.count("\n") == 1 and not Path("o.h5").exists()
    assert main(["apply", "--in", str(tiny["src"]), "--out", "o.h5", "--stats",
                 str(tiny["stats"]), "-q"]) == EXIT_OK  # the same stats on their own model  # fmt: skip


# ---------------------------------------------------------------------------------------------
# verify on real networks (Keras): one tiny VGG16 with a top, six images


@dataclass(frozen=True)
class Job:
    root: Path
    src: Path
    stats: Path
    norm: Path
    record: StatsRecord


def _job(root: Path, src: Path) -> Job:
    from fixtures.photos import write_photos
    from vggnorm.commands.apply import normalize
    from vggnorm.commands.stats import collect_stats
    from vggnorm.core.inputs import Decode

    write_photos(root / "imgs", [f"{i}.png" for i in range(6)], seed=5, max_side=60)
    record = collect_stats(src, root / "imgs", out=root / "stats.h5", decode=Decode(SIZE),
                           batch_size=6, workers=1)  # fmt: skip
    norm = root / f"norm{src.suffix}"
    normalize(src, norm, root / "stats.h5")
    return Job(root, src, root / "stats.h5", norm, record)


@pytest.fixture(scope="module")
def keras_job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    root = tmp_path_factory.mktemp("keras")
    src = save_downloaded_layout(tiny_vgg(include_top=True, arch="vgg16"), root / "vgg16.h5")
    return _job(root, src)


def _verify(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, Any]]:
    return _json_of(["verify", "--in", str(path), "--batch-size", "6", *extra], capsys)


def _live(job: Job, i: int) -> np.ndarray:
    """Filter indices of conv ``i`` by mean, highest first, dead ones left out."""
    m = job.record.layers[i].mean
    order = np.argsort(-m, kind="stable")
    return order[m[order] > 1e-8]


@pytest.mark.keras
def test_the_untampered_file_passes(keras_job: Job, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _verify(keras_job.norm, capsys)
    assert code == EXIT_OK and report["ok"] and report["failures"] == []
    assert report["predictions"]["ok"] and report["means_ok"] is True


@pytest.mark.keras
def test_means_wrong_function_right(
    keras_job: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Applied with stats that do not describe the images (block3_conv2's means faked 1.1 times
    too large, the file self-consistent): the output is exactly the original divided by the stats'
    scales, so the function check passes and only the re-measured means (1/1.1) can tell."""
    from vggnorm.commands.apply import normalize
    from vggnorm.commands.compare import compare_files

    i = 5  # block3_conv2
    faked = _with_layer(keras_job.record, i, _layer_scaled(keras_job.record.layers[i], 1.1))
    write_stats(tmp_path / "faked.h5", faked)
    assert read_stats(tmp_path / "faked.h5").layers[i].mean == pytest.approx(
        1.1 * keras_job.record.layers[i].mean, rel=1e-15)  # the reader took it
    normalize(keras_job.src, tmp_path / "n.h5", tmp_path / "faked.h5")
    assert compare_files(keras_job.src, tmp_path / "n.h5").is_rescaling  # a rescaling, still
    code, report = _verify(tmp_path / "n.h5", capsys)
    assert code == EXIT_VERIFY
    assert report["failures"] == [{"check": "means", "layer": "block3_conv2"}]
    assert report["function_ok"] and report["predictions"]["ok"]
    layer = report["layers"][i]
    live = _live(keras_job, i).size
    assert layer["mean_median"] == pytest.approx(1 / 1.1, rel=1e-4) and live > 0


@pytest.mark.keras
def test_swapped_filters_function_wrong_means_right(
    keras_job: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two filters of the last conv swapped, kernel and bias columns together: each still has
    mean 1, but they no longer compute what their scales and the head's rows say."""
    # the two largest means: a filter's float32 error is relative to its layer's scale, so a
    # filter swapped into the place of one with a far larger mean would fail the means check too
    hi, lo = (int(c) for c in _live(keras_job, 12)[:2])

    def swap(arrays: dict[str, np.ndarray]) -> None:
        for key in ("block5_conv3/kernel", "block5_conv3/bias"):
            arrays[key][..., [hi, lo]] = arrays[key][..., [lo, hi]]

    code, report = _verify(_tampered(keras_job.norm, tmp_path / "swap.h5", swap), capsys)
    assert code == EXIT_VERIFY
    assert report["failures"] == [{"check": "function", "layer": "block5_conv3"},
                                  {"check": "predictions", "layer": "head"}]  # fmt: skip
    assert report["means_ok"] is True


@pytest.mark.keras
def test_first_dense_left_uncompensated(
    keras_job: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A head-only difference: every conv passes both checks, the logits do not."""
    original = read_weights(keras_job.src).arrays["fc1/kernel"]

    def restore(arrays: dict[str, np.ndarray]) -> None:
        arrays["fc1/kernel"] = np.array(original)

    code, report = _verify(_tampered(keras_job.norm, tmp_path / "fc1.h5", restore), capsys)
    assert code == EXIT_VERIFY
    assert report["failures"] == [{"check": "predictions", "layer": "head"}]
    assert report["means_ok"] is True and all(c["function_ok"] for c in report["layers"])


def _dead_claim_wrong(job: Job, i: int, tmp_path: Path) -> tuple[Path, int]:
    """``job``'s source applied with stats that call conv ``i``'s busiest filter dead: it keeps
    scale 1, so the function is unchanged and the live means are 1, but its re-measured mean is
    not the 0 the stats claim."""
    from vggnorm.commands.apply import normalize

    c = int(_live(job, i)[0])
    lying = _with_layer(job.record, i, _filter_zeroed(job.record.layers[i], c))
    write_stats(tmp_path / "lying.h5", lying)
    out = tmp_path / f"dead{job.norm.suffix}"
    normalize(job.src, out, tmp_path / "lying.h5")
    return out, c


@pytest.mark.keras
def test_dead_filter_changed_keras(
    keras_job: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = _dead_claim_wrong(keras_job, 3, tmp_path)  # block2_conv2
    code, report = _verify(out, capsys)
    assert code == EXIT_VERIFY
    assert report["failures"] == [{"check": "dead", "layer": "block2_conv2"}]
    layer = report["layers"][3]
    assert layer["means_ok"] is True and layer["dead_ok"] is False and layer["dead"] >= 1
    assert report["means_ok"] is False and report["function_ok"]


# ---------------------------------------------------------------------------------------------
# verify on a PyTorch layout: a torchvision VGG16 (classifier rows in (C, H, W) order)


@pytest.fixture(scope="module")
def torch_job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    pytest.importorskip("torch")
    from fixtures.torch_vgg import build

    root = tmp_path_factory.mktemp("torch")
    state = {k: v.contiguous().numpy() for k, v in build("torchvision", "vgg16").state_dict().items()}
    from safetensors.numpy import save_file

    save_file(state, str(root / "vgg16.safetensors"))
    return _job(root, root / "vgg16.safetensors")


# The head runs at 224 (torchvision's 7x7 map): two images keep it short.
TORCH_CHECK = ("--check-images", "2")


@pytest.mark.keras
def test_the_untampered_torch_file_passes(
    torch_job: Job, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _verify(torch_job.norm, capsys, *TORCH_CHECK)
    assert code == EXIT_OK and report["failures"] == [] and report["predictions"]["ok"]


@pytest.mark.keras
def test_dead_filter_changed_torch(
    torch_job: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = _dead_claim_wrong(torch_job, 6, tmp_path)  # block3_conv3 (features.14)
    code, report = _verify(out, capsys, *TORCH_CHECK)
    assert code == EXIT_VERIFY
    assert report["failures"] == [{"check": "dead", "layer": "block3_conv3"}]


@pytest.mark.keras
def test_head_compensated_in_keras_order_torch(
    torch_job: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """classifier.0's columns multiplied in Keras's (H, W, C) order (np.tile) instead of
    torch's (C, H, W) (np.repeat): a head-only difference."""
    from vggnorm.core.scaling import scales_for
    from vggnorm.formats.registry import load

    s = scales_for(torch_job.record, load(torch_job.src).bound).values["block5_conv3"]
    original = read_weights(torch_job.src).arrays["fc1/kernel"]
    rows = original.shape[0] // s.size  # 49: the 7x7 map

    def wrong_order(arrays: dict[str, np.ndarray]) -> None:
        right = (original * np.repeat(s, rows)[:, None]).astype(np.float32)
        assert np.array_equal(arrays["fc1/kernel"], right)  # what apply wrote
        arrays["fc1/kernel"] = (original * np.tile(s, rows)[:, None]).astype(np.float32)

    out = _tampered(torch_job.norm, tmp_path / "tile.safetensors", wrong_order)
    code, report = _verify(out, capsys, *TORCH_CHECK)
    assert code == EXIT_VERIFY
    assert report["failures"] == [{"check": "predictions", "layer": "head"}]
