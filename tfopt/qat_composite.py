"""Quantization-aware training of layers that are more than one kernel op: attention, normalization, embeddings,
composite blocks (keras-hub's `TransformerEncoder`, a user's own layer made of sub-layers).

In the int8 TFLite file such a layer is many ops, each with its own int8 output tensor and scale.
`QuantizeComposite` runs the layer in its int8-friendly form (`tfopt._int8_forms`: LayerNormalization without
NEG, the masked softmax filled at ``min - MASK_MARGIN``, MultiHeadAttention on its explicit path) and puts a fake
quant on every tensor the converter makes int8, so the trained ranges become the file's scales:

- every *site* a form marks (LayerNormalization: the mean, the centred input, its square, the variance, plus
  epsilon, its RSQRT, the normalized and the scaled tensor; attention: the scaled query and the scores; masked
  softmax: the row minimum, the fill, the filled scores, the probabilities; an Add or Multiply of more than two
  inputs: each partial result). A variance that int8 rounds to 0 makes int8 RSQRT saturate: its range is learned
  from the other rows and the saturated ones take its upper end, as in the file;
- the output of every sub-layer (Softmax, sigmoid and tanh at the fixed ranges of the int8 kernels), and every
  sub-layer input no site has quantized yet (the result of an op between sub-layers, such as a residual add);
- the pre-activation of a kernel sub-layer (Dense, EinsumDense, Conv) whose activation is not fused (GELU);
- its weights: a kernel sub-layer's quantizable weights as `tfopt.qat_layers.QuantizeWrapper` quantizes them
  (symmetric int8, per channel along its row's axis); every other weight the layer reads (LayerNormalization's
  gamma and beta, an embedding table, a user layer's own weights) asymmetric per tensor on its own min/max;
  biases stay float (the converter writes int32 biases);
- the layer's outputs.

A site's range is a moving average (`tfopt.quantizers.MovingAverageQuantizer`), or fixed for Softmax / sigmoid /
tanh. The sites are found by one forward pass on zeros when the wrapper is first called (before its variables are
made) and kept in its config, so a saved model rebuilds the same variables. Same-scale sub-layers (Dropout,
Reshape) get no range. An embedding's output range is its own; the converter requantizes the table to it (the same
values as a lookup followed by a requantize).

Pruned weights keep their zeros (`preserve_sparsity`, on by default when a quantized weight has zeros): a 0/1
mask per quantized weight, taken when the wrapper is built, is multiplied in before fake quant.

Variables: the inner layer's own; then, with `preserve_sparsity`, ``<weight>_mask`` for each quantized weight
(`quantized_weights` order); then for each moving-average site, in `sites` order, ``<site>_min``, ``<site>_max``,
``<site>_initialized``.
"""

import collections
import contextlib
import types

import keras
from keras import ops

from tfopt import _graph, _int8_forms, _wrappers, registry
from tfopt.qat_layers import (
    _FIXED_OUTPUT, _FUSED, _check_options, _kernel_row, _nonzero, _weight_fq, _weightless_activation, fused_activation,
)
from tfopt.quantizers import FixedRangeQuantizer, MovingAverageQuantizer, fake_quant, moving_average_range

__all__ = ["QuantizeComposite", "quantized_weights"]

L = keras.layers
_FIXED = _FIXED_OUTPUT  # sites of these kinds have fixed ranges and no variables


def _activation(layer):
    """The name of the activation `layer` ends in (a kernel layer's own, a weightless layer's), or None."""
    return fused_activation(layer) if _kernel_row(layer) else _weightless_activation(layer)


def _kind(layer):
    return _activation(layer) if _activation(layer) in _FIXED else "ema"


def _own_weight_fq(w):
    """Asymmetric per-tensor int8 fake quant of a weight on its own ``[min(w, 0), max(w, 0)]``."""
    lo = ops.minimum(ops.min(w), 0.0)
    return fake_quant(w, lo, ops.maximum(ops.maximum(ops.max(w), 0.0), lo + 1e-6), num_bits=8)


def _is_float(x):
    return hasattr(x, "dtype") and keras.backend.standardize_dtype(x.dtype).startswith(("float", "bfloat"))


