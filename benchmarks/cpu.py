#!/usr/bin/env python3
"""CPU benchmark: sliding window attention, swa_lib's backends against real peers, in one run.

    .venv/bin/python benchmarks/cpu.py                 # the full run (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/cpu.py --quick         # a smoke test (seconds)
    .venv/bin/python benchmarks/cpu.py --sizes 16384 --windows 256,256 --peers blocked,flex_compiled

fp32, B=1, H=4, D=64, forward only (inference), windows (256, 256) and (512, 0).

Peers (all on the same tensors, in the same process):
  loop           swa_lib.loop_attention, the oracle (small n only)
  sdpa_dense     torch.nn.functional.scaled_dot_product_attention with a dense (n, n) bool band
                 mask (built once outside the timing; its bytes are added to the peak)
  hf_longformer  Hugging Face transformers' LongformerSelfAttention._sliding_chunks_query_key_matmul
                 + softmax + _sliding_chunks_matmul_attn_probs_value, on (B, N, H, D) inputs. It only
                 has symmetric bands: for (512, 0) it runs the w=512 band with the right half masked.
  flex_compiled  torch.nn.attention.flex_attention with a sliding-window mask_mod and a block mask,
                 under torch.compile; compile time (first call minus a steady call) reported apart
  chunked        swa_lib backend "chunked" (Longformer's algorithm)
  blocked        swa_lib backend "blocked"

Reported per call: wall time (best of --repeats after one warm-up call; 1 repeat for n >= 32768), useful GFLOP/s =
4 * B * H * sum_i keys(i) * D / time (two multiply-adds per visible key and head dim: QK^T and
PV), and peak memory = rise of the process's peak RSS during the call (Linux
/proc/self/clear_refs + VmHWM). Writes swa_lib/lab/results/cpu_bench.json and
book/figures/cpu_bench.png. The machine is shared: the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import swa_lib  # noqa: E402
from swa_lib.lab import results  # noqa: E402
from swa_lib.lab.cost import peak_memory  # noqa: E402
from swa_lib.masks import AttentionPattern, visible_keys  # noqa: E402

B, H, D = 1, 4, 64
DEFAULT_SIZES = [128, 1024, 4096, 16384, 32768, 65536]
DEFAULT_WINDOWS = [(256, 256), (512, 0)]
PEERS = ["loop", "sdpa_dense", "hf_longformer", "flex_compiled", "chunked", "blocked"]
# Largest n each peer is run at (beyond it: too slow or too much memory on this machine; see notes).
MAX_N = {"loop": 128, "sdpa_dense": 16384, "hf_longformer": 32768, "flex_compiled": 65536, "chunked": 65536, "blocked": 65536}
SKIP_AFTER_S = 20.0  # a peer whose call took longer than this is not run at larger n
# torch.compile of FlexAttention costs tens of seconds per shape and window on 2 cores: a subset.
FLEX_SIZES = {4096, 16384, 65536}


class NotApplicable(Exception):
    """A peer that does not run at this size (e.g. HF needs n % 2w == 0); try the next size."""


# --- measurement helpers ------------------------------------------------------------------
LAST_CPU_S = [0.0]  # process CPU time of the best call of the last measure()


def measure(fn, repeats: int, warm: bool = True):
    """(best wall seconds, peak RSS rise in bytes) of fn() after one warm-up call.

    Also records the process CPU time of the fastest call in LAST_CPU_S: with one torch thread
    on a shared machine it is the compute time without the time spent waiting for a core.
    """
    if warm:
        fn()
    times, cpu, peaks = [], [], [0]

    def timed():
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)

    for _ in range(repeats):
        peaks.append(peak_memory(timed) or 0)  # None where the peak cannot be measured
    LAST_CPU_S[0] = min(cpu)
    return min(times), max(peaks)


def load_average() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --- the peers ------------------------------------------------------------------------------
def make_peer(name: str, q, k, v, window, scale):
    """Return (callable, extra_bytes, note) or raise RuntimeError(reason) if it cannot run."""
    n = q.shape[2]
    left, right = window
    if name == "loop":
        pattern = AttentionPattern(left, right)
        return (lambda: swa_lib.loop_attention(q, k, v, pattern, scale)), 0, ""
    if name == "sdpa_dense":
        mask = torch.ones(n, n, dtype=torch.bool).tril_(right).triu_(-left)  # (n, n) band, 1 byte each
        return (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)), mask.numel(), "mask bytes added"
    if name == "hf_longformer":
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

        w = max(left, right)
        if n % (2 * w):
            raise NotApplicable(f"HF needs n % (2w) == 0 (n={n}, w={w})")
        config = LongformerConfig(hidden_size=H * D, num_attention_heads=H, attention_window=[2 * w], num_hidden_layers=1)
        hf = LongformerSelfAttention(config, layer_id=0).eval()
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # their layout (B, N, H, D)
        extra = None
        if (left, right) != (w, w):  # one-sided window: mask the unused offsets of the band
            t = torch.arange(2 * w + 1)
            extra = torch.zeros(2 * w + 1).masked_fill_((t < w - left) | (t > w + right), float("-inf"))

        def run():
            scores = hf._sliding_chunks_query_key_matmul(qh * scale, kh, w)  # (B, N, H, 2w+1)
            if extra is not None:
                scores = scores + extra
            probs = torch.softmax(scores, dim=-1)
            return hf._sliding_chunks_matmul_attn_probs_value(probs, vh, w)

        return run, 0, "" if extra is None else f"band w={w}, half masked"
    if name == "flex_compiled":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx <= left) & (kv_idx - q_idx <= right)

        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu")
        compiled = torch.compile(flex_attention, dynamic=False)
        return (lambda: compiled(q, k, v, block_mask=block_mask, scale=scale)), 0, ""
    if name in ("chunked", "blocked"):
        return (lambda: swa_lib.sliding_window_attention(q, k, v, window, scale=scale, backend=name)), 0, ""
    raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")


# --- the run --------------------------------------------------------------------------------
def run(sizes, windows, peers, repeats, check):
    rows, compile_s = [], {}
    skipped = {}  # (peer, window) -> reason
    for window in windows:
        for n in sizes:
            gen = torch.Generator().manual_seed(n)
            q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
            scale = D**-0.5
            flops = 4 * B * H * visible_keys(n, *window) * D
            reference = None
            for peer in peers:
                key = (peer, window)
                if n > MAX_N[peer] or key in skipped or (peer == "flex_compiled" and n not in FLEX_SIZES):
                    continue
                try:
                    fn, extra, note = make_peer(peer, q, k, v, window, scale)
                    with torch.no_grad():
                        if peer == "flex_compiled":
                            t0 = time.perf_counter()
                            out = fn()
                            first = time.perf_counter() - t0
                        else:
                            out = fn()
                        if peer == "hf_longformer":
                            out = out.transpose(1, 2)
                        if check and n <= 16384:
                            if reference is None:
                                reference = swa_lib.sliding_window_attention(q, k, v, window, backend="blocked")
                            err = (out - reference).abs().max().item()
                            if err > 1e-3:
                                raise RuntimeError(f"wrong result: max abs error {err:.2e} vs blocked")
                        del out
                        reps = 1 if (peer == "loop" or n >= 32768) else repeats
                        seconds, peak = measure(fn, reps, warm=False)  # the first call above warmed it
                    if peer == "flex_compiled":
                        compile_s[f"{window[0]},{window[1]} n={n}"] = round(first - seconds, 2)
                except NotApplicable as exc:
                    print(f"  {peer} window={window} n={n}: {exc}", flush=True)
                    continue
                except (RuntimeError, MemoryError) as exc:  # a peer that cannot run says why
                    skipped[key] = f"n={n}: {exc}".splitlines()[0][:200]
                    print(f"  {peer} window={window} n={n}: cannot run: {skipped[key]}", flush=True)
                    continue
                row = dict(
                    peer=peer, window=list(window), n=n, time_s=seconds, cpu_s=LAST_CPU_S[0],
                    gflops=flops / seconds / 1e9,
                    peak_mib=(peak + extra) / 2**20, note=note,
                )
                rows.append(row)
                print(f"  {peer:14s} window={window} n={n:6d}  {seconds * 1e3:10.1f} ms  {row['gflops']:7.2f} GFLOP/s  "
                      f"{row['peak_mib']:8.1f} MiB", flush=True)
                if seconds > SKIP_AFTER_S:
                    skipped[key] = f"n={n} took {seconds:.0f} s; larger n skipped"
            del q, k, v
    return rows, compile_s, skipped


def run_extensions(n, backends, repeats):
    """Issue 5's rows: 16 global tokens and dilation 2 at n, window (256, 256), forward."""
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
    glob = torch.linspace(0, n - 1, 16).long()  # 16 global tokens spread over the sequence
    cases = [
        ("plain (256,256)", (256, 256), {}),
        ("+16 global tokens", (256, 256), dict(global_tokens=glob)),
        ("dilation 2, (512,512)", (512, 512), dict(dilation=2)),
    ]
    rows = []
    for backend in backends:
        for label, window, kwargs in cases:
            fn = lambda: swa_lib.sliding_window_attention(q, k, v, window, backend=backend, **kwargs)  # noqa: E731
            with torch.no_grad():
                fn()
                seconds, peak = measure(fn, repeats, warm=False)
            reach = window[0] + window[1] + 1
            rows.append(dict(peer=backend, case=label, window=list(window), n=n, time_s=seconds,
                             cpu_s=LAST_CPU_S[0], reach=reach, peak_mib=peak / 2**20))
            print(f"  {backend:8s} {label:24s} n={n}  {seconds * 1e3:9.1f} ms (cpu {LAST_CPU_S[0] * 1e3:7.1f} ms)  reach {reach} tokens  "
                  f"{peak / 2**20:7.1f} MiB", flush=True)
    return rows


