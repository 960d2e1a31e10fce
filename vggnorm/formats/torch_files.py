"""PyTorch VGG state dicts, whichever container holds them (``.safetensors`` or ``.pth``/``.pt``):
the entry points ``export`` and the library use to read and write a layout directly.

Each container is its own adapter (:mod:`.safetensors_file`, :mod:`.pth`); this module picks one by
the file's suffix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np

from ..core.errors import WeightFileError
from ..core.torch_layouts import Layout
from . import pth, safetensors_file
from ._patch import PROVENANCE_KEY, SCALES_KEY
from ._torch import Container, TorchWeights

__all__ = ["PROVENANCE_KEY", "SCALES_KEY", "TorchWeights", "container_of", "read_provenance",
           "read_torch", "write_torch"]  # fmt: skip

_CONTAINERS: dict[Container, ModuleType] = {"safetensors": safetensors_file, "pth": pth}


def container_of(path: Path | str) -> Container:
    """The container a path's suffix selects.

    Raises:
        WeightFileError: any suffix but ``.safetensors``, ``.pth``, ``.pt`` and ``.bin``.
    """
    p = Path(path)
    for name, module in _CONTAINERS.items():
        if module.detect(p):
            return name
    raise WeightFileError(
        f"{path}: unknown PyTorch weight suffix {p.suffix.lower()!r}; expected .safetensors, "
        ".pth, .pt or .bin"
    )


def read_torch(path: Path | str) -> TorchWeights:
    """Read a PyTorch VGG state dict and convert it to canonical arrays.

    Args:
        path: a ``.safetensors``, ``.pth`` or ``.pt`` file.

    Returns:
        :class:`TorchWeights`; ``metadata`` is the safetensors header metadata or the sidecar's.

    Raises:
        WeightFileError: missing, corrupt or truncated file, a pickle holding anything but tensors,
            non-float or non-finite weights, an unknown layout or wrong shapes.
        ArchitectureError: a batch-norm VGG.
        ImportError: a ``.pth`` file and torch is not installed.

    Example:
        >>> tw = read_torch("vgg16.safetensors")  # doctest: +SKIP
        >>> tw.layout, tw.arch, tw.arrays["block1_conv1/kernel"].shape  # doctest: +SKIP
        ('torchvision', 'vgg16', (3, 3, 3, 64))
    """
    p = Path(path)
    reader: TorchWeights = _CONTAINERS[container_of(p)].read_torch(p)
    return reader


def write_torch(
    path: Path | str,
    layout: Layout,
    canonical_arrays: Mapping[str, np.ndarray],
    *,
    source: TorchWeights | None = None,
    metadata: Mapping[str, str] | None = None,
    arch: str | None = None,
) -> Path:
    """Write canonical arrays as a ``layout`` state dict, atomically, in the container of the suffix.

    Args:
        path: target ``.safetensors``, ``.pth`` or ``.pt``.
        layout: the state-dict layout to write.
        canonical_arrays: ``"<layer>/kernel"``/``"<layer>/bias"`` arrays; not modified.
        source: the file that was read: its key order, stored dtypes, untouched tensors (AdaIN's
            ``0.*``) and metadata are kept; without it AdaIN gets the published input conv.
        metadata: provenance, str -> str; merged over the source's metadata. For safetensors it
            goes into the header, for ``.pth`` into ``<path>.vggnorm.json`` (with the sha256 of
            the written file).
        arch: ``"vgg16"``/``"vgg19"``; default: the source's, or read off the conv names.

    Returns:
        The written path.

    Raises:
        WeightFileError: missing arrays, shapes that differ from the source, non-finite values.
        ImportError: ``.pth`` without torch installed.
        TypeError: metadata that is not str -> str.
    """
    p = Path(path)
    written: Path = _CONTAINERS[container_of(p)].write_torch(
        p, layout, canonical_arrays, source, metadata, arch
    )
    return written


def read_provenance(path: Path | str) -> dict[str, str]:
    """The provenance vggnorm wrote with a PyTorch weight file, or ``{}`` when there is none.

    Raises:
        WeightFileError: an unreadable header or sidecar, or a sidecar whose recorded sha256 is not
            the file's (the file changed after vggnorm wrote it).
    """
    p = Path(path)
    metadata: dict[str, str] = _CONTAINERS[container_of(p)].read_metadata(p)
    return metadata
