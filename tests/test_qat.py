"""tfopt.qat: quantize_model, BN folding, fusion, save/load, pruned zeros, export, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from keras import ops

import tfopt
from conftest import compile_for_test, image_data, tiny_cnn
from helpers import (
    assert_config_roundtrip, assert_save_load, assert_same_weights, int8_weight_zero_fractions, weights_of, zero_fraction,
)
from tfopt import qat
from tfopt.qat_layers import QuantizeConfig, QuantizeLayer, QuantizeWrapper
from tfopt.quantizers import LastValueQuantizer

# The backend matrix (`make test-backends`) runs this module under JAX and PyTorch too, except the
# `tensorflow_only` tests (tf.GradientTape references, TFLite conversion).
pytestmark = pytest.mark.backend_independent

L = keras.layers


def _convert(model):
    """Full-int8 TFLite of a QAT model (int8 I/O, no representative data)."""
    from tfopt import tflite_export

    return tflite_export.convert(model, target="mobile", mode="int8").content


def _op_names(content):
    return [d["op_name"] for d in Interpreter(model_content=content)._get_ops_details()]


def _assert_fully_int8(content):
    it = Interpreter(model_content=content)
    floats = [d["name"] for d in it.get_tensor_details() if d["dtype"] not in (np.int8, np.int32)]
    assert not floats, floats
    for d in it.get_input_details() + it.get_output_details():
        assert d["dtype"] == np.int8 and d["shape"][0] == 1
    assert not {"QUANTIZE", "DEQUANTIZE"} & set(_op_names(content)), _op_names(content)


def _assert_matches_tflite(model, content, x, max_steps=1.0, agreement=1.0):
    c = tfopt.tflite_export.compare(model, content, x)
    assert c.p99_error_steps <= max_steps + 1e-6, c
    assert c.top1_agreement >= agreement, c
    return c


def _fit(model, x, y, epochs=1):
    compile_for_test(model)
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0)
    return model


def _wrapper(model, name):
    return next(l for l in model.layers if isinstance(l, QuantizeWrapper) and l.layer.name == name)


# ----- structure -------------------------------------------------------------------


def test_quantize_model_structure_and_input_untouched(cnn):
    before = weights_of(cnn)
    q = tfopt.quantize_model(cnn) if hasattr(tfopt, "quantize_model") else qat.quantize_model(cnn)
    assert_same_weights(cnn, before)
    assert qat.is_quantized_model(q) and not qat.is_quantized_model(cnn)
    names = [type(l).__name__ for l in q.layers]
    assert names[:2] == ["InputLayer", "QuantizeLayer"]
    conv_a = _wrapper(q, "conv_a")
    assert conv_a.batch_norm is not None and conv_a.batch_norm.name == "bn_a"  # folded
    assert not conv_a.quantize_output  # fused with relu_a: no fake quant in between
    assert _wrapper(q, "relu_a").quantize_output
    assert _wrapper(q, "conv_b").quantize_output  # activation="relu" is inside the layer
    assert not any(isinstance(l, L.BatchNormalization) for l in q.layers)
    assert any(isinstance(l, L.Flatten) for l in q.layers)  # same-scale: copied as is


def test_bn_folding_inference_equals_folded_conv_and_tracks_float():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, name="conv")(inp)
    out = L.BatchNormalization(name="bn")(x)
    m = keras.Model(inp, out)
    bn = m.get_layer("bn")
    rng = np.random.default_rng(0)
    bn.set_weights([rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4)])
    q = qat.quantize_model(m)
    w = _wrapper(q, "conv")
    xs = rng.normal(size=(8, 6, 6, 3)).astype(np.float32)

    # Exact: conv(x, fq(W * s)) + beta + (b - mean) * s on the wrapper's input.
    gamma, beta, mean, var = bn.get_weights()
    s = gamma / np.sqrt(var + bn.epsilon)
    kernel, bias = m.get_layer("conv").get_weights()
    fq_kernel = ops.convert_to_numpy(LastValueQuantizer(per_axis=True, axis=-1)(kernel * s))
    x_in = ops.convert_to_numpy(q.layers[1](xs, training=False))
    expected = tf.nn.conv2d(x_in, fq_kernel, 1, "VALID").numpy() + beta + (bias - mean) * s
    pre_out = w.layer  # noqa: F841  (the wrapper never writes the inner kernel)
    w_noq = QuantizeWrapper.from_config({**w.get_config(), "quantize_output": False})
    w_noq.build(x_in.shape)
    w_noq.layer.set_weights(w.layer.get_weights())
    w_noq.batch_norm.set_weights(w.batch_norm.get_weights())
    got = ops.convert_to_numpy(w_noq(x_in, training=False))
    np.testing.assert_allclose(got, expected, atol=1e-4)

    # Close to the float conv -> BN (only weight rounding differs).
    ref = m.predict(x_in, verbose=0)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_bn_folding_training_uses_batch_stats_and_freezes():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    out = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="conv")(inp))
    m = keras.Model(inp, out)
    q = qat.quantize_model(m, freeze_bn_delay=2)
    w = _wrapper(q, "conv")
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(16, 6, 6, 3)).astype(np.float32)
    y = ops.convert_to_numpy(q(x, training=True))
    # Batch-normalized in training: per-channel mean ~ beta (0), std ~ gamma (1), up to the output rounding.
    assert np.abs(y.mean(axis=(0, 1, 2))).max() < 0.1
    moving = [v.numpy().copy() for v in (w.batch_norm.moving_mean, w.batch_norm.moving_variance)]
    q(x, training=True)
    assert not np.allclose(w.batch_norm.moving_mean.numpy(), moving[0])  # still updating (step 2)
    frozen = w.batch_norm.moving_mean.numpy().copy()
    q(x, training=True)  # step 3 > freeze_bn_delay: folded form, no statistics update
    np.testing.assert_array_equal(w.batch_norm.moving_mean.numpy(), frozen)


@pytest.mark.tensorflow_only
def test_bn_fold_training_shortcut_equals_the_bn_layer_on_the_unfolded_conv():
    """`_batch_stats_forward` = BN(training=True) of ``y / s + b``: outputs, moving statistics, gradients."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    out = L.BatchNormalization(name="bn", momentum=0.9)(L.Conv2D(4, 3, name="conv")(inp))
    q = qat.quantize_model(keras.Model(inp, out))
    w = _wrapper(q, "conv")
    bn = w.batch_norm
    bn.gamma.assign(np.array([1.5, -0.7, 0.0, 2.0], np.float32))  # negative and zero gamma included
    bn.moving_variance.assign(np.array([0.5, 2.0, 1.0, 3.0], np.float32))
    reference = L.BatchNormalization(momentum=0.9)
    reference.build((None, 4, 4, 4))
    reference.set_weights(bn.get_weights())
    rng = np.random.default_rng(0)
    y = tf.constant(rng.normal(1.0, 2.0, (8, 4, 4, 4)).astype(np.float32))
    b = tf.constant(rng.normal(size=4).astype(np.float32))
    s = bn.gamma / ops.sqrt(bn.moving_variance + bn.epsilon)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(y)
        got = w._batch_stats_forward(y, b, s)
        safe_s = tf.where(tf.abs(s) < 1e-12, 1e-12, s)
        want = reference(y / safe_s + b, training=True)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_mean.numpy(), reference.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), reference.moving_variance.numpy(), rtol=1e-5, atol=1e-6)
    g_got = tape.gradient(got, [y, bn.gamma, bn.beta])
    g_want = tape.gradient(want, [y, reference.gamma, reference.beta])
    for a, e in zip(g_got, g_want):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-3, atol=1e-4)


