"""tfopt.clustering: centroid inits, the wrapper, strip, sparsity, save/load, export, errors, cluster-preserving QAT."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import tfopt
import tfopt.callbacks
from conftest import compile_for_test, image_data, tiny_cnn
from helpers import assert_config_roundtrip, assert_save_load, assert_same_weights, weights_of
from tfopt import clustering as cl

# The backend matrix (`make test-backends`) runs this module under JAX and PyTorch too, except the
# `tensorflow_only` tests (tf.GradientTape references, TFLite conversion).
pytestmark = pytest.mark.backend_independent

L = keras.layers


def distinct(array):
    return int(np.unique(np.asarray(array)).size)


def kernels_of(model):
    """{layer name: kernel} of the registry's prunable weights of a plain model."""
    out = {}
    for layer in model._flatten_layers(include_self=False):
        spec = tfopt.registry.lookup(layer)
        if spec and spec.prunable and layer.built:
            for path in spec.prunable:
                out[f"{layer.name}/{path}"] = np.asarray(ops.convert_to_numpy(tfopt.registry.weight_at(layer, path)))
    return out


def fit(model, x, y, epochs=1, callbacks=()):
    compile_for_test(model)
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=list(callbacks))
    return model


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12,), name="features")
    x = L.Dense(24, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, L.Dense(4, name="logits")(x), name="mlp")


def mlp_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype("float32")
    return x, (x[:, :4].argmax(-1)).astype("int32")


# ----- centroid initializations: formulas ---------------------------------------------


def test_linear_centroids_formula():
    x = np.array([3.0, -1.0, 0.5, 7.0])
    np.testing.assert_allclose(cl.linear_centroids(x, 5), [-1.0 + j * 8.0 / 4 for j in range(5)])


def test_density_based_centroids_are_bin_midpoint_quantiles():
    x = np.arange(8.0)[::-1]  # order must not matter
    # numpy's linear quantile of 0..7 at q is 7 * q.
    np.testing.assert_allclose(cl.density_based_centroids(x, 4), [7 * (j + 0.5) / 4 for j in range(4)])
    skewed = np.concatenate([np.zeros(90), np.linspace(1, 2, 10)])
    c = cl.density_based_centroids(skewed, 10)
    assert np.sum(c == 0) == 9, c  # 90% of the mass at 0 -> 9 of 10 centroids there


def test_random_centroids_are_seeded_sorted_and_in_range():
    x = np.random.default_rng(3).normal(size=500)
    a, b, c = cl.random_centroids(x, 16, seed=1), cl.random_centroids(x, 16, seed=1), cl.random_centroids(x, 16, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.diff(a) >= 0) and a.min() >= x.min() and a.max() <= x.max()


def test_kmeans_plus_plus_follows_the_d2_rule():
    # x = [0, 1, 3], k = 2: the first centroid is uniform, the second drawn with p ~ D^2:
    # first 0 -> D^2 = (0, 1, 9); first 1 -> (1, 0, 4); first 3 -> (9, 4, 0).
    x = np.array([0.0, 1.0, 3.0])
    expected = {(0.0, 1.0): (1 / 10 + 1 / 5) / 3, (0.0, 3.0): (9 / 10 + 9 / 13) / 3, (1.0, 3.0): (4 / 5 + 4 / 13) / 3}
    pairs = [tuple(float(c) for c in cl.kmeans_plus_plus_centroids(x, 2, seed=s)) for s in range(3000)]
    freq = {p: pairs.count(p) / len(pairs) for p in set(pairs)}
    assert set(freq) == set(expected)
    for pair, p in expected.items():
        assert abs(freq[pair] - p) < 0.03, (pair, freq[pair], p)  # 3 sigma of 3000 draws is < 0.03


def test_kmeans_plus_plus_finds_separated_groups_and_handles_few_values():
    rng = np.random.default_rng(0)
    groups = np.concatenate([g + 0.01 * rng.normal(size=50) for g in (-3.0, -1.0, 2.0, 5.0)])
    c = cl.kmeans_plus_plus_centroids(groups, 4, seed=0)
    np.testing.assert_allclose(c, [-3.0, -1.0, 2.0, 5.0], atol=0.05)
    assert set(c) <= set(groups)
    few = cl.kmeans_plus_plus_centroids([1.0, 1.0, 2.0], 5, seed=0)
    assert set(few) == {1.0, 2.0} and few.size == 5


def test_nearest_centroid_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 7))
    c = np.sort(rng.normal(size=9))
    np.testing.assert_array_equal(cl.nearest_centroid(x, c), np.abs(x[..., None] - c).argmin(-1))


