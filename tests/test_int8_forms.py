"""tfopt._int8_forms: the int8-friendly forwards compute what Keras computes, and `forms` leaves no trace."""

import keras
import numpy as np
import pytest
from keras import ops

from tfopt import _int8_forms

L = keras.layers


def built(layer, shape, seed=0):
    rng = np.random.default_rng(seed)
    layer.build((None, *shape))
    for weight in layer.weights:
        weight.assign(rng.normal(1.0, 0.3, weight.shape).astype("float32"))
    return layer, rng.normal(2.0, 3.0, (4, *shape)).astype("float32")


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({}, (5, 8)),
        ({"axis": [1, 2]}, (3, 4, 6)),
        ({"axis": 1}, (6, 5)),
        ({"rms_scaling": True}, (5, 8)),
        ({"center": False}, (7,)),
        ({"scale": False, "center": False}, (7,)),
    ],
    ids=["last-axis", "two-axes", "middle-axis", "rms-scaling", "no-center", "no-affine"],
)
def test_layer_normalization_matches_keras(kwargs, shape):
    layer, x = built(L.LayerNormalization(**kwargs), shape)
    expected = ops.convert_to_numpy(layer(x))
    got = ops.convert_to_numpy(_int8_forms.layer_normalization(layer, ops.convert_to_tensor(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_dtype", ["bool", "float32", "int32"])
def test_masked_softmax_matches_keras(mask_dtype):
    rng = np.random.default_rng(1)
    scores = rng.normal(0.0, 4.0, (3, 2, 6, 6)).astype("float32")
    mask = np.tril(np.ones((6, 6), bool))[None, None] & (rng.random((3, 1, 6, 6)) > 0.2)
    mask[0, 0, 2] = False  # a row with every position masked: Keras gives it zeros, so must the form
    layer = L.Softmax(axis=-1)
    masked = mask.astype(mask_dtype)
    expected = ops.convert_to_numpy(layer(scores, mask=masked))
    scores_t, masked_t = ops.convert_to_tensor(scores), ops.convert_to_tensor(masked)
    got = ops.convert_to_numpy(_int8_forms.softmax(layer, scores_t, masked_t))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (got[np.broadcast_to(~mask, got.shape)] == 0).all()
    kept_rows = np.broadcast_to(mask.any(axis=-1), got.shape[:-1])
    np.testing.assert_allclose(got.sum(axis=-1)[kept_rows], 1, atol=6 * np.exp(-_int8_forms.MASK_MARGIN))


def test_masked_softmax_kept_weights_are_the_softmax_of_the_kept_scores():
    # The masked scores here are the largest: a fill relative to the kept ones would let them leak in.
    scores = ops.convert_to_tensor(np.linspace(-3.0, 5.0, 8, dtype="float32")[None])
    mask = ops.convert_to_tensor(np.array([[True] * 4 + [False] * 4]))
    weights = ops.convert_to_numpy(_int8_forms.softmax(L.Softmax(), scores, mask))[0]
    np.testing.assert_allclose(weights[:4], ops.convert_to_numpy(ops.softmax(scores[0, :4])), atol=1e-5)


class OwnNorm(L.LayerNormalization):
    def call(self, inputs):
        return super().call(inputs) * 2.0


def encoder():
    x = keras.Input((6, 8))
    h = L.LayerNormalization(name="ln")(x + L.MultiHeadAttention(2, 4, name="mha")(x, x, use_causal_mask=True))
    return keras.Model(x, OwnNorm(name="own")(h))


def test_forms_switches_stock_layers_inside_composites_and_restores_them():
    model = encoder()
    x = np.random.default_rng(2).normal(size=(2, 6, 8)).astype("float32")
    before = ops.convert_to_numpy(model(x))
    with _int8_forms.forms(model) as switched:
        kinds = sorted((type(layer).__name__, layer.name == "ln") for layer in switched)
        inside = ops.convert_to_numpy(model(x))
    # "ln", the attention and its own Softmax, reached inside it; not OwnNorm, which overrides call
    assert kinds == [("LayerNormalization", True), ("MultiHeadAttention", False), ("Softmax", False)]
    np.testing.assert_allclose(inside, before, atol=1e-4)
    assert all(not {"call", "_compute_attention", "_merge_function"} & set(vars(layer)) for layer in model._flatten_layers())
    np.testing.assert_array_equal(ops.convert_to_numpy(model(x)), before)


def test_forms_restores_after_an_error():
    model = encoder()
    with pytest.raises(RuntimeError, match="inside"):
        with _int8_forms.forms(model):
            raise RuntimeError("inside")
    assert all(not {"call", "_compute_attention", "_merge_function"} & set(vars(layer)) for layer in model._flatten_layers())


@pytest.mark.parametrize("merge", [L.Add, L.Multiply])
def test_a_merge_of_three_inputs_matches_keras(merge):
    rng = np.random.default_rng(3)
    xs = [ops.convert_to_tensor(rng.normal(size=(2, 5)).astype("float32")) for _ in range(3)]
    layer = merge()
    np.testing.assert_allclose(ops.convert_to_numpy(_int8_forms.merge(layer, xs)), ops.convert_to_numpy(layer(xs)),
                               rtol=1e-6)


def test_unrolled_lstm_matches_keras_inside_forms():
    inp = keras.Input((5, 4))
    model = keras.Model(inp, L.LSTM(6, unroll=True, return_sequences=True)(inp))
    x = np.random.default_rng(4).normal(size=(3, 5, 4)).astype("float32")
    before = ops.convert_to_numpy(model(x))
    with _int8_forms.forms(model) as switched:
        assert [type(layer).__name__ for layer in switched] == ["LSTMCell"]
        np.testing.assert_allclose(ops.convert_to_numpy(model(x)), before, atol=1e-6)
