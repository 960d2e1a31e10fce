"""Image datasets: find the images, decode them to fixed-size RGB, batch them in order.

Kinds, detected from the path (:func:`open_dataset`):

``coco``      ``annotations/instances_<split>.json`` beside ``<split>/`` (read with pycocotools)
``imagenet``  class folders named like ``n01440764`` (directly or under ``train/``/``val/``)
``folder``    any folder of images, searched recursively
``list``      a text file with one image path per line (relative to the file's folder)

Images are ordered by a hash of their dataset-relative name: deterministic, independent of how
the file system lists them, and any prefix (``--limit``) or stride (shards) spreads over classes.
Decoding happens in threads (PIL releases the GIL while decoding and resizing) while the forward
pass runs; at most ``prefetch`` decoded batches exist at any time, so memory stays flat.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ..core.errors import DatasetError
from ..core.inputs import Decode
from ..core.statsrecord import StatsRecord

Kind = Literal["coco", "imagenet", "folder", "list"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class Dataset:
    """An ordered list of images: ``items`` are paths relative to ``root``."""

    kind: Kind
    root: Path
    items: tuple[str, ...]
    source: Path  # what the user passed (folder, list file); with annotations for COCO
    annotations: Path | None = None
    notes: tuple[str, ...] = field(default=())

    def path_of(self, item: str) -> Path:
        return self.root / item

    def describe(self) -> str:
        extra = f" ({self.annotations.name})" if self.annotations else ""
        return f"{self.kind} dataset at {self.source}{extra}: {len(self.items)} images"

    def list_sha256(self) -> str:
        return items_sha256(self.items)


def items_sha256(items: Sequence[str]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode("utf8") + b"\n")
    return h.hexdigest()


def ordered_items(items: Sequence[str]) -> tuple[str, ...]:
    """Unique items in the dataset order: by a hash of the name, so prefixes spread over classes."""
    unique = set(items)
    return tuple(sorted(unique, key=lambda s: (hashlib.sha1(s.encode("utf8")).hexdigest(), s)))


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _folder_items(root: Path) -> list[str]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath) / name
            if _is_image(p):
                items.append(p.relative_to(root).as_posix())
    return items


def _class_root(path: Path) -> Path | None:
    for candidate in (path, path / "train", path / "val"):
        if not candidate.is_dir():
            continue
        subdirs = [d for d in candidate.iterdir() if d.is_dir() and not d.name.startswith(".")]
        if subdirs and all(_WNID.match(d.name) for d in subdirs):
            return candidate
    return None


def _safe_relative(root: Path, name: str) -> str | None:
    """``name`` inside ``root`` (no absolute path, no ``..``, no symlink out), else None."""
    if not name or os.path.isabs(name) or "\\" in name:
        return None
    target = (root / name).resolve()
    try:
        return target.relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def _coco_annotation(path: Path, annotations: Path | None, split: str | None) -> Path | None:
    if annotations is not None:
        return annotations
    ann_dir = path / "annotations"
    if not ann_dir.is_dir():
        return None
    found = sorted(ann_dir.glob("instances_*.json"))
    if split is not None:
        wanted = ann_dir / f"instances_{split}.json"
        if wanted not in found:
            splits = ", ".join(p.stem.removeprefix("instances_") for p in found) or "none"
            raise DatasetError(f"{ann_dir}: no instances_{split}.json (splits found: {splits})")
        return wanted
    if len(found) > 1:
        splits = ", ".join(p.stem.removeprefix("instances_") for p in found)
        raise DatasetError(f"{ann_dir}: several COCO splits ({splits})", fix="split")
    return found[0] if found else None


def _load_coco_file_names(ann: Path) -> list[str]:
    try:
        from pycocotools.coco import COCO
    except ImportError as e:
        raise DatasetError(
            "reading COCO annotations needs pycocotools: pip install pycocotools"
        ) from e
    try:
        # pycocotools prints progress to stdout; keep our stdout clean for --json.
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann))
        images = coco.loadImgs(sorted(coco.getImgIds()))
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise DatasetError(f"{ann}: not a readable COCO annotation file: {e}") from e
    names = []
    for img in images:
        name = img.get("file_name") if isinstance(img, dict) else None
        if not isinstance(name, str):
            raise DatasetError(f"{ann}: image entry without a file_name: {img!r}")
        names.append(name)
    return names


def _open_coco(path: Path, ann: Path, split: str | None) -> Dataset:
    if not ann.is_file():
        raise DatasetError(f"{ann}: annotation file not found")
    split = split or ann.stem.removeprefix("instances_")
    base = path if path.is_dir() else ann.parent.parent
    root = base / split
    if not root.is_dir():
        raise DatasetError(
            f"COCO images for split {split!r} not found: expected the folder {root} "
            "(the one named in the annotation file's name)"
        )
    items: list[str] = []
    refused: list[str] = []
    for name in _load_coco_file_names(ann):
        rel = _safe_relative(root, name)
        (items if rel is not None else refused).append(rel or name)
    notes: tuple[str, ...] = ()
    if refused:
        notes = (f"refused {len(refused)} file_name(s) escaping {root}: {refused[:3]}",)
    return Dataset("coco", root, ordered_items(items), path, ann, notes)


def _open_list(path: Path) -> Dataset:
    root = path.parent
    items: list[str] = []
    refused: list[str] = []
    for line in path.read_text(encoding="utf8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        if p.is_absolute():
            items.append(p.as_posix())  # explicit user choice: absolute paths are allowed here
            continue
        rel = _safe_relative(root, line)
        (items if rel is not None else refused).append(rel or line)
    notes = (f"refused {len(refused)} path(s) escaping {root}",) if refused else ()
    return Dataset("list", root, ordered_items(items), path, None, notes)


def open_dataset(
    path: str | os.PathLike[str],
    *,
    annotations: str | os.PathLike[str] | None = None,
    split: str | None = None,
) -> Dataset:
    """Find the images under ``path`` and decide what kind of dataset it is.

    Args:
        path: COCO root, ImageNet-style tree, any image folder, or a text file of image paths.
        annotations: a COCO ``instances_*.json``; makes the dataset COCO.
        split: which COCO split to use when ``annotations/`` holds several.

    Raises:
        DatasetError: nothing there, no image found, or a malformed annotation file.
    """
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder")
    if p.is_file() and annotations is None:
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            raise DatasetError(f"{p} is one image; a dataset is a folder or a list file")
        ds = _open_list(p)
    else:
        ann = _coco_annotation(p, Path(annotations) if annotations else None, split)
        if ann is not None:
            ds = _open_coco(p, ann, split)
        else:
            class_root = _class_root(p)
            if class_root is not None:
                ds = Dataset("imagenet", class_root, ordered_items(_folder_items(class_root)), p)
            else:
                ds = Dataset("folder", p, ordered_items(_folder_items(p)), p)
    if not ds.items:
        raise DatasetError(f"{p}: no images found in this {ds.kind} dataset")
    return ds


def select(
    items: Sequence[str], limit: int | None = None, shard: tuple[int, int] = (0, 1)
) -> tuple[str, ...]:
    """The first ``limit`` items, then every ``n``-th from ``i`` for shard ``(i, n)``."""
    chosen = tuple(items[:limit] if limit is not None else items)
    i, n = shard
    return chosen[i::n]


# ---------------------------------------------------------------------------------------------
# Decoding


class ImageSkip(Exception):
    """An image that cannot be used; ``reason`` is a short category for the summary."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _to_rgb(img: Any) -> Any:
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: keep the top 8 bits instead of clipping everything above 255.
        a = np.asarray(img, dtype=np.uint32)
        peak = 65535 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255
        img = Image.fromarray((a * 255 // peak).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: Path, decode: Decode) -> npt.NDArray[np.uint8]:
    """Decode one image to a ``(size, size, 3)`` uint8 RGB array.

    Applies EXIF orientation; converts greyscale, palette, CMYK, RGBA (alpha dropped, as Keras's
    ``load_img`` does) and 16-bit images to 8-bit RGB. ``crop`` resizes the centred square of side
    min(w, h) to size x size (shorter side to size, then centre crop); ``stretch`` resizes the whole
    image. With ``draft``, JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, never below
    the target size, before the same bilinear resize.

    Raises:
        ImageSkip: missing, empty, truncated, corrupt, not an image, or too large.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as raw:
            # PIL only warns between MAX_IMAGE_PIXELS and twice that, so check here: turning the
            # warning into an error with warnings.catch_warnings() is not thread-safe (this runs
            # in decoding threads) and leaked an "error" filter into the process.
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and raw.size[0] * raw.size[1] > limit:
                raise Image.DecompressionBombError(
                    f"{raw.size[0]}x{raw.size[1]} pixels is over the limit of {limit}"
                )
            if decode.draft and raw.format == "JPEG":
                raw.draft("RGB", (decode.size, decode.size))
            raw.load()
            img = _to_rgb(ImageOps.exif_transpose(raw))
    except FileNotFoundError as e:
        raise ImageSkip("missing", str(path)) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageSkip("too large", f"{path}: {e}") from e
    except UnidentifiedImageError as e:
        reason = "empty file" if path.is_file() and path.stat().st_size == 0 else "not an image"
        raise ImageSkip(reason, str(path)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageSkip("corrupt", f"{path}: {e}") from e
    assert isinstance(img, Image.Image)
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageSkip("corrupt", f"{path}: empty image {w}x{h}")
    box = None
    if decode.resize == "crop":
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        box = (left, top, left + side, top + side)
    resample = (
        Image.Resampling.BILINEAR
        if decode.interpolation == "bilinear"
        else Image.Resampling.BICUBIC
    )
    out = img.resize((decode.size, decode.size), resample, box=box)
    return np.asarray(out, dtype=np.uint8)


@dataclass
class Batch:
    """Decoded images of one batch, in dataset order, and the images skipped on the way."""

    images: npt.NDArray[np.uint8]
    items: list[str]
    skipped: list[tuple[str, str, str]]  # (item, reason, detail)
    end: int  # position in the item list just after this batch


def iter_batches(
    dataset: Dataset,
    items: Sequence[str],
    decode: Decode,
    batch_size: int,
    *,
    start: int = 0,
    workers: int = 2,
    prefetch: int = 2,
    block: int | None = None,
) -> Iterator[Batch]:
    """Decode ``items[start:]`` in threads and yield full batches of good images, in order.

    A batch holds exactly ``batch_size`` images except the last, and, with ``block``, the last
    one before each multiple of ``block`` (a run's check points, where it may stop).
    ``Batch.end`` is the position after the last item consumed, so a run can resume from there
    and count each image once.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    window = max(1, prefetch) * batch_size

    def job(item: str) -> npt.NDArray[np.uint8]:
        return load_image(dataset.path_of(item), decode)

    with ThreadPoolExecutor(
        max_workers=max(1, workers), thread_name_prefix="vggnorm-decode"
    ) as pool:
        pending: deque[tuple[int, str, Future[npt.NDArray[np.uint8]]]] = deque()
        position = start
        images: list[npt.NDArray[np.uint8]] = []
        names: list[str] = []
        skipped: list[tuple[str, str, str]] = []
        try:
            while True:
                while position < len(items) and len(pending) < window:
                    pending.append((position, items[position], pool.submit(job, items[position])))
                    position += 1
                if not pending:
                    break
                index, item, fut = pending.popleft()
                try:
                    images.append(fut.result())
                    names.append(item)
                except ImageSkip as e:
                    skipped.append((item, e.reason, e.detail))
                boundary = block is not None and (index + 1) % block == 0
                if len(images) == batch_size or boundary or (not pending and position >= len(items)):
                    if images or skipped:
                        stacked = (
                            np.stack(images)
                            if images
                            else np.zeros((0, decode.size, decode.size, 3), np.uint8)
                        )
                        yield Batch(stacked, names, skipped, index + 1)
                    images, names, skipped = [], [], []
        finally:
            for _, _, fut in pending:
                fut.cancel()


def stats_dataset(record: StatsRecord, data: str | os.PathLike[str] | None = None) -> Dataset:
    """The images a stats run counted, under its dataset root (or ``data``, if it moved)."""
    root = Path(record.meta.dataset_root) if data is None else open_dataset(data).root
    kind = record.meta.dataset_kind
    return Dataset(kind, root, record.images, root)  # type: ignore[arg-type]
