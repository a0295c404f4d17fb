"""`edgetpu_report`: which ops of an int8 `.tflite` the Coral Edge TPU compiler would map, and why not.

An offline prediction from Coral's documented rules ("TensorFlow models on the Edge TPU"); the compiler
is not on PyPI or Debian, but when `edgetpu_compiler` is on PATH its parsed log is attached and final.

- Blockers (the whole model is rejected): dynamic shapes, more than one subgraph, op versions newer than
  the compiler can parse (e.g. CONV_2D v6, grouped convolution), no quantized tensors.
- Per op: in Coral's table for the runtime (`min_runtime_version`, the compiler's `-m`); non-constant
  tensors 8-bit (int32 only for constants such as bias); only the 3 innermost dimensions > 1; and the
  op's documented limitation (FULLY_CONNECTED output 1-D, SOFTMAX 1-D <= 16,000 elements, ...).
- One segment: ops before the first mapped one run on the CPU (e.g. an input QUANTIZE), and from the
  first unmapped op on everything does, unless `-a` (experimental; `multiple_segments`) is given.
"""

import dataclasses
import pathlib
import re
import shutil
import subprocess
import tempfile

import numpy as np

from tfopt._report import render_table
from tfopt.tflite_export import _flatbuffer
from tfopt.tflite_export._errors import EdgeTPUError

# Coral op table: op -> lowest Edge TPU runtime version that maps it.
SUPPORTED_OPS = {
    "ADD": 10, "AVERAGE_POOL_2D": 10, "CONCATENATION": 10, "CONV_2D": 10, "DEPTHWISE_CONV_2D": 10,
    "FULLY_CONNECTED": 10, "L2_NORMALIZATION": 10, "LOGISTIC": 10, "MAXIMUM": 10, "MINIMUM": 10,
    "MAX_POOL_2D": 10, "MEAN": 10, "MUL": 10, "PAD": 10, "RELU": 10, "RELU6": 10, "RELU_N1_TO_1": 10,
    "RESHAPE": 10, "RESIZE_BILINEAR": 10, "RESIZE_NEAREST_NEIGHBOR": 10, "SLICE": 10, "SOFTMAX": 10,
    "SPACE_TO_DEPTH": 10, "SPLIT": 10, "SQUEEZE": 10, "STRIDED_SLICE": 10, "SUB": 10, "TANH": 10,
    "EXPAND_DIMS": 13, "PACK": 13, "PRELU": 13, "QUANTIZE": 13, "SUM": 13, "TRANSPOSE_CONV": 13,
    "UNIDIRECTIONAL_SEQUENCE_LSTM": 14, "REDUCE_MAX": 14, "REDUCE_MIN": 14, "RSQRT": 14,
    "SQUARED_DIFFERENCE": 14, "TRANSPOSE": 14,
}

# Newest op versions the compiler (v16, 2021) can parse; a newer one fails the whole compile with
# "Didn't find op for builtin opcode 'X' version 'N'". Evidence: google-coral/edgetpu#631 (CONV_2D
# v6: grouped conv), #845 (TRANSPOSE_CONV v4: fused activation), #879 (QUANTIZE v3),
# libedgetpu#71 (EXP v2). Ops not listed are not version-checked.
MAX_OP_VERSIONS = {"CONV_2D": 5, "TRANSPOSE_CONV": 3, "QUANTIZE": 2, "EXP": 1}

# Ops newer than the compiler's own op list: it cannot parse the file at all ("Op builtin_code out of range: 150"
# for GELU, google-coral/edgetpu#818), so one of them rejects the whole model.
UNPARSEABLE_OPS = {"GELU": 150}

# What to train with instead of an op the Edge TPU does not map, where a mapped replacement exists.
REPLACEMENTS = {
    "GELU": "ReLU (Activation('relu') maps; retrain or fine-tune after the swap)",
    "HARD_SWISH": "ReLU6 or ReLU",
    "LEAKY_RELU": "PReLU(shared_axes=[1, 2]) or ReLU",
    "ELU": "ReLU",
    "BATCH_MATMUL": "none: attention's two matmuls run on the CPU; a convolutional model maps whole",
}

