"""tfopt.tflite_export.convert: modes, targets, QAT and pruned models, verification, saving."""

import os
import warnings

import keras
import numpy as np
import pytest
from _export_fixtures import (
    INPUT_SHAPE,
    assert_fully_int8,
    model_with,
    qat_model,
    rep_data,
    tensor_types,
    tiny_model,
)

import tfopt
from tfopt import tflite_export as te
from tfopt.tflite_export import converter as converter_mod
from tfopt.tflite_export import _flatbuffer


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def rep():
    return rep_data()


@pytest.fixture(scope="module")
def int8_mobile(tiny, rep):
    return te.convert(tiny, representative_data=rep, quiet=True)


# --- int8, the main product ---------------------------------------------------------------


@pytest.mark.slow
def test_int8_is_fully_int8_static_batch_one(int8_mobile):
    assert_fully_int8(int8_mobile.content)
    assert int8_mobile.report.kind == "int8"
    assert int8_mobile.report.inputs[0]["shape_signature"] in (None, [1, *INPUT_SHAPE])
    assert int8_mobile.report.float_leaks == []


@pytest.mark.slow
def test_int8_matches_keras_within_one_step(tiny, rep, int8_mobile):
    c = te.compare(tiny, int8_mobile, rep)
    assert c.max_error_steps <= 1.0 + 1e-4, c  # one output step (ties round either way)
    assert c.top1_agreement >= 0.9
    assert c.output_scale == pytest.approx(int8_mobile.report.outputs[0]["scale"])


@pytest.mark.slow
def test_predict_any_batch_and_evaluate(tiny, rep, int8_mobile):
    y = int8_mobile.predict(rep[:7])
    assert y.shape == (7, 5) and y.dtype == np.float32
    np.testing.assert_allclose(int8_mobile.predict(rep[0]), y[:1])  # one sample without batch axis
    labels = tiny.predict(rep, verbose=0).argmax(-1)
    assert int8_mobile.evaluate(rep, labels) >= 0.9
    assert int8_mobile.evaluate(rep, keras.utils.to_categorical(labels, 5)) >= 0.9
    with pytest.raises(ValueError, match=r"shape \(batch, 8, 8, 3\)"):
        int8_mobile.predict(np.zeros((2, 4, 4, 3), np.float32))


@pytest.mark.slow
def test_float_io_keeps_quantize_only_at_the_edges(tiny, rep):
    tfl = te.convert(tiny, representative_data=rep, io_dtype="float32", quiet=True)
    assert_fully_int8(tfl.content, io_dtype=np.float32)
    ops = [o["op_name"] for o in tensor_types(tfl.content)[1]]
    assert ops[0] == "QUANTIZE" and ops[-1] == "DEQUANTIZE"
    assert te.compare(tiny, tfl, rep).max_error_steps <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, kind, atol",
    [("float32", "float32", 1e-5), ("float16", "float16", 1e-2), ("dynamic", None, 5e-2), ("int16x8", "int16x8", 1e-2)],
    ids=["float32", "float16", "dynamic", "int16x8"],
)
def test_other_modes(tiny, rep, mode, kind, atol):
    tfl = te.convert(tiny, mode=mode, representative_data=rep, quiet=True)
    if kind:
        assert tfl.report.kind == kind
    assert tfl.report.inputs[0]["dtype"] == "float32"
    np.testing.assert_allclose(tfl.predict(rep[:8]), tiny.predict(rep[:8], verbose=0), atol=atol)


# --- QAT and pruned models -----------------------------------------------------------------


@pytest.fixture(scope="module")
def qat():
    return qat_model()


@pytest.mark.slow
def test_qat_model_converts_without_representative_data(qat, rep):
    # No tfopt.is_quantized_model needed: the fake-quant ops in the traced graph mark it as QAT.
    tfl = te.convert(qat, quiet=True)
    assert_fully_int8(tfl.content)
    assert tfl.report.inputs[0]["scale"] == pytest.approx(1 / 255, rel=1e-3)  # the trained input range
    c = te.compare(qat, tfl, rep)
    assert c.max_error_steps <= 1.0 + 1e-4, c  # one output step (ties round either way)


