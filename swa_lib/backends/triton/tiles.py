"""Layer 1, tiles: the ``@triton.jit`` code about one tile, used by the kernels of :mod:`.kernels`.

The loop bounds (which key blocks a query block needs, and the reverse: plain integer
arithmetic, so :mod:`.tilemap` calls the same functions from Python through ``.fn``), tile
loads (pointers, or TMA descriptors on Hopper) and stores, the tile mask, and the tile steps:
one step of the online softmax, one of dq, one of dk/dv (transposed, ``S^T = K Q^T``, and the
previous untransposed one, kept until a GPU has measured both). A step is
``step(state, args, move, move_ok, start, tile, p, masked, MASK, FLAGS...) -> state``: it
folds the tile of the other side's positions ``move`` (keys; query rows for dk/dv, which start
at row ``start``) into ``state``, a tuple of accumulators, reading what the tuple ``args`` holds;
``tile`` holds the positions shaped for the mask (:func:`tile_mask`).

Positions: keys are ``0 .. N - 1``; query row ``r`` sits at position ``r + OFF`` with
``OFF = N_k - N_q`` (queries are the last ``N_q`` positions, as in cached decoding). The
bounds below take query *positions* on the forward side and return query *rows* on the key side.
A constexpr put in a tuple becomes a runtime value once the tuple is assigned, so the
compile-time flags travel as arguments of their own.
"""

from __future__ import annotations

from collections import namedtuple

import triton
import triton.language as tl

__all__ = ["key_block_range", "key_block_full", "sink_block_end", "query_block_range", "query_block_full",
           "seq_ptr", "load_rows", "load_cols", "load_tile", "store_rows", "ProgramPattern", "pattern_of",
           "tile_mask", "apply_mask", "fwd_tile", "dq_tile", "dkdv_tile", "dkdv_tile_t"]

# The pattern as one program sees it: N keys, the position OFF of query row 0, the window, its
# query head's dilation `dil`, and its batch element's global tokens: the int8 mask G over key
# positions, the gathered key positions GIDX (the first GCNT[0] real) of G_MAX slots.
ProgramPattern = namedtuple("ProgramPattern", ["N", "OFF", "LEFT", "RIGHT", "SINKS", "G_MAX", "dil", "G",
                                               "GIDX", "GCNT"])


# ---- loop bounds ---------------------------------------------------------------------------
@triton.jit
def key_block_range(start_i, BLOCK_M, BLOCK_N, N, LEFT, RIGHT):
    """Key blocks [lo, hi) meeting the band of query positions start_i .. start_i + BLOCK_M - 1."""
    first_key = max(start_i - LEFT, 0)
    last_key = min(min(start_i + BLOCK_M - 1, N - 1) + RIGHT, N - 1)
    return first_key // BLOCK_N, last_key // BLOCK_N + 1


