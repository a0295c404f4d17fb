"""Schedules against their closed forms, validation, and serialization."""

import warnings

import keras
import numpy as np
import pytest

import tfopt
from helpers import assert_config_roundtrip

# No TensorFlow in these tests: `make test-backends` runs them under JAX and PyTorch too.
pytestmark = pytest.mark.backend_independent


def polynomial(step, initial, final, begin, end, power):
    p = min(1.0, max(0.0, (step - begin) / (end - begin)))
    return final + (initial - final) * (1 - p) ** power


@pytest.mark.parametrize("power", [1, 2, 3], ids=lambda p: f"power{p}")
@pytest.mark.parametrize("step", [0, 10, 50, 77, 100, 130, 1000], ids=lambda s: f"step{s}")
def test_polynomial_decay_matches_formula(step, power):
    schedule = tfopt.PolynomialDecay(0.1, 0.8, begin_step=10, end_step=130, power=power, frequency=10)
    should, sparsity = schedule(step)
    assert sparsity == pytest.approx(polynomial(step, 0.1, 0.8, 10, 130, power), abs=1e-6)
    assert should == (10 <= step <= 130 and (step - 10) % 10 == 0)


def test_polynomial_decay_is_float32_exact_at_ends():
    schedule = tfopt.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=100, frequency=10)
    assert schedule(0) == (True, 0.0)
    assert schedule(100) == (True, float(np.float32(0.8)))
    assert schedule(101) == (False, float(np.float32(0.8)))


@pytest.mark.parametrize(
    "begin,end,freq,step,expected",
    [
        (0, -1, 100, 0, True),
        (0, -1, 100, 99, False),
        (0, -1, 100, 100, True),
        (0, -1, 100, 10**6, True),
        (5, 25, 10, 4, False),
        (5, 25, 10, 15, True),
        (5, 25, 10, 25, True),
        (5, 25, 10, 35, False),
    ],
)
def test_constant_sparsity_should_prune(begin, end, freq, step, expected):
    schedule = tfopt.ConstantSparsity(0.5, begin_step=begin, end_step=end, frequency=freq)
    assert schedule(step) == (expected, 0.5)


def test_warns_when_final_sparsity_is_never_applied():
    with pytest.warns(UserWarning, match="last mask update happens at step 120"):
        tfopt.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=126, frequency=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tfopt.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=120, frequency=10)


BAD = [
    ("target_sparsity_1", lambda: tfopt.ConstantSparsity(1.0, 0), ValueError, "target_sparsity"),
    ("target_sparsity_negative", lambda: tfopt.ConstantSparsity(-0.1, 0), ValueError, r"\[0, 1\)"),
    ("final_sparsity", lambda: tfopt.PolynomialDecay(0.0, 1.5, 0, 10), ValueError, "final_sparsity"),
    ("initial_sparsity_str", lambda: tfopt.PolynomialDecay("0", 0.5, 0, 10), TypeError, "initial_sparsity"),
    ("negative_begin", lambda: tfopt.ConstantSparsity(0.5, -1), ValueError, "begin_step"),
    ("end_before_begin", lambda: tfopt.ConstantSparsity(0.5, 10, 5), ValueError, "end_step"),
    ("poly_end_forever", lambda: tfopt.PolynomialDecay(0.0, 0.5, 0, -1), ValueError, "end_step"),
    ("poly_end_equals_begin", lambda: tfopt.PolynomialDecay(0.0, 0.5, 10, 10), ValueError, "end_step"),
    ("frequency_zero", lambda: tfopt.ConstantSparsity(0.5, 0, frequency=0), ValueError, "frequency"),
    ("frequency_float", lambda: tfopt.ConstantSparsity(0.5, 0, frequency=1.5), TypeError, "frequency"),
    ("power_zero", lambda: tfopt.PolynomialDecay(0.0, 0.5, 0, 10, power=0), ValueError, "power"),
]


@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "schedule",
    [tfopt.ConstantSparsity(0.3, 5, 50, 5), tfopt.PolynomialDecay(0.1, 0.9, 0, 100, power=2, frequency=10)],
    ids=["constant", "polynomial"],
)
def test_config_roundtrip(schedule):
    clone = assert_config_roundtrip(schedule)
    assert [clone(s) for s in range(120)] == [schedule(s) for s in range(120)]


@keras.saving.register_keras_serializable(package="tfopt_tests")
class EveryThirdStep(tfopt.PruningSchedule):
    def __init__(self, sparsity):
        self.sparsity = sparsity

    def __call__(self, step):
        return step % 3 == 0, self.sparsity

    def get_config(self):
        return {"sparsity": self.sparsity}


def test_user_schedule_trains_and_saves(tmp_path):
    from conftest import compile_for_test, image_data, tiny_cnn

    x, y = image_data()
    pruned = compile_for_test(tfopt.prune_low_magnitude(tiny_cnn(), EveryThirdStep(0.6)))
    pruned.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    report = tfopt.sparsity_report(pruned)
    assert report.sparsity == pytest.approx(0.6, abs=0.01)
    pruned.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    schedules = [l.pruning_schedule for l in loaded.layers if isinstance(l, tfopt.PruneLowMagnitude)]
    assert schedules and all(isinstance(s, EveryThirdStep) and s.sparsity == 0.6 for s in schedules)