@pytest.mark.slow
def test_convert_asks_is_quantized_model_for_the_qat_path(qat, monkeypatch):
    seen = []

    def is_quantized_model(model):
        seen.append(model.name)
        return True

    monkeypatch.setattr(tfopt, "is_quantized_model", is_quantized_model, raising=False)
    tfl = te.convert(qat, target="edgetpu", io_dtype="uint8", quiet=True)
    assert seen == ["qat_tiny"]
    assert_fully_int8(tfl.content, io_dtype=np.uint8)
    assert tfl.edgetpu.all_mapped, tfl.edgetpu


def test_qat_model_refuses_float_modes(qat, monkeypatch):
    # Either sign of QAT is enough: the fake-quant ops in the traced graph, or `tfopt.is_quantized_model`.
    with pytest.raises(ValueError, match="quantization-aware.*mode='int8'"):
        te.convert(qat, mode="float16")
    monkeypatch.setattr(converter_mod, "_has_fake_quant", lambda concrete: False)
    monkeypatch.setattr(tfopt, "is_quantized_model", lambda model: True)
    with pytest.raises(ValueError, match="quantization-aware.*Received: mode='dynamic'"):
        te.convert(tiny_model(), mode="dynamic")


@pytest.mark.slow
def test_pruned_model_is_stripped_and_zeros_survive(rep):
    pruned = tfopt.prune_low_magnitude(tiny_model(), pruning_schedule=tfopt.ConstantSparsity(0.75, 0))
    for layer in pruned._flatten_layers():
        if isinstance(layer, tfopt.PruneLowMagnitude):
            layer.update_masks(0.75)
    tfl = te.convert(pruned, representative_data=rep, quiet=True)
    assert_fully_int8(tfl.content)
    kernels = [w.numpy() for w in tfopt.strip_pruning(pruned).weights if "kernel" in w.path]
    keras_zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
    assert keras_zeros > 0.5  # Conv and Dense pruned to 75%, DepthwiseConv left dense
    assert tfl.report.int8_weight_zero_fraction >= keras_zeros  # int8 rounding only adds zeros
    assert tfl.report.sparse_tensors == 0  # no EXPERIMENTAL_SPARSITY: XNNPACK rejects int8 sparse
    assert tfl.report.gzip_bytes < tfl.report.size_bytes


@pytest.mark.slow
def test_clustered_model_is_stripped(rep):
    clustered = tfopt.cluster_weights(tiny_model(), 4)
    tfl = te.convert(clustered, mode="float32", quiet=True)
    assert [o["op"] for o in tfl.report.ops] == ["CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED", "SOFTMAX"]
    reference = tfopt.strip_clustering(clustered).predict(rep, verbose=0)
    np.testing.assert_allclose(tfl.predict(rep), reference, atol=1e-5)


# --- model sources ---------------------------------------------------------------------------


@pytest.mark.slow
def test_keras_file_and_saved_model_dir(tmp_path, tiny, rep, capsys):
    path = tmp_path / "tiny.keras"
    tiny.save(path)
    from_file = te.convert(str(path), representative_data=rep)
    assert "32/32" in capsys.readouterr().out  # the calibration progress bar
    assert_fully_int8(from_file.content)
    tiny.export(str(tmp_path / "sm"), verbose=False)
    from_dir = te.convert(str(tmp_path / "sm"), representative_data=rep, quiet=True)
    assert_fully_int8(from_dir.content)
    np.testing.assert_array_equal(from_dir.predict(rep[:4]).argmax(-1), tiny.predict(rep[:4], verbose=0).argmax(-1))


@pytest.mark.slow
def test_representative_data_as_dataset_and_generator(tiny, rep):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((rep, np.zeros(len(rep)))).batch(4)
    a = te.convert(tiny, representative_data=ds, quiet=True)
    b = te.convert(tiny, representative_data=lambda: ([s[None]] for s in rep), quiet=True)
    assert a.content == b.content  # same samples, same calibration


def test_representative_data_sources_and_cap(rep):
    specs = [te._structure.Spec("image", (None, *INPUT_SHAPE), "float32")]
    samples, fixed = converter_mod._samples(rep, specs, 10)
    np.testing.assert_array_equal(samples["image"], rep[:10])
    assert fixed == specs
    gen = (x for x in rep)  # single samples, no batch axis
    assert converter_mod._samples(gen, specs, 300)[0]["image"].shape == rep.shape
    pairs = [(rep[i : i + 8], np.zeros(8)) for i in range(0, 32, 8)]
    assert converter_mod._samples(lambda: iter(pairs), specs, 12)[0]["image"].shape == (12, *INPUT_SHAPE)
    unknown = [te._structure.Spec("input", None, "float32")]  # a subclassed model: the samples give the shape
    assert converter_mod._samples(rep, unknown, 4)[1] == [unknown[0]._replace(shape=(None, *INPUT_SHAPE))]


