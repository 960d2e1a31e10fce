"""Flip single metadata bytes of a weight file and count what reading it does (issue #10, item 5;
issue #17: the MatConvNet, ONNX and PyTorch containers).

For HDF5 files every byte outside the raw storage of the file's datasets is a candidate
(superblock, object headers, B-trees, heaps); for the other containers their structure
(``fixtures/damaged_formats.py``: a ``.pth`` zip without its tensor data, a ``.safetensors``
header, all of a small ``.mat`` or ``.onnx``). ``--positions`` of them are drawn with a fixed
seed, each flipped with one of the XOR masks 0x01, 0x10, 0x80, 0xFF. Each damaged copy is read
twice:

(a) unguarded: the reader itself (``vggnorm.formats.keras_h5._read``, ``statsfile._read_stats``,
    ``matconvnet._read``, ``onnx_graph._read``, ``pth._read_pth`` and
    ``safetensors_file._read_safetensors`` with the state-dict checks), run in a plain forked
    child with a deadline only so that this script survives hangs;
(b) guarded: ``read_weights``/``read_stats`` as every command calls them (a child with a deadline).

Outcomes: ``ok`` (read), ``clean`` (a one-line :class:`VggnormError` naming the file), ``other``
(any other exception: a traceback for the user), ``timeout`` (the read hung), ``crash``.

Usage::

    python scripts/fuzz_weights.py                     # generated: VGG16 layout, 1/16 channels
    python scripts/fuzz_weights.py vgg16_notop.h5 --positions 160
    python scripts/fuzz_weights.py --stats             # a generated stats file, read_stats
    python scripts/fuzz_weights.py --format pth        # also mat, onnx, safetensors (generated)
    python scripts/fuzz_weights.py --overhead          # start-up and transfer costs
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fixtures import damaged as dm
from fixtures import damaged_formats as df
from vggnorm.core.errors import VggnormError
from vggnorm.formats import _guard as guard
from vggnorm.formats import _torch, matconvnet, onnx_graph, pth, safetensors_file
from vggnorm.formats.keras_h5 import _read as _read_weights  # the reader, unguarded
from vggnorm.formats.registry import read_weights
from vggnorm.formats.statsfile import _read_stats, read_stats

DENSE = ("fc1", "fc2", "predictions")


def write_legacy(
    path: Path, convs: Sequence[tuple[int, int]], dense: list[tuple[int, int]]
) -> Path:
    """A keras.applications-style legacy file of random float32 weights (contiguous datasets)."""
    layers = dm.conv_layers(dm.VGG16_CONV_NAMES[: len(convs)], convs)
    layers += [(name, shape) for name, shape in zip(DENSE, dense)]
    return dm.write_legacy_h5(path, layers, seed=0)


def write_stats_file(path: Path) -> Path:
    """A stats file for a 13-conv model (what `vggnorm stats` writes), 3 images, 1 skipped."""
    convs = [(name, b) for name, (_, b) in zip(dm.VGG16_CONV_NAMES, dm.VGG16_CONVS)]
    return dm.write_stats_file(path, convs, seed=0, count=1000, n_images=3)


def _read_pth(path: Path) -> Any:
    return _torch.canonical(path, "pth", *pth._read_pth(path), {})


def _read_safetensors(path: Path) -> Any:
    return _torch.canonical(path, "safetensors", *safetensors_file._read_safetensors(path))


#: Each kind's reader, unguarded (the HDF5 weight reader for any other kind).
UNGUARDED = {"stats": _read_stats, ".mat": matconvnet._read, ".onnx": onnx_graph._read,
             ".pth": _read_pth, ".safetensors": _read_safetensors}  # fmt: skip


def _unguarded_child(path: str, conn: Any, kind: str) -> None:
    try:
        UNGUARDED.get(kind, _read_weights)(Path(path))  # the reader, unguarded
        conn.send("ok")
    except VggnormError as e:
        conn.send("clean" if "\n" not in str(e) and path in str(e) else "other")
    except BaseException as e:  # a traceback for the user
        conn.send(f"other:{type(e).__name__}")


def unguarded(path: Path, timeout: float, kind: str) -> str:
    ctx = multiprocessing.get_context("fork")  # this script is single-threaded
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_unguarded_child, args=(str(path), send, kind), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            return "timeout"
        return str(recv.recv()).split(":")[0]
    except EOFError:
        return "crash"
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()


def guarded(path: Path, timeout: float, kind: str) -> str:
    reader = read_stats if kind == "stats" else read_weights  # what the commands call: guarded
    os.environ[guard.TIMEOUT_ENV] = str(timeout)
    try:
        reader(path)
    except VggnormError as e:
        if "reading took more than" in str(e):
            return "timeout"
        return "clean" if "\n" not in str(e) and str(path) in str(e) else "other"
    except BaseException:
        return "other"
    return "ok"


def fuzz(src: Path, positions: int, seed: int, timeout: float, work: Path, kind: str) -> None:
    data = src.read_bytes()
    if kind in UNGUARDED and kind != "stats":
        offsets = df.structure(src)
    else:
        offsets = dm.metadata_offsets(len(data), dm.raw_storage(src, strict=False))
    flips = dm.sample_flips(offsets, positions, seed)
    counts: dict[str, collections.Counter[str]] = {"unguarded": collections.Counter(),
                                                   "guarded": collections.Counter()}  # fmt: skip
    seconds = {"unguarded": 0.0, "guarded": 0.0}
    for offset, mask in flips:
        path = work / f"flip_{offset}_{mask:02x}{src.suffix}"
        path.write_bytes(dm.flipped(data, offset, mask))
        for name, reader in (("unguarded", unguarded), ("guarded", guarded)):
            t0 = time.perf_counter()
            counts[name][reader(path, timeout, kind)] += 1
            seconds[name] += time.perf_counter() - t0
        path.unlink()
    print(f"file {src.name}: {len(data)} bytes, {len(offsets)} of structure (outside tensor data); "
          f"{len(flips)} single-byte flips (seed {seed}), deadline {timeout:g} s")  # fmt: skip
    for name in ("unguarded", "guarded"):
        c = counts[name]
        print(f"  {name:9s}  ok {c['ok']:4d}  clean error {c['clean']:4d}  other exception "
              f"{c['other']:4d}  timeout {c['timeout']:3d}  crash {c['crash']:3d}  "
              f"({seconds[name]:.1f} s)")  # fmt: skip


def _noop() -> int:
    return 0


def overhead(work: Path) -> None:
    """Start-up per guarded call (spawn vs forkserver) and the cost of bringing 553 MB back."""
    for method in ("spawn", "forkserver"):
        ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(["__main__", *guard._PRELOAD])
        guard._ctx = ctx
        t0 = time.perf_counter()
        guard.run_guarded(_noop, what="x", timeout=60)
        first = time.perf_counter() - t0
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            guard.run_guarded(_noop, what="x", timeout=60)
            times.append(time.perf_counter() - t0)
        print(f"{method:10s} first call {first:.3f} s, then median {np.median(times):.4f} s "
              f"(min {min(times):.4f}, max {max(times):.4f})")  # fmt: skip
    big = write_legacy(
        work / "vgg16_full.h5", dm.VGG16_CONVS, [(25088, 4096), (4096, 4096), (4096, 1000)]
    )
    print(f"VGG16-sized file: {big.stat().st_size / 1e6:.0f} MB (page cache warm)")
    _read_weights(big)
    rows = collections.defaultdict(list)
    for _ in range(3):
        t0 = time.perf_counter()
        _read_weights(big)
        rows["in process"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        read_weights(big)
        rows["guarded (forkserver, arrays via memfd)"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with multiprocessing.get_context("forkserver").Pool(1) as pool:
            pool.apply(_read_weights, (big,))
        rows["Pool.apply (plain pickle through a pipe)"].append(time.perf_counter() - t0)
    for name, ts in rows.items():
        runs = ", ".join(f"{t:.2f}" for t in ts)
        print(f"  {name:42s} median {np.median(ts):.2f} s  (runs: {runs})")
    big.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?", type=Path, help="weight file (default: tiny legacy .h5)")
    parser.add_argument("--positions", type=int, default=160, help="flips to try (default 160)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="deadline per read (default 10)"
    )
    parser.add_argument("--stats", action="store_true", help="fuzz a generated stats file")
    parser.add_argument("--format", choices=["mat", "onnx", "pth", "safetensors"],
                        help="fuzz a generated file of that container (.pth and .safetensors: "
                        "VGG16's convs, 59 MB; .mat and .onnx: tiny VGG-like chains)")  # fmt: skip
    parser.add_argument("--overhead", action="store_true", help="measure the guard's costs instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vggnorm-fuzz-") as tmp:
        work = Path(tmp)
        if args.overhead:
            overhead(work)
            return
        kind = "stats" if args.stats else f".{args.format}" if args.format else "h5"
        if args.stats:
            src = write_stats_file(work / "stats.h5")
        elif args.format in ("pth", "safetensors"):
            import torch  # noqa: F401  (imported once here, not in every forked reader)

            src = df.WRITERS[kind](work / f"vgg16{kind}", vgg16=True)
        elif args.format:
            src = df.WRITERS[kind](work / f"tiny{kind}")
        else:
            # VGG16's 16 layers and names (so the same metadata), channels divided by 16.
            small = [(max(a // 16, 3), b // 16) for a, b in dm.VGG16_CONVS]
            src = args.file or write_legacy(work / "vgg16_small.h5", small, [(1568, 256),
                                            (256, 256), (256, 100)])  # fmt: skip
        if args.format:  # the guarded readers' heavy imports, once in the fork server
            guard._context(("torch", "scipy.io", "onnx"))
        fuzz(src, args.positions, args.seed, args.timeout, work, kind)


if __name__ == "__main__":
    main()
