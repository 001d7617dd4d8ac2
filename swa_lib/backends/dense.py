"""Dense attention with a mask: compute all N_q x N_k scores, then throw most of them away.

This is the obvious way to get sliding window attention out of ordinary attention, and the
baseline every faster backend is measured against. Time and memory are O(N_q * N_k) whatever
the window, which is exactly the cost sliding windows exist to avoid (chapter 1).

Two routes:

* :func:`dense_attention` spells the computation out (scores, mask, softmax, weighted sum) so
  the book can show every step; it is exact in any floating dtype.
* :func:`sdpa_attention` hands the same boolean mask to PyTorch's
  ``scaled_dot_product_attention``, a strong peer on CPU and GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import check_backend_args, compute_dtype, empty_output
from ..masks import AttentionPattern

__all__ = ["dense_attention", "sdpa_attention", "masked_softmax", "expand_kv"]


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat key/value heads for grouped-query attention: (B, H_kv, N, D) -> (B, H, N, D)."""
    heads_kv = x.shape[1]
    if heads_kv == heads:
        return x
    return x.repeat_interleave(heads // heads_kv, dim=1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where ``mask`` is True; rows with no True entry give zeros.

    (``torch.softmax`` of a row that is all ``-inf`` is NaN; here such a row is defined as
    attending to nothing, so it contributes zeros and passes zero gradient.)
    """
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)  # exp(-inf) = 0 for masked entries
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern, scale: float
) -> torch.Tensor:
    """Masked full attention: ``softmax(mask(Q K^T * scale)) V``.

    Shapes as in :func:`swa_lib.sliding_window_attention`. Builds the full
    ``(B, H, N_q, N_k)`` score matrix: O(N^2) time and memory. Half-precision inputs are computed
    in float32 (large scores would overflow float16) and the output is rounded back once.
    Arguments are checked as :func:`swa_lib.sliding_window_attention` checks them.
    """
    pattern, scale = check_backend_args(q, k, v, pattern, scale)
    empty = empty_output(q, k, v)
    if empty is not None:
        return empty
    heads, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    acc = compute_dtype(q.dtype)
    k, v = expand_kv(k, heads).to(acc), expand_kv(v, heads).to(acc)  # (B, H, N_k, D)
    mask = pattern.mask(n_q, n_k, num_heads=heads, device=q.device)  # (B|1, H|1, N_q, N_k)
    scores = torch.matmul(q.to(acc), k.transpose(-2, -1)) * scale  # (B, H, N_q, N_k)
    weights = masked_softmax(scores, mask)  # (B, H, N_q, N_k)
    return torch.matmul(weights, v).to(q.dtype)  # (B, H, N_q, D_v), rounded once


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern, scale: float
) -> torch.Tensor:
    """The same computation through ``torch.nn.functional.scaled_dot_product_attention``.

    The boolean band mask is materialised (O(N^2) memory), so SDPA can only use its
    math or memory-efficient kernels, not FlashAttention. Two windows need no mask and skip
    it: one that lets every query see every key (full attention, e.g. a decoding step whose
    window covers the whole cache) and a window ``(>= N - 1, 0)`` over ``N`` queries and keys,
    which is ``is_causal=True``. Every query sees at least itself, so no row is fully masked
    (for one, SDPA's math path gives zeros, as :func:`masked_softmax` does).
    Arguments are checked as :func:`swa_lib.sliding_window_attention` checks them.
    """
    pattern, scale = check_backend_args(q, k, v, pattern, scale)
    empty = empty_output(q, k, v)
    if empty is not None:
        return empty
    heads, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    k, v = expand_kv(k, heads), expand_kv(v, heads)
    if pattern.is_plain and pattern.left >= n_k - 1:
        # The window reaches back past key 0 for every query: no mask to build.
        if pattern.right >= n_q - 1:  # ... and forward past the last key: plain attention
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if pattern.right == 0 and n_q == n_k:  # ... and not forward at all: causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = pattern.mask(n_q, n_k, num_heads=heads, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
