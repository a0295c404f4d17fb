"""Weight clustering (weight sharing) during `model.fit`: centroid inits, the wrapper, the transforms.

How it works. `ClusterWeights` wraps a layer and replaces each of its
clusterable weights (the `prunable` weights of `tfopt.registry`: kernels,
never biases) by a lookup into a short table of trainable centroids::

    kernel = take(centroids * centroid_mask, indices)

- `indices` (int32, the kernel's shape) are set once, when the layer is
  wrapped: each weight goes to its nearest initial centroid. They never
  change during training.
- `centroids` (``number_of_clusters`` floats) are trainable. Their gradient is
  the sum of the gradients of the weights that share them (the chain rule
  through `take`; TFMOT's default ``GradientAggregation.SUM``), so each
  optimizer step moves whole clusters, and the kernel holds at most
  ``number_of_clusters`` distinct values at every step.
- The inner layer runs unchanged, inside a `keras.StatelessScope` that maps
  its kernel variable to the clustered value: the variable is never written
  (it keeps the weights the clustering started from) and is made
  non-trainable, so the optimizer holds slots only for the centroids.

Fixed assignments, on purpose. TFMOT's `ClusterWeights` keeps training the
original weights too and re-assigns every weight to its nearest centroid in
each forward pass. tfopt keeps the assignment fixed, as TFMOT's
cluster-preserving QAT does: no (weights x clusters) argmin in the train step,
the same forward pass at every step, and what is trained is exactly what is
exported. A weight cannot move to another cluster; to re-assign, strip and
cluster again.

Sparsity. With ``preserve_sparsity=True`` a weight that holds exact zeros (a
pruned model) keeps them in a pinned zero cluster (see `cluster_tensor`), and
the kernel still has at most ``number_of_clusters`` distinct values, zero
included.

Centroid initializations (pure NumPy, on the flattened values that are
clustered; centroids returned in ascending order): `linear_centroids`,
`random_centroids`, `density_based_centroids` and `kmeans_plus_plus_centroids`
(the default); the formulas are in their docstrings.

Cluster-preserving QAT (`tfopt.quantize_model(model, preserve_clusters=...)`,
see `tfopt.qat_layers`) trains the centroids through `Clusters` too, with the
assignment fixed, and picks per-channel int8 scales that give every channel
the same codes: conv, depthwise and Dense kernels export with at most
``number_of_clusters`` int8 values.

Variables of `ClusterWeights`: for each clustered weight, in registry order,
``<weight>_centroids`` (trainable), ``<weight>_centroid_mask`` and
``<weight>_indices`` (non-trainable). The `.keras` format stores a layer's
variables by position (never reorder), trainable ones first: every
``_centroids``, then every ``_centroid_mask`` and ``_indices`` pair.
"""

import functools
import math

import keras
import numpy as np
from keras import ops

from tfopt import _checks, _report, _wrappers
from tfopt import _model_utils as mu
from tfopt import registry

__all__ = [
    "CentroidInitialization",
    "ClusterWeights",
    "ClusteringReport",
    "cluster_tensor",
    "cluster_weights",
    "clustering_report",
    "density_based_centroids",
    "kmeans_plus_plus_centroids",
    "linear_centroids",
    "nearest_centroid",
    "random_centroids",
    "strip_clustering",
]


class CentroidInitialization:
    """Names of the centroid initializations (TFMOT's enum names, tfopt's string values).

    ``tfopt.clustering.CentroidInitialization.KMEANS_PLUS_PLUS == "kmeans++"``;
    plain strings work everywhere too.
    """

    LINEAR = "linear"
    RANDOM = "random"
    DENSITY_BASED = "density-based"
    KMEANS_PLUS_PLUS = "kmeans++"


_ALIASES = {
    "density_based": "density-based",
    "kmeans_plus_plus": "kmeans++",
    "kmeans-plus-plus": "kmeans++",
}


# -- centroid initializations (pure NumPy) -------------------------------------------


def _values(values, arg_name="values"):
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError(f"`{arg_name}` is empty: there is nothing to cluster. Received: {arg_name} of shape {np.shape(values)}")
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"`{arg_name}` holds NaN or inf values, which cannot be clustered. Check the training "
            f"(learning rate, loss) or reload good weights. Received: {arg_name} with "
            f"{int(np.sum(~np.isfinite(x)))} non-finite values"
        )
    return x


