"""The one table of what tfopt knows about each Keras layer type.

Each row says, for a layer class, which of its weights magnitude pruning may
zero, which weights quantization-aware training fake-quantizes (and along
which axis the per-channel scales run), and which attribute holds a fused
activation. Layers without weights need no row: they pass through every
transform. A layer *with* weights and no row is an error, listed once for the
whole model, so nothing is ever skipped silently.

Weight names are attribute paths on the layer, e.g. ``"kernel"`` or
``"cell.recurrent_kernel"`` (an RNN's cell) or ``"query_dense.kernel"``
(a sub-layer of `MultiHeadAttention`).

Users register their own layers with `tfopt.register_layer`.
"""

import dataclasses

import keras

__all__ = ["LayerSpec", "register_layer", "lookup", "weight_at", "unregister_layer"]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What tfopt may do with one layer type.

    Attributes:
        prunable: attribute paths of the weights `prune_low_magnitude` zeroes.
        prune_by_default: if False the layer is pruned only when the user
            selects it explicitly (with `filters=` or by wrapping it alone).
        quantizable: attribute paths of the weights QAT fake-quantizes.
        quant_axis: for each quantizable weight, the axis that carries
            per-channel scales (None: per-tensor).
        activation: name of the attribute holding a fused activation
            (e.g. ``"activation"`` for Dense and Conv), or None.
    """

    prunable: tuple = ()
    prune_by_default: bool = True
    quantizable: tuple = ()
    quant_axis: tuple = ()
    activation: str | None = None


L = keras.layers
_CONV_ROW = LayerSpec(prunable=("kernel",), quantizable=("kernel",), quant_axis=(-1,), activation="activation")

# Ordered: lookup walks the layer's MRO, so a subclass row wins over its base.
_TABLE = {
    # Per-tensor for Dense: the converter rejects per-channel fake-quant on a
    # FULLY_CONNECTED kernel ("'tfl.transpose' op has mismatched quantized axes").
    L.Dense: LayerSpec(prunable=("kernel",), quantizable=("kernel",), quant_axis=(None,), activation="activation"),
    L.EinsumDense: LayerSpec(prunable=("kernel",), quantizable=("kernel",), quant_axis=(None,), activation="activation"),
    L.Conv1D: _CONV_ROW,
    L.Conv2D: _CONV_ROW,
    L.Conv3D: _CONV_ROW,
    # Transposed kernels are (h, w, out, in). QAT quantizes them per tensor (as
    # TFMOT): per-channel fake quant on them fails conversion with "'tfl.transpose'
    # op has mismatched quantized axes of input and output" (measured, TF 2.21).
    # QAT: 1-D depthwise/separable/transposed kernels are quantized per tensor:
    # TF lowers them through an ExpandDims of the fake-quantized kernel, which
    # the converter cannot give per-channel scales (Conv1D is rewritten as a
    # 2-D conv by tfopt.qat_layers, so it keeps per-channel scales).
    L.Conv1DTranspose: LayerSpec(prunable=("kernel",), quantizable=("kernel",), quant_axis=(None,), activation="activation"),
    L.Conv2DTranspose: LayerSpec(prunable=("kernel",), quantizable=("kernel",), quant_axis=(None,), activation="activation"),
    L.Conv3DTranspose: LayerSpec(prunable=("kernel",), quantizable=("kernel",), quant_axis=(None,), activation="activation"),
    # Depthwise kernels are (h, w, in, multiplier); TFLite puts the channels
    # (in * multiplier) last. Pruning them hurts accuracy a lot: opt-in only.
    L.DepthwiseConv1D: LayerSpec(prunable=("kernel",), prune_by_default=False, quantizable=("kernel",), quant_axis=(None,), activation="activation"),
    L.DepthwiseConv2D: LayerSpec(prunable=("kernel",), prune_by_default=False, quantizable=("kernel",), quant_axis=(-2,), activation="activation"),
    # Only the pointwise kernel is pruned (as TFMOT); both are quantized.
    L.SeparableConv1D: LayerSpec(prunable=("pointwise_kernel",), quantizable=("depthwise_kernel", "pointwise_kernel"), quant_axis=(None, None), activation="activation"),
    L.SeparableConv2D: LayerSpec(prunable=("pointwise_kernel",), quantizable=("depthwise_kernel", "pointwise_kernel"), quant_axis=(-2, -1), activation="activation"),
    L.Embedding: LayerSpec(prunable=("embeddings",)),
    L.SimpleRNN: LayerSpec(prunable=("cell.kernel", "cell.recurrent_kernel")),
    L.LSTM: LayerSpec(prunable=("cell.kernel", "cell.recurrent_kernel")),
    L.GRU: LayerSpec(prunable=("cell.kernel", "cell.recurrent_kernel")),
    L.MultiHeadAttention: LayerSpec(
        prunable=("query_dense.kernel", "key_dense.kernel", "value_dense.kernel", "output_dense.kernel")
    ),
    # Normalization layers have weights but stay dense (and are folded or
    # left float by the converter).
    L.BatchNormalization: LayerSpec(),
    L.LayerNormalization: LayerSpec(),
    L.GroupNormalization: LayerSpec(),
    L.UnitNormalization: LayerSpec(),
    L.Normalization: LayerSpec(),
    L.PReLU: LayerSpec(),
}
del L


def register_layer(layer_class, *, prunable=(), prune_by_default=True, quantizable=(), quant_axis=None, activation=None):
    """Tells tfopt how to treat a custom layer class.

    Args:
        layer_class: a subclass of `keras.layers.Layer`.
        prunable: attribute paths of the weights to prune, e.g. ``("kernel",)``.
        prune_by_default: False to prune only when selected with `filters=`.
        quantizable: attribute paths of the weights to fake-quantize in QAT.
        quant_axis: per-channel axis for each quantizable weight (None entries
            for per-tensor). Defaults to per-tensor for every weight.
        activation: attribute holding a fused activation, if any.

    Raises:
        TypeError: `layer_class` is not a Keras layer class.
        ValueError: `quant_axis` does not match `quantizable`.

    Example:
        >>> class Scale(keras.layers.Layer):
        ...     def build(self, shape):
        ...         self.kernel = self.add_weight(shape=shape[-1:])
        ...     def call(self, x):
        ...         return x * self.kernel
        >>> tfopt.register_layer(Scale, prunable=("kernel",))
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(
            "`layer_class` must be a subclass of keras.layers.Layer (the class, not an instance). "
            f"Received: layer_class={layer_class!r}"
        )
    prunable, quantizable = tuple(prunable), tuple(quantizable)
    quant_axis = (None,) * len(quantizable) if quant_axis is None else tuple(quant_axis)
    if len(quant_axis) != len(quantizable):
        raise ValueError(
            "`quant_axis` needs one entry per quantizable weight. "
            f"Received: quantizable={quantizable}, quant_axis={quant_axis}"
        )
    _TABLE[layer_class] = LayerSpec(
        prunable=prunable,
        prune_by_default=prune_by_default,
        quantizable=quantizable,
        quant_axis=quant_axis,
        activation=activation,
    )


def unregister_layer(layer_class):
    """Removes a row added by `register_layer` (no error if absent)."""
    _TABLE.pop(layer_class, None)


def lookup(layer):
    """Returns the `LayerSpec` for `layer`, or None if its type is unknown."""
    for cls in type(layer).__mro__:
        if cls in _TABLE:
            return _TABLE[cls]
    return None


def weight_at(layer, path):
    """Resolves an attribute path like ``"cell.kernel"`` on `layer`."""
    obj = layer
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
