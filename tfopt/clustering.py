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
pruned model) keeps them: centroid 0 is the zero centroid, pinned by
``centroid_mask[0] == 0``, and takes every zero weight and only those; the
other ``number_of_clusters - 1`` centroids are initialized from the nonzero
weights. Zeros stay zero, nonzeros stay on their own centroids, and the kernel
still has at most ``number_of_clusters`` distinct values (zero included).

Centroid initializations (pure NumPy, on the flattened values ``x`` that are
clustered, ``k`` centroids, returned in ascending order):

- ``"linear"``: ``c_j = min(x) + j * (max(x) - min(x)) / (k - 1)``.
- ``"random"``: ``c_j ~ Uniform(min(x), max(x))``, i.i.d., seeded.
- ``"density-based"``: ``c_j = Q((j + 1/2) / k)``, ``Q`` the empirical
  quantile function of ``x``: one centroid in the middle of each of ``k``
  equally populated bins, so centroids are dense where weights are.
- ``"kmeans++"`` (default): k-means++ seeding (Arthur & Vassilvitskii, 2007):
  ``c_1`` is a uniformly drawn value of ``x``; each next centroid is a value
  of ``x`` drawn with probability ``D(x)^2 / sum D^2``, ``D`` the distance to
  the nearest centroid chosen so far.

Cluster-preserving QAT is `tfopt.quantize_model(model, preserve_clusters=...)`:
the QAT wrapper trains each clustered kernel's centroids with the assignment
fixed and picks per-channel int8 scales that give every channel the same codes,
so conv, depthwise and Dense kernels export with at most ``number_of_clusters``
int8 values (see `tfopt.qat_layers`). The older projection `snap_to_centroids`
(each cluster replaced by its mean after every optimizer step, as a variable
constraint: `centroid_constraint`, or `constrain_to_clusters` for a whole model)
keeps the float clusters but not the int8 ones of per-channel conv kernels.

