"""The ``vggnorm`` command: a thin shell over the library.

Exit codes: 0 success, 1 error (bad input, I/O), 2 usage, 3 verification failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__
from .core.errors import Interrupted, VggnormError
from .formats.statsfile import DEFAULT_STATS

LAST_APPLY = Path(".vggnorm") / "last-apply.json"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from e
    if not value >= 0 or value == float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    """``1%`` or ``0.01``: a fraction in (0, 1]."""
    value_text = text.strip()
    scale = 100.0 if value_text.endswith("%") else 1.0
    try:
        value = float(value_text.rstrip("%")) / scale
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.01 or 1%, got {text!r}") from e
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (or (0%, 100%]), got {text!r}")
    return value


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(t) for t in text.split("/"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from e
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"need 0 <= I < N, got {text!r}")
    return i, n


def _default_workers() -> int:
    """Decoding threads: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on every platform
        return max(1, os.cpu_count() or 1)


def _flag_parents() -> dict[str, argparse.ArgumentParser]:
    """Options several commands share, each declared once."""

    def parent() -> argparse.ArgumentParser:
        return argparse.ArgumentParser(add_help=False)

    common = parent()
    common.add_argument(
        "-v", "--verbose", action="store_true", help="show tracebacks and debug logs"
    )
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar, only errors")
    force = parent()
    force.add_argument("--force", action="store_true", help="overwrite an existing output")
    as_json = parent()
    as_json.add_argument("--json", action="store_true", help="print the result as JSON")
    stats = parent()
    stats.add_argument(
        "--stats",
        metavar="PATH",
        default=DEFAULT_STATS,
        help=f"stats file (default {DEFAULT_STATS})",
    )
    model = parent()
    model.add_argument(
        "--model",
        choices=["vgg16", "vgg19"],
        help="vgg16 or vgg19, only needed if the weight file cannot tell",
    )
    ray = _ray_parent()
    batch = _batch_parent()
    return {"common": common, "force": force, "json": as_json, "stats": stats, "model": model,
            "ray": ray, "batch": batch}  # fmt: skip


def _batch_size(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else _positive_int(text)


def _memory(text: str) -> int:
    from .core.memory import parse_memory

    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _batch_parent() -> argparse.ArgumentParser:
    """Decoding threads, the batch and the memory budget that chooses it."""
    from .core.memory import GPU_FRACTION, HOST_FRACTION, MAX_BATCH

    batch = argparse.ArgumentParser(add_help=False)
    batch.add_argument(
        "--workers",
        type=_positive_int,
        default=_default_workers(),
        metavar="N",
        help=f"image decoding threads (default: the cores available, {_default_workers()})",
    )
    batch.add_argument(
        "--batch-size",
        type=_batch_size,
        default="auto",
        metavar="N",
        help=f"images per forward pass, or auto (the default): the most whose estimated peak "
        f"memory fits --max-memory, at most {MAX_BATCH}; stats --resume keeps the saved run's "
        "batch unless given a number (docs/memory.md)",
    )
    batch.add_argument(
        "--max-memory",
        type=_memory,
        metavar="SIZE",
        help=f"memory budget of --batch-size auto, e.g. 8GB or 512MiB (default: "
        f"{GPU_FRACTION * 100:.0f}%% of the GPU's memory where the forward pass runs on a GPU, "
        f"else {HOST_FRACTION * 100:.0f}%% of the memory available to the process; with --ray, "
        "per worker)",
    )
    return batch


def _ray_parent() -> argparse.ArgumentParser:
    """``--ray`` and how many workers it starts."""
    ray = argparse.ArgumentParser(add_help=False)
    ray.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the forward passes (stats; verify: its re-measuring pass) on a Ray "
        "cluster: ADDRESS as ray.init takes it "
        "(auto, ray://host:10001); without ADDRESS a local cluster of this machine "
        "(needs pip install 'vggnorm[ray]')",
    )
    ray.add_argument(
        "--ray-workers",
        type=_positive_int,
        metavar="N",
        help="workers (default: one per GPU of the cluster, else one per group of "
        "--ray-cpus-per-worker CPUs)",
    )
    ray.add_argument(
        "--ray-cpus-per-worker",
        type=_positive_int,
        default=2,
        metavar="K",
        help="CPUs per worker for decoding and, without GPUs, the forward pass (default 2)",
    )
    return ray


