"""Blocked band attention: each block of queries attends to one contiguous band of keys.

The CPU workhorse of swa_lib (``backend="blocked"``). Cut the queries into blocks of ``Bq``
rows. The keys any row of block ``t`` may see lie in one contiguous band of
``L = Bq + left + right`` positions, so a block costs two ordinary matrix products,
``(Bq, D) @ (D, L)`` and ``(Bq, L) @ (L, Dv)``. Waste: each row computes ``L`` scores of which
``left + right + 1`` are in its window, a ratio ``(Bq + left + right) / (left + right + 1)``
(1.12 for ``Bq = 64``, window (256, 256)), against 2x for Longformer's overlapping chunks
(:mod:`swa_lib.backends.chunked`).

Picture for ``Bq = 2``, window ``(1, 1)``: block 0 holds queries 0-1, its band is keys -1..2
(key -1 is padding, masked), block 1 holds queries 2-3 and its band is keys 1..4::

    keys:     -1  0  1  2  3  4  5
    block 0:  [p  x  x  x]             row 0 sees keys -1..1, row 1 sees 0..2
    block 1:        [x  x  x  x]       bands overlap by left + right keys
    block 2:              [x  x  x  x]

The bands of consecutive blocks start ``Bq`` keys apart, so after padding the keys they are
one strided view ``(num_blocks, L, D)`` with block stride ``Bq * D`` (``as_strided``, no copy),
and ``torch.bmm`` multiplies all blocks of a slab at once. Inside a band the window is the same
for every block (row ``r`` sees band columns ``r .. r + left + right``), so one ``(Bq, L)``
mask serves all blocks; only the few blocks whose band sticks out of the sequence get their
own mask.

Backward is a ``torch.autograd.Function`` in the FlashAttention style: the forward keeps only
the (padded) inputs and the output, and the backward recomputes the probabilities one slab at
a time. The key and value gradients of overlapping bands are folded back with
``ceil(L / Bq)`` shifted additions. Nothing of size ``(N, N)`` is ever built:
memory is O(N * D) for the padded copies plus O(slab) working space, where a slab holds about
``2**20`` scores.

Dilation and global tokens are not handled here; :mod:`swa_lib.backends.extensions` builds them on top
of the plain band (:func:`band_attention`), which also returns the log-sum-exp for that reason.

Supported: CPU and CUDA tensors (the speed is tuned for CPU), float64/float32 natively,
float16/bfloat16 computed in float32; grouped-query attention; fewer queries than keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .common import check_backend_args, check_band_args, compute_dtype, empty_output, refuse_double_backward
from ..masks import AttentionPattern, check_int

__all__ = ["blocked_attention", "band_attention", "DEFAULT_BLOCK_SIZE"]

#: Query rows per block. 64 keeps the band waste near 10% for windows of a few hundred keys
#: while each product is still large enough for an efficient GEMM.
DEFAULT_BLOCK_SIZE = 64
#: Scores held at once (one slab of blocks), about 4 MiB in float32.
SLAB_SCORES = 1 << 20


@dataclass(frozen=True)
class _Plan:
    """Geometry of one call: how queries are blocked and where each block's band lies."""

    n_q: int
    n_k: int
    left: int  # clipped to what can matter
    right: int
    block: int  # Bq
    num_blocks: int  # ceil(n_q / Bq)
    band: int  # L, keys per band
    stride: int  # first key of band t+1 minus first key of band t: Bq, or 0 when every band is all keys
    shift: int  # padded key index = key position + shift
    padded_keys: int  # length of the padded key sequence
    slab: int  # blocks per slab

    @property
    def offset(self) -> int:
        return self.n_k - self.n_q  # queries are the last n_q positions


