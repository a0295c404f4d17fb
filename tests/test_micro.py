"""target="micro": TFLite Micro run in a subprocess vs LiteRT, arena size, C arrays."""

import re

import keras
import numpy as np
import pytest
from _export_fixtures import assert_fully_int8, model_with, rep_data, tiny_model

from tfopt import tflite_export as te
from tfopt.tflite_export import micro


@pytest.fixture(scope="module")
def micro_tiny():
    return te.convert(tiny_model(), target="micro", representative_data=rep_data(), quiet=True)


@pytest.mark.slow
def test_micro_outputs_match_litert_and_arena_is_sized(micro_tiny):
    assert_fully_int8(micro_tiny.content)
    result = micro_tiny.micro
    assert result.identical and result.max_diff == 0 and result.num_samples == 16
    assert 1000 < micro_tiny.arena_bytes < 64 * 1024
    # The reported arena is the minimum: it runs, and 16 bytes less does not.
    again = micro.run_micro(micro_tiny, rep_data(2))
    assert again.arena_bytes == micro_tiny.arena_bytes


@pytest.mark.slow
def test_c_array_files(tmp_path, micro_tiny):
    header, source = micro_tiny.save_c_array(tmp_path / "model_data.cc", var_name="g_tiny")
    assert header.endswith("model_data.h") and source.endswith("model_data.cc")
    h = open(header).read()
    cc = open(source).read()
    assert "#ifndef MODEL_DATA_H_" in h and "extern const unsigned char g_tiny[];" in h
    assert '#include "model_data.h"' in cc and "alignas(16) const unsigned char g_tiny[] = {" in cc
    assert f"const unsigned int g_tiny_len = {len(micro_tiny.content)};" in cc
    body = cc.split("{", 1)[1].split("}", 1)[0]
    assert bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})", body)) == micro_tiny.content
    with pytest.raises(ValueError, match="C identifier.*var_name='2bad'"):
        micro_tiny.save_c_array(tmp_path / "x", var_name="2bad")
    assert not (tmp_path / "x.h").exists()


@pytest.mark.slow
def test_op_without_a_micro_kernel_is_named(tmp_path):
    model = model_with(lambda x: keras.layers.Activation("gelu", name="gelu_act")(x))
    with pytest.raises(te.MicroError, match=r"no kernel for: GELU \(layer 'gelu_act'\)"):
        te.convert(model, target="micro", representative_data=rep_data(8), quiet=True)


@pytest.mark.slow
def test_abort_in_the_subprocess_is_an_error_not_a_crash(micro_tiny, tmp_path, monkeypatch):
    worker = tmp_path / "abort_worker.py"
    worker.write_text("import os\nos.abort()\n")
    monkeypatch.setattr(micro, "_WORKER", str(worker))
    with pytest.raises(te.MicroError, match="aborted the process \\(SIGABRT\\).*degenerate quantization scales"):
        micro.run_micro(micro_tiny, rep_data(1))
    worker.write_text("import sys\nprint(\"Didn't find op for builtin opcode 'TILE' version '1'\", file=sys.stderr)\n"
                      "sys.exit(1)\n")
    with pytest.raises(te.MicroError, match="no kernel for TILE"):
        micro.run_micro(micro_tiny, rep_data(1))
    assert np.isfinite(micro_tiny.predict(rep_data(1))).all()  # the parent process is fine
