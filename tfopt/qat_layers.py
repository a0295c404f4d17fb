"""The layers a QAT model is made of: `QuantizeWrapper`, `QuantizeLayer`, `QuantizeAnnotate`, `QuantizeConfig`.

`QuantizeWrapper` computes the inner layer's output the way the int8 TFLite kernel will, without ever assigning
to the inner layer's variables. What it does with a layer is read from the layer's `tfopt.registry` row:

- A "kernel" row with a `qat_forward` (Conv, DepthwiseConv, SeparableConv, ConvTranspose, Dense) is recomputed
  with `keras.ops` from fake-quantized kernels. A SeparableConv becomes DEPTHWISE_CONV_2D + CONV_2D in TFLite, so
  the tensor between the two is fake-quantized too.
- A "kernel" row without one (EinsumDense, `tfopt.register_layer(..., quantizable=...)`), and a layer with a user
  `QuantizeConfig`, run their own `call` with the weights replaced by their fake-quantized values (per channel
  along the row's `quant_axis`, or by the config's quantizers) through `tfopt._wrappers.substitute` (the variables
  are never written); the outputs are fake-quantized.
- A BatchNormalization that follows a recomputed layer is held by the wrapper (`batch_norm`) and folded: with
  ``s = gamma / sqrt(moving_variance + eps)`` the kernel that is fake-quantized is ``W * s`` (per output channel),
  the weights the converter will write. In training (BN not frozen) the output is
  ``BN_batch(conv(x, fq(W * s)) / s + b)``: batch statistics for the forward pass and moving statistics updated as
  usual (the "approximate" fold of PyTorch's ConvBn). In inference, and in training once `freeze_bn_delay` steps
  have passed, it is ``conv(x, fq(W * s)) + beta + (b - moving_mean) * s``: the folded layer the converter emits.
- Activations: relu/relu6/linear are fused by the converter, so the output quantizer sits after them. Any other
  activation of a recomputed layer is a separate TFLite op, so the pre-activation is fake-quantized too;
  sigmoid/softmax/tanh outputs get the fixed ranges of the int8 kernels; hard_sigmoid / hard_swish are decomposed
  into the int8 ops ADD(+3, fused RELU6), MUL(1/6) [, MUL(x)] with a fake quant after each. Weightless layers run
  unchanged, their output fake-quantized; Rescaling with an offset is MUL then ADD, the product fake-quantized.
- Weights with exact zeros when the wrapper is built (a pruned model) keep them: a 0/1 ``<weight>_mask``
  (``weight != 0`` at build time) is multiplied in before fake quant.
- Cluster-preserving QAT (`clustered_weights`): each listed weight is a `tfopt.clustering.Clusters`,
  ``take(centroids * centroid_mask, indices)`` (trainable centroids, fixed int32 indices found from the weight
  when the wrapper is built; a zero cluster pinned at zero with `preserve_sparsity`). With ``M = max|kernel|``
  (over the whole unfolded kernel) and ``f_c`` the BN fold factor (1 without BN), channel ``c`` gets the range
  ``[-|f_c| M, |f_c| M]``, so its folded weight ``kernel * f_c`` quantizes to
  ``sign(f_c) * round(kernel * 127 / M)``: at most `number_of_clusters` int8 values per kernel while every ``f_c``
  has one sign (twice that with mixed-sign gammas: a scale must be positive). Per-tensor kernels (Dense, 1-D
  depthwise, transposed convs) keep the usual ``max|kernel * f|`` range: at most `number_of_clusters` values per
  kernel without BN, per output channel with a folded BN.
- Mixed precision (``mixed_float16``): every variable stays float32; the weight path (BN fold, centroid lookup,
  fake quant) computes in float32, and only the fake-quantized kernel is cast to the compute dtype. Activation
  fake quants run in float32 and cast back.

Variable order (the `.keras` format stores a layer's own variables by
position; never reorder). The inner layer and `batch_norm` own their
variables. The wrapper's own, in this order: for each quantized weight
``<weight>_mask`` (only when `preserve_sparsity`); then the variables of the
`QuantizeConfig` weight quantizers (``weight_<i>_*``), if any; then the
activation quantizers in this order, each with ``_min``, ``_max``,
``_initialized``: ``depthwise_output`` (separable convs), ``pre_activation``
(recomputed layers with a non-fused activation), ``scaled`` (Rescaling with
offset), ``hard_relu6`` and ``hard_sigmoid`` (hard_sigmoid / hard_swish),
``output_<i>`` (one per output when `quantize_output`); then ``step`` (a
counter, only with a folded BatchNormalization); then, for each weight in
`clustered_weights` (in that order), the `Clusters` variables
``<weight>_centroids`` (trainable), ``<weight>_centroid_mask`` and
``<weight>_indices``. Keras stores a layer's trainable variables before its
non-trainable ones, so in the file the ``_centroids`` come first, then the
other variables in the order above.
"""

