"""Layer 1, kernels: the ``@triton.jit`` kernels and the walks that feed tiles to their steps.

FlashAttention-2 style (Dao 2023): each program owns a tile of queries, streams key/value tiles
through on-chip memory with an online softmax, and writes the output and the row logsumexp,
never an ``(N, N)`` matrix. What makes it *sliding window* attention is the loop bounds: a query
block only visits the key blocks that intersect its band ``[i - left, i + right]`` (block
skipping), so the work is O(N * window), not O(N^2). The backward pass is restricted the same
way: one kernel for ``dk, dv`` loops over the query blocks that can see a key block, one kernel
for ``dq`` loops over the key blocks a query block can see, after a small kernel has computed
``delta = rowsum(dO * O)``. No atomics; under GQA the dk/dv program sums its query heads itself.

**One band loop** (:func:`.walks.walk_band`): the sink blocks and the band's blocks are one loop, and
only the edge tiles (where the band's border, a sink or the sequence's end crosses the tile)
compute the mask, behind a branch that is uniform over the program. ``ONE_LOOP=False`` keeps
the previous kernel's three loops (masked edge, unmasked interior, masked edge).

The rest of the pattern of :mod:`swa_lib.masks` rides on top of the band:

* **sinks** S: the key blocks holding keys ``0..S-1`` are visited too (the loop starts there);
* **dilation** (one int or one per head): an extra ``(i - j) % d == 0`` test in the tile mask;
  the band is the same, so dilation does not save work here;
* **global tokens**: every query attends to the (few) global keys in a separate pass over a
  gathered list of their positions, skipping those already covered by the band; the few global
  *query* rows, which see everything, are recomputed afterwards in "full row" launches;
* **no program walks the whole sequence**: a full row (``FULL_ROWS``) and a sink or global key's
  column in dk/dv (``COLUMNS``: what the band programs leave out, ``tile_mask`` part "columns")
  are cut into chunks of ``CHUNK`` positions, one program each (grid axis 2), whose partial
  results the launcher adds up (:mod:`.launch`), so the longest program walks a few times the
  median.

Queries may be fewer than keys (``OFF = N_k - N_q``: they are the last positions), and with
``VARLEN`` each batch element is a document of a packed tensor (``cu_seqlens``). With ``TMA``
(Hopper) the band's k/v (forward, dq) and q/dO (dk/dv) tiles come through TMA descriptors.
Nothing here allocates or checks: :mod:`.launch`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (dkdv_tile, dkdv_tile_t, dq_tile, fwd_tile, key_block_full, key_block_range, load_rows,
                    load_cols, pattern_of, query_block_full, query_block_range, seq_ptr, sink_block_end, store_rows)
from .walks import fold_blocks, fold_gathered, own_positions, sequence_of, walk_band

__all__ = ["INTERPRETER", "fwd_kernel", "bwd_delta_kernel", "bwd_dq_kernel", "bwd_dkdv_kernel"]

# Runtime integers Triton must not specialise (it turns an int equal to 1 into a constant, which
# would give the loop-bound helpers mismatched types in their runtime `if`s).
_RUNTIME_INTS = ["N_Q", "N_K", "ROWS", "LEFT", "RIGHT", "SINKS", "G_MAX", "IDX_MAX", "CHUNK", "PAD",
                 "TUNE_N", "TUNE_W"]


# ---- the kernels -------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", *_RUNTIME_INTS])
def fwd_kernel(
    Q, K, V, O, LSE, DESC_K, DESC_V, DIL, G, GIDX, GCNT, QIDX, QCNT, CU_Q, CU_K, PART_O, PART_M, PART_L,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on, stride_od,
    H, N_Q, N_K, ROWS, LEFT, RIGHT, SINKS, G_MAX, IDX_MAX, CHUNK, PAD, TUNE_N, TUNE_W, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr, FULL_ROWS: tl.constexpr,
    VARLEN: tl.constexpr, ONE_LOOP: tl.constexpr, TMA: tl.constexpr, INT64: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Output rows and their logsumexp for one block of query rows of one (batch, head); with
    FULL_ROWS, partial (acc, m, l) of gathered global query rows over one chunk of keys."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    bp = 0 if VARLEN else b  # the batch index of the tensors (packed documents share one)
    q_start, n_q, k_start, n_k = sequence_of(CU_Q, CU_K, b, N_Q, N_K, VARLEN)
    p = pattern_of(DIL, G, GIDX, GCNT, b, h, n_k, n_k - n_q, LEFT, RIGHT, SINKS, G_MAX)
    offs_m, row_ok, slot = own_positions(QIDX + b * IDX_MAX, QCNT + b, n_q, BLOCK_M, FULL_ROWS)
    chunk = tl.program_id(2)
    if not FULL_ROWS and tl.program_id(0) * BLOCK_M >= n_q:
        return  # a short document of a packed batch
    h_kv = h // GROUP
    ksrc = (seq_ptr(K, bp, h_kv, k_start, stride_kb, stride_kh, stride_kn), stride_kn, stride_kd)
    vsrc = (seq_ptr(V, bp, h_kv, k_start, stride_vb, stride_vh, stride_vn), stride_vn, stride_vd)
    q = load_rows(seq_ptr(Q, bp, h, q_start, stride_qb, stride_qh, stride_qn), offs_m, row_ok,
                  stride_qn, stride_qd, HEAD_DIM, INT64)
    state = (tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32),  # acc
             tl.zeros([BLOCK_M], dtype=tl.float32),  # l_i
             tl.full([BLOCK_M], float("-inf"), dtype=tl.float32))  # m_i
    args = (q, ksrc, (DESC_K, bp, h_kv, k_start), vsrc, (DESC_V, bp, h_kv, k_start), qk_scale)
    if FULL_ROWS:  # global rows see every key: one chunk of them, partial sums out
        first, last = chunk * CHUNK // BLOCK_N, tl.cdiv(min((chunk + 1) * CHUNK, n_k), BLOCK_N)
        acc, l_i, m_i = fold_blocks(fwd_tile, state, args, offs_m, row_ok, first, last, n_k, p,
                                    True, "bounds", "all", BLOCK_N, HEAD_DIM, HAS_DILATION,
                                    HAS_SINKS, HAS_GLOBAL, PRECISION, TMA, INT64)
        part = (chunk * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * PAD + slot
        store_rows(PART_O, part, row_ok, HEAD_DIM, 1, acc, HEAD_DIM, False)
        tl.store(PART_M + part, m_i, mask=row_ok)
        tl.store(PART_L + part, l_i, mask=row_ok)
    else:
        start_i = tl.program_id(0) * BLOCK_M + p.OFF  # the position of the first row
        lo, hi = key_block_range(start_i, BLOCK_M, BLOCK_N, n_k, LEFT, RIGHT)
        a, bb = key_block_full(start_i, lo, hi, BLOCK_M, BLOCK_N, n_k, LEFT, RIGHT)
        if HAS_DILATION:  # dilation holes: every tile needs the mask
            a = hi
            bb = hi
        sink_end = 0
        if HAS_SINKS:
            sink_end = sink_block_end(SINKS, lo, BLOCK_N)
        state = walk_band(fwd_tile, state, args, offs_m, row_ok, lo, a, bb, hi, sink_end, n_k, p,
                          True, ONE_LOOP, "all", BLOCK_N, HEAD_DIM, HAS_DILATION, HAS_SINKS,
                          HAS_GLOBAL, PRECISION, TMA, INT64)
        if HAS_GLOBAL:
            state = fold_gathered(fwd_tile, state, args, offs_m, row_ok, p.GIDX, p.GCNT, G_MAX, lo,
                                  hi, sink_end, p, True, "all", BLOCK_N, HEAD_DIM, HAS_DILATION,
                                  HAS_SINKS, HAS_GLOBAL, PRECISION, INT64)
        acc, l_i, m_i = state
        # epilogue: normalise, save the logsumexp (base 2) for the backward pass
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        store_rows(seq_ptr(O, bp, h, q_start, stride_ob, stride_oh, stride_on), offs_m, row_ok,
                   stride_on, stride_od, acc / l_safe[:, None], HEAD_DIM, INT64)
        rows = (bp * H + h).to(tl.int64) * ROWS + q_start  # this head's logsumexp
        tl.store(LSE + rows + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit(do_not_specialize=["H", "N"])
def bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_od, stride_dob, stride_doh,
                     stride_don, stride_dod, H, N, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                     INT64: tl.constexpr):
    """delta_i = sum_d dO[i, d] * O[i, d] in fp32: one number per row for the softmax backward."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = offs_m < N
    first = b * 0  # the rows start at row 0
    o = load_rows(seq_ptr(O, b, h, first, stride_ob, stride_oh, stride_on), offs_m, row_ok, stride_on, stride_od,
                  HEAD_DIM, INT64)
    do = load_rows(seq_ptr(DO, b, h, first, stride_dob, stride_doh, stride_don), offs_m, row_ok, stride_don,
                   stride_dod, HEAD_DIM, INT64)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + tl.program_id(1).to(tl.int64) * N + offs_m, delta, mask=row_ok)