def build_parser() -> argparse.ArgumentParser:
    """The ``vggnorm`` argument parser: one sub-parser per command."""
    fmt = lambda prog: argparse.HelpFormatter(prog, max_help_position=34)  # noqa: E731
    parser = argparse.ArgumentParser(
        prog="vggnorm",
        description="Rescale VGG16/VGG19 weights (Keras or PyTorch files) so that every conv "
        "filter's mean activation over an image dataset is 1, without changing what the network "
        "computes.",
        epilog="typical use, in one directory: vggnorm stats --data coco/; "
        "vggnorm apply --in vgg16.h5 --out vgg16_norm.h5; vggnorm verify. "
        "Exit codes: 0 ok, 1 error, 2 usage, 3 verification failed, 130 interrupted.",
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"vggnorm {__version__}")
    f = _flag_parents()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, parents: list[str], help: str, description: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[f["common"], f["json"], *(f[p] for p in parents)],
                           formatter_class=fmt, help=help, description=description)  # fmt: skip
        p.set_defaults(run=_RUNNERS[name])
        return p

    for add in (
        _add_stats,
        _add_apply,
        _add_verify,
        _add_merge,
        _add_report,
        _add_bn,
        _add_export,
        _add_compare,
        _add_scales,
    ):
        add(command)
    return parser


def _add_stats(command: Any) -> None:
    """``stats``: gather per-filter statistics."""
    p = command("stats", ["model", "force", "batch", "ray"],
        "gather per-filter activation statistics over an image dataset",
        "Stream images through the VGG conv layers and record, per filter, the exact float64 sum "
        "and sum of squares of its post-ReLU activations.")  # fmt: skip
    for add in (_stats_data_args, _stats_model_args, _stats_image_args, _stats_run_args,
                _stats_precision_args):
        add(p)

def _stats_data_args(p: argparse.ArgumentParser) -> None:
    """``stats`` options: data."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        metavar="PATH",
        required=True,
        help="COCO root (with annotations/instances_*.json), ImageNet-style class "
        "folders, any image folder (recursive) or a text file listing image paths",
    )
    g.add_argument(
        "--annotations",
        metavar="FILE",
        help="COCO instances_*.json (default: found under PATH/annotations)",
    )
    g.add_argument("--split", metavar="NAME", help="COCO split when several exist, e.g. val2017")
    g.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help="use only the first N images of the deterministic order (default: all)",
    )
    g.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        metavar="I/N",
        help="process shard I of N (disjoint; merge the files later); default 0/1",
    )
    g.add_argument(
        "--strict",
        action="store_true",
        help="fail on the first unusable image instead of skipping it",
    )


def _stats_model_args(p: argparse.ArgumentParser) -> None:
    """``stats`` options: model."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--weights",
        metavar="PATH",
        help="weight file: Keras (.h5, .weights.h5, .keras), PyTorch (.safetensors, .pth, "
        ".pt, .bin), MatConvNet (.mat) or ONNX (.onnx; name its --preprocess); default: Keras's "
        "ImageNet weights, downloaded and cached like "
        "keras.applications",
    )


def _stats_image_args(p: argparse.ArgumentParser) -> None:
    """``stats`` options: how images are decoded and fed."""
    g = p.add_argument_group("images")
    g.add_argument(
        "--size",
        type=_positive_int,
        default=224,
        metavar="N",
        help="square input size in pixels (default 224; at least 32; a multiple of 32 for "
        "the AdaIN layout)",
    )
    g.add_argument(
        "--resize",
        choices=["crop", "stretch"],
        default="crop",
        help="crop: shorter side to N then centre crop (default); stretch: whole image to NxN",
    )
    g.add_argument(
        "--preprocess",
        choices=["caffe", "unit", "torch", "rgb255"],
        help="caffe (keras.applications VGG, Gatys's vgg_conv.pth, MatConvNet): RGB->BGR minus "
        "the ImageNet mean; unit: /255; torch (torchvision, timm): /255 then ImageNet "
        "mean/std; rgb255 (torchvision's IMAGENET1K_FEATURES): RGB minus (123, 117, 104) "
        "(default: the weight file's layout's own, caffe for Keras files; an ONNX file has none)",
    )
    g.add_argument(
        "--padding",
        choices=["zero", "reflect"],
        help="how every conv pads its input: zero (Keras, torchvision, Gatys) or reflect "
        "(AdaIN); default: the weight file's layout's own",
    )
    g.add_argument(
        "--pooling",
        choices=["max", "avg"],
        help="the pooling every pooling layer runs: max (VGG's own) or avg (Gatys et al.'s for "
        "image synthesis; the means after a pooling layer depend on it); recorded in the stats "
        "file and used by every command that reads it (default: the weight file's own)",
    )
    g.add_argument(
        "--draft",
        action="store_true",
        help="decode JPEGs in the DCT domain at 1/2, 1/4 or 1/8 scale (never below "
        "--size) before the resize: faster, but it moves per-filter means (0.5%% median "
        "filter on a random VGG16, docs/benchmarks.md) (default: full decode, the standard "
        "statistics)",
    )


