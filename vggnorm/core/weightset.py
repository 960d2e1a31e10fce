"""What a weight file holds, described without its I/O: layers, their arrays and what each array
is. No h5py, no framework: :mod:`vggnorm.core.topology` and :mod:`vggnorm.core.keras_config` bind
these to an architecture; the adapters of :mod:`vggnorm.formats` (one per container) fill them.

Every array is keyed ``<layer>/<role>``, the role named once, when the file is read: ``kernel`` and
``bias`` for conv and dense layers (Keras shapes: conv (kh, kw, C_in, C_out), dense (rows, units)),
``gamma``, ``beta``, ``moving_mean`` and ``moving_variance`` for BatchNormalization.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .archs import Arch

Format = Literal[
    "legacy-h5", "legacy-h5-model", "weights-h5", "keras-zip", "safetensors", "pth", "matconvnet",
    "onnx",
]

#: What each array of a layer is, named once when the file is read; keys are ``<layer>/<role>``.
CONV_ROLES = ("kernel", "bias")
BN_ROLES = ("gamma", "beta", "moving_mean", "moving_variance")
ROLES = frozenset(CONV_ROLES + BN_ROLES)


@dataclass(frozen=True)
class LayerEntry:
    """One weight-holding layer as stored: its name, its datasets in Keras's weight order and
    what each one is (``kernel``, ``bias``, ``gamma``, ``beta``, ``moving_mean``,
    ``moving_variance``)."""

    name: str
    datasets: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.roles:
            object.__setattr__(self, "roles", roles_of(self.datasets, self.shapes))

    def keys(self) -> tuple[str, ...]:
        """Array keys: ``<name>/<role>``."""
        return tuple(f"{self.name}/{role}" for role in self.roles)


def _stored_role(dataset: str) -> str | None:
    """The role a dataset's own name states: ``kernel:0``, ``.../moving_mean``, Keras 1's
    ``block1_conv1_W_1:0``/``_b_1:0``; None for unnamed ``vars/<i>``."""
    leaf = dataset.rsplit("/", 1)[-1].split(":", 1)[0]
    if leaf in ROLES:
        return leaf
    k1 = re.search(r"_(W|b|gamma|beta|running_mean|running_std)(_\d+)?$", leaf)
    if k1 is None:
        return None
    return {"W": "kernel", "b": "bias", "running_mean": "moving_mean",
            "running_std": "moving_variance"}.get(k1.group(1), k1.group(1))  # fmt: skip


def roles_of(
    datasets: tuple[str, ...],
    shapes: tuple[tuple[int, ...], ...],
    bn: tuple[bool, bool] | None = None,
) -> tuple[str, ...]:
    """Name each array of a layer: from the stored names when they say, else from the layout.

    Unnamed arrays (Keras 3 ``vars/<i>``) are a kernel and maybe a bias when the first is 2-D or
    4-D; all 1-D arrays are a BatchNormalization's, in Keras's order, of which ``bn`` = (scale,
    center) says which are present (all four when it is not known and there are four). Anything
    else keeps positional names ``0``, ``1``...
    """
    stored = [_stored_role(d) for d in datasets]
    if all(r is not None for r in stored) and len(set(stored)) == len(stored):
        return tuple(r for r in stored if r is not None)
    nd = [len(s) for s in shapes]
    if nd and nd[0] in (2, 4) and nd[1:] in ([], [1]):
        return CONV_ROLES[: len(nd)]
    if nd and all(n == 1 for n in nd):
        scale, center = bn if bn is not None else (len(nd) == 4, len(nd) == 4)
        present = tuple(r for r, keep in zip(BN_ROLES, (scale, center, True, True)) if keep)
        if len(present) == len(nd):
            return present
    # Not a layer the rescaling reads or changes (it is copied as stored): positions will do.
    return tuple(str(i) for i in range(len(nd)))


@dataclass(frozen=True)
class WeightFile:
    """What a weight file holds, without its arrays."""

    path: Path
    format: Format
    layers: tuple[LayerEntry, ...]
    config: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    layout: str | None = None  # PyTorch files: torchvision, gatys, adain, ...
    preprocess: str | None = None  # the input convention the layout implies, when it says
    # Files that say where each BatchNorm sits (PyTorch *_bn layouts): (conv, BatchNorm, epsilon)
    norms: tuple[tuple[str, str, float], ...] = ()
    # Files that record their whole architecture as data (an ONNX graph, a MatConvNet layer
    # list): it, with vggnorm's layer names
    arch: Arch | None = None
    # Where the file names its layers otherwise: vggnorm's layer name -> the file's own
    native_names: tuple[tuple[str, str], ...] = ()
    # What the reader found worth saying (a NaN classifier read as features only, ...)
    notes: tuple[str, ...] = ()

    @property
    def suffix(self) -> str:
        return suffix_of(self.path)

    def entry_of_key(self) -> dict[str, tuple[LayerEntry, int]]:
        return {k: (e, i) for e in self.layers for i, k in enumerate(e.keys())}


@dataclass(frozen=True)
class WeightSet:
    """A weight file's description plus every weight array, keyed as in :meth:`LayerEntry.keys`."""

    file: WeightFile
    arrays: Mapping[str, np.ndarray]


def suffix_of(path: Path) -> str:
    """The file's suffix in lower case; Keras 3's ``.weights.h5`` counts as one."""
    return ".weights.h5" if path.name.lower().endswith(".weights.h5") else path.suffix.lower()
