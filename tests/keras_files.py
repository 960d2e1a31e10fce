"""Write Keras VGG weight files in every layout found in the wild (test helper).

Each ``save_*`` function takes a built Keras model with weights and a
``pathlib.Path`` and returns the path it wrote. The layouts (see
docs/formats.md, checked against Keras 3.15.1):

- ``save_downloaded_layout``: the files ``keras.applications`` downloads
  (``vgg16_weights_tf_dim_ordering_tf_kernels(_notop).h5``): root attr
  ``layer_names`` only, Keras 1 dataset names ``<layer>_W_1:0`` /
  ``<layer>_b_1:0`` directly in each layer group.
- ``save_keras2_layout``: Keras 2 ``model.save_weights('x.h5')``: root attrs
  ``layer_names``, ``backend``, ``keras_version``; datasets at
  ``<layer>/<layer>/kernel:0``.
- ``save_keras3_legacy_weights``: Keras 3 ``legacy_h5_format`` weights-only
  writer: datasets at ``<layer>/<layer>/kernel`` (no ``:0``), plus a
  ``top_level_model_weights`` group.
- ``save_full_model_h5``: Keras 3 ``model.save('x.h5')``: ``model_config`` at
  the root, weights under ``model_weights/``, optionally ``optimizer_weights``.
- ``save_weights_h5``: Keras 3 native ``model.save_weights('x.weights.h5')``.
- ``save_keras_zip``: Keras 3 native ``model.save('x.keras')``.
- ``chunked_layer_names``: post-processes a legacy file so that
  ``layer_names`` is split into ``layer_names0``, ``layer_names1``, ...

Keras is imported lazily so that importing this module is cheap.
"""

from __future__ import annotations

import pathlib

import h5py
import numpy as np

__all__ = [
    "chunked_layer_names",
    "legacy_weights",
    "save_downloaded_layout",
    "save_full_model_h5",
    "save_keras2_layout",
    "save_keras3_legacy_weights",
    "save_keras_zip",
    "save_weights_h5",
    "tiny_vgg",
]

# Same limit as keras.src.legacy.saving.legacy_h5_format.HDF5_OBJECT_HEADER_LIMIT.
HDF5_OBJECT_HEADER_LIMIT = 64512

# Keras 1 short names for the variables of Conv2D / Dense / BatchNormalization.
_KERAS1_NAMES = {
    "kernel": "W",
    "bias": "b",
    "gamma": "gamma",
    "beta": "beta",
    "moving_mean": "running_mean",
    "moving_variance": "running_std",
}


def legacy_weights(layer):
    """Variables of ``layer`` in the order the legacy h5 formats store them.

    Same as ``keras.src.legacy.saving.legacy_h5_format._legacy_weights``:
    trainable first, then non-trainable (for BatchNormalization: gamma, beta,
    moving_mean, moving_variance).
    """
    return list(layer.trainable_weights) + list(layer.non_trainable_weights)


def _empty_names():
    # What Keras' save_attributes_to_hdf5_group stores for an empty list:
    # np.asarray([]) -> a float64 array of shape (0,).
    return np.asarray([])


def _write_layer_groups(f, model, name_fn):
    """One group per layer of ``model`` with ``weight_names`` and datasets.

    ``name_fn(layer, variable)`` gives the weight name; a name containing
    ``/`` makes h5py create the intermediate groups, as Keras 2 did.
    """
    for layer in model.layers:
        group = f.create_group(layer.name)
        variables = legacy_weights(layer)
        names = [name_fn(layer, v).encode("utf8") for v in variables]
        group.attrs["weight_names"] = np.asarray(names) if names else _empty_names()
        for name, var in zip(names, variables):
            value = np.asarray(var.numpy(), dtype=np.float32)
            group.create_dataset(name.decode("utf8"), data=value)


def save_downloaded_layout(model, path):
    """Write ``model`` exactly like the files ``keras.applications`` downloads.

    Root attr ``layer_names`` only (bytes, one per layer of ``model.layers``
    including the input, pooling and flatten layers; no ``backend`` or
    ``keras_version``). One group per layer with attr ``weight_names`` (an
    empty array for layers without weights) and the float32 datasets
    ``<layer>_W_1:0`` (kernel) and ``<layer>_b_1:0`` (bias) directly in it.
    """
    path = pathlib.Path(path)

    def name_fn(layer, var):
        short = _KERAS1_NAMES.get(var.name, var.name)
        return f"{layer.name}_{short}_1:0"

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.asarray([layer.name.encode("utf8") for layer in model.layers])
        _write_layer_groups(f, model, name_fn)
    return path


