"""Photo-like test images: smooth random colour fields of assorted sizes (JPEG-friendly)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image


def write_photos(root: Path, names: Iterable[str], seed: int = 0, max_side: int = 80) -> None:
    """Write one image per name under ``root`` (format from the suffix), sides 33..max_side-1."""
    rng = np.random.default_rng(seed)
    for name in names:
        h, w = (int(v) for v in rng.integers(33, max_side, 2))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = rng.uniform(0, 255, 3) + 80 * np.sin(6 * xx[..., None] * rng.uniform(0.5, 2, 3))
        img = img + 60 * np.cos(5 * yy[..., None]) + rng.normal(0, 8, (h, w, 3))
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
