"""The library works from a script without ``if __name__ == "__main__":`` and from standard
input: the guarded reader's child processes never run the user's script again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.h5_layouts import vgg, write_downloaded

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
print("run", flush=True)  # printed again if a child process re-ran this script
from vggnorm import read_weights
ws = read_weights(sys.argv[1] if len(sys.argv) > 1 else {path!r})
print(len(ws.arrays), flush=True)
"""


def _weights(tmp_path: Path) -> Path:
    return write_downloaded(vgg("vgg16"), tmp_path / "vgg16.h5")


def test_a_script_without_a_main_guard(tmp_path: Path) -> None:
    path = _weights(tmp_path)
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(path=str(path)))
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["run", "26"]  # 13 convs x (kernel, bias), read once


@pytest.mark.parametrize("how", ["stdin", "-c"])
def test_a_script_from_standard_input_or_the_command_line(tmp_path: Path, how: str) -> None:
    code = SCRIPT.format(path=str(_weights(tmp_path)))
    argv = [sys.executable, "-"] if how == "stdin" else [sys.executable, "-c", code]
    out = subprocess.run(argv, input=code if how == "stdin" else None, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["run", "26"]
