"""Read untrusted files in a child process, so that damage ends in one error line, never a hang.

Why a child process (issue #10, item 5): flipping single metadata bytes of a weight file makes
h5py raise ``OSError``/``RuntimeError``/``KeyError``... from deep inside the library, and for a
few positions the HDF5 C library loops forever while holding the GIL. No in-process wrapper can
bound that: a thread cannot interrupt it, a signal handler never runs. So every read of an
untrusted file (HDF5 files, ``.keras`` archives, and since issue #17 ``.safetensors``, ``.pth``,
MatConvNet ``.mat`` and ONNX files too: a flipped byte makes ``scipy.io.loadmat`` segfault)
runs in a child process with a deadline; the child is killed with SIGKILL when the deadline passes. There is deliberately no in-process fast path:
metadata parsing happens in every h5py call (opening, listing, attributes, even ``ds[()]``
resolves the dataset's layout message first), so "validate in the child, read the data in the
parent" would still run damaged-metadata code in the parent.

Start method: ``forkserver``. ``fork`` copies a process that may hold TensorFlow/Ray threads
and locks (unsafe, and deprecated by CPython for multi-threaded parents). ``spawn`` starts a
fresh interpreter per call and re-imports numpy and h5py each time. ``forkserver`` starts one
clean, single-threaded server (itself a fresh interpreter, so no inherited threads) that
preloads numpy, h5py and the vggnorm readers once and then forks a child per call. Measured
on the 2-core AMD EPYC dev VM, shared (load 1 to 5.6; Python 3.11, h5py 3.14, HDF5 1.14.6),
``python scripts/fuzz_weights.py --overhead``: a guarded call of a trivial function costs
0.28 to 0.88 s with ``spawn`` (a fresh interpreter importing numpy and h5py each time) and
0.014 to 0.075 s with ``forkserver``, after the server's one-time start of 0.3 to 1.4 s.

Results: the child pickles its result with protocol 5, writes every large buffer (numpy array
data) out of band into an anonymous memory file (``memfd``) with ``pwrite``, and sends only the
small pickle stream through the pipe; the parent maps that file and the arrays are views of
the mapping (no copy on the parent's side, still writable). For a VGG16-sized legacy file (553
MB of float32, page cache warm): ``read_weights`` in process 0.46 to 0.52 s, guarded 1.1 to 1.6
s; a plain ``Pool.apply`` (pickle through the pipe, copies on both sides) took 6 to 17 s, and
protocol-5 buffers through the pipe into fresh bytearrays about 1.8 to 2.8 s. The
extra second is small beside what follows a read (building a Keras model, a stats run).

Deadline (:func:`read_timeout`): ``30 s + size / 5 MB/s``. The 30 s cover the child's start
and imports on a cold, busy machine; 5 MB/s is a conservative floor for any local disk, USB
stick or network share (a ``.keras`` archive is read about three times: unzip, write the
member, read it). The full VGG16 file (553 MB) gets 141 s, the no-top file (59 MB) 42 s. The
environment variable ``VGGNORM_READ_TIMEOUT`` (seconds) replaces the derived default.

The child also arms ``alarm()`` with the default SIGALRM action a little after the deadline, so
that a child stuck in C code dies even when the parent itself was killed and never reaps it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import reduction
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, TypeVar

from ..core.errors import VggnormError, WeightFileError

T = TypeVar("T")

#: Environment variable that replaces the derived read deadline (seconds, > 0).
TIMEOUT_ENV = "VGGNORM_READ_TIMEOUT"
#: Fixed part of the deadline: child start-up and imports on a slow, busy machine.
BASE_TIMEOUT_S = 30.0
#: Slowest read throughput the deadline allows for (bytes per second of file size).
MIN_THROUGHPUT_BPS = 5e6
#: The child's own SIGALRM fires this much after the parent's deadline (orphan safety net).
_CHILD_GRACE_S = 10
#: Modules the fork server imports once, so each child starts with them loaded.
_PRELOAD = ["vggnorm.formats", "vggnorm.formats.statsfile"]
_MAX_REASON = 200
#: Longest single wait for a reading child: how late a Ctrl-C can be noticed.
_POLL_S = 0.2

_ctx_lock = threading.Lock()
_ctx: Any = None


def _context(preload: tuple[str, ...] = ()) -> Any:
    """The forkserver context, with vggnorm's readers preloaded in the server (set once).

    ``preload``: the calling reader's own heavy modules (torch for ``.pth``, 2.5 s to import),
    preloaded too when this call starts the server; when it runs already, each child imports
    them. The server skips a module that is not installed."""
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            ctx = multiprocessing.get_context("forkserver")
            # Only takes effect if the server is not running yet. No '__main__' (the default):
            # the server would run the user's script, and a script calling vggnorm at its top
            # level (no `if __name__ == "__main__":` guard) would run again in it.
            ctx.set_forkserver_preload([*_PRELOAD, *preload])
            _ctx = ctx
        return _ctx


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """While a child starts, the main module looks like an interactive session's.

    multiprocessing makes every forkserver child import the parent's main script again
    (``__mp_main__``), so that functions defined there unpickle. The guarded readers are
    vggnorm's own module functions, so the child needs none of it, and re-running a user's
    script is harmful: one that calls vggnorm at its top level would run its whole job again in
    the child, and a script read from standard input cannot be imported at all.
    """
    main = sys.modules.get("__main__")
    saved: dict[str, Any] = {
        k: main.__dict__[k] for k in ("__file__", "__spec__") if main and k in main.__dict__
    }
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)
            if "__spec__" not in saved:
                main.__dict__.pop("__spec__", None)


def read_timeout(what: Path | str, error: type[VggnormError] = WeightFileError) -> float:
    """The deadline for reading ``what``: ``$VGGNORM_READ_TIMEOUT`` or ``30 s + size / 5 MB/s``.

    Args:
        what: the file to be read (its size scales the deadline; a missing file gets the base).
        error: the error class raised for a malformed environment variable.

    Returns:
        Seconds, positive and finite.

    Raises:
        VggnormError: (of class ``error``) ``VGGNORM_READ_TIMEOUT`` is not a positive number.
    """
    env = os.environ.get(TIMEOUT_ENV, "").strip()
    if env:
        try:
            value = float(env)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise error(f"{TIMEOUT_ENV}={env!r}: expected a positive number of seconds")
        return value
    try:
        size = os.stat(what).st_size
    except OSError:
        size = 0
    return BASE_TIMEOUT_S + size / MIN_THROUGHPUT_BPS


def _reason(e: BaseException) -> str:
    """``Type: message`` on one line, shortened."""
    text = " ".join(str(e).split())
    out = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return out if len(out) <= _MAX_REASON else out[: _MAX_REASON - 3] + "..."


class _Fd:
    """A file descriptor that travels to the child as a duplicate (through the fork server)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Fd._rebuild, (reduction.DupFd(self.fd),))

    @staticmethod
    def _rebuild(dup: Any) -> _Fd:
        return _Fd(dup.detach())


