"""tfopt.tflite_export numbers: conversion overhead, int8 vs float latency, analysis speed.

Model: ``keras.applications.MobileNetV2(alpha=1.0, input_shape=(224, 224, 3), weights=None)``
(untrained; random inputs), seeded.

1. Conversion time, `tfopt.tflite_export.convert(model, representative_data=x)` (int8, int8 I/O,
   everything it verifies and reports included) vs the raw converter a user would write
   (`TFLiteConverter.from_keras_model` + DEFAULT + the same representative samples +
   TFLITE_BUILTINS_INT8 + int8 I/O). One untimed warm-up of each, then R rounds, each converting
   once with both, the order alternating; ratio = median over rounds of tfopt / raw of the same round. Target <= 1.2x.
2. LiteRT latency of the int8 vs the float32 model (both from tfopt, batch 1), XNNPACK, 1 thread,
   side by side (`compare_latency`: interleaved blocks, median of per-invoke times). Target int8
   <= 0.6x float.
3. `analyze` + `edgetpu_report` on the float32 .tflite (> 10 MB): median of N runs. Target < 1 s.

Usage:
    .venv/bin/python benchmarks/bench_export.py            # full: 224x224, 32 samples, 3 rounds
    .venv/bin/python benchmarks/bench_export.py --quick    # smoke: alpha 0.35 at 96x96, 1 round

Writes benchmarks/results/export.json (export_quick.json with --quick).
"""

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _common  # noqa: E402


