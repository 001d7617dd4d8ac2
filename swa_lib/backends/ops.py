"""swa_lib's attention as a ``torch.library`` custom operator, for ``torch.compile``.

A compiled model cannot look inside a backend: the CPU backends loop over heads and slabs in
Python and index with data-dependent masks, which would break the graph (or unroll it into
thousands of nodes). So under ``torch.compile`` :func:`swa_lib.sliding_window_attention` calls
one opaque operator instead, ``torch.ops.swa_lib.attention``, which the compiler treats like
any ATen operator:

- a *fake* (meta) implementation tells the compiler the output's shape, dtype and device
  without running anything;
- an autograd formula makes it differentiable: the backward is a second operator,
  ``torch.ops.swa_lib.attention_backward``, that recomputes the backend's forward and
  differentiates it (the FlashAttention recipe: keep the inputs, recompute the rest).

The operator takes the pattern as plain values (window, dilation per head, sinks, a global
token mask) and the name of the backend chosen before the call, so the choice is made once at
trace time, with the same rules as in eager mode. Eager calls do not go through the operator:
it adds a dispatch and, for the backward, one recomputed forward.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..masks import AttentionPattern
from .registry import get_backend

__all__ = ["attention_op", "attention_backward_op", "call_op"]


_AUTOGRAD_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradOther)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradNestedTensor))


def _pattern(left, right, dilation, sinks, global_tokens) -> AttentionPattern:
    dil = dilation[0] if len(dilation) == 1 else tuple(dilation)
    if global_tokens is not None and not bool(global_tokens.any()):
        global_tokens = None  # no global tokens (what eager mode makes of an all-False mask)
    return AttentionPattern(left, right, dilation=dil, sinks=sinks, global_tokens=global_tokens)


@torch.library.custom_op("swa_lib::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int,
                 dilation: Sequence[int], sinks: int, global_tokens: Optional[torch.Tensor],
                 scale: float, backend: str) -> torch.Tensor:
    """``backend``'s output for the pattern given by its parts, ``(B, H, N_q, D_v)``."""
    pattern = _pattern(left, right, dilation, sinks, global_tokens)
    out = get_backend(backend).fn(q, k, v, pattern, scale).contiguous()  # as the fake says
    # an operator must not return one of its inputs
    return out.clone() if any(out.data_ptr() == x.data_ptr() for x in (q, k, v)) else out


@attention_op.register_fake
def _(q, k, v, left, right, dilation, sinks, global_tokens, scale, backend):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])  # contiguous


@torch.library.custom_op("swa_lib::attention_backward", mutates_args=())
def attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          left: int, right: int, dilation: Sequence[int], sinks: int,
                          global_tokens: Optional[torch.Tensor], scale: float,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`attention_op`: its forward recomputed, then differentiated."""
    pattern = _pattern(left, right, dilation, sinks, global_tokens)
    # An operator's kernel runs below autograd: the dispatcher excludes the autograd keys.
    # Re-enable them (and grad mode) for the recomputed forward, so that it records a graph.
    exclude = torch._C._dispatch_tls_local_exclude_set() - _AUTOGRAD_KEYS
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = get_backend(backend).fn(*leaves, pattern, scale)
        grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return tuple(x.new_zeros(x.shape) if g is None else g.contiguous()
                 for x, g in zip((q, k, v), grads))


@attention_backward_op.register_fake
def _(grad, q, k, v, left, right, dilation, sinks, global_tokens, scale, backend):
    # contiguous, as the real kernel returns them
    return tuple(x.new_empty(x.shape) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, left, right, dilation, sinks, global_tokens, scale, backend = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = (left, right, dilation, sinks, global_tokens, scale, backend)


def _backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad, q, k, v, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def call_op(q, k, v, pattern: AttentionPattern, scale: float, backend: str) -> torch.Tensor:
    """Run ``backend`` on ``pattern`` through the custom operator (what compiled code calls)."""
    dilation = list(pattern.dilation) if isinstance(pattern.dilation, tuple) else [pattern.dilation]
    return attention_op(q, k, v, pattern.left, pattern.right, dilation, pattern.sinks,
                        pattern.global_tokens, scale, backend)