def test_cluster_tensor_pins_a_zero_cluster_only_when_asked():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(30, 20))
    w[rng.random(w.shape) < 0.5] = 0.0
    c, m, idx = cl.cluster_tensor(w, 8, "linear", preserve_sparsity=True)
    clustered = (c * m)[idx]
    assert m[0] == 0 and m[1:].all()
    np.testing.assert_array_equal(clustered == 0, w == 0)  # zeros stay, nonzeros stay nonzero
    np.testing.assert_allclose(c[1:], np.linspace(w[w != 0].min(), w[w != 0].max(), 7))
    assert distinct(clustered) <= 8
    c2, m2, idx2 = cl.cluster_tensor(w, 8, "linear", preserve_sparsity=False)
    assert m2.all()
    np.testing.assert_allclose(c2, np.linspace(w.min(), w.max(), 8))
    assert np.sum((c2 * m2)[idx2] == 0) == 0  # no centroid sits at 0: the zeros are gone


# ----- the wrapper --------------------------------------------------------------------


def test_cluster_weights_wraps_kernels_and_leaves_the_model_untouched(cnn, data):
    x, y = data
    before = weights_of(cnn)
    clustered = cl.cluster_weights(cnn, 8)
    wrapped = {l.layer.name for l in clustered.layers if isinstance(l, cl.ClusterWeights)}
    assert wrapped == {"conv_a", "conv_b", "logits"}
    trainable = sorted(w.path for w in clustered.trainable_weights)
    assert trainable == sorted(
        ["cluster_conv_a/kernel_centroids", "cluster_conv_b/kernel_centroids", "cluster_logits/kernel_centroids",
         "bn_a/gamma", "bn_a/beta", "conv_b/bias", "logits/bias"]
    )
    fit(clustered, x, y, epochs=1)
    assert_same_weights(cnn, before)
    assert all(isinstance(l, (L.Layer,)) and not isinstance(l, cl.ClusterWeights) for l in cnn.layers)


@pytest.mark.parametrize("init", ["kmeans++", "density-based", "linear", "random"])
def test_each_init_sets_centroids_from_the_kernel(cnn, init):
    clustered = cl.cluster_weights(cnn, 6, cluster_centroids_init=init)
    for wrapper in (l for l in clustered.layers if isinstance(l, cl.ClusterWeights)):
        (w, centroids, mask, indices), = wrapper.clustered_variables
        kernel = ops.convert_to_numpy(w)
        ref_c, ref_m, ref_idx = cl.cluster_tensor(kernel, 6, init, True, seed=0)
        np.testing.assert_allclose(ops.convert_to_numpy(centroids), ref_c.astype(np.float32))
        np.testing.assert_array_equal(ops.convert_to_numpy(indices), ref_idx)
        value = ops.convert_to_numpy(wrapper.clustered_weights()[0][1])
        assert distinct(value) <= 6
        # the nearest-centroid assignment minimizes each weight's error
        assert np.all(np.abs(value - kernel) <= np.abs(kernel[..., None] - ref_c).min(-1) + 1e-6)


def test_training_moves_only_centroids_and_keeps_k_values(cnn, data):
    x, y = data
    clustered = cl.cluster_weights(cnn, 8)
    wrappers = [l for l in clustered.layers if isinstance(l, cl.ClusterWeights)]
    c0 = [ops.convert_to_numpy(c).copy() for w in wrappers for _, c, _, _ in w.clustered_variables]
    idx0 = [ops.convert_to_numpy(i).copy() for w in wrappers for _, _, _, i in w.clustered_variables]
    k0 = [ops.convert_to_numpy(v).copy() for w in wrappers for v, _, _, _ in w.clustered_variables]
    fit(clustered, x, y, epochs=2)
    c1 = [ops.convert_to_numpy(c) for w in wrappers for _, c, _, _ in w.clustered_variables]
    assert all(not np.allclose(a, b) for a, b in zip(c0, c1))
    for w, (i, idx) in zip(wrappers, enumerate(idx0)):
        (kernel, _, _, indices), = w.clustered_variables
        np.testing.assert_array_equal(ops.convert_to_numpy(indices), idx)  # assignments are fixed
        np.testing.assert_array_equal(ops.convert_to_numpy(kernel), k0[i])  # the inner kernel is never written
    report = cl.clustering_report(clustered)
    assert report.max_distinct <= 8 and len(report.rows) == 3


@pytest.mark.tensorflow_only
def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    model = mlp()
    x, y = mlp_data(16)
    clustered = cl.cluster_weights(model, 5, filters="hidden")
    wrapper = clustered.get_layer("cluster_hidden")
    (_, centroids, _, indices), = wrapper.clustered_variables
    plain = cl.strip_clustering(clustered)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, clustered(x))
    grad_c = tape.gradient(loss, centroids.value)
    kernel = plain.get_layer("hidden").kernel
    with tf.GradientTape() as tape:
        loss_plain = loss_fn(y, plain(x))
    grad_w = ops.convert_to_numpy(tape.gradient(loss_plain, kernel.value))
    expected = np.bincount(ops.convert_to_numpy(indices).ravel(), weights=grad_w.ravel(), minlength=5)
    np.testing.assert_allclose(ops.convert_to_numpy(grad_c), expected, rtol=1e-4, atol=1e-7)


