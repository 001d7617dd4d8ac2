#!/usr/bin/env python3
"""GPU benchmark: the fused Triton kernel against its previous variant, PyTorch SDPA and FlexAttention.

    PYTHONPATH=. python3 benchmarks/gpu.py            # full run (N = 4k .. 128k), under 8 minutes
    PYTHONPATH=. python3 benchmarks/gpu.py --quick    # N = 4k .. 16k
    PYTHONPATH=. python3 benchmarks/gpu.py --n 65536 131072 --merge   # add rows to the stored JSON

Setting: bf16, B = 1, H = 16 (and a GQA case with H_kv = 4), D = 128; windows causal (4096, 0)
and symmetric (256, 256); forward and forward+backward. Methods, all measured in the same run:

* ``triton``: swa_lib's kernel (block skipping, cost O(N * window)): one band loop, dk/dv
  transposed, TMA descriptors on Hopper;
* ``triton_previous``: the same kernel before those three changes (three loops per band,
  untransposed dk/dv, pointer loads; ``variant="previous"``), kept until this run has measured
  both (multi-head rows only);
* ``sdpa_flash_causal``: PyTorch SDPA restricted to its FlashAttention backend with full causal
  attention (the speed ceiling for dense attention; it does N^2 / 2 work);
* ``sdpa_band_mask``: SDPA with a dense boolean band mask (O(N^2) memory; up to N = 16k);
* ``flex``: FlexAttention with a sliding-window ``BlockMask``, compiled with ``torch.compile``.

Reported: milliseconds (median of CUDA-event timings), useful TFLOP/s and peak memory.
Useful FLOPs count only the visible scores: forward ``4 * B * H * N * keys_per_query * D``
(two matmuls of 2 FLOPs per multiply-add), forward+backward 2.5x that (the backward does five
matmuls to the forward's two). ``keys_per_query`` is ``swa_lib.masks.visible_keys(N, left,
right) / N``, exact for the window at that N; for full causal SDPA it is (N + 1) / 2, so its
TFLOP/s is comparable. Peak memory is the largest
``torch.cuda.max_memory_allocated`` during one call, minus the inputs.

The first call at each new shape autotunes the Triton kernel (and compiles FlexAttention); the
warm-up calls absorb that, and compiled kernels are cached on disk for later runs. The run keeps
to ``--budget-s`` seconds (default 390, so it ends within 8 minutes on an H100 even with cold
caches): rows it has no time left for say ``skipped: time budget``. The Triton comparison comes
first in every setting, the peers after it.

Writes swa_lib/lab/results/gpu_bench.json (with the GPU name, date and versions) and
book/figures/gpu_bench.png. Needs a CUDA GPU; without one it exits with a message.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swa_lib.lab import results  # noqa: E402
from swa_lib.masks import visible_keys  # noqa: E402

B, D = 1, 128
HEADS = [(16, 16), (16, 4)]  # (H, H_kv): MHA and a GQA case
WINDOWS = [(4096, 0), (256, 256)]
N_FULL = [4096, 8192, 16384, 32768, 65536, 131072]
N_QUICK = [4096, 8192, 16384]
METHODS = ["triton", "triton_previous", "sdpa_flash_causal", "sdpa_band_mask", "flex"]
BAND_MASK_MAX_N = 16384  # an N x N bool mask and SDPA's O(N^2) work beyond this cost minutes
BUDGET_S = 390.0
MODES = ["fwd", "fwd+bwd"]
FIGURE = ROOT / "book" / "figures" / "gpu_bench.png"
_FLEX = None


# ---- pure helpers (unit-tested on CPU) ------------------------------------------------------
def useful_flops(n: int, heads: int, left: int, right: int, mode: str, batch: int = B, d: int = D) -> float:
    """4 * B * H * N * keys_per_query * D forward; 2.5x that for forward+backward."""
    keys_per_query = visible_keys(n, left, right) / n  # exact for the window at this N
    fwd = 4.0 * batch * heads * n * keys_per_query * d
    return fwd if mode == "fwd" else 2.5 * fwd


def method_window(method: str, n: int, window: tuple) -> tuple:
    """The (left, right) a method actually computes: full causal for SDPA flash."""
    return (n - 1, 0) if method == "sdpa_flash_causal" else window


def format_table(rows: list) -> str:
    head = f"{'window':>11} {'H/H_kv':>6} {'mode':>7} {'N':>7} {'method':>18} {'ms':>9} {'TFLOP/s':>8} {'peak GiB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = ("skipped" if str(r.get("error", "")).startswith("skipped") else "error" if r.get("error") else
              "OOM") if r["ms"] is None else f"{r['ms']:.3f}"
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.1f}"
        mem = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        w = f"({r['window'][0]},{r['window'][1]})"
        lines.append(f"{w:>11} {r['heads']}/{r['heads_kv']:<3} {r['mode']:>7} {r['n']:>7} {r['method']:>18} "
                     f"{ms:>9} {tf:>8} {mem:>8}")
    return "\n".join(lines)


def plot(data: dict):
    """The stored result's figure (drawn by the installed package, so chapters need no script)."""
    from swa_lib.lab.plotting import plot_gpu_bench

    return plot_gpu_bench(data)


