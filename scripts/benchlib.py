"""What the ``vggnorm stats`` benchmarks share (a library, not a script: nothing here runs alone).

The studies, one script each, all offline and on the same kind of data:

- ``bench_speed.py``: images/s of ``collect_stats`` against the forward-pass ceiling and a plain
  Keras loop, per precision;
- ``bench_exactness.py``: the plain Keras loop's means against exact ones, and where its error
  comes from;
- ``bench_accuracy.py``: bf16 against fp32 means, draft against full JPEG decoding, next to the
  sampling noise;
- ``bench_memory.py``: peak RSS of ``python -m vggnorm stats`` on N and 8N images.

Each makes N distinct COCO-like JPEGs (``fixtures.photos.write_coco_like_jpegs``) and takes
Keras's cached ImageNet VGG16 notop weights, else a seeded random VGG16
(``fixtures.keras_files.vgg16_notop_weights``; said in the output). This module holds the common
command-line options, the dataset and machine description, the vggnorm run and the plain Keras
loop that several studies time or compare, the relative-error comparison and the table printing.
The scripts put the repository root on ``sys.path`` before importing it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fixtures.keras_files import vgg16_notop_weights
from fixtures.photos import write_coco_like_jpegs

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LIVE = 1e-6  # filters whose reference mean is below LIVE x the layer's median are not compared

Means = dict[str, np.ndarray]  # conv name -> per-filter means, network order


# ---------------------------------------------------------------------------------------------
# command line and work folder


# Linux starts a forked child's ru_maxrss at its parent's RSS (the copied page tables, and on exec
# the old address space's high-water mark), so a child of this multi-GB process would report this
# process's size. A small launcher, exec'd afresh, runs the command and reports RUSAGE_CHILDREN:
# the peak of the command alone (plus the launcher's few MB at fork time).
LAUNCHER = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
"""


def peak_rss_command(rss: Path, cmd: Sequence[str]) -> list[str]:
    """``cmd`` run through :data:`LAUNCHER`, which writes its peak RSS (KiB) to ``rss``."""
    return [sys.executable, "-c", LAUNCHER, str(rss), *cmd]


