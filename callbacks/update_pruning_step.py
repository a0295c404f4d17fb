"""`UpdatePruningStep`: applies each pruning wrapper's schedule between steps."""

import math

import keras
import numpy as np
from keras import ops

from tfopt.pruning import pruned_wrappers


class UpdatePruningStep(keras.callbacks.Callback):
    """Updates the pruning masks when each layer's schedule says so.

    Each `tfopt.PruneLowMagnitude` layer counts its training steps in its
    ``pruning_step`` variable (inside the train step, so a checkpoint taken at
    any batch holds the right step). This callback reads the steps once at
    the first batch of every `fit` (after other callbacks such as
    `keras.callbacks.BackupAndRestore` have restored state), mirrors them in
    Python, and before a batch whose step is on the schedule it recomputes the
    masks. Steps in between cost nothing: no variable is read or written.

    With ``steps_per_execution=N`` the callback runs once per N steps; an
    update due inside those N steps is applied at their start, with the
    sparsity of the last due step.

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
        self._base = None  # each wrapper's step when this fit started
        self._done = 0  # steps completed in this fit before the current epoch
        self._last_end = -1
        self._kept = []
        self._sizes = []

    def on_train_begin(self, logs=None):
        self._wrappers = pruned_wrappers(self.model)
        if not self._wrappers:
            raise ValueError(
                "UpdatePruningStep found no tfopt.PruneLowMagnitude layer in the model. Wrap the model "
                "with `tfopt.prune_low_magnitude(model, ...)` before training, or drop this callback. "
                f"Received: model={self.model.name!r}"
            )
        for w in self._wrappers:
            w._step_callback_attached = True
        self._base, self._done, self._last_end = None, 0, -1

    def on_train_end(self, logs=None):
        for w in self._wrappers:
            w._step_callback_attached = False

    def on_epoch_end(self, epoch, logs=None):
        self._done += self._last_end + 1
        self._last_end = -1
        if logs is not None and self._base is not None:
            logs["sparsity"] = self.sparsity

    def _sync(self):
        # On JAX, `fit` holds the variable values outside the variables between
        # epochs; reading `self.model` attaches them (and makes `fit` pick up
        # what is written here). Done only when variables are read or written.
        return self.model

    def _read_state(self, steps_so_far):
        self._sync()
        self._base = [int(ops.convert_to_numpy(w.pruning_step)) - steps_so_far for w in self._wrappers]
        self._sizes = [sum(math.prod(v.shape) for v, _, _ in w.pruned_weights) for w in self._wrappers]
        self._kept = [w.read_mask_state() for w in self._wrappers]

    def on_train_batch_begin(self, batch, logs=None):
        done = self._done + batch  # steps of this fit completed before this batch
        if self._base is None:
            if not all(w.built for w in self._wrappers):
                # A subclassed model builds its layers in its first train step:
                # nothing to prune before that.
                return
            self._read_state(done)
        per_call = getattr(self.model, "steps_per_execution", 1) or 1
        for i, wrapper in enumerate(self._wrappers):
            first = self._base[i] + done + 1
            due = [wrapper.pruning_schedule(s) for s in range(first, first + per_call)]
            due = [sparsity for should_prune, sparsity in due if should_prune]
            if due:
                self._sync()
                self._kept[i] = wrapper.update_masks(due[-1])

    def on_train_batch_end(self, batch, logs=None):
        self._last_end = batch  # Keras passes the last step index of the execution
        if logs is not None and self._base is not None:
            logs["sparsity"] = self.sparsity

    @property
    def sparsity(self):
        """Fraction of zeros over all pruned weights, as of the last mask update."""
        if not self._sizes:
            return 0.0
        return 1.0 - sum(self._kept) / sum(self._sizes)
