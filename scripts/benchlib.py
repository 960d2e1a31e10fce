"""Benchmark ``vggnorm stats``: speed against the forward-pass ceiling and a plain Keras loop,
accuracy of bf16 and of draft JPEG decoding, exactness against per-batch-mean averaging, and peak
memory against dataset size (issue 4). Everything runs in one go, offline:

    python scripts/bench_stats.py [--images N] [--batch-size 16] [--precision fp32,bf16]
                                  [--size 224] [--out results.json] [--quick]

1. Dataset: N distinct COCO-like JPEGs (640x480, one in five portrait 480x640, quality 90) cut
   from the photographs scikit-image ships (random crops, rescales, flips, colour gains, sensor
   noise), written to a temporary folder.
2. Weights: Keras's cached ImageNet VGG16 notop file if ~/.keras/models has it, else a seeded,
   randomly initialised VGG16 saved with ``model.save_weights`` (said in the output).
3. Ceiling: keras.applications VGG16 notop (same weights, same precision via the Keras dtype
   policy, same batch size), ``predict_on_batch`` on one in-memory preprocessed float32 batch.
4. vggnorm: ``collect_stats`` end to end on the JPEGs; steady-state images/s from the progress
   callback's timestamps (end of the first batch to the end of the last full batch), and the
   total wall time including reading the weights, building the model and the first trace.
5. The straightforward Keras loop: ``load_img`` + ``img_to_array`` + ``preprocess_input``,
   ``steps = n // batch_size``, a model returning each conv's per-batch channel mean in float32,
   ``predict_on_batch``, float32 running sum of the per-batch means / steps. Its images/s, and its
   error against exact float64 means computed by vggnorm's reduction over the very same arrays,
   split into (a) the dropped partial batch, (b) averaging per-batch means when the batches are
   unequal, (c) float32 arithmetic (this run, and a float32 running sum at COCO scale).
6. Accuracy: bf16 vs fp32 per-filter means, next to the sampling noise (two halves of the data
   against each other), and draft (DCT-domain reduced) vs full-resolution JPEG decoding.
7. Memory: peak RSS of ``python -m vggnorm stats`` run as a subprocess on N vs 8N distinct images
   (at --mem-size 64 to keep it short).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

IMAGENET_NOTOP = Path("~/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
COLOUR_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png",
)  # fmt: skip
GREY_PHOTOS = ("camera.png", "moon.png", "coins.png", "brick.png", "grass.png", "gravel.png")
GREY_SHARE = 0.05  # COCO and ImageNet hold a few greyscale JPEGs
PORTRAIT_SHARE = 0.2
COCO_BATCHES = 80_000 // 16  # a COCO-sized run at batch 16, for the float32 drift figure
LIVE = 1e-6  # filters whose reference mean is below LIVE x the layer's median are not compared

Means = dict[str, np.ndarray]  # conv name -> per-filter means, network order


# ---------------------------------------------------------------------------------------------
# machine


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


# ---------------------------------------------------------------------------------------------
# dataset and weights


def _sources() -> list[tuple[str, Any]]:
    import skimage.data
    from PIL import Image

    folder = Path(skimage.data.__file__).parent
    out = []
    for name in COLOUR_PHOTOS + GREY_PHOTOS:
        path = folder / name
        if path.is_file():  # not every scikit-image release ships every sample
            with Image.open(path) as img:
                mode = "L" if name in GREY_PHOTOS else "RGB"
                out.append((name, img.convert(mode)))
    if not any(img.mode == "RGB" for _, img in out):
        raise SystemExit(f"no colour photographs found in {folder}")
    return out


def make_jpegs(folder: Path, first: int, count: int, seed: int = 0) -> list[Path]:
    """JPEGs number first..first+count-1: each its own crop of a photograph, COCO-sized."""
    from PIL import Image

    sources = _sources()
    colour = [s for s in sources if s[1].mode == "RGB"]
    grey = [s for s in sources if s[1].mode == "L"] or colour
    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> Path:
        rng = np.random.default_rng([seed, i])
        pool = grey if rng.random() < GREY_SHARE else colour
        _, src = pool[int(rng.integers(len(pool)))]
        w, h = (480, 640) if rng.random() < PORTRAIT_SHARE else (640, 480)
        sw, sh = src.size
        cw = min(sw, sh * w / h) * rng.uniform(0.45, 1.0)
        ch = cw * h / w
        left, top = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
        img = src.resize((w, h), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        a = np.asarray(img, dtype=np.float32)
        gain = rng.uniform(0.8, 1.2, 3 if a.ndim == 3 else 1).astype(np.float32)
        a = a * gain + rng.normal(0.0, rng.uniform(1.5, 4.0), a.shape).astype(np.float32)
        path = folder / f"img{i:06d}.jpg"
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), img.mode).save(path, quality=90)
        return path

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(one, range(first, first + count)))


def make_weights(tmp: Path) -> tuple[Path, str]:
    cached = IMAGENET_NOTOP.expanduser()
    if cached.is_file():
        return cached, f"Keras's cached ImageNet VGG16 notop weights ({cached})"
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))
    path = tmp / "vgg16_seed0.weights.h5"
    model.save_weights(path)
    del model
    keras.backend.clear_session()
    return path, (
        "a seeded (0), RANDOMLY INITIALISED VGG16 notop saved with model.save_weights "
        f"({cached} not found): speed is the same as with ImageNet weights, the accuracy "
        "figures are not those of the real network"
    )


# ---------------------------------------------------------------------------------------------
# the three ways to run


def _dtype_policy(precision: str) -> str:
    return "mixed_bfloat16" if precision == "bf16" else "float32"


def _keras_vgg16(weights: Path, size: int, precision: str) -> Any:
    import keras

    keras.config.set_dtype_policy(_dtype_policy(precision))
    try:
        return keras.applications.VGG16(
            weights=str(weights), include_top=False, input_shape=(size, size, 3)
        )
    finally:
        keras.config.set_dtype_policy("float32")


def _forget(*objs: Any) -> None:
    import keras

    del objs
    keras.backend.clear_session()
    gc.collect()


def ceiling(weights: Path, batch: np.ndarray, precision: str, seconds: float) -> dict[str, Any]:
    """The conv stack alone on an in-memory float32 batch: the most the forward pass can do."""
    model = _keras_vgg16(weights, batch.shape[1], precision)
    for _ in range(2):
        model.predict_on_batch(batch)
    n, t0 = 0, time.perf_counter()
    while True:
        model.predict_on_batch(batch)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 3:
            break
    _forget(model)
    return {"images_per_s": n * len(batch) / elapsed, "batches": n, "seconds": elapsed}


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
    _forget()
    return record, timing


def naive_model(weights: Path, size: int, precision: str) -> Any:
    """What a Keras user writes: VGG16, and each conv layer's per-batch channel mean."""
    import keras

    base = _keras_vgg16(weights, size, precision)
    ops = keras.ops
    outs = [
        ops.mean(ops.cast(layer.output, "float32"), axis=(0, 1, 2))
        for layer in base.layers
        if isinstance(layer, keras.layers.Conv2D)
    ]
    return keras.Model(base.input, outs)


