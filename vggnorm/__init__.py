"""vggnorm: normalize VGG weights (Keras or PyTorch files) so every conv filter's mean activation is 1.

Gatys et al. rescale VGG so that per-layer style and content losses have comparable magnitudes.
The rescaling is exact: ReLU is positively homogeneous and pooling commutes with a positive
per-channel scale, so dividing a filter by its mean and multiplying the next layer's matching
input channel by it leaves the network's function unchanged.

Example:
    >>> import vggnorm  # doctest: +SKIP
    >>> record = vggnorm.collect_stats("vgg16.h5", "coco/", out="vggnorm-stats.h5")  # doctest: +SKIP
    >>> vggnorm.normalize("vgg16.h5", "vgg16_norm.h5", record)  # doctest: +SKIP
    >>> vggnorm.verify("vgg16_norm.h5").ok  # doctest: +SKIP
    True
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

# Public names and the private module that defines each. Imported on first use, so that
# `import vggnorm.stats` stays numpy-only and `vggnorm --help` starts instantly.
_EXPORTS = {
    "collect_stats": "collect",
    "normalize": "normalize",
    "verify": "verify",
    "compare_files": "compare",
    "compute_scales": "rescale",
    "export": "export",
    "rescale": "rescale",
    "read_stats": "statsfile",
    "write_stats": "statsfile",
    "read_weights": "weights_io",
    "write_weights": "weights_io",
    "ArchitectureError": "errors",
    "DatasetError": "errors",
    "StatsError": "errors",
    "VerificationError": "errors",
    "VggnormError": "errors",
    "WeightFileError": "errors",
}

if TYPE_CHECKING:
    from .collect import collect_stats as collect_stats
    from .compare import compare_files as compare_files
    from .errors import ArchitectureError as ArchitectureError
    from .errors import DatasetError as DatasetError
    from .errors import StatsError as StatsError
    from .errors import VerificationError as VerificationError
    from .errors import VggnormError as VggnormError
    from .errors import WeightFileError as WeightFileError
    from .export import export as export
    from .normalize import normalize as normalize
    from .rescale import compute_scales as compute_scales
    from .rescale import rescale as rescale
    from .statsfile import read_stats as read_stats
    from .statsfile import write_stats as write_stats
    from .verify import verify as verify
    from .weights_io import read_weights as read_weights
    from .weights_io import write_weights as write_weights


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vggnorm' has no attribute {name!r}")


__all__ = [
    "ArchitectureError",
    "DatasetError",
    "StatsError",
    "VerificationError",
    "VggnormError",
    "WeightFileError",
    "__version__",
    "collect_stats",
    "compare_files",
    "compute_scales",
    "export",
    "normalize",
    "read_stats",
    "read_weights",
    "rescale",
    "verify",
    "write_stats",
    "write_weights",
]
