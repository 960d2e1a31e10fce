"""Outputs: one writer per file (a lock that dies with its holder), leftovers of killed runs
cleaned, unwritable outputs found before any work, and damaged stats files refused on read.
No Keras here."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vggnorm.core.errors import OutputError, StatsError, WeightFileError
from vggnorm.core.inputs import Decode
from vggnorm.core.stats import LayerStats
from vggnorm.core.statsrecord import StatsMeta, StatsRecord, validate
from vggnorm.formats import outputs as atomic
from vggnorm.formats.outputs import atomic_path, check_output, check_writable, output_lock
from vggnorm.formats.statsfile import read_stats, write_stats

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from vggnorm.formats.outputs import output_lock
    with output_lock(Path(sys.argv[1]), "vggnorm stats --out held.h5"):
        print("held", flush=True)
        time.sleep(60)
    """
)


def _holder(target: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE,
                         text=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def _reap(p: subprocess.Popen[str]) -> None:
    p.wait()
    assert p.stdout is not None
    p.stdout.close()


def test_a_second_writer_is_refused_with_the_first_named_even_with_force(tmp_path: Path) -> None:
    target = tmp_path / "out.h5"
    holder = _holder(target)
    try:
        with pytest.raises(OutputError) as info, output_lock(target):
            pass
        message = str(info.value)
        assert f"pid {holder.pid}" in message and "vggnorm stats --out held.h5" in message
        assert "\n" not in message
        # --force is about an existing file; it never overrides a live writer
        with pytest.raises(OutputError, match="another vggnorm run"), output_lock(target):
            check_output(target, force=True)
    finally:
        holder.kill()
        _reap(holder)


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path: Path) -> None:
    target = tmp_path / "out.h5"
    holder = _holder(target)
    os.kill(holder.pid, signal.SIGKILL)
    _reap(holder)
    assert (tmp_path / ".out.h5.lock").exists()  # the file stays, the kernel's lock does not
    with output_lock(target):
        (tmp_path / "out.h5").write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


def test_the_lock_is_reentrant_in_one_process(tmp_path: Path) -> None:
    target = tmp_path / "out.h5"
    with output_lock(target), output_lock(target), atomic_path(target) as tmp:
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x"
    assert not (tmp_path / ".out.h5.lock").exists()


