"""Keras weights inside an HDF5 file, read and patched with h5py: the shared part of the
``.h5``/``.weights.h5`` adapter (:mod:`.keras_h5`) and the ``.keras`` adapter (:mod:`.keras_zip`).

Every access refuses HDF5 soft and external links (they can point anywhere); layouts are those of
docs/formats.md. Reads run inside the guarded child (:mod:`._guard`); nothing here is called on
an untrusted file in the main process.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import WeightFileError
from ..core.keras_config import batchnorm_flags
from ..core.weightset import Format, LayerEntry, WeightFile, roles_of
from ._patch import Patch

try:
    import h5py
except ImportError:  # pragma: no cover - h5py is a hard dependency; keep the message useful
    h5py = None

#: Root group that carries vggnorm's provenance in every file it writes.
PROVENANCE_GROUP = "vggnorm"
OPTIMIZER_GROUPS = ("optimizer_weights", "optimizer")


def need_h5py() -> None:
    if h5py is None:  # pragma: no cover
        raise ImportError("vggnorm needs h5py to read weight files: pip install h5py")

def get(group: Any, path: str) -> Any:
    """``group[path]``, refusing soft and external links at every step (they can point anywhere)."""
    node = group
    for part in path.split("/"):
        if not part:
            continue
        link = node.get(part, getlink=True)
        if link is None:
            raise WeightFileError(f"{group.file.filename}: missing {node.name.rstrip('/')}/{part}")
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
            raise WeightFileError(
                f"{group.file.filename}: {node.name.rstrip('/')}/{part} is an HDF5 "
                f"{type(link).__name__}; links are refused because they can point anywhere"
            )
        node = node[part]
    return node


def _refuse_links(f: Any) -> None:
    def visit(group: Any) -> None:
        for name in group:
            link = group.get(name, getlink=True)
            if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
                raise WeightFileError(
                    f"{f.filename}: {group.name.rstrip('/')}/{name} is an HDF5 "
                    f"{type(link).__name__}; links are refused because they can point anywhere"
                )
            child = group[name]
            if isinstance(child, h5py.Group):
                visit(child)

    visit(f)


def _decode(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def attr_list(group: Any, name: str) -> list[str] | None:
    """A string-list attribute, joining Keras's chunks ``name0``, ``name1``... when present."""
    if name in group.attrs:
        return [_decode(v) for v in np.atleast_1d(group.attrs[name])]
    chunks: list[Any] = []
    while f"{name}{len(chunks)}" in group.attrs:
        chunks.append(group.attrs[f"{name}{len(chunks)}"])
    if not chunks:
        return None
    return [_decode(v) for chunk in chunks for v in np.atleast_1d(chunk)]



@contextlib.contextmanager
def open_h5(path: Path, mode: str = "r") -> Iterator[Any]:
    """An open HDF5 file; a missing or unreadable one is a :class:`WeightFileError`."""
    need_h5py()
    try:
        f = h5py.File(path, mode)
    except FileNotFoundError as e:
        raise WeightFileError(f"{path}: no such file") from e
    except OSError as e:
        raise WeightFileError(
            f"{path}: not a readable HDF5 file (truncated, corrupt or another format): {e}"
        ) from e
    try:
        yield f
    finally:
        f.close()


def _leaf_groups(layer: str, weight_names: list[str]) -> list[tuple[str, list[int]]]:
    """Split one stored layer into leaf layers: a nested model's group holds many layers' weights.

    Weight names look like ``block1_conv1_W_1:0`` (Keras 1), ``block1_conv1/kernel:0`` (Keras 2)
    or ``block1_conv1/kernel`` (Keras 3); inside a nested model they all start with the inner
    layer's name.
    """
    prefixes = [w.split("/")[0] if "/" in w else None for w in weight_names]
    distinct = list(dict.fromkeys(prefixes))
    if len(distinct) <= 1:
        return [(layer, list(range(len(weight_names))))]
    if None in distinct:
        raise WeightFileError(f"layer {layer!r}: cannot tell which weights belong to which layer")
    return [(p, [i for i, q in enumerate(prefixes) if q == p]) for p in distinct if p is not None]


