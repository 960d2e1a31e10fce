"""vggnorm.runtime.data: decoding images of every kind, finding datasets, ordering and batching them.

All images are generated with Pillow in ``tmp_path``; no Keras needed.
"""

from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, JpegImagePlugin

from vggnorm.core.errors import DatasetError
from vggnorm.core.inputs import Decode
from vggnorm.runtime.data import Batch, ImageSkip, iter_batches, load_image, open_dataset, select

SMALL = Decode(size=16)


def smooth(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image (compresses well, survives JPEG with little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.3)
        channels.append(127 + 100 * np.sin(2 * np.pi * (fx * x / w + fy * y / h) + phase))
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def write_image(path, array_or_image, **save_kw):
    img = array_or_image
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save_kw)
    return path


def uniform(rgb, size=(20, 12)) -> Image.Image:
    return Image.new("RGB", size, rgb)


# ---------------------------------------------------------------------------------------------
# load_image: every mode becomes (size, size, 3) uint8 RGB


def _palette_image(transparent: bool) -> tuple[Image.Image, dict]:
    img = Image.new("P", (30, 18), 1)
    img.putpalette([200, 10, 10, 10, 200, 60] + [0, 0, 0] * 254)
    return img, ({"transparency": 1} if transparent else {})


def _cases():
    p_opaque, kw_opaque = _palette_image(False)
    p_transparent, kw_transparent = _palette_image(True)
    i16 = Image.fromarray(np.full((14, 22), 40000, np.uint16))
    assert i16.mode == "I;16"
    return [
        # id, image, file name, save kwargs, expected colour (None: only check shape), tolerance
        (
            "rgb-jpeg",
            uniform((200, 100, 50), (41, 29)),
            "a.jpg",
            {"quality": 95},
            (200, 100, 50),
            3,
        ),
        ("rgb-png-tall", uniform((1, 2, 3), (13, 77)), "a.png", {}, (1, 2, 3), 0),
        ("rgb-png-large", smooth(300, 220), "a.png", {}, None, 0),
        ("L", Image.new("L", (25, 25), 100), "a.png", {}, (100, 100, 100), 0),
        ("P", p_opaque, "a.png", kw_opaque, (10, 200, 60), 0),
        ("P-transparency", p_transparent, "a.png", kw_transparent, (10, 200, 60), 0),
        ("CMYK-jpeg", Image.new("CMYK", (40, 24), (0, 255, 0, 0)), "a.jpg", {}, (255, 0, 255), 3),
        ("RGBA", Image.new("RGBA", (20, 20), (10, 20, 30, 0)), "a.png", {}, (10, 20, 30), 0),
        ("I16", i16, "a.png", {}, (155, 155, 155), 0),  # 40000 * 255 // 65535
        ("LA", Image.new("LA", (9, 5), (70, 128)), "a.png", {}, (70, 70, 70), 0),
        ("1x1", uniform((7, 8, 9), (1, 1)), "a.png", {}, (7, 8, 9), 0),
        ("gif", p_opaque, "a.gif", {}, (10, 200, 60), 0),
        ("bmp", uniform((90, 80, 70)), "a.bmp", {}, (90, 80, 70), 0),
    ]


@pytest.mark.parametrize(
    "image, name, save_kw, colour, tol",
    [pytest.param(*c[1:], id=c[0]) for c in _cases()],
)
@pytest.mark.parametrize("resize", ["crop", "stretch"])
def test_load_image_modes(tmp_path, image, name, save_kw, colour, tol, resize):
    path = write_image(tmp_path / name, image, **save_kw)
    out = load_image(path, Decode(size=16, resize=resize))
    assert out.shape == (16, 16, 3)
    assert out.dtype == np.uint8
    if colour is not None:
        diff = np.abs(out.astype(int) - np.array(colour))
        assert diff.max() <= tol, (out[0, 0], colour)


def test_sixteen_bit_keeps_the_top_bits(tmp_path):
    a = np.zeros((4, 8), np.uint16)
    a[:, :2], a[:, 2:4], a[:, 4:6], a[:, 6:] = 65535, 32768, 255, 0
    path = write_image(tmp_path / "g16.png", Image.fromarray(a))
    out = load_image(path, Decode(size=8, resize="stretch", interpolation="bilinear"))
    # Dark 16-bit values stay dark instead of being clipped to white.
    assert out[:, 0].tolist() == [[255, 255, 255]] * 8
    assert out[:, 7].tolist() == [[0, 0, 0]] * 8
    assert np.all(out[:, :, :] <= 255)
    assert out[:, 4].max() <= 1  # 255 / 65535 of full scale


