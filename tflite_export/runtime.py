"""Running `.tflite` models with LiteRT: predict, accuracy, Keras comparison and latency.

Uses `ai_edge_litert.interpreter.Interpreter` (`tf.lite.Interpreter` is deprecated). Latency follows
a fixed method: one interpreter per model, fixed `num_threads`, inputs set outside the timed loop,
warm-up invokes, `perf_counter_ns` per invoke, median and p90 (never the mean: a shared CPU has a
long tail). XNNPACK is LiteRT's default delegate, for int8 models too.
"""

import dataclasses
import json
import time

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from tfopt.tflite_export import _flatbuffer

_RESOLVERS = {
    "xnnpack": OpResolverType.AUTO,
    "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    "reference": OpResolverType.BUILTIN_REF,
}


def make_interpreter(tflite, *, threads=1, kernels="xnnpack"):
    """An allocated LiteRT `Interpreter` for bytes / path / TFLiteModel.

    `kernels`: "xnnpack" (default: optimized kernels + the XNNPACK delegate), "builtin" (optimized
    kernels, no delegate) or "reference" (reference kernels; slow, for correctness checks only).
    """
    if kernels not in _RESOLVERS:
        raise ValueError(f"`kernels` must be one of {sorted(_RESOLVERS)}. Received: kernels={kernels!r}")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"`threads` must be a positive int. Received: threads={threads!r}")
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
    """Stored dtype -> float32 for an I/O tensor."""
    scale, zp = _qparams(detail)
    if np.dtype(detail["dtype"]).kind == "f" or scale == 0:
        return np.asarray(q, np.float32)
    return ((np.asarray(q, np.float32) - zp) * scale).astype(np.float32)


class Runner:
    """Float in, float out over any batch size, on one LiteRT interpreter."""

    def __init__(self, tflite, *, threads=1, kernels="xnnpack"):
        self.interpreter = make_interpreter(tflite, threads=threads, kernels=kernels)
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()

    def _input_shape(self, i):
        return tuple(int(d) for d in self.inputs[i]["shape"])

    def predict(self, x):
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        if len(xs) != len(self.inputs):
            raise ValueError(
                f"The model has {len(self.inputs)} input(s); pass one array per input. Received: {len(xs)} array(s)"
            )
        xs = [np.asarray(a) for a in xs]
        for i, a in enumerate(xs):
            want = self._input_shape(i)[1:]
            if a.ndim == len(want):  # a single sample without its batch axis
                xs[i] = a = a[None]
            if tuple(a.shape[1:]) != want:
                raise ValueError(
                    f"Input {i} must have shape (batch, {', '.join(map(str, want))}) to match the model input "
                    f"{self.inputs[i]['name']!r}. Received: x.shape={a.shape}"
                )
        n = xs[0].shape[0]
        static = int(self.inputs[0]["shape_signature"][0]) if len(self.inputs[0]["shape_signature"]) else 1
        step = static if static > 0 else n
        if static <= 0 and n and tuple(self._input_shape(0))[0] != n:
            for i, a in enumerate(xs):
                self.interpreter.resize_tensor_input(self.inputs[i]["index"], a.shape, strict=False)
            self.interpreter.allocate_tensors()
            self.inputs = self.interpreter.get_input_details()
            self.outputs = self.interpreter.get_output_details()
        results = [[] for _ in self.outputs]
        for start in range(0, n, max(step, 1)):
            for i, a in enumerate(xs):
                chunk = a[start : start + step]
                if chunk.shape[0] < step:  # pad the last partial batch of a static batch > 1
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - chunk.shape[0], 0)])
                self.interpreter.set_tensor(self.inputs[i]["index"], quantize(chunk, self.inputs[i]))
            self.interpreter.invoke()
            for j, d in enumerate(self.outputs):
                results[j].append(dequantize(self.interpreter.get_tensor(d["index"]), d))
        outs = [np.concatenate(r)[:n] if r else np.zeros((0,)) for r in results]
        return outs[0] if len(outs) == 1 else outs


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


def _random_inputs(it):
    rng = np.random.default_rng(0)
    for d in it.get_input_details():
        dtype = np.dtype(d["dtype"])
        if dtype.kind == "f":
            v = rng.random(d["shape"], np.float32).astype(dtype)
        else:
            info = np.iinfo(dtype)
            v = rng.integers(max(info.min, -128), min(info.max, 127) + 1, d["shape"]).astype(dtype)
        it.set_tensor(d["index"], v)


def _stats(ns, threads, kernels):
    ms = np.asarray(ns, np.float64) / 1e6
    return Latency(float(np.median(ms)), float(np.percentile(ms, 90)), float(ms.min()), len(ms), threads, kernels)


def _check_runs(runs, warmup):
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"`runs` must be a positive int. Received: runs={runs!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"`warmup` must be an int >= 0. Received: warmup={warmup!r}")


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
    it = make_interpreter(tflite, threads=threads, kernels=kernels)
    _random_inputs(it)  # outside the timed loop
    for _ in range(warmup):
        it.invoke()
    ns = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        it.invoke()
        ns.append(time.perf_counter_ns() - t0)
    return _stats(ns, threads, kernels)


