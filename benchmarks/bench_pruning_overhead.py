"""Training step-time overhead of pruning, tfopt vs TFMOT, on MobileNetV2.

Model: ``MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None,
classes=10)``, batch 32, one synthetic batch repeated (tf.data), Adam(1e-3).
Variants: the plain model, and the model pruned with
``ConstantSparsity(0.5, begin_step=0, frequency=100)`` and ``frequency=1``
(the targets), plus ``PolynomialDecay(0, 0.5, 0, 100_000, frequency=1)``,
whose sparsity changes at every step (no target: it shows the cost of a
real mask update at every step, on both sides).

Method (the same on both sides, each side in its own process):

1. Build and compile the three models up front; warm each up with a short
   `fit` (traces the train function).
2. Round-robin for R rounds: for each variant, one `fit(steps_per_epoch=K)`
   block (the variant order rotates every round). A callback listed first
   times every step from its batch-begin hook to its batch-end hook, so
   `fit`'s own setup is excluded and the pruning callback's per-batch work is
   included; a block's figure is the mean of its step times (a mean, not a
   median, so that a mask update every 100 steps is counted). K defaults to 100: every block holds exactly one mask update at
   frequency=100.
3. Per variant: the median over rounds of the block figure; the ratio =
   median over rounds of (variant / plain in the same round). The ratio of
   the medians is reported too.

tfopt runs in this process (Keras 3); TFMOT runs on tf_keras in
`_tfmot_runner.py overhead` (a subprocess with TF_USE_LEGACY_KERAS=1).
tfopt's `UpdatePruningStep.on_train_batch_begin` (eager, between steps) is
timed separately, to show where the overhead goes.

Targets: tfopt <= 1.05x at frequency=100, <= 1.15x at frequency=1, and within
5% of TFMOT's ratio.

Usage:
    .venv/bin/python benchmarks/bench_pruning_overhead.py                 # K=100, R=5
    .venv/bin/python benchmarks/bench_pruning_overhead.py --steps 50 --rounds 8
    .venv/bin/python benchmarks/bench_pruning_overhead.py --quick         # K=10, R=2

Writes benchmarks/results/pruning_overhead.json.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _common  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfopt  # noqa: E402
import tfopt.callbacks  # noqa: E402

# PolynomialDecay at frequency=1 over a long ramp: the sparsity changes at
# every measured step, so masks really are recomputed at every step (with
# ConstantSparsity, monotone masks stop changing after the first update).
POLY_END_STEP = 100_000
VARIANTS = {
    "plain": None,
    "freq100": lambda: tfopt.ConstantSparsity(0.5, begin_step=0, frequency=100),
    "freq1": lambda: tfopt.ConstantSparsity(0.5, begin_step=0, frequency=1),
    "poly_freq1": lambda: tfopt.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=POLY_END_STEP, frequency=1),
}
TARGETS = {"freq100": 1.05, "freq1": 1.15}
TARGET_VS_TFMOT = 0.05


class BlockTimer(keras.callbacks.Callback):
    """Per-step wall times of one fit call, each from a batch's begin hook to its end hook (listed first)."""

    def on_train_begin(self, logs=None):
        self.steps = []

    def on_train_batch_begin(self, batch, logs=None):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(time.perf_counter() - self.t0)


class TimedUpdatePruningStep(tfopt.callbacks.UpdatePruningStep):
    """UpdatePruningStep that records how long its per-batch hook takes, and whether it updated masks.

    Uses only public API: it counts calls to each wrapper's `update_masks`.
    """

    def __init__(self):
        super().__init__()
        self.hook_seconds = []
        self.update_steps = []
        self._updates = 0

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for layer in self.model._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, tfopt.PruneLowMagnitude) and not getattr(layer, "_bench_counted", False):
                layer._bench_counted = True
                layer.update_masks = self._counting(layer.update_masks)

    def _counting(self, fn):
        def update_masks(sparsity):
            self._updates += 1
            return fn(sparsity)

        return update_masks

    def on_train_batch_begin(self, batch, logs=None):
        before = self._updates
        t0 = time.perf_counter()
        super().on_train_batch_begin(batch, logs)
        self.hook_seconds.append(time.perf_counter() - t0)
        self.update_steps.append(self._updates > before)


