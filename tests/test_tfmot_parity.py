"""Parity with the anchor, TFMOT 0.8.1, which runs in a subprocess.

TFMOT must never be imported here: it switches `tf.keras` to tf_keras for the
whole process. `benchmarks/_tfmot_runner.py` runs it with
``TF_USE_LEGACY_KERAS=1`` and prints JSON.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tfopt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "benchmarks", "_tfmot_runner.py")

pytestmark = [pytest.mark.tfmot, pytest.mark.slow]

# Far steps: float32 cannot hold step - begin_step exactly beyond 2**24.
_FAR = [10**6 + 1, 2**24 + 1, 2**31 + 5]


def _steps(begin, end, freq):
    last = (begin + 4 * freq) if end == -1 else end + 3 * freq
    return list(range(0, last + 1)) + _FAR


# (id, kind, args). Steps: every step from 0 to end + 3 * frequency (or
# begin + 4 * frequency when end_step == -1), plus a few far ones.
_CASES = [
    ("const-default", "constant", dict(target_sparsity=0.5, begin_step=0, end_step=-1, frequency=100)),
    ("const-freq1", "constant", dict(target_sparsity=0.5, begin_step=0, end_step=-1, frequency=1)),
    ("const-begin7-freq7", "constant", dict(target_sparsity=0.8, begin_step=7, end_step=-1, frequency=7)),
    ("const-end-not-multiple", "constant", dict(target_sparsity=0.3, begin_step=50, end_step=250, frequency=7)),
    ("const-window", "constant", dict(target_sparsity=0.9, begin_step=100, end_step=1000, frequency=100)),
    ("const-zero", "constant", dict(target_sparsity=0.0, begin_step=0, end_step=10, frequency=1)),
    ("const-0.1", "constant", dict(target_sparsity=0.1, begin_step=3, end_step=3, frequency=1)),
    ("poly-recipe", "polynomial", dict(initial_sparsity=0.0, final_sparsity=0.8, begin_step=0, end_step=625, power=3, frequency=25)),
    ("poly-p3-f100", "polynomial", dict(initial_sparsity=0.0, final_sparsity=0.8, begin_step=0, end_step=1000, power=3, frequency=100)),
    ("poly-p1-f1", "polynomial", dict(initial_sparsity=0.1, final_sparsity=0.9, begin_step=0, end_step=100, power=1, frequency=1)),
    ("poly-p2-f7", "polynomial", dict(initial_sparsity=0.0, final_sparsity=0.5, begin_step=0, end_step=100, power=2, frequency=7)),
    ("poly-p3-begin17-f10", "polynomial", dict(initial_sparsity=0.2, final_sparsity=0.75, begin_step=17, end_step=126, power=3, frequency=10)),
    ("poly-research-126-f10", "polynomial", dict(initial_sparsity=0.0, final_sparsity=0.75, begin_step=0, end_step=126, power=3, frequency=10)),
    ("poly-p2-begin200-f100", "polynomial", dict(initial_sparsity=0.5, final_sparsity=0.95, begin_step=200, end_step=1000, power=2, frequency=100)),
    ("poly-p1-f7-odd", "polynomial", dict(initial_sparsity=0.05, final_sparsity=0.6, begin_step=3, end_step=53, power=1, frequency=7)),
    ("poly-p3-f1", "polynomial", dict(initial_sparsity=0.0, final_sparsity=0.9, begin_step=0, end_step=300, power=3, frequency=1)),
    ("poly-p1.5", "polynomial", dict(initial_sparsity=0.0, final_sparsity=0.9, begin_step=3, end_step=50, power=1.5, frequency=7)),
    ("poly-decreasing", "polynomial", dict(initial_sparsity=0.8, final_sparsity=0.2, begin_step=0, end_step=100, power=2, frequency=5)),
]


def _tfopt_schedule(kind, args):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # end not a multiple of frequency: intended here
        return (tfopt.ConstantSparsity if kind == "constant" else tfopt.PolynomialDecay)(**args)


def _ulps(a, b):
    """Distance in float32 units in the last place (same-sign finite floats)."""
    ia = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    ib = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
    return np.abs(ia - ib)


@pytest.fixture(scope="module")
def tfmot_schedules():
    cases = [
        {"id": cid, "kind": kind, "args": args, "steps": _steps(args["begin_step"], args["end_step"], args["frequency"])}
        for cid, kind, args in _CASES
    ]
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, RUNNER, "schedules", json.dumps(cases)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"TFMOT runner failed:\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {c["id"]: (case, c) for case, c in zip(cases, result["cases"])}


# TFMOT evaluates the schedule inside the train function, a graph that Grappler
# rewrites: x / c becomes x * (1 / c), pow(x, 2) becomes x * x and c * pow(x, 3)
# becomes (c * x) * (x * x). The sparsity it really applies therefore differs
# from the closed form in the last bits (up to ~1.8e-7). tfopt follows the
# rewritten form, so test_schedules_bit_exact_with_tfmot demands 0 ulp; the
# tolerance below is only for the per-case report. One float32 ulp of 1.0 is
# 1.19e-7.
_SPARSITY_ATOL = 2 * float(np.spacing(np.float32(1.0)))


def _tfmot_graph_sparsity(args, step):
    """What TFMOT's PolynomialDecay computes inside a Grappler-optimized graph, in numpy."""
    f32 = np.float32
    begin, end, power = args["begin_step"], args["end_step"], args["power"]
    p = f32(step - begin) * (f32(1.0) / f32(end - begin))
    x = f32(1.0) - np.minimum(f32(1.0), np.maximum(f32(0.0), p))
    c = f32(args["initial_sparsity"] - args["final_sparsity"])
    if power == 1:
        scaled = c * x
    elif power == 2:
        scaled = c * (x * x)
    elif power == 3:
        scaled = (c * x) * (x * x)
    else:  # TF's Pow kernel is correctly rounded; numpy's float32 power is not always
        scaled = c * f32(np.float64(x) ** float(power))
    return f32(scaled + f32(args["final_sparsity"]))


