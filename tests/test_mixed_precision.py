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


@pytest.mark.xfail(
    strict=True,
    raises=TypeError,
    reason=(
        "QAT layers mix float16 and float32 under mixed_float16: MovingAverageQuantizer.build creates its range "
        "variables with autocast=True, so QuantizeLayer reads them as float16 against its float32-cast input "
        "('AddV2' float32 vs float16), and QuantizeWrapper._call_kernel feeds float32 (fake-quantized, BN-folded) "
        "kernels to float16 convolutions. Fix: run QAT layers in float32 (quantize_model builds QuantizeWrapper, "
        "QuantizeLayer and their inner copies with dtype='float32', casting at their boundaries) and create the "
        "range variables with autocast=False."
    ),
)
def test_qat_under_mixed_float16(mixed):
    x, y = image_data()
    qat = tfopt.quantize_model(tiny_cnn())
    _fit(qat, x, y)
    out = ops.convert_to_numpy(qat(x[:8], training=False))
    assert np.all(np.isfinite(out))
    assert _variable_dtypes(qat) == {"float32"}


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
    new, report = lr.low_rank_factorize(model, rank=2)
    assert any(r["factorized"] for r in report.rows)
    assert new.get_layer("logits_u").compute_dtype == "float16"
    assert _variable_dtypes(new) == {"float32"}
    _fit(new, x, y)


def test_policy_is_restored_after_the_tests_above():
    """Runs last in this file (pytest keeps definition order): the fixture restored float32, even after the xfail."""
    assert keras.mixed_precision.global_policy().name == "float32"
