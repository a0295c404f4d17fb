"""The `tfopt` command: the demo end to end, and one-line errors."""

import json
import subprocess
import sys

import pytest


def run_tfopt(*args, cwd=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "tfopt", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    result = run_tfopt("demo", "--quick", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for name in ("float.keras", "pruned.keras", "float.tflite", "pruned_float.tflite", "model_int8_edgetpu.tflite"):
        assert (tmp_path / "out" / name).is_file(), name
    assert report["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert report["accuracy"]["int8_tflite"] > 0.5
    sizes = report["sizes"]
    assert sizes["int8_edgetpu_tflite"]["gzip_bytes"] < sizes["pruned_float_tflite"]["gzip_bytes"] < sizes["float_tflite"]["gzip_bytes"]
    assert "Per-layer sparsity" in result.stdout and "int8 TFLite accuracy" in result.stdout


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    result = run_tfopt("inspect", str(tmp_path / "missing.tflite"))
    assert result.returncode == 2
    # TensorFlow's C++ start-up lines (absl, before any Python runs) may precede it; ours is one line.
    ours = [line for line in result.stderr.splitlines() if line.startswith("tfopt")]
    assert len(ours) == 1 and ours[0].startswith("tfopt inspect: error: No .tflite file")
    assert "Traceback" not in result.stderr


def test_demo_rejects_bad_epochs(tmp_path):
    result = run_tfopt("demo", "--float-epochs", "0", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "float_epochs" in result.stderr


def test_help_lists_commands():
    result = run_tfopt("--help")
    assert result.returncode == 0
    for command in ("demo", "convert", "inspect", "bench"):
        assert command in result.stdout
