"""Reading and writing Keras weight files. h5py and the standard library only.

Layouts (DESIGN.md section 2), detected explicitly by :func:`detect_format`:

``legacy-h5``
    ``save_weights('x.h5')`` of Keras 1/2/3 and the files ``keras.applications`` downloads: root
    attribute ``layer_names`` (possibly chunked ``layer_names0..N``), one group per layer with a
    ``weight_names`` attribute naming its datasets in order.
``legacy-h5-model``
    a whole model saved to ``.h5``: ``model_config`` at the root, weights as above under
    ``model_weights/``, maybe ``optimizer_weights/``.
``weights-h5``
    Keras 3 ``.weights.h5``: ``layers/<key>/vars/<i>``, keys made from class names, not layer names.
``keras-zip``
    Keras 3 ``.keras``: a zip holding ``config.json``, ``metadata.json`` and ``model.weights.h5``.

The writer never rebuilds a file from scratch: it copies every group, dataset and attribute of the
source, replaces only the datasets whose values changed (same shape, same dtype), drops optimizer
state (it belongs to the old weights) and adds a ``vggnorm`` provenance group. It writes to a
temporary file beside the target and renames it into place, so no half-written file is ever left
under the target's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path, check_output, output_lock, temp_dir_beside
from .errors import WeightFileError
from .guard import run_guarded
from .weightset import Format, LayerEntry, WeightFile, WeightSet, roles_of, suffix_of

try:
    import h5py
except ImportError:  # pragma: no cover - h5py is a hard dependency; keep the message useful
    h5py = None


#: Root group that carries vggnorm's provenance in every file it writes.
PROVENANCE_GROUP = "vggnorm"
_KERAS_ZIP_WEIGHTS = "model.weights.h5"
_OPTIMIZER_GROUPS = ("optimizer_weights", "optimizer")


def _need_h5py() -> None:
    if h5py is None:  # pragma: no cover
        raise ImportError("vggnorm needs h5py to read weight files: pip install h5py")


# ---------------------------------------------------------------------------------------------
# Safe HDF5 access


def _get(group: Any, path: str) -> Any:
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


def _attr_list(group: Any, name: str) -> list[str] | None:
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
def _open_h5(path: Path, mode: str = "r") -> Iterator[Any]:
    _need_h5py()
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


@contextlib.contextmanager
def _h5_of(wf_path: Path, fmt: Format, scratch: Path | None = None) -> Iterator[Any]:
    """The HDF5 file holding the weights (for ``.keras``, the zip member, extracted to a temp dir)."""
    if fmt != "keras-zip":
        with _open_h5(wf_path) as f:
            yield f
        return
    with tempfile.TemporaryDirectory(prefix="vggnorm-", dir=scratch) as tmp:
        inner = Path(tmp) / _KERAS_ZIP_WEIGHTS
        try:
            with (
                zipfile.ZipFile(wf_path) as z,
                z.open(_KERAS_ZIP_WEIGHTS) as src,
                open(inner, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 20)
        except KeyError as e:
            raise WeightFileError(f"{wf_path}: .keras archive has no {_KERAS_ZIP_WEIGHTS}") from e
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise WeightFileError(f"{wf_path}: not a readable .keras archive: {e}") from e
        with _open_h5(inner) as f:
            yield f


# ---------------------------------------------------------------------------------------------
# Format detection and reading


def detect_format(path: str | os.PathLike[str]) -> Format:
    """Which Keras layout ``path`` holds.

    Raises:
        WeightFileError: missing file, not HDF5/zip, or no known layout inside.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightFileError(f"{p}: no such file")
    suffix = suffix_of(p)
    if suffix == ".keras":
        if not zipfile.is_zipfile(p):
            raise WeightFileError(f"{p}: a .keras file must be a zip archive; this one is not")
        return "keras-zip"
    with _open_h5(p) as f:
        if suffix == ".weights.h5":
            if "layers" in f or "vars" in f:
                return "weights-h5"
            raise WeightFileError(f"{p}: .weights.h5 file without a 'layers' group")
        if "model_weights" in f:
            return "legacy-h5-model"
        if _attr_list(f, "layer_names") is not None:
            return "legacy-h5"
        if "layers" in f:
            raise WeightFileError(
                f"{p}: holds Keras 3 .weights.h5 data but is named {p.name}; Keras loads by "
                "suffix, so rename it to end in .weights.h5"
            )
    raise WeightFileError(
        f"{p}: no Keras weights found (expected a 'layer_names' attribute, 'model_weights' "
        "group or 'layers' group)"
    )


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
        ds = _get(f, p)
        if not isinstance(ds, h5py.Dataset):
            raise WeightFileError(f"{f.filename}: {p} is not a dataset")
        shapes.append(tuple(int(n) for n in ds.shape))
        dtypes.append(str(ds.dtype))
    roles = roles_of(name, tuple(paths), tuple(shapes), bn.get(name))
    return LayerEntry(name, tuple(paths), tuple(shapes), tuple(dtypes), roles)