def _check_k(number_of_clusters, minimum=1):
    hint = "It is the number of distinct values each clustered kernel keeps (16 is a common choice)."
    return _checks.check_int(number_of_clusters, "number_of_clusters", minimum, hint)


def linear_centroids(values, number_of_clusters):
    """Centroids evenly spaced over the range of `values`.

    ``c_j = min(x) + j * (max(x) - min(x)) / (k - 1)`` for ``j = 0 .. k-1``
    (``k = 1``: ``c_0 = min(x)``).

    Args:
        values: array of any shape (flattened).
        number_of_clusters: ``k >= 1``.

    Returns:
        float64 array of shape ``(k,)``, ascending.

    Example:
        >>> tfopt.clustering.linear_centroids([0.0, 1.0, 3.0], 3)
        array([0. , 1.5, 3. ])
    """
    k = _check_k(number_of_clusters)
    x = _values(values)
    return np.linspace(x.min(), x.max(), k)


def random_centroids(values, number_of_clusters, seed=0):
    """Centroids drawn uniformly from the range of `values` (seeded).

    ``c_j ~ Uniform(min(x), max(x))`` i.i.d., then sorted.

    Args:
        values, number_of_clusters: as for `linear_centroids`.
        seed: seed of `numpy.random.default_rng`.

    Returns:
        float64 array of shape ``(k,)``, ascending.

    Example:
        >>> tfopt.clustering.random_centroids(weights, 16, seed=0)
    """
    k = _check_k(number_of_clusters)
    x = _values(values)
    rng = np.random.default_rng(seed)
    return np.sort(rng.uniform(x.min(), x.max(), k))


def density_based_centroids(values, number_of_clusters):
    """One centroid in the middle of each of `k` equally populated bins of `values`.

    ``c_j = Q((j + 1/2) / k)``, with ``Q`` the empirical quantile function of
    ``x`` (`numpy.quantile`, linear interpolation). Centroids are dense where
    weights are dense (TFMOT's DENSITY_BASED inverts an interpolated CDF for
    the same purpose).

    Args:
        values, number_of_clusters: as for `linear_centroids`.

    Returns:
        float64 array of shape ``(k,)``, ascending.

    Example:
        >>> tfopt.clustering.density_based_centroids([0.0, 1.0, 2.0, 3.0], 2)
        array([0.75, 2.25])
    """
    k = _check_k(number_of_clusters)
    x = _values(values)
    return np.quantile(x, (np.arange(k) + 0.5) / k)


