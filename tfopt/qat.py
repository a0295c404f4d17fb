"""Quantization-aware training: `quantize_model`, `quantize_annotate_*`, `quantize_apply`.

`quantize_model(model)` returns a new model whose forward pass computes what the int8 TFLite kernels will compute,
so that ``tfopt.tflite_export.convert(qat_model)`` gives a fully-int8 graph (int8 I/O, int8 tensors, int32 biases,
no QUANTIZE/DEQUANTIZE inside) that agrees with the Keras model to within one output quantization step.

How the model is rebuilt. The Functional graph is walked node by node (nested Sequential/Functional models are
inlined, so the result is one flat Functional model) and each node is planned as one of:

- a *kernel* layer (its `tfopt.registry` row has ``qat_role="kernel"``: Conv, DepthwiseConv, SeparableConv,
  ConvTranspose, Dense, EinsumDense, layers registered with ``quantizable=``): `QuantizeWrapper`, symmetric int8
  weights, per channel along the row's `quant_axis` (the row says why some are per tensor); a BatchNormalization
  that is its only consumer is folded into it (the BN node disappears from the graph) when the wrapper recomputes
  the layer (a row with a `qat_forward`);
- a *compute* node (Add, Multiply, Subtract, Concatenate, GlobalAveragePooling, Activation, ReLU, Softmax,
  Rescaling, op nodes such as ``x + 3.0``, any other weightless layer or op without a row): runs unchanged, output
  fake-quantized;
- a *composite* layer (any other layer with weights: MultiHeadAttention, LayerNormalization, GroupNormalization,
  Embedding, keras-hub's TransformerEncoder and embeddings, a user's layer with weights or sub-layers; and an Add
  or Multiply of more than two inputs): `tfopt.qat_composite.QuantizeComposite` runs it in its int8 form with a
  fake quant on every tensor the int8 file will hold (its sub-layers' weights and outputs, its own weights, the
  intermediate tensors of attention, normalization and masked softmax). Recurrent layers, and layers holding one
  or a BatchNormalization, are refused;
- a *same-scale* node (``qat_role="same_scale"``: Reshape, Flatten, Dropout, Max/AveragePooling, ZeroPadding,
  UpSampling, Cropping, Permute, ...): copied, no fake quant, because TFLite requires its output scale to equal its
  input scale.

Fusion matches the converter: a producer (a kernel layer with a linear activation, or a ``qat_role="fuses_relu"``
node: Add, Subtract) whose only consumer is a ReLU/ReLU6 (layer or Activation) gets no output quantizer: TFLite
fuses the activation into the op, so the only int8 tensor is after the ReLU. A producer whose only consumer is a
``qat_role="concat"`` node (Concatenate) gets none either: the concat output's range is the one range all its
inputs share (TFLite's CONCATENATION wants equal scales; separate ranges would add a requantize op).
Every model input gets a `QuantizeLayer`, which becomes the int8 input scale.

Pruned models: a `PruneLowMagnitude`-wrapped model is stripped first; every quantized weight that has exact zeros
gets a mask (``w != 0``, taken when its wrapper is built, saved with the model) applied before fake quant, so the
zeros survive QAT and appear as zeros in the int8 weights.

Clustered models (cluster-preserving QAT, `preserve_clusters`): a model with `tfopt.ClusterWeights` layers is
stripped first, and every quantized kernel that was clustered is clustered again in the QAT model (its at most
`number_of_clusters` distinct values are the centroids, trained by fixed indices; see `tfopt.qat_layers` for the
int8 ranges that keep them). A stripped clustered model has lost the wrapper: pass ``preserve_clusters=k`` and
every quantized kernel with at most ``k`` distinct values is treated as clustered. A clustered layer that is not
quantized (left float by `filters`, or not a kernel layer) becomes its stripped copy and trains freely.

Validation happens before anything is built: the user's model is only read.
"""

import dataclasses

import keras
import numpy as np

from tfopt import _checks, _graph, _wrappers, registry
from tfopt import _model_utils as mu
from tfopt.clustering import ClusterWeights
from tfopt.pruning import PruneLowMagnitude, strip_pruning
from tfopt.qat_composite import QuantizeComposite, quantized_weights
from tfopt.qat_layers import (
    QuantizeAnnotate, QuantizeConfig, QuantizeLayer, QuantizeWrapper, _check_options, fused_activation, relu_kind,
)

__all__ = [
    "quantize_model",
    "quantize_annotate_layer",
    "quantize_annotate_model",
    "quantize_apply",
    "is_quantized_model",
]

