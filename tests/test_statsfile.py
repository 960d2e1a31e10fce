"""vggnorm.formats.statsfile: exact round trips, clear refusals, atomic writes (docs/files.md)."""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import vggnorm.formats.outputs
from vggnorm.core.errors import StatsError, VggnormError
from vggnorm.core.inputs import Decode
from vggnorm.core.stats import LayerStats
from vggnorm.core.statsrecord import StatsMeta, StatsRecord
from vggnorm.formats.statsfile import FORMAT_VERSION, _read_stats, read_stats, write_stats

META = StatsMeta(
    model="vgg19",
    fingerprint="f" * 64,
    weights="/models/vgg19 ü.h5",
    decode=Decode(size=224, resize="shorter-center-crop", interpolation="bicubic", draft=True),



    preprocess="caffe",
    precision="fp32",
    dataset_kind="coco",
    dataset_path="/data/coco/val2017",
    dataset_root="/data/coco",
    annotations="/data/coco/annotations/instances_val2017.json",
    dataset_items=5000,
    selection_sha256="0123456789abcdef" * 4,
    selection_size=1667,
    limit=5000,
    shard=(1, 3),
    position=1200,
    complete=False,
    tool_version="0.1.0",
    backend="keras 3 (tensorflow)",
    created="2024-01-02T03:04:05+00:00",
    updated="2024-01-02T04:05:06+00:00",
    merged_from=("a.h5", "b.h5"),
)


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def make_record(seed: int = 0, n_layers: int = 16) -> StatsRecord:
    rng = np.random.default_rng(seed)
    # names out of alphabetical order: the file must keep network order, not sort by name
    names = [f"{'zyx'[i % 3]}_conv{i}" for i in range(n_layers)]
    layers = []
    for i, name in enumerate(names):
        c = 1 + i % 5
        s = rng.uniform(0, 1e6, c)
        s[0] = [0.0, 5e-324, 1e-300, 1e150, np.nextafter(1.0, 2.0)][i % 5]  # awkward bits
        count = int(rng.integers(1, 2**40))
        # sums of squares a real run can have: sum^2 <= count * sumsq (read_stats checks it)
        sumsq = s * (rng.uniform(0, 3, c) + s / count)
        layers.append(LayerStats(name, s, sumsq, count))
    images = ("000000000139.jpg", "sub/dir/日本語.png", "ä b.jpeg", "x" * 300)
    skipped = (("bad.jpg", "decode", "cannot identify image file"), ("ü.png", "too-small", "1x1"))
    return StatsRecord(META, tuple(layers), images, skipped)


def assert_same_record(got: StatsRecord, want: StatsRecord) -> None:
    assert got.meta == want.meta
    assert [s.name for s in got.layers] == [s.name for s in want.layers]
    for g, w in zip(got.layers, want.layers):
        assert g.count == w.count
        assert g.sum.dtype == g.sumsq.dtype == np.float64
        assert bits(g.sum) == bits(w.sum), g.name
        assert bits(g.sumsq) == bits(w.sumsq), g.name
    assert got.images == want.images
    assert got.skipped == want.skipped


# --------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------


def test_round_trip_is_exact(tmp_path):
    record = make_record()
    path = tmp_path / "stats.h5"
    write_stats(path, record)
    got = read_stats(path)
    assert_same_record(got, record)
    assert isinstance(got.meta.shard, tuple) and isinstance(got.meta.merged_from, tuple)
    assert got.skip_counts() == {"decode": 1, "too-small": 1}
    assert os.listdir(tmp_path) == ["stats.h5"]


def test_round_trip_of_an_empty_checkpoint(tmp_path):
    # a checkpoint taken before any image was counted: no images, nothing skipped, zero counts
    record = StatsRecord(
        replace(META, position=0, limit=None, annotations=None, merged_from=()),
        (LayerStats.empty("block1_conv1", 64), LayerStats.empty("block1_conv2", 64)),
        (),
    )
    write_stats(tmp_path / "s.h5", record)
    assert_same_record(read_stats(tmp_path / "s.h5"), record)


@settings(
    database=None,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    sums=st.lists(
        hnp.arrays(np.float64, st.integers(1, 8), elements=st.floats(0, 1e150)),
        min_size=1,
        max_size=4,
    ),
    images=st.lists(st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s), max_size=5),
)
def test_round_trip_property(tmp_path, sums, images):
    # sumsq = sum^2 with count >= 1 is what one activation value per filter gives: a run's stats
    layers = tuple(LayerStats(f"c{i}", s, s * s, i + 1) for i, s in enumerate(sums))
    record = StatsRecord(META, layers, tuple(images))
    write_stats(tmp_path / "p.h5", record)
    assert_same_record(read_stats(tmp_path / "p.h5"), record)


def test_rewrite_replaces_the_content(tmp_path):
    path = tmp_path / "s.h5"
    write_stats(path, make_record(0))
    second = make_record(1, n_layers=3).with_meta(complete=True, position=1667)
    write_stats(path, second)
    assert_same_record(read_stats(path), second)
    assert os.listdir(tmp_path) == ["s.h5"]


def test_accepts_str_paths(tmp_path):
    write_stats(str(tmp_path / "s.h5"), make_record(n_layers=2))
    assert read_stats(str(tmp_path / "s.h5")).meta == META


