"""The batch rule: activation sizes counted from the architecture, the batch that fits a budget,
budgets as people write them, and what a resume keeps. Pure arithmetic (no Keras): exact numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vggnorm.core.archs import VGG16, VGG19
from vggnorm.core.memory import (
    INPUT_COPIES,
    RUNTIME_BYTES,
    WEIGHT_COPIES,
    Batching,
    Budget,
    activation_bytes,
    batching_for,
    choose_batch,
    feature_tensors,
    fixed_bytes,
    format_bytes,
    parse_memory,
    plan_batch,
    weight_bytes,
)

NOTOP = VGG16.without_head()
# VGG16 at 224 x 224, counted by hand from the layer shapes (values per image):
CONVS_224 = 2 * 224**2 * 64 + 2 * 112**2 * 128 + 3 * 56**2 * 256 + 3 * 28**2 * 512 + 3 * 14**2 * 512
POOLS_224 = 112**2 * 64 + 56**2 * 128 + 28**2 * 256 + 14**2 * 512 + 7**2 * 512
LARGEST_224 = 224**2 * 64  # block1's outputs: the square the moments reduction forms
PIXELS_224 = 224**2 * 3
# 3x3 kernels and biases of the 13 convs: 14,714,688 parameters.
CONV_PARAMS = sum(9 * a * b + b for a, b in [(3, 64), (64, 64), (64, 128), (128, 128),
                  (128, 256), (256, 256), (256, 256), (256, 512)] + [(512, 512)] * 5)  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("1.5 GB", 1_500_000_000), ("2gib", 2**31),
     ("4096", 4096), ("3kB", 3000), ("1e3 MB", 10**9), (" 7 B ", 7)],
)  # fmt: skip
def test_budgets_are_read_as_people_write_them(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["8G", "512M", "", "GB", "-1GB", "0", "0.1B", "eight GB", "8 GB x"])
def test_ambiguous_or_impossible_budgets_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_memory(text)


def test_sizes_are_printed_in_binary_units() -> None:
    assert format_bytes(1536 * 2**20) == "1.5 GiB"
    assert format_bytes(512 * 2**20) == "512 MiB"
    assert format_bytes(100) == "100 B"


def test_the_features_make_the_tensors_their_shapes_say() -> None:
    tensors = list(feature_tensors(NOTOP, 224))
    assert [kind for kind, _ in tensors].count("conv") == 13
    assert sum(n for kind, n in tensors if kind == "conv") == CONVS_224 == 13_547_520
    assert sum(n for kind, n in tensors if kind == "pool") == POOLS_224 == 1_530_368
    assert not [kind for kind, _ in tensors if kind == "extra"]
    # An odd size floors at every pooling: 225 -> 112 -> 56 -> 28 -> 14 -> 7.
    assert list(feature_tensors(NOTOP, 225))[-1] == ("pool", 7 * 7 * 512)


def test_reflection_padding_adds_each_padded_input() -> None:
    from dataclasses import replace

    zero = list(feature_tensors(VGG19, 64))
    reflect = list(feature_tensors(replace(VGG19, padding="reflect"), 64))
    extra = [n for kind, n in reflect if kind == "extra"]
    assert len(extra) == 16 and extra[0] == 66 * 66 * 3  # the image, padded for conv1_1
    assert [t for t in reflect if t[0] != "extra"] == zero


def test_one_image_costs_its_activations_its_square_and_its_input() -> None:
    fp32 = 4 * (CONVS_224 + POOLS_224 + LARGEST_224) + PIXELS_224 * (INPUT_COPIES + 4)
    assert activation_bytes(NOTOP, 224, "fp32") == fp32 == 74_360_832
    # bf16: activations in 2 bytes, the float32 preprocessed input cast once more to bf16.
    bf16 = 2 * (CONVS_224 + POOLS_224 + LARGEST_224) + PIXELS_224 * (INPUT_COPIES + 4 + 2)
    assert activation_bytes(NOTOP, 224, "bf16") == bf16 == 38_083_584
    # verify's side-by-side pass keeps both networks' float32 conv outputs on the host.
    assert activation_bytes(NOTOP, 224, "fp32", host_copies=2) == fp32 + 2 * 4 * CONVS_224
    # The head is not run: it changes nothing per image.
    assert activation_bytes(VGG16, 224, "fp32") == fp32


def test_weights_count_the_convs_and_the_head() -> None:
    fc = 7 * 7 * 512 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
    assert weight_bytes(VGG16) == (4 * CONV_PARAMS, 4 * fc) == (58_858_752, 494_571_424)
    assert weight_bytes(NOTOP) == (58_858_752, 0)
    assert fixed_bytes(NOTOP) == RUNTIME_BYTES + WEIGHT_COPIES * 58_858_752 == 847_664_896
    assert fixed_bytes(VGG16) == fixed_bytes(NOTOP) + 494_571_424  # read, never built


def test_the_batch_is_the_most_that_fits_between_one_and_sixteen() -> None:
    fixed, per = 1000, 300
    assert choose_batch(fixed + 2 * per, fixed, per) == 2  # exactly two fit
    assert choose_batch(fixed + 2 * per - 1, fixed, per) == 1
    assert choose_batch(fixed + 100 * per, fixed, per) == 16  # never above 16
    assert choose_batch(fixed + 100 * per, fixed, per, cap=8) == 8  # a resume's own batch
    assert choose_batch(10, fixed, per) == 1  # under the fixed part: one image is still tried
    with pytest.raises(ValueError):
        choose_batch(10, fixed, 0)


@pytest.mark.parametrize(
    ("size", "budget", "batch"),
    [(1024, "8GB", 4), (512, "4GB", 8), (224, "8GB", 16), (1024, "1GB", 1), (1024, "16GiB", 10)],
)
def test_vgg16_at_large_sizes_under_a_budget(size: int, budget: str, batch: int) -> None:
    limit = parse_memory(budget)
    per = activation_bytes(NOTOP, size)  # 1,553,989,632 at 1024; 388,497,408 at 512
    assert batch == max(1, min(16, (limit - 847_664_896) // per))  # the rule, by hand
    plan = plan_batch(NOTOP, size, "fp32", Batching(max_memory=limit), Budget(limit, "given"))
    assert (plan.batch, plan.how) == (batch, "chosen")
    assert plan.peak == 847_664_896 + batch * per
    assert plan.fits == (batch > 1 or plan.peak <= limit)


def test_a_given_batch_is_kept_and_said_when_it_does_not_fit() -> None:
    budget = Budget(2 * 10**9, "the given maximum")
    plan = plan_batch(NOTOP, 1024, "fp32", Batching(16), budget)
    assert (plan.batch, plan.how, plan.fits) == (16, "given", False)
    line = plan.describe()
    assert line.startswith("batch 16 at 1024x1024 fp32: estimated peak memory 23.9 GiB (as given")
    assert "1.86 GiB, the given maximum" in line and "may run out of memory" in line
    unknown = plan_batch(NOTOP, 1024, "fp32", Batching(), Budget(None, "unknown: no /proc"))
    assert (unknown.batch, unknown.fits) == (16, True)  # as before batches were chosen


def test_a_resume_keeps_its_batch_unless_told_otherwise() -> None:
    assert batching_for("auto") == Batching("auto")
    assert batching_for("auto", 10**9) == Batching("auto", 10**9)
    assert batching_for("auto", None, recorded=4) == Batching(4, kept=True)
    assert batching_for("auto", 10**9, recorded=4) == Batching("auto", 10**9, cap=4)
    assert batching_for(8, None, recorded=4) == Batching(8)  # a given number wins
    kept = plan_batch(NOTOP, 224, "fp32", Batching(4, kept=True), Budget(10**10, "x"))
    assert kept.how == "kept" and "kept from the saved run" in kept.describe()


@pytest.mark.parametrize(("size", "memory"), [(0, None), ("all", None), (2.5, None), ("auto", 0)])
def test_impossible_batches_are_refused_in_the_library(size: object, memory: int | None) -> None:
    from vggnorm.commands.stats import StatsOptions
    from vggnorm.core.errors import StatsError

    with pytest.raises(StatsError, match="expected"):
        StatsOptions(batch_size=size, max_memory=memory)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--max-memory", "8G"], "8GB or 512MiB"), (["--batch-size", "most"], "whole number")],
)
def test_impossible_batches_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from vggnorm.cli import EXIT_USAGE, build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["stats", "--data", ".", *argv])
    assert e.value.code == EXIT_USAGE and message in capsys.readouterr().err
    args = build_parser().parse_args(["verify", "--batch-size", "AUTO", "--max-memory", "6GiB"])
    assert (args.batch_size, args.max_memory) == ("auto", 6 * 2**30)


def test_out_of_memory_asks_for_a_smaller_budget_and_a_resume() -> None:
    from vggnorm.cli import _message
    from vggnorm.core.errors import OutOfMemoryError

    e = OutOfMemoryError("out of memory running vgg16", fix="memory+resume")
    assert _message(e) == (
        "out of memory running vgg16; lower --max-memory or --batch-size; finish it with the "
        "same `vggnorm stats` command and --resume"
    )


def test_a_given_budget_is_used_as_it_is() -> None:
    from vggnorm.runtime.network import device_budget

    assert device_budget(123_456) == Budget(123_456, "the given maximum")


def _cgroup(tmp_path: Path, limit: str, usage: int, inactive: int) -> tuple[str, ...]:
    for name, text in [("max", limit), ("current", str(usage)),
                       ("stat", f"anon 5\ninactive_file {inactive}\n")]:  # fmt: skip
        (tmp_path / name).write_text(text + "\n")
    return (*(str(tmp_path / n) for n in ("max", "current", "stat")), "inactive_file")


def test_a_cgroup_limit_leaves_its_limit_less_the_working_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vggnorm.runtime import network

    monkeypatch.setattr(network, "_CGROUP_FILES", (_cgroup(tmp_path, "1000", 700, 50),))
    assert network._cgroup_left() == 350  # 1000 - (700 - 50): page cache is reclaimable
    monkeypatch.setattr(network, "_CGROUP_FILES", (_cgroup(tmp_path, "max", 700, 50),))
    assert network._cgroup_left() is None
    monkeypatch.setattr(network, "_CGROUP_FILES", (("/nonexistent/memory.max", "", "", ""),))
    assert network._cgroup_left() is None


def test_this_process_can_use_what_it_holds_and_what_is_free() -> None:
    from vggnorm.runtime.network import _kib_field, host_available

    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc")
    held = _kib_field("/proc/self/status", "VmRSS")
    available = host_available()
    assert available is not None and available > held > 0