_SCHEMES = ("8bit",)


# ----- public helpers ------------------------------------------------------------


def is_quantized_model(model):
    """True when `model` (or a model nested in it) contains tfopt QAT layers.

    `tfopt.tflite_export.convert` uses it to convert without representative
    data (the fake-quant ranges give every scale).
    """
    kinds = (QuantizeWrapper, QuantizeLayer, QuantizeComposite)
    return isinstance(model, keras.Model) and bool(_wrappers.find(model, kinds, include_self=False))


def quantize_annotate_layer(layer, quantize_config=None):
    """Marks `layer` for quantization by `tfopt.quantize_apply`.

    Args:
        layer: a `keras.layers.Layer` (not yet called, e.g. inside a
            Sequential list or before a Functional call).
        quantize_config: a `tfopt.QuantizeConfig` saying how to quantize a
            layer tfopt has no row for; None for tfopt's default.

    Returns:
        A `tfopt.QuantizeAnnotate` wrapping `layer` (computes exactly like it).

    Raises:
        TypeError: `layer` is not a layer or `quantize_config` is not a
            `QuantizeConfig`.

    Example:
        >>> model = keras.Sequential([keras.Input((4,)),
        ...     tfopt.quantize_annotate_layer(keras.layers.Dense(3)), keras.layers.Dense(2)])
        >>> qat = tfopt.quantize_apply(model)
    """
    if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.Model):
        raise TypeError(
            "`quantize_annotate_layer` takes a single keras layer (use `tfopt.quantize_annotate_model` "
            f"for a model). Received: layer={layer!r} of type {type(layer).__name__}"
        )
    if isinstance(layer, (QuantizeAnnotate, QuantizeWrapper, QuantizeLayer)):
        raise ValueError(f"Layer {mu.describe(layer)} is already annotated or quantized. Received: layer={layer!r}")
    if quantize_config is not None and not isinstance(quantize_config, QuantizeConfig):
        raise TypeError(
            "`quantize_config` must be a tfopt.QuantizeConfig instance (subclass it to say how a custom layer "
            f"is quantized). Received: quantize_config={quantize_config!r} for layer {mu.describe(layer)}"
        )
    return QuantizeAnnotate(layer, quantize_config=quantize_config, name=f"annotate_{layer.name}")


def quantize_annotate_model(model):
    """Returns a copy of `model` with every layer annotated for `tfopt.quantize_apply`.

    `tfopt.quantize_apply(tfopt.quantize_annotate_model(m))` equals
    `tfopt.quantize_model(m)`. Layers already annotated keep their config.

    Raises:
        TypeError / ValueError: as `tfopt.quantize_model`.
    """
    mu.check_model(model, "model", "quantize_annotate_model")
    _refuse_quantized(model, "quantize_annotate_model")

    def clone_function(layer):
        new = type(layer).from_config(layer.get_config())
        if isinstance(layer, keras.layers.Layer) and not isinstance(layer, QuantizeAnnotate):
            return QuantizeAnnotate(new, name=f"annotate_{layer.name}")
        return new

    annotated = keras.models.clone_model(model, clone_function=clone_function, recursive=False)
    annotated.set_weights(model.get_weights())
    return annotated


def quantize_apply(model, scheme="8bit", ema_decay=0.99, freeze_bn_delay=None, preserve_sparsity=None,
                   preserve_clusters=None):
    """Quantizes the layers of `model` wrapped by `tfopt.quantize_annotate_layer`.

    Layers that are not annotated stay float; a float tensor read by a
    quantized layer gets a `QuantizeLayer`. The arguments are those of
    `tfopt.quantize_model`.

    Returns:
        A new model (`model` is not modified).

    Raises:
        ValueError: no layer is annotated, or as `tfopt.quantize_model`.
    """
    mu.check_model(model, "model", "quantize_apply")
    if not _wrappers.find(model, QuantizeAnnotate, include_self=False):
        raise ValueError(
            "`quantize_apply` found no annotated layer: wrap the layers to quantize with "
            "`tfopt.quantize_annotate_layer(layer)` (or the whole model with `tfopt.quantize_annotate_model`), "
            f"or use `tfopt.quantize_model`. Received: model={model.name!r}"
        )
    return _quantize(model, "quantize_apply", scheme, None, True, ema_decay, freeze_bn_delay, preserve_sparsity,
                     preserve_clusters)