@triton.jit
def key_block_full(start_i, lo, hi, BLOCK_M, BLOCK_N, N, LEFT, RIGHT):
    """Sub-range [a, b) of [lo, hi) whose tiles lie wholly inside the band (no mask needed)."""
    last_q = min(start_i + BLOCK_M - 1, N - 1)
    first = max(last_q - LEFT, 0)  # every query of the block sees keys first .. last
    last = min(start_i + RIGHT, N - 1)
    a = max((first + BLOCK_N - 1) // BLOCK_N, lo)
    b = min((last + 1) // BLOCK_N, hi)
    if a >= b:
        a = hi
        b = hi
    return a, b


@triton.jit
def sink_block_end(SINKS, lo, BLOCK_N):
    """Blocks [0, end) holding sink keys that the band [lo, hi) does not already cover."""
    return min((SINKS + BLOCK_N - 1) // BLOCK_N, lo)


@triton.jit
def query_block_range(start_n, BLOCK_M, BLOCK_N, N, OFF, LEFT, RIGHT):
    """Query-row blocks [lo, hi) whose band reaches keys start_n .. start_n + BLOCK_N - 1.

    Only the band: the queries that see these keys as sinks or global keys are the column
    pass's (see :mod:`.kernels`)."""
    first = max(start_n - RIGHT - OFF, 0)
    last = min(min(start_n + BLOCK_N - 1, N - 1) + LEFT, N - 1) - OFF
    lo = first // BLOCK_M
    hi = lo
    if last >= first:  # else every query row comes before the band of these keys
        hi = last // BLOCK_M + 1
    return lo, hi


@triton.jit
def query_block_full(start_n, lo, hi, BLOCK_M, BLOCK_N, N, OFF, N_Q, LEFT, RIGHT):
    """Sub-range [a, b) of [lo, hi): complete query blocks whose every row sees every key
    start_n .. start_n + BLOCK_N - 1 through the band (no mask needed)."""
    last_key = min(start_n + BLOCK_N - 1, N - 1)
    a = max((max(last_key - RIGHT - OFF, 0) + BLOCK_M - 1) // BLOCK_M, lo)
    b = min(min(max(start_n + LEFT - OFF + 1, 0) // BLOCK_M, N_Q // BLOCK_M), hi)
    if a >= b:
        a = hi
        b = hi
    return a, b


# ---- addresses, loads and stores ---------------------------------------------------------------
@triton.jit
def seq_ptr(X, b, h, start, stride_b, stride_h, stride_n):
    """X moved to batch element b, head h, row start (64-bit: large tensors overflow int32)."""
    return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + start.to(tl.int64) * stride_n


@triton.jit
def _row_offsets(offs, stride_n, INT64: tl.constexpr):
    """offs * stride_n, in 64 bits when the launcher found that the product can pass 2**31."""
    if INT64:
        offs = offs.to(tl.int64)
    return offs * stride_n


@triton.jit
def load_rows(X, offs, ok, stride_n, stride_d, HEAD_DIM: tl.constexpr, INT64: tl.constexpr):
    """Rows offs of an (N, HEAD_DIM) matrix as a (len(offs), HEAD_DIM) tile, zero where not ok."""
    offs_d = tl.arange(0, HEAD_DIM)
    rows = _row_offsets(offs, stride_n, INT64)
    return tl.load(X + rows[:, None] + offs_d[None, :] * stride_d, mask=ok[:, None], other=0.0)


@triton.jit
def load_cols(X, offs, ok, stride_n, stride_d, HEAD_DIM: tl.constexpr, INT64: tl.constexpr):
    """The same rows transposed: a (HEAD_DIM, len(offs)) tile."""
    offs_d = tl.arange(0, HEAD_DIM)
    rows = _row_offsets(offs, stride_n, INT64)
    return tl.load(X + rows[None, :] + offs_d[:, None] * stride_d, mask=ok[None, :], other=0.0)


@triton.jit
def load_tile(src, desc, offs, ok, start, TRANS: tl.constexpr, TMA: tl.constexpr, HEAD_DIM: tl.constexpr,
              INT64: tl.constexpr):
    """Rows offs of a matrix, (len(offs), HEAD_DIM), or transposed when TRANS.

    src = (pointer, stride_n, stride_d) for pointer loads; with TMA, desc = (descriptor, b, h,
    first row of the sequence) and offs must be the consecutive rows start, start + 1, ...: one
    TMA copy, zero-filled past the tensor's rows (the masks handle a neighbouring packed
    sequence's rows)."""
    if TMA:
        d, b, h, base = desc
        block: tl.constexpr = offs.shape[0]
        x = d.load([b, h, base + start, 0]).reshape(block, HEAD_DIM)
        if TRANS:
            x = tl.trans(x)
    else:
        X, stride_n, stride_d = src
        if TRANS:
            x = load_cols(X, offs, ok, stride_n, stride_d, HEAD_DIM, INT64)
        else:
            x = load_rows(X, offs, ok, stride_n, stride_d, HEAD_DIM, INT64)
    return x


@triton.jit
def store_rows(X, offs, ok, stride_n, stride_d, tile, HEAD_DIM: tl.constexpr, INT64: tl.constexpr):
    """Write a (len(offs), HEAD_DIM) tile into rows offs of X, in X's dtype."""
    offs_d = tl.arange(0, HEAD_DIM)
    rows = _row_offsets(offs, stride_n, INT64)
    tl.store(X + rows[:, None] + offs_d[None, :] * stride_d, tile.to(X.dtype.element_ty), mask=ok[:, None])


@triton.jit
def pattern_of(DIL, G, GIDX, GCNT, b, h, N, OFF, LEFT, RIGHT, SINKS, G_MAX):
    """The ProgramPattern of batch element b and query head h."""
    return ProgramPattern(N, OFF, LEFT, RIGHT, SINKS, G_MAX, tl.load(DIL + h), G + b.to(tl.int64) * N,
                          GIDX + b.to(tl.int64) * G_MAX, GCNT + b)


# ---- the mask ----------------------------------------------------------------------------------
@triton.jit
def tile_mask(tile, p, HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr,
              HAS_GLOBAL: tl.constexpr, PART: tl.constexpr):
    """The predicate of masks.AttentionPattern.allows on a tile, or one part of it.

    tile = (i, j, row_ok, key_ok): query positions i and key positions j, already shaped to
    broadcast into the tile ((BLOCK_M, 1) and (1, BLOCK_N), or transposed for dk/dv). PART:
    "all" (what the query sees); "band" (the window, with dilation, or a global query: the
    key-side band program's share); "columns" (a sink or global key seen outside that share:
    the column pass's). "band" and "columns" split "all" with no pair in both."""
    i, j, row_ok, key_ok = tile
    ok = (j >= i - p.LEFT) & (j <= i + p.RIGHT)
    if HAS_DILATION:
        ok = ok & ((i - j) % p.dil == 0)
    if HAS_GLOBAL:  # a global query sees every key
        ok = ok | (tl.load(p.G + i, mask=row_ok, other=0) != 0)
    extra = ok & False  # what the sinks and global keys add
    if HAS_SINKS:
        extra = extra | ((j < p.SINKS) & (j <= i + p.RIGHT))
    if HAS_GLOBAL:
        extra = extra | (tl.load(p.G + j, mask=key_ok, other=0) != 0)
    if PART == "all":
        ok = ok | extra
    elif PART == "columns":
        ok = extra & ~ok
    return ok & row_ok & key_ok


@triton.jit
def apply_mask(x, fill, tile, p, masked, MASK: tl.constexpr, HAS_DILATION: tl.constexpr,
               HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr, PART: tl.constexpr):
    """x where the tile allows, fill elsewhere. MASK: "none" (interior tiles), "edges" (one band
    loop: the runtime flag `masked`, uniform over the program, says whether this is an edge
    tile), "pattern" (always), "bounds" (only which rows and keys exist)."""
    if MASK == "edges":
        if masked:
            x = tl.where(tile_mask(tile, p, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PART), x, fill)
    elif MASK == "pattern":
        x = tl.where(tile_mask(tile, p, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PART), x, fill)
    elif MASK == "bounds":
        _, _, row_ok, key_ok = tile
        x = tl.where(row_ok & key_ok, x, fill)
    return x


# ---- the steps: one tile each ---------------------------------------------------------------
@triton.jit
def fwd_tile(state, args, move, move_ok, start, tile, p, masked, MASK: tl.constexpr,
             HEAD_DIM: tl.constexpr, HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr,
             HAS_GLOBAL: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
             INT64: tl.constexpr, PART: tl.constexpr):
    """One step of the online softmax: fold the key tile into state = (acc, l_i, m_i)."""
    acc, l_i, m_i = state
    q, ksrc, kdesc, vsrc, vdesc, qk_scale = args
    kt = load_tile(ksrc, kdesc, move, move_ok, start, True, TMA, HEAD_DIM, INT64)  # (D, BLOCK_N)
    v = load_tile(vsrc, vdesc, move, move_ok, start, False, TMA, HEAD_DIM, INT64)  # (BLOCK_N, D)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
    s = apply_mask(s, float("-inf"), tile, p, masked, MASK, HAS_DILATION, HAS_SINKS, HAS_GLOBAL,
                   PART)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    pr = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(pr, 1)
    acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def dq_tile(dq, args, move, move_ok, start, tile, p, masked, MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
            HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
            PRECISION: tl.constexpr, TMA: tl.constexpr, INT64: tl.constexpr, PART: tl.constexpr):
    """dq += dS K over the key tile, from the probabilities recomputed with the logsumexp."""
    q, do, lse, delta, ksrc, kdesc, vsrc, vdesc, qk_scale = args
    k = load_tile(ksrc, kdesc, move, move_ok, start, False, TMA, HEAD_DIM, INT64)  # (BLOCK_N, HEAD_DIM)
    vt = load_tile(vsrc, vdesc, move, move_ok, start, True, TMA, HEAD_DIM, INT64)  # (HEAD_DIM, BLOCK_N)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    pr = apply_mask(tl.math.exp2(s - lse[:, None]), 0.0, tile, p, masked, MASK, HAS_DILATION,
                    HAS_SINKS, HAS_GLOBAL, PART)  # the softmax weights, recomputed
    dp = tl.dot(do, vt, input_precision=PRECISION)  # dL/dP
    ds = pr * (dp - delta[:, None])  # dL/dS (softmax backward)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def dkdv_tile_t(state, args, move, move_ok, start, tile, p, masked, MASK: tl.constexpr,
                HEAD_DIM: tl.constexpr, HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr,
                HAS_GLOBAL: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                INT64: tl.constexpr, PART: tl.constexpr):
    """dv += P^T dO and dk += dS^T Q over a tile of query rows, computed transposed as
    FlashAttention-2 does: S^T = K Q^T is (BLOCK_N, BLOCK_M), so neither P^T nor dS^T is
    transposed through shared memory. state = (dk, dv); tile is transposed too."""
    dk, dv = state
    k, v, qsrc, qdesc, dosrc, dodesc, LSE, DELTA, qk_scale = args
    qt = load_tile(qsrc, qdesc, move, move_ok, start, True, TMA, HEAD_DIM, INT64)  # (D, BLOCK_M)
    do = load_tile(dosrc, dodesc, move, move_ok, start, False, TMA, HEAD_DIM, INT64)  # (BLOCK_M, D)
    lse = tl.load(LSE + move, mask=move_ok, other=0.0)
    delta = tl.load(DELTA + move, mask=move_ok, other=0.0)
    st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    pt = apply_mask(tl.math.exp2(st - lse[None, :]), 0.0, tile, p, masked, MASK, HAS_DILATION,
                    HAS_SINKS, HAS_GLOBAL, PART)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    return dk, dv


@triton.jit
def dkdv_tile(state, args, move, move_ok, start, tile, p, masked, MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
              HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr, INT64: tl.constexpr, PART: tl.constexpr):
    """The previous step, untransposed: S = Q K^T, then P^T and dS^T through tl.trans (vt: the
    value tile loaded transposed, (HEAD_DIM, BLOCK_N))."""
    dk, dv = state
    k, vt, qsrc, qdesc, dosrc, dodesc, LSE, DELTA, qk_scale = args
    q = load_tile(qsrc, qdesc, move, move_ok, start, False, TMA, HEAD_DIM, INT64)  # (BLOCK_M, HEAD_DIM)
    do = load_tile(dosrc, dodesc, move, move_ok, start, False, TMA, HEAD_DIM, INT64)
    lse = tl.load(LSE + move, mask=move_ok, other=0.0)
    delta = tl.load(DELTA + move, mask=move_ok, other=0.0)
    i, j, rok, kok = tile
    untransposed = (tl.trans(i), tl.trans(j), tl.trans(rok), tl.trans(kok))
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    pr = apply_mask(tl.math.exp2(s - lse[:, None]), 0.0, untransposed, p, masked, MASK, HAS_DILATION,
                    HAS_SINKS, HAS_GLOBAL, PART)
    dv += tl.dot(tl.trans(pr.to(do.dtype)), do, input_precision=PRECISION)
    dp = tl.dot(do, vt, input_precision=PRECISION)
    ds = pr * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv
