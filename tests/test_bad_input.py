"""The bad-input catalog: everything a user can pass wrong, and the error they get for it.

One row per mistake, grouped by API area. Each row runs in `test_bad_input` (or `test_bad_cli_input` for the
`tfopt` command), which checks, for every row:

1. the exception type (ValueError / TypeError / FileNotFoundError, or tfopt's own error classes);
2. the message names the argument, the received value and the fix: the row's `must_mention` substrings, plus
   "Received" (the house rule: ``... Received: arg=value``);
3. the error is raised by tfopt's own code (the innermost traceback frame lies in `tfopt/`, `callbacks/` or
   `tflite_export/`), not from deep inside Keras / TensorFlow, and no other exception is chained to it (a
   traceback the user would see: tfopt re-raises with ``from None``);
4. nothing the user owns changed: every variable of every model below holds the same values (and the models
   the same layers), the files below are byte-identical, no new file appeared next to them or in the temp dir.

Rows for arguments that cannot be validated cheaply before the work starts are kept out; rows exposing a bug that
is not fixed carry `xfail` with the reason (strict: they fail loudly once fixed).
"""

import dataclasses
import hashlib
import os
import tempfile
from typing import Callable

import keras
import numpy as np
import pytest

import tfopt
import tfopt.callbacks
from tfopt import cli, quantizers
from tfopt import tflite_export as te

# ------------------------------------------------------------------------------------------------
# The world a case runs in: tiny models and files, built once for the module, never to change.

_PACKAGE_DIRS = tuple(
    os.path.dirname(os.path.abspath(mod.__file__)) + os.sep for mod in (tfopt, tfopt.callbacks, te)
)


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4, name="dense")

    def call(self, x):
        return self.dense(x)


class _Scale(keras.layers.Layer):
    """A custom layer with a weight tfopt has no registry row for."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, x):
        return x * self.scale


def _cnn(name="cnn"):
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="logits")(x), name=name)


def _dense(units=4, activation=None, name="dense_model"):
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(6, name="hidden"), keras.layers.Dense(units, activation=activation, name="out")],
        name=name,
    )


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Namespace `w`: models (`w.cnn`, `w.pruned`, ...), data (`w.x`) and paths (`w.path("good.keras")`)."""
    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("bad_input")
    files, tmp = root / "files", root / "tmp"
    files.mkdir()
    tmp.mkdir()
    ns = type("World", (), {})()
    ns.files, ns.tmp = files, tmp
    ns.path = lambda name: str(files / name)
    ns.x = np.random.default_rng(0).random((8, 8, 8, 3), np.float32)

    ns.cnn = _cnn()
    ns.dense = _dense()
    ns.student = _dense(name="student")
    ns.student3 = _dense(units=3, name="student3")
    ns.softmax = _dense(activation="softmax", name="softmax_teacher")
    ns.pruned = tfopt.prune_low_magnitude(_cnn("to_prune"))
    ns.qat = tfopt.quantize_model(_cnn("to_quantize"))
    ns.clustered = tfopt.cluster_weights(_cnn("to_cluster"), 4)
    ns.annotated_layer = tfopt.quantize_annotate_layer(keras.layers.Dense(3))
    ns.cluster_layer = tfopt.clustering.ClusterWeights(keras.layers.Dense(3), 4)
    ns.prune_layer = tfopt.PruneLowMagnitude(keras.layers.Dense(3))
    ns.sub = _Subclassed(name="subclassed")
    ns.sub(np.zeros((1, 8), np.float32))
    ns.unbuilt = keras.Sequential([keras.layers.Dense(4)], name="unbuilt")
    ns.weightless = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.ReLU()], name="weightless")
    ns.custom = keras.Sequential([keras.Input((8,)), _Scale(name="scale"), keras.layers.Dense(4, name="out")], name="custom")
    ns.nan = _dense(name="nan_model")
    kernel = ns.nan.get_layer("hidden").kernel
    kernel.assign(np.where(np.eye(*kernel.shape, dtype=bool), np.nan, np.asarray(kernel)).astype(np.float32))
    ns.compiled = keras.models.clone_model(ns.dense)
    ns.compiled.compile("sgd", "mse")
    ns.models = {k: v for k, v in vars(ns).items() if isinstance(v, keras.layers.Layer)}

    ns.cnn.save(files / "good.keras")
    tfl = te.convert(ns.cnn, mode="float32", quiet=True)
    ns.tfl = tfl
    (files / "good.tflite").write_bytes(tfl.content)
    (files / "truncated.tflite").write_bytes(tfl.content[:64])
    (files / "renamed.tflite").write_text("these are notes, renamed to .tflite\n")
    (files / "notes.txt").write_text("not a model\n")
    (files / "corrupt.keras").write_bytes(b"PK\x03\x04 not really a zip archive")
    (files / "not_a_savedmodel").mkdir()
    (files / "dir.tflite").mkdir()
    np.save(files / "rep.npy", ns.x)
    np.save(files / "rep_badshape.npy", np.zeros((4, 5, 5, 3), np.float32))
    np.save(files / "rep_nan.npy", np.full((4, 8, 8, 3), np.nan, np.float32))
    (files / "rep_corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    np.savez(files / "rep_empty.npz")
    # A private temp dir: the converter's scratch folders must be gone after a failure, too.
    saved_tempdir = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    yield ns
    tempfile.tempdir = saved_tempdir


def _snapshot(w):
    models = {
        name: (
            [layer.name for layer in m._flatten_layers(include_self=False)],
            [(v.path, np.array(v)) for v in m.variables],
        )
        for name, m in w.models.items()
    }
    files = {
        os.path.relpath(os.path.join(d, f), w.files): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
        for d, _, names in os.walk(w.files)
        for f in names
    }
    dirs = sorted(os.path.relpath(d, w.files) for d, _, _ in os.walk(w.files))
    return models, files, dirs, sorted(os.listdir(w.tmp))


def _assert_unchanged(before, after):
    (m0, f0, d0, t0), (m1, f1, d1, t1) = before, after
    for name, (layers, variables) in m0.items():
        assert m1[name][0] == layers, f"the layers of model {name!r} changed"
        assert [p for p, _ in m1[name][1]] == [p for p, _ in variables], f"the variables of model {name!r} changed"
        for (path, a), (_, b) in zip(variables, m1[name][1]):
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), f"{name}: {path} changed"
    assert f1 == f0, "the input files changed, or new files appeared next to them"
    assert d1 == d0, "folders appeared next to the input files"
    assert t1 == t0, "temporary files were left behind"


