"""tfopt.tflite_export.analyze / benchmark / compare_latency on any .tflite, and the inspect/bench CLI."""

import argparse
import json
import time

import keras
import numpy as np
import pytest
from _export_fixtures import raw_int8_converter, rep_data, tiny_model

from tfopt import tflite_export as te
from tfopt.tflite_export import _cli


@pytest.fixture(scope="module")
def raw_int8():
    """A .tflite tfopt did not make: the plain TF converter, Keras' dynamic batch, uint8 I/O."""
    model = tiny_model()
    for w in model.weights:  # non-zero biases: the converter shares or drops all-zero ones
        if "bias" in w.path:
            w.assign(np.linspace(0.1, 0.2, w.shape[0], dtype=np.float32))
    return raw_int8_converter(model, rep_data(), uint8=True)


@pytest.fixture(scope="module")
def raw_float():
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_keras_model(tiny_model()).convert()


@pytest.mark.slow
def test_analyze_a_file_tfopt_did_not_make(raw_int8, tmp_path):
    report = te.analyze(raw_int8)
    assert report.kind == "int8" and report.is_fully_int8
    ops = {(o["op"], o["version"]): o["count"] for o in report.ops}
    assert ops[("CONV_2D", 3)] == 1 and ops[("QUANTIZE", 1)] == 2  # uint8 I/O adds edge QUANTIZE ops
    assert report.inputs[0]["dtype"] == "uint8" and report.inputs[0]["shape_signature"] == [-1, 8, 8, 3]
    assert report.inputs[0]["scale"] == pytest.approx(1 / 255, rel=0.01)
    assert report.dynamic_tensors  # Keras' default None batch
    assert report.parameter_count == 8 * 27 + 8 + 8 * 9 + 8 + 8 * 5 + 5
    assert report.tensor_dtypes["int8"]["constants"] == 3
    assert 0 < report.gzip_bytes < report.size_bytes == len(raw_int8)
    assert report.min_runtime_version
    path = tmp_path / "raw.tflite"
    path.write_bytes(raw_int8)
    assert te.analyze(str(path)).to_dict() == report.to_dict() == te.analyze(te.TFLiteModel(raw_int8)).to_dict()
    json.dumps(report.to_dict())
    text = str(report)
    assert "DEPTHWISE_CONV_2D" in text and "uint8" in text and "Dynamic shapes" in text
    lines = text.splitlines()
    header = lines.index("op                 version  count")  # the op table: numbers right-aligned
    assert lines[header + 1] == "-----------------  -------  -----"
    assert lines[header + 2 : header + 4] == ["QUANTIZE                 1      2", "CONV_2D                  3      1"]


@pytest.mark.slow
def test_analyze_float_model(raw_float):
    report = te.analyze(raw_float)
    assert report.kind == "float32" and not report.is_fully_int8
    assert report.float_leaks == [] and report.int8_weight_zero_fraction is None
    assert report.inputs[0]["scale"] is None


def test_analyze_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="No .tflite file"):
        te.analyze(str(tmp_path / "nope.tflite"))
    with pytest.raises(te.TFLiteFileError, match="directory"):
        te.analyze(str(tmp_path))
    with pytest.raises(TypeError, match="Received: tflite=3"):
        te.analyze(3)
    with pytest.raises(te.TFLiteFileError, match="corrupt or truncated"):
        te.analyze(b"\x10\x00\x00\x00TFL3" + b"\xff" * 8)


@pytest.mark.slow
def test_analyze_and_edgetpu_report_are_fast_on_a_10mb_model():
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1600,), batch_size=1),
                              keras.layers.Dense(1600, bias_initializer="ones"),
                              keras.layers.Dense(10, bias_initializer="ones")])
    content = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    assert len(content) > 10_000_000
    start = time.perf_counter()
    report = te.analyze(content)
    tpu = te.edgetpu_report(content, run_compiler_if_available=False)
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    te.analyze(content, gzip=False)
    assert time.perf_counter() - start < 0.5  # the flatbuffer read itself (~0.1 s); gzip is the rest
    assert report.parameter_count == 1600 * 1600 + 1600 + 16010
    assert report.gzip_bytes == pytest.approx(len(__import__("gzip").compress(content, 6)), rel=1e-3)
    assert te.analyze(content, gzip=False).gzip_bytes is None
    assert not tpu.all_mapped
    assert elapsed < 2.0, elapsed  # < 1 s on an idle core (benchmarks/bench_export.py); slack for shared CI


@pytest.mark.slow
def test_benchmark_and_compare_latency(raw_float, raw_int8):
    lat = te.benchmark(raw_float, runs=20, warmup=2)
    assert 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms
    assert "median" in str(lat) and lat.to_dict()["threads"] == 1
    both = te.compare_latency(raw_float, raw_int8, runs=20, rounds=4, warmup=2)
    assert both["float"].runs == both["int8"].runs == 20
    assert both["ratio"] == pytest.approx(both["int8"].median_ms / both["float"].median_ms)
    with pytest.raises(ValueError, match="runs=0"):
        te.benchmark(raw_float, runs=0)
    with pytest.raises(ValueError, match="kernels"):
        te.benchmark(raw_float, kernels="gpu")


def _parser():
    parser = argparse.ArgumentParser(prog="tfopt")
    _cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.slow
def test_cli_inspect_and_bench(tmp_path, raw_int8, capsys):
    path = tmp_path / "m.tflite"
    path.write_bytes(raw_int8)
    args = _parser().parse_args(["inspect", str(path), "--edgetpu", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["analysis"]["kind"] == "int8" and out["edgetpu"]["blockers"]
    args = _parser().parse_args(["inspect", str(path)])
    assert args.func(args) == 0 and "CONV_2D" in capsys.readouterr().out
    args = _parser().parse_args(["bench", str(path), "--runs", "5", "--json"])
    assert args.func(args) == 0 and json.loads(capsys.readouterr().out)["runs"] == 5


@pytest.mark.slow
def test_cli_convert(tmp_path, capsys):
    tiny_model().save(tmp_path / "m.keras")
    np.save(tmp_path / "rep.npy", rep_data(16))
    out = tmp_path / "m.tflite"
    args = _parser().parse_args(["convert", str(tmp_path / "m.keras"), "--target", "edgetpu", "--rep-data",
                                 str(tmp_path / "rep.npy"), "-o", str(out), "--quiet"])
    assert args.func(args) == 0
    assert te.analyze(str(out)).is_fully_int8
    assert "5/5 ops mapped" in capsys.readouterr().out