def quantize_model(
    model, scheme="8bit", filters=None, ema_decay=0.99, freeze_bn_delay=None, preserve_sparsity=None,
    preserve_clusters=None,
):
    """Returns a quantization-aware copy of `model` (8-bit, as the int8 TFLite kernels compute).

    Train it with `fit` as usual, then export it with
    ``tfopt.tflite_export.convert(qat_model)``. See the module docstring for
    what each layer becomes. `model` is never modified.

    Args:
        model: a built Sequential or Functional model (nested models are
            inlined), float or pruned (wrapped in `tfopt.PruneLowMagnitude`
            or stripped).
        scheme: ``"8bit"`` (int8 weights symmetric per channel, per tensor for
            Dense; int8 activations asymmetric per tensor).
        filters: None to quantize every layer, or a regex on layer names, a
            list of them, or ``fn(layer) -> bool``: only matching layers are
            quantized (the rest stay float; use it to leave out a layer tfopt
            cannot quantize).
        ema_decay: decay of the moving-average activation ranges, in [0, 1).
            Ranges start from the first training batch.
        freeze_bn_delay: training steps after which folded BatchNormalization
            layers stop using batch statistics. None: never.
        preserve_sparsity: keep exact-zero weights at zero through QAT. None
            (default): for every weight that has zeros.
        preserve_clusters: cluster-preserving QAT (see the module
            docstring). None (default): for the kernels of
            `tfopt.ClusterWeights` layers, if the model has any (a model
            without them is quantized exactly as before). True: the same,
            but the model must have `ClusterWeights` layers. An int ``k >= 2``:
            also every other quantized kernel with at most ``k`` distinct
            values (a stripped clustered model); at least one must be found.
            False: never (a clustered model is stripped and its kernels
            train freely).

    Returns:
        A new Functional model.

    Raises:
        TypeError: `model` is not a Keras model, or a bad argument type.
        ValueError: the model is subclassed, unbuilt or already quantized,
            or has layers with weights tfopt cannot quantize (all listed
            once, with the fix), or a `QuantizeConfig` returns weights that
            do not belong to its layer.

    Example:
        >>> model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(4, 3),
        ...     keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Flatten(),
        ...     keras.layers.Dense(10)])
        >>> qat = tfopt.quantize_model(model)
        >>> qat.compile("adam", "mse"); qat.fit(x, y)  # doctest: +SKIP
        >>> tflite = tfopt.tflite_export.convert(qat)  # doctest: +SKIP
    """
    mu.check_model(model, "model", "quantize_model")
    return _quantize(model, "quantize_model", scheme, filters, False, ema_decay, freeze_bn_delay, preserve_sparsity,
                     preserve_clusters)


# ----- validation -------------------------------------------------------------------


def _refuse_quantized(model, fn_name):
    _wrappers.refuse(
        model, (QuantizeWrapper, QuantizeLayer, QuantizeComposite),
        f"`{fn_name}` got a model that is already quantized (it has {{layers}}). Quantize the float model once; to "
        "change the scheme, start again from the float model. Received: model={model}",
    )


def _check_config_weights(layer, quantize_config):
    """Error message if `quantize_config` names a weight `layer` does not have, or one twice, else None."""
    pairs = list(quantize_config.get_weights_and_quantizers(layer))
    own, seen = {id(v) for v in layer.weights}, set()
    for pair in pairs:
        var = pair[0] if isinstance(pair, (tuple, list)) and len(pair) == 2 else None
        if isinstance(var, str):
            try:
                var = registry.weight_at(layer, var)
            except AttributeError:
                var = None
        if id(var) not in own or id(var) in seen:
            return (
                f"{mu.describe(layer)}: its {type(quantize_config).__name__}.get_weights_and_quantizers returned "
                f"{len(pairs)} entries but the layer has {len(layer.weights)} weights "
                f"({[w.name for w in layer.weights]}); each entry must be a distinct (weight of this layer, "
                "Quantizer) pair"
            )
        seen.add(id(var))
    return None


# ----- plan -------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Rec(_graph.Node):
    """One node of the flattened graph, with its QAT plan."""

    kind: str = None  # "kernel", "composite", "compute", "same", "float", "bn", "folded"
    config: object = None  # a QuantizeConfig from an annotation
    bn: object = None  # the folded BatchNormalization layer
    quantize_output: bool = True
    selected: bool = False


def _unwrap(op):
    return op.layer if isinstance(op, QuantizeAnnotate) else op


