"""Pytest setup shared by every test module.

Hypothesis writes nothing into the work tree: no example database (failing
examples are still printed with ``@reproduce_failure`` and the seed), and its other storage (the
``constants`` cache it keeps under ``./.hypothesis``) goes to a folder in the system temp directory.
"""

from __future__ import annotations

import getpass
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / f"vggnorm-hypothesis-{getpass.getuser()}")
settings.register_profile("vggnorm", database=None)
settings.load_profile("vggnorm")


def pytest_configure(config: pytest.Config) -> None:
    """Guarded reads of .pth, .mat and .onnx files import torch, scipy.io and onnx in each child
    unless the fork server preloaded them (done when the first guarded read starts it): let the
    server of this session preload those that are installed, once (a missing one is skipped)."""
    import os

    from vggnorm.formats import _guard

    _guard._context(("torch", "scipy.io", "onnx"))
    if config.option.collectonly:
        # Collecting reads no file, and a server started here could not serve a process forked
        # from this one (mutmut warms its workers' parent by collecting the tests).
        return
    # Start the server now, not inside the first test that reads a file: its start (loading
    # torch) would count against that test's deadlines, or meet its Ctrl-C.
    _guard.run_guarded(os.getpid, what="the fork server's start", timeout=120)


@pytest.fixture(autouse=True, scope="module")
def _signal_handlers_as_found() -> Iterator[None]:
    """Each test module leaves SIGINT's and SIGTERM's handlers as it found them: ``ray.init``
    installs a SIGTERM handler that outlives ``ray.shutdown()``, and a later test's signals
    would meet it."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


_RAY_TMPDIR: list[str] = []


def pytest_sessionstart(session: object) -> None:
    """Each test session's Ray clusters keep their files in a folder of their own: a cluster
    that a test kills on purpose leaves its address behind (``ray_current_cluster``), and the
    next ``ray.init()`` of another session must not find it. Short, for Ray's socket paths."""
    import os

    if "RAY_TMPDIR" not in os.environ:
        _RAY_TMPDIR.append(tempfile.mkdtemp(prefix="vgr-", dir="/tmp"))
        os.environ["RAY_TMPDIR"] = _RAY_TMPDIR[0]


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    import shutil

    for folder in _RAY_TMPDIR:
        shutil.rmtree(folder, ignore_errors=True)
