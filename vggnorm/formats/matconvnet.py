"""MatConvNet VGG files (``imagenet-vgg-verydeep-16.mat``, ``-19.mat``), read and written with
``scipy.io``: the only module that imports scipy.

What ``scipy.io.loadmat`` gives (default options, which the code that reads these files uses):
``layers`` is a 1 x L cell array (an object array) of 1 x 1 structs, each with ``type``
(``conv``, ``relu``, ``pool``, ``softmax``, ``dropout``), ``name`` and, for a conv, ``weights``:
a 1 x 2 cell ``{W, b}`` with W width x height x in x out (readers transpose the first two axes
to height x width; the Caffe -> MatConvNet importer wrote them so), ``pad`` and ``stride``; a pool
has ``method``, ``pool``, ``stride`` and ``pad``. fc6-fc8 are convs (7x7 without padding, then
1x1). The input is RGB in 0-255 minus ``normalization.averageImage`` (older files) or
``meta.normalization.averageImage`` (newer): the caffe ImageNet mean in RGB order.

vggnorm reads the chain into an :class:`~vggnorm.core.archs.Arch` with its own layer names
(``block1_conv1``, ..., ``fc1``), the first conv's input channels reversed so that it reads
caffe's BGR input (a permutation, exact, undone on writing), and the fc convs as Dense kernels in
(H, W, C) row order. Writing loads the source again, replaces W and b in place (same shapes and
dtypes), adds two char variables (``vggnorm_provenance``, ``vggnorm_scales``: JSON) and saves it
with the same structure and field order, so ``loadmat(...)["layers"][0][i][0][0][0][0][0]`` still
gives conv i's W. Reads and writes of the untrusted file run in a guarded child (:mod:`._guard`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.archs import Arch, ConvSpec, DenseSpec, HeadSpec, PoolSpec
from ..core.errors import WeightFileError
from ..core.inputs import CAFFE_MEAN_BGR
from ..core.weightset import Format, LayerEntry, WeightFile, WeightSet
from . import _patch, _torch
from ._guard import run_guarded
from ._patch import Patch
from .outputs import atomic_path

SUFFIXES = (".mat",)
FORMAT: Format = "matconvnet"
#: Top-level variables vggnorm adds to a file it writes (JSON text).
PROVENANCE_VAR = "vggnorm_provenance"
SCALES_VAR = "vggnorm_scales"
_INSTALL = "pip install 'vggnorm[mat]'"
_PRELOAD = ("scipy.io",)
#: Layer types vggnorm follows; anything else is refused naming the layer.
_KNOWN = ("conv", "relu", "pool", "softmax", "dropout")


def detect(path: Path) -> bool:
    """Whether this adapter reads ``path``: a ``.mat`` suffix."""
    return path.suffix.lower() in SUFFIXES


def _loadmat(path: Path) -> dict[str, Any]:
    """The file's variables as ``scipy.io.loadmat`` returns them (run in the guarded child)."""
    import scipy.io

    try:
        data = scipy.io.loadmat(str(path))
    except NotImplementedError as e:  # v7.3 files are HDF5
        raise WeightFileError(
            f"{path}: a MATLAB v7.3 (HDF5) file; MatConvNet's models are v5/v7 files (save "
            f"with -v7) ({_torch.one_line(e)})"
        ) from e
    return {k: v for k, v in data.items() if not k.startswith("__")}


def _text(value: Any) -> str:
    """A MATLAB char array as loadmat returns it (``array(['conv1_1'])``), as a str."""
    arr = np.asarray(value)
    return str(arr.flat[0]) if arr.size and arr.dtype.kind == "U" else ""


def _numbers(value: Any) -> tuple[float, ...]:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        return ()
    return tuple(float(x) for x in arr.ravel())


def _field(record: Any, name: str) -> Any:
    """Field ``name`` of a 1 x 1 struct as loadmat returns it, or None."""
    arr = np.asarray(record)
    if arr.dtype.names is None or name not in arr.dtype.names or arr.size != 1:
        return None
    return arr.flat[0][name]


