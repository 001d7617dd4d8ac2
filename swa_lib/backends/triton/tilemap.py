"""Python views of the kernels' loop bounds: which tiles each program walks.

The same ``@triton.jit`` bound functions the kernels call (:mod:`.tiles`), run from Python
through ``.fn``: the tests compare them with the mask, the chapter draws them, and
:func:`program_tiles` counts the tiles of every program of a launch, to check that no program
walks much more than the median (sinks and global tokens are split into chunks).
"""

from __future__ import annotations

import statistics

import torch
import triton

from ...masks import AttentionPattern
from . import tiles

__all__ = ["key_block_range", "query_block_range", "chunk_size", "visited_tiles", "program_tiles",
           "load_balance"]


def key_block_range(start_m: int, block_m: int, block_n: int, n: int, left: int, right: int, n_q=None):
    """Key blocks ``[lo, hi)`` of the band of the query block starting at row ``start_m``
    (queries are the last ``n_q`` of ``n`` positions; default all)."""
    off = 0 if n_q is None else n - n_q
    return tiles.key_block_range.fn(start_m + off, block_m, block_n, n, left, right)


def query_block_range(start_n: int, block_m: int, block_n: int, n: int, left: int, right: int, n_q=None):
    """Query-row blocks ``[lo, hi)`` whose band reaches the key block starting at ``start_n``
    (the dk/dv kernel's band; sinks and global keys seen from farther are the column pass's)."""
    off = 0 if n_q is None else n - n_q
    return tiles.query_block_range.fn(start_n, block_m, block_n, n, off, left, right)


def chunk_size(n: int, left: int, right: int) -> int:
    """Positions per program of a full row or a column: a power of two (so every block size
    divides it), at least twice the band, 512, and 1/64 of the sequence (at most 64 chunks)."""
    band = min(left, n) + min(right, n) + 1
    return max(512, triton.next_power_of_2(2 * band + 256), triton.next_power_of_2(triton.cdiv(n, 64)))


def _global_positions(pattern: AttentionPattern, batch: int) -> list:
    g = pattern.global_tokens
    return [] if g is None else torch.nonzero(g[batch]).flatten().tolist()


def visited_tiles(n: int, pattern: AttentionPattern, block_m: int, block_n: int, batch: int = 0, n_q=None):
    """Which (query block, key block) tiles the forward kernel computes, as a bool tensor.

    Uses the kernels' own bound functions. Gathered global keys are drawn as the key blocks that
    hold them; global query rows as full rows of tiles (the "full row" launches)."""
    n_q = n if n_q is None else n_q
    left, right, sinks = min(pattern.left, n), min(pattern.right, n), min(pattern.sinks, n)
    visited = torch.zeros(triton.cdiv(n_q, block_m), triton.cdiv(n, block_n), dtype=torch.bool)
    g_pos = _global_positions(pattern, batch)
    for qb in range(visited.shape[0]):
        lo, hi = key_block_range(qb * block_m, block_m, block_n, n, left, right, n_q)
        visited[qb, lo:hi] = True
        visited[qb, : tiles.sink_block_end.fn(sinks, lo, block_n)] = True
        for j in g_pos:
            visited[qb, j // block_n] = True
    for i in g_pos:
        if i >= n - n_q:
            visited[(i - n + n_q) // block_m, :] = True
    return visited


def program_tiles(n: int, pattern: AttentionPattern, block_m: int, block_n: int, kind: str, group: int = 1,
                  batch: int = 0) -> list:
    """Tiles walked by each program of the launches of kernel ``kind`` ("fwd" or "dq": query
    blocks then full-row chunks; "dkdv": key blocks then column chunks), per (batch, head)."""
    left, right, sinks = min(pattern.left, n), min(pattern.right, n), min(pattern.sinks, n)
    g_pos = _global_positions(pattern, batch)
    chunk = chunk_size(n, left, right)
    chunks = [(c, min(c + chunk, n)) for c in range(0, n, chunk)]
    counts = []
    if kind in ("fwd", "dq"):
        gathered = triton.cdiv(len(g_pos), block_n)
        for qb in range(triton.cdiv(n, block_m)):
            lo, hi = key_block_range(qb * block_m, block_m, block_n, n, left, right)
            counts.append(tiles.sink_block_end.fn(sinks, lo, block_n) + hi - lo + gathered)
        for _ in range(triton.cdiv(len(g_pos), block_m)):
            counts += [triton.cdiv(b, block_n) - a // block_n for a, b in chunks]
    elif kind == "dkdv":
        gathered = triton.cdiv(len(g_pos), block_m)
        for kb in range(triton.cdiv(n, block_n)):
            lo, hi = query_block_range(kb * block_n, block_m, block_n, n, left, right)
            counts.append(group * (hi - lo + gathered))
        columns = len(set(range(sinks)) | set(g_pos))
        for _ in range(triton.cdiv(columns, block_n)):
            counts += [group * (triton.cdiv(b, block_m) - a // block_m) for a, b in chunks]
    else:
        raise ValueError(f"kind must be 'fwd', 'dq' or 'dkdv', got {kind!r}")
    return counts


def load_balance(n: int, pattern: AttentionPattern, block_m: int, block_n: int, kind: str) -> tuple:
    """(most tiles any program walks, median over programs) for :func:`program_tiles`."""
    counts = program_tiles(n, pattern, block_m, block_n, kind)
    return max(counts), statistics.median(counts)
