"""vggnorm.core.weightset: naming each stored array once (its role), and file suffixes."""

from __future__ import annotations

from pathlib import Path

import pytest

from vggnorm.core.weightset import (
    BN_ROLES,
    LayerEntry,
    WeightFile,
    _stored_role,
    roles_of,
    suffix_of,
)

CONV = ((3, 3, 3, 64), (64,))


@pytest.mark.parametrize(
    ("dataset", "role"),
    [
        ("kernel:0", "kernel"),  # no folder
        ("bias", "bias"),  # no TensorFlow suffix
        ("block1_conv1/kernel:0", "kernel"),
        ("model_weights/block1_conv1/block1_conv1/bias:0", "bias"),
        ("bn/moving_mean:0", "moving_mean"),
        ("layers/batch_normalization/vars/moving_variance", "moving_variance"),
        # Keras 1: <layer>_<role>[_<n>]:0
        ("block1_conv1_W_1:0", "kernel"),
        ("block1_conv1_b_1:0", "bias"),
        ("block1_conv1_W:0", "kernel"),
        ("fc1_b", "bias"),
        ("bn1_gamma_1:0", "gamma"),
        ("bn1_beta_2:0", "beta"),
        ("bn1_running_mean_1:0", "moving_mean"),
        ("bn1_running_std_1:0", "moving_variance"),
        # what names no role
        ("vars/0", None),
        ("layers/conv2d/vars/1", None),
        ("block1_conv1_W_1:0/extra", None),
        ("kernel_W_x", None),
        ("Wb", None),
        ("kernels:0", None),
    ],
)
def test_a_stored_name_states_its_role(dataset: str, role: str | None) -> None:
    assert _stored_role(dataset) == role


def test_only_the_text_before_the_first_colon_names_the_role() -> None:
    assert _stored_role("kernel:0:1") == "kernel"
    assert _stored_role("a/b:0/kernel") == "kernel"


@pytest.mark.parametrize(
    ("datasets", "shapes", "bn", "roles"),
    [
        # stored names win, in the stored order
        (("bias:0", "kernel:0"), ((64,), (3, 3, 3, 64)), None, ("bias", "kernel")),
        (("beta:0", "moving_mean:0", "moving_variance:0"), ((8,),) * 3, None,
         ("beta", "moving_mean", "moving_variance")),
        (("c_W_1:0", "c_b_1:0"), CONV, None, ("kernel", "bias")),
        # unnamed: a kernel (2-D or 4-D) and maybe a bias
        (("vars/0", "vars/1"), CONV, None, ("kernel", "bias")),
        (("vars/0",), ((3, 3, 3, 64),), None, ("kernel",)),
        (("vars/0", "vars/1"), ((512, 10), (10,)), None, ("kernel", "bias")),
        (("vars/0",), ((512, 10),), None, ("kernel",)),
        # two stored names the same: the names say nothing, the shapes do
        (("kernel:0", "kernel:0"), CONV, None, ("kernel", "bias")),
        # one name missing: the same
        (("kernel:0", "vars/1"), CONV, None, ("kernel", "bias")),
        # unnamed 1-D arrays: a BatchNormalization's, in Keras's order
        (("vars/0", "vars/1", "vars/2", "vars/3"), ((8,),) * 4, None, BN_ROLES),
        (("vars/0", "vars/1", "vars/2"), ((8,),) * 3, (False, True), BN_ROLES[1:]),
        (("vars/0", "vars/1", "vars/2"), ((8,),) * 3, (True, False),
         ("gamma", "moving_mean", "moving_variance")),
        (("vars/0", "vars/1"), ((8,),) * 2, (False, False), BN_ROLES[2:]),
        (("vars/0", "vars/1"), ((8,),) * 2, None, BN_ROLES[2:]),
        (("vars/0", "vars/1", "vars/2", "vars/3"), ((8,),) * 4, (True, True), BN_ROLES),
        # anything else keeps its positions
        (("vars/0", "vars/1", "vars/2"), ((8,),) * 3, None, ("0", "1", "2")),
        (("vars/0", "vars/1", "vars/2", "vars/3"), ((8,),) * 4, (False, True), ("0", "1", "2", "3")),
        (("vars/0", "vars/1"), ((3, 3, 3, 64), (3, 64)), None, ("0", "1")),
        (("vars/0", "vars/1", "vars/2"), (*CONV, (64,)), None, ("0", "1", "2")),
        (("vars/0",), ((3, 64, 64),), None, ("0",)),
        (("vars/0", "vars/1"), ((64,), (3, 3, 3, 64)), None, ("0", "1")),
        ((), (), None, ()),
    ],
)
def test_roles_from_names_then_shapes(
    datasets: tuple[str, ...],
    shapes: tuple[tuple[int, ...], ...],
    bn: tuple[bool, bool] | None,
    roles: tuple[str, ...],
) -> None:
    assert roles_of(datasets, shapes, bn) == roles


def test_an_entry_names_its_roles_and_keys() -> None:
    entry = LayerEntry("block1_conv1", ("vars/0", "vars/1"), CONV, ("float32", "float32"))
    assert entry.roles == ("kernel", "bias")
    assert entry.keys() == ("block1_conv1/kernel", "block1_conv1/bias")
    given = LayerEntry("bn", ("a", "b"), ((8,), (8,)), ("float32",) * 2, roles=("gamma", "beta"))
    assert given.keys() == ("bn/gamma", "bn/beta")
    wf = WeightFile(Path("/m/VGG16.Weights.H5"), "weights-h5", (entry, given))
    assert wf.entry_of_key() == {
        "block1_conv1/kernel": (entry, 0), "block1_conv1/bias": (entry, 1),
        "bn/gamma": (given, 0), "bn/beta": (given, 1),
    }  # fmt: skip
    assert wf.suffix == ".weights.h5"


@pytest.mark.parametrize(
    ("name", "suffix"),
    [
        ("vgg16.weights.h5", ".weights.h5"),
        ("VGG16.WEIGHTS.H5", ".weights.h5"),
        ("vgg16.h5", ".h5"),
        ("vgg16.hdf5", ".hdf5"),
        ("vgg16.keras", ".keras"),
        ("Model.KERAS", ".keras"),
        ("vgg16.PTH", ".pth"),
        ("model.safetensors", ".safetensors"),
        ("imagenet-vgg-verydeep-19.mat", ".mat"),
        ("weights.h5.bak", ".bak"),
        ("vgg16", ""),
    ],
)
def test_suffix_of(name: str, suffix: str) -> None:
    assert suffix_of(Path("/models") / name) == suffix