def test_temporary_files_of_a_killed_run_are_removed_by_the_next_writer(tmp_path: Path) -> None:
    target = tmp_path / "w.h5"
    stale = [tmp_path / ".w.h5.abcd1234.tmp", tmp_path / ".w.h5.zz_99xyz.tmp.keras"]
    others = [tmp_path / ".other.h5.abcd1234.tmp", tmp_path / "w.h5.tmp-notours"]
    for p in stale + others:
        p.write_bytes(b"half-written")
    with output_lock(target), atomic_path(target) as tmp:
        assert tmp.name.startswith(".w.h5.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in others)
    assert target.read_bytes() == b"new"


def test_keras_suffix_temporary_files_still_end_in_the_suffix(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "m.keras", suffix=".keras") as tmp:
        assert tmp.name.endswith(".tmp.keras")  # Keras picks its writer by suffix
        tmp.write_bytes(b"zip")
    assert (tmp_path / "m.keras").read_bytes() == b"zip"


def test_read_only_file_system_is_found_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    with pytest.raises(OutputError, match=f"cannot write in {tmp_path}: Read-only file system"):
        check_writable(tmp_path / "s.h5")


def test_full_file_system_is_found_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.statvfs(tmp_path)

    class Full:
        f_bavail, f_frsize = 3, real.f_frsize

    monkeypatch.setattr(atomic.os, "statvfs", lambda path: Full)
    with pytest.raises(StatsError, match=r"MiB free, about 1\.0 MiB needed to write s\.h5"):
        check_output(tmp_path / "s.h5", error=StatsError)
    # the weights writer asks for the source's size
    with pytest.raises(WeightFileError, match=r"needed to write w\.h5"):
        check_output(tmp_path / "w.h5", error=WeightFileError, need_bytes=3 * real.f_frsize + 1)


def test_check_output_rules(tmp_path: Path) -> None:
    src = tmp_path / "in.h5"
    src.write_bytes(b"x")
    with pytest.raises(OutputError, match="is the input file"):
        check_output(src, force=True, inputs=[src])
    with pytest.raises(OutputError, match="already exists") as info:
        check_output(src)
    assert info.value.fix == "force"
    check_output(src, force=True)  # allowed, nothing written
    with pytest.raises(OutputError, match="output directory does not exist"):
        check_output(tmp_path / "missing" / "o.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5"]  # the probe left nothing


# ---------------------------------------------------------------------------------------------
# Damaged stats files

META = StatsMeta(
    model="vgg16", fingerprint="f" * 64, weights="/w.h5", decode=Decode(size=32, resize="crop", interpolation="bilinear", draft=False),
      preprocess="caffe", precision="fp32",
    dataset_kind="folder", dataset_path="/d", dataset_root="/d", annotations=None,
    dataset_items=3, selection_sha256="0" * 64, selection_size=3, position=3, complete=True,
)  # fmt: skip


def _record(sums: np.ndarray, sumsq: np.ndarray, count: int, complete: bool = True) -> StatsRecord:
    layer = LayerStats("block1_conv1", sums, sumsq, count)
    return StatsRecord(replace(META, complete=complete), (layer,), ("a.png",))


GOOD = (np.array([2.0, 0.0]), np.array([3.0, 0.0]), 2)  # values 1 and 1 (+ a dead filter)


@pytest.mark.parametrize(
    ("sums", "sumsq", "count", "complete", "why"),
    [
        pytest.param([np.nan, 0.0], [3.0, 0.0], 2, True, "NaN or infinite", id="nan"),
        pytest.param([2.0, 0.0], [np.inf, 0.0], 2, True, "NaN or infinite", id="inf"),
        pytest.param([-2.0, 0.0], [3.0, 0.0], 2, True, "negative sums", id="negative"),
        pytest.param([2.0, 0.0], [3.0, 0.0], 0, False, "without any counted", id="no-count"),
        pytest.param([0.0, 0.0], [0.0, 0.0], 0, True, "complete run", id="complete-empty"),
        pytest.param([2.0, 0.0], [1.9, 0.0], 2, True, r"sum\^2 > count \* sumsq", id="cauchy"),
    ],
)  # fmt: skip
def test_damaged_stats_are_refused_on_read(
    tmp_path: Path, sums: list[float], sumsq: list[float], count: int, complete: bool, why: str
) -> None:
    path = tmp_path / "s.h5"
    write_stats(path, _record(np.array(sums), np.array(sumsq), count, complete))
    with pytest.raises(StatsError, match=why) as info:
        read_stats(path)
    assert str(path) in str(info.value) and "block1_conv1" in str(info.value)
    assert "\n" not in str(info.value)


def test_consistent_stats_pass_validation_at_the_cauchy_schwarz_bound(tmp_path: Path) -> None:
    # equal values: sum^2 == count * sumsq exactly, the bound itself
    validate(_record(np.array([4.0, 0.0]), np.array([8.0, 0.0]), 2), "s.h5")
    path = tmp_path / "s.h5"
    write_stats(path, _record(*GOOD))
    assert read_stats(path).layers[0].count == 2


def test_cli_apply_with_damaged_stats_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fixtures.h5_layouts import build, finetuned, write_full_model
    from vggnorm.cli import EXIT_ERROR, main

    monkeypatch.chdir(tmp_path)
    write_stats("s.h5", _record(np.array([np.nan, 0.0]), np.array([3.0, 0.0]), 2))
    write_full_model(build(finetuned()), tmp_path / "w.h5")
    assert main(["apply", "--in", "w.h5", "--out", "o.h5", "--stats", "s.h5"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("ERROR ") and err.count("\n") == 1 and "Traceback" not in err
    assert "s.h5: layer block1_conv1: NaN or infinite sums; the stats file is damaged" in err
    assert not (tmp_path / "o.h5").exists()


def test_a_lock_does_not_outlive_a_timed_out_wait(tmp_path: Path) -> None:
    """A refused second writer leaves the first one's lock in place."""
    target = tmp_path / "out.h5"
    holder = _holder(target)
    try:
        t0 = time.monotonic()
        with pytest.raises(OutputError), output_lock(target):
            pass
        assert time.monotonic() - t0 < 5  # refused at once, never waits
        assert (tmp_path / ".out.h5.lock").exists()
    finally:
        holder.kill()
        _reap(holder)
