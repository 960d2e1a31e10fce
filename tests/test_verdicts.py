"""verify's judging code (vggnorm.core.verdicts), proven check by check on crafted numbers.

Every test breaks exactly one thing and asserts which check fails, so that neither check of
``verify`` can be replaced by "always ok" unnoticed. The numbers are chosen exact in binary
(counts of 1, means like 1.25), so every boundary is tested at the tolerance itself and one float
step past it; the networks that feed these verdicts are exercised in tests/test_negative.py.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vggnorm.core.archs import ActivationSpec, Arch, ConvSpec, DenseSpec, HeadSpec, NormSpec
from vggnorm.core.rescale import Scales
from vggnorm.core.stats import ImageMoments, LayerStats
from vggnorm.core.verdicts import (
    DEAD_TOL,
    FUNCTION_TOL,
    MEANS_TOL,
    HeldOutCheck,
    LayerCheck,
    OutputComparison,
    VerifyReport,
    function_errors,
    judge_held_out,
    judge_layer,
    judge_predictions,
    logits_arch,
)

ABOVE = np.inf  # np.nextafter(x, ABOVE): the next float past a tolerance


def stats(name: str, means: list[float], count: int = 1) -> LayerStats:
    """A layer whose filters' means are exactly ``means`` (sums over ``count`` values)."""
    m = np.asarray(means, dtype=np.float64)
    return LayerStats(name, m * count, m * m * count, count)


def scales(name: str, values: list[float], dead: Sequence[int] = ()) -> Scales:
    return Scales(
        (name,), {name: np.asarray(values, np.float64)}, {name: np.asarray(dead, np.int64)}
    )


def judge(measured: list[float], values: list[float], *, dead: Sequence[int] = (),
          before: list[float] | None = None, err: float = 0.0, tol: float = 1e-4,
          full: bool = True) -> LayerCheck:  # fmt: skip
    """judge_layer of layer "c" re-measured at ``measured`` with scales ``values``."""
    before = before if before is not None else [0.0] * len(measured)
    return judge_layer("c", err, stats("c", measured), stats("c", before), scales("c", values, dead),
                       tol, full)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# judge_layer: the per-layer function, means and dead-filter checks


def test_a_normalized_layer_passes_every_check() -> None:
    check = judge([1.0, 1.0, 1.0], [2.0, 4.0, 8.0])
    assert check == LayerCheck(
        name="c", filters=3, dead=0, function_rel_err=0.0, mean_min=1.0, mean_median=1.0,
        mean_max=1.0, dead_max_err=0.0, means_err=0.0, function_ok=True, means_ok=True,
        dead_ok=True,
    )  # fmt: skip
    assert check.verdict == "ok"


def test_means_error_is_in_units_of_the_layer_median_scale() -> None:
    # scales 1, 2, 4 (median 2): filter 0 is off by 0.25 (0.25 * 1 / 2 = 0.125 in layer units),
    # filter 2 by 0.5 (0.5 * 4 / 2 = 1.0): the worst, weighted by its own scale.
    check = judge([1.25, 1.0, 1.5], [1.0, 2.0, 4.0], tol=1.0)
    assert check.means_err == 1.0
    assert (check.mean_min, check.mean_median, check.mean_max) == (1.0, 1.25, 1.5)
    assert check.means_ok is True and check.verdict == "ok"  # at the tolerance: ok
    past = judge([1.25, 1.0, 1.5], [1.0, 2.0, 4.0], tol=float(np.nextafter(1.0, 0.0)))
    assert past.means_ok is False and past.dead_ok is True and past.function_ok
    assert past.verdict == "FAIL"


def test_a_filter_with_a_small_scale_may_be_off_by_more() -> None:
    # the same 0.5 off 1 is 0.5 * 0.5 / 2 = 0.125 of the layer for a filter of scale 0.5
    check = judge([1.5, 1.0, 1.0], [0.5, 2.0, 4.0], tol=0.125)
    assert check.means_err == 0.125 and check.means_ok is True


