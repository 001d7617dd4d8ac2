"""An :class:`~swa_lib.AttentionPattern` as a FlexAttention ``mask_mod`` and ``BlockMask``.

PyTorch's FlexAttention (``torch.nn.attention.flex_attention``) takes "who sees whom" as a
``mask_mod(b, h, q_idx, kv_idx) -> bool`` and, for speed, a ``BlockMask`` listing the tiles
that hold any allowed pair. This module writes both from swa_lib's one definition, so a pattern
built once runs on either library::

    import swa_lib
    from swa_lib.integrations import flex

    pattern = swa_lib.make_pattern((64, 0), sinks=4, batch=B, heads=H, n=N_k)
    out = flex.flex_attention(q, k, v, pattern)  # == swa_lib.sliding_window_attention(
    #                                                   q, k, v, (64, 0), sinks=4)
    block_mask = flex.to_block_mask(pattern, N_q, N_k, device="cuda")  # or build it yourself

Every feature carries over: the inclusive ``(left, right)`` window, dilation (one value, or one
per query head: the mask then depends on ``h``), sinks, global tokens (per batch row: the mask
depends on ``b``) and fewer queries than keys, with swa_lib's bottom-right alignment (query row
``r`` is position ``r + N_k - N_q``). The ``mask_mod`` is written for FlexAttention's index
tensors: no Python branch on a tensor value, only tensors captured for per-head dilation and
global tokens, so it also compiles (``torch.compile(flex_attention)``, the fast path on a GPU).

Limits: ``create_block_mask`` evaluates the ``mask_mod`` on the whole ``N_q x N_k`` grid once
(for long sequences, compile it, as PyTorch's documentation advises), and FlexAttention without
``torch.compile`` is PyTorch's dense reference (O(N^2) memory), meant for checking, not speed.
PyTorch is imported lazily: ``import swa_lib`` does not load FlexAttention.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..attention import check_pattern, check_qkv, check_scale
from ..masks import AttentionPattern, check_int

__all__ = ["to_mask_mod", "to_block_mask", "flex_attention"]

#: FlexAttention's default tile size (``_DEFAULT_SPARSE_BLOCK_SIZE`` in torch 2.5 and later).
BLOCK_SIZE = 128


def _checked(pattern, n_q, n_k, device) -> tuple[int, int, torch.device]:
    """``(n_q, n_k, device)`` checked against ``pattern``, with the defaults filled in: ``n_k``
    is ``n_q``, the device the global tokens' device, else FlexAttention's default (the
    current accelerator, or the CPU)."""
    if not isinstance(pattern, AttentionPattern):
        raise TypeError(f"pattern must be a swa_lib.AttentionPattern (see swa_lib.make_pattern), "
                        f"got {type(pattern).__name__}")
    n_q = check_int("n_q", n_q, 1)
    n_k = n_q if n_k is None else check_int("n_k", n_k, 1)
    if n_q > n_k:
        raise ValueError(f"more queries than keys is not supported: n_q={n_q} > n_k={n_k}")
    g = pattern.global_tokens
    if g is not None and g.shape[1] != n_k:
        raise ValueError(f"pattern.global_tokens has {g.shape[1]} positions but there are n_k={n_k} keys")
    if device is not None:
        device = torch.device(device)
    elif g is not None:
        device = g.device
    else:
        device = torch.accelerator.current_accelerator() or torch.device("cpu")
    return n_q, n_k, device


def to_mask_mod(pattern: AttentionPattern, n_q: int, n_k: Optional[int] = None, *,
                device=None) -> Callable:
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` for ``pattern`` with ``n_q`` queries
    against ``n_k`` keys (default ``n_q``): True exactly where
    ``pattern.allows(q_idx + n_k - n_q, kv_idx, head=h, batch=b)``.

    ``device`` is where the captured tensors (per-head dilation, global tokens) live: the
    device the mask is evaluated on (default: see :func:`to_block_mask`). TypeError/ValueError
    for a pattern that does not fit the lengths.
    """
    return _mask_mod(pattern, *_checked(pattern, n_q, n_k, device))


