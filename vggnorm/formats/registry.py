"""The one table of weight-file adapters, and the functions that dispatch on it.

An adapter is a module with ``detect(path) -> bool`` (by suffix, as the frameworks choose their
loaders), ``read(path) -> WeightSet``, ``write(src, dst, patch, force) -> dropped groups`` and
``read_scales(path)``. A new format is one adapter module and one line in :data:`ADAPTERS`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..core.errors import WeightFileError
from ..core.topology import Loaded, bind
from ..core.weightset import Format, WeightFile, WeightSet
from . import keras_h5, keras_zip, matconvnet, onnx_graph, pth, safetensors_file
from ._patch import Patch, check_finite
from .outputs import output_lock

log = logging.getLogger(__name__)

#: Every weight-file container vggnorm reads and writes, tried in order.
ADAPTERS: tuple[ModuleType, ...] = (keras_h5, keras_zip, safetensors_file, pth, matconvnet,
                                    onnx_graph)  # fmt: skip


def adapter_for(path: str | os.PathLike[str]) -> ModuleType:
    """The adapter that reads ``path``.

    Raises:
        WeightFileError: no adapter knows the file's suffix.
    """
    p = Path(path)
    for adapter in ADAPTERS:
        if adapter.detect(p):
            return adapter
    known = ", ".join(s for a in ADAPTERS for s in a.SUFFIXES)
    raise WeightFileError(f"{p}: unknown weight file suffix; vggnorm reads {known}")


def detect_format(path: str | os.PathLike[str]) -> Format:
    """The layout of a weight file: a Keras layout, ``safetensors``, ``pth``, ``matconvnet`` or
    ``onnx``.

    Raises:
        WeightFileError: an unknown suffix, a missing file, or no known layout inside.
    """
    adapter = adapter_for(path)
    if adapter in (keras_h5, keras_zip):
        fmt: Format = adapter.detect_layout(path)
        return fmt
    if not Path(path).is_file():
        raise WeightFileError(f"{path}: no such file")
    found: Format = adapter.FORMAT
    return found


def read_weights(path: str | os.PathLike[str]) -> WeightSet:
    """Read every weight array of a supported file, in whatever format and layout.

    Args:
        path: Keras ``.h5``/``.hdf5`` (any layout), ``.weights.h5``, ``.keras``; PyTorch
            ``.safetensors``, ``.pth``/``.pt`` (torchvision, timm, Gatys, AdaIN layouts, with
            or without BatchNorm); MatConvNet ``.mat``; ONNX ``.onnx``.

    Returns:
        A :class:`~vggnorm.core.weightset.WeightSet`: the file's description and its arrays, keyed
        ``"<layer>/<role>"`` (``kernel``, ``bias``, ``gamma``, ``beta``, ``moving_mean``,
        ``moving_variance``) with Keras shapes (conv kernels HWIO).

    Raises:
        WeightFileError: unknown suffix, unreadable, damaged (every file is read in a child
            process with a deadline) or unknown layout, links, or NaN/inf weights.
        ArchitectureError: a network vggnorm cannot rescale exactly (names the layer or node).
        ImportError: the format's optional dependency is not installed.

    Example:
        >>> ws = read_weights("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")  # doctest: +SKIP
        >>> ws.arrays["block1_conv1/kernel"].shape  # doctest: +SKIP
        (3, 3, 3, 64)
    """
    ws: WeightSet = adapter_for(path).read(path)
    return ws


def inspect_weights(path: str | os.PathLike[str]) -> WeightFile:
    """What a weight file holds, without its arrays where the format allows it."""
    adapter = adapter_for(path)
    if hasattr(adapter, "inspect"):
        wf: WeightFile = adapter.inspect(path)
        return wf
    return read_weights(path).file


def write_weights(
    src: WeightFile | WeightSet,
    dst: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    provenance: Mapping[str, Any] | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
    *,
    force: bool = False,
) -> list[str]:
    """Write ``src`` to ``dst`` in its own format and layout with ``arrays`` replaced.

    Every other group, dataset, attribute or tensor is copied unchanged; shapes and dtypes must
    match the source's. ``provenance`` (JSON-serialisable) and ``extra`` arrays are stored with
    the file (an HDF5 ``vggnorm`` group, safetensors header metadata, a ``.pth`` sidecar). The
    write is atomic.

    Args:
        src: the source file's description (or a whole :class:`WeightSet`).
        dst: target path; its suffix must load the same way as the source's.
        arrays: replacement arrays keyed ``<layer>/<role>``.
        provenance: what produced this file.
        extra: arrays kept beside the provenance (e.g. ``scales/00_block1_conv1``).
        force: overwrite an existing ``dst``.

    Returns:
        Names of the groups that were dropped (optimizer state of a whole Keras model).

    Raises:
        WeightFileError: bad target, mismatched array, or an I/O error (disk full...). Nothing is
            left under ``dst`` when this is raised.
    """
    wf = src.file if isinstance(src, WeightSet) else src
    patch = Patch(arrays, dict(provenance or {}), dict(extra or {}))
    check_finite(patch.arrays, Path(dst))
    # A bad target (format, place, space) is named before the lock, which would only say the
    # folder cannot take a lock file; each adapter checks again under the lock, where no
    # other vggnorm run can create the output in between.
    check_target(wf.path, dst, force)
    with output_lock(Path(dst)):  # one writer per output, whatever the format
        dropped: list[str] = adapter_for(wf.path).write(wf, Path(dst), patch, force)
    return dropped


def check_target(src: str | os.PathLike[str], dst: str | os.PathLike[str], force: bool = False) -> None:
    """Refuse, before any work, an output ``dst`` that :func:`write_weights` would refuse for
    ``src``: another format, the input itself, an existing file without ``force``, or a folder
    that cannot take it.

    Raises:
        WeightFileError: naming the output and the reason.
    """
    adapter_for(src).check_target(Path(src), Path(dst), force)


def read_scales(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The per-layer scales stored in a file written by ``vggnorm apply``, by layer name.

    Raises:
        WeightFileError: the file was not written by vggnorm.
    """
    adapter = adapter_for(path)
    # an HDF5 file is described cheaply first, for a clear error; the other adapters' own
    # readers already refuse a file without scales
    if hasattr(adapter, "inspect") and inspect_weights(path).provenance is None:
        raise WeightFileError(f"{path} was not written by vggnorm (no provenance)")
    scales: dict[str, np.ndarray] = adapter.read_scales(path)
    return scales


def load(path: str | os.PathLike[str], model: str | None = None) -> Loaded:
    """Read a weight file and bind it to its architecture (``model`` checks it).

    Raises:
        WeightFileError, ArchitectureError: as :func:`read_weights` and
            :func:`vggnorm.core.topology.bind`.
    """
    ws = read_weights(path)
    for note in ws.file.notes:  # what the reader noticed (a NaN head read as the features alone)
        log.warning("%s: %s", path, note)
    return Loaded(ws, bind(ws.file, model))
