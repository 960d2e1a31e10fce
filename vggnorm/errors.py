"""The one exception family vggnorm raises on purpose.

The CLI turns any :class:`VggnormError` into a one-line ``ERROR ...`` message and exit code 1
(:class:`VerificationError`: exit code 3). Anything else escaping is a bug.
"""

from __future__ import annotations


class VggnormError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class WeightFileError(VggnormError):
    """A weights file is missing, unreadable, of an unknown layout or does not fit the model."""


class ArchitectureError(VggnormError):
    """The model cannot be normalized exactly (names the offending layer)."""


class DatasetError(VggnormError):
    """The image dataset cannot be found or read, or holds no usable image."""


class StatsError(VggnormError):
    """A stats file is unreadable, incomplete, or does not match the weights or settings."""


class VerificationError(VggnormError):
    """A normalized file does not compute the same function or its means are not 1."""


class Interrupted(VggnormError):
    """The run was interrupted by a signal; what was gathered has been saved."""
