"""Layer 1, kernels: the ``@triton.jit`` kernels and the walks that feed tiles to their steps.

FlashAttention-2 style (Dao 2023): each program owns a tile of queries, streams key/value tiles
through on-chip memory with an online softmax, and writes the output and the row logsumexp,
never an ``(N, N)`` matrix. What makes it *sliding window* attention is the loop bounds: a query
block only visits the key blocks that intersect its band ``[i - left, i + right]`` (block
skipping), so the work is O(N * window), not O(N^2). The backward pass is restricted the same
way: one kernel for ``dk, dv`` loops over the query blocks that can see a key block, one kernel
for ``dq`` loops over the key blocks a query block can see, after a small kernel has computed
``delta = rowsum(dO * O)``. No atomics; under GQA the dk/dv program sums its query heads itself.

The rest of the pattern of :mod:`swa_lib.masks` rides on top of the band:

* **sinks** S: the key blocks holding keys ``0..S-1`` are visited too (before the band);
* **dilation** (one int or one per head): an extra ``(i - j) % d == 0`` test in the tile mask;
  the band is the same, so dilation does not save work here;
* **global tokens**: every query attends to the (few) global keys in a separate pass over a
  gathered list of their positions, skipping those already covered by the band; the few global
  *query* rows, which see everything, are recomputed afterwards by the same kernel run in
  "full row" mode over a gathered list of global query positions. In the backward pass a key
  block that holds a global key visits every query block, and every key block also visits the
  gathered global queries that lie outside its band.

The forward and dq kernels are one walk over key blocks, :func:`_walk_keys` (sink blocks, the
band's masked edge, unmasked interior and masked edge, then the gathered global keys), each
with its own step from :mod:`.tiles`; the dk/dv kernel walks query blocks with the same folds
(:func:`_fold_band`, :func:`_fold_gathered`). Nothing here allocates or checks: :mod:`.launch`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (dkdv_tile, dq_tile, fwd_tile, head_ptr, key_block_full, key_block_range, load_cols,
                    load_query_rows, load_rows, pattern_of, query_block_full, query_block_range, sink_block_end,
                    store_rows, tile_mask)

__all__ = ["INTERPRETER", "fwd_kernel", "bwd_delta_kernel", "bwd_dq_kernel", "bwd_dkdv_kernel"]

# Runtime integers Triton must not specialise (it turns an int equal to 1 into a constant, which
# would give the loop-bound helpers mismatched types in their runtime `if`s).
_RUNTIME_INTS = ["N", "LEFT", "RIGHT", "SINKS", "G_MAX"]


# ---- the walks: which tiles a step sees ------------------------------------------------------
@triton.jit
def _fold_tile(step: tl.constexpr, state, args, offs, ok, move, move_ok, p, MOVE_KEYS: tl.constexpr,
               MASK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_DILATION: tl.constexpr,
               HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr, PRECISION: tl.constexpr):
    """Fold the tile (the program's own positions offs) x (positions move) into state with step.

    MOVE_KEYS: the program owns query rows and move are keys (forward, dq), else the reverse
    (dk/dv). MASK: "pattern" (the tile mask), "bounds" (only ok and move_ok) or "none"."""
    if MOVE_KEYS:
        offs_m, row_ok, offs_n, key_ok = offs, ok, move, move_ok
    else:
        offs_m, row_ok, offs_n, key_ok = move, move_ok, offs, ok
    if MASK == "pattern":
        allowed = tile_mask(offs_m, offs_n, row_ok, key_ok, p, HAS_DILATION, HAS_SINKS, HAS_GLOBAL,
                            not MOVE_KEYS)
    else:  # "bounds" (gathered and full rows); "none" (interior tiles) does not read it
        allowed = row_ok[:, None] & key_ok[None, :]
    return step(state, args, move, move_ok, allowed, MASK != "none", HEAD_DIM, PRECISION)


@triton.jit
def _fold_blocks(step: tl.constexpr, state, args, offs, ok, first, last, p, MOVE_KEYS: tl.constexpr,
                 MASK: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Fold the blocks first .. last - 1 (BLOCK positions each) of the other side into state."""
    for blk in range(first, last):
        move = blk * BLOCK + tl.arange(0, BLOCK)
        state = _fold_tile(step, state, args, offs, ok, move, move < p.N, p, MOVE_KEYS, MASK,
                           HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION)
    return state


@triton.jit
def _fold_band(step: tl.constexpr, state, args, offs, ok, lo, a, bb, hi, p, MOVE_KEYS: tl.constexpr,
               BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_DILATION: tl.constexpr,
               HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr, PRECISION: tl.constexpr):
    """The band's blocks [lo, hi): masked edge [lo, a), unmasked interior [a, bb), masked edge [bb, hi)."""
    state = _fold_blocks(step, state, args, offs, ok, lo, a, p, MOVE_KEYS, "pattern", BLOCK, HEAD_DIM,
                         HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION)
    state = _fold_blocks(step, state, args, offs, ok, a, bb, p, MOVE_KEYS, "none", BLOCK, HEAD_DIM,
                         HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION)
    state = _fold_blocks(step, state, args, offs, ok, bb, hi, p, MOVE_KEYS, "pattern", BLOCK, HEAD_DIM,
                         HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION)
    return state


@triton.jit
def _fold_gathered(step: tl.constexpr, state, args, offs, ok, lo, hi, sink_end, p, MOVE_KEYS: tl.constexpr,
                   BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_DILATION: tl.constexpr,
                   HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr, PRECISION: tl.constexpr):
    """The global positions, BLOCK at a time from the gathered list, whose blocks the walk has not
    visited: outside the band's blocks [lo, hi) and (keys only) the sink blocks [0, sink_end)."""
    count = tl.load(p.GCNT)
    for t in range(0, p.G_MAX, BLOCK):
        slot = t + tl.arange(0, BLOCK)
        listed = slot < count
        move = tl.load(p.GIDX + slot, mask=listed, other=0)
        blk = move // BLOCK
        if MOVE_KEYS:  # the walk over keys visited the sink blocks too
            listed = listed & (blk >= sink_end)
        fresh = listed & ((blk < lo) | (blk >= hi))
        state = _fold_tile(step, state, args, offs, ok, move, fresh, p, MOVE_KEYS, "bounds", HEAD_DIM,
                           HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION)
    return state


@triton.jit
def _walk_keys(step: tl.constexpr, state, args, offs_m, row_ok, p, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_DILATION: tl.constexpr,
               HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr, FULL_ROWS: tl.constexpr,
               PRECISION: tl.constexpr):
    """The forward and dq loop: fold every key tile the query rows offs_m see into state.

    In order: the sink blocks before the band, the band (masked edge, unmasked interior, masked
    edge), then the gathered global keys neither covered. Global query rows (FULL_ROWS) see all."""
    if FULL_ROWS:
        state = _fold_blocks(step, state, args, offs_m, row_ok, 0, tl.cdiv(p.N, BLOCK_N), p,
                             True, "bounds", BLOCK_N, HEAD_DIM, HAS_DILATION, HAS_SINKS,
                             HAS_GLOBAL, PRECISION)
    else:
        start_m = tl.program_id(0) * BLOCK_M
        lo, hi = key_block_range(start_m, BLOCK_M, BLOCK_N, p.N, p.LEFT, p.RIGHT)
        a, bb = key_block_full(start_m, lo, hi, BLOCK_M, BLOCK_N, p.N, p.LEFT, p.RIGHT)
        if HAS_DILATION:  # dilation holes: every tile needs the mask
            a = hi
            bb = hi
        sink_end = 0
        if HAS_SINKS:
            sink_end = sink_block_end(p.SINKS, lo, BLOCK_N)
            state = _fold_blocks(step, state, args, offs_m, row_ok, 0, sink_end, p, True,
                                 "pattern", BLOCK_N, HEAD_DIM, HAS_DILATION, HAS_SINKS,
                                 HAS_GLOBAL, PRECISION)
        state = _fold_band(step, state, args, offs_m, row_ok, lo, a, bb, hi, p, True, BLOCK_N,
                           HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION)
        if HAS_GLOBAL:
            state = _fold_gathered(step, state, args, offs_m, row_ok, lo, hi, sink_end, p, True,
                                   BLOCK_N, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL,
                                   PRECISION)
    return state


@triton.jit
def _query_program(K, V, DIL, GQ, GK, GIDX, GCNT, stride_kb, stride_kh, stride_vb, stride_vh, H, N, LEFT,
                   RIGHT, SINKS, G_MAX, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, FULL_ROWS: tl.constexpr):
    """What a forward or dq program starts from: its batch element b and query head h, its query
    rows (a block of the sequence, or of the gathered global queries when FULL_ROWS), the k/v head
    h // GROUP they read (grouped-query attention), and the pattern."""
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    p = pattern_of(DIL, GQ, GK, GIDX, GCNT, b, h, N, LEFT, RIGHT, SINKS, G_MAX)
    if FULL_ROWS:  # global query rows, gathered from the index list
        slot = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = slot < tl.load(p.GCNT)
        offs_m = tl.load(p.GIDX + slot, mask=row_ok, other=0)
    else:
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
    K = head_ptr(K, b, h // GROUP, stride_kb, stride_kh)
    V = head_ptr(V, b, h // GROUP, stride_vb, stride_vh)
    return b, h, offs_m, row_ok, K, V, p


# ---- the kernels -------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", *_RUNTIME_INTS])
def fwd_kernel(
    Q, K, V, O, LSE, DIL, GQ, GK, GIDX, GCNT,  # pointers
    # strides
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
    H, N, LEFT, RIGHT, SINKS, G_MAX, qk_scale,  # sizes and pattern
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    FULL_ROWS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Output rows and their logsumexp for one block of query rows of one (batch, head)."""
    b, h, offs_m, row_ok, K, V, p = _query_program(
        K, V, DIL, GQ, GK, GIDX, GCNT, stride_kb, stride_kh, stride_vb, stride_vh, H, N, LEFT,
        RIGHT, SINKS, G_MAX, GROUP, BLOCK_M, FULL_ROWS)
    q = load_rows(head_ptr(Q, b, h, stride_qb, stride_qh), offs_m, row_ok, stride_qn, stride_qd,
                  HEAD_DIM)
    state = (tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32),  # acc
             tl.zeros([BLOCK_M], dtype=tl.float32),  # l_i
             tl.full([BLOCK_M], float("-inf"), dtype=tl.float32))  # m_i
    args = (q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale)
    acc, l_i, m_i = _walk_keys(fwd_tile, state, args, offs_m, row_ok, p, BLOCK_M, BLOCK_N,
                               HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, FULL_ROWS, PRECISION)
    # epilogue: normalise, save the logsumexp (base 2) for the backward pass
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    store_rows(head_ptr(O, b, h, stride_ob, stride_oh), offs_m, row_ok, stride_on, stride_od,
               acc / l_safe[:, None], HEAD_DIM)
    tl.store(LSE + tl.program_id(1).to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_safe),
             mask=row_ok)


@triton.jit(do_not_specialize=["H", "N"])
def bwd_delta_kernel(O, DO, DELTA,
                     stride_ob, stride_oh, stride_on, stride_od,
                     stride_dob, stride_doh, stride_don, stride_dod,
                     H, N, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta_i = sum_d dO[i, d] * O[i, d] in fp32: one number per row for the softmax backward."""
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = offs_m < N
    o = load_rows(head_ptr(O, b, h, stride_ob, stride_oh), offs_m, row_ok, stride_on, stride_od, HEAD_DIM)
    do = load_rows(head_ptr(DO, b, h, stride_dob, stride_doh), offs_m, row_ok, stride_don, stride_dod, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + tl.program_id(1).to(tl.int64) * N + offs_m, delta, mask=row_ok)


@triton.jit(do_not_specialize=["H", *_RUNTIME_INTS])
def bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, DIL, GQ, GK, GIDX, GCNT,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N, LEFT, RIGHT, SINKS, G_MAX, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    FULL_ROWS: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq for one block of query rows of one (batch, head): the forward's walk with the dq step."""
    rows = tl.program_id(1).to(tl.int64) * N  # where this head's logsumexp and delta start
    b, h, offs_m, row_ok, K, V, p = _query_program(K, V, DIL, GQ, GK, GIDX, GCNT, stride_kb, stride_kh, stride_vb,
                                                   stride_vh, H, N, LEFT, RIGHT, SINKS, G_MAX, GROUP, BLOCK_M,
                                                   FULL_ROWS)
    q, do, lse, delta = load_query_rows(head_ptr(Q, b, h, stride_qb, stride_qh),
                                        head_ptr(DO, b, h, stride_dob, stride_doh), LSE + rows, DELTA + rows,
                                        offs_m, row_ok, stride_qn, stride_qd, stride_don, stride_dod, HEAD_DIM)
    args = (q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale)
    dq = _walk_keys(dq_tile, tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), args, offs_m, row_ok, p,
                    BLOCK_M, BLOCK_N, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, FULL_ROWS, PRECISION)
    store_rows(head_ptr(DQ, b, h, stride_dqb, stride_dqh), offs_m, row_ok, stride_dqn, stride_dqd, dq * sm_scale,
               HEAD_DIM)


@triton.jit(do_not_specialize=["H_KV", *_RUNTIME_INTS])
def bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, DIL, GQ, GK, GIDX, GCNT,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H_KV, N, LEFT, RIGHT, SINKS, G_MAX, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv for one block of keys of one (batch, k/v head): walks the query blocks that see it."""
    b = tl.program_id(1) // H_KV
    h_kv = tl.program_id(1) % H_KV
    H = H_KV * GROUP
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < N
    k = load_rows(head_ptr(K, b, h_kv, stride_kb, stride_kh), offs_n, key_ok, stride_kn, stride_kd, HEAD_DIM)
    vt = load_cols(head_ptr(V, b, h_kv, stride_vb, stride_vh), offs_n, key_ok, stride_vn, stride_vd, HEAD_DIM)

    lo, hi = query_block_range(start_n, BLOCK_M, BLOCK_N, N, LEFT, RIGHT, SINKS)
    if HAS_GLOBAL:  # a block holding a global key is seen by every query
        gk = tl.load(GK + b * N + offs_n, mask=key_ok, other=0)
        if tl.max(gk.to(tl.int32), 0) > 0:
            lo = lo * 0
            hi = hi * 0 + tl.cdiv(N, BLOCK_M)
    a, bb = query_block_full(start_n, lo, hi, BLOCK_M, BLOCK_N, N, LEFT, RIGHT)
    if HAS_DILATION:
        a = hi
        bb = hi

    state = (tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32), tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32))
    # Grouped-query attention: the GROUP query heads sharing this k/v head all add into dk, dv.
    for g in range(0, GROUP):
        h = h_kv * GROUP + g
        p = pattern_of(DIL, GQ, GK, GIDX, GCNT, b, h, N, LEFT, RIGHT, SINKS, G_MAX)
        rows = (b * H + h).to(tl.int64) * N  # this head's logsumexp and delta
        args = (k, vt, head_ptr(Q, b, h, stride_qb, stride_qh), head_ptr(DO, b, h, stride_dob, stride_doh),
                LSE + rows, DELTA + rows, stride_qn, stride_qd, stride_don, stride_dod, qk_scale)
        state = _fold_band(dkdv_tile, state, args, offs_n, key_ok, lo, a, bb, hi, p, False, BLOCK_M, HEAD_DIM,
                           HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION)
        if HAS_GLOBAL:  # global queries outside [lo, hi) see this block too
            state = _fold_gathered(dkdv_tile, state, args, offs_n, key_ok, lo, hi, 0, p, False, BLOCK_M,
                                   HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION)
    dk, dv = state
    store_rows(head_ptr(DK, b, h_kv, stride_dkb, stride_dkh), offs_n, key_ok, stride_dkn, stride_dkd, dk * sm_scale,
               HEAD_DIM)
    store_rows(head_ptr(DV, b, h_kv, stride_dvb, stride_dvh), offs_n, key_ok, stride_dvn, stride_dvd, dv, HEAD_DIM)


#: True when these kernels run in Triton's CPU interpreter. triton.jit chose that when it decorated
#: them, from TRITON_INTERPRET as it was when this module was first imported; nothing changes it.
INTERPRETER: bool = not isinstance(fwd_kernel, triton.runtime.JITFunction)
