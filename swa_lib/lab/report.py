"""Printing checked results in the chapters so that the printed text is the same on every machine.

Two runs of the same float computation on different CPUs (another BLAS code path, another thread
count) agree only to rounding, so a chapter that prints ``max error = 4.8e-07`` prints other digits
elsewhere. The chapters print the claim instead: :func:`below` returns ``"< 1e-05"`` when the error
is below the bound and raises when it is not (:func:`above` is its mirror), so the check is made
on every run and the printed text does not depend on the last bits.

:func:`show_source` shows a function's source in a chapter as a highlighted code block, and
:func:`table` shows rows of results as a table (rendered on the page, aligned text elsewhere);
:func:`extension_costs` is the table chapters 6 and 7 show from the stored CPU benchmark.
"""

from __future__ import annotations

import inspect
import math
import textwrap

import torch

__all__ = ["above", "below", "extension_costs", "extension_rows", "gpu_bench_table", "max_error", "show_source",
           "Source", "table", "Table"]


def max_error(a, b) -> float:
    """``max |a - b|`` over all elements, as a Python float (NaN if either side has a NaN)."""
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    diff = (a.double() - b.double()).abs()
    return math.nan if bool(diff.isnan().any()) else float(diff.max())


def below(err, bound: float) -> str:
    """``"< bound"`` for printing, after checking that ``err < bound``.

    ``err`` is a number or a tensor (its largest element is taken). Raises ``AssertionError``
    naming both values when the error is not below the bound (a NaN error never is).
    """
    value = _checked(err, bound, largest=True)
    if not value < bound:
        raise AssertionError(f"error {value:.3g} is not below the bound {bound:g}")
    return f"< {bound:g}"


def above(value, bound: float) -> str:
    """``"> bound"`` for printing, after checking that ``value > bound`` (the mirror of :func:`below`;
    of a tensor its smallest element is taken)."""
    value = _checked(value, bound, largest=False)
    if not value > bound:
        raise AssertionError(f"value {value:.3g} is not above the bound {bound:g}")
    return f"> {bound:g}"


def _checked(x, bound, *, largest: bool) -> float:
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
        raise ValueError(f"bound must be a positive number, got {bound!r}")
    if torch.is_tensor(x):
        x = x.detach().max() if largest else x.detach().min()
    return float(x)


