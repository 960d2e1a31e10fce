"""Writing outputs safely: atomic replacement (write beside the target, fsync, rename), one
writer per output (a lock the kernel releases when its holder dies), and checks that an output
can be written before any work starts. Standard library only."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..core.errors import OutputError, VggnormError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``target``, renamed onto it only if the block succeeds.

    ``suffix`` ends the temporary name (writers that choose a format by suffix need it). The
    file gets the permissions a plain ``open()`` would give it, not mkstemp's private 0600.
    """
    target = Path(target)
    suffix = suffix if suffix.startswith(".tmp") else f".tmp{suffix}"  # found by _temp_names
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _temp_names(target: Path) -> list[Path]:
    """Temporary files and folders :func:`atomic_path` and :func:`temp_dir_beside` make for
    ``target`` (left behind by a killed run): ``.NAME.`` + mkstemp's 8 random characters +
    ``.tmp``, maybe followed by the format's suffix; nothing else matches."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp(\.[A-Za-z0-9.]+)?")
    return [
        p for p in target.parent.glob(f".{glob.escape(target.name)}.*") if pattern.fullmatch(p.name)
    ]


def temp_dir_beside(target: Path) -> tempfile.TemporaryDirectory[str]:
    """A scratch folder beside ``target`` that the next writer of ``target`` removes if a killed
    run leaves it behind."""
    return tempfile.TemporaryDirectory(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)


def check_output(
    out: Path,
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
    error: type[VggnormError] | None = None,
    need_bytes: int = 1 << 20,
) -> None:
    """The one rule for every file vggnorm writes: never over an input, never over an existing
    file without ``force``, into a directory that exists and can be written now (a read-only or
    full file system is found before any work is done).

    Raises:
        ``error`` (default :class:`~vggnorm.core.errors.OutputError`) naming the file and the fix.
    """
    err = error or OutputError
    for src in inputs:
        if out.exists() and src.exists() and os.path.samefile(src, out):
            raise err(f"{out} is the input file; vggnorm never writes over its input")
    if out.exists() and not force:
        raise err(f"{out} already exists", fix="force")
    try:
        check_writable(out, need_bytes)
    except OutputError as e:
        raise err(str(e)) from e


def check_writable(target: Path, need_bytes: int = 1 << 20) -> None:
    """Fail now, before any work, if ``target`` cannot be written: a missing or read-only
    directory, or a file system with less than ``need_bytes`` free.

    Raises:
        OutputError: naming the directory and the reason.
    """
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: output directory does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write in {parent}: {e.strerror or e}") from e
    try:
        st = os.statvfs(parent)
    except (OSError, AttributeError):  # not every platform or file system says
        return
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise OutputError(
            f"{parent}: only {free / 2**20:.1f} MiB free, about {need_bytes / 2**20:.1f} MiB "
            f"needed to write {target.name}"
        )


_HELD: set[str] = set()


@contextlib.contextmanager
def output_lock(target: Path, what: str = "") -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``target`` for the whole run, so that two runs (a retried job
    beside a slow one) never write the same file, ``--force`` or not.

    The lock is an ``flock`` on that file: the kernel drops it when the holder dies, so a crashed
    run never leaves it stuck. Temporary files a killed run left for ``target`` are removed once
    the lock is held (no live run can be writing them).

    Raises:
        OutputError: another live run holds the lock (its pid, host, start and command named).
    """
    lock = target.parent / f".{target.name}.lock"
    key = str(lock.resolve())
    if key in _HELD:  # this process already holds it (a command and the writer it calls)
        yield
        return
    fd = _acquire(lock, target)
    try:
        _announce(fd, what)
        for stale in _temp_names(target):
            with contextlib.suppress(OSError):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
        _HELD.add(key)
        yield
    finally:
        _HELD.discard(key)
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _acquire(lock: Path, target: Path) -> int:
    """An open descriptor of ``lock`` holding its exclusive ``flock``."""
    import fcntl
    import json

    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            if not target.parent.is_dir():
                raise OutputError(f"{target.parent}: output directory does not exist") from e
            raise OutputError(f"cannot write in {target.parent}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other: dict[str, object] = {}
            with contextlib.suppress(OSError, ValueError):
                other = json.loads(os.pread(fd, 4096, 0).decode("utf8"))
            os.close(fd)
            raise OutputError(
                f"another vggnorm run is writing {target} (pid {other.get('pid', '?')} on "
                f"{other.get('host', '?')}, since {other.get('started', '?')}: "
                f"{other.get('command', '?')}); wait for it or stop it"
            ) from None
        # The previous holder may have unlinked the file between our open and flock: retry then.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _announce(fd: int, what: str) -> None:
    """Write who holds the lock into it, for the message a second run shows."""
    import json
    import socket
    import sys
    import time

    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": what or " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf8"), 0)