def kmeans_plus_plus_centroids(values, number_of_clusters, seed=0):
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) on the values, seeded.

    ``c_1`` is a uniformly drawn element of ``x``. Then, for ``j = 2 .. k``,
    ``c_j`` is an element of ``x`` drawn with probability
    ``D(x_i)^2 / sum_i D(x_i)^2``, where ``D(x_i)`` is the distance from
    ``x_i`` to its nearest centroid so far. When every value already is a
    centroid (fewer distinct values than ``k``), the remaining centroids
    repeat chosen ones. O(n k) time, O(n) memory.

    Args:
        values, number_of_clusters, seed: as for `random_centroids`.

    Returns:
        float64 array of shape ``(k,)``, ascending.

    Example:
        >>> tfopt.clustering.kmeans_plus_plus_centroids(weights, 16)
    """
    k = _check_k(number_of_clusters)
    x = _values(values)
    rng = np.random.default_rng(seed)
    centroids = np.empty(k)
    centroids[0] = x[rng.integers(x.size)]
    d2 = (x - centroids[0]) ** 2
    for j in range(1, k):
        cumulative = np.cumsum(d2)
        total = cumulative[-1]
        if total <= 0.0:
            centroids[j:] = centroids[rng.integers(j, size=k - j)]
            break
        # Inverse-CDF draw (robust to the rounding that np.random.choice's p= rejects).
        i = min(int(np.searchsorted(cumulative, rng.random() * total, side="right")), x.size - 1)
        centroids[j] = x[i]
        np.minimum(d2, (x - x[i]) ** 2, out=d2)
    return np.sort(centroids)


_INIT_FUNCTIONS = {
    "linear": lambda x, k, seed: linear_centroids(x, k),
    "random": random_centroids,
    "density-based": lambda x, k, seed: density_based_centroids(x, k),
    "kmeans++": kmeans_plus_plus_centroids,
}


def nearest_centroid(values, centroids):
    """Index of the nearest centroid for each value (ties go to the lower index).

    Args:
        values: array of any shape.
        centroids: 1-D array, ascending.

    Returns:
        int32 array of the shape of `values`: ``argmin_j |values - c_j|``.

    Raises:
        ValueError: `centroids` is empty, not 1-D or not ascending.

    Example:
        >>> tfopt.clustering.nearest_centroid([0.1, 0.9, 2.0], [0.0, 1.0])
        array([0, 1, 1], dtype=int32)
    """
    c = np.asarray(centroids, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or np.any(np.diff(c) < 0):
        raise ValueError(f"`centroids` must be a non-empty ascending 1-D array. Received: centroids={c!r}")
    x = np.asarray(values, dtype=np.float64)
    # Midpoints split the line into the centroids' cells: an O(n log k)
    # search instead of an n x k distance matrix.
    boundaries = (c[1:] + c[:-1]) / 2.0
    return np.searchsorted(boundaries, x, side="left").astype(np.int32)


def _canonical_init(value):
    name = value.strip().lower().split("centroidinitialization.")[-1] if isinstance(value, str) else None  # TFMOT's
    name = _ALIASES.get(name, name)
    if name in _INIT_FUNCTIONS:
        return name
    # Neither a name nor an alias: this raises.
    hint = "A tfopt.clustering.CentroidInitialization constant works too."
    return _checks.check_choice(value, "cluster_centroids_init", tuple(_INIT_FUNCTIONS), hint)


def _check_options(number_of_clusters, cluster_centroids_init, preserve_sparsity):
    return (
        _check_k(number_of_clusters, minimum=2),
        _canonical_init(cluster_centroids_init),
        _checks.check_bool(preserve_sparsity, "preserve_sparsity", "True keeps zero weights exactly zero."),
    )


def cluster_tensor(weights, number_of_clusters, cluster_centroids_init="kmeans++", preserve_sparsity=True, seed=0):
    """Clusters one weight tensor: what `ClusterWeights` does to each kernel when it is wrapped.

    Without zeros to preserve, `number_of_clusters` centroids are initialized
    from all values and every value goes to its nearest centroid. With
    ``preserve_sparsity=True`` and exact zeros in `weights`, centroid 0 is
    the pinned zero centroid (``centroid_mask[0] = 0``) holding exactly the
    zeros, and ``number_of_clusters - 1`` centroids are initialized from, and
    assigned to, the nonzero values.

    Args:
        weights: array of any shape.
        number_of_clusters: ``k >= 2``.
        cluster_centroids_init: "kmeans++", "density-based", "linear" or "random".
        preserve_sparsity: keep exact zeros exactly zero.
        seed: seed for "kmeans++" and "random".

    Returns:
        ``(centroids, centroid_mask, indices)``: float64 ``(k,)``, float64
        ``(k,)`` of 0/1 (0: pinned to zero), int32 of the shape of `weights`;
        ``(centroids * centroid_mask)[indices]`` is the clustered tensor.

    Raises:
        ValueError, TypeError: invalid arguments or non-finite weights.

    Example:
        >>> c, m, idx = tfopt.clustering.cluster_tensor(kernel, 16)
        >>> clustered = (c * m)[idx]
    """
    k, init, preserve_sparsity = _check_options(number_of_clusters, cluster_centroids_init, preserve_sparsity)
    w = np.asarray(weights)
    x = _values(w, "weights")
    make = _INIT_FUNCTIONS[init]
    mask = np.ones(k)
    zeros = x == 0
    if preserve_sparsity and zeros.any():
        mask[0] = 0.0
        centroids = np.zeros(k)
        live = x[~zeros]
        indices = np.zeros(x.size, dtype=np.int32)
        if live.size:
            centroids[1:] = make(live, k - 1, seed)
            indices[~zeros] = 1 + nearest_centroid(live, centroids[1:])
    else:
        centroids = make(x, k, seed)
        indices = nearest_centroid(x, centroids)
    return centroids, mask, indices.reshape(w.shape)


# -- the wrapper -------------------------------------------------------------------------


_PROTOCOL = "get_clusterable_weights"  # TFMOT's ClusterableLayer protocol


def _clusterable(layer, positions=None):
    """[(name, variable)] of the weights to cluster (sub-layers included); names come from their paths."""
    return [(w.path.replace("/", "_"), w.variable) for w in registry.selected(layer, positions, _PROTOCOL)]


def _refuse_layer(layer, arg_name):
    """The error for a single layer that cannot be wrapped."""
    if registry.lookup(layer) is not None:
        return ValueError(
            f"Layer {mu.describe(layer)} has no weights tfopt clusters (normalization layers stay float). Wrap the "
            f"Dense / Conv / Embedding layers around it instead. Received: {arg_name}={layer.name!r}"
        )
    return ValueError(mu.unplaced_message([(layer, [])], "cluster", _PROTOCOL) + f" Received: {arg_name}={layer.name!r}")


def _check_finite(layers, received):
    bad = [f"{mu.describe(layer)} ({name})" for layer in layers if layer.built
           for name, v in _clusterable(layer) if not np.all(np.isfinite(ops.convert_to_numpy(v)))]
    if bad:
        raise ValueError(
            f"These weights hold NaN or inf values, which cannot be clustered: {', '.join(bad)}. Check the training "
            f"(learning rate, loss) or reload good weights before clustering. Received: {received}"
        )


class Clusters:
    """One clustered weight: ``value() = take(centroids * centroid_mask, indices)``, with its three variables.

    The one cluster mechanism of tfopt, used by `ClusterWeights` and by cluster-preserving QAT
    (`tfopt.qat_layers.QuantizeWrapper`). The variables are created on `owner`, in this order:
    ``<name>_centroids`` (trainable), ``<name>_centroid_mask`` and ``<name>_indices``; they are initialized
    with `cluster_tensor` of `weight` as it is when they are initialized (initialization can be deferred: a
    subclassed model is built inside a symbolic scope and its variables are initialized at its exit), and
    `weight` is made non-trainable (read only through the lookup: no gradient, no optimizer slots). A
    weight that already holds at most `number_of_clusters` distinct values (a stripped clustered kernel)
    keeps exactly them: k-means++ picks every distinct value before repeating one.

    Args:
        owner: the layer that owns the variables.
        weight: the variable to cluster.
        name: prefix of the variable names.
        number_of_clusters, init, preserve_sparsity: as `cluster_tensor`.
        dtype: of the centroids (default: the weight's).
    """

    def __init__(self, owner, weight, name, number_of_clusters, init="kmeans++", preserve_sparsity=True, dtype=None):
        self.weight = weight
        self._args = (number_of_clusters, init, preserve_sparsity)
        self._parts, self._pending = None, {0, 1, 2}
        k, dtype = number_of_clusters, dtype or weight.dtype
        self.centroids = owner.add_weight(
            name=f"{name}_centroids", shape=(k,), dtype=dtype, initializer=self._initializer(0), trainable=True,
            autocast=False,
        )
        self.centroid_mask = owner.add_weight(
            name=f"{name}_centroid_mask", shape=(k,), dtype=dtype, initializer=self._initializer(1), trainable=False,
            autocast=False,
        )
        self.indices = owner.add_weight(
            name=f"{name}_indices", shape=weight.shape, dtype="int32", initializer=self._initializer(2), trainable=False
        )
        weight.trainable = False

    def _initializer(self, part):
        def initialize(shape, dtype=None):
            if self._parts is None:
                with _wrappers.stored_dtype():
                    self._parts = cluster_tensor(ops.convert_to_numpy(self.weight), *self._args)
            value = self._parts[part]
            self._pending.discard(part)
            if not self._pending:
                self._parts = None  # the indices are weight-sized: do not keep them
            return np.asarray(value).astype(keras.backend.standardize_dtype(dtype))

        return initialize

    def value(self):
        """The clustered weight, as a tensor."""
        return ops.take(self.centroids * self.centroid_mask, self.indices)

    def reset(self, seed=0):
        """Re-clusters from the weight's current values (`cluster_tensor` with `seed`)."""
        with _wrappers.stored_dtype():
            c, m, idx = cluster_tensor(ops.convert_to_numpy(self.weight), *self._args, seed=seed)
        self.centroids.assign(c.astype(self.centroids.dtype))
        self.centroid_mask.assign(m.astype(self.centroid_mask.dtype))
        self.indices.assign(idx)


@keras.saving.register_keras_serializable(package="tfopt")
class ClusterWeights(_wrappers.TfoptWrapper):
    """Wraps a layer so that each kernel is a lookup into trainable centroids during `fit`.

    Usually created by `tfopt.cluster_weights`. No callback is needed: the
    optimizer trains the centroids like any other weight. Each clustered
    weight is one `Clusters`; see the module docstring for the mechanism, the
    sparsity rule and the variable order.

    Args:
        layer: the layer to cluster (a type with prunable weights in
            `tfopt.registry`, or one with TFMOT's `get_clusterable_weights()`).
        number_of_clusters: distinct values per clustered kernel, >= 2.
        cluster_centroids_init: "kmeans++" (default), "density-based",
            "linear" or "random" (`tfopt.clustering.CentroidInitialization`).
        preserve_sparsity: if True, exact zeros stay exactly zero.
        weight_positions: which weights below `layer` to cluster, by their
            positions in `tfopt.registry.walk(layer)` order; None clusters the
            default ones.
        **kwargs: base layer arguments (name, ...).

    Raises:
        TypeError, ValueError: an invalid option, a layer tfopt cannot
            cluster, or a layer that is already wrapped.

    Example:
        >>> layer = tfopt.clustering.ClusterWeights(keras.layers.Dense(10), 16)
    """

    technique = "clustering"
    _config_keys = ("number_of_clusters", "cluster_centroids_init", "preserve_sparsity", "weight_positions")

    def __init__(
        self, layer, number_of_clusters, cluster_centroids_init="kmeans++", preserve_sparsity=True, weight_positions=None,
        **kwargs,
    ):
        kwargs.setdefault("name", f"cluster_{getattr(layer, 'name', '')}")  # not a layer: the base refuses it
        super().__init__(layer, **kwargs)
        if not registry.knowable(layer, _PROTOCOL):
            raise _refuse_layer(layer, "layer")
        self.number_of_clusters, self.cluster_centroids_init, self.preserve_sparsity = _check_options(
            number_of_clusters, cluster_centroids_init, preserve_sparsity
        )
        self.weight_positions = None if weight_positions is None else tuple(weight_positions)
        self._clusters = []

    def build(self, input_shape=None):
        super().build(input_shape)
        options = (self.number_of_clusters, self.cluster_centroids_init, self.preserve_sparsity)
        weights = _clusterable(self.layer, self.weight_positions)
        self._clusters = [Clusters(self, w, name, *options) for name, w in weights]

    def init_clusters_from_weights(self, seed=0):
        """(Re)clusters every clustered weight from the inner layer's current values (`Clusters.reset`).

        `build` does this already (when the variables are initialized); call
        it to start over from weights assigned to the inner layer since.

        Args:
            seed: seed of the "kmeans++" and "random" initializations.
        """
        for clusters in self._clusters:
            clusters.reset(seed)

    @property
    def clustered_variables(self):
        """[(weight, centroids, centroid_mask, indices)] for each clustered weight, in build order."""
        return [(c.weight, c.centroids, c.centroid_mask, c.indices) for c in self._clusters]

    def clustered_weights(self):
        """[(inner weight variable, its clustered value as a tensor)], in build order."""
        return [(c.weight, c.value()) for c in self._clusters]

    def call(self, inputs, *args, **kwargs):
        with _wrappers.substitute(self.clustered_weights()):
            return self.layer(inputs, *args, **kwargs)

    def stripped_layer(self):
        """A plain copy of the inner layer whose clustered weights hold their clustered values."""
        clustered = {id(w): value for w, value in self.clustered_weights()}
        return mu.copy_layer(self.layer, weights=[ops.convert_to_numpy(clustered.get(id(v), v)) for v in self.layer.weights])


# -- model transforms ----------------------------------------------------------------


def cluster_weights(
    model_or_layer,
    number_of_clusters,
    cluster_centroids_init="kmeans++",
    filters=None,
    preserve_sparsity=True,
):
    """Returns a copy of a model (or layer) whose kernels are clustered during `fit`.

    Every layer with prunable weights in `tfopt.registry` (Dense, Conv*,
    SeparableConv pointwise kernels, Embedding, RNN kernels, attention
    projections; DepthwiseConv only when selected with `filters`) is wrapped
    in `ClusterWeights`: each kernel keeps at most `number_of_clusters`
    distinct values, the shared values (centroids) are trained. Biases,
    normalization layers and weightless layers are untouched. The model you
    pass is never modified. Compile the result and `fit` it (no callback is
    needed), then call `tfopt.strip_clustering` to get a plain Keras model.

    Args:
        model_or_layer: a built Sequential or Functional model (nested models
            and composite layers are walked into), a built subclassed model
            (wrapped whole inside a Functional model), or a single layer (e.g.
            inside a subclassed model's `__init__`).
        number_of_clusters: distinct values per kernel, an integer >= 2
            (16 is a common choice: 4-bit indices).
        cluster_centroids_init: "kmeans++" (default), "density-based",
            "linear" or "random"; the formulas are in the docstrings of
            `tfopt.clustering.linear_centroids` and the other `*_centroids`.
        filters: which layers to cluster: None (every supported layer), a
            regex on layer names, a list of regexes, or a callable
            ``fn(layer) -> bool``.
        preserve_sparsity: if True (default), exact zeros (a pruned model)
            stay exactly zero: they form a pinned zero cluster, which counts
            as one of the `number_of_clusters`.

    Returns:
        A new model (or a `ClusterWeights` layer).

    Raises:
        TypeError: `model_or_layer` is not a model or layer, or an option
            has the wrong type.
        ValueError: `number_of_clusters < 2`, an unknown initialization, an
            unbuilt model, a model that is already clustered,
            pruned (strip it first) or quantized (cluster before QAT), a
            selected layer with weights tfopt does not know (all are listed),
            or `filters` that select nothing.

    Example:
        >>> clustered = tfopt.cluster_weights(model, number_of_clusters=16)
        >>> clustered.compile("adam", "sparse_categorical_crossentropy")
        >>> clustered.fit(x, y, epochs=2)
        >>> final = tfopt.strip_clustering(clustered)
    """
    k, init, preserve = _check_options(number_of_clusters, cluster_centroids_init, preserve_sparsity)
    options = dict(number_of_clusters=k, cluster_centroids_init=init, preserve_sparsity=preserve)
    cluster = functools.partial(ClusterWeights, **options)
    choose = functools.partial(_choose, filters=filters)
    return _wrappers.wrap(model_or_layer, cluster, choose, "model_or_layer", "cluster_weights", "clustered")


def _choose(model, layers, filters):
    """Raises for what `model` (or a single layer) cannot cluster; returns the weights of `layers` to cluster."""
    received = f"model_or_layer={model.name!r}"
    if not isinstance(model, keras.Model):  # a single layer: its type decides, `filters` do not apply
        if isinstance(model, ClusterWeights):
            raise ValueError(
                f"Layer {mu.describe(model)} is already wrapped for clustering. Keep training it, or strip it "
                f"(`tfopt.strip_clustering`) first. Received: {received}"
            )
        if not registry.knowable(model, _PROTOCOL):
            raise _refuse_layer(model, "model_or_layer")
        _check_finite([model], received)
        return {}
    _wrappers.refuse(
        model, ClusterWeights,
        "Model {model} is already wrapped for clustering. Keep training it, or call "
        "`tfopt.strip_clustering(model)` first to cluster the stripped model again. "
        "Received: model_or_layer={model}",
    )
    # Every other tfopt wrapper is a pruning or QAT one; a QAT model always holds QuantizeWrappers (TfoptWrappers),
    # so this refuses it without importing the QAT modules.
    _wrappers.refuse(
        model, _wrappers.TfoptWrapper,
        "Model {model} holds tfopt pruning or QAT layers ({layers}). Cluster a plain model: call "
        "`tfopt.strip_pruning(model)` first (preserve_sparsity=True keeps its zeros); quantize after clustering, not "
        "before. Received: model_or_layer={model}",
    )
    chosen, unsupported = mu.select_weights(layers, filters, _PROTOCOL)
    if unsupported:
        raise ValueError(mu.unplaced_message(unsupported, "cluster", _PROTOCOL) + f" Received: {received}")
    if not chosen:
        raise ValueError(
            f"No layer of model {model.name!r} has weights to cluster"
            + (" among those `filters` selects. Check the names (model.summary()) or the predicate." if filters is not None else ".")
            + f" Received: filters={filters!r}"
        )
    _check_finite([l for l in layers if id(l) in chosen], received)
    return chosen


def strip_clustering(model):
    """Returns a plain Keras model whose kernels hold their clustered values.

    No tfopt layer is left: the result saves, loads and converts like any
    Keras model, predicts what the clustered model predicted, and each
    clustered kernel holds at most `number_of_clusters` distinct values (so
    any per-tensor int8 quantization of it, too).

    Args:
        model: a Sequential or Functional model, clustered or not, or a single
            `ClusterWeights` layer (then its `stripped_layer()` is returned).

    Returns:
        A new model (or layer); `model` is not modified.

    Raises:
        TypeError, ValueError: `model` is not a built Sequential/Functional
            model or a `ClusterWeights` layer.

    Example:
        >>> final = tfopt.strip_clustering(clustered)
        >>> tfl = tfopt.tflite_export.convert(final, mode="float32")
    """
    if isinstance(model, ClusterWeights):
        return model.stripped_layer()
    mu.check_model(model, "model", "strip_clustering")
    return _wrappers.strip(model, ClusterWeights)


# -- report -----------------------------------------------------------------------------


class ClusteringReport(_report.Report):
    """Per-layer count of distinct values in the clusterable weights of a model.

    Attributes:
        rows: list of dicts with keys name, type, weights (element count),
            distinct (largest number of distinct values in one of the
            layer's clusterable tensors), zeros, clustered (True for a
            `ClusterWeights` layer).
        weights, zeros: totals over all rows.
        max_distinct: the largest `distinct` of any row.
    """

    header, right = ("layer", "type", "weights", "distinct values", "zeros"), (2, 3, 4)
    summed, totals = ("weights", "zeros"), ("weights", "zeros", "max_distinct")

    def __init__(self, rows):
        super().__init__(rows)
        self.max_distinct = max((r["distinct"] for r in rows), default=0)

    def _cells(self, r):
        return r["name"], r["type"], f"{r['weights']:,}", f"{r['distinct']:,}", f"{r['zeros']:,}"

    def _footer(self):
        return [("total", "", f"{self.weights:,}", f"max {self.max_distinct:,}", f"{self.zeros:,}")]


def clustering_report(model):
    """Counts the distinct values (and zeros) of the clusterable weights of every layer.

    Works on clustering models (the clustered values of each `ClusterWeights`
    layer), stripped models and plain ones (the registry's prunable weights).

    Args:
        model: a Keras model or layer.

    Returns:
        A `ClusteringReport`: ``print(report)`` shows a table,
        ``report.to_dict()`` gives plain data.

    Raises:
        TypeError: `model` is not a Keras model or layer.

    Example:
        >>> print(tfopt.clustering_report(tfopt.strip_clustering(clustered)))
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a keras model or layer. Received: model={model!r}")
    layers = [model] if not isinstance(model, keras.Model) else mu.all_layers(model)
    rows = []
    for layer in layers:
        clustered = isinstance(layer, ClusterWeights)
        plain = not clustered and not isinstance(layer, keras.Model)
        if not layer.built or not (clustered or (plain and registry.knowable(layer, _PROTOCOL))):
            continue
        pairs = layer.clustered_weights() if clustered else _clusterable(layer)
        values = [ops.convert_to_numpy(v) for _, v in pairs]
        if not values:
            continue
        rows.append({
            "name": layer.name,
            "type": type(layer.layer if clustered else layer).__name__,
            "weights": sum(math.prod(v.shape) for v in values),
            "distinct": max(int(np.unique(v).size) for v in values),
            "zeros": sum(int(np.sum(v == 0)) for v in values),
            "clustered": clustered,
        })
    return ClusteringReport(rows)