def test_relu_outputs_skip_the_min_reduction_and_keep_zero_as_the_low_end(cnn, data):
    x, _ = data
    q = qat.quantize_model(cnn)
    relu = _wrapper(q, "relu_a")
    assert relu._out_quantizers[0].non_negative
    assert not _wrapper(q, "logits")._out_quantizers[0].non_negative
    q(x, training=True)
    assert float(relu._out_vars[0]["min"].numpy()) == 0.0 and float(relu._out_vars[0]["max"].numpy()) > 0.0


def test_input_range_starts_from_first_batch(cnn, data):
    x, y = data
    q = qat.quantize_model(cnn)
    _fit(q, x[:16], y[:16])  # one step
    inq = q.layers[1]
    assert isinstance(inq, QuantizeLayer)
    lo, hi, init = [float(v.numpy()) for v in inq.weights]
    assert init == 1.0 and lo == 0.0
    np.testing.assert_allclose(hi, x[:16].max(), rtol=1e-6)


@pytest.mark.tensorflow_only
def test_weights_are_per_channel_except_dense():
    m = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3), L.DepthwiseConv2D(3, depth_multiplier=2),
                          L.Flatten(), L.Dense(3)])
    q = qat.quantize_model(m)
    _fit(q, *image_data(32, classes=3))
    content = _convert(q)
    _assert_fully_int8(content)
    it = Interpreter(model_content=content)
    weights = {tuple(d["shape"]): len(d["quantization_parameters"]["scales"])
               for d in it.get_tensor_details() if d["dtype"] == np.int8 and "FakeQuant" in d["name"]}
    assert weights[(4, 3, 3, 3)] == 4  # conv: per output channel
    assert weights[(1, 3, 3, 8)] == 8  # depthwise: per channel, 4 inputs * multiplier 2
    assert weights[(3, 128)] == 1  # dense: per tensor