def test_exif_orientation_is_applied(tmp_path):
    base = Image.fromarray(smooth(64, 40, seed=3))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    tagged = write_image(tmp_path / "tagged.jpg", base, quality=95, exif=exif.tobytes())
    upright = write_image(
        tmp_path / "upright.jpg", base.transpose(Image.Transpose.ROTATE_270), quality=95
    )
    for resize in ("crop", "stretch"):
        d = Decode(size=32, resize=resize, draft=False)
        a = load_image(tagged, d).astype(int)
        b = load_image(upright, d).astype(int)
        assert np.abs(a - b).mean() < 2.0
        # Ignoring the tag would give something visibly different.
        ignored = np.asarray(
            Image.open(tagged).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
        ).astype(int)
        if resize == "stretch":
            assert np.abs(ignored - b).mean() > 10


def _thirds(horizontal: bool) -> np.ndarray:
    a = np.zeros((32, 96, 3), np.uint8)
    a[:, :32], a[:, 32:64], a[:, 64:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    return a if horizontal else a.transpose(1, 0, 2).copy()


@pytest.mark.parametrize("horizontal", [True, False], ids=["wide", "tall"])
def test_crop_keeps_the_centre_and_stretch_keeps_everything(tmp_path, horizontal):
    path = write_image(tmp_path / "thirds.png", _thirds(horizontal))
    crop = load_image(path, Decode(size=16, resize="crop"))
    stretch = load_image(path, Decode(size=16, resize="stretch"))
    if not horizontal:
        crop, stretch = crop.transpose(1, 0, 2), stretch.transpose(1, 0, 2)
    green, red, blue = [0, 255, 0], [255, 0, 0], [0, 0, 255]
    # crop: the centre square only (bilinear may blend the outermost column)
    assert np.all(crop[:, 1:-1] == green)
    # stretch: all three thirds
    assert np.all(stretch[:, :4] == red)
    assert np.all(stretch[:, 7:9] == green)
    assert np.all(stretch[:, -4:] == blue)


@pytest.fixture
def draft_calls(monkeypatch):
    """Record (size before, size after) of every JPEG draft() call."""
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        before = self.size
        result = real(self, mode, size)
        calls.append((before, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


def test_draft_decodes_large_jpegs_cheaply_and_nearly_the_same(tmp_path, draft_calls):
    path = write_image(tmp_path / "big.jpg", smooth(1600, 1200, seed=5), quality=90)
    full = load_image(path, Decode(size=224, draft=False))
    assert draft_calls == []
    fast = load_image(path, Decode(size=224, draft=True))
    assert draft_calls == [((1600, 1200), (400, 300))]  # 1/4 scale, never below 224
    assert fast.shape == full.shape == (224, 224, 3)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 2.0


def test_draft_only_for_jpeg(tmp_path, draft_calls):
    png = write_image(tmp_path / "big.png", smooth(900, 700))
    small_jpeg = write_image(tmp_path / "small.jpg", smooth(40, 30))
    a = load_image(png, Decode(size=32, draft=True))
    b = load_image(png, Decode(size=32, draft=False))
    np.testing.assert_array_equal(a, b)
    assert draft_calls == []
    load_image(small_jpeg, Decode(size=32, draft=True))
    assert draft_calls == [((40, 30), (40, 30))]  # smaller than the target: no reduction


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(smooth(200, 150, seed=9)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, content, reason",
    [
        pytest.param("empty.jpg", b"", "empty file", id="zero-bytes"),
        pytest.param(
            "noise.jpg",
            np.random.default_rng(1).bytes(3000),
            "not an image",
            id="random-bytes",
        ),
        pytest.param("half.jpg", _jpeg_bytes()[: len(_jpeg_bytes()) // 2], "corrupt", id="trunc"),
        pytest.param("notes.png", b"just some text\nnot a picture\n", "not an image", id="txt"),
        pytest.param("magic.png", b"\x89PNG\r\n\x1a\n", "not an image", id="png-magic-only"),
    ],
)
def test_broken_files_are_skipped_with_a_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageSkip) as info:
        load_image(path, SMALL)
    assert info.value.reason == reason
    assert str(path) in info.value.detail


def test_a_missing_image_is_skipped_as_missing(tmp_path):
    with pytest.raises(ImageSkip) as info:
        load_image(tmp_path / "gone.jpg", SMALL)
    assert info.value.reason == "missing"


@pytest.mark.parametrize("pixels", [1200, 10_000], ids=["over-limit", "over-twice-limit"])
@pytest.mark.parametrize("warning_action", ["error", "ignore"])
def test_decompression_bomb(tmp_path, monkeypatch, pixels, warning_action):
    side = int(pixels**0.5)
    path = write_image(tmp_path / "bomb.png", uniform((1, 1, 1), (side, pixels // side)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    # However the caller's warnings are configured, an over-limit image is skipped.
    with warnings.catch_warnings():
        warnings.simplefilter(warning_action)
        with pytest.raises(ImageSkip) as info:
            load_image(path, SMALL)
    assert info.value.reason == "too large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    assert load_image(path, SMALL).shape == (16, 16, 3)


def test_decoding_threads_leave_the_warning_filters_alone(tmp_path):
    for i in range(60):
        write_image(tmp_path / f"{i}.png", uniform((i, 0, 0), (4, 4)))
    ds = open_dataset(tmp_path)
    before = list(warnings.filters)
    for _ in range(3):
        for _batch in iter_batches(ds, ds.items, Decode(size=4), 2, workers=8):
            pass
    assert warnings.filters == before


# ---------------------------------------------------------------------------------------------
# open_dataset


def write_coco(root, split="val2017", file_names=("a.jpg", "b.jpg", "c.jpg"), write_images=True):
    images = [
        {"id": i + 1, "file_name": name, "width": 8, "height": 6}
        for i, name in enumerate(file_names)
    ]
    annotation = {
        "info": {"description": "tiny"},
        "images": images,
        "annotations": [
            {
                "id": 10 + i,
                "image_id": img["id"],
                "category_id": 1 + i % 2,
                "bbox": [1, 1, 3, 2],
                "area": 6.0,
                "iscrowd": 0,
                "segmentation": [[1, 1, 4, 1, 4, 3]],
            }
            for i, img in enumerate(images)
        ],
        "categories": [
            {"id": 1, "name": "cat", "supercategory": "animal"},
            {"id": 2, "name": "dog", "supercategory": "animal"},
        ],
    }
    ann = root / "annotations" / f"instances_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(annotation))
    if write_images:
        for name in file_names:
            if not name.startswith("/") and ".." not in name:
                write_image(root / split / name, uniform((50, 60, 70), (8, 6)))
    (root / split).mkdir(parents=True, exist_ok=True)
    return ann


def test_coco(tmp_path, capsys):
    ann = write_coco(tmp_path)
    ds = open_dataset(tmp_path)
    assert ds.kind == "coco"
    assert sorted(ds.items) == ["a.jpg", "b.jpg", "c.jpg"]
    assert ds.root == tmp_path / "val2017"
    assert ds.annotations == ann
    assert ds.notes == ()
    assert "3 images" in ds.describe()
    assert capsys.readouterr().out == ""  # pycocotools' chatter is kept off stdout
    assert load_image(ds.path_of(ds.items[0]), SMALL).shape == (16, 16, 3)


def test_coco_with_explicit_annotations(tmp_path):
    write_coco(tmp_path / "coco")
    elsewhere = tmp_path / "mine" / "instances_val2017.json"
    elsewhere.parent.mkdir()
    os.replace(tmp_path / "coco" / "annotations" / "instances_val2017.json", elsewhere)
    ds = open_dataset(tmp_path / "coco", annotations=elsewhere)
    assert ds.kind == "coco"
    assert ds.root == tmp_path / "coco" / "val2017"
    assert ds.annotations == elsewhere
    assert len(ds.items) == 3


def test_coco_several_splits(tmp_path):
    write_coco(tmp_path, "val2017", ("a.jpg", "b.jpg"))
    write_coco(tmp_path, "train2017", ("t1.jpg", "t2.jpg", "t3.jpg"))
    with pytest.raises(DatasetError, match="several COCO splits") as info:
        open_dataset(tmp_path)
    assert "train2017" in str(info.value) and "val2017" in str(info.value)
    assert info.value.fix == "split"
    val = open_dataset(tmp_path, split="val2017")
    assert (val.kind, sorted(val.items), val.root) == (
        "coco",
        ["a.jpg", "b.jpg"],
        tmp_path / "val2017",
    )
    train = open_dataset(tmp_path, split="train2017")
    assert sorted(train.items) == ["t1.jpg", "t2.jpg", "t3.jpg"]
    with pytest.raises(DatasetError, match="test2017"):
        open_dataset(tmp_path, split="test2017")


def test_coco_file_names_escaping_the_root_are_refused(tmp_path):
    outside = write_image(tmp_path / "secret.jpg", uniform((0, 0, 0)))
    names = ("a.jpg", "../secret.jpg", str(outside), "sub/../b.jpg", "sub/../../secret.jpg")
    write_coco(tmp_path / "coco", file_names=names)
    write_image(tmp_path / "coco" / "val2017" / "b.jpg", uniform((0, 0, 0)))
    ds = open_dataset(tmp_path / "coco")
    assert sorted(ds.items) == ["a.jpg", "b.jpg"]
    assert len(ds.notes) == 1 and "refused 3" in ds.notes[0]


def test_coco_symlink_out_of_the_root_is_refused(tmp_path):
    outside = write_image(tmp_path / "secret.jpg", uniform((0, 0, 0)))
    write_coco(tmp_path / "coco", file_names=("a.jpg", "link.jpg"), write_images=False)
    write_image(tmp_path / "coco" / "val2017" / "a.jpg", uniform((0, 0, 0)))
    os.symlink(outside, tmp_path / "coco" / "val2017" / "link.jpg")
    ds = open_dataset(tmp_path / "coco")
    assert ds.items == ("a.jpg",)
    assert ds.notes


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('{"images": [', id="truncated-json"),
        pytest.param("[1, 2, 3]", id="not-an-object"),
        pytest.param('{"images": [{"id": 1}], "annotations": [{"id": 5}]}', id="no-image-id"),
        pytest.param('{"images": [{"id": 1, "width": 3}]}', id="no-file-name"),
        pytest.param("\xff\xfe garbage", id="not-utf8"),
    ],
)
def test_coco_malformed_annotations(tmp_path, text):
    ann = tmp_path / "annotations" / "instances_val2017.json"
    ann.parent.mkdir()
    ann.write_bytes(text.encode("latin-1"))
    (tmp_path / "val2017").mkdir()
    with pytest.raises(DatasetError) as info:
        open_dataset(tmp_path)
    assert str(ann) in str(info.value)


def test_coco_without_image_folder(tmp_path):
    write_coco(tmp_path, write_images=False)
    os.rmdir(tmp_path / "val2017")
    with pytest.raises(DatasetError, match="val2017"):
        open_dataset(tmp_path)


@pytest.mark.parametrize("under", ["", "train"], ids=["direct", "under-train"])
def test_imagenet(tmp_path, under):
    base = tmp_path / under if under else tmp_path
    for wnid in ("n01440764", "n01443537"):
        for i in range(3):
            write_image(base / wnid / f"{wnid}_{i}.JPEG", uniform((i, 0, 0), (5, 5)), format="JPEG")
    (base / ".DS_Store").write_bytes(b"")
    ds = open_dataset(tmp_path)
    assert ds.kind == "imagenet"
    assert ds.root == base
    assert len(ds.items) == 6
    assert sorted(ds.items)[0] == "n01440764/n01440764_0.JPEG"


def test_folder_ignores_hidden_and_non_images(tmp_path):
    expected = ["a.jpg", "sub/b.PNG", "sub/deeper/c.jpeg", "other/d.webp"]
    for rel in expected:
        write_image(tmp_path / rel, uniform((1, 2, 3), (4, 4)), format="PNG")
    write_image(tmp_path / ".hidden.jpg", uniform((1, 2, 3)), format="PNG")
    write_image(tmp_path / ".cache" / "e.jpg", uniform((1, 2, 3)), format="PNG")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub" / "meta.json").write_text("{}")
    (tmp_path / "sub" / "noext").write_bytes(b"x")
    ds = open_dataset(tmp_path)
    assert ds.kind == "folder"
    assert ds.root == tmp_path
    assert sorted(ds.items) == sorted(expected)


def test_folder_with_non_wnid_class_dirs_is_a_folder(tmp_path):
    write_image(tmp_path / "n01440764" / "a.jpg", uniform((1, 2, 3)))
    write_image(tmp_path / "cats" / "b.jpg", uniform((1, 2, 3)))
    assert open_dataset(tmp_path).kind == "folder"


def test_list_file(tmp_path):
    write_image(tmp_path / "imgs" / "a.jpg", uniform((1, 2, 3)))
    write_image(tmp_path / "imgs" / "b.png", uniform((1, 2, 3)))
    listing = tmp_path / "list.txt"
    listing.write_text("# images\nimgs/a.jpg\n\n  imgs/b.png  \n../escape.jpg\nimgs/a.jpg\n")
    ds = open_dataset(listing)
    assert ds.kind == "list"
    assert ds.root == tmp_path
    assert sorted(ds.items) == ["imgs/a.jpg", "imgs/b.png"]  # duplicates counted once
    assert len(ds.notes) == 1 and "refused 1" in ds.notes[0]
    assert all(ds.path_of(i).is_file() for i in ds.items)


@pytest.mark.parametrize(
    "make, words",
    [
        pytest.param(lambda p: p.mkdir(), "no images", id="empty-folder"),
        pytest.param(lambda p: None, "no such file", id="nonexistent"),
        pytest.param(
            lambda p: (p.mkdir(), (p / "readme.txt").write_text("x")), "no images", id="no-image"
        ),
        pytest.param(
            lambda p: (p.mkdir(), write_image(p / ".h.jpg", uniform((0, 0, 0)))),
            "no images",
            id="only-hidden",
        ),
        pytest.param(
            lambda p: (p.mkdir(), (p / "list.txt").write_text("# nothing\n")), None, id="empty-list"
        ),
    ],
)
def test_no_dataset(tmp_path, make, words):
    path = tmp_path / "data"
    make(path)
    target = path / "list.txt" if (path / "list.txt").exists() else path
    with pytest.raises(DatasetError, match=words) as info:
        open_dataset(target)
    assert str(target) in str(info.value)


def test_single_image_is_not_a_dataset(tmp_path):
    img = write_image(tmp_path / "one.jpg", uniform((1, 2, 3)))
    with pytest.raises(DatasetError, match="one image"):
        open_dataset(img)


# ---------------------------------------------------------------------------------------------
# Order and selection


def test_order_is_independent_of_creation_order(tmp_path):
    names = [f"c{i % 3}/img_{i:03d}.png" for i in range(30)]
    rng = np.random.default_rng(4)
    orders = [names, names[::-1], [names[i] for i in rng.permutation(len(names))]]
    results = []
    for k, order in enumerate(orders):
        for name in order:
            write_image(tmp_path / f"run{k}" / name, uniform((1, 2, 3), (2, 2)))
        results.append(open_dataset(tmp_path / f"run{k}").items)
    assert results[0] == results[1] == results[2]
    assert sorted(results[0]) == sorted(names)
    assert list(results[0]) != sorted(names)  # hashed, so a prefix spreads over folders
    assert (
        open_dataset(tmp_path / "run0").list_sha256()
        == open_dataset(tmp_path / "run1").list_sha256()
    )


@given(
    items=st.lists(st.text(min_size=1, max_size=8), unique=True, max_size=60),
    limit=st.one_of(st.none(), st.integers(0, 80)),
    n=st.integers(1, 7),
)
def test_select_shards_partition_the_selection(items, limit, n):
    chosen = select(items, limit)
    assert chosen == tuple(items[:limit] if limit is not None else items)
    shards = [select(items, limit, (i, n)) for i in range(n)]
    flat = [x for s in shards for x in s]
    assert sorted(flat) == sorted(chosen)
    assert len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ---------------------------------------------------------------------------------------------
# iter_batches


@pytest.fixture
def mixed(tmp_path):
    """A folder of 13 good images (colour encodes the index) and 5 broken ones."""
    good = {}
    for i in range(13):
        good[f"good_{i:02d}.png"] = i
        write_image(tmp_path / f"good_{i:02d}.png", uniform((10 * i, 3, 7), (6 + i, 5)))
    bad = {
        "bad_empty.jpg": b"",
        "bad_noise.png": np.random.default_rng(2).bytes(200),
        "bad_trunc.jpg": _jpeg_bytes()[:300],
        "bad_text.gif": b"hello",
        "bad_zzz.jpeg": b"\xff\xd8\xff",
    }
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    ds = open_dataset(tmp_path)
    assert len(ds.items) == 18
    return ds, good, set(bad)


def collect(batches: list[Batch]):
    return (
        [item for b in batches for item in b.items],
        [s for b in batches for s in b.skipped],
        [b.end for b in batches],
        np.concatenate([b.images for b in batches]),
    )


@pytest.mark.parametrize("workers, prefetch", [(1, 1), (2, 2), (4, 3)])
def test_iter_batches(mixed, workers, prefetch):
    ds, good, bad = mixed
    batches = list(iter_batches(ds, ds.items, SMALL, 3, workers=workers, prefetch=prefetch))
    items, skipped, ends, images = collect(batches)

    assert items == [i for i in ds.items if i in good]  # every good image once, in order
    for b in batches[:-1]:
        assert len(b.items) == 3 == b.images.shape[0]
    assert 0 <= len(batches[-1].items) <= 3
    assert len(batches[-1].items) == batches[-1].images.shape[0]
    assert {s[0] for s in skipped} == bad and len(skipped) == len(bad)
    reasons = {s[0]: s[1] for s in skipped}
    assert reasons["bad_empty.jpg"] == "empty file"
    assert reasons["bad_text.gif"] == "not an image"
    assert reasons["bad_trunc.jpg"] == "corrupt"
    assert ends == sorted(ends) and len(set(ends)) == len(ends)
    assert ends[-1] == len(ds.items)
    # each skipped item is reported in the batch whose range holds it
    start = 0
    for b in batches:
        for item, _, _ in b.skipped:
            assert start <= ds.items.index(item) < b.end
        for item in b.items:
            assert start <= ds.items.index(item) < b.end
        start = b.end
    assert images.dtype == np.uint8 and images.shape == (len(items), 16, 16, 3)
    assert [int(img[0, 0, 0]) // 10 for img in images] == [good[i] for i in items]


def test_iter_batches_resumes_exactly(mixed):
    ds, _, _ = mixed
    full = list(iter_batches(ds, ds.items, SMALL, 3))
    expected = collect(full)
    for k in range(len(full)):
        first = []
        for batch in iter_batches(ds, ds.items, SMALL, 3):
            first.append(batch)
            if len(first) == k + 1:
                break  # stop the run after batch k
        rest = list(iter_batches(ds, ds.items, SMALL, 3, start=first[-1].end))
        got = collect(first + rest)
        assert got[:3] == expected[:3], k
        np.testing.assert_array_equal(got[3], expected[3])


def test_iter_batches_on_a_selection_and_bad_sizes(mixed):
    ds, good, _ = mixed
    shard = select(ds.items, 10, (1, 2))
    batches = list(iter_batches(ds, shard, SMALL, 2))
    assert [i for b in batches for i in b.items] == [i for i in shard if i in good]
    assert batches[-1].end == len(shard)
    assert list(iter_batches(ds, shard, SMALL, 2, start=len(shard))) == []
    with pytest.raises(ValueError):
        list(iter_batches(ds, shard, SMALL, 0))


def test_iter_batches_all_bad_tail(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"g{i}.png", uniform((i, 0, 0), (3, 3)))
    for i in range(5):
        (tmp_path / f"b{i}.png").write_bytes(b"")
    ds = open_dataset(tmp_path)
    batches = list(iter_batches(ds, ds.items, Decode(size=4), 4))
    items, skipped, ends, _ = collect(batches)
    assert sorted(items) == [f"g{i}.png" for i in range(4)]
    assert sorted(s[0] for s in skipped) == [f"b{i}.png" for i in range(5)]
    assert ends[-1] == len(ds.items)
    assert all(b.images.shape[1:] == (4, 4, 3) for b in batches)
