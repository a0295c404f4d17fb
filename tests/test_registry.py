"""Every claim of every row of `tfopt.registry` is proved on a real layer of that type.

One parametrized test per claim, over every row: a row that says a weight is prunable must be pruned, a
"kernel" QAT row must train with its kernel fake-quantized, a factorizable row must factorize, a channel
role must let `prune_channels` through. A row nobody can build here fails the factory check.
"""

import keras
import numpy as np
import pytest
from keras import ops

import tfopt
from tfopt import registry

L = keras.layers

# How to build a small instance of each row's class: (constructor, input shape without batch).
_D1, _D2, _D3 = (8, 4), (8, 8, 4), (4, 4, 4, 2)
FACTORY = {
    L.Dense: (lambda: L.Dense(6), (4,)),
    L.EinsumDense: (lambda: L.EinsumDense("ab,bc->ac", output_shape=6), (4,)),
    L.Conv1D: (lambda: L.Conv1D(6, 3), _D1),
    L.Conv2D: (lambda: L.Conv2D(6, 3), _D2),
    L.Conv3D: (lambda: L.Conv3D(6, 2), _D3),
    L.Conv1DTranspose: (lambda: L.Conv1DTranspose(6, 3), _D1),
    L.Conv2DTranspose: (lambda: L.Conv2DTranspose(6, 3), _D2),
    L.Conv3DTranspose: (lambda: L.Conv3DTranspose(6, 2), _D3),
    L.DepthwiseConv1D: (lambda: L.DepthwiseConv1D(3, depth_multiplier=2), _D1),
    L.DepthwiseConv2D: (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), _D2),
    L.SeparableConv1D: (lambda: L.SeparableConv1D(6, 3), _D1),
    L.SeparableConv2D: (lambda: L.SeparableConv2D(6, 3), _D2),
    L.Embedding: (lambda: L.Embedding(20, 8), "tokens"),
    L.SimpleRNN: (lambda: L.SimpleRNN(8), _D1),
    L.LSTM: (lambda: L.LSTM(8), _D1),
    L.GRU: (lambda: L.GRU(8), _D1),
    L.MultiHeadAttention: (lambda: L.MultiHeadAttention(2, 4), "attention"),
    L.BatchNormalization: (lambda: L.BatchNormalization(), _D2),
    L.PReLU: (lambda: L.PReLU(), _D2),
    L.LayerNormalization: (lambda: L.LayerNormalization(), _D1),
    L.GroupNormalization: (lambda: L.GroupNormalization(2), _D2),
    L.UnitNormalization: (lambda: L.UnitNormalization(), _D1),
    L.Normalization: (lambda: L.Normalization(mean=0.0, variance=1.0), _D1),
    L.Dropout: (lambda: L.Dropout(0.1), _D2),
    L.GaussianNoise: (lambda: L.GaussianNoise(0.1), _D2),
    L.GaussianDropout: (lambda: L.GaussianDropout(0.1), _D2),
    L.AlphaDropout: (lambda: L.AlphaDropout(0.1), _D2),
    L.ActivityRegularization: (lambda: L.ActivityRegularization(), _D2),
    L.Identity: (lambda: L.Identity(), _D2),
    L.ReLU: (lambda: L.ReLU(), _D2),
    L.LeakyReLU: (lambda: L.LeakyReLU(), _D2),
    L.ELU: (lambda: L.ELU(), _D2),
    L.RepeatVector: (lambda: L.RepeatVector(2), (4,)),
    L.Reshape: (lambda: L.Reshape((-1,)), _D2),
    L.Flatten: (lambda: L.Flatten(), _D2),
    L.Permute: (lambda: L.Permute((2, 1, 3)), _D2),
    L.Concatenate: (lambda: L.Concatenate(), "pair"),
}
for _cls, _shape in (
    (L.MaxPooling1D, _D1), (L.MaxPooling2D, _D2), (L.MaxPooling3D, _D3), (L.AveragePooling1D, _D1),
    (L.AveragePooling2D, _D2), (L.AveragePooling3D, _D3), (L.GlobalMaxPooling1D, _D1), (L.GlobalMaxPooling2D, _D2),
    (L.GlobalMaxPooling3D, _D3), (L.GlobalAveragePooling1D, _D1), (L.GlobalAveragePooling2D, _D2),
    (L.GlobalAveragePooling3D, _D3), (L.ZeroPadding1D, _D1), (L.ZeroPadding2D, _D2), (L.ZeroPadding3D, _D3),
    (L.Cropping1D, _D1), (L.Cropping2D, _D2), (L.Cropping3D, _D3), (L.UpSampling1D, _D1), (L.UpSampling2D, _D2),
    (L.UpSampling3D, _D3), (L.SpatialDropout1D, _D1), (L.SpatialDropout2D, _D2), (L.SpatialDropout3D, _D3),
):  # fmt: skip
    _args = {"AveragePooling": (2,), "SpatialDropout": (0.1,)}.get(_cls.__name__[:-2].replace("Max", "Average"), ())
    FACTORY[_cls] = ((lambda c=_cls, a=_args: c(*a)), _shape)
