"""Pruning schedules: when to update the masks, and to which sparsity.

A schedule is called with the training step (the number of optimizer steps
taken since the model was wrapped, counting the current one, so the first
batch of a fresh `fit` is step 1) and returns ``(should_prune, sparsity)``.
For the same arguments these return exactly what TFMOT 0.8.1 returns, so a
migrated training script updates its masks at the same steps.

Schedules are plain Python (no tensors): `tfopt.callbacks.UpdatePruningStep`
evaluates them between steps, outside the compiled train function.
"""

import warnings

import keras
import numpy as np

__all__ = ["PruningSchedule", "ConstantSparsity", "PolynomialDecay"]


def _check_sparsity(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"`{name}` must be a float in [0, 1). Received: {name}={value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1): it is the fraction of weights set to zero "
            f"(0.8 means 80% zeros; 1.0 would remove every weight). Received: {name}={value!r}"
        )


def _check_steps(begin_step, end_step, frequency, ramp):
    for name, value in (("begin_step", begin_step), ("end_step", end_step), ("frequency", frequency)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"`{name}` must be an integer step count. Received: {name}={value!r}")
    if begin_step < 0:
        raise ValueError(f"`begin_step` must be >= 0. Received: begin_step={begin_step}")
    if end_step == -1 and ramp:
        raise ValueError(
            "`end_step` cannot be -1 here: the sparsity ramp needs an end. Pass the step at "
            f"which the final sparsity is reached. Received: end_step={end_step}"
        )
    if end_step != -1 and end_step < begin_step:
        raise ValueError(
            "`end_step` must be >= `begin_step` (or -1 to prune until training ends). "
            f"Received: begin_step={begin_step}, end_step={end_step}"
        )
    if ramp and end_step == begin_step:
        raise ValueError(
            "`end_step` must be greater than `begin_step`: the ramp needs at least one step "
            "(use ConstantSparsity for a single jump). "
            f"Received: begin_step={begin_step}, end_step={end_step}"
        )
    if frequency <= 0:
        raise ValueError(
            f"`frequency` must be a positive number of steps between mask updates. Received: frequency={frequency}"
        )
    if end_step != -1 and (end_step - begin_step) % frequency != 0:
        last = begin_step + (end_step - begin_step) // frequency * frequency
        warnings.warn(
            f"(end_step - begin_step) = {end_step - begin_step} is not a multiple of frequency={frequency}: "
            f"the last mask update happens at step {last}, not at end_step={end_step}, so the final "
            "sparsity is never applied exactly. Choose end_step = begin_step + k * frequency.",
            stacklevel=3,
        )
    return int(begin_step), int(end_step), int(frequency)


class PruningSchedule:
    """Base class: says at each step whether to prune and to which sparsity.

    Subclasses implement `__call__(step) -> (should_prune, sparsity)` and
    `get_config()` (or name their constructor arguments in `_config_keys`).
    Register a subclass with `@keras.saving.register_keras_serializable()` so
    that saved models find it.

    Example:
        >>> @keras.saving.register_keras_serializable(package="my_app")
        ... class EveryTenSteps(tfopt.PruningSchedule):
        ...     def __init__(self, sparsity):
        ...         self.sparsity = sparsity
        ...     def __call__(self, step):
        ...         return step % 10 == 0, self.sparsity
        ...     def get_config(self):
        ...         return {"sparsity": self.sparsity}
    """

    _config_keys = ()

    def __call__(self, step):
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step) -> (should_prune, sparsity).")

    def get_config(self):
        if not self._config_keys:
            raise NotImplementedError(f"{type(self).__name__} must implement get_config() to be saved.")
        return {key: getattr(self, key) for key in self._config_keys}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @staticmethod
    def _should_prune_in_step(step, begin_step, end_step, frequency):
        """True when `step` is in [begin_step, end_step] and on a `frequency` beat."""
        in_range = step >= begin_step and (end_step < 0 or step <= end_step)
        return bool(in_range and (step - begin_step) % frequency == 0)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="tfopt")
