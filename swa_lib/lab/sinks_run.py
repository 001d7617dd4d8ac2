"""The sinks demonstration from the command line, and its tables.

``python -m swa_lib.lab.sinks_run`` trains the demo model (:func:`swa_lib.lab.sinks.run_demo`) and
prints its table. ``--save`` stores the weights (float16, a few hundred KB) as
``swa_lib/lab/results/sinks_model.pt`` and the numbers as ``sinks_demo.json``, so chapter 10 loads
them instead of training; ``--heads``, ``--steps``, ``--context``, ``--seed`` change the
configuration and ``--variant NAME`` stores such a run's numbers in ``sinks_variants.json`` (the
chapter's table of what else was tried). ``benchmarks/sinks_spread.py`` retrains over seeds and
numerics. The ``*_table`` functions show the stored results as tables (rendered in a notebook),
the ``format_*`` functions as text.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from .model import ModelConfig
from .report import Table, table
from .results import machine, path as result_path
from .sinks import DemoConfig, load_demo_model, run_demo, sink_policies

__all__ = [
    "first_token_table", "perplexity_table", "format_report", "variants_table", "format_variants",
    "spread_table", "format_spread", "save_demo", "save_variant", "main",
]


def first_token_table(result: dict, digits: int = 3) -> Table:
    """Attention on token 0 (BOS) per layer (rows) and head (columns), mean over queries >= W/4."""
    mass = result["first_token"]
    return table(["layer"] + [f"h{h}" for h in range(len(mass[0]))],
                 [[i] + [f"{x:.{digits}f}" for x in row] for i, row in enumerate(mass)])


def perplexity_table(result: dict, digits: int = 3) -> Table:
    """Perplexity per cache policy, and its difference from recompute+BOS (what training saw)."""
    ref = result["ppl"]["recompute+BOS"]
    return table(["policy (cache of W tokens)", "perplexity", "vs recompute+BOS"],
                 [[name, f"{value:.{digits}f}", f"{100 * (value / ref - 1):+.1f}%"]
                  for name, value in result["ppl"].items()])


def format_report(result: dict, digits: int = 3) -> str:
    """The demonstration's tables as text: first-token attention per layer/head, then perplexities."""
    return "\n".join([
        "Attention on token 0 (BOS) per layer and head, mean over queries >= W/4",
        f"(uniform attention would give {result['uniform']:.{digits}f})",
        repr(first_token_table(result, digits)), "", repr(perplexity_table(result, digits))])


def variants_table(data: dict, digits: int = 1) -> Table:
    """One row per stored run of ``sinks_variants.json``: layer 0's share of attention on BOS
    (lowest and highest head), then window-only, the best of 1..4 sinks ("best S") and
    recomputation without BOS ("no BOS"), each relative to recompute+BOS; with the final training
    loss (nats per byte) and the training time."""
    rows = []
    for name, r in data.items():
        p, ref = r["ppl"], r["ppl"]["recompute+BOS"]
        rel = lambda x: f"{100 * (x / ref - 1):+.{digits}f}%"  # noqa: E731
        l0 = r["first_token"][0]
        loss = "-" if r.get("final_loss") is None else f"{r['final_loss']:.3f}"
        rows.append([name, f"{min(l0):.2f}-{max(l0):.2f}", rel(p["window"]), rel(min(sink_policies(p))),
                     rel(p["recompute"]), loss, f"{r['seconds_train']:.0f} s"])
    return table(["run", "L0 on BOS", "window", "best S", "no BOS", "loss", "train"], rows,
                 align="lrrrrrr")


def format_variants(data: dict, digits: int = 1) -> str:
    """:func:`variants_table` as text: a header, a rule, one line per run."""
    return repr(variants_table(data, digits))


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


def spread_table(data: dict) -> Table:
    """The retrainings of ``sinks_spread.json``, one row per (seed, numerics), then the range and
    the mean +- standard deviation of every column (see :func:`findings` for what each one is)."""
    def cell(x, pct):
        return f"{100 * x:+.1f}%" if pct else f"{x:.2f}x"

    rows = [[r["seed"], r["numerics"]["name"]]
            + [cell(r["findings"][k], pct) for k, _, pct in SPREAD_COLUMNS] for r in data["runs"]]
    summ = data["summary"]
    for label, stat in (("lowest", "min"), ("highest", "max"), ("mean", "mean"),
                        ("std. deviation", "stdev")):
        cells = [cell(summ[k][stat], pct) for k, _, pct in SPREAD_COLUMNS]
        rows.append([label, ""] + ([c.lstrip("+") for c in cells] if stat == "stdev" else cells))
    return table(["seed", "numerics"] + [h for _, h, _ in SPREAD_COLUMNS], rows,
                 align="ll" + "r" * len(SPREAD_COLUMNS))


def format_spread(data: dict) -> str:
    """:func:`spread_table` as text."""
    return repr(spread_table(data))


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
