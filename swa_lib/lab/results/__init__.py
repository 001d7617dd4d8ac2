"""Stored benchmark results, shipped with the package so chapters can plot them anywhere.

Benchmarks in ``benchmarks/`` write ``swa_lib/lab/results/<name>.json``; chapters read them with
:func:`load`, which works from a clone, from ``pip install``, and on Colab alike.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import resources
from pathlib import Path

__all__ = ["load", "machine", "path", "load_average"]


def path(name: str) -> Path:
    """Where ``<name>.json`` lives inside the installed package."""
    return Path(str(resources.files(__name__).joinpath(f"{name}.json")))


def load(name: str) -> dict:
    """Read a stored benchmark result ``<name>.json``."""
    p = path(name)
    if not p.exists():
        raise FileNotFoundError(f"no stored result {name!r} at {p}; run the benchmark in benchmarks/ to make it")
    return json.loads(p.read_text())


def machine() -> dict:
    """Which machine made a result: CPU model, cores, torch and Python versions, torch threads.

    Stored with every result, because float results (and timings) depend on the CPU's code path.
    """
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version())


def load_average() -> list:
    """The system's 1, 5 and 15 minute load averages, rounded (empty where the OS has none):
    stored with timings, which another busy program slows down."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []
