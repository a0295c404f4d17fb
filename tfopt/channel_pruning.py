"""Structured (channel) pruning: `prune_channels` and `channel_report`.

README.md ("Channel pruning") says what is removed, kept and refused, and which defaults were measured (by
``benchmarks/bench_channel_pruning.py``). This docstring says how channels are grouped.

The graph is the flat `tfopt._graph.Graph` (nested Sequential/Functional models inlined; the result is one flat
Functional model). Every channel of every tensor is tracked as an *atom*, and atoms that must keep the same index
are merged (union-find). How channels flow through a Keras layer type is its `tfopt.registry` row's
``channel_role`` (a subclass gets none: its `call` or `convolution_op` may compute otherwise):

- a Conv1D/2D/3D, Dense or SeparableConv1D/2D creates one new atom per output channel (these are the layers whose
  output channels are scored and removed);
- channel-preserving layers pass their input atoms through: BatchNormalization, PReLU, ReLU and other element-wise
  activations, Dropout and noise layers, pooling (global or not), ZeroPadding, Cropping, UpSampling, RepeatVector,
  element-wise ``keras.ops`` calls with scalar arguments (``x * 2.0``, ``ops.relu(x)``);
- a DepthwiseConv with multiplier m repeats each input atom m times: its m output channels per input channel are
  kept or removed with that input channel (for m = 1 its channels simply follow its input);
- Add, Subtract, Multiply, Maximum, Minimum, Average (layers or ops) merge the atoms of their inputs position by
  position: a residual block is one group;
- Concatenate on the channel axis concatenates its inputs' atoms (each input keeps its own slice of the output
  channels);
- Flatten and Reshape map atoms through the reshape: a channels-last Flatten of ``(h, w, c)`` repeats the c atoms
  h * w times, so the next Dense loses the rows ``p * c + k`` of every removed channel k. A Reshape that moves
  channels into another axis cannot be sliced and is refused.

A *group* is a set of merged channels together with every layer that holds them. Channels that reach a model
output, come from a model input or from a layer not selected by ``filters`` are *pinned*: they keep their width,
and so do the channels tied to them. The other (*prunable*) channels of each group are ranked by the group's summed
importance and ``round((1 - ratio) * n)`` are kept (at least one per layer). Importance: ``"l2"`` (default) or
``"l1"`` norm of each output filter of the group's Conv/Dense/SeparableConv layers and DepthwiseConv kernels,
``"bn_gamma"`` the |gamma| of the group's BatchNormalization layers (network slimming; groups without one use
"l2"). Each layer's scores are divided by their mean before summing, so that layers of different scales count alike.

Everything is decided and validated before anything is built (a layer the walk cannot route channels through is an
error only if prunable channels reach it; all such layers are listed once); the user's model is only read.
"""

import dataclasses
import math
import types
import weakref

import keras
import numpy as np

from tfopt import _checks, _graph, _report, _wrappers, qat, registry
from tfopt import _model_utils as mu

__all__ = ["CRITERIA", "ChannelPruningReport", "channel_report", "prune_channels"]

CRITERIA = ("l2", "l1", "bn_gamma")

L = keras.layers
_MIXING_ACTIVATIONS = ("softmax", "log_softmax")
# The weights each sliced kind of layer may hold (anything else, e.g. LoRA or
# int8-quantized kernels, is refused rather than sliced wrongly). The first
# three kinds produce the channels that are scored and removed.
_WEIGHT_NAMES = {
    "conv": {"kernel", "bias"},
    "dense": {"kernel", "bias"},
    "separable": {"depthwise_kernel", "pointwise_kernel", "bias"},
    "depthwise": {"kernel", "bias"},
    "bn": {"gamma", "beta", "moving_mean", "moving_variance"},
    "channelwise": {"alpha"},  # PReLU
}
_PRODUCERS = ("conv", "dense", "separable")
_KERNEL_ROLES = ("conv", "dense", "separable", "depthwise", "transpose")  # the layers whose MACs are counted
_RECORD = "_tfopt_channel_pruning"  # on a pruned model: its source (a weak reference) and the kept channels


