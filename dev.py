#!/usr/bin/env python3
"""The two README commands, and a helper for authors.

    python3 dev.py book      build the book into _build/html (creates .venv on first use)
    python3 dev.py test      pytest on swa_lib + nbval on every chapter notebook
    python3 dev.py execute [NOTEBOOK ...]
                             re-execute chapter notebooks in place (refresh stored outputs)

Only the Python standard library is used here, so this runs on a fresh machine with Python
3.10+. Everything else is installed into .venv from constraints.txt (pinned versions; torch is
pinned to the CPU build).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".swa_lib_installed"
EXTRAS = "book,test,triton"


def run(*cmd: str, env: dict | None = None) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


def ensure_venv() -> None:
    """Create .venv and install the pinned dependencies when they changed."""
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    wanted = (ROOT / "constraints.txt").read_text() + (ROOT / "pyproject.toml").read_text()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    rc = run(str(PY), "-m", "pip", "install", "-q", "-c", "constraints.txt", "-e", f".[{EXTRAS}]")
    if rc != 0:
        sys.exit(rc)
    rc = run(str(PY), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3")
    if rc != 0:
        sys.exit(rc)
    STAMP.write_text(wanted)


def chapters() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def unexecuted_chapters() -> list[str]:
    """Chapters with a code cell that has never been run (no execution count)."""
    import json

    stale = []
    for path in chapters():
        cells = json.loads((ROOT / path).read_text())["cells"]
        if any(c["cell_type"] == "code" and not c.get("execution_count") for c in cells):
            stale.append(path)
    return stale


def book() -> int:
    ensure_venv()
    stale = unexecuted_chapters()
    if stale:
        rc = execute(stale)
        if rc != 0:
            return rc
    jb = VENV / "bin" / "jupyter-book"
    rc = run(str(jb), "build", ".", "--warningiserror", "--keep-going")
    if rc == 0:
        print(f"\nThe book is at {ROOT / '_build' / 'html' / 'index.html'}")
    return rc


def test(extra: list[str]) -> int:
    ensure_venv()
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("MPLBACKEND", None)  # notebooks must use the inline backend so figures are stored
    # The site test drives headless Chromium: find it, or install Debian's packages.
    sys.path.insert(0, str(ROOT / "tools"))
    import chromium

    ok, message = chromium.ensure()
    print(f"chromium: {message}", flush=True)
    env["SWA_REQUIRE_BROWSER"] = "1" if ok else "0"
    return run(
        str(PY), "-m", "pytest", "tests", *chapters(),
        "--nbval", "--nbval-current-env", "--nbval-sanitize-with", "book/nbval_sanitize.cfg",
        "-p", "no:cacheprovider", *extra, env=env,
    )


def execute(paths: list[str]) -> int:
    ensure_venv()
    code = (
        "import sys, nbformat\n"
        "from nbclient import NotebookClient\n"
        "for path in sys.argv[1:]:\n"
        "    nb = nbformat.read(path, as_version=4)\n"
        "    NotebookClient(nb, timeout=900, kernel_name='python3',\n"
        "                   resources={'metadata': {'path': 'book'}}).execute()\n"
        "    nbformat.write(nb, path)\n"
        "    print('executed', path, flush=True)\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("MPLBACKEND", None)  # notebooks must use the inline backend so figures are stored
    return run(str(PY), "-c", code, *(paths or chapters()), env=env)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"book", "test", "execute"}:
        print(__doc__)
        return 2
    if argv[0] == "book":
        return book()
    if argv[0] == "test":
        return test(argv[1:])
    return execute(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
