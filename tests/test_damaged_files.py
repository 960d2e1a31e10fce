"""Damaged files end in one project error line, never a traceback or a hang (issue #10, item 5).

The fuzz flips single bytes in the METADATA of small files (every byte outside the raw storage
of the contiguous datasets: superblock, object headers, B-trees, local and global heaps, zip
structures) and reads each damaged file through :func:`vggnorm.formats._guard.run_guarded`. No Keras.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures import damaged as dm
from vggnorm.core.errors import DatasetError, StatsError, VggnormError, WeightFileError
from vggnorm.formats import _guard as guard
from vggnorm.formats._guard import read_timeout, run_guarded
from vggnorm.formats.registry import adapter_for, read_weights
from vggnorm.formats.statsfile import _read_stats, read_stats

#: Deadline of one fuzzed read. A tiny file reads in milliseconds; this only bounds a hang.
FUZZ_TIMEOUT = 5.0
#: What a killed child may add on top of its deadline (kill, reap, a loaded 2-core machine).
MARGIN = 5.0
CONVS = ((3, 4), (4, 8), (8, 8))  # a tiny 3-conv chain: (in, out) channels
LAYERS = dm.conv_layers([f"block1_conv{i + 1}" for i in range(len(CONVS))], CONVS)
STATS_CONVS = [(name, o) for (name, _), (_, o) in zip(LAYERS, CONVS)]


def conv_arrays() -> list[tuple[np.ndarray, np.ndarray]]:
    return dm.layer_arrays(LAYERS, seed=0)


def write_legacy_h5(path: Path) -> Path:
    """The layout of keras.applications downloads: ``layer_names``, ``<layer>_W_1:0``."""
    return dm.write_legacy_h5(path, LAYERS, seed=0)


def write_weights_h5(path: Path) -> Path:
    """Keras 3 ``model.weights.h5``: ``layers/conv2d/vars/0`` and ``/1``."""
    return dm.write_weights_h5(path, LAYERS, seed=0)


def write_stats_file(path: Path) -> Path:
    return dm.write_stats_file(path, STATS_CONVS, seed=1, count=100, n_images=2)


def check_outcome(
    path: Path,
    fn: Callable[..., Any],
    error: type[VggnormError],
    check_ok: Callable[[Any], None],
) -> str:
    """One read of a damaged file through the public (guarded) reader ``fn``, its deadline set
    to ``FUZZ_TIMEOUT`` (``guard_deadline`` fixture): ``"ok"`` or ``"error"``; else it fails."""
    t0 = time.monotonic()
    try:
        result = fn(path)
    except VggnormError as e:
        message = str(e)
        assert type(e) is error, f"{path.name}: {type(e).__name__}: {message}"
        assert "\n" not in message, message
        assert str(path) in message, message
        outcome = "error"
    else:
        check_ok(result)
        outcome = "ok"
    assert time.monotonic() - t0 < FUZZ_TIMEOUT + MARGIN
    return outcome


def weights_ok(ws: Any) -> None:
    """A damaged file may still parse (a flip can hide a layer's ``weight_names``, making it a
    layer without weights): every array it yields must be an original one, finite, same shape."""
    want = {
        f"block1_conv{i + 1}/{role}": shape
        for i, (w, b) in enumerate(conv_arrays())
        for role, shape in (("kernel", w.shape), ("bias", b.shape))
    }
    got = {k: v.shape for k, v in ws.arrays.items()}
    assert got and got.items() <= want.items()
    assert all(np.all(np.isfinite(v)) for v in ws.arrays.values())


def keras_ok(ws: Any) -> None:
    shapes = [a.shape for w, b in conv_arrays() for a in (w, b)]
    got = [v.shape for v in ws.arrays.values()]
    assert got and all(got.count(s) <= shapes.count(s) for s in got)
    assert all(np.all(np.isfinite(v)) for v in ws.arrays.values())


def stats_ok(record: Any) -> None:
    assert [len(s.sum) for s in record.layers] == [o for _, o in CONVS]
    assert all(np.all(np.isfinite(s.sum)) and np.all(np.isfinite(s.sumsq)) for s in record.layers)


# ---------------------------------------------------------------------------------------------
# The fuzz: 150 damaged files, one guarded read each


@pytest.fixture(autouse=True)
def guard_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The product readers' deadline, short enough for a fuzz of damaged files."""
    monkeypatch.setenv(guard.TIMEOUT_ENV, str(FUZZ_TIMEOUT))


