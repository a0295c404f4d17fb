"""The layers a QAT model is made of: `QuantizeWrapper`, `QuantizeLayer`, `QuantizeAnnotate`, `QuantizeConfig`.

`QuantizeWrapper` computes the inner layer's output the way the int8 TFLite
kernel will, without ever assigning to the inner layer's variables:

- Conv1D/2D/3D, DepthwiseConv2D, SeparableConv2D, Conv2DTranspose and Dense are
  recomputed with `keras.ops` (`convolution_op`, `ops.depthwise_conv`,
  `ops.conv_transpose`, `ops.matmul`) from fake-quantized kernels. A
  SeparableConv becomes DEPTHWISE_CONV_2D + CONV_2D in TFLite, so the tensor
  between the two is fake-quantized too.
- A BatchNormalization that follows the layer is held by the wrapper
  (`batch_norm`) and folded: with ``s = gamma / sqrt(moving_variance + eps)``
  the kernel that is fake-quantized is ``W * s`` (per output channel), the
  weights the converter will write. In training (BN not frozen) the output is
  ``BN_batch(conv(x, fq(W * s)) / s + b)``: one convolution, batch statistics
  for the forward pass and moving statistics updated as usual (the
  "approximate" fold of PyTorch's ConvBn). In inference, and in training once
  `freeze_bn_delay` steps have passed, it is
  ``conv(x, fq(W * s)) + beta + (b - moving_mean) * s``: exactly the folded
  layer the converter emits.
- The layer's own activation: relu/relu6/linear are fused by the converter,
  so the output quantizer sits after them. Any other activation (sigmoid,
  softmax, tanh, ...) is a separate TFLite op, so the pre-activation is
  fake-quantized too, and sigmoid/softmax/tanh outputs get the fixed ranges
  of the int8 kernels.
- Weights with exact zeros at quantize time (a pruned model) keep them: a
  0/1 ``<weight>_mask`` is multiplied in before fake quant (so the exported
  int8 weights are exactly as sparse).
- Other weightless layers (Add, Multiply, GlobalAveragePooling, Activation,
  ReLU, Rescaling, ...) run unchanged and their output is fake-quantized.
  Rescaling with an offset is MUL then ADD in TFLite: the product is
  fake-quantized in between. hard_sigmoid / hard_swish activations are
  decomposed into the int8 ops ADD(+3, fused RELU6), MUL(1/6) [, MUL(x)] with
  a fake quant after each.
- A layer with a user `QuantizeConfig` is called with its weights replaced by
  their fake-quantized values through `keras.StatelessScope` (the variables
  themselves are never written), then its outputs are fake-quantized.
- Cluster-preserving QAT (`clustered_weights`): each listed kernel is
  ``take(centroids * centroid_mask, indices)``, trainable centroids looked up
  by fixed int32 indices (as `tfopt.ClusterWeights`; the inner kernel
  variable is not trained), so it holds at most `number_of_clusters`
  distinct floats at every step. Per-channel weight ranges are then chosen so
  that every channel maps the shared values to the same int8 codes: with
  ``M = max|kernel|`` (over the whole unfolded kernel) and ``f_c`` the BN fold
  factor (1 without BN), channel ``c`` gets ``[-|f_c| M, |f_c| M]``, so its
  folded weight ``kernel * f_c`` quantizes to
  ``sign(f_c) * round(kernel * 127 / M)``: at most `number_of_clusters` int8
  values per kernel while every ``f_c`` has one sign (always without BN, and
  with a BN whose gammas keep one sign, the usual case: gamma starts at 1). A
  channel whose ``f_c`` has the other sign stores the mirrored codes (a
  scale must be positive), so a kernel with mixed-sign gammas holds at most
  `number_of_clusters` values per channel and twice that per kernel.
  Per-tensor kernels (Dense, 1-D depthwise, transposed convs) keep the
  usual ``max|kernel * f|`` range: at most `number_of_clusters` int8 values
  per kernel without BN, per output channel with a folded BN.
- Mixed precision (``mixed_float16``): every variable stays float32; the
  weight path (BN fold, centroid lookup, fake quant) reads the variables in
  float32 and computes in float32, and only the fake-quantized kernel is cast
  to the compute dtype for the convolution / matmul. Activation fake quants
  run in float32 and cast back. Under float32 the casts are no-ops.

Variable order (the `.keras` format stores a layer's own variables by
position; never reorder). The inner layer and `batch_norm` own their
variables. The wrapper's own, in this order: for each quantized weight
``<weight>_mask`` (only when `preserve_sparsity`); then the variables of the
`QuantizeConfig` weight quantizers (``weight_<i>_*``), if any; then the activation
quantizers in this order, each with ``_min``, ``_max``, ``_initialized``:
``depthwise_output`` (separable convs), ``pre_activation`` (non-fused
activations), ``scaled`` (Rescaling with offset), ``hard_relu6`` and
``hard_sigmoid`` (hard_sigmoid / hard_swish), ``output_<i>`` (one per
output when `quantize_output`); then ``step`` (a counter, only with a folded
BatchNormalization); then, for each weight in `clustered_weights` (in
registry order), ``<weight>_centroids`` (trainable), ``<weight>_centroid_mask``
and ``<weight>_indices``. Keras stores a layer's trainable variables before
its non-trainable ones, so in the file the ``_centroids`` come first, then
the other variables in the order above.
"""