def parser(
    description: str, *, images: int = 600, quick_images: int = 56, size: int = 224
) -> argparse.ArgumentParser:
    """The options every study takes; each script adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--images", type=int, metavar="N",
        help=f"dataset size (default {images}; --quick {quick_images}); raised by half a batch "
        "when a multiple of the batch size, so that the last batch is partial",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="default 16")
    p.add_argument(
        "--size", type=int, default=size, metavar="N", help=f"input size (default {size})"
    )
    p.add_argument("--workers", type=int, default=2, metavar="N", help="decode threads (default 2)")
    p.add_argument("--workdir", metavar="PATH", help="make and keep the files here (default: tmp)")
    p.add_argument("--out", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="small N, short timings")
    p.set_defaults(default_images=images, quick_images=quick_images)
    return p


def precisions(p: argparse.ArgumentParser, text: str) -> list[str]:
    """A ``--precision`` list: fp32 and/or bf16."""
    out = [x.strip() for x in text.split(",") if x.strip()]
    if not out or set(out) - {"fp32", "bf16"}:
        p.error(f"--precision takes fp32 and/or bf16, got {text!r}")
    return out


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    args.images = args.images or (args.quick_images if args.quick else args.default_images)
    if args.images < 2 * args.batch_size:
        p.error(f"--images must be at least 2 x --batch-size ({2 * args.batch_size})")
    return args


@contextlib.contextmanager
def workdir(args: argparse.Namespace) -> Iterator[Path]:
    """``--workdir`` (kept), else a temporary folder (removed)."""
    keep = args.workdir is not None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vggnorm-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def stage(name: str) -> Callable[[], float]:
    """Say on stderr that ``name`` starts; the returned function gives the seconds since."""
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# machine, dataset, weights


def machine() -> dict[str, Any]:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown":
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        model = platform.processor() or "unknown"
    quota = None
    try:
        q, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        quota = None if q == "max" else round(int(q) / int(period), 2)
    except (OSError, ValueError):
        pass
    import keras
    import tensorflow as tf

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cgroup_cpu_quota": quota,
        "amx_flags": sorted(f for f in flags if f.startswith("amx")),
        "avx512_bf16": "avx512_bf16" in flags,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def start(args: argparse.Namespace, work: Path, study: str) -> tuple[dict[str, Any], list[Path]]:
    """The results so far (machine, settings, dataset, weights) and the N JPEGs in
    ``work/data1``; ``res["weights"]["path"]`` is the weight file."""
    n, bs = args.images, args.batch_size
    res: dict[str, Any] = {"study": study, "machine": machine(), "notes": [], "stage_seconds": {}}
    if n % bs == 0:
        # The plain loop's dropped partial batch is one of the errors measured: keep one.
        n += bs // 2
        res["notes"].append(f"--images raised to {n} so the last batch is partial")
    args.images = n
    res["settings"] = {
        k: v for k, v in vars(args).items() if k not in ("default_images", "quick_images")
    }
    done = stage(f"making {n} JPEGs")
    paths = write_coco_like_jpegs(work / "data1", 0, n)
    gen = done()
    from PIL import Image

    sizes, modes = [], []
    for pth in paths:
        with Image.open(pth) as img:
            sizes.append(img.size)
            modes.append(img.mode)
    res["dataset"] = {
        "images": n,
        "portrait": sum(1 for w, h in sizes if h > w),
        "grey": modes.count("L"),
        "mean_kib": float(np.mean([pth.stat().st_size for pth in paths]) / 1024),
        "generate_seconds": gen,
    }
    res["stage_seconds"]["dataset"] = gen
    weights, what = vgg16_notop_weights(work)
    res["weights"] = {"path": str(weights), "description": what}
    return res, paths


def finish(
    res: dict[str, Any], report: Callable[[dict[str, Any]], list[str]], out: str | None
) -> int:
    """Add the closing notes, print the header and ``report(res)``'s lines, write ``out``."""
    m = res["machine"]
    m["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    used = res["settings"].get("precisions", [])
    if m["amx_flags"] == [] and "bf16" in used:
        res["notes"].append(
            "no AMX on this CPU: bf16 runs on "
            + ("AVX512-BF16" if m["avx512_bf16"] else "emulation")
            + ", so it need not be faster than fp32 here"
        )
    stages = res["stage_seconds"]
    res["notes"].append("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    print("\n".join([*header(res), *report(res), "", *[f"note: {n}" for n in res["notes"]]]))
    if out:
        Path(out).write_text(json.dumps(res, indent=2, default=_jsonable) + "\n")
        print(f"wrote {out}")
    return 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def header(res: dict[str, Any]) -> list[str]:
    m, s, d = res["machine"], res["settings"], res["dataset"]
    amx = " ".join(m["amx_flags"]) or "none"
    quota = f", cgroup quota {m['cgroup_cpu_quota']} CPUs" if m["cgroup_cpu_quota"] else ""
    return [
        "",
        f"== vggnorm stats benchmark: {res['study']} ==",
        f"machine: {m['cpu']}; {m['cores']} cores ({m['cores_usable']} usable{quota}); "
        f"AMX: {amx}; avx512_bf16: {'yes' if m['avx512_bf16'] else 'no'}",
        f"software: Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']} "
        f"({m['keras_backend']})",
        f"load average: {m['load_average_start']} at start, {m['load_average_end']} at end "
        f"(1/5/15 min; well above 0 means other work shared the CPU: timings are then low)",
        f"weights: {res['weights']['description']}",
        f"dataset: {d['images']} distinct JPEGs, 640x480 ({d['portrait']} portrait 480x640, "
        f"{d['grey']} greyscale), quality 90, mean {d['mean_kib']:.0f} KiB, cut from scikit-image "
        f"photographs ({d['generate_seconds']:.0f} s to make)",
        f"settings: --size {s['size']} --batch-size {s['batch_size']} --workers {s['workers']}",
    ]


# ---------------------------------------------------------------------------------------------
# vggnorm and the plain Keras loop


def dtype_policy(precision: str) -> str:
    return "mixed_bfloat16" if precision == "bf16" else "float32"


def keras_vgg16(weights: Path, size: int, precision: str) -> Any:
    """keras.applications VGG16 notop with ``weights``, in ``precision`` (the dtype policy)."""
    import keras

    keras.config.set_dtype_policy(dtype_policy(precision))
    try:
        return keras.applications.VGG16(
            weights=str(weights), include_top=False, input_shape=(size, size, 3)
        )
    finally:
        keras.config.set_dtype_policy("float32")


def forget(*objs: Any) -> None:
    """Drop Keras models and their graphs before the next measurement."""
    import keras

    del objs
    keras.backend.clear_session()
    gc.collect()


def steady_rate(marks: Sequence[tuple[float, int]], batch_size: int) -> dict[str, Any]:
    """Images/s from the end of the first batch to the end of the last full batch.

    Excludes what happens once per run whatever its length: reading weights, building the model,
    the first call's tracing, and the retrace for a smaller last batch.
    """
    last = len(marks) - 1
    while last > 1 and marks[last][1] - marks[last - 1][1] != batch_size:
        last -= 1
    if last < 1:
        return {"images_per_s": None, "images": 0, "seconds": 0.0}
    images = marks[last][1] - marks[0][1]
    seconds = marks[last][0] - marks[0][0]
    # The same up to the very last batch, retrace included (the literal definition).
    to_end = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
    return {
        "images_per_s": images / seconds, "images": images, "seconds": seconds,
        "images_per_s_to_last_batch": to_end,
    }  # fmt: skip


def run_vggnorm(
    weights: Path,
    data: Path,
    *,
    size: int,
    batch_size: int,
    precision: str,
    workers: int,
    draft: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> tuple[Any, dict[str, Any]]:
    """``collect_stats`` end to end: its record, and its steady and all-in rates."""
    from vggnorm.commands.stats import collect_stats
    from vggnorm.core.inputs import Decode

    marks: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    record = collect_stats(
        weights, data, decode=Decode(size, draft=draft), precision=precision,  # type: ignore[arg-type]
        batch_size=batch_size, shard=shard, workers=workers,
        progress=lambda p: marks.append((time.perf_counter(), p.images)),
    )  # fmt: skip
    total = time.perf_counter() - t0
    timing = steady_rate(marks, batch_size)
    timing.update(
        total_seconds=total,
        total_images=record.n_images,
        total_images_per_s=record.n_images / total,
        first_batch_seconds=marks[0][0] - t0 if marks else None,
    )
    forget()
    return record, timing


def dataset_order(data: Path) -> list[Path]:
    """The images of ``data`` in the order vggnorm reads them."""
    from vggnorm.runtime.data import open_dataset

    ds = open_dataset(data)
    return [ds.path_of(item) for item in ds.items]


def naive_model(weights: Path, size: int, precision: str) -> Any:
    """What a Keras user writes: VGG16, and each conv layer's per-batch channel mean."""
    import keras

    base = keras_vgg16(weights, size, precision)
    ops = keras.ops
    outs = [
        ops.mean(ops.cast(layer.output, "float32"), axis=(0, 1, 2))
        for layer in base.layers
        if isinstance(layer, keras.layers.Conv2D)
    ]
    return keras.Model(base.input, outs)


def load_batch(paths: Sequence[Path], size: int) -> np.ndarray:
    """``load_img`` (stretch to size x size, nearest) and ``img_to_array``, stacked."""
    import keras

    return np.stack(
        [keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size))) for p in paths]
    )