Variable order inside `ClusterWeights` (the `.keras` format stores variables
by position; never reorder): the inner layer's variables, then for each
clustered weight, in registry order, ``<weight>_centroids`` (trainable),
``<weight>_centroid_mask`` and ``<weight>_indices`` (non-trainable). Keras
stores a layer's trainable variables before its non-trainable ones, so the
file holds every ``_centroids`` first, then the masks and indices, each group
in that order.
"""

import math

import keras
import numpy as np
from keras import ops

from tfopt import _model_utils as mu
from tfopt import registry

__all__ = [
    "CentroidInitialization",
    "ClusterWeights",
    "ClusteringReport",
    "centroid_constraint",
    "cluster_tensor",
    "cluster_weights",
    "clustering_report",
    "constrain_to_clusters",
    "density_based_centroids",
    "kmeans_plus_plus_centroids",
    "linear_centroids",
    "nearest_centroid",
    "random_centroids",
    "snap_to_centroids",
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


_INITS = ("linear", "random", "density-based", "kmeans++")
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
    if isinstance(number_of_clusters, bool) or not isinstance(number_of_clusters, (int, np.integer)):
        raise TypeError(
            "`number_of_clusters` must be an integer: the number of distinct values each clustered "
            f"kernel keeps, e.g. 16. Received: number_of_clusters={number_of_clusters!r}"
        )
    if number_of_clusters < minimum:
        raise ValueError(
            f"`number_of_clusters` must be >= {minimum}: the number of distinct values each clustered "
            f"kernel keeps (16 is a common choice). Received: number_of_clusters={number_of_clusters}"
        )
    return int(number_of_clusters)


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
        values: array of any shape (flattened).
        number_of_clusters: ``k >= 1``.
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
        values: array of any shape (flattened).
        number_of_clusters: ``k >= 1``.

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
        values: array of any shape (flattened).
        number_of_clusters: ``k >= 1``.
        seed: seed of `numpy.random.default_rng`.

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


def _canonical_init(cluster_centroids_init):
    if isinstance(cluster_centroids_init, str):
        name = cluster_centroids_init.strip().lower()
        name = name.split("centroidinitialization.")[-1]  # TFMOT's enum values
        name = _ALIASES.get(name, name)
        if name in _INITS:
            return name
    raise ValueError(
        f"`cluster_centroids_init` must be one of {_INITS} (or a "
        "tfopt.clustering.CentroidInitialization constant). "
        f"Received: cluster_centroids_init={cluster_centroids_init!r}"
    )


def _check_options(number_of_clusters, cluster_centroids_init, preserve_sparsity):
    k = _check_k(number_of_clusters, minimum=2)
    init = _canonical_init(cluster_centroids_init)
    if not isinstance(preserve_sparsity, (bool, np.bool_)):
        raise TypeError(
            "`preserve_sparsity` must be True (zero weights stay exactly zero) or False. "
            f"Received: preserve_sparsity={preserve_sparsity!r}"
        )
    return k, init, bool(preserve_sparsity)


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


def _is_clusterable_type(layer):
    spec = registry.lookup(layer)
    if spec is not None:
        return bool(spec.prunable) or spec.sublayers
    return registry.knowable(layer, _PROTOCOL)


def _refuse_layer(layer, arg_name):
    """The error for a single layer that cannot be wrapped."""
    if registry.lookup(layer) is not None:
        return ValueError(
            f"Layer {mu.describe(layer)} has no weights tfopt clusters (normalization layers stay float). Wrap the "
            f"Dense / Conv / Embedding layers around it instead. Received: {arg_name}={layer.name!r}"
        )
    return ValueError(mu.unplaced_message([(layer, [])], "cluster", _PROTOCOL) + f" Received: {arg_name}={layer.name!r}")


def _check_finite(layers, received):
    bad = []
    for layer in layers:
        if layer.built:
            bad += [f"{mu.describe(layer)} ({name})" for name, v in _clusterable(layer)
                    if not np.all(np.isfinite(ops.convert_to_numpy(v)))]
    if bad:
        raise ValueError(
            f"These weights hold NaN or inf values, which cannot be clustered: {', '.join(bad)}. Check the training "
            f"(learning rate, loss) or reload good weights before clustering. Received: {received}"
        )


class _KernelClustering:
    """`cluster_tensor` of one inner weight, computed once, feeding the initializers of its three variables.

    Variable initialization can be deferred (a subclassed model is built inside
    a symbolic scope, and its variables are initialized, in creation order, at
    its exit): the kernel is then read when it holds its value, not at build.
    """

    def __init__(self, weight, number_of_clusters, init, preserve_sparsity):
        self.weight = weight
        self.args = (number_of_clusters, init, preserve_sparsity)
        self._parts = None
        self._pending = {0, 1, 2}

    def initializer(self, part):
        def initialize(shape, dtype=None):
            if self._parts is None:
                self._parts = cluster_tensor(ops.convert_to_numpy(self.weight), *self.args)
            value = self._parts[part]
            self._pending.discard(part)
            if not self._pending:
                self._parts = None  # the indices are kernel-sized: do not keep them
            return np.asarray(value).astype(keras.backend.standardize_dtype(dtype))

        return initialize


class _MergedScope(keras.StatelessScope):
    """A StatelessScope that also keeps what an enclosing one maps.

    Inside `Model.stateless_call` (how the JAX backend trains) every variable
    is read from the enclosing scope; a plain inner scope would hide those
    values from the wrapped layer (its bias would be read from the variable).
    """

    def __init__(self, state_mapping):
        super().__init__(state_mapping=state_mapping)
        try:
            from keras.src.backend.common.stateless_scope import get_stateless_scope
        except ImportError:  # a Keras that moved it: no enclosing scope to merge
            return
        outer = get_stateless_scope()
        if outer is not None:
            self.state_mapping = {**outer.state_mapping, **self.state_mapping}


@keras.saving.register_keras_serializable(package="tfopt")
class ClusterWeights(keras.layers.Wrapper):
    """Wraps a layer so that each kernel is a lookup into trainable centroids during `fit`.

    Usually created by `tfopt.cluster_weights`. No callback is needed: the
    optimizer trains the centroids like any other weight. See the module
    docstring for the mechanism, the sparsity rule and the variable order.

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

    def __init__(
        self, layer, number_of_clusters, cluster_centroids_init="kmeans++", preserve_sparsity=True, weight_positions=None,
        **kwargs,
    ):
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(f"`layer` must be a keras layer. Received: layer={layer!r} of type {type(layer).__name__}")
        if isinstance(layer, ClusterWeights):
            raise ValueError(
                f"Layer {mu.describe(layer)} is already wrapped for clustering. Pass the inner layer "
                f"(`wrapper.layer`) or use it as it is. Received: layer={layer.name!r}"
            )
        if not _is_clusterable_type(layer):
            raise _refuse_layer(layer, "layer")
        k, init, preserve = _check_options(number_of_clusters, cluster_centroids_init, preserve_sparsity)
        kwargs.setdefault("name", f"cluster_{layer.name}")
        super().__init__(layer, **kwargs)
        self.number_of_clusters = k
        self.cluster_centroids_init = init
        self.preserve_sparsity = preserve
        self.weight_positions = None if weight_positions is None else tuple(weight_positions)
        self.supports_masking = getattr(layer, "supports_masking", False)
        self._clustered = []  # [(weight variable, centroids, centroid_mask, indices)]

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self._clustered = []
        k = self.number_of_clusters
        for name, w in _clusterable(self.layer, self.weight_positions):
            # Initialized from the inner weights as they are when the variables
            # are initialized (a .keras load then overwrites them all).
            source = _KernelClustering(w, k, self.cluster_centroids_init, self.preserve_sparsity)
            centroids = self.add_weight(
                name=f"{name}_centroids", shape=(k,), dtype=w.dtype, initializer=source.initializer(0),
                trainable=True, autocast=False,
            )
            mask = self.add_weight(
                name=f"{name}_centroid_mask", shape=(k,), dtype=w.dtype, initializer=source.initializer(1),
                trainable=False, autocast=False,
            )
            indices = self.add_weight(
                name=f"{name}_indices", shape=w.shape, dtype="int32", initializer=source.initializer(2), trainable=False
            )
            self._clustered.append((w, centroids, mask, indices))
        for w, _, _, _ in self._clustered:
            w.trainable = False  # read only through the lookup: no gradient, no optimizer slots
        self.built = True

    def init_clusters_from_weights(self, seed=0):
        """(Re)clusters every clustered weight from the inner layer's current values.

        `build` does this already (when the variables are initialized); call
        it to start over from weights assigned to the inner layer since.
        Sets centroids, centroid masks and indices with
        `tfopt.clustering.cluster_tensor`.

        Args:
            seed: seed of the "kmeans++" and "random" initializations.
        """
        for w, centroids, mask, indices in self._clustered:
            c, m, idx = cluster_tensor(
                ops.convert_to_numpy(w), self.number_of_clusters, self.cluster_centroids_init, self.preserve_sparsity, seed
            )
            centroids.assign(c.astype(centroids.dtype))
            mask.assign(m.astype(mask.dtype))
            indices.assign(idx)

    def get_build_config(self):
        if not self.built:
            return None
        return {"layer": self.layer.get_build_config(), "inputs": mu.input_specs(self)}

    def build_from_config(self, config):
        config = config or {}
        mu.build_inner(self.layer, config.get("layer"), config.get("inputs"))
        self.build()

    @property
    def clustered_variables(self):
        """[(weight, centroids, centroid_mask, indices)] for each clustered weight, in build order."""
        return list(self._clustered)

    def clustered_weights(self):
        """[(inner weight variable, its clustered value as a tensor)], in build order."""
        return [(w, _lookup(c, m, idx)) for w, c, m, idx in self._clustered]

    def call(self, inputs, *args, **kwargs):
        with _MergedScope(self.clustered_weights()):
            return self.layer(inputs, *args, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_mask(self, inputs, previous_mask=None):
        return self.layer.compute_mask(inputs, previous_mask)

    def stripped_layer(self):
        """A plain copy of the inner layer whose clustered weights hold their clustered values."""
        clustered = {id(w): value for w, value in self.clustered_weights()}
        return mu.copy_layer(self.layer, weights=[ops.convert_to_numpy(clustered.get(id(v), v)) for v in self.layer.weights])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "number_of_clusters": self.number_of_clusters,
                "cluster_centroids_init": self.cluster_centroids_init,
                "preserve_sparsity": self.preserve_sparsity,
                "weight_positions": self.weight_positions,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = mu.deserialize_layer(config.pop("layer"), custom_objects)
        return cls(layer, **config)


def _lookup(centroids, mask, indices):
    return ops.take(centroids * mask, indices)


# -- model transforms ----------------------------------------------------------------


def _copy(layer):
    # Op nodes (`x * 2.0`) are stateless Operations, not Layers: shared as they are.
    return mu.copy_layer(layer) if isinstance(layer, keras.layers.Layer) else layer


def _wrappers(model):
    return [l for l in model._flatten_layers(include_self=True, recursive=True) if isinstance(l, ClusterWeights)]


def _tfopt_wrappers(model):
    """tfopt pruning / QAT layers in `model` (imported lazily: clustering does not depend on them)."""
    from tfopt.pruning import PruneLowMagnitude
    from tfopt.qat_layers import QuantizeAnnotate, QuantizeLayer, QuantizeWrapper

    kinds = (PruneLowMagnitude, QuantizeWrapper, QuantizeLayer, QuantizeAnnotate)
    return [l for l in model._flatten_layers(include_self=False, recursive=True) if isinstance(l, kinds)]


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
            too), or a single layer (e.g. inside a subclassed model's
            `__init__`).
        number_of_clusters: distinct values per kernel, an integer >= 2
            (16 is a common choice: 4-bit indices).
        cluster_centroids_init: "kmeans++" (default), "density-based",
            "linear" or "random"; see the module docstring for the formulas.
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
        ValueError: `number_of_clusters < 2`, an unknown initialization, a
            subclassed or unbuilt model, a model that is already clustered,
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
    if isinstance(model_or_layer, keras.layers.Layer) and not isinstance(model_or_layer, keras.Model):
        layer = model_or_layer
        if isinstance(layer, ClusterWeights):
            raise ValueError(
                f"Layer {mu.describe(layer)} is already wrapped for clustering. Keep training it, or strip it "
                f"(`tfopt.strip_clustering`) first. Received: model_or_layer={layer.name!r}"
            )
        if not _is_clusterable_type(layer):
            raise _refuse_layer(layer, "model_or_layer")
        _check_finite([layer], f"model_or_layer={layer.name!r}")
        wrapper = ClusterWeights(mu.copy_layer(layer) if layer.built else layer, **options)
        if layer.built:
            wrapper.build()
        return wrapper

    model = model_or_layer
    subclassed = mu.is_subclassed(model)
    if subclassed:
        mu.check_built_subclassed(model, "model_or_layer", "cluster_weights")
    else:
        mu.check_model(model, "model_or_layer", "cluster_weights")
    if _wrappers(model):
        raise ValueError(
            f"Model {model.name!r} is already wrapped for clustering. Keep training it, or call "
            f"`tfopt.strip_clustering(model)` first to cluster the stripped model again. Received: model_or_layer={model.name!r}"
        )
    others = _tfopt_wrappers(model)
    if others:
        raise ValueError(
            f"Model {model.name!r} holds tfopt pruning or QAT layers ({', '.join(mu.describe(l) for l in others[:4])}"
            f"{', ...' if len(others) > 4 else ''}). Cluster a plain model: call `tfopt.strip_pruning(model)` first "
            "(preserve_sparsity=True keeps its zeros); quantize after clustering, not before. "
            f"Received: model_or_layer={model.name!r}"
        )
    chosen, unsupported = mu.select_weights([model] if subclassed else mu.all_layers(model), filters, _PROTOCOL)
    if unsupported:
        raise ValueError(mu.unplaced_message(unsupported, "cluster", _PROTOCOL) + f" Received: model_or_layer={model.name!r}")
    if not chosen:
        raise ValueError(
            f"No layer of model {model.name!r} has weights to cluster"
            + (" among those `filters` selects. Check the names (model.summary()) or the predicate." if filters is not None else ".")
            + f" Received: filters={filters!r}"
        )
    _check_finite([l for l in mu.all_layers(model) if id(l) in chosen], f"model_or_layer={model.name!r}")
    if subclassed:  # its graph is known only to its `call`: wrapped whole, inside a Functional model
        wrapper = ClusterWeights(mu.copy_layer(model), weight_positions=chosen[id(model)], **options)
        return mu.functional_shell(model, wrapper, "clustered")

    def clone_function(layer):
        new = _copy(layer)
        return ClusterWeights(new, weight_positions=chosen[id(layer)], **options) if id(layer) in chosen else new

    return mu.clone(model, clone_function)


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

    def clone_function(layer):
        if isinstance(layer, ClusterWeights):
            return layer.stripped_layer()
        return _copy(layer)

    return mu.clone(model, clone_function)