def _innermost_file(exc):
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename


def _assert_raised_by_tfopt(exc):
    assert _innermost_file(exc).startswith(_PACKAGE_DIRS), (
        f"raised from {_innermost_file(exc)}, not by tfopt's own validation"
    )
    shown = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    assert shown is None, f"a chained {type(shown).__name__} from {_innermost_file(shown)} reaches the user: {shown}"


# ------------------------------------------------------------------------------------------------
# The catalog.


@dataclasses.dataclass
class Case:
    id: str
    call: Callable  # call(w) -> makes the mistake
    exc: type
    must_mention: list
    xfail: str = None


def _fit(callback):
    def run(w):
        w.compiled.fit(np.zeros((4, 8), np.float32), np.zeros((4, 4), np.float32), epochs=1, verbose=0, callbacks=[callback()])

    return run


def _fit_pruning_summaries(w):
    log_dir = os.path.join(w.tmp, "logs")
    try:
        _fit(lambda: tfopt.callbacks.PruningSummaries(log_dir))(w)
    finally:
        # The writer may create its folder lazily; what matters here is the error, not the folder.
        import shutil

        shutil.rmtree(log_dir, ignore_errors=True)


def _empty_generator():
    return
    yield


def _empty_dataset():
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(np.zeros((0, 8, 8, 3), np.float32)).batch(4)


def _generator_of_none():
    yield None


