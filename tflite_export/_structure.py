"""The inputs and outputs of a model: names, structure, and the checks on the arrays fed to it.

A Keras model takes and returns a tensor, a list or a dict; the `tfopt_io` metadata entry of a `.tflite`
made by `convert` records which, with the names in `keras.tree.flatten` order (dicts by sorted key), so
`predict` answers in that structure. A file made elsewhere answers with a list in its own order.
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


def keras_inputs(model, unknown=None):
    """(kind: "single", "list" or "dict", [Spec] in flat order) of a Keras model's inputs, named by key or Input.

    A model without known inputs (subclassed) gives None, or with `unknown` (a name) one float input of any shape.
    """
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # a subclassed model: no known inputs
        inputs = None
    if not inputs:
        return None if unknown is None else ("single", [Spec(unknown, None, "float32")])
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
    """(kind, names) of a traced function's outputs in `tf.nest.flatten` order: dict keys, else `keras_names`
    when they are as many and unique, else output_0, output_1, ..."""
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
    """((kind, [(name, tensor index)]) of the inputs, the same of the outputs) of a parsed `.tflite`: from its
    `tfopt_io` metadata and "serving_default" signature, else the tensor names in the subgraph's order."""
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


def in_order(found, names):
    """`found` (names read back from TF, the converter or a model) when it holds exactly `names`; else
    `names`, whose order is kept where a name is lost (TF renames a tensor, a model lacks output names)."""
    return list(found) if sorted(map(str, found)) == sorted(map(str, names)) else list(names)


def pack(kind, names, arrays):
    """Flat `arrays` in a structure: a single one as itself, else a list or a dict keyed by `names`."""
    if len(arrays) == 1:
        return arrays[0]
    return dict(zip(names, arrays)) if kind == "dict" else list(arrays)


def by_name(value, names, arg, *, what="input", subset=False):
    """[(name, item, label: ``x['image']``)] of `value`, a dict keyed by `names` (`subset`: by some), a list in
    their order or (one name) the item itself. ValueError for anything else, listing the names."""
    listed = ", ".join(map(repr, names))
    if isinstance(value, dict):
        unknown = [k for k in value if k not in names]
        missing = [] if subset else [n for n in names if n not in value]
        if unknown or missing or not value:
            raise ValueError(
                f"`{arg}` must be keyed by the model's {what} names ({listed})"
                + (f"; the model has no {what} called {', '.join(map(repr, unknown))}" if unknown else "")
                + (f"; {', '.join(map(repr, missing))} missing" if missing else "")
                + f". Rename or add the entries. Received: {arg} with keys {sorted(map(str, value))}"
            )
        return [(n, value[n], f"{arg}[{n!r}]") for n in names if n in value]
    if isinstance(value, (list, tuple)) and not (len(names) == 1 and len(value) != 1):
        if len(value) != len(names):
            raise ValueError(
                f"`{arg}` must hold one array per model {what} ({len(names)}: {listed}), in that order, or be a "
                f"dict keyed by those names. Received: {arg} as a {type(value).__name__} of {len(value)} item(s)"
            )
        return [(n, v, f"{arg}[{i}]") for i, (n, v) in enumerate(zip(names, value))]
    if len(names) == 1:
        return [(names[0], value, arg)]
    raise ValueError(
        f"The model has {len(names)} {what}s ({listed}): `{arg}` must be a list of one array per {what}, in that "
        f"order, or a dict keyed by {what} name" + (" (some of them)" if subset else "")
        + f". Received: {arg} of type {type(value).__name__}"
    )


def is_array(v):
    """A numpy array or a framework tensor (anything with a shape and a dtype)."""
    return hasattr(v, "shape") and hasattr(v, "dtype")


def named_arrays(value, specs, arg, *, exact_dtype=False, non_numeric=ValueError):
    """{input name: batch-first array} of one batch of inputs (see `by_name`), every array checked.

    Integer inputs must get integers (float token ids are never rounded); with `exact_dtype`, float inputs
    floats (calibration: an unscaled uint8 image is a mistake). ValueError (`non_numeric` for strings).
    """
    by_spec = {s.name: s for s in specs}
    out = {name: _checked(raw, by_spec[name], label, exact_dtype, non_numeric)
           for name, raw, label in by_name(value, list(by_spec), arg)}
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
