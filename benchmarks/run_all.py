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
    (["bench_channel_pruning.py"], ["channel_pruning"]),
    (["bench_compression.py", "all"], ["compression"]),
    (["bench_backends.py"], ["backends"]),
    (["bench_composite.py"], ["composite"]),
    (["bench_transformer.py"], ["transformer"]),
    (["bench_lstm.py"], ["lstm"]),
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
    return "reached" if ok else "**not reached**"


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
        f"epochs; mean ± std of {n} seeds"
        + ("; TFMOT starts from tfopt's float weights of the same seed" if d.get("float_start", "").startswith("shared") else "")
        + "):\n"
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
        ("int8 weight buffers alone, gzip (B)", "int8_weights_gzip", "{:,.0f}"),
        ("bound: ratio with zero file overhead", "int8_weights_only_gzip_ratio", "{:.1f}x"),
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
        lines.append("\nGoals: " + "; ".join(notes) + ".\n")


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
    lines.append("| schedule | tfopt | TFMOT | goal |")
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
        verdict = "no goal" if target is None else f"<= {target}x ({'n/a' if ours is None else _met(ours <= target)})"
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
        lines.append("\nGoal: agreement >= 99.5% and p99 <= 1 step.\n")
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
        if rec is None:
            verdict = "PTQ lost nothing here, so there was no drop to recover"
        else:
            verdict = _met(rec >= 0.5)
        lines.append(f"\nGoal: QAT recovers at least half of the PTQ drop: {verdict}.\n")
    t = _load("qat_steptime")
    if t:
        r = t["ratios"]["qat"]["median"]
        theirs = t.get("tfmot", {}).get("ratios", {}).get("qat", {}).get("median")
        lines.append(
            f"**QAT step time** (`benchmarks/bench_qat.py steptime`; MobileNetV2 alpha 0.35, 96x96, batch "
            f"{t.get('batch', 32)}, {t['steps_per_block']}-step blocks interleaved over {t['rounds']} rounds): "
            f"{r:.2f}x a plain step (goal <= 1.5x: {_met(r <= 1.5)}); TFMOT on tf_keras, same script and method: "
            f"{'n/a' if theirs is None else f'{theirs:.2f}x'}.\n"
        )


def _ms(stat, fmt, n):
    """'mean ± std' of a summary stat (just the mean for one seed)."""
    cell = fmt.format(stat["mean"])
    if n > 1:
        cell += " ± " + fmt.replace("+", "").replace("x", "").format(stat["std"])
    return cell


def _target_note(t, key, label, fmt):
    if key not in t:
        return None
    x = t[key]
    return f"{label}: {fmt.format(x['mean'])} -> {_met(x['met_on_mean'])}"