# ----- public API -----------------------------------------------------------------


def prune_channels(model, ratio, criterion="l2", filters=None, round_to=1):
    """Removes the least important output channels of every prunable layer group.

    One-shot: scores the channels of the trained `model`, returns a new,
    physically smaller Functional model with the surviving weights copied
    (fine-tune it for a few epochs afterwards). See the module docstring for
    how channels are grouped. `model` is never modified.

    Args:
        model: a built Sequential or Functional model (nested models are
            inlined). Not wrapped for pruning or QAT: prune channels first,
            then apply `tfopt.prune_low_magnitude` or `tfopt.quantize_model`.
        ratio: fraction of each group's prunable channels to remove, in
            [0, 1). Each group keeps ``round((1 - ratio) * n)`` of its n
            prunable channels, at least one per layer. 0 returns an equivalent
            copy.
        criterion: channel importance: ``"l2"`` or ``"l1"`` norm of each
            filter, or ``"bn_gamma"`` (|gamma| of the BatchNormalization
            layers of the group; "l2" for groups without one).
        filters: None to prune every Conv/Dense/SeparableConv; or a regex on
            layer names, a list of them, or ``fn(layer) -> bool``. Layers that
            do not match keep their width: a Conv/Dense/SeparableConv keeps
            its output channels, and a layer tfopt cannot slice keeps its
            input channels (so the layers feeding it are not pruned).
            DepthwiseConv, BatchNormalization and weightless layers always
            follow their input.
        round_to: round each group's kept width up to a multiple of this
            (e.g. 8 or 4 for SIMD-friendly widths), never beyond its original
            width.

    Returns:
        The pruned Functional model. ``tfopt.channel_report(model, pruned)``
        describes it, with the kept channel indices of every layer in
        ``report.kept``.

    Raises:
        TypeError: `model` is not a Keras model, or an argument has the wrong
            type.
        ValueError: `ratio`, `criterion` or `round_to` out of range; the model
            is subclassed, unbuilt, wrapped for pruning, clustering or QAT;
            prunable channels reach layers tfopt cannot slice (all listed
            once, with the fix); or `ratio` > 0 and no channel is prunable.

    Example:
        >>> model = tfopt.data.mnist_cnn()
        >>> model.compile("adam", "sparse_categorical_crossentropy")  # doctest: +SKIP
        >>> model.fit(x, y, epochs=8)  # doctest: +SKIP
        >>> small = tfopt.prune_channels(model, ratio=0.5)
        >>> print(tfopt.channel_report(model, small))  # doctest: +SKIP
        >>> small.compile("adam", "sparse_categorical_crossentropy"); small.fit(x, y, epochs=2)  # doctest: +SKIP
    """
    mu.check_model(model, "model", "prune_channels")
    ratio = _checks.check_fraction(
        ratio, "ratio", "The fraction of each channel group's prunable channels to remove (0 keeps them all), e.g. 0.5."
    )
    _checks.check_choice(criterion, "criterion", CRITERIA, "'l2'/'l1' rank channels by the norm of their filters, "
                         "'bn_gamma' by the |gamma| of their BatchNormalization.")  # fmt: skip
    _checks.check_int(round_to, "round_to", 1, "Kept widths are rounded up to a multiple of it (1: no rounding; 8 or "
                      "4 give SIMD-friendly widths).")  # fmt: skip
    _check_not_wrapped(model)
    plan = _Plan(model, ratio, criterion, mu.make_filter(filters), round_to)
    unique = mu.name_allocator()
    name = model.name if model.name.endswith("_channel_pruned") else model.name + "_channel_pruned"
    pruned = plan.graph.rebuild(_graph.copier(lambda rec: _new_op(rec, plan, unique)), name, unique=unique)
    setattr(pruned, _RECORD, types.SimpleNamespace(source=weakref.ref(model), kept=plan.kept()))
    return pruned


