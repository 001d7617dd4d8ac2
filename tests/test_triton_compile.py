"""The Triton kernels compiled for real GPU architectures without a GPU: static evidence.

The interpreter checks what the kernels compute; it does not type-check or allocate like the
compiler. Here every kernel is compiled (in a subprocess, without ``TRITON_INTERPRET``) with
the ptxas that ships with Triton, specialised exactly as a launch would specialise it
(:mod:`swa_lib.backends.triton.compiled`), and the compiled code is held to what the autotune
lists (:mod:`swa_lib.backends.triton_arch`) promise:

* every configuration sm_80 and sm_90 may pick at D = 64 and 128 (bf16, fp16) compiles without
  register spills, in shared memory no larger than :func:`smem_bytes` says, and on sm_90 every
  dot is a ``wgmma`` (no ``mma.sync`` fallback) and the band's tiles come through TMA;
* the configuration each of sm_75, sm_80, sm_89 and sm_90 tries first, per kernel and dtype,
  compiles and fits that GPU; sm_75 (T4) has no tensor-core instruction at all (FMA), which is
  why ``"auto"`` leaves the kernel alone there.

Registers and spills are compile-time facts, a proxy for speed; no GPU has timed the kernels.
The stored table of chapter 8 (``swa_lib/lab/results/triton_compile.json``) is checked against
this compilation when it was made with the same Triton.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from swa_lib.backends.triton_arch import ARCHS, smem_bytes

if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("needs triton with its NVIDIA backend (ptxas ships with it)", allow_module_level=True)

_COMPILE = """
import json, sys
import triton
from swa_lib.backends.triton import compiled
kind = sys.argv[1]
jobs = compiled.autotuner_jobs() if kind == "autotuner" else compiled.pick_jobs()
sig = compiled.specialize("fwd", 90, __import__("torch").bfloat16, 128, (128, 64, 8, 3), tma=True)[2]
print(json.dumps(dict(triton=triton.__version__, rows=compiled.compile_all(jobs), signature=sig)))
"""


def _compile(kind: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence a notice of newer tritons; the default either way
    try:
        res = subprocess.run([sys.executable, "-c", _COMPILE, kind], env=env, capture_output=True, text=True,
                             timeout=600)
    except OSError as e:
        pytest.skip(f"cannot start a subprocess: {e}")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def autotuner_table():
    return _compile("autotuner")


def _elem(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def test_compiled_like_a_launch(autotuner_table):
    """Triton's launch specialisation: unit strides are constants, the others and the pointers
    carry no int32 surprises (the sizes stay runtime values), TMA descriptors have their tile."""
    sig = autotuner_table["signature"]
    assert sig["stride_qd"] == sig["stride_kd"] == "constexpr" and sig["stride_kn"] == "i32"
    assert sig["Q"] == "*bf16" and sig["N_K"] == "i32" and sig["LEFT"] == "i32"
    assert sig["DESC_K"] == "tensordesc<bf16[1, 1, 64, 128]>"  # the tile of BLOCK_N = 64 keys


def test_autotuner_configs_do_not_spill_and_hopper_dots_are_wgmma(autotuner_table):
    rows = autotuner_table["rows"]
    assert {(r["arch"], r["head_dim"], r["dtype"]) for r in rows} == {
        (a, d, t) for a in ("sm_80", "sm_90") for d in (64, 128) for t in ("bfloat16", "float16")}
    for r in rows:
        cap, (bm, bn, _, stages) = int(r["arch"][3:]), r["config"]
        assert r["spills"] == 0, r
        assert r["smem"] <= smem_bytes(r["kernel"], bm, bn, stages, r["head_dim"], _elem(r["dtype"]), cap), r
        assert r["smem"] <= ARCHS[cap].smem, r
        if cap == 90:
            assert r["wgmma"] > 0 and r["mma_sync"] == 0 and r["tma"], r
        else:
            assert r["mma_sync"] > 0 and r["wgmma"] == 0, r


def test_stored_table_is_this_compilation(autotuner_table):
    """Chapter 8 prints the stored table: it must be what this Triton compiles (when the stored
    one was made with another Triton version, it says so and is not compared)."""
    from swa_lib.lab import results

    stored = results.load("triton_compile")
    if stored["triton"] != autotuner_table["triton"]:
        pytest.skip(f"stored table made with triton {stored['triton']}, this is {autotuner_table['triton']}")
    key = ("kernel", "arch", "dtype", "head_dim", "config", "registers", "spills", "smem", "wgmma", "mma_sync")
    assert [tuple(str(r[k]) for k in key) for r in stored["rows"]] == [
        tuple(str(r[k]) for k in key) for r in autotuner_table["rows"]]


def test_each_architecture_compiles_what_it_would_pick():
    """sm_75 (T4), sm_80 (A100), sm_89 (L4) and sm_90 (H100), fp16, bf16 and fp32, D = 128: the
    first configuration of each autotuner compiles and fits; tensor cores from sm_80 on."""
    table = _compile("picks")
    rows = table["rows"]
    assert {r["arch"] for r in rows} == {"sm_75", "sm_80", "sm_89", "sm_90"}
    for r in rows:
        cap, (bm, bn, _, stages) = int(r["arch"][3:]), r["config"]
        assert r["smem"] <= ARCHS[cap].smem, r
        assert r["smem"] <= smem_bytes(r["kernel"], bm, bn, stages, r["head_dim"], _elem(r["dtype"]), cap), r
        if cap == 75:
            assert r["wgmma"] == r["mma_sync"] == 0, r  # FMA: no tensor cores
        elif cap == 90:
            assert r["wgmma"] > 0 and r["mma_sync"] == 0, r
        else:
            assert r["mma_sync"] > 0, r
        if cap >= 80 and r["dtype"] != "float32":
            assert r["spills"] == 0, r