# -- report -----------------------------------------------------------------------------


class ClusteringReport:
    """Per-layer count of distinct values in the clusterable weights of a model.

    Attributes:
        rows: list of dicts with keys name, type, weights (element count),
            distinct (largest number of distinct values in one of the
            layer's clusterable tensors), zeros, clustered (True for a
            `ClusterWeights` layer).
        weights, zeros: totals over all rows.
        max_distinct: the largest `distinct` of any row.
    """

    def __init__(self, rows):
        self.rows = rows
        self.weights = sum(r["weights"] for r in rows)
        self.zeros = sum(r["zeros"] for r in rows)
        self.max_distinct = max((r["distinct"] for r in rows), default=0)

    def to_dict(self):
        return {
            "layers": [dict(r) for r in self.rows],
            "weights": self.weights,
            "zeros": self.zeros,
            "max_distinct": self.max_distinct,
        }

    def __str__(self):
        header = ("layer", "type", "weights", "distinct values", "zeros")
        lines = [(r["name"], r["type"], f"{r['weights']:,}", f"{r['distinct']:,}", f"{r['zeros']:,}") for r in self.rows]
        total = ("total", "", f"{self.weights:,}", f"max {self.max_distinct:,}", f"{self.zeros:,}")
        widths = [max(len(str(x[i])) for x in [header, total] + lines) for i in range(5)]

        def fmt(cells):
            return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        rule = "-" * (sum(widths) + 8)
        return "\n".join([fmt(header), rule] + [fmt(l) for l in lines] + [rule, fmt(total)])

    __repr__ = __str__


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
        if isinstance(layer, ClusterWeights):
            if not layer.built:
                continue
            values = [ops.convert_to_numpy(v) for _, v in layer.clustered_weights()]
            kind = type(layer.layer).__name__
        else:
            if isinstance(layer, keras.Model) or not layer.built or not _is_clusterable_type(layer):
                continue
            values = [ops.convert_to_numpy(v) for _, v in _clusterable(layer)]
            kind = type(layer).__name__
        if not values:
            continue
        rows.append(
            {
                "name": layer.name,
                "type": kind,
                "weights": sum(math.prod(v.shape) for v in values),
                "distinct": max(int(np.unique(v).size) for v in values),
                "zeros": sum(int(np.sum(v == 0)) for v in values),
                "clustered": isinstance(layer, ClusterWeights),
            }
        )
    return ClusteringReport(rows)


