"""Knowledge distillation on `keras.distillation` (Keras 3.12+): `distill`, `strip_distillation`.

`distill(teacher, student)` returns a `keras.distillation.Distiller` with one
`keras.distillation.LogitsDistillation` loss: nothing is reimplemented. It
minimizes ::

    alpha * L_student(y, s) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))

with ``t`` and ``s`` the teacher's and the student's logits and ``T`` the
`temperature` (Hinton et al., 2015; the ``T^2`` keeps the soft term's
gradients at the scale of the hard one). ``L_student`` is the loss given to
``distiller.compile(loss=...)``.

What tfopt adds around it (README.md, "Distillation"): the KL term really is the one above (a
`keras.losses.KLDivergence` instance, not LogitsDistillation's default string: see the comment in `distill`);
validation first, with messages that say what to fix; a frozen copy of the teacher (yours is untouched); a student
trained in place, which may be pruned, clustered or QAT-wrapped, and `strip_distillation` to export it.
"""

import numbers

import keras

from tfopt import _model_utils as mu
from tfopt import _graph, _wrappers
from tfopt.qat_layers import activation_name

__all__ = ["distill", "strip_distillation"]

_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid", "log_softmax")


def _output_layers(model):
    """The layers computing the outputs of a Sequential or Functional `model` (nested models looked into)."""
    if not getattr(model, "outputs", None):  # a Sequential built without a symbolic graph
        return model.layers[-1:]
    graph = _graph.Graph(model)
    return [graph.producer(c).op for c in graph.outputs if graph.producer(c) is not None]


def _final_activation(layer):
    """The activation applied last by `layer` (unwrapping wrappers), or None."""
    while isinstance(layer, keras.layers.Wrapper):
        layer = layer.layer
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    return activation_name(layer.activation) if hasattr(layer, "activation") else None


