"""Benchmark the accuracy of ``vggnorm stats`` means: bf16 against fp32, and draft (DCT-domain
reduced) against full-resolution JPEG decoding, next to the sampling noise (issue 4). Offline:

    python scripts/bench_accuracy.py [--images N] [--batch-size 16] [--precision fp32,bf16]
                                     [--size 224] [--out results.json] [--quick]

``collect_stats`` runs once per precision with draft decoding, and twice more in the first
precision given as fp32 if listed (the reference precision) with full decoding, on the two halves
of the images (shards 0 and 1 of 2). Compared per live filter, |test - ref| / ref: bf16 vs fp32,
one half vs the other (the sampling noise), draft vs full (the halves merged).

Dataset and weights: see ``scripts/benchlib.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixtures package

import benchlib as bl

from fixtures.photos import COLOUR_PHOTOS, GREY_PHOTOS


def report(res: dict[str, Any]) -> list[str]:
    a = res["accuracy"]
    out = [
        "",
        f"ACCURACY OF MEANS (relative difference per live filter; filters whose mean is below "
        f"{bl.LIVE:g} x the layer median are ignored)",
    ]
    comps = [(k, v) for k, v in a["comparisons"].items() if v]
    rows = [
        [label, bl.pct(r["median"]), bl.pct(r["p99"]), bl.pct(r["worst"]), r["worst_at"] or "-",
         str(r["filters"]), str(r["ignored"])]
        for label, r in comps
    ]  # fmt: skip
    out.append(
        bl.table(
            ["comparison", "median", "99th pct", "worst", "worst filter", "filters", "ignored"],
            rows,
        )
    )
    layers = list(next(iter(v for _, v in comps))["per_layer"])
    rows = [
        [n]
        + [
            f"{bl.pct(r['per_layer'][n]['median'])} / {bl.pct(r['per_layer'][n]['worst'])}"
            if n in r["per_layer"]
            else "-"
            for _, r in comps
        ]
        for n in layers
    ]
    out.append("")
    out.append(bl.table(["layer (median / worst)", *[k for k, _ in comps]], rows))
    out += [f"  {x}" for x in a["notes"]]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = bl.parser("Benchmark the accuracy of vggnorm stats means: bf16 and draft decoding.")
    p.add_argument(
        "--precision", default="fp32,bf16", metavar="LIST", help="fp32 and/or bf16 (default both)"
    )
    args = bl.parse(p, argv)
    args.precisions = bl.precisions(p, args.precision)
    with bl.workdir(args) as work:
        res, _ = bl.start(args, work, "accuracy")
        weights, data = Path(res["weights"]["path"]), work / "data1"
        n, bs, size = args.images, args.batch_size, args.size
        stages = res["stage_seconds"]
        from vggnorm.core.stats import merge_stats

        acc_precision = "fp32" if "fp32" in args.precisions else args.precisions[0]
        records: dict[str, Any] = {}
        for prec in args.precisions:
            done = bl.stage(f"{prec}: vggnorm collect_stats on {n} JPEGs")
            records[prec], _ = bl.run_vggnorm(
                weights, data, size=size, batch_size=bs, precision=prec, workers=args.workers
            )
            stages[f"{prec}_vggnorm"] = done()
        done = bl.stage(f"{acc_precision}: vggnorm full-resolution decode, as two halves")
        halves = [
            bl.run_vggnorm(
                weights, data, size=size, batch_size=bs, precision=acc_precision,
                workers=args.workers, draft=False, shard=(i, 2),
            )[0]
            for i in range(2)
        ]  # fmt: skip
        stages[f"{acc_precision}_full_decode_halves"] = done()
        full = {s.name: s.mean for s in merge_stats(halves[0].layers, halves[1].layers)}
        comparisons: dict[str, Any] = {}
        if "fp32" in records and "bf16" in records:
            comparisons["bf16 vs fp32"] = bl.compare(
                bl.layer_means(records["bf16"]), bl.layer_means(records["fp32"])
            )
        comparisons[f"halves ({acc_precision})"] = bl.compare(
            bl.layer_means(halves[0]), bl.layer_means(halves[1])
        )
        comparisons[f"draft vs full ({acc_precision})"] = bl.compare(
            bl.layer_means(records[acc_precision]), full
        )
        res["accuracy"] = {
            "comparisons": comparisons,
            "notes": [
                "bf16 vs fp32: the two vggnorm runs (draft decode, crop), |bf16 - fp32| / fp32.",
                f"halves: images 0,2,4,... vs 1,3,5,... (full decode), |A - B| / B: the sampling "
                f"noise of a {n // 2}-image set (it shrinks as 1/sqrt(images); these images are "
                f"crops of {len(COLOUR_PHOTOS) + len(GREY_PHOTOS)} photographs, so real data is "
                "noisier).",
                "draft vs full: JPEG decoded at reduced scale in the DCT domain (never below "
                "--size) vs at full resolution, both then resized the same way.",
            ],
        }
        return bl.finish(res, report, args.out)


if __name__ == "__main__":
    sys.exit(main())