# Parameters beyond this are streamed from host memory on every inference (Coral: ~8 MB cache).
ON_CHIP_CACHE_BYTES = 8 * 1024 * 1024

MAPPED = "Mapped to Edge TPU"
NOT_SUPPORTED = "Operation not supported"
DATA_TYPE = "Operation is working on an unsupported data type"
RANK = "Tensor has unsupported rank (up to 3 innermost dimensions mapped)"
VERSION = "Operation version not supported"
LIMITATION = "Operation is otherwise supported, but not mapped due to some unspecified limitation"
SEGMENT = "More than one subgraph is not supported"

_8BIT = ("int8", "uint8")
_INDEX = ("int32", "int64")


@dataclasses.dataclass
class OpVerdict:
    """One op: `status` in the compiler's words, `reason` the rule that decided it, `on` tpu or cpu."""

    index: int
    op: str
    version: int
    layer: str
    tensor: str
    mappable: bool
    status: str
    reason: str
    on: str

    @property
    def mapped(self):
        return self.on == "tpu"


@dataclasses.dataclass
class CompilerLog:
    """What an `edgetpu_compiler` log says (see `parse_compiler_log`)."""

    version: str
    ops_on_tpu: int
    ops_on_cpu: int
    rows: list  # [(op, count, status)]
    on_chip_bytes: int
    on_chip_remaining_bytes: int
    off_chip_bytes: int
    compiled: bool
    text: str

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["rows"] = [list(r) for r in self.rows]
        d.pop("text")
        return d


@dataclasses.dataclass(eq=False)
class EdgeTPUReport:
    """Per-op Edge TPU verdicts for a model. Print it for a table; `.to_dict()` for JSON.

    Attributes:
        ops: list of `OpVerdict` in execution order.
        blockers: reasons the compiler would reject the whole model (list of str; empty is good).
        all_mapped: no blockers and every op on the Edge TPU.
        first_unmapped: the first `OpVerdict` that runs on the CPU (None if all mapped); with one
            segment, everything after it runs on the CPU too.
        parameter_bytes: constant bytes used by the ops on the TPU, vs `ON_CHIP_CACHE_BYTES`.
        compiler: a `CompilerLog` when `edgetpu_compiler` ran, else None.
    """

    ops: list
    blockers: list
    parameter_bytes: int
    min_runtime_version: int
    compiler: CompilerLog = None

    @property
    def num_mapped(self):
        return 0 if self.blockers else sum(v.mapped for v in self.ops)

    @property
    def all_mapped(self):
        return not self.blockers and all(v.mapped for v in self.ops)

    @property
    def first_unmapped(self):
        return next((v for v in self.ops if not v.mapped), None)

    @property
    def fits_on_chip(self):
        return self.parameter_bytes <= ON_CHIP_CACHE_BYTES

    def unmappable(self):
        """The ops that fail a rule of their own (not just "after the segment")."""
        return [v for v in self.ops if not v.mappable]

    def to_dict(self):
        return {
            "all_mapped": self.all_mapped,
            "num_ops": len(self.ops),
            "num_mapped": self.num_mapped,
            "blockers": list(self.blockers),
            "first_unmapped": None if self.first_unmapped is None else dataclasses.asdict(self.first_unmapped),
            "parameter_bytes": self.parameter_bytes,
            "on_chip_cache_bytes": ON_CHIP_CACHE_BYTES,
            "fits_on_chip": self.fits_on_chip,
            "min_runtime_version": self.min_runtime_version,
            "ops": [dataclasses.asdict(v) for v in self.ops],
            "compiler": None if self.compiler is None else self.compiler.to_dict(),
        }

    def __repr__(self):
        return f"<EdgeTPUReport {self.num_mapped}/{len(self.ops)} ops mapped, blockers={len(self.blockers)}>"

    def __str__(self):
        head = (
            f"Edge TPU (predicted, runtime >= {self.min_runtime_version}): {self.num_mapped}/{len(self.ops)} ops mapped; "
            f"parameters {self.parameter_bytes / 2**20:.2f} MiB of ~8 MiB on-chip cache"
            + ("" if self.fits_on_chip else " (the rest is streamed from host memory every inference)")
        )
        lines = [head] + [f"BLOCKER: {b}" for b in self.blockers]
        rows = [[v.index, f"{v.op} v{v.version}", v.on.upper(), v.layer or "", v.status
                 + ("" if v.reason in ("", v.status) else f" ({v.reason})")] for v in self.ops]
        lines += ["", render_table(["#", "op", "runs on", "layer", "status"], rows, right=(0,))]
        if self.compiler is not None:
            c = self.compiler
            lines += ["", f"edgetpu_compiler {c.version}: {c.ops_on_tpu} ops on Edge TPU, {c.ops_on_cpu} on CPU"]
            lines += [render_table(["op", "count", "status"], c.rows, right=(1,))]
        return "\n".join(lines)