import contextlib

import numpy as np

import keras
from keras import ops

from tfopt import registry
from tfopt.quantizers import _MIN_RANGE, FixedRangeQuantizer, LastValueQuantizer, MovingAverageQuantizer, Quantizer, fake_quant

__all__ = ["QuantizeConfig", "QuantizeWrapper", "QuantizeLayer", "QuantizeAnnotate"]

L = keras.layers
_FUSED = ("relu", "relu6", "linear")
# Output ranges fixed by the int8 kernels (TFLite quantization spec).
_FIXED_OUTPUT = {
    "sigmoid": (0.0, 255.0 / 256.0),
    "softmax": (0.0, 255.0 / 256.0),
    "tanh": (-1.0, 127.0 / 128.0),
}


def activation_name(fn):
    """The registered name of a Keras activation function ('linear' for None)."""
    if fn is None:
        return "linear"
    name = keras.activations.serialize(fn)
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return name if isinstance(name, str) else getattr(fn, "__name__", str(fn))


def relu_kind(layer):
    """'relu' or 'relu6' when `layer` is a ReLU the converter fuses into the op before it, else None."""
    if isinstance(layer, L.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else None
    if isinstance(layer, L.Activation):
        name = activation_name(layer.activation)
        return name if name in ("relu", "relu6") else None
    return None


def _weightless_activation(layer):
    """The activation a weightless layer computes, if it is one we handle specially."""
    if isinstance(layer, L.Softmax):
        return "softmax"
    if isinstance(layer, L.Activation):
        return activation_name(layer.activation)
    return None


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


def _check_wrapped(layer, wrapper):
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(
            f"`layer` must be a keras layer to wrap, e.g. `{wrapper}(keras.layers.Dense(10))` (for a whole model, "
            f"use `tfopt.quantize_model`). Received: layer={layer!r} of type {type(layer).__name__}"
        )


def _serialize(obj):
    return None if obj is None else keras.saving.serialize_keras_object(obj)


def _deserialize(config, custom_objects=None):
    return None if config is None else keras.saving.deserialize_keras_object(config, custom_objects=custom_objects)


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
        self.built = True

    def call(self, inputs, training=None):
        return self.quantizer(inputs, training, self.range_vars)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_bits": self.num_bits, "ema_decay": self.ema_decay}


@keras.saving.register_keras_serializable(package="tfopt")
class QuantizeAnnotate(keras.layers.Wrapper):
    """Marks a layer for `tfopt.quantize_apply`; computes exactly like the inner layer.

    Args:
        layer: the layer to quantize.
        quantize_config: a `tfopt.QuantizeConfig`, or None for tfopt's default
            for that layer type.
        **kwargs: base layer arguments.
    """

    def __init__(self, layer, quantize_config=None, **kwargs):
        _check_wrapped(layer, "QuantizeAnnotate")
        super().__init__(layer, **kwargs)
        self.quantize_config = quantize_config

    def call(self, inputs, *args, **kwargs):
        return self.layer(inputs, *args, **kwargs)

    def get_config(self):
        return {**super().get_config(), "quantize_config": _serialize(self.quantize_config)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = _deserialize(config.pop("layer"), custom_objects)
        qc = _deserialize(config.pop("quantize_config", None), custom_objects)
        return cls(layer, quantize_config=qc, **config)


def _kernel_paths(layer):
    spec = registry.lookup(layer)
    return tuple(zip(spec.quantizable, spec.quant_axis)) if spec else ()


def _is_separable(layer):
    return isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D))


