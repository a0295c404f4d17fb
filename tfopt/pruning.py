"""Magnitude pruning during `model.fit`: the wrapper, the model transforms, the report.

How it works. `PruneLowMagnitude` wraps a layer and keeps, for each prunable
weight, a 0/1 `mask` and the magnitude `threshold` of the last update. The
masked weights are zero *in the variables* at all times:

- when the schedule says so, `tfopt.callbacks.UpdatePruningStep` recomputes the
  masks from the weight magnitudes (between steps, with an O(n) NumPy
  selection) and writes ``weight * mask`` back;
- after every optimizer step, the optimizer applies the weight's constraint,
  which `PruneLowMagnitude` extends with ``* mask`` (Keras 3 optimizers apply
  variable constraints in-graph on every backend).

So the forward pass needs no extra op, the inner layer runs unchanged (any
layer type, any backend), and a checkpoint taken at any time is sparse.

Masks are monotone: a weight that was pruned stays pruned (pruned weights are
ranked below every live weight). A mask update never lowers a layer's
sparsity, which is also why wrapping an already-sparse model keeps its zeros.

Variable order inside the wrapper (the `.keras` format stores variables by
position; never reorder): the inner layer's variables, then for each prunable
weight in registry order ``<weight>_mask`` and ``<weight>_threshold``, then
``pruning_step``.
"""

import functools
import math

import keras
import numpy as np
from keras import ops

from tfopt import _checks, _report, _wrappers
from tfopt import _model_utils as mu
from tfopt import registry
from tfopt.schedules import ConstantSparsity, PruningSchedule

__all__ = [
    "PruneLowMagnitude",
    "prune_low_magnitude",
    "strip_pruning",
    "pruned_wrappers",
    "sparsity_report",
    "SparsityReport",
]


def _check_options(pruning_schedule, block_size, block_pooling_type, sparsity_m_by_n):
    hint = "'AVG' or 'MAX' scores a block by its mean or largest magnitude."
    _checks.check_choice(block_pooling_type, "block_pooling_type", ("AVG", "MAX"), hint)
    if pruning_schedule is not None and not isinstance(pruning_schedule, PruningSchedule):
        raise TypeError(
            "`pruning_schedule` must be a tfopt.PruningSchedule such as "
            "tfopt.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=1000). "
            f"Received: pruning_schedule={pruning_schedule!r}"
        )
    if not _is_int_pair(block_size) or min(block_size) < 1:
        raise ValueError(
            "`block_size` must be two positive integers (rows, columns), e.g. (1, 1) for "
            f"element-wise or (1, 4) for blocks of 4. Received: block_size={block_size!r}"
        )
    if sparsity_m_by_n is not None:
        if not (_is_int_pair(sparsity_m_by_n) and 0 < sparsity_m_by_n[0] < sparsity_m_by_n[1]):
            raise ValueError(
                "`sparsity_m_by_n` must be (m, n) with 0 < m < n: m zeros in every n consecutive "
                f"input-channel weights, e.g. (2, 4). Received: sparsity_m_by_n={sparsity_m_by_n!r}"
            )
        if tuple(block_size) != (1, 1):
            raise ValueError(
                "`sparsity_m_by_n` and `block_size` cannot be combined: pick one structure. "
                f"Received: block_size={tuple(block_size)}, sparsity_m_by_n={tuple(sparsity_m_by_n)}"
            )


def _is_int_pair(value):
    pair = isinstance(value, (tuple, list)) and len(value) == 2
    return pair and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


_PROTOCOL = "get_prunable_weights"  # TFMOT's PrunableLayer protocol


def _prunable_variables(layer):
    """The variables `PruneLowMagnitude(layer)` prunes by default (sub-layers included)."""
    return [w.variable for w in registry.selected(layer, protocol=_PROTOCOL)]


def _input_axis(layer):
    # Grouping axis for N:M sparsity: input channels in TFLite's layout.
    spec = registry.lookup(layer)
    return spec.input_axis if spec is not None else -2