@pytest.mark.parametrize("cid,kind,args", _CASES, ids=[c[0] for c in _CASES])
def test_schedule_matches_tfmot(tfmot_schedules, cid, kind, args):
    case, ref = tfmot_schedules[cid]
    schedule = _tfopt_schedule(kind, args)
    ours = [schedule(step) for step in case["steps"]]

    should = [s for s, _ in ours]
    wrong = [step for step, a, b in zip(case["steps"], should, ref["should_prune"]) if a != b]
    assert not wrong, f"should_prune differs from TFMOT at steps {wrong[:20]}"

    values = np.array([v for _, v in ours], np.float32)
    expected = np.array(ref["sparsity"], np.float32)
    diff = np.abs(values.astype(np.float64) - expected.astype(np.float64))
    bad = np.flatnonzero(diff > _SPARSITY_ATOL)
    assert not bad.size, (
        f"sparsity differs from TFMOT by more than {_SPARSITY_ATOL:.3g} at steps "
        f"{[case['steps'][i] for i in bad[:10]]}: ours {values[bad[:10]].tolist()} vs TFMOT {expected[bad[:10]].tolist()}"
    )
    ulps = _ulps(values, expected)
    print(f"{cid}: {int(np.sum(ulps > 0))}/{len(ulps)} steps not bit-exact, max {int(ulps.max())} ulp, max abs {diff.max():.3g}")


_POLY = [c for c in _CASES if c[1] == "polynomial"]


@pytest.mark.parametrize("cid,kind,args", _POLY, ids=[c[0] for c in _POLY])
def test_graph_formula_reproduces_tfmot_exactly(tfmot_schedules, cid, kind, args):
    """Pins down why the values differ: this numpy formula is bit-exact with TFMOT in training."""
    case, ref = tfmot_schedules[cid]
    values = np.array([_tfmot_graph_sparsity(args, step) for step in case["steps"]], np.float32)
    np.testing.assert_array_equal(values, np.array(ref["sparsity"], np.float32))


def test_schedules_bit_exact_with_tfmot(tfmot_schedules):
    total, differ, worst = 0, 0, 0
    for cid, kind, args in _CASES:
        case, ref = tfmot_schedules[cid]
        schedule = _tfopt_schedule(kind, args)
        values = np.array([schedule(step)[1] for step in case["steps"]], np.float32)
        ulps = _ulps(values, ref["sparsity"])
        total += ulps.size
        differ += int(np.sum(ulps > 0))
        worst = max(worst, int(ulps.max()))
    print(f"schedule parity: {differ}/{total} steps not bit-exact, max {worst} ulp")
    assert differ == 0, f"{differ}/{total} steps not bit-exact with TFMOT (max {worst} ulp)"


_IMPORT_CHECK = r"""
import json, os
import tfopt
import tfopt.callbacks
env_after = os.environ.get("TF_USE_LEGACY_KERAS")
import tensorflow as tf
import keras
keras_mod = tf.keras.__name__ if hasattr(tf.keras, "__name__") else type(tf.keras).__module__
print(json.dumps({
    "env": env_after,
    "tf_keras_module": keras_mod,
    "tf_keras_version": getattr(tf.keras, "__version__", None),
    "keras_version": keras.__version__,
    "same_model_class": tf.keras.Model is keras.Model,
    "tf_keras_loaded": "tf_keras" in __import__("sys").modules,
    "tfmot_loaded": "tensorflow_model_optimization" in __import__("sys").modules,
}))
"""


def test_import_tfopt_keeps_keras3():
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["env"] is None, f"importing tfopt set TF_USE_LEGACY_KERAS={info['env']!r}"
    assert info["keras_version"].startswith("3."), info
    assert info["tf_keras_version"] == info["keras_version"], f"tf.keras is not Keras 3: {info}"
    assert info["same_model_class"], f"tf.keras.Model is not keras.Model: {info}"
    assert not info["tf_keras_loaded"], f"tfopt imported tf_keras: {info}"
    assert not info["tfmot_loaded"], f"tfopt imported TFMOT: {info}"