@triton.jit(do_not_specialize=["H", *_RUNTIME_INTS])
def bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, DESC_K, DESC_V, DIL, G, GIDX, GCNT, QIDX, QCNT, CU_Q, CU_K, PART_DQ,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N_Q, N_K, ROWS, LEFT, RIGHT, SINKS, G_MAX, IDX_MAX, CHUNK, PAD, TUNE_N, TUNE_W, qk_scale,
    sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr, FULL_ROWS: tl.constexpr,
    VARLEN: tl.constexpr, ONE_LOOP: tl.constexpr, TMA: tl.constexpr, INT64: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq for one block of query rows of one (batch, head): the forward's walk with the dq step;
    with FULL_ROWS, the partial dq of gathered global query rows over one chunk of keys."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    bp = 0 if VARLEN else b
    q_start, n_q, k_start, n_k = sequence_of(CU_Q, CU_K, b, N_Q, N_K, VARLEN)
    p = pattern_of(DIL, G, GIDX, GCNT, b, h, n_k, n_k - n_q, LEFT, RIGHT, SINKS, G_MAX)
    offs_m, row_ok, slot = own_positions(QIDX + b * IDX_MAX, QCNT + b, n_q, BLOCK_M, FULL_ROWS)
    chunk = tl.program_id(2)
    if not FULL_ROWS and tl.program_id(0) * BLOCK_M >= n_q:
        return
    rows = (bp * H + h).to(tl.int64) * ROWS + q_start  # this head's logsumexp and delta
    q = load_rows(seq_ptr(Q, bp, h, q_start, stride_qb, stride_qh, stride_qn), offs_m, row_ok, stride_qn,
                  stride_qd, HEAD_DIM, INT64)
    do = load_rows(seq_ptr(DO, bp, h, q_start, stride_dob, stride_doh, stride_don), offs_m, row_ok, stride_don,
                   stride_dod, HEAD_DIM, INT64)
    lse = tl.load(LSE + rows + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + rows + offs_m, mask=row_ok, other=0.0)
    ksrc = (seq_ptr(K, bp, h // GROUP, k_start, stride_kb, stride_kh, stride_kn), stride_kn, stride_kd)
    vsrc = (seq_ptr(V, bp, h // GROUP, k_start, stride_vb, stride_vh, stride_vn), stride_vn, stride_vd)
    args = (q, do, lse, delta, ksrc, (DESC_K, bp, h // GROUP, k_start), vsrc, (DESC_V, bp, h // GROUP, k_start),
            qk_scale)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if FULL_ROWS:
        dq = fold_blocks(dq_tile, dq, args, offs_m, row_ok, chunk * CHUNK // BLOCK_N,
                          tl.cdiv(min((chunk + 1) * CHUNK, n_k), BLOCK_N), n_k, p, True, "bounds", "all",
                          BLOCK_N, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION, TMA, INT64)
        part = (chunk * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * PAD + slot
        store_rows(PART_DQ, part, row_ok, HEAD_DIM, 1, dq * sm_scale, HEAD_DIM, False)
    else:
        start_i = tl.program_id(0) * BLOCK_M + p.OFF
        lo, hi = key_block_range(start_i, BLOCK_M, BLOCK_N, n_k, LEFT, RIGHT)
        a, bb = key_block_full(start_i, lo, hi, BLOCK_M, BLOCK_N, n_k, LEFT, RIGHT)
        if HAS_DILATION:
            a = hi
            bb = hi
        sink_end = 0
        if HAS_SINKS:
            sink_end = sink_block_end(SINKS, lo, BLOCK_N)
        dq = walk_band(dq_tile, dq, args, offs_m, row_ok, lo, a, bb, hi, sink_end, n_k, p, True, ONE_LOOP,
                        "all", BLOCK_N, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION, TMA, INT64)
        if HAS_GLOBAL:
            dq = fold_gathered(dq_tile, dq, args, offs_m, row_ok, p.GIDX, p.GCNT, G_MAX, lo, hi, sink_end, p,
                                True, "all", BLOCK_N, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION,
                                INT64)
        store_rows(seq_ptr(DQ, bp, h, q_start, stride_dqb, stride_dqh, stride_dqn), offs_m, row_ok, stride_dqn,
                   stride_dqd, dq * sm_scale, HEAD_DIM, INT64)


@triton.jit(do_not_specialize=["H_KV", *_RUNTIME_INTS])
def bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, DESC_Q, DESC_DO, DIL, G, QIDX, QCNT, CIDX, CCNT, CU_Q, CU_K, PART_DK, PART_DV,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H_KV, N_Q, N_K, ROWS, LEFT, RIGHT, SINKS, G_MAX, IDX_MAX, CHUNK, PAD, TUNE_N, TUNE_W, qk_scale,
    sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr, COLUMNS: tl.constexpr,
    VARLEN: tl.constexpr, ONE_LOOP: tl.constexpr, TMA: tl.constexpr, INT64: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk, dv for one block of keys of one (batch, k/v head): walks the query blocks of its band
    (and the gathered global queries); with COLUMNS, the partial dk, dv of gathered sink and
    global keys over one chunk of query rows (the visibility the band leaves out)."""
    b, h_kv = tl.program_id(1) // H_KV, tl.program_id(1) % H_KV
    bp = 0 if VARLEN else b
    H = H_KV * GROUP
    q_start, n_q, k_start, n_k = sequence_of(CU_Q, CU_K, b, N_Q, N_K, VARLEN)
    offs_n, key_ok, slot = own_positions(CIDX + b * PAD, CCNT + b, n_k, BLOCK_N, COLUMNS)
    chunk = tl.program_id(2)
    if not COLUMNS and tl.program_id(0) * BLOCK_N >= n_k:
        return
    k_ptr = seq_ptr(K, bp, h_kv, k_start, stride_kb, stride_kh, stride_kn)
    v_ptr = seq_ptr(V, bp, h_kv, k_start, stride_vb, stride_vh, stride_vn)
    k = load_rows(k_ptr, offs_n, key_ok, stride_kn, stride_kd, HEAD_DIM, INT64)  # (BLOCK_N, HEAD_DIM)
    # the step, and the value tile it reads: transposed dk/dv (the current variant, ONE_LOOP), or
    # the previous variant's (then TMA is off too: the launcher gives descriptors to the current
    # variant only)
    step: tl.constexpr = dkdv_tile_t if ONE_LOOP else dkdv_tile
    if ONE_LOOP:
        v = load_rows(v_ptr, offs_n, key_ok, stride_vn, stride_vd, HEAD_DIM, INT64)
    else:
        v = load_cols(v_ptr, offs_n, key_ok, stride_vn, stride_vd, HEAD_DIM, INT64)  # (HEAD_DIM, BLOCK_N)
    state = (tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32), tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32))
    # Grouped-query attention: the GROUP query heads sharing this k/v head all add into dk, dv.
    for g in range(0, GROUP):
        h = h_kv * GROUP + g
        p = pattern_of(DIL, G, QIDX, QCNT, b, h, n_k, n_k - n_q, LEFT, RIGHT, SINKS, G_MAX)
        rows = (bp * H + h).to(tl.int64) * ROWS + q_start  # this head's logsumexp and delta
        qsrc = (seq_ptr(Q, bp, h, q_start, stride_qb, stride_qh, stride_qn), stride_qn, stride_qd)
        dosrc = (seq_ptr(DO, bp, h, q_start, stride_dob, stride_doh, stride_don), stride_don, stride_dod)
        args = (k, v, qsrc, (DESC_Q, bp, h, q_start), dosrc, (DESC_DO, bp, h, q_start), LSE + rows, DELTA + rows,
                qk_scale)
        if COLUMNS:
            first = chunk * CHUNK // BLOCK_M
            last = tl.cdiv(min((chunk + 1) * CHUNK, n_q), BLOCK_M)
            state = fold_blocks(step, state, args, offs_n, key_ok, first, last, n_q, p, False, "pattern",
                                "columns", BLOCK_M, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION, TMA,
                                INT64)
        else:
            start_n = tl.program_id(0) * BLOCK_N
            lo, hi = query_block_range(start_n, BLOCK_M, BLOCK_N, n_k, p.OFF, LEFT, RIGHT)
            a, bb = query_block_full(start_n, lo, hi, BLOCK_M, BLOCK_N, n_k, p.OFF, n_q, LEFT, RIGHT)
            if HAS_DILATION:
                a = hi
                bb = hi
            state = walk_band(step, state, args, offs_n, key_ok, lo, a, bb, hi, 0, n_q, p, False, ONE_LOOP,
                              "band", BLOCK_M, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION, TMA, INT64)
            if HAS_GLOBAL:  # global queries outside [lo, hi) see this block too
                state = fold_gathered(step, state, args, offs_n, key_ok, QIDX + b * IDX_MAX, QCNT + b, IDX_MAX,
                                      lo, hi, 0, p, False, "band", BLOCK_M, HEAD_DIM, HAS_DILATION, HAS_SINKS,
                                      HAS_GLOBAL, PRECISION, INT64)
    dk, dv = state
    if COLUMNS:
        part = (chunk * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * PAD + slot
        store_rows(PART_DK, part, key_ok, HEAD_DIM, 1, dk * sm_scale, HEAD_DIM, False)
        store_rows(PART_DV, part, key_ok, HEAD_DIM, 1, dv, HEAD_DIM, False)
    else:
        store_rows(seq_ptr(DK, bp, h_kv, k_start, stride_dkb, stride_dkh, stride_dkn), offs_n, key_ok, stride_dkn,
                   stride_dkd, dk * sm_scale, HEAD_DIM, INT64)
        store_rows(seq_ptr(DV, bp, h_kv, k_start, stride_dvb, stride_dvh, stride_dvn), offs_n, key_ok, stride_dvn,
                   stride_dvd, dv, HEAD_DIM, INT64)


#: True when these kernels run in Triton's CPU interpreter. triton.jit chose that when it decorated
#: them, from TRITON_INTERPRET as it was when this module was first imported; nothing changes it.
INTERPRETER: bool = not isinstance(fwd_kernel, triton.runtime.JITFunction)
