"""The shape of the code: the library stands without the lab, and the map of it is true.

``swa_lib`` is the attention library (torch and numpy only); ``swa_lib.lab`` is the book's
laboratory (plots, the tiny LM's experiments, stored results), which needs matplotlib.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swa_lib.distributed.layout import ShardLayout, halo_plan, halo_tokens_sent, shard_sequence

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "swa_lib"
MAX_LINES = 400  # no module of the library (or the lab) above this


def _modules(include_lab: bool = True) -> list[str]:
    """Dotted names of every module under swa_lib/."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if include_lab or not name.startswith("swa_lib.lab"):
            names.append(name)
    return names


_BLOCK_MATPLOTLIB = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"blocked for this test: {name}")
        return None

sys.meta_path.insert(0, Block())
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
print("matplotlib" in sys.modules)
"""


def test_the_library_imports_without_matplotlib():
    names = [n for n in _modules(include_lab=False)
             if not (n.startswith("swa_lib.backends.triton") and _missing("triton"))]
    out = subprocess.run([sys.executable, "-c", _BLOCK_MATPLOTLIB, *names], capture_output=True, text=True,
                         cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_the_blocker_does_block():
    """The same subprocess fails on a lab module that draws, so the test above can fail."""
    out = subprocess.run([sys.executable, "-c", _BLOCK_MATPLOTLIB, "swa_lib.lab.plotting"], capture_output=True,
                         text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0 and "blocked for this test: matplotlib" in out.stderr


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _imports(path: Path):
    """(module imported from, names) for every ``from X import a, b`` in a file, X made absolute."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(ROOT).parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, [a.name for a in node.names]


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, names in _imports(path):
            if module.startswith("swa_lib"):
                offenders += [f"{path.relative_to(ROOT)}: {module}.{n}" for n in names if n.startswith("_")]
    assert not offenders, offenders


def test_the_lab_is_not_imported_by_the_library():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "lab" in path.relative_to(PACKAGE).parts:
            continue
        for module, _ in _imports(path):
            if module.startswith("swa_lib.lab"):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, offenders


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_have_a_readable_size(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it"


def test_the_module_map_names_every_module():
    """AUTHORING.md's module map and the README's layout section match the tree."""
    authoring = (ROOT / "AUTHORING.md").read_text()
    section = authoring.split("## Module map", 1)[1].split("\n## ", 1)[0]
    quoted = set(re.findall(r"`([\w/.]+)`", section))
    files = {p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    # a module is mapped by its path, or by its file name in the bullet of its package
    unmapped = sorted(str(p.relative_to(ROOT)) for p in files
                      if str(p.relative_to(ROOT)) not in quoted and p.name not in quoted)
    assert not unmapped, f"modules missing from AUTHORING.md's module map: {unmapped}"
    packages = {str(p.parent.relative_to(ROOT)) + "/" for p in PACKAGE.rglob("__init__.py")} - {"swa_lib/"}
    assert packages <= quoted, f"packages missing from the map: {sorted(packages - quoted)}"
    gone = sorted(q for q in quoted if q.startswith("swa_lib/") and not (ROOT / q).exists())
    assert not gone, f"the map names paths that do not exist: {gone}"
    readme = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    for folder in ("swa_lib/", "swa_lib/backends/", "swa_lib/lab/"):
        assert folder in readme, f"README's layout section does not show {folder}"


# -- swa_lib.distributed.layout: the sequence-parallel plan refuses bad input (no process group) --

SIZES = (3, 3, 4)


@pytest.mark.parametrize(
    "args, kw, error, match",
    [
        ((-1,), {}, ValueError, r"rank must be in \[0, 3\) for 3 shard sizes \(3, 3, 4\), got -1"),
        ((3,), {}, ValueError, r"rank must be in \[0, 3\) .*got 3"),
        ((1.0,), {}, TypeError, "rank must be an int, got float 1.0"),
        ((True,), {}, TypeError, "rank must be an int, got bool True"),
        ((1,), dict(dim=3), ValueError, r"dim must be in \[-3, 3\) for x of shape \(1, 1, 10\), got 3"),
        ((1,), dict(dim=5), ValueError, r"dim must be in \[-3, 3\) .*got 5"),
        ((1,), dict(dim=-4), ValueError, r"dim must be in \[-3, 3\) .*got -4"),
        ((1,), dict(dim=2.0), TypeError, "dim must be an int, got float 2.0"),
    ],
)
def test_shard_sequence_refuses_bad_rank_and_dim(args, kw, error, match):
    x = torch.arange(10.0).reshape(1, 1, 10)
    with pytest.raises(error, match=match):
        shard_sequence(x, *args, SIZES, **kw)


def test_shard_sequence_refuses_a_non_tensor_and_keeps_valid_calls():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got NoneType"):
        shard_sequence(None, 1, SIZES)
    with pytest.raises(TypeError, match="shard sizes must be a sequence of ints .*got 10"):
        shard_sequence(torch.zeros(1, 1, 10), 1, 10)
    x = torch.arange(10.0).reshape(1, 1, 10)
    assert shard_sequence(x, 1, SIZES).tolist() == [[[3.0, 4.0, 5.0]]]
    assert shard_sequence(x, 2, SIZES, dim=-1).tolist() == [[[6.0, 7.0, 8.0, 9.0]]]


@pytest.mark.parametrize(
    "rank, left, right, error, match",
    [
        (1, -5, 1, ValueError, "left must be >= 0, got -5"),
        (1, 1, -1, ValueError, "right must be >= 0, got -1"),
        (1, 2.5, 1, TypeError, "left must be an int, got float 2.5"),
        (1, 1, None, TypeError, "right must be an int, got NoneType None"),
        (5, 1, 1, ValueError, r"rank must be in \[0, 3\) for a layout of 3 shards, got 5"),
        (-1, 1, 1, ValueError, r"rank must be in \[0, 3\) for a layout of 3 shards, got -1"),
        ("0", 1, 1, TypeError, "rank must be an int, got str '0'"),
    ],
)
def test_halo_plan_and_layout_refuse_bad_rank_and_window(rank, left, right, error, match):
    """halo_plan's body is printed in the book, so the checks live in the ShardLayout methods it calls."""
    layout = ShardLayout(SIZES)
    with pytest.raises(error, match=match):
        halo_plan(layout, rank, left, right)
    with pytest.raises(error, match=match):
        layout.key_range(rank, left, right)


@pytest.mark.parametrize("rank", [5, 3, -1])
def test_layout_bounds_refuses_a_rank_outside_the_world(rank):
    with pytest.raises(ValueError, match=rf"rank must be in \[0, 3\) for a layout of 3 shards, got {rank}"):
        ShardLayout(SIZES).bounds(rank)
    assert [ShardLayout(SIZES).bounds(r) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


@pytest.mark.parametrize("layout", [(3, 3), [3, 3], None])
def test_halo_tokens_sent_needs_a_shard_layout(layout):
    with pytest.raises(TypeError, match="layout must be a ShardLayout, got"):
        halo_tokens_sent(layout, (1, 0))
