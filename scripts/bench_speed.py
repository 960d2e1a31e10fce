"""Benchmark ``vggnorm stats`` speed: images/s against the forward-pass ceiling and a plain Keras
loop, per precision (issue 4). Offline:

    python scripts/bench_speed.py [--images N] [--batch-size 16] [--precision fp32,bf16]
                                  [--size 224] [--seconds 20] [--out results.json] [--quick]

- Ceiling: keras.applications VGG16 notop (same weights, same precision via the Keras dtype
  policy, same batch size), ``predict_on_batch`` on one in-memory preprocessed float32 batch.
- vggnorm: ``collect_stats`` end to end on the JPEGs; steady-state images/s from the progress
  callback's timestamps (end of the first batch to the end of the last full batch), and the total
  wall time including reading the weights, building the model and the first trace.
- The plain Keras loop: ``load_img`` + ``img_to_array`` + ``preprocess_input``, ``steps = n //
  batch_size``, a model returning each conv's per-batch channel mean in float32,
  ``predict_on_batch`` (its error: ``bench_exactness.py``).

Dataset and weights: see ``scripts/benchlib.py``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixtures package

import benchlib as bl


def ceiling(weights: Path, batch: np.ndarray, precision: str, seconds: float) -> dict[str, Any]:
    """The conv stack alone on an in-memory float32 batch: the most the forward pass can do."""
    model = bl.keras_vgg16(weights, batch.shape[1], precision)
    for _ in range(2):
        model.predict_on_batch(batch)
    n, t0 = 0, time.perf_counter()
    while True:
        model.predict_on_batch(batch)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 3:
            break
    bl.forget(model)
    return {"images_per_s": n * len(batch) / elapsed, "batches": n, "seconds": elapsed}


def report(res: dict[str, Any]) -> list[str]:
    out = [
        f"ceiling timed {res['settings']['seconds']:g} s after 2 warm-up batches",
        "",
        "SPEED (images/s)",
    ]
    rows = []
    for p, v in res["speed"].items():
        c, g, n = v["ceiling"], v["vggnorm"], v.get("naive", {})
        rows.append(
            [
                p,
                bl.fmt(c["images_per_s"], ".1f"),
                bl.fmt(g["images_per_s"], ".1f"),
                bl.pct(v["vggnorm_over_ceiling"]),
                f"{g['total_seconds']:.1f} ({g['total_images_per_s']:.1f}/s)",
                bl.fmt(n.get("images_per_s"), ".1f"),
                bl.fmt(v.get("vggnorm_over_naive"), ".2f") + "x",
            ]
        )
    header = ["precision", "ceiling", "vggnorm", "of ceiling", "vggnorm wall s (all-in)"]
    out.append(bl.table([*header, "naive loop", "vggnorm/naive"], rows))
    out += [
        "  ceiling: Keras VGG16 notop predict_on_batch on one in-memory preprocessed batch.",
        "  vggnorm, naive loop: steady state, from the end of the first batch to the end of the",
        "  last full batch (excludes weight reading, model build, first-call tracing and the",
        "  smaller last batch's retrace, all once per run). 'all-in' = collect_stats wall time.",
    ]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = bl.parser(
        "Benchmark vggnorm stats: images/s against the forward-pass ceiling and a plain Keras loop."
    )
    p.add_argument(
        "--precision", default="fp32,bf16", metavar="LIST", help="fp32 and/or bf16 (default both)"
    )
    p.add_argument(
        "--seconds", type=float, metavar="S", help="ceiling timing (default 20; --quick 5)"
    )
    args = bl.parse(p, argv)
    args.precisions = bl.precisions(p, args.precision)
    args.seconds = args.seconds if args.seconds is not None else (5.0 if args.quick else 20.0)
    with bl.workdir(args) as work:
        res, _ = bl.start(args, work, "speed")
        weights, data = Path(res["weights"]["path"]), work / "data1"
        n, bs, size = args.images, args.batch_size, args.size
        stages = res["stage_seconds"]
        import keras

        from vggnorm.core.inputs import Decode
        from vggnorm.runtime.data import load_image

        ordered = bl.dataset_order(data)
        first = np.stack([load_image(p, Decode(size)) for p in ordered[:bs]]).astype(np.float32)
        ceiling_batch = keras.applications.vgg16.preprocess_input(first)
        res["speed"] = {}
        for prec in args.precisions:
            done = bl.stage(f"{prec}: ceiling")
            c = ceiling(weights, ceiling_batch, prec, args.seconds)
            stages[f"{prec}_ceiling"] = done()
            done = bl.stage(f"{prec}: vggnorm collect_stats on {n} JPEGs")
            _, t = bl.run_vggnorm(
                weights, data, size=size, batch_size=bs, precision=prec, workers=args.workers
            )
            stages[f"{prec}_vggnorm"] = done()
            done = bl.stage(f"{prec}: naive Keras loop on {n} JPEGs")
            _, nt, _ = bl.run_naive(weights, ordered, size, bs, prec, keep=False)
            stages[f"{prec}_naive"] = done()
            res["speed"][prec] = {
                "ceiling": c,
                "vggnorm": t,
                "naive": nt,
                "vggnorm_over_ceiling": (t["images_per_s"] or 0) / c["images_per_s"],
                "vggnorm_over_naive": (t["images_per_s"] or 0) / nt["images_per_s"]
                if nt["images_per_s"]
                else None,
            }
        return bl.finish(res, report, args.out)


if __name__ == "__main__":
    sys.exit(main())
