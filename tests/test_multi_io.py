"""tfopt.tflite_export with several inputs and outputs: structures and names, integer inputs, BERT, bad input."""

import argparse
import json
import os
import tempfile

import keras
import numpy as np
import pytest
from _export_fixtures import assert_fully_int8
from ai_edge_litert.interpreter import Interpreter

from tfopt import tflite_export as te
from tfopt.tflite_export import _cli

SEQ = 16  # token sequence length


def two_head_cnn(structure="dict", seed=0):
    """Float image + float metadata -> class probabilities and a score: 2 inputs, 2 outputs.

    Softmax and sigmoid heads have fixed output ranges, so one int8 step is a fair bound for both.
    """
    keras.utils.set_random_seed(seed)
    image = keras.Input((8, 8, 3), name="image")
    meta = keras.Input((4,), name="meta")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(image)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    m = keras.layers.Dense(4, activation="relu", name="meta_dense")(meta)
    h = keras.layers.Concatenate(name="cat")([x, m])
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(h)
    score = keras.layers.Dense(1, activation="sigmoid", name="score")(h)
    if structure == "dict":
        return keras.Model({"image": image, "meta": meta}, {"cls": cls, "score": score}, name="two_head")
    return keras.Model([image, meta], [cls, score], name="two_head_list")


def cnn_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.random((n, 8, 8, 3), np.float32), "meta": rng.random((n, 4), np.float32)}


@pytest.fixture
def cnn_x():
    return cnn_data()


def token_model(seed=0):
    """int32 token ids + int32 padding mask -> Embedding, padding zeroed, max-pooled, Dense(3)."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((SEQ,), dtype="int32", name="token_ids")
    mask = keras.Input((SEQ,), dtype="int32", name="padding_mask")
    x = keras.layers.Embedding(100, 8, name="embed")(ids)
    x = keras.ops.where(keras.ops.expand_dims(keras.ops.not_equal(mask, 0), -1), x, 0.0)
    x = keras.layers.GlobalMaxPooling1D(name="pool")(x)
    return keras.Model({"token_ids": ids, "padding_mask": mask}, keras.layers.Dense(3, name="logits")(x), name="tokens")


def token_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, SEQ + 1, (n, 1))
    mask = (np.arange(SEQ)[None] < lengths).astype("int32")
    ids = (rng.integers(1, 100, (n, SEQ)) * mask).astype("int32")
    segments = ((np.arange(SEQ)[None] >= lengths // 2) * mask).astype("int32")
    return {"token_ids": ids, "padding_mask": mask, "segment_ids": segments}


def bert_classifier(seed=0):
    """A 2-layer keras-hub BertBackbone built from its config (no preset download) -> pooled_output -> Dense(2)."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=64, intermediate_dim=128, max_sequence_length=SEQ
    )
    names = ("token_ids", "segment_ids", "padding_mask")
    inputs = {name: keras.Input((SEQ,), dtype="int32", name=name) for name in names}
    logits = keras.layers.Dense(2, name="logits")(backbone(inputs)["pooled_output"])
    return keras.Model(inputs, logits, name="bert_classifier")


@pytest.fixture(scope="module")
def cnn():
    return two_head_cnn()


@pytest.fixture(scope="module")
def cnn_int8(cnn):
    return te.convert(cnn, representative_data=cnn_data(), quiet=True)


# --- a float model with 2 inputs and 2 outputs ---------------------------------------------------


