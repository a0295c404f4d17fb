"""tfopt.low_rank: rank choice, Dense / Conv2D factors against numpy SVD, report, nesting, training, export, errors."""

import keras
import numpy as np
import pytest
from keras import ops

import tfopt
import tfopt.callbacks
from conftest import compile_for_test, image_data, tiny_cnn
from helpers import assert_same_weights, weights_of
from tfopt import low_rank as lr

L = keras.layers


def best_rank_r(matrix, r):
    """The Eckart-Young best rank-r approximation, in float64."""
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def with_kernel(model, name, kernel):
    """A copy of `model` whose layer `name` has `kernel` (the numpy reference)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    layer = copy.get_layer(name)
    layer.kernel.assign(np.asarray(kernel, np.float32).reshape(layer.kernel.shape))
    return copy


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((20,), name="features")
    x = L.Dense(32, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, L.Dense(5, name="logits")(x), name="mlp")


def factorize(model, **kwargs):
    """`low_rank_factorize` and its report."""
    new = lr.low_rank_factorize(model, **kwargs)
    return new, lr.low_rank_report(model, new)


def features(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 20)).astype("float32")
    return x, x[:, :5].argmax(-1).astype("int32")


# ----- rank choice -------------------------------------------------------------------


@pytest.mark.parametrize(
    "energy,rank",
    [(0.6, 1), (9 / 14, 1), (0.65, 2), (13 / 14, 2), (0.93, 3), (1.0, 3)],
    ids=["0.6", "exact_first", "0.65", "exact_second", "0.93", "all"],
)
def test_choose_rank_keeps_the_energy(energy, rank):
    # s = (3, 2, 1): kept energy 9/14, 13/14, 1.
    r, kept = lr.choose_rank([3.0, 2.0, 1.0], energy=energy)
    assert r == rank
    assert kept == pytest.approx([9 / 14, 13 / 14, 1.0][r - 1])
    assert kept >= energy - 1e-12


def test_fixed_rank_is_capped():
    assert lr.choose_rank([3.0, 2.0, 1.0], rank=2) == (2, pytest.approx(13 / 14))
    assert lr.choose_rank([3.0, 2.0, 1.0], rank=7)[0] == 3


# ----- factors against numpy ----------------------------------------------------------------


def test_dense_factors_are_the_best_rank_r_approximation():
    model = mlp()
    x, _ = features(16)
    new, report = factorize(model, rank=4, filters="hidden")
    u, v = new.get_layer("hidden_u"), new.get_layer("hidden_v")
    assert (u.units, u.use_bias, keras.activations.serialize(u.activation)) == (4, False, "linear")
    assert (v.units, v.use_bias, keras.activations.serialize(v.activation)) == (32, True, "relu")
    product = ops.convert_to_numpy(u.kernel) @ ops.convert_to_numpy(v.kernel)
    kernel = ops.convert_to_numpy(model.get_layer("hidden").kernel)
    np.testing.assert_allclose(product, best_rank_r(kernel, 4), atol=1e-5)
    np.testing.assert_array_equal(ops.convert_to_numpy(v.bias), ops.convert_to_numpy(model.get_layer("hidden").bias))
    # balanced split: both factors carry sqrt(s)
    np.testing.assert_allclose(np.linalg.norm(ops.convert_to_numpy(u.kernel), axis=0),
                               np.linalg.norm(ops.convert_to_numpy(v.kernel), axis=1), rtol=1e-5)
    reference = with_kernel(model, "hidden", best_rank_r(kernel, 4))
    np.testing.assert_allclose(new.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-5)
    (row,) = report.rows
    assert (row["rank"], row["max_rank"], row["factorized"]) == (4, 20, True)
    assert (row["params_before"], row["params_after"]) == (20 * 32 + 32, 4 * (20 + 32) + 32)


@pytest.mark.parametrize(
    "conv_kwargs",
    [dict(strides=2, padding="same"), dict(dilation_rate=2, padding="valid"), dict(strides=1, padding="valid")],
    ids=["strided_same", "dilated_valid", "valid"],
)
def test_conv2d_factors_are_a_kxk_conv_then_a_1x1_conv(conv_kwargs):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((9, 9, 6))
    y = L.Conv2D(12, 3, activation="relu", name="conv", **conv_kwargs)(inputs)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(y)))
    x = np.random.default_rng(0).random((4, 9, 9, 6), np.float32)
    new, report = factorize(model, rank=3, filters="conv")
    u, v = new.get_layer("conv_u"), new.get_layer("conv_v")
    assert (u.filters, tuple(u.kernel_size), u.use_bias) == (3, (3, 3), False)
    assert (tuple(u.strides), u.padding, tuple(u.dilation_rate)) == (
        tuple(model.get_layer("conv").strides), model.get_layer("conv").padding, tuple(model.get_layer("conv").dilation_rate))
    assert (v.filters, tuple(v.kernel_size), tuple(v.strides), v.padding) == (12, (1, 1), (1, 1), "valid")
    kernel = ops.convert_to_numpy(model.get_layer("conv").kernel)
    approx = best_rank_r(kernel.reshape(-1, 12), 3).reshape(kernel.shape)
    reference = with_kernel(model, "conv", approx)
    np.testing.assert_allclose(new.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-4)
    assert report.rows[0]["params_after"] == 3 * (3 * 3 * 6 + 12) + 12


def test_energy_picks_each_layers_rank_and_skips_layers_that_would_grow():
    model = mlp()
    new, report = factorize(model, energy=0.8)
    by_name = {r["name"]: r for r in report.rows}
    for name in ("hidden", "logits"):
        s = np.linalg.svd(ops.convert_to_numpy(model.get_layer(name).kernel).astype(np.float64), compute_uv=False)
        expected = int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.8)) + 1
        assert by_name[name]["rank"] == expected
    # logits is 32 x 5: any rank >= 5 * 32 / 37 (about 4.3) saves nothing
    logits = by_name["logits"]
    assert logits["factorized"] == (logits["rank"] * 37 < 160)
    if not logits["factorized"]:
        assert "would not reduce parameters" in logits["reason"]
        assert isinstance(new.get_layer("logits"), L.Dense)
    assert report.params_before == sum(r["params_before"] for r in report.rows if r["factorized"])
    assert report.ratio == pytest.approx(report.params_before / report.params_after)
    assert report.model_params_after == new.count_params()
    text = str(report)
    assert "factorized layers" in text and "hidden" in text and f"{report.ratio:.2f}x" in text
    assert report.to_dict()["layers"][0]["name"] == "hidden"


def test_report_table_and_dict():
    model = mlp()
    new = lr.low_rank_factorize(model, rank=5)
    report = lr.low_rank_report(model, new)
    s = np.linalg.svd(ops.convert_to_numpy(model.get_layer("hidden").kernel).astype(np.float64), compute_uv=False)
    energy = np.sum(s[:5] ** 2) / np.sum(s**2)
    rule = "-----------------  -----  ------  ----  ------  -------------  ------------  " + "-" * 65
    assert str(report) == repr(report) == "\n".join([
        "layer              type   kernel  rank  energy  params before  params after  result",
        rule,
        f"hidden             Dense  20x32   5/20   {energy:.3f}            672           292  factorized",
        "logits             Dense  32x5     5/5   1.000            165           165  kept: rank 5 would not reduce "
        "parameters (5 x (32 + 5) >= 32 x 5)",
        rule,
        "factorized layers                                         672           292  2.30x fewer",
        "whole model                                               837           457",
    ])  # fmt: skip
    d = report.to_dict()
    assert list(d) == ["layers", "params_before", "params_after", "ratio", "model_params_before", "model_params_after"]
    assert (d["params_before"], d["params_after"], d["model_params_before"], d["model_params_after"]) == (672, 292, 837, 457)
    assert d["ratio"] == pytest.approx(672 / 292) and d["layers"][0]["energy"] == pytest.approx(energy)
    assert d["layers"] == report.rows and d["layers"][0] is not report.rows[0]
    # each call gives its own rows
    report.rows[0]["rank"] = 99
    assert lr.low_rank_report(model, new).rows[0]["rank"] == 5


def test_report_needs_the_factorized_model_and_its_source(tmp_path):
    model = mlp()
    new = lr.low_rank_factorize(model, rank=4)
    path = tmp_path / "lowrank.keras"
    new.save(path)
    for source, result in ((mlp(), new), (model, keras.saving.load_model(path)), (model, model)):
        with pytest.raises(ValueError, match=r"is not the result of `tfopt.low_rank_factorize` on model 'mlp'.*"
                                             r"Received: model='mlp', factorized="):
            lr.low_rank_report(source, result)
    with pytest.raises(TypeError, match=r"Received: factorized='x'"):
        lr.low_rank_report(model, "x")
    # fine-tuning does not change the factorization
    compile_for_test(new).fit(*features(16), epochs=1, verbose=0)
    assert lr.low_rank_report(model, new).rows[0]["rank"] == 4


def test_subclasses_are_kept_with_a_reason():
    class Standardized(L.Conv2D):  # a subclass may compute otherwise (here: its convolution_op)
        def convolution_op(self, inputs, kernel):
            return super().convolution_op(inputs, (kernel - ops.mean(kernel)) / (ops.std(kernel) + 1e-5))

    class Plain(L.Dense):
        pass

    inputs = keras.Input((6, 6, 3))
    x = Standardized(8, 3, name="std_conv")(inputs)
    x = Plain(16, name="plain")(L.Flatten()(x))
    model = keras.Model(inputs, L.Dense(2, name="head")(x))
    new, report = factorize(model, rank=1)
    rows = {r["name"]: r for r in report.rows}
    assert set(rows) == {"std_conv", "plain", "head"}
    for name, cls in (("std_conv", Standardized), ("plain", Plain)):
        assert not rows[name]["factorized"] and "nor subclasses" in rows[name]["reason"]
        assert type(new.get_layer(name)) is cls
    assert rows["head"]["factorized"]
    with pytest.raises(ValueError, match=r"'plain' of type Plain: only Dense and Conv2D are factorized"):
        lr.low_rank_factorize(model, rank=1, filters="plain")


def test_wrapped_models_are_refused():
    model = mlp()
    cases = [
        (tfopt.prune_low_magnitude(model), r"PruneLowMagnitude.*strip_pruning"),
        (tfopt.cluster_weights(model, 4), r"ClusterWeights.*strip_clustering"),
        (tfopt.quantize_model(model), r"QuantizeWrapper"),
        (tfopt.quantize_annotate_model(model), r"QuantizeAnnotate"),
        (keras.Sequential([keras.Input((20,)), tfopt.QuantizeLayer(), model]), r"\(QuantizeLayer\)"),
    ]
    for wrapped, match in cases:
        with pytest.raises(ValueError, match=r"holds tfopt layers .*" + match):
            lr.low_rank_factorize(wrapped)


def test_full_energy_keeps_everything_as_a_copy():
    model = mlp()
    x, _ = features(8)
    new, report = factorize(model, energy=1.0)
    assert not any(r["factorized"] for r in report.rows) and report.ratio == 1.0
    np.testing.assert_array_equal(new.predict(x, verbose=0), model.predict(x, verbose=0))
    assert new.get_layer("hidden").kernel is not model.get_layer("hidden").kernel


def test_model_untouched_and_new_weights_are_its_own():
    model = tiny_cnn()
    before = weights_of(model)
    new = lr.low_rank_factorize(model, rank=2)
    assert_same_weights(model, before)
    for w in new.weights:
        w.assign(ops.zeros_like(w))
    assert_same_weights(model, before)


def test_sequential_nested_and_shared_layers():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((20,)), L.Dense(24, activation="relu", name="inner_dense")], name="block")
    shared = L.Dense(24, name="shared")
    inputs = keras.Input((20,))
    h = inner(inputs)
    h = shared(h) + shared(h * 2.0)  # one layer, two calls
    model = keras.Model(inputs, L.Dense(3, name="out")(h))
    x = np.random.default_rng(0).normal(size=(6, 20)).astype("float32")
    new, report = factorize(model, rank=2, filters=["inner_dense", "shared"])
    assert {r["name"] for r in report.rows if r["factorized"]} == {"inner_dense", "shared"}
    block = new.get_layer("block")
    assert isinstance(block, keras.Sequential) and [l.name for l in block.layers] == ["inner_dense_u", "inner_dense_v"]
    ref = keras.models.clone_model(model)
    ref.set_weights(model.get_weights())
    for name in ("inner_dense", "shared"):
        layer = ref.get_layer("block").get_layer(name) if name == "inner_dense" else ref.get_layer(name)
        layer.kernel.assign(best_rank_r(ops.convert_to_numpy(layer.kernel), 2).astype(np.float32))
    np.testing.assert_allclose(new.predict(x, verbose=0), ref.predict(x, verbose=0), atol=1e-5)
    assert len([l for l in new.layers if l.name == "shared_v"]) == 1

    seq = keras.Sequential([keras.Input((20,), name="in"), L.Dense(16, name="a"), L.Dense(3, name="b")], name="seq")
    new_seq = lr.low_rank_factorize(seq, rank=1, filters="a")
    assert isinstance(new_seq, keras.Sequential) and [l.name for l in new_seq.layers] == ["a_u", "a_v", "b"]
    assert new_seq.name == "seq"


def test_grouped_conv_is_kept_with_a_reason():
    inputs = keras.Input((6, 6, 4))
    x = L.Conv2D(8, 3, groups=2, name="grouped")(inputs)
    model = keras.Model(inputs, L.Dense(2, name="head")(L.Flatten()(x)))
    new, report = factorize(model, rank=1)
    row = next(r for r in report.rows if r["name"] == "grouped")
    assert not row["factorized"] and "grouped convolution (groups=2)" in row["reason"]
    assert isinstance(new.get_layer("grouped"), L.Conv2D)
    with pytest.raises(ValueError, match=r"'grouped' of type Conv2D: it is a grouped convolution"):
        lr.low_rank_factorize(model, rank=1, filters="grouped")


# ----- trains, composes, exports --------------------------------------------------------------


def test_factorized_model_trains_saves_and_prunes(tmp_path):
    x, y = features(64)
    new = lr.low_rank_factorize(mlp(), rank=3)
    compile_for_test(new)
    history = new.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    path = tmp_path / "lowrank.keras"
    new.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), new.predict(x, verbose=0))
    pruned = tfopt.prune_low_magnitude(new, tfopt.ConstantSparsity(0.5, 0, frequency=1))
    compile_for_test(pruned)
    pruned.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    report = tfopt.sparsity_report(tfopt.strip_pruning(pruned))
    assert {r["name"] for r in report.rows} == {"hidden_u", "hidden_v", "logits_u", "logits_v"}
    assert report.sparsity == pytest.approx(0.5, abs=0.02)


@pytest.mark.slow
def test_int8_export_of_a_factorized_cnn():
    model = tiny_cnn()
    x, y = image_data()
    new, report = factorize(model, rank=2)
    assert report.rows and any(r["factorized"] for r in report.rows)
    compile_for_test(new)
    new.fit(x, y, epochs=1, batch_size=16, verbose=0)
    tfl = tfopt.tflite_export.convert(new, target="mobile", mode="int8", representative_data=x[:50])
    assert tfl.report.is_fully_int8
    ops_seen = {o["op"] for o in tfl.report.to_dict()["ops"]}
    assert "CONV_2D" in ops_seen and "FULLY_CONNECTED" in ops_seen
    assert tfopt.tflite_export.compare(new, tfl, x[:32]).top1_agreement >= 0.9


# ----- errors: clear message, model untouched ---------------------------------------------------


BAD = [
    ("rank_zero", dict(rank=0), ValueError, r"`rank` must be an integer >= 1.*Received: rank=0"),
    ("rank_float", dict(rank=2.5), TypeError, r"Received: rank=2.5"),
    ("rank_bool", dict(rank=True), TypeError, r"Received: rank=True"),
    ("energy_zero", dict(energy=0.0), ValueError, r"`energy` must be in \(0, 1\].*Received: energy=0.0"),
    ("energy_above_one", dict(energy=1.5), ValueError, r"`energy` must be a number in \[0, 1\]\. The fraction.*Received: energy=1.5"),
    ("energy_negative", dict(energy=-0.1), ValueError, r"Received: energy=-0.1"),
    ("energy_str", dict(energy="0.9"), TypeError, r"Received: energy='0.9'"),
    ("filters_bad_type", dict(filters=1), TypeError, r"Received: filters=1"),
    ("filters_nothing", dict(filters="nope"), ValueError, r"among those `filters` selects. Received: filters='nope'"),
    ("filters_bn", dict(filters="bn_a"), ValueError, r"'bn_a' of type BatchNormalization: only Dense and Conv2D"),
]


@pytest.mark.parametrize("kwargs,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_raise_and_leave_the_model_untouched(cnn, kwargs, exc, match):
    before = weights_of(cnn)
    with pytest.raises(exc, match=match):
        lr.low_rank_factorize(cnn, **kwargs)
    assert_same_weights(cnn, before)


def test_model_errors():
    with pytest.raises(ValueError, match=r"holds tfopt layers .*PruneLowMagnitude.*strip_pruning"):
        lr.low_rank_factorize(tfopt.prune_low_magnitude(mlp()))
    with pytest.raises(ValueError, match="needs a built model"):
        lr.low_rank_factorize(keras.Sequential([L.Dense(2)]))
    with pytest.raises(TypeError, match=r"Received: model='x'"):
        lr.low_rank_factorize("x")
    no_dense = keras.Sequential([keras.Input((4, 4, 2)), L.Flatten()])
    with pytest.raises(ValueError, match="No Dense or Conv2D layer"):
        lr.low_rank_factorize(no_dense)

    class Sub(keras.Model):
        def call(self, x):
            return x

    sub = Sub()
    sub.build((None, 3))
    with pytest.raises(ValueError, match="subclassed model"):
        lr.low_rank_factorize(sub)
