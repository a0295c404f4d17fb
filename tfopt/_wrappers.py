"""The base of every tfopt wrapper layer; wrapping, finding, refusing and stripping wrappers; weight substitution.

`TfoptWrapper` holds what every wrapper shares: the type and "already wrapped" checks, a flat config
(the constructor arguments named in `_config_keys`, the nested Keras objects among them in `_nested`), the
build config, masks and output specs taken from the inner layer, and `stripped_layer()`, the plain layer
a stripped model holds in its place.

This is the one module that reads Keras' private scope state (the active `StatelessScope`, and the
`AutocastScope` that reads variables in their stored dtype); a Keras upgrade that moves them touches only
this file.
"""

import contextlib

import keras

from tfopt import _graph
from tfopt import _model_utils as mu

try:  # private Keras: see the module docstring
    from keras.src.backend import AutocastScope as _AutocastScope
    from keras.src.backend.common.stateless_scope import get_stateless_scope as current_scope
except ImportError:  # a Keras that moved them: no enclosing scope to read, variables may read autocast
    _AutocastScope = None

    def current_scope():
        return None


class substitute(keras.StatelessScope):
    """A `keras.StatelessScope` mapping ``[(variable, value)]`` that keeps what an enclosing scope maps.

    Inside `Model.stateless_call` (how the JAX backend trains) every variable is read from the enclosing
    scope; a plain inner scope would hide those values from the wrapped layer (its bias would be read from
    the variable).
    """

    def __init__(self, state_mapping):
        super().__init__(state_mapping=state_mapping)
        outer = current_scope()
        if outer is not None:
            self.state_mapping = {**outer.state_mapping, **self.state_mapping}


def stored_dtype():
    """Context in which variables read as their stored dtype (float32), not autocast to the compute dtype."""
    return contextlib.nullcontext() if _AutocastScope is None else _AutocastScope(None)


class TfoptWrapper(keras.layers.Wrapper):
    """The base of tfopt's wrappers (pruning, clustering, QAT).

    Subclasses set `_config_keys` (constructor arguments, saved as attributes of the same name) and
    `_nested` (those holding Keras objects), and implement `stripped_layer()` when a stripped model holds a
    plain layer in their place.
    """

    _config_keys = ()
    _nested = ()
    technique = "tfopt"  # in messages: "Layer ... is already wrapped for <technique>"

    def __init__(self, layer, **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                f"`layer` must be a keras layer to wrap, e.g. `{type(self).__name__}(keras.layers.Dense(10))`. "
                f"Received: layer={layer!r} of type {type(layer).__name__}"
            )
        if isinstance(layer, type(self)):
            raise ValueError(
                f"Layer {mu.describe(layer)} is already wrapped for {self.technique}. Pass the inner layer "
                f"(`wrapper.layer`) or use it as it is. Received: layer={layer.name!r}"
            )
        super().__init__(layer, **kwargs)
        self.supports_masking = getattr(layer, "supports_masking", False)

    def stripped_layer(self):
        """The plain layer that replaces this wrapper in a stripped model."""
        raise NotImplementedError(f"{type(self).__name__} is not stripped: the converter reads it as it is")

    def compute_mask(self, inputs, previous_mask=None):
        return self.layer.compute_mask(inputs, previous_mask)

    def compute_output_spec(self, *args, **kwargs):
        return self.layer.compute_output_spec(*args, **kwargs)

    def compute_output_shape(self, input_shape):  # Sequential without an Input and TimeDistributed ask for it
        return self.layer.compute_output_shape(input_shape)

    def get_build_config(self):
        if not self.built:
            return None
        return {"layer": self.layer.get_build_config(), "inputs": mu.input_specs(self)}

    def build_from_config(self, config):
        config = config or {}
        mu.build_inner(self.layer, config.get("layer"), config.get("inputs"))
        self.build()

    def get_config(self):
        config = super().get_config()
        for key in self._config_keys:
            value = getattr(self, key)
            config[key] = keras.saving.serialize_keras_object(value) if key in self._nested and value is not None else value
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = mu.deserialize_layer(config.pop("layer"), custom_objects)
        for key in cls._nested:
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key], custom_objects=custom_objects)
        return cls(layer, **config)


STRIPPED = "stripped"  # `find` / `strip` kind: every wrapper a stripped model holds a plain layer for


def _is(layer, kind):
    if kind == STRIPPED:
        return isinstance(layer, TfoptWrapper) and type(layer).stripped_layer is not TfoptWrapper.stripped_layer
    return isinstance(layer, kind)


def find(model, kind=TfoptWrapper, include_self=True):
    """The layers of type `kind` (a class, a tuple, or `STRIPPED`) in `model`, subclassed models' attributes included."""
    return [l for l in model._flatten_layers(include_self=include_self, recursive=True) if _is(l, kind)]


def refuse(model, kind, message):
    """Raises ``ValueError(message)`` naming the first layers of type `kind` in `model`, if there are any."""
    found = find(model, kind, include_self=False)
    if found:
        names = ", ".join(mu.describe(l) for l in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(message.format(model=repr(model.name), layers=names))


def wrap(model_or_layer, make_wrapper, choose, arg_name, fn_name, suffix):
    """A copy of `model_or_layer` in which ``make_wrapper(copy, weight_positions=...)`` wraps what `choose` picks.

    ``choose(model_or_layer, layers)`` raises for what cannot be wrapped, else returns ``{id(layer): positions}``
    (as `mu.select_weights`) for `layers`: the layers of a Sequential or Functional model, or ``[model_or_layer]``.
    A single layer comes back as its wrapper, built if the layer is (a layer for a model's `__init__` may not be).
    A subclassed model, whose graph only its `call` knows, is wrapped whole inside a Functional model over the
    input shapes it was built with, so `fit` works as for any model.
    """
    if isinstance(model_or_layer, keras.layers.Layer) and not isinstance(model_or_layer, keras.Model):
        layer = model_or_layer
        positions = choose(layer, [layer]).get(id(layer))
        wrapper = make_wrapper(mu.copy_layer(layer) if layer.built else layer, weight_positions=positions)
        if layer.built:
            wrapper.build()
        return wrapper
    subclassed = mu.is_subclassed(model_or_layer)
    if subclassed:
        mu.check_built_subclassed(model_or_layer, arg_name, fn_name)
    else:
        mu.check_model(model_or_layer, arg_name, fn_name)
    chosen = choose(model_or_layer, [model_or_layer] if subclassed else mu.all_layers(model_or_layer))
    if subclassed:
        wrapper = make_wrapper(mu.copy_layer(model_or_layer), weight_positions=chosen[id(model_or_layer)])
        inputs = mu.symbolic_inputs(model_or_layer)
        return keras.Model(inputs, wrapper(inputs), name=f"{model_or_layer.name}_{suffix}")

    def clone_function(layer):
        new = mu.copy_layer(layer)
        return make_wrapper(new, weight_positions=chosen[id(layer)]) if id(layer) in chosen else new

    return _graph.map_layers(model_or_layer, clone_function)


def strip(model, kind=STRIPPED):
    """A copy of `model` in which every wrapper of type `kind` is replaced by its `stripped_layer()`.

    `model` is a Sequential or Functional model. By default every pruning and clustering wrapper is
    stripped; QAT wrappers (which the converter reads) are kept.
    """

    def clone_function(layer):
        if _is(layer, kind) and _is(layer, STRIPPED):
            return layer.stripped_layer()
        return mu.copy_layer(layer)

    return _graph.map_layers(model, clone_function)