CASES = [
    # --- schedules: sparsity in [0, 1), integer steps, begin <= end, frequency > 0 ---------------
    Case("constant-sparsity-1.5", lambda w: tfopt.ConstantSparsity(1.5, 0), ValueError, ["target_sparsity", "1.5", "[0, 1)"]),
    Case("constant-sparsity-negative", lambda w: tfopt.ConstantSparsity(-0.1, 0), ValueError, ["target_sparsity", "-0.1"]),
    Case("constant-sparsity-1.0", lambda w: tfopt.ConstantSparsity(1.0, 0), ValueError, ["target_sparsity", "1.0"]),
    Case("constant-sparsity-str", lambda w: tfopt.ConstantSparsity("0.5", 0), TypeError, ["target_sparsity", "'0.5'"]),
    Case("constant-sparsity-nan", lambda w: tfopt.ConstantSparsity(float("nan"), 0), ValueError, ["target_sparsity", "nan"]),
    Case("constant-begin-negative", lambda w: tfopt.ConstantSparsity(0.5, -1), ValueError, ["begin_step", "-1"]),
    Case("constant-begin-float", lambda w: tfopt.ConstantSparsity(0.5, 1.5), TypeError, ["begin_step", "1.5", "integer"]),
    Case("constant-frequency-0", lambda w: tfopt.ConstantSparsity(0.5, 0, frequency=0), ValueError, ["frequency", "0"]),
    Case("constant-frequency-negative", lambda w: tfopt.ConstantSparsity(0.5, 0, frequency=-5), ValueError, ["frequency", "-5"]),
    Case("constant-end-before-begin", lambda w: tfopt.ConstantSparsity(0.5, 100, end_step=50), ValueError, ["end_step", "50", "begin_step"]),
    Case("poly-end-before-begin", lambda w: tfopt.PolynomialDecay(0.0, 0.8, 100, 50), ValueError, ["end_step", "50", "begin_step"]),
    Case("poly-end-forever", lambda w: tfopt.PolynomialDecay(0.0, 0.8, 0, -1), ValueError, ["end_step", "-1"]),
    Case("poly-end-equals-begin", lambda w: tfopt.PolynomialDecay(0.0, 0.8, 10, 10), ValueError, ["end_step", "10"]),
    Case("poly-final-1.0", lambda w: tfopt.PolynomialDecay(0.0, 1.0, 0, 100), ValueError, ["final_sparsity", "1.0"]),
    Case("poly-initial-str", lambda w: tfopt.PolynomialDecay("0", 0.8, 0, 100), TypeError, ["initial_sparsity", "'0'"]),
    Case("poly-power-0", lambda w: tfopt.PolynomialDecay(0.0, 0.8, 0, 100, power=0), ValueError, ["power", "0", "> 0"]),
    Case("poly-frequency-0", lambda w: tfopt.PolynomialDecay(0.0, 0.8, 0, 100, frequency=0), ValueError, ["frequency", "0"]),
    # --- prune_low_magnitude / PruneLowMagnitude / strip_pruning / sparsity_report -------------
    Case("prune-not-a-model", lambda w: tfopt.prune_low_magnitude("model.keras"), TypeError, ["to_prune", "'model.keras'"]),
    Case("prune-subclassed-unbuilt", lambda w: tfopt.prune_low_magnitude(_Subclassed(name="fresh")), ValueError, ["built", "model.build", "_Subclassed", "'fresh'"]),
    Case("prune-unbuilt", lambda w: tfopt.prune_low_magnitude(w.unbuilt), ValueError, ["to_prune", "'unbuilt'", "keras.Input"]),
    Case("prune-already-pruned", lambda w: tfopt.prune_low_magnitude(w.pruned), ValueError, ["already wrapped", "strip_pruning", "'to_prune'"]),
    Case("prune-wrapper-layer", lambda w: tfopt.prune_low_magnitude(w.prune_layer), ValueError, ["already wrapped", "to_prune"]),
    Case("prune-schedule-float", lambda w: tfopt.prune_low_magnitude(w.cnn, 0.5), TypeError, ["pruning_schedule", "0.5", "PolynomialDecay"]),
    Case("prune-block-size-0", lambda w: tfopt.prune_low_magnitude(w.cnn, block_size=(0, 1)), ValueError, ["block_size", "(0, 1)"]),
    Case("prune-block-size-int", lambda w: tfopt.prune_low_magnitude(w.cnn, block_size=4), ValueError, ["block_size", "4", "(1, 4)"]),
    Case("prune-pooling-min", lambda w: tfopt.prune_low_magnitude(w.cnn, block_pooling_type="MIN"), ValueError, ["block_pooling_type", "'MIN'", "AVG"]),
    Case("prune-m-by-n-reversed", lambda w: tfopt.prune_low_magnitude(w.cnn, sparsity_m_by_n=(4, 2)), ValueError, ["sparsity_m_by_n", "(4, 2)", "(2, 4)"]),
    Case("prune-m-by-n-and-blocks", lambda w: tfopt.prune_low_magnitude(w.cnn, block_size=(1, 4), sparsity_m_by_n=(2, 4)), ValueError, ["block_size", "sparsity_m_by_n", "pick one"]),
    Case("prune-m-by-n-channels", lambda w: tfopt.prune_low_magnitude(w.cnn, sparsity_m_by_n=(2, 8)), ValueError, ["'conv'", "input channels", "filters=", "(2, 8)"]),
    Case("prune-filters-int", lambda w: tfopt.prune_low_magnitude(w.cnn, filters=42), TypeError, ["filters", "42", "regex"]),
    Case("prune-filters-match-nothing", lambda w: tfopt.prune_low_magnitude(w.cnn, filters="^nope$"), ValueError, ["filters", "'^nope$'", "model.summary()"]),
    Case("prune-no-prunable-layer", lambda w: tfopt.prune_low_magnitude(w.weightless), ValueError, ["'weightless'", "prunable", "Received"]),
    Case("prune-unknown-layer", lambda w: tfopt.prune_low_magnitude(w.custom), ValueError, ["'scale' of type _Scale", "register_layer", "filters="]),
    Case("prune-weightless-layer", lambda w: tfopt.prune_low_magnitude(keras.layers.Flatten(name="flat")), ValueError, ["'flat' of type Flatten", "register_layer"]),
    Case("prune-wrapper-of-string", lambda w: tfopt.PruneLowMagnitude("dense"), TypeError, ["layer", "'dense'", "keras layer"]),
    Case("prune-wrapper-twice", lambda w: tfopt.PruneLowMagnitude(w.prune_layer), ValueError, ["already wrapped", "wrapper.layer"]),
    Case("strip-pruning-not-a-model", lambda w: tfopt.strip_pruning([w.cnn]), TypeError, ["model", "list"]),
    Case("strip-pruning-subclassed", lambda w: tfopt.strip_pruning(w.sub), ValueError, ["subclassed", "_Subclassed"]),
    Case("sparsity-report-not-a-model", lambda w: tfopt.sparsity_report("model"), TypeError, ["model", "'model'"]),
    # --- quantization-aware training -------------------------------------------------------------
    Case("qat-not-a-model", lambda w: tfopt.quantize_model(42), TypeError, ["model", "42", "int"]),
    Case("qat-subclassed", lambda w: tfopt.quantize_model(w.sub), ValueError, ["subclassed", "_Subclassed"]),
    Case("qat-unbuilt", lambda w: tfopt.quantize_model(w.unbuilt), ValueError, ["'unbuilt'", "not built", "keras.Input"]),
    Case("qat-already-quantized", lambda w: tfopt.quantize_model(w.qat), ValueError, ["already quantized", "float model", "'to_quantize_qat'"]),
    Case("qat-scheme", lambda w: tfopt.quantize_model(w.cnn, scheme="4bit"), ValueError, ["scheme", "'4bit'", "'8bit'"]),
    Case("qat-ema-decay-1", lambda w: tfopt.quantize_model(w.cnn, ema_decay=1.0), ValueError, ["ema_decay", "1.0", "[0, 1)"]),
    Case("qat-ema-decay-str", lambda w: tfopt.quantize_model(w.cnn, ema_decay="0.9"), TypeError, ["ema_decay", "'0.9'"]),
    Case("qat-freeze-bn-negative", lambda w: tfopt.quantize_model(w.cnn, freeze_bn_delay=-1), ValueError, ["freeze_bn_delay", "-1"]),
    Case("qat-preserve-sparsity-str", lambda w: tfopt.quantize_model(w.cnn, preserve_sparsity="yes"), TypeError, ["preserve_sparsity", "'yes'"]),
    Case("qat-filters-int", lambda w: tfopt.quantize_model(w.cnn, filters=42), TypeError, ["filters", "42"]),
    Case("qat-filters-match-nothing", lambda w: tfopt.quantize_model(w.cnn, filters="^nope$"), ValueError, ["filters", "'^nope$'", "model.summary()"]),
    Case("qat-recurrent-layer", lambda w: tfopt.quantize_model(keras.Sequential([keras.Input((3, 2)), keras.layers.LSTM(2, name="lstm")])), ValueError, ["'lstm' of type LSTM", "Recurrent layers", "filters="]),
    Case("qat-apply-nothing-annotated", lambda w: tfopt.quantize_apply(w.cnn), ValueError, ["no annotated layer", "quantize_annotate_layer", "'cnn'"]),
    Case("qat-annotate-model-as-layer", lambda w: tfopt.quantize_annotate_layer(w.cnn), TypeError, ["quantize_annotate_model", "Functional"]),
    Case("qat-annotate-twice", lambda w: tfopt.quantize_annotate_layer(w.annotated_layer), ValueError, ["already annotated", "annotate_dense"]),
    Case("qat-annotate-bad-config", lambda w: tfopt.quantize_annotate_layer(keras.layers.Dense(2), quantize_config="8bit"), TypeError, ["quantize_config", "'8bit'", "QuantizeConfig"]),
    Case("qat-annotate-wrapper-of-string", lambda w: tfopt.QuantizeAnnotate("dense"), TypeError, ["layer", "'dense'"]),
    Case("qat-wrapper-of-string", lambda w: tfopt.QuantizeWrapper("dense"), TypeError, ["layer", "'dense'"]),
    Case("qat-wrapper-ema-decay", lambda w: tfopt.QuantizeWrapper(keras.layers.Dense(2), ema_decay=2.0), ValueError, ["ema_decay", "2.0"]),
    Case("qat-composite-of-string", lambda w: tfopt.QuantizeComposite("mha"), TypeError, ["layer", "'mha'"]),
    Case("qat-composite-ema-decay", lambda w: tfopt.QuantizeComposite(keras.layers.LayerNormalization(), ema_decay=2.0), ValueError, ["ema_decay", "2.0"]),
    Case("qat-annotate-model-quantized", lambda w: tfopt.quantize_annotate_model(w.qat), ValueError, ["already quantized", "'to_quantize_qat'"]),
    # --- fake-quant quantizers ---------------------------------------------------------------------
    Case("quantizer-bits-0", lambda w: quantizers.LastValueQuantizer(num_bits=0), ValueError, ["num_bits", "0", "2"]),
    Case("quantizer-bits-str", lambda w: quantizers.MovingAverageQuantizer(num_bits="8"), TypeError, ["num_bits", "'8'"]),
    Case("quantizer-ema-decay", lambda w: quantizers.MovingAverageQuantizer(ema_decay=1.5), ValueError, ["ema_decay", "1.5", "[0, 1)"]),
    Case("quantizer-range-without-0", lambda w: quantizers.FixedRangeQuantizer(1.0, 2.0), ValueError, ["contain 0", "min_value=1.0", "max_value=2.0"]),
    Case("quantize-layer-bits", lambda w: tfopt.QuantizeLayer(num_bits=1), ValueError, ["num_bits", "1"]),
    Case("fake-quant-bits", lambda w: quantizers.fake_quant(np.zeros(3, np.float32), -1.0, 1.0, num_bits=40), ValueError, ["num_bits", "40", "16"]),
    # --- weight clustering -------------------------------------------------------------------------
    Case("cluster-k-1", lambda w: tfopt.cluster_weights(w.cnn, 1), ValueError, ["number_of_clusters", ">= 2", "16"]),
    Case("cluster-k-float", lambda w: tfopt.cluster_weights(w.cnn, 2.5), TypeError, ["number_of_clusters", "2.5", "integer"]),
    Case("cluster-init-unknown", lambda w: tfopt.cluster_weights(w.cnn, 4, cluster_centroids_init="kmeans"), ValueError, ["cluster_centroids_init", "'kmeans'", "kmeans++"]),
    Case("cluster-preserve-sparsity-str", lambda w: tfopt.cluster_weights(w.cnn, 4, preserve_sparsity="yes"), TypeError, ["preserve_sparsity", "'yes'"]),
    Case("cluster-not-a-model", lambda w: tfopt.cluster_weights(None, 4), TypeError, ["model_or_layer", "None"]),
    Case("cluster-subclassed-unbuilt", lambda w: tfopt.cluster_weights(_Subclassed(name="fresh"), 4), ValueError, ["built", "model.build", "_Subclassed", "'fresh'"]),
    Case("cluster-unbuilt", lambda w: tfopt.cluster_weights(w.unbuilt, 4), ValueError, ["'unbuilt'", "not built"]),
    Case("cluster-already-clustered", lambda w: tfopt.cluster_weights(w.clustered, 4), ValueError, ["already wrapped for clustering", "strip_clustering"]),
    Case("cluster-layer-twice", lambda w: tfopt.cluster_weights(w.cluster_layer, 4), ValueError, ["already wrapped for clustering", "model_or_layer"]),
    Case("cluster-pruned", lambda w: tfopt.cluster_weights(w.pruned, 4), ValueError, ["strip_pruning", "'to_prune'"]),
    Case("cluster-quantized", lambda w: tfopt.cluster_weights(w.qat, 4), ValueError, ["quantize after clustering", "'to_quantize_qat'"]),
    Case("cluster-no-layer", lambda w: tfopt.cluster_weights(w.weightless, 4), ValueError, ["'weightless'", "weights to cluster"]),
    Case("cluster-filters-match-nothing", lambda w: tfopt.cluster_weights(w.cnn, 4, filters="^nope$"), ValueError, ["filters", "'^nope$'", "model.summary()"]),
    Case("cluster-nan-weights", lambda w: tfopt.cluster_weights(w.nan, 4), ValueError, ["NaN or inf", "'hidden' of type Dense", "'nan_model'"]),
    Case("cluster-unknown-layer", lambda w: tfopt.cluster_weights(w.custom, 4), ValueError, ["'scale' of type _Scale", "register_layer"]),
    Case("cluster-wrapper-of-string", lambda w: tfopt.ClusterWeights("dense", 4), TypeError, ["layer", "'dense'"]),
    Case("strip-clustering-not-a-model", lambda w: tfopt.strip_clustering(3.0), TypeError, ["model", "3.0"]),
    Case("clustering-report-not-a-model", lambda w: tfopt.clustering_report("m"), TypeError, ["model", "'m'"]),
    # --- low-rank factorization ----------------------------------------------------------------------
    Case("low-rank-rank-0", lambda w: tfopt.low_rank_factorize(w.cnn, rank=0), ValueError, ["rank", "0", ">= 1"]),
    Case("low-rank-rank-float", lambda w: tfopt.low_rank_factorize(w.cnn, rank=2.5), TypeError, ["rank", "2.5"]),
    Case("low-rank-energy-0", lambda w: tfopt.low_rank_factorize(w.cnn, energy=0.0), ValueError, ["energy", "0.0", "(0, 1]"]),
    Case("low-rank-energy-1.5", lambda w: tfopt.low_rank_factorize(w.cnn, energy=1.5), ValueError, ["energy", "1.5"]),
    Case("low-rank-not-a-model", lambda w: tfopt.low_rank_factorize("m"), TypeError, ["model", "'m'"]),
    Case("low-rank-pruned", lambda w: tfopt.low_rank_factorize(w.pruned), ValueError, ["'to_prune'", "strip"]),
    Case("low-rank-no-layer", lambda w: tfopt.low_rank_factorize(w.weightless), ValueError, ["No Dense or Conv2D", "'weightless'"]),
    Case("low-rank-filters-nothing", lambda w: tfopt.low_rank_factorize(w.cnn, filters="^nope$"), ValueError, ["filters", "'^nope$'"]),
    Case("low-rank-report-not-a-model", lambda w: tfopt.low_rank_report(w.cnn, "m"), TypeError, ["factorized", "'m'"]),
    Case("low-rank-report-not-factorized", lambda w: tfopt.low_rank_report(w.cnn, w.cnn), ValueError, ["low_rank_factorize", "'cnn'"]),
    # --- channel pruning -------------------------------------------------------------------------------
    Case("channels-ratio-1", lambda w: tfopt.prune_channels(w.cnn, 1.0), ValueError, ["ratio", "1.0", "[0, 1)"]),
    Case("channels-ratio-str", lambda w: tfopt.prune_channels(w.cnn, "half"), TypeError, ["ratio", "'half'", "0.5"]),
    Case("channels-criterion", lambda w: tfopt.prune_channels(w.cnn, 0.5, criterion="l3"), ValueError, ["criterion", "'l3'", "'l2'"]),
    Case("channels-round-to-0", lambda w: tfopt.prune_channels(w.cnn, 0.5, round_to=0), ValueError, ["round_to", "0"]),
    Case("channels-pruned", lambda w: tfopt.prune_channels(w.pruned, 0.5), ValueError, ["magnitude pruning", "strip_pruning", "'to_prune'"]),
    Case("channels-quantized", lambda w: tfopt.prune_channels(w.qat, 0.5), ValueError, ["quantization-aware", "'to_quantize_qat'"]),
    Case("channels-subclassed", lambda w: tfopt.prune_channels(w.sub, 0.5), ValueError, ["subclassed", "_Subclassed"]),
    Case("channels-no-prunable-channel", lambda w: tfopt.prune_channels(w.weightless, 0.5), ValueError, ["no prunable channel", "'weightless'", "ratio=0.5"]),
    Case("channel-report-not-a-model", lambda w: tfopt.channel_report(42), TypeError, ["model", "42"]),
    # --- distillation ---------------------------------------------------------------------------------
    Case("distill-teacher-not-a-model", lambda w: tfopt.distill("teacher.keras", w.cnn), TypeError, ["teacher", "'teacher.keras'"]),
    Case("distill-student-unbuilt", lambda w: tfopt.distill(w.dense, w.unbuilt), ValueError, ["student", "'unbuilt'", "not built"]),
    Case("distill-softmax-teacher", lambda w: tfopt.distill(w.softmax, w.dense), ValueError, ["teacher", "logits", "'softmax'", "activation=None"]),
    Case("distill-shapes-differ", lambda w: tfopt.distill(w.dense, w.student3), ValueError, ["same output shapes", "student outputs=[(3,)]", "teacher outputs=[(4,)]"]),
    Case("distill-temperature-0", lambda w: tfopt.distill(w.dense, w.student, temperature=0), ValueError, ["temperature", "0"]),
    Case("distill-temperature-str", lambda w: tfopt.distill(w.dense, w.student, temperature="3"), TypeError, ["temperature", "'3'"]),
    Case("distill-alpha-1.5", lambda w: tfopt.distill(w.dense, w.student, alpha=1.5), ValueError, ["alpha", "1.5", "[0, 1]"]),
    Case("strip-distillation-model", lambda w: tfopt.strip_distillation(w.cnn), TypeError, ["distiller", "Functional", "strip_pruning"]),
    # --- registry -------------------------------------------------------------------------------------
    Case("register-not-a-class", lambda w: tfopt.register_layer(keras.layers.Dense(3), prunable=("kernel",)), TypeError, ["layer_class", "Dense"]),
    Case("register-axis-mismatch", lambda w: tfopt.register_layer(_Scale, quantizable=("scale",), quant_axis=(0, 1)), ValueError, ["quant_axis", "quantizable", "(0, 1)"]),
    # --- callbacks ------------------------------------------------------------------------------------
    Case("update-step-on-plain-model", _fit(lambda: tfopt.callbacks.UpdatePruningStep()), ValueError, ["PruneLowMagnitude", "prune_low_magnitude", "'dense_model'"]),
    Case("summaries-on-plain-model", _fit_pruning_summaries, ValueError, ["PruneLowMagnitude", "prune_low_magnitude"]),
    Case("summaries-log-dir-int", lambda w: tfopt.callbacks.PruningSummaries(3), TypeError, ["log_dir", "3"]),
    Case("summaries-update-freq-0", lambda w: tfopt.callbacks.PruningSummaries(w.path("logs"), update_freq=0), ValueError, ["update_freq", "0", "'epoch'"]),
    Case("summaries-update-freq-batch", lambda w: tfopt.callbacks.PruningSummaries(w.path("logs"), update_freq="batch"), ValueError, ["update_freq", "'batch'"]),
    # --- tflite_export.convert: arguments ---------------------------------------------------------------
    Case("convert-target", lambda w: te.convert(w.cnn, target="coral", representative_data=w.x), ValueError, ["target", "'coral'", "'edgetpu'"]),
    Case("convert-mode", lambda w: te.convert(w.cnn, mode="int4", representative_data=w.x), ValueError, ["mode", "'int4'", "'int16x8'"]),
    Case("convert-edgetpu-float16", lambda w: te.convert(w.cnn, target="edgetpu", mode="float16"), ValueError, ["mode='float16'", "mode='int8'"]),
    Case("convert-micro-int16x8", lambda w: te.convert(w.cnn, target="micro", mode="int16x8", representative_data=w.x), ValueError, ["target='micro'", "mode='int8'", "mode='int16x8'"]),
    Case("convert-float16-int16-io", lambda w: te.convert(w.cnn, mode="float16", io_dtype="int16"), ValueError, ["io_dtype='int16'", "mode='float16'", "'float32'"]),
    Case("convert-edgetpu-float-io", lambda w: te.convert(w.cnn, target="edgetpu", io_dtype="float32", representative_data=w.x), ValueError, ["io_dtype='float32'", "'int8', 'uint8'"]),
    Case("convert-float-int8-io", lambda w: te.convert(w.cnn, mode="float32", io_dtype="int8"), ValueError, ["io_dtype='int8'", "mode='float32'", "'float32'"]),
    Case("convert-io-dtype-object", lambda w: te.convert(w.cnn, mode="float32", io_dtype=object()), TypeError, ["io_dtype", "object"]),
    Case("convert-max-samples-0", lambda w: te.convert(w.cnn, representative_data=w.x, max_samples=0), ValueError, ["max_samples", "0", "positive"]),
    Case("convert-strict-int", lambda w: te.convert(w.cnn, representative_data=w.x, strict=1), TypeError, ["strict", "1"]),
    Case("convert-qat-float16", lambda w: te.convert(w.qat, mode="float16"), ValueError, ["quantization-aware", "mode='int8'", "mode='float16'"]),
    # --- tflite_export.convert: the model ---------------------------------------------------------------
    Case("convert-missing-path", lambda w: te.convert(w.path("missing.keras")), FileNotFoundError, ["No model at this path", "missing.keras"]),
    Case("convert-txt-path", lambda w: te.convert(w.path("notes.txt")), ValueError, ["Not a model file", "notes.txt", ".keras"]),
    Case("convert-corrupt-keras", lambda w: te.convert(w.path("corrupt.keras")), ValueError, ["Could not load", "corrupt.keras", "model.save"]),
    Case("convert-dir-not-savedmodel", lambda w: te.convert(w.path("not_a_savedmodel")), ValueError, ["not a SavedModel", "saved_model.pb", "not_a_savedmodel"]),
    Case("convert-tflite-path", lambda w: te.convert(w.path("good.tflite")), ValueError, ["already a .tflite", "analyze", "good.tflite"]),
    Case("convert-layer", lambda w: te.convert(keras.layers.Dense(3, name="lonely")), TypeError, ["keras.Sequential", "'lonely'"]),
    Case("convert-array", lambda w: te.convert(np.zeros(3)), TypeError, ["model", "ndarray"]),
    Case("convert-nan-weights", lambda w: te.convert(w.nan, representative_data=np.zeros((4, 8), np.float32)), ValueError, ["NaN or inf weights", "hidden/kernel", "'nan_model'"]),
    Case("convert-subclassed-no-data", lambda w: te.convert(w.sub, mode="float32"), ValueError, ["no known input shape", "representative_data", "'subclassed'"]),
    Case("convert-unbuilt", lambda w: te.convert(w.unbuilt, mode="float32"), ValueError, ["'unbuilt'", "build", "keras.Input"]),
    # --- tflite_export.convert: representative data --------------------------------------------------------
    Case("rep-data-missing", lambda w: te.convert(w.cnn), ValueError, ["needs representative_data", "x_train[:300]", "representative_data=None"]),
    Case("rep-data-shape", lambda w: te.convert(w.cnn, representative_data=np.zeros((4, 5, 5, 3), np.float32)), ValueError, ["(batch, 8, 8, 3)", "shape=(4, 5, 5, 3)"]),
    Case("rep-data-dtype", lambda w: te.convert(w.cnn, representative_data=np.zeros((4, 8, 8, 3), np.uint8)), ValueError, ["float32", "astype('float32')", "dtype=uint8"]),
    Case("rep-data-empty", lambda w: te.convert(w.cnn, representative_data=np.zeros((0, 8, 8, 3), np.float32)), ValueError, ["is empty", "0 samples"]),
    Case("rep-data-nan", lambda w: te.convert(w.cnn, representative_data=np.full((3, 8, 8, 3), np.nan, np.float32)), ValueError, ["NaN or inf", "3 sample(s)", "index 0"]),
    Case("rep-data-int", lambda w: te.convert(w.cnn, representative_data=42), TypeError, ["representative_data", "int", "generator"]),
    Case("rep-data-dry-generator", lambda w: te.convert(w.cnn, representative_data=_empty_generator()), ValueError, ["is empty", "0 samples"]),
    Case("rep-data-dry-callable", lambda w: te.convert(w.cnn, representative_data=_empty_generator), ValueError, ["is empty", "0 samples"]),
    Case("rep-data-yields-none", lambda w: te.convert(w.cnn, representative_data=_generator_of_none()), ValueError, ["representative_data", "object", "float32"]),
    Case("rep-data-empty-dataset", lambda w: te.convert(w.cnn, representative_data=_empty_dataset()), ValueError, ["is empty", "0 samples"]),
    Case("rep-data-empty-list", lambda w: te.convert(w.cnn, representative_data=[[]]), ValueError, ["empty list", "representative_data"]),
    # --- reading .tflite files: analyze, edgetpu_report, TFLiteModel, benchmark, compare, save_c_array -------------
    Case("analyze-missing", lambda w: te.analyze(w.path("missing.tflite")), FileNotFoundError, ["No .tflite file", "missing.tflite"]),
    Case("analyze-dir", lambda w: te.analyze(w.path("not_a_savedmodel")), te.TFLiteFileError, ["directory", "convert", "not_a_savedmodel"]),
    Case("analyze-renamed-txt", lambda w: te.analyze(w.path("renamed.tflite")), te.TFLiteFileError, ["Not a TFLite flatbuffer", "b'TFL3'", "renamed.tflite"]),
    Case("analyze-truncated", lambda w: te.analyze(w.path("truncated.tflite")), te.TFLiteFileError, ["corrupt or truncated", "Re-export", "64 bytes"]),
    Case("analyze-keras-file", lambda w: te.analyze(w.path("good.keras")), te.TFLiteFileError, ["Not a TFLite flatbuffer", "good.keras"]),
    Case("analyze-int", lambda w: te.analyze(42), TypeError, ["tflite", "42", "bytes"]),
    Case("analyze-empty-bytes", lambda w: te.analyze(b""), te.TFLiteFileError, ["b'TFL3'", "0 bytes"]),
    Case("edgetpu-runtime-version", lambda w: te.edgetpu_report(w.path("good.tflite"), min_runtime_version=20), ValueError, ["min_runtime_version", "20", "10 to 16"]),
    Case("edgetpu-renamed-txt", lambda w: te.edgetpu_report(w.path("renamed.tflite")), te.TFLiteFileError, ["b'TFL3'", "renamed.tflite"]),
    Case("tflite-model-bytes", lambda w: te.TFLiteModel(b"\x00" * 16), te.TFLiteFileError, ["b'TFL3'", "16 bytes"]),
    Case("tflite-model-load-missing", lambda w: te.TFLiteModel.load(w.path("missing.tflite")), FileNotFoundError, ["path", "missing.tflite"]),
    Case("tflite-save-missing-dir", lambda w: w.tfl.save(w.path("no_such_dir/m.tflite")), FileNotFoundError, ["create it first", "no_such_dir"]),
    Case("tflite-save-onto-dir", lambda w: w.tfl.save(w.path("not_a_savedmodel")), ValueError, ["is a directory", "not_a_savedmodel"]),
    Case("tflite-model-load-dir", lambda w: te.TFLiteModel.load(w.path("not_a_savedmodel")), te.TFLiteFileError, ["directory", "not_a_savedmodel"]),
    Case("benchmark-runs-0", lambda w: te.benchmark(w.path("good.tflite"), runs=0), ValueError, ["runs", "0"]),
    Case("benchmark-warmup-negative", lambda w: te.benchmark(w.path("good.tflite"), warmup=-1), ValueError, ["warmup", "-1"]),
    Case("benchmark-threads-0", lambda w: te.benchmark(w.path("good.tflite"), threads=0), ValueError, ["threads", "0"]),
    Case("benchmark-kernels", lambda w: te.benchmark(w.path("good.tflite"), kernels="gpu"), ValueError, ["kernels", "'gpu'", "xnnpack"]),
    Case("benchmark-renamed-txt", lambda w: te.benchmark(w.path("renamed.tflite")), te.TFLiteFileError, ["b'TFL3'", "renamed.tflite"]),
    Case("compare-latency-rounds-0", lambda w: te.compare_latency(w.tfl, w.tfl, rounds=0), ValueError, ["rounds", "0"]),
    Case("compare-x-shape", lambda w: te.compare(w.cnn, w.tfl, np.zeros((4, 5, 5, 3), np.float32)), ValueError, ["x", "(4, 5, 5, 3)", "(8, 8, 3)"]),
    Case("compare-x-nan", lambda w: te.compare(w.cnn, w.tfl, np.full((2, 8, 8, 3), np.nan, np.float32)), ValueError, ["x", "NaN"]),
    Case("compare-x-empty", lambda w: te.compare(w.cnn, w.tfl, np.zeros((0, 8, 8, 3), np.float32)), ValueError, ["x", "0 samples"]),
    Case("compare-not-a-model", lambda w: te.compare(w.path("good.keras"), w.tfl, w.x), TypeError, ["keras_model", "good.keras"]),
    Case("c-array-var-name", lambda w: te.save_c_array(w.tfl, w.path("model"), var_name="1model"), ValueError, ["var_name", "'1model'", "C identifier"]),
    Case("c-array-missing-dir", lambda w: te.save_c_array(w.tfl, w.path("no_such_dir/model")), FileNotFoundError, ["create it first", "no_such_dir"]),
    Case("c-array-renamed-txt", lambda w: te.save_c_array(w.path("renamed.tflite"), w.path("model")), te.TFLiteFileError, ["b'TFL3'"]),
    Case("compare-x-strings", lambda w: te.compare(w.cnn, w.tfl, [["a"]]), TypeError, ["x", "numeric", "list"]),
    Case("compiler-log-not-text", lambda w: te.parse_compiler_log(42), TypeError, ["text", "42"]),
]