def test_dead_filters_are_judged_apart_from_the_live_ones() -> None:
    # filter 0 is dead (scale 1, mean 0 before): its mean 0 is not "off by 1" from the target
    check = judge([0.0, 1.0, 1.0], [1.0, 2.0, 2.0], dead=[0], before=[0.0, 3.0, 5.0])
    assert check.dead == 1 and check.means_err == 0.0 and check.dead_max_err == 0.0
    assert check.means_ok is True and check.dead_ok is True and check.verdict == "ok"
    assert (check.mean_min, check.mean_max) == (1.0, 1.0)  # the live filters only


@pytest.mark.parametrize(("after", "before", "ok"), [
    (DEAD_TOL, 0.0, True),  # moved by exactly the tolerance
    (float(np.nextafter(DEAD_TOL, ABOVE)), 0.0, False),
    (0.0, DEAD_TOL, True),  # either way
    (2.0, 0.5, False),  # the stats called it dead; on the images it fires
])  # fmt: skip
def test_a_dead_filter_must_keep_its_mean(after: float, before: float, ok: bool) -> None:
    check = judge([1.0, after], [3.0, 1.0], dead=[1], before=[3.0, before])
    assert check.dead_max_err == abs(after - before)
    assert check.dead_ok is ok and check.means_ok is True and check.function_ok
    assert check.verdict == ("ok" if ok else "FAIL")


def test_function_error_is_judged_at_the_function_tolerance() -> None:
    assert judge([1.0], [2.0], err=FUNCTION_TOL).function_ok is True
    past = judge([1.0], [2.0], err=float(np.nextafter(FUNCTION_TOL, ABOVE)))
    assert past.function_ok is False and past.means_ok is True and past.verdict == "FAIL"
    assert past.function_rel_err == np.nextafter(FUNCTION_TOL, ABOVE)
    assert judge([1.0], [2.0], err=float("nan")).function_ok is False


def test_means_of_a_subset_of_the_images_are_reported_not_judged() -> None:
    check = judge([5.0, 7.0], [1.0, 2.0], dead=[0], before=[0.0, 1.0], full=False)
    assert check.means_ok is None and check.dead_ok is None
    assert check.verdict == "function ok"
    assert check.means_err == 6.0 and check.dead_max_err == 5.0  # the numbers are still there


def test_a_layer_of_dead_filters_only() -> None:
    check = judge([0.0, 0.0], [1.0, 1.0], dead=[0, 1])
    assert check.means_err == 0.0 and check.means_ok is True and check.dead_ok is True
    assert np.isnan(check.mean_min) and np.isnan(check.mean_median) and np.isnan(check.mean_max)


def test_nothing_re_measured_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^c: no image re-measured$"):
        judge_layer("c", 0.0, LayerStats.empty("c", 2), stats("c", [1.0, 1.0]),
                    scales("c", [1.0, 1.0]), 1e-4, True)  # fmt: skip


def test_means_tolerances_by_precision() -> None:
    assert MEANS_TOL == {"fp32": 1e-4, "bf16": 5e-2}
    assert (FUNCTION_TOL, DEAD_TOL) == (1e-4, 1e-6)


# ---------------------------------------------------------------------------------------------
# function_errors, judge_predictions, logits_arch


def test_function_errors_are_relative_to_the_largest_activation() -> None:
    a = [np.array([[2.0, -4.0]]), np.zeros((1, 2))]
    b = [np.array([[1.0, -0.75]]), np.zeros((1, 2))]
    s = [np.array([2.0, 4.0]), np.array([3.0, 5.0])]
    # layer 0: |b*s - a| = [0, 1], largest |a| = 4 (a negative value); layer 1: all zero
    assert function_errors(a, b, s) == [0.25, 0.0]
    assert function_errors([np.zeros(1)], [np.ones(1)], [np.ones(1)]) == [1.0 / 1e-30]
    with pytest.raises(ValueError):
        function_errors(a, b[:1], s)
    empty = np.zeros((0, 2))  # no image: no error, rather than numpy's max of nothing
    assert function_errors([empty], [empty], [np.ones(2)]) == [0.0]