def save_keras2_layout(model, path, top_level_group=True):
    """Write ``model`` the way Keras 2 (tf.keras 2.15) ``save_weights('x.h5')`` did.

    Root attrs ``layer_names``, ``backend`` = b"tensorflow" and
    ``keras_version`` = b"2.15.0". Per layer a group with attr
    ``weight_names`` such as ``block1_conv1/kernel:0``, ``block1_conv1/bias:0``
    (BatchNormalization: ``gamma``, ``beta``, ``moving_mean``,
    ``moving_variance``), and the datasets at the path the weight name gives:
    ``block1_conv1/block1_conv1/kernel:0``. The weight name is the last two
    components of the Keras 3 variable path plus ``:0`` (the Keras 2 variable
    name, also for layers nested in a sub-model).

    With ``top_level_group`` (default), also an empty
    ``top_level_model_weights`` group, as tf.keras 2.x writes one.
    """
    path = pathlib.Path(path)

    def name_fn(layer, var):
        parts = str(var.path).split("/")
        return "/".join(parts[-2:]) + ":0"

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.asarray([layer.name.encode("utf8") for layer in model.layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        _write_layer_groups(f, model, name_fn)
        if top_level_group:
            group = f.create_group("top_level_model_weights")
            group.attrs["weight_names"] = _empty_names()
    return path


def save_keras3_legacy_weights(model, path):
    """Write ``model`` with Keras 3's own legacy weights-only h5 writer.

    Calls ``keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group``
    on the root of a new file (``model.save_weights`` refuses ``.h5`` in
    Keras 3). Layout: root attrs ``layer_names``, ``backend``,
    ``keras_version``; datasets named by variable path, e.g.
    ``block1_conv1/block1_conv1/kernel``; a ``top_level_model_weights`` group.
    """
    from keras.src.legacy.saving import legacy_h5_format

    path = pathlib.Path(path)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def _copy_model(model):
    """A fresh model with the same config (same layer names) and weights."""
    import keras

    if isinstance(model, keras.Sequential):
        copy = keras.Sequential.from_config(model.get_config())
    else:
        copy = model.__class__.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def save_full_model_h5(model, path, with_optimizer=False):
    """``model.save(path)`` with a ``.h5`` path (Keras 3 legacy full-model file).

    Root attrs ``model_config``, ``keras_version``, ``backend`` (plus
    ``training_config`` when compiled); weights under ``model_weights/``.

    With ``with_optimizer=True`` the model is first copied (same config, same
    layer names, same weights), the copy is compiled with Adam and mse and
    fitted for one step on random data so that the optimizer has state, then
    the copy's weights are set back to ``model``'s weights and the copy is
    saved. So the file holds exactly ``model``'s weights, plus
    ``training_config`` and an ``optimizer_weights`` group (Keras 3.15.1 does
    write it: ``adam/iteration``, ``adam/learning_rate`` and per variable
    ``adam/<layer>_<var>_momentum`` / ``_velocity``) whose state refers to the
    pre-reset weights (as in a real checkpoint that someone then edits).
    ``model`` itself is not touched.
    """
    path = pathlib.Path(path)
    if path.suffix not in (".h5", ".hdf5"):
        raise ValueError(f"full-model legacy file needs a .h5 suffix: {path}")
    if with_optimizer:
        import keras

        copy = _copy_model(model)
        # loss="mse" would make keras.models.load_model fail on this file in
        # Keras 3.15.1 ("Could not deserialize 'keras.metrics.mse'"); the long
        # name round-trips.
        copy.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mean_squared_error")
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, (2, *model.input_shape[1:])).astype(np.float32)
        y = rng.uniform(0, 1, (2, *model.output_shape[1:])).astype(np.float32)
        copy.fit(x, y, batch_size=2, epochs=1, verbose=0)
        copy.set_weights(model.get_weights())
        copy.save(str(path))
    else:
        model.save(str(path))
    return path


def save_weights_h5(model, path):
    """``model.save_weights(path)``: Keras 3 native ``.weights.h5`` file."""
    path = pathlib.Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ValueError(f"Keras 3 weights file needs a .weights.h5 suffix: {path}")
    model.save_weights(str(path))
    return path


def save_keras_zip(model, path):
    """``model.save(path)``: Keras 3 native ``.keras`` zip."""
    path = pathlib.Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"Keras archive needs a .keras suffix: {path}")
    model.save(str(path))
    return path


