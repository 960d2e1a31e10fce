"""Run the whole job (stats -> apply -> verify) on a small embedded example.

Weights: Keras's ImageNet VGG16 (notop), fetched the way ``keras.applications`` fetches it
(``keras.utils.get_file`` with the URL and md5 of ``vggnorm.core.archs.IMAGENET_WEIGHTS``, cached
in ``~/.keras/models``). Only when that fails (no network, say) does the example fall back to a
seeded, randomly initialised VGG16 saved with ``model.save_weights``; the output says which
weights it used and why. The normalization is exact either way, but only the real weights give
the classic per-layer picture. An offline machine is found within seconds: the host is probed
with a short deadline (a HEAD request) before any download starts.

Images: the CC0 photographs scikit-image ships (astronaut, cat, coffee, rocket...), copied as
JPEGs. Everything is written under ``demo/`` (or the folder given), and the three commands run
there exactly as a user types them.

    python scripts/demo.py [FOLDER]
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png",
    "camera.png", "brick.png", "grass.png", "gravel.png", "moon.png", "page.png", "coins.png",
)  # fmt: skip
#: Seconds to resolve and reach the download host; beyond that the machine counts as offline.
PROBE_TIMEOUT_S = 5.0
#: Seconds any single network read may stall once the download runs (not the whole download).
READ_TIMEOUT_S = 30.0


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


def _keras() -> Any:
    """Keras, imported the way vggnorm imports it (TensorFlow's start-up log lines held back)."""
    try:
        from vggnorm.runtime.network import keras_module
    except ImportError:
        import keras

        return keras
    return keras_module()


def _keras_cache(name: str) -> Path:
    """Where ``keras.utils.get_file(..., cache_subdir="models")`` keeps ``name``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models" / name


def _reachable(url: str) -> str | None:
    """None when ``url`` answers a HEAD request within PROBE_TIMEOUT_S, else why not.

    A whole HTTP request, not just a connection: a proxy or firewall may accept connections it
    will never serve. Runs in a daemon thread so that a stalled name lookup (which socket
    timeouts do not bound) cannot hold the example up either."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as answer:
                ok = answer.status == 200
            outcome.append(None if ok else f"{url} answered HTTP {answer.status}")
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            outcome.append(f"cannot reach {url}: {type(e).__name__}: {e}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S * 2)
    return outcome[0] if outcome else f"no answer from {url} within {PROBE_TIMEOUT_S * 2:.0f} s"


def _imagenet_weights(dst: Path) -> tuple[Path | None, str]:
    """Keras's ImageNet VGG16 notop file copied into ``dst``, or None and why it is not there."""
    from vggnorm.core.archs import IMAGENET_WEIGHTS

    url, md5 = IMAGENET_WEIGHTS[("vgg16", False)]
    name = url.rsplit("/", 1)[-1]
    was_cached = _keras_cache(name).is_file()
    if not was_cached:
        why_not = _reachable(url)
        if why_not is not None:
            return None, why_not
    keras = _keras()

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(READ_TIMEOUT_S)
    try:
        path = Path(keras.utils.get_file(name, url, cache_subdir="models", file_hash=md5))
    except Exception as e:  # network and hash errors come in many types; all mean "fall back"
        return None, f"the download failed: {type(e).__name__}: {e}"
    finally:
        socket.setdefaulttimeout(previous)
    target = dst / name
    shutil.copyfile(path, target)
    how = "from Keras's cache" if was_cached else "downloaded"
    return target, f"Keras's ImageNet VGG16 weights (notop, {how}: {path})"


def _random_weights(dst: Path) -> Path:
    keras = _keras()

    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(224, 224, 3))
    target = dst / "vgg16.weights.h5"
    model.save_weights(target)
    return target


def _weights(dst: Path) -> tuple[Path, str]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    target, what = _imagenet_weights(dst)
    if target is not None:
        return target, what
    return _random_weights(dst), (
        "a seeded, RANDOMLY INITIALISED VGG16, because Keras's ImageNet VGG16 weights are not "
        f"available here ({what}); the normalization is just as exact, the means are not "
        "those of the real network"
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
    print(f"demo in {folder}: {n} photographs from scikit-image; weights: {what}", flush=True)
    suffix = "".join(weights.suffixes[-2:]) if weights.name.endswith(".weights.h5") else ".h5"
    normalized = weights.name.removesuffix(suffix) + "_norm" + suffix
    _run(folder, "stats", "--data", "images", "--weights", weights.name, "--force")
    _run(folder, "apply", "--in", weights.name, "--out", normalized, "--force")
    _run(folder, "verify")
    print(f"\nnormalized weights: {folder / normalized}")
    print(f"weights used: {what}")


if __name__ == "__main__":
    main()