def _stats_run_args(p: argparse.ArgumentParser) -> None:
    """``stats`` options: run."""
    g = p.add_argument_group("run")
    g.add_argument(
        "--out",
        metavar="PATH",
        default=DEFAULT_STATS,
        help=f"stats file to write (default {DEFAULT_STATS})",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --out; a missing file starts one, a complete "
        "one with the same settings is left as it is (safe in job scripts); a file made "
        "with other settings is refused",
    )
    g.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="fp32 (default, exact to float rounding) or bf16 activations (faster on GPUs "
        "and bf16 CPUs; moves per-filter means by ~0.1-0.5%% median, more on near-dead "
        "filters)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="save progress to --out this often (default 300)",
    )


def _stats_precision_args(p: argparse.ArgumentParser) -> None:
    """``stats`` options: how precise the means must be before the run stops."""
    g = p.add_argument_group("precision (docs/precision.md)")
    g.add_argument(
        "--target-error",
        type=_fraction,
        metavar="E",
        help="stop at the first check point where every layer's --target-quantile of live "
        "filters' relative 95%% half-widths is at or under E (1%% or 0.01); --limit stays the "
        "maximum (default: every image of the selection)",
    )
    g.add_argument(
        "--target-quantile",
        type=_fraction,
        default=0.9,
        metavar="Q",
        help="which quantile of live filters the target bounds (0.5 or 50%%: the median "
        "filter; default 0.9)",
    )
    g.add_argument(
        "--min-images",
        type=_positive_int,
        default=128,
        metavar="N",
        help="no stop on a target before N images (default 128)",
    )
    g.add_argument(
        "--check-every",
        type=_positive_int,
        default=128,
        metavar="N",
        help="check points every N items of the selection, where a target may stop the run: "
        "the stop point then depends only on the data and the settings (default 128)",
    )


def _add_apply(command: Any) -> None:
    """``apply``: write the normalized copy."""
    p = command("apply", ["stats", "model", "force"], "write a normalized copy of a weight file",
        "Divide each conv filter by its mean activation, compensate the next layer's inputs, and "
        "write the result in the input's format and layout, with its provenance.")  # fmt: skip
    p.add_argument(
        "--in",
        dest="src",
        metavar="PATH",
        required=True,
        help="weight file to normalize (never modified)",
    )
    p.add_argument(
        "--out",
        dest="dst",
        metavar="PATH",
        required=True,
        help="file to write; same format as --in",
    )


def _add_verify(command: Any) -> None:
    """``verify``: prove the output."""
    p = command("verify", ["batch", "ray"],
        "prove the normalized file computes the same function and has unit means",
        "Compare every conv activation of the normalized and original networks on a few stats "
        "images, then re-measure the normalized means over the stats images. "
        f"Exit code {EXIT_VERIFY} when a check fails.")  # fmt: skip
    p.add_argument(
        "--in",
        dest="normalized",
        metavar="PATH",
        help=f"normalized file (default: what the last apply here wrote, from {LAST_APPLY})",
    )
    p.add_argument("--original", metavar="PATH", help="its source (default: from its provenance)")
    p.add_argument("--stats", metavar="PATH", help="stats file (default: from its provenance)")
    p.add_argument("--data", metavar="PATH", help="dataset location, if it moved since stats")
    p.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help="re-measure means on the first N stats images only (then means are "
        "reported, not judged)",
    )
    p.add_argument(
        "--check-images",
        type=_positive_int,
        default=8,
        metavar="N",
        help="images for the activation-by-activation comparison (default 8)",
    )
    p.add_argument(
        "--plot", metavar="PNG", help="also draw the per-layer table as a figure (needs matplotlib)"
    )
    g = p.add_argument_group("held-out images (docs/precision.md)")
    g.add_argument(
        "--held-out",
        metavar="PATH",
        help="also measure the normalized means on images the stats never saw: a dataset "
        "(COCO, ImageNet tree, folder, list file), or 'stats' for the images of the stats' own "
        "dataset that they did not count; reported per layer with intervals",
    )
    g.add_argument(
        "--held-out-limit",
        type=_positive_int,
        default=256,
        metavar="N",
        help="at most N held-out images, the first of the dataset's order (default 256)",
    )
    g.add_argument(
        "--held-out-tol",
        type=_fraction,
        metavar="E",
        help=f"judge the held-out means: exit {EXIT_VERIFY} when a layer's median |mean - 1| over "
        "live filters is above E (e.g. 5%%); default: reported, not judged",
    )


