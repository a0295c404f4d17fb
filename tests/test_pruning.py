"""Magnitude pruning: layers, structure, strip, save/load, resume, errors."""

import subprocess
import zipfile
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

import tfopt
import tfopt.callbacks
from conftest import compile_for_test, image_data, tiny_cnn
from helpers import (
    assert_same_weights,
    assert_save_load,
    assert_sparsity,
    masks_of,
    weights_of,
    zero_fraction,
)

# No TensorFlow in these tests: `make test-backends` runs them under JAX and PyTorch too.
pytestmark = pytest.mark.backend_independent

L = keras.layers


def fit_pruned(model, x, y, epochs=2, batch_size=16, callbacks=()):
    compile_for_test(model)
    return model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[tfopt.callbacks.UpdatePruningStep(), *callbacks],
    )


def single_layer_model(layer, input_shape, dtype="float32"):
    inputs = keras.Input(input_shape, dtype=dtype)
    x = layer(inputs) if not isinstance(layer, L.MultiHeadAttention) else layer(inputs, inputs)
    x = L.Flatten()(x)
    return keras.Model(inputs, L.Dense(2)(x))


LAYERS = [
    ("dense", lambda: L.Dense(8), (6,)),
    ("conv1d", lambda: L.Conv1D(8, 3), (10, 4)),
    ("conv2d", lambda: L.Conv2D(8, 3), (6, 6, 4)),
    ("conv3d", lambda: L.Conv3D(4, 2), (4, 4, 4, 2)),
    ("conv1d_transpose", lambda: L.Conv1DTranspose(4, 3), (6, 4)),
    ("conv2d_transpose", lambda: L.Conv2DTranspose(4, 3), (5, 5, 4)),
    ("conv3d_transpose", lambda: L.Conv3DTranspose(4, 2), (3, 3, 3, 2)),
    ("separable_conv1d", lambda: L.SeparableConv1D(8, 3), (10, 4)),
    ("separable_conv2d", lambda: L.SeparableConv2D(8, 3), (6, 6, 4)),
    ("einsum_dense", lambda: L.EinsumDense("ab,bc->ac", 8), (6,)),
    ("multi_head_attention", lambda: L.MultiHeadAttention(2, 4), (5, 8)),
    ("simple_rnn", lambda: L.SimpleRNN(6), (5, 4)),
    ("lstm", lambda: L.LSTM(6), (5, 4)),
    ("gru", lambda: L.GRU(6), (5, 4)),
]


@pytest.mark.parametrize("make,shape", [l[1:] for l in LAYERS], ids=[l[0] for l in LAYERS])
def test_each_supported_layer_reaches_target_sparsity(make, shape):
    model = single_layer_model(make(), shape)
    rng = np.random.default_rng(0)
    x = rng.random((16, *shape), dtype=np.float32)
    y = rng.integers(0, 2, 16)
    pruned = tfopt.prune_low_magnitude(model, tfopt.ConstantSparsity(0.6, 0, frequency=1))
    fit_pruned(pruned, x, y, epochs=1, batch_size=8)
    assert_sparsity(pruned, 0.6)
    stripped = tfopt.strip_pruning(pruned)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6)


def test_embedding_is_pruned():
    model = keras.Sequential([keras.Input((5,), dtype="int32"), L.Embedding(30, 8), L.Flatten(), L.Dense(2)])
    x, y = np.random.default_rng(0).integers(0, 30, (16, 5)), np.zeros(16, "int32")
    pruned = tfopt.prune_low_magnitude(model, tfopt.ConstantSparsity(0.5, 0, frequency=1))
    fit_pruned(pruned, x, y, epochs=1, batch_size=8)
    assert [r["type"] for r in assert_sparsity(pruned, 0.5).rows] == ["Embedding", "Dense"]


def test_sequential_nested_and_functional(data):
    x, y = data
    inner = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3), L.ReLU()], name="inner")
    inputs = keras.Input((8, 8, 3))
    outputs = L.Dense(4)(L.Flatten()(inner(inputs)))
    model = keras.Model(inputs, outputs)
    pruned = tfopt.prune_low_magnitude(model, tfopt.ConstantSparsity(0.5, 0, frequency=2))
    fit_pruned(pruned, x, y, epochs=1)
    report = assert_sparsity(pruned, 0.5)
    assert [r["type"] for r in report.rows] == ["Conv2D", "Dense"]


