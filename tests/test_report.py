"""swa_lib.lab.report: the chapters print checked bounds, so the bound must really be checked."""

import math

import pytest
import torch

from swa_lib.lab.report import Source, above, below, extension_costs, max_error, show_source, table


def test_max_error():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert max_error(a, a) == 0.0
    assert max_error(a, a + torch.tensor([0.0, -0.5, 0.25])) == 0.5
    assert max_error(torch.empty(0, 3), torch.empty(0, 3)) == 0.0
    assert math.isnan(max_error(a, torch.tensor([1.0, float("nan"), 3.0])))
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        max_error(a, a[:2])


def test_below_and_above_print_the_bound_and_check_it():
    assert below(4.8e-7, 1e-5) == "< 1e-05"
    assert below(torch.tensor([1e-9, 3e-6]), 1e-5) == "< 1e-05"
    assert above(0.7, 0.1) == "> 0.1"
    with pytest.raises(AssertionError, match="2e-05 is not below the bound 1e-05"):
        below(2e-5, 1e-5)
    with pytest.raises(AssertionError, match="not below"):
        below(float("nan"), 1.0)
    with pytest.raises(AssertionError, match="not above"):
        above(torch.tensor([0.5, 0.05]), 0.1)
    with pytest.raises(ValueError, match="bound must be a positive number, got -1"):
        below(0.0, -1)


def test_show_source_is_a_python_block_and_plain_text():
    class Holder:
        def method(self):
            return "```"  # a fence inside the code

    shown = show_source(Holder.method)
    assert repr(shown).startswith("def method(self):")  # dedented
    md = shown._repr_markdown_()
    assert md.startswith("````python\ndef method(self):") and md.rstrip().endswith("````")
    assert Source("x = 1")._repr_markdown_() == "```python\nx = 1\n```\n"


def test_table_is_markdown_on_the_page_and_aligned_text_for_nbval():
    shown = table(["method", "n", "ms"], [["blocked", 1024, "35.9"], ["a|b", None, "-"]])
    assert shown.align == "lrr"  # numbers (and empty or "-" cells) right, words left
    assert shown._repr_markdown_() == (
        "| method | n | ms |\n|:---|---:|---:|\n| blocked | 1024 | 35.9 |\n| a\\|b |  | - |\n"
    )
    assert repr(shown).splitlines() == [
        "method      n    ms",
        "-------  ----  ----",
        "blocked  1024  35.9",
        "a|b               -",
    ]
    assert table(["x"], [["1"]], align="c").align == "c"
    with pytest.raises(ValueError, match="a row has 1 cells, the header 2"):
        table(["a", "b"], [["only one"]])
    with pytest.raises(ValueError, match="one of l, r, c per column"):
        table(["a", "b"], [["1", "2"]], align="rx")



def test_table_title_is_a_line_above_it():
    t = table(["a", "b"], [[1, "x"]], title="stored run: some CPU")
    assert repr(t).splitlines()[0] == "stored run: some CPU"
    assert t._repr_markdown_().startswith("stored run: some CPU\n\n| a | b |")


def test_extension_costs_are_the_stored_ratios():
    from swa_lib.lab import results

    runs = results.load("cpu_bench")["extensions"]
    t = extension_costs("dilation")
    assert t.title.startswith("stored run: " + runs[0]["machine"]["cpu"])
    assert {row[0] for row in t.rows} == {str(run["machine"]["torch_threads"]) for run in runs}
    for run in runs:
        times = {(r["peer"], r["case"]): r["time_s"] for r in run["rows"]}
        mine = [row for row in t.rows if row[0] == str(run["machine"]["torch_threads"])]
        assert {row[1] for row in mine} == {"blocked", "chunked"}
        for threads, peer, case, plain, with_it, ratio, extra in mine:
            expected = times[(peer, case)] / times[(peer, "plain (256,256)")]
            assert ratio == f"{expected:.2f}x"
    with pytest.raises(KeyError, match="no stored extension case starts with 'nothing'"):
        extension_costs("nothing")
