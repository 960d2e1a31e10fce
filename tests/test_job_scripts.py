"""`vggnorm stats` in job scripts: `--resume` is safe to repeat, two runs never write one file,
an output that cannot be written fails before the first image, and the default decoding is the
standard full JPEG decode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggnorm.cli import EXIT_ERROR, EXIT_OK, main
from vggnorm.formats import outputs as atomic
from vggnorm.formats.statsfile import read_stats

pytestmark = pytest.mark.keras


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    root = tmp_path_factory.mktemp("jobs")
    data = root / "imgs"
    data.mkdir()
    rng = np.random.default_rng(11)
    for i in range(5):
        # JPEGs larger than twice the target size: the DCT draft would decode them at 1/2 scale
        arr = rng.integers(0, 256, (96 + 8 * i, 80, 3)).astype(np.uint8)
        Image.fromarray(arr).save(data / f"{i}.jpg", quality=90)
    weights = save_downloaded_layout(tiny_vgg(arch="vgg16"), root / "vgg16_notop.h5")
    return data, weights


def _argv(setup: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    data, weights = setup
    return ["stats", "--data", str(data), "--weights", str(weights), "--size", "32",
            "--out", str(out), "-q", *extra]  # fmt: skip


def test_resume_on_a_missing_file_starts_and_on_a_complete_one_does_nothing(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.h5"
    assert main(_argv(setup, out, "--resume")) == EXIT_OK  # missing: a new run
    first = out.read_bytes()
    assert read_stats(out).meta.complete and read_stats(out).n_images == 5
    assert main(_argv(setup, out, "--resume")) == EXIT_OK  # complete, same settings: no-op
    assert out.read_bytes() == first
    capsys.readouterr()
    assert main(_argv(setup, out, "--resume", "--size", "64")) == EXIT_ERROR  # other settings
    err = capsys.readouterr().err
    assert "cannot resume" in err and "size" in err and err.count("\n") == 1
    assert out.read_bytes() == first


def test_a_second_run_on_the_same_out_is_refused_even_with_force(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.h5"
    hold = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from vggnorm.formats.outputs import output_lock
        with output_lock(Path(sys.argv[1]), "vggnorm stats --data coco/ (slow job)"):
            print("held", flush=True)
            time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(_argv(setup, out, "--force")) == EXIT_ERROR
        err = capsys.readouterr().err
        assert f"another vggnorm run is writing {out} (pid {holder.pid}" in err
        assert "(slow job)" in err and err.count("\n") == 1
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    assert main(_argv(setup, out)) == EXIT_OK  # the dead holder's lock is gone with it


def test_a_full_output_file_system_fails_before_the_first_image(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from vggnorm.runtime.network import FeatureNet

    calls = []
    monkeypatch.setattr(FeatureNet, "moments", lambda self, images: calls.append(1))
    real = os.statvfs(tmp_path)

    class Full:
        f_bavail, f_frsize = 0, real.f_frsize

    monkeypatch.setattr(atomic.os, "statvfs", lambda path: Full)
    assert main(_argv(setup, tmp_path / "s.h5")) == EXIT_ERROR
    assert calls == []  # no image went through the network
    err = capsys.readouterr().err
    assert "0.0 MiB free" in err and err.startswith("ERROR ") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_temporary_files_of_a_killed_run_are_cleaned_by_the_next(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    left = tmp_path / ".s.h5.k1ll3d_x.tmp"
    left.write_bytes(b"half a checkpoint")
    assert main(_argv(setup, tmp_path / "s.h5")) == EXIT_OK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_full_decode_is_the_default_and_draft_an_opt_in(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    from vggnorm.core.inputs import Decode
    from vggnorm.runtime.data import load_image

    data, _ = setup
    assert main(_argv(setup, tmp_path / "full.h5")) == EXIT_OK
    assert main(_argv(setup, tmp_path / "draft.h5", "--draft")) == EXIT_OK
    full, draft = read_stats(tmp_path / "full.h5"), read_stats(tmp_path / "draft.h5")
    assert (full.meta.decode.draft, draft.meta.decode.draft) == (False, True)
    # the default decode is the plain PIL one: no DCT-domain shortcut
    path = data / "0.jpg"
    with Image.open(path) as im:
        side = min(im.size)
        box = ((im.size[0] - side) / 2, (im.size[1] - side) / 2)
        plain = im.convert("RGB").resize(
            (32, 32), Image.Resampling.BILINEAR, box=(*box, box[0] + side, box[1] + side)
        )
    np.testing.assert_array_equal(load_image(path, Decode(32)), np.asarray(plain))
    assert not np.array_equal(load_image(path, Decode(32, draft=True)), np.asarray(plain))
    # and the statistics differ accordingly
    assert any(not np.array_equal(a.sum, b.sum) for a, b in zip(full.layers, draft.layers))
