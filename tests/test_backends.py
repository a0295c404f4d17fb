"""tfopt on JAX and PyTorch: the same training results as on TensorFlow, and the TFLite export of the result.

Each backend runs `tests/_backend_worker.py` in its own process (a process's Keras backend is fixed
when keras is first imported): seeded pruning (PolynomialDecay + UpdatePruningStep), QAT and
clustering from identical NumPy-drawn weights, results dumped to .npz and compared with the
TensorFlow run of the same script.

Tolerances, and why:
- Pruning masks, pruning steps, cluster indices and distinct-value counts are exact: they are
  integers or 0/1 decided in NumPy from weights that agree to ~1e-7.
- Sparsity is exact: same masks.
- Float weights, thresholds, centroids, predictions of the pruned / clustered models: atol 1e-5
  (observed differences ~1e-7 after 8 SGD steps: float32 kernel rounding, not algorithmic).
- QAT: ranges rtol 1e-5 (observed 3e-7); weights atol 1e-4 and predictions within one output
  quantization step. Fake quant is piecewise constant, so a 1e-7 difference before rounding can
  flip one int8 level; that changes one output by a step, or one step's gradient by ~1e-5.
  (Keras' own fake-quant gradient on JAX/PyTorch differs from TensorFlow's at the range bounds;
  tfopt.quantizers.fake_quant uses TensorFlow's there. With Keras' gradient the ranges differed by
  1e-4 relative and half the predictions by 1-2 steps after 4 steps: these tolerances catch it.)

A backend that is not installed fails its tests with the install command: nothing is skipped.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_backend_worker.py")
BACKENDS = ("jax", "torch")
INSTALL = {"jax": "jax[cpu]", "torch": "torch==2.13.0+cpu"}
TIMEOUT = 600

_runs = {}  # backend -> (out_dir, results), once per test process


def _env(backend):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return env


def _require(backend):
    module = "jax" if backend == "jax" else "torch"
    if importlib.util.find_spec(module) is None:
        pytest.fail(
            f"The {backend} backend is not installed, so tfopt cannot be tested on it. Install it with "
            f"`pip install -e '.[backends]'` (or `pip install '{INSTALL[backend]}'`); `make test` does.",
            pytrace=False,
        )


def _run(backend, tmp_path_factory):
    if backend not in _runs:
        out_dir = str(tmp_path_factory.mktemp(f"backend_{backend}"))
        proc = subprocess.run(
            [sys.executable, WORKER, out_dir], env=_env(backend), capture_output=True, text=True, timeout=TIMEOUT
        )
        assert proc.returncode == 0, f"worker failed under KERAS_BACKEND={backend}:\n{proc.stdout}\n{proc.stderr[-6000:]}"
        with np.load(os.path.join(out_dir, f"{backend}.npz")) as f:
            _runs[backend] = (out_dir, dict(f))
    return _runs[backend]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run("tensorflow", tmp_path_factory)[1]


def _keys(results, prefix):
    keys = sorted(k for k in results if k.startswith(prefix))
    assert keys, f"no {prefix!r} results"
    return keys


def _output_step(results):
    lo, hi = results["qat/range/quant_logits.output_0_min"], results["qat/range/quant_logits.output_0_max"]
    return float(hi - lo) / 255.0


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_matches_tensorflow(backend, reference, tmp_path_factory):
    _require(backend)
    _, got = _run(backend, tmp_path_factory)
    assert set(got) == set(reference)

    # Pruning: masks, steps and sparsity exact.
    for key in _keys(reference, "prune/mask/"):
        np.testing.assert_array_equal(got[key], reference[key], err_msg=key)
        assert 0 < np.mean(reference[key]) < 1, key  # the masks really prune
    for key in _keys(reference, "prune/step/"):
        assert int(got[key]) == int(reference[key]) == 8, key
    for key in _keys(reference, "prune/sparsity/") + ["prune/sparsity_log"]:
        np.testing.assert_array_equal(got[key], reference[key], err_msg=key)
    np.testing.assert_allclose(reference["prune/sparsity_log"][-1], 0.75, atol=0.01)
    for key in _keys(reference, "prune/weight/") + _keys(reference, "prune/threshold/"):
        np.testing.assert_allclose(got[key], reference[key], atol=1e-5, rtol=0, err_msg=key)
    for key in _keys(reference, "prune/weight/"):  # masked weights are zero in the variables
        mask = reference[key.replace("/weight/", "/mask/")]
        assert np.all(got[key][mask == 0] == 0), key
    for key in ("prune/pred", "prune/stripped_pred", "prune/loss"):
        np.testing.assert_allclose(got[key], reference[key], atol=1e-5, rtol=0, err_msg=key)

    # QAT: ranges to float precision, predictions within one output step.
    for key in _keys(reference, "qat/range/"):
        np.testing.assert_allclose(got[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in _keys(reference, "qat/weight/"):
        np.testing.assert_allclose(got[key], reference[key], atol=1e-4, rtol=0, err_msg=key)
    step = _output_step(reference)
    for key in ("qat/pred", "qat/loaded_pred"):
        err = np.max(np.abs(got[key] - reference[key])) / step
        assert err <= 1.0 + 1e-3, f"{key}: {err:.3f} output steps"
    np.testing.assert_array_equal(got["qat/loaded_pred"], got["qat/pred"])  # .keras round trip on the backend

    # Clustering: same assignments, same number of distinct values, same centroids.
    for key in _keys(reference, "cluster/indices/") + _keys(reference, "cluster/distinct/"):
        np.testing.assert_array_equal(got[key], reference[key], err_msg=key)
    for key in _keys(reference, "cluster/distinct/"):
        assert int(got[key]) <= 4, key
    for key in _keys(reference, "cluster/centroids/") + ["cluster/pred"]:
        np.testing.assert_allclose(got[key], reference[key], atol=1e-5, rtol=0, err_msg=key)

    # The TensorFlow-only converter refuses this backend with the way out.
    message = str(got["convert_error"])
    assert message.startswith("RuntimeError: "), message
    assert f"KERAS_BACKEND={backend!r}" in message and "tfopt convert model.keras" in message, message


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_export_of_backend_trained_model(backend, tmp_path_factory, tmp_path):
    """`tfopt convert` on the backend-trained QAT .keras; int8 LiteRT outputs within one output step.

    JAX: the command is started with KERAS_BACKEND=jax (it re-runs itself under TensorFlow);
    PyTorch: with KERAS_BACKEND=tensorflow, as a user would in a separate TF process.
    """
    _require(backend)
    from tfopt.tflite_export import TFLiteModel, analyze
    from tfopt.tflite_export.runtime import output_scale

    out_dir, got = _run(backend, tmp_path_factory)
    model_path = os.path.join(out_dir, f"qat_{backend}.keras")
    tflite_path = str(tmp_path / f"{backend}.tflite")
    cli_backend = "jax" if backend == "jax" else "tensorflow"
    proc = subprocess.run(
        [sys.executable, "-m", "tfopt", "convert", model_path, "-o", tflite_path, "--target", "mobile", "--quiet"],
        env=_env(cli_backend), capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    assert "Wrote" in proc.stdout
    tfl = TFLiteModel.load(tflite_path)
    report = analyze(tfl.content)
    assert report.inputs[0]["dtype"] == "int8" and report.outputs[0]["dtype"] == "int8"
    scale = output_scale(tfl.content)
    assert scale == pytest.approx(_output_step(got), rel=1e-3)  # the trained range became the int8 scale
    err = np.abs(tfl.predict(got["x"]) - got["qat/pred"]) / scale
    assert err.max() <= 1.0 + 1e-3, f"int8 vs {backend}-trained QAT model: {err.max():.3f} output steps"


def test_convert_argv_forwards_every_option():
    """`tfopt convert` re-run under TensorFlow gets exactly the options it was given."""
    from tfopt.cli import build_parser
    from tfopt.tflite_export._cli import _convert_argv

    parser = build_parser()
    full = ["convert", "m.keras", "-o", "m.tflite", "--target", "micro", "--mode", "dynamic", "--io-dtype", "int8",
            "--rep-data", "r.npy", "--max-samples", "7", "--no-strict", "--c-array", "stem", "--quiet"]
    for argv in (full, ["convert", "m.keras", "-o", "m.tflite"]):
        args = parser.parse_args(argv)
        again = parser.parse_args(_convert_argv(args))
        assert vars(again) == vars(args)
    # `full` sets every option of `tfopt convert`: a new option fails here until it is forwarded.
    convert = parser._subparsers._group_actions[0].choices["convert"]
    args = vars(parser.parse_args(full))
    unset = [a.dest for a in convert._actions if a.dest not in ("help", "model") and args[a.dest] == a.default]
    assert not unset, f"add {unset} to _convert_argv and to this test"