# -- cluster-preserving training of a stripped model (CQAT) ----------------------------------


def snap_to_centroids(weights, indices, number_of_clusters, centroid_mask=None):
    """Projects `weights` onto its clusters: every weight becomes the mean of its cluster.

    ``c_j = mean(weights[indices == j]) * centroid_mask[j]`` and the result is
    ``c[indices]`` (an empty cluster's centroid is 0 and is never read). Run
    after an optimizer step that moved each weight on its own, it averages
    the step over each cluster (TFMOT's ``GradientAggregation.AVG``), so the
    tensor again holds at most `number_of_clusters` distinct values, and a
    cluster with ``centroid_mask[j] == 0`` (a pruned-zero cluster) stays 0.
    Pure `keras.ops` (runs in the compiled train step).

    Args:
        weights: tensor of any shape.
        indices: int tensor of the same shape, values in ``[0, number_of_clusters)``.
        number_of_clusters: number of clusters ``k``.
        centroid_mask: optional ``(k,)`` 0/1 tensor; 0 pins a centroid to zero.

    Returns:
        A tensor of the shape and dtype of `weights`.

    Example:
        >>> snapped = tfopt.clustering.snap_to_centroids(w, idx, 16)
    """
    flat = ops.reshape(weights, (-1,))
    ids = ops.reshape(ops.cast(indices, "int32"), (-1,))
    sums = ops.segment_sum(flat, ids, num_segments=number_of_clusters)
    counts = ops.segment_sum(ops.ones_like(flat), ids, num_segments=number_of_clusters)
    centroids = sums / ops.maximum(counts, ops.cast(1, flat.dtype))
    if centroid_mask is not None:
        centroids = centroids * ops.cast(centroid_mask, centroids.dtype)
    return ops.reshape(ops.take(centroids, ids), ops.shape(weights))


