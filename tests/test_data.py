"""The offline datasets and the recipe model."""

import numpy as np

from tfopt.data import load_digits, load_mnist_subset, mnist_cnn


def test_mnist_subset_is_stratified_and_offline():
    (x_train, y_train), (x_test, y_test) = load_mnist_subset()
    assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert np.all(np.bincount(y_train) == 400) and np.all(np.bincount(y_test) == 100)
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert len(set(map(bytes, x_train[:50])) & set(map(bytes, x_test))) == 0


def test_digits_split():
    (x_train, y_train), (x_test, y_test) = load_digits()
    assert x_train.shape[1:] == (8, 8, 1) and len(x_train) + len(x_test) == 1797
    assert set(np.unique(y_test)) == set(range(10))


def test_recipe_model_shapes():
    model = mnist_cnn(dense_units=64)
    assert model.output_shape == (None, 10)
    assert [l.name for l in model.layers if "conv" in l.name] == ["conv1", "conv2"]
