"""The geometry of blocked band attention: query blocks, their key bands, slabs and masks.

Queries are cut into blocks of ``Bq`` rows; block ``t`` holds query rows ``t*Bq .. t*Bq + Bq - 1``
(positions ``offset + row``: queries are the last ``N_q`` of ``N_k`` positions) and sees keys
inside one contiguous band of ``L = Bq + left + right`` positions starting at
``first_key(t) = offset + t*Bq - left``. Consecutive bands start ``Bq`` keys apart, so the bands
of a run of blocks are one strided view of the keys (:func:`band_view`, no copy). Inside a band
the window is the same for every block: row ``r`` sees band columns ``r .. r + left + right``,
one ``(Bq, L)`` mask for all (:attr:`Plan.static_mask`).

That holds for *interior* blocks, whose band lies inside the sequence and whose rows are all
real queries. The few blocks at either end (a band that sticks out, a last block with fewer
rows) are *edge* blocks: the slab holding them reads its rows from a copy with zeros for the
positions outside the sequence (:func:`padded_rows`; the bands are again a strided view of
that copy), and an exact mask (:meth:`Plan.exact_mask`) hides what does not exist. When ``L``
would reach past all keys, every block sees all keys (``stride`` 0) and every block gets the
exact mask.

Blocks are grouped into *slabs* (runs of blocks whose scores fit a budget, :data:`SLAB_SCORES` by
default; at least one block each), the unit of work of :mod:`swa_lib.backends.blocked`: :attr:`Plan.segments` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Plan", "make_plan", "padded_rows", "band_view", "rows_view", "fold", "DEFAULT_BLOCK_SIZE",
           "SLAB_SCORES"]

#: Query rows per block. 64 keeps the band waste near 10% for windows of a few hundred keys
#: while each product is still large enough for an efficient GEMM.
DEFAULT_BLOCK_SIZE = 64
#: Scores per slab, about 4 MiB in float32: a slab's scores and probabilities stay in cache.
SLAB_SCORES = 1 << 20


@dataclass(frozen=True)
class Plan:
    """Where every query block of one call looks (see the module docstring)."""

    n_q: int
    n_k: int
    left: int  # clipped to what can matter
    right: int
    block: int  # Bq
    num_blocks: int
    band: int  # L
    stride: int  # Bq, or 0 when every block sees all keys
    interior: tuple  # (t_lo, t_hi): the interior blocks; the others are edge blocks
    segments: tuple  # ((t0, t1), ...): slabs of blocks, in order

    @property
    def offset(self) -> int:
        return self.n_k - self.n_q

    def first_key(self, t: int) -> int:
        """Position of the first key in block ``t``'s band (negative when it sticks out)."""
        return self.offset + t * self.block - self.left if self.stride else 0

    def edges(self, t0: int, t1: int) -> list:
        """The edge blocks of slab ``[t0, t1)`` as ranges ``(a, b)`` of blocks (at most two)."""
        t_lo, t_hi = self.interior
        ranges = [(t0, min(t1, t_lo)), (max(t0, t_hi), t1)]
        return [(a, b) for a, b in ranges if a < b]

    def static_mask(self, device, dtype) -> Optional[torch.Tensor]:
        """The additive ``(Bq, L)`` band mask of interior blocks (0 or -inf); None for stride 0."""
        if not self.stride:
            return None
        r = torch.arange(self.block, device=device)[:, None]
        c = torch.arange(self.band, device=device)[None, :]
        inside = (c >= r) & (c <= r + self.left + self.right)
        return torch.zeros(self.block, self.band, device=device, dtype=dtype).masked_fill_(~inside, float("-inf"))

    def exact_mask(self, t0: int, t1: int, device) -> torch.Tensor:
        """Bool ``(t1 - t0, Bq, L)``, True where the query may attend the band column.

        Rows past the last query (zeros) stay fully visible, so that they remain finite; their
        output is discarded and, their output gradient being zero, they pass no gradient on.
        """
        t = torch.arange(t0, t1, device=device)[:, None, None]
        r = torch.arange(self.block, device=device)[None, :, None]
        c = torch.arange(self.band, device=device)[None, None, :]
        row = t * self.block + r
        i = self.offset + row  # query position
        j = (self.offset + t * self.block - self.left + c) if self.stride else c  # key position
        ok = (j >= i - self.left) & (j <= i + self.right) & (j >= 0) & (j < self.n_k)
        return ok | (row >= self.n_q)


