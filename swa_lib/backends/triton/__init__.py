"""A fused sliding window attention kernel in Triton: forward and backward, band-restricted.

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

Three layers: private ``@triton.jit`` kernels; launchers (``_forward``,
``_backward``) that validate, allocate and compute the grid; and the public
:class:`SlidingWindowAttentionFunction` (autograd) with the plain function
:func:`triton_sliding_window_attention`. Importing this module imports Triton. Without a GPU the
kernels run in Triton's interpreter on CPU, which must be chosen *before this module is first
imported* by setting the environment variable ``TRITON_INTERPRET=1`` (Triton decides at
decoration time, and reads it again at launch, so leave it set); :data:`INTERPRETER` records
which mode this process got. Tested with Triton 3.9 and 3.6 (interpreter, and compiled for
sm_90 without a GPU); Triton 3.6's interpreter needs numpy < 2.4 (it converts one-element arrays
to ints, which numpy 2.4 refuses).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from ..common import refuse_double_backward
from ...masks import AttentionPattern

__all__ = [
    "INTERPRETER",
    "SUPPORTED_HEAD_DIMS",
    "SlidingWindowAttentionFunction",
    "triton_sliding_window_attention",
    "triton_attention",
    "autotune_configs",
    "key_block_range",
    "query_block_range",
    "visited_tiles",
]

#: True when this module's kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETER: bool = os.environ.get("TRITON_INTERPRET") == "1"

#: Head dims the kernel accepts (powers of two: a tile spans the whole head dim).
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)

_LOG2E = 1.4426950408889634
# Runtime integers Triton must not specialise (it turns an int equal to 1 into a constant, which
# would give the loop-bound helpers mismatched types in their runtime `if`s).
_RUNTIME_INTS = ["N", "LEFT", "RIGHT", "SINKS", "G_MAX"]  # scores are kept in base 2 so the kernel can use exp2


# =========================================================================================
# Loop bounds. Plain integer arithmetic, written so the same functions run inside the kernels
# and, through ``.fn``, in Python (the launcher's tests and the chapter's tile picture).
# =========================================================================================
@triton.jit
def _key_block_range(start_m, BLOCK_M, BLOCK_N, N, LEFT, RIGHT):
    """Key blocks [lo, hi) that intersect the band of queries start_m .. start_m + BLOCK_M - 1."""
    first_key = max(start_m - LEFT, 0)
    last_key = min(min(start_m + BLOCK_M - 1, N - 1) + RIGHT, N - 1)
    return first_key // BLOCK_N, last_key // BLOCK_N + 1


@triton.jit
def _key_block_full(start_m, lo, hi, BLOCK_M, BLOCK_N, N, LEFT, RIGHT):
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
def _sink_block_end(SINKS, lo, BLOCK_N):
    """Blocks [0, end) holding sink keys that the band [lo, hi) does not already cover."""
    return min((SINKS + BLOCK_N - 1) // BLOCK_N, lo)


@triton.jit
def _query_block_range(start_n, BLOCK_M, BLOCK_N, N, LEFT, RIGHT, SINKS):
    """Query blocks [lo, hi) whose band can reach keys start_n .. start_n + BLOCK_N - 1."""
    first_q = max(start_n - RIGHT, 0)
    last_q = min(min(start_n + BLOCK_N - 1, N - 1) + LEFT, N - 1)
    lo = first_q // BLOCK_M
    hi = last_q // BLOCK_M + 1
    if start_n < SINKS:  # sink keys are seen by every later query
        hi = (N + BLOCK_M - 1) // BLOCK_M
    return lo, hi


@triton.jit
def _query_block_full(start_n, lo, hi, BLOCK_M, BLOCK_N, N, LEFT, RIGHT):
    """Sub-range [a, b) of [lo, hi) of complete query blocks that see all keys of the block."""
    last_k = min(start_n + BLOCK_N - 1, N - 1)
    first = max(last_k - RIGHT, 0)  # queries first .. last see every key of the block
    last = min(start_n + LEFT, N - 1)
    a = max((first + BLOCK_M - 1) // BLOCK_M, lo)
    b = min((last + 1) // BLOCK_M, hi)
    if a >= b:
        a = hi
        b = hi
    return a, b


def key_block_range(start_m: int, block_m: int, block_n: int, n: int, left: int, right: int):
    """Python view of the kernel's loop bounds: key blocks ``[lo, hi)`` for a query block."""
    return _key_block_range.fn(start_m, block_m, block_n, n, left, right)


