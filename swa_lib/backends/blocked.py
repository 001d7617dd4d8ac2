"""Blocked band attention: each block of queries attends to one contiguous band of keys.

The CPU workhorse of swa_lib (``backend="blocked"``). Cut the queries into blocks of ``Bq``
rows. The keys any row of block ``t`` may see lie in one contiguous band of
``L = Bq + left + right`` positions, so a block costs two ordinary matrix products,
``(Bq, D) @ (D, L)`` and ``(Bq, L) @ (L, Dv)``. Waste: each row computes ``L`` scores of which
``left + right + 1`` are in its window, a ratio ``(Bq + left + right) / (left + right + 1)``
(1.12 for ``Bq = 64``, window (256, 256)), against 2x for Longformer's overlapping chunks
(:mod:`swa_lib.backends.chunked`).

Picture for ``Bq = 2``, window ``(1, 1)``: block 0 holds queries 0-1, its band is keys -1..2
(key -1 does not exist: masked), block 1 holds queries 2-3 and its band is keys 1..4::

    keys:     -1  0  1  2  3  4  5
    block 0:  [p  x  x  x]             row 0 sees keys -1..1, row 1 sees 0..2
    block 1:        [x  x  x  x]       bands overlap by left + right keys
    block 2:              [x  x  x  x]

The bands of consecutive blocks start ``Bq`` keys apart, so they are one strided view of the
keys (:func:`~swa_lib.backends.bands.band_view`, no copy), and ``torch.baddbmm`` multiplies a
whole *slab* of blocks at once, with the one band mask all interior blocks share riding along
as the product's additive input. Only the few blocks at the ends of the sequence are copied
and masked exactly (:mod:`swa_lib.backends.bands` has the geometry). On a CPU (when this PyTorch has
the kernel and ``D == D_v``) the forward hands each slab to PyTorch's fused FlashAttention kernel
instead, which keeps the scores in cache
(:mod:`swa_lib.backends.slabs` has both ways of computing a slab).

Work sharing: the slabs of all heads are independent pieces, run by
:func:`~swa_lib.backends.workers.run_pieces` on every thread, each piece single-threaded, so
that one attention call is not hundreds of parallel regions that all wait for the slowest
thread (which, on a machine with other programs running, may not be running at all).

Backward is a ``torch.autograd.Function`` in the FlashAttention style: the forward keeps only
the inputs and the output, and the backward recomputes the probabilities one slab at a time
(step by step, which measured faster than the fused kernel's backward).
A piece of the backward is a run of slabs of one key/value head; it folds the key and value
gradients of its overlapping bands into its own buffer, and the buffers are added up in a
fixed order at the end, so gradients do not depend on which thread ran what. Nothing of size
``(N, N)`` is ever built: memory is O(N * D) plus a slab of scores per thread.

Dilation and global tokens are not handled here; :mod:`swa_lib.backends.extensions` builds them on top
of the plain band (:func:`band_attention`), which also returns the log-sum-exp for that reason.

Supported: CPU and CUDA tensors (the speed is tuned for CPU), float64/float32 natively,
float16/bfloat16 computed in float32; grouped-query attention; fewer queries than keys.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import torch

from .bands import DEFAULT_BLOCK_SIZE, Plan, band_view, fold, make_plan, padded_rows, rows_view
from .common import (check_backend_args, check_band_args, compute_dtype, empty_output, in_compute_dtype,
                     refuse_double_backward)
from .slabs import additive_mask, explicit_backward, explicit_forward, fused_available, fused_forward
from .workers import run_pieces, scratch_buffer, worker_count
from ..masks import AttentionPattern, check_int

__all__ = ["blocked_attention", "band_attention", "DEFAULT_BLOCK_SIZE", "FUSED_BLOCK_SIZE"]

#: Below this many scores per call the pieces run on the calling thread (waking workers would
#: cost more than they save).
SHARE_SCORES = 1 << 17
#: Query rows per block and the most scores per slab of the fused forward (measured best on
#: CPUs; the kernel tiles each band itself and never holds the scores, so smaller blocks waste
#: less, and every slab is one kernel call, with its own set-up and output to copy: the fewer,
#: the better, as long as every worker gets a few, :data:`PIECES_PER_WORKER`).
FUSED_BLOCK_SIZE = 32
FUSED_SLAB_SCORES = 1 << 23
#: Slabs per thread the fused forward aims for over all heads, so that a worker slowed down by
#: another program leaves its share of the later pieces to the others.
PIECES_PER_WORKER = 4
#: Mask entries kept for later calls, in all (16 MiB in float32).
MASK_CACHE_SCORES = 1 << 22
_KEPT: OrderedDict = OrderedDict()  # (plan, slab or None, device, dtype) -> additive mask
_KEPT_LOCK = threading.Lock()


def _kept_mask(key: tuple, build, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask ``build()`` makes for ``key``, kept (never modified by its users) for the next
    head and the next call with the same geometry while the kept masks fit
    :data:`MASK_CACHE_SCORES`, least recently used out first. Building one costs a few
    small tensor operations per slab, which add up for short sequences and for the few
    hundred microseconds a long call spends outside its worker threads. Tensors of
    subclasses (fake tensors while ``torch.compile`` traces) are never kept."""
    with _KEPT_LOCK:
        mask = _KEPT.get(key)
        if mask is not None:
            _KEPT.move_to_end(key)
            return mask
    mask = build()
    if mask is not None and type(like) is torch.Tensor and mask.numel() <= MASK_CACHE_SCORES:
        with _KEPT_LOCK:
            _KEPT[key] = mask
            kept = sum(m.numel() for m in _KEPT.values())
            while kept > MASK_CACHE_SCORES:
                kept -= _KEPT.popitem(last=False)[1].numel()
    return mask