def _plan(model, filters, annotated_only):
    """The flattened graph of `model`, each node planned (kind, fusion, folded BN); validates."""
    graph = _graph.Graph(model, _Rec)
    records, producer, only_consumer = graph.nodes, graph.producer, graph.only_consumer
    pick = mu.make_filter(filters)

    unsupported, errors = [], []
    for rec in records:
        op, annotated = _unwrap(rec.op), isinstance(rec.op, QuantizeAnnotate)
        if not isinstance(op, keras.layers.Layer):
            continue  # op nodes are decided below, from their inputs
        rec.config = config = rec.op.quantize_config if annotated else None
        rec.selected = annotated if annotated_only else (pick is None or bool(pick(op)))
        if not rec.selected:
            rec.kind = "float"
        elif config is not None:
            msg = _check_config_weights(op, config)
            if msg:
                errors.append(msg)
            rec.kind = "compute"
        elif isinstance(op, keras.layers.BatchNormalization):
            rec.kind = "bn"
        elif _role(op) == "kernel":
            rec.kind = "kernel"
        elif op.weights and _composite(op) or isinstance(op, _CHAINS) and len(rec.ins) > 2:
            rec.kind = "composite"
        elif op.weights:
            unsupported.append(op)
        else:
            rec.kind = "same" if _role(op) == "same_scale" else "compute"
    if pick is not None and not annotated_only and not any(rec.selected for rec in records):
        raise ValueError(
            f"`filters` selected no layer of model {model.name!r} to quantize. Check the names (model.summary()) "
            f"or the predicate. Received: filters={filters!r}"
        )

    # Fold BatchNormalization into the kernel layer that feeds only it.
    for rec in [r for r in records if r.kind == "bn"]:
        bn = _unwrap(rec.op)
        src = producer(rec.ins[0]) if len(rec.ins) == 1 else None
        src_layer = _unwrap(src.op) if src is not None else None
        axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
        rank = len(graph.shape(rec.ins[0]))
        if (
            src is not None
            and src.kind == "kernel"
            and src.bn is None
            and registry.lookup(src_layer).qat_forward is not None
            and getattr(src_layer, "data_format", "channels_last") == "channels_last"
            and fused_activation(src_layer) == "linear"
            and axis is not None
            and axis % rank == rank - 1
            and only_consumer(src, rec)
        ):
            src.bn = bn
            rec.kind = "folded"
        else:
            unsupported.append(bn)

    if unsupported or errors:
        raise ValueError(_unsupported_message(unsupported, errors, model))

    # Op nodes: quantized when every input is produced inside the quantized region.
    for rec in [r for r in records if r.kind is None]:
        srcs = [producer(c) for c in rec.ins]
        inside = all(s is None and not annotated_only or (s is not None and s.selected) for s in srcs)
        rec.selected = inside and (pick is None or annotated_only)
        rec.kind = "float" if not rec.selected else "same" if _role(rec.op) == "same_scale" else "compute"

    # Fusion with a following ReLU, and shared ranges into Concatenate.
    for rec in [r for r in records if r.selected]:
        op = _unwrap(rec.op)
        if relu_kind(op) and len(rec.ins) == 1:
            direct = producer(rec.ins[0])  # a folded BN passes its producer's tensor through
            src = producer(direct.ins[0]) if direct is not None and direct.kind == "folded" else direct
            if src is not None and only_consumer(direct, rec) and src.selected and _fuses_relu(src):
                src.quantize_output = False
        if _role(op) == "concat":
            for c in rec.ins:
                src = producer(c)
                if src is not None and src.selected and src.kind in ("kernel", "compute") and only_consumer(src, rec):
                    src.quantize_output = False
    return graph


_CHAINS = (keras.layers.Add, keras.layers.Multiply)  # more than two inputs: one int8 op per pair


def _composite(op):
    """True for a layer with weights `QuantizeComposite` runs: no recurrent or BatchNormalization layer inside."""
    inside = [op, *_graph.sublayers(op)]
    return not any(isinstance(l, (keras.layers.RNN, keras.layers.BatchNormalization)) for l in inside)


def _role(op):
    """How QAT treats a layer or op (its registry row's `qat_role`; "compute" without a row)."""
    spec = registry.lookup(op)
    return spec.qat_role if spec is not None else "compute"


def _fuses_relu(rec):
    op = _unwrap(rec.op)
    return fused_activation(op) == "linear" if rec.kind == "kernel" else _role(op) == "fuses_relu"


