"""Running `.tflite` models with LiteRT (`ai_edge_litert`): predict, accuracy, Keras comparison and latency.

Latency: one interpreter per model, fixed `num_threads`, inputs set outside the timed loop, warm-up
invokes, `perf_counter_ns` per invoke, median and p90 (never the mean: a shared CPU has a long tail).
"""

import dataclasses
import json
import math
import time

import keras
import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from tfopt._checks import check_choice, check_int
from tfopt.tflite_export import _flatbuffer, _structure

_RESOLVERS = {
    "xnnpack": OpResolverType.AUTO,
    "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    "reference": OpResolverType.BUILTIN_REF,
}


def make_interpreter(tflite, *, threads=1, kernels="xnnpack"):
    """An allocated LiteRT `Interpreter`; `kernels`: "xnnpack" (the delegate), "builtin" or "reference" (slow)."""
    check_choice(kernels, "kernels", _RESOLVERS)
    check_int(threads, "threads", minimum=1)
    content = _flatbuffer.read_bytes(tflite)
    it = Interpreter(model_content=content, num_threads=threads, experimental_op_resolver_type=_RESOLVERS[kernels])
    it.allocate_tensors()
    return it


def _qparams(detail):
    scale, zp = detail["quantization"]
    return float(scale), int(zp)


def quantize(x, detail):
    """Float -> the stored dtype of an I/O tensor (identity for float tensors)."""
    dtype = np.dtype(detail["dtype"])
    scale, zp = _qparams(detail)
    if dtype.kind == "f" or scale == 0:
        return np.asarray(x, dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(np.asarray(x, np.float64) / scale) + zp, info.min, info.max).astype(dtype)


def dequantize(q, detail):
    """Stored dtype -> float32 for a float or quantized I/O tensor; plain integers (ids) stay as they are."""
    scale, zp = _qparams(detail)
    kind = np.dtype(detail["dtype"]).kind
    if kind == "f" or scale == 0:
        return np.asarray(q, np.float32) if kind == "f" else np.asarray(q)
    return ((np.asarray(q, np.float32) - zp) * scale).astype(np.float32)


def _is_plain_integer(detail):
    """An integer I/O tensor without quantization: token ids, masks, an argmax. Fed and read as is."""
    return np.dtype(detail["dtype"]).kind in "iub" and _qparams(detail)[0] == 0


def _random_values(detail, shape, rng):
    """Random inputs in a tensor's stored dtype: floats in [0, 1), quantized integers over their range, and
    plain integers 0 or 1 (every vocabulary has ids 0 and 1; a mask is 0 or 1)."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return rng.random(shape, np.float32).astype(dtype)
    if _is_plain_integer(detail):
        return rng.integers(0, 2, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


class Runner:
    """Model inputs in, outputs out (in the model's structure) over any batch size, on one LiteRT interpreter.

    `input_names` / `output_names` follow `_structure.file_io`; `inputs` / `outputs`: the tensor details in that order.
    """

    def __init__(self, tflite, *, threads=1, kernels="xnnpack"):
        content = _flatbuffer.read_bytes(tflite)
        self.interpreter = make_interpreter(content, threads=threads, kernels=kernels)
        (self.input_kind, ins), (self.output_kind, outs) = _structure.file_io(_flatbuffer.parse(content))
        self.input_names, self._input_order = [n for n, _ in ins], [i for _, i in ins]
        self.output_names, self._output_order = [n for n, _ in outs], [i for _, i in outs]
        self._refresh()

    def _refresh(self):
        it = self.interpreter
        details = {d["index"]: d for d in it.get_output_details() + it.get_input_details()}
        self.inputs = [details[i] for i in self._input_order]
        self.outputs = [details[i] for i in self._output_order]

    @property
    def specs(self):
        """A `_structure.Spec` per input: floats for float and quantized inputs, plain integers as stored."""
        return [
            _structure.Spec(name, (None,) + tuple(int(s) for s in d["shape"][1:]),
                            np.dtype(d["dtype"]).name if _is_plain_integer(d) else "float32")
            for name, d in zip(self.input_names, self.inputs)
        ]

    def feeds(self, x, arg="x"):
        """The arrays of `x` (array, list in input order, or dict by name), checked, in input order."""
        return list(_structure.named_arrays(x, self.specs, arg).values())

    def predict(self, x):
        """Outputs for `x` in the model's structure: one array, a list, or a dict by output name."""
        return _structure.pack(self.output_kind, self.output_names, self.predict_flat(x))

    def predict_flat(self, x):
        """The outputs for `x` as a list, in `output_names` order."""
        xs = self.feeds(x)
        n = xs[0].shape[0]
        sig = self.inputs[0]["shape_signature"]
        static = int(sig[0]) if len(sig) else 1
        step = static if static > 0 else n
        if static <= 0 and n and int(self.inputs[0]["shape"][0]) != n:
            for d, a in zip(self.inputs, xs):
                self.interpreter.resize_tensor_input(d["index"], a.shape, strict=False)
            self.interpreter.allocate_tensors()
            self._refresh()
        results = [[] for _ in self.outputs]
        for start in range(0, n, max(step, 1)):
            for d, a in zip(self.inputs, xs):
                chunk = a[start : start + step]
                if chunk.shape[0] < step:  # pad the last partial batch of a static batch > 1
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - chunk.shape[0], 0)])
                self.interpreter.set_tensor(d["index"], quantize(chunk, d))
            self.interpreter.invoke()
            for j, d in enumerate(self.outputs):
                results[j].append(dequantize(self.interpreter.get_tensor(d["index"]), d))
        return [np.concatenate(r)[:n] if r else np.zeros((0,)) for r in results]

    def evaluate(self, x, y):
        """Accuracy per output: a float for one output, else {output name: accuracy} for the outputs `y` labels."""
        outs, names = self.predict_flat(x), self.output_names
        if len(outs) == 1 and not isinstance(y, dict):
            return accuracy(outs[0], y)
        # A dict may leave out the outputs without labels (e.g. regression heads).
        labelled = _structure.by_name(y, names, "y", what="output", subset=True)
        result = {n: accuracy(outs[names.index(n)], labels) for n, labels, _ in labelled}
        return result if len(outs) > 1 else result[names[0]]