class _MaskConstraint:
    """Re-applies the mask after each optimizer step, after any user constraint.

    The JAX trainer applies constraints in `optimizer.stateless_apply`, whose
    scope maps only the trainable and optimizer variables: the mask (a
    non-trainable variable) is not readable there. `PruneLowMagnitude.call`
    therefore records the mask value of the training forward pass (`traced`),
    which belongs to the same traced train step, and the constraint uses it
    when the scope does not map the mask. TensorFlow and PyTorch read the
    variable.
    """

    def __init__(self, mask, inner):
        self.mask = mask
        self.inner = inner
        self.traced = None

    def __call__(self, w):
        if self.inner is not None:
            w = self.inner(w)
        mask = self.mask
        scope = _wrappers.current_scope()
        if scope is not None and self.traced is not None and scope.get_current_value(self.mask) is None:
            mask = self.traced
        return w * ops.cast(mask, w.dtype)


@keras.saving.register_keras_serializable(package="tfopt")
class PruneLowMagnitude(_wrappers.TfoptWrapper):
    """Wraps a layer so that its low-magnitude weights are pruned during `fit`.

    Usually created by `tfopt.prune_low_magnitude`. Training a model that holds
    these wrappers needs the `tfopt.callbacks.UpdatePruningStep` callback.

    Args:
        layer: the layer to prune (a type in `tfopt.registry`, or one with
            `get_prunable_weights()`).
        pruning_schedule: a `tfopt.PruningSchedule`; default
            ``ConstantSparsity(0.5, begin_step=0, frequency=100)``.
        block_size: (rows, columns) of the blocks pruned together, on the
            weight viewed as a matrix ``(-1, last_dim)``.
        block_pooling_type: "AVG" or "MAX": how a block's magnitude is scored.
        sparsity_m_by_n: (m, n): m zeros in every n consecutive weights along
            the input-channel axis (e.g. (2, 4)); the schedule then only says
            when masks update, and its sparsity value is ignored.
        weight_positions: which weights below `layer` to prune, by their
            positions in `tfopt.registry.walk(layer)` order (`prune_low_magnitude`
            sets it from `filters=`); None prunes what the registry prunes by
            default (every weight the row of a leaf layer names).
        **kwargs: base layer arguments (name, ...).
    """

    technique = "pruning"
    _config_keys = ("pruning_schedule", "block_size", "block_pooling_type", "sparsity_m_by_n", "weight_positions")
    _nested = ("pruning_schedule",)

    def __init__(
        self,
        layer,
        pruning_schedule=None,
        block_size=(1, 1),
        block_pooling_type="AVG",
        sparsity_m_by_n=None,
        weight_positions=None,
        **kwargs,
    ):
        _check_options(pruning_schedule, block_size, block_pooling_type, sparsity_m_by_n)
        kwargs.setdefault("name", f"prune_low_magnitude_{getattr(layer, 'name', 'layer')}")
        super().__init__(layer, **kwargs)
        self.pruning_schedule = pruning_schedule or ConstantSparsity(0.5, begin_step=0, frequency=100)
        self.block_size = tuple(block_size)
        self.block_pooling_type = block_pooling_type
        self.sparsity_m_by_n = None if sparsity_m_by_n is None else tuple(sparsity_m_by_n)
        self.weight_positions = None if weight_positions is None else tuple(weight_positions)
        # Set by UpdatePruningStep while `fit` runs; checked when tracing training calls.
        self._step_callback_attached = False
        self._pruned = []  # [(weight variable, mask variable, threshold variable)]
        self._leaves = []  # the leaf layer of each pruned weight (its layout decides N:M groups)
        self._kept_cache = None  # ones in each mask, as of the last update_masks (None: unknown)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        weights = registry.selected(self.layer, self.weight_positions, _PROTOCOL)
        for w in weights:
            self._check_structure(w.layer, w.variable)
        self._pruned, self._leaves = [], [w.layer for w in weights]
        for weight in weights:
            w, short = weight.variable, weight.path.replace("/", "_")
            mask = self.add_weight(
                name=f"{short}_mask", shape=w.shape, dtype=w.dtype, initializer="ones", trainable=False
            )
            threshold = self.add_weight(name=f"{short}_threshold", shape=(), initializer="zeros", trainable=False)
            self._pruned.append((w, mask, threshold))
            w.constraint = _MaskConstraint(mask, w.constraint)
        self.pruning_step = self.add_weight(
            name="pruning_step", shape=(), dtype="int64", initializer="zeros", trainable=False
        )
        self.built = True

    def _check_structure(self, leaf, w):
        if self.sparsity_m_by_n is not None:
            n = self.sparsity_m_by_n[1]
            axis = _input_axis(leaf) if len(w.shape) >= 2 else -1
            if w.shape[axis] % n:
                raise ValueError(
                    f"Layer {mu.describe(self.layer)} cannot take {self.sparsity_m_by_n} sparsity: its weight "
                    f"'{w.path}' has {w.shape[axis]} input channels, not a multiple of {n}. Exclude it with "
                    f"`filters=`. Received: sparsity_m_by_n={self.sparsity_m_by_n}"
                )
        if self.block_size != (1, 1) and len(w.shape) < 2:
            raise ValueError(
                f"Layer {mu.describe(self.layer)} has a 1-D weight '{w.path}', which cannot be pruned in "
                f"blocks. Use block_size=(1, 1) or exclude it with `filters=`. Received: block_size={self.block_size}"
            )

    def call(self, inputs, *args, training=None, **kwargs):
        if training and not self._step_callback_attached:
            raise ValueError(
                f"Layer {mu.describe(self)} is being trained without the pruning callback. Add "
                "`tfopt.callbacks.UpdatePruningStep()` to `model.fit(..., callbacks=[...])`: it advances "
                "the pruning step and applies the schedule."
            )
        if training:
            # Counted in the train step itself, so a checkpoint taken at any
            # batch holds the right step; UpdatePruningStep mirrors it in Python.
            self.pruning_step.assign_add(1)
            scope = _wrappers.current_scope()
            for w, mask, _ in self._pruned:
                if isinstance(w.constraint, _MaskConstraint):
                    # None outside a stateless (JAX) train step.
                    w.constraint.traced = None if scope is None else scope.get_current_value(mask)
        return self.layer(inputs, *args, **kwargs)

    def stripped_layer(self):
        """A plain copy of the inner layer with the pruned zeros baked into its weights."""
        masks = {id(w): mask for w, mask, _ in self._pruned}
        return mu.copy_layer(
            self.layer, weights=[ops.convert_to_numpy(v * masks[id(v)] if id(v) in masks else v) for v in self.layer.weights]
        )

    # -- masks ------------------------------------------------------------------

    @property
    def pruned_weights(self):
        """[(weight, mask, threshold)] for each pruned weight, in build order."""
        return list(self._pruned)

    def init_masks_from_weights(self):
        """Sets each mask to ``weight != 0``, so zeros already present stay pruned."""
        for w, mask, _ in self._pruned:
            mask.assign(ops.cast(ops.not_equal(w, 0), mask.dtype))
        self._kept_cache = None

    def read_mask_state(self):
        """Re-reads how many weights each mask keeps (after a load or a restore); returns the total."""
        self._kept_cache = [int(np.count_nonzero(ops.convert_to_numpy(m))) for _, m, _ in self._pruned]
        return sum(self._kept_cache)

    def update_masks(self, sparsity):
        """Recomputes every mask for `sparsity` and zeroes the pruned weights.

        Runs between training steps (eagerly, in NumPy: an O(n) selection with
        `np.argpartition`, no sort), so it costs nothing inside the train step.
        Masks are monotone, so a mask that already keeps exactly the number of
        weights `sparsity` asks for cannot change: it is skipped without
        reading or writing any variable (with ConstantSparsity at frequency=1
        every update after the first is free). Its `threshold` then stays the
        one of its last change.

        Returns:
            Number of weights kept (mask == 1) over all pruned weights.
        """
        if self._kept_cache is None:
            self.read_mask_state()
        for i, (w, mask, threshold) in enumerate(self._pruned):
            if self._unchanged(w, self._kept_cache[i], sparsity):
                continue
            w_np = np.asarray(ops.convert_to_numpy(w))
            new_mask, thr = self._compute_mask(self._leaves[i], w_np, np.asarray(ops.convert_to_numpy(mask)), sparsity)
            mask.assign(new_mask.astype(w_np.dtype))
            threshold.assign(thr)
            w.assign(w_np * new_mask)
            self._kept_cache[i] = int(new_mask.sum())
        return sum(self._kept_cache)

    def _unchanged(self, w, currently_kept, sparsity):
        """True when the monotone mask of `w` provably stays as it is at `sparsity`."""
        if self.sparsity_m_by_n is not None or self.block_size != (1, 1):
            return False  # structured masks are recomputed (a count does not prove the structure)
        return _num_kept(math.prod(w.shape), sparsity, currently_kept) == currently_kept

    def _compute_mask(self, leaf, w, mask, sparsity):
        if self.sparsity_m_by_n is not None:
            axis = _input_axis(leaf) if w.ndim >= 2 else -1
            return _m_by_n_mask(w, mask, self.sparsity_m_by_n, axis), 0.0
        if self.block_size != (1, 1):
            return _block_mask(w, mask, sparsity, self.block_size, self.block_pooling_type)
        scores = np.where(mask.reshape(-1) > 0, np.abs(w).reshape(-1), -1.0)
        flat, thr = _keep_top(scores, sparsity)
        return flat.reshape(w.shape), thr



