"""Structured (channel) pruning: `prune_channels` and `channel_report`.

Unstructured zeros shrink a download but not an int8 or Edge TPU model's
latency: the kernels stay dense. `prune_channels(model, ratio=0.5)` removes
whole output channels (filters) instead and returns a physically smaller,
ordinary Keras model: every layer that reads a removed channel is sliced to
match (the next Conv/Dense input rows, BatchNormalization parameters, biases,
depthwise channels, Reshape targets).

How channels are grouped. The Functional graph is walked node by node (nested
Sequential/Functional models are inlined; the result is one flat Functional
model). Every channel of every tensor is tracked as an *atom*, and atoms that
must keep the same index are merged (union-find):

- a Conv1D/2D/3D, Dense or SeparableConv1D/2D creates one new atom per output
  channel (these are the layers whose output channels are scored and removed);
- channel-preserving layers pass their input atoms through: BatchNormalization,
  PReLU, ReLU and other element-wise activations, Dropout and noise layers,
  pooling (global or not), ZeroPadding, Cropping, UpSampling, RepeatVector,
  element-wise ``keras.ops`` calls with scalar arguments (``x * 2.0``,
  ``ops.relu(x)``);
- a DepthwiseConv with multiplier m repeats each input atom m times: its m
  output channels per input channel are kept or removed with that input
  channel (for m = 1 its channels simply follow its input);
- Add, Subtract, Multiply, Maximum, Minimum, Average (layers or ops) merge the
  atoms of their inputs position by position: a residual block is one group;
- Concatenate on the channel axis concatenates its inputs' atoms (each input
  keeps its own slice of the output channels);
- Flatten and Reshape map atoms through the reshape: a channels-last Flatten
  of ``(h, w, c)`` repeats the c atoms h * w times, so the next Dense loses the
  rows ``p * c + k`` of every removed channel k. A Reshape that moves channels
  into another axis cannot be sliced and is refused.

A *group* is a set of merged channels together with every layer that holds
them. Channels that reach a model output, come from a model input or from a
layer not selected by ``filters`` are *pinned*: they keep their width, and
so do the channels tied to them. The other (*prunable*) channels of each group
are ranked by the group's summed importance and ``round((1 - ratio) * n)`` are
kept (at least one per layer). Importance: ``"l2"`` (default) or ``"l1"`` norm
of each output filter of the group's Conv/Dense/SeparableConv layers and
DepthwiseConv kernels, ``"bn_gamma"`` the |gamma| of the group's
BatchNormalization layers (network slimming; groups without one use "l2").
Each layer's scores are divided by their mean before summing, so that layers
of different scales count alike.

Decisions (measured by ``benchmarks/bench_channel_pruning.py``): pruning is
one-shot, then fine-tuning with a plain `fit` (on the MNIST recipe it lost
less accuracy than an iterative 25% -> 50% schedule with the same epochs);
"l2" is the default criterion (it beat "l1" and "bn_gamma" there); kept
widths follow the ratio exactly by default (``round_to=1``): on int8
XNNPACK, rounding to multiples of 4 or 8 kept up to 30% more MACs at no
extra latency, so ``round_to=8`` keeps capacity for free when an exact
ratio does not matter.

Validation happens before anything is built: a layer the walk cannot route
channels through (Lambda, custom or unsupported layers, a channel-mixing
Reshape, channels_first data formats, grouped convolutions) is an error only
if prunable channels reach it; the error lists every such layer once. The
user's model is only read.
"""

import dataclasses
import math

import keras
import numpy as np

from tfopt import _graph
from tfopt import _model_utils as mu

__all__ = ["CRITERIA", "ChannelPruningReport", "channel_report", "prune_channels"]

CRITERIA = ("l2", "l1", "bn_gamma")