import contextlib

import keras
import numpy as np
from keras import ops

from tfopt import _checks, _wrappers, registry
from tfopt.clustering import Clusters
from tfopt.quantizers import _MIN_RANGE, FixedRangeQuantizer, LastValueQuantizer, MovingAverageQuantizer, fake_quant

__all__ = ["QuantizeConfig", "QuantizeWrapper", "QuantizeLayer", "QuantizeAnnotate"]

L = keras.layers
_FUSED = ("relu", "relu6", "linear")
_HARD = ("hard_sigmoid", "hard_swish", "hard_silu")
_SILU = ("silu", "swish")  # x * sigmoid(x): TFLite's LOGISTIC output has a fixed range, the MUL its own
# Output ranges fixed by the int8 kernels (TFLite quantization spec).
_FIXED_OUTPUT = {"sigmoid": (0.0, 255.0 / 256.0), "softmax": (0.0, 255.0 / 256.0), "tanh": (-1.0, 127.0 / 128.0)}


def activation_name(fn):
    """The registered name of a Keras activation function ('linear' for None)."""
    if fn is None:
        return "linear"
    name = keras.activations.serialize(fn)
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return name if isinstance(name, str) else getattr(fn, "__name__", str(fn))


def fused_activation(layer):
    """The name of the activation a layer applies to its own output (its registry row's), 'linear' for none."""
    spec = registry.lookup(layer)
    return activation_name(getattr(layer, spec.activation) if spec is not None and spec.activation else None)


def _kernel_row(layer):
    spec = registry.lookup(layer)
    return spec if spec is not None and spec.qat_role == "kernel" else None