def _unsupported_message(layers, errors, model):
    lines = [f"  - {mu.describe(layer)}" for layer in layers] + [f"  - {e}" for e in errors]
    return (
        f"`quantize_model` cannot quantize {len(lines)} layer(s) of model {model.name!r}:\n"
        + "\n".join(lines)
        + "\nFix: for a custom layer, say how to quantize it with "
        "`tfopt.quantize_annotate_layer(layer, quantize_config=MyQuantizeConfig())` (a `tfopt.QuantizeConfig` "
        "subclass) and `tfopt.quantize_apply`, or register it with `tfopt.register_layer(cls, quantizable=...)`; "
        "or leave it float with `filters=` (e.g. `filters=lambda layer: layer.name != 'ln'`). A "
        "BatchNormalization is quantized only when it directly follows a Conv/DepthwiseConv/Dense with a "
        "linear activation that feeds nothing else (it is folded into it). Recurrent layers (LSTM, GRU, "
        "SimpleRNN) and layers holding one or a BatchNormalization have no QAT: leave them float with `filters=`, "
        "or convert the float model post-training. "
        f"Received: layers={[layer.name for layer in layers] or [e.split(':')[0] for e in errors]}"
    )


# ----- rebuild ----------------------------------------------------------------------


def _quantize(model, fn_name, scheme, filters, annotated_only, ema_decay, freeze_bn_delay, preserve_sparsity,
              preserve_clusters):
    _checks.check_choice(scheme, "scheme", _SCHEMES)
    ema_decay, freeze_bn_delay = _check_options(ema_decay, freeze_bn_delay)
    if preserve_sparsity is not None:
        _checks.check_bool(
            preserve_sparsity, "preserve_sparsity", "None (default) keeps the zeros of every weight that has some."
        )
    preserve_clusters = _check_preserve_clusters(preserve_clusters)
    _refuse_quantized(model, fn_name)

    has_clusters = bool(_wrappers.find(model, ClusterWeights, include_self=False))
    if preserve_clusters is True and not has_clusters:
        raise ValueError(
            f"`preserve_clusters=True` needs a model with tfopt.ClusterWeights layers, and model {model.name!r} has "
            "none. For a stripped clustered model pass the number of clusters, e.g. `preserve_clusters=16` (every "
            "quantized kernel with at most that many distinct values keeps them). Received: preserve_clusters=True"
        )
    if _wrappers.find(model, PruneLowMagnitude, include_self=False):
        model = strip_pruning(model)
    clustered = {}  # id(stripped layer) -> (its clustered weight paths, number of clusters)
    if has_clusters:
        model, clustered = _strip_clusters(model)

    graph = _plan(model, filters, annotated_only)
    cluster_plan = {} if preserve_clusters is False else _cluster_plan(graph.nodes, clustered, preserve_clusters, model)

    unique = mu.name_allocator()
    quantized = set()  # canonical ids whose new tensor is fake-quantized (or will be, by fusion)
    q_inputs = {}  # canonical id -> fake-quantized version of a float tensor

    def feed(rec, c, tensor):
        if not rec.selected or rec.kind == "folded" or c in quantized or not _is_float(tensor):
            return tensor
        if c not in q_inputs:
            q_inputs[c] = QuantizeLayer(ema_decay=ema_decay, name=unique(f"{graph.name(c)}_quantize"))(tensor)
        return q_inputs[c]

    def make(rec):
        op = _unwrap(rec.op)
        if rec.kind == "composite":
            zeros = any(np.any(keras.ops.convert_to_numpy(v) == 0) for v, _ in quantized_weights(op))
            return QuantizeComposite(
                mu.copy_layer(op), preserve_sparsity=zeros if preserve_sparsity is None else preserve_sparsity,
                ema_decay=ema_decay, name=unique(f"quant_{op.name}"),
            ), None
        if rec.kind not in ("kernel", "compute") or not isinstance(op, keras.layers.Layer):
            return _graph.copy_op(op, unique), None
        sparse = _has_zeros(op, rec) if preserve_sparsity is None else preserve_sparsity
        paths, k = cluster_plan.get(id(op), ((), None))
        return QuantizeWrapper(  # masks and clusters are taken from the copied weights when it is built
            mu.copy_layer(op),
            quantize_config=None if rec.config is None else type(rec.config).from_config(rec.config.get_config()),
            batch_norm=mu.copy_layer(rec.bn) if rec.bn is not None else None,
            quantize_output=rec.quantize_output,
            preserve_sparsity=bool(sparse) and (rec.kind == "kernel" or rec.config is not None),
            ema_decay=ema_decay, freeze_bn_delay=freeze_bn_delay, num_outputs=len(rec.outs),
            clustered_weights=paths, number_of_clusters=k, name=unique(f"quant_{op.name}"),
        ), None

    call = _graph.copier(make)

    def emit(rec, args, kwargs):
        if rec.kind == "folded":  # the BN is inside the kernel layer's wrapper: pass its input through
            if rec.ins[0] in quantized:
                quantized.add(rec.outs[0])
            return keras.tree.flatten((args, kwargs))[0]
        flat = keras.tree.flatten(call(rec, args, kwargs))
        if rec.kind == "compute" and not isinstance(rec.op, keras.layers.Layer) and rec.quantize_output:
            flat = [QuantizeLayer(ema_decay=ema_decay, name=unique(f"{rec.op.name}_quantize"))(t) for t in flat]
        if rec.selected and (
            rec.kind in ("kernel", "compute", "composite")
            or (rec.kind == "same" and all(i in quantized or i in q_inputs for i in rec.ins))
        ):
            quantized.update(rec.outs)
        return flat

    name = f"{model.name}_qat" if not model.name.endswith("_qat") else model.name
    return graph.rebuild(emit, name, feed=feed, unique=unique)


