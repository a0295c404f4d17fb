"""The inputs and outputs of a model: names, structure, and the checks on the arrays fed to it.

A Keras model takes and returns a single tensor, a list or a dict. `convert` writes that into the
`.tflite` it makes: the I/O tensors carry the Keras names, a "serving_default" signature maps the
names to the tensors, and the `tfopt_io` metadata entry records the structure (kind and names in
`keras.tree.flatten` order: lists in order, dicts by sorted key). `TFLiteModel.predict` and
`compare` read it back, so a file answers in its Keras model's structure; a file made elsewhere
answers with a list in its own order (a single array for a single output).
"""

import json
from typing import NamedTuple

import numpy as np

IO_METADATA = "tfopt_io"


class Spec(NamedTuple):
    """One model input: its name, shape (batch first; None where unknown) and dtype name."""

    name: str
    shape: tuple
    dtype: str

    @property
    def is_integer(self):
        """Token ids, masks, segment ids: fed and stored as integers, never quantized."""
        return np.dtype(self.dtype).kind in "iub"


def keras_inputs(model):
    """(kind, [Spec]) of a Keras model's inputs in flat order; None when it has no known inputs.

    kind is "single", "list" or "dict"; dict inputs are named by their key, others by the name of
    their `keras.Input`.
    """
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # a subclassed model: no known inputs
        return None
    if not inputs:
        return None
    struct = getattr(model, "_inputs_struct", inputs)  # Functional: the structure `model(...)` takes
    if isinstance(struct, dict):
        kind, named = "dict", sorted(struct.items())
    else:
        flat = list(struct) if isinstance(struct, (list, tuple)) else [struct]
        kind, named = ("single" if len(flat) == 1 else "list"), [(t.name, t) for t in flat]
    bad = [name for name, t in named if not hasattr(t, "shape")]
    if bad:
        raise ValueError(
            f"`convert` handles models whose inputs are a tensor, a list or a dict of tensors; the inputs {bad} "
            f"of this one are nested structures. Flatten them into one dict of `keras.Input`s. "
            f"Received: model={model.name!r}"
        )
    return kind, [Spec(name, tuple(t.shape), str(t.dtype)) for name, t in named]


def outputs_of(structured, keras_names):
    """(kind, names) of a traced function's outputs in flat order (`tf.nest.flatten`'s).

    Dicts are named by key; a list or a single tensor by the Keras model's `output_names` when they
    are as many and unique, else output_0, output_1, ...
    """
    import tensorflow as tf

    if isinstance(structured, dict) and all(tf.is_tensor(v) for v in structured.values()):
        return "dict", sorted(structured)
    flat = tf.nest.flatten(structured)
    if isinstance(structured, (list, tuple)) and len(flat) == len(structured):
        kind = "list"
    elif len(flat) == 1:
        kind = "single"
    else:  # nested: a flat dict keyed by the paths ("a/0"), the values in flat order
        return "dict", [path for path, _ in tf.nest.flatten_with_joined_string_paths(structured)]
    names = list(keras_names or ())
    return kind, names if len(set(names)) == len(flat) else [f"output_{i}" for i in range(len(flat))]


def metadata(inputs, outputs):
    """The `tfopt_io` entry: {"inputs": {"kind", "names"}, "outputs": {...}} as UTF-8 JSON."""
    return json.dumps({k: {"kind": kind, "names": list(names)} for k, (kind, names) in
                       (("inputs", inputs), ("outputs", outputs))}).encode()


def file_io(fm):
    """((kind, [(name, tensor index)]) for the inputs, the same for the outputs) of a parsed `.tflite`.

    From the `tfopt_io` metadata and the "serving_default" signature where the file has them; else
    the tensors' own names in the subgraph's order ("single" for one tensor, "list" for several).
    """
    sg = fm.subgraphs[0]
    sig = fm.signatures.get("serving_default")
    sig = sig if sig is not None and sig[0] == 0 else None
    raw = fm.metadata_string(IO_METADATA)
    try:
        structure = json.loads(raw) if raw else {}
    except ValueError:
        structure = {}
    result = []
    for key, indices, slot in (("inputs", sg.inputs, 1), ("outputs", sg.outputs, 2)):
        by_index = {v: k for k, v in sig[slot].items()} if sig else {}
        named = [(by_index.get(i, sg.tensors[i].name), i) for i in indices]
        entry = structure.get(key) or {}
        names = entry.get("names")
        if names and sorted(names) == sorted(n for n, _ in named):
            order = {n: i for n, i in named}
            result.append((entry["kind"], [(n, order[n]) for n in names]))
        else:
            result.append(("single" if len(named) == 1 else "list", named))
    return tuple(result)


def pack(kind, names, arrays):
    """Flat `arrays` in a structure: a single one as itself, else a list or a dict keyed by `names`."""
    if len(arrays) == 1:
        return arrays[0]
    return dict(zip(names, arrays)) if kind == "dict" else list(arrays)


def check_keys(value, names, arg, *, what="input", subset=False):
    """Raises ValueError for a dict `value` with keys outside `names` (or, unless `subset`, missing some)."""
    unknown = [k for k in value if k not in names]
    missing = [] if subset else [n for n in names if n not in value]
    if unknown or missing:
        raise ValueError(
            f"`{arg}` must be keyed by the model's {what} names ({', '.join(map(repr, names))})"
            + (f"; the model has no {what} called {', '.join(map(repr, unknown))}" if unknown else "")
            + (f"; {', '.join(map(repr, missing))} missing" if missing else "")
            + f". Rename or add the entries. Received: {arg} with keys {sorted(map(str, value))}"
        )