def relu_kind(layer):
    """'relu' or 'relu6' when `layer` is a ReLU the converter fuses into the op before it, else None."""
    if isinstance(layer, L.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else None
    name = _weightless_activation(layer)
    return name if name in ("relu", "relu6") else None


def _weightless_activation(layer):
    if isinstance(layer, L.Softmax):
        return "softmax"
    return activation_name(layer.activation) if isinstance(layer, L.Activation) else None


def _check_options(ema_decay, freeze_bn_delay):
    """Validates the arguments `quantize_model` passes on to every QAT layer (it calls this before building)."""
    return (
        _checks.check_fraction(ema_decay, "ema_decay", "It is the decay of the activation ranges, e.g. 0.99."),
        _checks.check_int(freeze_bn_delay, "freeze_bn_delay", 0,
                          "It counts training steps; None never freezes the folded BN.", none_ok=True),
    )


@keras.saving.register_keras_serializable(package="tfopt")
class QuantizeConfig:
    """How a custom layer's weights and outputs are fake-quantized.

    Subclass it for a layer tfopt has no row for, and pass an instance to
    `tfopt.quantize_annotate_layer`. Weights are replaced by their
    fake-quantized values for the duration of the layer's call (the variables
    are never written).

    Methods to override:
        get_weights_and_quantizers(layer): list of ``(variable, Quantizer)``
            pairs; every variable must be a weight of `layer`.
        get_output_quantizers(layer): list of quantizers, one per output
            (or one for a single output). Default: one 8-bit moving-average
            quantizer.
        get_config(): a flat dict of constructor arguments.

    Example:
        >>> class ScaleConfig(tfopt.QuantizeConfig):
        ...     def get_weights_and_quantizers(self, layer):
        ...         return [(layer.kernel, tfopt.quantizers.LastValueQuantizer())]
        >>> layer = tfopt.quantize_annotate_layer(Scale(), ScaleConfig())
    """

    def get_weights_and_quantizers(self, layer):
        return []

    def get_output_quantizers(self, layer):
        return [MovingAverageQuantizer()]

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="tfopt")
class QuantizeLayer(keras.layers.Layer):
    """Fake-quantizes its input with a moving-average range (asymmetric, per tensor).

    Placed on the model inputs (so the int8 model takes int8 inputs with this
    scale) and wherever a quantized layer reads a float tensor.

    Variables, in order: ``min``, ``max``, ``initialized``.

    Args:
        num_bits: bit width.
        ema_decay: moving-average decay of the range, in [0, 1).
        **kwargs: base layer arguments (name, dtype).
    """

    def __init__(self, num_bits=8, ema_decay=0.99, **kwargs):
        super().__init__(**kwargs)
        self.num_bits = num_bits
        self.ema_decay = ema_decay
        self.quantizer = MovingAverageQuantizer(num_bits=num_bits, ema_decay=ema_decay)

    def build(self, input_shape=None):
        self.range_vars = self.quantizer.build(input_shape, "", self)

    def call(self, inputs, training=None):
        return self.quantizer(inputs, training, self.range_vars)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_bits": self.num_bits, "ema_decay": self.ema_decay}


@keras.saving.register_keras_serializable(package="tfopt")
class QuantizeAnnotate(_wrappers.TfoptWrapper):
    """Marks a layer for `tfopt.quantize_apply`; computes exactly like the inner layer.

    Args:
        layer: the layer to quantize.
        quantize_config: a `tfopt.QuantizeConfig`, or None for tfopt's default
            for that layer type.
        **kwargs: base layer arguments.
    """

    technique = "QAT"
    _config_keys = _nested = ("quantize_config",)

    def __init__(self, layer, quantize_config=None, **kwargs):
        super().__init__(layer, **kwargs)
        self.quantize_config = quantize_config

    def call(self, inputs, *args, **kwargs):
        return self.layer(inputs, *args, **kwargs)


def _weight_fq(w, axis, depthwise, max_abs=None, fold=None):
    """Symmetric, narrow-range int8 fake quant of a kernel, per channel along `axis` (None: per tensor).

    With `max_abs` (``max|kernel|`` of a clustered, unfolded kernel) channel ``c`` gets the range
    ``|fold_c| * max_abs`` (`fold`: the BN fold factors, None without BN), as the module docstring explains.
    """
    if axis is None:
        return LastValueQuantizer(per_axis=False)(w)
    shape = w.shape
    if depthwise:  # TFLite's depthwise channel is in * multiplier, in that order
        w = ops.reshape(w, tuple(shape[:-2]) + (shape[-2] * shape[-1],))
        axis = -1
    if max_abs is None:
        y = LastValueQuantizer(per_axis=True, axis=axis)(w)
    else:
        channels = w.shape[axis]
        r = ops.full((channels,), 1.0, dtype=w.dtype) if fold is None else ops.abs(ops.reshape(fold, (channels,)))
        r = ops.maximum(r * max_abs, _MIN_RANGE)
        y = fake_quant(w, -r, r, num_bits=8, narrow_range=True, axis=axis)
    return ops.reshape(y, shape) if depthwise else y


def _cast(x, dtype):
    same = keras.backend.standardize_dtype(x.dtype) == keras.backend.standardize_dtype(dtype)
    return x if same else ops.cast(x, dtype)


