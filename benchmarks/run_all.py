"""Runs every benchmark, then rewrites the README's results section from their JSON.

The section between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in
README.md is generated here from ``benchmarks/results/*.json`` only, so the
README never shows a figure that no script measured.

Usage:
    .venv/bin/python benchmarks/run_all.py                 # all benchmarks, then the README
    .venv/bin/python benchmarks/run_all.py --only qat      # scripts whose name contains "qat"
    .venv/bin/python benchmarks/run_all.py --readme-only   # re-render the README from the JSON
    .venv/bin/python benchmarks/run_all.py --check         # exit 1 if the README is stale

Each script runs in its own process (TFMOT, inside them, in yet another one).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
README = os.path.join(REPO, "README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# (script and arguments, the JSON files it writes)
SCRIPTS = [
    (["bench_pruning_recipe.py"], ["pruning_recipe"]),
    (["bench_pruning_overhead.py"], ["pruning_overhead"]),
    (["bench_qat.py", "all"], ["qat_agreement", "qat_vs_ptq", "qat_steptime"]),
    (["bench_export.py"], ["export"]),
]


def _load(name):
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _met(ok):
    return "met" if ok else "**missed**"


def _recipe(lines):
    d = _load("pruning_recipe")
    if not d:
        lines.append("_MNIST recipe: not measured yet (`python benchmarks/bench_pruning_recipe.py`)._\n")
        return
    s = d["summary"]
    n = len(s.get("tfopt", s.get("tfmot", {})).get("seeds", []))
    lines.append(
        f"**MNIST recipe** (`benchmarks/bench_pruning_recipe.py`; {d['data']['train']:,} train / {d['data']['test']:,} "
        f"test real MNIST digits; float {d['recipe']['float_epochs']} epochs, prune 0 -> 80% over "
        f"{d['recipe']['ramp_epochs']} of {d['recipe']['prune_epochs']} epochs, QAT {d['recipe'].get('qat_epochs', 0)} "
        f"epochs; mean ± std of {n} seeds):\n"
    )
    cols = [
        ("float accuracy", "float_accuracy", "{:.2%}"),
        ("80%-pruned accuracy", "stripped_accuracy", "{:.2%}"),
        ("drop (points)", "drop_points", "{:+.2f}"),
        ("int8 TFLite accuracy", "int8_accuracy", "{:.2%}"),
        ("float TFLite gzip (B)", "float_tflite_gzip", "{:,.0f}"),
        ("pruned float TFLite gzip (B)", "stripped_tflite_gzip", "{:,.0f}"),
        ("pruned gzip ratio", "gzip_ratio", "{:.2f}x"),
        ("int8 TFLite gzip (B)", "int8_tflite_gzip", "{:,.0f}"),
        ("int8 gzip ratio vs float", "int8_gzip_ratio", "{:.1f}x"),
        ("zeros in int8 weights", "int8_weight_zero_fraction", "{:.1%}"),
    ]
    fws = [fw for fw in ("tfopt", "tfmot") if fw in s]
    header = ["", *("tfopt (Keras 3)" if fw == "tfopt" else "TFMOT 0.8.1 (tf_keras)" for fw in fws)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for label, key, fmt in cols:
        cells = []
        for fw in fws:
            st = s[fw].get(key)
            if st is None or st["mean"] != st["mean"]:
                cells.append("n/a")
                continue
            cell = fmt.format(st["mean"])
            if n > 1 and "," not in fmt:
                cell += " ± " + fmt.replace("+", "").format(st["std"]).replace("x", "")
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    t = d.get("targets", {})
    notes = []
    if "tfopt_drop_points_le_0.5" in t:
        x = t["tfopt_drop_points_le_0.5"]
        notes.append(f"pruning drop <= 0.5 points: {x['mean']:+.2f} -> {_met(x['met_on_mean'])}")
    if "tfopt_gzip_ratio_ge_3" in t:
        x = t["tfopt_gzip_ratio_ge_3"]
        notes.append(f"pruned gzip >= 3x smaller: {x['mean']:.2f}x -> {_met(x['met_on_mean'])}")
    if "tfopt_int8_accuracy_ge_tfmot" in t:
        x = t["tfopt_int8_accuracy_ge_tfmot"]
        notes.append(f"int8 accuracy >= TFMOT's ({x['target']:.2%}): {x['mean']:.2%} -> {_met(x['met_on_mean'])}")
    if "tfopt_int8_gzip_ratio_ge_12" in t:
        x = t["tfopt_int8_gzip_ratio_ge_12"]
        notes.append(f"int8 gzip >= 12x smaller than float: {x['mean']:.1f}x -> {_met(x['met_on_mean'])}")
    if notes:
        lines.append("\nTargets: " + "; ".join(notes) + ".\n")


def _overhead(lines):
    d = _load("pruning_overhead")
    if not d:
        lines.append("_Pruning step-time overhead: not measured yet._\n")
        return
    s = d["summary"]
    m = d["method"]
    lines.append(
        f"**Pruning step-time overhead** (`benchmarks/bench_pruning_overhead.py`; MobileNetV2 alpha 0.35, 96x96, batch "
        f"{m['batch']}, {m['steps_per_block']}-step blocks interleaved over {m['rounds']} rounds; ratio to a plain `fit` step "
        "in the same round, median):\n"
    )
    lines.append("| schedule | tfopt | TFMOT | target |")
    lines.append("|---|---|---|---|")
    rows = (
        ("freq100", "ConstantSparsity, frequency=100", 1.05),
        ("freq1", "ConstantSparsity, frequency=1", 1.15),
        ("poly_freq1", "PolynomialDecay, frequency=1 (masks change every step)", None),
    )
    for key, label, target in rows:
        ours = s.get("tfopt", {}).get("ratio", {}).get(key)
        theirs = s.get("tfmot", {}).get("ratio", {}).get(key)
        if ours is None and theirs is None:
            continue
        verdict = "no target" if target is None else f"<= {target}x ({'n/a' if ours is None else _met(ours <= target)})"
        if target is not None and ours is not None and theirs is not None:
            verdict += f"; within 5% of TFMOT: {_met(ours / theirs - 1 <= 0.05)}"
        lines.append(
            f"| {label} | {'n/a' if ours is None else f'{ours:.2f}x'} | {'n/a' if theirs is None else f'{theirs:.2f}x'} "
            f"| {verdict} |"
        )
    lines.append("")


def _qat(lines):
    a = _load("qat_agreement")
    if a:
        lines.append("**Keras QAT model vs its int8 TFLite** (`benchmarks/bench_qat.py agreement`; held-out inputs):\n")
        lines.append("| model | samples | top-1 agreement | p99 error (output steps) | max error (output steps) |")
        lines.append("|---|---|---|---|---|")
        for name, r in a["results"].items():
            lines.append(
                f"| {r.get('label', name)} | {r.get('num_samples', 'n/a')} | {r['top1_agreement']:.2%} | "
                f"{r['p99_error_steps']:.2f} | {r['max_error_steps']:.2f} |"
            )
        lines.append("\nTarget: agreement >= 99.5% and p99 <= 1 step.\n")
    p = _load("qat_vs_ptq")
    if p:
        lines.append(f"**QAT vs post-training quantization** (`benchmarks/bench_qat.py ptq`; {p.get('model', 'a depthwise-separable CNN')}):\n")
        lines.append("| float (Keras) | PTQ int8 (TFLite) | QAT int8 (TFLite) | PTQ drop | share of the drop QAT recovers |")
        lines.append("|---|---|---|---|---|")
        rec = p.get("fraction_recovered")
        lines.append(
            f"| {p['float_accuracy']:.2%} | {p['ptq_int8_accuracy']:.2%} | {p['qat_int8_accuracy']:.2%} | "
            f"{100 * p['ptq_drop']:+.2f} points | {'n/a (no drop)' if rec is None else f'{rec:.0%}'} |"
        )
        lines.append("")
    t = _load("qat_steptime")
    if t:
        r = t["ratios"]["qat"]["median"]
        theirs = t.get("tfmot", {}).get("ratios", {}).get("qat", {}).get("median")
        lines.append(
            f"**QAT step time** (`benchmarks/bench_qat.py steptime`; MobileNetV2 alpha 0.35, 96x96, batch "
            f"{t.get('batch', 32)}, {t['steps_per_block']}-step blocks interleaved over {t['rounds']} rounds): "
            f"{r:.2f}x a plain step (target <= 1.5x: {_met(r <= 1.5)}); TFMOT on tf_keras, same script and method: "
            f"{'n/a' if theirs is None else f'{theirs:.2f}x'}.\n"
        )


def _export(lines):
    d = _load("export")
    if not d:
        return
    c, lat, an = d["conversion"], d["latency"], d["analysis"]
    lines.append("**Export** (`benchmarks/bench_export.py`; MobileNetV2 alpha 1.0, 224x224):\n")
    lines.append("| figure | measured | target |")
    lines.append("|---|---|---|")
    lines.append(f"| conversion time, tfopt / raw converter | {c['ratio_median']:.2f}x | <= {c['target']}x ({_met(c['ratio_median'] <= c['target'])}) |")
    lines.append(
        f"| int8 / float latency, LiteRT XNNPACK, 1 thread | {lat['ratio']:.2f}x ({lat['int8']['median_ms']:.1f} vs "
        f"{lat['float']['median_ms']:.1f} ms) | <= {lat['target']}x ({_met(lat['ratio'] <= lat['target'])}) |"
    )
    lines.append(
        f"| `analyze` + `edgetpu_report` of a {an['model_bytes'] / 1e6:.1f} MB file | {an['total_s']:.2f} s "
        f"({an['analyze_without_gzip_s'] + an['edgetpu_report_s']:.2f} s with `gzip=False`) | < {an['target_s']:.0f} s "
        f"({_met(an['total_s'] < an['target_s'])}) |"
    )
    lines.append("")


def render():
    lines = [BEGIN, "<!-- Generated by benchmarks/run_all.py from benchmarks/results/*.json. Do not edit by hand. -->", ""]
    _recipe(lines)
    _overhead(lines)
    _qat(lines)
    _export(lines)
    machines = {json.dumps(d["machine"].get("cpu_model")) for d in filter(None, map(_load, [n for _, ns in SCRIPTS for n in ns])) if "machine" in d}
    lines.append(
        "Measured on a 2-core x86 VM (" + ", ".join(sorted(m.strip('"') for m in machines if m != "null")) + "), TensorFlow "
        "2.21, Keras 3.15, TFMOT 0.8.1 on tf_keras 2.21. Absolute times vary between machines and runs; the ratios are "
        "taken side by side in one run. Every figure comes from the JSON in `benchmarks/results/`; `make bench` re-measures "
        "them and rewrites this section."
    )
    lines.append(END)
    return "\n".join(lines)


def rewrite_readme(check=False):
    with open(README) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        sys.exit(f"README.md has no {BEGIN} ... {END} section to rewrite.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + render() + tail
    if check:
        if new != text:
            print("README results section is stale: run `python benchmarks/run_all.py --readme-only`.")
            return 1
        return 0
    with open(README, "w") as f:
        f.write(new)
    print("rewrote the results section of README.md")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="run only the scripts whose file name contains this")
    parser.add_argument("--readme-only", action="store_true", help="do not run anything; re-render the README")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README does not match the JSON")
    args = parser.parse_args(argv)
    if args.check:
        return rewrite_readme(check=True)
    if not args.readme_only:
        failed = []
        for cmd, _ in SCRIPTS:
            if args.only and args.only not in cmd[0]:
                continue
            print(f"\n=== {' '.join(cmd)} ===", flush=True)
            t0 = time.time()
            rc = subprocess.call([sys.executable, os.path.join(HERE, cmd[0]), *cmd[1:]], cwd=REPO)
            print(f"=== {cmd[0]}: exit {rc}, {time.time() - t0:.0f} s ===", flush=True)
            if rc:
                failed.append(cmd[0])
        if failed:
            print(f"failed: {failed}; the README is rendered from whatever JSON is there.")
    return rewrite_readme()


if __name__ == "__main__":
    sys.exit(main())