def _legacy_weights_group(f):
    """The group holding ``layer_names``: the root, or ``model_weights``."""
    if "model_weights" in f and "model_config" in f.attrs:
        return f["model_weights"]
    return f


def chunked_layer_names(path, num_chunks=2):
    """Split the ``layer_names`` attr of a legacy h5 file into chunks, in place.

    Writes ``layer_names0``, ``layer_names1``, ... exactly as
    ``keras.src.legacy.saving.legacy_h5_format.save_attributes_to_hdf5_group``
    does for attributes over ``HDF5_OBJECT_HEADER_LIMIT`` (64512 bytes):
    ``np.array_split(np.asarray(data), n)`` with ``n`` the smallest number
    of chunks that all fit, and ``"%s%d" % (name, chunk_id)`` as the names;
    here at least ``num_chunks`` chunks, so small VGG files get chunked too.
    The original ``layer_names`` attr is removed. Works on weights-only files
    (root) and full-model files (``model_weights`` group). Returns ``path``.
    """
    path = pathlib.Path(path)
    if num_chunks < 2:
        raise ValueError("num_chunks must be at least 2")
    with h5py.File(path, "r+") as f:
        group = _legacy_weights_group(f)
        if "layer_names" not in group.attrs:
            raise ValueError(f"{path}: no layer_names attribute in {group.name}")
        data = [
            n if isinstance(n, bytes) else str(n).encode("utf8") for n in group.attrs["layer_names"]
        ]
        data_npy = np.asarray(data)
        n = num_chunks
        chunks = np.array_split(data_npy, n)
        while any(c.nbytes > HDF5_OBJECT_HEADER_LIMIT for c in chunks):
            n += 1
            chunks = np.array_split(data_npy, n)
        del group.attrs["layer_names"]
        for chunk_id, chunk in enumerate(chunks):
            group.attrs[f"layer_names{chunk_id}"] = chunk  # Keras: "%s%d" % (name, id)
    return path


def tiny_vgg(include_top=False, arch="vgg16", size=32, seed=0):
    """A ``keras.applications`` VGG16/VGG19 with deterministic, live weights.

    ``keras.applications.VGG16(weights=None, include_top=..., input_shape=
    (size, size, 3))`` (``classes=10`` when ``include_top``), then every
    variable is set from ``np.random.default_rng(seed)``: kernels He-normal
    (std ``sqrt(2 / fan_in)``, fan_in = product of all kernel dims but the
    last), biases uniform(0, 0.1) so that filters are alive.

    Size: Keras only forces 224x224 for ``include_top=True`` together with
    ``weights='imagenet'``; with ``weights=None`` (or a weights file path)
    any size >= 32 is accepted, with or without the top. At 32 the top model
    has fc1 of shape (512, 4096) (the 1x1x512 map flattened) and 33.6 M
    parameters (VGG16, classes=10), against 134 M at 224. A file written
    from it only loads into a model built with the same size and classes.
    """
    import keras

    builders = {
        "vgg16": keras.applications.VGG16,
        "vgg19": keras.applications.VGG19,
    }
    if arch not in builders:
        raise ValueError(f"arch must be one of {sorted(builders)}: {arch!r}")
    kwargs = dict(weights=None, include_top=include_top, input_shape=(size, size, 3))
    if include_top:
        kwargs["classes"] = 10
    model = builders[arch](**kwargs)
    rng = np.random.default_rng(seed)
    for var in model.weights:
        shape = tuple(var.shape)
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape, dtype=np.float32)
            value *= np.float32(np.sqrt(2.0 / fan_in))
        else:
            value = rng.uniform(0.0, 0.1, shape).astype(np.float32)
        var.assign(value)
    return model
