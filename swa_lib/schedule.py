"""Per-layer window schedules (Longformer style) and their exact receptive fields.

Longformer :cite:`beltagy2020longformer` does not give every layer the same window: lower
layers get small windows (they model local context), upper layers wider ones, and in the upper
layers a few heads are *dilated* so they reach further for the same number of keys.
:class:`WindowSchedule` describes such a stack as a typed config and expands it into a list of
:class:`LayerWindow` (one layer's window, dilation and global tokens), which the book's lab
measures (:func:`swa_lib.lab.receptive_field.measure_influence`).

Semantics are swa_lib's (:mod:`swa_lib.masks`): a layer's window ``(left, right)`` is a *span*
shared by all heads, and dilation ``d`` keeps the keys with ``(i - j) % d == 0`` inside it. A
head with dilation ``d`` therefore reads about ``(left + right) / d + 1`` keys and reaches as far
as an undilated head with the same span: dilation buys reach per key, i.e. for the same cost a
span ``d`` times wider.

:func:`receptive_field_support` computes, without building any ``N x N`` matrix, the exact set of input
positions an output position can depend on: going down the stack, the set grows by the union (over
heads) of the offsets ``i - j`` a layer allows, plus the residual path, clipped to the sequence,
and global tokens connect everything they touch. With dilation the set can have holes (a stack of
only dilation-2 layers never reads odd offsets), so the *support* matters, not only its extent.
It agrees exactly with the non-zero gradients that ``measure_influence`` measures (the tests check).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .masks import check_int, check_window

__all__ = ["LayerWindow", "WindowSchedule", "as_layers", "layer_offsets", "receptive_field_support", "schedule_reach",
           "receptive_field_size", "interior_keys"]


@dataclass(frozen=True)
class LayerWindow:
    """The attention pattern of one layer: an inclusive window, dilation, and global tokens."""

    window: tuple[int, int]
    dilation: Union[int, tuple[int, ...]] = 1
    global_tokens: Optional[tuple[int, ...]] = None  # positions of global tokens, if any

    def __post_init__(self):
        object.__setattr__(self, "window", check_window(self.window))
        d = self.dilation
        if isinstance(d, int) and not isinstance(d, bool):
            check_int("dilation", d, 1)
        else:  # one dilation per head
            if isinstance(d, (str, bytes)) or not isinstance(d, Sequence):
                raise TypeError(f"dilation must be an int or a sequence of ints (one per head), got {d!r}")
            if len(d) == 0:
                raise ValueError("dilation per head must not be empty")
            for x in d:
                check_int("dilation", x, 1)
            object.__setattr__(self, "dilation", tuple(d))
        g = self.global_tokens
        if g is not None:
            if isinstance(g, (str, bytes)) or not isinstance(g, Sequence):
                raise TypeError(f"global_tokens must be None or a sequence of int positions, got {g!r}")
            for t in g:
                check_int("global_tokens position", t, 0)
            object.__setattr__(self, "global_tokens", tuple(g))

    @property
    def reach(self) -> tuple[int, int]:
        """How far one layer reaches (left, right): its window span (dilation thins the span)."""
        return self.window


@dataclass(frozen=True)
class WindowSchedule:
    """A Longformer-style stack: windows grow with depth, upper layers dilate some heads.

    Attributes:
        num_layers: layers in the stack.
        num_heads: heads per layer.
        first_window: one-sided span of the lowest layer.
        last_window: one-sided span of the top layer; spans grow linearly (rounded) in between.
        dilated_layers: how many of the top layers use dilation (0: none).
        dilated_heads: in those layers, how many heads (the last ones) are dilated.
        max_dilation: the dilation of those heads in the top layer; it grows linearly from 2 in
            the first dilated layer (Longformer: "a small amount of increasing dilation").
        causal: ``(w, 0)`` windows instead of ``(w, w)``.

    >>> s = WindowSchedule(num_layers=4, num_heads=2, first_window=2, last_window=8,
    ...                    dilated_layers=2, dilated_heads=1, max_dilation=3)
    >>> [(l.window, l.dilation) for l in s.layers()]
    [((2, 2), (1, 1)), ((4, 4), (1, 1)), ((6, 6), (1, 2)), ((8, 8), (1, 3))]
    """

    num_layers: int
    num_heads: int
    first_window: int
    last_window: int
    dilated_layers: int = 0
    dilated_heads: int = 0
    max_dilation: int = 2
    causal: bool = False

    def __post_init__(self):
        check_int("num_layers", self.num_layers, 1)
        check_int("num_heads", self.num_heads, 1)
        check_int("first_window", self.first_window, 0)
        check_int("last_window", self.last_window, 0)
        check_int("dilated_layers", self.dilated_layers, 0)
        check_int("dilated_heads", self.dilated_heads, 0)
        check_int("max_dilation", self.max_dilation, 1)
        if self.dilated_layers > self.num_layers:
            raise ValueError(f"dilated_layers ({self.dilated_layers}) exceeds num_layers ({self.num_layers})")
        if self.dilated_heads > self.num_heads:
            raise ValueError(f"dilated_heads ({self.dilated_heads}) exceeds num_heads ({self.num_heads})")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {self.causal!r}")

    def windows(self) -> list[tuple[int, int]]:
        """The ``(left, right)`` span of each layer, bottom first."""
        spans = np.rint(np.linspace(self.first_window, self.last_window, self.num_layers)).astype(int)
        return [(int(w), 0 if self.causal else int(w)) for w in spans]

    def dilations(self) -> list[tuple[int, ...]]:
        """Per layer, one dilation per head."""
        out = []
        first = self.num_layers - self.dilated_layers
        k = max(self.dilated_layers, 1)
        grow = np.rint(np.linspace(min(2, self.max_dilation), self.max_dilation, k)) if k > 1 else [self.max_dilation]
        for layer in range(self.num_layers):
            d = 1 if layer < first or self.dilated_heads == 0 else int(grow[layer - first])
            out.append((1,) * (self.num_heads - self.dilated_heads) + (d,) * self.dilated_heads if d > 1
                       else (1,) * self.num_heads)
        return out

    def layers(self) -> list[LayerWindow]:
        """The stack as :class:`LayerWindow` objects (for ``measure_influence`` and ``AttentionStack``)."""
        return [LayerWindow(w, dilation=d) for w, d in zip(self.windows(), self.dilations())]


def as_layers(layers, num_layers: Optional[int] = None) -> list[LayerWindow]:
    """``layers`` as a list of :class:`LayerWindow`: a window or one LayerWindow repeated
    ``num_layers`` times, a list of windows / LayerWindows, or a :class:`WindowSchedule`.

    One window is a *tuple* ``(left, right)``; a list always means one entry per layer, so
    ``[4, 0]`` (a list of ints) is refused rather than guessed. The stack must not be empty."""
    if num_layers is not None:
        if isinstance(num_layers, numbers.Integral) and not isinstance(num_layers, bool):
            num_layers = int(num_layers)  # a NumPy int, e.g. from np.arange over depths
        check_int("num_layers", num_layers, 1)
    if isinstance(layers, WindowSchedule):
        return layers.layers()
    if isinstance(layers, LayerWindow):
        return [layers] * (num_layers or 1)
    if isinstance(layers, tuple) and len(layers) == 2 and not any(_is_layer(x) for x in layers):
        return [LayerWindow(layers)] * (num_layers or 1)  # one window (check_window says what is wrong)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError("layers must be a window (left, right), a LayerWindow, a WindowSchedule or a list with "
                        f"one window or LayerWindow per layer, got {type(layers).__name__} {layers!r}")
    stack = []
    for i, x in enumerate(layers):
        if isinstance(x, LayerWindow):
            stack.append(x)
        elif _is_layer(x):
            stack.append(LayerWindow(tuple(x)))
        elif isinstance(layers, list) and len(layers) == 2 and not any(_is_layer(y) for y in layers):
            raise TypeError(f"layers is the list {layers!r}, but a list holds one window per layer: pass one "
                            f"window as a tuple, ({layers[0]!r}, {layers[1]!r}), or a list of (left, right) pairs")
        else:
            raise TypeError(f"layers[{i}] must be a window (left, right) or a LayerWindow, got {x!r}")
    if not stack:
        raise ValueError(f"layers is an empty schedule ({layers!r}): it needs at least one layer")
    return stack


def _is_layer(x) -> bool:
    """Whether ``x`` can be one layer of a list: a LayerWindow or a window (a sequence, not a string)."""
    return isinstance(x, LayerWindow) or (isinstance(x, Sequence) and not isinstance(x, (str, bytes)))


def layer_offsets(layer: LayerWindow, num_heads: Optional[int] = None) -> np.ndarray:
    """Sorted offsets ``o = i - j`` one layer lets a query read, over all heads (0 always included)."""
    left, right = layer.window
    dil = (layer.dilation,) if isinstance(layer.dilation, int) else tuple(layer.dilation)
    if num_heads is not None and len(dil) not in (1, num_heads):
        raise ValueError(f"layer has {len(dil)} dilations but num_heads={num_heads}")
    offsets = set()
    for d in dil:
        offsets.update(range(-(right // d) * d, left + 1, d))
    return np.array(sorted(offsets), dtype=np.int64)


def receptive_field_support(layers, n: int, position: int = -1, *, num_layers: Optional[int] = None) -> np.ndarray:
    """Exact receptive field of one output position, per depth, as a boolean ``(L, n)`` array.

    Row ``l`` marks the input positions that output ``position`` can depend on after the first
    ``l + 1`` layers of ``layers`` (a :class:`WindowSchedule`, a list of :class:`LayerWindow`, or
    a window repeated ``num_layers`` times). Each layer is a residual attention layer, as in
    :class:`swa_lib.lab.receptive_field.AttentionStack`, so the row equals the non-zero pattern of
    :func:`swa_lib.lab.receptive_field.measure_influence`. Cost O(L^2 * n * offsets).
    """
    n = check_int("n", n, 1)
    if isinstance(position, bool) or not isinstance(position, int) or not -n <= position < n:
        raise ValueError(f"position must be an int in [-{n}, {n}), got {position!r}")
    stack = as_layers(layers, num_layers)
    for i, layer in enumerate(stack):
        if layer.global_tokens and max(layer.global_tokens) >= n:
            raise ValueError(f"global_tokens of layer {i} must be positions in [0, n) = [0, {n}), "
                             f"got {layer.global_tokens}")
    pos = position % n
    rows = []
    for depth in range(1, len(stack) + 1):
        seen = np.zeros(n, dtype=bool)  # positions whose value at the current level matters
        seen[pos] = True
        for layer in reversed(stack[:depth]):  # walk down from the top layer
            below = seen.copy()  # the residual path: position i reads itself
            for o in layer_offsets(layer):  # query i reads key j = i - o
                if abs(o) >= n:
                    continue  # no pair of positions this far apart
                if o > 0:
                    below[: n - o] |= seen[o:]
                elif o < 0:
                    below[-o:] |= seen[: n + o]
            if layer.global_tokens:
                g = np.zeros(n, dtype=bool)
                g[[t % n for t in layer.global_tokens]] = True
                if seen.any():
                    below |= g  # every query reads every global token
                if (seen & g).any():
                    below[:] = True  # a global query reads every token
            seen = below
        rows.append(seen)
    return np.stack(rows)


def schedule_reach(layers, num_layers: Optional[int] = None) -> tuple[int, int]:
    """``(left, right)`` extent of the receptive field on an unbounded sequence (no globals).

    The sum over layers of the furthest key each layer lets a query read, on each side: the
    window's side, rounded down to a multiple of the dilation (span 6 with dilation 4 reaches 4).
    ``layers`` is anything :func:`as_layers` takes.

    >>> schedule_reach((4095, 0), 32)   # Mistral 7B: 32 layers, sliding_window 4096
    (131040, 0)
    """
    stack = as_layers(layers, num_layers)
    left = right = 0
    for layer in stack:
        off = layer_offsets(layer)
        left += int(off.max())
        right += int(-off.min())
    return left, right


def receptive_field_size(layers, num_layers: Optional[int] = None) -> int:
    """Number of input positions one output can depend on: left reach + right reach + 1."""
    left, right = schedule_reach(layers, num_layers)
    return left + right + 1


def interior_keys(layer: LayerWindow, num_heads: int = 1) -> float:
    """Keys one query reads far from both ends of the sequence, averaged over heads: a layer's
    cost per query (:meth:`swa_lib.AttentionPattern.keys_per_query` counts the clipped rows too)."""
    left, right = layer.window
    dil = [layer.dilation] * num_heads if isinstance(layer.dilation, int) else list(layer.dilation)
    return float(np.mean([left // d + right // d + 1 for d in dil]))
