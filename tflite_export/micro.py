"""TFLite Micro: check that a model runs in TFLM with LiteRT's outputs, size its arena, emit C arrays.

TFLM and LiteRT's reference kernels abort the process (SIGABRT) on some degenerate models (e.g. scales ~1e-8
from calibrating an untrained network), so they run in `_micro_worker.py` and an abort becomes a `MicroError`.
"""

import dataclasses
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile

import numpy as np

from tfopt.tflite_export import _flatbuffer
from tfopt.tflite_export._errors import MicroError
from tfopt.tflite_export._io import atomic_write
from tfopt.tflite_export.runtime import Runner, quantize

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_micro_worker.py")

# Builtins the tflite-micro Python wheel does not register (its resolver has ~100 ops); checked
# up front for a clear error, the TFLM run itself is the final word for anything else.
UNSUPPORTED_OPS = {
    "GELU", "TILE", "BATCH_MATMUL", "DENSIFY", "RANDOM_UNIFORM", "RANDOM_STANDARD_NORMAL", "MULTINOMIAL",
    "NON_MAX_SUPPRESSION_V4", "NON_MAX_SUPPRESSION_V5", "RFFT2D", "SEGMENT_SUM", "UNSORTED_SEGMENT_SUM",
    "WHERE", "TOPK_V2", "BIDIRECTIONAL_SEQUENCE_LSTM", "LSH_PROJECTION", "HASHTABLE_LOOKUP", "RANGE",
    "SPARSE_TO_DENSE", "SCATTER_ND", "REVERSE_V2", "MATRIX_DIAG", "MATRIX_SET_DIAG", "ONE_HOT",
}


@dataclasses.dataclass
class MicroResult:
    """What the TFLM run found: the smallest arena, and how TFLM's outputs compare with LiteRT's."""

    arena_bytes: int
    num_samples: int
    max_diff: float
    identical: bool

    def to_dict(self):
        return dataclasses.asdict(self)


def check_ops(tflite, layer_name=None):
    """Raises MicroError listing every op TFLite Micro does not have (with its layer)."""
    layer = layer_name or _flatbuffer.layer_of
    bad = {f"{op.name if op.name != 'CUSTOM' else op.custom_code} (layer {layer(sg.output_name(op))!r})"
           for sg in _flatbuffer.parse(tflite).subgraphs for op in sg.operators
           if op.name in UNSUPPORTED_OPS or op.name.startswith("STABLEHLO") or op.custom_code.startswith("Flex")}
    if bad:
        raise MicroError(
            f"TFLite Micro has no kernel for: {', '.join(sorted(bad))}. Replace those layers with ones "
            "TFLM supports (e.g. ReLU instead of GELU, no UpSampling2D nearest -> TILE, Dense on 2-D "
            "inputs). Received: target='micro'"
        )