class _MatMul(keras.layers.Layer):
    """A custom kernel layer: ``x @ kernel``."""

    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, shape):
        self.kernel = self.add_weight(shape=(shape[-1], self.units), initializer="glorot_uniform", name="kernel")

    def call(self, x):
        return ops.matmul(x, self.kernel)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


keras.saving.register_keras_serializable(package="tfopt_tests")(_MatMul)


@pytest.mark.parametrize("make", [
    lambda: L.EinsumDense("ab,bc->ac", output_shape=3, name="inner"),
    lambda: _MatMul(3, name="inner"),
], ids=["einsum_dense", "registered"])
def test_kernel_layer_without_a_rewrite_runs_on_its_fake_quantized_kernel(make, tmp_path):
    """A "kernel" row without `qat_forward` runs the layer's own call with the fake-quantized kernel substituted."""
    tfopt.register_layer(_MatMul, quantizable=("kernel",))
    try:
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), make(), L.Dense(2, name="head")])
        q = qat.quantize_model(m)
        w = _wrapper(q, "inner")
        x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
        _fit(q, x, np.arange(32) % 2)
        assert np.isfinite(q.history.history["loss"][-1])
        # Without its output quantizer, the wrapper computes x @ fq(kernel): int8 per tensor, symmetric, narrow.
        bare = QuantizeWrapper.from_config({**w.get_config(), "quantize_output": False})
        x_in = ops.convert_to_numpy(q.layers[1](x, training=False))
        bare.build(x_in.shape)
        bare.layer.set_weights(w.layer.get_weights())
        kernel = ops.convert_to_numpy(w.layer.kernel)
        step = np.abs(kernel).max() / 127.0
        fq = np.clip(np.floor(kernel / step + 0.5), -127, 127) * step
        assert np.abs(fq - kernel).max() <= step / 2 + 1e-7 and np.any(fq != kernel)
        np.testing.assert_allclose(ops.convert_to_numpy(bare(x_in, training=False)), x_in @ fq, rtol=1e-5, atol=1e-5)
        assert not np.allclose(x_in @ fq, x_in @ kernel, rtol=1e-5, atol=1e-5)
        assert_save_load(q, x, tmp_path / "kernel_row.keras")
    finally:
        tfopt.registry.unregister_layer(_MatMul)


def test_add_then_relu_fuses():
    """An Add layer whose only consumer is a ReLU gets no output quantizer (TFLite fuses the ReLU into ADD)."""
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(4, 3, name="a")(inp)
    b = L.Conv2D(4, 3, name="b")(inp)
    m = keras.Model(inp, L.Conv2D(2, 1, name="out")(L.ReLU(name="relu")(L.Add(name="add")([a, b]))))
    q = qat.quantize_model(m)
    assert not _wrapper(q, "add").quantize_output and _wrapper(q, "relu").quantize_output
    assert _wrapper(q, "a").quantize_output  # an Add input keeps its own range


# ----- export ----------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_cnn_exports_fully_int8_and_matches(cnn, data):
    x, y = data
    q = _fit(qat.quantize_model(cnn), x, y, epochs=2)
    content = _convert(q)
    _assert_fully_int8(content)
    assert _op_names(content) == ["CONV_2D", "CONV_2D", "RESHAPE", "FULLY_CONNECTED"]  # BN folded, ReLU fused
    _assert_matches_tflite(q, content, x)


