"""Fake-quant quantizers for quantization-aware training, on `keras.quantizers`.

Each quantizer is a pure function plus a thin serializable class, the way the
converter and the int8 kernels see numbers: `fake_quant` (the op the TFLite
converter reads the int8 scales from), `symmetric_range` (weights) and
`moving_average_range` (activations); the formulas are in their docstrings.
The classes (`LastValueQuantizer`, `MovingAverageQuantizer`,
`FixedRangeQuantizer`) follow TFMOT's `Quantizer` interface (see `Quantizer`).
"""

import numbers

import keras
from keras import ops

__all__ = [
    "Quantizer",
    "LastValueQuantizer",
    "MovingAverageQuantizer",
    "FixedRangeQuantizer",
    "fake_quant",
    "symmetric_range",
    "moving_average_range",
]

# A range narrower than this is widened: a zero-width range gives scale 0.
_MIN_RANGE = 1e-6
# Activation ranges are at least this wide. A dead activation (a ReLU that never fires, common in small
# heavily pruned layers) would otherwise get a ~4e-9 int8 scale, and the op producing it a requantization
# scale (in_scale * w_scale / out_scale) far above what XNNPACK accepts (< 256; ADD needs input/output
# scale ratios >= 2**-14): LiteRT's default CPU runtime then refuses the whole model. Real activations
# span far more than 0.01, so this costs them nothing.
_MIN_ACTIVATION_RANGE = 1e-2


def _check_num_bits(num_bits):
    # The FakeQuant ops (and TFLite) take 2 to 16 bits; checked here, not deep in the backend at the first call.
    if isinstance(num_bits, bool) or not isinstance(num_bits, numbers.Integral):
        raise TypeError(f"`num_bits` must be an integer from 2 to 16, e.g. 8. Received: num_bits={num_bits!r}")
    if not 2 <= num_bits <= 16:
        raise ValueError(
            f"`num_bits` must be from 2 to 16 (8 for int8 TFLite kernels). Received: num_bits={num_bits!r}"
        )
    return int(num_bits)


def fake_quant(x, min_value, max_value, num_bits=8, narrow_range=False, axis=None):
    """Fake-quantizes `x` to `num_bits` on ``[min_value, max_value]``.

    `keras.quantizers.fake_quant_with_min_max_vars`: on the TensorFlow backend
    it emits ``FakeQuantWithMinMaxVars[PerChannel]``, the ops the TFLite
    converter reads the int8 scales from. ``scale = (max - min) / (2**num_bits - 1 - narrow_range)``; the range is
    nudged so that 0.0 falls on the grid, then
    ``y = round((clip(x, min, max) - min) / scale) * scale + min``.
    Gradients: ``dy/dx = 1`` inside the nudged range (bounds included), 0
    outside; the upstream gradient of the values strictly below (above) the
    range goes to `min_value` (`max_value`), as in TensorFlow's FakeQuant
    gradient, on every backend.

    Args:
        x: float tensor.
        min_value: scalar, or one value per channel along `axis`.
        max_value: like `min_value`.
        num_bits: bit width (2 to 16).
        narrow_range: drop the lowest level (int8: ``-127..127``), as TFLite
            does for weights.
        axis: channel axis for per-channel ranges, None for per-tensor.

    Returns:
        The fake-quantized tensor, same shape and dtype as `x`.
    """
    num_bits = _check_num_bits(num_bits)
    if keras.backend.backend() != "tensorflow" and not isinstance(x, keras.KerasTensor):
        return _fake_quant_tf_gradient(x, min_value, max_value, num_bits, narrow_range, axis)
    return keras.quantizers.fake_quant_with_min_max_vars(
        x, min_value, max_value, num_bits=num_bits, narrow_range=narrow_range, axis=axis
    )


def _nudged_range(lo, hi, num_bits, narrow_range):
    # Keras' nudging, step by step, so the gradient masks clip exactly where its forward pass clips.
    quant_max = (1 << num_bits) - 1
    quant_min = 1 if narrow_range else 0
    scale = ops.divide(ops.subtract(hi, lo), quant_max - quant_min)
    zero_point = ops.round(ops.clip(quant_min - ops.divide(lo, scale), quant_min, quant_max))
    nudged_min = ops.multiply(ops.subtract(quant_min, zero_point), scale)
    return nudged_min, ops.multiply(ops.subtract(quant_max, zero_point), scale)