L = keras.layers
_CONV = (L.Conv1D, L.Conv2D, L.Conv3D)
_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
_TRANSPOSE = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
_PRODUCERS = (*_CONV, *_SEPARABLE, L.Dense)
_CHANNELWISE = (L.BatchNormalization, L.PReLU)
# Weightless layers that keep the channel axis as it is.
_ELEMENTWISE = (
    L.ReLU, L.LeakyReLU, L.ELU, L.Dropout, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
    L.ActivityRegularization, L.Identity, L.RepeatVector,
)  # fmt: skip
# Weightless layers that keep the channel axis when it is the last one.
_SPATIAL = (
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
    L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D, L.Cropping2D, L.Cropping3D,
    L.UpSampling1D, L.UpSampling2D, L.UpSampling3D, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D,
)  # fmt: skip
_MERGE = (L.Add, L.Subtract, L.Multiply, L.Maximum, L.Minimum, L.Average)
# keras.ops operations (op nodes of a Functional graph), by class name.
_UNARY_OPS = {
    "Relu", "Relu6", "Sigmoid", "HardSigmoid", "Tanh", "Silu", "HardSilu", "Gelu", "Elu", "Selu", "LeakyRelu",
    "Softplus", "Softsign", "Absolute", "Negative", "Square", "Sqrt", "Exp", "Log", "Clip", "Cast", "Identity",
}  # fmt: skip
_BINARY_OPS = {"Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum", "Power"}
_MIXING_ACTIVATIONS = ("softmax", "log_softmax")
# The weights each sliced layer type may hold (anything else, e.g. LoRA or
# int8-quantized kernels, is refused rather than sliced wrongly).
_WEIGHT_NAMES = {
    "conv": {"kernel", "bias"},
    "dense": {"kernel", "bias"},
    "separable": {"depthwise_kernel", "pointwise_kernel", "bias"},
    "depthwise": {"kernel", "bias"},
    "bn": {"gamma", "beta", "moving_mean", "moving_variance"},
    "prelu": {"alpha"},
}


# ----- public API -----------------------------------------------------------------


def prune_channels(model, ratio, criterion="l2", filters=None, round_to=1, return_report=False):
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
        return_report: also return a `ChannelPruningReport` (with the kept
            channel indices of every layer in ``report.kept``).

    Returns:
        The pruned Functional model, or ``(model, report)`` with
        ``return_report=True``.

    Raises:
        TypeError: `model` is not a Keras model, or an argument has the wrong
            type.
        ValueError: `ratio`, `criterion` or `round_to` out of range; the model
            is subclassed, unbuilt, wrapped for pruning or QAT; prunable
            channels reach layers tfopt cannot slice (all listed once, with
            the fix); or `ratio` > 0 and no channel is prunable.

    Example:
        >>> model = tfopt.data.mnist_cnn()
        >>> model.compile("adam", "sparse_categorical_crossentropy")  # doctest: +SKIP
        >>> model.fit(x, y, epochs=8)  # doctest: +SKIP
        >>> small, report = tfopt.prune_channels(model, ratio=0.5, return_report=True)
        >>> print(report)  # doctest: +SKIP
        >>> small.compile("adam", "sparse_categorical_crossentropy"); small.fit(x, y, epochs=2)  # doctest: +SKIP
    """
    mu.check_model(model, "model", "prune_channels")
    _check_args(ratio, criterion, round_to, return_report)
    _check_not_wrapped(model)
    pick = mu.make_filter(filters)
    plan = _Plan(model, float(ratio), criterion, pick, round_to)
    unique = mu.name_allocator()
    name = model.name if model.name.endswith("_channel_pruned") else model.name + "_channel_pruned"
    pruned = plan.graph.rebuild(_graph.copier(lambda rec: _new_op(rec, plan, unique)), name, unique=unique)
    if return_report:
        return pruned, _build_report(model, pruned, plan.kept())
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
        ``report.to_dict()`` gives plain data.

    Raises:
        TypeError / ValueError: as `tfopt.prune_channels` for a bad model.
        ValueError: a layer with weights of `model` has no layer of the same
            name in `pruned`.

    Example:
        >>> small = tfopt.prune_channels(model, ratio=0.5)
        >>> print(tfopt.channel_report(model, small))  # doctest: +SKIP
    """
    mu.check_model(model, "model", "channel_report")
    if pruned is not None:
        mu.check_model(pruned, "pruned", "channel_report")
    return _build_report(model, model if pruned is None else pruned, None)