def _add_merge(command: Any) -> None:
    """``merge``: combine shards."""
    p = command("merge", ["force"],
        "combine stats files of disjoint image sets (e.g. shards) exactly",
        "Add the sums, sums of squares and counts of complete stats runs over disjoint images of "
        "the same model and settings (for example the files of `vggnorm stats --shard I/N` for "
        "every I).")  # fmt: skip
    p.add_argument("inputs", nargs="+", metavar="STATS", help="stats files to merge (two or more)")
    p.add_argument(
        "--out",
        metavar="PATH",
        default=DEFAULT_STATS,
        help=f"merged stats file (default {DEFAULT_STATS})",
    )


def _add_report(command: Any) -> None:
    """``report``: figures and numbers."""
    p = command("report", ["stats", "force"],
        "plot what normalization did: per-layer means, dead filters, loss spread",
        "Write a PNG figure and a JSON summary from a stats file: the per-filter mean activations "
        "of every conv layer before normalization (log scale) and after, dead and near-dead "
        "filters, and with --weights the per-layer style (Gram) and content loss magnitudes on a "
        "pair of images before and after, with how much their spread shrank. Needs matplotlib "
        "(pip install 'vggnorm[plot]').")  # fmt: skip
    p.add_argument(
        "--weights",
        metavar="PATH",
        help="the weights the stats were gathered on: adds the style/content loss panel",
    )
    p.add_argument(
        "--normalized",
        metavar="PATH",
        help="normalized file to use for the 'after' losses (default: rescaled in memory)",
    )
    p.add_argument(
        "--images",
        nargs=2,
        metavar="IMG",
        help="the image pair for the losses (default: the first two stats images)",
    )
    p.add_argument(
        "--out",
        metavar="PATH",
        default="vggnorm-report.png",
        help="figure to write (default vggnorm-report.png); the JSON goes beside it",
    )


def _add_bn(command: Any) -> None:
    """``bn``: the BatchNorm model."""
    p = command("bn", ["stats", "model", "force"],
        "build the VGG with identity-initialised BatchNorm after every conv, for fine-tuning",
        "Insert a BatchNormalization after every ReLU conv, initialised from the stats (moving "
        "mean/variance = the recorded mean/variance, gamma = sqrt(var + eps), beta = mean) so that "
        "in inference mode the network computes exactly what it did. The model takes preprocessed "
        "float32 images (as --preprocess of the stats).")  # fmt: skip
    p.add_argument(
        "--in",
        dest="src",
        metavar="PATH",
        required=True,
        help="weight file the stats were gathered on",
    )
    p.add_argument(
        "--out", dest="dst", metavar="PATH", required=True, help="model to write (.keras)"
    )
    p.add_argument(
        "--size",
        type=_positive_int,
        metavar="N",
        help="input size (default: the head's, else the stats')",
    )
    p.add_argument(
        "--top-bn",
        action="store_true",
        help="also put (identity) BatchNorm after the ReLU Dense layers of the top",
    )