def quantized_weights(layer):
    """[(variable, fake-quant function)] of every weight of `layer` the int8 file holds as int8: its kernel
    sub-layers' quantizable weights as `QuantizeWrapper` quantizes them, every other trainable weight per tensor
    (kernel sub-layers' biases stay float: the converter writes int32 biases)."""
    kernel_layers = [sub for sub in [layer, *_graph.sublayers(layer)] if _kernel_row(sub)]
    out, skip = [], {id(v) for sub in kernel_layers for v in sub.weights}
    for sub in kernel_layers:
        depthwise = isinstance(sub, (L.DepthwiseConv1D, L.DepthwiseConv2D))
        for path, axis in zip(_kernel_row(sub).quantizable, _kernel_row(sub).quant_axis):
            out.append((registry.weight_at(sub, path), lambda w, a=axis, d=depthwise: _weight_fq(w, a, d)))
    return out + [(v, _own_weight_fq) for v in layer.trainable_weights if id(v) not in skip]


@contextlib.contextmanager
def _substituted(mapping, range_variables):
    """`mapping` substituted; the range updates made inside (the stateless scope records them) written back."""
    scope = _wrappers.substitute(mapping)
    with scope:
        yield
    for var in range_variables:
        value = scope.get_current_value(var)
        if value is not None:
            var.assign(value)


class _Pass:
    """One forward pass of a `QuantizeComposite`: each site's fake quant, or (discovery) its name and kind.

    A tensor is quantized once: the result of a site, and the wrapper's inputs, are not quantized again where a
    sub-layer reads them.
    """

    def __init__(self, wrapper, training, record):
        self.wrapper, self.training, self.record = wrapper, training, record
        self.keys = {id(layer): key for layer, key in wrapper._keys()}
        self.count = collections.Counter()
        self.done, self.keep, self.found = set(), [], []

    def __call__(self, layer, site, x, kind="ema", stats=None):
        if not _is_float(x) or id(x) in self.done:
            return x
        key = f"{self.keys.get(id(layer), 'outside')}_{site}"
        n, self.count[key] = self.count[key], self.count[key] + 1
        key = f"{key}_{n}" if n else key  # a sub-layer called twice
        if self.record:
            self.found.append([key, kind])
            y = x
        else:
            y = self.wrapper._quantize(key, kind, x, self.training, stats)
        self.seen(y)
        return y

    def seen(self, tensors):
        for t in keras.tree.flatten(tensors):
            self.done.add(id(t))
            self.keep.append(t)  # alive while the pass lives, so no other tensor takes its id