def mobilenet(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=10)


def build_tfopt_variants():
    models, callbacks = {}, {}
    for name, schedule in VARIANTS.items():
        model = mobilenet(seed=0)
        cbs = [BlockTimer()]
        if schedule is not None:
            model = tfopt.prune_low_magnitude(model, schedule())
            cbs.append(TimedUpdatePruningStep())
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy())
        models[name], callbacks[name] = model, cbs
    return models, callbacks


def measure_tfopt(steps, rounds, warmup, batch):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, 96, 96, 3)).astype("float32")
    y = rng.integers(0, 10, (batch,)).astype("int32")
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    models, callbacks = build_tfopt_variants()

    def block(name, k):
        models[name].fit(dataset, epochs=1, steps_per_epoch=k, verbose=0, callbacks=callbacks[name])
        timer = callbacks[name][0]
        return statistics.fmean(timer.steps)

    for name in VARIANTS:
        t0 = time.perf_counter()
        block(name, warmup)
        _common.log("tfopt", f"warm-up {name}: {time.perf_counter() - t0:.1f} s")
    for name in VARIANTS:  # drop the warm-up's hook times
        for cb in callbacks[name][1:]:
            cb.hook_seconds.clear()
            cb.update_steps.clear()

    def on_round(r, out):
        _common.log("tfopt", "round %d: %s" % (r, ", ".join(f"{v} {ts[-1] * 1e3:.1f} ms" for v, ts in out.items())))

    times = _common.round_robin(list(VARIANTS), rounds, lambda v: block(v, steps), on_round)

    hooks = {}
    for name in VARIANTS:
        if len(callbacks[name]) < 2:
            continue
        cb = callbacks[name][1]
        upd = [t for t, u in zip(cb.hook_seconds, cb.update_steps) if u]
        other = [t for t, u in zip(cb.hook_seconds, cb.update_steps) if not u]
        hooks[name] = {
            "mean_ms_per_step": 1e3 * statistics.fmean(cb.hook_seconds),
            "update_steps": len(upd),
            "update_median_ms": 1e3 * statistics.median(upd) if upd else None,
            "non_update_steps": len(other),
            "non_update_median_ms": 1e3 * statistics.median(other) if other else None,
        }
    wrappers = [l for l in models["freq1"].layers if isinstance(l, tfopt.PruneLowMagnitude)]
    return {
        "framework": "tfopt",
        "num_wrappers": len(wrappers),
        "num_pruned_weights": sum(int(np.prod(w.shape)) for l in wrappers for w, _, _ in l.pruned_weights),
        "step_seconds": times,
        "callback_hook": hooks,
    }


def summarize(side):
    times = side["step_seconds"]
    ratios = _common.paired_ratios(times, "plain")
    return {
        "median_step_ms": {v: 1e3 * statistics.median(ts) for v, ts in times.items()},
        "spread": {v: _common.summarize_times(ts)["spread"] for v, ts in times.items()},
        "ratio": {v: r["median"] for v, r in ratios.items()},
        "ratio_of_medians": {v: r["ratio_of_medians"] for v, r in ratios.items()},
        "ratio_per_round": {v: r["per_round"] for v, r in ratios.items()},
    }


