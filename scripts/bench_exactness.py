"""Benchmark the plain Keras loop's means against exact ones, and split its error by source
(issue 4). Offline:

    python scripts/bench_exactness.py [--images N] [--batch-size 16] [--precision fp32]
                                      [--size 224] [--out results.json] [--quick]

The plain loop (``load_img`` + ``img_to_array`` + ``preprocess_input``, ``steps = n //
batch_size``, a model returning each conv's per-batch channel mean in float32, a float32 running
sum of the per-batch means / steps) is compared with exact float64 means computed by vggnorm's
reduction over the very same arrays. Its error is split into (a) the dropped partial batch,
(b) averaging per-batch means when the batches are unequal, (c) float32 arithmetic (this run, and
a float32 running sum at COCO scale); last, vggnorm's own sums against numpy float64 sums of its
float32 activations. N is raised by half a batch when needed so that the last batch is partial.

Dataset and weights: see ``scripts/benchlib.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixtures package

import benchlib as bl

COCO_BATCHES = 80_000 // 16  # a COCO-sized run at batch 16, for the float32 drift figure


def batch_sums(
    net: Any, names: Sequence[str], batches: Sequence[np.ndarray]
) -> list[dict[str, tuple[np.ndarray, int]]]:
    """Per batch, per conv: float64 sum and the value count, by vggnorm's on-device reduction."""
    out = []
    for b in batches:
        m = net.moments(b)
        out.append({n: (np.asarray(m[n][0], np.float64), int(m[n][2])) for n in names})
    return out


def naive_errors(
    weights: Path,
    naive: list[np.ndarray],
    kept: list[np.ndarray],
    rest: np.ndarray,
    size: int,
    precision: str,
) -> dict[str, Any]:
    """The naive loop's error and its sources, on the arrays load_img produced."""
    from vggnorm.formats.registry import load
    from vggnorm.runtime.network import FeatureNet

    loaded = load(weights)
    arch, arrays = loaded.bound.arch, loaded.arrays
    names = list(arch.conv_names)
    net = FeatureNet(arch, arrays, size, "caffe", precision)  # type: ignore[arg-type]
    batches = list(kept) + ([rest] if len(rest) else [])
    per = batch_sums(net, names, batches)
    full = per[: len(kept)]

    def pooled(parts: Sequence[dict[str, tuple[np.ndarray, int]]]) -> bl.Means:
        return {n: sum(p[n][0] for p in parts) / sum(p[n][1] for p in parts) for n in names}

    exact = pooled(per)
    dropped = pooled(full)
    batch_mean = {n: np.mean([p[n][0] / p[n][1] for p in per], axis=0) for n in names}
    naive_means = dict(zip(names, naive))
    # float32 running sum of per-batch means at COCO scale: this run's per-batch means, cycled.
    m32 = [{n: (p[n][0] / p[n][1]).astype(np.float32) for n in names} for p in full]
    acc32 = {n: np.zeros_like(m32[0][n]) for n in names}
    acc64 = {n: np.zeros(m32[0][n].shape, np.float64) for n in names}
    for k in range(COCO_BATCHES):
        m = m32[k % len(m32)]
        for n in names:
            acc32[n] += m[n]
            acc64[n] += m[n]
    out = {
        "images": sum(len(b) for b in batches),
        "batches": [len(b) for b in batches],
        "precision": precision,
        "total": bl.compare(naive_means, exact),
        "a_dropped_partial_batch": bl.compare(dropped, exact),
        "b_batch_mean_average": bl.compare(batch_mean, exact),
        "c_float32_this_run": bl.compare(naive_means, dropped),
        "c_float32_running_sum_coco": bl.compare(
            {n: acc32[n] / np.float32(COCO_BATCHES) for n in names},
            {n: acc64[n] / COCO_BATCHES for n in names},
        ),
    }
    # vggnorm's own reduction against numpy float64 sums over the float32 activations.
    probe = batches[0][: min(8, len(batches[0]))]
    mom = net.moments(probe)
    bl.forget(net)
    acts = FeatureNet(arch, arrays, size, "caffe", precision, outputs="activations")  # type: ignore[arg-type]
    sums = {n: np.zeros(mom[n][0].shape, np.float64) for n in names}
    for i in range(0, len(probe), 4):  # 4 images of VGG16 activations at 224: ~220 MB
        for n, a in zip(names, acts.activations(probe[i : i + 4])):
            sums[n] += a.sum(axis=(0, 1, 2), dtype=np.float64)
    out["vggnorm_vs_float64"] = bl.compare(
        {n: np.asarray(mom[n][0], np.float64) / mom[n][2] for n in names},
        {n: sums[n] / mom[n][2] for n in names},
    )
    out["vggnorm_vs_float64"]["images"] = len(probe)
    bl.forget(acts)
    return out