def run_naive(
    weights: Path, paths: Sequence[Path], size: int, batch_size: int, precision: str, keep: bool
) -> tuple[list[np.ndarray], dict[str, Any], list[np.ndarray]]:
    """The straightforward loop; with ``keep``, also returns the uint8 arrays it fed the model."""
    import keras

    model = naive_model(weights, size, precision)
    steps = len(paths) // batch_size  # the usual `steps = n // batch_size`: drops the remainder
    kept: list[np.ndarray] = []
    total: list[np.ndarray] | None = None
    marks: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    for s in range(steps):
        x = load_batch(paths[s * batch_size : (s + 1) * batch_size], size)
        if keep:
            kept.append(x.astype(np.uint8))  # load_img values are whole numbers in 0..255
        out = model.predict_on_batch(keras.applications.vgg16.preprocess_input(x))
        means = [np.asarray(o, dtype=np.float32) for o in out]
        total = means if total is None else [t + m for t, m in zip(total, means)]
        marks.append((time.perf_counter(), (s + 1) * batch_size))
    wall = time.perf_counter() - t0
    assert total is not None
    result = [t / np.float32(steps) for t in total]
    timing = steady_rate(marks, batch_size)
    timing.update(loop_seconds=wall, images=steps * batch_size, dropped=len(paths) % batch_size)
    forget(model)
    return result, timing, kept


# ---------------------------------------------------------------------------------------------
# comparisons and tables


def layer_means(record: Any) -> Means:
    return {s.name: np.asarray(s.mean, dtype=np.float64) for s in record.layers}


def compare(test: Means, ref: Means) -> dict[str, Any]:
    """Relative difference |test - ref| / ref per live filter: pooled and per layer."""
    pooled, where = [], []
    per_layer: dict[str, dict[str, float]] = {}
    ignored = 0
    for name, r in ref.items():
        r = np.asarray(r, dtype=np.float64)
        t = np.asarray(test[name], dtype=np.float64)
        live = r > LIVE * np.median(r)
        live &= r > 0
        ignored += int((~live).sum())
        if not live.any():
            continue
        e = np.abs(t[live] - r[live]) / r[live]
        pooled.append(e)
        idx = np.flatnonzero(live)
        where += [f"{name}[{i}]" for i in idx]
        per_layer[name] = {"median": float(np.median(e)), "worst": float(e.max())}
    if not pooled:
        return {
            "median": None, "p99": None, "worst": None, "worst_at": None, "filters": 0,
            "ignored": ignored,
        }  # fmt: skip
    allerr = np.concatenate(pooled)
    k = int(allerr.argmax())
    return {
        "median": float(np.median(allerr)),
        "p99": float(np.percentile(allerr, 99)),
        "worst": float(allerr[k]),
        "worst_at": where[k],
        "filters": int(allerr.size),
        "ignored": ignored,
        "per_layer": per_layer,
    }


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def pct(x: float | None) -> str:
    """A relative error: as a percentage from 1e-4 up, else in scientific notation."""
    if x is None:
        return "-"
    if x < 1e-4:
        return f"{x:.1e}"
    v = x * 100
    return f"{v:.0f}%" if v >= 10 else f"{v:.2g}%"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    lines = [
        "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        )
        for r in [header, *rows]
    ]
    return "\n".join([lines[0], line, *lines[1:]])