def test_fixtures_read_intact_and_the_same_as_in_process(tmp_path: Path) -> None:
    legacy = write_legacy_h5(tmp_path / "w.h5")
    keras = dm.write_keras_zip(
        tmp_path / "m.keras", write_weights_h5(tmp_path / "i.h5").read_bytes()
    )
    stats = write_stats_file(tmp_path / "s.h5")
    for path in (legacy, keras):
        got, want = read_weights(path), adapter_for(path)._read(path)  # guarded vs in process
        assert got.file == want.file
        assert got.arrays.keys() == want.arrays.keys()
        for k, v in want.arrays.items():
            assert got.arrays[k].dtype == v.dtype and got.arrays[k].tobytes() == v.tobytes()
    got_s, want_s = read_stats(stats), _read_stats(stats)
    assert (got_s.meta, got_s.images, got_s.skipped) == (want_s.meta, want_s.images, want_s.skipped)
    for a, b in zip(got_s.layers, want_s.layers, strict=True):
        assert (a.name, a.count, a.sum.tobytes(), a.sumsq.tobytes()) == (
            b.name, b.count, b.sum.tobytes(), b.sumsq.tobytes())  # fmt: skip
    weights_ok(read_weights(legacy))
    keras_ok(read_weights(keras))
    stats_ok(read_stats(stats))


def test_legacy_h5_metadata_flips(tmp_path: Path) -> None:
    src = write_legacy_h5(tmp_path / "src.h5")
    data = src.read_bytes()
    offsets = dm.metadata_offsets(len(data), dm.raw_storage(src))
    outcomes = []
    for offset, mask in dm.sample_flips(offsets, 60, seed=10):
        path = tmp_path / f"legacy_{offset}_{mask:02x}.h5"
        path.write_bytes(dm.flipped(data, offset, mask))
        outcomes.append(check_outcome(path, read_weights, WeightFileError, weights_ok))
    assert outcomes.count("error") > 0  # the flips did hit structure that matters


def test_stats_file_metadata_flips(tmp_path: Path) -> None:
    src = write_stats_file(tmp_path / "src.h5")
    data = src.read_bytes()
    offsets = dm.metadata_offsets(len(data), dm.raw_storage(src))
    outcomes = []
    for offset, mask in dm.sample_flips(offsets, 45, seed=11):
        path = tmp_path / f"stats_{offset}_{mask:02x}.h5"
        path.write_bytes(dm.flipped(data, offset, mask))
        outcomes.append(check_outcome(path, read_stats, StatsError, stats_ok))
    assert outcomes.count("error") > 0


def test_keras_zip_metadata_flips(tmp_path: Path) -> None:
    inner_path = write_weights_h5(tmp_path / "inner.h5")
    inner = inner_path.read_bytes()
    src = dm.write_keras_zip(tmp_path / "src.keras", inner)
    zipped = src.read_bytes()
    # Damage inside model.weights.h5 with a valid CRC (the archive was written that way) ...
    flips = [("inner", o, m) for o, m in dm.sample_flips(
        dm.metadata_offsets(len(inner), dm.raw_storage(inner_path)), 30, seed=12)]  # fmt: skip
    # ... and damage to the archive's own structure (headers, directory, the JSON members).
    start, end = dm.zip_member_data(src, "model.weights.h5")
    assert zipped[start:end] == inner
    outside = np.concatenate([np.arange(start), np.arange(end, len(zipped))])
    flips += [("zip", o, m) for o, m in dm.sample_flips(outside, 15, seed=13)]
    outcomes = []
    for where, offset, mask in flips:
        path = tmp_path / f"{where}_{offset}_{mask:02x}.keras"
        if where == "inner":
            dm.write_keras_zip(path, dm.flipped(inner, offset, mask))
        else:
            path.write_bytes(dm.flipped(zipped, offset, mask))
        outcomes.append(check_outcome(path, read_weights, WeightFileError, keras_ok))
    assert outcomes.count("error") > 0


# ---------------------------------------------------------------------------------------------
# The mechanism: hangs, crashes, interrupts, errors, deadlines


def _hang(pid_file: Path) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL may end it
    pid_file.write_text(str(os.getpid()))
    time.sleep(120)


def _segfault(pid_file: Path) -> None:
    pid_file.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGSEGV)


def _raise(exc: BaseException) -> None:
    raise exc


def _unpicklable() -> Callable[[], None]:
    return lambda: None


def assert_gone(pid_file: Path) -> None:
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # reaped: neither running nor a zombie
        os.kill(pid, 0)


def test_a_hanging_child_is_killed_at_the_deadline(tmp_path: Path) -> None:
    pid_file, what = tmp_path / "pid", tmp_path / "big.h5"
    t0 = time.monotonic()
    with pytest.raises(WeightFileError) as info:
        run_guarded(_hang, pid_file, what=what, timeout=1.5)
    elapsed = time.monotonic() - t0
    assert 1.5 <= elapsed < 1.5 + MARGIN
    assert str(info.value) == (
        f"{what}: reading took more than 1.5 s; the file is probably damaged (its reader "
        "hung); set VGGNORM_READ_TIMEOUT to allow longer"
    )
    assert_gone(pid_file)


def test_a_child_killed_by_a_signal_is_a_clear_error(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(StatsError) as info:
        run_guarded(_segfault, pid_file, what="s.h5", timeout=30, error=StatsError)
    assert str(info.value) == "s.h5: unreadable or damaged file (the reader crashed: SIGSEGV)"
    assert_gone(pid_file)


def _sigint_to_this_thread() -> None:
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)


