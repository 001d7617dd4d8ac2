#!/usr/bin/env python3
"""Turn a percent-format script (``# %%`` / ``# %% [markdown]`` cells) into a chapter notebook.

    .venv/bin/python tools/new_chapter.py SCRIPT.py book/NN_topic.ipynb

The notebook gets the book's kernelspec and, as its first cell, the standard set-up cell that
installs swa_lib from the repository when it is not importable (Colab). Then execute it with
``python3 dev.py execute book/NN_topic.ipynb`` so its outputs are stored for nbval.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent


def setup_cell(triton_interpreter: bool = False) -> str:
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    lines = [
        "# Set-up: on Colab (or anywhere swa_lib is not installed) install it from the repository.",
    ]
    if triton_interpreter:
        lines += [
            "# Without a GPU, Triton kernels run in Triton's CPU interpreter; this must be set",
            "# before triton is first imported.",
            "import os",
            "import torch",
            "if not torch.cuda.is_available():",
            '    os.environ["TRITON_INTERPRET"] = "1"',
        ]
    lines += [
        "import importlib.util, subprocess, sys",
        'if importlib.util.find_spec("swa_lib") is None:',
        f'    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "swa_lib[lab] @ git+{url}.git"])',
    ]
    return "\n".join(lines)


def parse_percent(text: str) -> list:
    cells = []
    chunks = re.split(r"^# %%(.*)$", text, flags=re.M)
    # chunks: [preamble, header1, body1, header2, body2, ...]
    for header, body in zip(chunks[1::2], chunks[2::2]):
        body = body.strip("\n")
        if "[markdown]" in header:
            md = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(md))
        else:
            cell = nbformat.v4.new_code_cell(body)
            tags = re.findall(r"tags=\[([^\]]*)\]", header)
            if tags:
                cell.metadata["tags"] = [t.strip().strip("\"'") for t in tags[0].split(",") if t.strip()]
            cells.append(cell)
    return cells


def main(src: str, dst: str, triton_interpreter: bool = False) -> None:
    text = Path(src).read_text()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    cells = parse_percent(text)
    first = nbformat.v4.new_code_cell(setup_cell(triton_interpreter))
    first.metadata["tags"] = ["remove-output", "hide-input"]
    # The title (a markdown cell starting with "# ") stays first; the set-up cell follows it.
    if cells and cells[0].cell_type == "markdown":
        nb.cells = [cells[0], first, *cells[1:]]
    else:
        nb.cells = [first, *cells]
    nbformat.write(nb, dst)
    print("wrote", dst)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args[0], args[1], triton_interpreter="--triton" in sys.argv)