def _layer_records(data: Mapping[str, Any], path: Path) -> list[Any]:
    layers = data.get("layers")
    if layers is None:
        raise WeightFileError(f"{path}: no 'layers' variable: not a MatConvNet model")
    arr = np.asarray(layers)
    if arr.dtype != object or arr.ndim != 2 or arr.shape[0] != 1:
        raise WeightFileError(
            f"{path}: 'layers' is a {arr.dtype} array of shape {arr.shape}, expected a 1 x L cell "
            "array of structs (vl_simplenn); DagNN models are not read"
        )
    return list(arr[0])


@dataclass
class _Chain:
    """What the layer list holds, in order: the Arch's layers, the arrays and where they live."""

    path: Path
    features: list[ConvSpec | PoolSpec] = field(default_factory=list)
    head: list[DenseSpec] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    # canonical key -> (layer index, 0 for W / 1 for b, the shape stored)
    places: dict[str, tuple[int, int, tuple[int, ...]]] = field(default_factory=dict)
    native: dict[str, str] = field(default_factory=dict)
    block: int = 1
    index: int = 0
    softmax: bool = False

    def refuse(self, i: int, name: str, why: str) -> WeightFileError:
        return WeightFileError(f"{self.path}: layer {i + 1} ({name!r}) {why}")


def _weights(chain: _Chain, i: int, name: str, rec: Any) -> tuple[np.ndarray, np.ndarray]:
    cell = _field(rec, "weights")
    if cell is not None and np.asarray(cell).dtype == object and np.asarray(cell).size == 2:
        w, b = (np.asarray(x) for x in np.asarray(cell).ravel())
    elif _field(rec, "filters") is not None and _field(rec, "biases") is not None:  # older files
        w, b = np.asarray(_field(rec, "filters")), np.asarray(_field(rec, "biases"))
    else:
        raise chain.refuse(i, name, "is a conv without its weights {W, b}")
    if w.dtype.kind != "f" or b.dtype.kind != "f" or w.ndim > 4:
        raise chain.refuse(i, name, f"has weights of type {w.dtype}/{b.dtype}, shape {w.shape}")
    w = w.reshape(tuple(w.shape) + (1,) * (4 - w.ndim))  # MATLAB drops trailing singleton dims
    filters = int(np.shape(w)[-1])
    if b.size != filters or not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
        raise chain.refuse(i, name, f"has {b.size} biases for {filters} filters, or NaN/inf")
    return w, b


def _geometry(chain: _Chain, i: int, name: str, rec: Any, what: str) -> tuple[float, ...]:
    """``pad`` (4 numbers) and ``stride`` (2), each given as one number or in full."""
    pad = _numbers(_field(rec, "pad") if _field(rec, "pad") is not None else 0)
    stride = _numbers(_field(rec, "stride") if _field(rec, "stride") is not None else 1)
    dilate = _numbers(_field(rec, "dilate") if _field(rec, "dilate") is not None else 1)
    if len(pad) not in (1, 4) or len(stride) not in (1, 2) or set(dilate) - {1.0}:
        raise chain.refuse(i, name, f"is a {what} with pad {pad}, stride {stride}, dilate {dilate}")
    return (*(pad * 4 if len(pad) == 1 else pad), *(stride * 2 if len(stride) == 1 else stride))


def _conv(chain: _Chain, i: int, name: str, rec: Any, relu: bool) -> None:
    w, b = _weights(chain, i, name, rec)
    geometry = _geometry(chain, i, name, rec, "conv")
    kh, kw = w.shape[1], w.shape[0]
    after_pool = bool(chain.features) and isinstance(chain.features[-1], PoolSpec)
    if chain.head or (after_pool and set(geometry[:4]) == {0.0}):  # fc6: a conv over the map
        return _dense(chain, i, name, w, b, geometry)
    same = set(geometry[:4]) == {(kh - 1) / 2} and kh == kw and kh % 2 == 1
    if not same or geometry[4:] != (1.0, 1.0) or not relu:
        raise chain.refuse(i, name, f"is a {kh}x{kw} conv with pad/stride {geometry} "
                                    f"{'' if relu else 'and no ReLU after it '}in the conv chain:"
                                    " vggnorm follows 'same' ReLU convs only")  # fmt: skip
    chain.index += 1
    ours = f"block{chain.block}_conv{chain.index}"
    kernel = w.transpose(1, 0, 2, 3)
    if not chain.features:
        kernel = kernel[:, :, ::-1, :]  # RGB -> BGR input channels: caffe's order
    chain.features.append(ConvSpec(ours, int(w.shape[3]), (kh, kw)))
    _keep(chain, i, ours, kernel, b, w.shape)
    chain.native[ours] = name
    return None