def compare_latency(float_tflite, int8_tflite, *, runs=100, warmup=10, threads=1, rounds=10, kernels="xnnpack"):
    """Latency of two models side by side, interleaved in `rounds` blocks so drift hits both alike.

    Returns:
        A dict: {"float": Latency, "int8": Latency, "ratio": int8 median / float median}.

    Example:
        >>> r = tfopt.tflite_export.compare_latency("mnv2_float.tflite", "mnv2_int8.tflite")
        >>> r["ratio"]  # < 1: int8 is faster
    """
    _check_runs(runs, warmup)
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"`rounds` must be a positive int. Received: rounds={rounds!r}")
    models = {"float": float_tflite, "int8": int8_tflite}
    its = {k: make_interpreter(m, threads=threads, kernels=kernels) for k, m in models.items()}
    ns = {k: [] for k in its}
    for it in its.values():
        _random_inputs(it)
        for _ in range(warmup):
            it.invoke()
    per_round = max(1, runs // rounds)
    for r in range(rounds):
        order = list(its) if r % 2 == 0 else list(its)[::-1]
        for k in order:
            it = its[k]
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                it.invoke()
                ns[k].append(time.perf_counter_ns() - t0)
    out = {k: _stats(v, threads, kernels) for k, v in ns.items()}
    out["ratio"] = out["int8"].median_ms / out["float"].median_ms
    return out


@dataclasses.dataclass
class Comparison:
    """Keras vs TFLite on the same inputs (see `compare`)."""

    num_samples: int
    top1_agreement: float
    max_abs_error: float
    output_scale: float
    max_error_steps: float
    p99_error_steps: float

    def to_dict(self):
        return dataclasses.asdict(self)

    def __str__(self):
        return json.dumps(self.to_dict(), indent=2)


def output_scale(tflite):
    """The quantization step of the (first) output: its own scale, or that of the int8 tensor its
    DEQUANTIZE reads for float outputs. None for a float graph."""
    fm = _flatbuffer.parse(tflite)
    sg = fm.subgraphs[0]
    t = sg.tensors[sg.outputs[0]]
    if t.quantized and t.dtype not in ("float32", "float16"):
        return float(t.scales[0])
    for op in sg.operators:
        if op.name == "DEQUANTIZE" and sg.outputs[0] in op.outputs:
            src = sg.tensors[op.inputs[0]]
            if src.quantized:
                return float(src.scales[0])
    return None


def _check_compare_args(keras_model, x):
    """`x` as float32, after the checks `predict` would otherwise fail on deep inside Keras."""
    import keras

    if not isinstance(keras_model, keras.Model):
        raise TypeError(
            "`keras_model` must be the keras Model the .tflite was converted from (load a file with "
            f"`keras.saving.load_model(path)`). Received: keras_model={keras_model!r} of type {type(keras_model).__name__}"
        )
    try:
        x = np.asarray(x, np.float32)
    except (TypeError, ValueError):
        raise TypeError(
            f"`x` must be a numeric array of model inputs, batch first. Received: x of type {type(x).__name__}"
        ) from None
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"`x` must hold at least one input sample, batch first. Received: x with 0 samples, shape={x.shape}")
    try:
        inputs = keras_model.inputs
    except (AttributeError, ValueError):  # a subclassed model: no known input shape to check against
        inputs = None
    if inputs and len(inputs) == 1:
        want = tuple(inputs[0].shape[1:])
        if x.ndim != len(want) + 1 or any(w is not None and w != d for w, d in zip(want, x.shape[1:])):
            raise ValueError(
                f"`x` must have shape (batch, {', '.join(str(d) for d in want)}) like the model input {want}. "
                f"Received: x.shape={x.shape}"
            )
    if not np.isfinite(x).all():
        raise ValueError(
            f"`x` contains NaN or inf in {int((~np.isfinite(x.reshape(len(x), -1))).any(axis=1).sum())} sample(s): "
            f"outputs on them cannot be compared. Remove or fix them. Received: x with non-finite values"
        )
    return x


def compare(keras_model, tflite, x, *, batch_size=32):
    """Top-1 agreement and error, in output quantization steps, of a `.tflite` vs its Keras model.

    The error in steps is |dequant(tflite) - keras| / output_scale: 1 step is the rounding of the
    output alone, so an int8 model that matches within ~1 step is as good as int8 can be.

    Args:
        keras_model: the float Keras model the `.tflite` was converted from.
        tflite: bytes, a path or a `TFLiteModel`.
        x: a float numpy array of inputs (batch first).

    Returns:
        A `Comparison` (top1_agreement, max_abs_error, output_scale, max_error_steps, p99_error_steps;
        the step fields are NaN for float models).

    Example:
        >>> c = tfopt.tflite_export.compare(model, tfl, x_test[:200]); c.max_error_steps
    """
    x = _check_compare_args(keras_model, x)
    ref = np.asarray(keras_model.predict(x, batch_size=batch_size, verbose=0))
    got = Runner(tflite).predict(x)
    if isinstance(got, list):
        got = got[0]
        ref = ref[0] if ref.ndim > got.ndim else ref
    ref = ref.reshape(got.shape)
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    scale = output_scale(tflite)
    steps = err / scale if scale else np.full_like(err, np.nan)
    flat_got, flat_ref = got.reshape(len(got), -1), ref.reshape(len(ref), -1)
    top1 = float(np.mean(flat_got.argmax(-1) == flat_ref.argmax(-1))) if flat_got.shape[1] > 1 else float(
        np.mean((flat_got > 0.5) == (flat_ref > 0.5)))
    return Comparison(
        num_samples=int(len(x)),
        top1_agreement=top1,
        max_abs_error=float(err.max()) if err.size else 0.0,
        output_scale=float(scale) if scale else float("nan"),
        max_error_steps=float(np.max(steps)) if steps.size else 0.0,
        p99_error_steps=float(np.percentile(steps, 99)) if steps.size else 0.0,
    )