def _fake_quant_tf_gradient(x, min_value, max_value, num_bits, narrow_range, axis):
    """Keras' fake quant (JAX, PyTorch, NumPy backends) with TensorFlow's gradient.

    Keras' own gradient on these backends also sends the gradient of a value lying exactly on a
    nudged bound to `min_value` / `max_value` (``x <= min``, ``x >= max``), on top of passing it to
    `x`. TensorFlow's FakeQuant gradient uses strict inequalities. The bound is hit every step (the
    largest |w| of a weight is its range), so training would drift from TensorFlow's by a step's
    worth of gradient on those values.
    """
    x = ops.convert_to_tensor(x)
    lo, hi = ops.convert_to_tensor(min_value, "float32"), ops.convert_to_tensor(max_value, "float32")
    rank = len(x.shape)
    axis = None if axis is None else axis % rank

    @ops.custom_gradient
    def quantize(x, lo, hi):
        y = keras.quantizers.fake_quant_with_min_max_vars(
            x, lo, hi, num_bits=num_bits, narrow_range=narrow_range, axis=axis
        )
        nudged_min, nudged_max = _nudged_range(lo, hi, num_bits, narrow_range)
        if axis is not None:
            shape = [-1 if i == axis else 1 for i in range(rank)]
            nudged_min, nudged_max = ops.reshape(nudged_min, shape), ops.reshape(nudged_max, shape)
        xf = ops.cast(x, "float32")
        inside = ops.logical_and(ops.greater_equal(xf, nudged_min), ops.less_equal(xf, nudged_max))
        below, above = ops.less(xf, nudged_min), ops.greater(xf, nudged_max)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            reduce = tuple(i for i in range(rank) if i != axis) if axis is not None else None
            up = ops.cast(upstream, "float32")
            d_lo = ops.sum(ops.where(below, up, 0.0), axis=reduce)
            d_hi = ops.sum(ops.where(above, up, 0.0), axis=reduce)
            dx = ops.where(inside, upstream, ops.zeros_like(upstream))
            return dx, ops.reshape(d_lo, ops.shape(lo)), ops.reshape(d_hi, ops.shape(hi))

        return y, grad

    return quantize(x, lo, hi)


def symmetric_range(w, axis=None):
    """The symmetric range ``(-max|w|, max|w|)``, per channel along `axis` or per tensor.

    With `narrow_range` this gives the int8 weight grid of TFLite: zero-point
    0, levels ``-127..127``, ``scale = max|w| / 127``.
    """
    rank = len(w.shape)
    reduce = None if axis is None else tuple(i for i in range(rank) if i != axis % rank)
    m = ops.maximum(ops.max(ops.abs(w), axis=reduce), _MIN_RANGE)
    return -m, m


def moving_average_range(x, min_var, max_var, initialized_var, ema_decay, non_negative=False):
    """Updates and returns an activation range from the batch `x`.

    The first call (``initialized_var == 0``) copies the batch range; later
    calls blend: ``new = ema_decay * old + (1 - ema_decay) * batch``. The range
    always contains 0 (TFLite needs zero exactly representable) and is at
    least 0.01 wide (a dead activation must not get a scale that XNNPACK
    refuses). TFMOT starts every range at ``[-6, 6]`` with a fixed decay of
    0.999, so its ranges are still far off after 1,000 steps; here they are
    right from step 1.

    Args:
        x: the activation tensor of this batch.
        min_var, max_var: scalar float variables holding the range.
        initialized_var: scalar float variable, 0 until the first update.
        ema_decay: float in [0, 1).
        non_negative: `x` is known to be >= 0 (a ReLU output), so
            ``min(min(x), 0) == 0`` and the reduction over `x` is skipped.

    Returns:
        ``(min, max)`` tensors after the update (the variables are assigned).
    """
    batch_min = ops.zeros((), x.dtype) if non_negative else ops.minimum(ops.min(x), 0.0)
    batch_max = ops.maximum(ops.max(x), 0.0)
    first = ops.equal(initialized_var, 0.0)
    new_min = ops.where(first, batch_min, ema_decay * min_var + (1.0 - ema_decay) * batch_min)
    new_max = ops.where(first, batch_max, ema_decay * max_var + (1.0 - ema_decay) * batch_max)
    new_max = ops.maximum(new_max, new_min + _MIN_ACTIVATION_RANGE)
    min_var.assign(new_min)
    max_var.assign(new_max)
    initialized_var.assign(ops.ones(initialized_var.shape, initialized_var.dtype))
    return new_min, new_max


class Quantizer:
    """Base class: how one tensor (a weight or an activation) is fake-quantized.

    TFMOT's `Quantizer` interface: ``build(tensor_shape, name, layer)`` creates
    the variables the quantizer needs on `layer` and returns them as a dict;
    ``__call__(inputs, training, weights)`` returns the fake-quantized tensor
    (and, in training, updates the range variables in-graph). Serializable with
    a flat `get_config` (by default the attributes named in `_config_keys`, the
    constructor arguments).
    """

    _config_keys = ()

    def build(self, tensor_shape, name, layer):
        """Creates the quantizer's variables on `layer`; returns them by name."""
        return {}

    def __call__(self, inputs, training, weights):
        raise NotImplementedError

    def get_config(self):
        return {key: getattr(self, key) for key in self._config_keys}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="tfopt")