class ChannelPruningReport:
    """Channels, parameters and MACs per layer, before and after channel pruning.

    Attributes:
        rows: list of dicts with keys name, type, in_before, in_after,
            channels_before, channels_after (output channels), params_before,
            params_after, macs_before, macs_after (None where unknown).
        params_before, params_after: parameters of the whole models.
        macs_before, macs_after: MACs summed over the rows (None if any is
            unknown).
        kept: {layer name: indices of the original output channels it keeps}
            when the report comes from `prune_channels(..., return_report=True)`,
            else None.
    """

    def __init__(self, rows, params_before, params_after, kept=None):
        self.rows = rows
        self.params_before = params_before
        self.params_after = params_after
        self.macs_before = _sum_or_none(r["macs_before"] for r in rows)
        self.macs_after = _sum_or_none(r["macs_after"] for r in rows)
        self.kept = kept

    @property
    def params_ratio(self):
        """params_after / params_before."""
        return self.params_after / self.params_before if self.params_before else None

    @property
    def macs_ratio(self):
        """macs_after / macs_before (None if unknown)."""
        if not self.macs_before or self.macs_after is None:
            return None
        return self.macs_after / self.macs_before

    def to_dict(self):
        return {
            "layers": [dict(r) for r in self.rows],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_ratio,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
        }

    def __str__(self):
        header = ("layer", "type", "in", "out", "params", "MACs")
        lines = [
            (
                r["name"],
                r["type"],
                _arrow(r["in_before"], r["in_after"]),
                _arrow(r["channels_before"], r["channels_after"]),
                _arrow(r["params_before"], r["params_after"]),
                _arrow(r["macs_before"], r["macs_after"]),
            )
            for r in self.rows
        ]
        params, macs = _arrow(self.params_before, self.params_after), _arrow(self.macs_before, self.macs_after)
        total = ("total", "", "", "", params, macs)
        widths = [max(len(str(x[i])) for x in [header, total, *lines]) for i in range(len(header))]

        def fmt(cells):
            return "  ".join(
                str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        rule = "-" * (sum(widths) + 2 * (len(header) - 1))
        return "\n".join([fmt(header), rule, *map(fmt, lines), rule, fmt(total)])

    __repr__ = __str__


# ----- validation -------------------------------------------------------------------


def _check_args(ratio, criterion, round_to, return_report):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)):
        raise TypeError(
            "`ratio` must be a number in [0, 1): the fraction of each channel group's prunable channels to "
            f"remove, e.g. 0.5. Received: ratio={ratio!r} of type {type(ratio).__name__}"
        )
    if not (0.0 <= float(ratio) < 1.0):
        raise ValueError(
            "`ratio` must be in [0, 1): the fraction of each channel group's prunable channels to remove "
            f"(0 keeps every channel; 1 would remove them all), e.g. ratio=0.5. Received: ratio={ratio!r}"
        )
    if criterion not in CRITERIA:
        raise ValueError(
            f"`criterion` must be one of {CRITERIA}: 'l2'/'l1' rank channels by the norm of their filters, "
            f"'bn_gamma' by the |gamma| of their BatchNormalization. Received: criterion={criterion!r}"
        )
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise ValueError(
            "`round_to` must be a positive int: kept widths are rounded up to a multiple of it (1: no "
            f"rounding; 8 or 4 give SIMD-friendly widths). Received: round_to={round_to!r}"
        )
    if not isinstance(return_report, bool):
        raise TypeError(f"`return_report` must be True or False. Received: return_report={return_report!r}")