def _dense(
    chain: _Chain, i: int, name: str, w: np.ndarray, b: np.ndarray, geometry: tuple[float, ...]
) -> None:
    """An fc layer stored as a conv: without padding, the first over the whole last map, the
    others 1x1."""
    if set(geometry[:4]) != {0.0} or w.shape[0] != w.shape[1] or (chain.head and w.shape[:2] != (1, 1)):
        raise chain.refuse(i, name, f"is an fc conv of shape {w.shape} with pad/stride {geometry}")
    if not chain.features:
        raise chain.refuse(i, name, "is an fc layer before any conv")
    ours = f"fc{len(chain.head) + 1}"
    kernel = w.transpose(1, 0, 2, 3).reshape(-1, w.shape[3])  # rows in (H, W, C) order
    chain.head.append(DenseSpec(ours, int(w.shape[3]), "linear"))
    _keep(chain, i, ours, kernel, b, w.shape)
    chain.native[ours] = name


def _keep(
    chain: _Chain, i: int, ours: str, kernel: np.ndarray, b: np.ndarray, stored: tuple[int, ...]
) -> None:
    chain.arrays[f"{ours}/kernel"] = np.array(kernel, order="C", copy=True)
    chain.arrays[f"{ours}/bias"] = np.array(b.ravel(), copy=True)
    chain.places[f"{ours}/kernel"] = (i, 0, tuple(stored))
    chain.places[f"{ours}/bias"] = (i, 1, tuple(b.shape))


def _pool(chain: _Chain, i: int, name: str, rec: Any) -> None:
    method = _text(_field(rec, "method")) or "max"
    size = _numbers(_field(rec, "pool") if _field(rec, "pool") is not None else ())
    geometry = _geometry(chain, i, name, rec, "pool")
    if chain.head or method not in ("max", "avg") or size != (2.0, 2.0) or geometry != (
        0.0, 0.0, 0.0, 0.0, 2.0, 2.0
    ):  # fmt: skip
        raise chain.refuse(i, name, f"is a {method} pool of size {size} with pad/stride "
                                    f"{geometry}: vggnorm follows 2x2 pooling of stride 2")  # fmt: skip
    chain.features.append(PoolSpec(f"block{chain.block}_pool", "max" if method == "max" else "avg"))
    chain.block, chain.index = chain.block + 1, 0


def _walk(records: list[Any], path: Path) -> _Chain:
    """Follow the layer list; anything vggnorm cannot rescale exactly is refused naming it."""
    chain = _Chain(path)
    types = [_text(_field(r, "type")) for r in records]
    names = [_text(_field(r, "name")) or f"layer{i + 1}" for i, r in enumerate(records)]
    for i, kind in enumerate(types):
        if kind not in _KNOWN:
            raise chain.refuse(i, names[i], f"has type {kind!r}: vggnorm follows {', '.join(_KNOWN)}")
    for i, rec in enumerate(records):
        name, kind = names[i], types[i]
        nxt = types[i + 1] if i + 1 < len(types) else ""
        if chain.softmax:
            raise chain.refuse(i, name, "follows the softmax")
        if kind == "conv":
            _conv(chain, i, name, rec, nxt == "relu")
        elif kind == "pool":
            _pool(chain, i, name, rec)
        elif kind == "relu" and chain.head and types[i - 1] == "conv":
            chain.head[-1] = DenseSpec(chain.head[-1].name, chain.head[-1].units, "relu")
        elif kind == "relu" and (i == 0 or types[i - 1] != "conv"):
            raise chain.refuse(i, name, "is a ReLU that does not follow a conv")
        elif kind == "softmax":
            if not chain.head or types[i - 1] != "conv":
                raise chain.refuse(i, name, "is a softmax that does not end the fc layers")
            chain.head[-1] = DenseSpec(chain.head[-1].name, chain.head[-1].units, "softmax")
            chain.softmax = True
    if not any(isinstance(f, ConvSpec) for f in chain.features):
        raise WeightFileError(f"{path}: no conv layer in 'layers'")
    return chain


