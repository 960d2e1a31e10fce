"""BatchNormalization parameters that make BN the identity on a layer's activations. Pure numpy.

Each conv's post-ReLU activation ``x`` (filter c) gets a BN whose four variables come from the
statistics::

    moving_mean = mu_c,  moving_variance = var_c,  gamma = sqrt(var_c + eps),  beta = mu_c

so in inference mode ``BN(x) = gamma * (x - mu) / sqrt(var + eps) + beta = x`` exactly (up to one
float32 rounding), and the BN layer's input has, on the stats images, exactly the recorded mean
and variance.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .stats import LayerStats

F64 = npt.NDArray[np.float64]

#: Keras's BatchNormalization default.
DEFAULT_EPSILON = 1e-3


def bn_params(layer_stats: LayerStats, epsilon: float = DEFAULT_EPSILON) -> dict[str, F64]:
    """BatchNormalization variables that make BN the identity on this layer's activations.

    Args:
        layer_stats: the layer's sums over the stats images (at least one value counted).
        epsilon: the BN layer's epsilon; must be > 0.

    Returns:
        float64 arrays ``gamma = sqrt(var + eps)``, ``beta = mean``, ``moving_mean = mean`` and
        ``moving_variance = var`` (population variance from the sums of squares, clipped at 0), one
        value per filter, all finite. A zero-variance filter (e.g. dead) gets ``gamma = sqrt(eps)``.

    Raises:
        ValueError: ``epsilon <= 0`` or no activation counted.

    Example:
        >>> p = bn_params(LayerStats.of("c", [[1.0, 0.0], [3.0, 0.0]]))
        >>> p["moving_mean"].tolist(), p["moving_variance"].tolist()
        ([2.0, 0.0], [1.0, 0.0])
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    mean = np.asarray(layer_stats.mean, dtype=np.float64)
    var = np.asarray(layer_stats.variance, dtype=np.float64)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
        raise ValueError(f"{layer_stats.name}: statistics hold NaN or infinite values")
    return {
        "gamma": np.sqrt(var + epsilon),
        "beta": mean.copy(),
        "moving_mean": mean.copy(),
        "moving_variance": var.copy(),
    }


def identity_bn_params(units: int, epsilon: float = DEFAULT_EPSILON) -> dict[str, F64]:
    """BN variables that are the identity in inference mode without any statistics."""
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    return {
        "gamma": np.ones(units),
        "beta": np.zeros(units),
        "moving_mean": np.zeros(units),
        "moving_variance": np.full(units, 1.0 - epsilon),
    }

