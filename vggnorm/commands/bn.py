"""``vggnorm bn``: a VGG with identity-initialised BatchNormalization after every ReLU conv.

Each conv's post-ReLU activation ``x`` (filter c) is followed by a Keras ``BatchNormalization``
whose four variables come from the statistics file (:func:`vggnorm.core.bnparams.bn_params`)::

    moving_mean = mu_c,  moving_variance = var_c,  gamma = sqrt(var_c + eps),  beta = mu_c

so in inference mode ``BN(x) = gamma * (x - mu) / sqrt(var + eps) + beta = x`` exactly (up to one
float32 rounding): the model computes the same function as the original, and the BN layers' inputs
have, on the stats images, exactly the recorded mean and variance. In training mode BN normalises
with the batch's own moments, which start close to the recorded ones, so fine-tuning begins from
the pretrained function with the benefits of batch normalization.

Fine-tuning the written model::

    model = keras.models.load_model("vgg16_bn.keras")
    x = vggnorm.core.inputs.preprocess_images(images_uint8, "caffe")  # as the stats were
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss=...)
    model.fit(x, y, ...)

The input is a float32 batch ``(N, size, size, 3)`` that is already preprocessed with the scheme
the statistics were gathered with (``caffe`` for ``keras.applications`` VGG:
``keras.applications.vgg16.preprocess_input`` gives the same values). The preprocessing is not a
layer of the model, so the file holds only stock Keras layers and loads without custom objects.
BN's ``momentum`` (0.99) decides how fast the moving statistics follow the new data; freezing the
BN layers (``layer.trainable = False``) keeps them in inference mode, i.e. the identity.

For people converting from Caffe: Caffe splits this into a ``BatchNorm`` layer (mean, variance and
a moving-average scale factor, no affine part: ``(x - mean) / sqrt(var + eps)``) followed by a
``Scale`` layer (``gamma``, ``beta``). Keras's ``BatchNormalization`` holds all four in one layer,
in the order gamma, beta, moving_mean, moving_variance. To convert a Caffe pair: divide Caffe's
stored mean and variance by its scale factor (the third blob), then use them as
``moving_mean``/``moving_variance`` and the ``Scale`` blobs as ``gamma``/``beta``; mind that Caffe's
default ``eps`` is 1e-5 and Keras's is 1e-3.

Dense layers of the top: a BN after a ReLU Dense (``include_top_bn``) cannot be initialised from
the conv statistics, which do not cover the head; it gets ``gamma=1, beta=0, moving_mean=0,
moving_variance=1-eps``, also the identity in inference mode (but its training-mode batch moments
are then far from its moving ones).

:func:`vggnorm.core.bnparams.bn_params` is pure numpy; :func:`vggnorm.runtime.bn_network.build_bn_model`
builds the Keras model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.bnparams import DEFAULT_EPSILON
from ..core.errors import ArchitectureError, WeightFileError
from ..core.inputs import preprocess_images as preprocess_images
from ..core.scaling import check_fingerprint
from ..formats.outputs import atomic_path, check_output, output_lock
from ..formats.registry import load
from ..formats.statsfile import read_stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BnResult:
    """The BN model written: its file, its input size and the preprocessing its input needs."""

    out: Path
    size: int
    preprocess: str

    def summary(self) -> list[str]:
        return [
            f"wrote {self.out}: BatchNorm after every conv, identity in inference mode",
            f"input ({self.size}, {self.size}, 3) float32, preprocessed with {self.preprocess!r}",
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "size": self.size, "preprocess": self.preprocess}


def write_bn_model(
    src_weights_path: str | os.PathLike[str],
    stats_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    force: bool = False,
    model: str | None = None,
    size: int | None = None,
    include_top_bn: bool = False,
    epsilon: float = DEFAULT_EPSILON,
) -> BnResult:
    """Build the identity-initialised BN VGG of a weight file and save it as ``.keras``.

    Args:
        src_weights_path: weight file in any layout :func:`vggnorm.read_weights` reads; the
            statistics must have been gathered on its conv weights (checked by fingerprint).
        stats_path: a complete stats file.
        out_path: where to write; must end in ``.keras``.
        force: overwrite ``out_path`` if it exists.
        model: ``"vgg16"``/``"vgg19"`` when the file cannot tell.
        size: input size; default the Flatten head's size, else the stats' image size.
        include_top_bn, epsilon: as in :func:`vggnorm.runtime.bn_network.build_bn_model`.

    Returns:
        What was written (atomically: a temporary ``.keras`` beside it, then renamed).

    Raises:
        WeightFileError: wrong suffix, existing output without ``force``, or the output is the
            input.
        StatsError, ArchitectureError: statistics of another model, unfinished, or a bad size.

    Example:
        >>> write_bn_model("vgg16.h5", "vggnorm-stats.h5", "vgg16_bn.keras")  # doctest: +SKIP
    """
    src, out = Path(src_weights_path), Path(out_path)
    if out.suffix != ".keras":
        raise WeightFileError(
            f"{out.name} must end in .keras: the BN model is a whole Keras model "
            "(architecture and weights), which Keras saves only as .keras"
        )
    with output_lock(out):
        check_output(out, force=force, inputs=[src], error=WeightFileError)
        return _write_bn(src, stats_path, out, model, size, include_top_bn, epsilon)


def _write_bn(
    src: Path, stats_path: str | os.PathLike[str], out: Path, model: str | None,
    size: int | None, include_top_bn: bool, epsilon: float,
) -> BnResult:  # fmt: skip
    from ..runtime.bn_network import build_bn_model

    loaded = load(src, model)
    if loaded.bound.arch.padding != "zero":
        raise ArchitectureError(
            f"{src} pads by reflection (AdaIN layout); the BN model is built from stock Keras "
            "layers, which pad with zeros"
        )
    with_norm = list(loaded.bound.arch.norms)
    if with_norm:
        raise ArchitectureError(
            f"conv layer {with_norm[0]!r} already has a BatchNormalization before its ReLU; "
            "vggnorm bn builds BatchNorm VGGs from plain ones"
        )
    record = read_stats(stats_path)
    check_fingerprint(loaded, record)
    arch = loaded.as_measured(None, record.meta.pooling).bound.arch
    if size is None:
        head = arch.head
        flat = head is not None and head.reduce == "flatten" and head.input_size is not None
        size = head.input_size if flat and head is not None else record.meta.size
        assert size is not None
    net = build_bn_model(
        arch, loaded.arrays, record, size=size, include_top_bn=include_top_bn, epsilon=epsilon
    )
    _save_keras_atomic(net, out)
    return BnResult(out, size, record.meta.preprocess)


def _save_keras_atomic(net: Any, out: Path) -> None:
    # Keras picks the writer by suffix, so the temporary file must end in .keras too.
    try:
        with output_lock(out), atomic_path(out, suffix=".keras") as tmp:
            net.save(str(tmp), overwrite=True)
    except OSError as e:
        raise WeightFileError(f"could not write {out}: {e.strerror or e}") from e