for _cls in (L.Add, L.Subtract, L.Multiply, L.Maximum, L.Minimum, L.Average):
    FACTORY[_cls] = (_cls, "pair")


def _hub(name):
    keras_hub = pytest.importorskip("keras_hub")
    if name == "keras_hub>PositionEmbedding":
        return lambda: keras_hub.layers.PositionEmbedding(8), _D1
    return None


def _rows(select=lambda spec: True):
    return [pytest.param(key, id=key if isinstance(key, str) else key.__name__) for key, spec in registry._TABLE.items() if select(spec)]


def _model(key):
    """A Functional model around one layer of the row `key`: (model, the layer, sample inputs)."""
    if isinstance(key, str):
        made = _hub(key)
        if made is None:
            pytest.skip(f"{key} is a composite layer whose row only marks it (tested in test_composite.py)")
        make, shape = made
    else:
        make, shape = FACTORY[key]
    layer, rng = make(), np.random.default_rng(0)
    if shape == "tokens":
        inputs = keras.Input((5,), dtype="int32")
        outputs, x = layer(inputs), rng.integers(0, 20, (4, 5)).astype("int32")
    elif shape in ("pair", "attention"):
        a, b = keras.Input(_D1), keras.Input(_D1)
        inputs, x = [a, b], [rng.random((4, *_D1), dtype=np.float32) for _ in range(2)]
        outputs = layer(a, b) if shape == "attention" else layer([a, b])
    else:
        inputs = keras.Input(shape)
        outputs, x = layer(inputs), rng.random((4, *shape), dtype=np.float32)
    # A consumer on top, so that channel pruning has a hidden layer to shrink.
    head = {2: L.Dense(3), 3: L.Conv1D(4, 1), 4: L.Conv2D(4, 1), 5: L.Conv3D(4, 1)}[len(outputs.shape)]
    return keras.Model(inputs, head(outputs)), layer, x


def test_every_class_row_has_a_factory():
    missing = [k.__name__ for k in registry._TABLE if not isinstance(k, str) and k not in FACTORY]
    assert not missing


def test_every_op_row_names_a_keras_operation():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    names = {c.__name__ for c in subclasses(keras.Operation)}
    assert set(registry.OPS) <= names, set(registry.OPS) - names


def test_marker_rows_only_mark_composite_layers():
    # A row without a factory here marks a keras-hub composite layer whose sub-layers `walk` descends into
    # (tested on the real backbones in test_composite.py): it may claim nothing else.
    for key, spec in registry._TABLE.items():
        if isinstance(key, str) and _hub(key) is None:
            assert spec == registry.LayerSpec(sublayers=True), key


@pytest.mark.parametrize("key", _rows(lambda spec: spec != registry.LayerSpec(sublayers=True)))
def test_named_weights_exist(key):
    spec = registry._TABLE[key]
    _, layer, _ = _model(key)
    assert spec.qat_role in registry.QAT_ROLES and spec.channel_role in (None, *registry.CHANNEL_ROLES)
    assert (spec.qat_role == "kernel") == bool(spec.quantizable)
    assert spec.qat_forward in (None, *registry.QAT_FORWARDS)
    for path in spec.prunable + spec.quantizable:
        assert any(registry.weight_at(layer, path) is v for v in layer.weights)
    for path, axis in zip(spec.quantizable, spec.quant_axis, strict=True):
        assert axis is None or -len(registry.weight_at(layer, path).shape) <= axis < 0
    if spec.activation:
        assert callable(getattr(layer, spec.activation))


@pytest.mark.parametrize("key", _rows(lambda s: s.prunable))
def test_prunable_weights_are_pruned(key):
    model, layer, _ = _model(key)
    pruned = tfopt.prune_low_magnitude(model, filters=f"^{layer.name}$")
    (wrapper,) = tfopt.pruning.pruned_wrappers(pruned)
    wrapper.update_masks(0.5)
    assert len(wrapper.pruned_weights) == len(registry._TABLE[key].prunable)
    for w, _, _ in wrapper.pruned_weights:
        assert np.mean(ops.convert_to_numpy(w) == 0) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("key", _rows(lambda s: s.qat_role == "kernel"))