def test_function_errors_multiply_in_float64() -> None:
    # float32 activations times float32 scales, as verify passes them: the product of two float32
    # numbers is exact in float64 (48 significant bits) and not in float32.
    b, s = np.array([0.1], np.float32), np.array([10.0], np.float32)
    a = np.array([np.float64(b[0]) * np.float64(s[0])])
    assert float(b[0] * s[0]) != a[0]
    assert function_errors([a], [b], [s]) == [0.0]


def test_predictions_are_judged_on_the_largest_logit() -> None:
    assert judge_predictions(0.5, FUNCTION_TOL, 3, 4) == {
        "images": 4, "max_abs_err": 0.5, "max_rel_err": FUNCTION_TOL, "top1_agreement": 0.75,
        "ok": 1.0,
    }  # fmt: skip
    assert judge_predictions(0.5, float(np.nextafter(FUNCTION_TOL, ABOVE)), 4, 4)["ok"] == 0.0
    assert judge_predictions(0.0, float("nan"), 4, 4)["ok"] == 0.0
    nothing = judge_predictions(0.0, 0.0, 0, 0)  # no image compared: not a pass
    assert nothing["ok"] == 0.0 and nothing["top1_agreement"] == 0.0
    one = judge_predictions(0.0, 0.0, 1, 1)  # one image is enough
    assert one["ok"] == 1.0 and one["top1_agreement"] == 1.0


def test_output_comparison_accumulates_over_batches() -> None:
    outputs = OutputComparison()
    # batch 1: two images, logits below 1 (the relative error is to the largest logit, 0.5);
    # image 0 keeps its top class (2), image 1 loses it (0 -> 1)
    a1 = np.array([[0.1, 0.2, 0.5], [0.4, 0.0, 0.3]])
    b1 = np.array([[0.1, 0.2, 0.45], [0.4, 0.41, 0.3]])
    outputs.add(a1, b1)
    assert (outputs.max_abs, outputs.images, outputs.agree) == (0.41, 2, 1)
    assert outputs.max_rel == 0.41 / 0.5
    # batch 2: three images with (1, 2, 2) maps (a row per image), all top classes kept, a
    # smaller error: the worst errors stay batch 1's, the counts add up
    a2 = np.arange(12.0).reshape(3, 1, 2, 2)
    a2[1, 0, 0, 0] = 20.0  # image 1's top class is its first, not its last
    b2 = a2 + 0.01
    outputs.add(a2, b2)
    assert (outputs.max_abs, outputs.max_rel, outputs.images, outputs.agree) == (
        0.41, 0.41 / 0.5, 5, 4)  # fmt: skip
    assert outputs.verdict() == judge_predictions(0.41, 0.41 / 0.5, 4, 5)
    assert outputs.verdict()["max_abs_err"] == 0.41


def _arch(*layers: Any) -> Arch:
    return Arch("t", (ConvSpec("c", 2),), HeadSpec("flatten", tuple(layers)))


def test_logits_arch_leaves_out_a_final_softmax_only() -> None:
    fc, fc2, out = DenseSpec("fc", 4, "relu"), DenseSpec("fc2", 4), DenseSpec("out", 3, "softmax")
    assert logits_arch(_arch(fc, fc2, out)).head == HeadSpec(
        "flatten", (fc, fc2, DenseSpec("out", 3, "linear"))
    )
    act = ActivationSpec("sm", "softmax")
    assert logits_arch(_arch(fc, fc2, act)).head == HeadSpec("flatten", (fc, fc2))
    for kept in (_arch(fc, DenseSpec("out", 3, "linear")), _arch(fc, NormSpec("bn")),
                 _arch(fc, ActivationSpec("r", "relu")), _arch(), Arch("t", ())):  # fmt: skip
        assert logits_arch(kept) == kept


# ---------------------------------------------------------------------------------------------
# the report: every failing check named on its own, in the JSON too


