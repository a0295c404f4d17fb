"""`convert`: Keras 3 model -> a verified `.tflite` for phones (LiteRT), Coral Edge TPU or microcontrollers.

The model is traced with `keras.export.ExportArchive` on static batch-1 `TensorSpec`s (in its input structure)
and converted with `TFLiteConverter.from_concrete_functions([fn], archive)`. `from_keras_model` writes and reloads
a SavedModel (MobileNetV2: ~4x slower end to end, identical int8 outputs) and keeps Keras' `None` batch: `-1`
shape signatures (the Edge TPU compiler rejects them) and SHAPE / STRIDED_SLICE / PACK ops around Flatten. A
SavedModel directory is re-exported with a static batch 1. Never set, on purpose: `SELECT_TF_OPS` (the default of
`model.export(format="litert")`: Flex ops no runtime here has) and `Optimize.EXPERIMENTAL_SPARSITY` (int8 DENSIFY
makes XNNPACK fail to prepare in ai-edge-litert 2.3.0; its sparse inference is float-only, no speedup on x86).

The converter leaves the I/O tensors unnamed ("Identity"), so `_with_names` names them after the Keras inputs
and outputs and records the I/O structure (`_structure`). Every result is then checked (`_verify`,
`_sanity_run`), and by its target (`_TARGETS`).
"""

import functools
import os
import re
import tempfile
import time
import warnings
from typing import NamedTuple

import keras
import numpy as np

import tfopt
from tfopt import _checks, _int8_forms, _wrappers
from tfopt.tflite_export import _flatbuffer, _structure, analysis as _analyze, edgetpu as _edgetpu, micro as _micro
from tfopt.tflite_export import runtime as _runtime
from tfopt.tflite_export._errors import ConversionError
from tfopt.tflite_export._io import atomic_write

IO_DTYPES = ("int8", "uint8", "int16", "float32")
DEFAULT_MAX_SAMPLES = 300
MICRO_CHECK_SAMPLES = 16


class _Mode(NamedTuple):
    """What a mode allows, and for the integer modes (calibrated, every tensor checked) their dtypes."""

    io_dtypes: tuple  # the dtypes of the model's float inputs and outputs, the default first
    activations: str = None  # integer modes: the dtype of every activation
    constants: tuple = ()  # integer modes: the dtypes constants may have (bool: a constant mask, e.g. causal)
    ops_set: str = None  # integer modes: the converter's `tf.lite.OpsSet` for calibrated (not QAT) models


_MODES = {
    "int8": _Mode(("int8", "uint8", "float32"), "int8", ("int8", "int32", "int64", "bool"),
                  "TFLITE_BUILTINS_INT8"),
    "float16": _Mode(("float32",)),
    "dynamic": _Mode(("float32",)),
    "float32": _Mode(("float32",)),
    "int16x8": _Mode(("float32", "int16"), "int16", ("int8", "int16", "int32", "int64", "bool"),
                     "EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8"),
}
MODES = tuple(_MODES)


class _Target(NamedTuple):
    """What a target takes, and what `convert` checks on what the converter made for it."""

    modes: tuple = MODES
    io_dtypes: tuple = None  # None: those of the mode
    xnnpack: bool = True  # the sanity run also runs XNNPACK, LiteRT's default CPU runtime
    one_subgraph: bool = False  # control flow (a second subgraph) is a problem
    # check(content, samples, layer) -> (result, error or None): `result` becomes the `TFLiteModel`
    # attribute named after the target; `error` is raised (strict) or warned about.
    check: object = None


_TARGETS = {
    "mobile": _Target(),
    "edgetpu": _Target(("int8",), ("int8", "uint8"), one_subgraph=True, check=_edgetpu.check_converted),
    "micro": _Target(("int8",), xnnpack=False, one_subgraph=True, check=_micro.check_converted),
}
TARGETS = tuple(_TARGETS)

_FAKE_QUANT_OPS = ("FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel", "FakeQuantWithMinMaxArgs",
                   "QuantizeAndDequantizeV2", "QuantizeAndDequantizeV3", "QuantizeAndDequantizeV4")


def _tf():
    import tensorflow as tf  # the only place in tfopt that imports TF; heavy, so only when converting

    return tf