def channel_report(model, pruned=None):
    """Per-layer channels, parameters and MACs of `model`, or of `model` vs `pruned`.

    Layers are matched by name (`prune_channels` keeps the names). MACs are
    multiply-accumulates of one sample (batch 1) in Conv, DepthwiseConv,
    SeparableConv, ConvTranspose and Dense layers; None where a dimension is
    unknown.

    Args:
        model: the reference model (e.g. before `prune_channels`).
        pruned: None, or the model to compare (e.g. after it).

    Returns:
        A `ChannelPruningReport`: ``print(report)`` shows a table,
        ``report.to_dict()`` gives plain data. When `pruned` is what
        ``prune_channels(model, ...)`` returned, ``report.kept`` holds the
        kept channel indices of every sliced layer.

    Raises:
        TypeError / ValueError: as `tfopt.prune_channels` for a bad model.
        ValueError: a layer with weights of `model` has no layer of the same
            name in `pruned`.

    Example:
        >>> small = tfopt.prune_channels(model, ratio=0.5)
        >>> print(tfopt.channel_report(model, small))  # doctest: +SKIP
    """
    mu.check_model(model, "model", "channel_report")
    if pruned is None:
        return _build_report(model, model, None)
    mu.check_model(pruned, "pruned", "channel_report")
    record = getattr(pruned, _RECORD, None)  # absent on a loaded or cloned copy
    return _build_report(model, pruned, record.kept if record is not None and record.source() is model else None)


class ChannelPruningReport(_report.Report):
    """Channels, parameters and MACs per layer, before and after channel pruning.

    Attributes:
        rows: list of dicts with keys name, type, in_before, in_after,
            channels_before, channels_after (output channels), params_before,
            params_after, macs_before, macs_after (None where unknown).
        params_before, params_after: parameters of the whole models.
        macs_before, macs_after: MACs summed over the rows (None if any is
            unknown).
        kept: {layer name: indices of the original output channels it keeps}
            when the report compares a model with its `prune_channels`
            result, else None.
    """

    header = ("layer", "type", "in", "out", "params", "MACs")
    right = (2, 3, 4, 5)
    totals = ("params_before", "params_after", "params_ratio", "macs_before", "macs_after", "macs_ratio")

    def __init__(self, rows, params_before, params_after, kept=None):
        super().__init__(rows)
        self.params_before = params_before
        self.params_after = params_after
        self.macs_before = _total(r["macs_before"] for r in rows)
        self.macs_after = _total(r["macs_after"] for r in rows)
        self.kept = kept

    @property
    def params_ratio(self):
        """params_after / params_before."""
        return self.params_after / self.params_before if self.params_before else None

    @property
    def macs_ratio(self):
        """macs_after / macs_before (None if unknown)."""
        return self.macs_after / self.macs_before if self.macs_before and self.macs_after is not None else None

    def _cells(self, r):
        cells = (_arrow(r[k + "_before"], r[k + "_after"]) for k in ("in", "channels", "params", "macs"))
        return r["name"], r["type"], *cells

    def _footer(self):
        params, macs = _arrow(self.params_before, self.params_after), _arrow(self.macs_before, self.macs_after)
        return [("total", "", "", "", params, macs)]


# ----- validation -------------------------------------------------------------------


def _check_not_wrapped(model):
    message = (
        "`prune_channels` got a model holding tfopt layers ({layers}) for magnitude pruning, clustering or "
        "quantization-aware training. Prune channels on the float model, then wrap or quantize the result, e.g. "
        "`tfopt.quantize_model(tfopt.prune_channels(model, ratio))`; or strip the pruning or clustering wrappers "
        "first (`tfopt.strip_pruning(model)`, `tfopt.strip_clustering(model)`). Received: model={model}"
    )
    _wrappers.refuse(model, _wrappers.TfoptWrapper, message)
    if qat.is_quantized_model(model):  # QAT's QuantizeLayer is not a wrapper
        raise ValueError(message.format(layers="QuantizeLayer", model=repr(model.name)))


