"""Model plumbing shared by every transform: checks, layer selection, cloning."""

import re

import keras

from tfopt import registry


def is_graph_model(obj):
    """True for Sequential and Functional models (the ones tfopt can rebuild)."""
    return isinstance(obj, keras.Sequential) or (isinstance(obj, keras.Model) and isinstance(obj, keras.Function))


def check_model(model, arg_name, fn_name):
    """Raises a helpful error unless `model` is a built Sequential/Functional model."""
    if isinstance(model, keras.Model) and not is_graph_model(model):
        raise ValueError(
            f"`{fn_name}` cannot rebuild a subclassed model ({type(model).__name__}): its layer graph "
            "is only known to its `call` method. Wrap its layers instead, in `__init__`, e.g. "
            f"`self.dense = tfopt.{fn_name}(keras.layers.Dense(10), ...)`, or build the model with the "
            f"Functional API. Received: {arg_name}={type(model).__name__}"
        )
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{arg_name}` must be a keras Sequential or Functional model (or a keras layer). "
            f"Received: {arg_name}={model!r} of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"`{fn_name}` needs a built model: give it an Input (e.g. `keras.Input(shape=...)` as "
            f"its first layer) or call `model.build(input_shape)` first. Received: {arg_name}={model.name!r} (not built)"
        )


def all_layers(model):
    """The layers of `model` in graph order, nested models flattened (not sub-layers)."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(all_layers(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            out.append(layer)
    return out


def make_filter(filters):
    """Turns `filters` (None, regex, list of regexes, callable) into a predicate or None."""
    if filters is None:
        return None
    if callable(filters):
        return filters
    if isinstance(filters, str):
        filters = [filters]
    if isinstance(filters, (list, tuple)) and all(isinstance(f, str) for f in filters):
        patterns = [re.compile(f) for f in filters]
        return lambda layer: any(p.search(layer.name) for p in patterns)
    raise TypeError(
        "`filters` must be None, a regex on layer names, a list of regexes, or a callable "
        f"`fn(layer) -> bool`. Received: filters={filters!r}"
    )


def copy_layer(layer, weights=None):
    """A new, built layer with the same config and weights (never shares state).

    Op nodes of a Functional graph (`x * 2.0` becomes a `keras.ops` operation, not a layer) have no
    state: they are returned as they are.
    """
    if not isinstance(layer, keras.layers.Layer):
        return layer
    new = type(layer).from_config(layer.get_config())
    if layer.built:
        build_config = layer.get_build_config()
        if build_config:
            new.build_from_config(build_config)
        new.set_weights(layer.get_weights() if weights is None else weights)
    return new


def clone(model, clone_function):
    """Rebuilds `model` (and nested models) calling `clone_function` per layer."""
    return keras.models.clone_model(model, clone_function=clone_function, recursive=True)


def name_allocator():
    """A function returning `name`, or `name_2`, `name_3`... if already given out (names in a model are unique)."""
    used = set()

    def unique(name):
        base, i = name, 1
        while name in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name)
        return name

    return unique


def select_layers(model, filters, protocol_method):
    """The layers a weight transform (pruning, clustering) applies to.

    A layer is chosen when `filters` (see `make_filter`) does not reject it and either its registry row has
    prunable weights (and it is pruned by default, or `filters` selected it explicitly), or it has no row but
    implements `protocol_method` (TFMOT's `get_prunable_weights` / `get_clusterable_weights`).

    Returns:
        (set of ids of the chosen layers, list of selected layers with weights tfopt knows nothing about).
    """
    selected = make_filter(filters)
    chosen, unsupported = set(), []
    for layer in all_layers(model):
        wanted = selected(layer) if selected else None
        if wanted is False:
            continue
        spec = registry.lookup(layer)
        if spec is None:
            if hasattr(layer, protocol_method):
                chosen.add(id(layer))
            elif has_weights(layer):
                unsupported.append(layer)
            continue
        if spec.prunable and (wanted or spec.prune_by_default):
            chosen.add(id(layer))
    return chosen, unsupported


def describe(layer):
    return f"'{layer.name}' of type {type(layer).__name__}"


def has_weights(layer):
    return bool(layer.weights)


def spec_or_none(layer):
    return registry.lookup(layer)