def _covered_model():
    inp = keras.Input((16, 16, 3))
    x = L.Rescaling(1 / 127.5, offset=-1)(inp)
    x = L.ZeroPadding2D(1)(x)
    x = L.SeparableConv2D(8, 3, activation="relu")(x)
    a = L.Conv2D(4, 1, activation="hard_swish")(x)
    b = L.Activation("hard_sigmoid")(L.Conv2D(4, 1)(x))
    c = L.Activation("relu")(L.Conv2D(4, 1)(x))
    x = L.Concatenate()([a, b, c])
    x = L.Multiply()([x, L.Activation("sigmoid")(x)])
    x = L.Add()([x, L.Activation("tanh")(x)])
    x = L.MaxPooling2D()(x)
    x = L.UpSampling2D()(x)
    x = L.AveragePooling2D(2)(x)
    x = L.Conv2DTranspose(6, 3, strides=2, padding="same")(x)
    x = L.BatchNormalization()(x)
    x = L.Activation("relu6")(x)
    x = L.Dropout(0.1)(x)
    x = L.Reshape((16, 16 * 6))(x)
    x = L.Conv1D(4, 3)(x)
    x = L.Flatten()(L.Reshape((14, 4, 1))(x))
    x = L.Dense(8)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Dense(5, activation="softmax")(x)
    return keras.Model(inp, x)


@pytest.mark.slow
def test_every_covered_layer_type_quantizes_and_exports():
    m = _covered_model()
    q = qat.quantize_model(m)
    x = (np.random.default_rng(0).random((32, 16, 16, 3)) * 255).astype(np.float32)
    _fit(q, x, np.random.default_rng(1).integers(0, 5, 32), epochs=1)
    content = _convert(q)
    _assert_fully_int8(content)
    ops_ = _op_names(content)
    for op in ("DEPTHWISE_CONV_2D", "CONV_2D", "TRANSPOSE_CONV", "CONCATENATION", "LOGISTIC", "TANH",
               "MAX_POOL_2D", "AVERAGE_POOL_2D", "FULLY_CONNECTED", "SOFTMAX", "MUL", "ADD"):
        assert op in ops_, (op, ops_)
    assert "RELU" not in ops_ and "RELU6" not in ops_  # all fused
    _assert_matches_tflite(q, content, x, agreement=0.9)


@pytest.mark.slow
@pytest.mark.parametrize("act, op", [("gelu", "GELU"), ("silu", "LOGISTIC")], ids=["gelu", "silu"])
def test_gelu_and_silu_train_and_export_within_one_step(act, op):
    # Fused into Dense and as an Activation layer: the output range is learned like any other activation's.
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    h = L.Activation(act)(L.Dense(32)(L.Dense(32, activation=act)(inp)))
    q = qat.quantize_model(keras.Model(inp, L.Dense(4)(h)))
    x = np.random.default_rng(0).normal(size=(256, 16)).astype("float32")
    _fit(q, x, np.random.default_rng(1).integers(0, 4, 256), epochs=2)
    content = _convert(q)
    _assert_fully_int8(content)
    assert _op_names(content).count(op) == 2
    _assert_matches_tflite(q, content, x, agreement=0.99)  # measured: gelu max 1.0 step, silu p99 1.0 (max 2)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["MobileNetV2", "MobileNetV3Small"])
def test_mobilenets_quantize_and_export_fully_int8(arch):
    kwargs = dict(input_shape=(32, 32, 3), alpha=0.35 if arch == "MobileNetV2" else 0.75, weights=None, classes=10)
    m = getattr(keras.applications, arch)(**kwargs)
    q = qat.quantize_model(m)
    x = (np.random.default_rng(0).random((16, 32, 32, 3)) * 255).astype(np.float32)
    q.compile("adam", "sparse_categorical_crossentropy")
    q.fit(x, np.arange(16) % 10, epochs=1, batch_size=8, verbose=0)
    content = _convert(q)
    _assert_fully_int8(content)
    _assert_matches_tflite(q, content, x)


# ----- save / load -----------------------------------------------------------------


