"""``vggnorm apply`` needs h5py and numpy only: neither importing it nor running it loads Keras or
TensorFlow (seconds of import time, gigabytes of wheels). Checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from fixtures import h5_layouts as hl
from fixtures.records import make_record
from vggnorm.core import topology
from vggnorm.formats.registry import read_weights
from vggnorm.formats.statsfile import write_stats

CHECK = "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules, sorted(sys.modules)"


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_importing_the_apply_path_loads_no_framework(tmp_path):
    modules = "vggnorm, vggnorm.commands.apply, vggnorm.cli, vggnorm.formats.keras_h5, vggnorm.core.keras_config"
    proc = _run(f"import sys, {modules}\n{CHECK}\n", tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_vggnorm_apply_runs_without_loading_a_framework(tmp_path):
    src = hl.write_keras_zip(hl.finetuned("gap", seed=1), tmp_path / "m.keras")
    ws = read_weights(src)
    stats = tmp_path / "stats.h5"
    write_stats(stats, make_record(ws, topology.bind(ws.file)))
    out = tmp_path / "n.keras"
    proc = _run(
        f"""
        import sys
        from vggnorm.cli import main
        rc = main(["apply", "--in", {str(src)!r}, "--out", {str(out)!r}, "--stats", {str(stats)!r}])
        assert rc == 0, rc
        {CHECK}
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert read_weights(out).file.provenance is not None
