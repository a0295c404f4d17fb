"""Assertions shared by the test modules."""

import math

import keras
import numpy as np
from ai_edge_litert.interpreter import Interpreter
from keras import ops

import tfopt


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def assert_same_weights(model, before):
    after = weights_of(model)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)


def assert_sparsity(model, sparsity):
    """Each pruned weight tensor has round(size * sparsity) zeros, give or take one element."""
    report = tfopt.sparsity_report(model)
    assert report.rows, "no prunable layer found"
    wrappers = [l for l in model._flatten_layers() if isinstance(l, tfopt.PruneLowMagnitude)]
    tensors = [w for wrapper in wrappers for w, _, _ in wrapper.pruned_weights]
    if not wrappers:  # a stripped model: check the registry's weights
        tensors = [v for layer in model._flatten_layers() for v in tfopt.pruning._prunable_variables(layer)
                   if tfopt.registry.lookup(layer) is not None]
    assert tensors
    for tensor in tensors:
        size = math.prod(tensor.shape)
        expected = size - max(int(round(size * (1 - sparsity))), 1)
        zeros = int(np.sum(ops.convert_to_numpy(tensor) == 0))
        assert abs(zeros - expected) <= 1, (tensor.path, zeros, expected)
    return report


def assert_config_roundtrip(obj):
    config = obj.get_config()
    clone = type(obj).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
    assert type(restored) is type(obj)
    assert restored.get_config() == config
    return clone


def assert_save_load(model, x, path):
    """Saves as .keras, loads with no scope, and checks identical predictions."""
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    return loaded


def masks_of(model):
    return {
        f"{w.name}/{v.path}": np.array(ops.convert_to_numpy(m))
        for w in model._flatten_layers()
        if isinstance(w, tfopt.PruneLowMagnitude)
        for v, m, _ in w.pruned_weights
    }


def zero_fraction(array):
    array = np.asarray(array)
    return float(np.sum(array == 0)) / math.prod(array.shape)


def int8_weight_zero_fractions(content):
    """{tensor name: fraction of zeros} of the int8 weight tensors (zero point 0) of a .tflite file."""
    it = Interpreter(model_content=content)
    it.allocate_tensors()
    out = {}
    for d in it.get_tensor_details():
        if d["dtype"] == np.int8 and len(d["shape"]) in (2, 4) and d["quantization_parameters"]["zero_points"].size:
            try:
                t = it.get_tensor(d["index"])
            except ValueError:
                continue
            if np.all(d["quantization_parameters"]["zero_points"] == 0) and d["shape"][0] != 1 or len(d["shape"]) == 2:
                out[d["name"]] = zero_fraction(t)
    return out
