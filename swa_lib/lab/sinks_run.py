"""The sinks demonstration from the command line, and its tables.

``python -m swa_lib.lab.sinks_run`` trains the demo model (:func:`swa_lib.lab.sinks.run_demo`) and
prints its table. ``--save`` stores the weights (float16, a few hundred KB) as
``swa_lib/lab/results/sinks_model.pt`` and the numbers as ``sinks_demo.json``, so chapter 10 loads
them instead of training; ``--heads``, ``--steps``, ``--context``, ``--seed`` change the
configuration and ``--variant NAME`` stores such a run's numbers in ``sinks_variants.json`` (the
chapter's table of what else was tried). ``benchmarks/sinks_spread.py`` retrains over seeds and
numerics. The ``format_*`` functions print the stored results.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from .model import ModelConfig
from .results import machine, path as result_path
from .sinks import DemoConfig, load_demo_model, run_demo, sink_policies

__all__ = ["format_report", "format_variants", "format_spread", "save_demo", "save_variant", "main"]


def format_report(result: dict, digits: int = 3) -> str:
    """The demonstration's table: first-token attention per layer/head, then perplexities."""
    mass = result["first_token"]
    lines = ["Attention on token 0 (BOS) per layer and head, mean over queries >= W/4",
             f"(uniform attention would give {result['uniform']:.{digits}f})"]
    lines.append(("layer | " + " | ".join(f"h{h:<{digits + 1}d}" for h in range(len(mass[0])))).rstrip())
    for i, row in enumerate(mass):
        lines.append(f"{i:5d} | " + " | ".join(f"{x:.{digits}f}" for x in row))
    lines.append("")
    ref = result["ppl"]["recompute+BOS"]
    lines.append(f"{'policy (cache of W tokens)':28s} | perplexity | vs recompute+BOS")
    for name, value in result["ppl"].items():
        lines.append(f"{name:28s} | {value:10.{digits}f} | {100 * (value / ref - 1):+7.1f}%")
    return "\n".join(lines)


def format_variants(data: dict, digits: int = 1) -> str:
    """One line per stored run of ``sinks_variants.json``: layer 0's share of attention on BOS
    (lowest and highest head), then window-only, the best of 1..4 sinks ("best S") and
    recomputation without BOS ("no BOS"), each relative to recompute+BOS; with the final training
    loss (nats per byte) and the training time."""
    width = max(len("run"), *(len(name) for name in data))
    lines = [f"{'run':{width}s} | L0 on BOS |  window |  best S |  no BOS | loss  | train"]
    for name, r in data.items():
        p, ref = r["ppl"], r["ppl"]["recompute+BOS"]
        rel = lambda x: f"{100 * (x / ref - 1):+6.{digits}f}%"  # noqa: E731
        best = min(sink_policies(p))
        l0 = r["first_token"][0]
        loss = "  -  " if r.get("final_loss") is None else f"{r['final_loss']:.3f}"
        lines.append(f"{name:{width}s} | {min(l0):.2f}-{max(l0):.2f} | {rel(p['window']):>7s} | {rel(best):>7s} | "
                     f"{rel(p['recompute']):>7s} | {loss} | {r['seconds_train']:3.0f} s")
    return "\n".join(lines)


SPREAD_COLUMNS = (  # (findings key, header, as a percentage?)
    ("layer0_mean_vs_uniform", "L0 mean", False),
    ("layer0_min_vs_uniform", "L0 min", False),
    ("deeper_mean_vs_uniform", "deeper", False),
    ("window_vs_worst_sinks", "window", True),
    ("recompute_vs_recompute_bos", "no BOS", True),
    ("sinks_max_deviation", "sinks", True),
    ("original_vs_cache_positions", "original", True),
    ("dense_vs_recompute_bos", "dense", False),
)


