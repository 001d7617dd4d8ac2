"""Rules every backend follows: the dtype it computes in, no silent double backward, and the
argument checks of the exported backend functions (the entry point's own validators)."""

from __future__ import annotations

import torch

from ..masks import check_int

__all__ = ["compute_dtype", "in_compute_dtype", "refuse_double_backward", "check_backend_args", "check_band_args",
           "empty_output"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend computes scores, softmax and sums in: float32 for float16 and
    bfloat16 inputs (a float16 dot product overflows at 65504, long before softmax would), the
    input dtype for float32 and float64. Outputs are rounded back to the input dtype once."""
    return torch.promote_types(dtype, torch.float32)


def in_compute_dtype(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """``x`` detached, in ``dtype`` (default: :func:`compute_dtype` of its own), with contiguous
    rows (last dim stride 1) so that strided views of its rows can feed matrix products; copied
    only where needed."""
    x = x.detach().to(compute_dtype(x.dtype) if dtype is None else dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def refuse_double_backward(backend: str) -> None:
    """Call first in the ``backward`` of a hand-written ``autograd.Function``.

    Grad mode is on inside ``backward`` only under ``create_graph=True`` (a gradient penalty, a
    Hessian-vector product). Such a backward computes first-order gradients with no graph behind
    them, so the second-order term would be dropped without a word: raise instead.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"backend {backend!r} has no double backward (torch.autograd.grad(..., create_graph=True)); "
            "use backend='dense', 'sdpa', 'chunked' or 'loop', whose gradients are ordinary autograd"
        )


def empty_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The result ``(B, H, N_q, D_v)`` when one of those is 0 (nothing to compute, as PyTorch's
    SDPA gives), still connected to q, k, v for autograd (their gradients come out as zeros of
    their own shapes); None when there is something to compute."""
    if 0 not in (q.shape[0], q.shape[1], q.shape[2], v.shape[3]):
        return None
    out = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out = out + 0 * (q.sum() + k.sum() + v.sum())
    return out


def check_backend_args(q, k, v, pattern, scale):
    """``(pattern, scale)`` for a backend function ``fn(q, k, v, pattern, scale)`` called directly:
    q, k, v as :func:`swa_lib.sliding_window_attention` takes them, a pattern that fits them (its
    sizes cut to the sequence), a positive finite scale that fits :func:`compute_dtype` of q's dtype;
    TypeError/ValueError naming the argument.

    With ``N_q <= N_k`` and windows ``>= 0`` every query sees at least itself, so no exported
    function ever meets a query row without keys.
    """
    from ..attention import check_pattern, check_qkv, check_scale  # attention imports the backends

    check_qkv(q, k, v)
    return check_pattern(pattern, q, k), check_scale(scale, q.dtype)


def check_band_args(q, k, v, left, right, scale) -> float:
    """The checks of a band function ``band_fn(q, k, v, left, right, scale)``; returns the scale."""
    from ..attention import check_qkv, check_scale

    check_qkv(q, k, v)
    check_int("left", left, 0)
    check_int("right", right, 0)
    return check_scale(scale, q.dtype)