def _read_legacy(f: Any, root: str, bn: BnFlags) -> tuple[LayerEntry, ...]:
    group = _get(f, root) if root else f
    names = _attr_list(group, "layer_names")
    if names is None:
        raise WeightFileError(f"{f.filename}: no 'layer_names' attribute under /{root}")
    entries = []
    for layer in names:
        g = _get(group, layer)
        weight_names = _attr_list(g, "weight_names") or []
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
            vars_group = _get(group, "vars")
            idx = sorted(vars_group, key=int)
            if idx:
                # Keras 3 records the layer's own name on the vars group; older files may not.
                name = _decode(vars_group.attrs.get("name", path.rsplit("/", 1)[-1]))
                entries.append(_entry(f, name, [f"{path}/vars/{i}" for i in idx], bn))
        if "layers" in group:
            layers = _get(group, "layers")
            for key in sorted(layers, key=_natural_key):
                child = _get(layers, key)
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
    g = _get(f, PROVENANCE_GROUP)
    return _json_attr(g, "provenance") or {}


def _zip_config(path: Path) -> dict[str, Any] | None:
    try:
        with zipfile.ZipFile(path) as z:
            if "config.json" not in z.namelist():
                return None
            value = json.loads(z.read("config.json").decode("utf8"))
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightFileError(f"{path}: unreadable config.json in .keras archive: {e}") from e
    return value if isinstance(value, dict) else None


def _describe(f: Any, p: Path, fmt: Format) -> WeightFile:
    from .keras_config import batchnorm_flags

    _refuse_links(f)
    if fmt == "legacy-h5-model":
        config = _json_attr(f, "model_config")
    else:
        config = _zip_config(p) if fmt == "keras-zip" else None
    bn = batchnorm_flags(config) if config is not None else {}
    if fmt in ("legacy-h5", "legacy-h5-model"):
        layers = _read_legacy(f, "model_weights" if fmt == "legacy-h5-model" else "", bn)
    else:
        layers = _read_keras3(f, bn)
    if not any(e.datasets for e in layers):
        raise WeightFileError(f"{p}: the file holds no layer with weights")
    return WeightFile(p, fmt, layers, config, _read_provenance(f))


def _touch_all(f: Any) -> None:
    """Parse every object header, attribute and dataset of the file that ``write_weights``
    copies, so that damage anywhere shows here, in the guarded child, not later in the writing
    process (a re-read of the weights, ~0.5 s for a VGG16 file)."""

    def visit(name: str, obj: Any) -> None:
        for key in obj.attrs:
            obj.attrs[key]
        if isinstance(obj, h5py.Dataset) and not name.startswith(_OPTIMIZER_GROUPS):
            obj[()]  # the data the writer copies (optimizer state is dropped, not copied)

    for key in f.attrs:
        f.attrs[key]
    f.visititems(visit)


def inspect_weights(path: str | os.PathLike[str]) -> WeightFile:
    """Describe a weight file (layout, layers, shapes, config, provenance) without its arrays.

    Read in a child process with a deadline (:mod:`vggnorm.guard`): a damaged file ends in one
    :class:`WeightFileError`, never a traceback or a hang."""
    with _scratch() as scratch:
        return run_guarded(_inspect_weights, Path(path), scratch, what=Path(path))


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """A folder for the guarded child's scratch files (a .keras member), owned by this process:
    removed even when the child is killed at its deadline."""
    with tempfile.TemporaryDirectory(prefix="vggnorm-") as tmp:
        yield Path(tmp)


def _inspect_weights(path: Path, scratch: Path | None = None) -> WeightFile:
    p = Path(path)
    fmt = detect_format(p)
    with _h5_of(p, fmt, scratch) as f:
        return _describe(f, p, fmt)


def read_weights(path: str | os.PathLike[str]) -> WeightSet:
    """Read every weight array of a Keras weight file, in any supported layout.

    Args:
        path: ``.h5``/``.hdf5`` (legacy, weights or whole model), ``.weights.h5`` or ``.keras``.

    Returns:
        A :class:`WeightSet`: the file's description and its arrays, keyed
        ``"<layer>/<role>"`` (``kernel``, ``bias``, ``gamma``, ``beta``, ``moving_mean``,
            ``moving_variance``; see :mod:`vggnorm.weightset`).

    Raises:
        WeightFileError: unreadable, damaged (read in a child process with a deadline, see
            :mod:`vggnorm.guard`) or unknown layout, links, or NaN/inf weights.

    Example:
        >>> ws = read_weights("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")  # doctest: +SKIP
        >>> ws.arrays["block1_conv1/kernel"].shape  # doctest: +SKIP
        (3, 3, 3, 64)
    """
    with _scratch() as scratch:
        return run_guarded(_read_weights, Path(path), scratch, what=Path(path))


