"""Int8-friendly forward passes of layers whose stock Keras forward has no int8 TFLite kernel path.

These stock forwards keep a float tensor inside an otherwise int8 graph, or ruin its calibration:

- `LayerNormalization` computes `x * inv - mean * inv`; the converter lowers `-mean` to a NEG that has no int8
  kernel, so the file carries DEQUANTIZE -> float NEG -> QUANTIZE. The same statistics written as
  `(x - mean) * rsqrt(mean((x - mean)^2) + eps)` lower to SUB, MUL, MEAN, ADD, RSQRT: every one has an int8 kernel.
- `Softmax` with a mask fills masked scores with -1e9. Calibration then gives the filled tensor a range of 1e9, and
  int8's 255 steps of 4e6 erase every real score. Filling with `min(scores) - MASK_MARGIN` instead keeps the range
  at the scores' own span plus `MASK_MARGIN`; each masked position takes at most `exp(-MASK_MARGIN)` of the
  smallest kept weight from the normalization, far under half an int8 step of the softmax output (1/512), and is
  then set to 0 as Keras does.

`LSTMCell` slices its four gates out of the fused pre-activation: int8 SPLIT needs one scale for all of them,
calibration gives each gate its own, and the converter then leaves the split float. `Add` / `Multiply` of more
than two inputs sum pair by pair (a QAT range for each partial result).

`MultiHeadAttention` is switched to Keras' explicit attention path so that its Softmax, not a fused kernel,
applies the mask. `forms(model)` installs these forwards on every stock layer inside `model` (composite layers and
subclassed models included) for the duration of a `with` block, and restores the layers' own forwards after it, so
a conversion traced inside the block sees the int8-friendly graph and the user's model is left as it was.
"""

import contextlib
import types

import keras
from keras import ops

from tfopt import _graph

MASK_MARGIN = 12.0  # exp(-12) = 6e-6: what a masked score can take from the normalization, far below 1/512

_TAPS = []  # the innermost `tapping` function, if any


@contextlib.contextmanager
def tapping(tap):
    """Within the block the forms pass each intermediate tensor through ``tap(layer, site, x, kind, stats)``
    (`stats`: the tensor whose values the range is learned from, when it is not `x` itself).

    `tfopt.qat_composite` taps them with fake quants (the int8 tensors of the file); outside a block they are
    returned as they are.
    """
    _TAPS.append(tap)
    try:
        yield
    finally:
        _TAPS.pop()


def _q(layer, site, x, kind="ema", stats=None):
    return _TAPS[-1](layer, site, x, kind, stats) if _TAPS else x


def _broadcast(layer, value, shape):
    axes = {axis % len(shape) for axis in ([layer.axis] if isinstance(layer.axis, int) else layer.axis)}
    return ops.reshape(ops.cast(value, "float32"), [shape[i] if i in axes else 1 for i in range(len(shape))])


def layer_normalization(layer, inputs):
    """`LayerNormalization` without a negation: SUB, MUL, MEAN, ADD, RSQRT; Keras' result to float rounding."""
    x = ops.cast(inputs, "float32")
    centred = _q(layer, "centred", x - _q(layer, "mean", ops.mean(x, axis=layer.axis, keepdims=True)))
    square = _q(layer, "square", centred * centred)
    variance = _q(layer, "variance", ops.mean(square, axis=layer.axis, keepdims=True))
    variance = _q(layer, "variance_eps", variance + layer.epsilon)
    if _TAPS:
        # int8 rounds a near-zero variance to 0, where int8 RSQRT gives its largest value. The range is learned
        # from the other rows (a row of zero variance would stretch it to 1/sqrt(epsilon) and more), the
        # saturated rows take its upper end as in the file, and the gradient stays finite.
        raw = ops.rsqrt(ops.maximum(variance, 1e-12))
        inverse = _q(layer, "inverse", raw, stats=ops.where(variance > 0, raw, 0.0))
    else:
        inverse = ops.rsqrt(variance)
    # Keras' rms_scaling divides the uncentred input by the standard deviation and ignores beta.
    y = (x if layer.rms_scaling else centred) * inverse
    beta = layer.beta is not None and not layer.rms_scaling
    if layer.gamma is not None:
        y = _q(layer, "normalized", y) * _broadcast(layer, layer.gamma, x.shape)
    if beta:
        y = _q(layer, "scaled", y) + _broadcast(layer, layer.beta, x.shape)
    return ops.cast(y, layer.compute_dtype)  # its output is quantized by the caller


