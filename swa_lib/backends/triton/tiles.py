"""Layer 1, tiles: the ``@triton.jit`` code about one tile, used by the kernels of :mod:`.kernels`.

The loop bounds (which key blocks a query block needs, and the reverse: plain integer
arithmetic, so :mod:`.launch` calls the same functions from Python through ``.fn``), tile loads
and stores, the tile mask, and the three tile steps: one step of the online softmax, one of dq,
one of dk/dv. A step is ``step(state, args, offs, ok, allowed, MASKED, HEAD_DIM, PRECISION) ->
state``: it folds the tile of positions ``offs`` (keys; query rows for dk/dv) into ``state``, a
tuple of accumulators, reading what the tuple ``args`` holds. A constexpr put in a tuple becomes
a runtime value once the tuple is assigned (a stride of 1 still folds away as a constant), so
the compile-time flags travel as arguments of their own.
"""

from __future__ import annotations

from collections import namedtuple

import triton
import triton.language as tl

__all__ = ["key_block_range", "key_block_full", "sink_block_end", "query_block_range", "query_block_full",
           "head_ptr", "load_rows", "load_cols", "store_rows", "load_query_rows", "ProgramPattern", "pattern_of",
           "tile_mask", "fwd_tile", "dq_tile", "dkdv_tile"]

# The pattern as one program sees it: sizes, its query head's dilation `dil`, and its batch
# element's global tokens: int8 masks GQ, GK of N entries, a list GIDX of G_MAX positions (the
# first GCNT[0] real) and the pointer GCNT to their count.
ProgramPattern = namedtuple("ProgramPattern", ["N", "LEFT", "RIGHT", "SINKS", "G_MAX", "dil", "GQ", "GK", "GIDX",
                                               "GCNT"])


# ---- loop bounds ---------------------------------------------------------------------------
@triton.jit
def key_block_range(start_m, BLOCK_M, BLOCK_N, N, LEFT, RIGHT):
    """Key blocks [lo, hi) that intersect the band of queries start_m .. start_m + BLOCK_M - 1."""
    first_key = max(start_m - LEFT, 0)
    last_key = min(min(start_m + BLOCK_M - 1, N - 1) + RIGHT, N - 1)
    return first_key // BLOCK_N, last_key // BLOCK_N + 1


@triton.jit
def key_block_full(start_m, lo, hi, BLOCK_M, BLOCK_N, N, LEFT, RIGHT):
    """Sub-range [a, b) of [lo, hi) whose tiles lie wholly inside the band (no mask needed)."""
    last_q = min(start_m + BLOCK_M - 1, N - 1)
    first = max(last_q - LEFT, 0)  # every query of the block sees keys first .. last
    last = min(start_m + RIGHT, N - 1)
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
def query_block_range(start_n, BLOCK_M, BLOCK_N, N, LEFT, RIGHT, SINKS):
    """Query blocks [lo, hi) whose band can reach keys start_n .. start_n + BLOCK_N - 1."""
    first_q = max(start_n - RIGHT, 0)
    last_q = min(min(start_n + BLOCK_N - 1, N - 1) + LEFT, N - 1)
    lo = first_q // BLOCK_M
    hi = last_q // BLOCK_M + 1
    if start_n < SINKS:  # sink keys are seen by every later query
        hi = (N + BLOCK_M - 1) // BLOCK_M
    return lo, hi


@triton.jit
def query_block_full(start_n, lo, hi, BLOCK_M, BLOCK_N, N, LEFT, RIGHT):
    """Sub-range [a, b) of [lo, hi) of complete query blocks that see all keys of the block: the
    mirror image of key_block_full, keys seeing queries through the window (RIGHT, LEFT). It calls
    a jit function, so unlike the others its ``.fn`` runs only inside a kernel (or the interpreter)."""
    return key_block_full(start_n, lo, hi, BLOCK_N, BLOCK_M, N, RIGHT, LEFT)


# ---- tiles ---------------------------------------------------------------------------------
@triton.jit
def head_ptr(X, b, h, stride_b, stride_h):
    """X moved to batch element b, head h (64-bit offsets: large tensors overflow int32)."""
    return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def load_rows(X, offs, ok, stride_n, stride_d, HEAD_DIM: tl.constexpr):
    """Rows offs of an (N, HEAD_DIM) matrix as a (len(offs), HEAD_DIM) tile, zero where not ok."""
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(X + offs[:, None] * stride_n + offs_d[None, :] * stride_d, mask=ok[:, None], other=0.0)


@triton.jit
def load_cols(X, offs, ok, stride_n, stride_d, HEAD_DIM: tl.constexpr):
    """The same rows transposed: a (HEAD_DIM, len(offs)) tile."""
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(X + offs[None, :] * stride_n + offs_d[:, None] * stride_d, mask=ok[None, :], other=0.0)