class TFLiteModel:
    """A converted `.tflite` model: its bytes, what is inside, and ways to run it.

    Attributes:
        content: the flatbuffer (bytes).
        report: `analyze(content)`: ops, dtypes, sizes, I/O quantization.
        edgetpu: the `EdgeTPUReport` (target "edgetpu"), else None.
        micro: the `MicroResult` of the TFLite Micro run (target "micro"), else None.
        arena_bytes: the smallest TFLM tensor arena that runs the model (target "micro"), else None.
        input_names, output_names: the model's I/O names in its order (the Keras names).
        target, mode, io_dtype: what was asked; conversion_seconds: wall time of `convert`.
    """

    def __init__(self, content, *, target=None, mode=None, io_dtype=None, edgetpu=None, micro=None,
                 conversion_seconds=None, report=None):
        _flatbuffer.check_identifier(content, f"content=<{len(content)} bytes>")
        self.content = bytes(content)
        self.target, self.mode, self.io_dtype = target, mode, io_dtype
        self.edgetpu, self.micro, self.conversion_seconds = edgetpu, micro, conversion_seconds
        if report is not None:
            self.report = report

    @classmethod
    def load(cls, path):
        """A `TFLiteModel` for an existing `.tflite` file (any origin)."""
        return cls(_flatbuffer.read_bytes(path, "path"))

    @property
    def arena_bytes(self):
        return None if self.micro is None else self.micro.arena_bytes

    @functools.cached_property
    def report(self):
        return _analyze.analyze(self.content)

    @functools.cached_property
    def _runner(self):
        return _runtime.Runner(self.content)

    def __len__(self):
        return len(self.content)

    def __repr__(self):
        return f"<TFLiteModel {len(self.content):,} B target={self.target} mode={self.mode} io={self.io_dtype}>"

    def save(self, path):
        """Writes the model to `path` atomically (temp file in the same directory, then rename).

        Returns:
            The path written.
        """
        return atomic_write(path, self.content)

    def save_c_array(self, path_stem, var_name="g_model"):
        """Writes `<path_stem>.h` and `<path_stem>.cc` with the model as a 16-byte aligned C array.

        Example:
            >>> tfl.save_c_array("firmware/model_data", var_name="g_model")
        """
        return _micro.save_c_array(self.content, path_stem, var_name)

    @property
    def input_names(self):
        """The model's input names, in its input order (a list `predict` takes follows it)."""
        return list(self._runner.input_names)

    @property
    def output_names(self):
        """The model's output names, in its output order."""
        return list(self._runner.output_names)

    def predict(self, x):
        """Model inputs (batch first) -> outputs, on LiteRT, in the Keras model's structure.

        `x` is what the Keras model takes: an array (one input), a list of arrays in input order
        (`input_names`) or a dict keyed by input name. Float inputs are quantized and outputs
        dequantized with the I/O tensors' parameters; integer inputs (token ids, masks) go in as
        integers. A static batch-1 model runs sample by sample, so any batch size works.

        Returns:
            One float array for a single output; else a list, or a dict keyed by output name when
            the Keras model returns a dict (a file made elsewhere: a list, in its own order).

        Raises:
            ValueError: an input missing, unknown, of the wrong shape or dtype (float token ids), or
                inputs with different batch sizes.

        Example:
            >>> tfl.predict({"image": images, "meta": meta})["cls"].argmax(-1)
        """
        return self._runner.predict(x)

    def evaluate(self, x, y):
        """Classification accuracy on LiteRT; `y` holds integer labels or one-hot rows.

        With several outputs, `y` is a list with one label array per output or a dict keyed by
        output name (leave out outputs without labels, e.g. regression heads), and the result is a
        dict {output name: accuracy}.

        Example:
            >>> tfl.evaluate({"image": images, "meta": meta}, {"cls": labels})
        """
        return self._runner.evaluate(x, y)

    def benchmark(self, runs=100, warmup=10, threads=1, kernels="xnnpack"):
        """Median LiteRT latency (see `tfopt.tflite_export.benchmark`)."""
        return _runtime.benchmark(self.content, runs=runs, warmup=warmup, threads=threads, kernels=kernels)


# ---------------------------------------------------------------------------------------------
# Arguments and model loading


def _check_args(target, mode, io_dtype, strict, max_samples):
    """`io_dtype` as a dtype name (the mode's default for None), once every argument is checked."""
    _checks.check_choice(target, "target", TARGETS)
    _checks.check_choice(mode, "mode", MODES)
    modes = _TARGETS[target].modes
    if mode not in modes:
        raise ValueError(f"target={target!r} runs {', '.join(modes)} models only: use "
                         f"{' or '.join(f'mode={m!r}' for m in modes)}. Received: mode={mode!r}")
    _checks.check_bool(strict, "strict")
    _checks.check_int(max_samples, "max_samples", minimum=1, hint="It caps the calibration samples: any positive "
                      f"number (default {DEFAULT_MAX_SAMPLES}).")
    allowed = _TARGETS[target].io_dtypes or _MODES[mode].io_dtypes
    if io_dtype is None:
        return allowed[0]
    if not isinstance(io_dtype, str):  # np.int8, tf.int8, ...
        try:
            io_dtype = np.dtype(getattr(io_dtype, "as_numpy_dtype", io_dtype)).name
        except TypeError:
            raise TypeError(f"`io_dtype` must be one of {IO_DTYPES}. Received: io_dtype={io_dtype!r}") from None
    return _checks.check_choice(io_dtype, "io_dtype", allowed,
                                hint=f"Those are what target={target!r} with mode={mode!r} can take.")