def _is_depthwise(layer):
    return isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D))


def _is_transpose(layer):
    return isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose))


def _weight_fq(w, axis, depthwise):
    """Symmetric, narrow-range int8 fake quant of a kernel, per channel along `axis` (None: per tensor)."""
    if axis is None:
        return LastValueQuantizer(per_axis=False)(w)
    if depthwise:
        # TFLite's depthwise channel is in * multiplier, in that order.
        shape = w.shape
        flat = ops.reshape(w, tuple(shape[:-2]) + (shape[-2] * shape[-1],))
        return ops.reshape(LastValueQuantizer(per_axis=True, axis=-1)(flat), shape)
    return LastValueQuantizer(per_axis=True, axis=axis)(w)


def _clustered_weight_fq(w, max_abs, fold, axis, depthwise):
    """Per-channel int8 fake quant of a clustered kernel with ranges ``|fold_c| * max_abs``.

    `w` is the (folded) kernel, `max_abs` the scalar ``max|kernel|`` of the
    unfolded kernel, `fold` the per-output-channel fold factors (None: no
    BN). Every channel then maps a shared centroid value to one int8 code
    (up to the sign of its fold factor).
    """
    shape = w.shape
    if depthwise:
        w = ops.reshape(w, tuple(shape[:-2]) + (shape[-2] * shape[-1],))
        axis = -1
    channels = w.shape[axis]
    if fold is None:
        r = ops.full((channels,), 1.0, dtype=w.dtype) * max_abs
    else:
        r = ops.abs(ops.reshape(fold, (channels,))) * max_abs
    r = ops.maximum(r, _MIN_RANGE)
    return ops.reshape(fake_quant(w, -r, r, num_bits=8, narrow_range=True, axis=axis), shape)


def _cast(x, dtype):
    return x if keras.backend.standardize_dtype(x.dtype) == keras.backend.standardize_dtype(dtype) else ops.cast(x, dtype)


def _stored_dtype():
    """Context in which variables read as their stored dtype (float32), not autocast to the compute dtype."""
    try:
        from keras.src.backend import AutocastScope
    except ImportError:  # a Keras that moved it: variables may read autocast
        return contextlib.nullcontext()
    return AutocastScope(None)


def _initial_clusters(values, k, pin_zero):
    """(centroids, centroid_mask, indices) of a kernel: its own values when it has <= k, else k-means++."""
    values = np.asarray(values)
    unique, inverse = np.unique(values, return_inverse=True)
    if unique.size <= k:
        centroids = np.zeros(k)
        centroids[: unique.size] = unique
        indices = inverse.reshape(values.shape).astype(np.int32)
    else:
        from tfopt.clustering import cluster_tensor

        centroids, _, indices = cluster_tensor(values, k, "kmeans++", preserve_sparsity=pin_zero)
    mask = np.ones(k)
    if pin_zero:
        mask[(centroids == 0) & np.isin(np.arange(k), np.unique(indices))] = 0.0
    return centroids, mask, indices


def _out_scale(s, kernel, layer):
    """Broadcasts a per-output-channel vector `s` onto `kernel`."""
    if _is_depthwise(layer):
        return ops.reshape(s, kernel.shape[-2:])
    if _is_transpose(layer):
        return ops.reshape(s, (s.shape[0], 1))
    return s