def _const(fm, sg, t):
    return None if t < 0 else fm.tensor_value(sg.tensors[t])


def _axes(fm, sg, op, slot, rank):
    v = _const(fm, sg, op.inputs[slot]) if len(op.inputs) > slot else None
    return None if v is None else {int(a) % rank if rank else int(a) for a in np.ravel(v)}


def _op_rule(fm, sg, op, runtime):
    """(mappable, status, reason) for one op by Coral's table and its documented limitation."""
    tensors = sg.tensors
    name = op.name
    if name == "CUSTOM" and op.custom_code == "edgetpu-custom-op":
        return True, MAPPED, "already compiled for the Edge TPU"
    if name == "DEQUANTIZE":  # what the compiler logs for it (coral#13, #659)
        return False, DATA_TYPE, "DEQUANTIZE produces float (float outputs); use int8 I/O"
    if name not in SUPPORTED_OPS:
        instead = f"; replacement: {REPLACEMENTS[name]}" if name in REPLACEMENTS else ""
        return False, NOT_SUPPORTED, f"{name} is not in Coral's supported-ops table{instead}"
    if SUPPORTED_OPS[name] > runtime:
        return False, NOT_SUPPORTED, f"{name} needs Edge TPU runtime >= {SUPPORTED_OPS[name]} (compiler -m)"
    live = [tensors[t] for t in op.inputs + op.outputs if t >= 0 and not tensors[t].is_constant]
    for t in live:
        if t.dtype not in _8BIT:
            return False, DATA_TYPE, f"tensor {t.name!r} is {t.dtype}; the Edge TPU needs 8-bit tensors"
    for t in op.inputs:
        if t >= 0 and tensors[t].is_constant and tensors[t].dtype not in _8BIT + _INDEX:
            return False, DATA_TYPE, f"constant {tensors[t].name!r} is {tensors[t].dtype}"
    for t in live:
        if len(t.shape) > 3 and any(d > 1 for d in t.shape[:-3]):
            return False, RANK, f"tensor {t.name!r} has shape {list(t.shape)}"
    act = op.fused_activation
    in0 = tensors[op.inputs[0]] if op.inputs else None
    out0 = tensors[op.outputs[0]] if op.outputs else None
    rank = len(in0.shape) if in0 is not None else 0
    if name in ("AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION") and act != "NONE":
        return False, LIMITATION, f"fused activation {act} is not supported on {name}"
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        dh, dw = op.option("DilationHFactor", 1), op.option("DilationWFactor", 1)
        if dh != dw:
            return False, LIMITATION, f"dilation must be the same in x and y (got {dh}, {dw})"
        if name == "DEPTHWISE_CONV_2D" and runtime <= 12 and dh > 1:
            return False, LIMITATION, "dilated depthwise convolution needs Edge TPU runtime >= 13"
    if name == "FULLY_CONNECTED":
        if op.option("WeightsFormat", 0) != 0:
            return False, LIMITATION, "only the default weights format is supported"
        if sum(d > 1 for d in out0.shape) > 1 or len(out0.shape) > 2:
            return False, LIMITATION, f"output must be 1-D (got shape {list(out0.shape)}; Dense on a >2-D input?)"
    if name == "SOFTMAX":
        if sum(d > 1 for d in in0.shape) > 1:
            return False, LIMITATION, f"input must be 1-D (got shape {list(in0.shape)})"
        if in0.num_elements > 16000:
            return False, LIMITATION, f"at most 16,000 elements (got {in0.num_elements:,})"
    if name == "CONCATENATION":
        consts = [t for t in op.inputs if tensors[t].is_constant]
        if consts:
            if len(op.inputs) != 2:
                return False, LIMITATION, "a constant input is only allowed with exactly 2 inputs"
            t = tensors[consts[0]]
            v = fm.tensor_value(t)
            zp = int(t.zero_points[0]) if t.zero_points.size else 0
            if v is None or np.any(v.astype(np.int64) != zp):
                return False, LIMITATION, "a constant input must be all zeros (zero padding)"
    if name in ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN"):
        axes = _axes(fm, sg, op, 1, rank)
        if axes is None:
            return False, LIMITATION, "reduction axes must be constant"
        if 0 in axes and rank > 1:
            return False, LIMITATION, "cannot reduce over the batch dimension"
        if name == "MEAN" and rank == 4:
            if runtime <= 12 and not axes <= {1, 2}:
                return False, LIMITATION, "MEAN over x/y only on Edge TPU runtime <= 12"
            if 3 in axes and in0.shape[3] % 4:
                return False, LIMITATION, f"a z-reduction needs z % 4 == 0 (z = {in0.shape[3]})"
    if name == "PAD":
        pads = _const(fm, sg, op.inputs[1])
        if pads is None:
            return False, LIMITATION, "paddings must be constant"
        pads = np.reshape(pads, (-1, 2))
        if rank > 1 and np.any(pads[0] != 0):
            return False, LIMITATION, "no padding in the batch dimension"
        if runtime <= 12 and rank == 4 and np.any(pads[3] != 0):
            return False, LIMITATION, "PAD only in x/y on Edge TPU runtime <= 12"
    if name == "SPLIT":
        axes = _axes(fm, sg, op, 0, len(tensors[op.inputs[1]].shape))
        if axes and 0 in axes:
            return False, LIMITATION, "no splitting in the batch dimension"
    if name == "PACK" and op.option("Axis", 0) == 0:
        return False, LIMITATION, "no packing in the batch dimension"
    if name == "STRIDED_SLICE":
        strides = _const(fm, sg, op.inputs[3]) if len(op.inputs) > 3 else None
        if strides is None or np.any(np.asarray(strides) != 1):
            return False, LIMITATION, "strides must all be 1"
        if op.option("EllipsisMask", 0) or op.option("NewAxisMask", 0):
            return False, LIMITATION, "ellipsis_mask and new_axis_mask must be 0"
    if name == "SQUEEZE":
        dims = op.option("SqueezeDimsAsNumpy", ())
        dims = sorted(int(d) % rank for d in np.ravel(dims)) if isinstance(dims, np.ndarray) and dims.size else [
            i for i, d in enumerate(in0.shape) if d == 1]
        if dims and any(d != 1 for d in in0.shape[: max(dims)]):
            return False, LIMITATION, "only leading dimensions of size 1 may be squeezed"
    if name == "PRELU":
        alpha = tensors[op.inputs[1]]
        if not alpha.is_constant or sum(d > 1 for d in alpha.shape) > 1:
            return False, LIMITATION, "alpha must be constant and 1-D (Keras PReLU(shared_axes=[1, 2]))"
    if name == "QUANTIZE" and (set(op.inputs) & set(sg.inputs) or set(op.outputs) & set(sg.outputs)):
        return True, MAPPED, "at the model edges the compiler often leaves it on the CPU (coral#13)"
    if name in ("RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"):
        if op.option("AlignCorners", False) or op.option("HalfPixelCenters", False):
            return False, VERSION, "align_corners / half_pixel_centers are not supported"
        return True, MAPPED, "may still be refused for precision on some sizes"
    return True, MAPPED, ""