def test_user_model_is_never_modified(cnn, data):
    x, y = data
    before = weights_of(cnn)
    pruned = tfopt.prune_low_magnitude(cnn, tfopt.ConstantSparsity(0.8, 0, frequency=1))
    fit_pruned(pruned, x, y)
    assert_same_weights(cnn, before)
    assert zero_fraction(cnn.get_layer("conv_a").kernel) == 0.0
    assert not any(a is b for a in pruned.layers for b in cnn.layers)


def test_masked_weights_are_zero_in_the_variables_and_forward_pass(cnn, data):
    x, y = data
    pruned = tfopt.prune_low_magnitude(cnn, tfopt.ConstantSparsity(0.7, 0, frequency=3))
    # Momentum keeps pushing pruned weights; the mask constraint must hold them at zero.
    compile_for_test(pruned)
    pruned.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    for wrapper in [l for l in pruned.layers if isinstance(l, tfopt.PruneLowMagnitude)]:
        for weight, mask, threshold in wrapper.pruned_weights:
            w, m = np.array(weight), np.array(mask)
            assert np.all(w[m == 0] == 0)
            assert 0.65 < 1 - m.mean() < 0.75
            assert float(threshold) > 0


def test_masks_update_only_on_schedule_steps(cnn, data):
    x, y = data
    schedule = tfopt.ConstantSparsity(0.5, begin_step=3, end_step=3, frequency=1)
    pruned = tfopt.prune_low_magnitude(cnn, schedule)
    compile_for_test(pruned)
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            # Through self.model: on JAX that attaches the trained values to the variables.
            seen.append(zero_fraction(self.model.get_layer("prune_low_magnitude_logits").layer.kernel))

    pruned.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
               callbacks=[tfopt.callbacks.UpdatePruningStep(), Probe()])
    assert seen[:2] == [0.0, 0.0]
    assert seen[2] == pytest.approx(0.5, abs=0.01)
    assert seen[-1] == seen[2]  # frozen after end_step: no further update


def test_pruning_step_follows_optimizer_iterations(cnn, data):
    x, y = data
    pruned = tfopt.prune_low_magnitude(cnn)
    fit_pruned(pruned, x, y, epochs=3)
    steps = {int(l.pruning_step) for l in pruned.layers if isinstance(l, tfopt.PruneLowMagnitude)}
    assert steps == {int(pruned.optimizer.iterations)} == {12}


def test_masks_are_monotone(cnn, data):
    x, y = data
    pruned = tfopt.prune_low_magnitude(cnn, tfopt.ConstantSparsity(0.5, 0, frequency=1))
    compile_for_test(pruned, lr=0.1)
    history = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            history.append(masks_of(self.model))  # self.model: synced on JAX

    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep(), Probe()])
    for before, after in zip(history, history[1:]):
        for key in before:
            assert np.all(after[key] <= before[key])



@pytest.mark.parametrize(
    "schedule",
    [tfopt.ConstantSparsity(0.5, 0, frequency=1), tfopt.PolynomialDecay(0.0, 0.6, 0, end_step=6, frequency=1)],
    ids=["constant", "polynomial"],
)
def test_skipped_mask_updates_equal_recomputed_ones(cnn, data, schedule):
    """An update skipped because the kept count is unchanged gives the masks a full recomputation gives."""
    x, y = data
    pruned = tfopt.prune_low_magnitude(cnn, schedule)
    wrappers = [l for l in pruned.layers if isinstance(l, tfopt.PruneLowMagnitude)]
    computed = []
    for w in wrappers:  # count the masks that really get recomputed
        original = w._compute_mask

        def counting(*args, _original=original):
            computed.append(1)
            return _original(*args)

        w._compute_mask = counting
    compile_for_test(pruned, lr=0.1)
    mismatches = []

    class Check(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):  # runs after UpdatePruningStep (listed after it)
            step = int(ops.convert_to_numpy(wrappers[0].pruning_step)) + 1
            _, sparsity = schedule(step)
            for w in wrappers:
                for v, mask, _ in w.pruned_weights:
                    m = np.asarray(ops.convert_to_numpy(mask))
                    fresh, _ = tfopt.pruning._keep_top(np.where(m.reshape(-1) > 0, np.abs(ops.convert_to_numpy(v)).reshape(-1), -1.0), sparsity)
                    if not np.array_equal(fresh.reshape(m.shape), m):
                        mismatches.append((step, v.path))

    pruned.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
               callbacks=[tfopt.callbacks.UpdatePruningStep(), Check()])
    assert not mismatches
    per_step = len([v for w in wrappers for v in w.pruned_weights])
    if isinstance(schedule, tfopt.ConstantSparsity):
        assert len(computed) == per_step  # 16 steps due, but only the first changes anything
    else:
        assert per_step < len(computed) <= per_step * 6  # only the 6 ramp steps can change a mask