def _blocks(x: torch.Tensor, b: int, h: int, row: int, count: int, size: int, step: int) -> torch.Tensor:
    """``count`` runs of ``size`` rows of head ``h`` of ``x (B, H, N, D)`` (last dim contiguous),
    the first starting at ``row``, the next ``step`` rows further on: a view ``(count, size, D)``
    (the same as :func:`~swa_lib.backends.bands.band_view` of that head's rows, in one call)."""
    sb, sh, sn, _ = x.stride()
    return x.as_strided((count, size, x.shape[3]), (step * sn, sn, 1),
                        x.storage_offset() + b * sb + h * sh + row * sn)


class _Call:
    """One call's tensors (compute dtype, last dim contiguous), its plan, and the order in
    which its pieces are handed out."""

    def __init__(self, q, k, v, left: int, right: int, scale: float, block: Optional[int], fused: bool = True):
        cdt = compute_dtype(q.dtype)
        self.q, self.k, self.v = (in_compute_dtype(x, cdt) for x in (q, k, v))
        self.batch, self.heads, self.n_q, self.d = q.shape
        self.heads_kv, self.d_v = k.shape[1], v.shape[3]
        self.group = self.heads // self.heads_kv
        self.scale = scale
        self.fused = fused and fused_available(self.q, self.d_v)
        slabs = 1
        if self.fused:
            block = FUSED_BLOCK_SIZE if block is None else block
            slabs = -(-PIECES_PER_WORKER * torch.get_num_threads() // (self.batch * self.heads))
        self.plan: Plan = make_plan(self.n_q, k.shape[2], left, right, block,
                                    slab_scores=FUSED_SLAB_SCORES if self.fused else None, min_slabs=slabs)
        work = self.batch * self.heads * self.plan.num_blocks * self.plan.block * self.plan.band
        self.share = work >= SHARE_SCORES

    def order(self, heads: int) -> list:
        """Pieces ``(head, slab)`` for ``heads`` heads, largest slabs first, so that the last
        pieces handed out are small and no worker is left alone with a big one at the end."""
        segs = self.plan.segments
        return sorted(((h, i) for h in range(heads) for i in range(len(segs))),
                      key=lambda hi: segs[hi[1]][0] - segs[hi[1]][1])

    def mask(self, seg: int) -> torch.Tensor:
        """Slab ``seg``'s additive mask: the shared band mask, with exact masks for its edge
        blocks (with stride 0, for all of them) on top. It depends on the plan only, so it
        is built once for all heads and kept for later calls (:func:`_kept_mask`)."""
        plan, q = self.plan, self.q
        static = _kept_mask((plan, None, q.device, q.dtype), lambda: plan.static_mask(q.device, q.dtype), q)
        t0, t1 = plan.segments[seg]
        ranges = plan.edges(t0, t1) if plan.stride else [(t0, t1)]
        if not ranges:  # an interior slab: the band mask alone
            return static

        def build() -> torch.Tensor:
            edges = [(a - t0, b - t0, plan.exact_mask(a, b, q.device)) for a, b in ranges]
            return additive_mask(static, edges, t1 - t0, q)

        return _kept_mask((plan, seg, q.device, q.dtype), build, q)

    def inputs(self, b: int, h: int, seg: int, extra=()):
        """Queries ``(ns, Bq, D)`` of head ``h`` in slab ``seg``, key and value bands
        ``(ns, L, D)`` of its key/value head, and any ``extra`` per-query tensors ``(N_q, ...)``
        of that head as ``(ns, Bq, ...)``. Views, or zero-padded copies of the few rows a slab
        reads past either end."""
        plan, hk = self.plan, h // self.group
        t0, t1 = plan.segments[seg]
        ns = t1 - t0
        first, count = plan.first_key(t0), (ns - 1) * plan.block + plan.band
        if plan.stride and first >= 0 and first + count <= plan.n_k and t1 * plan.block <= self.n_q:
            # the common case, an interior slab of whole blocks: one strided view of each
            # tensor, straight from the call's (B, H, N, D) tensors
            return (_blocks(self.q, b, h, t0 * plan.block, ns, plan.block, plan.block),
                    _blocks(self.k, b, hk, first, ns, plan.band, plan.block),
                    _blocks(self.v, b, hk, first, ns, plan.band, plan.block),
                    *(rows_view(x[t0 * plan.block : t1 * plan.block], plan, ns) for x in extra))
        k, v = self.k[b, hk], self.v[b, hk]
        if plan.stride:
            k, v = padded_rows(k, first, count), padded_rows(v, first, count)
        blocks = [rows_view(padded_rows(x, t0 * plan.block, ns * plan.block), plan, ns)
                  for x in (self.q[b, h], *extra)]
        return (blocks[0], band_view(k, plan, ns), band_view(v, plan, ns), *blocks[1:])

    def rows(self, dest: torch.Tensor, seg: int, scratch: dict, name: str) -> torch.Tensor:
        """Where slab ``seg`` writes its per-row results ``(ns, Bq, width)`` for ``dest (N_q,
        width)``: a view of ``dest`` for whole blocks, else a worker buffer (see :meth:`store`)."""
        t0, t1 = self.plan.segments[seg]
        if t1 * self.plan.block <= self.n_q:
            return rows_view(dest[t0 * self.plan.block : t1 * self.plan.block], self.plan, t1 - t0)
        return scratch_buffer(scratch, name, (t1 - t0, self.plan.block, dest.shape[1]), dest)

    def store(self, dest: torch.Tensor, seg: int, value: torch.Tensor) -> None:
        """Copy the real rows of ``value`` to ``dest`` unless :meth:`rows` gave a view of it."""
        t0, t1 = self.plan.segments[seg]
        lo, hi = t0 * self.plan.block, min(t1 * self.plan.block, self.n_q)
        if t1 * self.plan.block > self.n_q:
            dest[lo:hi] = value.flatten(0, 1)[: hi - lo]


class _BandFunction(torch.autograd.Function):
    """``(out, lse) = band(q, k, v)`` with a recomputing backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, left: int, right: int, scale: float, block: Optional[int], with_lse: bool):
        call = _Call(q, k, v, left, right, scale, block)
        plan = call.plan
        out = torch.empty(call.batch, call.heads, call.n_q, call.d_v, dtype=call.q.dtype, device=q.device)
        lse = torch.empty(call.batch, call.heads, call.n_q, 1, dtype=out.dtype, device=q.device) if with_lse else None
        order = call.order(call.batch * call.heads)

        def piece(i: int, scratch: dict) -> None:
            bh, seg = order[i]
            b, h = divmod(bh, call.heads)
            qb, kb, vb = call.inputs(b, h, seg)
            o = call.rows(out[b, h], seg, scratch, "o")
            m = call.rows(lse[b, h], seg, scratch, "m") if with_lse else None
            if call.fused:
                fused_forward(qb, kb, vb, call.mask(seg), call.scale, o, m)
            else:
                s = scratch_buffer(scratch, "s", (qb.shape[0], plan.block, plan.band), out)
                explicit_forward(qb, kb, vb, call.mask(seg), call.scale, s, o, m)
            call.store(out[b, h], seg, o)
            if with_lse:
                call.store(lse[b, h], seg, m)

        run_pieces(len(order), piece, share=call.share)
        ctx.save_for_backward(call.q, call.k, call.v, out)
        ctx.args, ctx.dtypes = (left, right, scale, block), (q.dtype, k.dtype, v.dtype)
        ctx.set_materialize_grads(False)
        if with_lse:
            lse = lse[..., 0]
        else:
            lse = out.new_empty(0)
            ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        refuse_double_backward("blocked")
        q, k, v, out = ctx.saved_tensors
        # step by step: measured faster than the fused kernel's backward on these slabs
        call = _Call(q, k, v, *ctx.args, fused=False)
        plan, segs = call.plan, call.plan.segments
        if d_out is None:
            d_out = torch.zeros_like(out)
        d_out = in_compute_dtype(d_out, q.dtype)
        d_lse = d_lse.to(q.dtype)[..., None] if d_lse is not None and d_lse.numel() else None
        dq = torch.empty_like(q)
        kv_heads = call.batch * call.heads_kv
        runs = _runs(len(segs), kv_heads, worker_count(len(segs) * kv_heads))
        sums: list = [None] * (kv_heads * len(runs))

        def piece(i: int, scratch: dict) -> None:
            bk, r = divmod(i, len(runs))
            b, hk = divmod(bk, call.heads_kv)
            start = segs[runs[r][0]][0]  # the run's first block: its band starts the sums
            rows = (segs[runs[r][-1]][1] - start - 1 + -(-plan.band // plan.block)) * plan.block
            dk_sum = q.new_zeros(rows if plan.stride else plan.n_k, call.d)
            dv_sum = q.new_zeros(dk_sum.shape[0], call.d_v)
            for seg in runs[r]:
                ns = segs[seg][1] - segs[seg][0]
                dk_band = scratch_buffer(scratch, "dk", (ns, plan.band, call.d), q)
                dv_band = scratch_buffer(scratch, "dv", (ns, plan.band, call.d_v), q)
                mask = call.mask(seg)
                for g in range(call.group):  # the query heads of this key/value head, in order
                    h = hk * call.group + g
                    extra = (d_out[b, h], out[b, h]) + (() if d_lse is None else (d_lse[b, h],))
                    qb, kb, vb, dob, ob, *dlb = call.inputs(b, h, seg, extra=extra)
                    # delta_i = sum_t P_it dP_it = dO_i . O_i, minus the gradient through lse_i
                    deltab = (dob * ob).sum(-1, keepdim=True)
                    if dlb:
                        deltab -= dlb[0]
                    s = scratch_buffer(scratch, "s", (ns, plan.block, plan.band), q)
                    dqb = call.rows(dq[b, h], seg, scratch, "dq")
                    explicit_backward(dob, qb, kb, vb, deltab, mask, call.scale, s,
                                      scratch_buffer(scratch, "ds", s.shape, q), dqb, dk_band, dv_band, accumulate=g > 0)
                    call.store(dq[b, h], seg, dqb)
                fold(dk_sum, dk_band, plan, segs[seg][0] - start)
                fold(dv_sum, dv_band, plan, segs[seg][0] - start)
            sums[i] = (plan.first_key(start), dk_sum, dv_sum)

        run_pieces(len(sums), piece, share=call.share)
        dk, dv = torch.empty_like(k), torch.empty_like(v)

        def add_up(bk: int, scratch: dict) -> None:  # in a fixed order: the same bits every run
            b, hk = divmod(bk, call.heads_kv)
            dk[b, hk].zero_()
            dv[b, hk].zero_()
            for first, dk_sum, dv_sum in sums[bk * len(runs) : (bk + 1) * len(runs)]:
                lo, hi = max(first, 0), min(first + dk_sum.shape[0], plan.n_k)
                dk[b, hk, lo:hi] += dk_sum[lo - first : hi - first]
                dv[b, hk, lo:hi] += dv_sum[lo - first : hi - first]

        run_pieces(kv_heads, add_up, share=call.share)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None, None, None, None


def _runs(count: int, kv_heads: int, workers: int) -> list:
    """Cut the slabs ``0 .. count - 1`` of one key/value head into runs of consecutive slabs
    (the pieces of the backward): about four runs per worker over all ``kv_heads``."""
    per_head = min(count, max(1, -(-4 * workers // kv_heads)))
    size = -(-count // per_head)
    return [list(range(i, min(count, i + size))) for i in range(0, count, size)]


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
        block_size: query rows per block (default :data:`DEFAULT_BLOCK_SIZE`, and
            :data:`FUSED_BLOCK_SIZE` for the fused CPU forward).
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

    Time O(B * H * N_q * (Bq + left + right) * D), memory O(N * D) plus one slab of scores per
    thread. Patterns with dilation, global tokens or sinks go through
    :mod:`swa_lib.backends.extensions`.
    """
    pattern, scale = check_backend_args(q, k, v, pattern, scale)
    empty = empty_output(q, k, v)
    if empty is not None:
        return empty
    if not pattern.is_plain:
        from .extensions import extended_attention

        return extended_attention(_band, q, k, v, pattern, scale)
    return _band(q, k, v, pattern.left, pattern.right, scale, with_lse=False)[0]