@dataclasses.dataclass
class Cli:
    id: str
    argv: Callable  # argv(w) -> the command line after `tfopt`
    must_mention: list
    xfail: str = None


CLI_CASES = [
    # --- `tfopt convert` -----------------------------------------------------------------------------
    Cli("convert-missing-model", lambda w: ["convert", w.path("missing.keras"), "-o", w.path("out.tflite")], ["No model at this path", "missing.keras"]),
    Cli("convert-txt-model", lambda w: ["convert", w.path("notes.txt"), "-o", w.path("out.tflite")], ["Not a model file", "notes.txt"]),
    Cli("convert-corrupt-model", lambda w: ["convert", w.path("corrupt.keras"), "-o", w.path("out.tflite")], ["Could not load", "corrupt.keras"]),
    Cli("convert-output-not-tflite", lambda w: ["convert", w.path("good.keras"), "-o", w.path("out.txt")], ["must end with .tflite", "out.txt"]),
    Cli("convert-output-dir-missing", lambda w: ["convert", w.path("good.keras"), "--mode", "float32", "--quiet", "-o", w.path("nodir/out.tflite")], ["nodir", "create it first"]),
    Cli("convert-output-is-dir", lambda w: ["convert", w.path("good.keras"), "--mode", "float32", "-o", w.path("dir.tflite")], ["is a directory", "dir.tflite"]),
    Cli("convert-c-array-dir-missing", lambda w: ["convert", w.path("good.keras"), "--mode", "float32", "--quiet", "-o", w.path("out.tflite"), "--c-array", w.path("nodir/model")], ["--c-array", "nodir", "create it first"]),
    Cli("convert-rep-data-missing", lambda w: ["convert", w.path("good.keras"), "--rep-data", w.path("nope.npy"), "-o", w.path("out.tflite")], ["--rep-data", "nope.npy"]),
    Cli("convert-rep-data-corrupt", lambda w: ["convert", w.path("good.keras"), "--rep-data", w.path("rep_corrupt.npy"), "-o", w.path("out.tflite")], ["np.save", "rep_corrupt.npy"]),
    Cli("convert-rep-data-empty-npz", lambda w: ["convert", w.path("good.keras"), "--rep-data", w.path("rep_empty.npz"), "-o", w.path("out.tflite")], ["no array", "rep_empty.npz"]),
    Cli("convert-rep-data-shape", lambda w: ["convert", w.path("good.keras"), "--rep-data", w.path("rep_badshape.npy"), "--quiet", "-o", w.path("out.tflite")], ["(batch, 8, 8, 3)", "(4, 5, 5, 3)"]),
    Cli("convert-rep-data-nan", lambda w: ["convert", w.path("good.keras"), "--rep-data", w.path("rep_nan.npy"), "--quiet", "-o", w.path("out.tflite")], ["NaN or inf", "4 sample(s)"]),
    Cli("convert-no-rep-data", lambda w: ["convert", w.path("good.keras"), "--quiet", "-o", w.path("out.tflite")], ["needs representative_data", "--rep-data"]),
    Cli("convert-max-samples-0", lambda w: ["convert", w.path("good.keras"), "--rep-data", w.path("rep.npy"), "--max-samples", "0", "-o", w.path("out.tflite")], ["max_samples", "0"]),
    Cli("convert-edgetpu-float", lambda w: ["convert", w.path("good.keras"), "--target", "edgetpu", "--mode", "float16", "-o", w.path("out.tflite")], ["mode='int8'", "float16"]),
    Cli("convert-target-choice", lambda w: ["convert", w.path("good.keras"), "--target", "coral", "-o", w.path("out.tflite")], ["--target", "'coral'", "mobile"]),
    Cli("convert-no-output", lambda w: ["convert", w.path("good.keras")], ["-o/--output", "required"]),
    Cli("convert-max-samples-str", lambda w: ["convert", w.path("good.keras"), "--max-samples", "many", "-o", w.path("out.tflite")], ["--max-samples", "'many'"]),
    # --- `tfopt inspect` and `tfopt bench` ----------------------------------------------------------
    Cli("inspect-missing", lambda w: ["inspect", w.path("missing.tflite")], ["No .tflite file", "missing.tflite"]),
    Cli("inspect-renamed-txt", lambda w: ["inspect", w.path("renamed.tflite")], ["Not a TFLite flatbuffer", "renamed.tflite"]),
    Cli("inspect-truncated", lambda w: ["inspect", "--edgetpu", w.path("truncated.tflite")], ["corrupt or truncated"]),
    Cli("inspect-dir", lambda w: ["inspect", w.path("not_a_savedmodel")], ["directory", "not_a_savedmodel"]),
    Cli("bench-runs-0", lambda w: ["bench", w.path("good.tflite"), "--runs", "0"], ["runs", "0"]),
    Cli("bench-warmup-negative", lambda w: ["bench", w.path("good.tflite"), "--warmup", "-1"], ["warmup", "-1"]),
    Cli("bench-threads-0", lambda w: ["bench", w.path("good.tflite"), "--threads", "0"], ["threads", "0"]),
    Cli("bench-keras-file", lambda w: ["bench", w.path("good.keras")], ["Not a TFLite flatbuffer", "good.keras"]),
    # --- `tfopt demo` and the command itself ----------------------------------------------------------
    Cli("demo-epochs-0", lambda w: ["demo", "--float-epochs", "0", "--out", w.path("demo_out")], ["float_epochs", "0"]),
    Cli("demo-qat-epochs-negative", lambda w: ["demo", "--qat-epochs", "-1", "--out", w.path("demo_out")], ["qat_epochs", "-1"]),
    Cli("unknown-command", lambda w: ["squeeze", "model.keras"], ["invalid choice", "'squeeze'", "convert"]),
    Cli("no-command", lambda w: [], ["required", "COMMAND"]),
]


