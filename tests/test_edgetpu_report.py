"""tfopt.tflite_export.edgetpu_report: per-op Edge TPU verdicts, strict conversion, compiler log parsing."""

import os
import stat
import warnings

import keras
import numpy as np
import pytest
from _export_fixtures import COMPILER_LOG, model_with, raw_int8_converter, rep_data, tiny_model

from tfopt import tflite_export as te
from tfopt.tflite_export import edgetpu


@pytest.fixture(scope="module")
def rep():
    return rep_data()


@pytest.fixture(scope="module")
def edgetpu_tiny(rep):
    return te.convert(tiny_model(), target="edgetpu", representative_data=rep, quiet=True)


def _dense_3d(x):
    x = keras.layers.Reshape((64, 8), name="to_3d")(x)
    return keras.layers.Dense(6, name="dense_3d")(x)


UNMAPPABLE = {
    "leaky_relu": (lambda x: keras.layers.LeakyReLU(name="leaky")(x), True, "LEAKY_RELU", "leaky"),
    "hard_swish": (lambda x: keras.layers.Activation("hard_swish", name="hswish")(x), True, "HARD_SWISH", "hswish"),
    "dense_3d": (_dense_3d, False, "FULLY_CONNECTED", "dense_3d"),
}


@pytest.mark.slow
def test_clean_model_maps_entirely(edgetpu_tiny):
    report = edgetpu_tiny.edgetpu
    assert report.all_mapped and report.first_unmapped is None and not report.blockers
    assert [v.op for v in report.ops] == ["CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED", "SOFTMAX"]
    assert [v.layer for v in report.ops] == ["conv", "dw", "gap", "probs", "probs"]
    assert report.fits_on_chip and 0 < report.parameter_bytes < 1000
    d = report.to_dict()
    assert d["num_mapped"] == 5 and d["ops"][0]["status"] == edgetpu.MAPPED
    assert "5/5 ops mapped" in str(report)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(UNMAPPABLE), ids=sorted(UNMAPPABLE))
def test_strict_edgetpu_names_the_op_and_layer(rep, case):
    layer_fn, flatten, op, layer = UNMAPPABLE[case]
    model = model_with(layer_fn, flatten=flatten)
    with pytest.raises(te.EdgeTPUError, match=rf"{op} v\d+ at op #\d+ \(layer '{layer}'\).*strict=False"):
        te.convert(model, target="edgetpu", representative_data=rep, quiet=True)


@pytest.mark.slow
def test_not_strict_returns_the_report_with_the_single_segment_rule(rep):
    model = model_with(lambda x: keras.layers.LeakyReLU(name="leaky")(x))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tfl = te.convert(model, target="edgetpu", representative_data=rep, strict=False, quiet=True)
    assert any("LEAKY_RELU" in str(x.message) for x in w)
    report = tfl.edgetpu
    assert not report.all_mapped
    assert [(v.op, v.on) for v in report.ops] == [
        ("CONV_2D", "tpu"), ("LEAKY_RELU", "cpu"), ("MEAN", "cpu"), ("FULLY_CONNECTED", "cpu")]
    assert report.first_unmapped.op == "LEAKY_RELU" and report.first_unmapped.status == edgetpu.NOT_SUPPORTED
    assert report.ops[2].status == edgetpu.SEGMENT and report.ops[2].mappable
    assert [v.op for v in report.unmappable()] == ["LEAKY_RELU"]
    # The experimental `-a` flag maps the supported ops after the CPU op again.
    multi = te.edgetpu_report(tfl, multiple_segments=True)
    assert [v.on for v in multi.ops] == ["tpu", "cpu", "tpu", "tpu"]


@pytest.mark.slow
def test_dynamic_batch_file_from_the_raw_converter_is_blocked(rep):
    content = raw_int8_converter(tiny_model(), rep)  # Keras' default None batch, not pinned
    report = te.edgetpu_report(content)
    assert not report.all_mapped and report.num_mapped == 0
    assert any("dynamic shape" in b and "[-1, 8, 8, 3]" in b for b in report.blockers)
    assert "BLOCKER: dynamic shape" in str(report)


@pytest.mark.slow
def test_grouped_conv_version_is_a_blocker(rep):
    model = model_with(lambda x: keras.layers.Conv2D(8, 3, groups=2, padding="same", name="grouped")(x))
    tfl = te.convert(model, representative_data=rep, quiet=True)  # fine for phones
    report = te.edgetpu_report(tfl)
    assert any("CONV_2D version 6" in b and "grouped" in b for b in report.blockers)
    assert not report.all_mapped


@pytest.mark.slow
def test_float_model_is_not_quantized(rep):
    tfl = te.convert(tiny_model(), mode="float32", quiet=True)
    report = te.edgetpu_report(tfl)
    assert any("not quantized" in b for b in report.blockers)
    assert report.ops[0].status == edgetpu.DATA_TYPE


