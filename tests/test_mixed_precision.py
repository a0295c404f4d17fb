"""Pruning, QAT, clustering and low-rank wrappers under the "mixed_float16" policy (float16 compute, float32 variables)."""

import keras
import numpy as np
import pytest
from keras import ops

import tfopt
import tfopt.callbacks
from conftest import compile_for_test, image_data, tiny_cnn
from tfopt import clustering as cl
from tfopt import low_rank as lr


@pytest.fixture
def mixed():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _fit(model, x, y, callbacks=()):
    compile_for_test(model, lr=1e-3)
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=list(callbacks))
    assert np.isfinite(history.history["loss"][-1])
    return model


def _variable_dtypes(model):
    return {w.dtype for w in model.weights if "float" in str(w.dtype)}


def test_pruning_under_mixed_float16(mixed):
    x, y = image_data()
    model = tiny_cnn()
    assert model.get_layer("conv_a").compute_dtype == "float16"
    pruned = tfopt.prune_low_magnitude(model, tfopt.ConstantSparsity(0.5, 0, frequency=1))
    _fit(pruned, x, y, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    assert _variable_dtypes(pruned) == {"float32"}
    stripped = tfopt.strip_pruning(pruned)
    assert tfopt.sparsity_report(stripped).sparsity == pytest.approx(0.5, abs=0.01)
    out = stripped.predict(x, verbose=0)
    assert out.dtype == np.float16 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, pruned.predict(x, verbose=0), atol=1e-2)


def _range_variables(model):
    return [w for w in model.weights if w.path.endswith(("_min", "_max", "_initialized"))]


def test_qat_under_mixed_float16(mixed):
    """QAT trains under mixed_float16 with float32 ranges and float32 weight fake quant, and exports to int8."""
    x, y = image_data()
    model = tiny_cnn()
    qat = tfopt.quantize_model(model)
    wrapper = qat.get_layer("quant_conv_a")
    assert wrapper.compute_dtype == "float16" and wrapper.batch_norm is not None  # the folded-BN path
    ranges = _range_variables(qat)
    assert ranges and {str(w.dtype) for w in ranges} == {"float32"}
    assert not any(w._autocast for w in ranges)  # read as float32 inside the float16 layers, too
    _fit(qat, x, y)
    assert _variable_dtypes(qat) == {"float32"}
    assert all(np.isfinite(ops.convert_to_numpy(w)).all() for w in ranges)
    out = ops.convert_to_numpy(qat(x[:8], training=False))
    assert out.dtype == np.float16 and np.all(np.isfinite(out))

    # Export straight from the mixed model: convert() converts a float32 twin (same config with
    # float32 policies, same float32 variables) and leaves the user's model as it is.
    before = [w.copy() for w in qat.get_weights()]
    tfl = tfopt.tflite_export.convert(qat, target="mobile", mode="int8")
    assert tfl.report.is_fully_int8
    assert qat.get_layer("quant_conv_a").compute_dtype == "float16"
    for a, b in zip(before, qat.get_weights()):
        np.testing.assert_array_equal(a, b)
    # The file computes what the float32 QAT model with these weights computes, within one step, and
    # that model agrees with the mixed one up to float16 rounding.
    keras.mixed_precision.set_global_policy("float32")
    qat32 = tfopt.quantize_model(tiny_cnn())
    qat32.set_weights(before)
    out32 = qat32.predict(x, verbose=0)
    out16 = qat.predict(x, verbose=0).astype(np.float32)
    assert np.mean(out32.argmax(-1) == out16.argmax(-1)) >= 0.9
    np.testing.assert_allclose(out16, out32, atol=0.1 * float(np.abs(out32).max()))
    assert tfopt.tflite_export.compare(qat32, tfl.content, x[:16]).p99_error_steps <= 1.0 + 1e-6


def test_qat_weight_path_is_float32_under_mixed_float16(mixed):
    """The fake-quantized kernel of a mixed model equals the float32 one (computed in float32, then cast)."""
    x, _ = image_data(8)
    qat16 = tfopt.quantize_model(tiny_cnn())
    keras.mixed_precision.set_global_policy("float32")
    qat32 = tfopt.quantize_model(tiny_cnn())
    qat32.set_weights(qat16.get_weights())
    seen = {}
    import tfopt.qat_layers as ql

    original = ql._weight_fq
    ql._weight_fq = lambda w, axis, depthwise: seen.setdefault(keras.backend.standardize_dtype(w.dtype), []).append(
        ops.convert_to_numpy(original(w, axis, depthwise))
    ) or original(w, axis, depthwise)
    try:
        qat16(x, training=False)
        qat32(x, training=False)
    finally:
        ql._weight_fq = original
    assert set(seen) == {"float32"}  # both models fake-quantize float32 kernels
    n = len(seen["float32"]) // 2
    assert n == 3
    for a, b in zip(seen["float32"][:n], seen["float32"][n:]):
        np.testing.assert_array_equal(a, b)


def test_clustering_under_mixed_float16(mixed):
    x, y = image_data()
    clustered = _fit(cl.cluster_weights(tiny_cnn(), 8), x, y)
    wrapper = clustered.get_layer("cluster_logits")
    (_, centroids, _, _), = wrapper.clustered_variables
    assert centroids.dtype == "float32" and wrapper.compute_dtype == "float16"
    stripped = cl.strip_clustering(clustered)
    assert cl.clustering_report(stripped).max_distinct <= 8
    np.testing.assert_allclose(stripped.predict(x, verbose=0), clustered.predict(x, verbose=0), atol=1e-2)


def test_low_rank_under_mixed_float16(mixed):
    x, y = image_data()
    model = tiny_cnn()
    new = lr.low_rank_factorize(model, rank=2)
    report = lr.low_rank_report(model, new)
    assert any(r["factorized"] for r in report.rows)
    assert new.get_layer("logits_u").compute_dtype == "float16"
    assert _variable_dtypes(new) == {"float32"}
    _fit(new, x, y)


def test_policy_is_restored_after_the_tests_above():
    """Runs last in this file (pytest keeps definition order): the fixture restored float32 after each test."""
    assert keras.mixed_precision.global_policy().name == "float32"