def _check_not_wrapped(model):
    from tfopt.pruning import PruneLowMagnitude
    from tfopt.qat_layers import QuantizeAnnotate, QuantizeLayer, QuantizeWrapper

    layers = _graph.sublayers(model)
    wrapped = [layer for layer in layers if isinstance(layer, PruneLowMagnitude)]
    if wrapped:
        raise ValueError(
            f"`prune_channels` got a model wrapped for magnitude pruning ({mu.describe(wrapped[0])}). Prune "
            "channels on the float model, then wrap the result: `tfopt.prune_low_magnitude(tfopt.prune_channels("
            "model, ratio))`; or strip the wrappers first with `tfopt.strip_pruning(model)`. "
            f"Received: model={model.name!r}"
        )
    quantized = [layer for layer in layers if isinstance(layer, (QuantizeWrapper, QuantizeLayer, QuantizeAnnotate))]
    if quantized:
        raise ValueError(
            f"`prune_channels` got a model prepared for quantization-aware training ({mu.describe(quantized[0])}). "
            "Prune channels on the float model first, then quantize the result: "
            "`tfopt.quantize_model(tfopt.prune_channels(model, ratio))`. "
            f"Received: model={model.name!r}"
        )


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
    op = rec.op
    t = type(op)
    in_rank = len(shape(rec.ins[0])) if rec.ins else 0

    def barrier(reason):
        rec.kind, rec.reason = "barrier", reason

    if isinstance(op, keras.Model):
        return barrier("is a subclassed model nested in the graph; tfopt cannot see its layers")
    if not isinstance(op, keras.layers.Layer):
        name = t.__name__
        if not t.__module__.startswith("keras.src.ops"):
            return barrier("is a custom operation")
        if not _scalar_arguments(rec):
            return barrier("is called with non-scalar constant arguments")
        if name in _UNARY_OPS and len(rec.ins) == 1:
            rec.kind = "pass"
        elif name in _BINARY_OPS:
            rec.kind = "merge"
        else:
            barrier(f"is the operation `{name}`, which may mix or select channels")
        return
    if not _channels_last(op) and (t in (*_CONV, *_SEPARABLE, *_DEPTHWISE, *_SPATIAL) or (t is L.Flatten and in_rank > 2)):
        return barrier("uses data_format='channels_first' (only channels_last is sliced)")
    if t in _CONV:
        if op.groups != 1:
            return barrier(f"is a grouped convolution (groups={op.groups})")
        rec.kind = "conv"
    elif t is L.Dense:
        rec.kind = "dense"
    elif t in _SEPARABLE:
        rec.kind = "separable"
    elif t in _DEPTHWISE:
        rec.kind = "depthwise"
    elif t is L.BatchNormalization:
        axis = op.axis if isinstance(op.axis, int) else (op.axis[0] if len(op.axis) == 1 else None)
        if axis is None or axis % in_rank != in_rank - 1:
            return barrier(f"normalizes axis {op.axis!r}, not the last (channel) axis")
        rec.kind = "bn"
    elif t is L.PReLU:
        rec.kind = "prelu"
    elif t in _ELEMENTWISE:
        rec.kind = "pass"
    elif t is L.Activation:
        if getattr(op.activation, "__name__", "") in _MIXING_ACTIVATIONS:
            return barrier("is a softmax over the channel axis")
        rec.kind = "pass"
    elif t is L.Rescaling:
        if np.ndim(op.scale) or np.ndim(op.offset):
            return barrier("has a per-channel scale or offset")
        rec.kind = "pass"
    elif t in _SPATIAL:
        rec.kind = "pass"
    elif t in _MERGE:
        rec.kind = "merge"
    elif t is L.Concatenate:
        out_rank = len(shape(rec.outs[0]))
        rec.kind = "concat" if op.axis % out_rank == out_rank - 1 else "merge"
    elif t is L.Flatten:
        rec.kind = "reshape"
    elif t is L.Reshape:
        rec.kind = "reshape"
    elif t is L.Permute:
        if op.dims[-1] != len(op.dims):
            return barrier(f"moves the channel axis (dims={op.dims})")
        rec.kind = "pass"
    elif t is L.Softmax:
        barrier("is a softmax over the channel axis")
    elif op.weights:
        barrier("is a layer type whose weights tfopt cannot slice")
    else:
        barrier("is a layer type tfopt does not know how channels flow through")
    if rec.kind in _WEIGHT_NAMES:
        unknown = sorted({w.name for w in op.weights} - _WEIGHT_NAMES[rec.kind])
        if unknown:
            barrier(f"has weights tfopt cannot slice ({unknown}; e.g. LoRA or quantized kernels)")


