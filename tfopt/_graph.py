"""The graph engine: a model as a flat list of nodes (`Graph`), and new models built from them.

A `Node` is one call of one op (a layer, or a `keras.ops` operation such as ``x * 2.0``); nested models are
inlined; tensor ids are ``-n .. -1`` for the model inputs, then ``1, 2, ...`` in graph order. Only this module
reads Keras's private graph attributes (``_functional``, ``_nodes_by_depth``, ``_keras_history``,
``_inputs_struct``, ``_outputs_struct``, ``arguments.fill_in``, ``_flatten_layers``, ``Sequential._layers``).
"""

import dataclasses

import keras

from tfopt import _model_utils as mu


@dataclasses.dataclass(eq=False)
class Node:
    """One call of one op; a transform subclasses it to hold its per-node plan."""

    op: object  # a keras Layer, or a keras.ops Operation
    call: object  # the Keras node of this call (read in this module only)
    ins: list  # canonical ids of its input tensors, in call order
    outs: list  # canonical ids of its output tensors

    @property
    def arguments(self):
        """``(args, kwargs)`` of the call: its input KerasTensors and constants."""
        return self.call.arguments.args, self.call.arguments.kwargs


class Graph:
    """The flattened graph of a built Sequential or Functional model (the model is only read).

    Attributes:
        nodes: `node_type` instances in graph order (each after the producers of its inputs).
        inputs, outputs: canonical ids of the model's (flattened) inputs and outputs.
    """

    def __init__(self, model, node_type=Node):
        self.model, self._fn, self.nodes = model, _function(model), []
        self.inputs = list(range(-len(self._fn.inputs), 0))
        self._shapes = {c: tuple(x.shape) for c, x in zip(self.inputs, self._fn.inputs)}
        self._names = {c: x._keras_history.operation.name for c, x in zip(self.inputs, self._fn.inputs)}
        self.outputs = self._walk(self._fn, self.inputs, node_type)
        self._producer = {c: node for node in self.nodes for c in node.outs}
        self._consumers = {}
        for node in self.nodes:
            for c in node.ins:
                self._consumers.setdefault(c, []).append(node)

    def _walk(self, fn, in_ids, node_type):
        canon = {id(x): c for x, c in zip(fn.inputs, in_ids)}
        for depth in sorted(fn._nodes_by_depth, reverse=True):
            for call in fn._nodes_by_depth[depth]:
                if call.is_input or not call.operation:
                    continue
                ins = [canon[id(t)] for t in call.input_tensors]
                if isinstance(call.operation, keras.Model) and mu.is_graph_model(call.operation):
                    outs = self._walk(_function(call.operation), ins, node_type)
                else:
                    outs = [len(self._shapes) - len(self.inputs) + 1 + i for i in range(len(call.outputs))]
                    self._shapes.update((c, tuple(t.shape)) for c, t in zip(outs, call.outputs))
                    self.nodes.append(node_type(call.operation, call, ins, outs))
                canon.update((id(t), c) for t, c in zip(call.outputs, outs))
        return [canon[id(t)] for t in fn.outputs]

    def shape(self, tid):
        """The shape of tensor `tid`, batch axis first (None for unknown dimensions)."""
        return self._shapes[tid]

    def name(self, tid):
        """The name of the op producing tensor `tid` (the input layer of a model input)."""
        return self._names[tid] if tid < 0 else self._producer[tid].op.name

    def producer(self, tid):
        """The node whose output tensor `tid` is; None for a model input."""
        return self._producer.get(tid)

    def consumers(self, tid):
        """The nodes reading tensor `tid`, once per read (``x + x`` reads it twice)."""
        return self._consumers.get(tid, [])

    def only_consumer(self, node, of):
        """True when `node` has one output, not a model output, that `of` alone reads, once."""
        return len(node.outs) == 1 and node.outs[0] not in self.outputs and self.consumers(node.outs[0]) == [of]

    def rebuild(self, emit=None, name=None, feed=None, unique=None):
        """A new Functional model (same input/output structures) computing the nodes in order.

        Args:
            emit: ``fn(node, args, kwargs) -> outputs``, computing `node` from its call arguments with each
                input tensor replaced by its new one; default: `copier` of `copy_op`.
            name: the new model's name (default: the original's).
            feed: None, or ``fn(node, tid, tensor) -> tensor``: what `node` reads for input `tid` instead.
            unique: the `name_allocator` `emit` names layers with; the new inputs take their names first.
        """
        unique = unique or mu.name_allocator()
        emit = emit or copier(lambda node: (copy_op(node.op, unique), None))
        new_inputs = [
            keras.Input(batch_shape=x.shape, dtype=x.dtype, name=unique(self._names[c]))
            for c, x in zip(self.inputs, self._fn.inputs)
        ]
        tensors = dict(zip(self.inputs, new_inputs))
        for node in self.nodes:
            fed = {id(t): feed(node, c, tensors[c]) if feed else tensors[c] for t, c in zip(node.call.input_tensors, node.ins)}
            args, kwargs = node.call.arguments.fill_in(fed)
            tensors.update(zip(node.outs, keras.tree.flatten(emit(node, args, kwargs))))
        inputs = keras.tree.pack_sequence_as(self._fn._inputs_struct, new_inputs)
        outputs = keras.tree.pack_sequence_as(self._fn._outputs_struct, [tensors[c] for c in self.outputs])
        return keras.Model(inputs, outputs, name=name or self.model.name)


