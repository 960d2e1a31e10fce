"""Memory and speed of ``vggnorm stats`` by image size, and the batch ``--batch-size auto``
chooses (issue 18). Offline:

    python scripts/bench_batch.py [--sizes 224,512,1024] [--models vgg16,vgg19]
                                  [--precision fp32,bf16] [--max-memory 6GB] [--batches 3]
                                  [--images 48] [--out results.json] [--quick]

Each configuration runs ``collect_stats`` in a fresh process (a small launcher exec'd afresh
reports the peak resident memory of its child, ``ru_maxrss`` of ``RUSAGE_CHILDREN``, so this
process's own size does not leak into the figure; see ``bench_memory.py``) on ``--batches`` full
batches of the batch ``auto`` chose (two at 1024 px and above: one steady interval). Printed per
run: the batch, the estimated peak (``vggnorm.core.memory``), the measured peak, their ratio,
steady images/s (end of the first batch to the end of the last full batch), and the batch
``auto`` would choose here with the default budget. ``--max-memory`` caps the runs' budget on a
shared machine; without it they use the default budget.

Weights: seeded, randomly initialised 224x224 VGG16/VGG19 notop (``fixtures.keras_files
.tiny_vgg``); memory and speed do not depend on the values. Dataset: ``--images`` COCO-like JPEGs
(``fixtures.photos.write_coco_like_jpegs``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixtures package

import benchlib as bl


def fixed_part(spec: dict[str, Any]) -> None:
    """In a fresh process: the resident memory after the imports, and after building the stats
    network (which holds the weights, not yet any activation), as JSON."""
    import resource

    from vggnorm.core.memory import weight_bytes
    from vggnorm.formats.registry import load
    from vggnorm.runtime.network import FeatureNet, keras_module

    def rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    keras_module()
    imported = rss()
    loaded = load(spec["weights"])
    arch = loaded.bound.arch.without_head()
    FeatureNet(arch, loaded.arrays, 224, "caffe", "fp32", batch_size=16)
    print(json.dumps({"imported": imported, "built": rss(), "conv_weights": weight_bytes(arch)[0]}))


def child(spec: dict[str, Any]) -> None:
    """In the measured process: one stats run; its plan, timing and the default plan as JSON."""
    if spec.get("mode") == "fixed":
        fixed_part(spec)
        return
    from vggnorm.commands.stats import collect_stats
    from vggnorm.core.inputs import Decode
    from vggnorm.core.memory import Batching, plan_batch
    from vggnorm.formats.registry import load
    from vggnorm.runtime.network import device_budget

    plans: list[Any] = []
    marks: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    collect_stats(
        spec["weights"], spec["data"], decode=Decode(spec["size"]), precision=spec["precision"],
        max_memory=spec["max_memory"], limit=spec["limit"], workers=2, on_plan=plans.append,
        progress=lambda p: marks.append((time.perf_counter(), p.images)),
    )  # fmt: skip
    total = time.perf_counter() - t0
    plan = plans[0]
    arch = load(spec["weights"]).bound.arch
    default = plan_batch(arch, spec["size"], spec["precision"], Batching(), device_budget())
    print(json.dumps({
        "batch": plan.batch, "estimate": plan.peak, "budget": plan.budget.limit,
        "budget_source": plan.budget.source, "default_batch": default.batch,
        "default_budget": default.budget.limit, "default_source": default.budget.source,
        "timing": bl.steady_rate(marks, plan.batch), "total_seconds": total,
    }))  # fmt: skip


def _limit(spec: dict[str, Any], work: Path) -> int:
    """The images for ``batches`` full batches of the batch auto will choose (planned in a
    child: the same rule, the same budget)."""
    code = (
        "import json, sys; from vggnorm.core.memory import Batching, plan_batch; "
        "from vggnorm.formats.registry import load; "
        "from vggnorm.runtime.network import device_budget; s = json.loads(sys.argv[1]); "
        "arch = load(s['weights']).bound.arch; "
        "print(plan_batch(arch, s['size'], s['precision'], Batching(), "
        "device_budget(s['max_memory'])).batch)"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True,
                         text=True, check=True, cwd=work).stdout  # fmt: skip
    return int(out.split()[-1]) * spec["batches"]


def measure(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """One configuration in a fresh process: its result and peak RSS."""
    if spec.get("mode") != "fixed":
        spec = {**spec, "limit": _limit(spec, work)}
    rss = work / "maxrss"
    env = {**os.environ, "PYTHONPATH": str(bl.REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = bl.peak_rss_command(rss, [sys.executable, __file__, "--child", json.dumps(spec)])
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{spec} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(spec=spec, peak_rss=int(rss.read_text()) * 1024)
    return result


def report_fixed(res: dict[str, Any]) -> list[str]:
    mib = 2**20
    rows = [[f["spec"]["model"], f"{f['imported'] / mib:.0f}", f"{f['built'] / mib:.0f}",
             f"{(f['built'] - f['imported']) / f['conv_weights']:.2f}"] for f in res["fixed"]]  # fmt: skip
    return [
        "",
        "FIXED PART: resident memory after the imports, and after building the network",
        bl.table(["model", "imported MiB", "built MiB", "built - imported / conv weights"], rows),
    ]


def report(res: dict[str, Any]) -> list[str]:
    gib = 2**30
    rows = []
    if not res["runs"]:
        return []
    for r in res["runs"]:
        s, t = r["spec"], r["timing"]
        rate = t["images_per_s"]
        rows.append([
            f"{s['model']} {s['precision']}", str(s["size"]), str(r["batch"]),
            f"{r['estimate'] / gib:.2f}", f"{r['peak_rss'] / gib:.2f}",
            f"{r['peak_rss'] / r['estimate']:.2f}", "-" if rate is None else f"{rate:.2f}",
            str(r["default_batch"]),
        ])  # fmt: skip
    first = res["runs"][0]
    return [
        "",
        "MEMORY AND SPEED BY IMAGE SIZE (collect_stats in a fresh process per row)",
        bl.table(
            ["model", "size", "batch", "est. GiB", "peak RSS GiB", "peak/est", "img/s", "auto here"],
            rows,
        ),
        f"  runs' budget: {first['budget_source']} ({(first['budget'] or 0) / gib:.1f} GiB)",
        f"  'auto here': the batch with the default budget, {first['default_source']} "
        f"({(first['default_budget'] or 0) / gib:.1f} GiB at the first run)",
    ]


def _weights(work: Path, models: Sequence[str]) -> dict[str, str]:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    out = {}
    for m in models:
        path = work / f"{m}_seed0_notop.h5"
        if not path.exists():
            save_downloaded_layout(tiny_vgg(include_top=False, arch=m, size=224), path)
        out[m] = str(path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        child(json.loads(argv[1]))
        return 0
    p = bl.parser("Memory and speed of vggnorm stats by image size; the batch auto chooses.",
                  images=48, quick_images=32)  # fmt: skip
    p.add_argument("--sizes", default="224,512,1024", help="default 224,512,1024")
    p.add_argument("--models", default="vgg16,vgg19", help="default vgg16,vgg19")
    p.add_argument("--precision", default="fp32,bf16", help="default fp32,bf16")
    p.add_argument("--max-memory", help="budget of the runs, e.g. 6GB (default: auto's own)")
    p.add_argument("--batches", type=int, default=3, help="full batches per run (default 3)")
    p.add_argument("--fixed-only", action="store_true", help="only the fixed part, no stats runs")
    args = bl.parse(p, argv)
    from vggnorm.core.memory import parse_memory

    sizes = [int(x) for x in args.sizes.split(",")] if not args.quick else [64, 128]
    models = args.models.split(",") if not args.quick else ["vgg16"]
    precisions = bl.precisions(p, args.precision) if not args.quick else ["fp32"]
    budget = parse_memory(args.max_memory) if args.max_memory else None
    with bl.workdir(args) as work:
        res: dict[str, Any] = {"study": "batch", "machine": bl.machine(), "runs": [], "fixed": []}
        data = work / "data"
        bl.write_coco_like_jpegs(data, 0, args.images)
        weights = _weights(work, models)
        for model in models:
            spec = {"mode": "fixed", "weights": weights[model], "model": model}
            res["fixed"].append(measure(spec, work))
        for model in models if not args.fixed_only else []:
            for precision in precisions:
                for size in sizes:
                    done = bl.stage(f"{model} {precision} {size}px")
                    spec = {"weights": weights[model], "data": str(data), "size": size,
                            "precision": precision, "max_memory": budget, "model": model,
                            "batches": args.batches if size < 1024 else 2}  # fmt: skip
                    res["runs"].append(measure(spec, work))
                    print(f"  {res['runs'][-1]['batch']} per batch, {done():.0f} s", file=sys.stderr)
        print("\n".join(report_fixed(res) + report(res)))
        m = res["machine"]
        print(f"machine: {m['cpu']}; {m['cores']} cores; avx512_bf16: {m['avx512_bf16']}; "
              f"AMX: {' '.join(m['amx_flags']) or 'none'}; TensorFlow {m['tensorflow']}; load "
              f"average {m['load_average_start']} at the start, {[round(x, 2) for x in os.getloadavg()]} at the end")
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