# ----- graph walk -------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Rec(_graph.Node):
    """One node of the flattened graph, with how channels flow through it."""

    kind: str = None
    reason: str = None


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _classify(rec, shape):
    """Sets rec.kind (how channels flow through the node) and, for a barrier, rec.reason."""
    rec.kind, rec.reason = _flow(rec, shape)
    if rec.kind in _WEIGHT_NAMES:
        unknown = sorted({w.name for w in rec.op.weights} - _WEIGHT_NAMES[rec.kind])
        if unknown:
            rec.kind = "barrier"
            rec.reason = f"has weights tfopt cannot slice ({unknown}; e.g. LoRA or quantized kernels)"


def _flow(rec, shape):
    """``(kind, None)``, or ``("barrier", why channels cannot be routed through the node)``."""
    op, t = rec.op, type(rec.op)
    if isinstance(op, keras.Model):
        return "barrier", "is a subclassed model nested in the graph; tfopt cannot see its layers"
    # The row of a Keras class says how channels flow through it. A subclass may compute otherwise (its
    # `call`, `convolution_op`, ...): it gets no role, and is a barrier.
    role = getattr(registry.lookup(op), "channel_role", None) if t.__module__.startswith("keras.") else None
    if not isinstance(op, keras.layers.Layer):
        if not t.__module__.startswith("keras.src.ops"):
            return "barrier", "is a custom operation"
        scalars = (keras.KerasTensor, type(None), bool, int, float, str, np.number)
        if not all(isinstance(x, scalars) for x in keras.tree.flatten(rec.arguments)):
            return "barrier", "is called with non-scalar constant arguments"
        if role == "merge" or (role == "elementwise" and len(rec.ins) == 1):
            return ("merge" if role == "merge" else "pass"), None
        return "barrier", f"is the operation `{t.__name__}`, which may mix or select channels"
    in_rank = len(shape(rec.ins[0])) if rec.ins else 0
    spatial = role in ("conv", "separable", "depthwise", "spatial") or (t is L.Flatten and in_rank > 2)
    if spatial and not _channels_last(op):
        return "barrier", "uses data_format='channels_first' (only channels_last is sliced)"
    if role == "conv" and op.groups != 1:
        return "barrier", f"is a grouped convolution (groups={op.groups})"
    if t is L.BatchNormalization:
        axis = op.axis if isinstance(op.axis, int) else (op.axis[0] if len(op.axis) == 1 else None)
        if axis is None or axis % in_rank != in_rank - 1:
            return "barrier", f"normalizes axis {op.axis!r}, not the last (channel) axis"
        return "bn", None
    if role in ("conv", "dense", "separable", "depthwise", "channelwise", "merge"):
        return role, None
    if role in ("elementwise", "spatial"):
        return "pass", None
    # Keras layers without a channel role: Concatenate and reshapes route channels their own way; the others
    # keep them unless their arguments mix channels.
    if t is L.Concatenate:
        out_rank = len(shape(rec.outs[0]))
        return ("concat" if op.axis % out_rank == out_rank - 1 else "merge"), None
    if t in (L.Flatten, L.Reshape):
        return "reshape", None
    if t in (L.Activation, L.Softmax):
        mixes = t is L.Softmax or getattr(op.activation, "__name__", "") in _MIXING_ACTIVATIONS
        return ("barrier", "is a softmax over the channel axis") if mixes else ("pass", None)
    if t is L.Rescaling and (np.ndim(op.scale) or np.ndim(op.offset)):
        return "barrier", "has a per-channel scale or offset"
    if t is L.Permute and op.dims[-1] != len(op.dims):
        return "barrier", f"moves the channel axis (dims={op.dims})"
    if t in (L.Rescaling, L.Permute):
        return "pass", None
    if op.weights:
        return "barrier", "is a layer type whose weights tfopt cannot slice"
    return "barrier", "is a layer type tfopt does not know how channels flow through"