def _check_backend():
    backend = keras.backend.backend()
    if backend != "tensorflow":
        # The converter traces the model as a TensorFlow graph: a JAX or PyTorch model object cannot
        # be traced, and the backend of a process is fixed once keras is imported.
        raise RuntimeError(
            f"`tfopt.tflite_export.convert` needs the TensorFlow Keras backend; this process runs "
            f"KERAS_BACKEND={backend!r}. Save the model with `model.save('model.keras')` and convert the file "
            "with `tfopt convert model.keras -o model.tflite --target mobile` (the command converts in a "
            "TensorFlow-backend process whatever KERAS_BACKEND says), or call `convert` from a process started "
            f"with KERAS_BACKEND=tensorflow. Received: backend={backend!r}"
        )


def _load_model(model):
    """(keras model, None) or (None, `_load_saved_model(dir)`) from a model, a .keras path or a SavedModel dir."""
    if isinstance(model, keras.Model):
        return model, None
    if isinstance(model, keras.layers.Layer):
        raise TypeError(
            "`model` must be a keras Model (wrap the layer: `keras.Sequential([keras.Input(shape), layer])`). "
            f"Received: model={model.name!r} of type {type(model).__name__}"
        )
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            "`model` must be a keras Model, a path to a `.keras` file or a SavedModel directory. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    path = os.fspath(model)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No model at this path. Pass a keras Model, a `.keras` file or a SavedModel directory. Received: model={path!r}"
        )
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "saved_model.pb")):
            return None, _load_saved_model(path)
        raise ValueError(
            "This directory is not a SavedModel (it has no saved_model.pb). Pass a SavedModel directory, a "
            f"`.keras` file or a keras Model. Received: model={path!r}"
        )
    if path.endswith(".tflite"):
        raise ValueError(
            "This is already a .tflite file; inspect it with `tfopt.tflite_export.analyze` or load it with "
            f"`TFLiteModel.load`. Received: model={path!r}"
        )
    if not path.endswith((".keras", ".h5", ".hdf5")):
        raise ValueError(
            f"Not a model file: expected a `.keras` file or a SavedModel directory. Received: model={path!r}"
        )
    try:  # tfopt's serializable layers are registered: `import tfopt` above
        return keras.saving.load_model(path, compile=False), None
    except Exception as e:  # zip / h5 / config errors all mean "cannot read this file as a model"
        raise ValueError(
            f"Could not load a Keras model from this file ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Save it with `model.save('model.keras')`. Received: model={path!r}"
        ) from None


def _load_saved_model(path):
    """(the loaded SavedModel, its serving signature, [Spec] of the signature's inputs by sorted name)."""
    loaded = _tf().saved_model.load(path)
    sigs = getattr(loaded, "signatures", {})
    if "serving_default" not in sigs:
        raise ValueError(
            "The SavedModel has no 'serving_default' signature to convert. Export it with `model.export(dir)`. "
            f"Received: model={path!r}"
        )
    sig = sigs["serving_default"]
    specs = sig.structured_input_signature[1]
    return loaded, sig, [_structure.Spec(k, tuple(v.shape.as_list()), v.dtype.name) for k, v in sorted(specs.items())]


def _stripped(model):
    """`model` with tfopt's training wrappers (pruning, clustering) stripped; itself when it has none."""
    return _wrappers.strip(model) if _wrappers.find(model, _wrappers.STRIPPED, include_self=False) else model