def make_plan(n_q: int, n_k: int, left: int, right: int, block: Optional[int] = None,
              slab_scores: Optional[int] = None, min_slabs: int = 1) -> Plan:
    """The blocks, bands and slabs of one call (``1 <= n_q <= n_k``): slabs of at most
    ``slab_scores`` scores (default :data:`SLAB_SCORES`), the interior cut into at least
    ``min_slabs`` of them as long as each keeps :data:`SLAB_SCORES` scores."""
    offset = n_k - n_q
    left = min(left, n_k - 1)  # the last query (position n_k - 1) reaches key 0 with n_k - 1
    right = min(right, n_k - 1 - offset)  # the first query (position offset) reaches n_k - 1
    block = max(1, min(DEFAULT_BLOCK_SIZE if block is None else block, n_q))
    num_blocks = -(-n_q // block)
    band = block + left + right
    full_rows = n_q // block  # blocks whose rows are all real queries
    if band >= n_k:
        band, stride = n_k, 0  # the band would cover the whole sequence: every block sees all keys
        t_lo, t_hi = 0, full_rows
    else:
        stride = block
        # interior: first_key(t) >= 0 and first_key(t) + band <= n_k
        t_lo = -(-(left - offset) // block) if left > offset else 0
        t_hi = min(full_rows, (n_k - band - offset + left) // block + 1)
    t_hi = max(t_lo, t_hi)
    slab = max(1, (SLAB_SCORES if slab_scores is None else slab_scores) // (block * band))
    # slabs of edge blocks apart from slabs of interior ones: only the former need exact masks;
    # the interior in slabs of equal size (to a block)
    inner = t_hi - t_lo
    count = max(-(-inner // slab), min(min_slabs, inner // max(1, SLAB_SCORES // (block * band))))
    cuts = [t_lo + inner * i // count for i in range(count + 1)] if inner else []
    segments = (tuple((t0, min(t_lo, t0 + slab)) for t0 in range(0, t_lo, slab))
                + tuple(zip(cuts, cuts[1:]))
                + tuple((t0, min(num_blocks, t0 + slab)) for t0 in range(t_hi, num_blocks, slab)))
    return Plan(n_q, n_k, left, right, block, num_blocks, band, stride, (t_lo, t_hi), segments)


def padded_rows(x: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Rows ``[start, start + count)`` of ``x (N, D)``, rows outside ``[0, N)`` zero: a view when
    they all exist, else a small zero-padded copy (the ends of the sequence)."""
    n = x.shape[0]
    if 0 <= start and start + count <= n:
        return x[start : start + count]
    lo, hi = max(start, 0), min(start + count, n)
    if lo >= hi:
        return x.new_zeros(count, x.shape[1])
    return torch.nn.functional.pad(x[lo:hi], (0, 0, lo - start, start + count - hi))


def band_view(keys: torch.Tensor, plan: Plan, count: int) -> torch.Tensor:
    """``count`` key bands of consecutive blocks, the first starting at row 0 of ``keys
    (rows, D)`` (last dim contiguous): a strided view ``(count, L, D)``, no copy. Consecutive
    bands start ``Bq`` rows apart, or all at row 0 when every block sees all keys (stride 0)."""
    row = keys.stride(0)
    return keys.as_strided((count, plan.band, keys.shape[1]), (plan.stride * row, row, 1), keys.storage_offset())


def rows_view(rows: torch.Tensor, plan: Plan, count: int) -> torch.Tensor:
    """``count`` whole query blocks starting at row 0 of ``rows (count * Bq, ...)`` as
    ``(count, Bq, ...)``: a view."""
    return rows.unflatten(0, (count, plan.block))


def fold(acc: torch.Tensor, band_grad: torch.Tensor, plan: Plan, first: int) -> None:
    """Add the gradients of overlapping bands ``(ns, L, D)`` of blocks ``first .. first + ns - 1``
    (counted from the block whose band starts ``acc``) into ``acc (rows, D)``, rows a multiple
    of ``Bq`` that covers them.

    Band ``t`` covers ``acc`` rows ``[t * Bq, t * Bq + L)``: cut it into pieces of ``Bq`` rows;
    piece ``s`` of every band lands on row block ``t + s``, so one addition per piece does the
    whole slab. With stride 0 every band is all keys: the bands are summed.
    """
    if not plan.stride:
        acc[: plan.band] += band_grad.sum(0)
        return
    bq, ns = plan.block, band_grad.shape[0]
    blocks = acc.view(-1, bq, acc.shape[-1])  # (rows / Bq, Bq, D)
    for s in range(-(-plan.band // bq)):
        lo, hi = s * bq, min((s + 1) * bq, plan.band)
        blocks[first + s : first + s + ns, : hi - lo] += band_grad[:, lo:hi]