def is_array(v):
    """A numpy array or a framework tensor (anything with a shape and a dtype)."""
    return hasattr(v, "shape") and hasattr(v, "dtype")


def named_arrays(value, specs, arg, *, exact_dtype=False, non_numeric=ValueError):
    """{input name: batch-first array} for one batch of model inputs, after the structural checks.

    `value` is an array (a single-input model), a list/tuple in the model's input order or a dict
    keyed by input name. Integer inputs must get integers (float token ids are never rounded into
    ids); with `exact_dtype`, float inputs must get floats (calibration: an unscaled uint8 image is a
    mistake). A sample without its batch axis gets one.

    Raises:
        ValueError: a missing or unknown input, a list of the wrong length, a wrong dtype or shape,
            inputs with different batch sizes (`non_numeric` for strings and objects).
    """
    single = len(specs) == 1
    names = [s.name for s in specs]
    if isinstance(value, dict):
        check_keys(value, names, arg)
        given = [(value[n], f"{arg}[{n!r}]") for n in names]
    elif isinstance(value, (list, tuple)) and not (single and len(value) != 1):
        if len(value) != len(specs):
            raise ValueError(
                f"`{arg}` must hold one array per model input ({len(specs)}: {', '.join(map(repr, names))}), in "
                f"that order, or be a dict keyed by those names. Received: {arg} as a {type(value).__name__} of "
                f"{len(value)} item(s)"
            )
        given = [(v, f"{arg}[{i}]") for i, v in enumerate(value)]
    elif single:
        given = [(value, arg)]
    else:
        raise ValueError(
            f"The model has {len(specs)} inputs ({', '.join(map(repr, names))}): `{arg}` must be a list of one "
            f"array per input, in that order, or a dict keyed by input name. Received: {arg} of type "
            f"{type(value).__name__}"
        )
    out = {}
    for spec, (raw, label) in zip(specs, given):
        out[spec.name] = _checked(raw, spec, label, exact_dtype, non_numeric)
    sizes = {n: len(a) for n, a in out.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"The inputs in `{arg}` have different batch sizes; every input needs one row per sample (the same "
            f"samples, in the same order). Received: batch sizes {sizes}"
        )
    return out


def _checked(raw, spec, label, exact_dtype, non_numeric):
    where = f"the model input {spec.name!r}"
    value = raw.numpy() if hasattr(raw, "numpy") else raw  # a tf / torch tensor
    want = np.dtype(spec.dtype)
    try:
        x = np.asarray(value)
    except (TypeError, ValueError):  # ragged nested lists
        x = np.asarray([None])
    if x.dtype.kind not in "fiub":
        raise non_numeric(
            f"`{label}` must hold {want.name} values like {where}, not {x.dtype}: pass a numeric numpy array, batch "
            f"first. Received: {label} of type {type(raw).__name__}, dtype {x.dtype}"
        )
    if spec.is_integer and x.dtype.kind == "f":
        raise ValueError(
            f"`{label}` holds {x.dtype} values but {where} is {want.name} (token ids, masks, segment ids are fed as "
            f"integers and never rounded). Pass the integer ids themselves, e.g. `ids.astype('{want.name}')`. "
            f"Received: {label}.dtype={x.dtype}"
        )
    if exact_dtype and not spec.is_integer and x.dtype.kind != "f":
        raise ValueError(
            f"`{label}` must hold {want.name} values like {where}, not {x.dtype}. Cast it (and scale it exactly "
            f"as the model expects), e.g. `x.astype('float32') / 255`. Received: {label}.dtype={x.dtype}"
        )
    if spec.shape is not None:
        feature = tuple(spec.shape[1:])
        if x.ndim == len(feature):  # a single sample without its batch axis
            x = x[None]
        if x.ndim != len(feature) + 1 or any(f is not None and f != s for f, s in zip(feature, x.shape[1:])):
            dims = ", ".join("None" if f is None else str(f) for f in feature)
            raise ValueError(
                f"`{label}` must have shape (batch, {dims}), samples of shape ({dims}{',' * (len(feature) == 1)}), "
                f"to match {where}. Received: {label}.shape={x.shape}"
            )
    elif x.ndim == 0:
        x = x[None]
    if spec.is_integer and x.dtype != want and x.size and want.kind != "b":
        info = np.iinfo(want)
        if x.min() < info.min or x.max() > info.max:
            raise ValueError(
                f"`{label}` holds values outside the {want.name} range of {where}: [{x.min()}, {x.max()}]. Pass "
                f"ids in [{info.min}, {info.max}]. Received: {label} with values in [{x.min()}, {x.max()}]"
            )
    return x.astype(want if spec.is_integer else np.float32, copy=False)


def check_finite(named, arg, fix):
    """Raises ValueError naming the float input and the samples that hold NaN or inf."""
    for name, x in named.items():
        if x.dtype.kind != "f":
            continue
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            where = "" if len(named) == 1 else f" of input {name!r}"
            raise ValueError(
                f"`{arg}` contains NaN or inf in {len(bad)} sample(s){where} (first: index {bad[0]}). Remove or fix "
                f"them: {fix}. Received: {arg} with {len(bad)} non-finite samples"
            )
