"""Faults: training killed with SIGKILL and resumed, saves that fail half-way, determinism.

Kill and resume (`tests/_fault_worker.py` in subprocesses): a seeded prune-then-QAT run is stopped
at a known step with a real SIGKILL, restarted on the same state directory, and its final state
(every model and optimizer variable: masks, thresholds, pruning and QAT step counters, activation
ranges, weights, Adam slots) is compared with a run that was never killed. The comparison is exact
(`assert_array_equal`, floats included): the worker uses `keras.utils.set_random_seed`,
`tf.config.experimental.enable_op_determinism()`, no shuffling and one CPU device, and a resumed
run executes the same ops on the same values as the reference, so no tolerance is needed.

Keras 3's `BackupAndRestore` with a batch-level `save_freq` restores the weights of the last
backup but restarts the interrupted epoch from its first batch (it records the batch in
`training_metadata.json` and never reads it back). So a resume from a mid-epoch backup trains the
batches between the epoch start and the backup twice; its reference is a run that trains exactly
that batch sequence without a kill (the worker's ``--replay``). A `.keras` checkpoint per epoch
resumes from the last complete epoch and matches the plain uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_fault_worker.py")
TIMEOUT_S = 240


def _env(**extra):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra)
    return env


class _Proc:
    """A worker subprocess in its own process group, with its output in a log file."""

    def __init__(self, args, log_path, env=None):
        self.log_path = str(log_path)
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen([sys.executable, *args], env=env or _env(), stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-3000:]

    def kill(self, sig=signal.SIGKILL):
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
        self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def finish(self, timeout=TIMEOUT_S):
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"worker still running after {timeout} s:\n{self.tail()}")
        self._log.close()
        assert rc == 0, f"worker exited with {rc}:\n{self.tail()}"


def _worker(tmp, name, *args):
    return _Proc([WORKER, *map(str, args)], tmp / f"{name}.log")


def _wait_for(proc, predicate, what, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.popen.poll() is not None:
            pytest.fail(f"worker ended ({proc.popen.returncode}) before {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout} s:\n{proc.tail()}")
        time.sleep(0.1)


def _progress(state):
    try:
        with open(state / "progress") as f:
            phase, step = f.read().split()
        return phase, int(step)
    except (FileNotFoundError, ValueError):
        return None


def _load(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def _assert_same_state(got, want):
    assert list(got) == list(want)  # same variables, same order, same paths
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _steps(dump, needle):
    return {k.split("/", 2)[2]: int(v) for k, v in dump.items() if k.startswith(("prune/", "qat/")) and needle in k}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The uninterrupted run and the BackupAndRestore replay, started together in the background."""
    tmp = tmp_path_factory.mktemp("fault_refs")
    procs = {
        "plain": _worker(tmp, "plain", "none", tmp / "plain", tmp / "plain.npz"),
        # The backup the kill test resumes from is taken at epoch 1, batch 1 (see the test).
        "replay": _worker(tmp, "replay", "none", tmp / "replay", tmp / "replay.npz", "--replay", "1:1"),
    }
    done = {}

    def get(name):
        if name not in done:
            procs[name].finish()
            done[name] = _load(tmp / f"{name}.npz")
        return done[name]

    yield get
    for p in procs.values():
        if p.popen.poll() is None:
            p.kill()


def _kill_at(tmp, variant, phase, step):
    """Starts the worker, lets it reach `step` of `phase`, SIGKILLs it; returns the state dir."""
    state = tmp / "state"
    proc = _worker(tmp, "killed", variant, state, tmp / "out.npz", "--hang", f"{phase}:{step}")
    _wait_for(proc, lambda: _progress(state) == (phase, step), f"progress {phase}:{step}")
    assert proc.kill(signal.SIGKILL) == -signal.SIGKILL  # really killed by the signal
    assert not (tmp / "out.npz").exists()
    return state