@keras.saving.register_keras_serializable(package="tfopt")
class QuantizeComposite(_wrappers.TfoptWrapper):
    """Runs a composite layer (attention, normalization, embedding, a block of sub-layers) as int8 TFLite will.

    See the module docstring for where the fake quants go.

    Args:
        layer: the layer, built.
        sites: ``[[name, kind]]`` of its fake-quant sites; None finds them on the first call.
        preserve_sparsity: keep the zeros its quantized weights have when the wrapper is built (a 0/1
            ``<weight>_mask`` variable per weight, multiplied in before fake quant).
        ema_decay: decay of the moving-average ranges, in [0, 1).
        **kwargs: base layer arguments.
    """

    technique = "QAT"
    _config_keys = ("sites", "preserve_sparsity", "ema_decay")

    def __init__(self, layer, sites=None, preserve_sparsity=False, ema_decay=0.99, **kwargs):
        super().__init__(layer, **kwargs)
        self.sites = None if sites is None else [list(s) for s in sites]
        self.preserve_sparsity = bool(preserve_sparsity)
        self.ema_decay, _ = _check_options(ema_decay, None)

    # ----- structure -----------------------------------------------------------

    def _keys(self):
        """(layer, key) for the wrapped layer and each sub-layer; keys follow the layer's structure, not names."""
        return [(self.layer, "self")] + [(sub, f"l{i}") for i, sub in enumerate(_graph.sublayers(self.layer))]

    def __call__(self, *args, **kwargs):
        if self.sites is None:
            self.sites = self._discover(args, kwargs)
        return super().__call__(*args, **kwargs)

    def _discover(self, args, kwargs):
        """The sites of one forward pass on zeros (ones for boolean masks) of the shapes of the call's tensors."""

        def concrete(t):
            if not isinstance(t, keras.KerasTensor):
                return t
            shape, dtype = [1 if d is None else d for d in t.shape], keras.backend.standardize_dtype(t.dtype)
            return ops.ones(shape, dtype) if dtype == "bool" else ops.zeros(shape, dtype)

        recorder = _Pass(self, False, record=True)
        self._forward(recorder, *keras.tree.map_structure(concrete, (args, kwargs)))
        return recorder.found

    def build(self, input_shape=None):
        super().build(input_shape)
        self._masks = {
            id(var): self.add_weight(name=f"{var.name}_mask", shape=var.shape, initializer=_nonzero(var),
                                     trainable=False)
            for var, _ in (quantized_weights(self.layer) if self.preserve_sparsity else [])
        }
        self._ranges = {name: MovingAverageQuantizer(ema_decay=self.ema_decay).build(None, name, self)
                        for name, kind in self.sites or () if kind == "ema"}

    def _range_variables(self):
        return [v for r in getattr(self, "_ranges", {}).values() for v in r.values()]

    # ----- forward -------------------------------------------------------------

    def _quantize(self, key, kind, x, training, stats=None):
        if kind in _FIXED:
            return FixedRangeQuantizer(*_FIXED[kind])(x, training)
        if key not in self._ranges:
            raise ValueError(
                f"Layer {self.layer.name!r} computed a tensor ({key!r}) its QAT wrapper did not see when it was "
                "first called: its forward changes with the input's values or shape. Give the model fixed input "
                f"shapes, or leave the layer float with `filters=`. Received: sites={[s[0] for s in self.sites]}"
            )
        r = self._ranges[key]
        x32 = ops.cast(x, "float32")
        if training:
            seen = x32 if stats is None else ops.cast(stats, "float32")
            lo, hi = moving_average_range(seen, r["min"], r["max"], r["initialized"], self.ema_decay)
        else:
            lo, hi = r["min"], r["max"]
        return ops.cast(fake_quant(x32, lo, hi, num_bits=8), x.dtype)

    def call(self, *args, training=None, **kwargs):
        return self._forward(_Pass(self, training, record=False), args, kwargs, training)

    def _forward(self, tap, args, kwargs, training=None):
        layer = self.layer
        if training is not None and "training" in layer._call_signature.parameters:
            kwargs = {**kwargs, "training": training}
        tap.seen([t for t in keras.tree.flatten((args, kwargs)) if hasattr(t, "dtype")])
        with_masks = self._masks if hasattr(self, "_masks") else {}
        with _wrappers.stored_dtype():  # the weight path runs on the float32 variables
            mapping = []
            for var, quantize in quantized_weights(layer):
                w = ops.convert_to_tensor(var)
                mask = with_masks.get(id(var))
                mapping.append((var, quantize(w if mask is None else w * ops.cast(mask, w.dtype))))
        with (_int8_forms.forms(layer), _int8_forms.tapping(tap), self._hooks(tap),
              _substituted(mapping, self._range_variables())):
            outputs = layer(*args, **kwargs)
        flat = [tap(layer, f"out{i}", t, _kind(layer)) for i, t in enumerate(keras.tree.flatten(outputs))]
        return keras.tree.pack_sequence_as(outputs, flat)

    @contextlib.contextmanager
    def _hooks(self, tap):
        """Every sub-layer but the same-scale ones runs with its inputs and outputs tapped."""
        hooked = []  # (sub-layer, the instance's own `call` before: an int8 form, or None)
        try:
            for sub in _graph.sublayers(self.layer):
                spec = registry.lookup(sub)
                if spec is not None and spec.qat_role == "same_scale":
                    continue
                hooked.append((sub, vars(sub).get("call")))
                current = sub.call
                object.__setattr__(sub, "call", types.MethodType(
                    lambda layer, *a, _call=current, **k: _tapped_call(tap, layer, _call, a, k), sub))
            yield
        finally:
            for sub, before in reversed(hooked):
                if before is None:
                    object.__delattr__(sub, "call")
                else:
                    object.__setattr__(sub, "call", before)


def _tapped_call(tap, layer, call, args, kwargs):
    """`layer`'s `call` with its float inputs and outputs tapped; a kernel layer's non-fused activation apart."""
    args, kwargs = keras.tree.map_structure(lambda t: tap(layer, "in", t), (args, kwargs))
    row, act = _kernel_row(layer), _activation(layer)
    if row is None or act in _FUSED or not row.activation:
        out = call(*args, **kwargs)
    else:  # its pre-activation is an int8 tensor of its own (GELU, sigmoid: separate TFLite ops)
        activation = getattr(layer, row.activation)
        object.__setattr__(layer, row.activation, keras.activations.linear)
        try:
            out = call(*args, **kwargs)
        finally:
            object.__setattr__(layer, row.activation, activation)
        out = activation(tap(layer, "pre", out))
    flat = [tap(layer, f"out{i}", t, _kind(layer)) for i, t in enumerate(keras.tree.flatten(out))]
    return keras.tree.pack_sequence_as(out, flat)