# --- saving --------------------------------------------------------------------------------


@pytest.mark.slow
def test_save_is_atomic(tmp_path, int8_mobile, monkeypatch):
    out = tmp_path / "m.tflite"
    int8_mobile.save(out)
    assert out.read_bytes() == int8_mobile.content
    with pytest.raises(FileNotFoundError, match="does not exist"):
        int8_mobile.save(tmp_path / "missing" / "m.tflite")
    assert not (tmp_path / "missing").exists()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        int8_mobile.save(tmp_path / "other.tflite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite"]  # no partial file, no temp file


@pytest.mark.slow
def test_tflite_model_load_roundtrip(tmp_path, int8_mobile, rep):
    path = int8_mobile.save(tmp_path / "m.tflite")
    again = te.TFLiteModel.load(path)
    np.testing.assert_array_equal(again.predict(rep[:3]), int8_mobile.predict(rep[:3]))
    lat = again.benchmark(runs=5, warmup=1)
    assert lat.median_ms > 0 and lat.p90_ms >= lat.median_ms * 0.5


# --- strict / non-strict verification -----------------------------------------------------


class OwnLayerNorm(keras.layers.LayerNormalization):
    """Keras' LayerNormalization forward under a class of its own: `convert` leaves a subclass's `call` alone."""

    def call(self, inputs):
        return super().call(inputs)


@pytest.mark.slow
def test_float_op_in_int8_graph_is_an_error_unless_not_strict(rep):
    model = model_with(lambda x: OwnLayerNorm(name="ln")(x))  # Keras' form: its NEG has no int8 kernel
    with pytest.raises(te.ConversionError, match="float"):
        te.convert(model, representative_data=rep, quiet=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tfl = te.convert(model, representative_data=rep, strict=False, quiet=True)
    assert any("float" in str(x.message) for x in w)
    assert tfl.report.kind == "mixed" and tfl.report.float_leaks


@pytest.mark.slow
def test_layer_normalization_converts_fully_int8(rep):
    model = model_with(lambda x: keras.layers.LayerNormalization(name="ln")(x))
    tfl = te.convert(model, representative_data=rep, quiet=True)
    assert tfl.report.kind == "int8" and not tfl.report.float_leaks
    ops = {op["op"]: op["count"] for op in tfl.report.ops}
    assert "NEG" not in ops and ops["RSQRT"] == 1
    comparison = te.compare(model, tfl, rep)  # measured: agreement 1.0, p99 2.2 output steps (PTQ)
    assert comparison.top1_agreement == 1.0 and comparison.p99_error_steps <= 4


class SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3, activation="relu")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(self.pool(self.conv(x)))


@pytest.mark.slow
def test_subclassed_model_takes_its_input_shape_from_the_data(rep):
    model = SubclassedNet()
    model(rep[:1])
    tfl = te.convert(model, representative_data=rep, quiet=True)
    assert_fully_int8(tfl.content)
    assert te.compare(model, tfl, rep).max_error_steps <= 2.0
    with pytest.raises(ValueError, match="no known input shape.*pass representative_data"):
        te.convert(SubclassedNet(), quiet=True)


@pytest.mark.slow
def test_causal_attention_calibrates_on_the_scores_range():
    # Keras fills masked scores with -1e9, which would give the softmax input an int8 step of about 4e6.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 16), name="tokens")
    h = keras.layers.MultiHeadAttention(2, 8, name="mha")(inputs, inputs, use_causal_mask=True)
    h = keras.layers.LayerNormalization(name="ln")(inputs + h)
    model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(keras.layers.GlobalAveragePooling1D()(h)))
    x = np.random.default_rng(0).normal(size=(32, 8, 16)).astype("float32")
    tfl = te.convert(model, representative_data=x, quiet=True)
    assert tfl.report.kind == "int8"
    sg = _flatbuffer.parse(tfl.content).subgraphs[0]
    scales = [sg.tensors[op.inputs[0]].scales[0] for op in sg.operators if op.name == "SOFTMAX"]
    assert scales and max(scales) < 0.5, scales
    comparison = te.compare(model, tfl, x)
    assert comparison.top1_agreement >= 0.9 and comparison.p99_error_steps <= 4
