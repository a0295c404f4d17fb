"""tfopt.distillation: distill on keras.distillation, the loss against numpy, pruned / clustered / QAT students, export, errors."""

import keras
import numpy as np
import pytest
from keras import ops

import tfopt
import tfopt.callbacks
from conftest import image_data, tiny_cnn
from helpers import assert_same_weights, weights_of
from tfopt import clustering as cl
from tfopt.distillation import distill, strip_distillation

L = keras.layers
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def small_student(name="student", activation=None):
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, strides=2, activation="relu", name="s_conv")(inputs)
    x = L.Flatten(name="s_flatten")(x)
    return keras.Model(inputs, L.Dense(4, activation=activation, name="s_logits")(x), name=name)


def compiled(distiller, lr=1e-2):
    distiller.compile(optimizer=keras.optimizers.Adam(lr), loss=CE, metrics=["accuracy"])
    return distiller


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_returns_a_keras_distiller_on_a_frozen_copy_of_the_teacher(cnn):
    student = small_student()
    before = weights_of(cnn)
    d = distill(cnn, student, temperature=4.0, alpha=0.25)
    assert isinstance(d, keras.distillation.Distiller)
    assert d.student is student and d.teacher is not cnn
    (loss,) = d.distillation_losses
    assert isinstance(loss, keras.distillation.LogitsDistillation) and loss.temperature == 4.0
    assert d.student_loss_weight == 0.25
    assert cnn.trainable and all(l.trainable for l in cnn.layers)  # the user's teacher is not frozen
    assert not d.teacher.trainable
    assert_same_weights(d.teacher, before)


def test_loss_matches_the_numpy_formula(cnn, data):
    x, y = data
    x, y = x[:16], y[:16]
    T, alpha = 3.0, 0.3
    d = compiled(distill(cnn, small_student(), temperature=T, alpha=alpha))
    student_logits = ops.convert_to_numpy(d.student(x, training=False))
    total = float(ops.convert_to_numpy(d.compute_loss(x=x, y=y, y_pred=d.student(x, training=False), training=False)))
    t = ops.convert_to_numpy(cnn(x, training=False)).astype(np.float64)
    s = student_logits.astype(np.float64)
    hard = -np.mean(log_softmax(s)[np.arange(len(y)), y])
    p_t = np.clip(np.exp(log_softmax(t / T)), 1e-7, 1.0)
    p_s = np.clip(np.exp(log_softmax(s / T)), 1e-7, 1.0)
    kl = np.mean(np.sum(p_t * np.log(p_t / p_s), axis=-1))
    assert total == pytest.approx(alpha * hard + (1 - alpha) * T**2 * kl, rel=1e-4)


def test_keras_default_kl_string_skips_the_softmax():
    """Why distill passes a KLDivergence instance: the default string loss gives another number (Keras 3.15)."""
    t = np.array([[2.0, 0.5, -1.0]], "float32")
    s = np.array([[1.0, 0.0, 0.0]], "float32")
    p_t, p_s = np.exp(log_softmax(t / 3.0)), np.exp(log_softmax(s / 3.0))
    expected = 9.0 * float(np.sum(p_t * np.log(p_t / p_s)))
    ours = keras.distillation.LogitsDistillation(temperature=3.0, loss=keras.losses.KLDivergence())
    assert float(ops.convert_to_numpy(ours.compute_loss(t, s))) == pytest.approx(expected, rel=1e-4)
    default = keras.distillation.LogitsDistillation(temperature=3.0)
    if float(ops.convert_to_numpy(default.compute_loss(t, s))) == pytest.approx(expected, rel=1e-4):
        pytest.fail("Keras fixed LogitsDistillation's default loss: the explicit KLDivergence in distill() can go")


def test_fit_trains_the_student_in_place_and_never_the_teacher(cnn, data):
    x, y = data
    student = small_student()
    s_before, t_before = weights_of(student), weights_of(cnn)
    d = compiled(distill(cnn, student))
    history = d.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert {"distillation_loss", "student_loss", "accuracy"} <= set(history.history)
    assert history.history["total_loss"][-1] < history.history["total_loss"][0]
    assert_same_weights(cnn, t_before)
    assert_same_weights(d.teacher, t_before)
    assert any(not np.array_equal(a, b) for a, b in zip(weights_of(student), s_before))
    assert strip_distillation(d) is student


def test_pruned_student_comes_out_plain_and_sparse(cnn, data):
    x, y = data
    student = tfopt.prune_low_magnitude(small_student(), tfopt.ConstantSparsity(0.5, 0, frequency=1))
    d = compiled(distill(cnn, student))
    d.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    plain = strip_distillation(d)
    assert not any(isinstance(l, tfopt.PruneLowMagnitude) for l in plain._flatten_layers())
    assert tfopt.sparsity_report(plain).sparsity == pytest.approx(0.5, abs=0.01)
    np.testing.assert_allclose(plain.predict(x, verbose=0), student.predict(x, verbose=0), atol=1e-5)