def _scratch_fd() -> int:
    """An anonymous file the child fills with the result's array data (memory-backed on Linux)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("vggnorm-guarded-read", os.MFD_CLOEXEC)
    with tempfile.TemporaryFile() as f:  # pragma: no cover - not Linux
        return os.dup(f.fileno())


def _child(
    conn: Connection,
    scratch: _Fd,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Child body: run ``fn``, put large buffers in ``scratch``, send the pickle stream."""
    # Ctrl-C reaches the whole process group; the parent decides and kills us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Default action kills the process in the kernel even while C code holds the GIL.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(math.ceil(timeout) + _CHILD_GRACE_S)
    payload: tuple[str, Any]
    try:
        payload = ("ok", fn(*args, **kwargs))
    except VggnormError as e:
        payload = ("vggnorm", e)
    except BaseException as e:  # anything else is damage, reported as a reason
        payload = ("other", _reason(e))
    buffers: list[pickle.PickleBuffer] = []
    try:
        stream = pickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    except Exception as e:  # e.g. an exception class that does not pickle
        text = str(payload[1]) if payload[0] == "vggnorm" else _reason(e)
        stream, buffers = pickle.dumps(("other", text), protocol=5), []
    views = [b.raw().cast("B") for b in buffers]
    pos = 0
    for v in views:  # write(2), not a mapping: the kernel copies without a fault per page
        done = 0
        while done < v.nbytes:
            done += os.pwrite(scratch.fd, v[done:], pos + done)
        pos += v.nbytes
    os.close(scratch.fd)
    conn.send((stream, [v.nbytes for v in views]))
    conn.close()


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def run_guarded(
    fn: Callable[..., T],
    *args: Any,
    what: Path | str,
    timeout: float | None = None,
    error: type[VggnormError] = WeightFileError,
    preload: tuple[str, ...] = (),
    **kwargs: Any,
) -> T:
    """Run ``fn(*args, **kwargs)`` in a child process with a deadline and return its result.

    Use it for every read of an untrusted file (weight files, stats files, ``.keras``
    archives): damage in the file then ends in one ``error`` line naming ``what``, never in a
    traceback, a crash of this process or a hang.

    Args:
        fn: a module-level function (it is pickled by reference) whose result pickles: numpy
            arrays, dataclasses, plain containers.
        *args: positional arguments for ``fn`` (picklable).
        what: the file being read; names it in errors and sizes the default deadline.
        timeout: seconds before the child is killed; default :func:`read_timeout` of ``what``.
        error: the :class:`VggnormError` subclass raised for damage, crash or timeout.
        preload: modules for the fork server to import once, if this call starts it.
        **kwargs: keyword arguments for ``fn`` (picklable).

    Returns:
        What ``fn`` returned (unpickled in this process).

    Raises:
        VggnormError: the child's own :class:`VggnormError`, re-raised as it was (same class;
            its message put on one line, and prefixed with ``what`` if it does not name it); or
            ``error`` when ``fn`` raised anything else, the child died (signal, out of memory)
            or did not finish within ``timeout`` (then it has been killed with SIGKILL).
        KeyboardInterrupt: after killing the child.

    """
    if timeout is None:
        timeout = read_timeout(what, error)
    ctx = _context(preload)
    recv_conn, send_conn = ctx.Pipe(duplex=False)
    scratch = _scratch_fd()
    proc = ctx.Process(target=_child, args=(send_conn, _Fd(scratch), timeout, fn, args, kwargs),
                       name="vggnorm-guarded-read", daemon=True)  # fmt: skip
    try:
        with _main_hidden():
            proc.start()
        send_conn.close()
        kind, value = _receive(proc, recv_conn, scratch, timeout, what, error)
    finally:
        if proc.pid is not None:  # started
            if proc.is_alive():
                proc.kill()
            proc.join()
            proc.close()
        recv_conn.close()
        send_conn.close()
        os.close(scratch)
    return _result(kind, value, what, error)  # type: ignore[no-any-return]