def _params(cases):
    return [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else [])
        for c in cases
    ]


@pytest.mark.parametrize("case", _params(CASES))
def test_bad_input(w, case):
    before = _snapshot(w)
    with pytest.raises(Exception) as info:
        case.call(w)
    exc = info.value
    assert type(exc) is case.exc or (case.exc is not Exception and isinstance(exc, case.exc) and type(exc).__module__.startswith("tfopt")), (
        f"expected {case.exc.__name__}, got {type(exc).__name__}: {exc}"
    )
    message = str(exc)
    for text in case.must_mention + ["Received"]:
        assert text in message, f"{text!r} missing from the message: {message}"
    _assert_raised_by_tfopt(exc)
    _assert_unchanged(before, _snapshot(w))


@pytest.mark.parametrize("case", _params(CLI_CASES))
def test_bad_cli_input(w, case, capsys):
    before = _snapshot(w)
    argv = case.argv(w)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}; stderr: {err}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.startswith("tfopt")]
    assert len(lines) == 1 and ": error: " in lines[0], err
    for text in case.must_mention:
        assert text in lines[0], f"{text!r} missing from: {lines[0]}"
    _assert_unchanged(before, _snapshot(w))


def test_the_checks_catch_what_they_check(w):
    """The harness itself: a changed weight, a stray file and a Keras-internal error each fail it."""
    before = _snapshot(w)
    bias = w.dense.get_layer("out").bias
    old = np.array(bias)
    bias.assign(old + 1.0)
    try:
        with pytest.raises(AssertionError, match="changed"):
            _assert_unchanged(before, _snapshot(w))
    finally:
        bias.assign(old)
    stray = w.files / "stray.tmp"
    stray.write_bytes(b"x")
    try:
        with pytest.raises(AssertionError, match="new files"):
            _assert_unchanged(before, _snapshot(w))
    finally:
        stray.unlink()
    _assert_unchanged(before, _snapshot(w))
    with pytest.raises(Exception) as info:
        keras.ops.reshape(np.zeros(4, np.float32), (3,))
    with pytest.raises(AssertionError, match="not by tfopt's own validation"):
        _assert_raised_by_tfopt(info.value)
    try:
        try:
            {}["key"]
        except KeyError:
            tfopt.ConstantSparsity(2.0, 0)  # raised while handling: the KeyError is shown too
    except ValueError as e:
        with pytest.raises(AssertionError, match="chained KeyError"):
            _assert_raised_by_tfopt(e)


