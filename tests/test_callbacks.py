"""The pruning callbacks: logs, TensorBoard summaries, errors."""

import builtins
import os

import keras
import pytest

import tfopt
import tfopt.callbacks
from conftest import compile_for_test

# No TensorFlow in these tests: `make test-backends` runs them under JAX and PyTorch too.
pytestmark = pytest.mark.backend_independent


def test_sparsity_appears_in_history(cnn, data):
    x, y = data
    pruned = compile_for_test(tfopt.prune_low_magnitude(cnn, tfopt.PolynomialDecay(0.0, 0.6, 0, 4, frequency=2)))
    history = pruned.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    assert history.history["sparsity"][0] == pytest.approx(0.6, abs=0.01)
    assert history.history["sparsity"] == sorted(history.history["sparsity"])


def test_sparsity_shows_in_the_progress_bar(cnn, data, capsys):
    x, y = data
    pruned = compile_for_test(tfopt.prune_low_magnitude(cnn, tfopt.ConstantSparsity(0.5, 0, frequency=1)))
    pruned.fit(x, y, batch_size=16, epochs=1, verbose=2, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    assert "sparsity: 0.50" in capsys.readouterr().out


def test_update_pruning_step_needs_a_pruned_model(cnn, data):
    x, y = data
    compile_for_test(cnn)
    with pytest.raises(ValueError, match="no tfopt.PruneLowMagnitude layer"):
        cnn.fit(x, y, epochs=1, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])


@pytest.mark.parametrize("update_freq", ["epoch", 2], ids=["epoch", "every_2_batches"])
def test_pruning_summaries_write_event_files(cnn, data, tmp_path, update_freq):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = data
    pruned = compile_for_test(tfopt.prune_low_magnitude(cnn, tfopt.ConstantSparsity(0.5, 0, frequency=1)))
    pruned.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[
        tfopt.callbacks.UpdatePruningStep(), tfopt.callbacks.PruningSummaries(tmp_path, update_freq=update_freq)])
    events = EventAccumulator(str(tmp_path)).Reload()
    tags = events.Tags()["tensors"] + events.Tags()["scalars"]
    assert "conv_a/kernel_sparsity" in tags and "logits/kernel_threshold" in tags and "model/sparsity" in tags
    values = events.Tensors("model/sparsity") if "model/sparsity" in events.Tags()["tensors"] else events.Scalars("model/sparsity")
    assert len(values) == (2 if update_freq == "epoch" else 4)


def test_pruning_summaries_without_tensorboard_fails_at_construction(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r"pip install tensorboard"):
        tfopt.callbacks.PruningSummaries(tmp_path)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("kwargs,match", [({"log_dir": 3}, "log_dir"), ({"log_dir": "x", "update_freq": 0}, "update_freq")], ids=["log_dir", "update_freq"])
def test_pruning_summaries_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        tfopt.callbacks.PruningSummaries(**kwargs)
