#!/usr/bin/env python3
"""Communication of sequence parallel sliding window attention: halo exchange vs all-gather.

    .venv/bin/python benchmarks/comm.py [--quick]

For P ranks (gloo processes on 127.0.0.1) and sequence lengths N, measures per rank:

* the halo exchange of swa_lib.distributed (K and V of the ``left + right`` neighbouring
  tokens, sent with ``batch_isend_irecv``), and
* an all-gather of the full K and V, which is what a naive scheme does and what ring attention
  moves in total, one block per step.

Bytes per rank are counted from the communication plan, not sniffed from the wire:

    halo:        (left + right) * B * H_kv * (D + D_v) * bytes_per_element        (at most; not N)
    all-gather:  (P - 1) / P * N * B * H_kv * (D + D_v) * bytes_per_element       (ring all-gather)
    Ulysses:     (P - 1) / P * (N / P) * B * (2 H + 2 H_kv) * D * bytes_per_element   (model only:
                 all-to-all of q, k, v before attention and of the output after it)

Wall-clock times on loopback gloo are for shape only (a real interconnect is far faster); the
JSON also stores the on-paper model for NVLink and InfiniBand. Writes
swa_lib/lab/results/comm_bench.json and book/figures/comm_bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swa_lib.lab import results  # noqa: E402
from swa_lib.distributed import (  # noqa: E402
    ShardLayout,
    _exchange,
    _HaloExchange,
    halo_plan,
    halo_tokens_sent,
    shard_bounds,
)

B, H, H_KV, D = 1, 8, 4, 64
WINDOW = (256, 0)
ELEMENT = 4  # fp32 bytes

# On-paper model: per-GPU unidirectional bandwidths (bytes/s) and a fixed latency per message.
LINKS = {
    "NVLink 4 (H100 SXM, 450 GB/s per direction)": (450e9, 5e-6),
    "InfiniBand NDR (400 Gb/s = 50 GB/s)": (50e9, 10e-6),
}
# A Mistral-7B-like layer for the model: 8 KV heads of 128, bf16, window 4096.
MODEL_LAYER = {"B": 1, "H": 32, "H_kv": 8, "D": 128, "bytes": 2, "left": 4096, "right": 0}


def bytes_per_rank(scheme: str, n: int, p: int, *, b, h, h_kv, d, element, left, right) -> float:
    kv_token = b * h_kv * 2 * d * element  # K and V of one token
    if scheme == "halo":
        layout = ShardLayout(tuple(e - s for s, e in shard_bounds(n, p)))
        return float(max(halo_tokens_sent(layout, (left, right))) * kv_token)
    if scheme == "allgather":
        return (p - 1) / p * n * kv_token
    if scheme == "ulysses":
        return (p - 1) / p * (n / p) * b * (2 * h + 2 * h_kv) * d * element
    raise ValueError(f"unknown scheme {scheme!r}")


def _worker(rank, world, port, sizes, reps, out_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    rows = []
    for n in sizes:
        layout = ShardLayout(tuple(e - s for s, e in shard_bounds(n, world)))
        kv = torch.randn(B, H_KV, layout.sizes[rank], 2 * D)
        gathered = [torch.empty(B, H_KV, max(layout.sizes), 2 * D) for _ in range(world)]
        padded = torch.cat([kv, kv.new_zeros(B, H_KV, max(layout.sizes) - kv.shape[2], 2 * D)], dim=2)

        s = layout.bounds(rank)[0]
        need, give = halo_plan(layout, rank, *WINDOW)
        sends = [(kv[:, :, a - s : b - s].contiguous(), p) for p, a, b in give]
        recvs = [(kv.new_empty(B, H_KV, b - a, 2 * D), o) for o, a, b in need if o != rank]

        def halo():  # the messages only
            _exchange(sends, recvs, None)

        def halo_total():  # what sequence_parallel_attention does: messages + assembling the keys
            with torch.no_grad():
                _HaloExchange.apply(kv, layout, rank, *WINDOW, None)

        def allgather():
            dist.all_gather(gathered, padded)

        timing = {}
        for name, fn in (("halo", halo), ("halo_total", halo_total), ("allgather", allgather)):
            fn()  # warm-up
            times = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dist.barrier()  # the step ends when every rank has its data
                times.append(time.perf_counter() - t0)
            timing[name] = statistics.median(times) * 1e3
        rows.append({"n": n, "p": world, **{f"{k}_ms": t for k, t in timing.items()}})
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(worlds, sizes, reps):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in worlds:
            out = Path(tmp) / f"p{p}.json"
            mp.spawn(_worker, args=(p, _free_port(), sizes, reps, str(out)), nprocs=p, join=True)
            rows += json.loads(out.read_text())
    shape = dict(b=B, h=H, h_kv=H_KV, d=D, element=ELEMENT, left=WINDOW[0], right=WINDOW[1])
    for row in rows:
        for scheme in ("halo", "allgather", "ulysses"):
            row[f"{scheme}_bytes"] = bytes_per_rank(scheme, row["n"], row["p"], **shape)
    return rows


def paper_model(n_values=(32768, 131072, 524288), p=8):
    """Time per layer and rank = bytes / bandwidth + latency, for the MODEL_LAYER shape."""
    m = MODEL_LAYER
    shape = dict(b=m["B"], h=m["H"], h_kv=m["H_kv"], d=m["D"], element=m["bytes"], left=m["left"], right=m["right"])
    out = []
    for n in n_values:
        for scheme in ("halo", "allgather", "ulysses"):
            nbytes = bytes_per_rank(scheme, n, p, **shape)
            # halo: one message; all-gather as a ring: P - 1 messages; all-to-all: 4 collectives
            messages = {"halo": 1, "allgather": p - 1, "ulysses": 4}[scheme]
            row = {"n": n, "p": p, "scheme": scheme, "bytes": nbytes}
            for link, (bw, lat) in LINKS.items():
                row[link] = (nbytes / bw + messages * lat) * 1e3  # ms
            out.append(row)
    return out


def plot(data, path):
    from swa_lib.lab.plotting import new_figure, plot_scaling

    fig, axes = new_figure(ncols=2, width=5.2, height=4.0)
    axes = axes.ravel()
    rows = data["rows"]
    p = max(r["p"] for r in rows)
    sel = sorted((r for r in rows if r["p"] == p), key=lambda r: r["n"])
    ns = [r["n"] for r in sel]
    plot_scaling(
        ns,
        {
            "halo exchange": [r["halo_bytes"] / 2**20 for r in sel],
            "all-gather K/V (ring)": [r["allgather_bytes"] / 2**20 for r in sel],
            "Ulysses all-to-all (model)": [r["ulysses_bytes"] / 2**20 for r in sel],
        },
        ylabel="MiB sent per rank",
        title=f"bytes per rank, P = {p}, window {tuple(data['window'])}",
        ax=axes[0],
    )
    plot_scaling(
        ns,
        {
            "halo messages": [r["halo_ms"] for r in sel],
            "halo + assembling local K/V": [r["halo_total_ms"] for r in sel],
            "all-gather K/V": [r["allgather_ms"] for r in sel],
        },
        ylabel="time per exchange (ms, gloo on loopback)",
        title=f"measured, P = {p} CPU processes",
        ax=axes[1],
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, facecolor="white")
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    args = parser.parse_args(argv)
    sizes = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
    reps = 3 if args.quick else 5
    rows = measure([2, 4], sizes, reps)
    data = {
        "description": "per-rank communication of one K/V exchange: halo vs all-gather (gloo, loopback)",
        "machine": results.machine(),
        "torch": torch.__version__,
        "shape": {"B": B, "H": H, "H_kv": H_KV, "D": D, "dtype": "float32"},
        "window": list(WINDOW),
        "rows": rows,
        "paper_model": {"layer": MODEL_LAYER, "links": {k: list(v) for k, v in LINKS.items()}, "rows": paper_model()},
    }
    print(f"{'P':>2} {'N':>7} {'halo MiB':>9} {'gather MiB':>10} {'Ulysses MiB':>11} {'halo ms':>8} {'+concat ms':>10} {'gather ms':>9}")
    for r in rows:
        print(
            f"{r['p']:>2} {r['n']:>7} {r['halo_bytes'] / 2**20:>9.2f} {r['allgather_bytes'] / 2**20:>10.2f} "
            f"{r['ulysses_bytes'] / 2**20:>11.2f} {r['halo_ms']:>8.2f} {r['halo_total_ms']:>10.2f} {r['allgather_ms']:>9.2f}"
        )
    print("\nmodel per layer and rank (P = 8, Mistral-7B-like layer, bf16, window 4096), ms:")
    for r in data["paper_model"]["rows"]:
        times = "  ".join(f"{v:8.3f}" for k, v in r.items() if k in LINKS)
        print(f"N={r['n']:>7} {r['scheme']:>9} {r['bytes'] / 2**20:9.1f} MiB  {times}")
    out = results.path("comm_bench")
    out.write_text(json.dumps(data, indent=1))
    fig_dir = ROOT / "book" / "figures"
    fig_dir.mkdir(exist_ok=True)
    plot(data, fig_dir / "comm_bench.png")
    print("wrote", out, "and", fig_dir / "comm_bench.png")


if __name__ == "__main__":
    main()
