"""Fake-quant quantizers for quantization-aware training, on `keras.quantizers`.

Each quantizer is a pure function plus a thin serializable class, the way the
converter and the int8 kernels see numbers:

- `fake_quant(x, min_value, max_value, num_bits, narrow_range, axis)` is
  `keras.quantizers.fake_quant_with_min_max_vars`. On the TensorFlow backend it
  emits ``FakeQuantWithMinMaxVars[PerChannel]``, the ops the TFLite converter
  reads the int8 scales from. With ``q = 2**num_bits - 1`` levels
  (``q - 1`` when `narrow_range`), ``scale = (max - min) / q`` and the range is
  first nudged so that 0.0 is exactly representable:
  ``y = round((clip(x, min', max') - min') / scale) * scale + min'``.
  The gradient is straight-through inside ``[min', max']`` and zero outside.
- `symmetric_range(w, axis)`: ``max = max|w|`` (per channel along `axis`, or
  over the whole tensor), ``min = -max``. With `narrow_range` this gives the
  int8 weight grid of TFLite: zero-point 0, levels ``-127..127``,
  ``scale = max|w| / 127``.
- `moving_average_range(x, min_var, max_var, initialized_var, ema_decay)`:
  the first training batch sets ``[min, max]`` to the batch's observed range;
  after that ``min <- decay * min + (1 - decay) * min(x)`` (same for max).
  TFMOT starts every range at ``[-6, 6]`` with a fixed decay of 0.999, so its
  ranges are still far off after 1,000 steps; here they are right from step 1.

The classes (`LastValueQuantizer`, `MovingAverageQuantizer`,
`FixedRangeQuantizer`) follow TFMOT's `Quantizer` interface: ``build(shape,
name, layer)`` creates the variables the quantizer needs on `layer` and returns
them as a dict; ``__call__(inputs, training, weights)`` returns the
fake-quantized tensor (and, in training, updates the range variables in-graph).
They are serializable with a flat `get_config`.
"""

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


def fake_quant(x, min_value, max_value, num_bits=8, narrow_range=False, axis=None):
    """Fake-quantizes `x` to `num_bits` on ``[min_value, max_value]``.

    ``scale = (max - min) / (2**num_bits - 1 - narrow_range)``; the range is
    nudged so that 0.0 falls on the grid, then
    ``y = round((clip(x, min, max) - min) / scale) * scale + min``.
    Gradients: ``dy/dx = 1`` inside the nudged range, 0 outside.

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
    return keras.quantizers.fake_quant_with_min_max_vars(
        x, min_value, max_value, num_bits=num_bits, narrow_range=narrow_range, axis=axis
    )


def symmetric_range(w, axis=None):
    """The symmetric range ``(-max|w|, max|w|)``, per channel along `axis` or per tensor."""
    if axis is None:
        m = ops.max(ops.abs(w))
    else:
        axis = axis % len(w.shape)
        reduce = tuple(i for i in range(len(w.shape)) if i != axis)
        m = ops.max(ops.abs(w), axis=reduce)
    m = ops.maximum(m, _MIN_RANGE)
    return -m, m


def moving_average_range(x, min_var, max_var, initialized_var, ema_decay, non_negative=False):
    """Updates and returns an activation range from the batch `x`.

    The first call (``initialized_var == 0``) copies the batch range; later
    calls blend: ``new = ema_decay * old + (1 - ema_decay) * batch``. The range
    always contains 0 (TFLite needs zero exactly representable).

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
    new_max = ops.maximum(new_max, new_min + _MIN_RANGE)
    min_var.assign(new_min)
    max_var.assign(new_max)
    initialized_var.assign(ops.ones_like(initialized_var))
    return new_min, new_max


class Quantizer:
    """Base class: how one tensor (a weight or an activation) is fake-quantized.

    Subclasses implement `build` (create the variables they need on the layer,
    return them as a dict), `__call__` and `get_config`.
    """

    def build(self, tensor_shape, name, layer):
        """Creates the quantizer's variables on `layer`; returns them by name."""
        return {}

    def __call__(self, inputs, training, weights):
        raise NotImplementedError

    def get_config(self):
        return {}

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

    def __init__(self, num_bits=8, per_axis=False, axis=-1, narrow_range=True):
        self.num_bits = int(num_bits)
        self.per_axis = bool(per_axis)
        self.axis = int(axis)
        self.narrow_range = bool(narrow_range)

    def __call__(self, inputs, training=None, weights=None):
        axis = self.axis if self.per_axis else None
        lo, hi = symmetric_range(inputs, axis)
        return fake_quant(inputs, lo, hi, self.num_bits, self.narrow_range, axis)

    def get_config(self):
        return {"num_bits": self.num_bits, "per_axis": self.per_axis, "axis": self.axis, "narrow_range": self.narrow_range}


@keras.saving.register_keras_serializable(package="tfopt")
class MovingAverageQuantizer(Quantizer):
    """Activation quantizer: asymmetric, per tensor, range by moving average.

    In training the range is initialized from the first batch and then
    follows ``range <- ema_decay * range + (1 - ema_decay) * batch_range``
    (see `moving_average_range`); in inference the stored range is used.
    Creates three non-trainable scalar variables, in this order:
    ``<name>_min``, ``<name>_max``, ``<name>_initialized``.

    Args:
        num_bits: bit width.
        ema_decay: moving-average decay in [0, 1).
        narrow_range: use ``2**num_bits - 2`` levels.
        non_negative: the input is known to be >= 0 (e.g. a ReLU output):
            the range's lower end is 0 without reducing over the batch (one
            pass over the activation less per training step).
    """

    def __init__(self, num_bits=8, ema_decay=0.99, narrow_range=False, non_negative=False):
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1). Received: ema_decay={ema_decay!r}")
        self.num_bits = int(num_bits)
        self.ema_decay = float(ema_decay)
        self.narrow_range = bool(narrow_range)
        self.non_negative = bool(non_negative)

    def build(self, tensor_shape, name, layer):
        def var(suffix, value):
            return layer.add_weight(
                name=f"{name}_{suffix}",
                shape=(),
                initializer=keras.initializers.Constant(value),
                trainable=False,
                dtype="float32",
            )

        # Untrained ranges start at [-6, 6] only so that an untrained model
        # still runs; the first training batch overwrites them.
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

    def get_config(self):
        return {
            "num_bits": self.num_bits,
            "ema_decay": self.ema_decay,
            "narrow_range": self.narrow_range,
            "non_negative": self.non_negative,
        }


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

    def __init__(self, min_value, max_value, num_bits=8, narrow_range=False):
        if not float(min_value) <= 0.0 <= float(max_value) or float(min_value) == float(max_value):
            raise ValueError(
                "A fixed range must contain 0 and have positive width. "
                f"Received: min_value={min_value!r}, max_value={max_value!r}"
            )
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        self.num_bits = int(num_bits)
        self.narrow_range = bool(narrow_range)

    def __call__(self, inputs, training=None, weights=None):
        x = ops.cast(inputs, "float32")
        y = fake_quant(x, self.min_value, self.max_value, self.num_bits, self.narrow_range)
        return ops.cast(y, inputs.dtype)

    def get_config(self):
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "num_bits": self.num_bits,
            "narrow_range": self.narrow_range,
        }
