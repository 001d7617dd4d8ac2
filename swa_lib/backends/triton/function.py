"""Layer 3: the autograd Function and the plain functions of the Triton backend."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ...masks import AttentionPattern
from ..common import refuse_double_backward
from .launch import Prepared, launch_backward, launch_forward, on_device

__all__ = ["SlidingWindowAttentionFunction", "triton_attention", "triton_sliding_window_attention",
           "triton_varlen_attention"]


class SlidingWindowAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, pattern, scale, blocks, variant, tma, cu_seqlens)`` -> out; gradients for
    q, k and v. The options after ``scale`` are :func:`triton_attention`'s.

    Saves q, k, v, the output and the row logsumexp (O(N) extra memory, no (N, N) matrix).
    """

    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, blocks=None, variant="current", tma=None,
                cu_seqlens=None):
        prep = Prepared(q, k, v, pattern, scale, blocks, variant, tma, cu_seqlens)
        with on_device(q):
            out, lse = launch_forward(q, k, v, prep)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.prep = prep
        return out

    @staticmethod
    def backward(ctx, do):
        # once_differentiable alone would let create_graph=True pass silently
        refuse_double_backward("triton")
        q, k, v, out, lse = ctx.saved_tensors
        with on_device(q):
            dq, dk, dv = launch_backward(do, q, k, v, out, lse, ctx.prep)
        return dq, dk, dv, None, None, None, None, None, None


def triton_attention(q, k, v, pattern: AttentionPattern, scale: float, blocks=None, variant: str = "current",
                     tma: Optional[bool] = None) -> torch.Tensor:
    """The registry's backend function: ``fn(q, k, v, pattern, scale) -> out``, on tensors that
    :func:`swa_lib.attention.validate_call` has checked.

    Options: ``blocks`` ``(BLOCK_M, BLOCK_N)`` bypasses the autotuner; ``variant`` "current" or
    "previous" (the three-loop, untransposed kernel, kept until a GPU has measured both);
    ``tma`` forces TMA descriptors on or off (default: on Hopper and newer, when the tensors'
    strides allow them)."""
    return SlidingWindowAttentionFunction.apply(q, k, v, pattern, scale, blocks, variant, tma, None)


def triton_varlen_attention(q, k, v, starts_q: Sequence[int], starts_k: Sequence[int], pattern: AttentionPattern,
                            scale: float, blocks=None, variant: str = "current",
                            tma: Optional[bool] = None) -> torch.Tensor:
    """Packed documents in one launch per kernel (FlashAttention's varlen layout).

    q ``(total_q, H, D)``, k, v ``(total_k, H_kv, D)``; ``starts_q``/``starts_k`` the checked
    offsets ``[0, ..., total]`` (:func:`swa_lib.varlen.check_cu_seqlens`). A document with fewer
    queries than keys has them at its last positions. Returns ``(total_q, H, D)``. The pattern
    (window, dilation, sinks: a document's first keys) applies inside each document; no global
    tokens."""
    if pattern.global_tokens is not None:
        raise ValueError("packed documents take no global tokens")
    cu = tuple(torch.tensor(s, dtype=torch.int32, device=q.device) for s in (starts_q, starts_k))
    views = [x.permute(1, 0, 2).unsqueeze(0) for x in (q, k, v)]  # (1, H, total, D), no copy
    out = SlidingWindowAttentionFunction.apply(*views, pattern, scale, blocks, variant, tma,
                                               (*cu, list(starts_q), list(starts_k)))
    return out[0].permute(1, 0, 2)


def triton_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window, *,
                                    dilation: Union[int, Sequence[int]] = 1, global_tokens=None, sinks: int = 0,
                                    scale: Optional[float] = None, blocks: Optional[tuple] = None,
                                    variant: str = "current", tma: Optional[bool] = None) -> torch.Tensor:
    """Sliding window attention in one fused Triton kernel (forward and backward).

    Args:
        q: ``(B, H, N_q, D)`` queries; k, v: ``(B, H_kv, N_k, D)`` with ``H % H_kv == 0``
            (grouped-query attention) and ``N_q <= N_k``: the queries are the last ``N_q``
            positions (chunked prefill against a cache, one-token decoding). Any strides.
        window: inclusive ``(left, right)``, as in :func:`swa_lib.sliding_window_attention`;
            dilation (int or one per query head), global_tokens (bool ``(B, N_k)``/``(N_k,)``
            mask or positions) and sinks likewise.
        scale: default ``D ** -0.5``.
        blocks, variant, tma: as in :func:`triton_attention`.

    Returns:
        ``(B, H, N_q, D)`` in the input dtype; differentiable in q, k and v.

    Limits: the ``"triton"`` row of the capability table in :mod:`swa_lib.backends`: dtypes
    float16, bfloat16, float32 (fp32 matmuls as 3xTF32, close to fp32 accuracy; bfloat16 only
    compiled, not in the interpreter, whose bf16 ``tl.dot`` is wrong); ``D`` in
    :data:`swa_lib.backends.TRITON_HEAD_DIMS` where a configuration fits the GPU's shared memory
    (:mod:`swa_lib.backends.triton_arch`); CUDA tensors, or CPU tensors in the interpreter
    (``TRITON_INTERPRET=1`` set before this module was imported; slow, for tests and teaching).
    A call outside them raises ``ValueError`` with the table's reason.
    Cost: O(N * (left + right + block)) for the band, plus O(N * G) for G global tokens and
    O(N * S) for S sinks, spread over programs (no program walks the whole sequence); dilation
    keeps the band's cost (holes are masked, not skipped). Accumulation is in fp32; the saved
    logsumexp is fp32.
    """
    from ...attention import validate_call

    pattern, scale = validate_call(q, k, v, window, dilation=dilation, global_tokens=global_tokens,
                                   sinks=sinks, scale=scale)
    return triton_attention(q, k, v, pattern, scale, blocks, variant, tma)
