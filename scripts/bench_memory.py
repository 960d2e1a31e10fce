"""Benchmark the memory of ``vggnorm stats``: peak RSS of ``python -m vggnorm stats`` run as a
subprocess on N and on 8N distinct images (issue 4). Offline:

    python scripts/bench_memory.py [--images N] [--batch-size 16] [--precision bf16]
                                   [--size 64] [--out results.json] [--quick]

The 8N set holds the same N files (hard links when possible) plus 7N new ones. ``--size``
defaults to 64 to keep the runs short: the decoded-batch queue, the only part that scales with
the image size, is a few batches at any size.

Dataset and weights: see ``scripts/benchlib.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixtures package

import benchlib as bl

from fixtures.photos import write_coco_like_jpegs


def peak_rss(cmd: Sequence[str], cwd: Path, log: Path) -> dict[str, Any]:
    """Run ``cmd``; its peak RSS in MiB (ru_maxrss, RUSAGE_CHILDREN of a small launcher)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(bl.REPO), env.get("PYTHONPATH")]))
    rss = log.with_suffix(".maxrss")
    t0 = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(
            bl.peak_rss_command(rss, cmd),
            cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False,
        )  # fmt: skip
    wall = time.perf_counter() - t0
    if done.returncode:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {done.returncode}:\n{tail}")
    return {"peak_rss_mib": int(rss.read_text()) / 1024, "seconds": wall}


def memory(
    weights: Path,
    dirs: dict[str, Path],
    work: Path,
    *,
    size: int,
    batch: int,
    precision: str,
    workers: int,
) -> dict[str, Any]:
    from vggnorm.formats.statsfile import read_stats

    out: dict[str, Any] = {"size": size, "precision": precision, "runs": {}}
    for label, data in dirs.items():
        stats = work / f"mem-{label}.h5"
        cmd = [
            sys.executable, "-m", "vggnorm", "stats", "--weights", str(weights), "--data",
            str(data), "--precision", precision, "--size", str(size), "--batch-size", str(batch),
            "--workers", str(workers), "-q", "--out", str(stats), "--force",
        ]  # fmt: skip
        run = peak_rss(cmd, work, work / f"mem-{label}.log")
        run["images"] = read_stats(stats).n_images
        out["runs"][label] = run
    a, b = (out["runs"][k]["peak_rss_mib"] for k in dirs)
    out["ratio"] = b / a
    return out


def report(res: dict[str, Any]) -> list[str]:
    mm = res["memory"]
    out = [
        "",
        f"MEMORY: peak RSS of `python -m vggnorm stats --precision {mm['precision']} "
        f"--size {mm['size']}` (subprocess; ru_maxrss via RUSAGE_CHILDREN of a fresh launcher)",
    ]
    rows = [
        [label, str(r["images"]), f"{r['peak_rss_mib']:.0f}", f"{r['seconds']:.1f}"]
        for label, r in mm["runs"].items()
    ]
    out.append(bl.table(["dataset", "images", "peak RSS MiB", "wall s"], rows))
    out.append(f"  8x images / 1x images peak RSS: {mm['ratio']:.3f}")
    out.append(
        f"  --size {mm['size']} keeps it short; the decoded-batch queue, the only part that "
        "scales with the image size, is a few batches at any size."
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = bl.parser("Benchmark the peak memory of vggnorm stats on N and 8N images.", size=64)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="default bf16")
    args = bl.parse(p, argv)
    args.precisions = [args.precision]
    with bl.workdir(args) as work:
        res, paths = bl.start(args, work, "memory")
        weights, data1 = Path(res["weights"]["path"]), work / "data1"
        n = args.images
        done = bl.stage(f"making {7 * n} more JPEGs for the 8x memory run")
        data8 = work / "data8"
        data8.mkdir(exist_ok=True)
        for pth in paths:  # the same N files (hard links when possible) plus 7N new ones
            try:
                os.link(pth, data8 / pth.name)
            except OSError:
                shutil.copyfile(pth, data8 / pth.name)
        write_coco_like_jpegs(data8, n, 7 * n)
        res["stage_seconds"]["dataset_8x"] = done()
        done = bl.stage(f"memory: vggnorm stats subprocesses on {n} and {8 * n} images")
        res["memory"] = memory(
            weights, {"1x": data1, "8x": data8}, work, size=args.size, batch=args.batch_size,
            precision=args.precision, workers=args.workers,
        )  # fmt: skip
        res["stage_seconds"]["memory"] = done()
        return bl.finish(res, report, args.out)


if __name__ == "__main__":
    sys.exit(main())
