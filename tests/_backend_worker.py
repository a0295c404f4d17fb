"""One seeded prune + QAT + clustering run on the Keras backend of this process; results to .npz.

Run by tests/test_backends.py once per backend, each in its own process (the Keras backend is fixed
when keras is first imported):

    KERAS_BACKEND=jax python tests/_backend_worker.py OUT_DIR

writes ``OUT_DIR/<backend>.npz`` (masks, sparsity, pruning steps, quantizer ranges, centroids,
indices, predictions) and ``OUT_DIR/qat_<backend>.keras`` (the QAT-trained model, for the export
check). Never imports TensorFlow itself (on the TensorFlow backend Keras does).

Determinism across backends: the initial weights and the data come from NumPy generators with fixed
seeds (not from Keras initializers, whose random streams differ per backend), training is plain SGD
on unshuffled data for a few steps, and nothing random runs inside the train step (no dropout).
The only backend differences left are float rounding in the kernels.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfopt  # noqa: E402
from tfopt import callbacks  # noqa: E402

# Keras itself imports TensorFlow when it is installed (set_random_seed, serialization), so the check
# that tfopt's core does not is made right after importing it.
_TF_IMPORTED_BY_TFOPT = "tensorflow" in sys.modules

BATCH = 16
SAMPLES = 64  # 4 steps per epoch


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((SAMPLES, 8, 8, 3), dtype=np.float32)
    y = rng.integers(0, 4, SAMPLES).astype("int32")
    return x, y


def float_model(seed=0):
    """The test suite's `tiny_cnn` (Conv-BN-ReLU, Conv(relu), Flatten, Dense: 8x8x3 -> 4 logits), weights drawn by NumPy."""
    from conftest import tiny_cnn  # tests/ is on sys.path: it is this script's directory

    model = tiny_cnn(name="backend_cnn")
    rng = np.random.default_rng(seed)
    weights = []
    for w in model.weights:
        shape = tuple(w.shape)
        if "moving_variance" in w.path or "gamma" in w.path:
            weights.append(np.ones(shape, np.float32))
        elif "moving_mean" in w.path or "beta" in w.path or "bias" in w.path:
            weights.append(np.zeros(shape, np.float32))
        else:  # Glorot-uniform-like scale, drawn by NumPy
            fan = float(np.prod(shape[:-1])) if len(shape) > 1 else float(shape[0])
            limit = np.sqrt(3.0 / fan)
            weights.append(rng.uniform(-limit, limit, shape).astype(np.float32))
    model.set_weights(weights)
    return model


def compile_sgd(model, lr=0.05):
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v))


def run_pruning(out, x, y):
    schedule = tfopt.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=8, frequency=2)
    pruned = compile_sgd(tfopt.prune_low_magnitude(float_model(), schedule))
    step_cb = callbacks.UpdatePruningStep()
    history = pruned.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[step_cb])
    for wrapper in tfopt.pruning.pruned_wrappers(pruned):
        for w, mask, threshold in wrapper.pruned_weights:
            key = w.path.replace("/", ".")
            out[f"prune/mask/{key}"] = _np(mask)
            out[f"prune/weight/{key}"] = _np(w)
            out[f"prune/threshold/{key}"] = _np(threshold)
        out[f"prune/step/{wrapper.name}"] = _np(wrapper.pruning_step).astype(np.int64)
    report = tfopt.sparsity_report(pruned)
    for row in report.rows:
        out[f"prune/sparsity/{row['name']}"] = np.float64(row["sparsity"])
    out["prune/sparsity_log"] = np.asarray(history.history["sparsity"], np.float64)
    out["prune/pred"] = _np(pruned.predict(x, verbose=0))
    out["prune/stripped_pred"] = _np(tfopt.strip_pruning(pruned).predict(x, verbose=0))
    out["prune/loss"] = np.asarray(history.history["loss"], np.float64)


def run_qat(out, x, y, out_dir, backend):
    # Two steps: the first sets the ranges from the batch, the second blends them and trains the
    # weights through the fake quant. Fake quant is piecewise constant: a 1e-7 kernel difference
    # can flip one int8 level, and over many steps those flips make the runs drift apart.
    qat = compile_sgd(tfopt.quantize_model(float_model()), lr=0.02)
    history = qat.fit(x, y, batch_size=2 * BATCH, epochs=1, shuffle=False, verbose=0)
    for v in qat.variables:
        name = v.path.split("/")[-1]
        if name.endswith(("_min", "_max")):
            out[f"qat/range/{v.path.replace('/', '.')}"] = _np(v)
        elif v.trainable:
            out[f"qat/weight/{v.path.replace('/', '.')}"] = _np(v)
    out["qat/pred"] = _np(qat.predict(x, verbose=0))
    out["qat/loss"] = np.asarray(history.history["loss"], np.float64)
    path = os.path.join(out_dir, f"qat_{backend}.keras")
    qat.save(path)
    loaded = keras.saving.load_model(path)
    out["qat/loaded_pred"] = _np(loaded.predict(x, verbose=0))


def run_clustering(out, x, y):
    clustered = compile_sgd(tfopt.cluster_weights(float_model(), number_of_clusters=4, cluster_centroids_init="kmeans++"))
    clustered.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for wrapper in tfopt._wrappers.find(clustered, tfopt.ClusterWeights):
        for w, centroids, mask, indices in wrapper.clustered_variables:
            key = w.path.replace("/", ".")
            out[f"cluster/centroids/{key}"] = _np(centroids)
            out[f"cluster/indices/{key}"] = _np(indices)
    stripped = tfopt.strip_clustering(clustered)
    for layer in stripped.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            out[f"cluster/distinct/{layer.name}"] = np.int64(np.unique(_np(layer.kernel)).size)
    out["cluster/pred"] = _np(clustered.predict(x, verbose=0))


def convert_error(path):
    """What `tfopt.tflite_export.convert` says on this backend ("" on TensorFlow, where it is not called)."""
    if keras.backend.backend() == "tensorflow":
        return ""
    from tfopt import tflite_export

    try:
        tflite_export.convert(path)
    except RuntimeError as e:
        return f"RuntimeError: {e}"
    return "no error"


def main(out_dir):
    backend = keras.backend.backend()
    if backend != "tensorflow" and _TF_IMPORTED_BY_TFOPT:
        raise SystemExit(f"importing tfopt imported TensorFlow under KERAS_BACKEND={backend}: the core must not")
    # No keras.utils.set_random_seed: it imports TensorFlow when installed, and nothing here draws
    # from Keras' random streams that is not overwritten (weights, data and centroids come from NumPy).
    x, y = data()
    out = {"x": x}
    run_pruning(out, x, y)
    run_qat(out, x, y, out_dir, backend)
    run_clustering(out, x, y)
    out["convert_error"] = np.str_(convert_error(os.path.join(out_dir, f"qat_{backend}.keras")))
    np.savez(os.path.join(out_dir, f"{backend}.npz"), **out)
    print(f"{backend}: wrote {len(out)} arrays to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])
