"""The book's figures fit the page column and keep their text legible (swa_lib.lab.plotting)."""

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.text import Text  # noqa: E402

import swa_lib  # noqa: E402
from swa_lib.lab import plotting  # noqa: E402
from swa_lib.lab import results  # noqa: E402


def _masks():
    return {f"({l}, {r})": swa_lib.window_mask(12, (l, r)) for l, r in [(1, 1), (2, 0), (0, 2), (3, 3)]}


def _heads():
    torch.manual_seed(0)
    mask = swa_lib.window_mask(10, (3, 0))
    scores = torch.randn(1, 4, 10, 10).masked_fill(~mask, float("-inf"))
    return [scores.softmax(-1), scores.softmax(-1)]


FIGURES = {
    "masks": lambda: plotting.plot_masks(_masks(), labels=[str(i) for i in range(12)]),
    "scaling": lambda: plotting.plot_scaling([16, 32, 64, 128], {"a": [1, 2, 4, 8], "b": [3, 3, 3, 3]},
                                             reference_slopes=(1, 2)),
    "receptive field": lambda: plotting.plot_receptive_field(np.random.rand(4, 30), window_text="(2, 0)"),
    "rolling buffer": lambda: plotting.plot_rolling_buffer(4, [1, 4, 7]),
    "decode bench": lambda: plotting.plot_decode_bench(results.load("decode_bench")),
    "cpu bench": lambda: plotting.cpu_bench_figure(results.load("cpu_bench")),
    "reach growth": lambda: plotting.plot_reach_growth({"a": [3, 5, 7], "b": [3, 7, 11]}),
    "attention heads": lambda: plotting.plot_attention_heads(_heads()),
    "history": lambda: plotting.plot_history([(0, 3.0), (10, 2.0), (20, 1.5)]),
    "wide panels": lambda: plotting.new_figure(ncols=4, width=5.0, height=4.0)[0],
}


@pytest.mark.parametrize("name", FIGURES)
def test_figures_fit_the_column_and_their_text_is_at_least_9_points(name):
    fig = FIGURES[name]()
    try:
        fig.canvas.draw()
        tight = fig.get_tightbbox(fig.canvas.get_renderer())  # what bbox_inches="tight" saves
        assert tight.width <= plotting.COLUMN_WIDTH * 1.02, f"{name}: {tight.width:.2f} in wide"
        small = sorted({(t.get_text(), t.get_fontsize()) for t in fig.findobj(Text)
                        if t.get_visible() and t.get_text().strip() and t.get_fontsize() < 9})
        assert not small, f"{name}: text under 9 pt: {small[:5]}"
    finally:
        plt.close(fig)


def test_identical_curves_are_drawn_once_and_named_together():
    fig = plotting.plot_reach_growth({"dilation 2": [3, 7, 11], "schedule": [3, 7, 11], "plain": [3, 5, 7]})
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    plt.close(fig)
    assert labels == ["dilation 2 = schedule (analytic)", "plain (analytic)"]


def test_a_flat_fit_is_labelled_slope_0_not_minus_0():
    fig = plotting.plot_scaling([16, 32, 64], {"flat": [3.0, 3.0 * (1 - 1e-4), 3.0 * (1 - 2e-4)]})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)
    assert labels == ["flat (slope 0.00)"]


def test_near_zero_caches_are_named_instead_of_hidden_along_zero():
    data = results.load("decode_bench")
    fig = plotting.plot_decode_bench(data)
    texts = " ".join(t.get_text() for t in fig.axes[1].texts)
    plt.close(fig)
    assert "rolling" in texts and "recompute: none" in texts


def test_masked_attention_is_drawn_apart_from_zero_weight():
    maps = _heads()
    fig = plotting.plot_attention_heads(maps)
    shown = fig.axes[0].get_images()[0].get_array()
    plt.close(fig)
    expected_hidden = ~swa_lib.window_mask(10, (3, 0)).numpy()
    assert np.array_equal(np.ma.getmaskarray(shown), expected_hidden)


def test_mask_ticks_are_whole_positions_and_four_masks_make_two_rows():
    fig = plotting.plot_masks(_masks())
    fig.canvas.draw()
    ticks = [t for ax in fig.axes if ax.get_visible() for t in ax.get_xticks() if 0 <= t <= 11]
    shape = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    plt.close(fig)
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert shape == (2, 2)


def test_gpu_bench_figure_and_table_come_from_the_package():
    """Chapter 8 draws stored GPU results with installed code only (no benchmarks/ script)."""
    from swa_lib.lab.plotting import plot_gpu_bench
    from swa_lib.lab.report import gpu_bench_table

    methods = ["triton", "sdpa_band_mask"]
    rows = [dict(window=[256, 256], heads=h, heads_kv=h, mode=m, n=n, method=meth,
                 ms=None if meth == "sdpa_band_mask" and n > 4096 else 0.1 * n / 4096,
                 tflops=1.0, peak_gib=0.5, error=None)
            for h in (16,) for m in ("fwd", "fwd+bwd") for n in (4096, 8192, 16384)
            for meth in methods]
    data = dict(gpu="Test GPU", date="2026-01-01", torch="2.11", triton="3.6", rows=rows,
                dtype="bfloat16", batch=1, head_dim=128)
    fig = plot_gpu_bench(data)
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["window (256, 256), fwd", "window (256, 256), fwd+bwd"]
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert any(label.startswith("triton (slope") for label in labels)
    t = gpu_bench_table(data)
    assert t.title == "measured on Test GPU on 2026-01-01 (torch 2.11, triton 3.6)"
    assert sum(row[5] == "out of memory" for row in t.rows) == 4
    assert len(t.rows) == len(rows)


def test_cpu_bench_ticks_do_not_overlap():
    """Half-column panels label n in thousands (16k, 32k, 64k) so that the labels never collide."""
    fig = plotting.cpu_bench_figure(results.load("cpu_bench"))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
            assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in ax.get_xticklabels()]
    finally:
        plt.close(fig)