def softmax(layer, inputs, mask=None):
    """`Softmax` with masked scores at `min(scores) - MASK_MARGIN`, not -1e9; masked outputs 0 as in Keras."""
    if mask is None:
        return keras.layers.Softmax.call(layer, inputs)
    keep = mask if keras.backend.standardize_dtype(mask.dtype) == "bool" else ops.greater(mask, 0.5)
    floor = _q(layer, "floor", _q(layer, "min", ops.min(inputs, axis=layer.axis, keepdims=True)) - MASK_MARGIN)
    filled = _q(layer, "filled", ops.where(keep, inputs, floor))
    return ops.where(keep, _q(layer, "probs", keras.layers.Softmax.call(layer, filled), "softmax"), 0.0)


def attention(layer, query, key, value, attention_mask=None, training=None, return_attention_scores=False,
              **kwargs):
    """`MultiHeadAttention` on Keras' explicit path (scale, einsum, masked Softmax, dropout, einsum), its Softmax
    in the int8 form; the fused `ops.dot_product_attention` Keras takes otherwise fills masked scores with -1e9
    itself. The same steps as Keras' `_compute_attention` without the fused branch."""
    if kwargs.get("use_causal_mask"):
        causal = layer._compute_causal_mask(query, value)
        if attention_mask is not None:
            causal = ops.logical_and(ops.cast(attention_mask, "bool"), causal)
        attention_mask = causal
    query = _q(layer, "scaled_query", ops.multiply(query, ops.cast(layer._inverse_sqrt_key_dim, query.dtype)))
    scores = _q(layer, "scores", ops.einsum(layer._dot_product_equation, key, query))
    scores = layer._masked_softmax(scores, attention_mask)
    dropped = layer._dropout_layer(scores, training=training) if layer._dropout > 0.0 else scores
    output = ops.einsum(layer._combine_equation, dropped, value)  # quantized by output_dense's input
    return output, scores if return_attention_scores else None


def merge(layer, inputs):
    """`Add` / `Multiply` of more than two inputs: TFLite's ADD and MUL take two, so each partial result is an
    int8 tensor of its own (marked for QAT); the same order as Keras' own sum."""
    y = inputs[0]
    for i, x in enumerate(inputs[1:]):
        y = _q(layer, f"partial{i}", y) if i else y
        y = y + x if isinstance(layer, keras.layers.Add) else y * x
    return y


def lstm_cell(layer, inputs, states, training=False):
    """`LSTMCell` with its four gates sliced out of the fused pre-activation instead of split: int8 SPLIT wants one
    scale for all four outputs, calibration gives each gate its own, and the converter then leaves it float.
    Keras' own forward in training and for ``implementation=1`` (it splits the kernel, not the activation)."""
    if layer.implementation == 1 or training:
        return keras.layers.LSTMCell.call(layer, inputs, states, training)
    h_tm1, c_tm1 = states[0], states[1]
    z = ops.add(ops.matmul(inputs, layer.kernel), ops.matmul(h_tm1, layer.recurrent_kernel))
    if layer.use_bias:
        z = ops.add(z, layer.bias)
    u = layer.units
    c, o = layer._compute_carry_and_output_fused([z[:, i * u:(i + 1) * u] for i in range(4)], c_tm1)
    h = o * layer.activation(c)
    return h, [h, c]


# (stock class, method, int8-friendly replacement). Only layers still running the stock method are switched: a
# subclass that overrides it computes something else, and the converter's int8 check reports what it lowers to.
FORMS = (
    (keras.layers.LayerNormalization, "call", layer_normalization),
    (keras.layers.Softmax, "call", softmax),
    (keras.layers.MultiHeadAttention, "_compute_attention", attention),
    (keras.layers.Add, "_merge_function", merge),
    (keras.layers.Multiply, "_merge_function", merge),
    (keras.layers.LSTMCell, "call", lstm_cell),
)


@contextlib.contextmanager
def forms(model):
    """Runs every stock layer of `FORMS` inside `model` in its int8-friendly form within the block.

    Yields the layers switched; on leaving the block (an error included) every layer runs its own forward again.
    """
    switched = []
    try:
        for layer in [model, *_graph.sublayers(model)]:
            for cls, method, form in FORMS:
                stock = isinstance(layer, cls) and getattr(type(layer), method) is getattr(cls, method)
                if stock and method not in vars(layer) and not getattr(layer, "_flash_attention", False):
                    object.__setattr__(layer, method, types.MethodType(form, layer))
                    switched.append((layer, method))
        yield [layer for layer, _ in switched]
    finally:
        for layer, method in switched:
            object.__delattr__(layer, method)
