"""Runs a model in TFLite Micro and in LiteRT's reference kernels; executed as a separate process.

Usage: python _micro_worker.py MODEL.tflite INPUTS.npz OUT.npz

Both abort the process on some degenerate models, hence a process of its own (no tfopt, no TF: it starts
fast). INPUTS.npz: `input_<j>`, input j's quantized samples, one per row. OUT.npz: `micro_<j>` and
`litert_<j>`, every sample's output j in each runtime, and `arena_bytes`, the smallest arena (bisection).
"""

import bisect
import sys

import numpy as np


def _run(set_input, invoke, get_output, samples, n_outputs):
    """[every sample's output j, for each output j], running the rows of `samples` one by one."""
    outs = [[] for _ in range(n_outputs)]
    for row in zip(*samples):
        for j, s in enumerate(row):
            set_input(j, s)
        invoke()
        for j in range(n_outputs):
            outs[j].append(np.array(get_output(j)))
    return [np.stack(o) for o in outs]


def _run_micro(runtime, content, arena, samples, n_outputs):
    it = runtime.Interpreter.from_bytes(content, arena_size=arena)
    return _run(lambda j, s: it.set_input(s, j), it.invoke, it.get_output, samples, n_outputs)


def main(model_path, inputs_path, out_path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tflite_micro.python.tflite_micro import runtime

    with open(model_path, "rb") as f:
        content = f.read()
    ref = Interpreter(model_content=content, num_threads=1, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    ref.allocate_tensors()
    in_indices = [d["index"] for d in ref.get_input_details()]
    out_indices = [d["index"] for d in ref.get_output_details()]
    n_outputs = len(out_indices)
    with np.load(inputs_path) as data:
        samples = [data[f"input_{j}"] for j in range(len(in_indices))]

    def fits(arena):
        try:
            _run_micro(runtime, content, arena, [s[:1] for s in samples], n_outputs)
            return True
        except RuntimeError:
            return False

    hi = max(64 * 1024, 4 * len(content))
    while not fits(hi):
        if hi > (1 << 30):
            _run_micro(runtime, content, hi, [s[:1] for s in samples], n_outputs)  # raises the real error
        hi *= 2
    hi = bisect.bisect_left(range(hi + 1), True, lo=1, key=fits)  # the smallest arena that fits
    micro = _run_micro(runtime, content, hi, samples, n_outputs)
    litert = _run(lambda j, s: ref.set_tensor(in_indices[j], s), ref.invoke, lambda j: ref.get_tensor(out_indices[j]),
                  samples, n_outputs)
    np.savez(out_path, arena_bytes=np.int64(hi), **{f"micro_{j}": m for j, m in enumerate(micro)},
             **{f"litert_{j}": r for j, r in enumerate(litert)})


if __name__ == "__main__":
    main(*sys.argv[1:4])