@triton.jit
def store_rows(X, offs, ok, stride_n, stride_d, tile, HEAD_DIM: tl.constexpr):
    """Write a (len(offs), HEAD_DIM) tile into rows offs of X, in X's dtype."""
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(X + offs[:, None] * stride_n + offs_d[None, :] * stride_d, tile.to(X.dtype.element_ty),
             mask=ok[:, None])


@triton.jit
def load_query_rows(Q, DO, LSE, DELTA, offs_m, row_ok, stride_qn, stride_qd, stride_don, stride_dod,
                    HEAD_DIM: tl.constexpr):
    """What the backward pass reads about query rows offs_m: q, dO, the logsumexp and delta."""
    q = load_rows(Q, offs_m, row_ok, stride_qn, stride_qd, HEAD_DIM)  # (BLOCK_M, HEAD_DIM)
    do = load_rows(DO, offs_m, row_ok, stride_don, stride_dod, HEAD_DIM)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def pattern_of(DIL, GQ, GK, GIDX, GCNT, b, h, N, LEFT, RIGHT, SINKS, G_MAX):
    """The ProgramPattern of batch element b and query head h."""
    return ProgramPattern(N, LEFT, RIGHT, SINKS, G_MAX, tl.load(DIL + h), GQ + b * N, GK + b * N,
                          GIDX + b * G_MAX, GCNT + b)


@triton.jit
def tile_mask(offs_m, offs_n, row_ok, key_ok, p, HAS_DILATION: tl.constexpr,
              HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr, GLOBAL_ROWS: tl.constexpr):
    """The predicate of masks.AttentionPattern.allows on a (BLOCK_M, BLOCK_N) tile of pattern p."""
    i = offs_m[:, None]
    j = offs_n[None, :]
    ok = (j >= i - p.LEFT) & (j <= i + p.RIGHT)
    if HAS_DILATION:
        ok = ok & ((i - j) % p.dil == 0)
    if HAS_SINKS:
        ok = ok | ((j < p.SINKS) & (j <= i + p.RIGHT))
    if HAS_GLOBAL:
        gk = tl.load(p.GK + offs_n, mask=key_ok, other=0)
        ok = ok | (gk != 0)[None, :]
        if GLOBAL_ROWS:  # only the backward dk/dv pass needs the global query rows here
            gq = tl.load(p.GQ + offs_m, mask=row_ok, other=0)
            ok = ok | (gq != 0)[:, None]
    return ok & row_ok[:, None] & key_ok[None, :]


# ---- the steps: one tile each ---------------------------------------------------------------
@triton.jit
def fwd_tile(state, args, offs_n, key_ok, allowed, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
             PRECISION: tl.constexpr):
    """One step of the online softmax: fold the key tile offs_n into state = (acc, l_i, m_i)."""
    acc, l_i, m_i = state
    q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale = args
    kt = load_cols(K, offs_n, key_ok, stride_kn, stride_kd, HEAD_DIM)  # (HEAD_DIM, BLOCK_N)
    v = load_rows(V, offs_n, key_ok, stride_vn, stride_vd, HEAD_DIM)  # (BLOCK_N, HEAD_DIM)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def dq_tile(dq, args, offs_n, key_ok, allowed, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
            PRECISION: tl.constexpr):
    """dq += dS K over the key tile offs_n, from the probabilities recomputed with the logsumexp."""
    q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale = args
    kt = load_cols(K, offs_n, key_ok, stride_kn, stride_kd, HEAD_DIM)  # (HEAD_DIM, BLOCK_N)
    vt = load_cols(V, offs_n, key_ok, stride_vn, stride_vd, HEAD_DIM)  # (HEAD_DIM, BLOCK_N)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])  # the softmax weights, recomputed
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, vt, input_precision=PRECISION)  # dL/dP
    ds = p * (dp - delta[:, None])  # dL/dS (softmax backward)
    dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    return dq


@triton.jit
def dkdv_tile(state, args, offs_m, row_ok, allowed, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
              PRECISION: tl.constexpr):
    """dv += P^T dO and dk += dS^T Q over the tile of query rows offs_m; state = (dk, dv)."""
    dk, dv = state
    k, vt, Q, DO, LSE, DELTA, stride_qn, stride_qd, stride_don, stride_dod, qk_scale = args
    q, do, lse, delta = load_query_rows(Q, DO, LSE, DELTA, offs_m, row_ok, stride_qn, stride_qd,
                                        stride_don, stride_dod, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    dp = tl.dot(do, vt, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv
