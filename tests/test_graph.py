"""tfopt._graph: flatten / rebuild round trips, graph queries, emit and feed hooks, map_layers."""

import keras
import numpy as np
import pytest
from keras import ops

from helpers import assert_same_weights, weights_of
from tfopt import _graph
from tfopt import _model_utils as mu

L = keras.layers


def sequential():
    return keras.Sequential(
        [keras.Input((6,), name="x"), L.Dense(5, activation="relu", name="d1"), L.Dense(3, name="d2")], name="seq"
    )


def multi_io():
    """Dict inputs, two outputs, an op node and a Concatenate."""
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    h = L.Concatenate(name="cat")([L.Dense(5, name="da")(a), L.Dense(5, name="db")(b) * 2.0])
    return keras.Model({"a": a, "b": b}, [L.Dense(2, name="o1")(h), L.Dense(1, name="o2")(h + 1.0)], name="multi")


def nested_shared():
    """A nested Sequential, a layer called twice, and op nodes in between."""
    inner = keras.Sequential([keras.Input((6,)), L.Dense(4, activation="tanh", name="inner_d")], name="block")
    shared = L.Dense(4, name="shared")
    x = keras.Input((6,), name="x")
    h = inner(x)
    h = shared(h) + shared(h * 2.0)
    return keras.Model(x, L.Dense(2, name="out")(h), name="nested")


def data(model, n=5):
    rng = np.random.default_rng(0)
    arrays = {t.name: rng.normal(size=(n, *t.shape[1:])).astype("float32") for t in model.inputs}
    return arrays if len(arrays) > 1 else arrays[model.inputs[0].name]  # dict inputs are keyed by input name


def predict(model, x):
    return keras.tree.map_structure(np.asarray, model(x))


def layer_names(model):
    return [layer.name for layer in _graph.sublayers(model)]


MODELS = [sequential, multi_io, nested_shared]


@pytest.mark.parametrize("build", MODELS, ids=[m.__name__ for m in MODELS])
def test_rebuild_predicts_identically_and_leaves_the_original_alone(build):
    model = build()
    x = data(model)
    before, names = weights_of(model), layer_names(model)
    expected = predict(model, x)
    new = _graph.Graph(model).rebuild()
    keras.tree.map_structure(np.testing.assert_array_equal, predict(new, x), expected)
    assert_same_weights(model, before)
    assert layer_names(model) == names
    assert new.name == model.name
    assert not any(isinstance(layer, keras.Model) for layer in new.layers)  # nested models are inlined
    own = {id(v) for v in model.weights}
    assert not any(id(v) in own for v in new.weights)
    for v in new.weights:  # the copy's weights are its own
        v.assign(ops.zeros_like(v))
    assert_same_weights(model, before)
    keras.tree.map_structure(np.testing.assert_array_equal, predict(model, x), expected)


def test_input_and_output_structures_are_kept():
    model = multi_io()
    new = _graph.Graph(model).rebuild(name="copy")
    assert isinstance(new.input, dict) and sorted(new.input) == ["a", "b"]
    assert [t.name for t in keras.tree.flatten(new.input)] == ["a", "b"]
    assert isinstance(new.output, list) and [tuple(t.shape) for t in new.output] == [(None, 2), (None, 1)]
    assert new.name == "copy"


def test_new_inputs_keep_the_input_layer_names():
    x = keras.Input((3,))  # unnamed: its layer is "input_layer...", its tensor "keras_tensor..."
    model = keras.Model(x, L.Dense(2)(x))
    new = _graph.Graph(model).rebuild()
    assert new.layers[0].name == model.layers[0].name and new.layers[0].name.startswith("input_layer")