def test_wrapping_a_stripped_model_keeps_its_sparsity(cnn, data):
    x, y = data
    pruned = tfopt.prune_low_magnitude(cnn, tfopt.ConstantSparsity(0.8, 0, frequency=1))
    fit_pruned(pruned, x, y, epochs=1)
    stripped = tfopt.strip_pruning(pruned)
    before = tfopt.sparsity_report(stripped)
    again = tfopt.prune_low_magnitude(stripped, tfopt.PolynomialDecay(0.0, 0.9, 0, 8, frequency=1))
    assert tfopt.sparsity_report(again).sparsity == pytest.approx(before.sparsity)
    fit_pruned(again, x, y, epochs=1, batch_size=32)  # 2 steps: the schedule asks for ~0.52 only
    after = tfopt.sparsity_report(again)
    for b, a in zip(before.rows, after.rows):
        assert a["zeros"] >= b["zeros"]


def test_strip_pruning_leaves_no_tfopt_layers(cnn, data, tmp_path):
    x, y = data
    pruned = tfopt.prune_low_magnitude(cnn, tfopt.ConstantSparsity(0.5, 0, frequency=2))
    fit_pruned(pruned, x, y, epochs=1)
    stripped = tfopt.strip_pruning(pruned)
    assert not [l for l in stripped._flatten_layers() if type(l).__module__.startswith("tfopt")]
    np.testing.assert_array_equal(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0))
    assert_sparsity(stripped, 0.5)
    stripped.save(tmp_path / "plain.keras")
    with zipfile.ZipFile(tmp_path / "plain.keras") as archive:
        assert "tfopt" not in archive.read("config.json").decode()


@pytest.mark.parametrize(
    "options",
    [{}, {"block_size": (1, 4), "block_pooling_type": "MAX"}, {"sparsity_m_by_n": (2, 4)}],
    ids=["unstructured", "block", "m_by_n"],
)
def test_save_load_keeps_everything(options, tmp_path):
    x, y = image_data(shape=(8, 8, 4))
    inputs = keras.Input((8, 8, 4))
    h = L.Conv2D(8, 3)(inputs)
    model = keras.Model(inputs, L.Dense(4)(L.Flatten()(h)))
    pruned = tfopt.prune_low_magnitude(model, tfopt.PolynomialDecay(0.0, 0.5, 0, 4, frequency=2), **options)
    fit_pruned(pruned, x, y, epochs=1)
    loaded = assert_save_load(pruned, x, tmp_path / "pruned.keras")
    for a, b in zip(
        [l for l in pruned.layers if isinstance(l, tfopt.PruneLowMagnitude)],
        [l for l in loaded.layers if isinstance(l, tfopt.PruneLowMagnitude)],
    ):
        for key in ("pruning_schedule", "block_size", "block_pooling_type", "sparsity_m_by_n"):
            assert b.get_config()[key] == a.get_config()[key]
        assert int(b.pruning_step) == int(a.pruning_step) == 4
    for key, mask in masks_of(pruned).items():
        np.testing.assert_array_equal(masks_of(loaded)[key], mask)