def _add_export(command: Any) -> None:
    """``export``: PyTorch layouts."""
    p = command("export", ["force"],
        "write a VGG weight file in a PyTorch layout (torchvision, timm, Gatys, AdaIN)",
        "Copy the weights of any supported file (Keras, PyTorch, MatConvNet or ONNX, normalized "
        "or not) into the state-dict layout PyTorch code loads: torchvision's vgg16/vgg19 (or its "
        "features alone), timm's, Gatys's vgg_conv.pth (VGG19 convs) or AdaIN's "
        "vgg_normalised.pth (VGG19 convs behind its fixed 1x1 input conv); the _bn layouts take "
        "a VGG with a BatchNorm after every conv. The output is .safetensors or .pth by its "
        "suffix. What input the file expects is printed and stored in its metadata.")  # fmt: skip
    p.add_argument("--in", dest="src", metavar="PATH", required=True, help="weight file to export")
    p.add_argument(
        "--layout",
        choices=["torchvision", "torchvision_bn", "features", "features_bn", "timm", "timm_bn",
                 "gatys", "adain", "matconvnet"],
        required=True,
        help="the layout to write: a PyTorch one, or MatConvNet's imagenet-vgg-verydeep-*.mat",
    )
    p.add_argument(
        "--out",
        dest="dst",
        metavar="PATH",
        required=True,
        help="file to write: .safetensors (no torch needed) or .pth; .mat for matconvnet",
    )
    p.add_argument(
        "--fold-input",
        action="store_true",
        help="torchvision layout from caffe-input weights (Keras's): fold the BGR "
        "0-255 convention into conv1_1 so the file takes torchvision's normalised "
        "RGB (exact except at the zero-padded image border); only with --layout "
        "torchvision",
    )


def _add_compare(command: Any) -> None:
    """``compare``: is one file a rescaling of another?"""
    p = command("compare", [],
        "tell whether one weight file is a per-filter rescaling of another",
        "Recover the per-filter positive scales that turn ORIGINAL into OTHER (any two supported "
        "files of the same architecture, any layouts), report per layer how consistent they are "
        "(~1e-7 for a true rescaling, large for a different network) and, with --stats, how "
        "they compare with the means of a stats file gathered on ORIGINAL. Exit code 0 when OTHER "
        f"is a rescaling of ORIGINAL, {EXIT_VERIFY} when it is not.")  # fmt: skip
    p.add_argument("original", metavar="ORIGINAL", help="the reference weight file")
    p.add_argument("other", metavar="OTHER", help="the file that claims to be a rescaling of it")
    p.add_argument("--stats", metavar="PATH", help="stats file gathered on ORIGINAL")


def _add_scales(command: Any) -> None:
    """``scales``: the factors, for code that cannot change its weights."""
    p = command("scales", ["stats", "force"],
        "write the per-filter factors of a stats file (for code that keeps its weights)",
        "Write each conv filter's factor, 1/mean on the stats images (1 for a dead filter), keyed "
        "by layer name: multiplying a ReLU output of the original network by its layer's factors "
        "gives exactly what the normalized network computes there. The container is chosen by "
        "the suffix of --out: .json, .npz, .safetensors or .pt/.pth.")  # fmt: skip
    p.add_argument("--out", metavar="PATH", required=True,
                   help="file to write: .json, .npz, .safetensors or .pt/.pth")  # fmt: skip
    p.add_argument(
        "--layout",
        choices=["file", "keras", "torchvision", "torchvision_bn", "features", "features_bn",
                 "timm", "timm_bn", "gatys", "adain"],
        default="file",
        help="whose layer names key the factors: file (the names in the weight file the stats "
        "were gathered on; default), keras (block1_conv1), torchvision/timm (features.N), "
        "features (N), gatys (conv1_1), adain; _bn: the indices of the BatchNorm models",
    )  # fmt: skip


@dataclass(frozen=True)
class _Bar:
    """A tqdm bar on a terminal, nothing otherwise."""

    bar: Any

    def __call__(self, p: Any) -> None:
        if self.bar is not None:
            self.bar.total = p.total
            self.bar.n = p.done
            extra = {} if p.precision is None else {"precision": f"±{p.precision:.1%}"}
            self.bar.set_postfix(images=p.images, skipped=p.skipped, **extra, refresh=False)
            self.bar.refresh()

    def note(self, args: argparse.Namespace, msg: str) -> None:
        """A line on stderr (above the bar, when there is one), unless quiet."""
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            _say(args, msg)


@contextlib.contextmanager
def _progress(quiet: bool, desc: str) -> Iterator[_Bar]:
    if quiet or not sys.stderr.isatty():
        yield _Bar(None)
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1)
    try:
        yield _Bar(bar)
    finally:
        bar.close()


def _say(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr)