@pytest.mark.slow
def test_kill_mid_epoch_resume_with_backup_and_restore(tmp_path, references):
    # Pruning: 6 steps per epoch, backups every 4 batches (steps 4 and 8); killed at step 10,
    # mid-epoch 1, two steps after the backup at (epoch 1, batch 1).
    state = _kill_at(tmp_path, "backup", "prune", 10)
    backup = state / "prune_backup"
    with open(backup / "training_metadata.json") as f:
        assert json.load(f) == {"epoch": 1, "batch": 1}
    assert (backup / "latest.weights.h5").exists()
    assert not (state / "prune_done.keras").exists()

    _worker(tmp_path, "resumed", "backup", state, tmp_path / "out.npz").finish()
    resumed = _load(tmp_path / "out.npz")
    assert not backup.exists()  # BackupAndRestore removes it once training ends
    _assert_same_state(resumed, references("replay"))

    # The pruning step counter came back from the backup (8) and counted the 12 steps after it;
    # the plain run took 18. The masks still reach the schedule's final 80% sparsity.
    assert set(_steps(resumed, "pruning_step").values()) == {20}
    assert set(_steps(references("plain"), "pruning_step").values()) == {18}
    for key, mask in resumed.items():
        if key.startswith("prune/") and key.endswith("_mask"):
            assert int(mask.size - mask.sum()) == mask.size - max(int(round(mask.size * 0.2)), 1), key


@pytest.mark.slow
def test_kill_mid_epoch_resume_from_keras_checkpoint(tmp_path, references):
    # Killed in QAT (the prune phase finished and left prune_done.keras) at step 9 = epoch 1,
    # batch 2; the newest checkpoint is the end of epoch 1 of 2 (qat-1.keras).
    state = _kill_at(tmp_path, "checkpoint", "qat", 9)
    assert (state / "prune_done.keras").exists() and (state / "qat-1.keras").exists()
    assert not (state / "qat-2.keras").exists() and not (state / "qat_done.keras").exists()

    _worker(tmp_path, "resumed", "checkpoint", state, tmp_path / "out.npz").finish()
    resumed = _load(tmp_path / "out.npz")
    plain = references("plain")
    _assert_same_state(resumed, plain)
    assert set(_steps(resumed, "/step").values()) == {12}  # QAT's BN-folding step counter
    ranges = [k for k in resumed if k.startswith("qat/") and k.endswith("_max")]
    assert ranges and all(float(resumed[k]) != 6.0 for k in ranges)  # trained ranges, restored


# -- determinism -------------------------------------------------------------------------------