@pytest.mark.slow
def test_int8_cnn_is_fully_int8_and_every_output_within_one_step(cnn, cnn_x, cnn_int8):
    assert_fully_int8(cnn_int8.content)
    assert cnn_int8.input_names == ["image", "meta"] and cnn_int8.output_names == ["cls", "score"]
    assert [io["name"] for io in cnn_int8.report.inputs] == ["image", "meta"]  # the tensors carry the Keras names
    assert sorted(io["name"] for io in cnn_int8.report.outputs) == ["cls", "score"]
    signature = Interpreter(model_content=cnn_int8.content).get_signature_list()["serving_default"]
    assert sorted(signature["inputs"]) == ["image", "meta"] and sorted(signature["outputs"]) == ["cls", "score"]
    c = te.compare(cnn, cnn_int8, cnn_x)
    assert sorted(c.outputs) == ["cls", "score"]
    for name, part in c.outputs.items():
        assert part.max_error_steps <= 1.0 + 1e-4, (name, part)  # one output step (ties round either way)
        assert part.top1_agreement >= 0.9, (name, part)
    assert c.max_error_steps == max(p.max_error_steps for p in c.outputs.values())
    scales = {io["name"]: io["scale"] for io in cnn_int8.report.outputs}
    assert c.outputs["cls"].output_scale == pytest.approx(scales["cls"])
    assert c.to_dict()["outputs"]["score"]["num_samples"] == 32


@pytest.mark.slow
def test_predict_and_evaluate_answer_in_the_keras_structure(cnn, cnn_x, cnn_int8, tmp_path):
    y = cnn_int8.predict(cnn_x)
    assert sorted(y) == ["cls", "score"] and y["cls"].shape == (32, 3) and y["score"].shape == (32, 1)
    ref = cnn.predict(cnn_x, verbose=0)
    np.testing.assert_allclose(y["cls"], ref["cls"], atol=0.02)
    as_list = cnn_int8.predict([cnn_x["image"], cnn_x["meta"]])  # the input order: tfl.input_names
    np.testing.assert_array_equal(as_list["cls"], y["cls"])
    one = cnn_int8.predict({"image": cnn_x["image"][0], "meta": cnn_x["meta"][0]})  # one sample, no batch axis
    np.testing.assert_array_equal(one["score"], y["score"][:1])
    labels = ref["cls"].argmax(-1)
    assert cnn_int8.evaluate(cnn_x, {"cls": labels})["cls"] >= 0.9  # the score head has no labels
    both = cnn_int8.evaluate(cnn_x, [labels, (ref["score"] > 0.5).astype("int32")])
    assert sorted(both) == ["cls", "score"] and min(both.values()) >= 0.9
    loaded = te.TFLiteModel.load(cnn_int8.save(tmp_path / "two_head.tflite"))
    again = loaded.predict(cnn_x)
    assert sorted(again) == ["cls", "score"]
    np.testing.assert_array_equal(again["score"], y["score"])
    assert loaded.benchmark(runs=3, warmup=1).median_ms > 0


@pytest.mark.slow
def test_list_model_and_every_data_source_calibrate_alike(cnn_x):
    model = two_head_cnn("list")
    image, meta = cnn_x["image"], cnn_x["meta"]
    labels = np.zeros(len(image))
    import tensorflow as tf

    sources = {
        "list": [image, meta],
        "dict": cnn_x,
        "fit-pair": ((image, meta), labels),
        "single-samples": lambda: ([image[i], meta[i]] for i in range(len(image))),
        "dataset": tf.data.Dataset.from_tensor_slices(((image, meta), labels)).batch(8),
        "dataset-of-dicts": tf.data.Dataset.from_tensor_slices(cnn_x).batch(5),
    }
    files = {name: te.convert(model, representative_data=data, quiet=True) for name, data in sources.items()}
    contents = {tfl.content for tfl in files.values()}
    assert len(contents) == 1, "the same samples must give the same calibration"
    tfl = files["list"]
    assert tfl.output_names == ["cls", "score"]
    y = tfl.predict([image, meta])
    assert isinstance(y, list) and [a.shape for a in y] == [(32, 3), (32, 1)]
    c = te.compare(model, tfl, [image, meta])
    assert max(p.max_error_steps for p in c.outputs.values()) <= 1.0 + 1e-4, c


@pytest.mark.slow
def test_saved_model_with_several_inputs(cnn, cnn_x, tmp_path):
    cnn.export(str(tmp_path / "sm"), verbose=False)
    tfl = te.convert(str(tmp_path / "sm"), representative_data=cnn_x, quiet=True)
    assert_fully_int8(tfl.content)
    assert tfl.input_names == ["image", "meta"] and tfl.output_names == ["cls", "score"]
    c = te.compare(cnn, tfl, cnn_x)
    assert c.max_error_steps <= 1.0 + 1e-4, c