def report(*checks: LayerCheck, predictions: dict[str, float] | None = None,
           held_out: tuple[HeldOutCheck, ...] | None = None, held_out_tol: float | None = None,
           means_checked: bool = True, onnx: dict[str, float] | None = None) -> VerifyReport:  # fmt: skip
    return VerifyReport(
        normalized="n.h5", original="o.h5", stats="s.h5", layers=checks, function_images=2,
        means_images=4, stats_images=4, means_checked=means_checked, function_tol=FUNCTION_TOL,
        means_tol=1e-4, predictions=predictions, held_out=held_out, held_out_tol=held_out_tol,
        onnx=onnx,
    )  # fmt: skip


GOOD = judge([1.0, 1.0], [2.0, 4.0])
PREDICTIONS_OK = judge_predictions(0.0, 0.0, 2, 2)


#: Every check ``failures()`` can name, and the layer it names when it is not a conv layer.
CHECKS = {"function": "c", "means": "c", "dead": "c", "predictions": "head",
          "onnxruntime": "outputs"}  # fmt: skip
ONNX_OK = {"images": 2.0, "max_abs_err": 0.0, "max_rel_err": 0.0, "ok": 1.0}


def _failing(kind: str) -> dict[str, Any]:
    """One layer "c" that fails only ``kind``, or predictions or onnxruntime outputs that fail."""
    if kind == "function":
        return {"layer": judge([1.0, 1.0], [2.0, 4.0], err=1.0)}
    if kind == "means":
        return {"layer": judge([1.0, 2.0], [2.0, 4.0])}
    if kind == "dead":
        return {"layer": judge([1.0, 0.5], [2.0, 1.0], dead=[1], before=[2.0, 0.0])}
    if kind == "onnxruntime":
        return {"layer": GOOD, "onnx": {**ONNX_OK, "max_rel_err": 1.0, "ok": 0.0}}
    assert kind == "predictions"
    return {"layer": GOOD, "predictions": judge_predictions(1.0, 0.5, 1, 2)}


def test_every_check_the_report_can_name_is_tested() -> None:
    """A new check comes with a case here (and so with a test that fails without it)."""
    import vggnorm.core.verdicts as verdicts

    if "MUTANT_UNDER_TEST" in os.environ:  # scripts/mutation.py: the source holds every mutant
        pytest.skip("reads the source, which mutmut has rewritten")
    source = Path(verdicts.__file__).read_text(encoding="utf8")
    named = set(re.findall(r'\{"check": "([\w-]+)"', source))
    assert named == {*CHECKS, "held-out"}  # held-out: test_held_out_means_fail_only_with_a_tolerance


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_each_check_fails_alone_and_is_named(kind: str) -> None:
    case = _failing(kind)
    other = replace(GOOD, name="d")
    r = report(other, case["layer"], predictions=case.get("predictions", PREDICTIONS_OK),
               onnx=case.get("onnx", ONNX_OK))  # fmt: skip
    layer = CHECKS[kind]
    assert r.failures() == [{"check": kind, "layer": layer}]
    assert r.ok is False
    assert r.function_ok is (kind not in ("function", "predictions", "onnxruntime"))
    assert r.means_ok is (kind not in ("means", "dead"))
    d = json.loads(r.to_json())
    assert d["failures"] == [{"check": kind, "layer": layer}] and d["ok"] is False
    assert (d["function_ok"], d["means_ok"]) == (r.function_ok, r.means_ok)


def test_a_passing_report_names_no_failure() -> None:
    r = report(GOOD, replace(GOOD, name="d"), predictions=PREDICTIONS_OK)
    assert r.ok and r.function_ok and r.means_ok and r.held_out_ok is None
    assert r.failures() == [] and r.to_dict()["failures"] == []
    assert report(GOOD).ok  # no head: no predictions to judge
    assert r.to_json() == json.dumps(r.to_dict(), indent=2)  # what `verify --json` prints


def test_several_failures_are_each_named_in_order() -> None:
    bad = judge([1.0, 2.0, 3.0], [2.0, 4.0, 1.0], dead=[2], before=[1.0, 1.0, 0.0], err=1.0)
    r = report(GOOD, bad, predictions=judge_predictions(1.0, 1.0, 0, 2))
    assert r.failures() == [{"check": "function", "layer": "c"}, {"check": "means", "layer": "c"},
                            {"check": "dead", "layer": "c"},
                            {"check": "predictions", "layer": "head"}]  # fmt: skip
    r = report(GOOD, bad, onnx={**ONNX_OK, "ok": 0.0}, held_out=(held("c", 1.0),), held_out_tol=0.5)
    assert [f["check"] for f in r.failures()] == ["function", "means", "dead", "onnxruntime",
                                                  "held-out"]  # fmt: skip


