"""The VGG with an identity-initialised BatchNormalization after every ReLU conv, as a Keras model
(``vggnorm bn``). Keras comes from :mod:`.network`, the only module that imports it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..core.archs import ActivationSpec, Arch, ConvSpec, DenseSpec, HeadSpec
from ..core.bnparams import DEFAULT_EPSILON, F64, bn_params, identity_bn_params
from ..core.errors import ArchitectureError
from ..core.statsrecord import StatsRecord, stats_by_conv

log = logging.getLogger(__name__)


def _set_bn(layer: Any, params: Mapping[str, F64]) -> None:
    layer.set_weights(
        [
            np.asarray(params[k], dtype=np.float32)
            for k in ("gamma", "beta", "moving_mean", "moving_variance")
        ]
    )


def build_bn_model(
    arch: Arch,
    arrays: Mapping[str, np.ndarray],
    record: StatsRecord,
    *,
    size: int,
    include_top_bn: bool = False,
    epsilon: float = DEFAULT_EPSILON,
) -> Any:
    """A Keras VGG with an identity-initialised BatchNormalization after every ReLU conv.

    Args:
        arch: the architecture (from :func:`vggnorm.core.topology.bind`).
        arrays: its weights, ``"<layer>/kernel"``/``"<layer>/bias"``.
        record: complete statistics gathered on these conv weights; matched to the convs by
            position.
        size: square input size. A Flatten head fixes it (``arch.head.input_size``).
        include_top_bn: also put a BN after every ReLU Dense of the head, initialised to the
            identity without statistics (gamma 1, beta 0, mean 0, variance 1 - eps).
        epsilon: the BN layers' epsilon.

    Returns:
        An uncompiled ``keras.Model`` from a float32 input ``(size, size, 3)``, already preprocessed
        as ``record.meta.preprocess`` says (see :func:`vggnorm.core.inputs.preprocess_images`), to the last pooling's
        output, or to the head's output when the head's activations are known. Layers keep the
        weight file's names; each conv's BN is ``<conv>_bn``, each ReLU Dense's ``<dense>_bn``. In
        inference mode it computes what the network without BN computes.

    Raises:
        StatsError: statistics that do not fit the convs or are unfinished.
        ArchitectureError: ``size`` does not fit the Flatten head or the pooling chain.

    Example:
        >>> ws = read_weights("vgg16.h5"); arch = bind(ws.file).arch  # doctest: +SKIP
        >>> model = build_bn_model(arch, ws.arrays, read_stats("s.h5"), size=224)  # doctest: +SKIP
    """
    stats = stats_by_conv(record, [(c.name, c.filters) for c in arch.convs])
    head = _usable_head(arch, size)
    model = _graph(arch, head, size, include_top_bn, epsilon)
    _set_weights(model, arch, head, arrays, size)
    for conv in arch.convs:
        _set_bn(model.get_layer(f"{conv.name}_bn"), bn_params(stats[conv.name], epsilon))
    if head is not None and include_top_bn:
        for d in head.dense:
            if d.activation == "relu":
                _set_bn(model.get_layer(f"{d.name}_bn"), identity_bn_params(d.units, epsilon))
    return model


def _usable_head(arch: Arch, size: int) -> HeadSpec | None:
    """The head the BN model ends with: None when its activations are unknown."""
    if size < arch.min_size():
        raise ArchitectureError(
            f"size {size} is too small for {arch.name}: at least {arch.min_size()}"
        )
    head = arch.head
    if head is not None and any(d.activation == "unknown" for d in head.dense):
        log.warning(
            "the head's activations are unknown (a weights-only file of a non-stock head): "
            "the BN model ends at the last conv block"
        )
        return None
    if head is not None and head.reduce == "flatten" and head.input_size not in (None, size):
        raise ArchitectureError(
            f"the Flatten head of {arch.name} reads a {head.input_size}x{head.input_size} input, "
            f"not {size}x{size}; build at size {head.input_size}"
        )
    return head


def _graph(arch: Arch, head: HeadSpec | None, size: int, include_top_bn: bool,
           epsilon: float) -> Any:  # fmt: skip
    from .network import build_features, build_head, keras_module

    keras = keras_module()
    L = keras.layers

    def conv_bn(conv: ConvSpec, x: Any) -> Any:
        return L.BatchNormalization(epsilon=epsilon, name=f"{conv.name}_bn")(x)

    def dense_bn(dense: DenseSpec, x: Any) -> Any:
        if include_top_bn and dense.activation == "relu":
            return L.BatchNormalization(epsilon=epsilon, name=f"{dense.name}_bn")(x)
        return x

    inputs = keras.Input((size, size, 3), dtype="float32", name="images")
    x, _ = build_features(keras, arch, inputs, after_relu=conv_bn)
    if head is not None:
        x = build_head(keras, head, x, after=dense_bn)
    return keras.Model(inputs, x, name=f"{arch.name}_bn")


def _set_weights(model: Any, arch: Arch, head: HeadSpec | None,
                 arrays: Mapping[str, np.ndarray], size: int) -> None:  # fmt: skip
    from .network import set_weights

    names = list(arch.conv_names)
    if head is not None:
        names += [h.name for h in head.layers if not isinstance(h, ActivationSpec)]
    for name in names:
        try:
            set_weights(model, [name], arrays)
        except ValueError as e:
            raise ArchitectureError(
                f"layer {name!r}: the weights do not fit a {size}x{size} input ({e})"
            ) from e