def table(rows) -> str:
    lines = [f"{'peer':14s} {'window':>10s} {'n':>6s} {'time ms':>10s} {'cpu ms':>9s} {'GFLOP/s':>8s} {'peak MiB':>9s}  note",
             "-" * 82]
    for r in rows:
        w = f"({r['window'][0]},{r['window'][1]})"
        cpu = f"{r['cpu_s'] * 1e3:9.1f}" if "cpu_s" in r else f"{'-':>9s}"
        lines.append(f"{r['peer']:14s} {w:>10s} {r['n']:6d} {r['time_s'] * 1e3:10.1f} {cpu} {r['gflops']:8.2f} "
                     f"{r['peak_mib']:9.1f}  {r['note']}")
    return "\n".join(lines)


def targets(rows) -> dict:
    """The issue's targets, evaluated on this run (None where a number is missing)."""
    def t(peer, n, window=(256, 256)):
        for r in rows:
            if r["peer"] == peer and r["n"] == n and tuple(r["window"]) == window:
                return r
        return None

    ours = [r for r in (t("blocked", 16384), t("chunked", 16384)) if r]
    best = min(ours, key=lambda r: r["time_s"]) if ours else None
    out = {"best_backend_16k": best["peer"] if best else None}

    def ratio(peer):
        r = t(peer, 16384)
        return round(r["time_s"] / best["time_s"], 2) if (r and best) else None

    out["speedup_vs_hf_longformer_16k (>= 3)"] = ratio("hf_longformer")
    out["speedup_vs_sdpa_dense_16k (>= 10)"] = ratio("sdpa_dense")
    out["speedup_vs_flex_compiled_16k (>= 1)"] = ratio("flex_compiled")
    if best:
        a, b = t(best["peer"], 16384), t(best["peer"], 65536)
        out["time_growth_16k_to_64k (<= 4.5)"] = round(b["time_s"] / a["time_s"], 2) if b else None
        out["peak_mib_64k (< 1024)"] = round(b["peak_mib"], 1) if b else None
    return out