def check_targets(summary):
    out = {}
    tf_r = summary["tfopt"]["ratio"]
    mot_r = summary.get("tfmot", {}).get("ratio")
    for v, limit in TARGETS.items():
        out[f"tfopt_{v}_le_{limit}"] = {"target": limit, "value": tf_r[v], "met": tf_r[v] <= limit}
        if mot_r:
            rel = tf_r[v] / mot_r[v] - 1
            out[f"tfopt_{v}_within_5pct_of_tfmot"] = {
                "target": TARGET_VS_TFMOT,
                "tfopt": tf_r[v],
                "tfmot": mot_r[v],
                "relative": rel,
                "met": rel <= TARGET_VS_TFMOT,
            }
    return out


def print_tables(summary, results):
    rows = []
    for fw, s in summary.items():
        for v in VARIANTS:
            rows.append(
                [
                    fw,
                    v,
                    f"{s['median_step_ms'][v]:.1f}",
                    f"{s['spread'][v]:.1%}",
                    f"{s['ratio'][v]:.3f}x",
                    f"{s['ratio_of_medians'][v]:.3f}x",
                    " ".join(f"{r:.3f}" for r in s["ratio_per_round"][v]),
                ]
            )
    _common.print_table(
        "Step time, MobileNetV2 0.35 @ 96x96, batch 32 (median over rounds)",
        ["framework", "variant", "step ms", "spread", "ratio", "ratio of medians", "per-round ratios"],
        rows,
        align="llrrrrl",
    )
    hooks = results["tfopt"]["callback_hook"]
    rows = [
        [
            v,
            f"{h['mean_ms_per_step']:.2f}",
            h["update_steps"],
            f"{h['update_median_ms']:.1f}" if h["update_median_ms"] is not None else "-",
            f"{h['non_update_median_ms']:.2f}" if h["non_update_median_ms"] is not None else "-",
        ]
        for v, h in hooks.items()
    ]
    _common.print_table(
        f"tfopt UpdatePruningStep.on_train_batch_begin ({results['tfopt']['num_wrappers']} wrappers)",
        ["variant", "mean ms/step", "update steps", "update median ms", "other median ms"],
        rows,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per block (K)")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds (R)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps per variant")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="smoke run: K=10, R=2, warm-up 3")
    parser.add_argument("--frameworks", default="tfopt,tfmot")
    parser.add_argument("--out", default="pruning_overhead")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.warmup = 10, 2, 3
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]

    info = _common.machine_info({"tensorflow": tf.__version__, "keras": keras.__version__, "tfopt": tfopt.__version__})
    results, summary = {}, {}
    if "tfopt" in frameworks:
        results["tfopt"] = measure_tfopt(args.steps, args.rounds, args.warmup, args.batch)
        summary["tfopt"] = summarize(results["tfopt"])
    if "tfmot" in frameworks:
        results["tfmot"] = _common.run_tfmot(
            "overhead", "--steps", args.steps, "--rounds", args.rounds, "--warmup", args.warmup, "--batch", args.batch
        )
        summary["tfmot"] = summarize(results["tfmot"])
        info["tfmot_versions"] = results["tfmot"]["versions"]

    print_tables(summary, results) if "tfopt" in results else None
    targets = check_targets(summary) if "tfopt" in summary else {}
    for name, t in targets.items():
        value = t.get("value", t.get("relative"))
        print(f"target {name}: {value:.3f} (limit {t['target']}) -> {'MET' if t['met'] else 'MISSED'}")

    payload = {
        "benchmark": "pruning_overhead",
        "quick": args.quick,
        "model": "keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=10)",
        "method": {
            "steps_per_block": args.steps,
            "rounds": args.rounds,
            "warmup_steps": args.warmup,
            "batch": args.batch,
            "optimizer": "Adam(1e-3)",
            "data": "one synthetic batch, tf.data from_tensors().repeat()",
            "ratio": "median over rounds of (variant block / plain block in the same round)",
        },
        "machine": info,
        "results": results,
        "summary": summary,
        "targets": targets,
    }
    path = _common.write_results(args.out, payload)
    print(f"\nwrote {os.path.relpath(path, _common.REPO_ROOT)}")


if __name__ == "__main__":
    main()
