"""Pruning and clustering of models of any structure: composite layers, subclassed models, keras-hub backbones.

Composite layers (layers that own sub-layers) are wrapped whole; tfopt walks their sub-layers with
`tfopt.registry.walk` and prunes or clusters the leaf kernels. Subclassed models are wrapped whole inside a
Functional model. Layers Keras cannot rebuild from their config in safe mode (a `Lambda` of a Python lambda)
or that make their weights on the first call are copied too.
"""

import math
import os

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops

import tfopt
from helpers import assert_same_weights, masks_of, weights_of
from tfopt import callbacks as tfopt_callbacks


# The "text classification with Transformer" example of keras.io: sub-layers made in `__init__`, no `build`,
# no `get_config` (Keras records the constructor arguments).
@keras.saving.register_keras_serializable(package="tfopt_tests")
class TransformerBlock(L.Layer):
    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.att = L.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential([L.Dense(ff_dim, activation="relu"), L.Dense(embed_dim)])
        self.layernorm1 = L.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = L.LayerNormalization(epsilon=1e-6)
        self.dropout1 = L.Dropout(rate)
        self.dropout2 = L.Dropout(rate)

    def call(self, inputs, training=None):
        out1 = self.layernorm1(inputs + self.dropout1(self.att(inputs, inputs), training=training))
        return self.layernorm2(out1 + self.dropout2(self.ffn(out1), training=training))


@keras.saving.register_keras_serializable(package="tfopt_tests")
class TokenAndPositionEmbedding(L.Layer):
    def __init__(self, maxlen, vocab_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.token_emb = L.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = L.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        return self.token_emb(x) + self.pos_emb(ops.arange(0, ops.shape(x)[-1], 1))


@keras.saving.register_keras_serializable(package="tfopt_tests")
class ScaledBlock(L.Layer):
    """A composite layer that also creates a weight of its own (tfopt cannot know whether it may change)."""

    def __init__(self, units=8, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = L.Dense(units)

    def build(self, input_shape):
        self.dense.build(input_shape)
        self.scale = self.add_weight(name="scale", shape=(self.units,), initializer="ones")

    def call(self, x):
        return self.dense(x) * self.scale

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="tfopt_tests")
class SmallSubclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = TransformerBlock(8, 2, 16)
        self.head = L.Dense(3)

    def call(self, x, training=None):
        return self.head(ops.mean(self.block(x, training=training), axis=1))


SEQ, VOCAB = 12, 50


def text_model():
    inputs = L.Input((SEQ,), dtype="int32")
    x = TokenAndPositionEmbedding(SEQ, VOCAB, 16, name="embed")(inputs)
    x = TransformerBlock(16, 2, 32, name="block")(x)
    x = L.GlobalAveragePooling1D()(x)
    x = L.Lambda(lambda t: t * 0.5, name="halve")(x)  # a Python lambda: Keras' safe mode refuses its config
    return keras.Model(inputs, L.Dense(2, name="head")(x), name="text")


def text_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, (n, SEQ)).astype("int32"), rng.integers(0, 2, n)


def fit_pruned(model, x, y, epochs=2, batch_size=16):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=batch_size, callbacks=[tfopt_callbacks.UpdatePruningStep()], verbose=0)
    return model


def pruned_tensors(model):
    return {f"{w.name}/{v.path}": ops.convert_to_numpy(v) for w in tfopt.pruning.pruned_wrappers(model)
            for v, _, _ in w.pruned_weights}


def assert_each_at(tensors, sparsity, tol_points=0.0):
    assert tensors
    for name, value in tensors.items():
        zeros = float(np.mean(value == 0))
        if tol_points:
            assert abs(zeros - sparsity) <= tol_points / 100, (name, zeros)
        else:
            size = value.size
            assert abs(int(np.sum(value == 0)) - (size - max(round(size * (1 - sparsity)), 1))) <= 1, (name, zeros)


# -- the registry walk -------------------------------------------------------------------------------