def _scalar_arguments(rec):
    leaves = keras.tree.flatten(rec.arguments)
    return all(
        isinstance(x, keras.KerasTensor) or x is None or isinstance(x, (bool, int, float, str, np.number))
        for x in leaves
    )


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
        roots = np.asarray(self.parent, dtype=np.int64)
        while True:
            nxt = roots[roots]
            if np.array_equal(nxt, roots):
                return roots
            roots = nxt


def _channel_dim(shape):
    """Static size of the channel (last) axis of a per-sample shape with batch, or None."""
    return shape[-1] if len(shape) >= 2 and shape[-1] is not None else None


def _reshape_atoms(atoms, in_shape, out_shape):
    """Atoms of a reshape's output channel axis, "unknown" or "mixes" if they cannot be traced."""
    in_s, out_s = in_shape[1:], out_shape[1:]
    if not out_s or any(d is None for d in (*in_s, *out_s)):
        return "unknown"
    elements = np.broadcast_to(atoms, in_s).reshape(-1)
    rows = elements.reshape(-1, out_s[-1])
    # Every output position must see the same channel pattern along the last
    # axis: then slicing before or after the reshape keeps the same elements.
    if rows.shape[0] > 1 and not (rows == rows[0]).all():
        return "mixes"
    return rows[0].copy()


