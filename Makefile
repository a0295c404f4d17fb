# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tfopt-installed

.PHONY: setup demo test test-backends test-fast bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/tfopt demo

test: $(STAMP)
	TFOPT_QUICK=1 $(BIN)/python -m pytest -n 2 --durations=15 --nbmake tests notebooks
	$(MAKE) test-backends

# The backend-independent tests again under each other Keras backend (one process per backend).
# Not run there, on purpose (they run under TensorFlow above): `tensorflow_only` tests (tf.GradientTape
# references, TFLite conversion) and `slow` ones (test_backends.py compares training across backends in
# subprocesses), plus two known gaps, deselected by name:
# - JAX: a tfopt wrapper built inside a subclassed model's first JAX train step (pruning, clustering) has
#   its variables created inside the trace (known gap, see README "Backends").
# - PyTorch: Keras' torch trainer refuses steps_per_execution > 1 ("must be 1 with the PyTorch backend").
BACKEND_TESTS := tests/test_schedules.py tests/test_callbacks.py tests/test_pruning.py tests/test_quantizers.py \
                 tests/test_qat.py tests/test_clustering.py
BACKEND_MARKS := -m "backend_independent and not slow and not tensorflow_only"
JAX_KNOWN     := --deselect tests/test_pruning.py::test_single_layer_inside_a_subclassed_model \
                 --deselect tests/test_clustering.py::test_single_layer_and_subclassed_model
TORCH_KNOWN   := --deselect tests/test_pruning.py::test_steps_per_execution
test-backends: $(STAMP)
	KERAS_BACKEND=jax $(BIN)/python -m pytest -n 2 -q $(BACKEND_MARKS) $(JAX_KNOWN) $(BACKEND_TESTS)
	KERAS_BACKEND=torch $(BIN)/python -m pytest -n 2 -q $(BACKEND_MARKS) $(TORCH_KNOWN) $(BACKEND_TESTS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) tfopt_artifacts .pytest_cache