def test_walk_finds_the_leaf_kernels_of_a_composite_layer():
    block = text_model().get_layer("block")
    found, unplaced = tfopt.registry.walk(block, "get_prunable_weights")
    assert unplaced == []
    # Sub-layer names follow Keras' global name counters; where each kernel sits does not.
    assert [w.path.split("/")[1:] for w in found] == [
        ["query", "kernel"], ["key", "kernel"], ["value", "kernel"], ["attention_output", "kernel"],
        [block.ffn.layers[0].name, "kernel"], [block.ffn.layers[1].name, "kernel"],
    ]
    assert [w.variable for w in found] == [
        block.att.query_dense.kernel, block.att.key_dense.kernel, block.att.value_dense.kernel,
        block.att.output_dense.kernel, block.ffn.layers[0].kernel, block.ffn.layers[1].kernel,
    ]


def test_walk_reports_weights_a_composite_layer_makes_itself():
    block = ScaledBlock(name="scaled")
    block.build((None, 4))
    found, unplaced = tfopt.registry.walk(block)
    assert [w.variable for w in found] == [block.dense.kernel]
    assert unplaced == ["scale"]


# -- composite layers, Lambda, weights made on the first call ----------------------------------------


def test_composite_layers_prune_to_the_target_during_fit(tmp_path):
    model = text_model()
    before = weights_of(model)
    pruned = tfopt.prune_low_magnitude(model, tfopt.ConstantSparsity(0.5, 0, frequency=1))
    wrapped = {l.layer.name: l for l in tfopt.pruning.pruned_wrappers(pruned)}
    assert set(wrapped) == {"embed", "block", "head"}
    assert len(wrapped["block"].pruned_weights) == 6 and len(wrapped["embed"].pruned_weights) == 2
    x, y = text_data()
    fit_pruned(pruned, x, y, epochs=1)
    assert_each_at(pruned_tensors(pruned), 0.5)
    assert_same_weights(model, before)  # the model passed in is never modified

    stripped = tfopt.strip_pruning(pruned)
    assert not any(isinstance(l, tfopt.PruneLowMagnitude) for l in stripped._flatten_layers())
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-5)
    loaded = keras.saving.load_model(_save(stripped, tmp_path / "stripped.keras"), safe_mode=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), stripped.predict(x, verbose=0), atol=1e-6)


def _save(model, path):
    model.save(path)
    return str(path)


def test_a_pruned_composite_model_reloads_with_identical_masks_and_keeps_training(tmp_path):
    x, y = text_data()
    pruned = fit_pruned(tfopt.prune_low_magnitude(
        text_model(), tfopt.PolynomialDecay(0.0, 0.6, begin_step=0, end_step=8, frequency=2)), x, y, epochs=1)
    loaded = keras.saving.load_model(_save(pruned, tmp_path / "pruned.keras"), safe_mode=False)
    before = masks_of(pruned)
    after = masks_of(loaded)
    assert len(before) == len(after) == 9
    for (_, a), (_, b) in zip(sorted(before.items()), sorted(after.items())):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6)
    fit_pruned(loaded, x, y, epochs=1)  # resumes: the schedule reaches its final sparsity
    assert_each_at(pruned_tensors(loaded), 0.6)


def test_filters_match_weight_paths_inside_composite_layers():
    pruned = tfopt.prune_low_magnitude(text_model(), filters=r"query/kernel|key/kernel")
    (wrapper,) = tfopt.pruning.pruned_wrappers(pruned)
    assert wrapper.layer.name == "block"
    assert [v.path.split("/")[-2:] for v, _, _ in wrapper.pruned_weights] == [["query", "kernel"], ["key", "kernel"]]
    # A regex on the layer name still selects the whole layer.
    (whole,) = tfopt.pruning.pruned_wrappers(tfopt.prune_low_magnitude(text_model(), filters="^block$"))
    assert len(whole.pruned_weights) == 6


def test_a_composite_layer_with_its_own_weight_is_refused_with_the_paths():
    inputs = L.Input((4,))
    model = keras.Model(inputs, L.Dense(2)(ScaledBlock(name="scaled")(inputs)))
    before = weights_of(model)
    with pytest.raises(ValueError, match=r"'scaled' of type ScaledBlock \(weights scaled/scale\).*register_layer.*filters="):
        tfopt.prune_low_magnitude(model)
    with pytest.raises(ValueError, match=r"scaled/scale.*cluster"):
        tfopt.cluster_weights(model, 4)
    assert_same_weights(model, before)
    # Selecting the leaf kernel by its path prunes it and leaves the layer's own weight dense.
    (wrapper,) = [w for w in tfopt.pruning.pruned_wrappers(tfopt.prune_low_magnitude(model, filters="scaled/dense"))]
    assert [v.path.split("/")[-1] for v, _, _ in wrapper.pruned_weights] == ["kernel"]
    # Registered with `sublayers=True`, the row describes the layer's own weights and the walk goes on below.
    tfopt.register_layer(ScaledBlock, sublayers=True)
    try:
        wrappers = tfopt.pruning.pruned_wrappers(tfopt.prune_low_magnitude(model))
        assert sorted(len(w.pruned_weights) for w in wrappers) == [1, 1]
    finally:
        tfopt.registry.unregister_layer(ScaledBlock)