# Builds, trains and converts the same seeded models in a fresh process and writes the .tflite
# files and their analyses. Two processes with different hash seeds must agree byte for byte.
_CONVERT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras, numpy as np, tensorflow as tf
    sys.path.insert(0, {here!r})
    import tfopt
    from tfopt import tflite_export
    from _export_fixtures import rep_data, tiny_model
    from conftest import compile_for_test, image_data, tiny_cnn

    out = sys.argv[1]
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    models = {{
        "int8_ptq": tflite_export.convert(tiny_model(seed=0), representative_data=rep_data(32, seed=0), quiet=True),
        "float32": tflite_export.convert(tiny_model(seed=0), mode="float32", quiet=True),
    }}
    # Another seed must give other bytes, or the byte comparison would prove nothing.
    tflite_export.convert(tiny_model(seed=1), mode="float32", quiet=True).save(os.path.join(out, "seed1.tflite"))
    keras.utils.set_random_seed(0)
    qat = compile_for_test(tfopt.quantize_model(tiny_cnn()))
    x, y = image_data(32, seed=0)
    qat.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    models["qat"] = tflite_export.convert(qat, target="edgetpu", quiet=True)
    reports = {{}}
    for name, tfl in models.items():
        tfl.save(os.path.join(out, name + ".tflite"))
        reports[name] = {{"analysis": tflite_export.analyze(tfl.content).to_dict(),
                         "edgetpu": tflite_export.edgetpu_report(tfl.content).to_dict()}}
    with open(os.path.join(out, "reports.json"), "w") as f:
        json.dump(reports, f, sort_keys=True, default=str)
    """
).format(here=HERE)

TARGET_FILES = ("int8_ptq", "float32", "qat")


@pytest.fixture(scope="module")
def two_conversions(tmp_path_factory):
    """The same conversions in two fresh processes (different PYTHONHASHSEED), run side by side."""
    dirs = [tmp_path_factory.mktemp(f"convert{i}") for i in range(2)]
    procs = [_Proc(["-c", _CONVERT_SCRIPT, str(d)], d / "log.txt", env=_env(PYTHONHASHSEED=str(i + 1)))
             for i, d in enumerate(dirs)]
    try:
        for p in procs:
            p.finish()
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.kill()
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGET_FILES)
def test_same_model_data_and_seed_give_identical_tflite_bytes(two_conversions, name):
    first, second = ((d / f"{name}.tflite").read_bytes() for d in two_conversions)
    assert first[4:8] == b"TFL3" and len(first) > 1000
    assert first == second
    if name == "float32":
        assert (two_conversions[0] / "seed1.tflite").read_bytes() != first


@pytest.mark.slow
def test_analysis_is_the_same_on_every_run(two_conversions):
    from tfopt import tflite_export

    reports = [json.loads((d / "reports.json").read_text()) for d in two_conversions]
    assert set(reports[0]) == set(TARGET_FILES)
    assert reports[0] == reports[1]  # across processes
    for name in TARGET_FILES:
        path = two_conversions[0] / f"{name}.tflite"
        runs = [
            json.loads(json.dumps({"analysis": tflite_export.analyze(str(path)).to_dict(),
                                   "edgetpu": tflite_export.edgetpu_report(str(path)).to_dict()},
                                  sort_keys=True, default=str))
            for _ in range(2)
        ]
        assert runs[0] == runs[1] == reports[0][name]  # in this process, from the file, twice
        assert str(tflite_export.analyze(str(path))) == str(tflite_export.analyze(path.read_bytes()))


# -- atomic saves ------------------------------------------------------------------------------

OLD = b"old model bytes, must survive a failed save"


@pytest.fixture(scope="module")
def tflite_model():
    from tfopt import tflite_export

    from _export_fixtures import tiny_model

    return tflite_export.convert(tiny_model(seed=0), mode="float32", quiet=True)


class _Boom(OSError):
    pass


def _half_writing_fdopen(real_fdopen):
    """os.fdopen whose file writes half of the data, flushes it to disk, then fails."""

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        real_write = f.write

        def write(data):
            real_write(data[: len(data) // 2])
            f.flush()
            raise _Boom("disk full (simulated)")

        f.write = write
        return f

    return fdopen


def _failing_replace(*args, **kwargs):
    raise _Boom("rename failed (simulated)")


def _break(monkeypatch, how):
    from tfopt.tflite_export import _io

    if how == "write":
        monkeypatch.setattr(_io.os, "fdopen", _half_writing_fdopen(os.fdopen))
    else:
        monkeypatch.setattr(_io.os, "replace", _failing_replace)


def _save_tflite(tfl, directory):
    tfl.save(str(directory / "model.tflite"))
    return ["model.tflite"]


def _save_c_array(tfl, directory):
    tfl.save_c_array(str(directory / "model_data"))
    return ["model_data.h", "model_data.cc"]


def _save_c_array_function(tfl, directory):
    from tfopt import tflite_export

    tflite_export.save_c_array(tfl.content, str(directory / "model_data"))
    return ["model_data.h", "model_data.cc"]


def _cli_convert(tfl, directory, monkeypatch=None):
    from tfopt import cli
    from tfopt.tflite_export import converter

    # The conversion itself is not under test here: the CLI's writes are.
    monkeypatch.setattr(converter, "convert", lambda *a, **k: tfl)
    rc = cli.main(["convert", str(directory / "in.keras"), "-o", str(directory / "model.tflite"),
                   "--c-array", str(directory / "model_data"), "--quiet"])
    assert rc == 0
    return ["model.tflite", "model_data.h", "model_data.cc"]


SAVERS = {"TFLiteModel.save": _save_tflite, "TFLiteModel.save_c_array": _save_c_array,
          "save_c_array": _save_c_array_function, "cli_convert": _cli_convert}


def _call(saver, tfl, directory, monkeypatch):
    if saver is _cli_convert:
        return saver(tfl, directory, monkeypatch)
    return saver(tfl, directory)


@pytest.mark.parametrize("how", ["write", "replace"])
@pytest.mark.parametrize("saver", list(SAVERS.values()), ids=list(SAVERS))
def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, tflite_model, saver, how):
    # Learn the file names from a successful save in a scratch directory first.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    names = _call(saver, tflite_model, scratch, monkeypatch)
    target = tmp_path / "target"
    target.mkdir()
    for n in names:
        (target / n).write_bytes(OLD + n.encode())
    before = sorted(os.listdir(target))
    _break(monkeypatch, how)
    with pytest.raises(_Boom):
        _call(saver, tflite_model, target, monkeypatch)
    assert sorted(os.listdir(target)) == before  # no temp file left behind
    for n in names:
        assert (target / n).read_bytes() == OLD + n.encode()


@pytest.mark.parametrize("saver", list(SAVERS.values()), ids=list(SAVERS))
def test_successful_save_replaces_the_file_by_rename(tmp_path, monkeypatch, tflite_model, saver):
    from tfopt.tflite_export import _io

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    names = _call(saver, tflite_model, scratch, monkeypatch)
    for n in names:
        (tmp_path / n).write_bytes(OLD)
    old_inodes = {n: os.stat(tmp_path / n).st_ino for n in names}
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(_io.os, "replace", lambda src, dst: (renames.append((src, dst)), real_replace(src, dst))[1])
    _call(saver, tflite_model, tmp_path, monkeypatch)
    assert sorted(os.listdir(tmp_path)) == sorted(["scratch", *names])
    assert sorted(os.path.basename(dst) for _, dst in renames) == sorted(names)
    for src, dst in renames:
        assert os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst))  # same file system
    umask = os.umask(0)
    os.umask(umask)
    for n in names:
        assert (tmp_path / n).read_bytes() == (scratch / n).read_bytes() != OLD
        assert os.stat(tmp_path / n).st_ino != old_inodes[n]  # a new file renamed over the old one
        assert os.stat(tmp_path / n).st_mode & 0o777 == 0o666 & ~umask
    if "model.tflite" in names:
        assert (tmp_path / "model.tflite").read_bytes() == tflite_model.content


def test_no_module_writes_files_outside_atomic_write():
    """Every `open(..., 'w...')` in tfopt and tflite_export is atomic_write's or into a TemporaryDirectory."""
    import ast

    root = os.path.dirname(HERE)
    allowed = {("tflite_export/micro.py", "run_micro"), ("tflite_export/edgetpu.py", "run_compiler")}
    found = set()
    for package in ("tfopt", "tflite_export", "callbacks"):
        for name in sorted(os.listdir(os.path.join(root, package))):
            if not name.endswith(".py"):
                continue
            rel = f"{package}/{name}"
            tree = ast.parse(open(os.path.join(root, rel)).read())
            for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
                for call in ast.walk(func):
                    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "open"):
                        continue
                    mode = call.args[1] if len(call.args) > 1 else next(
                        (k.value for k in call.keywords if k.arg == "mode"), None)
                    if isinstance(mode, ast.Constant) and any(c in mode.value for c in "wax+"):
                        found.add((rel, func.name))
    assert found <= allowed, found - allowed