def _out_scale(s, kernel, forward):
    """`s` (one factor per output channel) shaped to multiply the kernel of a `forward` layer."""
    if forward == "depthwise":
        return ops.reshape(s, kernel.shape[-2:])
    if forward == "transpose":
        return ops.reshape(s, (s.shape[0], 1))
    return s


def _nonzero(var):
    """An initializer: ``var != 0`` as the weight is when the variable is initialized."""

    def initialize(shape, dtype=None):
        with _wrappers.stored_dtype():
            return (ops.convert_to_numpy(var) != 0).astype(keras.backend.standardize_dtype(dtype))

    return initialize


def _conv_args(layer):
    return {k: getattr(layer, k) for k in ("strides", "padding", "dilation_rate", "data_format")}


@keras.saving.register_keras_serializable(package="tfopt")
class QuantizeWrapper(_wrappers.TfoptWrapper):
    """Runs a layer the way its int8 TFLite kernel will (see the module docstring).

    Args:
        layer: the layer to quantize (built or not).
        quantize_config: a `tfopt.QuantizeConfig` for a layer tfopt has no
            row for; None uses tfopt's default 8-bit scheme.
        batch_norm: a `BatchNormalization` that follows `layer` and is folded
            into it (a layer whose registry row has a `qat_forward`: Conv,
            DepthwiseConv, SeparableConv, ConvTranspose, Dense).
        quantize_output: fake-quantize the output. False when the converter
            fuses the next op into this one (a following ReLU) or the next op
            must share this tensor's scale (Concatenate).
        preserve_sparsity: keep the zeros a weight has when the wrapper is
            built (creates ``<weight>_mask`` variables).
        ema_decay: decay of the moving-average activation ranges, in [0, 1).
        freeze_bn_delay: with `batch_norm`, training steps after which the
            batch statistics are frozen (the folded inference form is used in
            training too). None: never.
        num_outputs: number of output tensors of `layer`.
        clustered_weights: attribute paths of the kernels to train as
            clusters (cluster-preserving QAT, see the module docstring),
            e.g. ``("kernel",)``; each must be a quantized weight of `layer`
            (the default 8-bit scheme only). Empty: none.
        number_of_clusters: the number of centroids of each clustered
            weight (>= 2); required with `clustered_weights`.
        **kwargs: base layer arguments (name, ...).
    """

    technique = "QAT"
    _config_keys = ("quantize_config", "batch_norm", "quantize_output", "preserve_sparsity", "ema_decay",
                    "freeze_bn_delay", "num_outputs", "clustered_weights", "number_of_clusters")
    _nested = ("quantize_config", "batch_norm")

    def __init__(self, layer, quantize_config=None, batch_norm=None, quantize_output=True, preserve_sparsity=False,
                 ema_decay=0.99, freeze_bn_delay=None, num_outputs=1, clustered_weights=(), number_of_clusters=None,
                 **kwargs):
        super().__init__(layer, **kwargs)
        self.ema_decay, self.freeze_bn_delay = _check_options(ema_decay, freeze_bn_delay)
        row = _kernel_row(layer)
        if batch_norm is not None and (row is None or row.qat_forward is None or quantize_config is not None):
            raise ValueError(
                f"`batch_norm` can only be folded into a Conv, DepthwiseConv, SeparableConv, ConvTranspose or Dense "
                f"layer, not into layer {layer.name!r} of type {type(layer).__name__}. "
                f"Received: batch_norm={batch_norm!r}"
            )
        clustered_weights = tuple(clustered_weights or ())
        if clustered_weights:
            paths = list(row.quantizable) if row is not None else []
            if quantize_config is not None:
                raise ValueError(
                    f"`clustered_weights` works with tfopt's default 8-bit scheme only, not with a QuantizeConfig "
                    f"(layer {layer.name!r} of type {type(layer).__name__}). Drop one of the two. "
                    f"Received: clustered_weights={clustered_weights!r}, quantize_config={quantize_config!r}"
                )
            if any(p not in paths for p in clustered_weights) or len(set(clustered_weights)) != len(clustered_weights):
                raise ValueError(
                    f"`clustered_weights` must name distinct quantized weights of layer {layer.name!r} of type "
                    f"{type(layer).__name__} (one of {paths}). Received: clustered_weights={clustered_weights!r}"
                )
            number_of_clusters = _checks.check_int(
                number_of_clusters, "number_of_clusters", 2,
                f"It is the number of centroids of each weight in `clustered_weights` (layer {layer.name!r}).",
            )
        self.quantize_config = quantize_config
        self.batch_norm = batch_norm
        self.quantize_output = bool(quantize_output)
        self.preserve_sparsity = bool(preserve_sparsity)
        self.num_outputs = int(num_outputs)
        self.clustered_weights = clustered_weights
        self.number_of_clusters = number_of_clusters

    # ----- structure ---------------------------------------------------------

    def _row(self):
        """The registry row the default scheme quantizes the layer by (None: weightless, or a QuantizeConfig)."""
        return _kernel_row(self.layer) if self.quantize_config is None else None

    def _forward(self):
        return getattr(self._row(), "qat_forward", None)

    def _weight_specs(self):
        """[(attribute path or variable, quantizer or axis)] of the weights to fake-quantize."""
        if self.quantize_config is not None:
            return list(self.quantize_config.get_weights_and_quantizers(self.layer))
        row = self._row()
        return list(zip(row.quantizable, row.quant_axis)) if row is not None else []

    def _activation(self):
        """The activation the layer's output comes from: a kernel layer's own, or a weightless layer's."""
        if self.quantize_config is not None:
            return None
        return fused_activation(self.layer) if self._row() is not None else _weightless_activation(self.layer)

    def _hard_activation(self):
        """hard_sigmoid / hard_swish / silu, when the wrapper computes it (not in a layer that runs its own call)."""
        act = self._activation()
        return act if act in _HARD + _SILU and (self._row() is None or self._forward() is not None) else None

    def _intermediate_names(self):
        names = []
        if self._forward() == "separable":
            names.append("depthwise_output")
        if self._forward() is not None and self._activation() not in _FUSED:
            names.append("pre_activation")
        rescaling = isinstance(self.layer, L.Rescaling) and self.quantize_config is None
        if rescaling and np.any(np.asarray(self.layer.offset) != 0):
            names.append("scaled")
        if self._hard_activation() in _HARD:
            names += ["hard_relu6", "hard_sigmoid"]
        return names

    def _output_quantizers(self):
        if self.quantize_config is not None:
            qs = list(self.quantize_config.get_output_quantizers(self.layer))
            return qs * self.num_outputs if len(qs) == 1 else qs
        act = self._activation()
        if act in _FIXED_OUTPUT:
            return [FixedRangeQuantizer(*_FIXED_OUTPUT[act])] * self.num_outputs
        # A ReLU output is never negative: its range starts at 0 with no reduction over the batch.
        relu_out = act in ("relu", "relu6") or relu_kind(self.layer) is not None
        return [MovingAverageQuantizer(ema_decay=self.ema_decay, non_negative=relu_out)] * self.num_outputs

    def build(self, input_shape=None):
        # `build_from_config` calls this without a shape: the inner layer is built then, and `batch_norm`
        # was built when it was deserialized (its config holds its build config).
        super().build(input_shape)
        if self.batch_norm is not None and not self.batch_norm.built:
            self.batch_norm.build(self.layer.compute_output_shape(input_shape))
        specs = self._weight_specs()
        self._weights = [registry.weight_at(self.layer, ref) if isinstance(ref, str) else ref for ref, _ in specs]
        self._masks = [
            self.add_weight(name=f"{var.name}_mask", shape=var.shape, initializer=_nonzero(var), trainable=False)
            for var in (self._weights if self.preserve_sparsity else [])
        ]
        self._wq_vars = [  # only a QuantizeConfig pairs weights with quantizers (the default: with axes)
            q.build(var.shape, f"weight_{i}", self) for i, ((_, q), var) in enumerate(zip(specs, self._weights))
        ] if self.quantize_config is not None else []
        act_q = MovingAverageQuantizer(ema_decay=self.ema_decay)
        self._act_vars = {name: act_q.build(None, name, self) for name in self._intermediate_names()}
        self._out_quantizers = self._output_quantizers() if self.quantize_output else []
        self._out_vars = [q.build(None, f"output_{i}", self) for i, q in enumerate(self._out_quantizers)]
        self.step = None
        if self.batch_norm is not None:
            self.step = self.add_weight(name="step", shape=(), initializer="zeros", trainable=False, dtype="int32")
        self._clusters = {
            path: Clusters(self, registry.weight_at(self.layer, path), path.replace(".", "_"), self.number_of_clusters,
                           preserve_sparsity=self.preserve_sparsity, dtype="float32")
            for path in self.clustered_weights
        }

    @property
    def clustered_variables(self):
        """{weight path: (centroids, centroid_mask, indices)} of the clustered weights."""
        return {path: (c.centroids, c.centroid_mask, c.indices) for path, c in self._clusters.items()}

    # ----- forward -------------------------------------------------------------

    def _act(self, name, x, training):
        return MovingAverageQuantizer(ema_decay=self.ema_decay)(x, training, self._act_vars[name])

    def _masked(self, i, w):
        return w * ops.cast(self._masks[i], w.dtype) if self.preserve_sparsity else w

    def call(self, inputs, training=None, **kwargs):
        if self.quantize_config is not None:
            outputs = self._call_custom(inputs, training, **kwargs)
        elif self._row() is not None:
            outputs = self._call_kernel(inputs, training, **kwargs)
        else:
            outputs = self._call_weightless(inputs, training, **kwargs)
        if not self._out_quantizers:
            return outputs
        flat = keras.tree.flatten(outputs)
        flat = [q(t, training, v) for q, v, t in zip(self._out_quantizers, self._out_vars, flat)]
        return keras.tree.pack_sequence_as(outputs, flat)

    def _inner(self, inputs, training, kwargs, mapping=None):
        """The inner layer's own call; with `mapping`, on the substituted values of those variables."""
        if training is not None and "training" in self.layer._call_signature.parameters:
            kwargs["training"] = training
        with contextlib.nullcontext() if mapping is None else _wrappers.substitute(mapping):
            return self.layer(inputs, **kwargs)

    def _call_custom(self, inputs, training, **kwargs):
        with _wrappers.stored_dtype():
            mapping = [
                (var, quantizer(self._masked(i, ops.convert_to_tensor(var)), training, self._wq_vars[i]))
                for i, ((_, quantizer), var) in enumerate(zip(self._weight_specs(), self._weights))
            ]
        return self._inner(inputs, training, kwargs, mapping)

    def _call_weightless(self, inputs, training, **kwargs):
        layer = self.layer
        if isinstance(layer, L.Rescaling):
            x = ops.cast(inputs, layer.compute_dtype)
            y = x * ops.cast(layer.scale, x.dtype)
            if "scaled" in self._act_vars:
                y = self._act("scaled", y, training) + ops.cast(layer.offset, x.dtype)
            return y
        if self._hard_activation() is not None:
            return self._hard(inputs, training)
        return self._inner(inputs, training, kwargs)

    def _hard(self, x, training):
        # Keras: hard_sigmoid(x) = relu6(x + 3) / 6, hard_swish(x) = x * hard_sigmoid(x), silu(x) = x * sigmoid(x).
        # In int8 TFLite: ADD (fused RELU6), MUL, [MUL], or LOGISTIC (fixed output range), MUL; a range after each.
        if self._hard_activation() in _SILU:
            return x * FixedRangeQuantizer(*_FIXED_OUTPUT["sigmoid"])(ops.sigmoid(x), training)
        h = self._act("hard_relu6", ops.relu6(x + 3.0), training)
        h = self._act("hard_sigmoid", h * (1.0 / 6.0), training)
        return h if self._hard_activation() == "hard_sigmoid" else x * h

    def _fake_quantized(self, i, path, axis, fold):
        """The weight at `path`, clustered, masked, BN-folded (`fold`: None or the factors) and fake-quantized."""
        forward, clusters = self._forward(), self._clusters.get(path)
        w = self._masked(i, ops.convert_to_tensor(self._weights[i]) if clusters is None else clusters.value())
        if forward == "conv1d":
            # TF runs conv1d as conv2d on an expanded kernel; a per-channel fake quant followed by that
            # ExpandDims does not convert, so the kernel is expanded first (see `_recompute`).
            w = ops.expand_dims(w, 0)
        if path != ("pointwise_kernel" if forward == "separable" else "kernel"):
            fold = None
        max_abs = ops.max(ops.abs(w)) if clusters is not None else None  # of the unfolded kernel
        if fold is not None:
            w = w * _out_scale(fold, w, forward)
        depthwise = forward == "depthwise" or path == "depthwise_kernel"
        if clusters is None:
            return _weight_fq(w, axis, depthwise)
        return _weight_fq(w, axis, depthwise, max_abs, fold)

    def _call_kernel(self, inputs, training, **kwargs):
        layer, forward, bn = self.layer, self._forward(), self.batch_norm
        specs = self._weight_specs()
        fold = bias = None
        with _wrappers.stored_dtype():  # the weight path runs on float32 variables, also under mixed_float16
            if bn is not None:
                gamma = bn.gamma if bn.scale else ops.ones_like(ops.convert_to_tensor(bn.moving_variance))
                fold = gamma / ops.sqrt(bn.moving_variance + bn.epsilon)
            kernels = [self._fake_quantized(i, path, axis, fold) for i, (path, axis) in enumerate(specs)]
            if forward is not None and getattr(layer, "use_bias", False):
                bias = ops.convert_to_tensor(layer.bias)
        if forward is None:  # the layer's own call, on its fake-quantized weights
            return self._inner(inputs, training, kwargs, list(zip(self._weights, kernels)))
        kernels = {path: _cast(k, layer.compute_dtype) for (path, _), k in zip(specs, kernels)}
        y = self._recompute(inputs, kernels, training)
        if bn is not None:
            y = self._fold_bn(y, bias, fold, training)
        elif bias is not None:
            y = y + _cast(bias, y.dtype)
        if self._activation() not in _FUSED:
            y = self._act("pre_activation", y, training)
            if self._hard_activation() is not None:
                return self._hard(y, training)
        return layer.activation(y)  # linear is the identity

    def _recompute(self, x, kernels, training):
        """The layer's op(s), by its registry `qat_forward`, on its fake-quantized kernels."""
        layer, forward, kernel = self.layer, self._forward(), kernels.get("kernel")
        if forward == "conv":
            return layer.convolution_op(x, kernel)
        if forward == "dense":
            return ops.matmul(x, kernel)
        if forward == "depthwise":
            return ops.depthwise_conv(x, kernel, **_conv_args(layer))
        if forward == "transpose":
            return ops.conv_transpose(x, kernel, output_padding=layer.output_padding, **_conv_args(layer))
        if forward == "separable":
            y = ops.depthwise_conv(x, kernels["depthwise_kernel"], **_conv_args(layer))
            y = self._act("depthwise_output", y, training)
            return ops.conv(y, kernels["pointwise_kernel"], strides=1, padding="valid", data_format=layer.data_format)
        padding = layer.padding  # conv1d, as a conv2d on the expanded kernel (see `_fake_quantized`)
        if padding == "causal":
            x = ops.pad(x, layer._compute_causal_padding())
            padding = "valid"
        y = ops.conv(
            ops.expand_dims(x, 1), kernel, strides=(1, layer.strides[0]), padding=padding,
            dilation_rate=(1, layer.dilation_rate[0]), data_format="channels_last",
        )
        return ops.squeeze(y, 1)

    def _fold_bn(self, y, bias, s, training):
        bn = self.batch_norm
        # (JAX's zeros_like does not take a keras Variable: convert it first)
        beta = bn.beta if bn.center else ops.zeros_like(ops.convert_to_tensor(bn.moving_mean))
        b = bias if bias is not None else ops.zeros_like(ops.convert_to_tensor(bn.moving_mean))

        def folded():
            return y + _cast(beta + (b - bn.moving_mean) * s, y.dtype)

        if not training:
            return folded()
        self.step.assign_add(1)
        if self.freeze_bn_delay is None:
            return self._batch_stats_forward(y, b, s)
        if keras.backend.backend() == "tensorflow" or bn.renorm or bn.synchronized or not bn.trainable:
            return ops.cond(self.step > self.freeze_bn_delay, folded, lambda: self._batch_stats_forward(y, b, s))
        # JAX (and torch.compile) refuse variable assignments inside a `cond` branch: compute the batch-statistics
        # branch unconditionally, gate its moving-statistics update, and select the output.
        active = self.step <= self.freeze_bn_delay
        return ops.where(active, self._batch_stats_forward(y, b, s, active=active), folded())

    def _batch_stats_forward(self, y, b, s, active=None):
        """BN with batch statistics of the unfolded pre-activation ``z = y / s + b``, without forming `z`.

        Per channel, ``mean(z) = mean(y) / s + b`` and ``var(z) = var(y) / s**2``, so
        ``gamma * (z - mean(z)) / sqrt(var(z) + eps) + beta
        = gamma * sign(s) * (y - mean(y)) / sqrt(var(y) + eps * s**2) + beta``:
        the same function of y, gamma, beta and the moving statistics, with two
        elementwise passes over the activation fewer (forward and backward).
        The moving statistics are updated exactly as the BN layer would (only
        where the boolean tensor `active` is true, when it is given).
        """
        bn = self.batch_norm
        s = ops.cast(s, "float32")
        safe_s = ops.where(ops.abs(s) < 1e-12, 1e-12, s)  # gamma == 0 gives s == 0
        if bn.renorm or bn.synchronized or not bn.trainable:
            # Keras' own code path for what the shortcut does not cover. (A
            # frozen BN uses its moving statistics in training too.)
            return bn(y / ops.cast(safe_s, y.dtype) + _cast(b, y.dtype), training=True)
        x = ops.cast(y, "float32")
        mean_y, var_y = ops.moments(x, axes=tuple(range(len(x.shape) - 1)))
        m = bn.momentum
        new_mean = bn.moving_mean * m + (mean_y / safe_s + ops.cast(b, "float32")) * (1.0 - m)
        new_var = bn.moving_variance * m + (var_y / ops.square(safe_s)) * (1.0 - m)
        if active is not None:
            new_mean = ops.where(active, new_mean, ops.convert_to_tensor(bn.moving_mean))
            new_var = ops.where(active, new_var, ops.convert_to_tensor(bn.moving_variance))
        bn.moving_mean.assign(new_mean)
        bn.moving_variance.assign(new_var)
        sign = ops.where(s < 0, -1.0, 1.0)
        gamma = ops.cast(bn.gamma, "float32") if bn.scale else ops.ones_like(s)
        beta = ops.cast(bn.beta, "float32") if bn.center else None
        out = ops.batch_normalization(
            x, mean_y, var_y + bn.epsilon * ops.square(s), axis=-1, offset=beta, scale=gamma * sign, epsilon=0.0
        )
        return ops.cast(out, bn.compute_dtype)
