"""Trains pruning, then QAT, then clustering under a tf.distribute strategy; dumps the state as .npz.

Run by tests/test_distributed.py in subprocesses (a strategy's devices and cluster must be set up
before TensorFlow initializes, so this cannot run inside the pytest process):

    python tests/_mwms_worker.py mirrored OUT.npz   # MirroredStrategy on 2 logical CPU devices
    python tests/_mwms_worker.py multiworker OUT.npz   # MultiWorkerMirroredStrategy; needs TF_CONFIG

Every variable is dumped per replica (``<stage>/<path>#<replica>``), plus the pruning step counters
and the sparsity report, so the test can check that replicas and workers hold identical state.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MODE, OUT = sys.argv[1], sys.argv[2]
if MODE == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
elif MODE == "multiworker":
    # Created first: MultiWorkerMirroredStrategy must exist before any other TF op runs.
    STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
    # Keras 3.15 `fit` on TF 2.21 calls `strategy.reduce` in two ways MultiWorkerMirroredStrategy
    # rejects (keras-team/keras#20585): on the first (x, y) batch as a tuple ("Attempt to convert a
    # value (PerReplica...) to a Tensor") and with axis=0 on scalar losses ("Invalid reduction
    # dimension 0 for input with 0 dimensions"). This shim reduces element by element and drops the
    # axis of scalars, which is what both calls mean. It is not needed for MirroredStrategy.
    _reduce = STRATEGY.reduce

    def _reduce_each(reduce_op, value, axis=None):
        def one(v):
            rank = STRATEGY.experimental_local_results(v)[0].shape.rank
            return _reduce(reduce_op, v, axis=None if rank == 0 else axis)

        return tf.nest.map_structure(one, value)

    STRATEGY.reduce = _reduce_each
else:
    raise SystemExit(f"unknown mode {MODE!r}")

import keras  # noqa: E402

keras.config.disable_traceback_filtering()  # full tracebacks in the test log

import tfopt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import image_data, tiny_cnn  # noqa: E402

SEED = 7
GLOBAL_BATCH = 16
N = 64  # 4 global steps per epoch
EPOCHS = 2
TARGET_SPARSITY = 0.75
# Masks change at steps 2, 4 and 6 and reach the target at step 6 (of 8).
SCHEDULE = dict(initial_sparsity=0.0, final_sparsity=TARGET_SPARSITY, begin_step=0, end_step=6, frequency=2)


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _dataset(x, y):
    # The global batch; the strategy shards it (by data, across workers, then across replicas).
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _dump(stage, model, out):
    for v in model.variables:
        values = getattr(v.value, "values", (v.value,))  # one component per local replica
        for r, t in enumerate(values):
            out[f"{stage}/{v.path}#{r}"] = np.asarray(t.numpy())


def main():
    keras.utils.set_random_seed(SEED)
    x, y = image_data(N, seed=SEED)
    ds = _dataset(x, y)
    out = {"num_replicas_in_sync": np.array(STRATEGY.num_replicas_in_sync)}
    with STRATEGY.scope():
        pruned = _compile(tfopt.prune_low_magnitude(tiny_cnn(), tfopt.PolynomialDecay(**SCHEDULE)))
    pruned.fit(ds, epochs=EPOCHS, callbacks=[tfopt.callbacks.UpdatePruningStep()], verbose=0, shuffle=False)
    _dump("prune", pruned, out)
    for layer in pruned.layers:
        if isinstance(layer, tfopt.PruneLowMagnitude):
            out[f"step/{layer.name}"] = np.array(int(layer.pruning_step.numpy()))
    stripped = tfopt.strip_pruning(pruned)
    out["prune/sparsity"] = np.array(tfopt.sparsity_report(stripped).sparsity)

    with STRATEGY.scope():
        qat = _compile(tfopt.quantize_model(stripped))
    qat.fit(ds, epochs=1, verbose=0, shuffle=False)
    _dump("qat", qat, out)

    with STRATEGY.scope():
        clustered = _compile(tfopt.cluster_weights(stripped, 4))
    clustered.fit(ds, epochs=1, verbose=0, shuffle=False)
    _dump("cluster", clustered, out)
    out["cluster/distinct"] = np.array(
        max(len(np.unique(w)) for w in tfopt.strip_clustering(clustered).get_weights() if w.ndim > 1)
    )
    np.savez(OUT, **out)


if __name__ == "__main__":
    main()
