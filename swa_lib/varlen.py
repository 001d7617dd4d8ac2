"""Packed variable-length sequences: many documents in one tensor, no window crossing a border.

Training on packed documents puts several sequences end to end in one row, as FlashAttention's
"varlen" interface does: ``q`` is ``(total_q, H, D)``, all documents' tokens concatenated, and
``cu_seqlens_q = [0, n_0, n_0 + n_1, ...]`` says where each one starts. A sliding window over
the packed row would let the first tokens of a document see the last tokens of the previous
one; here each document is attended on its own, so a window never crosses a border.

Each document is one call of :func:`swa_lib.sliding_window_attention` on views of the packed
tensors (no copy of the inputs), so every backend, feature and the backward pass work as
they do there. The cost is one dispatch per document: right for documents of hundreds of
tokens or more; thousands of very short documents are better padded into a batch. The Triton
backend (named, or chosen by ``"auto"`` on a GPU) instead reads ``cu_seqlens`` itself: one
launch per kernel for all documents, whatever their number.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .attention import sliding_window_attention, validate_call
from .backends import choose_backend

__all__ = ["varlen_sliding_window_attention", "check_cu_seqlens"]


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int) -> list:
    """``cu`` as a list of offsets if it is a 1-D integer tensor ``[0, ..., total]`` that never
    decreases; otherwise a TypeError/ValueError naming ``name`` and the bad value."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32/int64 offsets, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must hold int32 or int64 offsets, got dtype {cu.dtype}")
    if cu.ndim != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries [0, ..., total], got shape {tuple(cu.shape)}")
    offsets = [int(x) for x in cu.tolist()]
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at the number of packed tokens {total}, got {offsets[-1]}")
    for d, (a, b) in enumerate(zip(offsets, offsets[1:])):
        if b < a:
            raise ValueError(f"{name} must not decrease: document {d} runs from {a} to {b}")
    return offsets


def varlen_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    window,
    *,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    dilation: Union[int, Sequence[int]] = 1,
    sinks: int = 0,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sliding window attention over packed documents.

    Args:
        q: ``(total_q, H, D)``, the documents' queries end to end.
        k, v: ``(total_k, H_kv, D)`` and ``(total_k, H_kv, D_v)``.
        cu_seqlens_q: ``(num_docs + 1,)`` int32/int64 offsets of the documents in ``q``.
        window: inclusive ``(left, right)`` as in :func:`swa_lib.sliding_window_attention`,
            applied inside each document.
        cu_seqlens_k: offsets in ``k``/``v`` (default: ``cu_seqlens_q``). A document may have
            fewer queries than keys (decoding against a cache): its queries are its last
            positions, as in the unpacked call.
        dilation, sinks, scale, backend: as in :func:`swa_lib.sliding_window_attention`;
            sinks are the first keys of each document.

    Returns:
        ``(total_q, H, D_v)`` in the dtype of ``q``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a packed (total, heads, head_dim) tensor, got {shape}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must hold the same tokens: k {tuple(k.shape)}, v {tuple(v.shape)}")
    starts_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"q packs {q.shape[0]} tokens and k {k.shape[0]}: pass cu_seqlens_k")
        starts_k = starts_q
    else:
        starts_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
        if len(starts_k) != len(starts_q):
            raise ValueError(f"cu_seqlens_q has {len(starts_q) - 1} documents, cu_seqlens_k {len(starts_k) - 1}")
    for d, (a, b, c, e) in enumerate(zip(starts_q, starts_q[1:], starts_k, starts_k[1:])):
        if b - a > e - c:
            raise ValueError(f"document {d} has {b - a} queries but only {e - c} keys")
    # (total, H, D) viewed as one sequence (1, H, total, D): the checks and the choice of backend
    views = [x.permute(1, 0, 2).unsqueeze(0) for x in (q, k, v)]
    pattern, scale_ = validate_call(*views, window, dilation=dilation, sinks=sinks, scale=scale)
    chosen = choose_backend(backend, views[0], views[1], pattern, views[2])
    if q.shape[0] == 0:  # no queries at all: checked like any call, as sliding_window_attention does
        return q.new_zeros(0, q.shape[1], v.shape[2])
    if chosen.name == "triton":
        from .backends.triton import triton_varlen_attention

        return triton_varlen_attention(q, k, v, starts_q, starts_k, pattern, scale_)
    pieces = []
    for d in range(len(starts_q) - 1):
        (a, b), (c, e) = starts_q[d : d + 2], starts_k[d : d + 2]
        if b == a:
            continue
        # (n, H, D) slices viewed as (1, H, n, D): no copy
        qd, kd, vd = (x[s:t].permute(1, 0, 2).unsqueeze(0) for x, s, t in ((q, a, b), (k, c, e), (v, c, e)))
        out = sliding_window_attention(qd, kd, vd, window, dilation=dilation, sinks=sinks, scale=scale,
                                       backend=backend)
        pieces.append(out[0].permute(1, 0, 2))
    return torch.cat(pieces)  # documents without queries add no rows: the pieces tile the output
