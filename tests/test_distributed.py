"""Pruning, QAT and clustering under tf.distribute: MirroredStrategy and, for real, MultiWorkerMirroredStrategy.

Both run `tests/_mwms_worker.py` in subprocesses: logical devices and the multi-worker cluster must
be configured before TensorFlow initializes. The multi-worker test starts two worker processes on
localhost (TF_CONFIG on two free loopback ports) that train together with collective all-reduce.

What must hold, and does: every replica and every worker ends with bit-identical masks, pruning
step counters, QAT ranges, centroids and weights, and the pruned weights reach the target sparsity.
The only per-replica state that differs is BatchNormalization's moving statistics: Keras 3 creates
them with ``aggregation="none"``, so each replica keeps the statistics of its own part of the batch
(the same in plain Keras; with the strategy, replica 0's values are the ones saved). tfopt's QAT
ranges are created with ``aggregation="mean"`` so that they do not drift apart the same way.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_mwms_worker.py")
TIMEOUT_S = 240
TARGET_SPARSITY = 0.75  # _mwms_worker.TARGET_SPARSITY
STEPS = 8  # 2 epochs x 64 samples / global batch 16
# Keras' own BatchNormalization keeps per-replica moving statistics (see the module docstring).
PER_REPLICA_OK = ("/moving_mean#", "/moving_variance#")

pytestmark = pytest.mark.slow


def _env(**extra):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _start(args, env, log_path):
    log = open(log_path, "wb")
    # Own process group, so a timeout kills the worker and anything it started.
    proc = subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log, proc.log_path = log, log_path
    return proc


def _kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    proc.log.close()


def _tail(proc):
    with open(proc.log_path, "rb") as f:
        return f.read().decode(errors="replace")[-3000:]


def _run_all(procs):
    """Waits for every process (TIMEOUT_S in all); kills all of them if one fails or time runs out."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                pytest.fail(f"worker exited with {failed[0].returncode}:\n{_tail(failed[0])}")
            if time.monotonic() > deadline:
                pytest.fail(f"workers still running after {TIMEOUT_S} s:\n" + "\n---\n".join(_tail(p) for p in procs))
            time.sleep(0.2)
        for p in procs:
            assert p.returncode == 0, _tail(p)
    finally:
        for p in procs:
            _kill(p)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _load(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def _check_replicas_identical(dump):
    """Every variable's replica components are bit-identical (BN moving statistics aside)."""
    replicas = int(dump["num_replicas_in_sync"])
    differing = []
    for key in dump:
        if "#" not in key or key.endswith("#0"):
            continue
        first = key.rsplit("#", 1)[0] + "#0"
        if not np.array_equal(dump[key], dump[first]):
            differing.append(key)
    assert all(any(s in k for s in PER_REPLICA_OK) for k in differing), differing
    return replicas


def _check_training_result(dump):
    for stage in ("prune", "qat", "cluster"):
        assert any(k.startswith(f"{stage}/") for k in dump), stage
    steps = {k: int(v) for k, v in dump.items() if k.startswith("step/")}
    assert len(steps) == 3 and set(steps.values()) == {STEPS}, steps  # counted once per global step
    masks = {k: v for k, v in dump.items() if k.startswith("prune/") and "_mask#" in k}
    assert masks
    for key, mask in masks.items():
        size = mask.size
        assert int(size - mask.sum()) == size - max(int(round(size * (1 - TARGET_SPARSITY))), 1), key
    assert float(dump["prune/sparsity"]) == pytest.approx(TARGET_SPARSITY, abs=0.01)
    ranges = [k for k in dump if k.startswith("qat/") and k.rsplit("#", 1)[0].endswith("_max")]
    assert ranges and all(float(dump[k]) != 6.0 for k in ranges)  # trained, not the [-6, 6] placeholder
    assert int(dump["cluster/distinct"]) <= 4


def test_mirrored_strategy_two_replicas(tmp_path):
    out = tmp_path / "mirrored.npz"
    proc = _start(["mirrored", str(out)], _env(), tmp_path / "mirrored.log")
    _run_all([proc])
    dump = _load(out)
    assert _check_replicas_identical(dump) == 2
    _check_training_result(dump)


def test_multi_worker_mirrored_strategy_two_workers(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = []
    try:
        for index in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            procs.append(_start(["multiworker", str(tmp_path / f"w{index}.npz")], _env(TF_CONFIG=tf_config),
                                tmp_path / f"w{index}.log"))
    except BaseException:
        for p in procs:
            _kill(p)
        raise
    _run_all(procs)
    dumps = [_load(tmp_path / f"w{i}.npz") for i in range(2)]
    for dump in dumps:
        assert int(dump["num_replicas_in_sync"]) == 2  # one replica per worker, two workers
        _check_replicas_identical(dump)
        _check_training_result(dump)
    assert dumps[0].keys() == dumps[1].keys()
    differing = [k for k in dumps[0] if not np.array_equal(dumps[0][k], dumps[1][k])]
    # The workers' data shards differ, so only the BN statistics may; masks, steps, ranges,
    # centroids and weights are identical on both workers.
    assert all(any(s in k for s in PER_REPLICA_OK) for k in differing), differing
    masks = [k for k in dumps[0] if "_mask#" in k]
    assert masks and not set(masks) & set(differing)
