#!/usr/bin/env python3
"""The two README commands, and a helper for authors.

    python3 dev.py book      build the book into _build/html (creates .venv on first use)
    python3 dev.py test      pytest on swa_lib + nbval on every chapter notebook
    python3 dev.py portability
                             nbval on every chapter and the retrained sinks demo again, on
                             another numerical code path (what another CPU does; CI runs it)
    python3 dev.py execute [NOTEBOOK ...]
                             re-execute chapter notebooks in place (refresh stored outputs)

Only the Python standard library is used here, so this runs on a fresh machine with Python
3.11 to 3.13. Everything else is installed into .venv from constraints.txt (pinned versions).
Nothing here asks for privileges: system packages (Chromium for the site test) are .ci/run's job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

MIN_PYTHON = (3, 11)  # the pins in constraints.txt (numpy 2.4, IPython 9) need 3.11+
ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".swa_lib_installed"
EXTRAS = "lab,book,test,triton"
# Another numerical code path on the same machine: MKL's CPU-independent kernels and ATen's
# unvectorised ones, one thread. Results move in their last bits, as they do on another CPU.
OTHER_NUMERICS = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
# the retrained findings, and the low-precision error rules that compare with PyTorch on this CPU
PORTABILITY_TESTS = ["tests/test_sinks.py", "tests/test_reference_dense.py", "tests/test_backends_agree.py"]


def run(*cmd: str, env: dict | None = None) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


def ensure_venv() -> None:
    """Create .venv and install the pinned dependencies when they changed."""
    if sys.version_info < MIN_PYTHON:
        sys.exit(f"dev.py needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer for the pinned versions in "
                 f"constraints.txt; this is {sys.version.split()[0]} ({sys.executable})")
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


TRITON_CHAPTERS = ("book/08_triton_kernel.ipynb",)


def checkable_chapters() -> list[str]:
    """Every chapter, less the Triton chapter where Triton is not installed (no macOS/Windows wheels)."""
    has_triton = subprocess.call([str(PY), "-c", "import triton"], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0
    if has_triton:
        return chapters()
    print(f"triton: not installed on {sys.platform}, so {', '.join(TRITON_CHAPTERS)} is not checked", flush=True)
    return [c for c in chapters() if c not in TRITON_CHAPTERS]


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
    jb = BIN / "jupyter-book"
    rc = run(str(jb), "build", ".", "--warningiserror", "--keep-going")
    if rc == 0:
        print(f"\nThe book is at {ROOT / '_build' / 'html' / 'index.html'}")
    return rc


def _test_env() -> dict:
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("MPLBACKEND", None)  # notebooks must use the inline backend so figures are stored
    return env


def _pytest_command(paths: list[str], extra: list[str]) -> list[str]:
    return [str(PY), "-m", "pytest", *paths,
            "--nbval", "--nbval-current-env", "--nbval-sanitize-with", "book/nbval_sanitize.cfg",
            "-p", "no:cacheprovider", *extra]


def _pytest(paths: list[str], extra: list[str], env: dict) -> int:
    return run(*_pytest_command(paths, extra), env=env)


def _pytest_in_parallel(groups: list[list[str]], extra: list[str], env: dict) -> int:
    """One pytest process per group at once (each one-threaded), their output printed in turn."""
    import tempfile

    procs = []
    for paths in groups:
        log = tempfile.TemporaryFile(mode="w+")
        cmd = _pytest_command(paths, extra)
        print("+", " ".join(cmd), "&", flush=True)
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    status = 0
    for proc, log in procs:
        rc = proc.wait()
        log.seek(0)
        sys.stdout.write(log.read())
        sys.stdout.flush()
        status = status or rc
    return status


def test(extra: list[str]) -> int:
    ensure_venv()
    # The site test drives headless Chromium if it is installed; this command never installs it.
    sys.path.insert(0, str(ROOT / "tools"))
    import chromium

    found = chromium.find()
    print("chromium:", f"found {found[0]} and {found[1]}" if found else
          "not found, so the browser checks of the site will skip (they fail instead when CI is set)", flush=True)
    return _pytest(["tests", *checkable_chapters()], extra, _test_env())


def portability(extra: list[str]) -> int:
    """The chapters and the retrained findings once more, on another numerical code path.

    Everything here runs on one thread (OTHER_NUMERICS), so two pytest processes share the
    work: the tests (mostly retraining the sinks demo) in one, the chapters in the other, which
    take about as long."""
    ensure_venv()
    env = dict(_test_env(), **OTHER_NUMERICS)
    print("numerics:", " ".join(f"{k}={v}" for k, v in OTHER_NUMERICS.items()), flush=True)
    return _pytest_in_parallel([PORTABILITY_TESTS, checkable_chapters()], extra, env)


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
    return run(str(PY), "-c", code, *(paths or chapters()), env=_test_env())


def main(argv: list[str]) -> int:
    commands = {"book": lambda _: book(), "test": test, "portability": portability, "execute": execute}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
