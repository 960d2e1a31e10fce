"""What every weight-file writer shares: the patch it applies to a copy of its source, the checks
it makes before writing anything, and the provenance as str -> str metadata for the containers
that keep metadata as text (safetensors headers, ``.pth`` sidecars, MatConvNet and ONNX files)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import WeightFileError
from ..core.weightset import suffix_of
from .outputs import check_output

#: Metadata keys vggnorm writes: its provenance (JSON) and the per-layer scales (JSON lists).
PROVENANCE_KEY = "vggnorm.provenance"
SCALES_KEY = "vggnorm.scales"


@dataclass(frozen=True)
class Patch:
    """What a writer changes in a copy of a weight file.

    Attributes:
        arrays: replacement arrays keyed ``<layer>/<role>``; same shapes and dtypes as stored.
        provenance: what produced the file (JSON-serialisable), stored with it.
        extra: arrays kept beside the provenance (the scales used), by relative name.
    """

    arrays: Mapping[str, np.ndarray]
    provenance: Mapping[str, Any]
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)


def check_target(
    src: Path, dst: Path, force: bool, same_format: Callable[[Path], bool], why: str | None = None
) -> None:
    """Refuse, before anything is written, an output of another format than ``src``'s, an
    output that is the input or exists (without ``force``), or one that cannot be written (the
    space ``src`` takes must be free)."""
    if not same_format(dst):
        reason = why or "vggnorm writes a file in the format of its input"
        raise WeightFileError(f"{dst.name} must end in {suffix_of(src)} like {src.name}: {reason}",
                              fix=None if why else "export")  # fmt: skip
    check_output(dst, force=force, inputs=[src], error=WeightFileError, need_bytes=_size(src))


def _size(path: Path) -> int:
    try:
        return max(path.stat().st_size, 1 << 20)
    except OSError:
        return 1 << 20


def check_finite(arrays: Mapping[str, np.ndarray], dst: Path) -> None:
    """Refuse to write NaN or infinite values (finite positive scales never make them)."""
    for key, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise WeightFileError(f"{dst}: refusing to write {key}: NaN or infinite values")


def metadata(patch: Patch) -> dict[str, str]:
    """A patch's provenance and extra arrays as str -> str metadata."""
    out = {PROVENANCE_KEY: json.dumps(dict(patch.provenance), sort_keys=True)}
    if patch.extra:
        out[SCALES_KEY] = json.dumps({k: np.asarray(v).tolist() for k, v in patch.extra.items()})
    return out