def run_micro(tflite, samples, *, timeout=600):
    """A `MicroResult` of `samples` (inputs as `TFLiteModel.predict` takes them, each run on its own) run in
    TFLM and LiteRT's reference kernels, in a subprocess; a `MicroError` if TFLM cannot load, run or aborts."""
    content = _flatbuffer.read_bytes(tflite)
    runner = Runner(content, kernels="builtin")
    arrays = dict(zip((d["index"] for d in runner.inputs), runner.feeds(samples, "samples")))
    # The worker sets TFLM's inputs by position: the subgraph's order, which get_input_details keeps.
    inputs = {f"input_{j}": quantize(arrays[d["index"]][:, None], d)
              for j, d in enumerate(runner.interpreter.get_input_details())}
    with tempfile.TemporaryDirectory() as tmp:
        model_path, in_path, out_path = (os.path.join(tmp, n) for n in ("m.tflite", "x.npz", "out.npz"))
        pathlib.Path(model_path).write_bytes(content)
        np.savez(in_path, **inputs)
        try:
            proc = subprocess.run([sys.executable, _WORKER, model_path, in_path, out_path],
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise MicroError(f"TFLite Micro did not finish within {timeout} s. Received: timeout={timeout}") from None
        if proc.returncode != 0:
            raise MicroError(_failure_message(proc))
        with np.load(out_path) as r:
            arena = int(r["arena_bytes"])
            max_diff = max(float(np.max(np.abs(r[k].astype(np.float64) - r[f"litert_{k[6:]}"].astype(np.float64))))
                           for k in r.files if k.startswith("micro_"))
    n = len(inputs["input_0"])
    return MicroResult(arena_bytes=arena, num_samples=n, max_diff=max_diff, identical=max_diff == 0)


def check_converted(content, samples, layer):
    """What `convert(target="micro")` checks: (the `MicroResult`, None); a `MicroError`, strict or not, for an op
    without a TFLM kernel (named after its Keras `layer`), a failed run, or outputs that differ from LiteRT's."""
    check_ops(content, layer)
    result = run_micro(content, samples)
    if not result.identical:
        raise MicroError(
            f"TFLite Micro's outputs differ from LiteRT's reference kernels by up to {result.max_diff:g} "
            f"quantization steps on {result.num_samples} calibration samples; the model would behave "
            "differently on the microcontroller. Received: target='micro'"
        )
    return result, None


def _failure_message(proc):
    err = (proc.stderr or "").strip()
    rc = proc.returncode
    if rc < 0 and -rc == signal.SIGABRT:
        return (
            "TFLite Micro (or LiteRT's reference kernels) aborted the process (SIGABRT) on this model. The usual "
            "cause is degenerate quantization scales (< 1e-6) from calibrating on data unlike the real inputs or "
            "an untrained model; calibrate with real samples. Received: target='micro'"
        )
    m = re.search(r"Didn't find op for builtin opcode '(\w+)'", err)
    if m:
        return (
            f"TFLite Micro has no kernel for {m.group(1)}. Replace that layer with one TFLM supports. "
            "Received: target='micro'"
        )
    tail = " | ".join(line for line in err.splitlines()[-4:] if line.strip())
    return f"TFLite Micro failed to run the model (exit code {rc}): {tail}. Received: target='micro'"


def c_array_sources(content, var_name="g_model", header_name="model.h"):
    """The (header, source) text of a C array holding the model, 16-byte aligned for TFLM."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var_name or ""):
        raise ValueError(
            f"`var_name` must be a C identifier (letters, digits, underscores; not starting with a digit). "
            f"Received: var_name={var_name!r}"
        )
    guard = re.sub(r"\W", "_", header_name).upper() + "_"
    header = (
        f"// Generated by tfopt.tflite_export: a .tflite model for TensorFlow Lite Micro.\n"
        f"#ifndef {guard}\n#define {guard}\n\n"
        f"extern const unsigned char {var_name}[];\nextern const unsigned int {var_name}_len;\n\n#endif  // {guard}\n"
    )
    body = ",\n    ".join(", ".join(f"0x{b:02x}" for b in content[i : i + 12]) for i in range(0, len(content), 12))
    source = (
        f"// Generated by tfopt.tflite_export: a .tflite model for TensorFlow Lite Micro.\n"
        f'#include "{header_name}"\n\n'
        f"alignas(16) const unsigned char {var_name}[] = {{\n    {body}\n}};\n"
        f"const unsigned int {var_name}_len = {len(content)};\n"
    )
    return header, source


def save_c_array(tflite, path_stem, var_name="g_model"):
    """Writes `<path_stem>.h` and `<path_stem>.cc` (atomically) holding the model as a C array.

    Returns:
        The two paths written, (header, source).
    """
    content = _flatbuffer.read_bytes(tflite)
    path_stem = os.fspath(path_stem)
    for ext in (".cc", ".h", ".c", ".cpp"):
        if path_stem.endswith(ext):
            path_stem = path_stem[: -len(ext)]
    header_path, source_path = path_stem + ".h", path_stem + ".cc"
    header, source = c_array_sources(content, var_name, os.path.basename(header_path))
    atomic_write(header_path, header.encode())
    atomic_write(source_path, source.encode())
    return header_path, source_path
