"""The TFMOT side of the benchmarks and parity tests (tf_keras + tfmot 0.8.1).

Run ONLY in a subprocess with ``TF_USE_LEGACY_KERAS=1`` (see
`_common.run_tfmot`): importing TFMOT switches `tf.keras` to tf_keras for the
whole process, so it must never share a process with Keras 3 or tfopt. This
script imports neither.

Subcommands (each prints one JSON document on the last stdout line; progress
goes to stderr):

    schedules CASES_JSON          TFMOT schedules at every requested step
    recipe --data NPZ --seed S    the MNIST pruning recipe (see bench_pruning_recipe.py)
    overhead --steps K ...        step-time overhead on MobileNetV2 (see bench_pruning_overhead.py)
    qat_steptime --steps K ...    QAT train-step time on MobileNetV2 (see bench_qat.py steptime)
"""

import argparse
import json
import os
import statistics
import sys
import time

if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    sys.exit("_tfmot_runner.py must run with TF_USE_LEGACY_KERAS=1 (use benchmarks/_common.run_tfmot).")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (stdlib + numpy only)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper  # noqa: E402

sparsity = tfmot.sparsity.keras


def _log(msg):
    _common.log("tfmot", msg)


def _versions():
    return {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__, "tfmot": tfmot.__version__}


# -- schedules ----------------------------------------------------------------------


def _make_schedule(case):
    if case["kind"] == "constant":
        return sparsity.ConstantSparsity(**case["args"])
    if case["kind"] == "polynomial":
        return sparsity.PolynomialDecay(**case["args"])
    raise ValueError(f"unknown schedule kind {case['kind']!r}")


def cmd_schedules(args):
    """Evaluates each case's schedule at every step, the way the wrapper does.

    PruneLowMagnitude calls the schedule inside the train function (a graph,
    optimized by Grappler) with its int64 `pruning_step` variable, a scalar;
    so `sparsity` comes from a tf.function on an int64 scalar, one call per
    step. For information, also returned: `sparsity_eager` (the same ops run
    eagerly, no Grappler) and `sparsity_vectorized` (all steps in one eager
    tensor: Eigen's packet pow). Grappler rewrites x / c into x * (1 / c) and
    pow(x, 2 or 3) into multiplications, so the three can differ in the last
    bits.
    """
    cases = json.loads(args.cases if not args.cases.startswith("@") else open(args.cases[1:]).read())
    out = []
    for case in cases:
        schedule = _make_schedule(case)
        fn = tf.function(schedule.__call__, input_signature=[tf.TensorSpec((), tf.int64)])
        should, values, eager = [], [], []
        for step in case["steps"]:
            s, v = fn(tf.constant(step, tf.int64))
            should.append(bool(s.numpy()))
            values.append(float(np.float32(v.numpy())))
            eager.append(float(np.float32(schedule(tf.constant(step, tf.int64))[1].numpy())))
        s_vec, v_vec = schedule(tf.constant(case["steps"], tf.int64))
        v_vec = np.broadcast_to(np.asarray(v_vec.numpy(), np.float32), (len(case["steps"]),))
        out.append(
            {
                "id": case["id"],
                "should_prune": should,
                "sparsity": values,
                "sparsity_eager": eager,
                "sparsity_vectorized": [float(x) for x in v_vec],
                "should_prune_vectorized": [bool(x) for x in np.broadcast_to(s_vec.numpy(), (len(case["steps"]),))],
            }
        )
    _common.emit_json({"versions": _versions(), "cases": out})


# -- the MNIST recipe ---------------------------------------------------------------


