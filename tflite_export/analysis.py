"""`analyze`: what is inside any `.tflite` file (ops, dtypes, float leaks, sizes, quantization)."""

import collections
import concurrent.futures
import json
import os
import zlib

import numpy as np

from tfopt._report import render_table
from tfopt.tflite_export import _flatbuffer

_INTEGER = ("int8", "uint8", "int16")  # integer activations, quantized weights
_WEIGHT_INPUTS = {  # input slots that hold weights / bias of the ops that have them
    "CONV_2D": (1, 2),
    "DEPTHWISE_CONV_2D": (1, 2),
    "FULLY_CONNECTED": (1, 2),
    "TRANSPOSE_CONV": (1, 3),
    "CONV_3D": (1, 2),
    "UNIDIRECTIONAL_SEQUENCE_LSTM": tuple(range(1, 24)),
    "PRELU": (1,),
    "SVDF": (1, 2, 3),
    "EMBEDDING_LOOKUP": (1,),
    "BATCH_MATMUL": (1,),
}
_FLOAT = ("float32", "float16", "float64", "bfloat16")
_GZIP_BLOCK = 1 << 20


def _gzip_size(content):
    """Size of `gzip -6 content`, compressed in 1 MiB blocks in parallel threads (zlib releases the GIL).

    Restarting the 32 KiB window per MiB costs well under 0.1% against one stream.
    """
    blocks = [content[i : i + _GZIP_BLOCK] for i in range(0, len(content), _GZIP_BLOCK)] or [b""]

    def deflated(block):
        c = zlib.compressobj(6, zlib.DEFLATED, -15)  # raw deflate: no zlib header / checksum
        return len(c.compress(block)) + len(c.flush())

    with concurrent.futures.ThreadPoolExecutor(min(len(blocks), os.cpu_count() or 1, 8)) as pool:
        body = sum(pool.map(deflated, blocks))
    return body + 18  # gzip's 10-byte header and 8-byte trailer


def io_edge_ops(sg):
    """Indices of the QUANTIZE/DEQUANTIZE ops that only convert the model's inputs or outputs (float, uint8 I/O)."""
    inputs, outputs = set(sg.inputs), set(sg.outputs)
    return {op.index for op in sg.operators
            if (op.name == "QUANTIZE" and (set(op.inputs) & inputs or set(op.outputs) & outputs))
            or (op.name == "DEQUANTIZE" and set(op.outputs) & outputs
                and not sg.tensors[op.inputs[0]].is_constant)}


def _float_leaks(sg, edge_ops):
    """Ops of an integer graph that compute on float tensors: [(op, [its float tensors])]."""
    edge_tensors = {t for i in edge_ops for t in sg.operators[i].inputs + sg.operators[i].outputs
                    if sg.tensors[t].dtype in _FLOAT or t in sg.inputs or t in sg.outputs}
    leaks = []
    for op in sg.operators:
        bad = [sg.tensors[t] for t in op.inputs + op.outputs
               if t >= 0 and sg.tensors[t].dtype in _FLOAT and t not in edge_tensors]
        if bad and op.index not in edge_ops:
            leaks.append((op, bad))
    return leaks