def _load(paths: Sequence[Path], size: int) -> np.ndarray:
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
        x = _load(paths[s * batch_size : (s + 1) * batch_size], size)
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
    _forget(model)
    return result, timing, kept


# ---------------------------------------------------------------------------------------------
# comparisons


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
    from vggnorm.commands.stats import load_model_weights
    from vggnorm.runtime.network import FeatureNet

    ws, bound = load_model_weights(weights, None)
    names = list(bound.arch.conv_names)
    net = FeatureNet(bound.arch, ws.arrays, size, "caffe", precision)  # type: ignore[arg-type]
    batches = list(kept) + ([rest] if len(rest) else [])
    per = batch_sums(net, names, batches)
    full = per[: len(kept)]

    def pooled(parts: Sequence[dict[str, tuple[np.ndarray, int]]]) -> Means:
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
        "total": compare(naive_means, exact),
        "a_dropped_partial_batch": compare(dropped, exact),
        "b_batch_mean_average": compare(batch_mean, exact),
        "c_float32_this_run": compare(naive_means, dropped),
        "c_float32_running_sum_coco": compare(
            {n: acc32[n] / np.float32(COCO_BATCHES) for n in names},
            {n: acc64[n] / COCO_BATCHES for n in names},
        ),
    }
    # vggnorm's own reduction against numpy float64 sums over the float32 activations.
    probe = batches[0][: min(8, len(batches[0]))]
    mom = net.moments(probe)
    _forget(net)
    acts = FeatureNet(bound.arch, ws.arrays, size, "caffe", precision, outputs="activations")  # type: ignore[arg-type]
    sums = {n: np.zeros(mom[n][0].shape, np.float64) for n in names}
    for i in range(0, len(probe), 4):  # 4 images of VGG16 activations at 224: ~220 MB
        for n, a in zip(names, acts.activations(probe[i : i + 4])):
            sums[n] += a.sum(axis=(0, 1, 2), dtype=np.float64)
    out["vggnorm_vs_float64"] = compare(
        {n: np.asarray(mom[n][0], np.float64) / mom[n][2] for n in names},
        {n: sums[n] / mom[n][2] for n in names},
    )
    out["vggnorm_vs_float64"]["images"] = len(probe)
    _forget(acts)
    return out