def test_block_sparsity_prunes_whole_blocks():
    model = keras.Sequential([keras.Input((16,)), L.Dense(8), L.Dense(2)])
    pruned = tfopt.prune_low_magnitude(model, tfopt.ConstantSparsity(0.5, 0, frequency=1), block_size=(2, 4))
    x, y = np.random.default_rng(0).random((16, 16), dtype=np.float32), np.zeros(16, "int32")
    fit_pruned(pruned, x, y, epochs=1, batch_size=8)
    kernel = np.array(pruned.layers[0].layer.kernel)
    blocks = (kernel.reshape(8, 2, 2, 4) != 0).any(axis=(1, 3))
    assert blocks.mean() == pytest.approx(0.5)
    for i in range(8):
        for j in range(2):
            block = kernel[2 * i : 2 * i + 2, 4 * j : 4 * j + 4]
            assert np.all(block == 0) or np.all(block != 0)


@pytest.mark.parametrize("m_by_n", [(2, 4), (1, 4), (3, 8)], ids=str)
def test_m_by_n_along_input_channels(m_by_n):
    m, n = m_by_n
    inputs = keras.Input((6, 6, 8))
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(L.Conv2D(16, 3)(inputs))))
    pruned = tfopt.prune_low_magnitude(model, sparsity_m_by_n=m_by_n, pruning_schedule=tfopt.ConstantSparsity(0.5, 0, frequency=1), filters="conv")
    x, y = np.random.default_rng(0).random((8, 6, 6, 8), dtype=np.float32), np.zeros(8, "int32")
    fit_pruned(pruned, x, y, epochs=1, batch_size=4)
    kernel = np.array(pruned.layers[1].layer.kernel)  # (3, 3, in=8, out=16)
    groups = np.moveaxis(kernel, 2, -1).reshape(-1, n)
    assert np.all((groups == 0).sum(axis=1) == m)


def test_m_by_n_rejects_layers_whose_inputs_do_not_divide():
    model = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(4, 3), L.Flatten(), L.Dense(2)])
    with pytest.raises(ValueError, match=r"1 input channels, not a multiple of 4.*filters="):
        tfopt.prune_low_magnitude(model, sparsity_m_by_n=(2, 4))


def test_depthwise_is_opt_in():
    model = keras.Sequential([keras.Input((6, 6, 4)), L.DepthwiseConv2D(3), L.Conv2D(4, 1), L.Flatten(), L.Dense(2)])
    default = tfopt.prune_low_magnitude(model)
    assert [type(l).__name__ for l in default.layers] == ["DepthwiseConv2D", "PruneLowMagnitude", "Flatten", "PruneLowMagnitude"]
    chosen = tfopt.prune_low_magnitude(model, filters=lambda layer: isinstance(layer, L.DepthwiseConv2D))
    assert [type(l).__name__ for l in chosen.layers] == ["PruneLowMagnitude", "Conv2D", "Flatten", "Dense"]


@pytest.mark.parametrize(
    "filters,expected",
    [("conv", ["conv_a", "conv_b"]), (["^logits$", "conv_b"], ["conv_b", "logits"]), (lambda l: l.name == "logits", ["logits"])],
    ids=["regex", "list", "callable"],
)
def test_filters_select_layers(cnn, filters, expected):
    pruned = tfopt.prune_low_magnitude(cnn, filters=filters)
    assert [l.layer.name for l in pruned.layers if isinstance(l, tfopt.PruneLowMagnitude)] == expected


def test_single_layer_inside_a_subclassed_model(data):
    x, y = data

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.flat = L.Flatten()
            self.dense = tfopt.prune_low_magnitude(L.Dense(4), tfopt.ConstantSparsity(0.5, 0, frequency=1))

        def call(self, inputs):
            return self.dense(self.flat(inputs))

    net = Net()
    fit_pruned(net, x, y, epochs=1)
    assert zero_fraction(net.dense.layer.kernel) == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