class _CentroidConstraint:
    """Variable constraint: the user's constraint (if any), then `snap_to_centroids`."""

    def __init__(self, indices, number_of_clusters, centroid_mask, inner):
        self.indices = indices
        self.number_of_clusters = number_of_clusters
        self.centroid_mask = centroid_mask
        self.inner = inner

    def __call__(self, w):
        if self.inner is not None:
            w = self.inner(w)
        return snap_to_centroids(w, self.indices, self.number_of_clusters, self.centroid_mask)


def centroid_constraint(indices, number_of_clusters, centroid_mask=None, inner=None):
    """A variable constraint that keeps a clustered tensor clustered after each optimizer step.

    Keras 3 optimizers apply ``variable.constraint`` in the train step after
    every update; this one applies `inner` (a constraint the variable already
    had) and then `snap_to_centroids`. It holds references to its tensors
    (a variable for `indices` stays live), so it is not serialized: create
    it when the layer is built, as `tfopt.PruneLowMagnitude` does with its
    mask constraint.

    Args:
        indices: int tensor or variable, the cluster of each weight.
        number_of_clusters: number of clusters.
        centroid_mask: optional ``(k,)`` 0/1 tensor or variable; 0 pins a
            cluster at zero.
        inner: the variable's previous constraint, or None.

    Returns:
        A callable ``constraint(w) -> w``.

    Example:
        >>> kernel.constraint = tfopt.clustering.centroid_constraint(idx_var, 16, inner=kernel.constraint)
    """
    _check_k(number_of_clusters)
    return _CentroidConstraint(indices, int(number_of_clusters), centroid_mask, inner)