# ---------------------------------------------------------------------------------------------
# memory


# Linux starts a forked child's ru_maxrss at its parent's RSS (the copied page tables, and on exec
# the old address space's high-water mark), so a child of this multi-GB process would report this
# process's size. A small launcher, exec'd afresh, runs the command and reports RUSAGE_CHILDREN:
# the peak of the command alone (plus the launcher's few MB at fork time).
_LAUNCHER = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
"""


def peak_rss(cmd: Sequence[str], cwd: Path, log: Path) -> dict[str, Any]:
    """Run ``cmd``; its peak RSS in MiB (ru_maxrss, RUSAGE_CHILDREN of a small launcher)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    rss = log.with_suffix(".maxrss")
    t0 = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(rss), *cmd],
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


# ---------------------------------------------------------------------------------------------
# output


def _f(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
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
    fmt = [
        "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        )
        for r in [header, *rows]
    ]
    return "\n".join([fmt[0], line, *fmt[1:]])


def report(res: dict[str, Any]) -> str:
    m, s, d = res["machine"], res["settings"], res["dataset"]
    amx = " ".join(m["amx_flags"]) or "none"
    quota = f", cgroup quota {m['cgroup_cpu_quota']} CPUs" if m["cgroup_cpu_quota"] else ""
    out = [
        "",
        "== vggnorm stats benchmark ==",
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
        f"settings: --size {s['size']} --batch-size {s['batch_size']} --workers {s['workers']}, "
        f"ceiling timed {s['ceiling_seconds']:g} s after 2 warm-up batches",
        "",
        "SPEED (images/s)",
    ]
    rows = []
    for p, v in res["speed"].items():
        c, g, n = v["ceiling"], v["vggnorm"], v.get("naive", {})
        rows.append(
            [
                p,
                _f(c["images_per_s"], ".1f"),
                _f(g["images_per_s"], ".1f"),
                _pct(v["vggnorm_over_ceiling"]),
                f"{g['total_seconds']:.1f} ({g['total_images_per_s']:.1f}/s)",
                _f(n.get("images_per_s"), ".1f"),
                _f(v.get("vggnorm_over_naive"), ".2f") + "x",
            ]
        )
    header = ["precision", "ceiling", "vggnorm", "of ceiling", "vggnorm wall s (all-in)"]
    out.append(table([*header, "naive loop", "vggnorm/naive"], rows))
    out += [
        "  ceiling: Keras VGG16 notop predict_on_batch on one in-memory preprocessed batch.",
        "  vggnorm, naive loop: steady state, from the end of the first batch to the end of the",
        "  last full batch (excludes weight reading, model build, first-call tracing and the",
        "  smaller last batch's retrace, all once per run). 'all-in' = collect_stats wall time.",
    ]
    if "naive_errors" in res:
        e = res["naive_errors"]
        b = e["batches"]
        shape = f"{len(b) - 1}x{b[0]} + {b[-1]}" if len(set(b)) > 1 else f"{len(b)}x{b[0]}"
        out += [
            "",
            f"EXACTNESS: naive loop vs exact means ({e['precision']}; relative error per live filter,",
            "  in % from 0.01% up, as a plain ratio below)",
            f"  same {e['images']} arrays for both (load_img: stretch, nearest), batches {shape}; "
            "exact = float64 sums/counts",
            "  of vggnorm's on-device reduction over all of them, so only the averaging differs.",
        ]
        rows = [
            [label, _pct(r["median"]), _pct(r["p99"]), _pct(r["worst"]), r["worst_at"] or "-"]
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
        out.append(table(["source", "median", "99th pct", "worst", "worst filter"], rows))
        out += [
            "  (a) exact mean over the full batches only vs all images; (b) unweighted mean of",
            "  per-batch means over all batches incl. the partial one, what keeping the last batch",
            "  without weighting gives; (c) the naive result vs exact arithmetic on the same images;",
            f"  (c, COCO) float32 running sum of this run's per-batch means cycled to {COCO_BATCHES}",
            "  batches vs float64; last row: vggnorm's sums vs numpy float64 over its float32",
            "  activations of the same images.",
        ]
    if "accuracy" in res:
        a = res["accuracy"]
        out += [
            "",
            f"ACCURACY OF MEANS (relative difference per live filter; filters whose mean is below "
            f"{LIVE:g} x the layer median are ignored)",
        ]
        comps = [(k, v) for k, v in a["comparisons"].items() if v]
        rows = [
            [label, _pct(r["median"]), _pct(r["p99"]), _pct(r["worst"]), r["worst_at"] or "-",
             str(r["filters"]), str(r["ignored"])]
            for label, r in comps
        ]  # fmt: skip
        out.append(
            table(
                ["comparison", "median", "99th pct", "worst", "worst filter", "filters", "ignored"],
                rows,
            )
        )
        layers = list(next(iter(v for _, v in comps))["per_layer"])
        rows = [
            [n]
            + [
                f"{_pct(r['per_layer'][n]['median'])} / {_pct(r['per_layer'][n]['worst'])}"
                if n in r["per_layer"]
                else "-"
                for _, r in comps
            ]
            for n in layers
        ]
        out.append("")
        out.append(table(["layer (median / worst)", *[k for k, _ in comps]], rows))
        out += [f"  {x}" for x in a["notes"]]
    if "memory" in res:
        mm = res["memory"]
        out += [
            "",
            f"MEMORY: peak RSS of `python -m vggnorm stats --precision {mm['precision']} "
            f"--size {mm['size']}` (subprocess; ru_maxrss via RUSAGE_CHILDREN of a fresh launcher)",
        ]
        rows = [
            [label, str(r["images"]), f"{r['peak_rss_mib']:.0f}", f"{r['seconds']:.1f}"]
            for label, r in mm["runs"].items()
        ]
        out.append(table(["dataset", "images", "peak RSS MiB", "wall s"], rows))
        out.append(f"  8x images / 1x images peak RSS: {mm['ratio']:.3f}")
        out.append(
            f"  --size {mm['size']} keeps it short; the decoded-batch queue, the only part that "
            "scales with the image size, is a few batches at any size."
        )
    out += ["", *[f"note: {n}" for n in res["notes"]]]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark vggnorm stats against the forward-pass ceiling and a plain Keras "
        "loop; accuracy of bf16 and draft decoding; peak memory at 1x and 8x images.",
    )
    p.add_argument("--images", type=int, metavar="N", help="dataset size (default 600; --quick 56)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="default 16")
    p.add_argument(
        "--precision", default="fp32,bf16", metavar="LIST", help="fp32 and/or bf16 (default both)"
    )
    p.add_argument("--size", type=int, default=224, metavar="N", help="input size (default 224)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="decode threads (default 2)")
    p.add_argument(
        "--seconds", type=float, metavar="S", help="ceiling timing (default 20; --quick 5)"
    )
    p.add_argument(
        "--mem-size", type=int, default=64, metavar="N", help="--size of the memory runs (64)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    p.add_argument("--workdir", metavar="PATH", help="make and keep the files here (default: tmp)")
    p.add_argument("--out", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="small N, short timings (a few minutes)")
    args = p.parse_args(argv)
    args.images = args.images or (56 if args.quick else 600)
    args.seconds = args.seconds if args.seconds is not None else (5.0 if args.quick else 20.0)
    args.precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    if not args.precisions or set(args.precisions) - {"fp32", "bf16"}:
        p.error(f"--precision takes fp32 and/or bf16, got {args.precision!r}")
    if args.images < 2 * args.batch_size:
        p.error(f"--images must be at least 2 x --batch-size ({2 * args.batch_size})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    keep = args.workdir is not None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vggnorm-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _main(args, work)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _stage(name: str) -> Callable[[], float]:
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def _main(args: argparse.Namespace, work: Path) -> int:
    from vggnorm.core.inputs import Decode
    from vggnorm.core.stats import merge_stats
    from vggnorm.runtime.data import load_image, open_dataset

    n, bs, size = args.images, args.batch_size, args.size
    res: dict[str, Any] = {"machine": machine(), "notes": [], "stage_seconds": {}}
    if n % bs == 0:
        # The plain loop's dropped partial batch is one of the errors measured: keep one.
        n += bs // 2
        res["notes"].append(f"--images raised to {n} so the last batch is partial")
    res["settings"] = {
        "images": n, "batch_size": bs, "size": size, "workers": args.workers,
        "precisions": args.precisions, "ceiling_seconds": args.seconds, "quick": args.quick,
    }  # fmt: skip
    stages = res["stage_seconds"]

    done = _stage(f"making {n} JPEGs" + ("" if args.no_memory else f" (+{7 * n} for memory)"))
    data1 = work / "data1"
    paths = make_jpegs(data1, 0, n)
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
    stages["dataset"] = gen
    weights, what = make_weights(work)
    res["weights"] = {"path": str(weights), "description": what}

    ds = open_dataset(data1)
    ordered = [ds.path_of(item) for item in ds.items]
    import keras

    first = np.stack([load_image(p, Decode(size)) for p in ordered[:bs]]).astype(np.float32)
    ceiling_batch = keras.applications.vgg16.preprocess_input(first)

    acc_precision = "fp32" if "fp32" in args.precisions else args.precisions[0]
    records: dict[str, Any] = {}
    res["speed"] = {}
    for prec in args.precisions:
        done = _stage(f"{prec}: ceiling")
        c = ceiling(weights, ceiling_batch, prec, args.seconds)
        stages[f"{prec}_ceiling"] = done()
        done = _stage(f"{prec}: vggnorm collect_stats on {n} JPEGs")
        record, t = run_vggnorm(
            weights, data1, size=size, batch_size=bs, precision=prec, workers=args.workers
        )
        stages[f"{prec}_vggnorm"] = done()
        records[prec] = record
        done = _stage(f"{prec}: naive Keras loop on {n} JPEGs")
        naive, nt, kept = run_naive(weights, ordered, size, bs, prec, keep=prec == acc_precision)
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
        if prec == acc_precision:
            done = _stage(f"{prec}: exact reference on the naive loop's arrays")
            rest = _load(ordered[len(kept) * bs :], size).astype(np.uint8)
            res["naive_errors"] = naive_errors(weights, naive, kept, rest, size, prec)
            stages[f"{prec}_naive_reference"] = done()
            del kept, rest

    done = _stage(f"{acc_precision}: vggnorm full-resolution decode, as two halves")
    halves = [
        run_vggnorm(
            weights, data1, size=size, batch_size=bs, precision=acc_precision,
            workers=args.workers, draft=False, shard=(i, 2),
        )[0]
        for i in range(2)
    ]  # fmt: skip
    stages[f"{acc_precision}_full_decode_halves"] = done()
    full = {s.name: s.mean for s in merge_stats(halves[0].layers, halves[1].layers)}
    comparisons: dict[str, Any] = {}
    if "fp32" in records and "bf16" in records:
        comparisons["bf16 vs fp32"] = compare(
            layer_means(records["bf16"]), layer_means(records["fp32"])
        )
    comparisons[f"halves ({acc_precision})"] = compare(
        layer_means(halves[0]), layer_means(halves[1])
    )
    comparisons[f"draft vs full ({acc_precision})"] = compare(
        layer_means(records[acc_precision]), full
    )
    res["accuracy"] = {
        "comparisons": comparisons,
        "notes": [
            "bf16 vs fp32: the two timed vggnorm runs (draft decode, crop), |bf16 - fp32| / fp32.",
            f"halves: images 0,2,4,... vs 1,3,5,... (full decode), |A - B| / B: the sampling noise "
            f"of a {n // 2}-image set (it shrinks as 1/sqrt(images); these images are crops of "
            f"{len(COLOUR_PHOTOS) + len(GREY_PHOTOS)} photographs, so real data is noisier).",
            "draft vs full: JPEG decoded at reduced scale in the DCT domain (never below --size) "
            "vs at full resolution, both then resized the same way.",
        ],
    }

    if not args.no_memory:
        done = _stage(f"making {7 * n} more JPEGs for the 8x memory run")
        data8 = work / "data8"
        data8.mkdir(exist_ok=True)
        for pth in paths:  # the same N files (hard links when possible) plus 7N new ones
            try:
                os.link(pth, data8 / pth.name)
            except OSError:
                shutil.copyfile(pth, data8 / pth.name)
        make_jpegs(data8, n, 7 * n)
        stages["dataset_8x"] = done()
        mem_prec = "bf16" if "bf16" in args.precisions else args.precisions[0]
        done = _stage(f"memory: vggnorm stats subprocesses on {n} and {8 * n} images")
        res["memory"] = memory(
            weights, {"1x": data1, "8x": data8}, work, size=args.mem_size, batch=bs,
            precision=mem_prec, workers=args.workers,
        )  # fmt: skip
        stages["memory"] = done()

    res["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if res["machine"]["amx_flags"] == [] and "bf16" in args.precisions:
        res["notes"].append(
            "no AMX on this CPU: bf16 runs on "
            + ("AVX512-BF16" if res["machine"]["avx512_bf16"] else "emulation")
            + ", so it need not be faster than fp32 here"
        )
    if n % bs == 0:
        res["notes"].append("N is a multiple of the batch size: (a) and (b) are zero by design")
    res["notes"].append("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    print(report(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=_jsonable) + "\n")
        print(f"wrote {args.out}")
    return 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


if __name__ == "__main__":
    sys.exit(main())
