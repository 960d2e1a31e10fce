"""Batches chosen from a memory budget, end to end at 32x32: a tiny budget picks a small batch
with the same statistics, and running out of memory ends with one line, saves progress and
resumes to the same result (issue 18)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures.photos import write_photos
from vggnorm.cli import EXIT_ERROR, EXIT_OK, main
from vggnorm.commands.stats import collect_stats
from vggnorm.core.inputs import Decode
from vggnorm.core.memory import activation_bytes, fixed_bytes, format_bytes
from vggnorm.core.statsrecord import StatsRecord
from vggnorm.formats.registry import load
from vggnorm.formats.statsfile import read_stats

pytestmark = pytest.mark.keras
N_IMAGES = 7  # batches of 2: three full and one of a single image (padded)
U = 2.0**-24  # float32 unit roundoff
# Per conv of VGG16, the terms of each output's dot product (3 x 3 x input channels).
K = [9 * c for c in (3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    root = tmp_path_factory.mktemp("memory")
    write_photos(root / "imgs", [f"{i}.jpg" for i in range(N_IMAGES)], 4, max_side=70)
    weights = save_downloaded_layout(tiny_vgg(arch="vgg16"), root / "vgg16_notop.h5")
    return root / "imgs", weights


def _fixed_and_per_image(weights: Path) -> tuple[int, int]:
    arch = load(weights).bound.arch
    return fixed_bytes(arch), activation_bytes(arch, 32, "fp32")


def _budget(weights: Path, batch: int) -> int:
    """A budget that fits ``batch`` images and a half: the rule picks exactly ``batch``."""
    fixed, per_image = _fixed_and_per_image(weights)
    return fixed + batch * per_image + per_image // 2


def _equal(a: StatsRecord, b: StatsRecord) -> None:
    """The same images summed in the same order at the same batch size: float64 rounding only."""
    assert a.images == b.images
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.count == y.count
        np.testing.assert_allclose(y.sum, x.sum, rtol=1e-12)
        np.testing.assert_allclose(y.sumsq, x.sumsq, rtol=1e-12)


def test_a_tiny_budget_picks_a_small_batch_with_the_same_statistics(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    data, weights = setup
    events: list[Any] = []
    kw: dict[str, Any] = {"decode": Decode(32), "workers": 1}
    small = collect_stats(weights, data, **kw, max_memory=_budget(weights, 2), out=tmp_path / "a.h5",
                          on_plan=events.append, progress=lambda p: events.append(p.images))  # fmt: skip
    plan = events[0]
    assert events[1:] == [2, 4, 6, 7]  # the plan came before the first image
    assert (plan.batch, plan.how) == (2, "chosen")
    assert (small.meta.batch_size, small.meta.peak_memory) == (2, plan.peak)
    assert read_stats(tmp_path / "a.h5").meta.batch_size == 2  # recorded in the file
    one = collect_stats(weights, data, **kw, max_memory=1)  # under the runtime alone: one image
    assert one.meta.batch_size == 1

    _equal(small, collect_stats(weights, data, **kw, batch_size=2))  # auto changes nothing else
    big = collect_stats(weights, data, **kw, batch_size=16)
    assert big.meta.batch_size == 16
    for run in (small, one):
        _within_float32_rounding(run, big)


def _within_float32_rounding(run: StatsRecord, ref: StatsRecord) -> None:
    """Different batch sizes differ only by the order of float32 roundings inside the convs.

    Every image is summed on its own in float64, in the same order, so the only difference is
    each conv output's float32 rounding: a dot product of K terms rounds to about sqrt(K) u of
    its size, and layer l's output carries the roundings of the layers before it, so a filter's
    mean differs by at most about sum_{j<=l} sqrt(K_j) u of its layer's typical mean (1.4e-6
    after block1, 3.6e-5 at the last conv); measured in units of the layer, as ``verify`` does,
    because a sparse filter's mean is small next to its rounding. A factor 4 leaves room for the
    sum of |products| exceeding the output (ReLU cancels part of it). Sums of squares: twice.
    On EPYC-BF16 with TensorFlow 2.21 the means came out identical for batches of 1, 2 and 16
    (at 32 and 224 px); the bound is for kernels that block their loops by batch size.
    """
    for layer, (x, y) in enumerate(zip(run.layers, ref.layers, strict=True)):
        assert x.count == y.count
        bound = 4 * U * sum(np.sqrt(k) for k in K[: layer + 1])
        scale = float(np.median(y.mean))
        assert np.max(np.abs(x.mean - y.mean)) <= bound * scale, x.name
        sq = y.sumsq / y.count
        assert np.max(np.abs(x.sumsq / x.count - sq)) <= 2 * bound * float(np.median(sq)), x.name


def _oom(monkeypatch: pytest.MonkeyPatch, on_call: int) -> None:
    """Keras's forward pass raises TensorFlow's out-of-memory error on its ``on_call``-th call."""
    import keras
    import tensorflow as tf

    real = keras.Model.predict_on_batch
    calls = {"n": 0}

    def exhausted(self: Any, x: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == on_call:
            raise tf.errors.ResourceExhaustedError(
                None, None, "OOM when allocating tensor with shape[2,32,32,64] and type float "
                "on /job:localhost/replica:0/task:0/device:CPU:0 by allocator cpu\n\t [[{{node "
                "block1_conv2}}]]"
            )  # fmt: skip
        return real(self, x)

    monkeypatch.setattr(keras.Model, "predict_on_batch", exhausted)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR out of memory running vgg16 at 32x32 fp32")
    assert "ResourceExhaustedError: OOM when allocating tensor with shape[2,32,32,64]" in err[0]
    return err[0]


def test_out_of_memory_ends_with_one_line_saves_progress_and_resumes(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    data, weights = setup
    monkeypatch.chdir(tmp_path)
    base = ["stats", "--data", str(data), "--weights", str(weights), "--size", "32", "-q"]
    assert main([*base, "--batch-size", "2", "--out", "straight.h5"]) == EXIT_OK

    _oom(monkeypatch, on_call=3)  # the third batch: images 5 and 6
    capsys.readouterr()
    budget = str(_budget(weights, 2))  # a plain number of bytes
    assert main([*base, "--max-memory", budget, "--out", "resumed.h5"]) == EXIT_ERROR
    line = _one_error_line(capsys)
    fixed, per_image = _fixed_and_per_image(weights)
    assert f", batch 2 (estimated peak {format_bytes(fixed + 2 * per_image)}):" in line
    assert line.endswith("; progress saved to resumed.h5; lower --max-memory or --batch-size; "
                         "finish it with the same `vggnorm stats` command and --resume")  # fmt: skip
    partial = read_stats("resumed.h5")
    assert (partial.meta.position, partial.n_images, partial.meta.complete) == (4, 4, False)
    assert partial.meta.batch_size == 2

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main([*base, "--out", "resumed.h5", "--resume"]) == EXIT_OK  # auto: keeps its batch
    resumed = read_stats("resumed.h5")
    assert resumed.meta.complete and resumed.meta.batch_size == 2
    _equal(read_stats("straight.h5"), resumed)


def test_out_of_memory_in_verify_and_report_is_one_line_too(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    data, weights = setup
    monkeypatch.chdir(tmp_path)
    stats = ["--stats", "s.h5"]
    assert main(["stats", "--data", str(data), "--weights", str(weights), "--size", "32",
                 "--batch-size", "2", "--out", "s.h5", "-q"]) == EXIT_OK  # fmt: skip
    assert main(["apply", "--in", str(weights), "--out", "n.h5", *stats, "-q"]) == EXIT_OK
    _oom(monkeypatch, on_call=1)  # verify's function check, its first pass
    capsys.readouterr()
    assert main(["verify", "--in", "n.h5", "--batch-size", "2", "-q"]) == EXIT_ERROR
    line = _one_error_line(capsys)
    assert ", batch 2 (estimated peak " in line
    assert line.endswith("; lower --max-memory or --batch-size")

    _oom(monkeypatch, on_call=1)  # the loss panel: two images, nothing to lower
    assert main(["report", *stats, "--weights", str(weights), "--out", "r.png", "-q"]) == EXIT_ERROR
    line = _one_error_line(capsys)
    assert line.endswith("; the loss panel runs its two images at the size the statistics were "
                         "gathered at")  # fmt: skip
    assert not Path("r.png").exists()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    # Batches of one under a one-image budget: the file still passes (float32 rounding only).
    assert main(["verify", "--in", "n.h5", "--max-memory", str(_budget(weights, 1)), "-q"]) == EXIT_OK
