"""vggnorm.core.statsrecord: which settings two runs must share to be resumed or merged, and a
record's JSON. Records built by hand (fixtures.records), no files."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fixtures.h5_layouts import vgg, write_full_model
from fixtures.records import make_record
from vggnorm.core import topology
from vggnorm.core.inputs import Decode
from vggnorm.core.stats import ImageMoments
from vggnorm.core.statsrecord import StatsRecord, same_settings
from vggnorm.formats.registry import read_weights


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> StatsRecord:
    ws = read_weights(write_full_model(vgg("vgg16"), tmp_path_factory.mktemp("w") / "vgg16.h5"))
    return make_record(ws, topology.bind(ws.file))


def test_the_settings_that_decide_the_means(record: StatsRecord) -> None:
    meta = record.meta
    assert meta.settings() == {
        "model": "vgg16", "fingerprint": meta.fingerprint, "size": 32, "resize": "crop",
        "interpolation": "bilinear", "draft": False, "preprocess": "caffe", "precision": "fp32",
        "padding": "zero", "pooling": "max", "dataset_kind": "folder",
    }  # fmt: skip


@pytest.mark.parametrize(("change", "differ"), [
    ({"model": "vgg19"}, ["model"]),
    ({"fingerprint": "f" * 64}, ["fingerprint"]),
    ({"decode": Decode(64, "stretch", "bicubic", True)}, ["size", "resize", "interpolation", "draft"]),
    ({"preprocess": "torch", "precision": "bf16"}, ["preprocess", "precision"]),
    ({"padding": "reflect", "pooling": "avg", "dataset_kind": "coco"}, ["padding", "pooling", "dataset_kind"]),
    # where the images were and how far the run got are not settings
    ({"dataset_path": "/elsewhere", "position": 3, "complete": False, "weights": "x.h5"}, []),
])  # fmt: skip
def test_same_settings_names_every_difference(
    record: StatsRecord, change: dict[str, object], differ: list[str]
) -> None:
    other = replace(record.meta, **change)
    assert same_settings(record.meta, other) == differ
    assert same_settings(other, record.meta) == differ


def test_a_record_as_json(record: StatsRecord) -> None:
    d = record.to_dict()
    assert list(d) == ["meta", "images", "skipped", "layers", "intervals"]
    assert d["meta"] == record.meta.to_dict() and d["images"] == 10 and d["skipped"] == {}
    assert [row["name"] for row in d["layers"]] == list(topology.bind(
        read_weights(record.meta.weights).file).conv_names)  # fmt: skip
    assert d["intervals"] is None  # no per-image moments: a version-1 record
    # with them, one interval figure per layer
    layers = tuple(replace(s, per_image=ImageMoments.of(np.tile(s.mean, (3, 1)) * [[1.0], [2.0], [3.0]]))
                   for s in record.layers)  # fmt: skip
    v2 = replace(record, layers=layers).to_dict()["intervals"]
    assert v2 is not None and [p["name"] for p in v2] == [s.name for s in layers]