def _average_image(data: Mapping[str, Any], path: Path) -> tuple[float, ...]:
    """The per-channel mean the inputs lose: ``averageImage``, constant over the image."""
    meta = data.get("meta")
    norm = _field(meta, "normalization") if meta is not None else data.get("normalization")
    avg = _field(norm, "averageImage") if norm is not None else None
    if avg is None:
        raise WeightFileError(f"{path}: no normalization.averageImage: vggnorm cannot tell the input")
    arr = np.asarray(avg, dtype=np.float64)
    if arr.size % 3 or arr.dtype.kind != "f":
        raise WeightFileError(f"{path}: normalization.averageImage has shape {arr.shape}")
    pixels = arr.reshape(-1, 3) if arr.ndim != 2 or arr.shape[0] != 3 else arr.T.reshape(-1, 3)
    if np.ptp(pixels, axis=0).max() > 1e-3:
        raise WeightFileError(
            f"{path}: normalization.averageImage varies across the image; vggnorm subtracts one "
            "mean per channel"
        )
    return tuple(float(v) for v in pixels[0])


def _preprocess(data: Mapping[str, Any], path: Path) -> str:
    """``caffe`` when the average image is the caffe ImageNet mean (in RGB order): with the
    first conv read as BGR, the network is then exactly Keras's caffe-input VGG."""
    mean = _average_image(data, path)
    # float32 storage of the published values: equal to a few ulps of 124
    if np.allclose(mean, CAFFE_MEAN_BGR[::-1], rtol=0, atol=1e-3):
        return "caffe"
    raise WeightFileError(
        f"{path}: its inputs are RGB minus {tuple(round(m, 3) for m in mean)}, not the caffe "
        f"ImageNet mean {CAFFE_MEAN_BGR[::-1]}; vggnorm has no preprocessing for that"
    )


