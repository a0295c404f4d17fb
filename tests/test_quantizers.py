"""tfopt.quantizers: values and gradients against a numpy reference, EMA range init."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from tfopt import quantizers as q
from helpers import assert_config_roundtrip

# The backend matrix (`make test-backends`) runs this module under JAX and PyTorch too, except the
# `tensorflow_only` tests (tf.GradientTape references, TFLite conversion).
pytestmark = pytest.mark.backend_independent


def _np_fake_quant(x, lo, hi, num_bits=8, narrow=False):
    """TF's FakeQuantWithMinMaxVars nudging, in numpy (per tensor)."""
    f = np.float32
    qmin, qmax = f(1 if narrow else 0), f(2**num_bits - 1)
    lo, hi = f(lo), f(hi)
    scale = (hi - lo) / (qmax - qmin)
    zp = np.clip(np.floor(qmin - lo / scale + f(0.5)), qmin, qmax)
    nlo, nhi = (qmin - zp) * scale, (qmax - zp) * scale
    xc = np.clip(x, nlo, nhi)
    y = np.floor((xc - nlo) / scale + 0.5) * scale + nlo
    grad = ((x >= nlo) & (x <= nhi)).astype(np.float32)
    return y, grad, nlo, nhi


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("lo,hi,narrow", [(-1.0, 1.0, True), (-0.7, 2.3, False), (0.0, 6.0, False)], ids=["sym", "asym", "relu6"])
def test_fake_quant_values_and_gradients_at_edges(lo, hi, narrow):
    rng = np.random.default_rng(0)
    _, _, nlo, nhi = _np_fake_quant(np.zeros(1), lo, hi, narrow=narrow)
    step = (hi - lo) / (254 if narrow else 255)
    edges = np.array([nlo - step, nlo, nlo + 1e-4, nhi - 1e-4, nhi, nhi + step], np.float32)
    x = np.concatenate([rng.uniform(lo - 1, hi + 1, 200).astype(np.float32), edges])
    ref, ref_grad, _, _ = _np_fake_quant(x, lo, hi, narrow=narrow)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = q.fake_quant(xt, lo, hi, 8, narrow)
    grad = tape.gradient(y, xt).numpy()
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-5)
    np.testing.assert_array_equal(grad, ref_grad)


def test_last_value_quantizer_is_symmetric_per_channel_int8_grid():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    y = ops.convert_to_numpy(q.LastValueQuantizer(per_axis=True, axis=-1)(w))
    scale = np.abs(w).max(axis=(0, 1, 2)) / 127.0
    levels = y / scale
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert np.abs(np.round(levels)).max() == 127
    np.testing.assert_allclose(y, np.round(w / scale) * scale, atol=1e-5)


def test_moving_average_range_starts_from_first_batch_then_ema():
    layer = keras.layers.Layer()
    quant = q.MovingAverageQuantizer(ema_decay=0.9)
    vs = quant.build(None, "act", layer)
    assert [v.name for v in layer.weights] == ["act_min", "act_max", "act_initialized"]
    quant(np.array([0.5, 2.0], np.float32), True, vs)
    assert float(vs["min"].numpy()) == 0.0 and float(vs["max"].numpy()) == 2.0  # 0 kept in range
    quant(np.array([-1.0, 4.0], np.float32), True, vs)
    np.testing.assert_allclose([vs["min"].numpy(), vs["max"].numpy()], [-0.1, 2.2], rtol=1e-6)
    before = (float(vs["min"].numpy()), float(vs["max"].numpy()))
    quant(np.array([-9.0, 9.0], np.float32), False, vs)  # inference: no update
    assert (float(vs["min"].numpy()), float(vs["max"].numpy())) == before


def test_fixed_range_matches_sigmoid_kernel_grid():
    y = ops.convert_to_numpy(q.FixedRangeQuantizer(0.0, 255 / 256)(np.linspace(0, 1, 50).astype(np.float32)))
    np.testing.assert_allclose(y * 256, np.round(y * 256), atol=1e-4)


@pytest.mark.parametrize(
    "obj",
    [q.LastValueQuantizer(per_axis=True, axis=-2), q.MovingAverageQuantizer(ema_decay=0.95), q.FixedRangeQuantizer(-1.0, 127 / 128)],
    ids=["last_value", "moving_average", "fixed"],
)
def test_quantizer_config_roundtrip(obj):
    assert_config_roundtrip(obj)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="ema_decay"):
        q.MovingAverageQuantizer(ema_decay=1.0)
    with pytest.raises(ValueError, match="contain 0"):
        q.FixedRangeQuantizer(0.5, 1.0)
