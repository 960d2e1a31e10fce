"""Damaged files of the containers issue #17 added (``.mat``, ``.onnx``) and of the PyTorch ones
(``.pth``, read in process before, and ``.safetensors``): single-byte flips in their structure,
each read through the guarded public reader, end in a result or in one error line naming the
file, within the deadline: never a traceback, a crash or a hang. No Keras."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fixtures import damaged as dm
from fixtures import damaged_formats as df
from vggnorm.core.errors import VggnormError
from vggnorm.formats import _guard as guard
from vggnorm.formats.registry import read_weights

#: Deadline of one fuzzed read: a tiny file reads in milliseconds; this only bounds a hang.
FUZZ_TIMEOUT = 5.0
#: What a killed child may add on top of its deadline (kill, reap, a loaded 2-core machine).
MARGIN = 5.0
#: Flips per container: a sample of the structure (the full counts: scripts/fuzz_weights.py).
FLIPS = {".mat": 40, ".onnx": 40, ".pth": 25, ".safetensors": 20}
NEEDS = {".mat": "scipy", ".onnx": "onnx", ".pth": "torch", ".safetensors": "safetensors"}


@pytest.fixture(autouse=True)
def guard_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(guard.TIMEOUT_ENV, str(FUZZ_TIMEOUT))


def outcome(path: Path) -> str:
    """``ok``, or ``error`` for one line naming the file; anything else fails the test."""
    t0 = time.monotonic()
    try:
        ws = read_weights(path)
    except VggnormError as e:
        message = str(e)
        assert "\n" not in message and str(path) in message, message
        result = "error"
    else:
        assert all(np.all(np.isfinite(v)) for v in ws.arrays.values())
        result = "ok"
    assert time.monotonic() - t0 < FUZZ_TIMEOUT + MARGIN
    return result


@pytest.mark.parametrize("suffix", list(FLIPS))
def test_single_byte_flips_end_in_a_result_or_one_line(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip(NEEDS[suffix])
    src = df.WRITERS[suffix](tmp_path / f"src{suffix}")
    intact = outcome(src)
    assert intact == ("ok" if suffix in (".mat", ".onnx") else "error")  # tiny state dicts: no VGG
    data = src.read_bytes()
    outcomes = []
    for offset, mask in dm.sample_flips(df.structure(src), FLIPS[suffix], seed=17):
        path = tmp_path / f"flip_{offset}_{mask:02x}{suffix}"
        path.write_bytes(dm.flipped(data, offset, mask))
        outcomes.append(outcome(path))
        path.unlink()
    assert len(outcomes) == FLIPS[suffix]
    if intact == "ok":
        assert outcomes.count("error") > 0  # the flips did hit structure that matters


def test_the_structure_offsets_cover_the_headers(tmp_path: Path) -> None:
    """The offsets the fuzz samples are the containers' structure, not their tensor data."""
    pytest.importorskip("torch")
    pth = df.write_pth(tmp_path / "s.pth")
    offsets = df.structure(pth)
    assert offsets[0] == 0 and 0 < len(offsets) < pth.stat().st_size  # the data/N bytes left out
    st = df.write_safetensors(tmp_path / "s.safetensors")
    header = int.from_bytes(st.read_bytes()[:8], "little")
    assert len(df.structure(st)) == 8 + header < st.stat().st_size
