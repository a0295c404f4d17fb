"""Bad input to tfopt.tflite_export: clear errors before anything is converted or written."""

import argparse

import keras
import numpy as np
import pytest
from _export_fixtures import INPUT_SHAPE, rep_data, tiny_model

from tfopt import tflite_export as te
from tfopt.tflite_export import _cli


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": "coral"}, r"`target` must be one of \('mobile', 'edgetpu', 'micro'\). Received: target='coral'"),
        ({"mode": "int4"},
         r"`mode` must be one of \('int8', 'float16', 'dynamic', 'float32', 'int16x8'\). Received: mode='int4'"),
        ({"target": "edgetpu", "mode": "float16"}, r"runs int8 models only: use mode='int8'. Received: mode='float16'"),
        ({"target": "micro", "mode": "int16x8"}, r"target='micro' runs int8 models only.*mode='int16x8'"),
        ({"target": "edgetpu", "io_dtype": "float32"},
         r"`io_dtype` must be one of \('int8', 'uint8'\). .*target='edgetpu' with mode='int8'.*io_dtype='float32'"),
        ({"mode": "float32", "io_dtype": "int8"}, r"one of \('float32',\).*mode='float32'.*Received: io_dtype='int8'"),
        ({"mode": "int16x8", "io_dtype": np.int8}, r"one of \('float32', 'int16'\).*Received: io_dtype='int8'"),
        ({"max_samples": 0}, r"`max_samples` must be an integer >= 1.*positive.*Received: max_samples=0"),
    ],
    ids=["target", "mode", "edgetpu-float", "micro-int16x8", "edgetpu-float-io", "float-int8-io", "int16x8-np-int8",
         "max-samples"],
)
def test_bad_arguments_name_the_choices(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        te.convert(tiny, representative_data=rep_data(4), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"strict": 1}, r"`strict` must be True or False. Received: strict=1"),
     ({"max_samples": "300"}, r"`max_samples` must be an integer >= 1.*Received: max_samples='300'"),
     ({"io_dtype": object()}, r"`io_dtype` must be one of \('int8', 'uint8', 'int16', 'float32'\)")],
    ids=["strict", "max-samples-str", "io-dtype-object"],
)
def test_arguments_of_the_wrong_type(tiny, kwargs, match):
    with pytest.raises(TypeError, match=match):
        te.convert(tiny, representative_data=rep_data(4), **kwargs)


@pytest.mark.parametrize(
    "data, match",
    [
        (np.zeros((4, 8, 8, 1), np.float32), r"shape \(batch, 8, 8, 3\).*Received: representative_data.shape=\(4, 8, 8, 1\)"),
        (np.zeros((4, 64), np.float32), r"Received: representative_data.shape=\(4, 64\)"),
        (np.zeros((4, *INPUT_SHAPE), np.uint8), r"must hold float32.*astype\('float32'\).*dtype=uint8"),
        (np.array([["a"]]), r"must hold float32"),
        (np.zeros((0, *INPUT_SHAPE), np.float32), r"is empty.*0 samples"),
        ([], r"is empty"),
        (np.full((3, *INPUT_SHAPE), np.nan, np.float32), r"NaN or inf in 3 sample\(s\) \(first: index 0\)"),
        (np.where(np.arange(4)[:, None, None, None] == 2, np.inf, rep_data(4)).astype(np.float32), r"first: index 2"),
    ],
    ids=["channels", "rank", "uint8", "strings", "empty", "empty-list", "nan", "inf"],
)
def test_bad_representative_data(tiny, data, match):
    with pytest.raises(ValueError, match=match):
        te.convert(tiny, representative_data=data)


def test_representative_data_of_wrong_type(tiny):
    with pytest.raises(TypeError, match="numpy array, a tf.data.Dataset, or a generator"):
        te.convert(tiny, representative_data=42)


def test_int8_float_model_without_representative_data(tiny):
    with pytest.raises(ValueError, match=r"needs representative_data.*Received: representative_data=None"):
        te.convert(tiny)


def test_nan_weights_name_the_variable():
    model = tiny_model()
    w = model.get_layer("dw").weights[0]
    w.assign(np.full(w.shape, np.nan, np.float32))
    with pytest.raises(ValueError, match=r"NaN or inf weights in: 'dw/.*kernel'"):
        te.convert(model, representative_data=rep_data(4))


