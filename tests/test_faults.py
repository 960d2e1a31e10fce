"""Faults during long runs: hard kills, SIGTERM and full disks lose nothing already saved."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggnorm.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, main
from vggnorm.formats.statsfile import read_stats

pytestmark = pytest.mark.keras
N_IMAGES = 30  # at one image a batch: the run lasts well past the checkpoint a test waits for


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(5)
    for i in range(N_IMAGES):
        arr = rng.integers(0, 256, (int(rng.integers(32, 80)), int(rng.integers(32, 80)), 3))
        Image.fromarray(arr.astype(np.uint8)).save(root / f"{i:02d}.png")
    (root / "zero.jpg").write_bytes(b"")
    weights = save_downloaded_layout(tiny_vgg(arch="vgg16"), root.parent / "vgg16_notop.h5")
    return root, weights


def _argv(setup: tuple[Path, Path], out: Path) -> list[str]:
    data, weights = setup
    return ["stats", "--data", str(data), "--weights", str(weights), "--size", "32",
            "--batch-size", "1", "--checkpoint-every", "0", "--out", str(out)]  # fmt: skip


def _same(a: Path, b: Path) -> None:
    x, y = read_stats(a), read_stats(b)
    assert y.meta.complete and sorted(x.images) == sorted(y.images)
    assert x.skipped == y.skipped
    for p, q in zip(x.layers, y.layers, strict=True):
        assert p.count == q.count
        np.testing.assert_allclose(q.sum, p.sum, rtol=1e-12)
        np.testing.assert_allclose(q.sumsq, p.sumsq, rtol=1e-12)


def _start(argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vggnorm", *argv, "-q"], cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen[bytes], at_least: int) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists():
            position = read_stats(out).meta.position  # atomic writes: always a whole file
            if position >= at_least:
                return position
        time.sleep(0.05)
    code = proc.poll()
    proc.kill()
    proc.communicate(timeout=60)
    pytest.fail(f"no checkpoint with {at_least}+ images appeared (exit {code})")


@pytest.mark.parametrize("at_least", [2, 9])  # early, and in the middle of the run
def test_sigkill_at_any_point_then_resume_equals_uninterrupted_run(
    setup: tuple[Path, Path], tmp_path: Path, at_least: int
) -> None:
    assert main([*_argv(setup, tmp_path / "straight.h5"), "-q"]) == EXIT_OK
    out = tmp_path / "killed.h5"
    proc = _start(_argv(setup, out), tmp_path)
    saved = _wait_for_checkpoint(out, proc, at_least)
    assert proc.poll() is None, "the run ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)  # also closes the pipes
    partial = read_stats(out)  # whatever was on disk at the kill is a complete, readable file
    assert not partial.meta.complete and partial.meta.position >= saved
    assert main([*_argv(setup, out), "--resume", "-q"]) == EXIT_OK
    _same(tmp_path / "straight.h5", out)


def test_sigterm_saves_progress_and_says_how_to_resume(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "term.h5"
    proc = _start(_argv(setup, out), tmp_path)
    _wait_for_checkpoint(out, proc, 3)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED
    assert b"--resume" in err and b"Traceback" not in err
    partial = read_stats(out)
    assert not partial.meta.complete and 3 <= partial.meta.position < N_IMAGES + 1
    assert partial.n_images + len(partial.skipped) == partial.meta.position


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import h5py

    out = tmp_path / "full.h5"
    real = h5py.File
    calls = {"n": 0}

    def file_on_a_filling_disk(name: object, mode: str = "r", *a: object, **k: object) -> object:
        if mode == "w":
            calls["n"] += 1
            if calls["n"] == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(name, mode, *a, **k)

    monkeypatch.setattr(h5py, "File", file_on_a_filling_disk)
    assert main([*_argv(setup, out), "-q"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("ERROR ") and "No space left on device" in err and str(out) in err
    monkeypatch.setattr(h5py, "File", real)
    kept = read_stats(out)
    assert kept.n_images == 3 and not kept.meta.complete  # the third checkpoint, intact
    assert [p.name for p in tmp_path.iterdir()] == ["full.h5"]  # no temporary file left behind
    assert main([*_argv(setup, out), "--resume", "-q"]) == EXIT_OK
    assert read_stats(out).n_images == N_IMAGES


def test_strict_turns_a_skip_into_an_error(setup: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert main([*_argv(setup, tmp_path / "s.h5"), "--strict", "-q"]) == EXIT_ERROR
    assert "zero.jpg" in capsys.readouterr().err


def test_unwritable_output_directory_is_one_clear_error(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "s.h5"
    assert main([*_argv(setup, missing), "-q"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("ERROR ") and err.count("\n") == 1
    assert "output directory does not exist" in err
    assert os.listdir(tmp_path) == []
