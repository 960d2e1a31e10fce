"""Benchmark ``--ray`` against the single-process run (issue 11): images/s of ``collect_stats``
here and on a local Ray cluster with 1 and 2 workers, and the overhead against single-process.

    python scripts/bench_ray.py [--images 64] [--batch-size 16] [--size 224]

Weights: a seeded random VGG16 notop (``fixtures/keras_files.py`` ``vgg16_notop_weights``, or
Keras's cached ImageNet file); images: COCO-like 640x480 JPEGs (``fixtures/photos.py``
``write_coco_like_jpegs``). Wall time of the whole call, from weights to the last block
(the Ray runs include building each worker's network, not the cluster start).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixtures package

from fixtures.keras_files import vgg16_notop_weights
from fixtures.photos import write_coco_like_jpegs

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args()
    import ray

    from vggnorm.commands.stats import collect_stats
    from vggnorm.core.inputs import Decode
    from vggnorm.runtime.ray_engine import RayEngine

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_coco_like_jpegs(work / "data", 0, a.images)
        weights, note = vgg16_notop_weights(work)
        print(f"weights: {note}\n{a.images} images, batch {a.batch_size}, {a.size}x{a.size}, "
              f"{os.cpu_count()} CPUs")  # fmt: skip
        kw = {"decode": Decode(a.size), "batch_size": a.batch_size}
        t = time.monotonic()
        collect_stats(weights, work / "data", **kw)  # type: ignore[arg-type]
        single = a.images / (time.monotonic() - t)
        print(f"single process: {single:.2f} img/s")
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            cpus = int(ray.cluster_resources()["CPU"])
            for n in (1, 2):
                engine = RayEngine(workers=n, cpus_per_worker=cpus / n, report=print)
                t = time.monotonic()
                collect_stats(weights, work / "data", engine=engine, **kw)  # type: ignore[arg-type]
                rate = a.images / (time.monotonic() - t)
                print(f"ray, {n} worker(s): {rate:.2f} img/s, overhead vs single process "
                      f"{100 * (single / rate - 1):+.1f}%  ({engine.description})")  # fmt: skip
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
