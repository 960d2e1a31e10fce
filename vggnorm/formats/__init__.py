"""Files: weight-file adapters (one module per container, registered in :mod:`.registry`), the
stats file, the guarded reader every untrusted file goes through, and the rules for writing
outputs. Imports :mod:`vggnorm.core` only."""

from .digest import sha256_file
from .registry import (
    ADAPTERS,
    detect_format,
    inspect_weights,
    load,
    read_scales,
    read_weights,
    write_weights,
)

__all__ = ["ADAPTERS", "detect_format", "inspect_weights", "load", "read_scales", "read_weights",
           "sha256_file", "write_weights"]  # fmt: skip
