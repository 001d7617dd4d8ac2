"""Layer 1, walks: which tiles a kernel's program folds into its state, and in which order.

A program owns a block of positions (query rows; key positions for dk/dv) and walks blocks of
the other side: :func:`walk_band` the sink blocks and the band in one loop (masking only the
edge tiles) or, for the previous variant, in three; :func:`fold_blocks` a plain range (a chunk
of a full row or a column); :func:`fold_gathered` listed positions (global tokens). Every tile
goes through :func:`fold_tile`, which shapes its positions for the mask and calls the step of
:mod:`.tiles` it was given. :func:`sequence_of` and :func:`own_positions` say where a
program's sequence and rows are.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["fold_tile", "fold_blocks", "walk_band", "fold_gathered", "sequence_of", "own_positions"]


@triton.jit
def fold_tile(step: tl.constexpr, state, args, own, own_ok, move, move_ok, start, p, masked,
               OWN_QUERIES: tl.constexpr, MASK: tl.constexpr, PART: tl.constexpr, HEAD_DIM: tl.constexpr,
               HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
               PRECISION: tl.constexpr, TMA: tl.constexpr, INT64: tl.constexpr):
    """Fold the tile (the program's own positions) x (positions move) into state with step.

    OWN_QUERIES: the program owns query rows and move are keys (forward, dq), else the reverse
    (dk/dv, whose tiles are transposed: keys are the rows)."""
    if OWN_QUERIES:
        tile = ((own + p.OFF)[:, None], move[None, :], own_ok[:, None], move_ok[None, :])
    else:
        tile = ((move + p.OFF)[None, :], own[:, None], move_ok[None, :], own_ok[:, None])
    return step(state, args, move, move_ok, start, tile, p, masked, MASK, HEAD_DIM, HAS_DILATION, HAS_SINKS,
                HAS_GLOBAL, PRECISION, TMA, INT64, PART)


@triton.jit
def fold_blocks(step: tl.constexpr, state, args, own, own_ok, first, last, limit, p, OWN_QUERIES: tl.constexpr,
                 MASK: tl.constexpr, PART: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                 PRECISION: tl.constexpr, TMA: tl.constexpr, INT64: tl.constexpr):
    """Fold the blocks first .. last - 1 (BLOCK positions each, below limit) of the other side."""
    for blk in range(first, last):
        move = blk * BLOCK + tl.arange(0, BLOCK)
        state = fold_tile(step, state, args, own, own_ok, move, move < limit, blk * BLOCK, p, True,
                           OWN_QUERIES, MASK, PART, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION,
                           TMA, INT64)
    return state


@triton.jit
def walk_band(step: tl.constexpr, state, args, own, own_ok, lo, a, bb, hi, sink_end, limit, p,
              OWN_QUERIES: tl.constexpr, ONE_LOOP: tl.constexpr, PART: tl.constexpr,
              BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_DILATION: tl.constexpr,
              HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr, PRECISION: tl.constexpr,
              TMA: tl.constexpr, INT64: tl.constexpr):
    """The sink blocks [0, sink_end), then the band's blocks [lo, hi); [a, bb) need no mask.

    ONE_LOOP: one loop, the mask behind a branch taken on edge tiles only; else the previous
    kernel's loops: sinks and edge [lo, a) masked, interior [a, bb) not, edge [bb, hi) masked."""
    if ONE_LOOP:
        for t in range(0, sink_end + hi - lo):
            blk = t
            if t >= sink_end:
                blk = t - sink_end + lo
            move = blk * BLOCK + tl.arange(0, BLOCK)
            edge = (blk < a) | (blk >= bb)
            state = fold_tile(step, state, args, own, own_ok, move, move < limit, blk * BLOCK,
                              p, edge, OWN_QUERIES, "edges", PART, HEAD_DIM, HAS_DILATION,
                              HAS_SINKS, HAS_GLOBAL, PRECISION, TMA, INT64)
    else:
        state = fold_blocks(step, state, args, own, own_ok, 0, sink_end, limit, p, OWN_QUERIES,
                            "pattern", PART, BLOCK, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL,
                            PRECISION, TMA, INT64)
        state = fold_blocks(step, state, args, own, own_ok, lo, a, limit, p, OWN_QUERIES,
                            "pattern", PART, BLOCK, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL,
                            PRECISION, TMA, INT64)
        state = fold_blocks(step, state, args, own, own_ok, a, bb, limit, p, OWN_QUERIES,
                            "none", PART, BLOCK, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL,
                            PRECISION, TMA, INT64)
        state = fold_blocks(step, state, args, own, own_ok, bb, hi, limit, p, OWN_QUERIES,
                            "pattern", PART, BLOCK, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL,
                            PRECISION, TMA, INT64)
    return state


@triton.jit
def fold_gathered(step: tl.constexpr, state, args, own, own_ok, IDX, CNT, IDX_MAX, lo, hi, sink_end, p,
                   OWN_QUERIES: tl.constexpr, PART: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HAS_DILATION: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                   PRECISION: tl.constexpr, INT64: tl.constexpr):
    """The listed positions IDX (the first CNT[0] of IDX_MAX), BLOCK at a time, whose blocks the
    band walk has not visited: outside [lo, hi) and the sink blocks [0, sink_end). Pointer loads."""
    count = tl.load(CNT)
    for t in range(0, IDX_MAX, BLOCK):
        slot = t + tl.arange(0, BLOCK)
        listed = slot < count
        move = tl.load(IDX + slot, mask=listed, other=0)
        blk = move // BLOCK
        fresh = listed & (blk >= sink_end) & ((blk < lo) | (blk >= hi))
        state = fold_tile(step, state, args, own, own_ok, move, fresh, 0, p, True, OWN_QUERIES, "pattern",
                           PART, HEAD_DIM, HAS_DILATION, HAS_SINKS, HAS_GLOBAL, PRECISION, False, INT64)
    return state


@triton.jit
def sequence_of(CU_Q, CU_K, d, N_Q, N_K, VARLEN: tl.constexpr):
    """Where sequence d starts in q and in k/v, and its lengths: a document of the packed
    tensors (VARLEN), or the whole (B, H, N, D) sequence."""
    if VARLEN:
        q_start = tl.load(CU_Q + d)
        k_start = tl.load(CU_K + d)
        return q_start, tl.load(CU_Q + d + 1) - q_start, k_start, tl.load(CU_K + d + 1) - k_start
    else:
        return d * 0, N_Q + d * 0, d * 0, N_K + d * 0


@triton.jit
def own_positions(IDX, CNT, n, BLOCK: tl.constexpr, GATHERED: tl.constexpr):
    """This program's block of rows (queries, or keys for dk/dv) and which exist; for a gathered
    list (full rows, columns: program (block of the list, ., chunk of the other side)) the
    listed positions: (positions, ok, slots in the list)."""
    slot = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if GATHERED:
        ok = slot < tl.load(CNT)
        return tl.load(IDX + slot, mask=ok, other=0), ok, slot
    return slot, slot < n, slot
