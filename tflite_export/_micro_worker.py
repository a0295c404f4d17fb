"""Runs a model in TFLite Micro and in LiteRT's reference kernels; executed as a separate process.

Usage: python _micro_worker.py MODEL.tflite INPUTS.npz OUT.npz

Both runtimes abort the whole process (SIGABRT) on some degenerate models instead of raising, so
`tfopt.tflite_export.micro` never runs them in its own process. Imports neither tfopt nor TF: only
numpy, tflite_micro and ai_edge_litert, so it starts fast. INPUTS.npz holds `input_<j>`, the
quantized samples of the model's input j, one per row (batch 1 each). OUT.npz gets `micro` and `litert` outputs (object arrays, one entry
per output tensor) and `arena_bytes`, the smallest arena that runs the model, found by bisection.
"""

import sys

import numpy as np


def _run(runtime, content, arena, samples, n_outputs):
    it = runtime.Interpreter.from_bytes(content, arena_size=arena)
    outs = [[] for _ in range(n_outputs)]
    for row in zip(*samples):
        for j, s in enumerate(row):
            it.set_input(s, j)
        it.invoke()
        for j in range(n_outputs):
            outs[j].append(np.array(it.get_output(j)))
    return outs


def main(model_path, inputs_path, out_path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tflite_micro.python.tflite_micro import runtime

    with open(model_path, "rb") as f:
        content = f.read()
    ref = Interpreter(model_content=content, num_threads=1, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    ref.allocate_tensors()
    n_outputs = len(ref.get_output_details())
    in_indices = [d["index"] for d in ref.get_input_details()]
    with np.load(inputs_path) as data:
        samples = [data[f"input_{j}"] for j in range(len(in_indices))]

    def fits(arena):
        try:
            _run(runtime, content, arena, [s[:1] for s in samples], n_outputs)
            return True
        except RuntimeError:
            return False

    hi = max(64 * 1024, 4 * len(content))
    while not fits(hi):
        if hi > (1 << 30):
            _run(runtime, content, hi, [s[:1] for s in samples], n_outputs)  # raises the real error
        hi *= 2
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    micro = _run(runtime, content, hi, samples, n_outputs)
    litert = [[] for _ in range(n_outputs)]
    for row in zip(*samples):
        for index, s in zip(in_indices, row):
            ref.set_tensor(index, s)
        ref.invoke()
        for j, d in enumerate(ref.get_output_details()):
            litert[j].append(np.array(ref.get_tensor(d["index"])))
    np.savez(
        out_path,
        arena_bytes=np.int64(hi),
        **{f"micro_{j}": np.stack(micro[j]) for j in range(n_outputs)},
        **{f"litert_{j}": np.stack(litert[j]) for j in range(n_outputs)},
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
