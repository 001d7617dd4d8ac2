"""Stored benchmark results, shipped with the package so chapters can plot them anywhere.

Benchmarks in ``benchmarks/`` write ``swa_lib/results/<name>.json``; chapters read them with
:func:`load`, which works from a clone, from ``pip install``, and on Colab alike.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

__all__ = ["load", "path"]


def path(name: str) -> Path:
    """Where ``<name>.json`` lives inside the installed package."""
    return Path(str(resources.files(__name__).joinpath(f"{name}.json")))


def load(name: str) -> dict:
    """Read a stored benchmark result ``<name>.json``."""
    p = path(name)
    if not p.exists():
        raise FileNotFoundError(f"no stored result {name!r} at {p}; run the benchmark in benchmarks/ to make it")
    return json.loads(p.read_text())
