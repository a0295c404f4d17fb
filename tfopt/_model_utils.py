"""Model plumbing shared by every transform: checks, layer selection, cloning."""

import importlib
import inspect
import re

import keras

from tfopt import registry


def is_graph_model(obj):
    """True for Sequential and Functional models (the ones tfopt can rebuild)."""
    return isinstance(obj, keras.Sequential) or (isinstance(obj, keras.Model) and isinstance(obj, keras.Function))


def check_model(model, arg_name, fn_name):
    """Raises a helpful error unless `model` is a built Sequential/Functional model."""
    if is_subclassed(model):
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


def is_subclassed(model):
    """True for a subclassed model: its graph is only known to its `call`."""
    return isinstance(model, keras.Model) and not is_graph_model(model)


def check_built_subclassed(model, arg_name, fn_name):
    """Raises unless the subclassed `model` is built (weight transforms wrap it whole, with its input shapes)."""
    unbuilt = [l for l in model._flatten_layers(include_self=True, recursive=True) if not l.built]
    if unbuilt:
        raise ValueError(
            f"`{fn_name}` needs a built subclassed model, every layer with its weights: call the model once on a "
            f"batch (`model(x)`), or `model.build(input_shape)` when its `build` builds its layers. Not built: "
            f"{', '.join(describe(l) for l in unbuilt[:5])}. Received: {arg_name}={model.name!r} of type "
            f"{type(model).__name__}"
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
    """Turns `filters` (None, regex, list of regexes, callable) into a predicate ``(layer, weight=None)`` or None.

    Regexes match the layer's name and, given a `registry.Weight` below the layer, its full path
    (``"transformer_layer_0/.../query/kernel"``); a callable decides by the layer.
    """
    if filters is None:
        return None
    if callable(filters):
        return lambda layer, weight=None: bool(filters(layer))
    if isinstance(filters, str):
        filters = [filters]
    if isinstance(filters, (list, tuple)) and all(isinstance(f, str) for f in filters):
        patterns = [re.compile(f) for f in filters]

        def matches(layer, weight=None):
            names = [layer.name] + ([f"{layer.name}/{weight.path}"] if weight is not None else [])
            return any(p.search(n) for p in patterns for n in names)

        return matches
    raise TypeError(
        "`filters` must be None, a regex on layer names or weight paths, a list of regexes, or a callable "
        f"`fn(layer) -> bool`. Received: filters={filters!r}"
    )


def copy_layer(layer, weights=None):
    """A new, built layer with the same config and weights (never shares state).

    Op nodes of a Functional graph (`x * 2.0` becomes a `keras.ops` operation, not a layer) have no
    state: they are returned as they are. The copy is made from the live layer's config with its
    classes (and those of its sub-layers) at hand, so a user's unregistered class copies too. A layer
    that creates its weights on its first call (sub-layers made in `__init__`, no `build`) is built by
    calling it on symbolic inputs of the shapes it was called with. A layer that holds no state at all
    and cannot be rebuilt from its config (a `Lambda` of a Python lambda, refused by Keras' safe mode)
    is used as it is: sharing a stateless layer changes nothing.

    Raises:
        ValueError: a layer with weights that cannot be rebuilt from its config; names the layer and
            the cause.
    """
    if not isinstance(layer, keras.layers.Layer):
        return layer
    try:
        new = _from_config(layer)
        if layer.built:
            build_inner(new, layer.get_build_config(), input_specs(layer))
            new.set_weights(layer.get_weights() if weights is None else weights)
            new.built = True  # a subclassed model's build_from_config makes its weights but may not say so
    except Exception as e:  # noqa: BLE001 - any failure of the layer's own config code lands here
        if not layer.variables and weights is None:
            return layer
        raise ValueError(
            f"tfopt cannot copy layer {describe(layer)}: rebuilding it from its config failed with "
            f"{type(e).__name__}: {e}. Give the class a `get_config()` that returns every constructor argument "
            "(and a matching `from_config`), or leave the layer out of the transform with `filters=` and build the "
            f"model so that it holds no such layer. Received: layer={layer.name!r}"
        ) from e
    return new


def _from_config(layer):
    classes = {}
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        for cls in type(sub).__mro__:
            if issubclass(cls, keras.layers.Layer) and not cls.__module__.startswith("keras."):
                classes[keras.saving.get_registered_name(cls)] = cls
                classes[cls.__name__] = cls
    config = layer.get_config()
    with keras.saving.CustomObjectScope(classes):
        try:
            return type(layer).from_config(config)
        except (TypeError, ValueError):
            # Some configs carry derived values their constructor refuses (keras-hub's ViT patch embedding
            # stores `num_patches`): retry with the keys the constructor and keras.layers.Layer take.
            accepted = _init_arguments(type(layer))
            if set(config) <= accepted:
                raise
            return type(layer).from_config({k: v for k, v in config.items() if k in accepted})


def deserialize_layer(config, custom_objects=None):
    """`keras.saving.deserialize_keras_object` of a wrapped layer, tolerant of configs like `_from_config`'s.

    Wrappers deserialize their inner layer with it, so a pruned or clustered keras-hub ViT (whose patch
    embedding stores keys its constructor refuses) loads like any other model.
    """
    try:
        return keras.saving.deserialize_keras_object(config, custom_objects=custom_objects)
    except (TypeError, ValueError):
        cls = _class_of(config, custom_objects)
        accepted = _init_arguments(cls) if cls is not None else None
        inner = config.get("config", {})
        if accepted is None or set(inner) <= accepted:
            raise
        trimmed = {**config, "config": {k: v for k, v in inner.items() if k in accepted}}
        return keras.saving.deserialize_keras_object(trimmed, custom_objects=custom_objects)


def _class_of(config, custom_objects):
    cls = keras.saving.get_registered_object(config.get("registered_name") or "", custom_objects)
    if cls is None and config.get("module"):
        try:
            cls = getattr(importlib.import_module(config["module"]), config.get("class_name", ""), None)
        except ImportError:
            return None
    return cls if isinstance(cls, type) else None


def _init_arguments(cls):
    """Keyword names `cls.__init__` takes, with the base layer's and the input-shape keys."""
    names = {"input_shape", "input_dim", "batch_size", "batch_input_shape"}
    for klass in (cls, keras.layers.Layer):
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names


def input_specs(layer):
    """[(shape, dtype)] of the tensors `layer` was first called with in a graph, or None."""
    if not layer._inbound_nodes:
        return None
    arguments = layer._inbound_nodes[0].arguments
    if arguments.kwargs or not all(isinstance(t, keras.KerasTensor) for t in arguments.args):
        return None
    return [(list(t.shape), t.dtype) for t in arguments.args]


def build_inner(layer, build_config, specs):
    """Builds `layer` from its build config, or by one call on symbolic inputs of `specs`.

    A layer without its own `build` makes its weights on its first call (sub-layers made in `__init__`);
    Keras' default build would only mark it built. Such a layer is called once on fresh symbolic inputs of
    the specs it was first called with.
    """
    own_build = type(layer).build is not keras.layers.Layer.build
    if build_config and not layer.built and (own_build or not specs):
        layer.build_from_config(build_config)
    unbuilt = any(not l.built for l in layer._flatten_layers(include_self=False, recursive=True))
    if specs and (unbuilt or not layer.built):
        layer(*[keras.KerasTensor(tuple(shape), dtype) for shape, dtype in specs])


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


def select_weights(layers, filters, protocol_method):
    """The weights a weight transform (pruning, clustering) applies to, by layer.

    Each of `layers` (e.g. `all_layers(model)`) is walked with `registry.walk`, so composite layers
    contribute the leaf weights of their sub-layers. A weight is chosen when `filters` selects it (a regex
    matching its layer's name or its path ``layer/sub/.../name``, or a callable accepting its layer) or, with
    no `filters`, when its row transforms it by default.

    Returns:
        (dict: id of a layer -> tuple of the chosen weights' positions in `registry.walk` order (None: every
        weight of a leaf layer, as when wrapping it alone), list of (layer, unplaced weight paths) for selected
        layers holding weights tfopt does not know).
    """
    selected = make_filter(filters)
    chosen, unsupported = {}, []
    for layer in layers:
        found, unplaced = registry.walk(layer, protocol_method)
        if selected is None:
            wanted, whole = [w for w in found if w.by_default], True
        else:
            whole = selected(layer)
            wanted = found if whole else [w for w in found if selected(layer, w)]
        if unplaced and whole:
            unsupported.append((layer, unplaced))
        elif wanted:
            leaf = all(w.layer is layer for w in found) and len(wanted) == len(found)
            chosen[id(layer)] = None if leaf else tuple(found.index(w) for w in wanted)
    return chosen, unsupported


def unplaced_message(entries, verb, protocol_method):
    """The error for layers holding weights tfopt cannot place: [(layer, unplaced paths)], all listed."""
    listed = ", ".join(
        describe(layer) + (f" (weights {', '.join(f'{layer.name}/{p}' for p in paths)})" if paths else " (no weights)")
        for layer, paths in entries
    )
    first = type(entries[0][0]).__name__
    example = (entries[0][1][0].split("/")[-1],) if entries[0][1] else ("kernel",)
    return (
        f"tfopt does not know which weights to {verb} in: {listed}. Either register the layer type, "
        f"e.g. `tfopt.register_layer({first}, prunable={example!r})` (add `sublayers=True` when it also holds "
        f"sub-layers), give it a `{protocol_method}()` method, or leave it dense with `filters=`: a regex on "
        f"layer names or weight paths, or e.g. `filters=lambda layer: not isinstance(layer, {first})`."
    )


def symbolic_inputs(model):
    """`keras.Input`s of the shapes a built subclassed model was built with (one, or a list)."""
    shape = (model.get_build_config() or {}).get("input_shape")
    if shape is None:
        raise ValueError(
            f"Model {model.name!r} does not record the input shape it was built with. Call "
            f"`model.build(input_shape)` before passing it. Received: model={model.name!r}"
        )
    single = all(d is None or isinstance(d, int) for d in shape)
    shapes = [shape] if single else list(shape)
    inputs = [keras.Input(shape=tuple(s)[1:]) for s in shapes]  # any batch size, whatever it was built with
    return inputs[0] if single else inputs


def describe(layer):
    return f"'{layer.name}' of type {type(layer).__name__}"