def accuracy(pred, y):
    """Classification accuracy of predictions `pred` against integer or one-hot labels `y`."""
    pred = np.asarray(pred)
    y = np.asarray(y)
    if pred.ndim == 2 and pred.shape[1] == 1 or pred.ndim == 1:  # one sigmoid unit: threshold 0.5
        p = (pred.reshape(-1) > 0.5).astype(np.int64)
        t = y.reshape(-1).astype(np.int64)
    else:
        p = pred.reshape(pred.shape[0], -1).argmax(-1)
        t = y.argmax(-1) if y.ndim == pred.ndim and y.shape[-1] == pred.shape[-1] and y.ndim > 1 else y.reshape(-1)
    if t.shape[0] != p.shape[0]:
        raise ValueError(
            f"`y` must have one label per sample of `x`. Received: y.shape={y.shape} for {p.shape[0]} samples"
        )
    return float(np.mean(p == t))


@dataclasses.dataclass
class Latency:
    """LiteRT latency of one model: median, p90 and min over `runs` timed invokes, in ms."""

    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    threads: int
    kernels: str

    def to_dict(self):
        return dataclasses.asdict(self)

    def __str__(self):
        return (f"median {self.median_ms:.3f} ms  p90 {self.p90_ms:.3f} ms  min {self.min_ms:.3f} ms  "
                f"({self.runs} runs, {self.threads} thread(s), {self.kernels})")


def _ready(tflite, threads, kernels, warmup):
    """An interpreter for `tflite` with random inputs set (outside any timed loop), invoked `warmup` times."""
    it = make_interpreter(tflite, threads=threads, kernels=kernels)
    rng = np.random.default_rng(0)
    for d in it.get_input_details():
        it.set_tensor(d["index"], _random_values(d, d["shape"], rng))
    for _ in range(warmup):
        it.invoke()
    return it


def _timed(it, runs):
    """Nanoseconds of each of `runs` invokes."""
    ns = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        it.invoke()
        ns.append(time.perf_counter_ns() - t0)
    return ns


def random_samples(tflite, n):
    """`n` random samples per input, {input name: batch-first array} as `Runner.predict` takes them."""
    runner = Runner(tflite, kernels="builtin")
    rng = np.random.default_rng(0)
    return {name: dequantize(_random_values(d, (n, *d["shape"][1:]), rng), d)
            for name, d in zip(runner.input_names, runner.inputs)}