def query_block_range(start_n, block_m, block_n, n, left, right, sinks=0):
    """Python view of the dk/dv kernel's bounds: query blocks ``[lo, hi)`` for a key block."""
    return _query_block_range.fn(start_n, block_m, block_n, n, left, right, sinks)


def visited_tiles(n: int, pattern: AttentionPattern, block_m: int, block_n: int, batch: int = 0):
    """Which (query block, key block) tiles the forward kernel computes, as a bool tensor.

    Uses the kernels' own bound functions. Gathered global keys are drawn as the key blocks that
    hold them; global query rows as full rows of tiles (the "full row" pass).
    """
    left, right, sinks = min(pattern.left, n), min(pattern.right, n), min(pattern.sinks, n)
    n_qb, n_kb = triton.cdiv(n, block_m), triton.cdiv(n, block_n)
    tiles = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    g = pattern.global_tokens
    g_pos = [] if g is None else torch.nonzero(g[batch]).flatten().tolist()
    for qb in range(n_qb):
        lo, hi = _key_block_range.fn(qb * block_m, block_m, block_n, n, left, right)
        tiles[qb, lo:hi] = True
        tiles[qb, : _sink_block_end.fn(sinks, lo, block_n)] = True
        for j in g_pos:
            tiles[qb, j // block_n] = True
    for i in g_pos:
        tiles[i // block_m, :] = True
    return tiles


# =========================================================================================
# Layer 1: the jit kernels.
# =========================================================================================
@triton.jit
def _tile_mask(offs_m, offs_n, row_ok, key_ok, dil, GQ, GK, N, LEFT, RIGHT, SINKS,
               HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
               GLOBAL_ROWS: tl.constexpr):
    """The predicate of masks.AttentionPattern.allows on a (BLOCK_M, BLOCK_N) tile."""
    i = offs_m[:, None]
    j = offs_n[None, :]
    ok = (j >= i - LEFT) & (j <= i + RIGHT)
    if HAS_DILATION:
        ok = ok & ((i - j) % dil == 0)
    if HAS_SINKS:
        ok = ok | ((j < SINKS) & (j <= i + RIGHT))
    if HAS_GLOBAL:
        gk = tl.load(GK + offs_n, mask=key_ok, other=0)
        ok = ok | (gk != 0)[None, :]
        if GLOBAL_ROWS:  # only the backward dk/dv pass needs the global query rows here
            gq = tl.load(GQ + offs_m, mask=row_ok, other=0)
            ok = ok | (gq != 0)[:, None]
    return ok & row_ok[:, None] & key_ok[None, :]


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, offs_n, key_ok, allowed, stride_kn, stride_kd,
              stride_vn, stride_vd, qk_scale, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
              PRECISION: tl.constexpr):
    """One step of the online softmax: fold the key tile offs_n into (acc, l_i, m_i)."""
    offs_d = tl.arange(0, HEAD_DIM)
    kt = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=key_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=key_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
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


@triton.jit(do_not_specialize=["H", *_RUNTIME_INTS])
def _fwd_kernel(
    # pointers
    Q, K, V, O, LSE, DIL, GQ, GK, GIDX, GCNT,
    # strides
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    # sizes and pattern
    H, N, LEFT, RIGHT, SINKS, G_MAX, qk_scale,
    # constexprs
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    FULL_ROWS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    h_kv = h // GROUP
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    LSE += pid_bh.to(tl.int64) * N
    GQ += b * N
    GK += b * N
    GIDX += b * G_MAX
    offs_d = tl.arange(0, HEAD_DIM)
    dil = tl.load(DIL + h)

    # -- which query rows this program owns ----------------------------------------------
    if FULL_ROWS:  # global query rows, gathered from the index list
        slot = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = slot < tl.load(GCNT + b)
        offs_m = tl.load(GIDX + slot, mask=row_ok, other=0)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if FULL_ROWS:  # a global query sees every key
        for nb in range(0, tl.cdiv(N, BLOCK_N)):
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = offs_n < N
            allowed = row_ok[:, None] & key_ok[None, :]
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, offs_n, key_ok, allowed,
                                      stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                      HEAD_DIM, True, PRECISION)
    else:
        start_m = pid_m * BLOCK_M
        lo, hi = _key_block_range(start_m, BLOCK_M, BLOCK_N, N, LEFT, RIGHT)
        a, bb = _key_block_full(start_m, lo, hi, BLOCK_M, BLOCK_N, N, LEFT, RIGHT)
        if HAS_DILATION:  # dilation holes: every tile needs the mask
            a = hi
            bb = hi
        sink_end = 0
        if HAS_SINKS:
            sink_end = _sink_block_end(SINKS, lo, BLOCK_N)
            for nb in range(0, sink_end):
                offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
                key_ok = offs_n < N
                allowed = _tile_mask(offs_m, offs_n, row_ok, key_ok, dil, GQ, GK, N, LEFT, RIGHT,
                                     SINKS, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, False)
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, offs_n, key_ok, allowed,
                                          stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                          HEAD_DIM, True, PRECISION)
        # the band: masked edge tiles, unmasked interior tiles, masked edge tiles
        for nb in range(lo, a):
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = offs_n < N
            allowed = _tile_mask(offs_m, offs_n, row_ok, key_ok, dil, GQ, GK, N, LEFT, RIGHT,
                                 SINKS, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, False)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, offs_n, key_ok, allowed,
                                      stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                      HEAD_DIM, True, PRECISION)
        for nb in range(a, bb):
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = offs_n < N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, offs_n, key_ok, key_ok[None, :],
                                      stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                      HEAD_DIM, False, PRECISION)
        for nb in range(bb, hi):
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = offs_n < N
            allowed = _tile_mask(offs_m, offs_n, row_ok, key_ok, dil, GQ, GK, N, LEFT, RIGHT,
                                 SINKS, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, False)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, offs_n, key_ok, allowed,
                                      stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                      HEAD_DIM, True, PRECISION)
        if HAS_GLOBAL:  # global keys outside the tiles above, gathered from the index list
            count = tl.load(GCNT + b)
            for t in range(0, G_MAX, BLOCK_N):
                slot = t + tl.arange(0, BLOCK_N)
                listed = slot < count
                offs_n = tl.load(GIDX + slot, mask=listed, other=0)
                k_blk = offs_n // BLOCK_N
                key_ok = listed & (k_blk >= sink_end) & ((k_blk < lo) | (k_blk >= hi))
                allowed = row_ok[:, None] & key_ok[None, :]
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, offs_n, key_ok, allowed,
                                          stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                          HEAD_DIM, True, PRECISION)

    # -- epilogue: normalise, save the logsumexp (base 2) for the backward pass -------------
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit(do_not_specialize=["H", "N"])
def _bwd_delta_kernel(O, DO, DELTA,
                      stride_ob, stride_oh, stride_on, stride_od,
                      stride_dob, stride_doh, stride_don, stride_dod,
                      H, N, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta_i = sum_d dO[i, d] * O[i, d] in fp32: one number per row for the softmax backward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=row_ok)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, offs_n, key_ok, allowed, stride_kn, stride_kd,
             stride_vn, stride_vd, qk_scale, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
             PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    kt = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=key_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
    vt = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                 mask=key_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])  # the softmax weights, recomputed
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, vt, input_precision=PRECISION)  # dL/dP
    ds = p * (dp - delta[:, None])  # dL/dS (softmax backward)
    dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["H", *_RUNTIME_INTS])
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, DIL, GQ, GK, GIDX, GCNT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N, LEFT, RIGHT, SINKS, G_MAX, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    FULL_ROWS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    h_kv = h // GROUP
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    DQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    LSE += pid_bh.to(tl.int64) * N
    DELTA += pid_bh.to(tl.int64) * N
    GQ += b * N
    GK += b * N
    GIDX += b * G_MAX
    offs_d = tl.arange(0, HEAD_DIM)
    dil = tl.load(DIL + h)
    if FULL_ROWS:
        slot = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = slot < tl.load(GCNT + b)
        offs_m = tl.load(GIDX + slot, mask=row_ok, other=0)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if FULL_ROWS:
        for nb in range(0, tl.cdiv(N, BLOCK_N)):
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = offs_n < N
            allowed = row_ok[:, None] & key_ok[None, :]
            dq = _dq_tile(dq, q, do, lse, delta, K, V, offs_n, key_ok, allowed, stride_kn,
                          stride_kd, stride_vn, stride_vd, qk_scale, HEAD_DIM, True, PRECISION)
    else:
        start_m = pid_m * BLOCK_M
        lo, hi = _key_block_range(start_m, BLOCK_M, BLOCK_N, N, LEFT, RIGHT)
        a, bb = _key_block_full(start_m, lo, hi, BLOCK_M, BLOCK_N, N, LEFT, RIGHT)
        if HAS_DILATION:
            a = hi
            bb = hi
        sink_end = 0
        if HAS_SINKS:
            sink_end = _sink_block_end(SINKS, lo, BLOCK_N)
            for nb in range(0, sink_end):
                offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
                key_ok = offs_n < N
                allowed = _tile_mask(offs_m, offs_n, row_ok, key_ok, dil, GQ, GK, N, LEFT, RIGHT,
                                     SINKS, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, False)
                dq = _dq_tile(dq, q, do, lse, delta, K, V, offs_n, key_ok, allowed, stride_kn,
                              stride_kd, stride_vn, stride_vd, qk_scale, HEAD_DIM, True, PRECISION)
        for nb in range(lo, a):
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = offs_n < N
            allowed = _tile_mask(offs_m, offs_n, row_ok, key_ok, dil, GQ, GK, N, LEFT, RIGHT,
                                 SINKS, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, False)
            dq = _dq_tile(dq, q, do, lse, delta, K, V, offs_n, key_ok, allowed, stride_kn,
                          stride_kd, stride_vn, stride_vd, qk_scale, HEAD_DIM, True, PRECISION)
        for nb in range(a, bb):
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = offs_n < N
            dq = _dq_tile(dq, q, do, lse, delta, K, V, offs_n, key_ok, key_ok[None, :], stride_kn,
                          stride_kd, stride_vn, stride_vd, qk_scale, HEAD_DIM, False, PRECISION)
        for nb in range(bb, hi):
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = offs_n < N
            allowed = _tile_mask(offs_m, offs_n, row_ok, key_ok, dil, GQ, GK, N, LEFT, RIGHT,
                                 SINKS, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, False)
            dq = _dq_tile(dq, q, do, lse, delta, K, V, offs_n, key_ok, allowed, stride_kn,
                          stride_kd, stride_vn, stride_vd, qk_scale, HEAD_DIM, True, PRECISION)
        if HAS_GLOBAL:
            count = tl.load(GCNT + b)
            for t in range(0, G_MAX, BLOCK_N):
                slot = t + tl.arange(0, BLOCK_N)
                listed = slot < count
                offs_n = tl.load(GIDX + slot, mask=listed, other=0)
                k_blk = offs_n // BLOCK_N
                key_ok = listed & (k_blk >= sink_end) & ((k_blk < lo) | (k_blk >= hi))
                allowed = row_ok[:, None] & key_ok[None, :]
                dq = _dq_tile(dq, q, do, lse, delta, K, V, offs_n, key_ok, allowed, stride_kn,
                              stride_kd, stride_vn, stride_vd, qk_scale, HEAD_DIM, True, PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_tile(dk, dv, k, vt, Q, DO, LSE, DELTA, offs_m, row_ok, allowed, stride_qn, stride_qd,
               stride_don, stride_dod, qk_scale, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEAD_DIM)
    do = tl.load(DO + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    dp = tl.dot(do, vt, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["H_KV", *_RUNTIME_INTS])
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, DIL, GQ, GK, GIDX, GCNT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H_KV, N, LEFT, RIGHT, SINKS, G_MAX, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    h_kv = pid_bh % H_KV
    H = H_KV * GROUP
    K += b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    DK += b.to(tl.int64) * stride_dkb + h_kv.to(tl.int64) * stride_dkh
    DV += b.to(tl.int64) * stride_dvb + h_kv.to(tl.int64) * stride_dvh
    GQ += b * N
    GK += b * N
    GIDX += b * G_MAX
    offs_d = tl.arange(0, HEAD_DIM)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < N
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=key_ok[:, None], other=0.0)  # (BLOCK_N, HEAD_DIM)
    vt = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                 mask=key_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    lo, hi = _query_block_range(start_n, BLOCK_M, BLOCK_N, N, LEFT, RIGHT, SINKS)
    if HAS_GLOBAL:  # a block holding a global key is seen by every query
        gk = tl.load(GK + offs_n, mask=key_ok, other=0)
        if tl.max(gk.to(tl.int32), 0) > 0:
            lo = lo * 0
            hi = hi * 0 + tl.cdiv(N, BLOCK_M)
    a, bb = _query_block_full(start_n, lo, hi, BLOCK_M, BLOCK_N, N, LEFT, RIGHT)
    if HAS_DILATION:
        a = hi
        bb = hi

    # Grouped-query attention: the GROUP query heads sharing this k/v head all add into dk, dv.
    for g in range(0, GROUP):
        h = h_kv * GROUP + g
        Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DOh = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        LSEh = LSE + (b * H + h).to(tl.int64) * N
        DELTAh = DELTA + (b * H + h).to(tl.int64) * N
        dil = tl.load(DIL + h)
        for mb in range(lo, a):
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            allowed = _tile_mask(offs_m, offs_n, row_ok, key_ok, dil, GQ, GK, N, LEFT, RIGHT,
                                 SINKS, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, True)
            dk, dv = _dkdv_tile(dk, dv, k, vt, Qh, DOh, LSEh, DELTAh, offs_m, row_ok, allowed,
                                stride_qn, stride_qd, stride_don, stride_dod, qk_scale,
                                HEAD_DIM, True, PRECISION)
        for mb in range(a, bb):
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            dk, dv = _dkdv_tile(dk, dv, k, vt, Qh, DOh, LSEh, DELTAh, offs_m, row_ok,
                                key_ok[None, :], stride_qn, stride_qd, stride_don, stride_dod,
                                qk_scale, HEAD_DIM, False, PRECISION)
        for mb in range(bb, hi):
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            allowed = _tile_mask(offs_m, offs_n, row_ok, key_ok, dil, GQ, GK, N, LEFT, RIGHT,
                                 SINKS, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, True)
            dk, dv = _dkdv_tile(dk, dv, k, vt, Qh, DOh, LSEh, DELTAh, offs_m, row_ok, allowed,
                                stride_qn, stride_qd, stride_don, stride_dod, qk_scale,
                                HEAD_DIM, True, PRECISION)
        if HAS_GLOBAL:  # global queries outside [lo, hi) see this block too
            count = tl.load(GCNT + b)
            for t in range(0, G_MAX, BLOCK_M):
                slot = t + tl.arange(0, BLOCK_M)
                listed = slot < count
                offs_m = tl.load(GIDX + slot, mask=listed, other=0)
                q_blk = offs_m // BLOCK_M
                row_ok = listed & ((q_blk < lo) | (q_blk >= hi))
                allowed = row_ok[:, None] & key_ok[None, :]
                dk, dv = _dkdv_tile(dk, dv, k, vt, Qh, DOh, LSEh, DELTAh, offs_m, row_ok, allowed,
                                    stride_qn, stride_qd, stride_don, stride_dod, qk_scale,
                                    HEAD_DIM, True, PRECISION)

    dk = dk * sm_scale
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


# =========================================================================================
# Layer 2: launchers (validate, allocate, grid).
# =========================================================================================
def autotune_configs(kind: str) -> list:
    """The block sizes and launch parameters tried on a GPU, per kernel ("fwd", "dq", "dkdv").

    The interpreter skips autotuning (each trial would run the whole kernel in Python) and
    uses :data:`_INTERPRETER_BLOCKS`. Configs that do not fit the GPU are discarded by Triton's
    autotuner when they fail to compile.
    """
    if kind == "fwd":
        shapes = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                  (64, 128, 4, 3), (32, 32, 4, 1)]
    elif kind == "dq":
        shapes = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (32, 64, 4, 3),
                  (32, 32, 4, 1)]
    elif kind == "dkdv":
        shapes = [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2),
                  (16, 128, 4, 3), (32, 32, 4, 1)]
    else:
        raise ValueError(f"kind must be 'fwd', 'dq' or 'dkdv', got {kind!r}")
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


