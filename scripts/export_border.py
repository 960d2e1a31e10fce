"""Measure where ``vggnorm export`` cannot be exact: the image border (issue #12).

Two exports of a caffe-input Keras VGG are compared with the Keras model, per conv layer (after
its ReLU), on the same photo-like 224x224 images:

* ``--layout torchvision --fold-input`` (VGG16), fed torchvision input ``(RGB/255 - mean)/std``:
  folding the caffe convention into ``conv1_1`` is exact except where ``conv1_1``'s window reads
  zero padding (zero torch input is not zero caffe input).
* ``--layout adain`` (VGG19), fed RGB/255: AdaIN pads every conv by reflection, Keras by zeros.

The Keras model gets caffe input (BGR - caffe mean). Columns, each relative to the layer's largest
Keras activation ``max|a|``: ``all`` = max |diff| over all positions; ``interior`` = the same outside
the band that the border of ``conv1_1`` reaches at this layer (one pixel at conv1_1, one more per
3x3 conv, halved (rounded up) by each 2x2 pooling); ``band`` = fraction of positions in that band;
``affected`` = fraction of positions (image, y, x) where some channel differs by more than
``FUNCTION_TOL`` (1e-4) of ``max|a|``, the bound ``vggnorm verify`` holds a function to.

Weights: Keras's ImageNet ``*_notop.h5`` from ``~/.keras/models`` when cached, else a seeded
He-normal random VGG (``fixtures/keras_files.py`` ``tiny_vgg``); the output says which.

    python scripts/export_border.py [--images 4] [--size 224]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixtures package

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
CACHED = Path.home() / ".keras" / "models" / "{}_weights_tf_dim_ordering_tf_kernels_notop.h5"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def keras_vgg(arch: str, size: int, tmp: Path) -> tuple[Any, Path, str]:
    """The Keras model, its weight file (downloaded layout) and where the weights came from."""
    import keras

    build = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}[arch]
    cached = Path(str(CACHED).format(arch))
    if cached.is_file():
        model = build(weights=str(cached), include_top=False, input_shape=(size, size, 3))
        return model, cached, f"Keras ImageNet weights ({cached})"
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    model = tiny_vgg(include_top=False, arch=arch, size=size, seed=0)
    path = save_downloaded_layout(model, tmp / f"{arch}.h5")
    return model, path, f"seeded random {arch.upper()} (He-normal, seed 0; no cached {cached.name})"


def keras_acts(model: Any, rgb: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Each conv's ReLU output (N, H, W, C) for caffe input."""
    import keras

    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    x = rgb[..., ::-1].astype(np.float32) - CAFFE_MEAN_BGR
    outs = keras.Model(model.inputs, [c.output for c in convs]).predict_on_batch(x)
    return [c.name for c in convs], [np.asarray(o) for o in outs]


def bands(arch: str, size: int) -> list[int]:
    """Per conv, the width of the band conv1_1's border outputs reach, in that layer's pixels."""
    from fixtures.torch_vgg import CFGS

    out, band = [], 0
    for v in CFGS[arch]:
        if v == "M":
            band = math.ceil(band / 2)
        else:
            band += 1
            out.append(band)
    return out


def table(names: list[str], ref: list[np.ndarray], got: list[np.ndarray], arch: str) -> None:
    from vggnorm.core.verdicts import FUNCTION_TOL

    print(f"{'layer':<14}{'map':>6}{'band':>6}{'all':>11}{'interior':>11}{'band %':>9}"
          f"{'affected %':>12}")  # fmt: skip
    for name, a, b, w in zip(names, ref, got, bands(arch, ref[0].shape[1]), strict=True):
        scale = float(np.max(np.abs(a)))
        diff = np.abs(b.astype(np.float64) - a)
        h = a.shape[1]
        inner = diff[:, w : h - w, w : h - w]
        interior = f"{float(inner.max()) / scale:.2e}" if 2 * w < h else "none"
        band_frac = 1.0 - (max(h - 2 * w, 0) / h) ** 2
        affected = float(np.mean(diff.max(axis=3) > FUNCTION_TOL * scale))
        print(f"{name:<14}{h:>6}{w:>6}{float(diff.max()) / scale:>11.2e}{interior:>11}"
              f"{100 * band_frac:>8.1f}%{100 * affected:>11.2f}%")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    from fixtures.photos import write_photos
    from fixtures.torch_vgg import TorchvisionVGG, adain_relu_outputs, adain_vgg
    from vggnorm.commands.export import export
    from vggnorm.core.inputs import Decode
    from vggnorm.runtime.data import load_image

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        names = [f"img{i}.png" for i in range(args.images)]
        write_photos(tmp / "images", names, seed=0, max_side=400)
        rgb = np.stack([load_image(tmp / "images" / n, Decode(args.size)) for n in names])
        print(f"{len(rgb)} photo-like images (fixtures/photos.py, seed 0), {args.size}x{args.size}")

        def nchw(x: np.ndarray) -> Any:
            return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

        def nhwc(outs: list[Any]) -> list[np.ndarray]:
            return [o.numpy().transpose(0, 2, 3, 1) for o in outs]

        # torchvision, caffe input folded into conv1_1
        model, src, origin = keras_vgg("vgg16", args.size, tmp)
        names16, ref = keras_acts(model, rgb)
        out = tmp / "vgg16_tv.safetensors"
        export(src, out, "torchvision", fold_input=True)
        tv = TorchvisionVGG("vgg16")
        state = load_file(str(out))
        tv.features.load_state_dict({k[len("features.") :]: v for k, v in state.items()})
        x = (rgb.astype(np.float32) / 255.0 - TORCH_MEAN) / TORCH_STD
        with torch.no_grad():
            got = nhwc(tv.eval().relu_outputs(nchw(x)))
        print(f"\n== torchvision --fold-input, VGG16: {origin}")
        table(names16, ref, got, "vgg16")

        # AdaIN: reflection padding
        model, src, origin = keras_vgg("vgg19", args.size, tmp)
        names19, ref = keras_acts(model, rgb)
        out = tmp / "vgg19_adain.safetensors"
        export(src, out, "adain")
        adain = adain_vgg("vgg19")
        adain.load_state_dict(load_file(str(out)))
        with torch.no_grad():
            got = nhwc(adain_relu_outputs(adain.eval(), nchw(rgb.astype(np.float32) / 255.0)))
        print(f"\n== adain (reflection padding), VGG19: {origin}")
        table(names19, ref, got, "vgg19")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