class Analysis:
    """What `analyze` found in a `.tflite` model. Print it for a table; `to_dict()` for JSON.

    Attributes:
        size_bytes: size of the flatbuffer; `gzip_bytes`: its gzip -6 size (what zeroed weights buy).
        kind: "int8", "int16x8", "float16", "dynamic-range", "float32" or "mixed" (int8 with float leaks).
        ops: list of {"op", "version", "count"} in order of first use (first subgraph).
        tensor_dtypes: {dtype: {"activations": n, "constants": n, "bytes": constant bytes}}.
        float_leaks: ops of an integer graph that compute in float (list of dicts); empty is good.
        parameter_count: elements of weight and bias tensors; `int8_weight_zero_fraction`: fraction of
            int8 weight values equal to their zero point (pruned weights).
        inputs, outputs: name, dtype, shape, shape_signature, scale and zero_point of each I/O tensor.
        dynamic_tensors: names of tensors with a -1 in their shape signature.
    """

    def __init__(self, fields):
        self._fields = fields
        vars(self).update(fields)

    @property
    def is_fully_int8(self):
        """True when every op computes on int8 (int32 bias, edge QUANTIZE/DEQUANTIZE for I/O allowed)."""
        return self.kind == "int8"

    def to_dict(self):
        return json.loads(json.dumps(self._fields, default=_json_default))

    def __repr__(self):
        return f"<Analysis kind={self.kind} ops={self.num_ops} size={self.size_bytes}>"

    def __str__(self):
        f = self._fields
        lines = [
            f"TFLite model: {f['size_bytes']:,} B"
            + ("" if f["gzip_bytes"] is None else f" ({f['gzip_bytes']:,} B gzipped)")
            + f", schema v{f['schema_version']}, "
            f"{f['num_subgraphs']} subgraph(s), min runtime {f['min_runtime_version'] or '?'}",
            f"Kind: {f['kind']}   parameters: {f['parameter_count']:,}   "
            f"int8 weight zeros: {_pct(f['int8_weight_zero_fraction'])}   sparse tensors: {f['sparse_tensors']}",
            "",
        ]
        for label, key in (("Input", "inputs"), ("Output", "outputs")):
            for io in f[key]:
                q = "" if io["scale"] is None else f"  scale={_fmt_scale(io['scale'])} zero_point={io['zero_point']}"
                sig = io["shape_signature"] if io["shape_signature"] is not None else io["shape"]
                lines.append(f"{label:<7}{io['name']:<40} {io['dtype']:<8} {sig}{q}")
        ops = [[o["op"], o["version"], o["count"]] for o in f["ops"]]
        lines += ["", render_table(["op", "version", "count"], ops, right=(1, 2))]
        rows = [[dt, d["activations"], d["constants"], f"{d['bytes']:,}"] for dt, d in sorted(f["tensor_dtypes"].items())]
        lines += ["", render_table(["dtype", "activations", "constants", "constant bytes"], rows, right=(1, 2, 3))]
        if f["float_leaks"]:
            lines += ["", "Float ops leaked into the integer graph:"]
            lines += [f"  op #{x['op_index']} {x['op']} (layer {x['layer']!r}): {', '.join(x['tensors'])}"
                      for x in f["float_leaks"]]
        if f["dynamic_tensors"]:
            lines += ["", f"Dynamic shapes (-1 in shape_signature): {len(f['dynamic_tensors'])} tensor(s), "
                          f"e.g. {f['dynamic_tensors'][0]!r}"]
        return "\n".join(lines)


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fmt_scale(s):
    return f"{s:.6g}" if not isinstance(s, list) else f"[{len(s)} per-channel]"


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _io(t):
    def param(a):  # a number per tensor, a list per channel
        return None if not t.quantized else a.tolist()[0] if a.size == 1 else a.tolist()

    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
            "shape_signature": None if t.shape_signature is None else list(t.shape_signature),
            "scale": param(t.scales), "zero_point": param(t.zero_points)}


def _weight_tensors(sg):
    """Indices of constant tensors that are parameters (weights, bias), not shapes or axes."""
    weights = set()
    for op in sg.operators:
        slots = _WEIGHT_INPUTS.get(op.name)
        for slot, t in enumerate(op.inputs):
            if t < 0 or not sg.tensors[t].is_constant:
                continue
            if slots is None:  # by dtype; DEQUANTIZE's input: a float16 / dynamic-range weight stored quantized
                weight = op.name == "DEQUANTIZE" or sg.tensors[t].dtype in _FLOAT + _INTEGER
            else:
                weight = slot in slots
            if weight:
                weights.add(t)
    return weights


def _weight_lookups(sg):
    """Outputs of GATHER / EMBEDDING_LOOKUP from a constant table: in a dynamic-range model, int8 rows
    dequantized right away (weights, not an integer graph)."""
    slot = {"GATHER": 0, "EMBEDDING_LOOKUP": 1}
    return {op.outputs[0] for op in sg.operators
            if op.name in slot and op.outputs and sg.tensors[op.inputs[slot[op.name]]].is_constant}


def _kind(sg, leaks):
    lookups = _weight_lookups(sg)
    act = collections.Counter(
        t.dtype for t in sg.tensors
        if not t.is_constant and t.index not in sg.inputs and t.index not in sg.outputs and t.index not in lookups
    )
    if not act:
        act = collections.Counter(t.dtype for t in sg.tensors if not t.is_constant)
    const = collections.Counter(t.dtype for t in sg.tensors if t.is_constant)
    if act.get("int16") and not act.get("float32"):
        return "int16x8"
    if act.get("int8") or act.get("uint8"):
        return "mixed" if leaks else "int8"
    if const.get("float16"):
        return "float16"
    if const.get("int8"):
        return "dynamic-range"
    return "float32"