_DELTA_BLOCK = 16 if INTERPRETER else 64
_INTERPRETER_BLOCKS = (16, 16)  # small tiles: tiny test sizes still span several blocks
_TUNE_KEY = ["N", "LEFT", "RIGHT", "SINKS", "HEAD_DIM", "GROUP", "HAS_DILATION", "HAS_SINKS", "HAS_GLOBAL",
             "PRECISION"]

if INTERPRETER:
    _fwd, _dq, _dkdv = _fwd_kernel, _bwd_dq_kernel, _bwd_dkdv_kernel
else:  # pragma: no cover - GPU only
    _fwd = triton.autotune(configs=autotune_configs("fwd"), key=_TUNE_KEY + ["FULL_ROWS"])(_fwd_kernel)
    _dq = triton.autotune(configs=autotune_configs("dq"), key=_TUNE_KEY + ["FULL_ROWS"])(_bwd_dq_kernel)
    _dkdv = triton.autotune(configs=autotune_configs("dkdv"), key=_TUNE_KEY)(_bwd_dkdv_kernel)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _blocks(blocks: Optional[tuple]) -> dict:
    """Launch keywords: fixed blocks (interpreter, or a caller's choice) or none (autotune)."""
    if blocks is None and INTERPRETER:
        blocks = _INTERPRETER_BLOCKS
    if blocks is None:
        return {}
    bm, bn = blocks
    for name, b in (("block_m", bm), ("block_n", bn)):
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b!r}")
    return {"BLOCK_M": bm, "BLOCK_N": bn}