class ConstantSparsity(PruningSchedule):
    """Prunes to one sparsity every `frequency` steps in [begin_step, end_step].

    ``should_prune(step) = begin_step <= step <= end_step (or end_step == -1)
    and (step - begin_step) % frequency == 0``; the sparsity is always
    `target_sparsity`.

    Args:
        target_sparsity: fraction of weights set to zero, in [0, 1).
        begin_step: first step at which masks may be updated (>= 0).
        end_step: last such step, or -1 to keep updating until training ends.
        frequency: steps between mask updates (> 0).

    Example:
        >>> schedule = tfopt.ConstantSparsity(0.5, begin_step=0, frequency=100)
        >>> schedule(100)
        (True, 0.5)
    """

    _config_keys = ("target_sparsity", "begin_step", "end_step", "frequency")

    def __init__(self, target_sparsity, begin_step, end_step=-1, frequency=100):
        _check_sparsity("target_sparsity", target_sparsity)
        self.begin_step, self.end_step, self.frequency = _check_steps(begin_step, end_step, frequency, ramp=False)
        self.target_sparsity = float(target_sparsity)

    def __call__(self, step):
        should = self._should_prune_in_step(step, self.begin_step, self.end_step, self.frequency)
        return should, float(np.float32(self.target_sparsity))


@keras.saving.register_keras_serializable(package="tfopt")
class PolynomialDecay(PruningSchedule):
    """Ramps the sparsity from `initial_sparsity` to `final_sparsity`.

    With ``p = clip((step - begin_step) / (end_step - begin_step), 0, 1)``:

        sparsity(step) = final_sparsity
                         + (initial_sparsity - final_sparsity) * (1 - p) ** power

    computed in float32 like TFMOT's train function, so the values match it bit
    for bit. Masks are updated every `frequency` steps from `begin_step` to `end_step`;
    after `end_step` they stay frozen (Zhu & Gupta, 2017,
    https://arxiv.org/abs/1710.01878).

    Args:
        initial_sparsity: sparsity at `begin_step`, in [0, 1).
        final_sparsity: sparsity at `end_step`, in [0, 1).
        begin_step: step at which the ramp starts (>= 0).
        end_step: step at which `final_sparsity` is reached (> begin_step).
        power: exponent of the ramp (> 0); 3 prunes fast early, then slowly.
        frequency: steps between mask updates (> 0). Warns when
            ``(end_step - begin_step) % frequency != 0``.

    Example:
        >>> schedule = tfopt.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=1000)
        >>> schedule(1000)
        (True, 0.800000011920929)
    """

    _config_keys = ("initial_sparsity", "final_sparsity", "begin_step", "end_step", "power", "frequency")

    def __init__(self, initial_sparsity, final_sparsity, begin_step, end_step, power=3, frequency=100):
        _check_sparsity("initial_sparsity", initial_sparsity)
        _check_sparsity("final_sparsity", final_sparsity)
        if isinstance(power, bool) or not isinstance(power, (int, float, np.integer, np.floating)) or not power > 0:
            raise ValueError(f"`power` must be a number > 0 (3 is the usual cubic ramp). Received: power={power!r}")
        self.begin_step, self.end_step, self.frequency = _check_steps(begin_step, end_step, frequency, ramp=True)
        self.initial_sparsity = float(initial_sparsity)
        self.final_sparsity = float(final_sparsity)
        self.power = power

    def sparsity_at(self, step):
        """The ramp value at `step`, whether or not masks update there.

        Evaluated in float32 the way TFMOT's train function really computes it
        (Grappler rewrites ``x / c`` as ``x * (1 / c)`` and ``c * x ** 3`` as
        ``(c * x) * (x * x)``), so the value is bit-exact with the sparsity TFMOT
        applies during `fit`, not just with its closed form.
        """
        f32 = np.float32
        p = f32(step - self.begin_step) * (f32(1.0) / f32(self.end_step - self.begin_step))
        x = f32(1.0) - np.minimum(f32(1.0), np.maximum(f32(0.0), p))
        c = f32(self.initial_sparsity - self.final_sparsity)
        if self.power == 1:
            scaled = c * x
        elif self.power == 2:
            scaled = c * (x * x)
        elif self.power == 3:
            scaled = (c * x) * (x * x)
        else:  # TF's Pow kernel is correctly rounded; numpy's float32 power is not always
            scaled = c * f32(np.float64(x) ** float(self.power))
        return float(f32(scaled + f32(self.final_sparsity)))

    def __call__(self, step):
        should = self._should_prune_in_step(step, self.begin_step, self.end_step, self.frequency)
        return should, self.sparsity_at(step)
