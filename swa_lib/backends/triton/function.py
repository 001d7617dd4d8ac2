"""Layer 3: the autograd Function and the plain functions of the Triton backend."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ...masks import AttentionPattern
from ..common import refuse_double_backward
from .launch import Prepared, launch_backward, launch_forward, on_device

__all__ = ["SlidingWindowAttentionFunction", "triton_attention", "triton_sliding_window_attention"]


class SlidingWindowAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, pattern, scale, blocks)`` -> out; gradients for q, k and v.

    Saves q, k, v, the output and the row logsumexp (O(N) extra memory, no (N, N) matrix).
    """

    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, blocks=None):
        prep = Prepared(q, k, v, pattern, scale, blocks)
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
        return dq, dk, dv, None, None, None


def triton_attention(q, k, v, pattern: AttentionPattern, scale: float, blocks=None) -> torch.Tensor:
    """The registry's backend function: ``fn(q, k, v, pattern, scale) -> out``, on tensors that
    :func:`swa_lib.attention.validate_call` has checked."""
    return SlidingWindowAttentionFunction.apply(q, k, v, pattern, scale, blocks)


def triton_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window, *,
                                    dilation: Union[int, Sequence[int]] = 1, global_tokens=None, sinks: int = 0,
                                    scale: Optional[float] = None, blocks: Optional[tuple] = None) -> torch.Tensor:
    """Sliding window attention in one fused Triton kernel (forward and backward).

    Args:
        q: ``(B, H, N, D)`` queries; k, v: ``(B, H_kv, N, D)`` with ``H % H_kv == 0``
            (grouped-query attention). As many keys as queries (no cached decoding here).
            Any strides: the kernel takes them as arguments.
        window: inclusive ``(left, right)``, as in :func:`swa_lib.sliding_window_attention`;
            dilation (int or one per query head), global_tokens (bool ``(B, N)``/``(N,)`` mask
            or positions) and sinks likewise.
        scale: default ``D ** -0.5``.
        blocks: ``(BLOCK_M, BLOCK_N)`` to bypass the autotuner (powers of two >= 16).

    Returns:
        ``(B, H, N, D)`` in the input dtype; differentiable in q, k and v.

    Limits: the ``"triton"`` row of the capability table in :mod:`swa_lib.backends`: dtypes
    float16, bfloat16, float32 (fp32 matmuls as 3xTF32, close to fp32 accuracy; bfloat16 only
    compiled, not in the interpreter, whose bf16 ``tl.dot`` is wrong in triton 3.9); ``D`` in
    :data:`swa_lib.backends.TRITON_HEAD_DIMS`; CUDA tensors, or CPU tensors in the interpreter
    (``TRITON_INTERPRET=1`` set before this module was imported; slow, for tests and teaching).
    A call outside them raises ``ValueError`` with the table's reason.
    Cost: O(N * (left + right + block)) for the band, plus O(N * G) for G global tokens and
    O(N * S) for S sinks; dilation keeps the band's cost (holes are masked, not skipped).
    Accumulation is in fp32; the saved logsumexp is fp32.
    """
    from ...attention import validate_call

    pattern, scale = validate_call(q, k, v, window, dilation=dilation, global_tokens=global_tokens,
                                   sinks=sinks, scale=scale)
    return triton_attention(q, k, v, pattern, scale, blocks)