def test_resume_from_keras_checkpoint_matches_uninterrupted_run(tmp_path):
    x, y = image_data(n=64)
    schedule = tfopt.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=12, frequency=2)

    def fresh():
        keras.utils.set_random_seed(7)
        return compile_for_test(tfopt.prune_low_magnitude(tiny_cnn(), schedule))

    full = fresh()
    full.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])

    part = fresh()
    part.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    part.save(tmp_path / "mid.keras")
    resumed = keras.saving.load_model(tmp_path / "mid.keras")
    resumed.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])

    assert int(resumed.optimizer.iterations) == int(full.optimizer.iterations) == 16
    full_masks, resumed_masks = masks_of(full), masks_of(resumed)
    assert full_masks.keys() == resumed_masks.keys()
    for key in full_masks:
        np.testing.assert_array_equal(resumed_masks[key], full_masks[key])
    np.testing.assert_allclose(resumed.predict(x, verbose=0), full.predict(x, verbose=0), atol=1e-5)


@pytest.mark.slow
def test_backup_and_restore_resumes_the_schedule(tmp_path):
    x, y = image_data(n=64)
    schedule = tfopt.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=12, frequency=2)

    def fresh():
        keras.utils.set_random_seed(7)
        return compile_for_test(tfopt.prune_low_magnitude(tiny_cnn(), schedule))

    full = fresh()
    full.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    backup = str(tmp_path / "backup")
    model = fresh()
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0, callbacks=[
            tfopt.callbacks.UpdatePruningStep(), keras.callbacks.BackupAndRestore(backup), Interrupt()])
    restarted = fresh()  # a new process would rebuild the model from code like this
    restarted.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0, callbacks=[
        tfopt.callbacks.UpdatePruningStep(), keras.callbacks.BackupAndRestore(backup)])
    for key, mask in masks_of(full).items():
        np.testing.assert_array_equal(masks_of(restarted)[key], mask)