def _mask_mod(pattern: AttentionPattern, n_q: int, n_k: int, device: torch.device) -> Callable:
    """:func:`to_mask_mod` for arguments :func:`_checked` has passed."""
    shift = n_k - n_q  # query row r is position r + shift
    # sizes beyond the sequence behave as the sequence's own (so they fit int32 index tensors)
    left, right, sinks = min(pattern.left, n_k), min(pattern.right, n_k), min(pattern.sinks, n_k)
    if isinstance(pattern.dilation, int):
        dilation, per_head = min(pattern.dilation, n_k), None
    else:
        dilation = None
        per_head = torch.tensor([min(d, n_k) for d in pattern.dilation], device=device)  # (H,)
    g = None if pattern.global_tokens is None else pattern.global_tokens.to(device)  # (B, n_k)

    def mask_mod(b, h, q_idx, kv_idx):
        i = q_idx + shift
        delta = i - kv_idx
        allowed = (delta <= left) & (-delta <= right)  # the window, i - left <= j <= i + right
        if per_head is not None:
            allowed = allowed & (delta % per_head[h] == 0)
        elif dilation > 1:
            allowed = allowed & (delta % dilation == 0)
        if sinks:
            allowed = allowed | ((kv_idx < sinks) & (kv_idx <= i + right))
        if g is not None:
            allowed = allowed | g[b, i] | g[b, kv_idx]
        return allowed

    return mask_mod


def to_block_mask(pattern: AttentionPattern, n_q: int, n_k: Optional[int] = None, *,
                  num_heads: Optional[int] = None, device=None, block_size=BLOCK_SIZE):
    """FlexAttention's ``BlockMask`` for ``pattern`` (``n_q`` queries, ``n_k`` keys).

    Its batch size is the global tokens' (else 1, broadcast over any batch) and its heads the
    per-head dilation's (else 1, broadcast over any heads); ``num_heads``, when given, is
    checked against a per-head dilation. ``device`` defaults to the global tokens' device, else
    FlexAttention's own default (the current accelerator, or the CPU): pass the queries'
    device. ``block_size`` is FlexAttention's ``BLOCK_SIZE`` (an int or a ``(q, kv)`` pair).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    n_q, n_k, device = _checked(pattern, n_q, n_k, device)
    heads = None
    if not isinstance(pattern.dilation, int):
        heads = len(pattern.dilation)
        if num_heads is not None and num_heads != heads:
            raise ValueError(f"pattern.dilation has {heads} entries (one per query head) "
                             f"but num_heads={num_heads}")
    batch = None if pattern.global_tokens is None else pattern.global_tokens.shape[0]
    return create_block_mask(_mask_mod(pattern, n_q, n_k, device), batch, heads, n_q, n_k,
                             device=device, BLOCK_SIZE=block_size)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern, *,
                   scale: Optional[float] = None, block_mask=None) -> torch.Tensor:
    """``pattern`` computed by PyTorch's FlexAttention: the same result as
    :func:`swa_lib.sliding_window_attention` for the pattern's arguments.

    Args:
        q: ``(B, H, N_q, D)``; k, v: ``(B, H_kv, N_k, D)``, ``(B, H_kv, N_k, D_v)``, with ``H`` a
            multiple of ``H_kv`` (FlexAttention's ``enable_gqa``) and ``N_q <= N_k``.
        pattern: e.g. from :func:`swa_lib.make_pattern` with ``batch=B, heads=H, n=N_k``.
        scale: score scale, default ``D ** -0.5``.
        block_mask: a ``BlockMask`` from :func:`to_block_mask` to reuse across calls
            (default: one built for this call on ``q``'s device).

    Returns:
        ``(B, H, N_q, D_v)``. Eager (uncompiled) FlexAttention is PyTorch's dense reference;
        wrap the call in ``torch.compile`` for the fused kernel.
    """
    from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

    check_qkv(q, k, v)
    pattern = check_pattern(pattern, q, k)
    scale = q.shape[-1] ** -0.5 if scale is None else check_scale(scale, q.dtype)
    if block_mask is None:
        block_mask = to_block_mask(pattern, q.shape[2], k.shape[2], num_heads=q.shape[1], device=q.device)
    return torch_flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