def test_strip_gives_a_plain_model_with_the_clustered_kernels(cnn, data):
    x, y = data
    clustered = fit(cl.cluster_weights(cnn, 8), x, y)
    stripped = cl.strip_clustering(clustered)
    assert not any(isinstance(l, cl.ClusterWeights) for l in stripped._flatten_layers())
    np.testing.assert_allclose(stripped.predict(x, verbose=0), clustered.predict(x, verbose=0), atol=1e-5)
    for wrapper in (l for l in clustered.layers if isinstance(l, cl.ClusterWeights)):
        (_, c, m, idx), = wrapper.clustered_variables
        expected = (ops.convert_to_numpy(c) * ops.convert_to_numpy(m))[ops.convert_to_numpy(idx)]
        np.testing.assert_array_equal(kernels_of(stripped)[f"{wrapper.layer.name}/kernel"], expected)
    assert all(w.trainable for w in stripped.get_layer("logits").weights)
    report = cl.clustering_report(stripped)
    assert [r["distinct"] <= 8 for r in report.rows] == [True] * 3 and "distinct values" in str(report)


def test_preserve_sparsity_after_pruning():
    model = mlp()
    x, y = mlp_data()
    pruned = tfopt.prune_low_magnitude(model, tfopt.ConstantSparsity(0.6, 0, frequency=1))
    fit(pruned, x, y, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    sparse = tfopt.strip_pruning(pruned)
    zeros = {k: v == 0 for k, v in kernels_of(sparse).items()}
    kept = fit(cl.cluster_weights(sparse, 8, preserve_sparsity=True), x, y, epochs=2)
    for name, kernel in kernels_of(cl.strip_clustering(kept)).items():
        np.testing.assert_array_equal(kernel == 0, zeros[name])
        assert distinct(kernel) <= 8
    lost = fit(cl.cluster_weights(sparse, 8, preserve_sparsity=False), x, y, epochs=2)
    assert not all(np.array_equal(k == 0, zeros[n]) for n, k in kernels_of(cl.strip_clustering(lost)).items())


def test_refuses_a_model_that_is_still_pruned():
    pruned = tfopt.prune_low_magnitude(mlp())
    with pytest.raises(ValueError, match=r"strip_pruning\(model\)` first"):
        cl.cluster_weights(pruned, 8)


LAYERS = [
    ("dense", lambda: L.Dense(8), (6,), "float32"),
    ("conv1d", lambda: L.Conv1D(6, 3), (10, 4), "float32"),
    ("conv2d_transpose", lambda: L.Conv2DTranspose(4, 3), (5, 5, 4), "float32"),
    ("separable_conv2d", lambda: L.SeparableConv2D(8, 3), (6, 6, 4), "float32"),
    ("embedding", lambda: L.Embedding(30, 8), (5,), "int32"),
    ("lstm", lambda: L.LSTM(6), (5, 4), "float32"),
    ("multi_head_attention", lambda: L.MultiHeadAttention(2, 4), (5, 8), "float32"),
]


@pytest.mark.parametrize("make,shape,dtype", [l[1:] for l in LAYERS], ids=[l[0] for l in LAYERS])
def test_each_supported_layer_is_clustered(make, shape, dtype):
    layer = make()
    inputs = keras.Input(shape, dtype=dtype)
    h = layer(inputs, inputs) if isinstance(layer, L.MultiHeadAttention) else layer(inputs)
    model = keras.Model(inputs, L.Dense(2, name="head")(L.Flatten()(h)))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, (16, *shape)).astype(dtype) if dtype == "int32" else rng.random((16, *shape), np.float32)
    y = rng.integers(0, 2, 16)
    clustered = fit(cl.cluster_weights(model, 4, filters=lambda l: l.name != "head"), x, y)
    stripped = cl.strip_clustering(clustered)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), clustered.predict(x, verbose=0), atol=1e-5)
    spec = tfopt.registry.lookup(layer)
    for path in spec.prunable:
        assert distinct(ops.convert_to_numpy(tfopt.registry.weight_at(stripped.get_layer(layer.name), path))) <= 4


def test_filters_select_layers_and_depthwise_is_opt_in():
    inputs = keras.Input((6, 6, 3))
    x = L.DepthwiseConv2D(3, name="dw")(inputs)
    x = L.Conv2D(4, 1, name="pw")(x)
    model = keras.Model(inputs, L.Dense(2, name="head")(L.Flatten()(x)))
    default = {l.layer.name for l in cl.cluster_weights(model, 4).layers if isinstance(l, cl.ClusterWeights)}
    assert default == {"pw", "head"}
    chosen = {l.layer.name for l in cl.cluster_weights(model, 4, filters=["^dw$", "head"]).layers
              if isinstance(l, cl.ClusterWeights)}
    assert chosen == {"dw", "head"}


