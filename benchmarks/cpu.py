#!/usr/bin/env python3
"""CPU benchmark: sliding window attention, swa_lib's backends against real peers, in one run.

    .venv/bin/python benchmarks/cpu.py                 # the full run (about 15 minutes on 2 cores)
    .venv/bin/python benchmarks/cpu.py --quick         # a smoke test (seconds)
    .venv/bin/python benchmarks/cpu.py --extensions    # global tokens and dilation (ch. 6, 7)

fp32, B=1, H=4, D=64. Everything runs once per thread count of ``--threads`` (default: one
thread, then PyTorch's default), in one process, on the same tensors:

1. scaling: forward passes at n = 128 .. 65536, windows (256, 256) and (512, 0), every peer
   of benchmarks/cpu_peers.py;
2. training: forward + backward at n = 4096 and 16384, window (256, 256);
3. a GEMM: a 2048 x 2048 fp32 matrix product, the machine's practical peak for this thread
   count (useful GFLOP/s of attention are compared with it).

Then, at the default thread count, the n = 16384 rows of ``--load-peers`` again while
``--load`` other processes each keep a core busy with single-threaded matrix products: how
each implementation copes with a machine that is doing something else too.

Reported per call: wall time (the median of --repeats calls after one warm-up call, or of as
many as fit 1.5 s, up to 20; 1 call for n >= 32768; the peers of one case take turns, call by
call, so that a drift in the machine's speed falls on all of them: benchmarks/timing.py), useful
GFLOP/s = 4 * B * H * sum_i keys(i) * D / time (two multiply-adds per visible key and head
dim: QK^T and PV; a training step counts 3x that), and peak memory = rise
of the process's peak RSS during the call (Linux /proc/self/clear_refs + VmHWM), measured in
a second pass with every large allocation mapped fresh (see memory_pass). Every run records
the thread count, the CPU model and the load average. Writes
swa_lib/lab/results/cpu_bench.json and book/figures/cpu_bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import swa_lib  # noqa: E402
from cpu_peers import PEERS, NotApplicable, make_peer  # noqa: E402
from timing import time_calls, time_rounds  # noqa: E402
from swa_lib.lab import results  # noqa: E402
from swa_lib.lab.results import load_average  # noqa: E402
from swa_lib.lab import cpu_report  # noqa: E402
from swa_lib.lab.cpu_report import row  # noqa: E402
from swa_lib.lab.cost import peak_memory  # noqa: E402
from swa_lib.masks import visible_keys  # noqa: E402

B, H, D = 1, 4, 64
DEFAULT_SIZES = [128, 1024, 4096, 16384, 32768, 65536]
DEFAULT_WINDOWS = [(256, 256), (512, 0)]
TRAIN_SIZES = [4096, 16384]
TRAIN_PEERS = ["sdpa_dense", "hf_longformer", "flex_compiled", "chunked", "blocked"]
LOAD_PEERS = ["flex_compiled", "hf_longformer", "blocked"]
# Largest n each peer is run at (beyond it: too slow or too much memory on this machine).
MAX_N = {"loop": 128, "sdpa_dense": 16384, "hf_longformer": 32768, "flex_compiled": 65536, "chunked": 65536,
         "blocked": 65536}
SKIP_AFTER_S = 20.0  # a peer whose call took longer than this is not run at larger n
# torch.compile of FlexAttention costs seconds per shape and window: a subset of the sizes.
FLEX_SIZES = {4096, 16384, 65536}
BUSY = ("import time, torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\n"
        "while True:\n    a @ a\n")


def measure_peak(fn, repeats: int):
    """(wall seconds, process CPU seconds, peak RSS rise in bytes or 0) of ``repeats`` calls
    (the median call's times, the largest peak), each inside the peak-RSS probe, which first
    hands freed memory back to the system (so the probe sees what the call allocates) and makes
    every call fault its memory in afresh: right for the peak, not for the time."""
    peaks = [0]

    def probed():
        peaks.append(peak_memory(fn) or 0)  # None where the peak cannot be measured

    wall, cpu = time_calls(probed, repeats, extend=False)
    return wall, cpu, max(peaks)


def gemm_gflops(repeats: int = 5) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Runner:
    """Runs peers on cases and collects rows; remembers which peers to skip at larger n."""

    def __init__(self, repeats: int, check: bool, memory: bool):
        self.repeats, self.check, self.memory = repeats, check, memory
        self.rows, self.skipped, self.compile_s = [], {}, {}
        self.reference = {}

    def run(self, peers: list, n: int, window, direction: str, tags: dict) -> list:
        """Rows of ``peers`` on one case (the same tensors): each is warmed up and checked, then
        all are timed in turns (:func:`timing.time_rounds`), so that a change in the machine's
        speed during the case falls on all of them. In the memory pass each runs inside the
        peak-RSS probe instead, one after the other."""
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
        ready = {}
        for peer in peers:
            key = (peer, tuple(window), direction, tags.get("threads"), tags.get("load", 0))
            if n > MAX_N[peer] or key in self.skipped:
                continue
            try:
                ready[peer] = (key, *self.prepare(peer, q, k, v, window, direction))
            except NotApplicable as exc:
                print(f"  {peer} {direction} window={window} n={n}: {exc}", flush=True)
            except (RuntimeError, MemoryError) as exc:  # a peer that cannot run says why
                self.skipped[key] = f"n={n}: {exc}".splitlines()[0][:200]
                print(f"  {peer} {direction} window={window} n={n}: cannot run: {self.skipped[key]}", flush=True)
        repeats = {peer: 1 if (peer == "loop" or n >= 32768) else self.repeats for peer in ready}
        if self.memory:  # (wall, cpu, peak) per peer
            measured = {peer: measure_peak(ready[peer][1], repeats[peer]) for peer in ready}
        else:
            timed = time_rounds({peer: entry[1] for peer, entry in ready.items()}, repeats)
            measured = {peer: (*t, 0) for peer, t in timed.items()}
        rows = []
        for peer, (key, fn, extra, note, first) in ready.items():
            seconds, cpu, peak = measured[peer]
            if peer == "flex_compiled":
                self.compile_s[f"{window[0]},{window[1]} n={n} threads={tags.get('threads')}"] = round(first - seconds, 2)
            flops = 4 * B * H * visible_keys(n, *window) * D * (3 if direction == "train" else 1)
            row = dict(peer=peer, window=list(window), n=n, direction=direction, **tags, time_s=seconds, cpu_s=cpu,
                       gflops=flops / seconds / 1e9, peak_mib=(peak + extra) / 2**20,
                       note=note, load_average=load_average())
            rows.append(row)
            print(f"  {peer:14s} {direction:7s} window={window} n={n:6d} threads={tags.get('threads')} "
                  f"load={tags.get('load', 0)}  {seconds * 1e3:10.1f} ms  {row['gflops']:7.2f} GFLOP/s  "
                  f"{row['peak_mib']:8.1f} MiB", flush=True)
            if seconds > SKIP_AFTER_S:
                self.skipped[key] = f"n={n} took {seconds:.0f} s; larger n skipped"
        self.rows += rows
        return rows

    def prepare(self, peer: str, q, k, v, window, direction: str):
        """``(fn, extra bytes, note, seconds of the first call)``: the peer, warmed up (Flex:
        compiled) and, up to n = 16384, checked against ``blocked``."""
        n = q.shape[2]
        fn, extra, note = make_peer(peer, q, k, v, window, D**-0.5, direction)
        t0 = time.perf_counter()
        out = fn()  # warm-up (and, for Flex, compilation)
        first = time.perf_counter() - t0
        if self.check and n <= 16384:
            ref = self.reference.get((n, tuple(window)))
            if ref is None:
                with torch.no_grad():
                    ref = swa_lib.sliding_window_attention(q, k, v, window, backend="blocked")
                self.reference = {(n, tuple(window)): ref}
            err = (out - ref).abs().max().item()
            if err > 1e-3:
                raise RuntimeError(f"wrong result: max abs error {err:.2e} vs blocked")
        return fn, extra, note, first


def busy_processes(count: int) -> list:
    """Start ``count`` processes that each keep one core busy (single-threaded matmuls)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", BUSY], env=env) for _ in range(count)]
    time.sleep(3.0)  # let them start and the load average move
    return procs


def run_all(args) -> dict:
    runner = Runner(args.repeats, not args.no_check, args.memory_pass)
    default_threads = torch.get_num_threads()
    threads_list = [default_threads if t == 0 else t for t in args.threads]
    gemm = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        tags = dict(threads=threads, load=0)
        print(f"# {threads} thread(s), load average {load_average()}", flush=True)
        gemm[str(threads)] = round(gemm_gflops(), 1)
        print(f"  GEMM 2048^3 fp32: {gemm[str(threads)]} GFLOP/s", flush=True)
        for window in args.windows:
            for n in args.sizes:
                runner.run([p for p in args.peers if p != "flex_compiled" or n in FLEX_SIZES], n, window,
                           "forward", tags)
        for n in args.train_sizes:
            runner.run([p for p in TRAIN_PEERS if p in args.peers], n, (256, 256), "train", tags)
    torch.set_num_threads(default_threads)
    for count in args.load:
        procs = busy_processes(count)
        try:
            tags = dict(threads=default_threads, load=count)
            print(f"# {default_threads} thread(s), {count} busy process(es), load average {load_average()}", flush=True)
            peers = [p for p in args.load_peers if p in args.peers]
            runner.run(peers, 16384, (256, 256), "forward", tags)
            runner.run([p for p in peers if p in TRAIN_PEERS and p != "flex_compiled"], 16384, (256, 256), "train",
                       tags)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return dict(rows=runner.rows, gemm_gflops=gemm, flex_compile_s=runner.compile_s,
                skipped={" ".join(map(str, k)): r for k, r in runner.skipped.items()},
                threads=threads_list)


def targets(result: dict) -> dict:
    """The issue's targets, evaluated on this run (None where a number is missing)."""
    gemm, out = result["gemm_gflops"], {}

    def ratio(a, b):
        return round(cpu_report.ratio(a, b), 2) if a and b else None

    for t in result["threads"]:
        ours = row(result, "blocked", 16384, threads=t)
        out[f"{t} thread(s): forward 16k, Flex / ours (>= 1.5)"] = ratio(row(result, "flex_compiled", 16384, threads=t), ours)
        out[f"{t} thread(s): forward 16k, % of GEMM (>= 60)"] = \
            round(100 * ours["gflops"] / gemm[str(t)], 1) if ours else None
        ours_train = row(result, "blocked", 16384, "train", t)
        out[f"{t} thread(s): fwd+bwd 16k, HF / ours (>= 5)"] = ratio(row(result, "hf_longformer", 16384, "train", t), ours_train)
        out[f"{t} thread(s): fwd+bwd 16k, dense SDPA / ours (>= 10)"] = \
            ratio(row(result, "sdpa_dense", 16384, "train", t), ours_train)
        for n in (4096, 16384):
            hf, ch = row(result, "hf_longformer", n, threads=t), row(result, "chunked", n, threads=t)
            out[f"{t} thread(s): chunked {n}, HF / chunked time (>= 1)"] = ratio(hf, ch)
            out[f"{t} thread(s): chunked {n}, peak MiB chunked vs HF"] = \
                [round(ch["peak_mib"], 1), round(hf["peak_mib"], 1)] if hf and ch else None
        big = row(result, "blocked", 65536, threads=t)
        out[f"{t} thread(s): forward 64k peak MiB (< 300)"] = round(big["peak_mib"], 1) if big else None
        out[f"{t} thread(s): fwd+bwd 16k peak MiB"] = round(ours_train["peak_mib"], 1) if ours_train else None
    default = max(result["threads"])
    for load in sorted({r["load"] for r in result["rows"]} - {0}):
        quiet, busy = row(result, "blocked", 16384, threads=default), row(result, "blocked", 16384, load=load)
        # the bound is for one busy process; with more, the fair share of the cores
        # alone slows a call by (threads + busy processes) / cores
        fair = max(1.0, (default + load) / result["machine"]["cores"])
        bound = "<= 2" if load == 1 else f"a fair share alone: {fair:.1f}x"
        out[f"{load} busy: ours busy / quiet ({bound})"] = ratio(busy, quiet)
        out[f"{load} busy: Flex / ours under load (>= 1)"] = ratio(row(result, "flex_compiled", 16384, load=load), busy)
    return out


def memory_pass(args, rows: list) -> None:
    """Measure every row's peak memory again in a subprocess where the C library maps every
    block of 1 MiB or more fresh and unmaps it when freed (``MALLOC_MMAP_THRESHOLD_``), so that
    the peak RSS sees each large allocation. (glibc otherwise keeps freed blocks in its heap, and
    memory resident before a call hides what the call allocates.) Times are measured without
    that setting: it turns every large temporary into fresh pages to fault in, a cost no
    program pays with the default allocator, and it would penalise the implementations that
    allocate most. Rows under load take the peak of their quiet row."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [sys.executable, __file__, "--memory-pass", "--out", str(out),
               "--sizes", ",".join(map(str, args.sizes)), "--train-sizes", ",".join(map(str, args.train_sizes)),
               "--windows", ";".join(f"{a},{b}" for a, b in args.windows), "--peers", ",".join(args.peers),
               "--threads", ",".join(map(str, args.threads))] + (["--no-check"] if args.no_check else [])
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
        print("# peak memory pass:", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, env=env, check=True)
        measured = json.loads(out.read_text())
    peaks = {(r["peer"], r["n"], tuple(r["window"]), r["direction"], r["threads"]): r["peak_mib"] for r in measured}
    for r in rows:
        r["peak_mib"] = peaks.get((r["peer"], r["n"], tuple(r["window"]), r["direction"], r["threads"]))


def plot(result, path: Path):
    from swa_lib.lab.plotting import cpu_bench_figure

    fig = cpu_bench_figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, facecolor="white")
    return fig


def main(argv=None) -> int:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=ints, default=DEFAULT_SIZES)
    ap.add_argument("--train-sizes", type=ints, default=TRAIN_SIZES)
    ap.add_argument("--windows", type=lambda s: [tuple(int(x) for x in w.split(",")) for w in s.split(";")],
                    default=DEFAULT_WINDOWS, help='e.g. "256,256;512,0"')
    ap.add_argument("--peers", type=lambda s: s.split(","), default=PEERS)
    ap.add_argument("--threads", type=ints, default=[1, 0], help="thread counts to run (0: torch's default)")
    ap.add_argument("--load", type=ints, default=[1, 2], help="numbers of busy processes for the load runs")
    ap.add_argument("--load-peers", type=lambda s: s.split(","), default=LOAD_PEERS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no compile, no load: a smoke test")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check of each peer")
    ap.add_argument("--extensions", action="store_true",
                    help="only run the global-token and dilation rows (n=16384) and add them to the stored JSON")
    ap.add_argument("--memory-pass", action="store_true",
                    help="(internal) the peak-memory pass, run by the main pass in a subprocess")
    ap.add_argument("--out", default=str(results.path("cpu_bench")))
    ap.add_argument("--png", default=str(ROOT / "book" / "figures" / "cpu_bench.png"))
    args = ap.parse_args(argv)
    for p in args.peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}; choose from {PEERS}")
    if args.quick:
        args.sizes, args.train_sizes, args.repeats, args.load = [128, 1024], [1024], 1, []
        args.peers = [p for p in args.peers if p != "flex_compiled"]
    path = Path(args.out)
    stored = json.loads(path.read_text()) if path.exists() else {}
    if args.extensions:
        from cpu_extensions import run_extensions

        default = torch.get_num_threads()
        runs = []
        for t in [default if t == 0 else t for t in args.threads]:
            torch.set_num_threads(t)
            runs.append(run_extensions(16384, args.repeats))
        torch.set_num_threads(default)
        stored["extensions"] = runs
        stored.pop("extensions_timing_only", None)
        path.write_text(json.dumps(stored, indent=1) + "\n")
        print("added to", path)
        return 0
    if args.memory_pass:
        args.load, args.repeats = [], 1
        path.write_text(json.dumps(run_all(args)["rows"]) + "\n")
        return 0
    info = dict(results.machine(), load_average_start=load_average())
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, default {info['torch_threads']} threads",
          flush=True)
    t0 = time.perf_counter()
    result = run_all(args)
    info["load_average_end"] = load_average()
    result = dict(
        machine=info,
        config=dict(B=B, H=H, D=D, dtype="float32", sizes=args.sizes, train_sizes=args.train_sizes,
                    windows=[list(w) for w in args.windows], peers=args.peers, repeats=args.repeats,
                    flops="4 * B * H * sum_i keys(i) * D per forward (3x for forward + backward)",
                    peak="rise of peak RSS during the call (MiB)", load="busy single-threaded processes",
                    timing="median call; the peers of one case take turns, call by call"),
        **result, total_s=round(time.perf_counter() - t0, 1),
    )
    if not args.quick:
        memory_pass(args, result["rows"])
    result["targets"] = targets(result)
    print("Targets:", json.dumps(result["targets"], indent=1))
    print(f"Load average at the end: {info['load_average_end']}; total {result['total_s']} s")
    if not args.quick:
        if "extensions" in stored:
            result["extensions"] = stored["extensions"]  # keep the rows of a separate --extensions run
        path.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, Path(args.png))
        print("wrote", args.out, "and", args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