@pytest.mark.slow
def test_float_io_quantize_runs_on_cpu_before_the_segment(rep):
    tfl = te.convert(tiny_model(), representative_data=rep, io_dtype="float32", quiet=True)
    report = te.edgetpu_report(tfl)
    assert report.ops[0].op == "QUANTIZE" and report.ops[0].on == "cpu"  # CPU prefix, as in coral#13
    assert all(v.on == "tpu" for v in report.ops[1:-1])
    assert report.ops[-1].op == "DEQUANTIZE" and report.ops[-1].status == edgetpu.DATA_TYPE
    assert report.first_unmapped.op == "QUANTIZE"


def test_parse_compiler_log():
    log = te.parse_compiler_log(COMPILER_LOG)
    assert log.version == "16.0.384591198"
    assert (log.ops_on_tpu, log.ops_on_cpu) == (64, 2)
    assert log.rows[0] == ("CONV_2D", 35, "Mapped to Edge TPU")
    assert log.rows[-2] == ("LEAKY_RELU", 1, "Operation not supported")
    assert log.rows[-1] == ("SOFTMAX", 1, "More than one subgraph is not supported")
    assert log.on_chip_bytes == int(3.26 * 2**20) and log.off_chip_bytes == 0
    assert log.compiled
    assert log.to_dict()["rows"][1] == ["DEPTHWISE_CONV_2D", 17, "Mapped to Edge TPU"]


def test_parse_compiler_log_rejects_other_text():
    with pytest.raises(ValueError, match="does not look like an edgetpu_compiler log"):
        te.parse_compiler_log("Segmentation fault")


@pytest.mark.slow
def test_installed_compiler_is_run_and_parsed(tmp_path, monkeypatch, edgetpu_tiny):
    # A stand-in `edgetpu_compiler` on PATH that prints a canned log, as the real one would.
    exe = tmp_path / "edgetpu_compiler"
    (tmp_path / "log.txt").write_text(COMPILER_LOG)
    exe.write_text(f"#!/bin/sh\ncat {tmp_path / 'log.txt'}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    report = te.edgetpu_report(edgetpu_tiny)
    assert report.compiler is not None and report.compiler.ops_on_tpu == 64
    text = str(report)
    assert "edgetpu_compiler 16.0.384591198" in text
    assert "\n".join([  # the compiler's table, counts right-aligned
        "op                 count  status",
        "-----------------  -----  ---------------------------------------",
        "CONV_2D               35  Mapped to Edge TPU",
        "DEPTHWISE_CONV_2D     17  Mapped to Edge TPU",
    ]) in text
    assert te.edgetpu_report(edgetpu_tiny, run_compiler_if_available=False).compiler is None


def test_bad_runtime_version():
    with pytest.raises(ValueError, match="min_runtime_version=9"):
        te.edgetpu_report(b"", min_runtime_version=9)


@pytest.mark.slow
def test_older_runtime_drops_newer_ops(rep):
    model = model_with(lambda x: keras.layers.PReLU(shared_axes=[1, 2], name="prelu")(x))
    tfl = te.convert(model, target="edgetpu", representative_data=rep, quiet=True)
    assert tfl.edgetpu.all_mapped  # PRELU with 1-D alpha is in the table for runtime >= 13
    old = te.edgetpu_report(tfl, min_runtime_version=12)
    assert old.first_unmapped.op == "PRELU" and "runtime >= 13" in old.first_unmapped.reason
    assert np.all(np.isfinite(tfl.predict(rep[:2])))


@pytest.mark.slow
def test_transformer_report_names_the_gelu_blocker_and_the_replacements():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 16), name="tokens")
    h = keras.layers.MultiHeadAttention(2, 8, name="mha")(inputs, inputs)
    h = keras.layers.LayerNormalization(name="ln")(inputs + h)
    h = keras.layers.Dense(32, activation="gelu", name="mlp")(h)
    model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(keras.layers.GlobalAveragePooling1D()(h)))
    x = np.random.default_rng(0).normal(size=(32, 8, 16)).astype("float32")
    tfl = te.convert(model, representative_data=x, quiet=True)  # fully int8 on phones
    report = te.edgetpu_report(tfl)
    assert any(b.startswith("GELU (builtin code 150)") and "replace it: ReLU" in b for b in report.blockers)
    verdicts = {v.op: v for v in report.ops}
    assert "replacement: ReLU" in verdicts["GELU"].reason and not verdicts["GELU"].mapped
    assert "attention's two matmuls run on the CPU" in verdicts["BATCH_MATMUL"].reason
    assert verdicts["RSQRT"].mappable  # LayerNormalization's int8 form is in Coral's table