def _describe(path: Path) -> tuple[WeightSet, dict[str, tuple[int, int, tuple[int, ...]]]]:
    """The file read into vggnorm's arrays, and where each array lives in the layer list."""
    data = _loadmat(path)
    chain = _walk(_layer_records(data, path), path)
    head = None
    if chain.head:
        last = next(f for f in reversed(chain.features) if isinstance(f, ConvSpec)).filters
        side = int(round((chain.arrays["fc1/kernel"].shape[0] // last) ** 0.5))
        pools = sum(isinstance(f, PoolSpec) for f in chain.features)
        head = HeadSpec("flatten", tuple(chain.head), side * 2**pools, "hwc")
    arch = Arch(_arch_name(chain), tuple(chain.features), head)
    layers = tuple(
        LayerEntry(layer, (f"{layer}/kernel", f"{layer}/bias"),
                   tuple(chain.arrays[f"{layer}/{r}"].shape for r in ("kernel", "bias")),
                   tuple(str(chain.arrays[f"{layer}/{r}"].dtype) for r in ("kernel", "bias")),
                   ("kernel", "bias"))
        for layer in chain.native
    )  # fmt: skip
    provenance = _json_var(data, PROVENANCE_VAR, path)
    wf = WeightFile(path, FORMAT, layers, None, provenance, FORMAT, _preprocess(data, path),
                    arch=arch, native_names=tuple(chain.native.items()))  # fmt: skip
    return WeightSet(wf, chain.arrays), chain.places


def _arch_name(chain: _Chain) -> str:
    convs = sum(isinstance(f, ConvSpec) for f in chain.features)
    return {13: "vgg16", 16: "vgg19"}.get(convs, f"matconvnet-{convs}convs")


def _json_var(data: Mapping[str, Any], name: str, path: Path) -> Any:
    if name not in data:
        return None
    try:
        return json.loads(_text(data[name]))
    except ValueError as e:
        raise WeightFileError(f"{path}: unreadable {name}: {e}") from e


def _read(path: Path) -> WeightSet:
    return _describe(path)[0]


def read(path: str | os.PathLike[str]) -> WeightSet:
    """The file as a :class:`~vggnorm.core.weightset.WeightSet` (guarded child, one error line).

    Raises:
        WeightFileError: not a MatConvNet VGG (the message names the layer vggnorm cannot follow),
            damaged, or inputs that are not the caffe ImageNet mean.
        ImportError: scipy is not installed.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightFileError(f"{p}: no such file")
    _need_scipy()
    return run_guarded(_read, p, what=p, preload=_PRELOAD)


def _need_scipy() -> None:
    import importlib.util

    if importlib.util.find_spec("scipy") is None:
        raise ImportError(f"MatConvNet .mat files need scipy: {_INSTALL}")


def read_scales(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The per-layer scales vggnorm stored in the file, by layer name."""
    p = Path(path)
    raw = run_guarded(_scales_text, p, what=p, preload=_PRELOAD)
    return _torch.scales_of({_patch.SCALES_KEY: raw} if raw is not None else {}, p)


def _scales_text(path: Path) -> str | None:
    data = _loadmat(path)
    return _text(data[SCALES_VAR]) if SCALES_VAR in data else None


def _write_patched(src: Path, tmp: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> None:
    """Load ``src``, put ``arrays`` in place of its W and b, add the metadata, save to ``tmp``
    (run in the guarded child)."""
    import scipy.io

    data = _loadmat(src)
    _, places = _describe(src)
    records = _layer_records(data, src)
    for key, value in arrays.items():
        i, slot, shape = places[key]
        stored = _stored(key, value, shape, first=key.startswith("block1_conv1/"))
        cell = _field(records[i], "weights")
        if cell is not None and np.asarray(cell).dtype == object:
            target = np.asarray(cell).ravel()
            old = np.asarray(target[slot])
            target[slot] = stored.astype(old.dtype).reshape(old.shape)
        else:  # older files: filters / biases
            rec = np.asarray(records[i]).flat[0]
            name = "filters" if slot == 0 else "biases"
            rec[name] = stored.astype(np.asarray(rec[name]).dtype).reshape(np.shape(rec[name]))
    data[PROVENANCE_VAR] = meta[_patch.PROVENANCE_KEY]
    if _patch.SCALES_KEY in meta:
        data[SCALES_VAR] = meta[_patch.SCALES_KEY]
    scipy.io.savemat(str(tmp), data, format="5", oned_as="row")


def _stored(key: str, value: np.ndarray, shape: tuple[int, ...], first: bool) -> np.ndarray:
    """A canonical array back in the file's layout: W width x height x in x out, b as stored."""
    if not key.endswith("/kernel"):
        return np.asarray(value).reshape(shape)
    w = np.asarray(value)
    if w.ndim == 2:  # an fc layer: (H*W*C, out) rows in (H, W, C) order
        w = w.reshape(shape[1], shape[0], shape[2], shape[3])
    elif first:
        w = w[:, :, ::-1, :]  # back to RGB input channels
    return w.transpose(1, 0, 2, 3)


def check_target(src: Path, dst: Path, force: bool) -> None:
    """Refuse an output of another format, over the input or an existing file, or unwritable."""
    _patch.check_target(src, dst, force, detect)


def write(src: WeightFile, dst: Path, patch: Patch, force: bool) -> list[str]:
    """``src`` with ``patch`` applied, same structure; provenance and scales as char variables.
    Returns ``[]``: nothing is dropped."""
    check_target(src.path, dst, force)
    meta = _patch.metadata(patch)
    with atomic_path(dst, suffix=".mat") as tmp:
        run_guarded(_write_patched, src.path, tmp, dict(patch.arrays), meta, what=src.path,
                    preload=_PRELOAD)  # fmt: skip
    return []


def _struct(**fields: Any) -> np.ndarray:
    """A 1 x 1 MATLAB struct, fields in the order given (what loadmat returns and savemat writes)."""
    out = np.empty((1, 1), dtype=[(k, object) for k in fields])
    for k, v in fields.items():
        out[0, 0][k] = v
    return out


def _cell(*items: Any) -> np.ndarray:
    out = np.empty((1, len(items)), dtype=object)
    for i, item in enumerate(items):
        out[0, i] = item
    return out


def _conv_record(name: str, w_hwio: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    """A conv as the Caffe -> MatConvNet importer wrote it: ``weights`` first, W width x height."""
    w = np.ascontiguousarray(np.asarray(w_hwio).transpose(1, 0, 2, 3))
    return _struct(weights=_cell(w, np.asarray(b).reshape(1, -1)), pad=np.full((1, 4), float(pad)),
                   type=np.array(["conv"]), name=np.array([name]), stride=np.ones((1, 2)))  # fmt: skip


def _new_layers(arch: Arch, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The ``layers`` cell of ``arch`` (plain 3x3 ReLU convs, 2x2 pools, a Flatten head of fc
    layers reading the map in (H, W, C) order) from vggnorm's arrays."""
    layers: list[np.ndarray] = []
    block, i = 1, 0
    for f in arch.features:
        if isinstance(f, ConvSpec):
            i += 1
            kernel = arrays[f"{f.name}/kernel"]
            if block == i == 1:
                kernel = kernel[:, :, ::-1, :]  # caffe's BGR input -> MatConvNet's RGB
            layers += [_conv_record(f"conv{block}_{i}", kernel, arrays[f"{f.name}/bias"], 1),
                       _struct(type=np.array(["relu"]), name=np.array([f"relu{block}_{i}"]))]  # fmt: skip
        else:
            layers.append(_struct(name=np.array([f"pool{block}"]), stride=np.full((1, 2), 2.0),
                                  pad=np.zeros((1, 4)), type=np.array(["pool"]),
                                  method=np.array([f.kind]), pool=np.full((1, 2), 2.0)))  # fmt: skip
            block, i = block + 1, 0
    c = next(f.filters for f in reversed(arch.features) if isinstance(f, ConvSpec))
    for j, dense in enumerate(arch.head.dense if arch.head else (), start=6):
        kernel = arrays[f"{dense.name}/kernel"]
        side = int(round((kernel.shape[0] // c) ** 0.5))
        hwio = kernel.reshape(side, side, c, kernel.shape[1])
        layers.append(_conv_record(f"fc{j}", hwio, arrays[f"{dense.name}/bias"], 0))
        last = dense is arch.head.dense[-1]  # type: ignore[union-attr]
        layers.append(_struct(type=np.array(["softmax" if last else "relu"]),
                              name=np.array(["prob" if last else f"relu{j}"])))  # fmt: skip
        c = kernel.shape[1]
    return layers


def write_new(
    path: Path, arch: Arch, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> Path:
    """A MatConvNet file of ``arch`` (a stock VGG's chain, caffe input) written from vggnorm's
    arrays as ``imagenet-vgg-verydeep-16.mat`` is laid out: ``layers``, then ``normalization``
    whose first field is the 224 x 224 x 3 average image (the caffe mean, RGB), as the public
    readers index it; the provenance in ``vggnorm_provenance``. Atomic.

    Raises:
        WeightFileError: not a ``.mat`` target, or NaN/inf values.
        ImportError: scipy is not installed.
    """
    _need_scipy()
    if not detect(path):
        raise WeightFileError(f"{path}: a MatConvNet file ends in .mat")
    _patch.check_finite(arrays, path)
    import scipy.io

    mean = np.asarray(CAFFE_MEAN_BGR[::-1], np.float32)
    data = {
        "layers": _cell(*_new_layers(arch, arrays)),
        "normalization": _struct(
            averageImage=np.ascontiguousarray(np.broadcast_to(mean, (224, 224, 3))),
            keepAspect=np.ones((1, 1)), border=np.array([[32.0, 32.0]]),
            imageSize=np.array([[224.0, 224.0, 3.0]]), interpolation=np.array(["bilinear"])),
        PROVENANCE_VAR: metadata.get(_patch.PROVENANCE_KEY, "{}"),
    }  # fmt: skip
    with atomic_path(path, suffix=".mat") as tmp:
        scipy.io.savemat(str(tmp), data, format="5", oned_as="row")
    return path