def _read_weights(path: Path, scratch: Path | None = None) -> WeightSet:
    p = Path(path)
    fmt = detect_format(p)
    arrays: dict[str, np.ndarray] = {}
    with _h5_of(p, fmt, scratch) as f:  # one open (for .keras: one extraction) for both
        wf = _describe(f, p, fmt)
        _touch_all(f)  # every attribute the writer will copy is parsed here, in the child
        for entry in wf.layers:
            for key, ds_path in zip(entry.keys(), entry.datasets):
                try:
                    arr = np.asarray(_get(f, ds_path)[()])
                except OSError as e:
                    raise WeightFileError(f"{wf.path}: cannot read {ds_path}: {e}") from e
                if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                    raise WeightFileError(f"{wf.path}: {ds_path} holds NaN or infinite weights")
                if key in arrays:
                    raise WeightFileError(f"{wf.path}: two layers are both named {entry.name!r}")
                arrays[key] = arr
    return WeightSet(wf, arrays)


# ---------------------------------------------------------------------------------------------
# Writing


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def check_output_path(src: Path, dst: Path, force: bool) -> None:
    """Refuse outputs that would not load the way ``src`` does, overwrite it, or clobber a file."""
    if suffix_of(dst) != suffix_of(src) and {suffix_of(dst), suffix_of(src)} != {
        ".h5",
        ".hdf5",
    }:
        raise WeightFileError(
            f"--out {dst.name} must end in {suffix_of(src)} like --in {src.name}: Keras picks "
            "the loader by suffix, so the output keeps the input's format"
        )
    check_output(dst, force=force, inputs=[src], error=WeightFileError, need_bytes=_size(src))


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


def _patch_h5(
    src_h5: Path,
    dst_h5: Path,
    wf: WeightFile,
    arrays: Mapping[str, np.ndarray],
    provenance: Mapping[str, Any],
    extra: Mapping[str, np.ndarray],
) -> list[str]:
    where = wf.entry_of_key()
    with _open_h5(src_h5) as f_in, h5py.File(dst_h5, "w") as f_out:
        dropped = _copy_h5(f_in, f_out, (*_OPTIMIZER_GROUPS, PROVENANCE_GROUP))
        for key, value in arrays.items():
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
        g.attrs["provenance"] = json.dumps(dict(provenance), sort_keys=True)
        for name, value in extra.items():
            g.create_dataset(name, data=value)
    return [d for d in dropped if d != PROVENANCE_GROUP]


def write_weights(
    src: WeightFile,
    dst: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    provenance: Mapping[str, Any],
    extra: Mapping[str, np.ndarray] | None = None,
    *,
    force: bool = False,
) -> list[str]:
    """Write ``src`` to ``dst`` with ``arrays`` replacing the datasets they name.

    Every other group, dataset and attribute is copied unchanged; shapes and dtypes must match the
    source's. ``provenance`` (JSON-serialisable) becomes the ``vggnorm/provenance`` attribute and
    ``extra`` arrays become datasets under ``vggnorm/``. The write is atomic.

    Args:
        src: the source file's description, from :func:`inspect_weights` or :func:`read_weights`.
        dst: target path; its suffix must load the same way as the source's.
        arrays: replacement arrays keyed as in :meth:`LayerEntry.keys`.
        provenance: what produced this file.
        extra: additional arrays to keep beside the provenance (e.g. the scales used).
        force: overwrite an existing ``dst``.

    Returns:
        Names of the groups that were dropped (optimizer state), for the caller to report.

    Raises:
        WeightFileError: bad target, mismatched array, or an I/O error (disk full...). Nothing is
            left under ``dst`` when this is raised.
    """
    _need_h5py()
    dst_path = Path(dst)
    check_output_path(src.path, dst_path, force)
    extra = extra or {}
    try:
        with output_lock(dst_path), atomic_path(dst_path) as tmp:
            if src.format != "keras-zip":
                return _patch_h5(src.path, tmp, src, arrays, provenance, extra)
            return _write_keras_zip(src, tmp, dst_path, arrays, provenance, extra)
    except OSError as e:
        raise WeightFileError(f"could not write {dst_path}: {e.strerror or e}") from e
    except (RuntimeError, KeyError, ValueError) as e:  # h5py on a source damaged since it was read
        raise WeightFileError(f"{src.path}: unreadable while copying it: {e}") from e


def _write_keras_zip(
    src: WeightFile,
    tmp: Path,
    target: Path,
    arrays: Mapping[str, np.ndarray],
    provenance: Mapping[str, Any],
    extra: Mapping[str, np.ndarray],
) -> list[str]:
    with temp_dir_beside(target) as work:
        inner_in, inner_out = Path(work) / "in.h5", Path(work) / "out.h5"
        with zipfile.ZipFile(src.path) as z_in:
            with z_in.open(_KERAS_ZIP_WEIGHTS) as s, open(inner_in, "wb") as d:
                shutil.copyfileobj(s, d, 1 << 20)
            dropped = _patch_h5(inner_in, inner_out, src, arrays, provenance, extra)
            with zipfile.ZipFile(tmp, "w") as z_out:
                for info in z_in.infolist():
                    if info.filename == _KERAS_ZIP_WEIGHTS:
                        z_out.write(inner_out, _KERAS_ZIP_WEIGHTS, compress_type=info.compress_type)
                    else:
                        z_out.writestr(info, z_in.read(info.filename))
    return dropped