class _Plan:
    """The whole pruning decision, computed (and validated) before anything is built."""

    def __init__(self, model, ratio, criterion, pick, round_to):
        self.model = model
        graph = self.graph = _graph.Graph(model, _Rec)
        uf = self.uf = _UnionFind()
        atoms = self.atoms = {}
        for c in graph.inputs:
            n = _channel_dim(graph.shape(c))
            atoms[c] = None if n is None else uf.new(n)
            uf.pin(atoms[c])

        self.layer_in = {}  # id(layer) -> atoms of its (first call's) input
        self.layer_out = {}  # id(producer) -> its output atoms
        self.members = []  # (kind, layer, atoms, scores by criterion)
        self.selected_producers = []
        checks = []  # (rec, [input atoms]) that must hold no prunable channel
        for rec in graph.nodes:
            _classify(rec, graph.shape)
            selected = pick is None or bool(pick(rec.op))
            ins = [atoms[c] for c in rec.ins]
            outs = self._route(rec, ins, selected, checks)
            for c, a in zip(rec.outs, outs):
                atoms[c] = a
        for c in graph.outputs:
            uf.pin(atoms[c])

        roots = self.roots = uf.roots()
        pinned = np.zeros(len(roots), dtype=bool)
        if uf.pinned:
            pinned[roots[np.concatenate(uf.pinned)]] = True
        self.pinned = pinned

        errors = []
        for rec, ins in checks:
            free = [a for a in ins if a is not None and not pinned[roots[a]].all()]
            if free:
                errors.append((rec, self._feeders(np.concatenate(free))))
        if errors:
            raise ValueError(_barrier_message(errors, model))
        if ratio > 0 and not any(not pinned[roots[a]].all() for _, _, a, _ in self.members):
            raise ValueError(
                f"`prune_channels` found no prunable channel in model {model.name!r}: every channel group reaches a "
                "model output, comes from a model input or is tied to a layer left at its width by `filters`. "
                "Prune a model with hidden Conv/Dense/SeparableConv layers, or widen `filters`. "
                f"Received: ratio={ratio}, filters selecting {[l.name for l in self.selected_producers]}"
            )
        self.keep = self._select(ratio, criterion, round_to)

    # -- walk ----------------------------------------------------------------------

    def _route(self, rec, ins, selected, checks):
        """Output atoms of one node; records members, ties and checks on the way."""
        uf, kind, op, shape = self.uf, rec.kind, rec.op, self.graph.shape
        x = ins[0] if ins else None
        if kind in ("conv", "dense", "separable", "depthwise", "bn", "prelu"):
            self._tie_shared_input(op, x)
        if kind in ("conv", "dense", "separable"):
            if id(op) not in self.layer_out:
                out = uf.new(shape(rec.outs[0])[-1])
                self.layer_out[id(op)] = out
                if selected:
                    self.selected_producers.append(op)
                    self.members.append((kind, op, out, _filter_scores(op, kind)))
                else:
                    uf.pin(out)
            return [self.layer_out[id(op)]]
        if kind == "depthwise":
            if not any(m[1] is op for m in self.members) and x is not None:
                self.members.append((kind, op, x, _filter_scores(op, kind)))
            return [None if x is None else np.repeat(x, op.depth_multiplier)]
        if kind in ("bn", "prelu"):
            if kind == "bn" and x is not None and not any(m[1] is op for m in self.members):
                self.members.append((kind, op, x, {"bn_gamma": _bn_scores(op)}))
            return [x]
        if kind == "pass":
            return [x]
        if kind == "merge":
            width = _channel_dim(shape(rec.outs[0]))
            tensors = [a for a in ins if a is not None]
            if width is None or len(tensors) != len(ins):
                checks.append((rec, tensors))
                return [self._fresh(rec.outs[0])]
            full = [a for a in tensors if len(a) == width]
            for a in tensors:
                if len(a) != width:  # broadcast along channels: its width (1) cannot change
                    uf.pin(a)
            for a in full[1:]:
                uf.union(full[0], a)
            return [full[0]]
        if kind == "concat":
            if any(a is None for a in ins):
                checks.append((rec, [a for a in ins if a is not None]))
                return [self._fresh(rec.outs[0])]
            return [np.concatenate(ins)]
        if kind == "reshape":
            if x is None:
                return [self._fresh(rec.outs[0])]
            out = _reshape_atoms(x, shape(rec.ins[0]), shape(rec.outs[0]))
            if isinstance(out, str):
                rec.reason = (
                    "reshapes a tensor of unknown size" if out == "unknown" else "moves channels into another axis"
                )
                if selected:
                    checks.append((rec, [x]))
                else:
                    uf.pin(x)
                rec.kind = "barrier"
                return [self._fresh(c) for c in rec.outs]
            return [out]
        # A barrier: its outputs are new, pinned channels; its inputs must not
        # lose channels (an error below), unless `filters` leaves it alone.
        if selected:
            checks.append((rec, [a for a in ins if a is not None]))
        else:
            for a in ins:
                uf.pin(a)
        return [self._fresh(c) for c in rec.outs]

    def _fresh(self, c):
        n = _channel_dim(self.graph.shape(c))
        if n is None:
            return None
        atoms = self.uf.new(n)
        self.uf.pin(atoms)
        return atoms

    def _tie_shared_input(self, op, x):
        if x is None:
            return
        first = self.layer_in.setdefault(id(op), x)
        if first is not x and len(first) == len(x):
            self.uf.union(first, x)

    def _feeders(self, atoms):
        """Names of the selected producers whose prunable channels are among `atoms`."""
        classes = set(self.roots[atoms][~self.pinned[self.roots[atoms]]].tolist())
        return [
            layer.name
            for kind, layer, a, _ in self.members
            if kind in ("conv", "dense", "separable") and classes.intersection(self.roots[a].tolist())
        ]

    # -- selection -----------------------------------------------------------------

    def _select(self, ratio, criterion, round_to):
        """Per-root keep flags: pinned channels, plus the best of each group's prunable ones."""
        roots, pinned = self.roots, self.pinned
        keep = pinned.copy()
        # Groups: the classes held together by a layer (union over each member's classes).
        group = {}

        def gfind(c):
            while group.setdefault(c, c) != c:
                group[c] = group[group[c]]
                c = group[c]
            return c

        for _, _, a, _ in self.members:
            cls = np.unique(roots[a]).tolist()
            for c in cls[1:]:
                ra, rb = gfind(cls[0]), gfind(c)
                if ra != rb:
                    group[max(ra, rb)] = min(ra, rb)
        by_group = {}
        for kind, layer, a, scores in self.members:
            by_group.setdefault(gfind(int(roots[a[0]])), []).append((kind, a, scores))

        for members in by_group.values():
            classes = np.unique(np.concatenate([roots[a] for _, a, _ in members]))
            free = classes[~pinned[classes]]
            if not len(free):
                continue
            use_bn = criterion == "bn_gamma" and any(kind == "bn" for kind, _, _ in members)
            key = "bn_gamma" if use_bn else ("l2" if criterion == "bn_gamma" else criterion)
            score = np.zeros(len(roots))
            for kind, a, scores in members:
                s = scores.get(key)
                if s is None or (use_bn and kind != "bn"):
                    continue
                mean = float(np.mean(s))
                np.add.at(score, roots[a], s / mean if mean > 0 else s)
            n_pinned = len(classes) - len(free)
            n_keep = _n_keep(len(free), n_pinned, ratio, round_to)
            order = free[np.argsort(-score[free], kind="stable")]
            keep[order[:n_keep]] = True

        # Every layer keeps at least one output channel (its best one).
        for kind, layer, a, scores in self.members:
            if kind in ("conv", "dense", "separable") and not keep[roots[a]].any():
                s = scores.get("l2")
                keep[roots[a][int(np.argmax(s))]] = True
        return keep

    def mask(self, atoms):
        return self.keep[self.roots[atoms]]

    def kept(self):
        """{layer name: kept output-channel indices} for every sliced layer."""
        out = {}
        for rec in self.graph.nodes:
            if rec.kind in ("conv", "dense", "separable", "depthwise", "bn", "prelu"):
                a = self.atoms[rec.outs[0]]
                if a is not None and rec.op.name not in out:
                    out[rec.op.name] = np.flatnonzero(self.mask(a))
        return out