BnFlags = dict[str, tuple[bool, bool]]


def _entry(f: Any, name: str, paths: list[str], bn: BnFlags) -> LayerEntry:
    shapes: list[tuple[int, ...]] = []
    dtypes = []
    for p in paths:
        ds = get(f, p)
        if not isinstance(ds, h5py.Dataset):
            raise WeightFileError(f"{f.filename}: {p} is not a dataset")
        shapes.append(tuple(int(n) for n in ds.shape))
        dtypes.append(str(ds.dtype))
    roles = roles_of(tuple(paths), tuple(shapes), bn.get(name))
    return LayerEntry(name, tuple(paths), tuple(shapes), tuple(dtypes), roles)


def _read_legacy(f: Any, root: str, bn: BnFlags) -> tuple[LayerEntry, ...]:
    group = get(f, root) if root else f
    names = attr_list(group, "layer_names")
    if names is None:
        raise WeightFileError(f"{f.filename}: no 'layer_names' attribute under /{root}")
    entries = []
    for layer in names:
        g = get(group, layer)
        weight_names = attr_list(g, "weight_names") or []
        base = f"{root}/{layer}" if root else layer
        for leaf, idx in _leaf_groups(layer, weight_names):
            entries.append(_entry(f, leaf, [f"{base}/{weight_names[i]}" for i in idx], bn))
    return tuple(entries)


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _read_keras3(f: Any, bn: BnFlags) -> tuple[LayerEntry, ...]:
    """Leaves of ``layers/...`` that hold ``vars``, named by the layer name Keras records there.

    Store keys are class name plus a per-class counter in model order (``conv2d``, ``conv2d_1``),
    so a natural sort of each nesting level restores the order within a class.
    """
    entries: list[LayerEntry] = []

    def walk(group: Any, path: str) -> None:
        if "vars" in group:
            vars_group = get(group, "vars")
            idx = sorted(vars_group, key=int)
            if idx:
                # Keras 3 records the layer's own name on the vars group; older files may not.
                name = _decode(vars_group.attrs.get("name", path.rsplit("/", 1)[-1]))
                entries.append(_entry(f, name, [f"{path}/vars/{i}" for i in idx], bn))
        if "layers" in group:
            layers = get(group, "layers")
            for key in sorted(layers, key=_natural_key):
                child = get(layers, key)
                if isinstance(child, h5py.Group):
                    walk(child, f"{path}/layers/{key}" if path else f"layers/{key}")

    walk(f, "")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        # Nested models can reuse keys such as conv2d in two sub-models; keep the full path then.
        entries = [replace(e, name=e.datasets[0].rsplit("/vars/", 1)[0]) for e in entries]
    return tuple(entries)