@pytest.mark.slow
def test_clustered_student_comes_out_plain_and_exports(cnn, data):
    x, y = data
    student = cl.cluster_weights(small_student(), 6)
    d = compiled(distill(cnn, student))
    d.fit(x, y, epochs=1, batch_size=16, verbose=0)
    plain = strip_distillation(d)
    assert not any(isinstance(l, cl.ClusterWeights) for l in plain._flatten_layers())
    assert cl.clustering_report(plain).max_distinct <= 6
    tfl = tfopt.tflite_export.convert(plain, target="mobile", mode="int8", representative_data=x[:50])
    assert tfl.report.is_fully_int8
    assert tfopt.tflite_export.compare(plain, tfl, x[:32]).top1_agreement >= 0.9


@pytest.mark.slow
def test_qat_student_is_returned_as_is_and_converts_without_data(cnn, data):
    x, y = data
    student = tfopt.quantize_model(small_student())
    d = compiled(distill(cnn, student), lr=1e-3)
    d.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert strip_distillation(d) is student
    tfl = tfopt.tflite_export.convert(strip_distillation(d), target="mobile", mode="int8")
    assert tfl.report.is_fully_int8


# ----- errors -------------------------------------------------------------------------------


BAD = [
    ("temperature_zero", dict(temperature=0.0), ValueError, r"`temperature` must be a positive.*Received: temperature=0.0"),
    ("temperature_negative", dict(temperature=-2), ValueError, r"Received: temperature=-2"),
    ("temperature_str", dict(temperature="3"), TypeError, r"Received: temperature='3'"),
    ("alpha_negative", dict(alpha=-0.1), ValueError, r"`alpha` must be in \[0, 1\].*Received: alpha=-0.1"),
    ("alpha_above_one", dict(alpha=1.5), ValueError, r"Received: alpha=1.5"),
    ("alpha_bool", dict(alpha=True), TypeError, r"Received: alpha=True"),
]


@pytest.mark.parametrize("kwargs,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments(cnn, kwargs, exc, match):
    student = small_student()
    before = weights_of(cnn)
    with pytest.raises(exc, match=match):
        distill(cnn, student, **kwargs)
    assert cnn.trainable and student.trainable
    assert_same_weights(cnn, before)


def test_bad_models(cnn):
    with pytest.raises(ValueError, match=r"student must output logits.*'s_logits' of type Dense applies 'softmax'"):
        distill(cnn, small_student(activation="softmax"))
    probs = keras.Model(cnn.inputs, L.Softmax(name="probs")(cnn.outputs[0]))
    with pytest.raises(ValueError, match=r"teacher must output logits.*'probs' of type Softmax"):
        distill(probs, small_student())
    inner = keras.Sequential([keras.Input((8, 8, 3)), L.Flatten(), L.Dense(4, activation="softmax", name="inner_probs")])
    outer_inputs = keras.Input((8, 8, 3))
    nested = keras.Model(outer_inputs, inner(outer_inputs))
    with pytest.raises(ValueError, match=r"teacher must output logits.*'inner_probs' of type Dense applies 'softmax'"):
        distill(nested, small_student())  # the output layer of a nested model is looked into
    inputs = keras.Input((8, 8, 3))
    wide = keras.Model(inputs, L.Dense(6)(L.Flatten()(inputs)))
    with pytest.raises(ValueError, match=r"same output shapes.*teacher outputs=\[\(4,\)\], student outputs=\[\(6,\)\]"):
        distill(cnn, wide)
    small_inputs = keras.Input((4, 4, 3))
    other = keras.Model(small_inputs, L.Dense(4)(L.Flatten()(small_inputs)))
    with pytest.raises(ValueError, match=r"same input shapes"):
        distill(cnn, other)
    with pytest.raises(ValueError, match="the same model"):
        distill(cnn, cnn)
    with pytest.raises(ValueError, match=r"must be built.*Received: student="):
        distill(cnn, keras.Sequential([L.Dense(4)]))
    with pytest.raises(TypeError, match=r"`teacher` must be a keras Model.*Received: teacher=3"):
        distill(3, small_student())

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.flat, self.dense = L.Flatten(), L.Dense(4)

        def call(self, x):
            return self.dense(self.flat(x))

    sub = Sub()
    sub(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(ValueError, match="`teacher` must be a Sequential or Functional model"):
        distill(sub, small_student())
    with pytest.raises(TypeError, match=r"keras.distillation.Distiller.*Received: distiller="):
        strip_distillation(cnn)