def _check_preserve_clusters(preserve_clusters):
    if preserve_clusters is None or isinstance(preserve_clusters, (bool, np.bool_)):
        return None if preserve_clusters is None else bool(preserve_clusters)
    if not isinstance(preserve_clusters, (int, np.integer)) or preserve_clusters < 2:
        raise ValueError(
            "`preserve_clusters` must be None (keep the clusters of tfopt.ClusterWeights layers), True, False, or "
            "the number of clusters of a stripped clustered model (an int >= 2, e.g. 16). "
            f"Received: preserve_clusters={preserve_clusters!r}"
        )
    return int(preserve_clusters)


def _strip_clusters(model):
    """``(strip_clustering(model), {id(stripped kernel layer): (its clustered weight paths, number_of_clusters)})``."""
    plan = {}

    def clone_function(layer):
        if not isinstance(layer, ClusterWeights):
            return mu.copy_layer(layer)
        new, row = layer.stripped_layer(), registry.lookup(layer.layer)
        if row is not None and row.qat_role == "kernel":
            chosen = {id(w.variable) for w in registry.selected(layer.layer, layer.weight_positions)}
            paths = tuple(p for p in row.quantizable if id(registry.weight_at(layer.layer, p)) in chosen)
            plan[id(new)] = (paths, layer.number_of_clusters)
        return new

    return _graph.map_layers(model, clone_function), plan


def _cluster_plan(records, clustered, k, model):
    """{id(layer): (weight paths, number_of_clusters)} of the kernels to train as clusters; validates.

    `clustered` holds what `_strip_clusters` found; an int `k` adds every other kernel with at most `k` distinct values.
    """
    plan = {}
    by_count = k is not None and not isinstance(k, bool)
    for op in [_unwrap(rec.op) for rec in records if rec.kind == "kernel"]:  # QuantizeConfig layers are "compute"
        known, n = clustered.get(id(op), ((), 0))
        paths = [
            p for p in registry.lookup(op).quantizable
            if p in known or by_count and np.unique(keras.ops.convert_to_numpy(registry.weight_at(op, p))).size <= k
        ]
        if paths:
            plan[id(op)] = (tuple(paths), max(n, k) if by_count and set(paths) - set(known) else n)
    if by_count and not plan:
        raise ValueError(
            f"`preserve_clusters={k}` found no quantized kernel of model {model.name!r} with at most {k} distinct "
            "values: nothing is clustered. Cluster the float model (`tfopt.cluster_weights`), fine-tune it, and "
            "quantize it (or its `tfopt.strip_clustering` copy with the same number of clusters). "
            f"Received: preserve_clusters={k}"
        )
    return plan


def _is_float(tensor):
    return keras.backend.standardize_dtype(tensor.dtype).startswith(("float", "bfloat"))


def _has_zeros(layer, rec):
    if rec.config is not None:
        refs = [pair[0] for pair in rec.config.get_weights_and_quantizers(layer)]
    else:
        refs = getattr(registry.lookup(layer), "quantizable", ())  # no row: nothing to quantize
    ws = [registry.weight_at(layer, ref) if isinstance(ref, str) else ref for ref in refs]
    return any(np.any(keras.ops.convert_to_numpy(w) == 0) for w in ws)


