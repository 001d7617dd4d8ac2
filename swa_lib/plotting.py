"""Every figure in the book, drawn the same way.

Rules: opaque white backgrounds so figures read in dark mode, labelled axes with
units, a colour-blind-safe palette (Okabe & Ito 2008), and sizes that draw in well under a
second on a CPU. Functions return the matplotlib Figure so notebooks can display or save it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import matplotlib

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap

__all__ = [
    "PALETTE",
    "new_figure",
    "plot_mask",
    "plot_masks",
    "plot_scaling",
    "fit_loglog_slope",
    "plot_receptive_field",
]

#: Okabe-Ito colours: distinguishable with the common forms of colour blindness.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]

_MASK_CMAP = ListedColormap(["#F2F2F2", "#0072B2"])  # hidden, visible


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 4.0, **kwargs):
    """A figure with an opaque white background and the book's default size per panel."""
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
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    if title:
        ax.set_title(title)
    return fig


def plot_masks(masks: dict, *, labels: Optional[Sequence[str]] = None, width: float = 3.6):
    """Several masks side by side, titled by the dict keys."""
    fig, axes = new_figure(ncols=len(masks), width=width, height=width)
    axes = np.atleast_1d(axes).ravel()
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
            label = f"{label} (slope {fit_loglog_slope(xs, vs):.2f})"
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
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(frameon=True, facecolor="white")
    return fig


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
