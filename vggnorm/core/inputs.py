"""How images become network input: decoding settings, preprocessing schemes, and the exact fold
of one input convention into the first conv. Pure numpy.

These settings are part of the statistics' identity: means gathered with one scheme are wrong for
another, so a stats file records them and every later step reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

Resize = Literal["crop", "stretch"]
Preprocess = Literal["caffe", "unit", "torch", "rgb255"]
Precision = Literal["fp32", "bf16"]

#: keras.applications VGG ("caffe"): BGR minus this mean, no scaling.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
#: torchvision: RGB / 255, then this mean and standard deviation.
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
#: torchvision's VGG16 ``IMAGENET1K_FEATURES`` weights ("rgb255"): RGB in 0-255 minus
#: 255 * (0.48235, 0.45882, 0.40784), torchvision's mean with a standard deviation of 1/255.
RGB255_MEAN = tuple(255.0 * m for m in (0.48235, 0.45882, 0.40784))


@dataclass(frozen=True)
class Decode:
    """How an image file becomes an N x N uint8 RGB array. Part of the statistics' identity.

    Attributes:
        size: the square side N in pixels.
        resize: ``crop`` (the centred square of side min(w, h), resized) or ``stretch`` (the
            whole image resized).
        interpolation: ``bilinear`` (antialiased when shrinking) or ``bicubic``.
        draft: JPEG DCT-domain downscale (1/2, 1/4 or 1/8, never below N) before the resize:
            faster decoding, but per-filter means move (0.5% for the median filter of a random
            VGG16, docs/benchmarks.md), so it is opt-in.
    """

    size: int = 224
    resize: Resize = "crop"
    interpolation: str = "bilinear"
    draft: bool = False


def preprocess_images(images: npt.ArrayLike, scheme: str = "caffe") -> npt.NDArray[np.float32]:
    """Preprocess uint8 RGB images ``(..., 3)`` exactly as the network's first layer does.

    ``caffe``: RGB -> BGR minus the ImageNet mean; ``unit``: RGB / 255; ``torch``: RGB / 255, then
    ImageNet mean/std; ``rgb255``: RGB minus :data:`RGB255_MEAN`. float32 throughout, in the same
    order of operations as the network.

    Example:
        >>> preprocess_images(np.zeros((1, 3), np.uint8), "unit").tolist()
        [[0.0, 0.0, 0.0]]
    """
    x = np.asarray(images).astype(np.float32)
    if scheme == "caffe":
        return x[..., ::-1] - np.asarray(CAFFE_MEAN_BGR, dtype=np.float32)
    if scheme == "unit":
        return x / np.float32(255.0)
    if scheme == "torch":
        mean = np.asarray(TORCH_MEAN, dtype=np.float32)
        std = np.asarray(TORCH_STD, dtype=np.float32)
        return (x / np.float32(255.0) - mean) / std
    if scheme == "rgb255":
        return x - np.asarray(RGB255_MEAN, dtype=np.float32)
    raise ValueError(f"unknown preprocessing {scheme!r}; expected caffe, unit, torch or rgb255")


def fold_caffe_into_torch_input(
    kernel: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``conv1_1`` of a caffe-input VGG rewritten for torchvision input.

    caffe input is ``x[c'] = 255 * rgb[c] - mean[c']`` with ``c'`` the BGR index of RGB channel
    ``c``; torchvision input is ``t[c] = (rgb[c] - mu[c]) / sigma[c]``, so
    ``x[c'] = 255 sigma[c] t[c] + 255 mu[c] - mean[c']``. The new kernel reads RGB channel ``c`` with
    the old kernel's channel ``c'`` times ``255 sigma[c]``; the constant goes into the bias (summed
    over the kernel window, which is exact wherever the window lies inside the image).

    Args:
        kernel: ``(kh, kw, 3, C)`` HWIO, reading BGR caffe input.
        bias: ``(C,)``.

    Returns:
        The new kernel (reading torchvision RGB input) and bias, in the input dtypes.

    Example:
        >>> k, b = fold_caffe_into_torch_input(np.ones((1, 1, 3, 1)), np.zeros(1))
        >>> [round(float(v), 3) for v in k.ravel()]
        [58.395, 57.12, 57.375]
    """
    k = kernel.astype(np.float64)[:, :, ::-1, :]  # now indexed by RGB channel c
    offset = 255.0 * np.array(TORCH_MEAN) - np.array(CAFFE_MEAN_BGR)[::-1]  # per RGB channel c
    new_k = k * (255.0 * np.array(TORCH_STD))[None, None, :, None]
    new_b = bias.astype(np.float64) + np.einsum("hwco,c->o", k, offset)
    return new_k.astype(kernel.dtype), new_b.astype(bias.dtype)