def _stats(ns, threads, kernels):
    ms = np.asarray(ns, np.float64) / 1e6
    return Latency(float(np.median(ms)), float(np.percentile(ms, 90)), float(ms.min()), len(ms), threads, kernels)


def _check_runs(runs, warmup):
    check_int(runs, "runs", minimum=1)
    check_int(warmup, "warmup", minimum=0)


def benchmark(tflite, *, runs=100, warmup=10, threads=1, kernels="xnnpack"):
    """Median latency of one `.tflite` on LiteRT (XNNPACK by default).

    Args:
        tflite: bytes, a path or a `TFLiteModel`.
        runs: timed invokes; warmup: untimed invokes first.
        threads: interpreter threads (1 by default: comparable across machines).
        kernels: "xnnpack", "builtin" (no delegate) or "reference".

    Returns:
        A `Latency` (median_ms, p90_ms, min_ms).

    Example:
        >>> print(tfopt.tflite_export.benchmark("model.tflite", runs=200))
    """
    _check_runs(runs, warmup)
    return _stats(_timed(_ready(tflite, threads, kernels, warmup), runs), threads, kernels)


def compare_latency(float_tflite, int8_tflite, *, runs=100, warmup=10, threads=1, rounds=10, kernels="xnnpack"):
    """Latency of two models side by side, interleaved in `rounds` blocks so drift hits both alike.

    Returns:
        A dict: {"float": Latency, "int8": Latency, "ratio": int8 median / float median}.

    Example:
        >>> r = tfopt.tflite_export.compare_latency("mnv2_float.tflite", "mnv2_int8.tflite")
        >>> r["ratio"]  # < 1: int8 is faster
    """
    _check_runs(runs, warmup)
    check_int(rounds, "rounds", minimum=1)
    its = {k: _ready(m, threads, kernels, warmup) for k, m in (("float", float_tflite), ("int8", int8_tflite))}
    ns = {k: [] for k in its}
    for r in range(rounds):
        for k in list(its) if r % 2 == 0 else list(its)[::-1]:
            ns[k] += _timed(its[k], max(1, runs // rounds))
    out = {k: _stats(v, threads, kernels) for k, v in ns.items()}
    out["ratio"] = out["int8"].median_ms / out["float"].median_ms
    return out


@dataclasses.dataclass
class Comparison:
    """Keras vs TFLite on the same inputs (see `compare`).

    With several outputs the fields are the worst over them (lowest agreement, largest errors; the
    scale of the output with the largest error in steps) and `outputs` holds one `Comparison` per
    output name; with one output `outputs` is None.
    """

    num_samples: int
    top1_agreement: float
    max_abs_error: float
    output_scale: float
    max_error_steps: float
    p99_error_steps: float
    outputs: dict = None

    def to_dict(self):
        return dataclasses.asdict(self)

    def __str__(self):
        return json.dumps(self.to_dict(), indent=2)


def output_scale(tflite, index=None):
    """The quantization step of output tensor `index` (default: the first): its scale, or that of the tensor its
    DEQUANTIZE reads; None for a float graph."""
    sg = _flatbuffer.parse(tflite).subgraphs[0]
    index = sg.outputs[0] if index is None else index
    t = sg.tensors[index]
    if t.quantized and t.dtype not in ("float32", "float16"):
        return float(t.scales[0])
    for op in sg.operators:
        if op.name == "DEQUANTIZE" and index in op.outputs:
            src = sg.tensors[op.inputs[0]]
            if src.quantized:
                return float(src.scales[0])
    return None


def _check_compare_args(keras_model, x, runner):
    """(Keras input kind, {name: array}) for `x`, checked before Keras would fail on it deep inside `predict`."""
    if not isinstance(keras_model, keras.Model):
        raise TypeError(
            "`keras_model` must be the keras Model the .tflite was converted from (load a file with "
            f"`keras.saving.load_model(path)`). Received: keras_model={keras_model!r} of type {type(keras_model).__name__}"
        )
    # A subclassed model has no known inputs to check against: the .tflite's name, any shape.
    kind, specs = _structure.keras_inputs(keras_model, runner.input_names[0])
    named = _structure.named_arrays(x, specs, "x", non_numeric=TypeError)
    first = next(iter(named.values()))
    if first.ndim == 0 or len(first) == 0:
        raise ValueError(
            f"`x` must hold at least one input sample, batch first. Received: x with 0 samples, shape={first.shape}"
        )
    _structure.check_finite(named, "x", "outputs on them cannot be compared")
    return kind, named


def _compare_one(got, ref, scale):
    ref = ref.reshape(got.shape)
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    steps = err / scale if scale else np.full_like(err, np.nan)
    flat_got, flat_ref = got.reshape(len(got), -1), ref.reshape(len(ref), -1)
    top1 = float(np.mean(flat_got.argmax(-1) == flat_ref.argmax(-1))) if flat_got.shape[1] > 1 else float(
        np.mean((flat_got > 0.5) == (flat_ref > 0.5)))
    return Comparison(
        num_samples=int(len(got)),
        top1_agreement=top1,
        max_abs_error=float(err.max()) if err.size else 0.0,
        output_scale=float(scale) if scale else float("nan"),
        max_error_steps=float(np.max(steps)) if steps.size else 0.0,
        p99_error_steps=float(np.percentile(steps, 99)) if steps.size else 0.0,
    )


def _worst(values):
    known = [v for v in values if not math.isnan(v)]
    return max(known) if known else float("nan")


def compare(keras_model, tflite, x, *, batch_size=32):
    """Top-1 agreement and error, in output quantization steps, of a `.tflite` vs its Keras model.

    The error in steps is |dequant(tflite) - keras| / output_scale: 1 step is the rounding of the
    output alone, so an int8 model that matches within ~1 step is as good as int8 can be. Every
    output is compared, each against its own scale; outputs are matched by name where the `.tflite`
    carries the Keras names (`convert` writes them), else by position.

    Args:
        keras_model: the float Keras model the `.tflite` was converted from.
        tflite: bytes, a path or a `TFLiteModel`.
        x: the inputs, batch first, as the Keras model takes them: an array, a list of arrays in
            input order, or a dict keyed by input name (integer inputs as integers).
        batch_size: Keras' batch size.

    Returns:
        A `Comparison` (top1_agreement, max_abs_error, output_scale, max_error_steps, p99_error_steps;
        the step fields are NaN for float models). With several outputs: the worst over them, and
        `.outputs[name]` for each.

    Example:
        >>> c = tfopt.tflite_export.compare(model, tfl, x_test[:200]); c.max_error_steps
        >>> c = tfopt.tflite_export.compare(two_head_model, tfl, {"image": images, "meta": meta})
        >>> c.outputs["cls"].top1_agreement
    """
    content = _flatbuffer.read_bytes(tflite)
    runner = Runner(content)
    kind, named = _check_compare_args(keras_model, x, runner)
    arrays = list(named.values())
    ref = keras_model.predict(named if kind == "dict" else _structure.pack(kind, list(named), arrays),
                              batch_size=batch_size, verbose=0)
    same_names = sorted(runner.input_names) == sorted(named)
    got = runner.predict_flat(named if same_names else arrays)
    if isinstance(ref, dict):
        ref_names, ref = sorted(ref), [ref[k] for k in sorted(ref)]
    else:
        ref = list(ref) if isinstance(ref, (list, tuple)) else [ref]
        ref_names = list(getattr(keras_model, "output_names", None) or ())
    if len(ref) != len(got):
        raise ValueError(
            f"The .tflite has {len(got)} output(s) and the Keras model {len(ref)}: `compare` needs the model the "
            f"file was converted from. Received: keras_model={keras_model.name!r}"
        )
    ref_by_name = dict(zip(_structure.in_order(ref_names, runner.output_names), map(np.asarray, ref)))
    parts = {
        name: _compare_one(g, ref_by_name[name], output_scale(content, d["index"]))
        for name, g, d in zip(runner.output_names, got, runner.outputs)
    }
    if len(parts) == 1:
        return next(iter(parts.values()))
    worst = max(parts.values(), key=lambda c: (_worst([c.max_error_steps, -1.0]), c.max_abs_error))
    return Comparison(
        num_samples=len(arrays[0]),
        top1_agreement=min(c.top1_agreement for c in parts.values()),
        max_abs_error=max(c.max_abs_error for c in parts.values()),
        output_scale=worst.output_scale,
        max_error_steps=_worst(c.max_error_steps for c in parts.values()),
        p99_error_steps=_worst(c.p99_error_steps for c in parts.values()),
        outputs=parts,
    )