def _function(model):
    return model._functional if isinstance(model, keras.Sequential) else model


def copy_op(op, unique):
    """A new op computing as `op` does: a copy of a layer, named ``unique(op.name)``, or of an op node."""
    if not isinstance(op, keras.layers.Layer):
        return type(op).from_config(op.get_config())
    new = mu.copy_layer(op)
    if new is not op:  # copy_layer may return a stateless layer it cannot rebuild: never rename the user's
        new.name = unique(op.name)
    return new


def copier(make):
    """An `emit` making one new op per original op (shared layers stay shared) with ``make(node)``.

    `make` returns ``(new op, init)``; `init` is None or ``fn(new op)``, run after the op's first call (once
    it is built, e.g. to set its weights).
    """
    made = {}

    def emit(node, args, kwargs):
        first = id(node.op) not in made
        if first:
            made[id(node.op)] = make(node)
        new, init = made[id(node.op)]
        outputs = new(*args, **kwargs)
        if first and init is not None:
            init(new)
        return outputs

    return emit


def map_layers(model, fn=None):
    """A copy of `model` with each layer replaced by ``fn(layer)`` (default: `copy_layer`), structure kept.

    Sequential stays Sequential, nested models stay nested (mapped with `fn`), a shared layer is mapped once
    and op nodes are kept (they are stateless). `fn` returns a layer, or a tuple of layers that are called
    one after the other in its place.
    """
    fn = fn or mu.copy_layer
    made, rest = {}, {}  # id(layer) -> its new layers; id(first new layer) -> the others

    def chain(layer):
        if id(layer) not in made:
            if isinstance(layer, keras.Model):
                new = map_layers(layer, fn)
            else:
                new = fn(layer) if isinstance(layer, keras.layers.Layer) else layer
            new = made[id(layer)] = new if isinstance(new, tuple) else (new,)
            rest[id(new[0])] = new[1:]
        return made[id(layer)]

    if isinstance(model, keras.Sequential):
        source, first = model.inputs[0], model._layers[0]
        name = first.name if isinstance(first, keras.layers.InputLayer) else None
        inputs = keras.Input(batch_shape=source.shape, dtype=source.dtype, name=name)
        layers = [new for layer in model.layers for new in chain(layer)]
        return keras.Sequential([inputs, *layers], name=model.name, trainable=model.trainable)

    def call_function(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        for after in rest.get(id(layer), ()):
            outputs = after(outputs)
        return outputs

    return keras.models.clone_model(model, clone_function=lambda layer: chain(layer)[0], call_function=call_function)


def sublayers(model):
    """Every layer inside `model`, nested and wrapped ones included, the model itself excluded."""
    return list(model._flatten_layers(include_self=False))