def test_save_load_identical_predictions(tmp_path, cnn, data):
    x, y = data
    q = _fit(qat.quantize_model(cnn, freeze_bn_delay=10), x, y)
    loaded = assert_save_load(q, x, tmp_path / "qat.keras")
    assert qat.is_quantized_model(loaded)
    w = _wrapper(loaded, "conv_a")
    assert w.freeze_bn_delay == 10 and w.batch_norm is not None


def test_layer_configs_roundtrip(cnn):
    q = qat.quantize_model(cnn)
    for layer in q.layers:
        if isinstance(layer, (QuantizeWrapper, QuantizeLayer)):
            assert_config_roundtrip(layer)


# ----- pruned models -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("strip", [True, False], ids=["stripped", "wrapped"])
def test_pruned_zeros_survive_qat_and_export(strip, data):
    x, y = data
    m = tiny_cnn()
    pruned = tfopt.prune_low_magnitude(m, tfopt.ConstantSparsity(0.75, begin_step=0, frequency=1))
    compile_for_test(pruned)
    pruned.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    src = tfopt.strip_pruning(pruned) if strip else pruned
    before = weights_of(src)
    q = qat.quantize_model(src)
    assert_same_weights(src, before)
    _fit(q, x, y, epochs=2)
    for name in ("conv_a", "conv_b", "logits"):
        w = _wrapper(q, name)
        assert w.preserve_sparsity
        kernel = ops.convert_to_numpy(w.layer.kernel) * ops.convert_to_numpy(w._masks[0])
        assert zero_fraction(kernel) >= 0.74
    content = _convert(q)
    fractions = int8_weight_zero_fractions(content)
    big = [f for f in fractions.values()]
    assert len([f for f in big if f >= 0.74]) >= 3, fractions


# ----- selective QAT and QuantizeConfig -----------------------------------------------


class _Scale(keras.layers.Layer):
    def build(self, shape):
        self.kernel = self.add_weight(shape=shape[-1:], initializer="ones", name="kernel")

    def call(self, x):
        return x * self.kernel


keras.saving.register_keras_serializable(package="tfopt_tests")(_Scale)


@keras.saving.register_keras_serializable(package="tfopt_tests")
class _ScaleConfig(QuantizeConfig):
    def get_weights_and_quantizers(self, layer):
        return [(layer.kernel, LastValueQuantizer())]


@keras.saving.register_keras_serializable(package="tfopt_tests")
class _TwoWeightsConfig(QuantizeConfig):
    def get_weights_and_quantizers(self, layer):
        return [(layer.kernel, LastValueQuantizer()), (layer.kernel, LastValueQuantizer())]


def test_quantize_apply_selective_and_custom_config(tmp_path):
    model = keras.Sequential([
        keras.Input((4,)),
        tfopt.quantize_annotate_layer(L.Dense(3, name="d1")) if hasattr(tfopt, "quantize_annotate_layer")
        else qat.quantize_annotate_layer(L.Dense(3, name="d1")),
        qat.quantize_annotate_layer(_Scale(name="scale"), _ScaleConfig()),
        L.Dense(2, name="float_dense"),
    ])
    q = qat.quantize_apply(model)
    kinds = {type(l).__name__ for l in q.layers}
    assert "QuantizeWrapper" in kinds and "QuantizeLayer" in kinds
    assert isinstance(q.get_layer("float_dense"), L.Dense)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    q.compile("adam", "mse")
    q.fit(x, np.zeros((8, 2)), verbose=0)
    assert_save_load(q, x, tmp_path / "sel.keras")


def test_quantize_annotate_model_then_apply_equals_quantize_model(cnn):
    a = qat.quantize_apply(qat.quantize_annotate_model(cnn))
    b = qat.quantize_model(cnn)
    assert [type(l).__name__ for l in a.layers] == [type(l).__name__ for l in b.layers]


def test_nested_model_is_inlined_and_converts(data):
    inner = tiny_cnn("inner")
    inp = keras.Input((8, 8, 3))
    out = L.Softmax()(inner(inp))
    m = keras.Model(inp, out)
    q = qat.quantize_model(m)
    assert not any(isinstance(l, keras.Model) for l in q.layers)
    assert _wrapper(q, "conv_a").batch_norm is not None


# ----- errors ------------------------------------------------------------------------