@pytest.mark.parametrize(
    "send",
    [lambda: os.kill(os.getpid(), signal.SIGINT), _sigint_to_this_thread],
    # a Ctrl-C goes to the process, and the kernel may hand it to any thread: here to the
    # timer's own, while the main thread waits for the child
    ids=["to-the-process", "to-another-thread"],
)
def test_ctrl_c_kills_the_child_and_propagates(tmp_path: Path, send: Callable[[], None]) -> None:
    pid_file = tmp_path / "pid"
    # Python's own Ctrl-C handler, whatever an earlier test of this session left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, send)
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_guarded(_hang, pid_file, what="w.h5", timeout=60)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - t0 < 1.0 + MARGIN
    assert_gone(pid_file)


@pytest.mark.parametrize(
    ("exc", "want"),
    [
        pytest.param(
            OSError("Unable to open\n(bad superblock)"),
            "OSError: Unable to open (bad superblock)",
            id="oserror",
        ),
        pytest.param(KeyError("layers"), "KeyError: 'layers'", id="keyerror"),
        pytest.param(MemoryError(), "MemoryError", id="memoryerror-no-text"),
        pytest.param(RuntimeError("x" * 500), "RuntimeError: " + "x" * 183 + "...", id="long"),
    ],
)  # fmt: skip
def test_other_exceptions_become_one_project_error_line(exc: BaseException, want: str) -> None:
    with pytest.raises(WeightFileError) as info:
        run_guarded(_raise, exc, what="w.h5", timeout=30)
    assert str(info.value) == f"w.h5: unreadable or damaged file ({want})"


def test_project_errors_come_back_unchanged() -> None:
    with pytest.raises(DatasetError) as info:
        run_guarded(_raise, DatasetError("w.h5: no image"), what="w.h5", timeout=30)
    assert type(info.value) is DatasetError and str(info.value) == "w.h5: no image"


@pytest.mark.parametrize(
    ("message", "want"),
    [
        pytest.param("layer 'x': bad", "w.h5: layer 'x': bad", id="file-not-named"),
        pytest.param("w.h5: two\nlines", "w.h5: two lines", id="two-lines"),
    ],
)
def test_project_errors_are_made_one_line_naming_the_file(message: str, want: str) -> None:
    with pytest.raises(DatasetError) as info:
        run_guarded(_raise, DatasetError(message), what="w.h5", timeout=30)
    assert type(info.value) is DatasetError and str(info.value) == want


def test_a_result_that_cannot_travel_is_an_error() -> None:
    with pytest.raises(WeightFileError, match=r"^w\.h5: unreadable or damaged file \(.*lambda"):
        run_guarded(_unpicklable, what="w.h5", timeout=30)


def test_large_arrays_come_back_exact_and_writable() -> None:
    arrays = {f"a{i}": np.arange(i * 1_000_003, dtype=np.float32) for i in range(4)}
    got = run_guarded(dict, arrays, what="w.h5", timeout=30)
    assert got.keys() == arrays.keys()
    for k, v in arrays.items():
        assert got[k].tobytes() == v.tobytes()
        assert got[k].flags.writeable  # callers may rescale in place


def test_default_deadline_scales_with_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(guard.TIMEOUT_ENV, raising=False)
    path = tmp_path / "w.h5"
    path.write_bytes(b"\0" * 5_000_000)
    assert read_timeout(path) == guard.BASE_TIMEOUT_S + 5_000_000 / guard.MIN_THROUGHPUT_BPS
    assert read_timeout(tmp_path / "missing.h5") == guard.BASE_TIMEOUT_S
    assert read_timeout(path) == 31.0  # the documented formula: 30 s + size / 5 MB/s


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "ten"])
def test_a_bad_timeout_variable_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(guard.TIMEOUT_ENV, value)
    with pytest.raises(StatsError, match=rf"^VGGNORM_READ_TIMEOUT='{value}': expected a positive"):
        run_guarded(_raise, OSError(), what="s.h5", error=StatsError)


def test_the_timeout_variable_sets_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(guard.TIMEOUT_ENV, " 1.25 ")
    assert read_timeout(tmp_path) == 1.25
    with pytest.raises(WeightFileError, match=r"reading took more than 1\.25 s"):
        run_guarded(_hang, tmp_path / "pid", what="w.h5")
    assert_gone(tmp_path / "pid")


def test_the_fuzz_fixtures_really_hold_metadata_outside_the_data(tmp_path: Path) -> None:
    """The offsets the fuzz samples are real structure: the superblock signature is among them."""
    src = write_legacy_h5(tmp_path / "w.h5")
    data = src.read_bytes()
    spans = dm.raw_storage(src)
    offsets = dm.metadata_offsets(len(data), spans)
    assert data[:8] == b"\x89HDF\r\n\x1a\n" and set(range(8)) <= set(offsets.tolist())
    assert sum(b - a for a, b in spans) == sum(w.nbytes + b.nbytes for w, b in conv_arrays())
    assert len(offsets) == len(data) - sum(b - a for a, b in spans)