# ---- measurement (CUDA only) ----------------------------------------------------------------
def _time_ms(fn, reps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_gib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _make_call(method: str, q, k, v, window, mode: str):
    """A zero-argument closure running one forward (or forward+backward) of the method."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, heads, heads_kv = q.shape[2], q.shape[1], k.shape[1]
    left, right = window
    if method in ("triton", "triton_previous"):
        from swa_lib.backends.triton import triton_sliding_window_attention

        variant = "previous" if method == "triton_previous" else "current"

        def attn():
            return triton_sliding_window_attention(q, k, v, window, variant=variant)
    elif method == "sdpa_flash_causal":
        kk, vv = (k, v) if heads == heads_kv else (k.repeat_interleave(heads // heads_kv, 1),
                                                   v.repeat_interleave(heads // heads_kv, 1))

        def attn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    elif method == "sdpa_band_mask":
        i = torch.arange(n, device=q.device)
        mask = (i[None, :] >= i[:, None] - left) & (i[None, :] <= i[:, None] + right)  # (N, N)

        def attn():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != heads_kv)
    elif method == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def band(b, h, q_idx, kv_idx):
            return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)

        block_mask = create_block_mask(band, B=None, H=None, Q_LEN=n, KV_LEN=n, device=q.device)
        global _FLEX
        if _FLEX is None:
            _FLEX = torch.compile(flex_attention)  # one compiled function, reused across sizes
        compiled = _FLEX

        def attn():
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=heads != heads_kv)
    else:
        raise ValueError(f"unknown method {method!r}")
    if mode == "fwd":
        def call():
            with torch.no_grad():
                attn()
        return call
    grad = torch.randn_like(q)

    def call():
        for x in (q, k, v):
            x.grad = None
        attn().backward(grad)
    return call


def _skip_reason(method: str, n: int, heads: int, heads_kv: int, started: float, budget_s: float):
    """Why a row is not measured (None: measure it)."""
    if method == "triton_previous" and heads != heads_kv:
        return "skipped: the previous variant is compared on multi-head rows only"
    if method == "sdpa_band_mask" and n > BAND_MASK_MAX_N:
        return f"skipped: N x N mask above N = {BAND_MASK_MAX_N}"
    if time.monotonic() - started > budget_s:
        return "skipped: time budget"
    return None


def measure(ns, heads_list=HEADS, windows=WINDOWS, methods=METHODS, modes=MODES, reps=10,
            budget_s=BUDGET_S) -> list:
    rows = []
    started = time.monotonic()
    for heads, heads_kv in heads_list:
        for window in windows:
            if heads != heads_kv and window != windows[0]:
                continue  # the GQA case: the causal window only
            for mode in modes:
                oom = set()
                for n in ns:
                    g = torch.Generator(device="cuda").manual_seed(0)
                    q = torch.randn(B, heads, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
                    k = torch.randn(B, heads_kv, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
                    v = torch.randn(B, heads_kv, n, D, device="cuda", dtype=torch.bfloat16, generator=g)
                    for x in (q, k, v):
                        x.requires_grad_(mode != "fwd")
                    for method in methods:
                        row = dict(window=list(window), heads=heads, heads_kv=heads_kv, mode=mode, n=n,
                                   method=method, ms=None, tflops=None, peak_gib=None)
                        skip = _skip_reason(method, n, heads, heads_kv, started, budget_s)
                        if skip:
                            row["error"] = skip
                        elif method not in oom:
                            try:
                                call = _make_call(method, q, k, v, window, mode)
                                ms = _time_ms(call, reps=reps)
                                peak = _peak_gib(call)
                                l, r = method_window(method, n, window)
                                row.update(ms=ms, peak_gib=peak, tflops=useful_flops(n, heads, l, r, mode) / ms / 1e9)
                            except torch.cuda.OutOfMemoryError:
                                oom.add(method)  # larger N will not fit either
                            except Exception as e:  # a peer failing must not lose the other rows
                                row["error"] = f"{type(e).__name__}: {e}"[:300]
                                print(f"  {method} failed at N={n}: {row['error']}", flush=True)
                            finally:
                                torch.cuda.empty_cache()
                        rows.append(row)
                        print(format_table([row]).splitlines()[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 4k .. 16k only")
    parser.add_argument("--n", type=int, nargs="*", help="sequence lengths (default 4k .. 128k)")
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--merge", action="store_true", help="add to the stored JSON instead of replacing it")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop measuring after this many seconds")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU (none found); nothing measured.", file=sys.stderr)
        return 2
    ns = args.n or (N_QUICK if args.quick else N_FULL)
    import triton

    rows = measure(ns, methods=args.methods, reps=args.reps, budget_s=args.budget_s)
    data = dict(
        gpu=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
        torch=torch.__version__, triton=triton.__version__, dtype="bfloat16", batch=B, head_dim=D,
        flops="fwd 4*B*H*N*keys_per_query*D; fwd+bwd 2.5x", rows=rows,
    )
    out = results.path("gpu_bench")
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        keep = {(tuple(r["window"]), r["heads"], r["heads_kv"], r["mode"], r["n"], r["method"]) for r in rows}
        data["rows"] = [r for r in old["rows"]
                        if (tuple(r["window"]), r["heads"], r["heads_kv"], r["mode"], r["n"], r["method"]) not in keep] + rows
    out.write_text(json.dumps(data, indent=1))
    print("\n" + format_table(data["rows"]))
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    plot(data).savefig(FIGURE, dpi=120, facecolor="white")
    print(f"wrote {out} and {FIGURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
