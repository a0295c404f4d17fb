"""Step-time overhead of pruning and QAT on each Keras backend (TensorFlow, JAX, PyTorch).

Model: an MNIST-size CNN, ``28x28x1 -> Conv2D(16, 3, relu) -> MaxPool -> Conv2D(32, 3, relu) ->
MaxPool -> Flatten -> Dense(10)``, batch 32, one synthetic batch repeated, SGD(0.01).
Variants: the plain model; ``prune_low_magnitude(model, ConstantSparsity(0.5, 0, frequency=100))``
with `UpdatePruningStep`; ``quantize_model(model)``.

Method (the same on every backend, each backend in its own process, since a process's Keras
backend is fixed at import):

1. Build and compile the three models; warm each up with a short `fit` (traces / compiles).
2. Round-robin for R rounds (`_common.round_robin`, order rotating): one ``fit(steps_per_epoch=K)``
   block per variant. A first callback times each step from its batch-begin to its batch-end hook
   (so the pruning callback's per-batch work is included, `fit`'s setup is not); a block's figure is
   the mean step time (a mean, so the one mask update per 100 steps counts).
3. Ratio = median over rounds of (variant block / plain block in the same round).

Usage:
    .venv/bin/python benchmarks/bench_backends.py                 # K=100, R=5, all backends
    .venv/bin/python benchmarks/bench_backends.py --quick         # K=20, R=2
    .venv/bin/python benchmarks/bench_backends.py --backends jax torch

Writes benchmarks/results/backends.json (backends_quick.json with --quick).
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

VARIANTS = ("plain", "pruned_f100", "qat")
BATCH = 32


def _child(steps, rounds, warmup):
    """Runs in a process whose KERAS_BACKEND is set; prints one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    sys.path.insert(0, C.REPO_ROOT)
    import tfopt
    import tfopt.callbacks

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, BATCH).astype("int32")

    def cnn():
        inputs = keras.Input((28, 28, 1))
        h = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
        h = keras.layers.MaxPooling2D()(h)
        h = keras.layers.Conv2D(32, 3, activation="relu")(h)
        h = keras.layers.MaxPooling2D()(h)
        outputs = keras.layers.Dense(10)(keras.layers.Flatten()(h))
        return keras.Model(inputs, outputs)

    base = cnn()
    models = {
        "plain": cnn(),
        "pruned_f100": tfopt.prune_low_magnitude(base, tfopt.ConstantSparsity(0.5, begin_step=0, frequency=100)),
        "qat": tfopt.quantize_model(base),
    }
    for m in models.values():
        m.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._t)

    # Enough copies of the one batch for the longest block (numpy input works on every backend).
    xs, ys = np.repeat(x, max(steps, warmup), 0), np.repeat(y, max(steps, warmup), 0)

    def block(name, n):
        timer = StepTimer()
        callbacks = [timer] + ([tfopt.callbacks.UpdatePruningStep()] if name.startswith("pruned") else [])
        models[name].fit(xs[: n * BATCH], ys[: n * BATCH], batch_size=BATCH, epochs=1, shuffle=False,
                         verbose=0, callbacks=callbacks)
        return sum(timer.times) / len(timer.times)

    for name in VARIANTS:
        block(name, warmup)
    times = C.round_robin(list(VARIANTS), rounds, lambda v: block(v, steps))
    versions = {"keras": keras.__version__, "backend": backend}
    if backend == "jax":
        import jax

        versions["jax"] = jax.__version__
    elif backend == "torch":
        import torch

        versions["torch"] = torch.__version__
    else:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    C.emit_json({"backend": backend, "versions": versions, "step_s": times,
                 "ratios": C.paired_ratios(times, "plain")})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 20, 2
    if args.child:
        return _child(args.steps, args.rounds, args.warmup)

    results = {}
    for backend in args.backends:
        C.log("backends", f"{backend}: {args.rounds} rounds x {len(VARIANTS)} variants x {args.steps} steps")
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(args.steps),
               "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{backend} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        results[backend] = json.loads([l for l in proc.stdout.splitlines() if l.strip()][-1])

    rows = []
    for backend, r in results.items():
        plain = C.median(r["step_s"]["plain"]) * 1e3
        rows.append([backend, f"{plain:.2f}", f"{r['ratios']['pruned_f100']['median']:.3f}x",
                     f"{r['ratios']['qat']['median']:.3f}x"])
    C.print_table("Step-time overhead per backend (median of paired rounds)",
                  ["backend", "plain ms/step", "pruning f=100", "QAT"], rows)
    payload = {
        "benchmark": "backends",
        "machine": C.machine_info(),
        "method": {
            "model": "28x28x1 CNN: Conv16-MaxPool-Conv32-MaxPool-Flatten-Dense10",
            "batch": BATCH,
            "optimizer": "SGD(0.01)",
            "data": "one synthetic batch repeated (numpy)",
            "variants": {"plain": "float model", "pruned_f100": "ConstantSparsity(0.5, 0, frequency=100) + UpdatePruningStep",
                         "qat": "tfopt.quantize_model"},
            "steps_per_block": args.steps,
            "rounds": args.rounds,
            "warmup_steps": args.warmup,
            "block_figure": "mean step time (batch-begin to batch-end hooks)",
            "ratio": "median over rounds of (variant block / plain block in the same round)",
            "process": "one subprocess per backend (KERAS_BACKEND fixed per process)",
        },
        "results": results,
    }
    path = C.write_results("backends_quick" if args.quick else "backends", payload)
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
