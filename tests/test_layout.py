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