def _n_keep(n_free, n_pinned, ratio, round_to):
    keep = int(math.floor((1.0 - ratio) * n_free + 0.5))
    if n_pinned == 0:
        keep = max(keep, 1)
    total = n_pinned + keep
    if round_to > 1:
        total = min(n_pinned + n_free, -(-total // round_to) * round_to)
    return total - n_pinned


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v))


def _norms(kernel2d):
    """{'l2': ..., 'l1': ...} norms of the columns of a 2-D array."""
    k = kernel2d.astype(np.float64)
    return {"l2": np.sqrt(np.sum(k * k, axis=0)), "l1": np.sum(np.abs(k), axis=0)}


def _filter_scores(layer, kind):
    if kind == "separable":
        k = _np(layer.pointwise_kernel)
        return _norms(k.reshape(-1, k.shape[-1]))
    k = _np(layer.kernel)
    if kind == "depthwise":  # (..., channels, multiplier): one score per input channel
        c, m = k.shape[-2], k.shape[-1]
        per_output = _norms(k.reshape(-1, c * m))
        return {name: s.reshape(c, m).sum(axis=1) for name, s in per_output.items()}
    return _norms(k.reshape(-1, k.shape[-1]))


def _bn_scores(bn):
    if bn.scale:
        return np.abs(_np(bn.gamma)).astype(np.float64)
    return np.ones(int(bn.moving_mean.shape[0]))


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
    config = op.get_config()
    config["name"] = unique(op.name)
    if type(op) is L.Lambda:
        # from_config would refuse a Python lambda in safe mode; the function object is the user's own.
        new = L.Lambda(
            op.function, output_shape=op._output_shape, mask=op.mask, arguments=op.arguments, name=config["name"]
        )
        return new, None
    x = plan.atoms[rec.ins[0]] if rec.ins else None
    in_mask = None if x is None else plan.mask(x)
    weights = None
    if kind in ("conv", "dense", "separable"):
        out_mask = plan.mask(plan.layer_out[id(op)])
        config["units" if kind == "dense" else "filters"] = int(out_mask.sum())
        weights = _slice_producer(op, kind, in_mask, out_mask)
    elif kind == "depthwise":
        weights = _slice_depthwise(op, in_mask)
    elif kind in ("bn", "prelu"):
        weights = [_slice_last(_np(w), in_mask) for w in op.weights]
    elif kind == "reshape" and isinstance(op, L.Reshape):
        out_shape = plan.graph.shape(rec.outs[0])
        config["target_shape"] = (*out_shape[1:-1], int(plan.mask(plan.atoms[rec.outs[0]]).sum()))
    return type(op).from_config(config), None if weights is None else (lambda new: new.set_weights(weights))