def test_single_layer_and_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.body = cl.cluster_weights(L.Dense(8, activation="relu"), 4)
            self.head = L.Dense(4)

        def call(self, x):
            return self.head(self.body(x))

    net = Net()
    x, y = mlp_data(32)
    fit(net, x, y)
    assert isinstance(net.body, cl.ClusterWeights)
    assert distinct(ops.convert_to_numpy(net.body.clustered_weights()[0][1])) <= 4
    built = L.Dense(3)
    built.build((None, 5))
    before = ops.convert_to_numpy(built.kernel).copy()
    wrapper = cl.cluster_weights(built, 2)
    assert wrapper.built and wrapper.layer is not built
    np.testing.assert_array_equal(ops.convert_to_numpy(built.kernel), before)
    plain = cl.strip_clustering(wrapper)
    assert isinstance(plain, L.Dense) and distinct(ops.convert_to_numpy(plain.kernel)) <= 2


def test_op_nodes_and_nested_models_are_rebuilt():
    inner = keras.Sequential([keras.Input((12,)), L.Dense(10, name="inner")], name="block")
    inputs = keras.Input((12,))
    h = inner(inputs) * 2.0 + 1.0
    model = keras.Model(inputs, L.Dense(3, name="head")(h))
    x, _ = mlp_data(8)
    clustered = cl.cluster_weights(model, 4)
    assert isinstance(clustered.get_layer("block").get_layer("cluster_inner"), cl.ClusterWeights)
    stripped = cl.strip_clustering(clustered)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), clustered.predict(x, verbose=0), atol=1e-5)
    assert cl.clustering_report(stripped).max_distinct <= 4


def test_clusterable_layer_protocol():
    @keras.saving.register_keras_serializable(package="tfopt_tests")
    class Scale(L.Layer):
        def build(self, shape):
            self.kernel = self.add_weight(shape=shape[-1:], name="kernel")

        def call(self, x):
            return x * self.kernel

        def get_clusterable_weights(self):
            return [("kernel", self.kernel)]

    inputs = keras.Input((10,))
    model = keras.Model(inputs, L.Dense(2, name="head")(Scale(name="scale")(inputs)))
    clustered = cl.cluster_weights(model, 3)
    assert isinstance(clustered.get_layer("cluster_scale"), cl.ClusterWeights)


# ----- serialization ------------------------------------------------------------------


def test_config_roundtrip():
    wrapper = cl.ClusterWeights(L.Dense(4), 12, "density_based", preserve_sparsity=False, weight_positions=[0])
    clone = assert_config_roundtrip(wrapper)
    options = (clone.number_of_clusters, clone.cluster_centroids_init, clone.preserve_sparsity, clone.weight_positions)
    assert options == (12, "density-based", False, (0,))
    assert cl.ClusterWeights(L.Dense(4), 4, "CentroidInitialization.KMEANS_PLUS_PLUS").cluster_centroids_init == "kmeans++"


def test_variables_file_layout_output_shape_and_reclustering():
    wrapper = cl.ClusterWeights(L.Dense(3, name="d"), 4, cluster_centroids_init="linear")
    wrapper.build((None, 5))
    (kernel, c, m, idx), = wrapper.clustered_variables
    assert [v.name for v in (c, m, idx)] == ["kernel_centroids", "kernel_centroid_mask", "kernel_indices"]
    # The .keras layout, by position: Keras stores trainable variables first (the inner kernel is stored by the
    # inner layer, once).
    store = {}
    wrapper.save_own_variables(store)
    assert [id(store[str(i)]) for i in range(len(store))] == [id(c), id(m), id(idx)]
    assert tuple(wrapper.compute_output_shape((None, 5))) == (None, 3)
    new_kernel = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    kernel.assign(new_kernel)
    wrapper.init_clusters_from_weights(seed=0)
    ref_c, ref_m, ref_idx = cl.cluster_tensor(new_kernel, 4, "linear")
    np.testing.assert_allclose(ops.convert_to_numpy(c), ref_c.astype("float32"))
    np.testing.assert_array_equal(ops.convert_to_numpy(idx), ref_idx)


def test_report_table_and_dict():
    rows = [dict(name="hidden", type="Dense", weights=1200, distinct=4, zeros=3, clustered=True),
            dict(name="logits", type="Dense", weights=40, distinct=12, zeros=0, clustered=False)]
    report = cl.ClusteringReport(rows)
    assert report.to_dict() == {"layers": rows, "weights": 1240, "zeros": 3, "max_distinct": 12}
    assert str(report) == "\n".join([
        "layer   type   weights  distinct values  zeros",
        "------  -----  -------  ---------------  -----",
        "hidden  Dense    1,200                4      3",
        "logits  Dense       40               12      0",
        "------  -----  -------  ---------------  -----",
        "total            1,240           max 12      3",
    ])