def _num_kept(size, sparsity, currently_kept):
    # TFMOT keeps max(round(size * (1 - s)), 1); masks never grow back.
    k = max(int(round(size * (1.0 - float(sparsity)))), 1)
    return min(k, currently_kept)


def _keep_top(scores, sparsity):
    """(0/1 float mask keeping the largest of the flat `scores`, smallest kept score); pruned ones score -1."""
    size = scores.size
    keep = _num_kept(size, sparsity, int(np.count_nonzero(scores >= 0)))
    mask = np.zeros(size, dtype=np.float32)
    kept_idx = np.argpartition(scores, size - keep)[size - keep :]
    mask[kept_idx] = 1.0
    return mask, float(max(scores[kept_idx].min(), 0.0))


def _block_mask(w, mask, sparsity, block_size, pooling):
    matrix = np.abs(w).reshape(-1, w.shape[-1])
    live = mask.reshape(-1, w.shape[-1])
    rows, cols = matrix.shape
    br, bc = block_size
    pr, pc = -rows % br, -cols % bc
    matrix = np.pad(matrix, ((0, pr), (0, pc)))
    live = np.pad(live, ((0, pr), (0, pc)))
    nr, nc = (rows + pr) // br, (cols + pc) // bc
    blocks = matrix.reshape(nr, br, nc, bc)
    pooled = blocks.mean(axis=(1, 3)) if pooling == "AVG" else blocks.max(axis=(1, 3))
    alive = live.reshape(nr, br, nc, bc).max(axis=(1, 3)) > 0
    block_mask, thr = _keep_top(np.where(alive, pooled, -1.0).reshape(-1), sparsity)
    full = np.repeat(np.repeat(block_mask.reshape(nr, nc), br, axis=0), bc, axis=1)[:rows, :cols]
    return full.reshape(w.shape), thr


