"""VGG architectures as data.

A VGG-like network is a chain of 3x3 ReLU convolutions and poolings (the *features*), then
optionally a *head* that starts with Flatten or global pooling. The Keras layer names below are the
contract with the weight files, written once here; code reads these tables instead of branching on
the model name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Union

PoolKind = Literal["max", "avg"]
Reduce = Literal["flatten", "gap", "gmp"]
FlattenOrder = Literal["hwc", "chw"]  # Keras flattens (H, W, C); PyTorch (C, H, W)
Padding = Literal["zero", "reflect"]


@dataclass(frozen=True)
class NormSpec:
    """A BatchNormalization layer (inference mode: a per-channel affine map).

    Between a conv and its ReLU it is rescaled with the conv; in the head it is left unchanged.
    """

    name: str
    epsilon: float = 1e-3
    center: bool = True
    scale: bool = True


@dataclass(frozen=True)
class ConvSpec:
    """A Conv2D followed by ReLU (inside the layer or as the next layer), maybe with a
    BatchNormalization between the conv and the ReLU."""

    name: str
    filters: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str = "same"
    use_bias: bool = True
    norm: NormSpec | None = None


@dataclass(frozen=True)
class PoolSpec:
    """Max or average pooling: commutes with a positive per-channel scale."""

    name: str
    kind: PoolKind = "max"
    pool_size: tuple[int, int] = (2, 2)
    strides: tuple[int, int] = (2, 2)
    padding: str = "valid"


@dataclass(frozen=True)
class DenseSpec:
    """A Dense layer; ``activation`` is ``"unknown"`` when a weights-only file cannot tell."""

    name: str
    units: int
    activation: str = "linear"
    use_bias: bool = True


@dataclass(frozen=True)
class ActivationSpec:
    name: str
    activation: str


FeatureLayer = Union[ConvSpec, PoolSpec]
HeadLayer = Union[DenseSpec, NormSpec, ActivationSpec]


@dataclass(frozen=True)
class HeadSpec:
    """What follows the last conv block. Only the first Dense is touched by the rescaling."""

    reduce: Reduce
    layers: tuple[HeadLayer, ...]
    # Flatten heads fix the input size: fc1 reads a (size/32)^2 x C map for stock VGG.
    input_size: int | None = None
    flatten_order: FlattenOrder = "hwc"

    @property
    def dense(self) -> tuple[DenseSpec, ...]:
        return tuple(layer for layer in self.layers if isinstance(layer, DenseSpec))

    @property
    def known(self) -> bool:
        """Whether every layer is known well enough to run the head (weights-only files: no)."""
        return all(getattr(layer, "activation", "") != "unknown" for layer in self.layers)


@dataclass(frozen=True)
class Arch:
    name: str
    features: tuple[FeatureLayer, ...]
    head: HeadSpec | None = None
    # How every conv pads its input: Keras and torchvision pad with zeros, AdaIN reflects.
    padding: Padding = "zero"

    @property
    def convs(self) -> tuple[ConvSpec, ...]:
        return tuple(layer for layer in self.features if isinstance(layer, ConvSpec))

    @property
    def conv_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.convs)

    @property
    def norms(self) -> dict[str, str]:
        """conv -> the BatchNormalization between it and its ReLU, where there is one."""
        return {c.name: c.norm.name for c in self.convs if c.norm is not None}

    @property
    def weighted_features(self) -> tuple[str, ...]:
        """Layers whose weights decide the activations: convs and BatchNorms between conv and ReLU."""
        names: list[str] = []
        for c in self.convs:
            names += [c.name] if c.norm is None else [c.name, c.norm.name]
        return tuple(names)

    @property
    def first_dense(self) -> str | None:
        return self.head.dense[0].name if self.head and self.head.dense else None

    def without_head(self) -> Arch:
        return replace(self, head=None)

    def min_size(self) -> int:
        """Smallest square input for which every pooling still has an input of at least 1x1."""
        n_pools = sum(1 for layer in self.features if isinstance(layer, PoolSpec))
        return int(2**n_pools)


def _vgg_features(blocks: tuple[tuple[int, int], ...]) -> tuple[FeatureLayer, ...]:
    layers: list[FeatureLayer] = []
    for b, (n_convs, filters) in enumerate(blocks, start=1):
        layers += [ConvSpec(f"block{b}_conv{i}", filters) for i in range(1, n_convs + 1)]
        layers.append(PoolSpec(f"block{b}_pool"))
    return tuple(layers)


# (convs in block, filters): Simonyan & Zisserman configurations D and E.
_VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
_VGG19_BLOCKS = ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512))

_IMAGENET_HEAD = HeadSpec(
    reduce="flatten",
    layers=(
        DenseSpec("fc1", 4096, "relu"),
        DenseSpec("fc2", 4096, "relu"),
        DenseSpec("predictions", 1000, "softmax"),
    ),
    input_size=224,
)

VGG16 = Arch("vgg16", _vgg_features(_VGG16_BLOCKS), _IMAGENET_HEAD)
VGG19 = Arch("vgg19", _vgg_features(_VGG19_BLOCKS), _IMAGENET_HEAD)

ARCHS: dict[str, Arch] = {"vgg16": VGG16, "vgg19": VGG19}

# keras.applications download locations and md5 hashes (keras/applications/vgg16.py, vgg19.py).
_WEIGHTS_ROOT = "https://storage.googleapis.com/tensorflow/keras-applications/"
IMAGENET_WEIGHTS: dict[tuple[str, bool], tuple[str, str]] = {
    ("vgg16", True): (
        _WEIGHTS_ROOT + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5",
        "64373286793e3c8b2b4e3219cbf3544b",
    ),
    ("vgg16", False): (
        _WEIGHTS_ROOT + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc",
    ),
    ("vgg19", True): (
        _WEIGHTS_ROOT + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels.h5",
        "cbe5617147190e668d6c5d5026f83318",
    ),
    ("vgg19", False): (
        _WEIGHTS_ROOT + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "253f8cb515780f3b799900260a226db6",
    ),
}