def test_means_not_judged_do_not_fail_the_report() -> None:
    subset = judge([5.0, 7.0], [1.0, 2.0], full=False)
    r = report(subset, means_checked=False)
    assert r.means_ok is None and r.ok and r.failures() == []
    assert r.to_dict()["means_ok"] is None


def held(name: str, median_dev: float) -> HeldOutCheck:
    return HeldOutCheck(name, 3, 2, median_dev, median_dev, median_dev, None, None)


def test_held_out_means_fail_only_with_a_tolerance() -> None:
    checks = (held("c", 0.25), held("d", 0.5))
    assert report(GOOD, held_out=checks).held_out_ok is None
    not_asked = report(GOOD, held_out_tol=0.5)  # a tolerance without held-out images
    assert not_asked.held_out_ok is None and not_asked.failures() == []
    assert report(GOOD, held_out=checks).failures() == []
    at = report(GOOD, held_out=checks, held_out_tol=0.5)
    assert at.held_out_ok is True and at.ok and at.failures() == []
    past = report(GOOD, held_out=checks, held_out_tol=0.25)
    assert past.held_out_ok is False and not past.ok and past.function_ok and past.means_ok
    assert past.failures() == [{"check": "held-out", "layer": "d"}]
    assert past.to_dict()["held_out_ok"] is False
    assert held("c", 0.25).ok(0.25) and not held("c", 0.25).ok(0.125)


# ---------------------------------------------------------------------------------------------
# judge_held_out


def test_held_out_numbers_of_the_live_filters() -> None:
    # two images: the per-image means of seven filters; filter 6 is dead in the stats
    per_image = np.array([[1.0, 1.5, 0.25, 2.0, 0.5, 1.75, 1.0],
                          [1.0, 1.0, 0.75, 2.0, 0.5, 2.25, 1.0]])  # fmt: skip
    im = ImageMoments.of(per_image)
    ls = LayerStats("c", im.sum * 10, im.sumsq * 10, 20, im)  # 10 positions per image
    check = judge_held_out("c", ls, scales("c", [1.0] * 7, dead=[6]))
    # live means 1, 1.25, 0.5, 2, 0.5, 2: |mean - 1| = 0, 0.25, 0.5, 1, 0.5, 1
    assert (check.name, check.images, check.live) == ("c", 2, 6)
    assert (check.median_dev, check.p99_dev, check.worst_dev) == (0.5, 1.0, 1.0)
    # 95% intervals over 2 images: mean +- t * sd / sqrt(2), t = tan(0.475 pi) (Student, 1 df).
    # Filters 0-2 and 5 hold 1; filter 3 (always 2) and 4 (always 0.5) do not; the dead filter
    # (always 1) is not counted.
    assert check.within == 4
    # relative half-widths t * se / mean: 0, 0.2 t, 0.5 t, 0, 0, 0.125 t -> median 0.0625 t
    t = math.tan(0.475 * math.pi)
    assert check.median_half_width == pytest.approx(0.0625 * t, rel=1e-12)


def test_held_out_intervals_need_two_images() -> None:
    im = ImageMoments.of([[1.5, 2.0]])
    check = judge_held_out("c", LayerStats("c", im.sum, im.sumsq, 1, im), scales("c", [1.0, 1.0]))
    assert check.within is None and check.median_half_width is None and check.images == 1
    assert check.median_dev == 0.75 and check.worst_dev == 1.0
    no_images = judge_held_out("c", stats("c", [1.0]), scales("c", [1.0]))
    assert no_images.images == 0 and no_images.within is None
    with pytest.raises(ValueError, match=r"^c: no held-out image measured$"):
        judge_held_out("c", LayerStats.empty("c", 1), scales("c", [1.0]))