def test_the_catalog_covers_the_public_api():
    """Every public function and class of tfopt, tfopt.callbacks and tfopt.tflite_export has a row."""
    import inspect

    source = inspect.getsource(inspect.getmodule(test_the_catalog_covers_the_public_api))
    catalog = source[source.index("CASES = ["): source.index("def _params")]
    # Not callables with arguments to get wrong: constants, result records, the exception types themselves,
    # base classes to subclass, submodules, and `is_quantized_model` (a predicate: False for anything else).
    exempt = {
        "IO_DTYPES", "MODES", "TARGETS", "Analysis", "CompilerLog", "Comparison", "EdgeTPUReport", "Latency",
        "MicroResult", "OpVerdict", "ConversionError", "EdgeTPUError", "MicroError", "TFLiteFileError",
        "ChannelPruningReport", "ClusteringReport", "LowRankReport", "SparsityReport", "LayerSpec",
        "PruningSchedule", "QuantizeConfig", "is_quantized_model", "QuantizeAnnotate", "QuantizeWrapper", "clustering", "quantizers",
    }
    missing = []
    for module, prefix in ((tfopt, "tfopt."), (tfopt.callbacks, "tfopt.callbacks."), (te, "te.")):
        for name in module.__all__:
            if name not in exempt and f"{prefix}{name}(" not in catalog and f".{name}(" not in catalog:
                missing.append(f"{prefix}{name}")
    assert not missing, f"no bad-input row for: {missing}"
    for command in ("convert", "inspect", "bench", "demo"):
        assert f'["{command}"' in catalog, f"no row for `tfopt {command}`"
    assert len(CASES) + len(CLI_CASES) >= 200