def _show(args: argparse.Namespace, result: Any, *, stdout: bool = False) -> None:
    """A command's result: its JSON (``--json``) on stdout, else its summary lines (on stdout for
    reports people pipe, on stderr for progress-like messages)."""
    if getattr(args, "json", False):
        print(json.dumps(result.to_dict(), indent=2, default=str))
    elif stdout:
        print("\n".join(result.summary()))
    else:
        for line in result.summary():
            _say(args, line)


def _engine(args: argparse.Namespace) -> Any:
    """The Ray engine when ``--ray`` is given, else None (run here)."""
    if getattr(args, "ray", None) is None:
        return None
    from .runtime.ray_engine import RayEngine

    address = None if args.ray == "local" else args.ray
    return RayEngine(address, workers=args.ray_workers, cpus_per_worker=args.ray_cpus_per_worker,
                     report=lambda line: _say(args, line))  # fmt: skip


def _run_stats(args: argparse.Namespace) -> int:
    from .commands.stats import StatsOptions, collect_stats
    from .core.inputs import Decode
    from .runtime.data import open_dataset

    options = StatsOptions(
        model=args.model, decode=Decode(args.size, args.resize, "bilinear", args.draft),
        preprocess=args.preprocess, padding=args.padding, precision=args.precision,
        batch_size=args.batch_size, max_memory=args.max_memory, limit=args.limit,
        shard=args.shard, workers=args.workers,
        checkpoint_seconds=args.checkpoint_every, resume=args.resume, force=args.force,
        strict=args.strict, pooling=args.pooling, target_error=args.target_error,
        target_quantile=args.target_quantile, min_images=args.min_images,
        check_every=args.check_every,
    )  # fmt: skip
    ds = open_dataset(args.data, annotations=args.annotations, split=args.split)
    _say(args, f"found {ds.describe()}")
    with _progress(args.quiet, "stats") as bar:
        record = collect_stats(args.weights, ds, options, out=Path(args.out), progress=bar,
                               engine=_engine(args),
                               on_plan=lambda plan: bar.note(args, plan.describe()))  # fmt: skip
    if args.json:
        _show(args, record)
    elif not args.quiet:
        lines = record.summary()
        print(lines[0], file=sys.stderr)
        print("\n".join(lines[1:]))
    _say(args, f"statistics in {args.out}")
    return EXIT_OK


def _run_apply(args: argparse.Namespace) -> int:
    from .commands.apply import normalize

    result = normalize(args.src, args.dst, args.stats, model=args.model, force=args.force)
    record = {
        "normalized": str(Path(args.dst).resolve()),
        "original": str(Path(args.src).resolve()),
        "stats": str(Path(args.stats).resolve()),
    }
    with contextlib.suppress(OSError):  # the record is a convenience for `verify`, not the output
        LAST_APPLY.parent.mkdir(exist_ok=True)
        LAST_APPLY.write_text(json.dumps(record, indent=2) + "\n", encoding="utf8")
    if args.json:
        _show(args, result)
    else:
        for line in result.summary():
            _say(args, line)
    return EXIT_OK


