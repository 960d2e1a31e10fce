"""``vggnorm export``: write any supported VGG file in a PyTorch layout (torchvision's and timm's,
with or without BatchNorm, ``model.features`` alone, Gatys's ``vgg_conv.pth``, AdaIN's
``vgg_normalised.pth``), as ``.safetensors`` or ``.pth`` by suffix. A network with a BatchNorm
after every conv goes to the ``_bn`` layouts only, and only with torch's epsilon (1e-5).

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

from ..core.archs import ARCHS
from ..core.errors import ArchitectureError, VggnormError, WeightFileError
from ..core.inputs import fold_caffe_into_torch_input
from ..core.topology import Loaded, stock_named, stock_with_norms
from ..core.torch_layouts import LAYOUTS as TORCH_LAYOUTS
from ..core.torch_layouts import TORCH_BN_EPSILON, torch_rows_to_keras
from ..formats import matconvnet
from ..formats.outputs import check_output, output_lock
from ..formats.registry import load
from ..formats.torch_files import PROVENANCE_KEY, write_torch
from ._common import file_record, provenance

#: The PyTorch layouts, and MatConvNet's ``imagenet-vgg-verydeep-*.mat``.
LAYOUTS = (*TORCH_LAYOUTS, "matconvnet")


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
    or a whole model) in a PyTorch ``layout`` or MatConvNet's.

    Args:
        src: a Keras, PyTorch, MatConvNet or ONNX VGG16/VGG19 weight file.
        dst: ``.safetensors`` or ``.pth``/``.pt``; ``.mat`` for ``matconvnet``.
        layout: ``torchvision``, ``timm``, ``features`` (each also ``_bn``, for a VGG with a
            BatchNorm after every conv), ``gatys`` (convs only), ``adain`` (VGG19 convs only) or
            ``matconvnet`` (caffe input, the fc layers as convs).
        fold_input: for ``torchvision`` and ``timm``, fold the caffe input convention into
            ``conv1_1``.
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
        stock = loaded.bound.stock or stock_with_norms(loaded.bound.arch)
        if layout == "matconvnet":
            _write_matconvnet(out, stock, arrays, metadata)
        else:
            write_torch(out, layout, arrays, metadata=metadata, arch=stock)  # type: ignore[arg-type]
    return ExportResult(out, layout, convention, tuple(notes))


def _write_matconvnet(
    out: Path, stock: str | None, arrays: dict[str, np.ndarray], metadata: dict[str, str]
) -> None:
    """The stock chain in MatConvNet's layout: fc6's rows back in (H, W, C) order."""
    arch = ARCHS[stock or "vgg16"]
    if "fc1/kernel" in arrays:
        arrays = {**arrays, "fc1/kernel": torch_rows_to_keras(arrays["fc1/kernel"], 512)}
    else:
        arch = arch.without_head()
    matconvnet.write_new(out, arch, arrays, metadata)


def _source_input(loaded: Loaded) -> str:
    """The input convention of the source file (``unknown`` for an ONNX graph)."""
    try:
        return loaded.preprocess
    except VggnormError:
        return "unknown"


def _exportable(loaded: Loaded, layout: str, fold_input: bool) -> dict[str, np.ndarray]:
    """The stock-named arrays ``layout`` can hold; refuses what it cannot."""
    src, info = loaded.path, TORCH_LAYOUTS.get(layout)  # type: ignore[call-overload]
    batchnorm, preprocessing = (info.batchnorm, info.preprocessing) if info else (False, "caffe")
    bn = stock_with_norms(loaded.bound.arch)
    stock = loaded.bound.stock or bn
    if stock is None:
        raise ArchitectureError(f"{src}: only stock VGG16/VGG19 files (with or without a "
                                "BatchNorm after every conv) export to PyTorch layouts")  # fmt: skip
    if layout in ("gatys", "adain") and stock != "vgg19":
        raise ArchitectureError(f"the {layout} layout holds a VGG19; {src} is a {stock}")
    _check_norms(loaded, layout, batchnorm, bn is not None)
    arrays = stock_named(loaded)
    source_input = _source_input(loaded)
    if fold_input and not (preprocessing == "torch" and source_input == "caffe"):
        raise WeightFileError(
            "folding the input convention turns caffe input into torchvision input, for the "
            f"torchvision and timm layouts only; here the layout is {layout} and {src} expects "
            f"{source_input} input"
        )
    head_kind = info.head if info else "classifier"
    _check_head(loaded, layout, head_kind, arrays)
    if head_kind is None:
        arrays = {k: v for k, v in arrays.items() if not k.startswith(("fc", "predictions"))}
    if source_input != "caffe" and preprocessing == "caffe":
        raise WeightFileError(
            f"{src} expects {source_input} input; the {layout} layout's users feed caffe input"
        )
    return arrays


def _check_norms(loaded: Loaded, layout: str, layout_bn: bool, file_bn: bool) -> None:
    """BatchNorm goes to the ``_bn`` layouts, and only as torch computes it (epsilon 1e-5)."""
    src = loaded.path
    if layout_bn != file_bn:
        has = "a BatchNorm after every conv" if file_bn else "no BatchNorm"
        want = "one" if layout_bn else "none"
        raise ArchitectureError(f"{src} has {has}; the {layout} layout has {want}")
    for conv in loaded.bound.arch.convs:
        n = conv.norm
        # an epsilon stored in float32 (ONNX) is torch's to its last bit
        if n is not None and not (n.center and n.scale and
                                  abs(n.epsilon - TORCH_BN_EPSILON) <= TORCH_BN_EPSILON * 2**-23):  # fmt: skip
            raise ArchitectureError(
                f"{src}: the BatchNorm after {conv.name} has epsilon {n.epsilon:g} (center "
                f"{n.center}, scale {n.scale}); torch's BatchNorm2d computes with 1e-5 and both, "
                "so the same weights would compute another function"
            )


def _check_head(
    loaded: Loaded, layout: str, kind: str | None, arrays: dict[str, np.ndarray]
) -> None:
    """A torchvision (and MatConvNet) head is three Dense layers on the 7x7x512 map; timm's may
    stop after its two pre_logits convs."""
    head = loaded.bound.arch.head
    if kind is None or head is None or not head.dense:
        return
    rows = arrays["fc1/kernel"].shape[0] if "fc1/kernel" in arrays else 0
    sizes = (3,) if kind == "classifier" else (2, 3)
    if len(head.dense) not in sizes or head.reduce != "flatten" or rows != 512 * 7 * 7:
        raise ArchitectureError(
            f"{loaded.path}: its head is not {'torchvision' if kind == 'classifier' else 'timm'}'s "
            "(Dense layers reading the 7x7x512 map of a 224x224 input); export a notop file or "
            "a layout without a head"
        )


def _input_convention(
    loaded: Loaded, layout: str, arrays: dict[str, np.ndarray], fold_input: bool
) -> tuple[dict[str, np.ndarray], str, list[str]]:
    """The arrays (with the input folded into conv1_1 when asked), the input convention the
    file's users must follow, and the notes that explain it."""
    convention = _source_input(loaded)
    notes: list[str] = []
    if layout == "adain":
        notes.append(
            "AdaIN pads by reflection where the source pads with zeros: same weights, "
            "different function at the borders of every feature map"
        )
    if convention == "unknown":
        notes.append("an ONNX graph does not record its input's preprocessing: feed the file "
                     "what the graph was fed")  # fmt: skip
    info = TORCH_LAYOUTS.get(layout)  # type: ignore[call-overload]
    if info is None or info.preprocessing != "torch" or convention != "caffe":
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