def _analyze_model(fm, gzip_bytes):
    sg = fm.subgraphs[0]
    hist = collections.Counter((op.name if op.name != "CUSTOM" else f"CUSTOM:{op.custom_code}", op.version)
                               for op in sg.operators)  # in order of first use
    dtypes = {}
    for t in sg.tensors:
        d = dtypes.setdefault(t.dtype, {"activations": 0, "constants": 0, "bytes": 0})
        d["constants" if t.is_constant else "activations"] += 1
        d["bytes"] += fm.buffer_size(t.buffer)  # 0 for activations
    lookups = _weight_lookups(sg)
    has_int_acts = any(t.dtype in _INTEGER and not t.is_constant and t.index not in lookups for t in sg.tensors)
    leaks = _float_leaks(sg, io_edge_ops(sg)) if has_int_acts else []
    n_params = zeros = total_int8 = 0
    seen_buffers = set()
    for t in (sg.tensors[i] for i in sorted(_weight_tensors(sg))):
        n_params += t.num_elements
        if t.dtype == "int8" and t.buffer not in seen_buffers and not t.is_sparse:
            seen_buffers.add(t.buffer)
            data = fm.buffer_data(t.buffer).view(np.int8)
            zp = t.zero_points if t.zero_points.size else np.zeros(1, np.int64)
            if zp.size > 1:  # per-channel zero points (asymmetric weights are rare, but legal)
                data = np.moveaxis(data.reshape(t.shape), t.quantized_dimension, -1)
            zeros += int(np.count_nonzero(data == zp))
            total_int8 += data.size
    return {
        "size_bytes": len(fm.content),
        "gzip_bytes": gzip_bytes,
        "schema_version": fm.schema_version,
        "num_subgraphs": len(fm.subgraphs),
        "min_runtime_version": fm.metadata_string("min_runtime_version"),
        "kind": _kind(sg, leaks),
        "num_ops": len(sg.operators),
        "ops": [{"op": k[0], "version": k[1], "count": n} for k, n in hist.items()],
        "tensor_dtypes": dtypes,
        "float_leaks": [{"op_index": op.index, "op": op.name, "layer": _flatbuffer.layer_of(sg.output_name(op)),
                         "tensors": [t.name for t in bad]} for op, bad in leaks],
        "parameter_count": n_params,
        "int8_weight_zero_fraction": (zeros / total_int8) if total_int8 else None,
        "sparse_tensors": sum(t.is_sparse for t in sg.tensors),
        "inputs": [_io(sg.tensors[i]) for i in sg.inputs],
        "outputs": [_io(sg.tensors[i]) for i in sg.outputs],
        "dynamic_tensors": [t.name for t in sg.tensors if t.is_dynamic],
    }


def analyze(tflite, *, gzip=True):
    """Reports what is inside a `.tflite` model, whichever tool made it.

    Reads the flatbuffer directly (no interpreter, no TensorFlow): op histogram with op versions,
    tensor dtype breakdown, float ops leaked into an int8 graph, raw and gzip sizes, parameter count,
    the fraction of int8 weights at their zero point (what pruning left), and I/O quantization.

    Args:
        tflite: the model: `bytes`, a path to a `.tflite` file, or a `TFLiteModel`.
        gzip: also measure the gzip size (`gzip_bytes`; None when False). Compressing is most of the
            time on big float models (~0.5 s for 14 MB on two idle cores; the parse is ~0.1 s).

    Returns:
        An `Analysis`; `print()` it for a table, `.to_dict()` for JSON.

    Raises:
        FileNotFoundError: the path does not exist.
        TFLiteFileError: (a ValueError) the input is not a TFLite flatbuffer.

    Example:
        >>> report = tfopt.tflite_export.analyze("model.tflite")
        >>> print(report)
        >>> report.kind, report.float_leaks
    """
    content = _flatbuffer.read_bytes(tflite)
    fm = _flatbuffer.parse(content)
    return Analysis(_analyze_model(fm, _gzip_size(content) if gzip else None))
