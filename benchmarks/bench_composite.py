"""Pruning keras-hub backbones built from config: BERT and ViT classifiers.

Models (no preset is downloaded):
- BERT: ``BertBackbone(vocabulary_size=1000, num_layers=2, num_heads=2, hidden_dim=64, intermediate_dim=128,
  max_sequence_length=32)`` with 3 int32 inputs (token ids, segment ids, padding mask), pooled output ->
  Dense(2).
- ViT: ``ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
  mlp_dim=128)``, class token -> Dense(2).

What it measures:
1. Pruned to 50% during `fit` with ``PolynomialDecay(0, 0.5, begin_step=0, end_step=E)``: the sparsity of
   every pruned kernel with >= 1,000 weights (min / max), whether strip + `.keras` reload predicts
   identically (BERT; keras-hub's ViT patch embedding cannot be saved outside its backbone, so the ViT
   check is the pruned model's reload), and the largest |pruned - stripped| output difference.
2. Pruning step overhead on the BERT classifier at ``ConstantSparsity(0.5, frequency=100)``: plain and
   pruned models interleaved in one process (round robin, blocks of K steps), the median over rounds of
   the per-round ratio.

Usage:
    .venv/bin/python benchmarks/bench_composite.py             # K=100, R=5
    .venv/bin/python benchmarks/bench_composite.py --quick     # K=20, R=2

Writes benchmarks/results/composite.json.
"""

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _common  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from bench_pruning_overhead import BlockTimer  # noqa: E402

import tfopt  # noqa: E402
import tfopt.callbacks  # noqa: E402

SEQ, VOCAB, BATCH = 32, 1000, 32


def bert(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=64,
                                             intermediate_dim=128, max_sequence_length=SEQ)
    inputs = {k: keras.Input((SEQ,), dtype="int32", name=k) for k in ("token_ids", "segment_ids", "padding_mask")}
    return keras.Model(inputs, keras.layers.Dense(2)(backbone(inputs)["pooled_output"]), name="bert_classifier")


def vit(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
                                            hidden_dim=64, mlp_dim=128)
    inputs = keras.Input((32, 32, 3), name="images")
    return keras.Model(inputs, keras.layers.Dense(2)(backbone(inputs)[:, 0]), name="vit_classifier")


def bert_data(n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype("int32")
    x = {"token_ids": rng.integers(0, VOCAB, (n, SEQ)).astype("int32") * mask,
         "segment_ids": np.zeros((n, SEQ), "int32"), "padding_mask": mask}
    return x, rng.integers(0, 2, n).astype("int32")


def vit_data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 32, 32, 3)).astype("float32"), rng.integers(0, 2, n).astype("int32")


def compile_(model):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def prune_to_half(name, build, data, epochs=3, n=256):
    x, y = data(n)
    end_step = (epochs - 1) * n // BATCH
    pruned = compile_(tfopt.prune_low_magnitude(
        build(), tfopt.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=end_step, frequency=4)))
    pruned.fit(x, y, epochs=epochs, batch_size=BATCH, callbacks=[tfopt.callbacks.UpdatePruningStep()], verbose=0)
    kernels = {f"{w.layer.name}/{v.path}": float(np.mean(keras.ops.convert_to_numpy(v) == 0))
               for w in pruned._flatten_layers() if isinstance(w, tfopt.PruneLowMagnitude)
               for v, _, _ in w.pruned_weights if np.prod(v.shape) >= 1000}
    stripped = tfopt.strip_pruning(pruned)
    with tempfile.TemporaryDirectory() as d:
        target = stripped if name == "bert" else pruned
        path = os.path.join(d, "m.keras")
        target.save(path)
        reloaded = keras.saving.load_model(path)
        identical = bool(np.array_equal(reloaded.predict(x, verbose=0), target.predict(x, verbose=0)))
    diff = float(np.max(np.abs(stripped.predict(x, verbose=0) - pruned.predict(x, verbose=0))))
    out = {
        "kernels_ge_1000": len(kernels),
        "min_sparsity": min(kernels.values()),
        "max_sparsity": max(kernels.values()),
        "reload_checked": "stripped" if name == "bert" else "pruned",
        "reload_identical": identical,
        "max_abs_diff_pruned_vs_stripped": diff,
        "per_kernel": kernels,
    }
    _common.log(name, f"{len(kernels)} kernels >= 1000 weights, sparsity {out['min_sparsity']:.4f}.."
                      f"{out['max_sparsity']:.4f}, reload identical {identical}, max diff {diff:.2e}")
    return out


def overhead(steps, rounds, warmup):
    x, y = bert_data(BATCH)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    models = {
        "plain": compile_(bert()),
        "freq100": compile_(tfopt.prune_low_magnitude(bert(), tfopt.ConstantSparsity(0.5, 0, frequency=100))),
    }
    callbacks = {"plain": [BlockTimer()], "freq100": [BlockTimer(), tfopt.callbacks.UpdatePruningStep()]}

    def block(name, k):
        models[name].fit(dataset, epochs=1, steps_per_epoch=k, verbose=0, callbacks=callbacks[name])
        return statistics.fmean(callbacks[name][0].steps)

    for name in models:
        block(name, warmup)
    times = _common.round_robin(list(models), rounds, lambda v: block(v, steps))
    ratios = _common.paired_ratios(times, "plain")
    out = {
        "steps_per_block": steps,
        "rounds": rounds,
        "median_step_ms": {v: 1e3 * statistics.median(ts) for v, ts in times.items()},
        "ratio_freq100": ratios["freq100"]["median"],
        "ratio_per_round": ratios["freq100"]["per_round"],
    }
    _common.log("bert", f"step overhead at frequency=100: {out['ratio_freq100']:.3f}x "
                        f"(per round {', '.join(f'{r:.3f}' for r in out['ratio_per_round'])})")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, rounds = (20, 2) if args.quick else (args.steps, args.rounds)
    results = {
        "machine": _common.machine_info(),
        "bert": prune_to_half("bert", bert, bert_data),
        "vit": prune_to_half("vit", vit, vit_data),
        "bert_overhead": overhead(steps, rounds, warmup=max(steps // 5, 5)),
    }
    _common.write_results("composite", results)


if __name__ == "__main__":
    main()