def test_a_layer_that_cannot_be_copied_is_named_with_the_cause():
    class Opaque(L.Layer):  # weights, and a constructor its config cannot call
        def __init__(self, table, **kwargs):
            super().__init__(**kwargs)
            self.table = table
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

        def get_config(self):
            return {"name": self.name}

    inputs = L.Input((3,))
    model = keras.Model(inputs, Opaque(table=object(), name="opaque")(inputs))
    before = weights_of(model)
    with pytest.raises(ValueError, match=r"(?s)cannot copy layer 'opaque' of type Opaque.*TypeError.*table.*get_config"):
        tfopt.prune_low_magnitude(model)
    assert_same_weights(model, before)


# -- Bidirectional, TimeDistributed -------------------------------------------------------------------


def test_bidirectional_and_time_distributed_prune_their_inner_kernels():
    inputs = L.Input((6, 4))
    x = L.Bidirectional(L.LSTM(8, return_sequences=True), name="bi")(inputs)
    x = L.TimeDistributed(L.Dense(5), name="td")(x)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))
    pruned = tfopt.prune_low_magnitude(model, tfopt.ConstantSparsity(0.5, 0, frequency=1))
    wrapped = {w.layer.name: len(w.pruned_weights) for w in tfopt.pruning.pruned_wrappers(pruned)}
    assert wrapped["bi"] == 4 and wrapped["td"] == 1
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(32, 6, 4)).astype("float32")
    fit_pruned(pruned, x_np, rng.integers(0, 2, 32), epochs=1)
    assert_each_at(pruned_tensors(pruned), 0.5)


# -- subclassed models --------------------------------------------------------------------------------


def test_subclassed_models_are_pruned_and_clustered_whole(tmp_path):
    model = SmallSubclassed(name="small")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5, 8)).astype("float32")
    model(x[:1])
    before = weights_of(model)
    pruned = tfopt.prune_low_magnitude(model, tfopt.ConstantSparsity(0.5, 0, frequency=1))
    pruned.compile("adam", "mse")
    pruned.fit(x, rng.normal(size=(32, 3)), epochs=1, callbacks=[tfopt_callbacks.UpdatePruningStep()], verbose=0)
    (wrapper,) = tfopt.pruning.pruned_wrappers(pruned)
    assert len(wrapper.pruned_weights) == 7  # 4 attention projections, 2 feed-forward, the head
    assert_each_at(pruned_tensors(pruned), 0.5)
    stripped = tfopt.strip_pruning(pruned)
    assert isinstance(stripped.layers[-1], SmallSubclassed)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-5)
    assert_same_weights(model, before)

    clustered = tfopt.cluster_weights(model, 4)
    final = tfopt.strip_clustering(clustered)
    assert max(r["distinct"] for r in tfopt.clustering_report(final).rows) <= 4
    with pytest.raises(ValueError, match="call the model once on a batch"):
        tfopt.prune_low_magnitude(SmallSubclassed())


# -- keras-hub backbones, built from config (no preset is downloaded) --------------------------------


def bert_classifier():
    keras_hub = pytest.importorskip("keras_hub", reason="keras-hub is in the test extra: pip install -e '.[test]'")
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=64, intermediate_dim=128, max_sequence_length=16
    )
    inputs = {k: L.Input((16,), dtype="int32", name=k) for k in ("token_ids", "segment_ids", "padding_mask")}
    return keras.Model(inputs, L.Dense(2, name="classifier")(backbone(inputs)["pooled_output"]), name="bert_classifier")