class LastValueQuantizer(Quantizer):
    """Weight quantizer: the range is taken from the current tensor at every step.

    Symmetric (``[-max|w|, max|w|]``), per channel along `axis` when
    `per_axis`, narrow range by default: exactly the int8 weights TFLite
    stores (zero-point 0, levels -127..127). Creates no variables.

    Args:
        num_bits: bit width.
        per_axis: one range per channel along `axis`.
        axis: the channel axis of the weight (used when `per_axis`).
        narrow_range: use ``2**num_bits - 2`` levels (TFLite weights do).
    """

    _config_keys = ("num_bits", "per_axis", "axis", "narrow_range")

    def __init__(self, num_bits=8, per_axis=False, axis=-1, narrow_range=True):
        self.num_bits = _check_num_bits(num_bits)
        self.per_axis = bool(per_axis)
        self.axis = int(axis)
        self.narrow_range = bool(narrow_range)

    def __call__(self, inputs, training=None, weights=None):
        axis = self.axis if self.per_axis else None
        lo, hi = symmetric_range(inputs, axis)
        return fake_quant(inputs, lo, hi, self.num_bits, self.narrow_range, axis)


@keras.saving.register_keras_serializable(package="tfopt")
class MovingAverageQuantizer(Quantizer):
    """Activation quantizer: asymmetric, per tensor, range by moving average.

    In training the range is initialized from the first batch and then
    follows ``range <- ema_decay * range + (1 - ema_decay) * batch_range``
    (see `moving_average_range`); in inference the stored range is used.
    Creates three non-trainable scalar float32 variables (never autocast, so
    they stay float32 under a mixed precision policy), in this order:
    ``<name>_min``, ``<name>_max``, ``<name>_initialized``. The fake quant
    runs in float32; the result is cast back to the input's dtype.

    Args:
        num_bits: bit width.
        ema_decay: moving-average decay in [0, 1).
        narrow_range: use ``2**num_bits - 2`` levels.
        non_negative: the input is known to be >= 0 (e.g. a ReLU output):
            the range's lower end is 0 without reducing over the batch (one
            pass over the activation less per training step).
    """

    _config_keys = ("num_bits", "ema_decay", "narrow_range", "non_negative")

    def __init__(self, num_bits=8, ema_decay=0.99, narrow_range=False, non_negative=False):
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1). Received: ema_decay={ema_decay!r}")
        self.num_bits = _check_num_bits(num_bits)
        self.ema_decay = float(ema_decay)
        self.narrow_range = bool(narrow_range)
        self.non_negative = bool(non_negative)

    def build(self, tensor_shape, name, layer):
        def var(suffix, value):
            return layer.add_weight(
                name=f"{name}_{suffix}", shape=(), initializer=keras.initializers.Constant(value), trainable=False,
                dtype="float32", autocast=False,  # float32 under mixed_float16 too (see the class docstring)
                # Under a tf.distribute strategy each replica sees its own part of the batch; "mean" all-reduces
                # every update so all replicas (and workers) keep one identical range.
                aggregation="mean",
            )

        # [-6, 6] only lets an untrained model run; the first training batch overwrites the range.
        return {"min": var("min", -6.0), "max": var("max", 6.0), "initialized": var("initialized", 0.0)}

    def __call__(self, inputs, training, weights):
        x = ops.cast(inputs, "float32")
        if training:
            lo, hi = moving_average_range(
                x, weights["min"], weights["max"], weights["initialized"], self.ema_decay, self.non_negative
            )
        else:
            lo, hi = weights["min"], weights["max"]
        return ops.cast(fake_quant(x, lo, hi, self.num_bits, self.narrow_range), inputs.dtype)


@keras.saving.register_keras_serializable(package="tfopt")
class FixedRangeQuantizer(Quantizer):
    """Fake-quantizes on a fixed range (no variables).

    Used where the int8 kernel fixes the output scale: sigmoid and softmax
    output ``[0, 255/256]`` (scale 1/256, zero-point -128), tanh
    ``[-1, 127/128]`` (scale 1/128, zero-point 0).

    Args:
        min_value: lower end of the range (<= 0).
        max_value: upper end of the range (>= 0).
        num_bits: bit width.
        narrow_range: use ``2**num_bits - 2`` levels.
    """

    _config_keys = ("min_value", "max_value", "num_bits", "narrow_range")

    def __init__(self, min_value, max_value, num_bits=8, narrow_range=False):
        if not float(min_value) <= 0.0 <= float(max_value) or float(min_value) == float(max_value):
            raise ValueError(
                "A fixed range must contain 0 and have positive width. "
                f"Received: min_value={min_value!r}, max_value={max_value!r}"
            )
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        self.num_bits = _check_num_bits(num_bits)
        self.narrow_range = bool(narrow_range)

    def __call__(self, inputs, training=None, weights=None):
        x = ops.cast(inputs, "float32")
        y = fake_quant(x, self.min_value, self.max_value, self.num_bits, self.narrow_range)
        return ops.cast(y, inputs.dtype)
