"""Rules every backend follows: the dtype it computes in, and no silent double backward."""

from __future__ import annotations

import torch

__all__ = ["compute_dtype", "refuse_double_backward"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend computes scores, softmax and sums in: float32 for float16 and
    bfloat16 inputs (a float16 dot product overflows at 65504, long before softmax would), the
    input dtype for float32 and float64. Outputs are rounded back to the input dtype once."""
    return torch.promote_types(dtype, torch.float32)


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