@pytest.mark.slow
def test_edgetpu_and_micro_targets_take_several_inputs(cnn, cnn_x, cnn_int8):
    tpu = te.convert(cnn, target="edgetpu", representative_data=cnn_x, quiet=True)
    assert tpu.edgetpu.all_mapped, tpu.edgetpu
    assert {v.layer for v in tpu.edgetpu.ops} >= {"conv", "meta_dense", "cls", "score"}
    assert te.edgetpu_report(cnn_int8).all_mapped
    micro = te.convert(cnn, target="micro", representative_data=cnn_x, quiet=True)
    assert micro.micro.identical and micro.micro.num_samples == 16 and micro.arena_bytes > 0


@pytest.mark.slow
def test_qat_model_with_two_inputs_converts_without_data(cnn_x):
    import tfopt

    qat = tfopt.quantize_model(two_head_cnn(seed=1))
    tfl = te.convert(qat, quiet=True)  # sanity-run on random samples of both inputs
    assert_fully_int8(tfl.content)
    assert sorted(tfl.predict(cnn_x)) == ["cls", "score"]


@pytest.mark.slow
def test_a_file_tfopt_did_not_make_answers_with_a_list(cnn_x):
    import tensorflow as tf

    raw = tf.lite.TFLiteConverter.from_keras_model(two_head_cnn("list")).convert()
    tfl = te.TFLiteModel(raw)
    y = tfl.predict(cnn_x)  # fed by the names of its signature
    assert isinstance(y, list) and sorted(a.shape for a in y) == [(32, 1), (32, 3)]
    assert len(te.analyze(raw).inputs) == 2


# --- integer inputs: token ids and masks --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, atol", [("float32", 1e-6), ("float16", 1e-3), ("dynamic", 1e-2), ("int8", None)],
    ids=["float32", "float16", "dynamic", "int8"],
)
def test_token_ids_and_mask_stay_int32(mode, atol):
    model, x = token_model(), token_data()
    del x["segment_ids"]
    tfl = te.convert(model, mode=mode, representative_data=x, quiet=True)
    for io in tfl.report.inputs:
        assert io["dtype"] == "int32" and io["scale"] is None, io  # never quantized
    assert tfl.input_names == ["padding_mask", "token_ids"]
    if atol is None:
        assert tfl.report.kind == "int8" and tfl.report.float_leaks == []
        assert tfl.report.outputs[0]["dtype"] == "int8"
        # The int8 embedding table and the output each round once: measured 1.14 steps at most.
        assert te.compare(model, tfl, x).max_error_steps <= 1.5
    else:
        np.testing.assert_allclose(tfl.predict(x), model.predict(x, verbose=0), atol=atol)
    assert tfl.benchmark(runs=3, warmup=1).median_ms > 0  # random ids 0/1: inside any vocabulary


@pytest.fixture(scope="module")
def bert():
    return bert_classifier()


@pytest.fixture(scope="module")
def bert_x():
    return token_data(16, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, kind, rel",
    # Measured (max |tflite - keras| / max |keras| on these 16 sequences): float16 4.5e-4, dynamic 6.3e-3.
    [("float16", "float16", 1e-2), ("dynamic", "dynamic-range", 2e-2)],
    ids=["float16", "dynamic"],
)
def test_bert_classifier_float16_and_dynamic_match_keras(bert, bert_x, mode, kind, rel):
    tfl = te.convert(bert, mode=mode, quiet=True)  # no calibration needed
    assert tfl.report.kind == kind
    assert tfl.input_names == ["padding_mask", "segment_ids", "token_ids"] and tfl.output_names == ["logits"]
    assert all(io["dtype"] == "int32" and io["scale"] is None for io in tfl.report.inputs)
    ref = bert.predict(bert_x, verbose=0)
    got = tfl.predict(bert_x)
    assert got.shape == ref.shape == (16, 2)
    assert np.abs(got - ref).max() <= rel * np.abs(ref).max()
    assert te.compare(bert, tfl, bert_x).top1_agreement == 1.0


