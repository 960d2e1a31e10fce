"""Decode + resize throughput per core (issue 11: how many CPU cores feed one GPU).

    python scripts/bench_decode.py [--images 200] [--size 224] [--threads 1,2]

``vggnorm.runtime.data.load_image`` (the decoding every run uses) on COCO-like 640x480 JPEGs
(``fixtures/photos.py`` ``write_coco_like_jpegs``), full decode and ``--draft`` (DCT-domain reduced), with 1
and 2 threads; prints images/s and images/s per thread (= per core when threads <= cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixtures package

from fixtures.photos import write_coco_like_jpegs


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", default="1,2")
    a = p.parse_args()
    from vggnorm.core.inputs import Decode
    from vggnorm.runtime.data import load_image

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_coco_like_jpegs(Path(tmp), 0, a.images)
        for path in paths:  # warm the page cache: measure decoding, not the disk
            path.read_bytes()
        print(f"{a.images} JPEGs ~640x480 q90, to {a.size}x{a.size}, {os.cpu_count()} CPUs")
        for draft in (False, True):
            decode = Decode(a.size, "crop", "bilinear", draft)
            for threads in (int(t) for t in a.threads.split(",")):
                with ThreadPoolExecutor(threads) as pool:
                    t = time.monotonic()
                    list(pool.map(load_image, paths, [decode] * len(paths)))
                    rate = a.images / (time.monotonic() - t)
                print(f"{'draft' if draft else 'full '} decode, {threads} thread(s): "
                      f"{rate:7.1f} img/s, {rate / threads:7.1f} img/s per core")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