def _wait_interruptibly(handles: list[Any], timeout: float) -> bool:
    """``wait(handles, timeout)`` in short slices: whether one became ready in time.

    A Ctrl-C is a signal to the process, which the kernel may hand to any of its threads (torch
    and TensorFlow start several); Python then raises KeyboardInterrupt in the main thread only
    when that thread returns from its system call, which one long ``wait`` would delay to the
    deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if wait(handles, min(left, _POLL_S)):
            return True


def _receive(
    proc: Any, conn: Connection, scratch: int, timeout: float, what: Path | str,
    error: type[VggnormError],
) -> tuple[str, Any]:  # fmt: skip
    """The child's ``(kind, value)``, or ``error`` when it hangs past ``timeout`` or dies."""
    if not _wait_interruptibly([conn, proc.sentinel], timeout):
        raise error(
            f"{what}: reading took more than {timeout:g} s; the file is probably damaged "
            f"(its reader hung); set {TIMEOUT_ENV} to allow longer"
        )
    try:
        stream, sizes = conn.recv()
    except (EOFError, OSError):
        proc.join()
        code = proc.exitcode
        why = (
            f"the reader crashed: {_signal_name(-code)}"
            if code is not None and code < 0
            else f"the reader exited with status {code}"
        )
        if code == -signal.SIGKILL:
            why += ", perhaps out of memory"
        raise error(f"{what}: unreadable or damaged file ({why})") from None
    try:
        buffers: list[memoryview] = []
        if sum(sizes):
            # The arrays become views of a mapping of the scratch file the child filled:
            # no copy on this side; the memory goes when the last array does.
            whole = memoryview(mmap.mmap(scratch, sum(sizes)))
            starts = [0, *itertools.accumulate(sizes)]
            buffers = [whole[a : a + n] for a, n in zip(starts, sizes)]
        kind, value = pickle.loads(stream, buffers=buffers)
    except Exception as e:  # e.g. an exception class that does not unpickle
        kind, value = "other", f"result could not be read back: {_reason(e)}"
    return kind, value


def _result(kind: str, value: Any, what: Path | str, error: type[VggnormError]) -> Any:
    """The child's result, or its error as one line naming ``what``."""
    if kind == "ok":
        return value
    if kind == "vggnorm":
        message = str(value)
        if "\n" in message or str(what) not in message:
            # One line naming the user's file (a .keras member is read from a temporary copy).
            one_line = " ".join(message.split())
            text = one_line if str(what) in one_line else f"{what}: {one_line}"
            raise type(value)(text, fix=getattr(value, "fix", None))
        raise value
    raise error(f"{what}: unreadable or damaged file ({value})")