def _plan(n_q: int, n_k: int, left: int, right: int, block: Optional[int]) -> _Plan:
    offset = n_k - n_q
    left = min(left, n_k - 1)  # the last query (position n_k - 1) reaches key 0 with n_k - 1
    right = min(right, n_k - 1 - offset)  # the first query (position offset) reaches n_k - 1
    if block is None:
        block = DEFAULT_BLOCK_SIZE
    block = max(1, min(block, n_q))
    num_blocks = -(-n_q // block)
    band = block + left + right
    if band >= n_k:
        # The band would cover the whole sequence: let every block see all keys (stride 0).
        band, stride, shift = n_k, 0, 0
        padded_keys = n_k
    else:
        stride = block
        # Band t starts at key position offset + t * Bq - left, i.e. padded index t * Bq.
        shift = left - offset
        padded_keys = (num_blocks - 1) * block + band
    slab = max(1, SLAB_SCORES // (block * band))
    return _Plan(n_q, n_k, left, right, block, num_blocks, band, stride, shift, padded_keys, slab)


def _allowed(plan: _Plan, blocks: torch.Tensor, device) -> torch.Tensor:
    """Exact mask ``(len(blocks), Bq, L)`` for the given query blocks (True = may attend).

    Padding rows (past the last query) are left fully visible so that they stay finite; their
    output is discarded.
    """
    r = torch.arange(plan.block, device=device)
    c = torch.arange(plan.band, device=device)
    row = blocks[:, None] * plan.block + r[None, :]  # (nb, Bq): query row index
    i = plan.offset + row  # query position
    if plan.stride:
        j = blocks[:, None] * plan.stride - plan.shift + c[None, :]  # (nb, L): key position
    else:
        j = c[None, :].expand(len(blocks), -1)
    i, j = i[:, :, None], j[:, None, :]
    ok = (j >= i - plan.left) & (j <= i + plan.right) & (j >= 0) & (j < plan.n_k)
    return ok | (row >= plan.n_q)[:, :, None]


class _Masks:
    """The masks of one call: a shared additive band mask plus exact masks for edge blocks."""

    def __init__(self, plan: _Plan, device, dtype):
        self.plan = plan
        if plan.stride:
            r = torch.arange(plan.block, device=device)[:, None]
            c = torch.arange(plan.band, device=device)[None, :]
            inside = (c >= r) & (c <= r + plan.left + plan.right)  # (Bq, L), same for all blocks
            self.static = torch.zeros(plan.block, plan.band, device=device, dtype=dtype)
            self.static.masked_fill_(~inside, float("-inf"))
            t = torch.arange(plan.num_blocks)
            first_key = t * plan.stride - plan.shift
            edge = (first_key < 0) | (first_key + plan.band > plan.n_k) | ((t + 1) * plan.block > plan.n_q)
            edges = t[edge]
        else:
            self.static = None
            edges = torch.arange(plan.num_blocks)
        self.edges = edges.tolist()
        self._cache: dict = {}
        self.device = device

    def slab_edges(self, t0: int, t1: int):
        """(local indices, masks) of the edge blocks in blocks [t0, t1), or None."""
        key = (t0, t1)
        if key not in self._cache:
            blocks = [t for t in self.edges if t0 <= t < t1]
            if not blocks:
                self._cache[key] = None
            else:
                b = torch.tensor(blocks, device=self.device)
                self._cache[key] = (b - t0, ~_allowed(self.plan, b, self.device))
        return self._cache[key]

    def scores(self, q_blocks, k_bands, t0: int, t1: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Masked scores ``q_blocks @ k_bands^T`` of blocks [t0, t1): ``(ns, Bq, L)``.

        The shared band mask rides along in the product (``baddbmm`` with the additive mask as
        its input), so it costs no extra pass over the scores.
        """
        if self.static is not None:
            s = torch.baddbmm(self.static.expand(t1 - t0, -1, -1), q_blocks, k_bands.transpose(1, 2), out=out)
        else:
            s = torch.bmm(q_blocks, k_bands.transpose(1, 2), out=out)
        self.apply(s, t0, t1, static=False)
        return s

    def apply(self, scores: torch.Tensor, t0: int, t1: int, static: bool = True) -> None:
        """Mask the scores ``(t1 - t0, Bq, L)`` of blocks [t0, t1) in place."""
        if static and self.static is not None:
            scores.add_(self.static)
        edges = self.slab_edges(t0, t1)
        if edges is not None:
            idx, hidden = edges
            scores[idx] = scores[idx].masked_fill(hidden, float("-inf"))


def _band_view(x: torch.Tensor, plan: _Plan, t0: int, t1: int) -> torch.Tensor:
    """Bands of blocks [t0, t1) of a contiguous padded ``(padded_keys, D)`` sequence: a view."""
    d = x.shape[-1]
    return x.as_strided(
        (t1 - t0, plan.band, d), (plan.stride * d, d, 1), x.storage_offset() + t0 * plan.stride * d
    )


def _pad_keys(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """(B, H_kv, n_k, D) -> (B, H_kv, padded_keys, D): key j at index j + shift (negative pads crop)."""
    if plan.stride == 0:
        return x.contiguous()
    back = plan.padded_keys - plan.shift - plan.n_k
    return F.pad(x, (0, 0, plan.shift, back)).contiguous()


def _unpad_keys(g: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Inverse of :func:`_pad_keys` for gradients (cropped keys get zero gradient)."""
    if plan.stride == 0:
        return g
    return F.pad(g, (0, 0, -plan.shift, plan.n_k + plan.shift - plan.padded_keys))


class _BandFunction(torch.autograd.Function):
    """``(out, lse) = band(q, k, v)`` with a recomputing backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, left: int, right: int, scale: float, block: Optional[int], with_lse: bool):
        batch, heads, n_q, _ = q.shape
        heads_kv, n_k, d_v = k.shape[1], k.shape[2], v.shape[3]
        group = heads // heads_kv
        cdt = compute_dtype(q.dtype)
        plan = _plan(n_q, n_k, left, right, block)
        masks = _Masks(plan, q.device, cdt)
        nb, bq = plan.num_blocks, plan.block
        # Queries, scaled once and padded to whole blocks: (B, H, nb, Bq, D).
        qs = F.pad(q.to(cdt), (0, 0, 0, nb * bq - n_q)).mul_(scale).reshape(batch, heads, nb, bq, -1)
        kp, vp = _pad_keys(k.to(cdt), plan), _pad_keys(v.to(cdt), plan)  # (B, H_kv, padded_keys, D)
        out = torch.empty(batch, heads, nb, bq, d_v, dtype=cdt, device=q.device)
        lse = torch.empty(batch, heads, nb, bq, dtype=cdt, device=q.device) if with_lse else None
        # Two slab buffers reused for every slab (fresh large allocations cost page faults).
        ns_max = min(plan.slab, nb)
        s_buf = torch.empty(ns_max, bq, plan.band, dtype=cdt, device=q.device)
        p_buf = torch.empty_like(s_buf)
        for b in range(batch):
            for h in range(heads):
                kh, vh = kp[b, h // group], vp[b, h // group]
                for t0 in range(0, nb, plan.slab):
                    t1 = min(nb, t0 + plan.slab)
                    kb, vb = _band_view(kh, plan, t0, t1), _band_view(vh, plan, t0, t1)  # (ns, L, D)
                    s, p = s_buf[: t1 - t0], p_buf[: t1 - t0]
                    masks.scores(qs[b, h, t0:t1], kb, t0, t1, out=s)  # masked scores (ns, Bq, L)
                    # Every row sees at least one key, so the softmax is finite. (softmax is
                    # fused and fast on -inf; exp_ of -inf or of large negatives is not.)
                    torch.ops.aten._softmax.out(s, -1, False, out=p)
                    torch.bmm(p, vb, out=out[b, h, t0:t1])
                    if with_lse:  # lse = S_max - log P_max: P at the arg max is exp(S_max - lse)
                        lse[b, h, t0:t1] = s.amax(-1) - torch.log(p.amax(-1))
        ctx.save_for_backward(qs, kp, vp, out)
        ctx.plan, ctx.masks, ctx.scale, ctx.group = plan, masks, scale, group
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.set_materialize_grads(False)
        out = out.reshape(batch, heads, nb * bq, d_v)[:, :, :n_q]
        if with_lse:
            lse = lse.reshape(batch, heads, nb * bq)[:, :, :n_q]
        else:
            lse = out.new_empty(0)
            ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        refuse_double_backward("blocked")
        qs, kp, vp, out = ctx.saved_tensors
        plan, masks, scale, group = ctx.plan, ctx.masks, ctx.scale, ctx.group
        batch, heads, nb, bq, d = qs.shape
        heads_kv, d_v = kp.shape[1], vp.shape[3]
        cdt = qs.dtype
        pad_q = nb * bq - plan.n_q
        if d_out is None:
            d_out = out.new_zeros(batch, heads, nb, bq, d_v)
        else:
            d_out = F.pad(d_out.to(cdt), (0, 0, 0, pad_q)).reshape(batch, heads, nb, bq, d_v)
        # delta_i = sum_t P_it dP_it = dO_i . O_i, minus the gradient arriving through lse_i.
        delta = (d_out * out).sum(-1)  # (B, H, nb, Bq)
        if d_lse is not None and d_lse.numel():
            delta = delta - F.pad(d_lse.to(cdt), (0, pad_q)).reshape(batch, heads, nb, bq)
        dq = torch.empty_like(qs)
        if plan.stride:
            segments = -(-plan.band // bq)  # each band is this many key blocks (last one partial)
            acc_len = (nb - 1 + segments) * bq
        else:
            segments, acc_len = 0, plan.n_k
        dk = kp.new_zeros(batch, heads_kv, acc_len, d)
        dv = vp.new_zeros(batch, heads_kv, acc_len, d_v)
        for b in range(batch):
            for h in range(heads):
                hk = h // group
                kh, vh = kp[b, hk], vp[b, hk]
                for t0 in range(0, nb, plan.slab):
                    t1 = min(nb, t0 + plan.slab)
                    kb, vb = _band_view(kh, plan, t0, t1), _band_view(vh, plan, t0, t1)
                    qb, dob = qs[b, h, t0:t1], d_out[b, h, t0:t1]  # (ns, Bq, D), (ns, Bq, Dv)
                    s = masks.scores(qb, kb, t0, t1)  # recompute the masked scores (ns, Bq, L)
                    p = torch.softmax(s, dim=-1)  # the forward's probabilities (ns, Bq, L)
                    dv_band = torch.bmm(p.transpose(1, 2), dob)  # (ns, L, Dv)
                    ds = torch.bmm(dob, vb.transpose(1, 2))  # dP (ns, Bq, L)
                    ds.sub_(delta[b, h, t0:t1, :, None]).mul_(p)  # dS = P * (dP - delta)
                    torch.bmm(ds, kb, out=dq[b, h, t0:t1])
                    dk_band = torch.bmm(ds.transpose(1, 2), qb)  # (ns, L, D)
                    _fold(dk[b, hk], dk_band, plan, t0, segments)
                    _fold(dv[b, hk], dv_band, plan, t0, segments)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        dq = dq.reshape(batch, heads, nb * bq, d)[:, :, : plan.n_q].mul_(scale)
        dk = _unpad_keys(dk[:, :, : plan.padded_keys], plan)
        dv = _unpad_keys(dv[:, :, : plan.padded_keys], plan)
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None, None, None, None


def _fold(acc: torch.Tensor, band_grad: torch.Tensor, plan: _Plan, t0: int, segments: int) -> None:
    """Add the gradients of overlapping bands ``(ns, L, D)`` into ``acc`` (padded keys, D).

    Band ``t`` covers padded keys ``[t * Bq, t * Bq + L)``: cut it into ``segments`` pieces of
    ``Bq`` keys; piece ``s`` of every band in the slab lands on key block ``t + s``, so one
    addition per piece handles the whole slab.
    """
    if plan.stride == 0:
        acc += band_grad.sum(0)  # every band is the whole sequence
        return
    bq, ns = plan.block, band_grad.shape[0]
    blocks = acc.view(-1, bq, acc.shape[-1])  # (acc_len / Bq, Bq, D)
    for s in range(segments):
        lo, hi = s * bq, min((s + 1) * bq, plan.band)
        blocks[t0 + s : t0 + s + ns, : hi - lo] += band_grad[:, lo:hi]


def band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    left: int,
    right: int,
    scale: float,
    *,
    block_size: Optional[int] = None,
    with_lse: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Plain band attention, returning the output and each row's log-sum-exp.

    Args:
        q: ``(B, H, N_q, D)``; k, v: ``(B, H_kv, N_k, D)``, ``(B, H_kv, N_k, D_v)`` with
            ``N_q <= N_k`` (queries are the last ``N_q`` positions) and ``H % H_kv == 0``.
        left, right: the inclusive window (any non-negative ints; values beyond the
            sequence are clipped).
        scale: score multiplier.
        block_size: query rows per block (default :data:`DEFAULT_BLOCK_SIZE`).
        with_lse: compute the log-sum-exp (else ``None`` is returned in its place).

    Returns:
        ``out (B, H, N_q, D_v)`` in q's dtype and ``lse (B, H, N_q)`` (float32 for half
        inputs), ``lse_i = log sum_j exp(scale * q_i . k_j)`` over the visible keys. Both are
        differentiable; the log-sum-exp lets callers merge further keys exactly
        (:mod:`swa_lib.backends.extensions`).

    Raises:
        TypeError / ValueError naming the argument, as :func:`swa_lib.sliding_window_attention`
        does (negative ``left``/``right``, ``N_q > N_k``, a bad ``scale`` or ``block_size``, ...).
    """
    scale = check_band_args(q, k, v, left, right, scale)
    if block_size is not None:
        check_int("block_size", block_size, 1)
    if not isinstance(with_lse, bool):
        raise TypeError(f"with_lse must be a bool, got {type(with_lse).__name__} {with_lse!r}")
    return _band(q, k, v, left, right, scale, block_size=block_size, with_lse=with_lse)


def _band(q, k, v, left: int, right: int, scale: float, *, block_size=None, with_lse=True):
    """:func:`band_attention` on checked arguments (the band function of :func:`blocked_attention`)."""
    if 0 in q.shape[:3]:  # B, H or N_q of 0: no rows (with D_v of 0 the rows' lse is still computed)
        return empty_output(q, k, v), (q.new_zeros(q.shape[:3], dtype=compute_dtype(q.dtype)) if with_lse else None)
    out, lse = _BandFunction.apply(q, k, v, int(left), int(right), float(scale), block_size, bool(with_lse))
    return out, (lse if with_lse else None)


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern, scale: float
) -> torch.Tensor:
    """The ``"blocked"`` backend: ``fn(q, k, v, pattern, scale) -> out``, shapes as in
    :func:`swa_lib.sliding_window_attention`, arguments checked as it checks them.

    Time O(B * H * N_q * (Bq + left + right) * D), memory O(N * D) plus one slab of scores.
    Patterns with dilation, global tokens or sinks go through :mod:`swa_lib.backends.extensions`.
    """
    pattern, scale = check_backend_args(q, k, v, pattern, scale)
    empty = empty_output(q, k, v)
    if empty is not None:
        return empty
    if not pattern.is_plain:
        from .extensions import extended_attention

        return extended_attention(_band, q, k, v, pattern, scale)
    return _band(q, k, v, pattern.left, pattern.right, scale, with_lse=False)[0]
