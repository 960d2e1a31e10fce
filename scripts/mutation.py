"""The mutation study (docs/testing.md): mutmut mutates the pure core and verify's judging code,
module by module, runs the fast lane against each mutant and prints the kill rate per module.

    .venv/bin/python scripts/mutation.py                     # every module: 54 min on 2 cores
    .venv/bin/python scripts/mutation.py rescale verdicts    # some modules
    .venv/bin/python scripts/mutation.py --reuse compare     # more modules, in the last copy
    .venv/bin/python scripts/mutation.py --table             # the results so far
    .venv/bin/python scripts/mutation.py --table --survivors # ... and every survivor's diff

Not part of CI. mutmut's settings (which files, which tests) are ``[tool.mutmut]`` in
pyproject.toml. Each run first copies the package, tests, fixtures, scripts and docs into
``mutants/study/`` (git ignores ``mutants/``), so that the study sees one state of the tree
while it runs, and mutmut works in that copy (``mutants/study/mutants/``). Fast-lane tests that
already fail on the unmutated copy are left out and named. Each module's result is kept in
``mutants/results/<module>.json`` (mutmut's output in ``<module>.log``). A mutant counts as
killed when a test failed or the tests ran out of time; ``EQUIVALENT`` lists the survivors no
test can kill, each with its reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "mutants" / "study"
RESULTS = ROOT / "mutants" / "results"
COPIED = ("vggnorm", "tests", "fixtures", "scripts", "docs", ".ci", "pyproject.toml", "README.md",
          "LICENSE")  # fmt: skip
#: The modules studied, in the order they run: cheapest first; torch_layouts last (its tests
#: build and run whole VGGs in torch: the longest by far).
MODULES = ("verdicts", "stats", "precision", "statsrecord", "weightset", "rescale", "compare",
           "torch_layouts")  # fmt: skip
#: mutmut's exit codes (mutmut/stats.py): what a mutant's test run ended with.
STATUS = {"1": "killed", "3": "killed", "0": "survived", "5": "no tests", "33": "no tests",
          "34": "skipped", "36": "timeout", "24": "timeout", "-24": "timeout", "152": "timeout",
          "255": "timeout", "37": "type check", "-11": "segfault", "-9": "segfault",
          "None": "not run"}  # fmt: skip
KILLED = ("killed", "timeout")
#: Surviving mutants no test can kill, and why (docs/testing.md lists them): the mutated code
#: computes the same result on every input the function accepts.
EQUIVALENT: dict[str, str] = {
    # rescale
    **dict.fromkeys(["vggnorm.core.rescale.x__conv_rescaled__mutmut_16",
                     "vggnorm.core.rescale.x__divided__mutmut_11",
                     "vggnorm.core.rescale.x__head_compensated__mutmut_29"],
        "astype(None) for astype(np.float64): numpy's default dtype is float64"),
    "vggnorm.core.rescale.x__conv_rescaled__mutmut_32":
        "`if norm or True`: without a BatchNormalization the keys are 'None/beta' and "
        "'None/moving_mean', which no weight set holds, and keys not held are skipped",
    "vggnorm.core.rescale.x_flatten_row_scale__mutmut_28":
        "rows / m.size for rows // m.size: rows is a multiple of m.size (checked just above), "
        "and np.repeat takes a float count with an integral value",
    "vggnorm.core.stats.xǁLayerStatsǁof__mutmut_12":
        "reshape(-2, C) for reshape(-1, C): numpy takes any negative size as the one to infer",
    "vggnorm.core.stats.xǁLayerStatsǁof__mutmut_30":
        "`if positions or True`: without position axes, a.mean(axis=()) is a itself",
    # precision: betacf, the modified Lentz continued fraction
    **dict.fromkeys([f"vggnorm.core.precision.x__betacf__mutmut_{n}" for n in (17, 19, 64, 66, 73, 75)],
        "the guard against a zero denominator (|d| or |c| below 1e-300) changed or removed: no "
        "argument betainc passes brings a denominator near 0 (x stays below the split point)"),
    "vggnorm.core.precision.x__betacf__mutmut_26":
        "1000 terms made 1001: the fraction converges long before (the loop stops at 1e-15)",
    **dict.fromkeys([f"vggnorm.core.precision.x__betacf__mutmut_{n}" for n in (80, 81, 82, 83)],
        "the stop test changed: the loop runs to its last term instead of stopping once "
        "converged; later terms move the value by under 3e-13 relative (measured against scipy)"),
    # precision: lgamma differences
    **dict.fromkeys([f"vggnorm.core.precision.x__lgamma_ratio__mutmut_{n}" for n in (1, 2)],
        "moves the switch to Stirling's series from 20 to 20 inclusive or 21: at 20 both ways are "
        "within 5e-13 (the series' next term); measured, the mutant is as accurate"),
    "vggnorm.core.precision.x__lgamma_ratio__mutmut_22":
        "1/(1261 z^5) for 1/(1260 z^5): changes the difference of two series by under 2e-13 "
        "relative for z >= 20, below the series' own truncation error (5e-13)",
    # precision: betainc
    "vggnorm.core.precision.x_betainc__mutmut_10":
        "`a > b` for `a >= b`: when a == b both orders are the same pair",
    "vggnorm.core.precision.x_betainc__mutmut_25":
        "`<=` at the split point: both continued fractions give I_x there (the split only picks "
        "the faster one)",
    "vggnorm.core.precision.x_betainc__mutmut_31":
        "the split point moved from (a+1)/(a+b+2) to (a+1)/(a+b+3): both fractions still "
        "converge there; measured against scipy, within 1e-14",
    # precision: t_cdf and t_quantile
    "vggnorm.core.precision.x_t_cdf__mutmut_20":
        "`t >= 0` for `t > 0`: at t = 0 the tail is exactly 0.5, so 1 - tail == tail",
    **dict.fromkeys([f"vggnorm.core.precision.x_t_quantile__mutmut_{n}" for n in (21, 26, 29, 31)],
        "the bisection's starting bracket (or its growth, or one more step) changed: it converges "
        "to the same adjacent float64s (checked on 121 (p, df) pairs: identical results)"),
    # precision: classify
    "vggnorm.core.precision.x_classify__mutmut_16":
        "the median when every filter is dead, 0.0 made 1.0: it only decides which live filters "
        "are near-dead, and there are none",
    **dict.fromkeys([f"vggnorm.core.precision.x_classify__mutmut_{n}" for n in (3, 5)],
        "np.asarray(means) without dtype=np.float64: every caller passes float64 means "
        "(LayerStats and ImageMoments hold float64) or Python floats, both float64 already"),
    # statsrecord
    **dict.fromkeys([f"vggnorm.core.statsrecord.x_stats_by_conv__mutmut_{n}" for n in (15, 18, 19)],
        "zip without strict=True: the two lengths were compared just above (an error if they "
        "differ), so zip never meets an early end"),
    # weightset
    **dict.fromkeys([f"vggnorm.core.weightset.x__stored_role__mutmut_{n}" for n in (5, 17)],
        "split(':') or split(':', 2) for split(':', 1), then [0]: the text before the first "
        "colon is the same whatever the number of splits"),
    **dict.fromkeys([f"vggnorm.core.weightset.x__stored_role__mutmut_{n}" for n in (10, 13)],
        "rsplit('/') or rsplit('/', 2) for rsplit('/', 1), then [-1]: the text after the last "
        "slash is the same whatever the number of splits"),
    # compare
    **dict.fromkeys([f"vggnorm.core.compare.xǁCompareReportǁtable__mutmut_{n}" for n in (20, 27)],
        'float("NAN") for float("nan"): Python reads either as NaN'),
    "vggnorm.core.compare.x_ratio_tolerance__mutmut_7":
        "np.dtype(None) for np.dtype(np.float64): numpy's default dtype is float64",
    "vggnorm.core.compare.x__ratios__mutmut_22":
        "the divisor put where a ratio is not taken, 1.0 made 2.0: those quotients are replaced "
        "by NaN just after (the placeholder only avoids dividing by zero)",
    **dict.fromkeys([f"vggnorm.core.compare.x__column_median__mutmut_{n}" for n in (2, 3)],
        "the full sort taken where the partial sort would do: both order the entries that give "
        "the median (the partial sort is only faster)"),
    "vggnorm.core.compare.x__column_median__mutmut_23":
        "partition at (k-2)//2 for (k-1)//2: for even k the two are equal; for odd k the median "
        "index (k-1)//2 = k//2 is partitioned anyway",
    **dict.fromkeys([f"vggnorm.core.compare.x__column_median__mutmut_{n}" for n in (24, 48)],
        "max(k - 1, 1) // 2 for max(k - 1, 0) // 2: they differ only for k <= 1, where both are 0"),
    **dict.fromkeys([f"vggnorm.core.compare.x__compare_conv__mutmut_{n}" for n in (36, 42)],
        "reshape(-2, n) for reshape(-1, n): numpy takes any negative size as the one to infer"),
    "vggnorm.core.compare.x__compare_conv__mutmut_114":
        "a filter with no ratio at all takes its bias ratio, NaN, instead of 1: the next line "
        "sets every scale that is not > 0, NaN included, to 1",
    "vggnorm.core.compare.x__like_bias__mutmut_2":
        "`if norm or True`: without a BatchNormalization the keys are 'None/beta' and "
        "'None/moving_mean', which no weight set holds, and keys not held are skipped",
    **dict.fromkeys([f"vggnorm.core.compare.x__compare_head__mutmut_{n}" for n in (3, 5)],
        "a's head kernel read in its own dtype, not float64: it is multiplied by the float64 row "
        "scales at once, and numpy converts float32/float16 to float64 exactly"),
    **dict.fromkeys([f"vggnorm.core.compare.x_scales_in_intervals__mutmut_{n}" for n in (8, 10)],
        "the scales kept in their own dtype: every use subtracts or compares float64 means, "
        "which numpy does in float64 anyway"),
    # torch_layouts
    **dict.fromkeys(["vggnorm.core.torch_layouts.x__to_theirs__mutmut_46",
                     "vggnorm.core.torch_layouts.x__to_ours__mutmut_37",
                     "vggnorm.core.torch_layouts.x_convert_flatten_rows__mutmut_20",
                     "vggnorm.core.torch_layouts.x_convert_flatten_rows__mutmut_60"],
        "np.array(w, order='C') without copy=True: np.array copies by default"),
    **dict.fromkeys(["vggnorm.core.torch_layouts.x__to_theirs__mutmut_48",
                     "vggnorm.core.torch_layouts.x__to_ours__mutmut_39",
                     "vggnorm.core.torch_layouts.x_convert_flatten_rows__mutmut_22",
                     "vggnorm.core.torch_layouts.x_convert_flatten_rows__mutmut_65"],
        "order='c' for order='C': numpy reads either"),
    "vggnorm.core.torch_layouts.x_compensate_head__mutmut_22":
        "kernel.astype(None) for kernel.astype(np.float64): numpy's default dtype is float64",
    **dict.fromkeys(["vggnorm.core.torch_layouts.x_key_specs__mutmut_36",
                     "vggnorm.core.torch_layouts.x__expected_head__mutmut_33"],
        "the filters of the next-to-last conv for those of the last: 512 and 512 in VGG16 and "
        "VGG19 alike"),
    "vggnorm.core.torch_layouts.x__to_ours__mutmut_31":
        "reshape(n, -2) for reshape(n, -1): numpy takes any negative size as the one to infer",
    "vggnorm.core.torch_layouts.x_to_canonical__mutmut_19":
        "`break` for `continue` when the head is left out: the head's keys come last in "
        "key_specs, so stopping at the first leaves out the same keys as skipping each",
    # verdicts
    "vggnorm.core.verdicts.x_function_errors__mutmut_20":
        "b.astype(None): numpy's default dtype, float64, is what astype(np.float64) gives",
    **dict.fromkeys([f"vggnorm.core.verdicts.xǁOutputComparisonǁadd__mutmut_{n}" for n in (31, 37)],
        "reshape(len(a), -2) for reshape(len(a), -1): numpy takes any negative size as the one "
        "to infer"),
    **dict.fromkeys([f"vggnorm.core.verdicts.xǁOutputComparisonǁadd__mutmut_{n}" for n in (43, 47)],
        "argmax(+1) for argmax(-1) on rows reshaped to two axes: axis 1 is the last axis"),
    "vggnorm.core.verdicts.x_judge_held_out__mutmut_9":
        "`= None` for `= False` into a boolean array: numpy stores None as False",
    **dict.fromkeys([f"vggnorm.core.verdicts.x_judge_layer__mutmut_{n}" for n in (67, 74, 80)],
        'float("NAN") for float("nan"): Python reads either as NaN'),
    "vggnorm.core.verdicts.xǁVerifyReportǁfailures__mutmut_58":
        "held_out_ok is False only when both held_out and held_out_tol are set; when they are "
        "set and it is not False, every held-out layer passes and nothing is added",
}


def _mutmut() -> str:
    script = Path(sys.executable).parent / "mutmut"
    found = str(script) if script.exists() else shutil.which("mutmut")
    if found is None:
        raise SystemExit("mutmut is not installed: pip install mutmut")
    return found


def snapshot() -> None:
    """A fresh copy of what the tests need, in :data:`STUDY`."""
    shutil.rmtree(STUDY, ignore_errors=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, STUDY / name, ignore=skip)
        elif src.is_file():
            STUDY.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, STUDY / name)


def failing_tests() -> list[str]:
    """The fast-lane tests (mutmut's selection, with its pytest options and so with
    fixtures/mutation_session.py) that fail on the unmutated copy."""
    config = tomllib.loads((STUDY / "pyproject.toml").read_text(encoding="utf8"))["tool"]["mutmut"]
    argv = [sys.executable, "-m", "pytest", "-q", "-rf", *config.get("pytest_add_cli_args", []),
            *config.get("pytest_add_cli_args_test_selection", [])]  # fmt: skip
    out = subprocess.run(argv, cwd=STUDY, capture_output=True, text=True, check=False).stdout
    return sorted(set(re.findall(r"^FAILED (\S+)", out, re.M)))


def run_module(module: str, jobs: int, deselected: list[str]) -> float:
    """mutmut on one module in :data:`STUDY`; its statuses saved under :data:`RESULTS`."""
    t0 = time.monotonic()
    env = {**os.environ, "PYTEST_ADDOPTS": " ".join(shlex.quote(f"--deselect={t}")
                                                    for t in deselected)}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / f"{module}.log"
    with log.open("w", encoding="utf8") as out:
        done = subprocess.run([_mutmut(), "run", "--max-children", str(jobs),
                               f"vggnorm.core.{module}.*"], cwd=STUDY, env=env, stdout=out,
                              stderr=subprocess.STDOUT, check=False)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"mutmut failed on core/{module}.py (exit {done.returncode}): see {log}")
    seconds = time.monotonic() - t0
    meta = STUDY / "mutants" / "vggnorm" / "core" / f"{module}.py.meta"
    codes = json.loads(meta.read_text(encoding="utf8"))["exit_code_by_key"]
    (RESULTS / f"{module}.json").write_text(json.dumps({
        "statuses": {name: STATUS.get(str(code), "suspicious") for name, code in codes.items()},
        "seconds": seconds, "jobs": jobs, "deselected": deselected,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, indent=1, sort_keys=True) + "\n", encoding="utf8")  # fmt: skip
    return seconds


def _result(module: str) -> dict[str, object] | None:
    path = RESULTS / f"{module}.json"
    return json.loads(path.read_text(encoding="utf8")) if path.is_file() else None


def survivors(module: str) -> list[str]:
    result = _result(module)
    statuses: dict[str, str] = result["statuses"] if result else {}  # type: ignore[assignment]
    return sorted(n for n, s in statuses.items() if s not in (*KILLED, "not run"))


def table(modules: tuple[str, ...]) -> list[str]:
    """The kill-rate table (Markdown), then how many survivors are not explained."""
    lines = ["| module | killed/total | kill rate | survived | equivalent | no tests | time |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    unexplained, stale = 0, []
    for module in modules:
        result = _result(module)
        if result is None:
            lines.append(f"| `core/{module}.py` | not run | | | | | |")
            continue
        counts = Counter(result["statuses"].values())  # type: ignore[attr-defined]
        total, killed = sum(counts.values()), sum(counts[s] for s in KILLED)
        left = survivors(module)
        equivalent = sum(1 for n in left if n in EQUIVALENT)
        unexplained += len(left) - equivalent
        stale += [n for n, st in result["statuses"].items()  # type: ignore[attr-defined]
                  if n in EQUIVALENT and st in KILLED]  # fmt: skip
        lines.append(f"| `core/{module}.py` | {killed}/{total} | {killed / max(total, 1):.1%} "
                     f"| {counts['survived']} | {equivalent} | {counts['no tests']} "
                     f"| {float(result['seconds']) / 60:.0f} min |")  # type: ignore[arg-type]  # fmt: skip
    if unexplained:
        lines += ["", f"{unexplained} survivor(s) neither killed nor listed as equivalent "
                  "(--survivors shows them)"]  # fmt: skip
    if stale:
        # the control: a mutant that computes the same result cannot fail a test, so either
        # the tests failed for another reason (a broken setup kills every mutant) or the
        # mutant is no longer the listed one (the code changed: recheck EQUIVALENT)
        lines += ["", f"{len(stale)} mutant(s) listed as equivalent were killed: "
                  + ", ".join(stale)]  # fmt: skip
    return lines


def show_survivors(modules: tuple[str, ...]) -> None:
    """Print the diff of every surviving mutant (``mutmut show``) and its reason if known."""
    for module in modules:
        for name in survivors(module):
            shown = subprocess.run([_mutmut(), "show", name], cwd=STUDY, capture_output=True,
                                   text=True, check=False).stdout  # fmt: skip
            print(f"{shown.rstrip()}\n# equivalent: {EQUIVALENT.get(name, 'NOT EXPLAINED')}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"modules of vggnorm/core (default: all: {', '.join(MODULES)})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="mutants tested at once (default: the CPU count)")  # fmt: skip
    parser.add_argument("--table", action="store_true", help="only print the results so far")
    parser.add_argument("--survivors", action="store_true", help="print every survivor's diff")
    parser.add_argument("--reuse", action="store_true",
                        help="continue in the copy of the last run (no new copy of the tree, "
                             "the same tests left out)")  # fmt: skip
    args = parser.parse_args()
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"not studied: {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    modules = tuple(args.modules) or MODULES
    if not args.table:
        t0 = time.monotonic()
        if args.reuse:
            deselected = json.loads((RESULTS / "deselected.json").read_text(encoding="utf8"))
        else:
            snapshot()
            deselected = failing_tests()
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "deselected.json").write_text(json.dumps(deselected), encoding="utf8")
        for test in deselected:
            print(f"left out (fails unmutated): {test}", flush=True)
        for module in modules:
            print(f"core/{module}.py: {run_module(module, args.jobs, deselected) / 60:.1f} min",
                  flush=True)  # fmt: skip
        print(f"study: {(time.monotonic() - t0) / 60:.1f} min, {args.jobs} at once, on "
              f"{os.cpu_count()} CPUs ({platform.machine()})")  # fmt: skip
    print("\n".join(table(MODULES if not args.modules else modules)))
    if args.survivors:
        show_survivors(modules)


if __name__ == "__main__":
    main()
