#!/usr/bin/env python3
"""Decode benchmark: tokens/s and KV-cache memory against generated length, four ways of decoding.

    .venv/bin/python benchmarks/decode.py            # 8192 tokens per method (about 5 minutes, 1 thread)
    .venv/bin/python benchmarks/decode.py --quick    # 256 tokens, narrow model (seconds)

The model is swa_lib's TinyLM with untrained weights (speed and memory do not depend on them):
4 layers, width 256, 4 heads of D = 64 (the head size of real models, so that attention over a
long cache costs what it costs there), fp32, batch 1, one torch thread. Cache size W = 64 tokens.
Methods:

  rolling     every layer has the window (W - 1, 0); a RollingKVCache of W slots per layer
  sinks       full-attention model with a SinkKVCache (4 sinks + 60 recent) per layer
  recompute   no cache: every step runs a fresh forward pass over the last W tokens
  full        full-attention model with a growing FullKVCache (dense attention's cache)

Per method, after every ``--every`` generated tokens: tokens/s over that stretch, and the bytes
held by the KV caches (tensor sizes, 2 * layers * B * H_kv * slots * D * 4 bytes; recompute holds
none, it keeps only W token ids). Analytic work per new token: rolling / sinks attend to W keys;
recompute re-runs the whole network on W tokens (W times the projection and MLP work); full
attends to all n previous keys, so its step reads 2 * layers * n * width floats of cache and slows
down as n grows. Writes swa_lib/lab/results/decode_bench.json and book/figures/decode_bench.png. Tests
never assert timings; the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swa_lib.lab.model import ModelConfig, TinyLM  # noqa: E402
from swa_lib.lab.plotting import plot_decode_bench  # noqa: E402
from swa_lib.lab.results import machine, path as result_path  # noqa: E402

W = 64
METHODS = ["rolling", "sinks", "recompute", "full"]


def make_model(windowed: bool, dim: int) -> TinyLM:
    torch.manual_seed(0)
    windows = (W - 1,) * 4 if windowed else (None,) * 4
    heads = max(1, dim // 64)
    return TinyLM(ModelConfig(dim=dim, heads=heads, heads_kv=heads, windows=windows)).eval()


@torch.no_grad()
def run(method: str, length: int, every: int, dim: int) -> list:
    """Decode ``length`` tokens; one record per ``every`` tokens."""
    model = make_model(windowed=(method == "rolling"), dim=dim)
    caches = None
    if method == "rolling":
        caches = model.new_caches(1, "rolling")
    elif method == "sinks":
        caches = model.new_caches(1, "sink", sinks=4, window=W)
    elif method == "full":
        caches = model.new_caches(1, "full")
    history = torch.zeros(1, 0, dtype=torch.long)
    token = torch.tensor([[256]])  # BOS
    records, t0 = [], time.perf_counter()
    for i in range(length):
        if caches is None:  # recompute: a fresh pass over the last W tokens
            history = torch.cat([history, token], dim=1)[:, -W:]
            logits = model(history)[:, -1]
        else:
            logits = model(token, start=i, caches=caches)[:, -1]
        token = logits[:, :256].argmax(-1, keepdim=True)
        if (i + 1) % every == 0:
            t1 = time.perf_counter()
            nbytes = 0 if caches is None else sum(c.nbytes for c in caches)
            records.append({"tokens": i + 1, "tokens_per_s": every / (t1 - t0), "cache_bytes": nbytes})
            t0 = time.perf_counter()
    return records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192, help="tokens generated per method")
    ap.add_argument("--every", type=int, default=512, help="record every this many tokens")
    ap.add_argument("--dim", type=int, default=256, help="model width (heads of 64 channels)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--quick", action="store_true", help="256 tokens of a width-64 model, record every 64")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.quick:
        args.length, args.every, args.dim = 256, 64, 64
    torch.set_num_threads(args.threads)
    results = {m: run(m, args.length, args.every, args.dim) for m in METHODS}
    print(f"{'method':10s} | " + " | ".join(f"n={r['tokens']:5d}" for r in results["rolling"]))
    for m, recs in results.items():
        print(f"{m:10s} | " + " | ".join(f"{r['tokens_per_s']:6.0f}/s" for r in recs))
    print("cache bytes")
    for m, recs in results.items():
        print(f"{m:10s} | " + " | ".join(f"{r['cache_bytes']:8d}" for r in recs))
    if args.no_save:
        return
    cfg = make_model(windowed=True, dim=args.dim).cfg
    data = {
        "window": W,
        "model": {"dim": cfg.dim, "layers": cfg.layers, "heads": cfg.heads, "head_dim": cfg.head_dim,
                  "dtype": "float32", "batch": 1},
        "results": results,
        "machine": dict(machine(), load_average=list(os.getloadavg())),
    }
    result_path("decode_bench").write_text(json.dumps(data, indent=1))
    fig = plot_decode_bench(data)
    out = ROOT / "book" / "figures" / "decode_bench.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, facecolor="white")
    print("wrote", result_path("decode_bench"), "and", out)


if __name__ == "__main__":
    main()