def _compression(lines):
    d = _load("compression")
    if not d:
        lines.append("_Clustering, low-rank factorization, distillation: not measured yet "
                     "(`python benchmarks/bench_compression.py all`)._\n")
        return
    t = d.get("targets", {})
    c = d.get("clustering")
    if c:
        s, r, n = c["summary"], c["recipe"], len(c["runs"])
        lines.append(
            f"**Weight clustering** (`benchmarks/bench_compression.py clustering`; the MNIST recipe's float model, "
            f"{r['float_epochs']} epochs, then `cluster_weights(model, {r['clusters']})` ({r['cluster_init']} init) "
            f"fine-tuned {r['cluster_epochs']} epochs at Adam({r['cluster_lr']:g}), stripped; TFLite float32, gzip -9; "
            f"mean ± std of {n} seeds):\n"
        )
        lines.append("| float accuracy | clustered accuracy | drop (points) | float TFLite gzip (B) | clustered TFLite gzip (B) | gzip ratio |")
        lines.append("|---|---|---|---|---|---|")
        lines.append(
            f"| {_ms(s['float_accuracy'], '{:.2%}', n)} | {_ms(s['clustered_accuracy'], '{:.2%}', n)} | "
            f"{_ms(s['drop_points'], '{:+.2f}', n)} | {s['float_tflite_gzip']['mean']:,.0f} | "
            f"{s['clustered_tflite_gzip']['mean']:,.0f} | {_ms(s['gzip_ratio'], '{:.2f}x', n)} |"
        )
        cq = c.get("cqat_seed0")
        if cq:
            def per_op(v, op):
                return max([k["distinct"] for k in v["kernels"].values() if k["op"] == op], default=0)

            def both(key):
                v = cq.get(key)
                if not v:
                    return "n/a"
                return (f"Dense {per_op(v, 'FULLY_CONNECTED')}, Conv {per_op(v, 'CONV_2D')}, "
                        f"int8 accuracy {v['int8_accuracy']:.2%}")

            lines.append(
                "\nCluster-preserving QAT (seed 0; `quantize_model` of the stripped 16-cluster model, 1 QAT epoch), the "
                "most distinct int8 values in one kernel of the exported file: "
                f"`quantize_model(m, preserve_clusters=16)`: {both('preserve_clusters')}; "
                f"plain QAT: {both('plain_qat')}.\n"
            )
        notes = [x for x in (
            _target_note(t, "clustering_drop_points_le_1", "drop <= 1 point", "{:+.2f}"),
            _target_note(t, "clustering_gzip_ratio_ge_3", "float TFLite gzip >= 3x smaller", "{:.2f}x"),
        ) if x]
        if notes:
            lines.append("Goals: " + "; ".join(notes) + ".\n")
    lr = d.get("low_rank")
    if lr:
        r, n = lr["recipe"], len(lr["runs"])
        lines.append(
            f"**Low-rank factorization** (`benchmarks/bench_compression.py low_rank`; Dense-heavy variant "
            f"`mnist_cnn(dense_units={r['dense_units']})`, float {r['float_epochs']} epochs "
            f"({_ms(lr['summary']['float_accuracy'], '{:.2%}', n)}), `low_rank_factorize`, then {r['low_rank_epochs']} "
            f"epochs of fine-tuning at Adam({r['low_rank_lr']:g}); mean ± std of {n} seeds; the goal is read at the "
            f"recipe point, the hidden Dense layer at energy {r['recipe_energy']}):\n"
        )
        lines.append("| layers | energy | fewer parameters in factorized layers | accuracy before fine-tuning | accuracy after | drop (points) |")
        lines.append("|---|---|---|---|---|---|")
        for p in lr["summary"]["curve"]:
            scope = {"hidden": "hidden Dense", "dense": "every Dense (classifier too)"}.get(p["scope"], "all Dense + Conv2D (defaults)")
            mark = " (recipe)" if p["scope"] == "hidden" and p["energy"] == r["recipe_energy"] else ""
            lines.append(
                f"| {scope}{mark} | {p['energy']} | {_ms(p['param_ratio'], '{:.2f}x', n)} | "
                f"{_ms(p['accuracy_before_fine_tuning'], '{:.2%}', n)} | {_ms(p['accuracy'], '{:.2%}', n)} | "
                f"{_ms(p['drop_points'], '{:+.2f}', n)} |"
            )
        notes = [x for x in (
            _target_note(t, "low_rank_param_ratio_ge_2", ">= 2x fewer parameters", "{:.2f}x"),
            _target_note(t, "low_rank_drop_points_le_1", "drop <= 1 point", "{:+.2f}"),
        ) if x]
        control = lr["summary"].get("float_fine_tuned_accuracy")
        if control:
            notes.append(
                f"control: the unfactorized model fine-tuned the same way reaches {_ms(control, '{:.2%}', n)} "
                "(what the fine-tuning alone does)"
            )
        if notes:
            lines.append("\nGoals: " + "; ".join(notes) + ".\n")
    ds = d.get("distill")
    if ds:
        s, r, n = ds["summary"], ds["recipe"], len(ds["runs"])
        lines.append(
            f"**Knowledge distillation** (`benchmarks/bench_compression.py distill`; teacher `mnist_cnn()` "
            f"({s['teacher_params']:,} parameters, {s['teacher_accuracy']:.2%}), student "
            f"`mnist_cnn(filters={tuple(r['student_filters'])})` ({s['student_params']:,} parameters, "
            f"{s['param_ratio']:.1f}x fewer); {r['distill_epochs']} epochs each, same initial weights; "
            f"`tfopt.distill(temperature={r['temperature']:g}, alpha={r['alpha']:g})`; mean ± std of {n} seeds):\n"
        )
        lines.append("| student trained alone | student distilled | gain (points) |")
        lines.append("|---|---|---|")
        lines.append(
            f"| {_ms(s['alone_accuracy'], '{:.2%}', n)} | {_ms(s['distilled_accuracy'], '{:.2%}', n)} | "
            f"{_ms(s['gain_points'], '{:+.2f}', n)} |"
        )
        x = t.get("distill_beats_alone")
        if x:
            lines.append(f"\nGoal: distilled beats alone on the mean of {n} seeds -> {_met(x['met_on_mean'])}.\n")