def machine() -> dict:
    return dict(results.machine(), load_average_start=load_average())


def plot(result, path: Path):
    from swa_lib.lab.plotting import new_figure, plot_scaling

    windows = [tuple(w) for w in result["config"]["windows"]]
    fig, axes = new_figure(ncols=len(windows), width=6.2, height=4.4)
    axes = [axes] if len(windows) == 1 else list(axes.ravel())
    for ax, window in zip(axes, windows):
        rows = [r for r in result["rows"] if tuple(r["window"]) == window]
        sizes = sorted({r["n"] for r in rows})
        series = {}
        for peer in result["config"]["peers"]:
            by_n = {r["n"]: r["time_s"] * 1e3 for r in rows if r["peer"] == peer}
            if by_n:
                series[peer] = [by_n.get(n) for n in sizes]
        plot_scaling(sizes, series, ax=ax, ylabel="forward time (ms)", title=f"window {window}, fp32, B=1 H=4 D=64")
    fig.suptitle(f"CPU: {result['machine']['cpu']} ({result['machine']['torch_threads']} threads)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, facecolor="white")
    return fig


def main(argv=None) -> int:
    timing_only = "--timing-only" in sys.argv
    if timing_only:
        sys.argv.remove("--timing-only")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux") and not timing_only:
        # glibc serves large blocks from mmap and returns them on free, but raises its threshold
        # after the first free, after which big tensors reuse already-resident heap memory and
        # the peak RSS stops seeing them. A fixed threshold keeps the accounting honest.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
        # This makes every large allocation a fresh mmap whose pages fault in again, which
        # penalises code with many temporaries; --timing-only skips it (peak memory is then
        # under-reported and should be ignored).
        os.execv(sys.executable, [sys.executable, *sys.argv])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=DEFAULT_SIZES)
    ap.add_argument("--windows", type=lambda s: [tuple(int(x) for x in w.split(",")) for w in s.split(";")],
                    default=DEFAULT_WINDOWS, help='e.g. "256,256;512,0"')
    ap.add_argument("--peers", type=lambda s: s.split(","), default=PEERS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no compile: a smoke test")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check of each peer")
    ap.add_argument("--extensions", action="store_true",
                    help="only run the global-token and dilation rows (n=16384) and add them to the stored JSON")
    ap.add_argument("--merge-as", default=None,
                    help="store this run under this key of the existing JSON instead of replacing it "
                         "(e.g. a quieter re-run of the n=16384 row)")
    ap.add_argument("--out", default=str(ROOT / "swa_lib" / "results" / "cpu_bench.json"))
    ap.add_argument("--png", default=str(ROOT / "book" / "figures" / "cpu_bench.png"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.repeats = [128, 1024], 1
        args.peers = [p for p in args.peers if p != "flex_compiled"]
    for p in args.peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}; choose from {PEERS}")
    if args.extensions:
        info = machine()
        print(f"# extensions, {info['torch_threads']} thread(s), load average {info['load_average_start']}", flush=True)
        rows = run_extensions(16384, ["blocked", "chunked"], args.repeats)
        base = {r["peer"]: r for r in rows if r["case"].startswith("plain")}
        summary = {}
        for r in rows:
            if not r["case"].startswith("plain"):
                b = base[r["peer"]]
                summary[f"{r['peer']} {r['case']} / plain"] = dict(
                    wall=round(r["time_s"] / b["time_s"], 2), cpu=round(r["cpu_s"] / b["cpu_s"], 2))
        print("ratios (targets: global <= 1.5, dilation 2 <= 1.2):", json.dumps(summary, indent=1))
        path = Path(args.out)
        stored = json.loads(path.read_text()) if path.exists() else {}
        key = "extensions_timing_only" if timing_only else "extensions"
        stored[key] = dict(machine=info, load_average_end=load_average(), rows=rows, ratios=summary,
                           malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"))
        path.write_text(json.dumps(stored, indent=1) + "\n")
        print("added to", path)
        return 0
    info = machine()
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} threads, "
          f"load average {info['load_average_start']}", flush=True)
    t0 = time.perf_counter()
    rows, compile_s, skipped = run(args.sizes, args.windows, args.peers, args.repeats, not args.no_check)
    info["load_average_end"] = load_average()
    result = dict(
        machine=info,
        config=dict(B=B, H=H, D=D, dtype="float32", direction="forward", sizes=args.sizes,
                    windows=[list(w) for w in args.windows], peers=args.peers, repeats=args.repeats,
                    flops="4 * B * H * sum_i keys(i) * D", peak="rise of peak RSS during the call (MiB)"),
        rows=rows, flex_compile_s=compile_s, skipped=skipped and {f"{p} {w}": r for (p, w), r in skipped.items()},
        targets=targets(rows), total_s=round(time.perf_counter() - t0, 1),
    )
    print()
    print(table(rows))
    print("\nFlexAttention compile time (s):", compile_s)
    print("Targets:", json.dumps(result["targets"], indent=1))
    print(f"Load average at the end: {info['load_average_end']}; total {result['total_s']} s")
    if args.merge_as and not args.quick:
        path = Path(args.out)
        stored = json.loads(path.read_text()) if path.exists() else {}
        stored[args.merge_as] = result
        path.write_text(json.dumps(stored, indent=1) + "\n")
        print("added to", path, "as", args.merge_as)
    elif not args.quick:
        path = Path(args.out)
        if path.exists() and "extensions" in (old := json.loads(path.read_text())):
            result["extensions"] = old["extensions"]  # keep the rows of a separate --extensions run
        path.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, Path(args.png))
        print("wrote", args.out, "and", args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
