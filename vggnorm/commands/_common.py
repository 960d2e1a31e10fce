"""What the commands share: the clock and the provenance every output records. Commands import
this module and the layers below, never each other."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

from .._version import __version__
from ..formats.digest import sha256_file


def now() -> str:
    """The current UTC time, ISO 8601 to the second (for provenance)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def file_record(path: str | os.PathLike[str], fmt: str | None = None) -> dict[str, Any]:
    """A file as provenance names it: absolute path, sha256 and (for weights) format."""
    record: dict[str, Any] = {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}
    if fmt is not None:
        record["format"] = fmt
    return record


def provenance(operation: str, **fields: Any) -> dict[str, Any]:
    """The provenance record of an output: the tool, its version, the time, what was done, and
    the command's own ``fields`` (its inputs, settings and results). The one place it is built."""
    return {"tool": "vggnorm", "tool_version": __version__, "created": now(),
            "operation": operation, **fields}  # fmt: skip