@pytest.mark.slow
def test_bert_classifier_int8_post_training(bert, bert_x):
    # LayerNormalization and the attention's padding mask run in their int8 forms: no float op is left.
    tfl = te.convert(bert, representative_data=bert_x, quiet=True)
    assert tfl.report.kind == "int8" and not tfl.report.float_leaks
    assert all(io["dtype"] == "int32" and io["scale"] is None for io in tfl.report.inputs)
    comparison = te.compare(bert, tfl, bert_x)  # measured: agreement 16/16, p99 3.8 output steps (untrained, PTQ)
    assert comparison.top1_agreement >= 15 / 16 and comparison.p99_error_steps <= 6


# --- the command line ----------------------------------------------------------------------------


def _parser():
    parser = argparse.ArgumentParser(prog="tfopt")
    _cli.add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_help_documents_the_npz_per_input():
    convert = _parser()._subparsers._group_actions[0].choices["convert"]
    text = " ".join(convert.format_help().split())
    assert "one array per model input, keyed by input name" in text


@pytest.mark.slow
def test_cli_convert_inspect_bench_with_an_npz_per_input(tmp_path, cnn, cnn_x, capsys):
    cnn.save(tmp_path / "m.keras")
    np.savez(tmp_path / "calib.npz", **cnn_x)
    out = tmp_path / "m.tflite"
    args = _parser().parse_args(["convert", str(tmp_path / "m.keras"), "--rep-data", str(tmp_path / "calib.npz"),
                                 "-o", str(out), "--quiet"])
    assert args.func(args) == 0
    assert_fully_int8(out.read_bytes())
    capsys.readouterr()
    args = _parser().parse_args(["inspect", str(out), "--json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)["analysis"]
    assert [io["name"] for io in report["inputs"]] == ["image", "meta"]
    args = _parser().parse_args(["bench", str(out), "--runs", "3", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["median_ms"] > 0
    np.savez(tmp_path / "no_meta.npz", image=cnn_x["image"], labels=np.zeros(32))
    other = tmp_path / "other.tflite"
    args = _parser().parse_args(["convert", str(tmp_path / "m.keras"), "--rep-data", str(tmp_path / "no_meta.npz"),
                                 "-o", str(other), "--quiet"])
    with pytest.raises(ValueError, match=r"no input called 'labels'.*'meta' missing"):
        args.func(args)
    assert not other.exists()


# --- bad input: a clear error before anything is converted or written ---------------------------


X = cnn_data(4)
T = token_data(4)
BAD = [
    ("dict-missing-input", two_head_cnn, {"image": X["image"]},
     ["'meta' missing", "'image', 'meta'", "Received: representative_data with keys ['image']"]),
    ("dict-unknown-key", two_head_cnn, {**X, "label": np.zeros(4)},
     ["no input called 'label'", "Rename", "Received: representative_data with keys ['image', 'label', 'meta']"]),
    ("list-too-short", two_head_cnn, [X["image"]],
     ["one array per model input (2: 'image', 'meta')", "Received: representative_data as a list of 1 item(s)"]),
    ("list-too-long", two_head_cnn, [X["image"], X["meta"], X["meta"]], ["(2: 'image', 'meta')", "list of 3 item(s)"]),
    ("one-array-for-two-inputs", two_head_cnn, X["image"],
     ["The model has 2 inputs ('image', 'meta')", "a dict keyed by input name",
      "Received: representative_data of type ndarray"]),
    ("batch-mismatch", two_head_cnn, {"image": X["image"], "meta": X["meta"][:3]},
     ["different batch sizes", "one row per sample", "Received: batch sizes {'image': 4, 'meta': 3}"]),
    ("meta-shape", two_head_cnn, {"image": X["image"], "meta": np.zeros((4, 5), np.float32)},
     ["(batch, 4)", "the model input 'meta'", "Received: representative_data['meta'].shape=(4, 5)"]),
    ("meta-uint8", two_head_cnn, {"image": X["image"], "meta": np.zeros((4, 4), np.uint8)},
     ["must hold float32 values like the model input 'meta'", "astype('float32')",
      "representative_data['meta'].dtype=uint8"]),
    ("meta-nan", two_head_cnn, {"image": X["image"], "meta": np.full((4, 4), np.nan, np.float32)},
     ["NaN or inf in 4 sample(s) of input 'meta'", "Received: representative_data with 4 non-finite samples"]),
    ("float-token-ids", token_model, {"token_ids": T["token_ids"].astype("float32"), "padding_mask": T["padding_mask"]},
     ["the model input 'token_ids' is int32", "never rounded", "ids.astype('int32')",
      "Received: representative_data['token_ids'].dtype=float32"]),
    ("token-ids-overflow", token_model,
     {"token_ids": T["token_ids"].astype("int64") + 2**40, "padding_mask": T["padding_mask"]},
     ["outside the int32 range", "'token_ids'", "Received: representative_data['token_ids'] with values in"]),
    ("list-of-wrong-length-yielded", token_model, lambda: iter([[T["token_ids"]]]),
     ["one array per model input (2: 'padding_mask', 'token_ids')", "list of 1 item(s)"]),
]


@pytest.mark.parametrize("build, data, must_mention", [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_representative_data_is_refused_before_anything_is_written(build, data, must_mention, tmp_path,
                                                                       monkeypatch):
    model = build()
    before = [w.copy() for w in model.get_weights()]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the converter's scratch folders land here
    with pytest.raises(ValueError) as info:
        te.convert(model, representative_data=data, quiet=True)
    message = str(info.value)
    for text in must_mention:
        assert text in message, f"{text!r} missing from: {message}"
    assert os.listdir(tmp_path) == []
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_bad_inputs_to_predict_compare_and_evaluate(cnn, cnn_x, cnn_int8):
    with pytest.raises(ValueError, match=r"no input called 'pixels'.*Received: x with keys"):
        cnn_int8.predict({"pixels": cnn_x["image"], "meta": cnn_x["meta"]})
    with pytest.raises(ValueError, match=r"one array per model input \(2: 'image', 'meta'\).*Received: x as a list"):
        cnn_int8.predict([cnn_x["image"]])
    with pytest.raises(ValueError, match=r"different batch sizes.*\{'image': 32, 'meta': 2\}"):
        cnn_int8.predict({"image": cnn_x["image"], "meta": cnn_x["meta"][:2]})
    with pytest.raises(ValueError, match=r"x\['meta'\] contains NaN|NaN or inf in 1 sample\(s\) of input 'meta'"):
        meta = np.array([[0, 0, 0, np.nan], [0, 0, 0, 0]], np.float32)
        te.compare(cnn, cnn_int8, {"image": cnn_x["image"][:2], "meta": meta})
    with pytest.raises(ValueError, match=r"no output called 'label'.*Received: y with keys \['label'\]"):
        cnn_int8.evaluate(cnn_x, {"label": np.zeros(32)})
    with pytest.raises(ValueError, match=r"2 outputs \('cls', 'score'\).*Received: y of type ndarray"):
        cnn_int8.evaluate(cnn_x, np.zeros(32))
    with pytest.raises(ValueError, match=r"one array per model output \(2: 'cls', 'score'\).*list of 1 item\(s\)"):
        cnn_int8.evaluate(cnn_x, [np.zeros(32)])
    with pytest.raises(ValueError, match=r"keyed by the model's output names.*Received: y with keys \[\]"):
        cnn_int8.evaluate(cnn_x, {})
    tokens = te.convert(token_model(), mode="float32", quiet=True)
    bad = {"token_ids": token_data(2)["token_ids"].astype("float32"), "padding_mask": token_data(2)["padding_mask"]}
    with pytest.raises(ValueError, match=r"x\['token_ids'\].*is int32.*Received: x\['token_ids'\].dtype=float32"):
        tokens.predict(bad)