def test_kernel_rows_train_with_fake_quantized_kernels(key):
    model, layer, x = _model(key)
    qat = tfopt.quantize_model(model)
    assert isinstance(qat.get_layer(f"quant_{layer.name}"), tfopt.QuantizeWrapper)
    qat.compile("adam", "mse")
    y = model.predict(x, verbose=0)
    assert np.isfinite(qat.fit(x, y, epochs=1, verbose=0).history["loss"][0])
    # Quantization changes the output, a little: the kernel path really runs fake-quantized.
    error = np.abs(qat.predict(x, verbose=0) - model.predict(x, verbose=0))
    assert 0 < error.max() < 0.2 * np.abs(y).max() + 0.05


@pytest.mark.parametrize("key", _rows(lambda s: s.qat_role == "same_scale"))
def test_same_scale_rows_add_no_range(key):
    model, layer, x = _model(key)
    qat = tfopt.quantize_model(model)
    mine = [l for l in qat.layers if l.name in (layer.name, f"quant_{layer.name}")]
    assert mine and not any(isinstance(l, tfopt.QuantizeWrapper) and l.quantize_output for l in mine)
    assert np.all(np.isfinite(qat.predict(x, verbose=0)))


@pytest.mark.parametrize("key", _rows(lambda s: s.qat_role == "concat"))
def test_concat_rows_share_one_range(key):
    a = keras.Input(_D2)
    merged = FACTORY[key][0]()([L.Conv2D(4, 1, name="left")(a), L.Conv2D(4, 1, name="right")(a)])
    qat = tfopt.quantize_model(keras.Model(a, L.Conv2D(2, 1)(merged)))
    assert not qat.get_layer("quant_left").quantize_output and not qat.get_layer("quant_right").quantize_output


@pytest.mark.parametrize("key", _rows(lambda s: s.factorizable))
def test_factorizable_rows_factorize(key):
    model, layer, x = _model(key)
    small = tfopt.low_rank_factorize(model, rank=1, filters=f"^{layer.name}$")
    assert small.count_params() < model.count_params()
    assert small.predict(x, verbose=0).shape == model.predict(x, verbose=0).shape


@pytest.mark.parametrize("key", _rows(lambda s: s.channel_role in ("conv", "dense", "separable")))
def test_channel_producers_lose_channels(key):
    model, layer, x = _model(key)
    small = tfopt.prune_channels(model, ratio=0.5)
    assert small.count_params() < model.count_params()
    assert small.predict(x, verbose=0).shape == model.predict(x, verbose=0).shape


@pytest.mark.parametrize("key", _rows(lambda s: s.channel_role in ("channelwise", "elementwise", "spatial")))
def test_channel_pass_through_rows_let_a_producer_shrink(key):
    make, shape = FACTORY[key]
    if shape not in (_D1, _D2, _D3, (4,)):
        pytest.skip("pair inputs are covered by the merge rows")
    inputs = keras.Input(shape)
    conv = {1: L.Dense, 2: L.Conv1D, 3: L.Conv2D, 4: L.Conv3D}[len(shape)]
    x = conv(8)(inputs) if len(shape) == 1 else conv(8, 1)(inputs)
    x = make()(x)
    x = L.Flatten()(x) if len(x.shape) > 2 else x
    model = keras.Model(inputs, L.Dense(3)(x))
    small = tfopt.prune_channels(model, ratio=0.5)
    assert small.count_params() < model.count_params()


@pytest.mark.parametrize("key", _rows(lambda s: s.channel_role == "merge"))
def test_channel_merge_rows_shrink_both_producers_alike(key):
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    x = FACTORY[key][0]()([L.Conv2D(8, 1)(a), L.Conv2D(8, 1)(b)])
    model = keras.Model([a, b], L.Conv2D(2, 1)(x))
    small = tfopt.prune_channels(model, ratio=0.5)
    widths = [l.filters for l in small.layers if isinstance(l, L.Conv2D)]
    assert widths[:2] == [4, 4]


def test_register_layer_refuses_claims_that_cannot_run():
    class Block(keras.layers.Layer):
        pass

    with pytest.raises(ValueError, match="sub-layers"):
        tfopt.register_layer(Block, quantizable=("kernel",), sublayers=True)
    with pytest.raises(ValueError, match="attribute paths"):
        tfopt.register_layer(Block, prunable=("dense/kernel",))
    with pytest.raises(ValueError, match="quant_axis"):
        tfopt.register_layer(Block, quantizable=("kernel",), quant_axis=("last",))
    assert registry.lookup(Block()) is None