def _blockers(fm, sg):
    out = []
    dyn = [t for t in (x for s in fm.subgraphs for x in s.tensors) if t.is_dynamic]
    if dyn:
        t = dyn[0]
        out.append(
            f"dynamic shape: tensor {t.name!r} has shape_signature {list(t.shape_signature)} "
            f"({len(dyn)} dynamic tensor(s)); pin the batch to 1 (tfopt.tflite_export.convert does)"
        )
    if len(fm.subgraphs) > 1:
        out.append(f"{len(fm.subgraphs)} subgraphs (control flow); the Edge TPU compiler maps one")
    for name, version, _ in fm.op_codes:
        if name in UNPARSEABLE_OPS:
            out.append(f"{name} (builtin code {UNPARSEABLE_OPS[name]}) is newer than the compiler, which then "
                       f"rejects the whole model; replace it: {REPLACEMENTS[name]}")
        if name in MAX_OP_VERSIONS and version > MAX_OP_VERSIONS[name]:
            out.append(
                f"{name} version {version} is newer than the compiler can parse (max {MAX_OP_VERSIONS[name]}; "
                + ("grouped convolution" if name == "CONV_2D" and version >= 6 else "a newer op feature") + ")"
            )
    if not any(t.dtype in _8BIT and not t.is_constant for t in sg.tensors):
        out.append("model not quantized: no 8-bit activations (convert with mode='int8')")
    return out