def _mnist_cnn(input_shape=(28, 28, 1), num_classes=10, filters=(16, 32)):
    """tf_keras twin of tfopt.data.mnist_cnn(): same layers, names and defaults."""
    L = tf_keras.layers
    inputs = tf_keras.Input(input_shape, name="image")
    x = inputs
    for i, f in enumerate(filters):
        x = L.Conv2D(f, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = L.BatchNormalization(name=f"bn{i + 1}")(x)
        x = L.ReLU(name=f"relu{i + 1}")(x)
        x = L.MaxPooling2D(name=f"pool{i + 1}")(x)
    x = L.Flatten(name="flatten")(x)
    outputs = L.Dense(num_classes, name="logits")(x)
    return tf_keras.Model(inputs, outputs, name="mnist_cnn")


def _accuracy(model, x, y):
    logits = model.predict(x, batch_size=500, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def _tflite(model):
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def _compile(model, lr):
    model.compile(
        optimizer=tf_keras.optimizers.Adam(lr),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def _prunable_sparsity(model):
    """Zeros / weights over Conv2D and Dense kernels (what tfopt.sparsity_report counts here)."""
    rows = []
    for layer in model.layers:
        if isinstance(layer, (tf_keras.layers.Conv2D, tf_keras.layers.Dense)):
            k = layer.kernel.numpy()
            rows.append({"name": layer.name, "weights": int(k.size), "zeros": int(np.sum(k == 0))})
    total = sum(r["weights"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    return {"layers": rows, "weights": total, "zeros": zeros, "sparsity": zeros / total}


def cmd_recipe(args):
    data = np.load(args.data)
    x_train, y_train, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    tf_keras.utils.set_random_seed(args.seed)
    steps_per_epoch = int(np.ceil(len(x_train) / args.batch))
    end_step = args.ramp_epochs * steps_per_epoch

    model = _mnist_cnn()
    _compile(model, args.lr)
    t0 = time.perf_counter()
    if args.float_weights:
        # The same float model as tfopt's run of this seed (layer names and
        # weight order are the same in both twins).
        with np.load(args.float_weights) as arrays:
            for layer in model.layers:
                n = len(layer.get_weights())
                if n:
                    layer.set_weights([arrays[f"{layer.name}:{i}"] for i in range(n)])
    else:
        model.fit(x_train, y_train, batch_size=args.batch, epochs=args.float_epochs, shuffle=True, verbose=0)
    float_fit_s = time.perf_counter() - t0
    float_acc = _accuracy(model, x_test, y_test)
    float_tfl = _tflite(model)
    _log(f"seed {args.seed}: float acc {float_acc:.4f} ({float_fit_s:.1f} s)")

    schedule = sparsity.PolynomialDecay(
        initial_sparsity=args.initial_sparsity,
        final_sparsity=args.final_sparsity,
        begin_step=0,
        end_step=end_step,
        power=int(args.power) if float(args.power).is_integer() else args.power,
        frequency=args.frequency,
    )
    # TFMOT wraps the float model's own layer objects (aliasing): the float
    # figures above are taken before this point.
    pruned = sparsity.prune_low_magnitude(model, pruning_schedule=schedule)
    _compile(pruned, args.ft_lr)
    t0 = time.perf_counter()
    pruned.fit(
        x_train,
        y_train,
        batch_size=args.batch,
        epochs=args.prune_epochs,
        shuffle=True,
        verbose=0,
        callbacks=[sparsity.UpdatePruningStep()],
    )
    prune_fit_s = time.perf_counter() - t0
    pruned_acc = _accuracy(pruned, x_test, y_test)
    stripped = sparsity.strip_pruning(pruned)
    stripped_acc = _accuracy(stripped, x_test, y_test)
    stripped_tfl = _tflite(stripped)
    _log(f"seed {args.seed}: stripped acc {stripped_acc:.4f} ({prune_fit_s:.1f} s)")

    qat = {}
    if args.qat_epochs > 0:
        qat = _pqat(stripped, args, x_train, y_train, x_test, y_test)

    weights_path = None
    if args.weights_out:
        arrays = {f"{l.name}:{i}": w for l in stripped.layers for i, w in enumerate(l.get_weights())}
        np.savez(args.weights_out, **arrays)
        weights_path = args.weights_out

    _common.emit_json(
        {
            "framework": "tfmot",
            "seed": args.seed,
            "versions": _versions(),
            "float_accuracy": float_acc,
            "pruned_accuracy": pruned_acc,
            "stripped_accuracy": stripped_acc,
            "pruning_step": int(pruning_wrapper.collect_prunable_layers(pruned)[0].pruning_step.numpy()),
            "sparsity_kernels": _prunable_sparsity(stripped),
            "float_tflite": _common.sizes(float_tfl),
            "stripped_tflite": _common.sizes(stripped_tfl),
            "float_fit_seconds": float_fit_s,
            "prune_fit_seconds": prune_fit_s,
            "stripped_weights_npz": weights_path,
            **qat,
        }
    )


def _pqat(stripped, args, x_train, y_train, x_test, y_test):
    """Pruning-preserving QAT (TFMOT's documented PQAT recipe), then full-int8 conversion.

    quantize_annotate_model + quantize_apply with
    Default8BitPrunePreserveQuantizeScheme, fine-tuned like tfopt's QAT stage,
    converted with Optimize.DEFAULT and int8 input/output (as tfopt's export).
    """
    quantize = tfmot.quantization.keras
    scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
    with quantize.quantize_scope():
        qat = quantize.quantize_apply(quantize.quantize_annotate_model(stripped), scheme)
    _compile(qat, args.qat_lr)
    t0 = time.perf_counter()
    qat.fit(x_train, y_train, batch_size=args.batch, epochs=args.qat_epochs, shuffle=True, verbose=0)
    qat_fit_s = time.perf_counter() - t0
    qat_keras_acc = _accuracy(qat, x_test, y_test)
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    int8 = converter.convert()
    int8_acc = _tflite_accuracy(int8, x_test, y_test)
    _log(f"seed {args.seed}: PQAT keras acc {qat_keras_acc:.4f}, int8 acc {int8_acc:.4f} ({qat_fit_s:.1f} s)")
    return {
        "qat_keras_accuracy": qat_keras_acc,
        "int8_accuracy": int8_acc,
        "int8_tflite": _common.sizes(int8),
        "int8_tflite_b64": __import__("base64").b64encode(int8).decode("ascii"),
        "qat_fit_seconds": qat_fit_s,
    }


def _tflite_accuracy(content, x, y):
    """Top-1 accuracy of a .tflite on (x, y) with the LiteRT interpreter, one sample at a time."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=content)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    correct = 0
    for i in range(len(x)):
        xi = x[i : i + 1].astype(np.float32)
        if inp["dtype"] != np.float32:
            scale, zp = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            xi = np.clip(np.round(xi / scale + zp), info.min, info.max).astype(inp["dtype"])
        interp.set_tensor(inp["index"], xi)
        interp.invoke()
        o = interp.get_tensor(out["index"])
        correct += int(np.argmax(o[0]) == y[i])
    return correct / len(x)


# -- step-time overhead ---------------------------------------------------------------


class _BlockTimer(tf_keras.callbacks.Callback):
    """Per-step wall times of one fit call, each from a batch's begin hook to its end hook.

    Listed first, so its batch-begin hook runs before UpdatePruningStep's (whose work is timed).
    """

    def on_train_begin(self, logs=None):
        self.steps = []

    def on_train_batch_begin(self, batch, logs=None):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(time.perf_counter() - self.t0)


def _mobilenet(seed):
    tf_keras.utils.set_random_seed(seed)
    return tf_keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None, classes=10)


# PolynomialDecay at frequency=1 ramps over this many steps, so the sparsity
# changes at every measured step (bench_pruning_overhead.py uses the same).
POLY_END_STEP = 100_000


def cmd_overhead(args):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (args.batch, 96, 96, 3)).astype("float32")
    y = rng.integers(0, 10, (args.batch,)).astype("int32")
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()

    variants = {
        "plain": None,
        "freq100": sparsity.ConstantSparsity(0.5, 0, frequency=100),
        "freq1": sparsity.ConstantSparsity(0.5, 0, frequency=1),
        "poly_freq1": sparsity.PolynomialDecay(0.0, 0.5, 0, POLY_END_STEP, frequency=1),
    }
    models, callbacks = {}, {}
    for name, schedule in variants.items():
        model = _mobilenet(seed=0)  # one fresh base per variant: TFMOT aliases the layers it wraps
        cbs = [_BlockTimer()]
        if schedule is not None:
            model = sparsity.prune_low_magnitude(model, pruning_schedule=schedule)
            cbs.append(sparsity.UpdatePruningStep())
        model.compile(
            optimizer=tf_keras.optimizers.Adam(1e-3),
            loss=tf_keras.losses.SparseCategoricalCrossentropy(),
        )
        models[name], callbacks[name] = model, cbs

    def block(name, steps):
        models[name].fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=callbacks[name])
        timer = callbacks[name][0]
        return statistics.fmean(timer.steps)

    for name in variants:
        t0 = time.perf_counter()
        block(name, args.warmup)
        _log(f"warm-up {name}: {time.perf_counter() - t0:.1f} s")

    def on_round(r, out):
        _log("round %d: %s" % (r, ", ".join(f"{v} {ts[-1] * 1e3:.1f} ms" for v, ts in out.items())))

    times = _common.round_robin(list(variants), args.rounds, lambda v: block(v, args.steps), on_round)
    num_wrappers = sum(1 for l in models["freq1"].layers if "prune_low_magnitude" in l.name)
    _common.emit_json(
        {
            "framework": "tfmot",
            "versions": _versions(),
            "steps_per_block": args.steps,
            "rounds": args.rounds,
            "warmup_steps": args.warmup,
            "batch": args.batch,
            "num_wrappers": num_wrappers,
            "step_seconds": times,
        }
    )


# -- QAT step time ---------------------------------------------------------------------


def cmd_qat_steptime(args):
    """Same method as bench_qat.py steptime: train_on_batch blocks, float and QAT interleaved."""
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 96, 96, 3), dtype=np.float32)
    y = rng.integers(0, 10, args.batch).astype("int32")
    models = {}
    for name in ("float", "qat"):
        model = _mobilenet(seed=0)
        if name == "qat":
            model = tfmot.quantization.keras.quantize_model(model)
        model.compile(tf_keras.optimizers.SGD(1e-3), "sparse_categorical_crossentropy")
        for _ in range(args.warmup):
            model.train_on_batch(x, y)
        models[name] = model

    def block(name):
        t = time.perf_counter()
        for _ in range(args.steps):
            models[name].train_on_batch(x, y)
        return (time.perf_counter() - t) / args.steps

    times = _common.round_robin(["float", "qat"], args.rounds, block)
    _common.emit_json({"framework": "tfmot", "versions": _versions(), "steps_per_block": args.steps,
                       "rounds": args.rounds, "batch": args.batch, "times_s": times})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("schedules")
    p.add_argument("cases", help="JSON list of {id, kind, args, steps}, or @file")
    p.set_defaults(fn=cmd_schedules)

    p = sub.add_parser("recipe")
    p.add_argument("--data", required=True, help="npz with x_train, y_train, x_test, y_test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float-epochs", type=int, default=8)
    p.add_argument("--prune-epochs", type=int, default=6)
    p.add_argument("--ramp-epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--initial-sparsity", type=float, default=0.0)
    p.add_argument("--final-sparsity", type=float, default=0.8)
    p.add_argument("--power", type=float, default=3)
    p.add_argument("--frequency", type=int, default=25)
    p.add_argument("--qat-epochs", type=int, default=0, help="PQAT epochs after pruning (0: no QAT stage)")
    p.add_argument("--qat-lr", type=float, default=1e-4)
    p.add_argument("--weights-out", default=None, help="write the stripped model's weights here (npz)")
    p.add_argument("--float-weights", default=None, help="start from these float weights (npz) instead of training")
    p.set_defaults(fn=cmd_recipe)

    p = sub.add_parser("overhead")
    p.add_argument("--steps", type=int, default=100, help="steps per block")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.set_defaults(fn=cmd_overhead)

    p = sub.add_parser("qat_steptime")
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.set_defaults(fn=cmd_qat_steptime)

    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