def _slice_last(array, mask):
    if mask is None or array.shape[-1] != len(mask):  # e.g. a PReLU alpha shared over channels
        return array
    return array[..., mask]


def _slice_producer(layer, kind, in_mask, out_mask):
    out = []
    for w in layer.weights:
        a = _np(w)
        if w.name == "bias":
            a = a[out_mask]
        elif w.name == "depthwise_kernel":
            a = a if in_mask is None else a[..., in_mask, :]
        else:  # kernel / pointwise_kernel: (..., inputs, outputs)
            if in_mask is not None:
                rows = np.repeat(in_mask, layer.depth_multiplier) if kind == "separable" else in_mask
                a = a[..., rows, :]
            a = a[..., out_mask]
        out.append(a)
    return out


def _slice_depthwise(layer, in_mask):
    if in_mask is None:
        return None
    out = []
    for w in layer.weights:
        a = _np(w)
        out.append(a[np.repeat(in_mask, layer.depth_multiplier)] if w.name == "bias" else a[..., in_mask, :])
    return out


# ----- report -----------------------------------------------------------------------


def _sum_or_none(values):
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _arrow(before, after):
    if before is None and after is None:
        return "n/a"
    f = (lambda v: "n/a" if v is None else f"{v:,}")  # noqa: E731
    return f(before) if before == after else f"{f(before)} -> {f(after)}"


def _prod(dims):
    return None if any(d is None for d in dims) else math.prod(dims)


def _macs(layer, in_shape, out_shape):
    """Multiply-accumulates of one call on one sample, or None (unknown dims or not a kernel layer)."""
    t = type(layer)
    c_in, c_out = in_shape[-1], out_shape[-1]
    if t is L.Dense:
        rows = _prod(out_shape[1:-1])
        return None if rows is None or c_in is None else rows * c_in * c_out
    if not isinstance(layer, (*_CONV, *_DEPTHWISE, *_SEPARABLE, *_TRANSPOSE)) or not _channels_last(layer):
        return None
    spatial = _prod(out_shape[1:-1])
    taps = math.prod(layer.kernel_size)
    if spatial is None or c_in is None:
        return None
    if isinstance(layer, _TRANSPOSE):
        in_spatial = _prod(in_shape[1:-1])
        return None if in_spatial is None else in_spatial * taps * c_in * c_out
    if isinstance(layer, _DEPTHWISE):
        return spatial * taps * c_out
    if isinstance(layer, _SEPARABLE):
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
        macs = _macs(op, in_shape, out_shape) if in_shape else None
        row = stats.get(op.name)
        if row is None:
            stats[op.name] = {
                "type": type(op).__name__,
                "in": _channel_dim(in_shape) if in_shape else None,
                "out": _channel_dim(out_shape),
                "params": sum(math.prod(w.shape) for w in op.weights),
                "macs": macs,
                "kernel": macs is not None or isinstance(op, (*_PRODUCERS, *_DEPTHWISE, *_TRANSPOSE)),
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
    rows = []
    for name, rb in b.items():
        ra = a[name]
        rows.append(
            {
                "name": name,
                "type": rb["type"],
                "in_before": rb["in"],
                "in_after": ra["in"],
                "channels_before": rb["out"],
                "channels_after": ra["out"],
                "params_before": rb["params"],
                "params_after": ra["params"],
                "macs_before": rb["macs"] if rb["kernel"] else 0,
                "macs_after": ra["macs"] if ra["kernel"] else 0,
            }
        )
    return ChannelPruningReport(rows, before.count_params(), after.count_params(), kept)
