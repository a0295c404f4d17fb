"""tfopt.channel_pruning: channel groups, slicing, criteria, report, composition, export, errors.

The key correctness check: a pruned model must compute exactly what the
original computes once the removed channels are made exactly zero in it
(their filters, biases, depthwise kernels and BatchNormalization gamma/beta
zeroed), because a zero channel contributes nothing downstream.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops

import tfopt
from conftest import compile_for_test, image_data, tiny_cnn
from helpers import assert_same_weights, weights_of
from tfopt import _model_utils as mu
from tfopt.channel_pruning import ChannelPruningReport, channel_report, prune_channels

L = keras.layers


# ----- models ------------------------------------------------------------------------


def conv_chain():
    return tiny_cnn("conv_chain")


def residual():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    y = L.Conv2D(8, 3, padding="same", name="res_a")(x)
    y = L.BatchNormalization(name="res_a_bn")(y)
    y = L.ReLU(name="res_a_relu")(y)
    y = L.Conv2D(8, 3, padding="same", name="res_b")(y)
    y = L.BatchNormalization(name="res_b_bn")(y)
    x = L.Add(name="add")([x, y])
    x = L.ReLU(name="add_relu")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(4, name="logits")(x)
    return keras.Model(inputs, outputs, name="residual")


def concat():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(6, 3, padding="same", activation="relu", name="branch_a")(inputs)
    b = L.Conv2D(10, 1, activation="relu", name="branch_b")(inputs)
    x = L.Concatenate(name="cat")([a, b])
    x = L.Conv2D(8, 3, activation="relu", name="mix")(x)
    x = L.GlobalMaxPooling2D(name="gmp")(x)
    outputs = L.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="concat")


def depthwise(multiplier):
    def build():
        inputs = keras.Input((8, 8, 3))
        x = L.Conv2D(8, 1, use_bias=False, name="expand")(inputs)
        x = L.BatchNormalization(name="expand_bn")(x)
        x = L.ReLU(6.0, name="expand_relu")(x)
        x = L.ZeroPadding2D(1, name="pad")(x)
        x = L.DepthwiseConv2D(3, strides=2, depth_multiplier=multiplier, name="dw")(x)
        x = L.BatchNormalization(name="dw_bn")(x)
        x = L.ReLU(6.0, name="dw_relu")(x)
        x = L.Conv2D(6, 1, name="project")(x)
        x = L.GlobalAveragePooling2D(name="gap")(x)
        outputs = L.Dense(3, name="logits")(x)
        return keras.Model(inputs, outputs, name=f"depthwise_m{multiplier}")

    return build


def separable():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    x = L.SeparableConv2D(8, 3, depth_multiplier=2, padding="same", name="sep")(x)
    x = L.BatchNormalization(name="sep_bn")(x)
    x = L.ReLU(name="sep_relu")(x)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="separable")


def dense_chain():
    return keras.Sequential(
        [keras.Input((12,)), L.Dense(16, activation="relu", name="fc1"), L.Dropout(0.1, name="drop"),
         L.Dense(8, activation="relu", name="fc2"), L.Dense(3, name="logits")],
        name="dense_chain",
    )  # fmt: skip


def flatten_dense():
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inputs)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(10, activation="relu", name="hidden")(x)
    outputs = L.Dense(2, name="logits")(x)
    return keras.Model(inputs, outputs, name="flatten_dense")


def conv1d():
    inputs = keras.Input((16, 4))
    x = L.Conv1D(8, 3, padding="causal", activation="relu", name="c1")(inputs)
    x = L.Conv1D(6, 3, activation="relu", name="c2")(x)
    x = L.Reshape((14 * 6,), name="reshape")(x)  # a Flatten written as a Reshape
    outputs = L.Dense(2, name="logits")(x)
    return keras.Model(inputs, outputs, name="conv1d")


def squeeze_excite():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    s = L.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    s = L.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = L.Conv2D(8, 1, activation="sigmoid", name="se_expand")(s)
    x = L.Multiply(name="se_mul")([x, s])
    x = L.Conv2D(6, 1, name="head")(x)
    x = ops.relu(x) * 2.0  # op nodes: element-wise, channel-preserving
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="squeeze_excite")


def nested():
    block = keras.Sequential(
        [keras.Input((8, 8, 8)), L.Conv2D(8, 3, padding="same", name="inner_conv"),
         L.BatchNormalization(name="inner_bn"), L.ReLU(name="inner_relu")],
        name="block",
    )  # fmt: skip
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="outer_conv")(inputs)
    x = block(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="nested")


def shared_conv():
    conv = L.Conv2D(8, 3, padding="same", activation="relu", name="shared")
    a, b = keras.Input((8, 8, 3), name="left"), keras.Input((8, 8, 3), name="right")
    x = L.Add(name="add")([conv(a), conv(b)])
    x = L.Conv2D(4, 1, activation="relu", name="head")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(2, name="logits")(x)
    return keras.Model([a, b], outputs, name="shared_conv")


def mobilenet_v2():
    return keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None)


def _prune(model, **kwargs):
    """`prune_channels` and its report, which holds the kept channels."""
    pruned = prune_channels(model, **kwargs)
    return pruned, channel_report(model, pruned)


def _inputs(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.random((n, *x.shape[1:]), dtype=np.float32) * 2 - 1 for x in model.inputs]
    return xs if len(xs) > 1 else xs[0]


def _predict(model, x):
    return np.asarray(ops.convert_to_numpy(model(x, training=False)))


def _randomize_bn(model, seed=0):
    """Non-trivial BatchNormalization statistics (fresh ones are the identity)."""
    rng = np.random.default_rng(seed)
    for layer in mu.all_layers(model):
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights([
                rng.uniform(0.5, 1.5, w.shape).astype("float32") if w.name in ("gamma", "moving_variance")
                else rng.normal(0, 0.2, w.shape).astype("float32")
                for w in layer.weights
            ])  # fmt: skip
    return model


def _layers(model):
    return {layer.name: layer for layer in mu.all_layers(model)}


def _width(layer):
    return layer._inbound_nodes[0].outputs[0].shape[-1]


def _channels(model):
    """{name: output channels} of the layers with weights."""
    return {name: _width(layer) for name, layer in _layers(model).items() if layer.weights}


def _zeroed_copy(build, model, kept):
    """A copy of `model` (rebuilt by `build`) whose channels not in `kept` are exactly zero everywhere."""
    copy = build()
    copy.set_weights(model.get_weights())
    for name, layer in _layers(copy).items():
        if name not in kept:
            continue
        n = _width(layer)
        drop = np.setdiff1d(np.arange(n), kept[name])
        new = []
        for w in layer.weights:
            a = np.array(w)
            if w.name in ("kernel", "pointwise_kernel") and isinstance(layer, L.DepthwiseConv2D):
                a = a.reshape(*a.shape[:-2], -1)
                a[..., drop] = 0
                a = a.reshape(w.shape)
            elif w.name in ("kernel", "pointwise_kernel", "bias", "gamma", "beta"):
                a[..., drop] = 0
            new.append(a)
        layer.set_weights(new)
    return copy


# (builder, ratio, expected output channels after pruning: only the layers listed)
CASES = [
    pytest.param(conv_chain, {"conv_a": 4, "bn_a": 4, "conv_b": 4, "logits": 4}, id="conv_bn_relu_chain"),
    pytest.param(residual, {"stem": 4, "res_a": 4, "res_b": 4, "res_b_bn": 4, "logits": 4}, id="residual_add"),
    pytest.param(concat, {"branch_a": 3, "branch_b": 5, "mix": 4, "logits": 3}, id="concatenate"),
    pytest.param(depthwise(1), {"expand": 4, "dw": 4, "dw_bn": 4, "project": 3}, id="depthwise_m1"),
    pytest.param(depthwise(2), {"expand": 4, "dw": 8, "dw_bn": 8, "project": 3}, id="depthwise_m2"),
    pytest.param(separable, {"stem": 4, "sep": 4, "sep_bn": 4, "logits": 3}, id="separable"),
    pytest.param(dense_chain, {"fc1": 8, "fc2": 4, "logits": 3}, id="dense_chain"),
    pytest.param(flatten_dense, {"conv": 3, "hidden": 5, "logits": 2}, id="flatten_dense"),
    pytest.param(conv1d, {"c1": 4, "c2": 3, "logits": 2}, id="conv1d_reshape"),
    pytest.param(squeeze_excite, {"stem": 4, "se_reduce": 2, "se_expand": 4, "head": 3}, id="squeeze_excite_ops"),
    pytest.param(nested, {"outer_conv": 4, "inner_conv": 4, "inner_bn": 4}, id="nested_sequential"),
    pytest.param(shared_conv, {"shared": 4, "head": 2}, id="shared_layer"),
]


@pytest.mark.parametrize("build, expected", CASES)
def test_ratio_zero_reproduces_predictions_exactly(build, expected):
    model = _randomize_bn(build())
    x = _inputs(model)
    before = weights_of(model)
    nodes = {name: len(layer._inbound_nodes) for name, layer in _layers(model).items()}
    pruned = prune_channels(model, ratio=0.0)
    np.testing.assert_array_equal(_predict(pruned, x), _predict(model, x))
    assert _channels(pruned) == _channels(model)
    assert_same_weights(model, before)
    # no layer of the user's model is shared with the result
    assert {name: len(layer._inbound_nodes) for name, layer in _layers(model).items()} == nodes
    assert not {id(w) for w in model.weights} & {id(w) for w in pruned.weights}


@pytest.mark.parametrize("build, expected", CASES)
def test_pruned_equals_original_with_removed_channels_zeroed(build, expected):
    model = _randomize_bn(build())
    x = _inputs(model)
    before = weights_of(model)
    pruned, report = _prune(model, ratio=0.5)
    got = _channels(pruned)
    assert {k: got[k] for k in expected} == expected
    assert pruned.count_params() < model.count_params()
    reference = _predict(_zeroed_copy(build, model, report.kept), x)
    np.testing.assert_allclose(_predict(pruned, x), reference, rtol=1e-5, atol=1e-5)
    assert_same_weights(model, before)  # the user's model is only read


def test_flatten_dense_rows_are_sliced_with_the_channel_stride():
    model = flatten_dense()
    pruned, report = _prune(model, ratio=0.5)
    kept = report.kept["conv"]
    rows = np.flatnonzero(np.isin(np.arange(4 * 4 * 6) % 6, kept))  # channel of row p is p % channels
    expected = np.array(model.get_layer("hidden").kernel)[rows][:, report.kept["hidden"]]
    np.testing.assert_array_equal(np.array(pruned.get_layer("hidden").kernel), expected)


@pytest.mark.slow
def test_mobilenet_v2_groups_and_zeroed_equivalence():
    model = _randomize_bn(mobilenet_v2())
    x = _inputs(model, n=2)
    before = weights_of(model)
    np.testing.assert_array_equal(_predict(prune_channels(model, 0.0), x), _predict(model, x))
    pruned, report = _prune(model, ratio=0.5)
    got, orig = _channels(pruned), _channels(model)
    # Inverted-residual Adds tie the project convs of a stage: they keep the same width.
    assert got["block_1_project"] == got["block_2_project"] == orig["block_2_project"] // 2
    assert got["block_3_project"] == got["block_4_project"] == got["block_5_project"]
    assert got["block_1_depthwise"] == got["block_1_expand"] == orig["block_1_expand"] // 2
    assert got["Conv_1"] == orig["Conv_1"] // 2
    assert got["predictions"] == 1000  # feeds the output
    assert report.macs_ratio < 0.35
    reference = _predict(_zeroed_copy(mobilenet_v2, model, report.kept), x)
    np.testing.assert_allclose(_predict(pruned, x), reference, rtol=1e-4, atol=1e-5)
    assert_same_weights(model, before)


# ----- which channels ------------------------------------------------------------------


def _zero_filters(layer, channels):
    ws = layer.get_weights()
    ws[0][..., channels] = 0
    layer.set_weights(ws)


@pytest.mark.parametrize("criterion", ["l2", "l1"])
def test_norm_criteria_drop_the_smallest_filters(criterion):
    model = conv_chain()
    _zero_filters(model.get_layer("conv_a"), [1, 3, 4, 6])
    k = model.get_layer("conv_b").get_weights()
    k[0][..., [0, 2, 5, 7]] *= 1e-3  # small, not zero: l1 and l2 agree on them
    model.get_layer("conv_b").set_weights(k)
    _, report = _prune(model, ratio=0.5, criterion=criterion)
    np.testing.assert_array_equal(report.kept["conv_a"], [0, 2, 5, 7])
    np.testing.assert_array_equal(report.kept["conv_b"], [1, 3, 4, 6])


def test_l1_and_l2_can_disagree():
    model = dense_chain()
    k = np.zeros((12, 16), np.float32)
    k[:, :8] = 1.0  # l1 = 12, l2 = 3.46
    k[0, 8:] = 5.0  # l1 = 5, l2 = 5
    fc1 = model.get_layer("fc1")
    fc1.set_weights([k, fc1.get_weights()[1]])
    _, r1 = _prune(model, ratio=0.5, criterion="l1")
    _, r2 = _prune(model, ratio=0.5, criterion="l2")
    np.testing.assert_array_equal(r1.kept["fc1"], np.arange(8))
    np.testing.assert_array_equal(r2.kept["fc1"], np.arange(8, 16))


def test_bn_gamma_criterion_keeps_the_largest_gammas():
    model = conv_chain()
    bn = model.get_layer("bn_a")
    gamma = np.array([0.1, 2.0, 0.2, 3.0, 0.3, 4.0, 0.4, 5.0], np.float32)
    bn.set_weights([gamma, *bn.get_weights()[1:]])
    _, report = _prune(model, ratio=0.5, criterion="bn_gamma")
    np.testing.assert_array_equal(report.kept["conv_a"], [1, 3, 5, 7])
    # conv_b has no BatchNormalization: its group falls back to l2
    _, l2 = _prune(model, ratio=0.5, criterion="l2")
    np.testing.assert_array_equal(report.kept["conv_b"], l2.kept["conv_b"])


def test_residual_group_is_scored_over_all_its_layers():
    model = residual()
    # stem and res_b are tied by the Add: channels small in both are dropped,
    # a channel small in only one of them survives on the other's score.
    for name in ("stem", "res_b"):
        _zero_filters(model.get_layer(name), [0, 1, 2])
    _zero_filters(model.get_layer("stem"), [3])
    _, report = _prune(model, ratio=0.5)
    np.testing.assert_array_equal(report.kept["stem"], report.kept["res_b"])
    assert set(report.kept["stem"]).isdisjoint({0, 1, 2})
    assert len(report.kept["stem"]) == 4


@pytest.mark.parametrize(
    "ratio, round_to, expected",
    [(0.5, 1, 6), (0.5, 4, 8), (0.5, 8, 8), (0.5, 16, 12), (0.25, 1, 9), (0.25, 4, 12), (0.9, 1, 1), (0.0, 8, 12)],
    ids=lambda v: str(v),
)
def test_round_to_rounds_kept_width_up(ratio, round_to, expected):
    model = keras.Sequential([keras.Input((6,)), L.Dense(12, activation="relu", name="hidden"), L.Dense(2, name="out")])
    pruned = prune_channels(model, ratio=ratio, round_to=round_to)
    assert pruned.get_layer("hidden").units == expected


def test_layers_feeding_outputs_keep_their_width():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(8, 3, padding="same", name="b")(inputs)
    c = L.Conv2D(8, 3, padding="same", name="c")(inputs)
    tied = L.Add(name="add")([b, c])  # b and c are tied; c is a model output
    d = L.Conv2D(4, 1, name="d")(L.Concatenate(name="cat")([a, tied]))
    model = keras.Model(inputs, [d, c])
    pruned = prune_channels(model, ratio=0.5)
    got = _channels(pruned)
    assert got == {"a": 4, "b": 8, "c": 8, "d": 4}


def _partial_concat():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(8, 3, padding="same", name="b")(inputs)
    cat = L.Concatenate(name="cat")([a, b])
    wide = L.Conv2D(16, 1, name="wide")(inputs)
    out = L.Add(name="add")([cat, wide])  # wide's channel i is tied to a's i (i < 8), b's i - 8
    head = L.Conv2D(4, 1, name="head")(out)
    return keras.Model(inputs, [head, a])  # a is a model output: channels 0..7 of the group are pinned


def test_concat_partially_reaching_an_output_prunes_the_rest():
    model = _partial_concat()
    x = _inputs(model)
    pruned, report = _prune(model, ratio=0.5)
    got = _channels(pruned)
    assert got["a"] == 8 and got["b"] == 4 and got["wide"] == 12
    np.testing.assert_array_equal(report.kept["wide"][:8], np.arange(8))
    reference = _zeroed_copy(_partial_concat, model, report.kept)
    for g, r in zip(pruned(x), reference(x)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_filters_select_the_layers_to_prune():
    model = conv_chain()
    pruned = prune_channels(model, ratio=0.5, filters="conv_b")
    assert _channels(pruned) == {"conv_a": 8, "bn_a": 8, "conv_b": 4, "logits": 4}
    pruned = prune_channels(model, ratio=0.5, filters=lambda layer: layer.name == "conv_a")
    assert _channels(pruned) == {"conv_a": 4, "bn_a": 4, "conv_b": 8, "logits": 4}


# ----- report ------------------------------------------------------------------------


def test_report_counts_params_and_macs():
    model = conv_chain()
    pruned, report = _prune(model, ratio=0.5)
    assert isinstance(report, ChannelPruningReport)
    rows = {r["name"]: r for r in report.rows}
    # conv_a: 3x3, 3 -> 8 channels, 8x8 output, no bias
    assert rows["conv_a"]["macs_before"] == 8 * 8 * 9 * 3 * 8
    assert rows["conv_a"]["macs_after"] == 8 * 8 * 9 * 3 * 4
    assert rows["conv_b"]["macs_before"] == 3 * 3 * 9 * 8 * 8
    assert rows["conv_b"]["macs_after"] == 3 * 3 * 9 * 4 * 4
    assert (rows["logits"]["in_before"], rows["logits"]["in_after"]) == (72, 36)
    assert rows["logits"]["params_after"] == 36 * 4 + 4
    assert rows["bn_a"]["macs_before"] == 0
    assert report.params_before == model.count_params() and report.params_after == pruned.count_params()
    assert report.macs_before == sum(r["macs_before"] for r in report.rows)
    assert math.isclose(report.macs_ratio, report.macs_after / report.macs_before)
    d = report.to_dict()
    assert list(d) == ["layers", "params_before", "params_after", "params_ratio", "macs_before", "macs_after", "macs_ratio"]
    assert d["params_after"] == pruned.count_params() and d["layers"] == report.rows and d["layers"][0] is not report.rows[0]
    single = channel_report(model)
    assert all(r["channels_before"] == r["channels_after"] for r in single.rows) and single.kept is None


def test_report_kept_channels_only_against_the_source(tmp_path):
    model = conv_chain()
    pruned, report = _prune(model, ratio=0.5)
    assert set(report.kept) == {"conv_a", "bn_a", "conv_b", "logits"}
    assert [len(report.kept[n]) for n in ("conv_a", "bn_a", "conv_b", "logits")] == [4, 4, 4, 4]
    np.testing.assert_array_equal(report.kept["conv_a"], report.kept["bn_a"])
    # the record is the pruning's: a loaded copy, or another model with the same names, compare without it
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    loaded = channel_report(model, keras.saving.load_model(path))
    twin = conv_chain()
    other = channel_report(twin, pruned)
    assert loaded.kept is None and other.kept is None
    assert loaded.rows == report.rows and [r["channels_after"] for r in other.rows] == [r["channels_after"] for r in report.rows]
    # pruning the same model again records its own result
    assert channel_report(model, prune_channels(model, ratio=0.75)).kept["conv_a"].size == 2


def test_report_table():
    model = dense_chain()
    report = channel_report(model, prune_channels(model, ratio=0.5))
    assert str(report) == repr(report) == "\n".join([
        "layer   type        in      out      params        MACs",
        "------  -----  -------  -------  ----------  ----------",
        "fc1     Dense       12  16 -> 8  208 -> 104   192 -> 96",
        "fc2     Dense  16 -> 8   8 -> 4   136 -> 36   128 -> 32",
        "logits  Dense   8 -> 4        3    27 -> 15    24 -> 12",
        "------  -----  -------  -------  ----------  ----------",
        "total                            371 -> 155  344 -> 140",
    ])  # fmt: skip


def test_report_separable_and_depthwise_macs():
    model = separable()
    rows = {r["name"]: r for r in channel_report(model).rows}
    assert rows["sep"]["macs_before"] == 8 * 8 * (9 * 16 + 16 * 8)
    model = depthwise(2)()
    rows = {r["name"]: r for r in channel_report(model).rows}
    assert rows["dw"]["macs_before"] == 4 * 4 * 9 * 16


def test_report_needs_matching_names():
    with pytest.raises(ValueError, match=r"matches layers by name.*Received: pruned="):
        channel_report(conv_chain(), residual())


# ----- composition -------------------------------------------------------------------


def test_fine_tunes_and_composes_with_magnitude_pruning():
    import tfopt.callbacks

    model = compile_for_test(conv_chain())
    x, y = image_data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    pruned = compile_for_test(prune_channels(model, ratio=0.5))
    history = pruned.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    sparse = tfopt.prune_low_magnitude(pruned, tfopt.ConstantSparsity(0.5, begin_step=0, frequency=1))
    compile_for_test(sparse)
    sparse.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    stripped = tfopt.strip_pruning(sparse)
    assert abs(tfopt.sparsity_report(stripped).sparsity - 0.5) < 0.05
    assert _channels(stripped)["conv_a"] == 4
    with pytest.raises(ValueError, match=r"holding tfopt layers .*PruneLowMagnitude.*magnitude pruning"):
        prune_channels(sparse, ratio=0.5)


def test_composes_with_clustering():
    model = compile_for_test(conv_chain())
    x, y = image_data()
    pruned = prune_channels(model, ratio=0.5)
    clustered = compile_for_test(tfopt.cluster_weights(pruned, number_of_clusters=4))
    history = clustered.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    final = tfopt.strip_clustering(clustered)
    assert _channels(final)["conv_a"] == 4  # the pruned width survives clustering
    for layer in final.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            assert len(np.unique(ops.convert_to_numpy(layer.kernel))) <= 4, layer.name
    np.testing.assert_allclose(final.predict(x, verbose=0), clustered.predict(x, verbose=0), atol=1e-5)


@pytest.mark.slow
def test_composes_with_qat_and_exports_int8(tmp_path):
    from tfopt import tflite_export

    model = _randomize_bn(residual())
    x, y = image_data()
    pruned = prune_channels(model, ratio=0.5)
    qat = compile_for_test(tfopt.quantize_model(pruned))
    qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
    tfl = tflite_export.convert(qat, target="mobile", mode="int8")
    assert tflite_export.analyze(tfl.content).is_fully_int8
    with pytest.raises(ValueError, match="quantization-aware training"):
        prune_channels(qat, ratio=0.5)


@pytest.mark.slow
def test_exports_int8_with_representative_data():
    from tfopt import tflite_export

    model = _randomize_bn(depthwise(2)())
    x = _inputs(model, n=64)
    pruned = prune_channels(model, ratio=0.5)
    tfl = tflite_export.convert(pruned, target="mobile", mode="int8", representative_data=x[:32])
    assert tflite_export.analyze(tfl.content).is_fully_int8
    c = tflite_export.compare(pruned, tfl, x[32:])
    assert c.p99_error_steps <= 3, c
    full = tflite_export.convert(model, target="mobile", mode="int8", representative_data=x[:32])
    assert len(tfl.content) < len(full.content)


def test_save_load_round_trip(tmp_path):
    model = _randomize_bn(squeeze_excite())
    pruned = prune_channels(model, ratio=0.5)
    x = _inputs(pruned)
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(_predict(loaded, x), _predict(pruned, x))
    assert _channels(loaded) == _channels(pruned)
    # the result is an ordinary model: it can be pruned again
    again = prune_channels(loaded, ratio=0.5)
    assert _channels(again)["stem"] == 2


# ----- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"ratio": 1.0}, ValueError, r"`ratio` must be a number in \[0, 1\).*Received: ratio=1.0"),
        ({"ratio": -0.1}, ValueError, r"Received: ratio=-0.1"),
        ({"ratio": "0.5"}, TypeError, r"`ratio` must be a number.*Received: ratio='0.5'"),
        ({"ratio": True}, TypeError, r"Received: ratio=True"),
        ({"ratio": 0.5, "criterion": "l3"}, ValueError, r"`criterion` must be one of.*Received: criterion='l3'"),
        ({"ratio": 0.5, "round_to": 0}, ValueError, r"`round_to` must be an integer >= 1.*Received: round_to=0"),
        ({"ratio": 0.5, "round_to": 2.0}, TypeError, r"`round_to` must be an integer >= 1.*Received: round_to=2.0"),
        ({"ratio": 0.5, "filters": 3}, TypeError, r"Received: filters=3"),
    ],
    ids=["ratio_one", "ratio_negative", "ratio_str", "ratio_bool", "criterion", "round_to", "round_to_float", "filters"],
)
def test_bad_arguments(kwargs, error, match):
    model = conv_chain()
    before = weights_of(model)
    with pytest.raises(error, match=match):
        prune_channels(model, **kwargs)
    assert_same_weights(model, before)


def test_bad_models():
    with pytest.raises(TypeError, match="Received: model="):
        prune_channels("model", ratio=0.5)
    with pytest.raises(ValueError, match="not built"):
        prune_channels(keras.Sequential([L.Dense(2)]), ratio=0.5)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = L.Dense(2)

        def call(self, x):
            return self.fc(x)

    sub = Sub()
    sub(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="subclassed"):
        prune_channels(sub, ratio=0.5)


@keras.saving.register_keras_serializable(package="tfopt_tests")
class Scale(L.Layer):
    def build(self, shape):
        self.w = self.add_weight(shape=shape[-1:], initializer="ones")

    def call(self, x):
        return x * self.w


def _unsliceable():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv_a")(inputs)
    x = L.Lambda(lambda t: t * 2.0, name="lam")(x)
    x = L.Conv2D(8, 3, padding="same", name="conv_b")(x)
    x = Scale(name="scale")(x)
    x = L.Conv2D(8, 3, padding="same", name="conv_c")(x)
    x = L.Reshape((8, 8, 4, 2), name="split")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(16, activation="relu", name="hidden")(x)
    outputs = L.Dense(2, name="logits")(x)
    return keras.Model(inputs, outputs, name="unsliceable")


def test_unsliceable_layers_are_listed_once_and_filters_fix_it():
    model = _unsliceable()
    before = weights_of(model)
    with pytest.raises(ValueError) as e:
        prune_channels(model, ratio=0.5)
    msg = str(e.value)
    assert "cannot slice 3 layer(s)" in msg
    assert "'lam' of type Lambda" in msg and "['conv_a']" in msg
    assert "'scale' of type Scale" in msg and "['conv_b']" in msg
    assert "'split' of type Reshape moves channels into another axis" in msg
    assert "filters=lambda layer: layer.name not in ['lam', 'scale', 'split']" in msg
    assert "Received: layers=['lam', 'scale', 'split']" in msg
    assert_same_weights(model, before)
    # the suggested fix: those layers keep their input width, the others are pruned
    pruned, report = _prune(model, ratio=0.5, filters=lambda layer: layer.name not in ["lam", "scale", "split"])
    assert _channels(pruned) == {"conv_a": 8, "conv_b": 8, "scale": 8, "conv_c": 8, "hidden": 8, "logits": 2}
    x = _inputs(model)
    reference = _predict(_zeroed_copy(_unsliceable, model, report.kept), x)
    np.testing.assert_allclose(_predict(pruned, x), reference, rtol=1e-5, atol=1e-5)


def test_unsliceable_layer_fed_only_by_pinned_channels_is_fine():
    inputs = keras.Input((8, 8, 3))
    x = L.LayerNormalization(name="ln")(inputs)  # weights, but only the (pinned) input reaches it
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv")(x)
    x = L.Conv2D(4, 1, name="head")(x)
    model = keras.Model(inputs, x)
    assert _channels(prune_channels(model, ratio=0.5))["conv"] == 4


def test_channels_first_grouped_convs_and_channel_softmax_are_refused():
    inputs = keras.Input((8, 8, 4))
    x = L.Conv2D(8, 3, name="conv")(inputs)
    x = L.Conv2D(8, 3, groups=2, name="grouped")(x)
    x = L.Conv2D(4, 1, name="head")(x)
    with pytest.raises(ValueError, match=r"'grouped' of type Conv2D is a grouped convolution \(groups=2\)"):
        prune_channels(keras.Model(inputs, x), ratio=0.5)
    inputs = keras.Input((8, 8, 4))
    x = L.Conv2D(8, 3, name="conv")(inputs)
    x = L.Conv2D(4, 3, data_format="channels_first", name="cf")(x)
    with pytest.raises(ValueError, match=r"'cf' of type Conv2D uses data_format='channels_first' .*of \['conv'\]"):
        prune_channels(keras.Model(inputs, L.Dense(2)(L.Flatten()(x))), ratio=0.5)
    inputs = keras.Input((6,))
    x = L.Dense(8, name="fc")(inputs)
    x = L.Activation("softmax", name="mid_softmax")(x)
    x = L.Dense(8, name="fc2")(x)
    with pytest.raises(ValueError, match=r"'mid_softmax' of type Activation is a softmax over the channel axis; "
                                         r"it receives prunable channels of \['fc'\]"):
        prune_channels(keras.Model(inputs, L.Dense(2)(x)), ratio=0.5)


def test_no_prunable_channel_is_an_error():
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, name="only")])
    with pytest.raises(ValueError, match=r"no prunable channel.*Received: ratio=0.5"):
        prune_channels(model, ratio=0.5)
    assert _channels(prune_channels(model, ratio=0.0)) == {"only": 3}
    # filters selecting only a layer that feeds the output: nothing to prune either
    with pytest.raises(ValueError, match=r"no prunable channel.*filters selecting \['logits'\]"):
        prune_channels(conv_chain(), ratio=0.5, filters="logits")


# ----- how channels flow through each layer type (the registry's channel roles) -------------------


class _SubConv(L.Conv2D):
    """A subclass computes as it likes (e.g. a weight-standardized `convolution_op`): never sliced."""


class _SubReLU(L.ReLU):
    pass


def _lora_dense(x):
    dense = L.Dense(6, name="x")
    y = dense(x)
    dense.enable_lora(2)
    return y


IMAGE = (5, 5, 3)
PASS_THROUGH = [
    (IMAGE, lambda: L.ReLU(), "relu"),
    (IMAGE, lambda: L.LeakyReLU(0.2), "leaky_relu"),
    (IMAGE, lambda: L.ELU(), "elu"),
    (IMAGE, lambda: L.PReLU(alpha_initializer="random_uniform"), "prelu_per_element"),
    (IMAGE, lambda: L.PReLU(alpha_initializer="random_uniform", shared_axes=[1, 2]), "prelu_per_channel"),
    (IMAGE, lambda: L.PReLU(shared_axes=[1, 2, 3]), "prelu_shared"),
    (IMAGE, lambda: L.BatchNormalization(), "batch_norm"),
    (IMAGE, lambda: L.Activation("tanh"), "activation"),
    (IMAGE, lambda: L.Rescaling(2.0, offset=0.5), "rescaling_scalar"),
    (IMAGE, lambda: L.Dropout(0.5), "dropout"),
    (IMAGE, lambda: L.GaussianNoise(0.1), "gaussian_noise"),
    (IMAGE, lambda: L.SpatialDropout2D(0.5), "spatial_dropout"),
    (IMAGE, lambda: L.ActivityRegularization(), "activity_regularization"),
    (IMAGE, lambda: L.Identity(), "identity"),
    (IMAGE, lambda: L.Permute((2, 1, 3)), "permute_spatial"),
    (IMAGE, lambda: L.MaxPooling2D(), "max_pooling"),
    (IMAGE, lambda: L.AveragePooling2D(2), "average_pooling"),
    (IMAGE, lambda: L.GlobalMaxPooling2D(), "global_max_pooling"),
    (IMAGE, lambda: L.ZeroPadding2D(1), "zero_padding"),
    (IMAGE, lambda: L.Cropping2D(1), "cropping"),
    (IMAGE, lambda: L.UpSampling2D(), "upsampling"),
    (IMAGE, lambda: (lambda x: L.Concatenate(axis=1)([x, x * 2.0])), "concatenate_spatial_axis"),
    ((6,), lambda: L.RepeatVector(3), "repeat_vector"),
    (IMAGE, lambda: (lambda x: L.Subtract()([x, x * 0.5])), "subtract"),
    (IMAGE, lambda: (lambda x: L.Average()([x, ops.tanh(x)])), "average"),
    (IMAGE, lambda: ops.sigmoid, "op_sigmoid"),
    (IMAGE, lambda: (lambda x: ops.clip(x, -0.5, 0.5)), "op_clip"),
    (IMAGE, lambda: (lambda x: ops.cast(x, "float16")), "op_cast"),
    (IMAGE, lambda: (lambda x: x / 3.0), "op_divide"),
    (IMAGE, lambda: (lambda x: ops.maximum(x, x * x)), "op_maximum"),
]


def _through(shape, make):
    """first (8 channels, prunable) -> the layer under test -> second (a model output, pinned)."""
    inputs = keras.Input(shape)
    x = L.Dense(8, name="first")(inputs)
    x = make()(x)
    return keras.Model(inputs, L.Dense(4, name="second")(ops.cast(x, "float32")), name="through")


@pytest.mark.parametrize("shape, make", [p[:2] for p in PASS_THROUGH], ids=[p[2] for p in PASS_THROUGH])
def test_channel_preserving_layers_are_sliced_along(shape, make):
    model = _through(shape, make)
    x = _inputs(model)
    pruned, report = _prune(model, ratio=0.5)
    assert _channels(pruned)["first"] == 4
    # the reference: the original model with the removed channels' rows of `second` zeroed
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    second = reference.get_layer("second")
    kernel = np.array(second.kernel)
    kernel[np.setdiff1d(np.arange(8), report.kept["first"])] = 0
    second.kernel.assign(kernel)
    np.testing.assert_allclose(_predict(pruned, x), _predict(reference, x), rtol=1e-5, atol=1e-5)


BARRIERS = [
    (lambda: L.Softmax(name="x"), "'x' of type Softmax is a softmax over the channel axis"),
    (lambda: L.Activation("log_softmax", name="x"), "'x' of type Activation is a softmax over the channel axis"),
    (lambda: L.Rescaling(np.linspace(0.5, 1.5, 8), name="x"), "'x' of type Rescaling has a per-channel scale"),
    (lambda: L.Permute((3, 1, 2), name="x"), r"'x' of type Permute moves the channel axis \(dims=\(3, 1, 2\)\)"),
    (lambda: L.BatchNormalization(axis=1, name="x"), "'x' of type BatchNormalization normalizes axis 1, not the last"),
    (lambda: L.Conv2DTranspose(4, 3, name="x"), "'x' of type Conv2DTranspose is a layer type whose weights"),
    (lambda: L.LayerNormalization(name="x"), "'x' of type LayerNormalization is a layer type whose weights"),
    (lambda: L.Flatten(data_format="channels_first", name="x"), "'x' of type Flatten uses data_format='channels_first'"),
    (lambda: _SubConv(4, 1, name="x"), "'x' of type _SubConv is a layer type whose weights tfopt cannot slice"),
    (lambda: _SubReLU(name="x"), "'x' of type _SubReLU is a layer type tfopt does not know how channels flow"),
    (lambda: (lambda x: ops.softmax(x)), "of type Softmax is the operation `Softmax`, which may mix or select"),
    (lambda: (lambda x: ops.concatenate([x, x], axis=-1)), "is the operation `Concatenate`"),
    (lambda: (lambda x: x * np.linspace(0.5, 1.5, 8).astype("float32")), "is called with non-scalar constant arguments"),
    (lambda: _lora_dense, r"'x' of type Dense has weights tfopt cannot slice \(\['lora_kernel_a', 'lora_kernel_b'\]"),
]


@pytest.mark.parametrize(
    "make, reason", BARRIERS,
    ids=["softmax", "log_softmax", "rescaling_per_channel", "permute_channels", "batch_norm_axis", "transpose_conv",
         "layer_norm", "flatten_channels_first", "subclass_with_weights", "subclass_weightless", "op_softmax",
         "op_concatenate", "op_tensor_argument", "lora"],
)  # fmt: skip
def test_layers_that_mix_or_hide_channels_are_barriers(make, reason):
    model = _through(IMAGE, make)
    with pytest.raises(ValueError, match=reason + r".*it receives prunable channels of \['first'\]"):
        prune_channels(model, ratio=0.5)


@pytest.mark.parametrize(
    "wrap, match",
    [
        (tfopt.prune_low_magnitude, r"'prune_low_magnitude_conv_a' of type PruneLowMagnitude"),
        (lambda m: tfopt.cluster_weights(m, 4), r"'cluster_conv_a' of type ClusterWeights"),
        (tfopt.quantize_annotate_model, r"'annotate_conv_a' of type QuantizeAnnotate"),
        (tfopt.quantize_model, r"'quant_conv_a' of type QuantizeWrapper"),
        (lambda m: keras.Sequential([keras.Input((8, 8, 3)), tfopt.QuantizeLayer(), m], name="conv_chain_q"), r"QuantizeLayer\)"),
    ],
    ids=["pruning", "clustering", "qat_annotated", "qat", "qat_quantize_layer_only"],
)
def test_wrapped_models_are_refused(wrap, match):
    with pytest.raises(ValueError, match=r"holding tfopt layers \(" + match + r".*quantization-aware training.*"
                                         r"Received: model='conv_chain"):
        prune_channels(wrap(conv_chain()), ratio=0.5)