def test_save_load_and_keep_training(cnn, data, tmp_path):
    x, y = data
    clustered = fit(cl.cluster_weights(cnn, 8), x, y)
    loaded = assert_save_load(clustered, x, tmp_path / "clustered.keras")
    for a, b in zip(clustered.weights, loaded.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    fit(loaded, x, y)
    assert cl.clustering_report(loaded).max_distinct <= 8
    np.testing.assert_array_equal(
        ops.convert_to_numpy(loaded.get_layer("cluster_logits").clustered_variables[0][3]),
        ops.convert_to_numpy(clustered.get_layer("cluster_logits").clustered_variables[0][3]),
    )


def test_stateless_call_reads_the_enclosing_values():
    """Inside `stateless_call` (the JAX training path) the inner layer must see the mapped bias."""
    model = cl.cluster_weights(mlp(), 4)
    x, _ = mlp_data(8)
    trainable = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    bumped = [v + 1.0 if "bias" in p.path else v for v, p in zip(trainable, model.trainable_variables)]
    non_trainable = [ops.convert_to_numpy(v) for v in model.non_trainable_variables]
    out, _ = model.stateless_call(bumped, non_trainable, x)
    plain = cl.strip_clustering(model)
    for layer in plain.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(layer.bias + 1.0)
    np.testing.assert_allclose(ops.convert_to_numpy(out), plain.predict(x, verbose=0), atol=1e-5)


# ----- export -----------------------------------------------------------------------------


def _fc_int8_weights(content):
    from tfopt.tflite_export import _flatbuffer

    fm = _flatbuffer.parse(content)
    sg = fm.subgraphs[0]
    return [fm.tensor_value(sg.tensors[op.inputs[1]]) for op in sg.operators if op.name == "FULLY_CONNECTED"]


@pytest.mark.slow
def test_int8_and_float_export_of_a_stripped_model(cnn, data):
    x, y = data
    clustered = fit(cl.cluster_weights(cnn, 8), x, y)
    stripped = cl.strip_clustering(clustered)
    int8 = tfopt.tflite_export.convert(stripped, target="mobile", mode="int8", representative_data=x[:50])
    assert int8.report.is_fully_int8
    assert tfopt.tflite_export.compare(stripped, int8, x[:32]).top1_agreement >= 0.9
    f32 = tfopt.tflite_export.convert(stripped, target="mobile", mode="float32")
    (logits,) = _fc_int8_weights(f32.content)  # the float FULLY_CONNECTED weights
    assert logits.dtype == np.float32 and distinct(logits) <= 8
    np.testing.assert_allclose(f32.predict(x[:8]), stripped.predict(x[:8], verbose=0), atol=1e-4)


# ----- errors: clear message, model untouched -------------------------------------------------


@keras.saving.register_keras_serializable(package="tfopt_tests")
class Unknown(L.Layer):
    def build(self, shape):
        self.w = self.add_weight(shape=shape[-1:], name="w")

    def call(self, x):
        return x * self.w


BAD = [
    ("one_cluster", dict(number_of_clusters=1), ValueError, r"number_of_clusters` must be an integer >= 2.*16.*Received: number_of_clusters=1"),
    ("zero_clusters", dict(number_of_clusters=0), ValueError, r"Received: number_of_clusters=0"),
    ("float_clusters", dict(number_of_clusters=2.5), TypeError, r"must be an integer.*Received: number_of_clusters=2.5"),
    ("bool_clusters", dict(number_of_clusters=True), TypeError, r"Received: number_of_clusters=True"),
    ("bad_init", dict(cluster_centroids_init="kmeans"), ValueError, r"one of \('linear'.*Received: cluster_centroids_init='kmeans'"),
    ("bad_sparsity", dict(preserve_sparsity="yes"), TypeError, r"Received: preserve_sparsity='yes'"),
    ("bad_filters", dict(filters=3), TypeError, r"Received: filters=3"),
    ("empty_filters", dict(filters="nothing"), ValueError, r"among those `filters` selects.*Received: filters='nothing'"),
]


@pytest.mark.parametrize("kwargs,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_raise_and_leave_the_model_untouched(cnn, kwargs, exc, match):
    before = weights_of(cnn)
    args = dict(number_of_clusters=8, **kwargs) if "number_of_clusters" not in kwargs else kwargs
    with pytest.raises(exc, match=match):
        cl.cluster_weights(cnn, **args)
    assert_same_weights(cnn, before)
    assert not any(isinstance(l, cl.ClusterWeights) for l in cnn._flatten_layers())


def test_model_errors():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Dense(2)(Unknown(name="mystery")(inputs)))
    with pytest.raises(ValueError, match=r"'mystery' of type Unknown.*register_layer\(Unknown"):
        cl.cluster_weights(model, 4)
    assert isinstance(cl.cluster_weights(model, 4, filters=lambda l: not isinstance(l, Unknown)), keras.Model)
    with pytest.raises(ValueError, match="already wrapped for clustering"):
        cl.cluster_weights(cl.cluster_weights(mlp(), 4), 4)
    with pytest.raises(ValueError, match="needs a built model"):
        cl.cluster_weights(keras.Sequential([L.Dense(2)]), 4)
    with pytest.raises(TypeError, match=r"Received: model_or_layer='model'"):
        cl.cluster_weights("model", 4)
    with pytest.raises(ValueError, match=r"'bn' of type BatchNormalization has no weights tfopt clusters"):
        cl.cluster_weights(L.BatchNormalization(name="bn"), 4)
    with pytest.raises(ValueError, match="already wrapped"):
        cl.ClusterWeights(cl.ClusterWeights(L.Dense(2), 4), 4)


def test_non_finite_weights_are_refused():
    model = mlp()
    kernel = model.get_layer("hidden").kernel
    kernel.assign(np.where(np.arange(kernel.shape[1]) == 0, np.nan, ops.convert_to_numpy(kernel)))
    with pytest.raises(ValueError, match="NaN or inf"):
        cl.cluster_weights(model, 4)


def test_non_finite_weights_of_a_subclassed_model_are_refused_before_copying():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = L.Dense(8)

        def call(self, x):
            return self.hidden(x)

    net = Net()
    net(np.zeros((1, 5), "float32"))
    net.hidden.kernel.assign(np.full((5, 8), np.nan, "float32"))
    with pytest.raises(ValueError, match="These weights hold NaN or inf values"):
        cl.cluster_weights(net, 4)


# ----- cluster-preserving QAT through quantize_model (conv kernels too) ---------------------


def cqat_cnn(seed=0):
    """Conv2D+BN+ReLU, DepthwiseConv2D+BN+ReLU, Flatten, Dense: the three kernel kinds of CQAT."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="bn_dw")(x)
    x = L.ReLU(name="relu_dw")(x)
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inputs, L.Dense(4, name="logits")(x), name="cqat_cnn")


def cqat_data(n=128, seed=0):
    """A learnable task: the label is the brightest quadrant of channel 0."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 3), dtype=np.float32)
    quadrants = np.stack([x[:, :4, :4, 0], x[:, :4, 4:, 0], x[:, 4:, :4, 0], x[:, 4:, 4:, 0]], 1).mean((2, 3))
    return x, quadrants.argmax(-1).astype("int32")


CQAT_LAYERS = ["^conv$", "^dw$", "^logits$"]


def _clustered_cqat_model(k, x, y):
    model = fit(cqat_cnn(), x, y, epochs=3)
    return fit(cl.cluster_weights(model, k, filters=CQAT_LAYERS), x, y)


def _int8_kernels(content):
    """{op name: int8 weight tensor} of every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED in the file."""
    from tfopt.tflite_export import _flatbuffer

    fm = _flatbuffer.parse(content)
    sg = fm.subgraphs[0]
    ops_ = [op for op in sg.operators if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    return {op.name: fm.tensor_value(sg.tensors[op.inputs[1]]) for op in ops_}


def _wrappers_of(qat_model, kernels_only=True):
    """{inner layer name: QuantizeWrapper} of the kernel layers (Conv, DepthwiseConv, Dense) of a QAT model."""
    kinds = (L.Conv2D, L.DepthwiseConv2D, L.Dense) if kernels_only else (L.Layer,)
    return {l.layer.name: l for l in qat_model.layers if isinstance(l, tfopt.QuantizeWrapper) and isinstance(l.layer, kinds)}


def clustered_kernel(wrapper):
    """The kernel a cluster-preserving QuantizeWrapper computes with, from its public `clustered_variables`."""
    c, m, idx = (ops.convert_to_numpy(v) for v in wrapper.clustered_variables["kernel"])
    return (c * m)[idx]


@pytest.mark.slow
@pytest.mark.parametrize("k", [8, 16], ids=["k8", "k16"])
def test_cqat_exported_kernels_keep_k_int8_values(k):
    """Conv2D+BN, DepthwiseConv2D+BN and Dense: <= k int8 values per kernel in the .tflite (plain QAT: many more)."""
    x, y = cqat_data()
    clustered = _clustered_cqat_model(k, x, y)
    clustered_acc = float(np.mean(clustered.predict(x, verbose=0).argmax(-1) == y))
    counts = {}
    for preserve in (None, False):
        keras.utils.set_random_seed(0)
        qat = tfopt.quantize_model(clustered, preserve_clusters=preserve)
        fit(qat, x, y, epochs=2)
        assert np.isfinite(qat.history.history["loss"][-1])
        tfl = tfopt.tflite_export.convert(qat, target="mobile", mode="int8")
        assert tfl.report.is_fully_int8
        kernels = _int8_kernels(tfl.content)
        assert set(kernels) == {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
        assert all(v.dtype == np.int8 for v in kernels.values())
        counts[preserve] = {name: distinct(v) for name, v in kernels.items()}
        if preserve is None:
            # The runtime computes what the Keras QAT model computes, to within one output step.
            c = tfopt.tflite_export.compare(qat, tfl.content, x[:32])
            assert c.p99_error_steps <= 1.0 + 1e-6 and c.top1_agreement >= 0.95, c
            # Accuracy sanity: cluster-preserving QAT keeps the clustered model's accuracy (training set,
            # a learnable task; chance is 0.25).
            int8_acc = float(tfl.evaluate(x, y))
            assert int8_acc >= max(0.5, clustered_acc - 0.15), (int8_acc, clustered_acc)
    assert all(n <= k for n in counts[None].values()), counts
    # Without it the per-channel scales (and free training) spread each kernel over many more codes.
    assert counts[False]["CONV_2D"] > k and counts[False]["DEPTHWISE_CONV_2D"] > k, counts


def test_cqat_trains_only_the_centroids_with_fixed_indices():
    x, y = cqat_data(64)
    clustered = cl.cluster_weights(cqat_cnn(), 8, filters=CQAT_LAYERS)
    qat = tfopt.quantize_model(clustered)
    wrappers = _wrappers_of(qat)
    trainable = sorted(w.path for w in qat.trainable_weights)
    assert trainable == sorted(
        ["quant_conv/kernel_centroids", "quant_dw/kernel_centroids", "quant_logits/kernel_centroids",
         "bn/gamma", "bn/beta", "bn_dw/gamma", "bn_dw/beta", "logits/bias"]
    )
    # The QAT wrappers start from the clustering's own centroids, masks and indices.
    for name in ("conv", "dw", "logits"):
        (_, c, m, idx), = clustered.get_layer(f"cluster_{name}").clustered_variables
        qc, qm, qidx = wrappers[name].clustered_variables["kernel"]
        for a, b in ((c, qc), (m, qm), (idx, qidx)):
            np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    before = {n: [ops.convert_to_numpy(v).copy() for v in w.clustered_variables["kernel"]] for n, w in wrappers.items()}
    kernels = {n: ops.convert_to_numpy(w.layer.kernel).copy() for n, w in wrappers.items()}
    fit(qat, x, y)
    for name, w in wrappers.items():
        c, _, idx = (ops.convert_to_numpy(v) for v in w.clustered_variables["kernel"])
        assert not np.allclose(c, before[name][0]), name  # the centroids moved
        np.testing.assert_array_equal(idx, before[name][2])  # the assignment did not
        np.testing.assert_array_equal(ops.convert_to_numpy(w.layer.kernel), kernels[name])  # never written
        assert distinct(clustered_kernel(w)) <= 8


@pytest.mark.slow
def test_cqat_of_the_stripped_model_equals_cqat_of_the_wrapped_one():
    x, y = cqat_data(64)
    clustered = cl.cluster_weights(cqat_cnn(), 6, filters=CQAT_LAYERS)
    results = []
    for source, preserve in ((clustered, None), (cl.strip_clustering(clustered), 6)):
        keras.utils.set_random_seed(3)
        qat = fit(tfopt.quantize_model(source, preserve_clusters=preserve), x, y)
        assert {n for n, w in _wrappers_of(qat).items() if w.clustered_weights} == {"conv", "dw", "logits"}
        results.append(qat.predict(x, verbose=0))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)


@pytest.mark.parametrize("signs", ["positive", "mixed"])
def test_cqat_per_channel_ranges_share_one_code_grid(signs):
    """Every channel maps the shared values to the same codes, range_c = |f_c| * max|kernel| (mirrored where f_c < 0)."""
    x, _ = cqat_data(16)
    clustered = cl.cluster_weights(cqat_cnn(), 5, filters=CQAT_LAYERS)
    qat = tfopt.quantize_model(clustered)
    w = _wrappers_of(qat)["conv"]
    bn = w.batch_norm
    gamma = np.linspace(0.5, 2.0, 8).astype("float32")
    if signs == "mixed":
        gamma[::2] *= -1.0
    bn.gamma.assign(gamma)
    kernel = clustered_kernel(w)
    f = gamma / np.sqrt(ops.convert_to_numpy(bn.moving_variance) + bn.epsilon)
    m = np.abs(kernel).max()
    scale = np.abs(f) * m / 127.0
    codes = np.round(kernel * f / scale)
    np.testing.assert_array_equal(codes * np.sign(f), np.round(kernel * 127.0 / m))  # one grid, up to sign(f_c)
    assert all(distinct(codes[..., c]) <= 5 for c in range(8))
    assert distinct(codes) <= (5 if signs == "positive" else 10)
    # The wrapper computes conv(x, codes * scale_c) + offset.
    offset = ops.convert_to_numpy(bn.beta) - ops.convert_to_numpy(bn.moving_mean) * f
    expected = tf.nn.conv2d(x, (codes * scale).astype("float32"), 1, "SAME").numpy() + offset
    np.testing.assert_allclose(ops.convert_to_numpy(w(x, training=False)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.tensorflow_only
def test_default_qat_of_an_unclustered_or_stripped_model_is_unchanged(cnn, data):
    """No ClusterWeights and no `preserve_clusters`: the plain QAT path, identical to preserve_clusters=False."""
    x, y = data
    stripped = cl.strip_clustering(cl.cluster_weights(cnn, 8))  # kernels hold <= 8 values
    outs = []
    for preserve in (None, False):
        keras.utils.set_random_seed(5)
        qat = tfopt.quantize_model(stripped, preserve_clusters=preserve)
        assert not any(w.clustered_weights for w in _wrappers_of(qat, kernels_only=False).values())
        assert "conv_a/kernel" in [v.path for v in qat.trainable_weights]
        outs.append(fit(qat, x, y).predict(x, verbose=0))
    np.testing.assert_array_equal(outs[0], outs[1])
    # And the default math is the per-channel max|W_c * s_c| range (not the shared-grid one): a TF reference.
    qat = tfopt.quantize_model(cnn)
    w = _wrappers_of(qat)["conv_a"]
    bn = w.batch_norm
    bn.gamma.assign(np.linspace(-1.0, 2.0, 8).astype("float32"))
    s = bn.gamma / tf.sqrt(bn.moving_variance + bn.epsilon)
    folded = w.layer.kernel * s
    r = tf.reduce_max(tf.abs(folded), axis=(0, 1, 2))
    fq = tf.quantization.fake_quant_with_min_max_vars_per_channel(folded, -r, r, num_bits=8, narrow_range=True)
    expected = tf.nn.conv2d(x[:4], fq, 1, "SAME") + (bn.beta - bn.moving_mean * s)
    np.testing.assert_allclose(ops.convert_to_numpy(w(x[:4], training=False)), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_cqat_save_load_and_config_roundtrip(tmp_path):
    x, y = cqat_data(32)
    qat = tfopt.quantize_model(cl.cluster_weights(cqat_cnn(), 8, filters=CQAT_LAYERS))
    qat(x, training=True)  # ranges and BN statistics off their initial values
    loaded = assert_save_load(qat, x, tmp_path / "cqat.keras")
    for name, w in _wrappers_of(loaded).items():
        assert w.clustered_weights == ("kernel",) and w.number_of_clusters == 8
        for a, b in zip(w.clustered_variables["kernel"], _wrappers_of(qat)[name].clustered_variables["kernel"]):
            np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
        assert not w.layer.kernel.trainable
    assert sorted(v.path for v in loaded.trainable_weights) == sorted(v.path for v in qat.trainable_weights)
    fit(loaded, x, y)  # keeps training as a clustered model
    for w in _wrappers_of(loaded).values():
        assert distinct(clustered_kernel(w)) <= 8
    layer = L.Conv2D(4, 3)
    layer.build((None, 6, 6, 2))
    clone = assert_config_roundtrip(tfopt.QuantizeWrapper(layer, clustered_weights=("kernel",), number_of_clusters=4))
    assert clone.clustered_weights == ("kernel",) and clone.number_of_clusters == 4


def test_cqat_zero_cluster_stays_pinned():
    x, y = cqat_data(64)
    model = cqat_cnn()
    rng = np.random.default_rng(0)
    for name in ("conv", "logits"):  # a pruned model: half of each kernel exactly zero
        kernel = model.get_layer(name).kernel
        kernel.assign(np.where(rng.random(kernel.shape) < 0.5, 0.0, ops.convert_to_numpy(kernel)))
    clustered = cl.cluster_weights(model, 6, filters=["^conv$", "^logits$"])
    zeros = {n: ops.convert_to_numpy(model.get_layer(n).kernel) == 0 for n in ("conv", "logits")}
    qat = fit(tfopt.quantize_model(clustered), x, y)
    for name in ("conv", "logits"):
        value = clustered_kernel(_wrappers_of(qat)[name])
        np.testing.assert_array_equal(value == 0, zeros[name])
        assert distinct(value) <= 6


PRESERVE_BAD = [
    ("one", 1, ValueError, r"int >= 2.*Received: preserve_clusters=1"),
    ("string", "yes", ValueError, r"Received: preserve_clusters='yes'"),
    ("float", 8.0, ValueError, r"Received: preserve_clusters=8.0"),
]


@pytest.mark.parametrize("value,exc,match", [b[1:] for b in PRESERVE_BAD], ids=[b[0] for b in PRESERVE_BAD])
def test_preserve_clusters_bad_values(cnn, value, exc, match):
    with pytest.raises(exc, match=match):
        tfopt.quantize_model(cnn, preserve_clusters=value)


def test_preserve_clusters_errors(cnn):
    with pytest.raises(ValueError, match=r"needs a model with tfopt.ClusterWeights.*preserve_clusters=16.*Received: preserve_clusters=True"):
        tfopt.quantize_model(cnn, preserve_clusters=True)
    with pytest.raises(ValueError, match=r"found no quantized kernel .* at most 4 distinct.*Received: preserve_clusters=4"):
        tfopt.quantize_model(cnn, preserve_clusters=4)
    layer = L.Dense(3)
    with pytest.raises(ValueError, match=r"distinct quantized weights of layer .*Received: clustered_weights=\('bias',\)"):
        tfopt.QuantizeWrapper(layer, clustered_weights=("bias",), number_of_clusters=4)
    with pytest.raises(TypeError, match=r"integer >= 2.*Received: number_of_clusters=None"):
        tfopt.QuantizeWrapper(layer, clustered_weights=("kernel",))