def test_nodes_ids_and_queries():
    model = nested_shared()
    graph = _graph.Graph(model)
    ops_seen = [node.op for node in graph.nodes]
    names = [op.name for op in ops_seen if isinstance(op, L.Layer)]
    assert sorted(names) == ["inner_d", "out", "shared", "shared"] and names[0] == "inner_d"  # nested model inlined
    assert sum(not isinstance(op, L.Layer) for op in ops_seen) == 2  # `h * 2.0` and the `+`
    assert graph.inputs == [-1] and graph.shape(-1) == (None, 6) and graph.name(-1) == "x"
    ids = [c for node in graph.nodes for c in node.outs]
    assert ids == list(range(1, len(ids) + 1))
    inner, out = graph.nodes[0], graph.nodes[-1]
    times, add = [node for node in graph.nodes if not isinstance(node.op, L.Layer)]  # in graph order
    first, second = sorted((n for n in graph.nodes if n.op.name == "shared"), key=lambda n: n.ins[0] != inner.outs[0])
    assert first.op is second.op and graph.producer(inner.outs[0]) is inner and graph.producer(-1) is None
    assert sorted(map(id, graph.consumers(inner.outs[0]))) == sorted(map(id, [first, times]))
    assert graph.only_consumer(times, second) and not graph.only_consumer(inner, first)
    assert not graph.only_consumer(out, out) and graph.outputs == out.outs  # a model output has no only consumer
    assert graph.shape(add.outs[0]) == (None, 4) and graph.name(first.outs[0]) == "shared"
    assert times.arguments[0][1] == 2.0


def test_x_plus_x_is_two_reads():
    x = keras.Input((3,), name="x")
    h = L.Dense(3, name="d")(x)
    model = keras.Model(x, h + h)
    graph = _graph.Graph(model)
    dense, add = graph.nodes
    assert graph.consumers(dense.outs[0]) == [add, add] and not graph.only_consumer(dense, add)
    np.testing.assert_array_equal(predict(graph.rebuild(), np.ones((2, 3), "float32")), predict(model, np.ones((2, 3))))


def test_default_rebuild_keeps_a_shared_layer_shared():
    model = nested_shared()
    new = _graph.Graph(model).rebuild()
    shared = [layer for layer in new.layers if layer.name.startswith("shared")]
    assert len(shared) == 1 and len(shared[0]._inbound_nodes) == 2


def test_custom_emit_feed_and_copier_init():
    model = nested_shared()
    x = data(model)
    graph = _graph.Graph(model)
    unique, inits = mu.name_allocator(), []

    def make(node):
        return _graph.copy_op(node.op, unique), (lambda new: inits.append(new.name)) if isinstance(node.op, L.Layer) else None

    def feed(node, c, tensor):  # the output layer reads twice its input
        return L.Rescaling(2.0, name=unique("twice"))(tensor) if node.op.name == "out" else tensor

    new = graph.rebuild(_graph.copier(make), "custom", feed=feed, unique=unique)
    assert inits == ["inner_d", "shared", "out"]  # once per op, the shared layer once
    assert new.inputs[0].name == "x" and "twice" in [layer.name for layer in new.layers]
    out = model.get_layer("out")
    hidden = keras.Model(model.input, out.input)
    expected = np.asarray(out(2.0 * hidden(x)))
    np.testing.assert_allclose(predict(new, x), expected, rtol=1e-6, atol=1e-6)


def test_emit_can_replace_a_node_with_two():
    model = sequential()
    x = data(model)

    def emit(node, args, kwargs):
        new = _graph.copy_op(node.op, unique)
        return L.Identity(name=unique("after"))(new(*args, **kwargs))

    unique = mu.name_allocator()
    new = _graph.Graph(model).rebuild(emit, unique=unique)
    assert [layer.name for layer in new.layers] == ["x", "d1", "after", "d2", "after_2"]
    np.testing.assert_array_equal(predict(new, x), predict(model, x))


def test_map_layers_keeps_the_structure_and_expands_a_layer_into_a_chain():
    model = nested_shared()
    x = data(model)
    before = weights_of(model)

    def fn(layer):
        copy = mu.copy_layer(layer)
        return (copy, L.Identity(name=f"{layer.name}_id")) if layer.name in ("inner_d", "shared") else copy

    new = _graph.map_layers(model, fn)
    block = new.get_layer("block")
    assert isinstance(block, keras.Sequential) and [l.name for l in block.layers] == ["inner_d", "inner_d_id"]
    assert [l.name for l in new.layers].count("shared") == 1 and "shared_id" in [l.name for l in new.layers]
    np.testing.assert_array_equal(predict(new, x), predict(model, x))
    assert_same_weights(model, before)

    seq = sequential()
    copy = _graph.map_layers(seq)
    assert isinstance(copy, keras.Sequential) and copy.name == "seq" and copy.inputs[0].name == "x"
    assert [l.name for l in copy.layers] == ["d1", "d2"] and copy.get_layer("d1") is not seq.get_layer("d1")
    np.testing.assert_array_equal(predict(copy, data(seq)), predict(seq, data(seq)))