def _check_model(model, arg_name):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{arg_name}` must be a keras Model. Received: {arg_name}={model!r} of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"`{arg_name}` must be built: give it an Input (e.g. `keras.Input(shape=...)` as its first layer) or "
            f"call `{arg_name}.build(input_shape)` first. Received: {arg_name}={model.name!r} (not built)"
        )
    for layer in _output_layers(model) if mu.is_graph_model(model) else []:
        act = _final_activation(layer)
        if act in _PROBABILITY_ACTIVATIONS:
            raise ValueError(
                f"The {arg_name} must output logits, but its output layer {mu.describe(layer)} applies {act!r}: "
                "distillation softens logits with the temperature, which probabilities no longer allow. Rebuild "
                f"it with `activation=None` on that layer (and train with `from_logits=True` losses). "
                f"Received: {arg_name}={model.name!r}"
            )


def _shapes(tensors):
    return [tuple(t.shape[1:]) for t in keras.tree.flatten(tensors)]


def _check_number(name, value, low, high, low_open, message):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number: {message}. Received: {name}={value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        raise ValueError(f"`{name}` must be {message}. Received: {name}={value!r}")


def distill(teacher, student, temperature=3.0, alpha=0.1):
    """Returns a `keras.distillation.Distiller` that trains `student` to match `teacher`'s logits.

    The loss is ``alpha * student_loss + (1 - alpha) * T^2 * KL`` between the
    teacher's and the student's temperature-softened softmax (see the module
    docstring); ``student_loss`` is what you pass to ``compile(loss=...)``.
    Compile and fit the returned model like any other; the teacher runs in
    inference mode and is not trained. Afterwards ``distiller.student`` (the
    model you passed, trained in place) is the result, and
    `tfopt.strip_distillation` returns it ready for export.

    Args:
        teacher: a trained, built Sequential or Functional model that outputs
            logits. It is not modified: a frozen copy is distilled from.
        student: a built model with the teacher's input and output shapes
            that outputs logits; may be pruned (`tfopt.prune_low_magnitude`:
            add `tfopt.callbacks.UpdatePruningStep()` to `fit`), clustered
            (`tfopt.cluster_weights`) or QAT-wrapped (`tfopt.quantize_model`).
        temperature: softmax temperature ``T > 0`` for both models' logits
            (default 3.0, `keras.distillation.LogitsDistillation`'s).
        alpha: weight in [0, 1] of the student's own loss on the labels;
            ``1 - alpha`` weighs the distillation term (default 0.1, as in
            the Keras knowledge-distillation example).

    Returns:
        A `keras.distillation.Distiller` (``.student``, ``.teacher``); call
        ``compile(optimizer, loss=..., metrics=[...])`` then ``fit(x, y)``.

    Raises:
        TypeError: a model is not a keras Model, or `temperature` / `alpha`
            is not a number.
        ValueError: an unbuilt model, a subclassed teacher, the same object
            as teacher and student, mismatched input or output shapes, a
            model that outputs probabilities, ``temperature <= 0`` or
            `alpha` outside [0, 1].

    Example:
        >>> distiller = tfopt.distill(teacher, student, temperature=3.0, alpha=0.1)
        >>> distiller.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ...                   metrics=["accuracy"])
        >>> distiller.fit(x_train, y_train, epochs=8)
        >>> tfl = tfopt.tflite_export.convert(tfopt.strip_distillation(distiller), mode="float32")
    """
    _check_model(teacher, "teacher")
    _check_model(student, "student")
    if teacher is student:
        raise ValueError(
            "`teacher` and `student` are the same model: pass a separate (smaller) student, e.g. built by "
            f"the same function with fewer filters. Received: teacher=student={teacher.name!r}"
        )
    if not mu.is_graph_model(teacher):
        raise ValueError(
            f"`teacher` must be a Sequential or Functional model: distill freezes a copy of it so that your "
            f"model stays trainable, and a subclassed model cannot be copied. Rebuild it with the Functional "
            f"API. Received: teacher={type(teacher).__name__}"
        )
    for side in ("inputs", "outputs"):
        t, s = getattr(teacher, side, None), getattr(student, side, None)
        if t is None or s is None:
            continue
        ts, ss = _shapes(t), _shapes(s)
        if len(ts) != len(ss) or any(
            len(a) != len(b) or any(x is not None and y is not None and x != y for x, y in zip(a, b))
            for a, b in zip(ts, ss)
        ):
            raise ValueError(
                f"The teacher and the student must have the same {side[:-1]} shapes (batch excluded): the student "
                f"learns the teacher's {'logits' if side == 'outputs' else 'function'} on the same data. "
                f"Received: teacher {side}={ts}, student {side}={ss}"
            )
    _check_number("temperature", temperature, 0.0, None, True, "a positive temperature, e.g. 3.0")
    _check_number("alpha", alpha, 0.0, 1.0, False, "in [0, 1] (the weight of the student's own loss)")

    # Op nodes (`x * 2.0`) are stateless Operations, not Layers: shared as they are.
    frozen = _graph.map_layers(teacher)
    return keras.distillation.Distiller(
        teacher=frozen,
        student=student,
        # A KLDivergence *instance*: LogitsDistillation's default loss string "kl_divergence" resolves to the plain
        # function, which fails its isinstance(KLDivergence) check, so Keras 3.15 then applies KL to the scaled
        # logits themselves (no softmax, no T^2). Measured in test_distillation.py::test_loss_matches_the_numpy_formula.
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=float(temperature), loss=keras.losses.KLDivergence()
        ),
        student_loss_weight=float(alpha),
        name=f"distill_{student.name}",
    )


def strip_distillation(distiller):
    """The trained student of a `distill` run, ready for `tfopt.tflite_export.convert`.

    Pruning wrappers are stripped (`tfopt.strip_pruning`) and clustering
    wrappers too (`tfopt.strip_clustering`); a QAT student is returned as it
    is (the converter reads its fake-quant ranges).

    Args:
        distiller: a `keras.distillation.Distiller` (e.g. from `tfopt.distill`).

    Returns:
        A new, stripped model when the student holds pruning or clustering
        layers, else ``distiller.student`` itself.

    Raises:
        TypeError: `distiller` is not a `keras.distillation.Distiller`.

    Example:
        >>> student = tfopt.strip_distillation(distiller)
        >>> tfopt.tflite_export.convert(student, target="mobile", representative_data=x[:300])
    """
    if not isinstance(distiller, keras.distillation.Distiller):
        raise TypeError(
            "`distiller` must be the keras.distillation.Distiller returned by `tfopt.distill` (for a plain model, "
            f"use tfopt.strip_pruning / tfopt.strip_clustering). Received: distiller={distiller!r} of type "
            f"{type(distiller).__name__}"
        )
    student = distiller.student
    return _wrappers.strip(student) if _wrappers.find(student, _wrappers.STRIPPED) else student
