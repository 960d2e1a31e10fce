"""How precisely a number of real photographs pins down each filter's mean, and how many images
a target error takes (docs/precision.md quotes what this prints).

Images: the photographs the installed packages ship (scikit-image's samples, matplotlib's
grace_hopper.jpg), each decoded as vggnorm does (crop, 224, bilinear). Weights: Keras's ImageNet
VGG16/VGG19 where they can be downloaded (or are cached), else a seeded random network, said in
the output: the figures of a random network are not those of the trained one.

Per image and filter the script keeps the image's mean over its positions (the sampling unit of
``vggnorm stats``) and reports, for growing numbers of images n, every layer's median and 90th
percentile relative 95% half-width over live filters; then the images 1%, 2% and 5% would take at
the 0.5 and 0.9 quantiles (scaling the largest n as 1/sqrt(n), which the table checks), and the
time they take at this machine's measured rate, against 80,000 images. Coverage: the photos are
split in two halves that share none, many times at random; how often the 95% interval of one
half holds the other half's mean (for two independent halves of equal size and correct intervals
that is about 83%, not 95%: the difference of two means has twice the variance of one).

    python scripts/precision_study.py [--model vgg16|vgg19] [--size 224] [--views 1]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _photos() -> list[Path]:
    import matplotlib
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    paths = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg")
                   and p.stat().st_size > 20_000)  # fmt: skip
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return paths + ([hopper] if hopper.is_file() else [])


def _weights(model: str) -> tuple[dict[str, np.ndarray], str]:
    import keras

    from vggnorm.runtime.network import fetch_imagenet_weights

    try:
        path = fetch_imagenet_weights(model, include_top=False)
        from vggnorm.formats.registry import read_weights

        return dict(read_weights(path).arrays), f"Keras's ImageNet {model}"
    except Exception as e:  # offline: no download
        keras.utils.set_random_seed(0)
        build = keras.applications.VGG16 if model == "vgg16" else keras.applications.VGG19
        net = build(weights=None, include_top=False, input_shape=(224, 224, 3))
        arrays = {}
        for layer in net.layers:
            w = layer.get_weights()
            if len(w) == 2:
                arrays[f"{layer.name}/kernel"], arrays[f"{layer.name}/bias"] = w
        return arrays, f"a seeded RANDOM {model} (ImageNet weights unavailable: {type(e).__name__})"


def _image_means(model: str, size: int, views: int) -> tuple[dict[str, np.ndarray], str, float, list[int]]:
    """Per layer, (images, filters) per-image means; the weights used; images/s; photo of each."""
    from vggnorm.core.archs import ARCHS
    from vggnorm.core.inputs import Decode
    from vggnorm.runtime.data import load_image
    from vggnorm.runtime.network import FeatureNet

    arrays, what = _weights(model)
    arch = ARCHS[model].without_head()
    net = FeatureNet(arch, arrays, size, "caffe", batch_size=16)
    rng = np.random.default_rng(0)
    images, owner = [], []
    for k, path in enumerate(_photos()):
        base = load_image(path, Decode(size))
        images.append(base)
        owner.append(k)
        for _ in range(views - 1):  # extra views: random crops and flips of the same photo
            img = base[:, ::-1] if rng.random() < 0.5 else base
            y, x = (int(v) for v in rng.integers(0, size // 4, 2))
            crop = np.asarray(img[y:, x:])
            from PIL import Image

            images.append(np.asarray(Image.fromarray(crop).resize((size, size))))
            owner.append(k)
    per: dict[str, list[np.ndarray]] = {c.name: [] for c in arch.convs}
    t0 = time.perf_counter()
    for start in range(0, len(images), 16):  # full batches of 16 (the last one padded)
        batch = np.stack(images[start : start + 16])
        n = batch.shape[0]
        batch = np.concatenate([batch, np.zeros((16 - n, *batch.shape[1:]), np.uint8)])
        for name, means in net.image_means(batch).items():
            per[name].append(means[:n])
    rate = len(images) / (time.perf_counter() - t0)
    return {k: np.concatenate(v) for k, v in per.items()}, what, rate, owner


def _half_widths(means: np.ndarray) -> np.ndarray:
    """Relative 95% half-widths of the live filters' means over these images."""
    from vggnorm.core.precision import filter_precision
    from vggnorm.core.stats import ImageMoments, LayerStats

    im = ImageMoments.of(means)
    fp = filter_precision(LayerStats("c", im.sum, im.sumsq, im.images, im))
    assert fp is not None
    return fp.half_width[fp.live]


