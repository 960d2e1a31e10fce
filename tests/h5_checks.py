"""Checks shared by the fast-lane format tests: byte-level HDF5 comparison and stats records."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vggnorm.core import topology
from vggnorm.core.inputs import Decode
from vggnorm.core.stats import LayerStats
from vggnorm.core.statsrecord import StatsMeta, StatsRecord
from vggnorm.core.weightset import WeightSet
from vggnorm.formats._h5 import PROVENANCE_GROUP

DEAD_FILTERS = [1, 3]


def h5_objects(f: Any) -> dict[str, Any]:
    objects = {"/": f}

    def visit(name: str, obj: Any) -> None:
        objects["/" + name] = obj  # returns None: a non-None return would stop the walk

    f.visititems(visit)
    return objects


def attr_items(obj: Any) -> dict[str, tuple[Any, Any, Any]]:
    """Every attribute with its HDF5 type, shape and value."""
    out = {}
    for name in obj.attrs:
        aid = obj.attrs.get_id(name)
        out[name] = (aid.get_type(), aid.shape, obj.attrs[name])
    return out


def assert_same_attrs(a: Any, b: Any, where: str) -> None:
    attrs_a, attrs_b = attr_items(a), attr_items(b)
    assert sorted(attrs_a) == sorted(attrs_b), where
    for name, (type_a, shape_a, value_a) in attrs_a.items():
        type_b, shape_b, value_b = attrs_b[name]
        assert type_a == type_b, f"{where} attr {name}: HDF5 type changed"
        assert shape_a == shape_b, f"{where} attr {name}: shape changed"
        va, vb = np.asarray(value_a), np.asarray(value_b)
        assert (va.dtype, va.shape) == (vb.dtype, vb.shape), f"{where} attr {name}"
        assert va.tolist() == vb.tolist(), f"{where} attr {name}: value changed"


def is_optimizer_path(path: str) -> bool:
    return path.split("/")[1] in ("optimizer_weights", "optimizer")


def compare_h5(src: Path, out: Path, changed: dict[str, np.ndarray]) -> None:
    """``out`` equals ``src`` except for ``changed`` datasets, optimizer groups and provenance."""
    with h5py.File(src, "r") as fa, h5py.File(out, "r") as fb:
        objs_a, objs_b = h5_objects(fa), h5_objects(fb)
        expected = {p for p in objs_a if p == "/" or not is_optimizer_path(p)}
        got = {p for p in objs_b if not p.startswith(f"/{PROVENANCE_GROUP}")}
        assert got == expected
        for path in sorted(expected):
            a, b = objs_a[path], objs_b[path]
            assert type(a) is type(b), path
            assert_same_attrs(a, b, path)
            if isinstance(a, h5py.Dataset):
                assert a.id.get_type() == b.id.get_type(), path
                assert (a.shape, a.chunks, a.compression) == (b.shape, b.chunks, b.compression)
                if path in changed:
                    np.testing.assert_array_equal(b[()], changed[path], err_msg=path)
                    assert b.dtype == changed[path].dtype, path
                else:
                    assert np.asarray(a[()]).tobytes() == np.asarray(b[()]).tobytes(), path


def inner_weights(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as z:
        z.extract("model.weights.h5", folder)
    return folder / "model.weights.h5"


def make_record(ws: WeightSet, bound: topology.Bound, *, seed: int = 0) -> StatsRecord:
    """A complete stats record with chosen positive means; filters 1 and 3 of the first, middle
    and last conv have mean 0 (dead)."""
    rng = np.random.default_rng(seed)
    count = 1000
    layers = []
    n = len(bound.conv_names)
    for i, conv in enumerate(bound.arch.convs):
        means = rng.uniform(0.25, 4.0, conv.filters)
        if i in (0, n // 2, n - 1):
            means[DEAD_FILTERS] = 0.0
        layers.append(LayerStats(conv.name, means * count, means * means * count * 1.5, count))
    meta = StatsMeta(
        model=bound.arch.name,
        fingerprint=topology.fingerprint(ws.arrays, bound.arch.weighted_features),
        weights=str(ws.file.path),
        decode=Decode(size=32, resize="crop", interpolation="bilinear", draft=False),



        preprocess="caffe",
        precision="fp32",
        dataset_kind="folder",
        dataset_path="/data/images",
        dataset_root="/data/images",
        annotations=None,
        dataset_items=10,
        selection_sha256="0" * 64,
        selection_size=10,
        position=10,
        complete=True,
        tool_version="test",
    )
    return StatsRecord(meta, tuple(layers), tuple(f"img{i}.jpg" for i in range(10)))
