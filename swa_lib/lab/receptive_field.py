"""How far information travels through a stack of sliding-window layers.

One layer with window ``(left, right)`` lets position ``i`` read positions ``i - left`` to
``i + right``. Stacking L layers composes these reaches, exactly like stacked convolutions
(:cite:`luo2016receptive` for the CNN analogue): after L layers position i depends on
positions ``i - L*left`` to ``i + L*right``, a receptive field of ``L*(left + right) + 1``
tokens. In swa_lib the window is the *span* a layer covers, so dilation does not change a
layer's reach: it removes keys inside the span (at a fixed number of keys, dilation d therefore
buys d times the reach; chapter 7). Global tokens connect everything in one layer.

:func:`swa_lib.schedule_reach` computes this on paper; :func:`measure_influence` measures it: it
builds a small random stack of attention layers and takes the gradient of one output position
with respect to every input position. A position outside the receptive field has *exactly*
zero gradient (no path through the network reaches it), so the support of the gradient is the
receptive field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..attention import sliding_window_attention
from ..schedule import LayerWindow, as_layers

__all__ = ["AttentionStack", "measure_influence"]


class AttentionStack(nn.Module):
    """A minimal stack of residual attention layers, for measuring receptive fields.

    Each layer is ``x + W_o attn(W_q u, W_k u, W_v u)`` with ``u = rmsnorm(x)`` and its own
    pattern. The normalisation (per position, so it moves no information) keeps the scores from
    growing with depth; without it the softmax of a deep stack saturates and underflows to exact
    zeros. There is no MLP: an MLP acts per position and cannot move information between
    positions, so it does not change the receptive field.
    """

    def __init__(self, layers: Sequence[LayerWindow], d_model: int = 8, heads: int = 1, *, seed: int = 0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.layers = list(layers)
        self.heads = heads
        gen = torch.Generator().manual_seed(seed)

        def linear():
            lin = nn.Linear(d_model, d_model, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(d_model, d_model, generator=gen) / d_model**0.5)
            return lin

        self.proj = nn.ModuleList(nn.ModuleList(linear() for _ in range(4)) for _ in self.layers)

    def forward(self, x: torch.Tensor, depth: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
        """Run the first ``depth`` layers (all by default) on ``x`` of shape (B, N, d_model)."""
        batch, n, d_model = x.shape
        h = self.heads
        for spec, (wq, wk, wv, wo) in list(zip(self.layers, self.proj))[: depth or len(self.layers)]:
            def split(t):  # (B, N, d_model) -> (B, H, N, d_model / H)
                return t.reshape(batch, n, h, d_model // h).transpose(1, 2)

            g = None if spec.global_tokens is None else torch.tensor(spec.global_tokens, dtype=torch.long)
            u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # RMS norm, per position
            a = sliding_window_attention(
                split(wq(u)), split(wk(u)), split(wv(u)), spec.window,
                dilation=spec.dilation, global_tokens=g, backend=backend,
            )  # (B, H, N, d_model / H)
            x = x + wo(a.transpose(1, 2).reshape(batch, n, d_model))
        return x


def measure_influence(
    layers,
    n: int,
    *,
    num_layers: Optional[int] = None,
    position: int = -1,
    d_model: int = 8,
    heads: int = 1,
    seed: int = 0,
    backend: str = "auto",
) -> np.ndarray:
    """Gradient magnitude of one output position w.r.t. every input position, per depth.

    Returns an array of shape ``(L, n)``: row ``l`` holds ``|d out_l[position] / d x[j]|``
    (summed over features) after ``l + 1`` layers. Computed in float64, where positions
    outside the receptive field get exactly 0.
    """
    stack_spec = as_layers(layers, num_layers)
    model = AttentionStack(stack_spec, d_model=d_model, heads=heads, seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(1, n, d_model, generator=gen, dtype=torch.float64)
    pos = position % n
    rows = []
    for depth in range(1, len(stack_spec) + 1):
        x = x0.clone().requires_grad_(True)
        out = model(x, depth=depth, backend=backend)
        (grad,) = torch.autograd.grad(out[0, pos].sum(), x)
        rows.append(grad[0].abs().sum(-1).numpy())  # (n,)
    return np.stack(rows)