def _float32_twin(model):
    """`model`, or a float32 copy (same config and weights) if a layer computes in float16/bfloat16.

    The converter cannot lower a mixed graph ("binary op operands have same element type").
    """
    if all(layer.dtype_policy.compute_dtype == "float32" for layer in model._flatten_layers()):
        return model

    def to_float32(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and isinstance(node.get("config"), dict):
                return {**node, "config": {**node["config"], "name": "float32"}}
            return {k: to_float32(v) for k, v in node.items()}
        if isinstance(node, list):
            return [to_float32(v) for v in node]
        return node

    config = to_float32(keras.saving.serialize_keras_object(model))
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        twin = keras.saving.deserialize_keras_object(config)
    finally:
        keras.config.set_dtype_policy(previous)
    twin.set_weights(model.get_weights())
    return twin


def _check_weights(model):
    values = ((w, keras.ops.convert_to_numpy(w)) for w in model.weights)
    bad = [repr(w.path) for w, v in values if v.dtype.kind == "f" and not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(
            f"The model has NaN or inf weights in: {', '.join(bad)}. Check the training (learning rate, "
            f"loss) or reload good weights before converting. Received: model={model.name!r}"
        )


def _inputs(keras_model, saved, data, max_samples):
    """(kind, [Spec], samples or None), every input checked: shapes fixed by the representative data's."""
    # A subclassed model has no known inputs: the representative samples give their shape.
    io = ("dict", saved[2]) if saved else _structure.keras_inputs(keras_model, None if data is None else "input")
    if io is None:
        raise ValueError(
            "The model has no known input shape (a subclassed model?): pass representative_data, or build it "
            f"with the Functional API (`keras.Input(...)`). Received: model={keras_model.name!r}"
        )
    kind, specs = io
    samples, specs = (None, specs) if data is None else _samples(data, specs, max_samples)
    for s in specs:
        if s.shape is None or any(d is None for d in s.shape[1:]):
            raise ValueError(
                f"The model input {s.name!r} has unknown dimensions {s.shape}: give `keras.Input` a full shape, or "
                "pass representative_data so it can be fixed. Received: representative_data=None"
            )
    return kind, specs, samples


def _layer_resolver(model, output_names=()):
    """tensor name -> the Keras layer it came from (TF suffixes scope names with _1, _2 ...)."""
    if model is None:
        return _flatbuffer.layer_of
    names = {layer.name for layer in model._flatten_layers(include_self=False)}
    ops = [getattr(getattr(t, "_keras_history", None), "operation", None) for t in getattr(model, "outputs", [])]
    # `convert` names the output tensors after the Keras outputs: map them to the layers that make them.
    outputs = {n: op.name for n, op in zip(output_names, ops) if op is not None and len(ops) == len(output_names)}

    def resolve(tensor_name):
        if tensor_name in outputs:
            return outputs[tensor_name]
        for part in reversed(tensor_name.split(";")):
            for scope in part.split("/")[1:-1] or part.split("/")[:1]:
                for name in (scope, re.sub(r"_\d+$", "", scope)):
                    if name in names:
                        return name
        return _flatbuffer.layer_of(tensor_name)

    return resolve


# ---------------------------------------------------------------------------------------------
# Representative data


def _is_batch(data, k):
    """Whether `data` is itself one batch of inputs (for a `k`-input model), not an iterable of them."""
    if _structure.is_array(data) or isinstance(data, dict):
        return True
    if not isinstance(data, (list, tuple)) or not data:
        return False
    if k > 1 and all(_structure.is_array(v) for v in data):
        return True  # one array per input
    head = data[0]  # Keras' `(x, y)`: x an array, a dict, or (k > 1) a list of one array per input
    return isinstance(data, tuple) and (isinstance(head, dict) or (
        _structure.is_array(head) if k == 1 else isinstance(head, (list, tuple))))


def _iter_raw(data, k):
    if callable(data) and not hasattr(data, "__next__"):  # a generator function
        data = data()
    if _is_batch(data, k):
        return iter([data])
    if isinstance(data, _tf().data.Dataset):
        return data.as_numpy_iterator()
    try:
        return iter(data)
    except TypeError:
        raise TypeError(
            "`representative_data` must be a numpy array, a tf.data.Dataset, or a generator / callable yielding "
            "arrays; for a model with several inputs, a list or a dict of arrays (one per input) or any of those "
            f"yielding them. Received: representative_data of type {type(data).__name__}"
        ) from None


def _inputs_of(el, k):
    """The model inputs in one element: without Keras' `(x, y)` targets or TF's `[x]` wrapping."""
    while isinstance(el, (list, tuple)):
        if not el:
            raise ValueError("`representative_data` yielded an empty list. Received: representative_data=[]")
        if k > 1 and not isinstance(el[0], (list, tuple, dict)):
            return el  # one array per input
        el = el[0]
    return el


def _with_shapes(specs, arrays):
    """`specs` with the feature shapes of `arrays` ({name: batch-first array})."""
    return [s._replace(shape=(None,) + arrays[s.name].shape[1:]) for s in specs]


def _samples(data, specs, max_samples):
    """(up to `max_samples` validated samples of every input, {name: (N, ...) array}; `specs` with their shapes)."""
    chunks, n = [], 0
    for el in _iter_raw(data, len(specs)):
        x = _structure.named_arrays(_inputs_of(el, len(specs)), specs, "representative_data", exact_dtype=True)
        if specs[0].shape is None:  # no known model input (subclassed model): batch-first samples define it
            specs = _with_shapes(specs, x)
        take = min(len(x[specs[0].name]), max_samples - n)
        chunks.append({name: v[:take] for name, v in x.items()})
        n += take
        if n >= max_samples:
            break
    if n == 0:
        raise ValueError(
            "`representative_data` is empty: int8 calibration needs samples of real inputs (a few hundred is "
            "plenty). Received: representative_data with 0 samples"
        )
    samples = {}
    for s in specs:
        shapes = sorted({c[s.name].shape[1:] for c in chunks})
        if len(shapes) > 1:
            raise ValueError(
                f"`representative_data` samples must all have the same shape (input {s.name!r}). Received: shapes "
                f"{shapes}"
            )
        samples[s.name] = np.concatenate([c[s.name] for c in chunks])
    _structure.check_finite(samples, "representative_data", "calibration ranges would be meaningless")
    return samples, _with_shapes(specs, samples)


def _check_calibration(qat, mode, samples, loops):
    if qat and mode != "int8":
        raise ValueError(
            "This is a quantization-aware (fake-quant) model; it converts with mode='int8' only. "
            f"Received: mode={mode!r}"
        )
    if _MODES[mode].activations and not qat and samples is None:
        raise ValueError(
            f"mode={mode!r} needs representative_data for a float model: a few hundred real input samples to "
            "calibrate the int8 ranges (e.g. representative_data=x_train[:300]), or train it with QAT first "
            "(tfopt.quantize_model). Received: representative_data=None"
        )
    if _MODES[mode].activations and not qat and loops:
        # TFLite's calibrator dies with a segmentation fault on a WHILE loop (Keras 3 LSTM / GRU), with the caller.
        raise ValueError(
            f"mode={mode!r} calibrates the model, and calibrating a while loop ({', '.join(map(repr, loops))}: "
            "an RNN layer that is not unrolled) crashes TensorFlow Lite's calibrator along with this Python "
            "process, so tfopt does not run it. Build the LSTM / GRU / SimpleRNN layers with unroll=True (the "
            "sequence length must be fixed), or convert with mode='dynamic' or 'float16'. Received: mode={mode!r}"
        )


# ---------------------------------------------------------------------------------------------
# Tracing and conversion


class _Traced(NamedTuple):
    """What the converter converts, and its I/O."""

    converter: object  # () -> the `TFLiteConverter` of the traced function or the re-exported SavedModel
    output_kind: str
    output_names: list  # in the order of the converted model's outputs
    output_dtypes: list
    order: list  # the input names in the function's argument order, for calibration lists; None: dicts by name
    fake_quant: bool  # the graph has fake-quant ops (a QAT model)
    loops: list  # the names of its while loops (RNN layers that are not unrolled)


def _tensor_names(specs):
    """{TF tensor name: input name}: the input names as far as TF allows ([A-Za-z0-9_.], no leading _)."""
    names = [re.sub(r"[^A-Za-z0-9_.]", "_", s.name) for s in specs]
    return {n if n[:1].isalnum() else f"input{n}": s.name for n, s in zip(names, specs)}


def _tensor_specs(specs):
    """Static batch-1 `tf.TensorSpec`s named like the inputs (see `_tensor_names`)."""
    tf = _tf()
    return [tf.TensorSpec((1,) + tuple(s.shape[1:]), s.dtype, name=n) for n, s in zip(_tensor_names(specs), specs)]


def _has_fake_quant(graph_def):
    nodes = [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]
    return any(n.op in _FAKE_QUANT_OPS for n in nodes)


def _loops(graph_def):
    return [n.name for n in graph_def.node if n.op in ("While", "StatelessWhile")]


def _trace_keras(model, kind, specs):
    """`model(x, training=False)` traced on static batch-1 signatures, `x` in the model's input structure, with
    LayerNormalization, Softmax and MultiHeadAttention in their int8-friendly forms (`tfopt._int8_forms`).

    The trackable is the `ExportArchive`, which holds the variables: `trackable_obj=model` silently drops
    Keras 3 weights (a NaN model).
    """
    tf = _tf()
    tensor_specs = _tensor_specs(specs)
    arg = {s.name: t for s, t in zip(specs, tensor_specs)} if kind == "dict" else (
        tensor_specs if kind == "list" else tensor_specs[0])
    archive = keras.export.ExportArchive()
    archive.track(model)
    with _int8_forms.forms(model):  # traced as int8 kernels can run it; the model is as it was afterwards
        fn = archive.add_endpoint("serve", functools.partial(model.__call__, training=False), [arg])
        concrete = fn.get_concrete_function()
    out_kind, out_names = _structure.outputs_of(concrete.structured_outputs, getattr(model, "output_names", None))
    dtypes = [t.dtype.name for t in tf.nest.flatten(concrete.structured_outputs)]
    names = _tensor_names(specs)
    order = [names.get(t.name.split(":")[0]) for t in concrete.inputs if t.dtype != tf.resource]
    return _Traced(functools.partial(tf.lite.TFLiteConverter.from_concrete_functions, [concrete], archive),
                   out_kind, out_names, dtypes, _structure.in_order(order, names.values()),
                   _has_fake_quant(concrete.graph.as_graph_def()), _loops(concrete.graph.as_graph_def()))


def _export_saved_model(saved, specs, directory):
    """A SavedModel's serving signature re-exported to `directory` with a static batch 1.

    Not traced: a traced call of the signature converts with inputs in an order of the converter's own, while
    the re-exported signature names them, so calibration samples are dicts.
    """
    tf = _tf()
    loaded, sig, _ = saved
    module = tf.Module()
    module.loaded = loaded
    names = [s.name for s in specs]

    @tf.function(input_signature=_tensor_specs(specs), autograph=False)
    def serve(*args):
        return sig(**dict(zip(names, args)))

    tf.saved_model.save(module, directory, signatures={"serving_default": serve})
    outputs = sorted(sig.structured_outputs)
    return _Traced(functools.partial(tf.lite.TFLiteConverter.from_saved_model, directory), "dict", outputs,
                   [sig.structured_outputs[k].dtype.name for k in outputs], None,
                   _has_fake_quant(serve.get_concrete_function().graph.as_graph_def()),
                   _loops(serve.get_concrete_function().graph.as_graph_def()))


def _rep_dataset(samples, order, quiet):
    """The calibration samples one at a time, each a list in `order` or (`order=None`) a dict by name."""
    n = len(next(iter(samples.values())))
    bar = keras.utils.Progbar(n, verbose=0 if quiet else 1, unit_name="sample")
    for i in range(n):
        sample = {name: x[i : i + 1] for name, x in samples.items()}
        yield sample if order is None else [sample[name] for name in order]
        bar.update(i + 1)


def _run_converter(traced, mode, io_dtype, qat, samples, quiet):
    tf = _tf()
    converter = traced.converter()
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if _MODES[mode].activations:
        # The converter sets these on float inputs and outputs only: integer ones (token ids) stay integer.
        converter.inference_input_type = converter.inference_output_type = tf.as_dtype(io_dtype)
    if _MODES[mode].activations and not qat:  # not for QAT: TFLITE_BUILTINS_INT8 demands a representative dataset
        converter.representative_dataset = functools.partial(_rep_dataset, samples, traced.order, quiet)
        converter.target_spec.supported_ops = [getattr(tf.lite.OpsSet, _MODES[mode].ops_set)]
    try:
        return converter.convert()
    except Exception as e:
        text = str(e)
        lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()] or text.splitlines()[:3]
        raise ConversionError(
            f"The TFLite converter failed ({type(e).__name__}): {' | '.join(lines[:4])[:800]}. A layer without an "
            f"integer TFLite kernel is the usual cause for mode='int8'; try mode='float32' to see whether the model "
            f"converts at all. Received: mode={mode!r}"
        ) from e


def _with_names(content, input_kind, specs, traced):
    """`content` with the model's names on its I/O tensors, a signature and the `tfopt_io` metadata."""
    # The names the converter left, in the subgraph's order: a SavedModel's signature names the tensors; traced,
    # the inputs carry their TensorSpec names and the outputs none ("Identity"), coming in flat order.
    (_, ins), (_, outs) = _structure.file_io(_flatbuffer.parse(content))
    in_names, tensor_names = [s.name for s in specs], _tensor_names(specs)
    sg_in = _structure.in_order([tensor_names.get(name) for name, _ in ins], in_names)
    sg_out = _structure.in_order([name for name, _ in outs], traced.output_names)
    meta = _structure.metadata((input_kind, in_names), (traced.output_kind, traced.output_names))
    return _flatbuffer.with_io_names(content, sg_in, sg_out, {_structure.IO_METADATA: meta})


# ---------------------------------------------------------------------------------------------
# Verification


def _float_ops(sg, edge, layer):
    """"NEG x5 (layer 'bert', e.g. tensor '.../embeddings_layer_norm/Neg')": the ops an integer graph runs
    in float, with the layer and the first tensor of each (its name scope shows the sublayer)."""
    found = {}
    for op, _ in _analyze._float_leaks(sg, edge):
        out = sg.output_name(op)
        found.setdefault(op.name, []).append((layer(out), out))
    return [f"{name} x{len(hits)}" + (f" (layer {hits[0][0]!r}, e.g. tensor {hits[0][1]!r})" if hits[0][0] else "")
            for name, hits in found.items()]


def _verify(content, *, target, mode, io_dtype, layer, integer_io=()):
    """A `ConversionError` listing what the converter emitted short of what was asked; None when it is all there.

    `integer_io`: the I/O tensors that are integers in Keras (token ids, masks); they stay unquantized, and the
    ops computed from them alone (index arithmetic, bool masks) are integer work, not float leaks.
    """
    fm = _flatbuffer.parse(content)
    sg = fm.subgraphs[0]
    problems = []

    def where(t):
        return f"tensor {t.name!r} (layer {layer(t.name)!r})"

    for kind, idxs in (("input", sg.inputs), ("output", sg.outputs)):
        for i in idxs:
            t = sg.tensors[i]
            if t.name in integer_io:
                if t.dtype in _analyze._FLOAT or t.quantized:
                    problems.append(f"{kind} {t.name!r} is {t.dtype}{' (quantized)' * t.quantized}: an integer "
                                    "Keras input or output must stay an unquantized integer")
            elif t.dtype != io_dtype:
                problems.append(f"{kind} {t.name!r} is {t.dtype}, asked for io_dtype={io_dtype!r}")
            sig = t.shape_signature or t.shape
            if kind == "input" and (not sig or sig[0] != 1):
                problems.append(f"input {t.name!r} has batch {sig[0] if sig else '?'}, expected a static batch 1")
    dyn = [t for t in sg.tensors if t.is_dynamic]
    if dyn:
        problems.append(f"{len(dyn)} tensor(s) have dynamic shapes, e.g. {where(dyn[0])}: {list(dyn[0].shape_signature)}")
    if len(fm.subgraphs) > 1 and _TARGETS[target].one_subgraph:
        problems.append(f"{len(fm.subgraphs)} subgraphs (control flow)")
    act = _MODES[mode].activations
    if act:
        edge = _analyze.io_edge_ops(sg)
        float_ops = _float_ops(sg, edge, layer)
        if float_ops:
            problems.append(f"float ops in the integer graph: {', '.join(float_ops)}")
        edge_tensors = set(sg.inputs) | set(sg.outputs) | {
            t for i in edge for t in sg.operators[i].inputs + sg.operators[i].outputs if sg.tensors[t].dtype != act}
        index = {i for i in sg.inputs if sg.tensors[i].name in integer_io}
        for op in sg.operators:
            live = [t for t in op.inputs if t >= 0 and not sg.tensors[t].is_constant]
            outs = [sg.tensors[t] for t in op.outputs]
            if live and set(live) <= index and all(t.dtype not in _analyze._FLOAT and not t.quantized for t in outs):
                index.update(op.outputs)
            if op.name in ("QUANTIZE", "DEQUANTIZE") and op.index not in edge:
                src, out = sg.tensors[op.inputs[0]], sg.tensors[op.outputs[0]]
                if op.name == "QUANTIZE" and src.dtype == out.dtype == act:
                    continue  # an integer requantization (e.g. before a concatenation), not a float island
                problems.append(f"{op.name} inside the graph at op #{op.index} ({where(out)}): part of it runs in float")
        for t in (t for t in sg.tensors if t.index not in edge_tensors and t.index not in index):
            if t.dtype not in (_MODES[mode].constants if t.is_constant else (act,)):
                problems.append(f"{where(t)} is {t.dtype} ({'constant' if t.is_constant else 'activation'})")
    if not problems:
        return None
    return ConversionError(
        f"The converted model is not what target={target!r}, mode={mode!r} asked for: " + "; ".join(problems[:8])
        + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        + ". Layers without an integer TFLite kernel (a custom layer's own math, an LSTM's gate split) leave "
        "float ops; replace them or use mode='float16'. "
        f"Received: target={target!r}, mode={mode!r}, io_dtype={io_dtype!r}"
    )


def _head(samples, n):
    return {name: x[:n] for name, x in samples.items()}


def _sanity_run(content, samples, xnnpack=True):
    runner = _runtime.Runner(content, kernels="builtin")
    ys = runner.predict_flat(samples)
    if xnnpack:
        # LiteRT's default CPU runtime: XNNPACK refuses quantization parameters the reference kernels accept
        # (e.g. a requantization scale >= 256), so a file that passes the builtin run can still fail on a phone.
        try:
            _runtime.Runner(content, kernels="xnnpack").predict_flat(_head(samples, 1))
        except (RuntimeError, ValueError) as err:
            raise ConversionError(
                "The converted model runs on the reference kernels but LiteRT's default CPU runtime (XNNPACK) "
                "refuses it, usually because an int8 scale is degenerate (an activation or weight range of ~0, "
                "e.g. a layer whose outputs are all zero). Check the model for dead layers or NaN/inf weights. "
                f"Received: XNNPACK error {str(err).splitlines()[0][:200]!r}"
            ) from None
    bad = [name for name, v in zip(runner.output_names, ys)
           if v.dtype.kind == "f" and not np.all(np.isfinite(v))]
    if bad:
        raise ConversionError(
            "The converted model outputs NaN or inf on the calibration samples (output(s) "
            f"{', '.join(map(repr, bad))}); the conversion lost the weights or the model is numerically broken. "
            "Received: outputs with non-finite values"
        )


def _raise_or_warn(error, strict):
    """Raises `error` (strict), or warns about it at the caller of `convert`; nothing for None."""
    if error is not None and strict:
        raise error
    if error is not None:
        warnings.warn(str(error), stacklevel=3)


def convert(model, *, target="mobile", mode="int8", representative_data=None, io_dtype=None, strict=True,
            max_samples=DEFAULT_MAX_SAMPLES, quiet=False):
    """Converts a Keras 3 model to a verified `.tflite` for a deployment target.

    Pruning and clustering wrappers are stripped first. Models with fake-quant ops (QAT:
    `tfopt.quantize_model` or hand-made with `keras.quantizers.fake_quant_with_min_max_vars`) take the
    QAT path: their trained ranges are used and no representative data is needed. Float models need
    `representative_data` for `mode="int8"` / `"int16x8"` (post-training calibration).

    Targets:
        "mobile": LiteRT on phones / CPUs (XNNPACK); any mode; float or integer I/O.
        "edgetpu": Coral Edge TPU: int8, int8 (default) or uint8 I/O, static batch 1; `.edgetpu` holds
            the per-op report and with `strict=True` an op that would not map is an error.
        "micro": TensorFlow Lite Micro: int8; the model is run in TFLM (in a subprocess) on the
            calibration samples and must give LiteRT's outputs; `.arena_bytes` is the smallest arena.

    LayerNormalization, masked Softmax and MultiHeadAttention are traced in int8-friendly forms (the same
    outputs to float rounding, see `tfopt._int8_forms`): transformers then calibrate and convert fully int8.

    Every result is verified: I/O dtypes as asked, static batch 1, every output finite on LiteRT, and
    for `mode="int8"` every tensor int8 (int32 bias), no QUANTIZE/DEQUANTIZE to or from float inside
    the graph (int8 -> int8 requantization is integer work and allowed). Integer inputs stay
    unquantized integers, and the integer ops computed from them alone (e.g. a padding mask turned
    into a bool) are allowed in an int8 graph; a float op anywhere is named in the error.

    Args:
        model: a Keras model, a path to a `.keras` file, or a SavedModel directory.
        target: "mobile" (default), "edgetpu" or "micro".
        mode: "int8" (default, full integer), "float16", "dynamic" (dynamic-range), "float32" or
            "int16x8" (int16 activations, int8 weights; mobile only).
        representative_data: calibration inputs, as the model takes them: a numpy array (N, ...)
            for a single input, a list/tuple of arrays (one per input, in input order) or a dict of
            arrays keyed by input name; or a `tf.data.Dataset` or generator / callable yielding
            those (also `[x]` or `(x, y)`; batched or single samples). Every input calibrates;
            integer inputs (token ids, masks) take integers and are never quantized.
        io_dtype: dtype of the model's float inputs and outputs: "int8" (default for int8), "uint8",
            "float32" (default for float modes and int16x8) or "int16" (int16x8). Integer inputs
            and outputs keep their own dtype (int32 token ids stay int32).
        strict: fail on anything short of the target (an unmapped Edge TPU op, a float op in an int8
            graph). With False the model is returned and the problems are warned about and reported.
        max_samples: calibration sample cap (default 300).
        quiet: no calibration progress bar.

    Returns:
        A `TFLiteModel` (`.content`, `.save(path)`, `.report`, `.predict(x)`, `.evaluate(x, y)`,
        `.benchmark()`, `.save_c_array(stem)`). Its I/O tensors carry the Keras input and output
        names, and `.predict` answers in the Keras model's output structure.

    Raises:
        ValueError: a bad argument, NaN weights, a path that is not a model, or representative data
            that does not fit the model (an input missing or unknown, the wrong dtype, shape or list
            length, inputs with different batch sizes); raised before anything is converted.
        TypeError: an argument of the wrong type (`strict=1`, `max_samples="300"`, a layer for `model`).
        ConversionError: (a ValueError) the converter failed or emitted something that is not what
            was asked; `EdgeTPUError` / `MicroError` for the target checks.
        FileNotFoundError: `model` is a path that does not exist.
        RuntimeError: the process runs another Keras backend than TensorFlow (JAX, PyTorch): save
            the model as `.keras` and run `tfopt convert model.keras -o model.tflite`, which
            converts in a TensorFlow-backend process.

    Example:
        >>> tfl = tfopt.tflite_export.convert(model, target="edgetpu", representative_data=x_train[:300])
        >>> tfl.save("model_int8.tflite"); print(tfl.edgetpu)
        >>> tfl = tfopt.tflite_export.convert(bert_classifier, mode="float16")  # int32 token_ids, padding_mask, ...
        >>> tfl.predict({"token_ids": ids, "segment_ids": segments, "padding_mask": mask})
    """
    _check_backend()
    start = time.perf_counter()
    io_dtype = _check_args(target, mode, io_dtype, strict, max_samples)
    keras_model, saved = _load_model(model)
    if keras_model is not None:
        keras_model = _float32_twin(_stripped(keras_model))
        _check_weights(keras_model)
    kind, specs, samples = _inputs(keras_model, saved, representative_data, max_samples)
    with tempfile.TemporaryDirectory(prefix="tfopt-export-", ignore_cleanup_errors=True) as tmp:  # for a SavedModel
        traced = _trace_keras(keras_model, kind, specs) if saved is None else _export_saved_model(saved, specs, tmp)
        qat = (keras_model is not None and tfopt.is_quantized_model(keras_model)) or traced.fake_quant
        _check_calibration(qat, mode, samples, [_layer_resolver(keras_model)(n) or n for n in traced.loops])
        content = _with_names(_run_converter(traced, mode, io_dtype, qat, samples, quiet), kind, specs, traced)
    layer = _layer_resolver(keras_model, traced.output_names)
    integer_io = {s.name for s in specs if s.is_integer} | {
        n for n, d in zip(traced.output_names, traced.output_dtypes) if np.dtype(d).kind in "iub"}
    _raise_or_warn(_verify(content, target=target, mode=mode, io_dtype=io_dtype, layer=layer,
                           integer_io=integer_io), strict)
    if samples is None:
        samples = _runtime.random_samples(content, MICRO_CHECK_SAMPLES)
    _sanity_run(content, _head(samples, 4), xnnpack=_TARGETS[target].xnnpack)
    checked = {}
    if _TARGETS[target].check is not None:
        checked[target], error = _TARGETS[target].check(content, _head(samples, MICRO_CHECK_SAMPLES), layer)
        _raise_or_warn(error, strict)
    return TFLiteModel(content, target=target, mode=mode, io_dtype=io_dtype,  # .edgetpu, .micro: `checked`
                       conversion_seconds=time.perf_counter() - start, **checked)
