"""Run the whole job (stats -> apply -> verify) on a small embedded example, offline.

Weights: Keras's ImageNet VGG16 (notop) if Keras already has it cached in ~/.keras/models;
otherwise a seeded, randomly initialised VGG16 saved with ``model.save_weights`` (this is said
plainly in the output: the normalization is exact either way, but only real weights give the
classic per-layer picture). Images: the CC0 photographs scikit-image ships (astronaut, cat,
coffee, rocket...), copied as JPEGs. Everything is written under ``demo/`` (or the folder given),
and the three verbs run there exactly as a user types them.

    python scripts/demo.py [FOLDER]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png",
    "camera.png", "brick.png", "grass.png", "gravel.png", "moon.png", "page.png", "coins.png",
)  # fmt: skip
IMAGENET_NOTOP = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def _photos(dst: Path) -> int:
    import skimage.data
    from PIL import Image

    src = Path(skimage.data.__file__).parent
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in PHOTOS:
        path = src / name
        if not path.is_file():  # not every scikit-image release ships every sample
            continue
        with Image.open(path) as img:
            # Keep their own modes (greyscale camera/moon/page/coins): vggnorm decodes to RGB.
            img.save(dst / (path.stem + ".jpg"), quality=92)
        n += 1
    return n


def _weights(dst: Path) -> tuple[Path, str]:
    cached = Path(os.path.expanduser("~/.keras/models")) / IMAGENET_NOTOP
    if cached.is_file():
        target = dst / IMAGENET_NOTOP
        shutil.copyfile(cached, target)
        return target, "Keras's cached ImageNet VGG16 weights"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))
    target = dst / "vgg16.weights.h5"
    model.save_weights(target)
    return target, (
        "a seeded, RANDOMLY INITIALISED VGG16 (no ImageNet weights cached in ~/.keras/models, "
        "and this example stays offline)"
    )


def _run(folder: Path, *argv: str) -> None:
    cmd = ["vggnorm", *argv]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    exe = shutil.which("vggnorm", path=str(Path(sys.executable).parent)) or "vggnorm"
    done = subprocess.run([exe, *argv], cwd=folder, check=False)
    if done.returncode:
        sys.exit(done.returncode)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "demo").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    n = _photos(folder / "images")
    weights, what = _weights(folder)
    print(f"demo in {folder}: {n} photographs from scikit-image; weights: {what}")
    suffix = "".join(weights.suffixes[-2:]) if weights.name.endswith(".weights.h5") else ".h5"
    normalized = weights.name.removesuffix(suffix) + "_norm" + suffix
    _run(folder, "stats", "--data", "images", "--weights", weights.name, "--force")
    _run(folder, "apply", "--in", weights.name, "--out", normalized, "--force")
    _run(folder, "verify")
    print(f"\nnormalized weights: {folder / normalized}")


if __name__ == "__main__":
    main()