def _raw_convert(model, samples):
    import tensorflow as tf

    def gen():
        for s in samples:
            yield [s[None]]

    c = tf.lite.TFLiteConverter.from_keras_model(model)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = gen
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    c.inference_input_type = c.inference_output_type = tf.int8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return c.convert()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--rounds", type=int, default=None, help="conversion rounds (default 3; 1 with --quick)")
    p.add_argument("--samples", type=int, default=None, help="representative samples (default 32)")
    p.add_argument("--runs", type=int, default=None, help="timed invokes per model (default 200)")
    args = p.parse_args(argv)

    import keras
    import numpy as np

    from tfopt import tflite_export as te

    alpha, size = (0.35, 96) if args.quick else (1.0, 224)
    rounds = args.rounds or (1 if args.quick else 3)
    n_samples = args.samples or (8 if args.quick else 32)
    runs = args.runs or (40 if args.quick else 200)

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(alpha=alpha, input_shape=(size, size, 3), weights=None)
    samples = np.random.default_rng(0).random((n_samples, size, size, 3), np.float32) * 2 - 1
    _common.log("export", f"MobileNetV2 alpha={alpha} {size}x{size}, {n_samples} samples, {rounds} round(s)")

    # 1. conversion time, interleaved, after one untimed warm-up of each (first-trace costs)
    te.convert(model, representative_data=samples, quiet=True)
    _raw_convert(model, samples)
    times = {"tfopt": [], "raw": []}
    tfl_int8 = raw = None
    for r in range(rounds):
        for which in (("tfopt", "raw") if r % 2 == 0 else ("raw", "tfopt")):
            t0 = time.perf_counter()
            if which == "tfopt":
                tfl_int8 = te.convert(model, representative_data=samples, quiet=True)
            else:
                raw = _raw_convert(model, samples)
            times[which].append(time.perf_counter() - t0)
            _common.log("export", f"round {r}: {which} {times[which][-1]:.1f} s")
    ratios = [a / b for a, b in zip(times["tfopt"], times["raw"])]
    conv = {
        "tfopt_s": _common.summarize_times(times["tfopt"]),
        "raw_s": _common.summarize_times(times["raw"]),
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
        "target": 1.2,
        "tfopt_fully_int8": te.analyze(tfl_int8).is_fully_int8,
        "raw_fully_int8": te.analyze(raw).is_fully_int8,
        "raw_dynamic_batch": bool(te.analyze(raw).dynamic_tensors),
    }

    # 2. latency int8 vs float, same machine, interleaved
    tfl_float = te.convert(model, mode="float32", quiet=True)
    lat = te.compare_latency(tfl_float, tfl_int8, runs=runs, warmup=20, threads=1, rounds=10)
    latency = {
        "float": lat["float"].to_dict(),
        "int8": lat["int8"].to_dict(),
        "ratio": lat["ratio"],
        "target": 0.6,
        "float_bytes": len(tfl_float.content),
        "int8_bytes": len(tfl_int8.content),
    }

    # 3. analysis speed on the float .tflite (> 10 MB at alpha 1.0)
    content = tfl_float.content
    te.analyze(content)  # warm imports / caches
    a_times, e_times, both, parse = [], [], [], []
    for _ in range(5):
        t0 = time.perf_counter()
        te.analyze(content)
        t1 = time.perf_counter()
        te.edgetpu_report(content, run_compiler_if_available=False)
        t2 = time.perf_counter()
        te.analyze(content, gzip=False)
        t3 = time.perf_counter()
        a_times.append(t1 - t0)
        e_times.append(t2 - t1)
        both.append(t2 - t0)
        parse.append(t3 - t2)
    analysis = {
        "model_bytes": len(content),
        "analyze_s": statistics.median(a_times),
        "analyze_without_gzip_s": statistics.median(parse),
        "edgetpu_report_s": statistics.median(e_times),
        "total_s": statistics.median(both),
        "target_s": 1.0,
    }

    _common.print_table(
        f"Conversion, MobileNetV2 alpha={alpha} {size}x{size}, int8, {n_samples} samples (median of {rounds})",
        ["converter", "seconds", "fully int8", "static batch 1"],
        [
            ["raw TFLiteConverter", f"{conv['raw_s']['median']:.2f}", conv["raw_fully_int8"], not conv["raw_dynamic_batch"]],
            ["tfopt convert", f"{conv['tfopt_s']['median']:.2f}", conv["tfopt_fully_int8"], True],
            ["ratio (target <= 1.2)", f"{conv['ratio_median']:.3f}", "", ""],
        ],
    )
    _common.print_table(
        f"LiteRT latency, XNNPACK, 1 thread, {runs} runs each, interleaved (ms)",
        ["model", "size", "median", "p90", "min"],
        [
            ["float32", f"{latency['float_bytes']:,}", f"{lat['float'].median_ms:.2f}", f"{lat['float'].p90_ms:.2f}",
             f"{lat['float'].min_ms:.2f}"],
            ["int8", f"{latency['int8_bytes']:,}", f"{lat['int8'].median_ms:.2f}", f"{lat['int8'].p90_ms:.2f}",
             f"{lat['int8'].min_ms:.2f}"],
            ["int8 / float (target <= 0.6)", "", f"{lat['ratio']:.3f}", "", ""],
        ],
    )
    _common.print_table(
        f"Analysis of a {len(content) / 1e6:.1f} MB .tflite (median of 5, s)",
        ["step", "seconds"],
        [["analyze", f"{analysis['analyze_s']:.3f}"], ["analyze(gzip=False)", f"{analysis['analyze_without_gzip_s']:.3f}"],
         ["edgetpu_report", f"{analysis['edgetpu_report_s']:.3f}"],
         ["total (target < 1)", f"{analysis['total_s']:.3f}"]],
    )

    import ai_edge_litert
    import tensorflow as tf

    payload = {
        "model": {"name": "MobileNetV2", "alpha": alpha, "input": [size, size, 3], "weights": None},
        "representative_samples": n_samples,
        "conversion": conv,
        "latency": latency,
        "analysis": analysis,
        "machine": _common.machine_info({
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?"),
        }),
        "command": "benchmarks/bench_export.py" + (" --quick" if args.quick else ""),
    }
    path = _common.write_results("export_quick" if args.quick else "export", payload)
    print(f"\nWrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