def _m_by_n_mask(w, mask, m_by_n, axis):
    m, n = m_by_n
    moved = np.moveaxis(np.abs(w) * mask, axis, -1)
    groups = moved.reshape(-1, n)
    keep_idx = np.argpartition(-groups, n - m - 1, axis=1)[:, : n - m]
    keep = np.zeros_like(groups, dtype=np.float32)
    np.put_along_axis(keep, keep_idx, 1.0, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


# -- model transforms ------------------------------------------------------------


def pruned_wrappers(model):
    """The `PruneLowMagnitude` layers anywhere in `model` (attributes of subclassed models included)."""
    return _wrappers.find(model, PruneLowMagnitude)


def prune_low_magnitude(
    to_prune, pruning_schedule=None, block_size=(1, 1), block_pooling_type="AVG", sparsity_m_by_n=None, filters=None
):
    """Returns a copy of a model (or layer) whose weights get pruned during `fit`.

    Every layer that has prunable weights in `tfopt.registry` is wrapped in
    `PruneLowMagnitude` (DepthwiseConv only when selected with `filters`);
    layers without weights and normalization layers pass through. The model
    you pass is never modified: the result has its own copies of every layer
    and weight. Train it with the `tfopt.callbacks.UpdatePruningStep` callback
    (compile it first: the copy has no optimizer).

    Args:
        to_prune: a built Sequential or Functional model (nested models and
            composite layers are walked into), a built subclassed model
            (wrapped whole inside a Functional model), or a single layer
            (e.g. inside a subclassed model's `__init__`).
        pruning_schedule: a `tfopt.PruningSchedule`; default
            ``ConstantSparsity(0.5, begin_step=0, frequency=100)``.
        block_size: (rows, columns) pruned together; see `PruneLowMagnitude`.
        block_pooling_type: "AVG" or "MAX".
        sparsity_m_by_n: (m, n) structured sparsity, e.g. (2, 4).
        filters: which layers to prune: None (every supported layer), a regex
            on layer names, a list of regexes, or a callable ``fn(layer) -> bool``.

    Returns:
        A new model (or a `PruneLowMagnitude` layer).

    Raises:
        TypeError: `to_prune` is not a model or layer, or an option has the
            wrong type.
        ValueError: an unbuilt model, a model that is already pruned, a
            selected layer with weights tfopt does not know (all are listed),
            or an invalid option.

    Example:
        >>> pruned = tfopt.prune_low_magnitude(
        ...     model, tfopt.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=500))
        >>> pruned.compile("adam", "sparse_categorical_crossentropy")
        >>> pruned.fit(x, y, callbacks=[tfopt.callbacks.UpdatePruningStep()])
    """
    _check_options(pruning_schedule, block_size, block_pooling_type, sparsity_m_by_n)
    options = dict(pruning_schedule=pruning_schedule, block_size=block_size, block_pooling_type=block_pooling_type,
                   sparsity_m_by_n=sparsity_m_by_n)
    wrappers = []

    def prune(layer, weight_positions):
        wrappers.append(PruneLowMagnitude(layer, weight_positions=weight_positions, **options))
        return wrappers[-1]

    choose = functools.partial(_choose, filters=filters)
    pruned = _wrappers.wrap(to_prune, prune, choose, "to_prune", "prune_low_magnitude", "pruned")
    for w in wrappers:
        w.init_masks_from_weights()
    return pruned


def _choose(to_prune, layers, filters):
    """Refuses what cannot be pruned; returns which weights of `layers` to prune, as `mu.select_weights`."""
    name = to_prune.name
    if isinstance(to_prune, PruneLowMagnitude):
        raise ValueError(
            f"Layer {mu.describe(to_prune)} is already wrapped for pruning. Keep training it, or pass the inner "
            f"layer (`wrapper.layer`). Received: to_prune={name!r}"
        )
    if isinstance(to_prune, keras.Model):
        _wrappers.refuse(
            to_prune, PruneLowMagnitude,
            "Model {model} is already wrapped for pruning. Keep training it, or call `tfopt.strip_pruning(model)` "
            "first to prune the stripped model again. Received: to_prune={model}",
        )
    if to_prune.built and (isinstance(to_prune, keras.Model) or filters is not None):
        chosen, unsupported = mu.select_weights(layers, filters, _PROTOCOL)
    else:  # a single layer without `filters=`, or unbuilt (no weights yet, in a subclassed model's `__init__`)
        found, unplaced = (
            registry.walk(to_prune, _PROTOCOL) if to_prune.built else (registry.knowable(to_prune, _PROTOCOL), [])
        )
        if found and not unplaced:
            return {}
        chosen, unsupported = {}, [(to_prune, unplaced)]
    if unsupported:
        raise ValueError(mu.unplaced_message(unsupported, "prune", _PROTOCOL) + f" Received: to_prune={name!r}")
    if filters is None and not chosen:
        raise ValueError(
            f"Model {name!r} has no prunable layer (Dense, Conv, Embedding, ... with weights in "
            "`tfopt.registry`): there is nothing to prune. Pass the model that holds the weights, select "
            "DepthwiseConv layers explicitly with `filters=` (they are not pruned by default), or register custom "
            f"layers with `tfopt.register_layer`. Received: to_prune={name!r}"
        )
    if filters is not None and not chosen:
        raise ValueError(
            f"`filters` selected no prunable layer in model {name!r}. Check the names "
            f"(model.summary()) or the predicate. Received: filters={filters!r}"
        )
    return chosen


def strip_pruning(model):
    """Returns a plain Keras model with the pruned zeros baked into the weights.

    No tfopt layer is left, so the result saves, loads and converts like any
    Keras model and predicts exactly what the pruned model predicted.

    Args:
        model: a Sequential or Functional model, pruned or not.

    Returns:
        A new model; `model` is not modified.

    Example:
        >>> final = tfopt.strip_pruning(pruned)
        >>> final.save("pruned.keras")
    """
    if mu.is_subclassed(model):
        raise ValueError(
            f"`strip_pruning` takes the model `prune_low_magnitude` returned (a Functional model around a pruned "
            f"subclassed model), not the subclassed model itself. Received: model={model.name!r} of type {type(model).__name__}"
        )
    mu.check_model(model, "model", "strip_pruning")
    return _wrappers.strip(model, PruneLowMagnitude)


class SparsityReport(_report.Report):
    """Per-layer sparsity of the prunable weights of a model.

    Attributes:
        rows: list of dicts with keys name, type, weights, zeros, sparsity.
        weights, zeros: totals over all rows.
        sparsity: zeros / weights over all rows.
    """

    header = ("layer", "type", "weights", "zeros", "sparsity")
    right = (2, 3, 4)
    summed, totals = ("weights", "zeros"), ("weights", "zeros", "sparsity")

    def __init__(self, rows):
        super().__init__(rows)
        self.sparsity = self.zeros / self.weights if self.weights else 0.0

    def _cells(self, r):
        return r["name"], r["type"], f"{r['weights']:,}", f"{r['zeros']:,}", f"{r['sparsity']:.1%}"

    def _footer(self):
        return [self._cells({"name": "total", "type": "", **{k: getattr(self, k) for k in self.totals}})]


def sparsity_report(model):
    """Counts the zeros in the prunable weights of every layer of `model`.

    Works on pruning models (wrapped), stripped models and plain ones; layer
    types come from `tfopt.registry` (DepthwiseConv included).

    Args:
        model: a Keras model or layer.

    Returns:
        A `SparsityReport`: ``print(report)`` shows a table,
        ``report.to_dict()`` gives plain data.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a keras model or layer. Received: model={model!r}")
    rows = []
    layers = [model] if not isinstance(model, keras.Model) else mu.all_layers(model)
    for layer in layers:
        inner = layer.layer if isinstance(layer, PruneLowMagnitude) else layer
        if isinstance(layer, keras.Model) or not inner.built:
            continue
        if isinstance(layer, PruneLowMagnitude):
            weights = [w for w, _, _ in layer.pruned_weights]
        else:
            weights = [w.variable for w in registry.walk(inner, _PROTOCOL)[0]]
        if not weights:
            continue
        size = sum(math.prod(w.shape) for w in weights)
        zeros = sum(int(np.sum(ops.convert_to_numpy(w) == 0)) for w in weights)
        rows.append(
            {"name": layer.name, "type": type(inner).__name__, "weights": size, "zeros": zeros, "sparsity": zeros / size}
        )
    return SparsityReport(rows)
