"""The loop reference: sliding window attention as a reader would compute it by hand.

Every fast backend in swa_lib is tested against :func:`loop_attention`. It is written for
clarity, not speed: plain Python loops over batch, heads and queries, and for each query a loop
over the keys the pattern allows (``AttentionPattern.allows``, the specification itself).
The arithmetic uses torch scalars, so autograd works and gradients can be checked too; half
precision inputs are computed in float32 and the result is rounded once at the end, as fused
attention kernels do.

Cost: for each query the predicate is asked only about the keys that can possibly be allowed
(the window, the sinks and the global tokens; every key for a global query), so the work is
O(B * H * N_q * (w + s + g)) Python-level calls plus one small tensor op per visible key. That
makes it thousands of times slower than one matrix product even though it does *less*
arithmetic than dense attention (chapter 3 measures this). Use it for N up to a few hundred.
"""

from __future__ import annotations

import torch

from .common import check_backend_args, compute_dtype, empty_output
from ..masks import AttentionPattern

__all__ = ["loop_attention"]


def loop_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern, scale: float
) -> torch.Tensor:
    """Sliding window attention with explicit loops.

    Args:
        q: ``(B, H, N_q, D)`` queries.
        k, v: ``(B, H_kv, N_k, D)`` and ``(B, H_kv, N_k, D_v)``; ``H`` must be a multiple of
            ``H_kv`` (grouped-query attention: query head h reads key/value head
            ``h // (H // H_kv)``).
        pattern: who sees whom (see :mod:`swa_lib.masks`).
        scale: multiplies the dot products (usually ``D ** -0.5``).

    Returns:
        ``(B, H, N_q, D_v)``. Arguments are checked as :func:`swa_lib.sliding_window_attention`
        checks them, so every query sees at least itself (a query that saw no key would get
        zeros, the convention of every backend and of PyTorch's SDPA).
    """
    pattern, scale = check_backend_args(q, k, v, pattern, scale)
    empty = empty_output(q, k, v)
    if empty is not None:  # B, H, N_q or D_v of 0: nothing to compute
        return empty
    out_dtype = q.dtype
    batch, heads, n_q, _ = q.shape
    heads_kv, n_k, d_v = k.shape[1], k.shape[2], v.shape[3]
    group = heads // heads_kv
    offset = n_k - n_q  # queries are the last n_q positions
    acc = compute_dtype(q.dtype)  # float16/bfloat16 are summed in float32
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    g = pattern.global_tokens  # (B, n_k) bool or None
    rows = []
    for b in range(batch):
        global_keys = set() if g is None else set(g[b].nonzero().flatten().tolist())
        for h in range(heads):
            h_kv = h // group
            for r in range(n_q):
                i = r + offset  # position of this query
                keys = [j for j in _candidates(i, n_k, pattern, global_keys)
                        if pattern.allows(i, j, head=h, batch=b)]
                if not keys:
                    rows.append(q.new_zeros(d_v))
                    continue
                # 1. one score per visible key: a dot product, scaled
                scores = torch.stack([(q[b, h, r] * k[b, h_kv, j]).sum() * scale for j in keys])
                # 2. softmax over the visible keys (subtract the max so exp cannot overflow)
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                # 3. the output is the weighted average of the visible values
                out = q.new_zeros(d_v)
                for weight, j in zip(weights, keys):
                    out = out + weight * v[b, h_kv, j]
                rows.append(out)
    return torch.stack(rows).reshape(batch, heads, n_q, d_v).to(out_dtype)


def _candidates(i: int, n_k: int, pattern: AttentionPattern, global_keys: set) -> list:
    """Keys query ``i`` could possibly see: its window, the sinks, the global keys (all keys if
    ``i`` is itself global). ``pattern.allows`` then decides; the rest are never asked about."""
    if i in global_keys:
        return list(range(n_k))
    window = range(max(0, i - pattern.left), min(n_k, i + pattern.right + 1))
    return sorted(set(window) | set(range(min(pattern.sinks, n_k))) | global_keys)