def report(res: dict[str, Any]) -> list[str]:
    e = res["naive_errors"]
    b = e["batches"]
    shape = f"{len(b) - 1}x{b[0]} + {b[-1]}" if len(set(b)) > 1 else f"{len(b)}x{b[0]}"
    out = [
        "",
        f"EXACTNESS: naive loop vs exact means ({e['precision']}; relative error per live filter,",
        "  in % from 0.01% up, as a plain ratio below)",
        f"  same {e['images']} arrays for both (load_img: stretch, nearest), batches {shape}; "
        "exact = float64 sums/counts",
        "  of vggnorm's on-device reduction over all of them, so only the averaging differs.",
    ]
    rows = [
        [label, bl.pct(r["median"]), bl.pct(r["p99"]), bl.pct(r["worst"]), r["worst_at"] or "-"]
        for label, r in [
            ("naive loop, total", e["total"]),
            ("(a) partial batch dropped", e["a_dropped_partial_batch"]),
            ("(b) mean of per-batch means", e["b_batch_mean_average"]),
            ("(c) float32 mean+sum, this run", e["c_float32_this_run"]),
            (f"(c) float32 sum, {COCO_BATCHES} batches", e["c_float32_running_sum_coco"]),
            (
                f"vggnorm vs numpy float64 ({e['vggnorm_vs_float64']['images']} img)",
                e["vggnorm_vs_float64"],
            ),
        ]
    ]
    out.append(bl.table(["source", "median", "99th pct", "worst", "worst filter"], rows))
    out += [
        "  (a) exact mean over the full batches only vs all images; (b) unweighted mean of",
        "  per-batch means over all batches incl. the partial one, what keeping the last batch",
        "  without weighting gives; (c) the naive result vs exact arithmetic on the same images;",
        f"  (c, COCO) float32 running sum of this run's per-batch means cycled to {COCO_BATCHES}",
        "  batches vs float64; last row: vggnorm's sums vs numpy float64 over its float32",
        "  activations of the same images.",
    ]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = bl.parser("Benchmark the plain Keras loop's means against exact ones, by error source.")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="default fp32")
    args = bl.parse(p, argv)
    args.precisions = [args.precision]
    with bl.workdir(args) as work:
        res, _ = bl.start(args, work, "exactness")
        weights, data = Path(res["weights"]["path"]), work / "data1"
        n, bs, size, prec = args.images, args.batch_size, args.size, args.precision
        ordered = bl.dataset_order(data)
        done = bl.stage(f"{prec}: naive Keras loop on {n} JPEGs")
        naive, _, kept = bl.run_naive(weights, ordered, size, bs, prec, keep=True)
        res["stage_seconds"][f"{prec}_naive"] = done()
        done = bl.stage(f"{prec}: exact reference on the naive loop's arrays")
        rest = bl.load_batch(ordered[len(kept) * bs :], size).astype(np.uint8)
        res["naive_errors"] = naive_errors(weights, naive, kept, rest, size, prec)
        res["stage_seconds"][f"{prec}_naive_reference"] = done()
        if n % bs == 0:
            res["notes"].append("N is a multiple of the batch size: (a) and (b) are zero by design")
        return bl.finish(res, report, args.out)


if __name__ == "__main__":
    sys.exit(main())