def _check_error(fn, model, exc, *patterns):
    before = weights_of(model) if isinstance(model, keras.Model) and model.built else None
    with pytest.raises(exc) as info:
        fn(model)
    for p in patterns:
        assert p in str(info.value), str(info.value)
    assert "Received:" in str(info.value)
    if before is not None:
        assert_same_weights(model, before)


def test_error_not_a_model():
    _check_error(qat.quantize_model, "model.keras", TypeError, "Sequential or Functional")


def test_error_unbuilt_model():
    _check_error(qat.quantize_model, keras.Sequential([L.Dense(2)]), ValueError, "built model")


def test_error_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = L.Dense(2)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.zeros((1, 3), np.float32))
    _check_error(qat.quantize_model, net, ValueError, "subclassed", "Functional")


def test_error_already_quantized(cnn):
    q = qat.quantize_model(cnn)
    _check_error(qat.quantize_model, q, ValueError, "already quantized", "QuantizeLayer")


class _BlockWithBN(L.Layer):
    """A user block holding a BatchNormalization, which QAT cannot fold inside it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense, self.bn = L.Dense(4), L.BatchNormalization()

    def call(self, x):
        return self.bn(self.dense(x))


def test_error_unsupported_layers_listed_once_with_fix():
    inp = keras.Input((5, 4))
    x = L.GRU(4, return_sequences=True, name="gru")(inp)
    x = L.Add()([x, L.BatchNormalization(name="lonely_bn")(x)])
    x = _BlockWithBN(name="block")(x)
    m = keras.Model(inp, L.Dense(2)(L.Flatten()(x)))
    _check_error(qat.quantize_model, m, ValueError, "'gru' of type GRU", "'lonely_bn'",
                 "'block' of type _BlockWithBN", "Recurrent layers", "QuantizeConfig", "filters=")
    # The fix works: leave them float.
    q = qat.quantize_model(m, filters=lambda layer: layer.name not in ("gru", "lonely_bn", "block"))
    assert isinstance(q.get_layer("gru"), L.GRU)


def test_error_quantize_config_with_wrong_weights():
    model = keras.Sequential([keras.Input((4,)), qat.quantize_annotate_layer(_Scale(name="scale"), _TwoWeightsConfig())])
    _check_error(qat.quantize_apply, model, ValueError, "'scale' of type _Scale", "returned 2 entries", "1 weights")


def test_error_quantize_apply_without_annotations(cnn):
    _check_error(qat.quantize_apply, cnn, ValueError, "no annotated layer", "quantize_annotate_layer")


def test_error_bad_arguments(cnn):
    with pytest.raises(ValueError, match="scheme"):
        qat.quantize_model(cnn, scheme="4bit")
    with pytest.raises(ValueError, match="ema_decay"):
        qat.quantize_model(cnn, ema_decay=1.5)
    with pytest.raises(TypeError, match="QuantizeConfig"):
        qat.quantize_annotate_layer(L.Dense(2), quantize_config="8bit")


# ----- composite layers (attention, normalization) on every backend --------------------------


def test_attention_and_layer_norm_ranges_train_on_every_backend():
    inp = keras.Input((8, 6))
    h = L.Dense(16)(inp)
    h = L.LayerNormalization()(h + L.MultiHeadAttention(2, 8)(h, h, use_causal_mask=True))
    q = qat.quantize_model(keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling1D()(h))))
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 8, 6)).astype("float32"), rng.random((64, 3)).astype("float32")
    q.compile("adam", "mse")
    q.fit(x, y, epochs=1, batch_size=16, verbose=0)
    ranges = {v.path.split("/")[-1]: float(ops.convert_to_numpy(v)) for v in q.non_trainable_weights if len(v.shape) == 0}
    # Learned from the batches, not the [-6, 6] a range starts at: the updates inside the layer's forward
    # (recorded by its weight-substitution scope) reach the variables under TensorFlow, JAX and PyTorch.
    assert ranges["self_scores_initialized"] == 1.0 and ranges["self_inverse_initialized"] == 1.0
    assert -6.0 < ranges["self_scores_min"] < 0.0 < ranges["self_scores_max"] < 6.0
    assert ranges["self_inverse_min"] == 0.0 and 0.0 < ranges["self_inverse_max"] < 6.0
    assert np.isfinite(q.predict(x, verbose=0)).all()