class Source:
    """Source code for display: a highlighted Python block in a notebook or on the book's
    pages (Markdown output with a fenced block), the plain text everywhere else."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        fence = "```"
        while fence in self.text:
            fence += "`"
        return f"{fence}python\n{self.text}\n{fence}\n"


def show_source(obj) -> Source:
    """The source of a function, class or method, dedented, for a chapter to display.

    Triton kernels are shown through their Python function (``kernel.fn``).
    """
    return Source(textwrap.dedent(inspect.getsource(obj)).rstrip("\n"))


class Table:
    """Rows of results for display: a Markdown table in a notebook and on the book's pages,
    aligned plain text everywhere else (a terminal, and nbval, which compares the text)."""

    def __init__(self, header, rows, align: str | None = None, title: str | None = None):
        self.title = title
        self.header = [str(h) for h in header]
        self.rows = [["" if c is None else str(c) for c in row] for row in rows]
        for row in self.rows:
            if len(row) != len(self.header):
                raise ValueError(
                    f"a row has {len(row)} cells, the header {len(self.header)}: {row}"
                )
        if align is None:  # numbers right, words left
            align = "".join(
                "r" if self.rows and all(_numeric(row[i]) for row in self.rows) else "l"
                for i in range(len(self.header))
            )
        if len(align) != len(self.header) or set(align) - set("lrc"):
            raise ValueError(f"align needs one of l, r, c per column, got {align!r}")
        self.align = align

    def __repr__(self) -> str:
        widths = [
            max([len(h)] + [len(row[i]) for row in self.rows]) for i, h in enumerate(self.header)
        ]
        pad = {"l": str.ljust, "r": str.rjust, "c": str.center}

        def line(cells):
            return "  ".join(pad[a](c, wd) for a, c, wd in zip(self.align, cells, widths)).rstrip()

        rule = "  ".join("-" * wd for wd in widths)
        head = [self.title] if self.title else []
        return "\n".join(head + [line(self.header), rule] + [line(row) for row in self.rows])

    def _repr_markdown_(self) -> str:
        rule = {"l": ":---", "r": "---:", "c": ":---:"}

        def line(cells):
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        head = [self.title, ""] if self.title else []
        return "\n".join(
            head + [line(self.header), "|" + "|".join(rule[a] for a in self.align) + "|"]
            + [line(row) for row in self.rows]
        ) + "\n"


def table(header, rows, align: str | None = None, title: str | None = None) -> Table:
    """A table of ``rows`` (sequences of cells, formatted with ``str``; ``None`` is an empty cell)
    under ``header``, for a chapter to display.

    ``align`` has one letter per column, ``l``, ``r`` or ``c``; by default a column whose cells
    are all numbers is right-aligned and any other column left-aligned. ``title``, if given, is a
    line of text above the table.
    """
    return Table(header, rows, align, title)


def _numeric(cell: str) -> bool:
    text = cell.replace(",", "").replace("_", "").strip().rstrip("x%")
    try:
        float(text)
    except ValueError:
        return cell.strip() in {"", "-"}
    return True


def extension_rows(case: str) -> list:
    """The stored CPU benchmark's runs of one extension (``benchmarks/cpu.py --extensions``): for
    every thread count and backend, a dict with ``threads``, ``peer``, ``case`` (the row whose
    case starts with ``case``: ``"+16"`` for global tokens, ``"dilation"``), ``plain_s`` (the plain
    window, same run), ``with_s`` and ``cpu`` (the machine that made them)."""
    from . import results  # the stored results; loaded only when a chapter asks

    found = []
    for run in results.load("cpu_bench")["extensions"]:
        base = {r["peer"]: r["time_s"] for r in run["rows"] if r["case"].startswith("plain")}
        found += [dict(threads=run["machine"]["torch_threads"], peer=r["peer"], case=r["case"],
                       plain_s=base[r["peer"]], with_s=r["time_s"], cpu=run["machine"]["cpu"])
                  for r in run["rows"] if r["case"].startswith(case)]
    if not found:
        raise KeyError(f"no stored extension case starts with {case!r}")
    return found


def extension_costs(case: str) -> Table:
    """:func:`extension_rows` as a table: per thread count and backend, the plain window against
    the extension, their ratio and the extra time. The machine that made the numbers is in the
    title."""
    found = extension_rows(case)
    rows = [[r["threads"], r["peer"], r["case"], f"{r['plain_s'] * 1e3:.0f}", f"{r['with_s'] * 1e3:.0f}",
             f"{r['with_s'] / r['plain_s']:.2f}x", f"{(r['with_s'] - r['plain_s']) * 1e3:+.0f}"] for r in found]
    title = "stored run: " + "; ".join(sorted({r["cpu"] for r in found})) + ", N = 16384, window (256, 256)"
    return Table(["threads", "backend", "case", "plain ms", "with it ms", "ratio", "extra ms"], rows,
                 title=title)


def gpu_bench_table(data: dict) -> Table:
    """The rows of a stored GPU benchmark (``gpu_bench.json``) as a table: time, useful
    TFLOP/s and peak memory per window, heads, mode, N and method; a method that ran out of
    memory or failed says so instead of a time."""

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    rows = [
        ["({}, {})".format(*r["window"]), f"{r['heads']} / {r['heads_kv']}", r["mode"],
         f"{r['n']:,}", r["method"],
         ("error" if r.get("error") else "out of memory") if r["ms"] is None else f"{r['ms']:.3f}",
         cell(r["tflops"], ".1f"), cell(r["peak_gib"], ".2f")]
        for r in data["rows"]
    ]
    header = ["window", "H / H_kv", "mode", "N", "method", "ms", "TFLOP/s", "peak GiB"]
    title = (f"measured on {data['gpu']} on {data['date']} "
             f"(torch {data['torch']}, triton {data['triton']})")
    return Table(header, rows, title=title)
