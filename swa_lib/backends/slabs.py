"""The arithmetic of one slab of blocked band attention, forward and backward, two ways.

A slab is ``ns`` query blocks ``q (ns, Bq, D)`` against their key and value bands
``k, v (ns, L, D)`` (:mod:`swa_lib.backends.bands`). Its attention is ``softmax(scale * q k^T +
mask) v``, the mask being the band mask all interior blocks share (``static``, ``(Bq, L)``,
0 or -inf) plus exact masks for the few edge blocks.

* **Step by step** (:func:`explicit_forward`, :func:`explicit_backward`): a batched product
  for the scores (the shared mask riding along as its additive input), a softmax, a batched
  product with the values, each writing a buffer the size of the slab's scores. Any device and
  dtype; this is what chapter 5 derives.
* **Fused** (:func:`fused_forward`): the same slab handed to PyTorch's FlashAttention kernel
  for the CPU (``aten::_scaled_dot_product_flash_attention_for_cpu``), with the blocks as its
  batch and the bands as strided views (no copies). It walks each block's band in tiles with
  an online softmax, so the scores never leave the cache. Used for the forward pass on CPU
  tensors of float32/float64 with equal head dims when the kernel exists
  (:func:`fused_available`). Its backward counterpart was measured slower than the step-by-step
  backward on these slabs (and takes no gradient through the log-sum-exp), so the backward is
  always step by step.

Both return the log-sum-exp of every row, in natural log, over the visible keys.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["fused_available", "additive_mask", "fused_forward", "explicit_forward", "explicit_backward"]

_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _FUSED is not None and "attn_mask" not in str(_FUSED.default._schema):
    _FUSED = None  # PyTorch releases before the kernel took a mask


def fused_available(q: torch.Tensor, d_v: int) -> bool:
    """Whether the fused CPU kernel can run slabs of these (compute-dtype) queries."""
    return (_FUSED is not None and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.float64) and q.shape[-1] == d_v)


def additive_mask(static: Optional[torch.Tensor], edges: list, ns: int, like: torch.Tensor) -> torch.Tensor:
    """The slab's mask as 0/-inf, the one both ways of computing a slab take: ``static (Bq, L)``
    for all blocks, with the exact masks ``[(a, b, allowed (b - a, Bq, L))]`` of edge blocks
    ``a .. b - 1`` on top, as ``(ns, 1, Bq, L)`` when there are edge blocks (else the shared
    ``static`` itself)."""
    if not edges:
        return static
    bq, band = edges[0][2].shape[1:]
    mask = like.new_zeros(ns, bq, band) if static is None else static.expand(ns, -1, -1).clone()
    for a, b, allowed in edges:
        mask[a:b].masked_fill_(~allowed, float("-inf"))
    return mask[:, None]


def fused_forward(qb, kb, vb, mask, scale: float, o_dest, m_dest) -> None:
    """Write the slab's output into ``o_dest (ns, Bq, Dv)`` and its log-sum-exp into
    ``m_dest (ns, Bq, 1)`` unless it is None."""
    o, lse = _FUSED(qb[:, None], kb[:, None], vb[:, None], 0.0, False, attn_mask=mask, scale=scale)
    o_dest.copy_(o[:, 0])
    if m_dest is not None:
        m_dest.copy_(lse[:, 0, :, None])


def _scores(qb, kb, mask, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Masked scores ``(ns, Bq, L)`` into ``out``: the slab's mask (:func:`additive_mask`) rides
    along in the product as its additive input."""
    m = mask.expand(qb.shape[0], -1, -1) if mask.dim() == 2 else mask[:, 0]
    return torch.baddbmm(m, qb, kb.transpose(1, 2), alpha=scale, out=out)


def explicit_forward(qb, kb, vb, mask, scale: float, s: torch.Tensor, o_dest, m_dest) -> None:
    """The slab step by step: scores into the buffer ``s (ns, Bq, L)``, softmax in place,
    output into ``o_dest``; the log-sum-exp into ``m_dest`` unless it is None."""
    _scores(qb, kb, mask, scale, s)
    if m_dest is not None:
        torch.amax(s, -1, keepdim=True, out=m_dest)
    torch.ops.aten._softmax.out(s, -1, False, out=s)  # every row sees a key: finite
    torch.bmm(s, vb, out=o_dest)
    if m_dest is not None:  # lse = S_max - log P_max: P at the arg max is exp(S_max - lse)
        m_dest.sub_(s.amax(-1, keepdim=True).log_())


def explicit_backward(dob, qb, kb, vb, deltab, mask, scale: float, s: torch.Tensor, ds: torch.Tensor,
                      dq_dest, dk_band, dv_band, accumulate: bool) -> None:
    """The slab's gradients step by step (FlashAttention's backward formulas), recomputing the
    probabilities into the buffer ``s`` and the score gradients into ``ds`` (both ``(ns, Bq,
    L)``). ``deltab (ns, Bq, 1)``: ``rowsum(dO * O)`` minus the gradient arriving through the
    log-sum-exp."""
    _scores(qb, kb, mask, scale, s)
    p = torch.ops.aten._softmax.out(s, -1, False, out=s)
    beta = 1 if accumulate else 0
    dv_band.baddbmm_(p.transpose(1, 2), dob, beta=beta)  # dV_band = P^T dO
    # dS = P * (dP - delta) with dP = dO V^T (the delta rides along in the product); the
    # score scale goes into the products with dS.
    torch.baddbmm(deltab.neg().expand(-1, -1, p.shape[2]), dob, vb.transpose(1, 2), out=ds).mul_(p)
    torch.baddbmm(dq_dest, ds, kb, beta=0, alpha=scale, out=dq_dest)
    dk_band.baddbmm_(ds.transpose(1, 2), qb, beta=beta, alpha=scale)
