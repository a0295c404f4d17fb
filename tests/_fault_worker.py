"""Prunes then quantization-aware-trains a tiny seeded model, resumably; dumps the final state as .npz.

Run by tests/test_faults.py in subprocesses, which kill it with SIGKILL mid-epoch and start it again:

    python tests/_fault_worker.py VARIANT STATE_DIR OUT.npz [--hang PHASE:STEP] [--replay EPOCH:BATCH]

VARIANT says how training survives a kill:
    none        no fault tolerance (the uninterrupted reference run);
    backup      `keras.callbacks.BackupAndRestore(save_freq=4 batches)` in each phase;
    checkpoint  `keras.callbacks.ModelCheckpoint` (.keras, every epoch); a restart loads the
                newest checkpoint with `keras.saving.load_model` and passes `initial_epoch`.
Phases: "prune" (PolynomialDecay, masks change every 2 steps) then "qat" (`tfopt.quantize_model`
of the stripped model). A finished phase leaves `<phase>_done.keras`, so a restart skips it.
After every batch the worker writes "<phase> <optimizer step>" to STATE_DIR/progress; with
``--hang PHASE:STEP`` it then stops at that step (sleeps) so the test can kill it there.
``--replay EPOCH:BATCH`` (with VARIANT none) trains the prune phase on exactly the batch sequence
a BackupAndRestore resume from a backup taken at (EPOCH, BATCH) trains on, without any kill.
"""

import argparse
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfopt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import image_data, tiny_cnn  # noqa: E402

SEED = 3
N, BATCH = 96, 16  # 6 steps per epoch
EPOCHS = {"prune": 3, "qat": 2}
SAVE_FREQ = 4  # BackupAndRestore: every 4 batches
SCHEDULE = dict(initial_sparsity=0.0, final_sparsity=0.8, begin_step=0, end_step=12, frequency=2)
FREEZE_BN_DELAY = 8  # the QAT step counter decides when BN folding freezes


class Progress(keras.callbacks.Callback):
    def __init__(self, path, phase, hang):
        super().__init__()
        self.path, self.phase, self.hang = path, phase, hang

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{self.phase} {step}")
        os.replace(tmp, self.path)
        if self.hang == (self.phase, step):
            time.sleep(3600)  # wait here for the SIGKILL


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _save(model, path):
    tmp = path[: -len(".keras")] + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)


def _latest_checkpoint(state, phase):
    epochs = [int(f[len(phase) + 1 : -len(".keras")]) for f in os.listdir(state)
              if f.startswith(phase + "-") and f.endswith(".keras")]
    return max(epochs, default=0)


def _run_phase(phase, make_model, args, x, y):
    done = os.path.join(args.state, f"{phase}_done.keras")
    if os.path.exists(done):
        return keras.saving.load_model(done)
    model = _compile(make_model())
    callbacks = [tfopt.callbacks.UpdatePruningStep()] if phase == "prune" else []
    initial_epoch = 0
    if args.variant == "backup":
        callbacks.insert(0, keras.callbacks.BackupAndRestore(os.path.join(args.state, f"{phase}_backup"),
                                                            save_freq=SAVE_FREQ))
    elif args.variant == "checkpoint":
        initial_epoch = _latest_checkpoint(args.state, phase)
        if initial_epoch:
            model = keras.saving.load_model(os.path.join(args.state, f"{phase}-{initial_epoch}.keras"))
        callbacks.insert(0, keras.callbacks.ModelCheckpoint(os.path.join(args.state, phase + "-{epoch}.keras")))
    callbacks.append(Progress(os.path.join(args.state, "progress"), phase, args.hang))
    fit = dict(batch_size=BATCH, shuffle=False, verbose=0, callbacks=callbacks)
    if args.replay and phase == "prune":
        # What BackupAndRestore does with a backup taken at (epoch, batch): Keras 3 restores the
        # weights and restarts that epoch from its first batch.
        epoch, batch = args.replay
        if epoch:
            model.fit(x, y, epochs=epoch, **fit)
        model.fit(x[: (batch + 1) * BATCH], y[: (batch + 1) * BATCH], epochs=1, **fit)
        model.fit(x, y, epochs=EPOCHS[phase] - epoch, **fit)
    else:
        model.fit(x, y, epochs=EPOCHS[phase], initial_epoch=initial_epoch, **fit)
    _save(model, done)
    return model


def _dump(prefix, variables, out):
    for i, v in enumerate(variables):
        out[f"{prefix}/{i:03d}/{v.path}"] = np.asarray(v.numpy())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=("none", "backup", "checkpoint"))
    parser.add_argument("state")
    parser.add_argument("out")
    parser.add_argument("--hang", default=None, type=lambda s: (s.split(":")[0], int(s.split(":")[1])))
    parser.add_argument("--replay", default=None, type=lambda s: tuple(int(v) for v in s.split(":")))
    args = parser.parse_args()
    os.makedirs(args.state, exist_ok=True)

    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    x, y = image_data(N, seed=SEED)

    pruned = _run_phase("prune", lambda: tfopt.prune_low_magnitude(tiny_cnn(), tfopt.PolynomialDecay(**SCHEDULE)),
                        args, x, y)
    stripped = tfopt.strip_pruning(pruned)
    qat = _run_phase("qat", lambda: tfopt.quantize_model(stripped, freeze_bn_delay=FREEZE_BN_DELAY), args, x, y)

    out = {}
    _dump("prune", pruned.variables, out)
    _dump("prune_optimizer", pruned.optimizer.variables, out)
    _dump("qat", qat.variables, out)
    _dump("qat_optimizer", qat.optimizer.variables, out)
    tmp = args.out + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