def constrain_to_clusters(model, number_of_clusters, preserve_sparsity=True):
    """Makes training keep each already-clustered kernel of `model` clustered (in place).

    For use on a model built from a stripped clustered model, typically its
    QAT copy: ``qat = tfopt.quantize_model(tfopt.strip_clustering(clustered))``.
    Every kernel (the registry's prunable and quantizable weights of every
    sub-layer) that holds at most `number_of_clusters` distinct values gets a
    `centroid_constraint` with its current clusters (``np.unique``), so after
    each optimizer step it holds its clusters' means again; with
    `preserve_sparsity`, a cluster of exact zeros is pinned at zero. Together
    with a per-tensor weight quantizer (Dense in `tfopt.quantize_model`) the
    exported int8 kernel holds at most `number_of_clusters` distinct values.

    The constraints live on the variables and are not saved: call this again
    after loading the model to keep training it.

    Args:
        model: a Keras model (or layer); it is modified in place.
        number_of_clusters: the clustering's number of clusters (>= 2).
        preserve_sparsity: pin a cluster of exact zeros at zero.

    Returns:
        The paths of the constrained variables.

    Raises:
        TypeError: `model` is not a Keras model or layer.
        ValueError: `number_of_clusters < 2`, `model` holds `ClusterWeights`
            layers (strip them first), or no kernel has at most
            `number_of_clusters` distinct values.

    Example:
        >>> qat = tfopt.quantize_model(tfopt.strip_clustering(clustered))
        >>> tfopt.clustering.constrain_to_clusters(qat, 16)
        >>> qat.compile(...); qat.fit(...)
    """
    k = _check_k(number_of_clusters, minimum=2)
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a keras model or layer. Received: model={model!r} of type {type(model).__name__}")
    if not isinstance(preserve_sparsity, (bool, np.bool_)):
        raise TypeError(f"`preserve_sparsity` must be True or False. Received: preserve_sparsity={preserve_sparsity!r}")
    layers = model._flatten_layers(include_self=True, recursive=True)
    if any(isinstance(l, ClusterWeights) for l in layers):
        raise ValueError(
            f"Model {model.name!r} still holds ClusterWeights layers, which keep their clusters by construction. "
            f"Call `tfopt.strip_clustering(model)` first (and quantize the stripped model). Received: model={model.name!r}"
        )
    plan, seen = [], set()
    for layer in layers:
        spec = registry.lookup(layer)
        if spec is None or not layer.built:
            continue
        for path in dict.fromkeys(spec.prunable + spec.quantizable):
            var = registry.weight_at(layer, path)
            if id(var) in seen or not var.trainable:
                continue
            seen.add(id(var))
            values = np.asarray(ops.convert_to_numpy(var))
            centroids, inverse = np.unique(values, return_inverse=True)
            if centroids.size <= k:
                plan.append((var, centroids, inverse.reshape(values.shape)))
    if not plan:
        raise ValueError(
            f"No kernel of model {model.name!r} holds at most {k} distinct values: nothing is clustered. Cluster the "
            "float model (`tfopt.cluster_weights`), fine-tune, strip it (`tfopt.strip_clustering`) and quantize the "
            f"stripped model. Received: number_of_clusters={k}"
        )
    for var, centroids, inverse in plan:
        mask = np.ones(k, dtype=np.float32)
        if preserve_sparsity:
            mask[: centroids.size][centroids == 0] = 0.0
        var.constraint = _CentroidConstraint(
            ops.convert_to_tensor(inverse.astype(np.int32)), k, ops.convert_to_tensor(mask), var.constraint
        )
    return [var.path for var, _, _ in plan]