def bert_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, 16), "int32")
    mask[:, 12:] = 0
    x = {"token_ids": rng.integers(0, 100, (n, 16)).astype("int32"), "segment_ids": np.zeros((n, 16), "int32"),
         "padding_mask": mask}
    return x, rng.integers(0, 2, n)


def vit_classifier():
    keras_hub = pytest.importorskip("keras_hub", reason="keras-hub is in the test extra: pip install -e '.[test]'")
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128
    )
    inputs = L.Input((32, 32, 3), name="images")
    features = backbone(inputs)[:, 0]
    return keras.Model(inputs, L.Dense(2, name="classifier")(features), name="vit_classifier")


def big_kernels(model):
    return {k: v for k, v in pruned_tensors(model).items() if v.size >= 1000}


@pytest.mark.slow
@pytest.mark.parametrize("build", ["bert", "vit"])
def test_keras_hub_backbones_prune_to_50_percent_with_polynomial_decay(build, tmp_path):
    if build == "bert":
        model, (x, y) = bert_classifier(), bert_data()
    else:
        model = vit_classifier()
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(64, 32, 32, 3)).astype("float32"), rng.integers(0, 2, 64)
    pruned = tfopt.prune_low_magnitude(model, tfopt.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=6, frequency=2))
    fit_pruned(pruned, x, y, epochs=2)
    kernels = big_kernels(pruned)
    assert len(kernels) == 14  # BERT: 2 embeddings + 2 x 6 encoder kernels; ViT: patch conv, position, 2 x 6
    assert_each_at(kernels, 0.5, tol_points=1.0)
    reloaded = keras.saving.load_model(_save(pruned, tmp_path / f"{build}_pruned.keras"))
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), pruned.predict(x, verbose=0))
    stripped = tfopt.strip_pruning(pruned)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-5)
    if build == "bert":  # keras-hub's ViT patch embedding cannot be saved outside its backbone (its config)
        reloaded = keras.saving.load_model(_save(stripped, tmp_path / f"{build}.keras"))
        np.testing.assert_array_equal(reloaded.predict(x, verbose=0), stripped.predict(x, verbose=0))
    zeros = [float(np.mean(ops.convert_to_numpy(v) == 0)) for v in stripped.weights if v.path.endswith("kernel")
             and math.prod(v.shape) >= 1000]
    assert zeros and min(zeros) >= 0.49


@pytest.mark.slow
def test_keras_hub_bert_clusters_its_leaf_kernels():
    final = tfopt.strip_clustering(tfopt.cluster_weights(bert_classifier(), 8))
    distinct = [len(np.unique(ops.convert_to_numpy(v))) for v in final.weights
                if v.path.endswith("kernel") and math.prod(v.shape) >= 1000]
    assert len(distinct) >= 12 and max(distinct) <= 8


def test_keras_hub_position_embeddings_stay_dense_unless_selected():
    model = bert_classifier()
    default = {w.layer.name for w in tfopt.pruning.pruned_wrappers(tfopt.prune_low_magnitude(model))}
    assert "position_embedding" not in default and "transformer_layer_0" in default
    chosen = {w.layer.name for w in tfopt.pruning.pruned_wrappers(
        tfopt.prune_low_magnitude(model, filters="position_embedding"))}
    assert chosen == {"position_embedding"}


MIRRORED = """
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, tfopt
from tfopt import callbacks
from test_composite import text_model, text_data, pruned_tensors, assert_each_at
keras.utils.set_random_seed(0)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    pruned = tfopt.prune_low_magnitude(text_model(), tfopt.ConstantSparsity(0.5, 0, frequency=1))
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
x, y = text_data()
pruned.fit(x, y, epochs=1, batch_size=16, callbacks=[callbacks.UpdatePruningStep()], verbose=0)
assert_each_at(pruned_tensors(pruned), 0.5)
for w in tfopt.pruning.pruned_wrappers(pruned):
    for v, m, _ in w.pruned_weights:
        a, b = (np.asarray(r) for r in v.value.values) if hasattr(v.value, "values") else (None, None)
        if a is not None:
            assert np.array_equal(a, b), v.path
print("ok", len(pruned_tensors(pruned)))
"""


@pytest.mark.slow
def test_pruning_composite_layers_under_mirrored_strategy():
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", MIRRORED, here], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["ok", "9"]


@pytest.fixture(autouse=True)
def _no_leak(tmp_path):
    yield
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
