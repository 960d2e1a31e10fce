"""The per-filter factors ``vggnorm scales`` writes, in the container the target's suffix names:

``.json``
    one object: each layer name -> its list of factors (float64 as JSON numbers), and
    ``"__metadata__"`` -> what produced them.
``.npz``
    one float64 array per layer name, and ``__metadata__``: the same JSON as a 0-d string.
``.safetensors``
    one float32 tensor per layer name; the metadata in the header (``vggnorm.provenance``).
``.pt`` / ``.pth``
    ``torch.save`` of a dict: one float32 tensor per layer name, and ``"__metadata__"`` -> the
    JSON string (``torch.load(weights_only=True)`` reads both).

float32 in the PyTorch containers: the precision of the features they multiply (a float64
factor would promote them to float64). Every write is atomic.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import OutputError
from . import pth, safetensors_file
from ._patch import PROVENANCE_KEY
from .outputs import atomic_path

SUFFIXES = (".json", ".npz", ".safetensors", ".pt", ".pth")
METADATA_KEY = "__metadata__"


def check_suffix(path: Path) -> str:
    """The target's suffix, or :class:`OutputError` naming the ones this file can have."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise OutputError(f"{path}: a scales file ends in {', '.join(SUFFIXES)}")
    return suffix


def write_scales_file(
    path: Path, factors: Mapping[str, np.ndarray], metadata: Mapping[str, Any]
) -> Path:
    """Write ``factors`` (layer name -> float64 per filter) and ``metadata`` to ``path``.

    Raises:
        OutputError: an unknown suffix.
        ImportError: ``.pt``/``.pth`` without torch.
    """
    suffix = check_suffix(path)
    meta = json.dumps(dict(metadata), sort_keys=True, default=str)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in factors.items()}
    with atomic_path(path, suffix=suffix) as tmp:
        if suffix == ".json":
            body = {k: v.tolist() for k, v in arrays.items()}
            body[METADATA_KEY] = json.loads(meta)
            tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf8")
        elif suffix == ".npz":
            payload: dict[str, Any] = {**arrays, METADATA_KEY: np.array(meta)}
            with open(tmp, "wb") as fh:
                np.savez(fh, **payload)
        elif suffix == ".safetensors":
            state = {k: v.astype(np.float32) for k, v in arrays.items()}
            safetensors_file.write_arrays(tmp, state, {PROVENANCE_KEY: meta})
        else:
            pth.write_tensors(tmp, {k: v.astype(np.float32) for k, v in arrays.items()},
                              {METADATA_KEY: meta})  # fmt: skip
    return path
