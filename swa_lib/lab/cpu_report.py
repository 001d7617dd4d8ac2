"""Chapter 5's tables of the stored CPU benchmark (``cpu_bench.json``, ``benchmarks/cpu.py``).

Every table reads the stored run only, so it prints the same on every machine; the run records
the CPU, the thread counts and the load average that made the numbers.
"""

from __future__ import annotations

from .report import Table

__all__ = ["rows", "row", "ratio", "forward_table", "training_table", "load_table", "summary_table"]


def rows(data: dict, peer: str, n: int, direction: str = "forward", threads=None, load: int = 0,
         window=(256, 256)) -> list:
    """The stored rows of one peer and case (one per thread count unless ``threads`` is given)."""
    return [r for r in data["rows"] if (r["peer"], r["n"], r["direction"], r["load"], tuple(r["window"]))
            == (peer, n, direction, load, tuple(window)) and threads in (None, r["threads"])]


def _ms(r) -> str:
    return f"{r['time_s'] * 1e3:,.1f}" if r else "-"


def row(data: dict, *args, **kwargs):
    """The first of :func:`rows` (same arguments), or None."""
    found = rows(data, *args, **kwargs)
    return found[0] if found else None


def ratio(slow, fast):
    """How many times as long row ``slow`` took as row ``fast`` (None if either is missing)."""
    return slow["time_s"] / fast["time_s"] if slow and fast else None


def forward_table(data: dict, window=(256, 256)) -> Table:
    """Forward time per implementation and n, one column per thread count, with the useful
    GFLOP/s and peak memory of the run at the most threads."""
    threads = data["threads"]
    top = max(threads)
    cases = sorted({(r["n"], data["config"]["peers"].index(r["peer"]), r["peer"]) for r in data["rows"]
                    if r["direction"] == "forward" and r["load"] == 0 and tuple(r["window"]) == tuple(window)})
    body = []
    for n, _, peer in cases:
        by_t = {t: row(data, peer, n, threads=t, window=window) for t in threads}
        last = by_t[top]
        body.append([peer, f"{n:,}", *(_ms(by_t[t]) for t in threads),
                     f"{last['gflops']:.1f}" if last else "-", f"{last['peak_mib']:.1f}" if last else "-"])
    header = ["implementation", "n", *(f"ms, {t} thr." for t in threads), f"GFLOP/s, {top} thr.",
              "peak MiB"]
    return Table(header, body, title=f"forward, window {tuple(window)}")


def training_table(data: dict) -> Table:
    """Forward plus backward (the output's sum back-propagated to q, k, v), window (256, 256)."""
    threads = data["threads"]
    body = []
    for n in data["config"]["train_sizes"]:
        for peer in data["config"]["peers"]:
            by_t = {t: row(data, peer, n, "train", threads=t) for t in threads}
            if peer == "flex_compiled":
                body.append([peer, f"{n:,}", *("no CPU backward" for _ in threads), "-"])
            elif any(by_t.values()):
                peak = max(r["peak_mib"] for r in by_t.values() if r)
                body.append([peer, f"{n:,}", *(_ms(by_t[t]) for t in threads), f"{peak:.1f}"])
    header = ["implementation", "n", *(f"ms, {t} thr." for t in threads), "peak MiB"]
    return Table(header, body, title="forward + backward, window (256, 256)")


def load_table(data: dict) -> Table:
    """n = 16384 at the most threads, quiet and with other processes each keeping a core busy:
    time and its ratio to the quiet time."""
    top = max(data["threads"])
    loads = sorted({r["load"] for r in data["rows"]} - {0})
    body = []
    for direction in ("forward", "train"):
        for peer in data["config"]["peers"]:
            quiet = row(data, peer, 16384, direction, threads=top)
            busy = [row(data, peer, 16384, direction, load=x) for x in loads]
            if quiet and any(busy):
                cells = [f"{_ms(b)} ({ratio(b, quiet):.1f}x)" if b else "-" for b in busy]
                body.append([peer, "forward" if direction == "forward" else "fwd + bwd", _ms(quiet), *cells])
    header = ["implementation", "pass", "quiet ms", *(f"{x} busy: ms (x quiet)" for x in loads)]
    return Table(header, body, title=f"n = 16,384, window (256, 256), {top} threads, other processes busy")


def summary_table(data: dict) -> Table:
    """The ratios the text quotes: at n = 16384, window (256, 256), per thread count."""
    body = []
    for t in data["threads"]:
        ours = row(data, "blocked", 16384, threads=t)
        flex = row(data, "flex_compiled", 16384, threads=t)
        train = row(data, "blocked", 16384, "train", threads=t)
        hf_train = row(data, "hf_longformer", 16384, "train", threads=t)
        dense_train = row(data, "sdpa_dense", 16384, "train", threads=t)
        times = lambda a, b: f"{ratio(a, b):.2f}x" if a and b else "-"  # noqa: E731
        gemm = data["gemm_gflops"][str(t)]
        body.append([t, f"{gemm:.0f}", f"{100 * ours['gflops'] / gemm:.0f}%" if ours else "-", times(flex, ours),
                     times(hf_train, train), times(dense_train, train)])
    header = ["threads", "GEMM GFLOP/s", "blocked fwd, % of GEMM", "Flex / blocked, fwd",
              "HF / blocked, fwd+bwd", "dense SDPA / blocked, fwd+bwd"]
    return Table(header, body, title="n = 16,384, window (256, 256)")
