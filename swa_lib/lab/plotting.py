"""Every figure in the book, drawn the same way.

Rules: opaque white backgrounds so figures read in dark mode, labelled axes with
units, a colour-blind-safe palette (Okabe & Ito 2008), and sizes that draw in well under a
second on a CPU. Every figure is at most :data:`COLUMN_WIDTH` wide, so the page shows it at
full size and its text (9 pt and up) stays legible; legends sit outside the data. Functions
return the matplotlib Figure so notebooks can display or save it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import matplotlib

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap, PowerNorm
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from ..kv_cache import RollingKVCache

__all__ = [
    "PALETTE",
    "COLUMN_WIDTH",
    "new_figure",
    "plot_mask",
    "plot_masks",
    "plot_scaling",
    "fit_loglog_slope",
    "plot_receptive_field",
    "plot_rolling_buffer",
    "plot_decode_bench",
    "plot_gpu_bench",
    "plot_reach_growth",
    "plot_attention_heads",
    "plot_history",
]

#: Okabe-Ito colours: distinguishable with the common forms of colour blindness.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]

_MASK_CMAP = ListedColormap(["#F2F2F2", "#0072B2"])  # hidden, visible

#: Width in inches of the book's text column at the 100 dpi figures are drawn at (the page
#: column is about 730 px wide at a 1280 px window): a figure no wider is never scaled down.
COLUMN_WIDTH = 7.2
_MIN_FONT = 9  # points; the smallest text a figure draws


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 4.0, **kwargs):
    """A figure with an opaque white background and the book's default size per panel.

    Panels that would make the figure wider than :data:`COLUMN_WIDTH` are shrunk (height too,
    keeping their shape) so the page never scales the figure, and its text, down.
    """
    if width * ncols > COLUMN_WIDTH:
        shrink = COLUMN_WIDTH / (width * ncols)
        width, height = width * shrink, height * shrink
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), facecolor="white", squeeze=False, **kwargs
    )
    for ax in axes.flat:
        ax.set_facecolor("white")
    return fig, (axes[0, 0] if nrows == ncols == 1 else axes)


def plot_mask(
    mask: torch.Tensor,
    ax=None,
    *,
    title: str = "",
    labels: Optional[Sequence[str]] = None,
    grid: bool = True,
):
    """Draw a boolean (n_q, n_k) attention mask: rows are queries, columns are keys."""
    m = mask.detach().to("cpu").numpy().astype(float)
    if ax is None:
        size = min(6.0, 1.5 + 0.3 * max(m.shape))
        fig, ax = new_figure(width=size, height=size)
    else:
        fig = ax.figure
    ax.imshow(m, cmap=_MASK_CMAP, vmin=0, vmax=1, interpolation="nearest")
    n_q, n_k = m.shape
    if grid and max(n_q, n_k) <= 40:
        ax.set_xticks(np.arange(-0.5, n_k, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n_q, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(which="minor", length=0)
    if labels is not None:
        ax.set_xticks(range(n_k), labels[-n_k:], rotation=90 if max(len(s) for s in labels) > 2 else 0)
        ax.set_yticks(range(n_q), labels[-n_q:])
    else:  # positions are whole numbers, few enough that their labels never touch
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    if title:
        ax.set_title(title)
    return fig


def plot_masks(masks: dict, *, labels: Optional[Sequence[str]] = None, width: float = 3.6,
               ncols: int = 3):
    """Several masks, titled by the dict keys, ``ncols`` to a row (default 3, so each panel
    stays large enough for its labels in the column)."""
    nrows = -(-len(masks) // max(1, ncols))
    ncols = -(-len(masks) // nrows)  # balanced rows: 4 masks as 2 x 2, not 3 + 1
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=width, height=width)
    axes = np.atleast_1d(axes).ravel()
    for ax in axes[len(masks):]:
        ax.set_visible(False)
    for ax, (title, mask) in zip(axes, masks.items()):
        plot_mask(mask, ax, title=title, labels=labels)
    fig.tight_layout()
    return fig


def fit_loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): the exponent p in y ~ x^p."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    return float(np.polyfit(lx, ly, 1)[0])


def plot_scaling(
    x: Sequence[float],
    series: dict,
    *,
    xlabel: str = "sequence length n (tokens)",
    ylabel: str = "time (ms)",
    title: str = "",
    ax=None,
    slopes: bool = True,
    reference_slopes: Sequence[int] = (),
):
    """Log-log plot of one or more measured series against n, with fitted slopes in the legend.

    ``series`` maps a label to a list of y values (None where not measured).
    """
    if ax is None:
        fig, ax = new_figure(width=6, height=4.2)
    else:
        fig = ax.figure
    for color, (label, ys) in zip(PALETTE, series.items()):
        pts = [(a, b) for a, b in zip(x, ys) if b is not None and b > 0]
        if not pts:
            continue
        xs, vs = zip(*pts)
        if slopes and len(pts) >= 3:
            slope = round(fit_loglog_slope(xs, vs), 2) + 0.0  # + 0.0: never "-0.00"
            label = f"{label} (slope {slope:.2f})"
        ax.loglog(xs, vs, "o-", color=color, label=label)
    for p, style in zip(reference_slopes, (":", "--")):
        x0, x1 = x[0], x[-1]
        ys = [b for s in series.values() for b in s if b is not None and b > 0]
        y0 = min(ys)
        ax.loglog([x0, x1], [y0, y0 * (x1 / x0) ** p], style, color="grey", label=f"slope {p} guide")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    # The measured lengths label the x axis (log axes over a decade or two otherwise label
    # minor ticks too, and those overlap); on y, minor labels only where no decade is shown.
    xs_all = sorted({v for v in x if v and v > 0})
    if 2 <= len(xs_all) <= 10:
        ax.set_xticks(xs_all, [f"{v:,.0f}" if v >= 1 else f"{v:g}" for v in xs_all])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lo, hi = ax.get_ylim()
    if hi / lo > 10:
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)
    _legend_below(ax)
    return fig


def _legend_below(ax, ncol: int = 1):
    """The legend under the axes, outside the data."""
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol,
              fontsize=_MIN_FONT)


def plot_receptive_field(influence: np.ndarray, *, window_text: str = "", ax=None):
    """Heat map: rows = number of layers, columns = input position; value = |gradient| (log)."""
    if ax is None:
        fig, ax = new_figure(width=7, height=3.2)
    else:
        fig = ax.figure
    data = np.asarray(influence, float)
    shown = np.where(data > 0, np.log10(np.maximum(data, 1e-30)), np.nan)
    im = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("input position")
    ax.set_ylabel("number of layers L")
    ax.set_yticks(range(data.shape[0]), [str(i + 1) for i in range(data.shape[0])])
    fig.colorbar(im, ax=ax, label="log10 |d out[last] / d x[pos]|")
    if window_text:
        ax.set_title(window_text)
    return fig


def plot_rolling_buffer(window: int, steps, *, ax=None):
    """Draw which position sits in each slot of a rolling buffer after each of ``steps`` writes.

    One row per step (token count), one column per slot; the slot written last is outlined.
    """
    steps = list(steps)
    if ax is None:
        fig, ax = new_figure(width=0.8 * window + 2.6, height=0.45 * len(steps) + 1.4)
    else:
        fig = ax.figure
    cache = RollingKVCache(1, 1, window, 1)  # only its slot bookkeeping is used
    ax.set_xlim(-0.5, window - 0.5)
    ax.set_ylim(len(steps) - 0.5, -0.5)
    for row, seen in enumerate(steps):
        cache.seen = seen
        for slot, p in enumerate(cache.slots()):
            wrapped = p >= window
            color = "#F2F2F2" if p < 0 else (PALETTE[1] if wrapped else PALETTE[5])
            last = p == seen - 1
            ax.add_patch(Rectangle((slot - 0.45, row - 0.4), 0.9, 0.8, facecolor=color,
                                   edgecolor="black" if last else "white", linewidth=2 if last else 0.5))
            if p >= 0:
                ax.text(slot, row, str(p), ha="center", va="center", fontsize=_MIN_FONT)
    ax.set_xticks(range(window))
    ax.set_yticks(range(len(steps)), [f"after {s}" for s in steps])
    ax.set_xlabel("slot (position p goes to slot p mod W)")
    ax.set_title(f"rolling buffer, W = {window}\n(orange: overwrote an older token)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_decode_bench(data: dict):
    """Decode speed and cache memory against generated length, from ``decode_bench.json``.

    Caches too small to see next to the full cache are named in a note with their sizes, so
    no line lies hidden along zero."""
    fig, axes = new_figure(nrows=2, width=COLUMN_WIDTH, height=2.6, sharex=True)
    ax1, ax2 = axes[0, 0], axes[1, 0]
    peak = max(r["cache_bytes"] for recs in data["results"].values() for r in recs) / 2**20
    flat = []
    for color, (name, recs) in zip(PALETTE, data["results"].items()):
        n = [r["tokens"] for r in recs]
        mib = [r["cache_bytes"] / 2**20 for r in recs]
        ax1.plot(n, [r["tokens_per_s"] for r in recs], "o-", color=color, label=name, markersize=3)
        ax2.plot(n, mib, "o-", color=color, markersize=3)
        if max(mib) < 0.03 * peak:
            flat.append(f"{name}: {max(mib):.2g} MiB" if max(mib) > 0 else f"{name}: none")
    ax1.set_ylabel("decode speed\n(tokens/s)")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    m = data["model"]
    ax1.set_title(f"TinyLM decode (width {m['dim']}, {m['layers']} layers), W = {data['window']}, batch 1, CPU")
    ax2.set_xlabel("tokens generated")
    ax2.set_ylabel("KV cache memory\n(MiB, tensor sizes)")
    if flat:
        ax2.text(0.02, 0.95, "near zero, at most: " + "; ".join(flat), transform=ax2.transAxes,
                 va="top", fontsize=_MIN_FONT)
    fig.legend(*ax1.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=len(data["results"]), frameon=False, fontsize=_MIN_FONT)
    fig.tight_layout()
    return fig


def plot_gpu_bench(data: dict):
    """Time against N per (window, mode) for the multi-head rows of a stored GPU benchmark
    (``gpu_bench.json``, written by ``benchmarks/gpu.py``): one panel per window and mode, one
    curve per method. Lives in the package so that a chapter can draw it wherever swa_lib is
    installed; the benchmark script only measures."""
    rows = [r for r in data["rows"] if r["heads"] == r["heads_kv"]]
    windows = sorted({tuple(r["window"]) for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = new_figure(ncols=max(len(modes), 1), nrows=max(len(windows), 1),
                           width=COLUMN_WIDTH, height=3.4 * max(len(windows), 1))
    for wi, window in enumerate(windows):
        for mi, mode in enumerate(modes):
            sel = [r for r in rows if tuple(r["window"]) == window and r["mode"] == mode]
            ns = sorted({r["n"] for r in sel})
            ms = {(r["n"], r["method"]): r["ms"] for r in sel}
            series = {m: [ms.get((n, m)) for n in ns] for m in methods}
            plot_scaling(ns, series, ax=axes[wi, mi], title=f"window {window}, {mode}")
    heads = sorted({r["heads"] for r in rows})
    fig.suptitle(f"{data['gpu']}, {data.get('dtype', 'bfloat16')}, B = {data.get('batch', 1)}, "
                 f"H = {'/'.join(map(str, heads))}, D = {data.get('head_dim', '?')} "
                 f"({data['date']})", fontsize=_MIN_FONT + 1)
    fig.tight_layout()
    return fig


def plot_reach_growth(curves: dict, measured: Optional[dict] = None, *, ax=None, ylabel: str = "receptive field (tokens)"):
    """Receptive field size against depth: ``curves`` (label -> sizes per layer) as lines,
    ``measured`` (same labels) as markers on top. Returns the matplotlib Figure."""
    if ax is None:
        fig, ax = new_figure(width=6, height=4)
    else:
        fig = ax.figure
    # Curves with the same values would hide one another: draw them once, named together.
    groups: dict = {}
    for label, sizes in curves.items():
        groups.setdefault(tuple(np.asarray(sizes).tolist()), []).append(label)
    for color, (sizes, labels) in zip(PALETTE, groups.items()):
        depth = np.arange(1, len(sizes) + 1)
        ax.plot(depth, sizes, "-", color=color, label=" = ".join(labels) + " (analytic)")
        for label in labels:
            if measured and label in measured:
                m = measured[label]
                ax.plot(np.arange(1, len(m) + 1), m, "o", color=color, label=f"{label} (measured)",
                        markersize=7 if label == labels[0] else 4)
    ax.set_xlabel("number of layers L")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    _legend_below(ax, ncol=2)
    return fig


def plot_attention_heads(maps: list, layers=None, *, batch: int = 0, ncols: int = 4, masks=None):
    """Heat maps of attention probabilities, one panel per (layer, head), ``ncols`` panels a row
    (a layer's heads take ``ceil(heads / ncols)`` rows); column 0 of each map is token 0.

    Keys a query may not see are drawn light grey, apart from visible keys of weight near 0:
    ``masks`` (one boolean (n_q, n_k) mask per map, True = visible) says which they are; without
    it, weights of exactly 0 (what a softmax over a masked score gives) count as masked.
    """
    cmap = plt.get_cmap("cividis").with_extremes(bad="#E6E6E6")
    layers = range(len(maps)) if layers is None else list(layers)
    heads = maps[0].shape[1]
    ncols = min(ncols, heads)
    rows_per_layer = -(-heads // ncols)
    fig, axes = new_figure(ncols=ncols, nrows=len(layers) * rows_per_layer, width=2.4, height=2.5)
    for ax in axes.flat:
        ax.set_visible(False)
    for r, layer in enumerate(layers):
        for h in range(heads):
            ax = axes[r * rows_per_layer + h // ncols, h % ncols]
            ax.set_visible(True)
            weights = maps[layer][batch, h].detach().float().numpy()
            visible = weights != 0 if masks is None else np.asarray(masks[layer], bool)
            im = ax.imshow(np.ma.masked_where(~visible, weights), cmap=cmap,
                           norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
            ax.set_title(f"layer {layer}, head {h}", fontsize=_MIN_FONT)
            ax.tick_params(labelsize=_MIN_FONT)
            ax.set_xlabel("key j", fontsize=_MIN_FONT)
            if h % ncols == 0:
                ax.set_ylabel("query i", fontsize=_MIN_FONT)
    fig.tight_layout()
    fig.colorbar(im, ax=axes, shrink=0.5, label="attention weight (square-root scale)")
    fig.legend(handles=[Patch(facecolor="#E6E6E6", label="not visible (masked)")], loc="lower center",
               bbox_to_anchor=(0.5, -0.02), frameon=False, fontsize=_MIN_FONT)
    return fig


def plot_history(history: list, ax=None):
    """Training loss (nats per byte) against step."""
    if ax is None:
        fig, ax = new_figure(width=5.0, height=3.4)
    else:
        fig = ax.figure
    ax.plot([h[0] for h in history], [h[1] for h in history], color=PALETTE[0])
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title("training the demo model")
    return fig


def cpu_bench_figure(data: dict, window=(256, 256)):
    """Forward time against n at each thread count of a stored CPU benchmark (``cpu_bench.json``,
    written by ``benchmarks/cpu.py``): one panel per thread count, one curve per peer."""
    rows = [r for r in data["rows"] if r["direction"] == "forward" and r["load"] == 0
            and tuple(r["window"]) == tuple(window) and r["n"] >= 1024]
    threads = sorted({r["threads"] for r in rows})
    cols = max(len(threads), 1)
    fig, axes = new_figure(ncols=cols, width=COLUMN_WIDTH / cols, height=4.6, sharey=True)
    for ax, t in zip(np.atleast_1d(axes).ravel(), threads):
        sel = [r for r in rows if r["threads"] == t]
        ns = sorted({r["n"] for r in sel})
        ms = {(r["n"], r["peer"]): r["time_s"] * 1e3 for r in sel}
        series = {p: [ms.get((n, p)) for n in ns] for p in data["config"]["peers"] if any((n, p) in ms for n in ns)}
        plot_scaling(ns, series, ax=ax, ylabel="forward time (ms)", title=f"{t} thread{'s' * (t > 1)}")
        ax.set_xticks(ns, [f"{n // 1024}k" if n >= 1024 else str(n) for n in ns])  # half a column: short labels
    fig.suptitle(f"{data['machine']['cpu']}: window {tuple(window)}, fp32, B=1, H=4, D=64", fontsize=_MIN_FONT + 1)
    fig.tight_layout()
    return fig
