"""`UpdatePruningStep`: advances the pruning step and applies the schedule."""

import math

import keras
import numpy as np
from keras import ops

from tfopt.pruning import _pruned_wrappers


class UpdatePruningStep(keras.callbacks.Callback):
    """Advances each pruning wrapper's step and updates its masks on schedule.

    Before every training batch it increments ``pruning_step`` in each
    `tfopt.PruneLowMagnitude` layer and, when the layer's schedule says so,
    recomputes its masks. The step lives in the model's variables, so a model
    saved as `.keras` (or restored by `keras.callbacks.BackupAndRestore`)
    resumes where it stopped; the step is read back at the first batch of
    every `fit`, after other callbacks have restored state.

    The model-wide sparsity of the pruned weights is added to the logs as
    ``sparsity``, so it shows in the progress bar and in `History`.

    `async_safe`: its batch-end hook only writes a Python float into the logs.

    Example:
        >>> model.fit(x, y, epochs=2, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    """

    async_safe = True

    def __init__(self):
        super().__init__()
        self._wrappers = []
        self._steps = None
        self._kept = None
        self._sizes = None

    def on_train_begin(self, logs=None):
        self._wrappers = _pruned_wrappers(self.model)
        if not self._wrappers:
            raise ValueError(
                "UpdatePruningStep found no tfopt.PruneLowMagnitude layer in the model. Wrap the model "
                "with `tfopt.prune_low_magnitude(model, ...)` before training, or drop this callback."
            )
        for w in self._wrappers:
            w._step_callback_attached = True
        self._steps = None
        self._unbuilt_steps = 0

    def on_train_end(self, logs=None):
        for w in self._wrappers:
            w._step_callback_attached = False

    def _read_state(self):
        self._steps = [int(ops.convert_to_numpy(w.pruning_step)) + self._unbuilt_steps for w in self._wrappers]
        self._sizes = [sum(math.prod(v.shape) for v, _, _ in w.pruned_weights) for w in self._wrappers]
        self._kept = [
            sum(int(np.sum(ops.convert_to_numpy(m))) for _, m, _ in w.pruned_weights) for w in self._wrappers
        ]

    def on_train_batch_begin(self, batch, logs=None):
        if self._steps is None:
            if not all(w.built for w in self._wrappers):
                # A subclassed model builds its layers in its first train step:
                # count the step, prune from the next one.
                self._unbuilt_steps += 1
                return
            self._read_state()
        for i, wrapper in enumerate(self._wrappers):
            step = self._steps[i] + 1
            self._steps[i] = step
            wrapper.pruning_step.assign(step)
            should_prune, sparsity = wrapper.pruning_schedule(step)
            if should_prune:
                self._kept[i] = wrapper.update_masks(sparsity)

    @property
    def sparsity(self):
        """Fraction of zeros over all pruned weights, as of the last mask update."""
        if not self._sizes:
            return 0.0
        return 1.0 - sum(self._kept) / sum(self._sizes)

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None and self._steps is not None:
            logs["sparsity"] = self.sparsity

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._steps is not None:
            logs["sparsity"] = self.sparsity