@keras.saving.register_keras_serializable(package="tfopt")
class QuantizeWrapper(keras.layers.Wrapper):
    """Runs a layer the way its int8 TFLite kernel will (see the module docstring).

    Args:
        layer: the layer to quantize (built or not).
        quantize_config: a `tfopt.QuantizeConfig` for a layer tfopt has no
            row for; None uses tfopt's default 8-bit scheme.
        batch_norm: a `BatchNormalization` that follows `layer` and is folded
            into it (Conv, DepthwiseConv, SeparableConv, ConvTranspose, Dense).
        quantize_output: fake-quantize the output. False when the converter
            fuses the next op into this one (a following ReLU) or the next op
            must share this tensor's scale (Concatenate).
        preserve_sparsity: keep the zeros a weight had at quantize time
            (creates ``<weight>_mask`` variables).
        ema_decay: decay of the moving-average activation ranges.
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

    def __init__(
        self,
        layer,
        quantize_config=None,
        batch_norm=None,
        quantize_output=True,
        preserve_sparsity=False,
        ema_decay=0.99,
        freeze_bn_delay=None,
        num_outputs=1,
        clustered_weights=(),
        number_of_clusters=None,
        **kwargs,
    ):
        _check_wrapped(layer, "QuantizeWrapper")
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float, np.integer, np.floating)) or not (
            0.0 <= ema_decay < 1.0
        ):
            raise ValueError(f"`ema_decay` must be a float in [0, 1), e.g. 0.99. Received: ema_decay={ema_decay!r}")
        clustered_weights = tuple(clustered_weights or ())
        if clustered_weights:
            if quantize_config is not None:
                raise ValueError(
                    f"`clustered_weights` works with tfopt's default 8-bit scheme only, not with a QuantizeConfig "
                    f"(layer {layer.name!r} of type {type(layer).__name__}). Drop one of the two. "
                    f"Received: clustered_weights={clustered_weights!r}, quantize_config={quantize_config!r}"
                )
            paths = [p for p, _ in _kernel_paths(layer)]
            bad = [p for p in clustered_weights if p not in paths]
            if bad or len(set(clustered_weights)) != len(clustered_weights):
                raise ValueError(
                    f"`clustered_weights` must name distinct quantized weights of layer {layer.name!r} of type "
                    f"{type(layer).__name__} (one of {paths}). Received: clustered_weights={clustered_weights!r}"
                )
            if isinstance(number_of_clusters, bool) or not isinstance(number_of_clusters, (int, np.integer)) or number_of_clusters < 2:
                raise ValueError(
                    "`number_of_clusters` must be an integer >= 2 (the centroids of each clustered weight) when "
                    f"`clustered_weights` is set (layer {layer.name!r}). Received: number_of_clusters={number_of_clusters!r}"
                )
        super().__init__(layer, **kwargs)
        self.quantize_config = quantize_config
        self.batch_norm = batch_norm
        self.quantize_output = bool(quantize_output)
        self.preserve_sparsity = bool(preserve_sparsity)
        self.ema_decay = float(ema_decay)
        self.freeze_bn_delay = None if freeze_bn_delay is None else int(freeze_bn_delay)
        self.num_outputs = int(num_outputs)
        self.clustered_weights = clustered_weights
        self.number_of_clusters = int(number_of_clusters) if number_of_clusters is not None else None

    # ----- structure ---------------------------------------------------------

    def _weight_specs(self):
        """[(attribute path or variable, quantizer or axis)] of the weights to fake-quantize."""
        if self.quantize_config is not None:
            return list(self.quantize_config.get_weights_and_quantizers(self.layer))
        return list(_kernel_paths(self.layer))

    def _activation(self):
        return activation_name(getattr(self.layer, "activation", None)) if _kernel_paths(self.layer) else None

    def _intermediate_names(self):
        names = []
        if self.quantize_config is None:
            if _is_separable(self.layer):
                names.append("depthwise_output")
            act = self._activation()
            if act is not None and act not in _FUSED:
                names.append("pre_activation")
            if isinstance(self.layer, L.Rescaling) and self._rescaling_offset_nonzero():
                names.append("scaled")
            if self._hard_activation() is not None:
                names += ["hard_relu6", "hard_sigmoid"]
        return names

    def _rescaling_offset_nonzero(self):
        import numpy as np

        return bool(np.any(np.asarray(self.layer.offset) != 0))

    def _hard_activation(self):
        if self.quantize_config is not None:
            return None
        name = self._activation() if _kernel_paths(self.layer) else _weightless_activation(self.layer)
        return name if name in ("hard_sigmoid", "hard_swish", "hard_silu") else None

    def _output_quantizers(self):
        if self.quantize_config is not None:
            qs = list(self.quantize_config.get_output_quantizers(self.layer))
            if len(qs) == 1 and self.num_outputs > 1:
                qs = qs * self.num_outputs
            return qs
        act = self._activation() if _kernel_paths(self.layer) else _weightless_activation(self.layer)
        if act in _FIXED_OUTPUT:
            return [FixedRangeQuantizer(*_FIXED_OUTPUT[act])] * self.num_outputs
        # A ReLU output is never negative: its range starts at 0 with no reduction over the batch.
        relu_out = act in ("relu", "relu6") or relu_kind(self.layer) is not None
        return [MovingAverageQuantizer(ema_decay=self.ema_decay, non_negative=relu_out) for _ in range(self.num_outputs)]

    def build(self, input_shape=None):
        super().build(input_shape)
        if self.batch_norm is not None and not self.batch_norm.built:
            self.batch_norm.build(self.layer.compute_output_shape(input_shape))
        self._weights = []
        for spec in self._weight_specs():
            ref = spec[0]
            var = registry.weight_at(self.layer, ref) if isinstance(ref, str) else ref
            self._weights.append(var)
        self._masks = []
        if self.preserve_sparsity:
            for var in self._weights:
                name = var.path.split("/")[-1] if hasattr(var, "path") else "weight"
                self._masks.append(
                    self.add_weight(name=f"{name}_mask", shape=var.shape, initializer="ones", trainable=False)
                )
        self._wq_vars = []
        if self.quantize_config is not None:
            for i, ((_, quantizer), var) in enumerate(zip(self._weight_specs(), self._weights)):
                self._wq_vars.append(quantizer.build(var.shape, f"weight_{i}", self))
        act_q = MovingAverageQuantizer(ema_decay=self.ema_decay)
        self._act_vars = {name: act_q.build(None, name, self) for name in self._intermediate_names()}
        self._out_quantizers = self._output_quantizers() if self.quantize_output else []
        self._out_vars = [q.build(None, f"output_{i}", self) for i, q in enumerate(self._out_quantizers)]
        self.step = None
        if self.batch_norm is not None:
            self.step = self.add_weight(name="step", shape=(), initializer="zeros", trainable=False, dtype="int32")
        self._clusters = {}
        if self.clustered_weights:
            by_path = {p: var for (p, _), var in zip(self._weight_specs(), self._weights)}
            k = self.number_of_clusters
            for path in self.clustered_weights:
                var = by_path[path]
                with _stored_dtype():
                    values = ops.convert_to_numpy(var)
                # From the inner kernel as it is now; quantize_model then sets
                # the clustering's own values (`set_clusters`), a load overwrites them.
                init = _initial_clusters(values, k, self.preserve_sparsity and bool(np.any(values == 0)))
                name = path.replace(".", "_")

                def const(value):
                    return lambda shape, dtype=None: np.asarray(value).astype(keras.backend.standardize_dtype(dtype))

                centroids = self.add_weight(
                    name=f"{name}_centroids", shape=(k,), dtype="float32", initializer=const(init[0]),
                    trainable=True, autocast=False,
                )
                mask = self.add_weight(
                    name=f"{name}_centroid_mask", shape=(k,), dtype="float32", initializer=const(init[1]),
                    trainable=False, autocast=False,
                )
                indices = self.add_weight(
                    name=f"{name}_indices", shape=var.shape, dtype="int32", initializer=const(init[2]), trainable=False
                )
                self._clusters[path] = (centroids, mask, indices)
                var.trainable = False  # read only through the lookup: no gradient, no optimizer slots
        self.built = True

    @property
    def clustered_variables(self):
        """{weight path: (centroids, centroid_mask, indices)} of the clustered weights."""
        return dict(self._clusters)

    def set_clusters(self, path, centroids, centroid_mask, indices):
        """Sets the clusters of the weight at `path` (called at quantize time).

        Args:
            path: a name in `clustered_weights`.
            centroids: up to `number_of_clusters` floats (padded with zeros).
            centroid_mask: 0/1 per centroid (0 pins it at zero), same length.
            indices: int array of the weight's shape, values in
                ``[0, len(centroids))``.
        """
        c_var, m_var, i_var = self._clusters[path]
        k = self.number_of_clusters
        c = np.zeros(k)
        m = np.ones(k)
        c[: len(centroids)] = np.asarray(centroids, np.float64)
        m[: len(centroid_mask)] = np.asarray(centroid_mask, np.float64)
        c_var.assign(c.astype("float32"))
        m_var.assign(m.astype("float32"))
        i_var.assign(np.asarray(indices, np.int32).reshape(i_var.shape))

    def _clustered_value(self, path):
        centroids, mask, indices = self._clusters[path]
        return ops.take(centroids * mask, indices)

    def set_masks_from_weights(self):
        """Sets each ``<weight>_mask`` to ``weight != 0`` (called once, at quantize time)."""
        for var, mask in zip(self._weights, self._masks):
            mask.assign(ops.cast(ops.not_equal(var, 0), mask.dtype))

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    # ----- forward -------------------------------------------------------------

    def _act(self, name, x, training):
        return MovingAverageQuantizer(ema_decay=self.ema_decay)(x, training, self._act_vars[name])

    def _masked(self, i, w):
        return w * ops.cast(self._masks[i], w.dtype) if self.preserve_sparsity else w

    def call(self, inputs, training=None, **kwargs):
        if self.quantize_config is not None:
            outputs = self._call_custom(inputs, training, **kwargs)
        elif _kernel_paths(self.layer):
            outputs = self._call_kernel(inputs, training)
        else:
            outputs = self._call_weightless(inputs, training, **kwargs)
        if not self._out_quantizers:
            return outputs
        flat = keras.tree.flatten(outputs)
        flat = [q(t, training, v) for q, v, t in zip(self._out_quantizers, self._out_vars, flat)]
        return keras.tree.pack_sequence_as(outputs, flat)

    def _call_custom(self, inputs, training, **kwargs):
        specs = self._weight_specs()
        mapping = []
        with _stored_dtype():
            for i, ((_, quantizer), var) in enumerate(zip(specs, self._weights)):
                w = self._masked(i, ops.convert_to_tensor(var))
                mapping.append((var, quantizer(w, training, self._wq_vars[i])))
        if training is not None and "training" in self.layer._call_signature.parameters:
            kwargs["training"] = training
        with keras.StatelessScope(state_mapping=mapping):
            return self.layer.call(inputs, **kwargs)

    def _call_weightless(self, inputs, training, **kwargs):
        layer = self.layer
        if isinstance(layer, L.Rescaling):
            x = ops.cast(inputs, layer.compute_dtype)
            y = x * ops.cast(layer.scale, x.dtype)
            if self._rescaling_offset_nonzero():
                y = self._act("scaled", y, training) + ops.cast(layer.offset, x.dtype)
            return y
        if self._hard_activation() is not None:
            return self._hard(inputs, training)
        if training is not None and "training" in layer._call_signature.parameters:
            kwargs["training"] = training
        return layer(inputs, **kwargs)

    def _hard(self, x, training):
        # Keras: hard_sigmoid(x) = relu6(x + 3) / 6, hard_swish(x) = x * hard_sigmoid(x).
        # In int8 TFLite: ADD (fused RELU6), MUL, [MUL]; a range after each.
        h = self._act("hard_relu6", ops.relu6(x + 3.0), training)
        h = self._act("hard_sigmoid", h * (1.0 / 6.0), training)
        if self._hard_activation() == "hard_sigmoid":
            return h
        return x * h

    def _call_kernel(self, inputs, training):
        layer = self.layer
        specs = self._weight_specs()
        kernels = {}
        bn = self.batch_norm
        folding = bn is not None
        fold_scale = None
        with _stored_dtype():  # the weight path runs on float32 variables, also under mixed_float16
            if folding:
                gamma = bn.gamma if bn.scale else ops.ones_like(ops.convert_to_tensor(bn.moving_variance))
                fold_scale = gamma / ops.sqrt(bn.moving_variance + bn.epsilon)
            for i, ((path, axis), var) in enumerate(zip(specs, self._weights)):
                clustered = path in self._clusters
                w = self._clustered_value(path) if clustered else ops.convert_to_tensor(var)
                w = self._masked(i, w)
                if isinstance(layer, L.Conv1D):
                    # TF runs conv1d as conv2d on an expanded kernel; a per-channel
                    # fake quant followed by that ExpandDims does not convert, so
                    # the kernel is expanded first (see _conv1d_as_2d).
                    w = ops.expand_dims(w, 0)
                folded_path = "pointwise_kernel" if _is_separable(layer) else "kernel"
                fold = fold_scale if folding and path == folded_path else None
                max_abs = ops.max(ops.abs(w)) if clustered else None  # of the unfolded kernel
                if fold is not None:
                    w = w * _out_scale(fold, w, layer)
                depthwise = _is_depthwise(layer) or path == "depthwise_kernel"
                if clustered and axis is not None:
                    kernels[path] = _clustered_weight_fq(w, max_abs, fold, axis, depthwise)
                else:
                    kernels[path] = _weight_fq(w, axis, depthwise)
            bias = layer.bias if getattr(layer, "use_bias", False) else None
            if bias is not None:
                bias = ops.convert_to_tensor(bias)
        kernels = {p: _cast(k, layer.compute_dtype) for p, k in kernels.items()}

        x = inputs
        if _is_separable(layer):
            y = ops.depthwise_conv(
                x, kernels["depthwise_kernel"], strides=layer.strides, padding=layer.padding,
                dilation_rate=layer.dilation_rate, data_format=layer.data_format,
            )
            y = self._act("depthwise_output", y, training)
            y = ops.conv(y, kernels["pointwise_kernel"], strides=1, padding="valid", data_format=layer.data_format)
        elif _is_depthwise(layer):
            y = ops.depthwise_conv(
                x, kernels["kernel"], strides=layer.strides, padding=layer.padding,
                dilation_rate=layer.dilation_rate, data_format=layer.data_format,
            )
        elif _is_transpose(layer):
            y = ops.conv_transpose(
                x, kernels["kernel"], strides=layer.strides, padding=layer.padding,
                output_padding=layer.output_padding, data_format=layer.data_format,
                dilation_rate=layer.dilation_rate,
            )
        elif isinstance(layer, (L.Dense,)):
            y = ops.matmul(x, kernels["kernel"])
        elif isinstance(layer, L.Conv1D):
            y = self._conv1d_as_2d(x, kernels["kernel"])
        else:  # Conv2D/3D
            y = layer.convolution_op(x, kernels["kernel"])

        if folding:
            y = self._fold_bn(y, bias, fold_scale, training)
        elif bias is not None:
            y = y + _cast(bias, y.dtype)

        act = self._activation()
        if act in _FUSED:
            return layer.activation(y) if act != "linear" else y
        y = self._act("pre_activation", y, training)
        if self._hard_activation() is not None:
            return self._hard(y, training)
        return layer.activation(y)

    def _conv1d_as_2d(self, x, kernel):
        layer = self.layer
        padding = layer.padding
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

    # ----- config --------------------------------------------------------------

    def get_config(self):
        return {
            **super().get_config(),
            "quantize_config": _serialize(self.quantize_config),
            "batch_norm": _serialize(self.batch_norm),
            "quantize_output": self.quantize_output,
            "preserve_sparsity": self.preserve_sparsity,
            "ema_decay": self.ema_decay,
            "freeze_bn_delay": self.freeze_bn_delay,
            "num_outputs": self.num_outputs,
            "clustered_weights": list(self.clustered_weights),
            "number_of_clusters": self.number_of_clusters,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = _deserialize(config.pop("layer"), custom_objects)
        qc = _deserialize(config.pop("quantize_config", None), custom_objects)
        bn = _deserialize(config.pop("batch_norm", None), custom_objects)
        return cls(layer, quantize_config=qc, batch_norm=bn, **config)


