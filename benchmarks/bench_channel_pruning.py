"""Channel pruning (`prune_channels`): int8 LiteRT speedup on MobileNetV2, accuracy on the MNIST recipe.

1. Latency. ``keras.applications.MobileNetV2(alpha=1.0, input_shape=(224, 224, 3), weights=None)``
   (untrained, seeded: latency does not depend on the weight values), unpruned vs
   ``prune_channels(model, ratio=0.5)``; both converted to full int8 by
   `tfopt.tflite_export.convert(..., target="mobile", mode="int8")` with the same 16 random
   representative samples in [-1, 1]; LiteRT, XNNPACK, 1 thread, side by side
   (`tfopt.tflite_export.compare_latency`: 300 invokes each in 30 interleaved blocks of 10, median of
   per-invoke times; the machine is shared, so fine blocks matter).
   Speedup = unpruned median / pruned median. Target >= 1.6x.
2. `round_to`. At ratios 0.5 and 0.7, ``round_to=1`` vs ``round_to=4`` and ``8`` (kept widths rounded
   up to a multiple), int8, side by side with the ``round_to=1`` model: does a SIMD-friendly width
   pay for its extra channels?
3. MNIST recipe. `tfopt.data.load_mnist_subset()` (4,000 train / 1,000 test real digits),
   `tfopt.data.mnist_cnn()`, float Adam(1e-3), batch 32, 8 epochs (as bench_pruning_recipe.py);
   then ``prune_channels(ratio=0.5)`` and 2 epochs of fine-tuning with a fresh Adam(1e-3). Target:
   accuracy drop <= 1 point (mean over seeds). Variants, same 2 fine-tuning epochs, to decide the
   defaults: criterion "l1" and "bn_gamma", and an iterative schedule (25% of the channels, 1
   epoch, then to 50%, 1 epoch) against the one-shot l2 default.

Usage:
    .venv/bin/python benchmarks/bench_channel_pruning.py            # full: 3 seeds
    .venv/bin/python benchmarks/bench_channel_pruning.py --seeds 5
    .venv/bin/python benchmarks/bench_channel_pruning.py --quick    # smoke: alpha 0.35 at 96x96, 1 seed, 1 epoch

Writes benchmarks/results/channel_pruning.json (channel_pruning_quick.json with --quick).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _common  # noqa: E402

TARGET_MIN_SPEEDUP = 1.6
TARGET_MAX_DROP_POINTS = 1.0
RATIO = 0.5


def _latency_section(args):
    import keras
    import numpy as np

    from tfopt import tflite_export as te
    from tfopt.channel_pruning import channel_report, prune_channels

    alpha, size = (0.35, 96) if args.quick else (1.0, 224)
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(alpha=alpha, input_shape=(size, size, 3), weights=None)
    samples = np.random.default_rng(0).random((args.samples, size, size, 3), np.float32) * 2 - 1
    _common.log("latency", f"MobileNetV2 alpha={alpha} {size}x{size}, {args.samples} representative samples")

    def int8(m):
        return te.convert(m, target="mobile", mode="int8", representative_data=samples, quiet=True)

    t0 = time.perf_counter()
    pruned = prune_channels(model, ratio=RATIO)
    report = channel_report(model, pruned)
    prune_s = time.perf_counter() - t0
    base_tfl, pruned_tfl = int8(model), int8(pruned)
    lat = te.compare_latency(base_tfl, pruned_tfl, runs=args.runs, warmup=20, threads=1, rounds=args.rounds)
    speedup = lat["float"].median_ms / lat["int8"].median_ms
    _common.log("latency", f"unpruned {lat['float'].median_ms:.2f} ms, pruned {lat['int8'].median_ms:.2f} ms: "
                f"{speedup:.2f}x")
    main = {
        "model": {"name": "MobileNetV2", "alpha": alpha, "input": [size, size, 3], "weights": None},
        "ratio": RATIO,
        "round_to": 1,
        "prune_seconds": prune_s,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "macs_ratio": report.macs_ratio,
        "int8_bytes_before": len(base_tfl.content),
        "int8_bytes_after": len(pruned_tfl.content),
        "fully_int8": te.analyze(pruned_tfl.content).is_fully_int8,
        "latency_unpruned": lat["float"].to_dict(),
        "latency_pruned": lat["int8"].to_dict(),
        "speedup": speedup,
        "target": TARGET_MIN_SPEEDUP,
        "met": speedup >= TARGET_MIN_SPEEDUP,
    }

    rounding = []
    for ratio in args.round_ratios:
        if ratio == RATIO:
            ref_model, ref_report = pruned, report
        else:
            ref_model = prune_channels(model, ratio=ratio)
            ref_report = channel_report(model, ref_model)
        ref = pruned_tfl if ratio == RATIO else int8(ref_model)
        for round_to in (4, 8):
            m = prune_channels(model, ratio=ratio, round_to=round_to)
            rep = channel_report(model, m)
            r = te.compare_latency(ref, int8(m), runs=args.runs, warmup=20, threads=1, rounds=args.rounds)
            rounding.append({
                "ratio": ratio,
                "round_to": round_to,
                "latency_round_to_1": r["float"].to_dict(),
                "latency_rounded": r["int8"].to_dict(),
                "latency_ratio": r["ratio"],
                "macs_round_to_1": ref_report.macs_after,
                "macs_rounded": rep.macs_after,
                "params_round_to_1": ref_report.params_after,
                "params_rounded": rep.params_after,
            })  # fmt: skip
            _common.log("round_to", f"ratio {ratio}, round_to {round_to}: {r['ratio']:.3f}x the round_to=1 latency "
                        f"({rep.macs_after / ref_report.macs_after:.3f}x its MACs)")
    return main, rounding


def _mnist_section(args):
    import keras
    import numpy as np

    from tfopt.channel_pruning import prune_channels
    from tfopt.data import load_mnist_subset, mnist_cnn

    (x_train, y_train), (x_test, y_test) = load_mnist_subset()
    epochs, ft_epochs = (1, 1) if args.quick else (8, 2)
    variants = ["one-shot l2"]
    if not args.quick:
        variants += ["one-shot l1", "one-shot bn_gamma", "iterative l2 (25% -> 50%)"]

    def compile_(m):
        m.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return m

    def acc(m):
        return float(np.mean(np.argmax(m.predict(x_test, batch_size=500, verbose=0), -1) == y_test))

    def fit(m, n):
        m.fit(x_train, y_train, batch_size=32, epochs=n, shuffle=True, verbose=0)

    runs = []
    for seed in range(args.seeds):
        keras.utils.set_random_seed(seed)
        model = compile_(mnist_cnn())
        t0 = time.perf_counter()
        fit(model, epochs)
        float_acc = acc(model)
        _common.log("mnist", f"seed {seed}: float acc {float_acc:.4f} ({time.perf_counter() - t0:.0f} s)")
        for variant in variants:
            keras.utils.set_random_seed(seed)
            if variant.startswith("iterative"):
                # the same 2 epochs: 25% of the channels, 1 epoch, then down to 50% (1/3 of what is left), 1 epoch
                step = compile_(prune_channels(model, ratio=0.25))
                fit(step, ft_epochs // 2)
                pruned = compile_(prune_channels(step, ratio=1 - 0.5 / 0.75))
                no_ft = None
                fit(pruned, ft_epochs - ft_epochs // 2)
            else:
                pruned = compile_(prune_channels(model, ratio=RATIO, criterion=variant.split()[-1]))
                no_ft = acc(pruned)
                fit(pruned, ft_epochs)
            report = _report(model, pruned)
            row = {
                "seed": seed,
                "variant": variant,
                "float_accuracy": float_acc,
                "pruned_accuracy_before_fine_tuning": no_ft,
                "pruned_accuracy": acc(pruned),
                "params_before": report.params_before,
                "params_after": report.params_after,
                "macs_before": report.macs_before,
                "macs_after": report.macs_after,
                "channels": {r["name"]: [r["channels_before"], r["channels_after"]] for r in report.rows},
            }
            row["drop_points"] = 100 * (float_acc - row["pruned_accuracy"])
            runs.append(row)
            _common.log("mnist", f"seed {seed} {variant}: {row['pruned_accuracy']:.4f} "
                        f"(drop {row['drop_points']:+.2f} points)")

    summary = {}
    for variant in variants:
        rows = [r for r in runs if r["variant"] == variant]
        drops = [r["drop_points"] for r in rows]
        summary[variant] = {
            "float_accuracy_mean": statistics.fmean(r["float_accuracy"] for r in rows),
            "pruned_accuracy_mean": statistics.fmean(r["pruned_accuracy"] for r in rows),
            "drop_points_mean": statistics.fmean(drops),
            "drop_points_std": statistics.stdev(drops) if len(drops) > 1 else 0.0,
            "drop_points_worst": max(drops),
            "params_ratio": rows[0]["params_after"] / rows[0]["params_before"],
            "macs_ratio": rows[0]["macs_after"] / rows[0]["macs_before"],
        }
    main = summary["one-shot l2"]
    eps = 1e-9  # accuracies are multiples of 1/1000
    target = {
        "target": TARGET_MAX_DROP_POINTS,
        "mean": main["drop_points_mean"],
        "worst_seed": main["drop_points_worst"],
        "met_on_mean": main["drop_points_mean"] <= TARGET_MAX_DROP_POINTS + eps,
        "met_on_every_seed": main["drop_points_worst"] <= TARGET_MAX_DROP_POINTS + eps,
    }
    recipe = {"float_epochs": epochs, "fine_tune_epochs": ft_epochs, "batch": 32, "lr": 1e-3, "ft_lr": 1e-3,
              "ratio": RATIO, "train": len(x_train), "test": len(x_test)}  # fmt: skip
    return {"recipe": recipe, "runs": runs, "summary": summary, "target": target}


def _report(model, pruned):
    from tfopt.channel_pruning import channel_report

    return channel_report(model, pruned)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: MobileNetV2 alpha 0.35 at 96x96, 1 seed, 1 epoch")
    p.add_argument("--seeds", type=int, default=None, help="MNIST seeds (default 3; 1 with --quick)")
    p.add_argument("--runs", type=int, default=None, help="timed invokes per model (default 300; 40 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved latency blocks (default 30; 4 with --quick)")
    p.add_argument("--samples", type=int, default=16, help="representative samples for int8 (default 16)")
    p.add_argument("--skip", choices=("latency", "mnist"), default=None, help="leave one section out")
    args = p.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.runs = args.runs or (40 if args.quick else 300)
    args.rounds = args.rounds or (4 if args.quick else 30)
    args.round_ratios = [0.5] if args.quick else [0.5, 0.7]

    import ai_edge_litert
    import keras
    import tensorflow as tf

    payload = {"benchmark": "channel_pruning", "quick": args.quick}
    targets = {}
    if args.skip != "latency":
        lat, rounding = _latency_section(args)
        payload["mobilenet_v2"] = lat
        payload["round_to"] = rounding
        targets["int8_speedup_ge_1.6"] = {"target": TARGET_MIN_SPEEDUP, "measured": lat["speedup"], "met": lat["met"]}
        _common.print_table(
            f"MobileNetV2 alpha={lat['model']['alpha']} {lat['model']['input'][0]}x{lat['model']['input'][1]}, int8, "
            f"LiteRT XNNPACK 1 thread, {args.runs} runs each, interleaved",
            ["model", "params", "MACs", "int8 bytes", "median ms", "p90 ms"],
            [
                ["unpruned", f"{lat['params_before']:,}", f"{lat['macs_before']:,}", f"{lat['int8_bytes_before']:,}",
                 f"{lat['latency_unpruned']['median_ms']:.2f}", f"{lat['latency_unpruned']['p90_ms']:.2f}"],
                [f"{RATIO:.0%} channels pruned", f"{lat['params_after']:,}", f"{lat['macs_after']:,}",
                 f"{lat['int8_bytes_after']:,}", f"{lat['latency_pruned']['median_ms']:.2f}",
                 f"{lat['latency_pruned']['p90_ms']:.2f}"],
                [f"speedup (target >= {TARGET_MIN_SPEEDUP})", "", "", "", f"{lat['speedup']:.2f}x", ""],
            ],
        )  # fmt: skip
        _common.print_table(
            "round_to: latency of the rounded model / the round_to=1 model (side by side)",
            ["ratio", "round_to", "MACs ratio", "latency ratio"],
            [[r["ratio"], r["round_to"], f"{r['macs_rounded'] / r['macs_round_to_1']:.3f}", f"{r['latency_ratio']:.3f}"]
             for r in rounding],
        )  # fmt: skip
    if args.skip != "mnist":
        mnist = _mnist_section(args)
        payload["mnist"] = mnist
        targets["mnist_drop_points_le_1"] = mnist["target"]
        _common.print_table(
            f"MNIST recipe: float {mnist['recipe']['float_epochs']} epochs -> {RATIO:.0%} channels pruned -> "
            f"{mnist['recipe']['fine_tune_epochs']} epochs fine-tuning (mean over {args.seeds} seed(s))",
            ["variant", "float acc", "pruned acc", "drop (pts)", "worst (pts)", "params", "MACs"],
            [[v, f"{s['float_accuracy_mean']:.4f}", f"{s['pruned_accuracy_mean']:.4f}",
              f"{s['drop_points_mean']:+.2f}±{s['drop_points_std']:.2f}", f"{s['drop_points_worst']:+.2f}",
              f"{s['params_ratio']:.3f}x", f"{s['macs_ratio']:.3f}x"] for v, s in mnist["summary"].items()],
        )  # fmt: skip
    payload["targets"] = targets
    for name, t in targets.items():
        ok = t.get("met", t.get("met_on_mean"))
        value = t.get("measured", t.get("mean"))
        print(f"target {name}: {value:.3f} (target {t['target']}) -> {'MET' if ok else 'MISSED'}")
    payload["machine"] = _common.machine_info({
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?"),
    })  # fmt: skip
    payload["command"] = "benchmarks/bench_channel_pruning.py" + (" --quick" if args.quick else "")
    path = _common.write_results("channel_pruning_quick" if args.quick else "channel_pruning", payload)
    print(f"\nWrote {os.path.relpath(path, _common.REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
