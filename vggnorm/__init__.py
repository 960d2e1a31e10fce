"""vggnorm: normalize VGG weights (Keras or PyTorch files) so every conv filter's mean activation is 1.

Gatys et al. rescale VGG so that per-layer style and content losses have comparable magnitudes.
The rescaling is exact: ReLU is positively homogeneous and pooling commutes with a positive
per-channel scale, so dividing a filter by its mean and multiplying the next layer's matching
input channel by it leaves the network's function unchanged.

The package is layered (docs/architecture.md): ``core`` (pure numpy), ``formats`` (files),
``runtime`` (images, the network, engines), ``commands`` (one module per CLI command), ``cli``.

Example:
    >>> import vggnorm  # doctest: +SKIP
    >>> record = vggnorm.collect_stats("vgg16.h5", "coco/", out="vggnorm-stats.h5")  # doctest: +SKIP
    >>> vggnorm.normalize("vgg16.h5", "vgg16_norm.h5", record)  # doctest: +SKIP
    >>> vggnorm.verify("vgg16_norm.h5").ok  # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__

# Public names and the module that defines each. Imported on first use, so that
# `import vggnorm.core.stats` stays numpy-only and `vggnorm --help` starts instantly.
_EXPORTS = {
    "collect_stats": "commands.stats",
    "StatsOptions": "commands.stats",
    "normalize": "commands.apply",
    "verify": "commands.verify",
    "compare_files": "commands.compare",
    "export": "commands.export",
    "merge_files": "commands.merge",
    "write_scales": "commands.scales",
    "compute_scales": "core.rescale",
    "rescale": "core.rescale",
    "StatsRecord": "core.statsrecord",
    "read_stats": "formats.statsfile",
    "write_stats": "formats.statsfile",
    "read_weights": "formats.registry",
    "write_weights": "formats.registry",
    "ArchitectureError": "core.errors",
    "DatasetError": "core.errors",
    "OutOfMemoryError": "core.errors",
    "StatsError": "core.errors",
    "VerificationError": "core.errors",
    "VggnormError": "core.errors",
    "WeightFileError": "core.errors",
}

if TYPE_CHECKING:
    from .commands.apply import normalize as normalize
    from .commands.compare import compare_files as compare_files
    from .commands.export import export as export
    from .commands.merge import merge_files as merge_files
    from .commands.scales import write_scales as write_scales
    from .commands.stats import StatsOptions as StatsOptions
    from .commands.stats import collect_stats as collect_stats
    from .commands.verify import verify as verify
    from .core.errors import ArchitectureError as ArchitectureError
    from .core.errors import DatasetError as DatasetError
    from .core.errors import OutOfMemoryError as OutOfMemoryError
    from .core.errors import StatsError as StatsError
    from .core.errors import VerificationError as VerificationError
    from .core.errors import VggnormError as VggnormError
    from .core.errors import WeightFileError as WeightFileError
    from .core.rescale import compute_scales as compute_scales
    from .core.rescale import rescale as rescale
    from .core.statsrecord import StatsRecord as StatsRecord
    from .formats.registry import read_weights as read_weights
    from .formats.registry import write_weights as write_weights
    from .formats.statsfile import read_stats as read_stats
    from .formats.statsfile import write_stats as write_stats


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vggnorm' has no attribute {name!r}")


__all__ = sorted([*_EXPORTS, "__version__"])
