"""Project-level consistency: packaging metadata, the conda environment, the book's config."""

import re
import tomllib
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_agrees_with_pyproject():
    project = _pyproject()["project"]
    wanted = {r.replace(" ", "") for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted |= {r.replace(" ", "") for r in extra}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_deps = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {d.replace(" ", "") for d in pip_deps if not d.startswith("-e")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"


def _pins() -> dict:
    """name -> list of (version, environment marker) from constraints.txt."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement, _, marker = line.partition(";")
            name, version = requirement.split("==")
            pins.setdefault(_name(name), []).append((version.strip(), marker.strip()))
    return pins


def test_constraints_pin_torch_and_cover_dependencies():
    pins = _pins()
    import torch

    # one pin for every platform, the version of the torch installed here: the public build
    # (2.x.y) and the CPU build (2.x.y+cpu) share it
    assert len(pins["torch"]) == 1 and pins["torch"][0][1] == "", pins["torch"]
    assert torch.__version__.split("+")[0] == pins["torch"][0][0]
    project = _pyproject()["project"]
    for req in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
        assert _name(req) in pins, f"{req} is not pinned in constraints.txt"


def test_torch_lower_bound_is_loose():
    deps = _pyproject()["project"]["dependencies"]
    torch_req = next(d for d in deps if _name(d) == "torch")
    assert "==" not in torch_req and "<" not in torch_req, torch_req


def test_jupyter_book_is_version_1():
    book = _pyproject()["project"]["optional-dependencies"]["book"]
    assert any(r.replace(" ", "") == "jupyter-book>=1.0.4,<2" for r in book)


def _config():
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def _chapters():
    return sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def test_book_config():
    cfg = _config()
    assert cfg["repository"]["branch"] == "main"
    assert cfg["only_build_toc_files"] is True
    assert cfg["sphinx"]["recursive_update"] is True
    assert "colab_url" in cfg["launch_buttons"]


def test_every_chapter_is_in_the_toc_and_vice_versa():
    toc = (ROOT / "_toc.yml").read_text()
    listed = set(re.findall(r"file:\s*(book/\d\d_[\w]+)", toc))
    on_disk = {f"book/{p.stem}" for p in _chapters()}
    assert listed == on_disk


#: Words of the project's own process, which mean nothing to a reader of the book.
INTERNAL_WORDS = re.compile(r"syllabus|content contract|STYLE\.md|DESIGN\.md|the issue's|targets \(|targets:", re.I)


def _assert_reader_words(name: str, texts: list) -> None:
    found = [m.group(0) for t in texts for m in INTERNAL_WORDS.finditer(t if isinstance(t, str) else "".join(t))]
    assert not found, f"{name} shows readers internal words: {found}"


def test_reader_pages_use_reader_words():
    for page in sorted((ROOT / "book").glob("*.md")):
        _assert_reader_words(page.name, [page.read_text()])


@pytest.mark.parametrize("path", _chapters(), ids=lambda p: p.name)
def test_chapter_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3", "a kernelspec makes launch buttons appear"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "title first"
    setup = nb.cells[1].source
    url = _config()["repository"]["url"]
    assert f"git+{url}.git" in setup, "the set-up cell must install from the repository URL in _config.yml"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code_cells), "commit chapters executed (nbval checks outputs)"
    assert not any(o.get("output_type") == "error" for c in code_cells for o in c.get("outputs", []))
    for cell in code_cells:  # readers see comments: nbval is steered by cell tags only
        assert "NBVAL_" not in cell.source, cell.source.splitlines()[0]
    # 88 columns fit the page column at 1280 px (the browser test measures it; this finds it fast)
    wide = [line for c in code_cells for line in c.source.splitlines() if len(line) > 88]
    assert not wide, f"code lines over 88 columns scroll sideways on the page: {wide}"
    _assert_reader_words(path.name, [c.source for c in nb.cells]
                         + [o.get("text", "") for c in code_cells for o in c.get("outputs", [])])
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "## Exercises" in text and ":class: dropdown" in text


def test_readme_has_exactly_the_two_commands_first():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["python3 dev.py book", "python3 dev.py test"]
    assert _config()["repository"]["url"] in readme


def test_constraints_agree_with_what_the_pinned_torch_requires():
    """The public torch wheel (the CUDA build on Linux) pins an exact triton: a different triton
    pin makes the install unresolvable from the public index (the CPU build pins none, so the
    installed triton, which pip chose under the pin, must be the pinned one)."""
    from importlib import metadata

    pins = _pins()
    assert len(pins["triton"]) == 1 and pins["triton"][0][1] == 'sys_platform == "linux"', \
        "one triton pin, for Linux only: Triton publishes Linux wheels only"
    version = pins["triton"][0][0]
    for req in metadata.requires("torch") or []:
        if _name(req) == "triton" and "extra ==" not in req:
            assert f"=={version}" in req.replace(" ", ""), req
    try:
        assert metadata.version("triton") == version
    except metadata.PackageNotFoundError:
        pass  # not installed here (not Linux): nothing to compare


def test_pins_with_a_newer_python_floor_have_an_alternative():
    """soupsieve 4.1.2 needs Python >= 3.11.5; Debian 12's python3 is 3.11.2."""
    markers = [m for _, m in _pins()["soupsieve"]]
    assert sorted(markers) == ['python_full_version < "3.11.5"', 'python_full_version >= "3.11.5"']


def test_the_test_command_never_escalates_privileges(monkeypatch):
    """dev.py installs nothing into the system; tools/chromium.py refuses to apt-get unless root."""
    import sys

    import ast

    tree = ast.parse((ROOT / "dev.py").read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef)) and n.body and isinstance(n.body[0], ast.Expr)}
    strings = [n.value for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]
    assert not [s for s in strings if "sudo" in s or "apt-get" in s or "apt " in s]
    sys.path.insert(0, str(ROOT / "tools"))
    import chromium

    monkeypatch.setattr(chromium.os, "geteuid", lambda: 1000, raising=False)
    monkeypatch.setattr(chromium.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(chromium.subprocess, "call", lambda *a, **k: pytest.fail(f"ran {a}"))
    ok, message = chromium.install()
    assert not ok and "sudo apt-get install" in message


def test_readme_states_the_python_versions_dev_py_accepts():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    low = "%d.%d" % dev.MIN_PYTHON
    assert f"Python {low}, 3.12 or 3.13" in (ROOT / "README.md").read_text()
    assert _pyproject()["project"]["requires-python"] == ">=3.10"  # the library alone