def test_paths_that_are_not_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model at this path"):
        te.convert(str(tmp_path / "nope.keras"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"Not a model file.*notes.txt"):
        te.convert(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"Could not load a Keras model.*broken.keras"):
        te.convert(str(tmp_path / "broken.keras"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a SavedModel"):
        te.convert(str(tmp_path / "empty"))
    (tmp_path / "m.tflite").write_bytes(b"x")
    with pytest.raises(ValueError, match="already a .tflite"):
        te.convert(str(tmp_path / "m.tflite"))
    with pytest.raises(TypeError, match="must be a keras Model"):
        te.convert(np.zeros(3))
    with pytest.raises(TypeError, match="wrap the layer"):
        te.convert(keras.layers.Dense(3))


def test_bytes_that_are_not_a_tflite():
    with pytest.raises(te.TFLiteFileError, match=r"identifier b'TFL3'"):
        te.TFLiteModel(b"\x00" * 64)
    with pytest.raises(te.TFLiteFileError, match="b'TFL3'"):
        te.analyze(b"PK\x03\x04 definitely a zip")


def _parser():
    parser = argparse.ArgumentParser(prog="tfopt")
    _cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_convert_writes_nothing_on_failure(tmp_path, tiny):
    tiny.save(tmp_path / "m.keras")
    np.save(tmp_path / "bad.npy", np.zeros((4, 5, 5, 3), np.float32))
    out = tmp_path / "out.tflite"
    args = _parser().parse_args(
        ["convert", str(tmp_path / "m.keras"), "--rep-data", str(tmp_path / "bad.npy"), "-o", str(out), "--quiet"]
    )
    with pytest.raises(ValueError, match="shape"):
        args.func(args)
    assert not out.exists()
    args = _parser().parse_args(["convert", str(tmp_path / "m.keras"), "-o", str(tmp_path / "x.bin")])
    with pytest.raises(ValueError, match="must end with .tflite"):
        args.func(args)
    args = _parser().parse_args(["convert", str(tmp_path / "m.keras"), "--rep-data", "nope.npy", "-o", str(out)])
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        args.func(args)
    with pytest.raises(SystemExit):
        _parser().parse_args(["convert", "m.keras", "-o", "o.tflite", "--target", "coral"])


def test_convert_refuses_a_file_xnnpack_cannot_run():
    # An activation range of ~0 (what a dead layer got before ranges had a minimum width) gives an int8
    # scale XNNPACK refuses while the reference kernels run it: convert must fail, not return the file.
    import tfopt

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(4, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(hidden))
    qat = tfopt.quantize_model(model)
    x = np.random.default_rng(0).random((8, 4), np.float32)
    qat(x, training=True)
    wrapper = qat.get_layer("quant_hidden")
    (hi,) = [v for v in wrapper.variables if v.path.endswith("output_0_max")]
    (lo,) = [v for v in wrapper.variables if v.path.endswith("output_0_min")]
    lo.assign(0.0)
    hi.assign(1e-6)
    before = [v.numpy().copy() for v in qat.variables]
    with pytest.raises(te.ConversionError, match="XNNPACK"):
        te.convert(qat, quiet=True)
    for a, v in zip(before, qat.variables):
        np.testing.assert_array_equal(a, v.numpy())
    hi.assign(1.0)  # a sane range converts
    assert len(te.convert(qat, quiet=True).content) > 0


def _rnn(layer_type, unroll):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 6), name="rows")
    return keras.Model(inputs, keras.layers.Dense(3)(layer_type(8, unroll=unroll, name="rnn")(inputs)))


@pytest.mark.slow
@pytest.mark.parametrize("layer_type", [keras.layers.LSTM, keras.layers.GRU], ids=["lstm", "gru"])
def test_rnn_calibration_is_refused_before_it_can_crash_the_process(layer_type):
    # TFLite's calibrator segfaults on the WHILE loop of a Keras 3 RNN; this process must survive and be told why.
    model = _rnn(layer_type, unroll=False)
    x = np.random.default_rng(0).normal(size=(16, 12, 6)).astype("float32")
    with pytest.raises(ValueError, match=r"while loop \('rnn'.*not unrolled.*unroll=True.*mode='dynamic' or 'float16'"):
        te.convert(model, representative_data=x, quiet=True)
    tfl = te.convert(model, mode="float16", quiet=True)  # the way out the error names
    assert te.compare(model, tfl, x).top1_agreement == 1.0


@pytest.mark.slow
def test_unrolled_lstm_converts_fully_int8():
    # The gates are sliced, not split, while tracing: int8 SPLIT would need one scale for all four.
    model = _rnn(keras.layers.LSTM, unroll=True)
    x = np.random.default_rng(0).normal(size=(64, 12, 6)).astype("float32")
    tfl = te.convert(model, representative_data=x, quiet=True)  # strict: raises on any float op
    ops = {o["op"] for o in te.analyze(tfl).ops}
    assert te.analyze(tfl).kind == "int8" and "SPLIT" not in ops and "STRIDED_SLICE" in ops, ops
    assert te.compare(model, tfl, x).top1_agreement >= 0.95