# --------------------------------------------------------------------------------------------
# Refusals: every message names the file
# --------------------------------------------------------------------------------------------


def _read_error(path: Path) -> str:
    with pytest.raises(StatsError) as info:
        read_stats(path)
    assert isinstance(info.value, VggnormError)
    message = str(info.value)
    assert str(path) in message
    return message


def test_a_missing_stats_file_is_refused(tmp_path):
    message = _read_error(tmp_path / "nope.h5")
    assert "no such stats file" in message


def test_a_directory_is_not_a_stats_file(tmp_path):
    (tmp_path / "dir.h5").mkdir()
    assert "no such stats file" in _read_error(tmp_path / "dir.h5")


def test_an_hdf5_file_that_is_not_a_stats_file(tmp_path):
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"block1_conv1"]
        f.create_group("block1_conv1")
    assert "not a vggnorm stats file" in _read_error(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"not hdf5 at all\n", b"\x89HDF\r\n\x1a\n" + b"\0" * 8],
    ids=["empty", "text", "bad-hdf5"],
)
def test_a_file_that_is_not_hdf5(tmp_path, content):
    path = tmp_path / "stats.h5"
    path.write_bytes(content)
    assert "unreadable stats file" in _read_error(path)


def test_a_newer_format_version(tmp_path):
    path = tmp_path / "stats.h5"
    write_stats(path, make_record(n_layers=2))
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    message = _read_error(path)
    assert f"version {FORMAT_VERSION + 1} is newer" in message
    assert "upgrade vggnorm" in message


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_a_truncated_file(tmp_path, keep):
    path = tmp_path / "stats.h5"
    write_stats(path, make_record())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert "unreadable stats file" in _read_error(path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: f.attrs.__delitem__("meta"),
        lambda f: f.attrs.__setitem__("meta", "{not json"),
        lambda f: f.attrs.__setitem__("meta", '{"model": "vgg16"}'),
        lambda f: f.__delitem__("images"),
        lambda f: f["layers"][next(iter(f["layers"]))].__delitem__("sumsq"),
    ],
    ids=["no-meta", "bad-json", "incomplete-meta", "no-images", "no-sumsq"],
)
def test_a_damaged_stats_file(tmp_path, damage):
    path = tmp_path / "stats.h5"
    write_stats(path, make_record(n_layers=2))
    with h5py.File(path, "a") as f:
        damage(f)
    assert "unreadable stats file" in _read_error(path)


def test_corruption_that_h5py_reports_as_runtime_error(tmp_path, monkeypatch):
    # HDF5 reports some on-disk corruption ("bad local heap signature", "addr undefined") as
    # RuntimeError while iterating a group; that too must become a StatsError.
    path = tmp_path / "stats.h5"
    write_stats(path, make_record(n_layers=2))

    class CorruptFile(h5py.File):
        def __getitem__(self, key):
            raise RuntimeError("Link iteration failed (bad local heap signature)")

    monkeypatch.setattr(h5py, "File", CorruptFile)
    # the reader itself, in this process (read_stats runs it in a child, out of monkeypatch's reach)
    with pytest.raises(StatsError, match="bad local heap signature") as info:
        _read_stats(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# Failed writes leave nothing behind and never damage the previous file
# --------------------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["replace", "h5py"])
def test_a_failed_write_leaves_no_file_and_no_temp(tmp_path, monkeypatch, where):
    if where == "replace":
        monkeypatch.setattr(vggnorm.formats.outputs.os, "replace", _enospc)
    else:
        monkeypatch.setattr(h5py, "File", _enospc)
    target = tmp_path / "stats.h5"
    with pytest.raises(StatsError) as info:
        write_stats(target, make_record(n_layers=2))
    assert str(target) in str(info.value)
    assert os.strerror(errno.ENOSPC) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert not target.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["replace", "h5py"])
def test_an_existing_stats_file_survives_a_failed_rewrite(tmp_path, monkeypatch, where):
    target = tmp_path / "stats.h5"
    first = make_record(0)
    write_stats(target, first)
    before = target.read_bytes()
    if where == "replace":
        monkeypatch.setattr(vggnorm.formats.outputs.os, "replace", _enospc)
    else:
        monkeypatch.setattr(h5py, "File", _enospc)
    with pytest.raises(StatsError):
        write_stats(target, make_record(1, n_layers=3))
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert_same_record(read_stats(target), first)
    assert os.listdir(tmp_path) == ["stats.h5"]


def test_a_write_that_fails_half_way_leaves_the_old_file(tmp_path):
    target = tmp_path / "stats.h5"
    first = make_record(0, n_layers=2)
    write_stats(target, first)
    before = target.read_bytes()
    broken = replace(first, images=("ok.jpg", None))  # not a string: fails inside the writer
    with pytest.raises((TypeError, ValueError)):  # h5py refuses None as a string
        write_stats(target, broken)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["stats.h5"]


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_writing_into_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StatsError, match="could not write") as info:
            write_stats(ro / "stats.h5", make_record(n_layers=2))
        assert str(ro / "stats.h5") in str(info.value)
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_writing_into_a_missing_directory(tmp_path):
    target = tmp_path / "missing" / "stats.h5"
    with pytest.raises(StatsError, match="could not write") as info:
        write_stats(target, make_record(n_layers=2))
    assert str(target) in str(info.value)
    assert os.listdir(tmp_path) == []
