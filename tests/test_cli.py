"""The three verbs end to end, as a user types them, on generated datasets and tiny VGG files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from fixtures.photos import write_photos
from vggnorm.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, EXIT_VERIFY, main
from vggnorm.formats.statsfile import read_stats


def _images(root: Path, names: list[str], seed: int = 0) -> None:
    write_photos(root, names, seed, max_side=90)


@pytest.fixture(scope="module")
def vgg16_notop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    path = tmp_path_factory.mktemp("w") / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return save_downloaded_layout(tiny_vgg(include_top=False, arch="vgg16"), path)


@pytest.fixture(scope="module")
def vgg19_top(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    path = tmp_path_factory.mktemp("w") / "vgg19_weights_tf_dim_ordering_tf_kernels.h5"
    return save_downloaded_layout(tiny_vgg(include_top=True, arch="vgg19"), path)


def _run(argv: list[str]) -> int:
    return main([*argv, "-q"])


@pytest.mark.keras
def test_folder_vgg16_notop_stats_apply_verify(
    tmp_path: Path, vgg16_notop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs", [f"sub/{i}.jpg" for i in range(5)] + ["a.png", "b.jpeg"])
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored: not an image extension")

    assert _run(["stats", "--data", "imgs", "--weights", str(vgg16_notop), "--size", "32",
                 "--batch-size", "3"]) == EXIT_OK  # fmt: skip
    record = read_stats("vggnorm-stats.h5")
    assert record.meta.complete and record.meta.model == "vgg16"
    assert record.n_images == 7 and record.skip_counts() == {"not an image": 1}
    # Every image counted once: 7 images x 32 x 32 positions in block1, 7 x 2 x 2 in block5.
    assert record.layers[0].count == 7 * 32 * 32
    assert record.layers[-1].count == 7 * 2 * 2

    assert _run(["apply", "--in", str(vgg16_notop), "--out", "vgg16_norm.h5"]) == EXIT_OK
    assert json.loads(Path(".vggnorm/last-apply.json").read_text())["normalized"].endswith(
        "vgg16_norm.h5"
    )
    assert _run(["verify"]) == EXIT_OK


@pytest.mark.keras
def test_imagenet_tree_vgg19_with_top_compares_predictions(
    tmp_path: Path,
    vgg19_top: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    _images(
        tmp_path / "in" / "train", [f"n0144076{c}/{i}.JPEG" for c in range(3) for i in range(2)]
    )
    assert _run(["stats", "--data", "in", "--weights", str(vgg19_top), "--size", "32"]) == EXIT_OK
    record = read_stats("vggnorm-stats.h5")
    assert record.meta.dataset_kind == "imagenet" and record.meta.model == "vgg19"
    assert _run(["apply", "--in", str(vgg19_top), "--out", "vgg19_norm.h5"]) == EXIT_OK
    with h5py.File("vgg19_norm.h5") as f:
        assert list(f.attrs) == ["layer_names"]  # the downloaded layout: nothing added at the root
        fc1 = f["fc1/fc1_W_1:0"][()]
    with h5py.File(vgg19_top) as f:
        assert not np.array_equal(fc1, f["fc1/fc1_W_1:0"][()])  # compensated
    capsys.readouterr()
    assert main(["verify", "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["means_ok"] and report["function_ok"]
    assert report["predictions"]["max_rel_err"] <= 1e-4
    assert len(report["layers"]) == 16


@pytest.mark.keras
def test_coco_tree_and_tampered_output_fails_verify(
    tmp_path: Path, vgg16_notop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    names = [f"{i:012d}.jpg" for i in range(1, 6)]
    _images(tmp_path / "coco" / "val2017", names)
    ann = {
        "images": [
            {"id": i + 1, "file_name": n, "width": 50, "height": 50} for i, n in enumerate(names)
        ]
        + [{"id": 99, "file_name": "../escape.jpg", "width": 5, "height": 5}],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }
    (tmp_path / "coco" / "annotations").mkdir()
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    assert (
        _run(["stats", "--data", "coco", "--weights", str(vgg16_notop), "--size", "32"]) == EXIT_OK
    )
    record = read_stats("vggnorm-stats.h5")
    assert record.meta.dataset_kind == "coco" and record.n_images == 5
    assert _run(["apply", "--in", str(vgg16_notop), "--out", "n.h5"]) == EXIT_OK

    with h5py.File("n.h5", "r+") as f:  # one weight nudged: no longer the same function
        ds = f["block3_conv1/block3_conv1_W_1:0"]
        w = ds[()]
        w[1, 1, :, 7] *= 1.01
        ds[...] = w
    assert _run(["verify"]) == EXIT_VERIFY


@pytest.mark.keras
def test_interrupted_stats_resume_equals_uninterrupted_run(
    tmp_path: Path, vgg16_notop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vggnorm.runtime.network import FeatureNet

    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs", [f"{i}.png" for i in range(7)])
    base = ["stats", "--data", "imgs", "--weights", str(vgg16_notop), "--size", "32",
            "--batch-size", "2"]  # fmt: skip
    assert _run([*base, "--out", "straight.h5"]) == EXIT_OK

    real = FeatureNet.moments
    calls = {"n": 0}

    def flaky(self: FeatureNet, images: np.ndarray) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(FeatureNet, "moments", flaky)
    assert _run([*base, "--out", "resumed.h5"]) == EXIT_INTERRUPTED
    partial = read_stats("resumed.h5")
    assert not partial.meta.complete and partial.meta.position == 4 and partial.n_images == 4
    monkeypatch.setattr(FeatureNet, "moments", real)
    assert _run([*base, "--out", "resumed.h5"]) == EXIT_ERROR  # exists: needs --resume or --force
    assert _run([*base, "--out", "resumed.h5", "--size", "64", "--resume"]) == EXIT_ERROR
    assert _run([*base, "--out", "resumed.h5", "--resume"]) == EXIT_OK

    a, b = read_stats("straight.h5"), read_stats("resumed.h5")
    assert sorted(a.images) == sorted(b.images) and b.meta.complete
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.count == y.count
        np.testing.assert_allclose(y.sum, x.sum, rtol=1e-12)
        np.testing.assert_allclose(y.sumsq, x.sumsq, rtol=1e-12)


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        pytest.param(["stats", "--data", "nowhere"], EXIT_ERROR, "nowhere: no such file or folder", id="no-data"),
        pytest.param(["stats", "--data", ".", "--shard", "3/2"], EXIT_USAGE, "need 0 <= I < N", id="bad-shard"),
        pytest.param(["stats", "--data", ".", "--batch-size", "0"], EXIT_USAGE, "must be at least 1", id="batch-0"),
        pytest.param(["apply", "--in", "x.h5", "--out", "y.h5"], EXIT_ERROR, "x.h5: no such file", id="no-input"),
        pytest.param(["verify"], EXIT_ERROR, "nothing to verify", id="verify-nothing"),
        pytest.param(["frobnicate"], EXIT_USAGE, "invalid choice", id="unknown-command"),
    ],
)  # fmt: skip
def test_bad_requests_give_one_line_errors(
    argv: list[str], code: int, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    try:
        got = main(argv)
    except SystemExit as e:  # argparse usage errors
        got = int(e.code or 0)
    assert got == code
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    if code == EXIT_ERROR:
        assert err.startswith("ERROR ") and err.count("\n") == 1


@pytest.mark.keras
def test_apply_refuses_stats_of_another_model_and_existing_output(
    tmp_path: Path,
    vgg16_notop: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    assert (
        _run(["stats", "--data", "imgs", "--weights", str(vgg16_notop), "--size", "32"]) == EXIT_OK
    )
    other = save_downloaded_layout(tiny_vgg(arch="vgg16", seed=1), tmp_path / "other.h5")
    capsys.readouterr()
    assert _run(["apply", "--in", str(other), "--out", "o.h5"]) == EXIT_ERROR
    assert "not the model the stats were gathered on" in capsys.readouterr().err
    assert not Path("o.h5").exists()
    Path("o.h5").write_bytes(b"keep me")
    assert _run(["apply", "--in", str(vgg16_notop), "--out", "o.h5"]) == EXIT_ERROR
    assert "already exists; pass --force" in capsys.readouterr().err
    assert Path("o.h5").read_bytes() == b"keep me"
    assert _run(["apply", "--in", str(vgg16_notop), "--out", "o.h5", "--force"]) == EXIT_OK
    assert _run(["apply", "--in", "o.h5", "--out", "o2.h5"]) == EXIT_ERROR
    assert "already normalized" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_help_does_not_load_tensorflow() -> None:
    code = (
        "import sys\nfrom vggnorm.cli import main\n"
        "for argv in (['--help'], ['stats', '--help'], ['apply', '--help'], ['verify', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('LOADED' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'CLEAN')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "100"}).stdout  # fmt: skip
    assert out.strip().endswith("CLEAN")
    assert "--preprocess {caffe,unit,torch,rgb255}" in out and "default 224" in out


@pytest.mark.keras
def test_shards_merge_to_the_unsharded_run(
    tmp_path: Path,
    vgg16_notop: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs", [f"{i}.jpg" for i in range(7)])
    (tmp_path / "imgs" / "empty.jpg").write_bytes(b"")
    base = ["stats", "--data", "imgs", "--weights", str(vgg16_notop), "--size", "32"]
    assert _run([*base, "--out", "all.h5"]) == EXIT_OK
    for i in range(3):
        assert _run([*base, "--shard", f"{i}/3", "--out", f"s{i}.h5"]) == EXIT_OK
    assert _run(["merge", "s0.h5", "s1.h5", "--out", "part.h5"]) == EXIT_OK
    assert read_stats("part.h5").meta.shard == (0, 3)  # two of three shards: not the whole set
    assert _run(["merge", "s0.h5", "s1.h5", "s2.h5", "--out", "merged.h5"]) == EXIT_OK

    a, m = read_stats("all.h5"), read_stats("merged.h5")
    assert m.meta.shard == (0, 1) and m.meta.selection_sha256 == a.meta.selection_sha256
    assert sorted(m.images) == sorted(a.images) and m.skip_counts() == a.skip_counts()
    for x, y in zip(a.layers, m.layers, strict=True):
        assert x.count == y.count
        np.testing.assert_allclose(y.sum, x.sum, rtol=1e-12)
        np.testing.assert_allclose(y.sumsq, x.sumsq, rtol=1e-12)
        # the per-image sums add across shards as well: the merged precision is the single run's
        assert x.per_image is not None and y.per_image is not None
        assert x.per_image.images == y.per_image.images == len(a.images)
        np.testing.assert_allclose(y.per_image.sum, x.per_image.sum, rtol=1e-12)
        np.testing.assert_allclose(y.per_image.sumsq, x.per_image.sumsq, rtol=1e-12)
    # The merged file is as good as the single run for apply.
    assert (
        _run(["apply", "--in", str(vgg16_notop), "--out", "n.h5", "--stats", "merged.h5"])
        == EXIT_OK
    )

    capsys.readouterr()
    assert _run(["merge", "s0.h5", "s0.h5", "--out", "twice.h5"]) == EXIT_ERROR
    assert "both counted" in capsys.readouterr().err
    assert _run([*base, "--shard", "1/3", "--size", "48", "--out", "other.h5"]) == EXIT_OK
    assert _run(["merge", "s0.h5", "other.h5", "--out", "bad.h5"]) == EXIT_ERROR
    assert "differs from s0.h5 in size" in capsys.readouterr().err
    assert not Path("twice.h5").exists() and not Path("bad.h5").exists()


@pytest.mark.keras
def test_report_bn_and_verify_plot_verbs(
    tmp_path: Path,
    vgg16_notop: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs", [f"{i}.jpg" for i in range(4)])
    assert (
        _run(["stats", "--data", "imgs", "--weights", str(vgg16_notop), "--size", "32"]) == EXIT_OK
    )
    assert _run(["apply", "--in", str(vgg16_notop), "--out", "n.h5"]) == EXIT_OK
    assert _run(["verify", "--plot", "verify.png"]) == EXIT_OK
    assert Path("verify.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    assert main(["report", "--weights", str(vgg16_notop), "--normalized", "n.h5"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "style loss spread across layers" in out
    report = json.loads(Path("vggnorm-report.json").read_text())
    assert len(report["layers"]) == 13 and Path("vggnorm-report.png").stat().st_size > 0
    assert _run(["report"]) == EXIT_ERROR  # outputs exist: --force needed
    assert _run(["report", "--force"]) == EXIT_OK

    assert _run(["bn", "--in", str(vgg16_notop), "--out", "bn.h5"]) == EXIT_ERROR  # not .keras
    assert _run(["bn", "--in", str(vgg16_notop), "--out", "bn.keras"]) == EXIT_OK
    import keras

    bn = keras.models.load_model("bn.keras")
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in bn.layers) == 13


def test_a_target_error_on_a_shard_is_refused_with_the_way_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # refused before the weights are read or an image decoded: no Keras, no file needed
    argv = ["stats", "--data", str(tmp_path), "--weights", str(tmp_path / "w.h5"), "--shard",
            "0/2", "--target-error", "2%", "--out", str(tmp_path / "s.h5")]  # fmt: skip
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR ")
    assert "a shard cannot know the precision of the merged statistics" in err[0]
    assert "--ray" in err[0]
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.keras
def test_stats_and_merge_print_the_precision(
    tmp_path: Path, vgg16_notop: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "imgs", [f"{i}.jpg" for i in range(6)])
    base = ["stats", "--data", "imgs", "--weights", str(vgg16_notop), "--size", "32"]
    for i in range(2):
        assert main([*base, "--shard", f"{i}/2", "--out", f"s{i}.h5"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "precision of the means over 3 images" in out and "block5_conv3" in out
    assert main(["merge", "s0.h5", "s1.h5", "--out", "m.h5"]) == EXIT_OK
    merged = capsys.readouterr().out
    assert "precision of the means over 6 images" in merged
    table = read_stats("m.h5").precision()
    assert table is not None and f"±{table[0].median:.2%}" in merged
