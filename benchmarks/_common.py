"""Helpers shared by the benchmark scripts (stdlib + numpy only: no Keras, no TF).

Nothing here imports Keras or TensorFlow, so both sides can use it: the
benchmark process (Keras 3) and `_tfmot_runner.py` (tf_keras + TFMOT, run in a
subprocess with ``TF_USE_LEGACY_KERAS=1``).
"""

import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
ARTIFACTS_DIR = os.path.join(RESULTS_DIR, "artifacts")
RUNNER = os.path.join(BENCH_DIR, "_tfmot_runner.py")


# -- the TFMOT subprocess ----------------------------------------------------------


def legacy_keras_env():
    """A copy of os.environ for a tf_keras/TFMOT child: TF_USE_LEGACY_KERAS=1, quiet TF logs."""
    env = dict(os.environ)
    env["TF_USE_LEGACY_KERAS"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The runner imports _common from its own folder; the repo root is not needed
    # (and must not be: tfopt imports Keras 3).
    return env


def run_tfmot(subcommand, *args, timeout=None, echo_stderr=True):
    """Runs ``_tfmot_runner.py <subcommand> <args>`` in a fresh interpreter; returns its JSON.

    The runner prints exactly one JSON document on its last stdout line.

    Raises:
        RuntimeError: the runner failed (its stderr tail is in the message).
    """
    cmd = [sys.executable, RUNNER, subcommand, *map(str, args)]
    proc = subprocess.run(cmd, env=legacy_keras_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"TFMOT runner failed (exit {proc.returncode}): {' '.join(cmd)}\n--- stderr (tail) ---\n"
            + proc.stderr[-4000:]
        )
    if echo_stderr and proc.stderr.strip():
        # Progress lines the runner writes to stderr (not the TF log noise).
        for line in proc.stderr.splitlines():
            if line.startswith("[tfmot]"):
                print(line, file=sys.stderr)
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    if not lines:
        raise RuntimeError(f"TFMOT runner printed no JSON: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def emit_json(obj):
    """What the runner does last: one JSON line on stdout."""
    sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


def log(prefix, msg):
    print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)


# -- results -------------------------------------------------------------------------


def _json_default(o):
    # numpy scalars / arrays without importing numpy at module level.
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_results(name, payload):
    """Writes ``benchmarks/results/<name>.json`` (pretty, sorted keys) and returns its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    return path


# CPU instructions int8 kernels use for dot products (x86: VNNI, AMX; ARM: SDOT, I8MM), with the vector widths.
INT8_FEATURES = {"avx2", "avx512f", "avx512_vnni", "avx512bw", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve"}


def machine_info(extra=None):
    """CPU count, platform, Python and (given by the caller) library versions."""
    info = {
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info.setdefault("cpu_model", line.split(":", 1)[1].strip())
                if line.startswith(("flags", "Features")):  # x86, ARM
                    info["cpu_int8_features"] = sorted(set(line.split(":", 1)[1].split()) & INT8_FEATURES)
    except OSError:
        pass
    info.update(extra or {})
    return info


# -- sizes ---------------------------------------------------------------------------


def gzip_size(data_or_path, level=9):
    """Size in bytes of `data` (bytes) or of the file at `path` after gzip -9.

    mtime is fixed so that the figure is reproducible.
    """
    if isinstance(data_or_path, (bytes, bytearray)):
        data = bytes(data_or_path)
    else:
        with open(data_or_path, "rb") as f:
            data = f.read()
    return len(gzip.compress(data, compresslevel=level, mtime=0))


def sizes(tflite_bytes):
    """{'raw': bytes, 'gzip': bytes} of a serialized model."""
    return {"raw": len(tflite_bytes), "gzip": gzip_size(tflite_bytes)}


# -- timing --------------------------------------------------------------------------


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds``"""

    def __enter__(self):
        self._t0 = time.perf_counter()
        self.seconds = None
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        return False


def median(xs):
    return statistics.median(xs)


def summarize_times(xs):
    """median / min / max / relative spread ((max-min)/median) of a list of seconds."""
    med = statistics.median(xs)
    return {
        "median": med,
        "min": min(xs),
        "max": max(xs),
        "spread": (max(xs) - min(xs)) / med if med else None,
        "n": len(xs),
    }


def round_robin(variants, rounds, run_block, on_round=None):
    """Interleaves blocks: for r in rounds, for v in variants: t = run_block(v).

    The order of the variants rotates every round so that no variant always runs
    right after the same neighbour (caches, thermal or neighbour load drift).

    Returns:
        {variant: [per-round value, ...]} (values in round order).
    """
    out = {v: [] for v in variants}
    n = len(variants)
    for r in range(rounds):
        order = [variants[(i + r) % n] for i in range(n)]
        for v in order:
            out[v].append(run_block(v))
        if on_round is not None:
            on_round(r, out)
    return out


def paired_ratios(times, baseline):
    """Per-round ratio variant/baseline (same round = closest in time), and their median.

    Returns:
        {variant: {"per_round": [...], "median": m, "ratio_of_medians": m2}}
    """
    base = times[baseline]
    out = {}
    for v, ts in times.items():
        per_round = [t / b for t, b in zip(ts, base)]
        out[v] = {
            "per_round": per_round,
            "median": statistics.median(per_round),
            "ratio_of_medians": statistics.median(ts) / statistics.median(base),
        }
    return out


# -- tables --------------------------------------------------------------------------


def format_table(header, rows, align=None):
    """Plain-text table; `align` is a string of 'l'/'r' per column (default: first left)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    ncol = len(header)
    align = align or ("l" + "r" * (ncol - 1))
    widths = [max(len(r[i]) for r in cells) for i in range(ncol)]

    def fmt(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align))

    rule = "-" * (sum(widths) + 2 * (ncol - 1))
    return "\n".join([fmt(cells[0]), rule] + [fmt(r) for r in cells[1:]])


def print_table(title, header, rows, align=None):
    print(f"\n{title}")
    print(format_table(header, rows, align))
