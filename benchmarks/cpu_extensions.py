"""What global tokens and dilation cost on the CPU backends (``benchmarks/cpu.py --extensions``).

At n = 16384, fp32, B=1, H=4, D=64, forward: the plain window (256, 256), the same with 16
global tokens spread over the sequence, and dilation 2 on the window (512, 512) (as many keys
per query as the plain window). Chapters 6 and 7 print the ratios (``swa_lib.lab.report.
extension_costs``).
"""

from __future__ import annotations

import functools
import json

import torch

import swa_lib
from swa_lib.lab import results
from swa_lib.lab.results import load_average
from timing import time_rounds

B, H, D = 1, 4, 64


def run_extensions(n: int, repeats: int, backends=("blocked", "chunked")) -> dict:
    """The rows and the ratios to the plain window, with the machine that made them."""
    info = dict(results.machine(), load_average_start=load_average())
    print(f"# extensions, {info['torch_threads']} thread(s), load average {info['load_average_start']}", flush=True)
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
    glob = torch.linspace(0, n - 1, 16).long()  # 16 global tokens spread over the sequence
    cases = [
        ("plain (256,256)", (256, 256), {}),
        ("+16 global tokens", (256, 256), dict(global_tokens=glob)),
        ("dilation 2, (512,512)", (512, 512), dict(dilation=2)),
    ]
    rows = []
    for backend in backends:  # the cases of one backend take turns (timing.time_rounds)
        fns = {label: functools.partial(swa_lib.sliding_window_attention, q, k, v, window, backend=backend, **kwargs)
               for label, window, kwargs in cases}
        with torch.no_grad():
            for fn in fns.values():
                fn()
            timed = time_rounds(fns, repeats)
        for label, window, _ in cases:
            seconds, cpu = timed[label]
            rows.append(dict(peer=backend, case=label, window=list(window), n=n, time_s=seconds, cpu_s=cpu,
                             reach=window[0] + window[1] + 1))
            print(f"  {backend:8s} {label:24s} n={n}  {seconds * 1e3:9.1f} ms (cpu {cpu * 1e3:7.1f} ms)", flush=True)
    base = {r["peer"]: r for r in rows if r["case"].startswith("plain")}
    ratios = {f"{r['peer']} {r['case']} / plain": dict(wall=round(r["time_s"] / base[r["peer"]]["time_s"], 2),
                                                       cpu=round(r["cpu_s"] / base[r["peer"]]["cpu_s"], 2))
              for r in rows if not r["case"].startswith("plain")}
    print("ratios:", json.dumps(ratios, indent=1))
    return dict(machine=info, load_average_end=load_average(), rows=rows, ratios=ratios)
