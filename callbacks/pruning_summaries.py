"""`PruningSummaries`: per-layer sparsity and thresholds to TensorBoard."""

import os

import keras
import numpy as np
from keras import ops

from tfopt.pruning import pruned_wrappers


def _tensorboard_writer(log_dir):
    try:
        from tensorboard.summary import Writer
    except ImportError as e:
        raise ImportError(
            "PruningSummaries writes TensorBoard event files and needs the `tensorboard` package, "
            "which is not installed. Fix: `pip install tensorboard` (or `pip install tfopt[summaries]`). "
            "Without it, the sparsity still shows in the fit logs as `sparsity`."
        ) from e
    return Writer(log_dir)


class PruningSummaries(keras.callbacks.Callback):
    """Writes each pruned weight's sparsity and threshold to TensorBoard.

    Scalars are named ``<layer>/<weight>_sparsity`` and
    ``<layer>/<weight>_threshold``, plus ``model/sparsity``. Use together
    with `tfopt.callbacks.UpdatePruningStep`. Fails at construction (not in
    the middle of `fit`) if `tensorboard` is not installed.

    Args:
        log_dir: directory for the event files (created if needed).
        update_freq: "epoch", or an integer: write every that many batches.

    Example:
        >>> callbacks = [tfopt.callbacks.UpdatePruningStep(),
        ...              tfopt.callbacks.PruningSummaries("logs/pruning")]
    """

    def __init__(self, log_dir, update_freq="epoch"):
        super().__init__()
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"`log_dir` must be a directory path. Received: log_dir={log_dir!r}")
        if not (update_freq == "epoch" or (isinstance(update_freq, int) and not isinstance(update_freq, bool) and update_freq > 0)):
            raise ValueError(
                f"`update_freq` must be 'epoch' or a positive number of batches. Received: update_freq={update_freq!r}"
            )
        self.log_dir = os.fspath(log_dir)
        self.update_freq = update_freq
        self._writer = _tensorboard_writer(self.log_dir)
        self._batches = 0

    def on_train_begin(self, logs=None):
        if not pruned_wrappers(self.model):
            raise ValueError(
                "PruningSummaries found no tfopt.PruneLowMagnitude layer in the model: there is no sparsity to "
                "log. Wrap the model with `tfopt.prune_low_magnitude(model, ...)` before training, or drop this "
                f"callback. Received: model={self.model.name!r}"
            )

    def _write(self):
        wrappers = pruned_wrappers(self.model)
        if not wrappers:
            return
        step = int(ops.convert_to_numpy(wrappers[0].pruning_step))
        zeros = total = 0
        for wrapper in wrappers:
            for weight, mask, threshold in wrapper.pruned_weights:
                m = ops.convert_to_numpy(mask)
                short = weight.path.split("/")[-1]
                zeros += int(m.size - np.sum(m))
                total += m.size
                self._writer.add_scalar(f"{wrapper.layer.name}/{short}_sparsity", 1.0 - float(np.mean(m)), step)
                self._writer.add_scalar(f"{wrapper.layer.name}/{short}_threshold", float(ops.convert_to_numpy(threshold)), step)
        self._writer.add_scalar("model/sparsity", zeros / max(total, 1), step)
        self._writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        if self.update_freq != "epoch":
            self._batches += 1
            if self._batches % self.update_freq == 0:
                self._write()

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self._write()

    def on_train_end(self, logs=None):
        self._writer.flush()
