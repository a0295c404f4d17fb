"""The `tfopt convert | inspect | bench` subcommands (wired into `tfopt/cli.py` by `add_subcommands`)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np

from tfopt.tflite_export import analysis, converter, edgetpu, runtime
from tfopt.tflite_export._io import check_writable


def add_subcommands(subparsers):
    """Registers `convert`, `inspect` and `bench`, each setting `func(args) -> exit code`; bad input raises
    ValueError / TypeError / FileNotFoundError with a one-line message, which the caller prints (exit code 2)."""
    p = subparsers.add_parser("convert", help="convert a .keras model or SavedModel to a verified .tflite")
    p.add_argument("model", help="a .keras file or a SavedModel directory")
    p.add_argument("-o", "--output", required=True, help="the .tflite file to write")
    p.add_argument("--target", default="mobile", choices=converter.TARGETS)
    p.add_argument("--mode", default="int8", choices=converter.MODES)
    p.add_argument("--io-dtype", default=None, choices=converter.IO_DTYPES,
                   help="dtype of the float inputs and outputs (integer ones, e.g. int32 token ids, stay as they are)")
    p.add_argument(
        "--rep-data", default=None, metavar="FILE",
        help="calibration inputs, batch first: a .npy file (N, ...) for a single-input model, or a .npz with one "
        "array per model input, keyed by input name (np.savez('calib.npz', image=x, meta=m); token ids as "
        "integers); a .npz with a single array feeds a single-input model whatever its key",
    )
    p.add_argument("--max-samples", type=int, default=converter.DEFAULT_MAX_SAMPLES,
                   help="calibration sample cap (default %(default)s)")
    p.add_argument("--no-strict", action="store_true", help="warn instead of failing on unmapped/float ops")
    p.add_argument("--c-array", default=None, metavar="STEM", help="also write STEM.h / STEM.cc (micro firmware)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert)

    p = subparsers.add_parser("inspect", help="analyze a .tflite: ops, dtypes, float leaks, sizes")
    p.add_argument("file", help="a .tflite file")
    p.add_argument("--edgetpu", action="store_true", help="add the Edge TPU per-op report")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=_inspect)

    p = subparsers.add_parser("bench", help="median LiteRT latency of a .tflite (XNNPACK)")
    p.add_argument("file", help="a .tflite file")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)


def _load_rep_data(path):
    """The --rep-data file: an array (.npy, or a .npz holding one), or {input name: array} (.npz)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No representative data file at this path. Received: --rep-data={path!r}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(
            f"Could not read --rep-data as a .npy/.npz array ({type(e).__name__}). Save it with np.save. "
            f"Received: --rep-data={path!r}"
        ) from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            if not data.files:
                raise ValueError(
                    "The .npz file holds no array: save one array per model input, keyed by input name. "
                    f"Received: --rep-data={path!r}"
                )
            if len(data.files) == 1:
                return data[data.files[0]]
            return {name: data[name] for name in data.files}
    return data


def _convert_argv(args):
    """The `tfopt convert` arguments that reproduce `args` (to run them in another process)."""
    argv = ["convert", args.model, "-o", args.output, "--target", args.target, "--mode", args.mode,
            "--max-samples", str(args.max_samples)]
    for flag, value in (("--io-dtype", args.io_dtype), ("--rep-data", args.rep_data), ("--c-array", args.c_array)):
        if value is not None:
            argv += [flag, value]
    return argv + ["--no-strict"] * args.no_strict + ["--quiet"] * args.quiet


def _convert(args):
    if keras.backend.backend() != "tensorflow":
        # The converter needs the TensorFlow backend and a process's backend is fixed once keras is
        # imported (tfopt imports it): the same command runs in a TensorFlow-backend child process.
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        return subprocess.run([sys.executable, "-m", "tfopt", *_convert_argv(args)], env=env).returncode
    if not args.output.endswith(".tflite"):
        raise ValueError(f"The output file must end with .tflite. Received: -o {args.output!r}")
    # Checked before converting: a failure after `tfl.save` would leave the .tflite without its C array.
    check_writable(args.output, f"-o {args.output!r}")
    if args.c_array:
        check_writable(args.c_array + ".h", f"--c-array {args.c_array!r}")
    rep = _load_rep_data(args.rep_data) if args.rep_data else None
    try:
        tfl = converter.convert(args.model, target=args.target, mode=args.mode, representative_data=rep,
                                io_dtype=args.io_dtype, strict=not args.no_strict, max_samples=args.max_samples,
                                quiet=args.quiet)
    except ValueError as e:
        if rep is not None or "needs representative_data" not in str(e):
            raise
        # The Python argument name means nothing on the command line: name the flag.
        raise ValueError(
            f"{e} On the command line: --rep-data calib.npy (float32, shape (N, ...)), or for several inputs "
            "--rep-data calib.npz with one array per input name."
        ) from None
    tfl.save(args.output)
    if args.c_array:
        tfl.save_c_array(args.c_array)
    print(tfl.report)
    if tfl.edgetpu is not None:
        print(f"\n{tfl.edgetpu}")
    if tfl.arena_bytes is not None:
        print(f"\nTFLite Micro arena: {tfl.arena_bytes:,} bytes")
    print(f"\nWrote {args.output} ({len(tfl.content):,} bytes) in {tfl.conversion_seconds:.1f} s")
    return 0


def _inspect(args):
    report = analysis.analyze(args.file)
    tpu = edgetpu.edgetpu_report(args.file) if args.edgetpu else None
    if args.json:
        out = {"analysis": report.to_dict(), **({} if tpu is None else {"edgetpu": tpu.to_dict()})}
        print(json.dumps(out, indent=2))
    else:
        print(report if tpu is None else f"{report}\n\n{tpu}")
    return 0


def _bench(args):
    result = runtime.benchmark(args.file, runs=args.runs, warmup=args.warmup, threads=args.threads)
    print(json.dumps(result.to_dict(), indent=2) if args.json else f"{args.file}: {result}")
    return 0