def _features(d):
    return ", ".join(d["machine"].get("cpu_int8_features", [])) or "not recorded"


def _export(lines):
    d = _load("export")
    if not d:
        return
    c, lat, an = d["conversion"], d["latency"], d["analysis"]
    lines.append("**Export** (`benchmarks/bench_export.py`; MobileNetV2 alpha 1.0, 224x224):\n")
    lines.append("| figure | measured | goal |")
    lines.append("|---|---|---|")
    lines.append(f"| conversion time, tfopt / raw converter | {c['ratio_median']:.2f}x | <= {c['target']}x ({_met(c['ratio_median'] <= c['target'])}) |")
    lines.append(
        f"| int8 / float latency, LiteRT XNNPACK, 1 thread (CPU int8 features: {_features(d)}) | {lat['ratio']:.2f}x "
        f"({lat['int8']['median_ms']:.1f} vs "
        f"{lat['float']['median_ms']:.1f} ms) | <= {lat['target']}x ({_met(lat['ratio'] <= lat['target'])}) |"
    )
    lines.append(
        f"| `analyze` + `edgetpu_report` of a {an['model_bytes'] / 1e6:.1f} MB file | {an['total_s']:.2f} s "
        f"({an['analyze_without_gzip_s'] + an['edgetpu_report_s']:.2f} s with `gzip=False`) | < {an['target_s']:.0f} s "
        f"({_met(an['total_s'] < an['target_s'])}) |"
    )
    lines.append("")


def _channel_pruning(lines):
    d = _load("channel_pruning")
    if not d:
        lines.append("_Channel pruning: not measured yet (`python benchmarks/bench_channel_pruning.py`)._\n")
        return
    m, mn = d.get("mobilenet_v2"), d.get("mnist")
    lines.append("**Channel pruning** (`benchmarks/bench_channel_pruning.py`; `tfopt.prune_channels(model, ratio=0.5)`):\n")
    lines.append("| figure | measured | goal |")
    lines.append("|---|---|---|")
    if m:
        lines.append(
            f"| MobileNetV2 alpha {m['model']['alpha']} {m['model']['input'][0]}x{m['model']['input'][1]}, int8 LiteRT "
            f"XNNPACK 1 thread, unpruned / pruned latency | {m['speedup']:.2f}x ({m['latency_unpruned']['median_ms']:.1f} "
            f"vs {m['latency_pruned']['median_ms']:.1f} ms; MACs {m['macs_ratio']:.2f}x, params "
            f"{m['params_after'] / m['params_before']:.2f}x) | >= {m['target']}x ({_met(m['met'])}) |"
        )
    if mn:
        s, t, r = mn["summary"]["one-shot l2"], mn["target"], mn["recipe"]
        n = len({row["seed"] for row in mn["runs"]})
        lines.append(
            f"| MNIST recipe, float {r['float_epochs']} epochs -> 50% channels -> {r['fine_tune_epochs']} epochs "
            f"fine-tuning, accuracy drop (mean of {n} seeds) | {s['drop_points_mean']:+.2f} points "
            f"({s['float_accuracy_mean']:.2%} -> {s['pruned_accuracy_mean']:.2%}; worst seed "
            f"{s['drop_points_worst']:+.2f}; MACs {s['macs_ratio']:.2f}x) | <= {t['target']:.0f} point "
            f"({_met(t['met_on_mean'])}) |"
        )
    lines.append("")
    rounding = d.get("round_to") or []
    if rounding:
        cells = ", ".join(
            f"ratio {x['ratio']} round_to={x['round_to']}: {x['latency_ratio']:.2f}x the latency for "
            f"{x['macs_rounded'] / x['macs_round_to_1']:.2f}x the MACs" for x in rounding
        )
        lines.append(f"`round_to` vs exact widths (int8, side by side): {cells}.\n")


