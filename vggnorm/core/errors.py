"""The one exception family vggnorm raises on purpose.

The CLI turns any :class:`VggnormError` into a one-line ``ERROR ...`` message and the class's
``exit_code`` (1; :class:`VerificationError` 3; :class:`Interrupted` 130). Anything else escaping
is a bug.
"""

from __future__ import annotations


class VggnormError(Exception):
    """Base class: a problem with the user's input, files or environment.

    The message says what is wrong in the library's terms. ``fix`` names, when there is one, the
    kind of remedy (``"force"``: allow overwriting; ``"resume"``: continue the saved run;
    ``"stats"``: name the stats file; ``"split"``: choose a COCO split; ``"images"``: name two
    images; ``"settings"``: rerun with the saved run's settings; ``"memory"``: a smaller memory
    budget or batch; ``"ray"``: run on Ray instead of a shard; ``"preprocess"``: name the input
    convention; ``"export"``: convert with ``vggnorm export``; ``"gather"``: run ``vggnorm stats``
    first), which the CLI turns into the flag to pass; remedies joined by ``+`` apply together.
    It survives pickling (the guarded reader sends errors across processes).
    """

    exit_code = 1

    def __init__(self, message: str = "", *, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


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

    exit_code = 3


class Interrupted(VggnormError):
    """The run was interrupted by a signal; what was gathered has been saved."""

    exit_code = 130


class OutputError(VggnormError):
    """An output cannot be written: exists, is an input, locked by another run, no space."""


class OutOfMemoryError(VggnormError):
    """The device or the host ran out of memory during a forward pass (names the image size, the
    batch and the estimated peak)."""