_NUM = r"([0-9.]+)\s*([KMG]?i?B)"
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def _bytes(text, label):
    m = re.search(re.escape(label) + r"\s*:\s*" + _NUM, text)
    return int(float(m.group(1)) * _UNITS.get(m.group(2), 1)) if m else None


def parse_compiler_log(text):
    """Parses an `edgetpu_compiler` log (stdout or `<model>_edgetpu.log`) into a `CompilerLog`.

    The documented format: a version line, "Number of operations that will run on Edge TPU: N",
    "... on CPU: M", the on-chip / off-chip memory lines, then an `Operator  Count  Status` table
    with one row per (op, status).

    Raises:
        ValueError: the text has none of the compiler's lines.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be the log as a str. Received: text={text!r:.80} of type {type(text).__name__}")
    version = re.search(r"Edge TPU Compiler version\s+(\S+)", text)
    tpu = re.search(r"Number of operations that will run on Edge TPU:\s*(\d+)", text)
    cpu = re.search(r"Number of operations that will run on CPU:\s*(\d+)", text)
    rows = []
    in_table = False
    for line in text.splitlines():
        if re.match(r"\s*Operator\s+Count\s+Status", line):
            in_table = True
            continue
        if in_table:
            m = re.match(r"\s*([A-Z][A-Z0-9_]*(?:-[a-z-]+)?)\s+(\d+)\s+(\S.*?)\s*$", line)
            if m:
                rows.append((m.group(1), int(m.group(2)), m.group(3)))
            elif line.strip() and rows:
                in_table = False
    if version is None and tpu is None and not rows:
        raise ValueError(
            "This does not look like an edgetpu_compiler log (no version line, no 'Number of operations' "
            f"line, no 'Operator Count Status' table). Received: text={text[:80]!r}"
        )
    return CompilerLog(
        version=version.group(1) if version else "",
        ops_on_tpu=int(tpu.group(1)) if tpu else sum(c for _, c, s in rows if s == MAPPED),
        ops_on_cpu=int(cpu.group(1)) if cpu else sum(c for _, c, s in rows if s != MAPPED),
        rows=rows,
        on_chip_bytes=_bytes(text, "On-chip memory used for caching model parameters"),
        on_chip_remaining_bytes=_bytes(text, "On-chip memory remaining for caching model parameters"),
        off_chip_bytes=_bytes(text, "Off-chip memory used for streaming uncached model parameters"),
        compiled=("Model compiled successfully" in text or "Model successfully compiled" in text),
        text=text,
    )


def run_compiler(tflite, *, min_runtime_version=14, timeout=180):
    """Runs `edgetpu_compiler -s` on the model if it is on PATH; a `CompilerLog`, or None if absent."""
    exe = shutil.which("edgetpu_compiler")
    if exe is None:
        return None
    content = _flatbuffer.read_bytes(tflite)
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d, "model.tflite")
        path.write_bytes(content)
        proc = subprocess.run([exe, "-s", "-m", str(min_runtime_version), "-o", d, str(path)],
                              capture_output=True, text=True, timeout=timeout, check=False)
        log = pathlib.Path(d, "model_edgetpu.log")
        text = proc.stdout + proc.stderr + (f"\n{log.read_text()}" if log.exists() else "")
    try:
        return parse_compiler_log(text)
    except ValueError:
        return CompilerLog("", 0, 0, [], None, None, None, False, text)


def edgetpu_report(tflite, *, min_runtime_version=14, multiple_segments=False, run_compiler_if_available=True):
    """Predicts, op by op, what the Coral Edge TPU compiler would map, and why not.

    Works on any `.tflite` (it need not come from tfopt). See the module docstring for the rules.
    If `edgetpu_compiler` is on PATH (and `run_compiler_if_available`), it is also run and its
    parsed log is attached as `report.compiler`.

    Args:
        tflite: bytes, a path to a `.tflite` file, or a `TFLiteModel`.
        min_runtime_version: the Edge TPU runtime to target (the compiler's `-m`; 14 by default,
            as in compiler v16). Decides which ops are in the table.
        multiple_segments: simulate the experimental `-a` flag (supported ops after a CPU op map again).
        run_compiler_if_available: run a locally installed `edgetpu_compiler` too.

    Returns:
        An `EdgeTPUReport` (`.all_mapped`, `.first_unmapped`, `.blockers`, `.to_dict()`, printable).

    Raises:
        FileNotFoundError / TFLiteFileError: the input is not a readable `.tflite`.

    Example:
        >>> report = tfopt.tflite_export.edgetpu_report("model.tflite")
        >>> print(report); report.all_mapped
    """
    if not isinstance(min_runtime_version, int) or not 10 <= min_runtime_version <= 16:
        raise ValueError(
            "`min_runtime_version` is the Edge TPU runtime version (the compiler's -m), an int from 10 to 16. "
            f"Received: min_runtime_version={min_runtime_version!r}"
        )
    fm = _flatbuffer.parse(tflite)
    sg = fm.subgraphs[0]
    verdicts = []
    state = "prefix"  # prefix (CPU) -> tpu -> cpu (after the single segment)
    for op in sg.operators:
        ok, status, reason = _op_rule(fm, sg, op, min_runtime_version)
        if state == "prefix" and ok:
            state = "tpu"
        elif state == "tpu" and not ok and not multiple_segments:
            state = "cpu"
        on = "tpu" if ok and (state == "tpu" or multiple_segments) else "cpu"
        if ok and on == "cpu":
            status, reason = SEGMENT, "after the first unmapped op everything runs on the CPU (one segment)"
        out = sg.output_name(op)
        verdicts.append(OpVerdict(op.index, op.name, op.version, _flatbuffer.layer_of(out), out, ok, status, reason, on))
    buffers = {sg.tensors[t].buffer for v in verdicts if v.on == "tpu" for t in sg.operators[v.index].inputs
               if t >= 0 and sg.tensors[t].is_constant}
    report = EdgeTPUReport(verdicts, _blockers(fm, sg), sum(map(fm.buffer_size, buffers)), min_runtime_version)
    if run_compiler_if_available:
        report.compiler = run_compiler(tflite, min_runtime_version=min_runtime_version)
    return report


def check_converted(content, samples, layer):
    """What `convert(target="edgetpu")` checks: (the report, its ops named after their Keras `layer`, and
    an `EdgeTPUError` naming the ops that would not map, or None). `samples` are not needed."""
    report = edgetpu_report(content)
    for v in report.ops:
        v.layer = layer(v.tensor)
    if report.all_mapped:
        return report, None
    lines = [f"blocker: {b}" for b in report.blockers] + [
        f"{v.op} v{v.version} at op #{v.index} (layer {v.layer!r}): {v.reason or v.status}"
        for v in report.unmappable()][:12]
    return report, EdgeTPUError(
        "Some ops would not run on the Edge TPU, so from the first of them on the model runs on the CPU: "
        + "; ".join(lines)
        + ". Replace those layers (e.g. GELU -> ReLU; LeakyReLU / hard_swish -> ReLU or PReLU(shared_axes=[1, 2]);"
        " Dense on a 3-D input -> Flatten or GlobalAveragePooling first), or pass strict=False to get the model"
        " and the report anyway. Received: target='edgetpu', strict=True"
    )