def _backends(lines):
    d = _load("backends")
    if not d:
        return
    m = d["method"]
    lines.append(
        f"**Step-time overhead per Keras backend** (`benchmarks/bench_backends.py`; {m['model']}, batch {m['batch']}, "
        f"{m['steps_per_block']}-step blocks interleaved over {m['rounds']} rounds, one process per backend; ratio to a "
        "plain `fit` step in the same round, median):\n"
    )
    lines.append("| backend | plain step (ms, median) | pruning, ConstantSparsity frequency=100 | QAT (`quantize_model`) |")
    lines.append("|---|---|---|---|")
    for name in ("tensorflow", "jax", "torch"):
        r = d["results"].get(name)
        if not r:
            lines.append(f"| {name} | not measured | | |")
            continue
        version = r["versions"].get(name if name != "tensorflow" else "tensorflow", "")
        label = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}[name] + (f" {version}" if version else "")
        plain = sorted(r["step_s"]["plain"])[len(r["step_s"]["plain"]) // 2] * 1e3
        lines.append(f"| {label} | {plain:.1f} | {r['ratios']['pruned_f100']['median']:.2f}x | {r['ratios']['qat']['median']:.2f}x |")
    spread = max(abs(x - r["ratios"][v]["median"]) for r in d["results"].values() for v in ("pruned_f100", "qat")
                 for x in r["ratios"][v]["per_round"])
    lines.append(
        "\nSteps of ~10 ms on a 2-core VM are noisy: single rounds lay up to "
        f"{spread:.2f}x from the medians; read differences under ~0.1x as noise. The MobileNetV2 "
        "pruning and QAT rows above are measured with more steps per block.\n"
    )


def _composite(lines):
    d = _load("composite")
    if not d:
        lines.append("_keras-hub backbones: not measured yet (`python benchmarks/bench_composite.py`)._\n")
        return
    lines.append(
        "**keras-hub backbones built from config** (`benchmarks/bench_composite.py`; BERT 2 layers, hidden 64, 2 heads, "
        "3 int32 inputs; ViT patch 8, 2 layers; pruned to 50% with `PolynomialDecay` during `fit`):\n"
    )
    lines.append("| figure | BERT classifier | ViT classifier |")
    lines.append("|---|---|---|")
    b, v = d["bert"], d["vit"]
    lines.append(
        f"| kernels with >= 1,000 weights: sparsity min / max | {b['kernels_ge_1000']} kernels: {b['min_sparsity']:.2%} / "
        f"{b['max_sparsity']:.2%} | {v['kernels_ge_1000']} kernels: {v['min_sparsity']:.2%} / {v['max_sparsity']:.2%} |"
    )
    lines.append(
        f"| `.keras` reload predicts identically | {b['reload_checked']} model: {'yes' if b['reload_identical'] else 'no'} "
        f"| {v['reload_checked']} model: {'yes' if v['reload_identical'] else 'no'} |"
    )
    lines.append(
        f"| max \\|pruned - stripped\\| output | {b['max_abs_diff_pruned_vs_stripped']:.1e} | "
        f"{v['max_abs_diff_pruned_vs_stripped']:.1e} |"
    )
    o = d["bert_overhead"]
    lines.append(
        f"| pruning step time / plain step, ConstantSparsity frequency=100 ({o['steps_per_block']}-step blocks, "
        f"{o['rounds']} rounds interleaved, median of per-round ratios) | {o['ratio_freq100']:.2f}x "
        f"({o['median_step_ms']['plain']:.1f} vs {o['median_step_ms']['freq100']:.1f} ms; rounds "
        f"{min(o['ratio_per_round']):.2f}-{max(o['ratio_per_round']):.2f}) | |"
    )
    lines.append("")


def _transformer(lines):
    d = _load("transformer")
    if not d:
        return
    lines.append(
        "**Transformers, post-training int8** (`benchmarks/bench_transformer.py`; MNIST digits as 28 rows of 28 "
        "pixels; Dense(64) rows + position embedding, 2 encoder blocks of MultiHeadAttention (4 heads) + "
        "LayerNormalization + GELU MLP, 6 float epochs; `convert(model, representative_data=x_train[:300])`; "
        "mean ± std of 3 seeds on the 1,000 test digits):\n"
    )
    lines.append("| model | float Keras | int8 TFLite | drop | top-1 agreement | p99 / max error (output steps) |")
    lines.append("|---|---|---|---|---|---|")
    for name, label in (("transformer", "encoder"), ("causal_transformer", "encoder, causal mask")):
        r = d[name]
        lines.append(
            f"| {label} | {_pct(r['float_acc']['mean'])} ± {100 * r['float_acc']['std']:.2f} | "
            f"{_pct(r['int8_acc']['mean'])} ± {100 * r['int8_acc']['std']:.2f} | {r['drop_points']:+.2f} points | "
            f"{_pct(r['agreement']['mean'])} | {r['p99_steps']['mean']:.1f} / {r['max_steps']['mean']:.1f} |"
        )
    lines.append("")
    for name, label in (("transformer", "encoder"), ("causal_transformer", "causal encoder")):
        r = d[name]
        if r.get("int16x8_error"):
            message = r["int16x8_error"].split("The TFLite converter failed (RuntimeError): ")[-1]
            lines.append(f"16-bit activations (`mode=\"int16x8\"`), {label}: does not convert: {message}\n")
            continue
        if "int16x8_acc" not in r:
            continue
        lines.append(
            f"16-bit activations (`mode=\"int16x8\"`), {label}: {_pct(r['int16x8_acc']['mean'])} accuracy, "
            f"{_pct(r['int16x8_agreement']['mean'])} top-1 agreement with Keras, max |error| "
            f"{r['int16x8_max_abs_error']['mean']:.3f} (int8: {r['int8_max_abs_error']['mean']:.3f}).\n"
        )
    if "qat_int8_acc" in d["transformer"]:
        lines.append(
            "**The same transformers, QAT** (`tfopt.quantize_model` of each trained float model, 2 epochs at Adam "
            "1e-4, `convert(qat_model)` without representative data; agreement and error between the QAT Keras "
            "model and its int8 file; drop from the float model's accuracy):\n"
        )
        lines.append("| model | QAT Keras | QAT int8 TFLite | drop from float | top-1 agreement | p99 / max error "
                     "(output steps) | training epoch, QAT / float |")
        lines.append("|---|---|---|---|---|---|---|")
        for name, label in (("transformer", "encoder"), ("causal_transformer", "encoder, causal mask")):
            r = d[name]
            lines.append(
                f"| {label} | {_pct(r['qat_keras_acc']['mean'])} | {_pct(r['qat_int8_acc']['mean'])} ± "
                f"{100 * r['qat_int8_acc']['std']:.2f} | {r['qat_drop_points']:+.2f} points | "
                f"{_pct(r['qat_agreement']['mean'])} | {r['qat_p99_steps']['mean']:.1f} / "
                f"{r['qat_max_steps']['mean']:.1f} | {r['qat_step_ratio']:.2f}x |"
            )
        lines.append("")
    r = d["transformer"]
    lat, row = r["latency"], r["rows"][0]
    lines.append("")
    lines.append(
        f"Size: float32 {row['float32_bytes'] / 1e3:.0f} KB, int8 {row['int8_bytes'] / 1e3:.0f} KB: "
        f"{r['size_ratio']:.2f}x smaller (QAT int8: {row['qat_int8_bytes'] / 1e3:.0f} KB, "
        f"{row['float32_bytes'] / row['qat_int8_bytes']:.2f}x). Latency, LiteRT XNNPACK "
        f"1 thread (CPU int8 features: {_features(d)}): int8 {lat['int8']['median_ms']:.3f} ms vs float "
        f"{lat['float']['median_ms']:.3f} ms ({lat['ratio']:.2f}x).\n"
    )


def _lstm(lines):
    d = _load("lstm")
    if not d:
        return
    row, lat = d["rows"][0], d["rows"][0]["latency"]
    lines.append(
        "**LSTM, post-training int8** (`benchmarks/bench_lstm.py`; the same MNIST rows; LSTM(64, unroll=True) + "
        f"Dense(10), 4 float epochs; mean ± std of 3 seeds): float {_pct(d['float_acc']['mean'])} ± "
        f"{100 * d['float_acc']['std']:.2f}, int8 {_pct(d['int8_acc']['mean'])} ± {100 * d['int8_acc']['std']:.2f} "
        f"({d['drop_points']:+.2f} points), top-1 agreement {_pct(d['agreement']['mean'])}, p99 / max error "
        f"{d['p99_steps']['mean']:.1f} / {d['max_steps']['mean']:.1f} output steps. Size: float32 "
        f"{row['float32_bytes'] / 1e3:.0f} KB, int8 {row['int8_bytes'] / 1e3:.0f} KB ({d['size_ratio']:.2f}x: the "
        f"28 unrolled steps each carry their own ops and quantization parameters). Latency, XNNPACK 1 thread: int8 "
        f"{lat['int8']['median_ms']:.3f} ms vs float {lat['float']['median_ms']:.3f} ms "
        f"({lat['ratio']:.2f}x the float time).\n"
    )


def render():
    lines = [BEGIN, "<!-- Generated by benchmarks/run_all.py from benchmarks/results/*.json. Do not edit by hand. -->", ""]
    _recipe(lines)
    _overhead(lines)
    _qat(lines)
    _compression(lines)
    _export(lines)
    _channel_pruning(lines)
    _backends(lines)
    _composite(lines)
    _transformer(lines)
    _lstm(lines)
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
