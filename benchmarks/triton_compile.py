#!/usr/bin/env python3
"""Static evidence for the Triton kernel: compile it for GPU architectures without a GPU.

    .venv/bin/python benchmarks/triton_compile.py      # about a minute on 2 cores

Every configuration the autotuner of sm_80 (A100) and sm_90 (H100) may pick, per kernel
(forward, dq, dk/dv), dtype (bf16, fp16) and head dim (64, 128), is compiled exactly as a launch
would specialise it (swa_lib.backends.triton.compiled) with the ptxas that ships with Triton;
then the configuration each of sm_75, sm_80, sm_89 and sm_90 tries first, in fp16, bf16 and fp32
at D = 128; then the design choices side by side (the previous kernel, the current one with
pointer loads and with TMA descriptors). Reported per compiled kernel: registers per thread, spill bytes (stores + loads),
shared memory, and the matrix instructions the dots became (wgmma, mma.sync; none means FMA).

These are compile-time facts, not timings: no GPU is involved. Writes
swa_lib/lab/results/triton_compile.json (with the Triton version; tests/test_triton_compile.py
checks the table against a fresh compilation with the same Triton).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # compiled mode: this compiles, it does not run


def format_table(rows: list) -> str:
    head = f"{'kernel':>6} {'arch':>6} {'dtype':>9} {'D':>4} {'config':>24} {'regs':>5} {'spills':>7} {'smem KiB':>8} " \
           f"{'wgmma':>6} {'mma.sync':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cfg = "{}x{} w{} s{}".format(*r["config"]) + (" prev" if r["variant"] == "previous" else "") + (
            " tma" if r["tma"] else "")
        lines.append(f"{r['kernel']:>6} {r['arch']:>6} {r['dtype']:>9} {r['head_dim']:>4} {cfg:>24} {r['registers']:>5} "
                     f"{r['spills']:>7} {r['smem'] / 1024:>8.1f} {r['wgmma']:>6} {r['mma_sync']:>8}")
    return "\n".join(lines)


def main() -> int:
    import triton

    from swa_lib.backends.triton import compiled
    from swa_lib.lab import results

    rows = compiled.compile_all(compiled.autotuner_jobs())
    picks = compiled.compile_all(compiled.pick_jobs())
    design = compiled.compile_all(compiled.design_jobs())
    print(format_table(rows) + "\n\nfirst pick per architecture:\n" + format_table(picks)
          + "\n\ndesign choices (variant, TMA):\n" + format_table(design))
    data = dict(date=datetime.date.today().isoformat(), triton=triton.__version__, machine=results.machine(),
                note="compile-time evidence (ptxas), no GPU run", rows=rows, picks=picks, design=design)
    out = results.path("triton_compile")
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
