#!/usr/bin/env python3
"""Long-range needle task: train the four attention variants of chapter 11 for longer than the
chapter can afford, plus a sweep of the sliding window size, and store the results.

    .venv/bin/python benchmarks/long_range.py                    # ~10 min on one CPU core
    .venv/bin/python benchmarks/long_range.py --extra-seeds 1 2  # ~10 min: seeds 1, 2 of three variants

Prints a table and writes ``swa_lib/lab/results/long_range.json`` and ``book/figures/long_range.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from swa_lib.lab.long_range import NeedleTask, Variant, run_variant, standard_variants
from swa_lib.lab.training import TrainConfig
from swa_lib.lab.plotting import PALETTE, new_figure
from swa_lib.lab.results import machine, path as result_path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--sweep", type=int, nargs="*", default=[4, 16, 32], help="extra sliding windows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-distance", type=int, default=32)
    ap.add_argument("--extra-seeds", type=int, nargs="*", default=[],
                    help="only rerun --extra-variants with these seeds and add them to the stored JSON")
    ap.add_argument("--extra-variants", nargs="*", default=["sliding", "global", "sliding w=16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    task = NeedleTask(args.context, args.stride)
    variants = standard_variants(args.window, args.layers, args.stride)
    variants += [Variant(f"sliding w={w}", (w,) * args.layers) for w in args.sweep]
    cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, weight_decay=0.1, warmup=30,
                      log_every=50, seed=args.seed, progress=False)
    if args.extra_seeds:
        extra_seeds(args, task, {v.name: v for v in variants}, cfg)
        return
    runs, reach = [], args.window * args.layers  # the plain sliding model's reach
    head = f"acc<={reach}"
    print(f"{'variant':<16}{'windows':<14}{'reach':>6}{'scores/tok':>11}{head:>9}{'acc>' + str(reach):>8}{'loss':>7}{'s':>7}")
    for v in variants:
        r = run_variant(v, task, cfg, dim=args.dim, per_distance=args.per_distance)
        acc = {int(d): a for d, a in r["accuracy"].items()}
        near = [a for d, a in acc.items() if d <= reach]
        far = [a for d, a in acc.items() if d > reach]
        print(f"{v.name:<16}{str(v.windows):<14}{r['reach']:>6}{r['scores_per_token']:>11.1f}"
              f"{sum(near) / len(near):>9.2f}{sum(far) / len(far):>8.2f}{r['final_loss']:>7.3f}{r['train_seconds']:>7.0f}",
              flush=True)
        runs.append(r)

    out = {"args": vars(args), "machine": machine(), "runs": runs}
    result_path("long_range").write_text(json.dumps(out, indent=1))
    fig, ax = new_figure(width=7, height=4)
    for color, r in zip(PALETTE, runs[:4]):
        acc = {int(d): a for d, a in r["accuracy"].items()}
        ax.plot(list(acc), list(acc.values()), "o-", ms=3, color=color, label=r["name"])
    ax.axhline(0.1, color="grey", ls=":", label="chance")
    ax.set_xlabel("distance from needle to query (tokens)")
    ax.set_ylabel("accuracy")
    ax.legend(facecolor="white")
    fig.tight_layout()
    fig.savefig(ROOT / "book" / "figures" / "long_range.png", dpi=100, facecolor="white")
    print("wrote", result_path("long_range"))


def extra_seeds(args, task, variants, cfg) -> None:
    """Train some variants with more seeds; store them under ``"extra_seeds"`` in the existing JSON."""
    data = json.loads(result_path("long_range").read_text())
    extra = data.get("extra_seeds", [])
    for name in args.extra_variants:
        for seed in args.extra_seeds:
            cfg.seed = seed
            r = run_variant(variants[name], task, cfg, dim=args.dim, per_distance=args.per_distance)
            r["seed"] = seed
            extra = [e for e in extra if (e["name"], e["seed"]) != (name, seed)] + [r]
            acc = {int(d): a for d, a in r["accuracy"].items()}
            bins = [(1, 8), (9, 16), (17, 32), (33, 62)]
            means = [sum(a for d, a in acc.items() if lo <= d <= hi) / sum(1 for d in acc if lo <= d <= hi) for lo, hi in bins]
            print(f"{name:<16} seed {seed}: accuracy by distance bin {bins}: " + " ".join(f"{m:.2f}" for m in means), flush=True)
    data["extra_seeds"] = extra
    data["extra_seeds_args"] = {"seeds": args.extra_seeds, "variants": args.extra_variants}
    result_path("long_range").write_text(json.dumps(data, indent=1))
    print("added to", result_path("long_range"))


if __name__ == "__main__":
    main()