def test_held_out_with_every_filter_dead() -> None:
    im = ImageMoments.of([[0.0], [0.0]])
    check = judge_held_out("c", LayerStats("c", im.sum, im.sumsq, 2, im), scales("c", [1.0], [0]))
    assert (check.live, check.median_dev, check.p99_dev, check.worst_dev) == (0, 0.0, 0.0, 0.0)
    assert check.within == 0 and check.median_half_width == 0.0


# ---------------------------------------------------------------------------------------------
# the console report, line by line


def test_summary_of_a_failing_report() -> None:
    bad = judge([1.0, 1.25, 0.0], [2.0, 4.0, 1.0], dead=[2], err=2.5e-5)  # filter 1: 0.25 * 4 / 3
    r = replace(
        report(replace(GOOD, name="block1_conv1"), replace(bad, name="b"),
               predictions=judge_predictions(0.25, 0.5, 1, 2),
               held_out=(HeldOutCheck("block1_conv1", 3, 2, 0.015, 0.0625, 0.125, 1, 0.5),
                         HeldOutCheck("b", 3, 2, 0.5, 0.5, 0.5, None, None)),
               held_out_tol=0.25),
        notes=("a note",),
        stats_precision=({"median": 0.01, "p99": 0.02}, {"median": 0.03, "p99": 0.015}),
    )  # fmt: skip
    assert r.summary() == [
        "layer            filters  dead  func rel err   mean min     median        max   mean err"
        "  result",
        "-" * 96,
        "block1_conv1           2     0      0.00e+00   1.000000   1.000000   1.000000   0.00e+00"
        "  ok",
        "b                      3     1      2.50e-05   1.000000   1.125000   1.250000   3.33e-01"
        "  FAIL",
        "predictions on 2 images: max abs err 0.25, max rel err 0.5, top-1 agreement 50.0%",
        "note: a note",
        "precision of the stats' means over 4 images (95% interval, worst layer): ±3.00% median "
        "filter, ±2.00% 99th percentile: on new images of the same distribution the means are 1 "
        "within about that",
        "held-out images: means of the normalized network on 3 images the stats never saw (live "
        "filters: |mean - 1| median, 99th percentile, worst; intervals that hold 1)",
        "  block1_conv1     1.50%  6.25%  12.50%  1/2 (±50.0%)",
        "  b                50.00%  50.00%  50.00%  n/a",
        "held-out means (tol 0.25 median): FAILED",
        "same function (2 images, tol 0.0001): FAILED; means = 1 (4 of 4 stats images, tol "
        "0.0001): FAILED",
    ]


def test_summary_of_a_passing_report_and_of_unjudged_means() -> None:
    r = report(GOOD, held_out=(held("c", 0.25),), held_out_tol=0.5)
    lines = r.summary()
    assert lines[-5] == "precision of the stats' means: unknown (a version-1 stats file)"
    assert lines[-3:] == [
        "  c                25.00%  25.00%  25.00%  n/a",
        "held-out means (tol 0.5 median): ok",
        "same function (2 images, tol 0.0001): ok; means = 1 (4 of 4 stats images, tol 0.0001): ok",
    ]
    onnx = {"images": 3.0, "max_abs_err": 0.5, "max_rel_err": 0.25, "ok": 1.0}
    assert report(GOOD, onnx=onnx).summary()[3] == (
        "onnxruntime, both files on 3 images: outputs max abs err 0.5, max rel err 0.25: ok")
    assert report(GOOD, onnx={**onnx, "ok": 0.0}).summary()[3].endswith(": FAILED")
    subset = report(judge([2.0], [1.0], full=False), means_checked=False,
                    held_out=(held("c", 0.25),))  # fmt: skip
    lines = subset.summary()
    assert lines[2].endswith("  function ok")
    assert lines[-2:] == [
        "held-out means: informational (no tolerance given)",
        "same function (2 images, tol 0.0001): ok; means = 1 (4 of 4 stats images, tol 0.0001): "
        "not judged",
    ]
    assert report(GOOD).held_out_lines() == []