def format_spread(data: dict) -> str:
    """The retrainings of ``sinks_spread.json``, one line per (seed, numerics), then the range and
    the mean +- standard deviation of every column (see :func:`findings` for what each one is)."""
    def cell(x, pct):
        return f"{100 * x:+.1f}%" if pct else f"{x:.2f}x"

    def row(label, values):
        return f"{label:14s}" + "".join(f"{v:>9s}" for v in values)

    lines = [row("seed numerics", [h for _, h, _ in SPREAD_COLUMNS])]
    for r in data["runs"]:
        lines.append(row(f"{r['seed']:4d} {r['numerics']['name']}",
                         [cell(r["findings"][k], pct) for k, _, pct in SPREAD_COLUMNS]))
    summ = data["summary"]
    lines.append(row("lowest", [cell(summ[k]["min"], pct) for k, _, pct in SPREAD_COLUMNS]))
    lines.append(row("highest", [cell(summ[k]["max"], pct) for k, _, pct in SPREAD_COLUMNS]))
    lines.append(row("mean", [cell(summ[k]["mean"], pct) for k, _, pct in SPREAD_COLUMNS]))
    lines.append(row("std. deviation", [cell(summ[k]["stdev"], pct).lstrip("+") for k, _, pct in SPREAD_COLUMNS]))
    return "\n".join(lines)


def save_demo(result: dict, cfg: DemoConfig) -> None:
    """Store the model (float16 state dict) and the numbers as package data in swa_lib/lab/results/."""
    state = {k: v.to(torch.float16) for k, v in result["model"].state_dict().items()}
    torch.save({"config": asdict(cfg.model), "state_dict": state}, result_path("sinks_model").with_suffix(".pt"))
    data = {k: v for k, v in result.items() if k != "model"}
    data["config"] = cfg.as_dict()
    data["machine"] = machine()  # float results depend on the CPU's code path: say which one made them
    result_path("sinks_demo").write_text(json.dumps(data, indent=1))


def save_variant(name: str, result: dict, cfg: DemoConfig) -> None:
    """Add one run's numbers (no weights) to ``swa_lib/lab/results/sinks_variants.json`` under ``name``."""
    p = result_path("sinks_variants")
    data = json.loads(p.read_text()) if p.exists() else {}
    entry = {k: v for k, v in result.items() if k not in ("model", "history")}
    entry["final_loss"] = round(result["history"][-1][1], 4) if result.get("history") else None
    entry["config"] = cfg.as_dict()
    data[name] = entry
    p.write_text(json.dumps(data, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: DemoConfig)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads per layer (width stays 64)")
    ap.add_argument("--context", type=int, default=None,
                    help="training context = cache size W (the batch shrinks to keep tokens per step)")
    ap.add_argument("--seed", type=int, default=None, help="training seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--save", action="store_true", help="store weights and numbers in swa_lib/lab/results/")
    ap.add_argument("--variant", default=None, help="store this run's numbers in sinks_variants.json under NAME")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DemoConfig()
    if args.steps is not None:
        cfg.train.steps = args.steps
    if args.heads is not None:
        cfg.model = ModelConfig(**{**asdict(cfg.model), "heads": args.heads, "heads_kv": args.heads})
    if args.context is not None:
        tokens = cfg.train.batch * cfg.train.context
        cfg.train.batch, cfg.train.context = max(1, tokens // args.context), args.context
    if args.seed is not None:
        cfg.train.seed = args.seed
    result = run_demo(cfg)
    if args.save:
        save_demo(result, cfg)
        # Re-evaluate the stored float16 weights so the saved numbers match what the chapter loads.
        reloaded = run_demo(cfg, model=load_demo_model(), progress=False)
        reloaded["history"], reloaded["seconds_train"] = result["history"], result["seconds_train"]
        save_demo({**reloaded, "model": result["model"]}, cfg)
        result = reloaded
    if args.variant:
        save_variant(args.variant, result, cfg)
    print(format_report(result))
    print(f"train {result['seconds_train']} s, eval {result['seconds_eval']} s")


if __name__ == "__main__":
    main()