class _UnionFind:
    """Channel atoms; atoms that must keep the same index share a root."""

    def __init__(self):
        self.parent = []
        self.pinned = []

    def new(self, n):
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i):
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a, b):
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def pin(self, atoms):
        if atoms is not None:
            self.pinned.append(np.asarray(atoms, dtype=np.int64))

    def roots(self):
        return np.asarray([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def _channel_dim(shape):
    """Static size of the channel (last) axis of a per-sample shape with batch, or None."""
    return shape[-1] if len(shape) >= 2 else None


def _reshape_atoms(atoms, in_shape, out_shape):
    """Atoms of a reshape's output channel axis, or (a string) why they cannot be traced."""
    in_s, out_s = in_shape[1:], out_shape[1:]
    if not out_s or any(d is None for d in (*in_s, *out_s)):
        return "reshapes a tensor of unknown size"
    rows = np.broadcast_to(atoms, in_s).reshape(-1, out_s[-1])
    # Every output position must see the same channel pattern along the last
    # axis: then slicing before or after the reshape keeps the same elements.
    if rows.shape[0] > 1 and not (rows == rows[0]).all():
        return "moves channels into another axis"
    return rows[0].copy()


class _Plan:
    """The whole pruning decision, computed (and validated) before anything is built."""

    def __init__(self, model, ratio, criterion, pick, round_to):
        graph = self.graph = _graph.Graph(model, _Rec)
        self.uf = _UnionFind()
        self.layer_in = {}  # id(layer) -> atoms of its (first call's) input
        self.layer_out = {}  # id(producer) -> its output atoms
        self.members = {}  # id(layer) -> (kind, layer, atoms, scores by criterion) of the scored layers
        self.checks = []  # (rec, [input atoms]) that must hold no prunable channel
        atoms = self.atoms = {c: self._fresh(c) for c in graph.inputs}
        for rec in graph.nodes:
            _classify(rec, graph.shape)
            selected = pick is None or bool(pick(rec.op))
            atoms.update(zip(rec.outs, self._route(rec, [atoms[c] for c in rec.ins], selected)))
        for c in graph.outputs:
            self.uf.pin(atoms[c])

        roots = self.roots = self.uf.roots()
        pinned = self.pinned = np.zeros(len(roots), dtype=bool)
        if self.uf.pinned:
            pinned[roots[np.concatenate(self.uf.pinned)]] = True
        errors = [
            (rec, self._feeders(np.concatenate(ins)))
            for rec, ins in self.checks
            if any(not pinned[roots[a]].all() for a in ins)
        ]
        if errors:
            raise ValueError(_barrier_message(errors, model))
        if ratio > 0 and all(pinned[roots[a]].all() for _, _, a, _ in self.members.values()):
            raise ValueError(
                f"`prune_channels` found no prunable channel in model {model.name!r}: every channel group reaches a "
                "model output, comes from a model input or is tied to a layer left at its width by `filters`. "
                "Prune a model with hidden Conv/Dense/SeparableConv layers, or widen `filters`. "
                f"Received: ratio={ratio}, filters selecting {[l.name for l, _, _ in self._producers()]}"
            )
        self.keep = self._select(ratio, criterion, round_to)

    # -- walk ----------------------------------------------------------------------

    def _route(self, rec, ins, selected):
        """Output atoms of one node; records members, ties and checks on the way."""
        kind, op, shape = rec.kind, rec.op, self.graph.shape
        x = ins[0] if ins else None
        if kind in _WEIGHT_NAMES and x is not None:  # a shared layer reads the same channels at every call
            first = self.layer_in.setdefault(id(op), x)
            if first is not x and len(first) == len(x):
                self.uf.union(first, x)
        if kind in _PRODUCERS:
            if id(op) not in self.layer_out:
                out = self.layer_out[id(op)] = self.uf.new(shape(rec.outs[0])[-1])
                if selected:
                    self.members[id(op)] = (kind, op, out, _scores(op, kind))
                else:
                    self.uf.pin(out)
            return [self.layer_out[id(op)]]
        if kind in ("depthwise", "bn") and x is not None and id(op) not in self.members:
            self.members[id(op)] = (kind, op, x, _scores(op, kind))
        if kind == "depthwise":
            return [None if x is None else np.repeat(x, op.depth_multiplier)]
        if kind in ("bn", "channelwise", "pass"):
            return [x]
        if kind == "merge":
            width = _channel_dim(shape(rec.outs[0]))
            tensors = [a for a in ins if a is not None]
            if width is None or len(tensors) != len(ins):
                return self._barrier(rec, tensors, check=True)
            full = next(a for a in tensors if len(a) == width)
            for a in tensors:
                if len(a) == width:
                    self.uf.union(full, a)
                else:  # broadcast along channels: its width (1) cannot change
                    self.uf.pin(a)
            return [full]
        if kind == "concat":
            if any(a is None for a in ins):
                return self._barrier(rec, ins, check=True)
            return [np.concatenate(ins)]
        if kind == "reshape":
            out = None if x is None else _reshape_atoms(x, shape(rec.ins[0]), shape(rec.outs[0]))
            if not isinstance(out, str):
                return [self._fresh(rec.outs[0]) if out is None else out]
            rec.kind, rec.reason = "barrier", out
        # A barrier: its inputs must not lose channels (an error), unless `filters` leaves it alone.
        return self._barrier(rec, ins, check=selected)

    def _barrier(self, rec, ins, check):
        """New pinned output channels; the input channels are pinned, or (`check`) must hold no prunable one."""
        ins = [a for a in ins if a is not None]
        if check:
            self.checks.append((rec, ins))
        else:
            for a in ins:
                self.uf.pin(a)
        return [self._fresh(c) for c in rec.outs]

    def _fresh(self, c):
        """New pinned atoms for tensor `c` (None when its channel axis has no static size)."""
        n = _channel_dim(self.graph.shape(c))
        atoms = None if n is None else self.uf.new(n)
        self.uf.pin(atoms)
        return atoms

    def _producers(self):
        """(layer, atoms, scores) of the selected Conv/Dense/SeparableConv layers."""
        return [(layer, a, scores) for kind, layer, a, scores in self.members.values() if kind in _PRODUCERS]

    def _feeders(self, atoms):
        """Names of the selected producers whose prunable channels are among `atoms`."""
        classes = set(self.roots[atoms][~self.pinned[self.roots[atoms]]].tolist())
        return [layer.name for layer, a, _ in self._producers() if classes.intersection(self.roots[a].tolist())]

    # -- selection -----------------------------------------------------------------

    def _select(self, ratio, criterion, round_to):
        """Per-root keep flags: pinned channels, plus the best of each group's prunable ones."""
        roots, pinned = self.roots, self.pinned
        keep = pinned.copy()
        # Groups: the classes held together by a layer (union over each member's classes).
        groups = _UnionFind()
        groups.new(len(roots))
        for _, _, a, _ in self.members.values():
            classes = np.unique(roots[a])
            groups.union(np.full(len(classes) - 1, classes[0]), classes[1:])
        group = groups.roots()
        by_group = {}
        for kind, _, a, scores in self.members.values():
            by_group.setdefault(int(group[roots[a[0]]]), []).append((kind, a, scores))

        for members in by_group.values():
            classes = np.unique(np.concatenate([roots[a] for _, a, _ in members]))
            free = classes[~pinned[classes]]
            if not len(free):
                continue
            # A group without BatchNormalization is ranked by "l2".
            key = "l2" if criterion == "bn_gamma" and all(kind != "bn" for kind, _, _ in members) else criterion
            score = np.zeros(len(roots))
            for _, a, scores in members:
                s = scores.get(key)
                if s is not None:
                    mean = float(np.mean(s))
                    np.add.at(score, roots[a], s / mean if mean > 0 else s)
            n_keep = _n_keep(len(free), len(classes) - len(free), ratio, round_to)
            keep[free[np.argsort(-score[free], kind="stable")][:n_keep]] = True

        # Every layer keeps at least one output channel (its best one).
        for _, a, scores in self._producers():
            if not keep[roots[a]].any():
                keep[roots[a][int(np.argmax(scores["l2"]))]] = True
        return keep

    def mask(self, atoms):
        return None if atoms is None else self.keep[self.roots[atoms]]

    def kept(self):
        """{layer name: kept output-channel indices} for every sliced layer."""
        out = {}
        for rec in self.graph.nodes:
            a = self.atoms[rec.outs[0]] if rec.kind in _WEIGHT_NAMES else None
            if a is not None:
                out.setdefault(rec.op.name, np.flatnonzero(self.mask(a)))
        return out


def _n_keep(n_free, n_pinned, ratio, round_to):
    keep = int(math.floor((1.0 - ratio) * n_free + 0.5))
    total = n_pinned + (keep if n_pinned else max(keep, 1))
    return min(n_pinned + n_free, -(-total // round_to) * round_to) - n_pinned  # rounded up, within the width


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v))


def _scores(layer, kind):
    """{criterion: importance of each channel} of a scored layer."""
    if kind == "bn":
        gamma = _np(layer.gamma) if layer.scale else np.ones(int(layer.moving_mean.shape[0]))
        return {"bn_gamma": np.abs(gamma).astype(np.float64)}
    k = _np(layer.pointwise_kernel if kind == "separable" else layer.kernel).astype(np.float64)
    columns = k.reshape(-1, math.prod(k.shape[-2:]) if kind == "depthwise" else k.shape[-1])
    norms = {"l2": np.sqrt(np.sum(columns * columns, axis=0)), "l1": np.sum(np.abs(columns), axis=0)}
    if kind == "depthwise":  # (..., channels, multiplier): one score per input channel
        return {name: s.reshape(k.shape[-2], -1).sum(axis=1) for name, s in norms.items()}
    return norms


def _barrier_message(errors, model):
    lines = []
    for rec, feeders in errors:
        via = f"; it receives prunable channels of {feeders}" if feeders else ""
        lines.append(f"  - {mu.describe(rec.op)} {rec.reason}{via}")
    names = [rec.op.name for rec, _ in errors]
    return (
        f"`prune_channels` cannot slice {len(errors)} layer(s) of model {model.name!r} that prunable channels reach:\n"
        + "\n".join(lines)
        + "\nFix: leave them at their width with `filters=`: a layer that does not match keeps its input channels, "
        f"so the layers feeding it are not pruned, e.g. `filters=lambda layer: layer.name not in {names!r}`; or "
        "replace them with standard Keras layers (channels_last). "
        f"Received: layers={names}"
    )


# ----- rebuild ----------------------------------------------------------------------


def _new_op(rec, plan, unique):
    """(a new op for `rec`, None or a function giving it its weights once built)."""
    op, kind = rec.op, rec.kind
    if not isinstance(op, keras.layers.Layer) or (kind == "barrier" and op.weights):
        return _graph.copy_op(op, unique), None
    config = dict(op.get_config(), name=unique(op.name))
    if type(op) is L.Lambda:
        # from_config would refuse a Python lambda in safe mode; the function object is the user's own.
        new = L.Lambda(
            op.function, output_shape=op._output_shape, mask=op.mask, arguments=op.arguments, name=config["name"]
        )
        return new, None
    in_mask = plan.mask(plan.atoms[rec.ins[0]]) if rec.ins else None
    out_mask = plan.mask(plan.atoms[rec.outs[0]])
    if kind in _PRODUCERS:
        config["units" if kind == "dense" else "filters"] = int(out_mask.sum())
    elif kind == "reshape" and isinstance(op, L.Reshape):
        config["target_shape"] = (*plan.graph.shape(rec.outs[0])[1:-1], int(out_mask.sum()))
    if kind not in _WEIGHT_NAMES:
        return type(op).from_config(config), None
    weights = _sliced_weights(op, kind, in_mask, out_mask)
    return type(op).from_config(config), lambda new: new.set_weights(weights)


def _sliced_weights(layer, kind, in_mask, out_mask):
    """`layer`'s weights without its removed input and output channels (a None mask removes none)."""
    rows = in_mask if in_mask is None or kind != "separable" else np.repeat(in_mask, layer.depth_multiplier)
    out = []
    for w in layer.weights:
        a = _np(w)
        if kind in ("bn", "channelwise") or w.name == "bias":  # per output channel
            # (a PReLU alpha shared over the channel axis stays as it is)
            out.append(a if out_mask is None or a.shape[-1] != len(out_mask) else a[..., out_mask])
        elif kind == "depthwise" or w.name == "depthwise_kernel":  # (..., inputs, multiplier)
            out.append(a if in_mask is None else a[..., in_mask, :])
        else:  # kernel / pointwise_kernel: (..., inputs, outputs)
            out.append((a if rows is None else a[..., rows, :])[..., out_mask])
    return out


# ----- report -----------------------------------------------------------------------


def _total(values, combine=sum):
    values = list(values)
    return None if any(v is None for v in values) else combine(values)


def _arrow(before, after):
    f = (lambda v: "n/a" if v is None else f"{v:,}")  # noqa: E731
    return f(before) if before == after else f"{f(before)} -> {f(after)}"


def _macs(layer, role, in_shape, out_shape):
    """Multiply-accumulates of one call on one sample, or None (unknown dims or not a kernel layer)."""
    c_in, c_out, spatial = in_shape[-1], out_shape[-1], _total(out_shape[1:-1], math.prod)
    if spatial is None or c_in is None:
        return None
    if role == "dense":
        return spatial * c_in * c_out
    if not _channels_last(layer):
        return None
    taps = math.prod(layer.kernel_size)
    if role == "transpose":
        in_spatial = _total(in_shape[1:-1], math.prod)
        return None if in_spatial is None else in_spatial * taps * c_in * c_out
    if role == "depthwise":
        return spatial * taps * c_out
    if role == "separable":
        mid = c_in * layer.depth_multiplier
        return spatial * (taps * mid + mid * c_out)
    return spatial * taps * (c_in // layer.groups) * c_out


def _layer_stats(model):
    """{name: row fragment} for every layer with weights, in graph order."""
    graph = _graph.Graph(model)
    stats = {}
    for rec in graph.nodes:
        op = rec.op
        if not isinstance(op, keras.layers.Layer) or not op.weights:
            continue
        in_shape = graph.shape(rec.ins[0]) if rec.ins else ()
        out_shape = graph.shape(rec.outs[0])
        role = getattr(registry.lookup(op), "channel_role", None)  # subclasses too: MACs are an estimate
        macs = (_macs(op, role, in_shape, out_shape) if in_shape else None) if role in _KERNEL_ROLES else 0
        row = stats.get(op.name)
        if row is None:
            stats[op.name] = {
                "type": type(op).__name__, "in": _channel_dim(in_shape), "channels": _channel_dim(out_shape),
                "params": sum(math.prod(w.shape) for w in op.weights), "macs": macs,
            }
        elif row["macs"] is not None:  # a shared layer: every call computes
            row["macs"] = None if macs is None else row["macs"] + macs
    return stats


def _build_report(before, after, kept):
    b, a = _layer_stats(before), _layer_stats(after)
    missing = [name for name in b if name not in a]
    if missing:
        raise ValueError(
            f"`channel_report` matches layers by name, and {len(missing)} layer(s) of {before.name!r} are not in "
            f"{after.name!r}: {missing[:10]}. Compare a model with the result of `tfopt.prune_channels` on it "
            f"(which keeps every name). Received: pruned={after.name!r}"
        )
    rows = [
        {"name": name, "type": row["type"], **{f"{k}_{when}": s[name][k] for k in ("in", "channels", "params", "macs")
                                               for when, s in (("before", b), ("after", a))}}
        for name, row in b.items()
    ]  # fmt: skip
    return ChannelPruningReport(rows, before.count_params(), after.count_params(), kept)
