"""How much the attention-sink findings move with the seed and with the CPU's numerical code path.

Chapter 10's demonstration trains a tiny model from a seed, and a float computation on another
CPU (another BLAS kernel, another vector width) rounds differently; after 2400 steps of training
those last bits become different weights. This script retrains the demo model for several seeds,
each once with the default numerics and once with the code path `dev.py portability` uses
(``MKL_CBWR=COMPATIBLE``, ``ATEN_CPU_CAPABILITY=default``, one thread), and stores every run's
findings (:func:`swa_lib.lab.sinks.findings`) with the machine in ``swa_lib/lab/results/sinks_spread.json``.
The margins of ``tests/test_sinks.py`` are derived from this spread.

    python benchmarks/sinks_spread.py --seeds 0 1 2 3 4 --jobs 2   # about 15 minutes on 2 cores
    python benchmarks/sinks_spread.py --seeds 5 --add                # one more seed, keep the rest
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dev import OTHER_NUMERICS  # noqa: E402  (standard library only)

NUMERICS = {"default": {}, "other": OTHER_NUMERICS}


def one_run(seed: int) -> dict:
    """Train and evaluate the demo model from ``seed`` in this process (one torch thread)."""
    import torch

    from swa_lib.lab.results import machine
    from swa_lib.lab.sinks import DemoConfig, findings, run_demo

    torch.set_num_threads(1)
    cfg = DemoConfig()
    cfg.train.seed = seed
    result = run_demo(cfg, progress=False)
    return {"seed": seed, "findings": findings(result), "ppl": result["ppl"], "first_token": result["first_token"],
            "seconds_train": result["seconds_train"], "machine": machine()}


def launch(seed: int, numerics: str) -> dict:
    env = dict(os.environ, PYTHONHASHSEED="0", **NUMERICS[numerics])
    out = subprocess.run([sys.executable, __file__, "--one", str(seed)], env=env, cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    run = json.loads(out.strip().splitlines()[-1])
    run["numerics"] = {"name": numerics, **NUMERICS[numerics]}
    print(f"seed {seed}, {numerics} numerics: {run['findings']}", flush=True)
    return run


def summary(runs: list) -> dict:
    keys = runs[0]["findings"]
    out = {}
    for k in keys:
        vals = [r["findings"][k] for r in runs]
        out[k] = {"min": min(vals), "max": max(vals), "mean": round(statistics.mean(vals), 4),
                  "stdev": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one thread)")
    ap.add_argument("--out", default=str(ROOT / "swa_lib" / "results" / "sinks_spread.json"))
    ap.add_argument("--add", action="store_true", help="keep the runs already stored in --out, add the missing ones")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_run(args.one)))
        return
    old = json.loads(Path(args.out).read_text())["runs"] if args.add and Path(args.out).exists() else []
    done = {(r["seed"], r["numerics"]["name"]) for r in old}
    jobs = [(s, n) for s in args.seeds for n in NUMERICS if (s, n) not in done]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = old + list(pool.map(lambda job: launch(*job), jobs))
    runs.sort(key=lambda r: (r["seed"], r["numerics"]["name"]))
    data = {"what": "chapter 10's demo model retrained per seed and numerical code path",
            "runs": runs, "summary": summary(runs)}
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    from swa_lib.lab.sinks_run import format_spread

    print(format_spread(data))


if __name__ == "__main__":
    main()
