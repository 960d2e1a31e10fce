"""``vggnorm export``: write any supported VGG file in a PyTorch layout (torchvision, Gatys's
``vgg_conv.pth``, AdaIN's ``vgg_normalised.pth``), as ``.safetensors`` or ``.pth`` by suffix.

The weights are copied exactly (OIHW <-> HWIO and the flatten order of the first Dense are
permutations). What can change is the input convention the file's users assume:

* Keras's ImageNet VGG (and Gatys's and AdaIN's files) expect caffe input: BGR in 0-255 minus the
  ImageNet mean. ``gatys`` keeps exactly that. ``adain`` puts it in the file: its first 1x1 conv
  maps RGB in [0, 1] to caffe input, so AdaIN's code feeds it what it expects; but AdaIN pads by
  reflection where Keras pads with zeros, so the function differs at the borders of every map.
* ``torchvision`` users feed RGB / 255 normalised with the ImageNet mean and std. By default the
  file keeps the caffe convention and says so (metadata and console). With ``fold_input`` the
  channel order and scaling are folded into ``conv1_1``: exact away from the borders; at the
  zero-padded border of the image, zero in torch input space is not zero in caffe space, so
  border outputs of ``conv1_1`` differ (``scripts/export_border.py`` measures by how much).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import check_output, output_lock
from .errors import ArchitectureError, WeightFileError
from .model import CAFFE_MEAN_BGR, TORCH_MEAN, TORCH_STD
from .pipeline import load, now, stock_named
from .torch_layouts import LAYOUTS as TORCH_LAYOUTS
from .weights_io import sha256_file

LAYOUTS = tuple(TORCH_LAYOUTS)
_CAFFE_MEAN_BGR = np.array(CAFFE_MEAN_BGR, np.float64)
_TORCH_MEAN = np.array(TORCH_MEAN, np.float64)
_TORCH_STD = np.array(TORCH_STD, np.float64)


@dataclass(frozen=True)
class ExportResult:
    out: Path
    layout: str
    input_convention: str
    notes: tuple[str, ...]


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
    offset = 255.0 * _TORCH_MEAN - _CAFFE_MEAN_BGR[::-1]  # per RGB channel c
    new_k = k * (255.0 * _TORCH_STD)[None, None, :, None]
    new_b = bias.astype(np.float64) + np.einsum("hwco,c->o", k, offset)
    return new_k.astype(kernel.dtype), new_b.astype(bias.dtype)


def export(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    layout: str,
    *,
    fold_input: bool = False,
    force: bool = False,
) -> ExportResult:
    """Write ``src`` (any supported file, normalized or not) in a PyTorch ``layout``.

    Args:
        src: a Keras or PyTorch VGG16/VGG19 weight file.
        dst: ``.safetensors`` or ``.pth``/``.pt``.
        layout: ``torchvision``, ``gatys`` (convs only) or ``adain`` (VGG19 convs only).
        fold_input: for ``torchvision``, fold the caffe input convention into ``conv1_1``.
        force: overwrite ``dst``.

    Returns:
        What was written and the input convention its users must follow.

    Raises:
        ArchitectureError: a layout that cannot hold this network (AdaIN and Gatys are VGG19).
        WeightFileError: bad input or output.
    """
    from .torch_io import PROVENANCE_KEY, write_torch

    if layout not in LAYOUTS:
        raise WeightFileError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    out = Path(dst)
    with output_lock(out):
        check_output(out, force=force, inputs=[Path(src)], error=WeightFileError)
        loaded = load(src)
        arch = loaded.bound.arch
        if arch.name not in ("vgg16", "vgg19") or not loaded.bound.source.startswith(arch.name):
            raise ArchitectureError(
                f"{src}: only stock VGG16/VGG19 files export to PyTorch layouts"
            )
        if layout in ("gatys", "adain") and arch.name != "vgg19":
            raise ArchitectureError(f"the {layout} layout holds a VGG19; {src} is a {arch.name}")
        arrays = stock_named(loaded)
        source_input = loaded.weights.file.preprocess or "caffe"
        if fold_input and not (layout == "torchvision" and source_input == "caffe"):
            raise WeightFileError(
                "--fold-input folds caffe input into conv1_1 for the torchvision layout; "
                f"here the layout is {layout} and {src} expects {source_input} input"
            )
        head = arch.head
        if layout == "torchvision" and head is not None and head.dense:
            rows = arrays["fc1/kernel"].shape[0] if "fc1/kernel" in arrays else 0
            if len(head.dense) != 3 or head.reduce != "flatten" or rows != 512 * 7 * 7:
                raise ArchitectureError(
                    f"{src}: its head is not torchvision's classifier (three Linear layers "
                    "reading the 7x7x512 map of a 224x224 input); export a notop file"
                )
        notes: list[str] = []
        if layout != "torchvision":
            arrays = {k: v for k, v in arrays.items() if not k.startswith(("fc", "predictions"))}
        if source_input != "caffe" and layout in ("gatys", "adain"):
            raise WeightFileError(
                f"{src} expects {source_input} input; the {layout} layout's users feed caffe input"
            )
        convention = source_input
        if layout == "adain":
            notes.append(
                "AdaIN pads by reflection where the source pads with zeros: same weights, "
                "different function at the borders of every feature map"
            )
        if layout == "torchvision" and source_input == "caffe":
            if fold_input:
                k, b = fold_caffe_into_torch_input(
                    arrays["block1_conv1/kernel"], arrays["block1_conv1/bias"]
                )
                arrays = {**arrays, "block1_conv1/kernel": k, "block1_conv1/bias": b}
                convention = "torch"
                notes.append(
                    "caffe input folded into conv1_1: exact away from the image border; at "
                    "zero-padded border pixels conv1_1 differs (zero torch input is not zero "
                    "caffe input)"
                )
            else:
                notes.append(
                    "the weights expect caffe input (BGR 0-255 minus the ImageNet mean), not "
                    "torchvision's normalisation; pass --fold-input to fold it into conv1_1"
                )
        metadata = {
            PROVENANCE_KEY: json.dumps(
                {
                    "tool": "vggnorm", "tool_version": __version__, "created": now(),
                    "operation": f"export to the {layout} layout",
                    "source": {"path": str(Path(src).resolve()), "sha256": sha256_file(src),
                               "format": loaded.weights.file.format},
                    "normalized_by": loaded.weights.file.provenance,
                    "input": convention, "notes": notes,
                },
                sort_keys=True,
            )
        }  # fmt: skip
        write_torch(out, layout, arrays, metadata=metadata, arch=arch.name)
    return ExportResult(out, layout, convention, tuple(notes))