def _last_applied() -> str:
    """The file the last ``apply`` in this directory wrote."""
    if not LAST_APPLY.is_file():
        raise VggnormError(f"nothing to verify: no {LAST_APPLY} here; pass --in PATH")
    try:
        return str(json.loads(LAST_APPLY.read_text(encoding="utf8"))["normalized"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VggnormError(f"{LAST_APPLY} is unreadable ({e}); pass --in PATH") from e


def _run_verify(args: argparse.Namespace) -> int:
    from .commands.verify import verify

    normalized = args.normalized or _last_applied()
    if args.plot:  # found now, not after the whole re-measuring pass
        from .commands._figures import need_matplotlib
        from .formats.outputs import check_output

        need_matplotlib("the verify figure")
        check_output(Path(args.plot), force=True)
    with _progress(args.quiet, "verify") as bar:
        report = verify(
            normalized, args.original, args.stats, data=args.data, limit=args.limit,
            check_images=args.check_images, batch_size=args.batch_size,
            max_memory=args.max_memory, workers=args.workers,
            held_out=args.held_out, held_out_limit=args.held_out_limit,
            held_out_tol=args.held_out_tol, progress=bar, engine=_engine(args),
        )  # fmt: skip
    _show(args, report, stdout=True)
    if args.plot:
        from .commands._figures import write_verify_figure

        write_verify_figure(report, args.plot)
        _say(args, f"wrote {args.plot}")
    return EXIT_OK if report.ok else EXIT_VERIFY


def _run_merge(args: argparse.Namespace) -> int:
    from .commands.merge import merge_files
    from .core.statsrecord import precision_lines

    merged = merge_files(args.inputs, args.out, force=args.force)
    shard = "" if merged.meta.shard == (0, 1) else " (the shards do not cover a whole selection)"
    if args.json:
        _show(args, merged)
    _say(args, f"merged {len(args.inputs)} files: {merged.n_images} images{shard}; wrote {args.out}")
    if not args.json and not args.quiet:
        print("\n".join(precision_lines(merged)))
    return EXIT_OK


def _run_report(args: argparse.Namespace) -> int:
    from .commands.report import loss_spread_for, write_report
    from .formats.statsfile import read_stats

    record = read_stats(args.stats)
    style = None
    if args.weights:
        style = loss_spread_for(
            args.weights, record, images=args.images, normalized=args.normalized
        )
    result = write_report(record, Path(args.out), style=style, force=args.force)
    if args.json:
        _show(args, result)
    elif not args.quiet:
        lines = result.summary()
        print("\n".join(lines[:-1]))
        _say(args, lines[-1])
    return EXIT_OK


def _run_bn(args: argparse.Namespace) -> int:
    from .commands.bn import write_bn_model

    result = write_bn_model(
        args.src, args.stats, args.dst, force=args.force, model=args.model, size=args.size,
        include_top_bn=args.top_bn,
    )  # fmt: skip
    _show(args, result)
    return EXIT_OK


def _run_export(args: argparse.Namespace) -> int:
    from .commands.export import export

    result = export(args.src, args.dst, args.layout, fold_input=args.fold_input, force=args.force)
    _show(args, result)
    return EXIT_OK


def _run_compare(args: argparse.Namespace) -> int:
    from .commands.compare import compare_files

    result = compare_files(args.original, args.other, args.stats)
    _show(args, result, stdout=True)
    return EXIT_OK if result.is_rescaling else EXIT_VERIFY


def _run_scales(args: argparse.Namespace) -> int:
    from .commands.scales import write_scales

    result = write_scales(args.stats, args.out, layout=args.layout, force=args.force)
    _show(args, result, stdout=True)
    return EXIT_OK


#: What to pass for each kind of remedy a library error names (``VggnormError.fix``).
_FIXES = {
    "force": "pass --force to overwrite it",
    "resume": "finish it with the same `vggnorm stats` command and --resume",
    "settings": "use the original command line, or start afresh without --resume",
    "stats": "pass --stats PATH",
    "split": "pick one with --split",
    "images": "pass --images A B",
    "ray": "run it on several workers with --ray instead",
    "preprocess": "pass --preprocess caffe, torch, unit or rgb255",
    "memory": "lower --max-memory or --batch-size",
    "export": "`vggnorm export` converts between formats",
    "gather": "run `vggnorm stats` first, or pass --stats PATH",
}


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # handled like Ctrl-C: save progress, then exit


def _fail(args: argparse.Namespace, label: str, message: str, code: int) -> int:
    """The one place an error becomes a line on stderr and an exit code."""
    if args.verbose:
        traceback.print_exc()
    print(f"{label} {message}".rstrip(), file=sys.stderr)
    return code


def _message(e: VggnormError) -> str:
    fixes = [_FIXES[f] for f in (e.fix or "").split("+") if f in _FIXES]  # "a+b": both apply
    return "; ".join([str(e), *fixes])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING,
        format="%(levelname)s %(message)s",
    )
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        code: int = args.run(args)
        return code
    except Interrupted as e:
        return _fail(args, "INTERRUPTED", _message(e), e.exit_code)
    except KeyboardInterrupt:
        return _fail(args, "INTERRUPTED", "", EXIT_INTERRUPTED)
    except VggnormError as e:
        return _fail(args, "ERROR", _message(e), e.exit_code)
    except ImportError as e:  # an optional dependency is missing; the message says which
        return _fail(args, "ERROR", str(e), EXIT_ERROR)
    finally:
        signal.signal(signal.SIGTERM, previous)


def entrypoint() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main(sys.argv[1:]))


_RUNNERS = {
    "stats": _run_stats,
    "apply": _run_apply,
    "verify": _run_verify,
    "merge": _run_merge,
    "report": _run_report,
    "bn": _run_bn,
    "export": _run_export,
    "compare": _run_compare,
    "scales": _run_scales,
}