@pytest.mark.slow
def test_mirrored_strategy_two_logical_cpus():
    script = textwrap.dedent(
        """
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, numpy as np, tfopt, tfopt.callbacks
        keras.utils.set_random_seed(0)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            inputs = keras.Input((8, 8, 3))
            h = keras.layers.Flatten()(keras.layers.Conv2D(8, 3)(inputs))
            model = keras.Model(inputs, keras.layers.Dense(4)(h))
            pruned = tfopt.prune_low_magnitude(model, tfopt.PolynomialDecay(0.0, 0.75, 0, 8, frequency=2))
            pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.random.rand(64, 8, 8, 3).astype("float32"); y = np.random.randint(0, 4, 64)
        pruned.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])
        for wrapper in [l for l in pruned.layers if isinstance(l, tfopt.PruneLowMagnitude)]:
            for weight, mask, _ in wrapper.pruned_weights:
                replicas = [np.array(v) for v in weight.value.values]
                masks = [np.array(v) for v in mask.value.values]
                assert len(replicas) == 2, len(replicas)
                assert all(np.array_equal(replicas[0], r) for r in replicas)
                assert all(np.array_equal(masks[0], m) for m in masks)
                assert abs((1 - masks[0].mean()) - 0.75) < 0.01, masks[0].mean()
                assert np.all(replicas[0][masks[0] == 0] == 0)
        print("MIRRORED_OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "MIRRORED_OK" in result.stdout, result.stderr[-3000:]


# -- bad input: a clear error, and the user's model untouched -------------------


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(2)

    def call(self, x):
        return self.dense(x)


class Custom(L.Layer):
    def build(self, shape):
        self.kernel = self.add_weight(shape=(shape[-1], 2))

    def call(self, x):
        return ops.matmul(x, self.kernel)


def model_with_custom_layers():
    inputs = keras.Input((4,))
    a = Custom(name="custom_a")(inputs)
    b = Custom(name="custom_b")(inputs)
    return keras.Model(inputs, L.Add()([a, b]))


BAD_CALLS = [
    ("not_a_model", lambda m: tfopt.prune_low_magnitude("model.keras"), TypeError, "Received: to_prune='model.keras'"),
    ("schedule_not_schedule", lambda m: tfopt.prune_low_magnitude(m, pruning_schedule=0.5), TypeError, "pruning_schedule"),
    ("block_size_zero", lambda m: tfopt.prune_low_magnitude(m, block_size=(0, 4)), ValueError, "block_size"),
    ("block_size_three", lambda m: tfopt.prune_low_magnitude(m, block_size=(1, 2, 3)), ValueError, "block_size"),
    ("block_pooling", lambda m: tfopt.prune_low_magnitude(m, block_pooling_type="MEDIAN"), ValueError, "AVG"),
    ("m_by_n_order", lambda m: tfopt.prune_low_magnitude(m, sparsity_m_by_n=(4, 2)), ValueError, "0 < m < n"),
    ("m_by_n_and_block", lambda m: tfopt.prune_low_magnitude(m, sparsity_m_by_n=(2, 4), block_size=(1, 2)), ValueError, "cannot be combined"),
    ("filters_type", lambda m: tfopt.prune_low_magnitude(m, filters=3), TypeError, "filters"),
    ("filters_match_nothing", lambda m: tfopt.prune_low_magnitude(m, filters="nope"), ValueError, "selected no prunable layer"),
    ("already_pruned", lambda m: tfopt.prune_low_magnitude(tfopt.prune_low_magnitude(m)), ValueError, "already wrapped"),
    ("wrapper_of_wrapper", lambda m: tfopt.PruneLowMagnitude(tfopt.PruneLowMagnitude(L.Dense(2))), ValueError, "already wrapped"),
    ("subclassed_unbuilt", lambda m: tfopt.prune_low_magnitude(Subclassed()), ValueError, "built subclassed model"),
    ("unbuilt", lambda m: tfopt.prune_low_magnitude(keras.Sequential([L.Dense(2)])), ValueError, "built model"),
    ("unsupported_layers", lambda m: tfopt.prune_low_magnitude(model_with_custom_layers()), ValueError,
     r"'custom_a' of type Custom \(weights custom_a/\w+\), 'custom_b' of type Custom.*register_layer.*filters="),
    ("strip_not_model", lambda m: tfopt.strip_pruning(L.Dense(2)), TypeError, "Sequential or Functional"),
    ("report_not_model", lambda m: tfopt.sparsity_report("x"), TypeError, "keras model or layer"),
]


@pytest.mark.parametrize("call,error,match", [b[1:] for b in BAD_CALLS], ids=[b[0] for b in BAD_CALLS])
def test_bad_input_is_reported_and_model_untouched(cnn, call, error, match):
    before = weights_of(cnn)
    names = [l.name for l in cnn.layers]
    with pytest.raises(error, match=match):
        call(cnn)
    assert_same_weights(cnn, before)
    assert [l.name for l in cnn.layers] == names


def test_registering_a_custom_layer_makes_it_prunable():
    tfopt.register_layer(Custom, prunable=("kernel",))
    try:
        pruned = tfopt.prune_low_magnitude(model_with_custom_layers())
        assert sum(isinstance(l, tfopt.PruneLowMagnitude) for l in pruned.layers) == 2
    finally:
        tfopt.registry.unregister_layer(Custom)


def test_training_without_the_callback_names_it(cnn, data):
    x, y = data
    pruned = compile_for_test(tfopt.prune_low_magnitude(cnn))
    with pytest.raises(ValueError, match="UpdatePruningStep"):
        pruned.fit(x, y, epochs=1, verbose=0)


def test_sparsity_report_prints_and_converts(cnn, data):
    x, y = data
    pruned = tfopt.prune_low_magnitude(cnn, tfopt.ConstantSparsity(0.5, 0, frequency=1))
    fit_pruned(pruned, x, y, epochs=1)
    report = tfopt.sparsity_report(pruned)
    text = str(report)
    assert text.splitlines()[0].split() == ["layer", "type", "weights", "zeros", "sparsity"]
    assert "prune_low_magnitude_conv_a" in text and "50.0%" in text
    as_dict = report.to_dict()
    assert [r["type"] for r in as_dict["layers"]] == ["Conv2D", "Conv2D", "Dense"]
    assert as_dict["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_steps_per_execution(cnn, data):
    x, y = data
    pruned = tfopt.prune_low_magnitude(cnn, tfopt.PolynomialDecay(0.0, 0.5, 0, 6, frequency=3))
    pruned.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   steps_per_execution=2)
    pruned.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    assert_sparsity(pruned, 0.5)
    steps = {int(l.pruning_step) for l in pruned.layers if isinstance(l, tfopt.PruneLowMagnitude)}
    assert steps == {int(pruned.optimizer.iterations)} == {16}
