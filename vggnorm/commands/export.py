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
from typing import Any

import numpy as np

from ..core.errors import ArchitectureError, WeightFileError
from ..core.inputs import fold_caffe_into_torch_input
from ..core.topology import Loaded, stock_named
from ..core.torch_layouts import LAYOUTS as TORCH_LAYOUTS
from ..formats.outputs import check_output, output_lock
from ..formats.registry import load
from ..formats.torch_files import PROVENANCE_KEY, write_torch
from ._common import file_record, provenance

LAYOUTS = tuple(TORCH_LAYOUTS)


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote and the input convention its users must follow."""

    out: Path
    layout: str
    input_convention: str
    notes: tuple[str, ...]

    def summary(self) -> list[str]:
        return [
            f"input this file expects: {self.input_convention}",
            *(f"note: {note}" for note in self.notes),
            f"wrote {self.out} ({self.layout} layout)",
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "layout": self.layout, "input": self.input_convention,
                "notes": list(self.notes)}  # fmt: skip


def export(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    layout: str,
    *,
    fold_input: bool = False,
    force: bool = False,
) -> ExportResult:
    """Write ``src`` (any supported file of a stock VGG16/VGG19, normalized or not, weights-only
    or a whole model) in a PyTorch ``layout``.

    Args:
        src: a Keras or PyTorch VGG16/VGG19 weight file.
        dst: ``.safetensors`` or ``.pth``/``.pt``.
        layout: ``torchvision``, ``gatys`` (convs only) or ``adain`` (VGG19 convs only).
        fold_input: for ``torchvision``, fold the caffe input convention into ``conv1_1``.
        force: overwrite ``dst``.

    Returns:
        What was written and the input convention its users must follow.

    Raises:
        ArchitectureError: not a stock VGG, or a layout that cannot hold this network (AdaIN and
            Gatys are VGG19).
        WeightFileError: bad input or output.

    Example:
        >>> export("vgg19_norm.h5", "vgg_conv.pth", "gatys")  # doctest: +SKIP
    """
    if layout not in LAYOUTS:
        raise WeightFileError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    out = Path(dst)
    with output_lock(out):
        check_output(out, force=force, inputs=[Path(src)], error=WeightFileError)
        loaded = load(src)
        arrays = _exportable(loaded, layout, fold_input)
        arrays, convention, notes = _input_convention(loaded, layout, arrays, fold_input)
        normalized_by = loaded.weights.file.provenance
        pooling = ((normalized_by or {}).get("stats") or {}).get("pooling")
        if pooling == "avg":
            notes.append("normalized under average pooling: its means are 1 when every pooling "
                         "layer averages (nn.AvgPool2d), as Gatys et al. synthesise images")  # fmt: skip
        prov = provenance(
            f"export to the {layout} layout",
            source=file_record(src, loaded.weights.file.format),
            normalized_by=normalized_by, input=convention, notes=notes,
            pooling=pooling,  # the pooling its means are 1 under
        )  # fmt: skip
        metadata = {PROVENANCE_KEY: json.dumps(prov, sort_keys=True)}
        write_torch(out, layout, arrays, metadata=metadata, arch=loaded.bound.stock)
    return ExportResult(out, layout, convention, tuple(notes))


def _exportable(loaded: Loaded, layout: str, fold_input: bool) -> dict[str, np.ndarray]:
    """The stock-named arrays ``layout`` can hold; refuses what it cannot."""
    src, stock = loaded.path, loaded.bound.stock
    if stock is None:
        raise ArchitectureError(f"{src}: only stock VGG16/VGG19 files export to PyTorch layouts")
    if layout in ("gatys", "adain") and stock != "vgg19":
        raise ArchitectureError(f"the {layout} layout holds a VGG19; {src} is a {stock}")
    arrays = stock_named(loaded)
    source_input = loaded.preprocess
    if fold_input and not (layout == "torchvision" and source_input == "caffe"):
        raise WeightFileError(
            "folding the input convention turns caffe input into torchvision input, for the "
            f"torchvision layout only; here the layout is {layout} and {src} expects "
            f"{source_input} input"
        )
    head = loaded.bound.arch.head
    if layout == "torchvision" and head is not None and head.dense:
        rows = arrays["fc1/kernel"].shape[0] if "fc1/kernel" in arrays else 0
        if len(head.dense) != 3 or head.reduce != "flatten" or rows != 512 * 7 * 7:
            raise ArchitectureError(
                f"{src}: its head is not torchvision's classifier (three Linear layers "
                "reading the 7x7x512 map of a 224x224 input); export a notop file"
            )
    if layout != "torchvision":
        arrays = {k: v for k, v in arrays.items() if not k.startswith(("fc", "predictions"))}
    if source_input != "caffe" and layout in ("gatys", "adain"):
        raise WeightFileError(
            f"{src} expects {source_input} input; the {layout} layout's users feed caffe input"
        )
    return arrays


def _input_convention(
    loaded: Loaded, layout: str, arrays: dict[str, np.ndarray], fold_input: bool
) -> tuple[dict[str, np.ndarray], str, list[str]]:
    """The arrays (with the input folded into conv1_1 when asked), the input convention the
    file's users must follow, and the notes that explain it."""
    convention = loaded.preprocess
    notes: list[str] = []
    if layout == "adain":
        notes.append(
            "AdaIN pads by reflection where the source pads with zeros: same weights, "
            "different function at the borders of every feature map"
        )
    if layout != "torchvision" or convention != "caffe":
        return arrays, convention, notes
    if not fold_input:
        notes.append(
            "the weights expect caffe input (BGR 0-255 minus the ImageNet mean), not "
            "torchvision's normalisation; fold it into conv1_1 to change that"
        )
        return arrays, convention, notes
    k, b = fold_caffe_into_torch_input(arrays["block1_conv1/kernel"], arrays["block1_conv1/bias"])
    notes.append(
        "caffe input folded into conv1_1: exact away from the image border; at "
        "zero-padded border pixels conv1_1 differs (zero torch input is not zero caffe input)"
    )
    return {**arrays, "block1_conv1/kernel": k, "block1_conv1/bias": b}, "torch", notes