def _launch(kernel, grid_rows: int, other_dim: int, blocks: dict, *args, **kwargs):
    """Launch with fixed blocks, or with a grid that follows the autotuner's BLOCK_M/BLOCK_N."""
    which = "BLOCK_N" if kernel is _dkdv else "BLOCK_M"
    if blocks:  # fixed blocks: call the plain jit kernel
        plain = {_fwd: _fwd_kernel, _dq: _bwd_dq_kernel, _dkdv: _bwd_dkdv_kernel}[kernel]
        grid = (triton.cdiv(grid_rows, blocks[which]), other_dim)
        plain[grid](*args, **kwargs, **blocks)
    else:
        kernel[lambda meta: (triton.cdiv(grid_rows, meta[which]), other_dim)](*args, **kwargs)


class _Prepared:
    """Validated launch parameters shared by the forward and backward passes."""

    def __init__(self, q, k, v, pattern: AttentionPattern, scale: float, blocks):
        if not isinstance(pattern, AttentionPattern):
            raise TypeError(f"pattern must be an AttentionPattern, got {type(pattern).__name__}")
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise ValueError(f"{name} must be a 4-dim (B, H, N, D) tensor, got {getattr(x, 'shape', x)!r}")
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
            raise TypeError(f"triton kernel supports float16, bfloat16, float32 (one dtype for q, k, v); "
                            f"got {q.dtype}, {k.dtype}, {v.dtype}")
        if INTERPRETER and q.dtype == torch.bfloat16:
            raise TypeError("Triton's CPU interpreter computes bfloat16 tl.dot wrongly (triton 3.9); "
                            "use float16 or float32 on CPU, bfloat16 on a GPU; got torch.bfloat16")
        want = "cpu" if INTERPRETER else "cuda"
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.device.type != want:
                how = ("this process runs Triton's CPU interpreter (TRITON_INTERPRET=1)" if INTERPRETER
                       else "the compiled kernel needs CUDA tensors (for CPU, set TRITON_INTERPRET=1 "
                            "before swa_lib.backends.triton is imported)")
                raise ValueError(f"{name} is on {x.device}, but {how}")
        batch, heads, n, d = q.shape
        heads_kv = k.shape[1]
        if k.shape != (batch, heads_kv, n, d) or v.shape != k.shape:
            raise ValueError(f"triton kernel needs k, v of shape (B, H_kv, N, D) matching q {tuple(q.shape)} "
                             f"(as many keys as queries, D_v == D); got k {tuple(k.shape)}, v {tuple(v.shape)}")
        if heads_kv == 0 or heads % heads_kv:
            raise ValueError(f"q heads ({heads}) must be a multiple of k/v heads ({heads_kv})")
        if d not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"triton kernel supports head dims {SUPPORTED_HEAD_DIMS}, got {d}")
        if n == 0 or batch == 0:
            raise ValueError(f"empty input: q has shape {tuple(q.shape)}")
        self.shape = (batch, heads, heads_kv, n, d)
        self.group = heads // heads_kv
        self.left, self.right, self.sinks = min(pattern.left, n), min(pattern.right, n), min(pattern.sinks, n)
        dev = q.device
        self.dil = torch.tensor(pattern.dilation_per_head(heads), dtype=torch.int32, device=dev)
        self.has_dilation = pattern.max_dilation > 1
        g = pattern.global_tokens
        if g is not None:
            if g.shape != (batch, n):
                raise ValueError(f"global_tokens must have shape ({batch}, {n}), got {tuple(g.shape)}")
            g = g.to(dev)
            counts = g.sum(1).to(torch.int32)  # (B,)
            self.g_max = int(counts.max())
        if g is None or self.g_max == 0:
            self.has_global, self.g_max = False, 0
            self.gmask = torch.zeros(1, dtype=torch.int8, device=dev)
            self.gidx = torch.zeros(1, dtype=torch.int32, device=dev)
            self.gcnt = torch.zeros(1, dtype=torch.int32, device=dev)
        else:
            self.has_global = True
            self.gmask = g.to(torch.int8).contiguous()  # (B, N)
            # positions of the global tokens first, in order: a stable sort of "not global"
            order = torch.sort((~g).to(torch.int8), dim=1, stable=True).indices[:, : self.g_max]
            self.gidx = order.to(torch.int32).contiguous()  # (B, G_MAX), padded past counts[b]
            self.gcnt = counts.contiguous()
        self.scale = float(scale)
        self.qk_scale = self.scale * _LOG2E
        self.precision = "tf32x3" if q.dtype == torch.float32 else "tf32"  # fp32: 3xTF32 ~ fp32 accuracy
        self.blocks = _blocks(blocks)

    def common(self) -> dict:
        return dict(
            GROUP=self.group, HEAD_DIM=self.shape[4], HAS_DILATION=self.has_dilation,
            HAS_SINKS=self.sinks > 0, HAS_GLOBAL=self.has_global, PRECISION=self.precision,
        )