def _json_attr(f: Any, name: str) -> dict[str, Any] | None:
    if name not in f.attrs:
        return None
    try:
        value = json.loads(_decode(f.attrs[name]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightFileError(f"{f.filename}: attribute {name!r} is not valid JSON: {e}") from e
    return value if isinstance(value, dict) else None


def _read_provenance(f: Any) -> dict[str, Any] | None:
    if PROVENANCE_GROUP not in f:
        return None
    g = get(f, PROVENANCE_GROUP)
    return _json_attr(g, "provenance") or {}



def describe(f: Any, p: Path, fmt: Format, config: dict[str, Any] | None) -> WeightFile:
    """What the open file ``f`` (stored at ``p``, in layout ``fmt``) holds, without its arrays;
    ``config`` is the model config when the file carries one."""
    _refuse_links(f)
    bn = batchnorm_flags(config) if config is not None else {}
    if fmt in ("legacy-h5", "legacy-h5-model"):
        layers = _read_legacy(f, "model_weights" if fmt == "legacy-h5-model" else "", bn)
    else:
        layers = _read_keras3(f, bn)
    if not any(e.datasets for e in layers):
        raise WeightFileError(f"{p}: the file holds no layer with weights")
    return WeightFile(p, fmt, layers, config, _read_provenance(f))


def model_config(f: Any) -> dict[str, Any] | None:
    """The ``model_config`` JSON attribute of a whole-model ``.h5``, if any."""
    return _json_attr(f, "model_config")


def touch_all(f: Any) -> None:
    """Parse every object header, attribute and dataset of the file that a writer copies, so
    that damage anywhere shows here, in the guarded child, not later in the writing process (a
    re-read of the weights, ~0.5 s for a VGG16 file)."""

    def visit(name: str, obj: Any) -> None:
        for key in obj.attrs:
            obj.attrs[key]
        if isinstance(obj, h5py.Dataset) and not name.startswith(OPTIMIZER_GROUPS):
            obj[()]  # the data the writer copies (optimizer state is dropped, not copied)

    for key in f.attrs:
        f.attrs[key]
    f.visititems(visit)


def read_arrays(f: Any, wf: WeightFile) -> dict[str, np.ndarray]:
    """Every weight array of ``wf``, keyed ``<layer>/<role>``; NaN/inf weights are refused."""
    arrays: dict[str, np.ndarray] = {}
    for entry in wf.layers:
        for key, ds_path in zip(entry.keys(), entry.datasets):
            try:
                arr = np.asarray(get(f, ds_path)[()])
            except OSError as e:
                raise WeightFileError(f"{wf.path}: cannot read {ds_path}: {e}") from e
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise WeightFileError(f"{wf.path}: {ds_path} holds NaN or infinite weights")
            if key in arrays:
                raise WeightFileError(f"{wf.path}: two layers are both named {entry.name!r}")
            arrays[key] = arr
    return arrays


def read_scales(f: Any) -> dict[str, np.ndarray]:
    """The per-layer scales a vggnorm output keeps under ``vggnorm/scales``, by layer name."""
    g = get(f, f"{PROVENANCE_GROUP}/scales")
    return {
        key.split("_", 1)[1]: np.asarray(g[key][()])
        for key in sorted(g)
        if isinstance(g[key], h5py.Dataset)
    }


def _copy_h5(src: Any, dst: Any, skip: tuple[str, ...]) -> list[str]:
    """Copy attributes and members of ``src`` into ``dst`` except ``skip``; returns what was skipped."""
    for k, v in src.attrs.items():
        dst.attrs[k] = v
    dropped = []
    for name in src:
        if name in skip:
            dropped.append(name)
            continue
        src.copy(src[name], dst, name=name)
    return dropped



def patch_h5(src_h5: Path, dst_h5: Path, wf: WeightFile, patch: Patch) -> list[str]:
    """Copy ``src_h5`` to ``dst_h5`` with ``patch`` applied; returns the groups dropped
    (optimizer state)."""
    where = wf.entry_of_key()
    with open_h5(src_h5) as f_in, h5py.File(dst_h5, "w") as f_out:
        dropped = _copy_h5(f_in, f_out, (*OPTIMIZER_GROUPS, PROVENANCE_GROUP))
        for key, value in patch.arrays.items():
            if key not in where:
                raise WeightFileError(f"{wf.path}: no dataset for {key!r}")
            entry, i = where[key]
            ds = f_out[entry.datasets[i]]
            if tuple(ds.shape) != value.shape or ds.dtype != value.dtype:
                raise WeightFileError(
                    f"{key}: new array is {value.dtype}{list(value.shape)}, "
                    f"the file holds {ds.dtype}{list(ds.shape)}"
                )
            ds[...] = value
        g = f_out.create_group(PROVENANCE_GROUP)
        g.attrs["provenance"] = json.dumps(dict(patch.provenance), sort_keys=True)
        for name, value in patch.extra.items():
            g.create_dataset(name, data=value)
    return [d for d in dropped if d != PROVENANCE_GROUP]
