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

Composite layers (layers that own sub-layers: keras-hub's
`TransformerEncoder`, `Bidirectional`, a user's own block) need no row: `walk`
descends into their sub-layers and finds the leaf weights by the same rows.
Only weights a composite layer creates itself (not through a sub-layer) need a
row, so that nothing is guessed.

Rows are keyed by class, or by a class's qualified name
(``"module.QualName"``) or registered name (``"package>Name"``) for classes of
optional packages such as keras-hub, so tfopt never imports them.

Users register their own layers with `tfopt.register_layer`.
"""

import dataclasses

import keras

__all__ = ["LayerSpec", "OPS", "QAT_ROLES", "QAT_FORWARDS", "CHANNEL_ROLES", "Weight", "register_layer", "lookup", "weight_at", "unregister_layer", "walk", "children", "selected", "knowable"]


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
        sublayers: True for a composite layer whose own weights the row
            describes while `walk` still descends into its sub-layers.
        qat_role: how QAT treats the layer: "kernel" (its `quantizable`
            weights are fake-quantized, its output too), "compute" (its
            output is fake-quantized), "same_scale" (its output keeps its
            input's scale: reshapes, pooling, padding), "concat" (inputs and
            output share one scale) or "fuses_relu" (an op the converter fuses
            a following ReLU into).
        qat_forward: for "kernel" rows, which `tfopt.qat_layers` forward
            recomputes the layer from its fake-quantized kernels ("conv",
            "conv1d", "depthwise", "separable", "transpose", "dense"); None
            runs the layer itself with its weights substituted.
        channel_role: how `prune_channels` treats the layer: "conv", "dense",
            "separable" (they produce channels it may remove), "depthwise",
            "channelwise" (per-channel weights, sliced along), "elementwise"
            (any rank), "spatial" (keeps a last channel axis), "merge"
            (several inputs, one channel set), "transpose" (MACs counted, a
            group boundary); None stops a channel group.
        factorizable: `low_rank_factorize` may split its kernel in two.
        input_axis: the kernel axis of input channels in TFLite's layout
            (the groups of N:M sparsity).
    """

    prunable: tuple = ()
    prune_by_default: bool = True
    quantizable: tuple = ()
    quant_axis: tuple = ()
    activation: str | None = None
    sublayers: bool = False
    qat_role: str = "compute"
    qat_forward: str | None = None
    channel_role: str | None = None
    factorizable: bool = False
    input_axis: int = -2


QAT_ROLES = ("kernel", "compute", "same_scale", "concat", "fuses_relu")
QAT_FORWARDS = ("conv", "conv1d", "depthwise", "separable", "transpose", "dense")
CHANNEL_ROLES = ("conv", "dense", "separable", "depthwise", "transpose", "channelwise", "elementwise", "spatial", "merge")


L = keras.layers
_R = dataclasses.replace


def _kernel(forward, axis, channel_role=None, **kw):
    return LayerSpec(
        prunable=("kernel",), quantizable=("kernel",), quant_axis=(axis,), activation="activation", qat_role="kernel",
        qat_forward=forward, channel_role=channel_role, **kw,
    )


def _rows(classes, spec):
    return dict.fromkeys(classes, spec)


_SAME = LayerSpec(qat_role="same_scale")
_ELEMENTWISE = LayerSpec(channel_role="elementwise")
_SPATIAL = LayerSpec(qat_role="same_scale", channel_role="spatial")
_NORM = LayerSpec()  # weights that stay dense (folded or left float by the converter)

# Ordered: lookup walks the layer's MRO, so a subclass row wins over its base.
_TABLE = {
    # Per-tensor for Dense: the converter rejects per-channel fake-quant on a
    # FULLY_CONNECTED kernel ("'tfl.transpose' op has mismatched quantized axes").
    L.Dense: _kernel("dense", None, "dense", factorizable=True),
    # EinsumDense runs itself with its kernel substituted (no rewrite of its equation).
    L.EinsumDense: _kernel(None, None),
    L.Conv1D: _kernel("conv1d", -1, "conv"),
    L.Conv2D: _kernel("conv", -1, "conv", factorizable=True),
    # Per tensor: TensorFlow's per-channel fake-quant gradient takes kernels of rank <= 4 (Conv3D's is 5).
    L.Conv3D: _kernel("conv", None, "conv"),
    # Transposed kernels are (h, w, out, in), their input channels last. QAT quantizes them per tensor (as
    # TFMOT): per-channel fake quant on them fails conversion with "'tfl.transpose' op has mismatched
    # quantized axes of input and output" (measured, TF 2.21).
    **_rows((L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose), _kernel("transpose", None, "transpose", input_axis=-1)),
    # Depthwise kernels are (h, w, in, multiplier); TFLite puts the channels (in * multiplier) last. Pruning
    # them hurts accuracy a lot: opt-in only. 1-D depthwise/separable kernels are quantized per tensor: TF
    # lowers them through an ExpandDims of the fake-quantized kernel, which the converter cannot give
    # per-channel scales (Conv1D is rewritten as a 2-D conv by tfopt.qat_layers, so it keeps them).
    L.DepthwiseConv1D: _kernel("depthwise", None, "depthwise", prune_by_default=False),
    L.DepthwiseConv2D: _kernel("depthwise", -2, "depthwise", prune_by_default=False),
    # Only the pointwise kernel is pruned (as TFMOT); both are quantized.
    **{
        cls: _R(_kernel("separable", None, "separable"), prunable=("pointwise_kernel",),
                quantizable=("depthwise_kernel", "pointwise_kernel"), quant_axis=axes)
        for cls, axes in ((L.SeparableConv1D, (None, None)), (L.SeparableConv2D, (-2, -1)))
    },
    L.Embedding: LayerSpec(prunable=("embeddings",)),
    **_rows((L.SimpleRNN, L.LSTM, L.GRU), LayerSpec(prunable=("cell.kernel", "cell.recurrent_kernel"))),
    L.MultiHeadAttention: LayerSpec(
        prunable=("query_dense.kernel", "key_dense.kernel", "value_dense.kernel", "output_dense.kernel")
    ),
    **_rows((L.BatchNormalization, L.PReLU), LayerSpec(channel_role="channelwise")),
    **_rows((L.LayerNormalization, L.GroupNormalization, L.UnitNormalization, L.Normalization), _NORM),
    # Weightless layers: QAT and channel-pruning roles.
    **_rows((L.Dropout, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout, L.ActivityRegularization, L.Identity),
            _R(_SAME, channel_role="elementwise")),
    **_rows((L.ReLU, L.LeakyReLU, L.ELU, L.RepeatVector), _ELEMENTWISE),
    **_rows((L.Reshape, L.Flatten, L.Permute), _SAME),
    **_rows((L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D, L.AveragePooling2D,
             L.AveragePooling3D, L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
             L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D, L.Cropping2D, L.Cropping3D,
             L.UpSampling1D, L.UpSampling2D, L.UpSampling3D, L.SpatialDropout1D, L.SpatialDropout2D,
             L.SpatialDropout3D), _SPATIAL),
    **_rows((L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D),
            LayerSpec(channel_role="spatial")),
    **_rows((L.Add, L.Subtract), LayerSpec(qat_role="fuses_relu", channel_role="merge")),
    **_rows((L.Multiply, L.Maximum, L.Minimum, L.Average), LayerSpec(channel_role="merge")),
    L.Concatenate: LayerSpec(qat_role="concat"),
    # keras-hub, by name. Position embeddings stay dense unless selected with `filters=`; the ViT patch
    # embedding's class token stays dense, its Conv2D and position Embedding are found by `walk`.
    "keras_hub>PositionEmbedding": LayerSpec(prunable=("position_embeddings",), prune_by_default=False),
    "keras_hub.src.models.vit.vit_layers.ViTPatchingAndEmbedding": LayerSpec(sublayers=True),
}

# `keras.ops` operations (op nodes of a Functional graph such as ``x + y``), by class name.
_ELEMENTWISE_SAME = _R(_SAME, channel_role="elementwise")
OPS = {
    **_rows(("Reshape", "Transpose", "Squeeze", "ExpandDims", "GetItem", "Flatten"), _SAME),
    **_rows(("Identity", "Cast"), _ELEMENTWISE_SAME),
    "Concatenate": LayerSpec(qat_role="concat"),
    **_rows(("Add", "Subtract"), LayerSpec(qat_role="fuses_relu", channel_role="merge")),
    **_rows(("Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Power"), LayerSpec(channel_role="merge")),
    **_rows(("Relu", "Relu6", "Sigmoid", "HardSigmoid", "Tanh", "Silu", "HardSilu", "Gelu", "Elu", "Selu",
             "LeakyRelu", "Softplus", "Softsign", "Absolute", "Negative", "Square", "Sqrt", "Exp", "Log", "Clip"),
            _ELEMENTWISE),
}
del L


def register_layer(
    layer_class, *, prunable=(), prune_by_default=True, quantizable=(), quant_axis=None, activation=None, sublayers=False
):
    """Tells tfopt how to treat a custom layer class.

    Args:
        layer_class: a subclass of `keras.layers.Layer`.
        prunable: attribute paths of the weights to prune, e.g. ``("kernel",)``.
        prune_by_default: False to prune only when selected with `filters=`.
        quantizable: attribute paths of the weights to fake-quantize in QAT.
        quant_axis: per-channel axis for each quantizable weight (None entries
            for per-tensor). Defaults to per-tensor for every weight.
        activation: attribute holding a fused activation, if any.
        sublayers: True if the layer also holds sub-layers whose weights
            tfopt should find by their own rows (the row then only describes
            the weights the layer creates itself).

    Raises:
        TypeError: `layer_class` is not a Keras layer class.
        ValueError: `quant_axis` does not match `quantizable`, a path is not
            an attribute path, or a claim QAT could not run.

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
    if len(quant_axis) != len(quantizable) or not all(a is None or isinstance(a, int) for a in quant_axis):
        raise ValueError(
            "`quant_axis` needs one entry per quantizable weight: an int axis (per-channel) or None (per-tensor). "
            f"Received: quantizable={quantizable}, quant_axis={quant_axis}"
        )
    bad = [p for p in prunable + quantizable if not isinstance(p, str) or not all(s.isidentifier() for s in p.split("."))]
    if bad:
        raise ValueError(
            "Weight paths are attribute paths on the layer, e.g. 'kernel' or 'cell.recurrent_kernel'. "
            f"Received: {bad}"
        )
    if quantizable and sublayers:
        # QAT wraps whole layers and does not descend into sub-layers: such a claim could not run.
        raise ValueError(
            f"A `sublayers=True` row cannot name `quantizable` weights: QAT does not descend into sub-layers. Register "
            f"the sub-layers' classes instead. Received: layer_class={layer_class.__name__}, quantizable={quantizable}"
        )
    # A registered layer with quantizable weights is run by QAT with its weights substituted (no rewrite).
    _TABLE[layer_class] = LayerSpec(
        prunable=prunable, prune_by_default=prune_by_default, quantizable=quantizable, quant_axis=quant_axis,
        activation=activation, sublayers=bool(sublayers), qat_role="kernel" if quantizable else "compute",
    )


def unregister_layer(layer_class):
    """Removes a row added by `register_layer` (no error if absent)."""
    _TABLE.pop(layer_class, None)


def lookup(layer):
    """Returns the `LayerSpec` for `layer` (a `keras.ops` operation too), or None if its type is unknown."""
    if not isinstance(layer, keras.layers.Layer):
        return OPS.get(type(layer).__name__)
    for cls in type(layer).__mro__:
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}", keras.saving.get_registered_name(cls)):
            if key in _TABLE:
                return _TABLE[key]
    return None


def weight_at(layer, path):
    """Resolves an attribute path like ``"cell.kernel"`` on `layer`."""
    obj = layer
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass(frozen=True, eq=False)
class Weight:
    """One weight a transform may change, found by `walk`.

    Attributes:
        path: where it sits below the walked layer, by layer names, e.g.
            ``"self_attention_layer/query/kernel"`` (``"kernel"`` for a leaf).
        layer: the leaf layer whose row (or protocol method) names it.
        variable: the variable itself.
        by_default: False for weights transformed only when selected.
    """

    path: str
    layer: object
    variable: object
    by_default: bool = True


def _display_path(layer, attr_path):
    # "query_dense.kernel" -> "query/kernel": sub-layers by their names, the variable by its own.
    parts, obj = [], layer
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
        if isinstance(obj, keras.layers.Layer):
            parts.append(obj.name)
    return "/".join(parts + [obj.name])


def children(layer):
    """The direct sub-layers of `layer`, in attribute order."""
    return layer._flatten_layers(include_self=False, recursive=False)


def walk(layer, protocol=None):
    """The weights tfopt may prune or cluster in `layer`, sub-layers included.

    A layer with a row contributes the row's `prunable` weights (and, for a
    ``sublayers=True`` row, what its sub-layers contribute). A layer without a
    row contributes what `protocol` (e.g. ``"get_prunable_weights"``, TFMOT's
    protocol) returns, else what its sub-layers contribute; weights it creates
    itself are then *unplaced*: tfopt does not know whether they may change.

    Args:
        layer: a Keras layer (a model too).
        protocol: name of a method returning the weights of layers without a
            row (pruning: ``"get_prunable_weights"``), or None.

    Returns:
        ``(weights, unplaced)``: a list of `Weight` in a fixed order (rows'
        order, then sub-layers in attribute order), and the paths of the
        unplaced weights.
    """
    weights, unplaced = [], []
    _walk(layer, "", protocol, weights, unplaced, set())
    return weights, unplaced


def selected(layer, positions=None, protocol=None):
    """The weights of `layer` at `positions` in `walk` order, or its default ones for None.

    Positions, not paths, identify the weights a wrapper transforms: `walk`
    order is fixed by the layer's code, while the names of sub-layers a
    composite layer creates without naming them change with every copy or load.
    Defaults: a leaf layer wrapped alone is a selection, so every weight its
    row names; a composite layer, the weights its sub-layers' rows transform
    by default.

    Raises:
        ValueError: a position that `walk` does not find.
    """
    found, _ = walk(layer, protocol)
    if positions is None:
        return [w for w in found if w.by_default or w.layer is layer]
    if any(not 0 <= i < len(found) for i in positions):
        raise ValueError(
            f"Layer '{layer.name}' of type {type(layer).__name__} has {len(found)} weights tfopt can transform "
            f"({[w.path for w in found]}), fewer than the positions asked for. Received: positions={tuple(positions)}"
        )
    return [found[i] for i in positions]


def knowable(layer, protocol=None):
    """True if `layer`'s type can hold weights `walk` finds (its type alone decides; unbuilt layers too)."""
    spec = lookup(layer)
    if spec is not None:
        return bool(spec.prunable) or spec.sublayers
    return bool(protocol and hasattr(layer, protocol)) or bool(children(layer))


def _walk(layer, prefix, protocol, weights, unplaced, seen):
    if id(layer) in seen:  # a sub-layer shared by two parents: its weights once
        return
    seen.add(id(layer))
    spec = lookup(layer)
    if spec is None and protocol and hasattr(layer, protocol):
        for item in getattr(layer, protocol)():
            name, v = item if isinstance(item, tuple) else (item.name, item)  # clustering's protocol: (name, var)
            weights.append(Weight(prefix + str(name), layer, v))
        return
    if spec is not None:
        for attr in spec.prunable:
            v = weight_at(layer, attr)
            weights.append(Weight(prefix + _display_path(layer, attr), layer, v, spec.prune_by_default))
        if not spec.sublayers:
            return
    subs = children(layer)
    for child in subs:
        _walk(child, f"{prefix}{child.name}/", protocol, weights, unplaced, seen)
    if spec is None:
        owned = {id(v) for child in subs for v in child.weights}
        unplaced.extend(prefix + v.name for v in layer.weights if id(v) not in owned)