def _on_device(x: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _strides(x: torch.Tensor) -> tuple:
    return tuple(x.stride())


def _forward(q, k, v, prep: _Prepared):
    """Launch the forward kernel(s); returns out (B, H, N, D) and lse (B, H, N), base-2 fp32."""
    batch, heads, _, n, d = prep.shape
    out = torch.empty((batch, heads, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    args = (q, k, v, out, lse, prep.dil, prep.gmask, prep.gmask, prep.gidx, prep.gcnt,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            heads, n, prep.left, prep.right, prep.sinks, prep.g_max, prep.qk_scale)
    _launch(_fwd, n, batch * heads, prep.blocks, *args, **prep.common(), FULL_ROWS=False)
    if prep.has_global:  # overwrite the global query rows with full rows
        _launch(_fwd, prep.g_max, batch * heads, prep.blocks, *args, **prep.common(), FULL_ROWS=True)
    return out, lse


def _backward(do, q, k, v, out, lse, prep: _Prepared):
    """Launch the dq and dk/dv kernels; returns dq, dk, dv shaped like q, k, v."""
    batch, heads, heads_kv, n, d = prep.shape
    delta = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)  # rowsum(dO * O)
    _bwd_delta_kernel[(triton.cdiv(n, _DELTA_BLOCK), batch * heads)](
        out, do, delta, *_strides(out), *_strides(do), heads, n, HEAD_DIM=d, BLOCK=_DELTA_BLOCK)
    dq = torch.empty((batch, heads, n, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, heads_kv, n, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, heads_kv, n, d), dtype=v.dtype, device=v.device)
    dq_args = (q, k, v, do, dq, lse, delta, prep.dil, prep.gmask, prep.gmask, prep.gidx, prep.gcnt,
               *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
               heads, n, prep.left, prep.right, prep.sinks, prep.g_max, prep.qk_scale, prep.scale)
    _launch(_dq, n, batch * heads, prep.blocks, *dq_args, **prep.common(), FULL_ROWS=False)
    if prep.has_global:
        _launch(_dq, prep.g_max, batch * heads, prep.blocks, *dq_args, **prep.common(), FULL_ROWS=True)
    _launch(_dkdv, n, batch * heads_kv, prep.blocks,
            q, k, v, do, dk, dv, lse, delta, prep.dil, prep.gmask, prep.gmask, prep.gidx, prep.gcnt,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            heads_kv, n, prep.left, prep.right, prep.sinks, prep.g_max, prep.qk_scale, prep.scale,
            **prep.common())
    return dq, dk, dv


# =========================================================================================
# Layer 3: the autograd Function and the plain functions.
# =========================================================================================
class SlidingWindowAttentionFunction(torch.autograd.Function):
    """``apply(q, k, v, pattern, scale, blocks)`` -> out; gradients for q, k and v.

    Saves q, k, v, the output and the row logsumexp (O(N) extra memory, no (N, N) matrix).
    """

    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, blocks=None):
        prep = _Prepared(q, k, v, pattern, scale, blocks)
        with _on_device(q):
            out, lse = _forward(q, k, v, prep)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.prep = prep
        return out

    @staticmethod
    def backward(ctx, do):
        refuse_double_backward("triton")  # once_differentiable alone lets create_graph=True pass silently
        q, k, v, out, lse = ctx.saved_tensors
        with _on_device(q):
            dq, dk, dv = _backward(do, q, k, v, out, lse, ctx.prep)
        return dq, dk, dv, None, None, None


def triton_attention(q, k, v, pattern: AttentionPattern, scale: float, blocks=None) -> torch.Tensor:
    """The registry's backend function: ``fn(q, k, v, pattern, scale) -> out``."""
    return SlidingWindowAttentionFunction.apply(q, k, v, pattern, scale, blocks)


def triton_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window,
    *,
    dilation: Union[int, Sequence[int]] = 1,
    global_tokens=None,
    sinks: int = 0,
    scale: Optional[float] = None,
    blocks: Optional[tuple] = None,
) -> torch.Tensor:
    """Sliding window attention in one fused Triton kernel (forward and backward).

    Args:
        q: ``(B, H, N, D)`` queries; k, v: ``(B, H_kv, N, D)`` with ``H % H_kv == 0``
            (grouped-query attention). As many keys as queries (no cached decoding here).
            Any strides: the kernel takes them as arguments.
        window: inclusive ``(left, right)``, as in :func:`swa_lib.sliding_window_attention`;
            dilation (int or one per query head), global_tokens (bool ``(B, N)``/``(N,)`` mask
            or positions) and sinks likewise.
        scale: default ``D ** -0.5``.
        blocks: ``(BLOCK_M, BLOCK_N)`` to bypass the autotuner (powers of two >= 16).

    Returns:
        ``(B, H, N, D)`` in the input dtype; differentiable in q, k and v.

    Limits: dtypes float16, bfloat16, float32 (fp32 matmuls as 3xTF32, close to fp32 accuracy;
    bfloat16 only compiled, not in the interpreter, whose bf16 ``tl.dot`` is wrong in triton 3.9);
    ``D`` in :data:`SUPPORTED_HEAD_DIMS`; CUDA tensors, or CPU tensors in the interpreter
    (``TRITON_INTERPRET=1`` set before this module was imported; slow, for tests and teaching).
    Cost: O(N * (left + right + block)) for the band, plus O(N * G) for G global tokens and
    O(N * S) for S sinks; dilation keeps the band's cost (holes are masked, not skipped).
    Accumulation is in fp32; the saved logsumexp is fp32.
    """
    from ...attention import validate_call

    pattern, scale = validate_call(q, k, v, window, dilation=dilation, global_tokens=global_tokens,
                                   sinks=sinks, scale=scale)
    return triton_attention(q, k, v, pattern, scale, blocks)
