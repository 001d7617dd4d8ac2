"""The plan of sequence parallelism: who holds which tokens, and which halo each rank needs.

Everything here is a pure function of the shard sizes and the window, so every rank computes
the whole plan by itself and no sizes travel over the network; nothing here needs a process
group. :mod:`swa_lib.distributed` carries the plan out with ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..masks import check_int, check_window

__all__ = ["shard_bounds", "ShardLayout", "halo_tokens_sent", "halo_plan", "shard_sequence"]


def shard_bounds(n: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` shards of ``n`` tokens over ``world_size`` ranks, as even as possible.

    The first ``n % world_size`` ranks get one token more.

    >>> shard_bounds(10, 4)
    [(0, 3), (3, 6), (6, 8), (8, 10)]
    """
    n = check_int("n", n, 0)
    world_size = check_int("world_size", world_size, 1)
    base, extra = divmod(n, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True)
class ShardLayout:
    """Who owns which positions: ``sizes[r]`` tokens on rank ``r``, in rank order."""

    sizes: tuple[int, ...]

    def __post_init__(self):
        sizes = tuple(self.sizes)
        if not sizes:
            raise ValueError("shard sizes must not be empty")
        for r, s in enumerate(sizes):
            check_int(f"tokens on rank {r}", s, 1)  # every shard needs at least one token
        object.__setattr__(self, "sizes", sizes)

    @property
    def n(self) -> int:
        return sum(self.sizes)

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    def bounds(self, rank: int) -> tuple[int, int]:
        start = sum(self.sizes[:rank])
        return start, start + self.sizes[rank]

    def key_range(self, rank: int, left: int, right: int) -> tuple[int, int]:
        """Keys ``[ks, ke)`` that the queries of ``rank`` can reach through the band."""
        s, e = self.bounds(rank)
        return max(0, s - left), min(self.n, e + right)

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Split positions ``[lo, hi)`` into ``(owner, lo, hi)`` pieces, in position order."""
        out = []
        for r in range(self.world_size):
            s, e = self.bounds(r)
            a, b = max(lo, s), min(hi, e)
            if a < b:
                out.append((r, a, b))
        return out


def halo_tokens_sent(layout: ShardLayout, window) -> list[int]:
    """Tokens of K/V each rank sends in the halo exchange (one forward pass)."""
    left, right = check_window(window)
    sent = [0] * layout.world_size
    for r in range(layout.world_size):
        ks, ke = layout.key_range(r, left, right)
        for owner, a, b in layout.pieces(ks, ke):
            if owner != r:
                sent[owner] += b - a
    return sent


def halo_plan(layout: ShardLayout, rank: int, left: int, right: int):
    """The halo exchange of ``rank`` as two lists of position ranges.

    Returns ``(need, give)``: ``need`` = ``(owner, a, b)`` pieces that make up this rank's keys
    ``[ks, ke)`` in position order (its own shard included, owner == rank); ``give`` =
    ``(peer, a, b)`` pieces of its own shard that other ranks need. Every rank computes the
    whole plan from the shard sizes alone, so no sizes travel over the network.
    """
    need = layout.pieces(*layout.key_range(rank, left, right))
    give = []
    for peer in range(layout.world_size):
        if peer != rank:
            for owner, a, b in layout.pieces(*layout.key_range(peer, left, right)):
                if owner == rank:
                    give.append((peer, a, b))
    return need, give


def shard_sequence(x: torch.Tensor, rank: int, sizes: Sequence[int], dim: int = 2) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of the full tensor ``x`` along ``dim``."""
    layout = ShardLayout(tuple(sizes))
    if x.shape[dim] != layout.n:
        raise ValueError(f"x has {x.shape[dim]} positions along dim {dim} but shard sizes sum to {layout.n}")
    s, e = layout.bounds(rank)
    return x.narrow(dim, s, e - s)