def _table(per: dict[str, np.ndarray]) -> dict[int, tuple[float, float]]:
    n_max = next(iter(per.values())).shape[0]
    ns = sorted({n for n in (5, 10, 20, 40, 80, 160, n_max) if n <= n_max})
    out = {}
    print(f"\n{'images':>7}  worst layer's median / 90th percentile relative 95% half-width")
    for n in ns:
        med = max(float(np.quantile(_half_widths(v[:n]), 0.5)) for v in per.values())
        p90 = max(float(np.quantile(_half_widths(v[:n]), 0.9)) for v in per.values())
        out[n] = (med, p90)
        print(f"{n:>7}  ±{med:.1%}  ±{p90:.1%}   (x sqrt(n): {med * math.sqrt(n):.3f}, "
              f"{p90 * math.sqrt(n):.3f})")  # fmt: skip
    return out


def _per_layer(per: dict[str, np.ndarray]) -> None:
    print(f"\n{'layer':<16} median  p90     p99     (all {next(iter(per.values())).shape[0]} images)")
    for name, v in per.items():
        h = _half_widths(v)
        print(f"{name:<16} ±{np.quantile(h, 0.5):.1%}  ±{np.quantile(h, 0.9):.1%}  "
              f"±{np.quantile(h, 0.99):.1%}")  # fmt: skip


def _needed(table: dict[int, tuple[float, float]], rate: float) -> None:
    n = max(table)
    print(f"\nimages needed (1/sqrt(n) from n = {n}) and time at {rate:.2f} img/s here; "
          f"80,000 images take {80_000 / rate / 3600:.1f} h")
    for q, figure in (("median", table[n][0]), ("90th percentile", table[n][1])):
        for target in (0.05, 0.02, 0.01):
            need = math.ceil(n * (figure / target) ** 2)
            print(f"  ±{target:.0%} at the {q}: {need:>9,} images, {need / rate / 3600:8.2f} h")


def _coverage(per: dict[str, np.ndarray], owner: list[int], splits: int = 200) -> None:
    from vggnorm.core.precision import filter_precision
    from vggnorm.core.stats import ImageMoments, LayerStats

    photos = sorted(set(owner))
    rng = np.random.default_rng(1)
    held, total = 0, 0
    for _ in range(splits):
        half = set(rng.permutation(photos)[: len(photos) // 2].tolist())
        a = np.array([o in half for o in owner])
        for v in per.values():
            im_a, im_b = ImageMoments.of(v[a]), ImageMoments.of(v[~a])
            fp = filter_precision(LayerStats("c", im_a.sum, im_a.sumsq, im_a.images, im_a))
            assert fp is not None
            lo, hi = fp.interval
            mean_b = im_b.sum / im_b.images
            held += int(np.sum(fp.live & (lo <= mean_b) & (mean_b <= hi)))
            total += int(np.sum(fp.live))
    print(f"\ncoverage over {splits} random splits of the {len(photos)} photos into halves: the "
          f"95% interval of one half holds the other's mean for {held / total:.1%} of live "
          "filters (about 83% expected for correct intervals of two independent equal halves)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["vgg16", "vgg19"], default="vgg16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--views", type=int, default=1,
                        help="images per photograph (crops and flips): more images, correlated")
    args = parser.parse_args()
    per, what, rate, owner = _image_means(args.model, args.size, args.views)
    n = next(iter(per.values())).shape[0]
    print(f"{args.model} at {args.size}: {what}; {n} images from {len(set(owner))} photographs")
    table = _table(per)
    _per_layer(per)
    _needed(table, rate)
    _coverage(per, owner)


if __name__ == "__main__":
    main()
