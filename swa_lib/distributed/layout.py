"""The plan of sequence parallelism: who holds which tokens, and which halo each rank needs.

Everything here is a pure function of the shard sizes and the window, so every rank computes
the whole plan by itself and no sizes travel over the network; nothing here needs a process
group. :mod:`swa_lib.distributed` carries the plan out with ``torch.distributed``.

The plan is only right if every rank passes the same call, so this module also packs what must
agree into one short int64 row per rank (:func:`agreement_row`) and checks the rows that
:mod:`swa_lib.distributed` all-gathers (:func:`check_agreement`, :func:`agreed_layout`): every
rank runs the same checks on the same rows and raises the same error.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..masks import UNBOUNDED, check_int, check_window

__all__ = [
    "shard_bounds", "ShardLayout", "halo_tokens_sent", "halo_plan", "shard_sequence",
    "AGREEMENT_SLOTS", "agreement_row", "rejected_row", "check_agreement", "agreed_layout",
]


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
        if isinstance(self.sizes, (str, bytes)) or not isinstance(self.sizes, Iterable):
            raise TypeError(f"shard sizes must be a sequence of ints (tokens per rank), got {self.sizes!r}")
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
        _check_index("rank", rank, 0, self.world_size, f"a layout of {self.world_size} shards")
        start = sum(self.sizes[:rank])
        return start, start + self.sizes[rank]

    def key_range(self, rank: int, left: int, right: int) -> tuple[int, int]:
        """Keys ``[ks, ke)`` that the queries of ``rank`` can reach through the band."""
        check_int("left", left, 0)
        check_int("right", right, 0)
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
    _check_layout(layout)
    left, right = check_window(window)
    sent = [0] * layout.world_size
    for r in range(layout.world_size):
        ks, ke = layout.key_range(r, left, right)
        for owner, a, b in layout.pieces(ks, ke):
            if owner != r:
                sent[owner] += b - a
    return sent


def _check_index(name: str, value, low: int, high: int, what: str) -> None:
    """A TypeError unless ``value`` is an int (bool refused), a ValueError unless ``low <= value < high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}) for {what}, got {value}")


def _check_layout(layout) -> None:
    if not isinstance(layout, ShardLayout):
        raise TypeError(f"layout must be a ShardLayout, got {type(layout).__name__} {layout!r}")


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
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    layout = ShardLayout(sizes)  # it makes a tuple of the sizes, or says why it cannot
    _check_index("rank", rank, 0, layout.world_size, f"{layout.world_size} shard sizes {layout.sizes}")
    _check_index("dim", dim, -x.ndim, x.ndim, f"x of shape {tuple(x.shape)}")
    if x.shape[dim] != layout.n:
        raise ValueError(f"x has {x.shape[dim]} positions along dim {dim} but shard sizes sum to {layout.n}")
    s, e = layout.bounds(rank)
    return x.narrow(dim, s, e - s)


# ---------------------------------------------------------------------------------------
# The agreement check: what every rank must pass alike, packed into a few int64s.
# ---------------------------------------------------------------------------------------
# One row per rank; swa_lib.distributed all-gathers the rows (one collective) and every rank
# runs the same pure checks below on the same rows, so every rank raises the same error.
# Slot 0 flags a rank that rejected its own inputs, slot 1 is its token count (ranks differ
# there: it gives the shard sizes); every other field must be equal on every rank.


def _digest(text: str, size: int = 7) -> int:
    """A checksum that is the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=size).digest(), "little")


def _pack_text(text: str) -> list[int]:
    raw = text.encode()
    if len(raw) > 16:  # a long name: its start and a checksum of the whole
        raw = raw[:8] + b"\xff" + _digest(text).to_bytes(7, "little")
    raw = raw.ljust(16, b"\0")
    return [int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(raw[8:], "little", signed=True)]


def _show_text(slots) -> str:
    raw = b"".join(int(s).to_bytes(8, "little", signed=True) for s in slots)
    if raw[8] == 0xFF:
        return raw[:8].decode(errors="replace") + f"... (checksum {int.from_bytes(raw[9:], 'little'):#x})"
    return raw.rstrip(b"\0").decode(errors="replace")


def _show_size(slots) -> str:
    return "UNBOUNDED" if slots[0] == UNBOUNDED else str(slots[0])


def _show_dilation(slots) -> str:
    return str(slots[0]) if slots[0] > 0 else f"a dilation per head (checksum {-slots[0]:#x})"


def _show_checksum(slots) -> str:
    return "none" if slots[0] == 0 else f"{slots[0]:#x}"


def _show_scale(slots) -> str:
    return repr(struct.unpack("<d", struct.pack("<q", slots[0]))[0])


def _show_sizes(slots) -> str:
    return "None (gathered)" if slots[0] == 0 else f"a list (checksum {slots[0]:#x})"


def _show_grads(slots) -> str:
    return ("none", "q only", "k/v only", "q and k/v")[slots[0]]


# (name, slots, how to show a value); the order is the order of the row.
_FIELDS = (
    ("rejected", 1, str),
    ("tokens", 1, str),
    ("window left", 1, _show_size),
    ("window right", 1, _show_size),
    ("dilation", 1, _show_dilation),
    ("sinks", 1, _show_size),
    ("number of global tokens", 1, lambda s: str(s[0])),
    ("global tokens (checksum of their form, shape and values)", 1, _show_checksum),
    ("dtype", 2, lambda s: "torch." + _show_text(s)),
    ("device type", 2, _show_text),
    ("batch size B", 1, lambda s: str(s[0])),
    ("query heads H", 1, lambda s: str(s[0])),
    ("key/value heads H_kv", 1, lambda s: str(s[0])),
    ("head dim D of q and k", 1, lambda s: str(s[0])),
    ("head dim D_v of v", 1, lambda s: str(s[0])),
    ("scale", 1, _show_scale),
    ("backend", 2, _show_text),
    ("shard_sizes", 1, _show_sizes),
    ("gradients (q, k/v)", 1, _show_grads),
)
AGREEMENT_SLOTS = sum(width for _, width, _ in _FIELDS)


def _global_signature(global_tokens) -> tuple[int, int]:
    """``(count, checksum)`` of the ``global_tokens`` argument, without the sequence length.

    The checksum covers the form (mask, integers, other), the shape and the values, so ranks
    with equal signatures get the same verdict from the checks that follow (which need N)."""
    if global_tokens is None or (isinstance(global_tokens, (list, tuple)) and len(global_tokens) == 0):
        return 0, 0
    g = global_tokens.detach() if isinstance(global_tokens, torch.Tensor) else torch.as_tensor(global_tokens)
    if g.dtype == torch.bool:
        form, values = "mask", g.reshape(-1).nonzero().reshape(-1).tolist()
    else:
        form = "other" if g.dtype.is_floating_point or g.dtype.is_complex else "integers"
        values = g.reshape(-1).tolist()
    return len(values), 1 + _digest(f"{form}|{tuple(g.shape)}|{values}")


def _dilation_code(dilation) -> int:
    if isinstance(dilation, int):
        return min(dilation, UNBOUNDED)
    per_head = tuple(min(d, UNBOUNDED) for d in dilation)
    return per_head[0] if len(set(per_head)) == 1 else -1 - _digest(str(per_head))


def agreement_row(q, k, v, window, *, dilation, sinks, global_tokens, scale, backend, shard_sizes) -> list[int]:
    """This rank's row of the agreement check, from validated arguments.

    ``window`` and ``sinks`` as the pattern holds them (capped at ``UNBOUNDED``), ``dilation``
    an int or one int per head, ``scale`` the float in use, ``shard_sizes`` None or a tuple."""
    count, checksum = _global_signature(global_tokens)
    grads = torch.is_grad_enabled() and (q.requires_grad + 2 * (k.requires_grad or v.requires_grad))
    row = [0, q.shape[2], window[0], window[1], _dilation_code(dilation), sinks, count, checksum]
    row += _pack_text(str(q.dtype).removeprefix("torch.")) + _pack_text(q.device.type)
    row += [q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3]]
    row += [struct.unpack("<q", struct.pack("<d", float(scale)))[0]] + _pack_text(str(backend))
    row += [0 if shard_sizes is None else 1 + _digest(str(tuple(shard_sizes))), int(grads)]
    assert len(row) == AGREEMENT_SLOTS
    return row


def rejected_row() -> list[int]:
    """The row of a rank whose own checks failed: it still joins the collective, then raises."""
    return [1] + [0] * (AGREEMENT_SLOTS - 1)


def _ranks(ranks: list[int]) -> str:
    runs, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            runs.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(runs)


def check_agreement(rows) -> None:
    """Raise the same ValueError from every rank's copy of the gathered rows if they disagree."""
    rejected = [r for r, row in enumerate(rows) if row[0]]
    if rejected:
        raise ValueError(f"sequence-parallel {_ranks(rejected)} rejected {'its' if len(rejected) == 1 else 'their'} "
                         "inputs (the error is raised there); every rank raises so that none waits")
    problems, at = [], 0
    for name, width, show in _FIELDS:
        values = [tuple(row[at : at + width]) for row in rows]
        at += width
        if name in ("rejected", "tokens") or len(set(values)) == 1:
            continue
        holders: dict = {}
        for r, value in enumerate(values):
            holders.setdefault(value, []).append(r)
        parts = [f"{_ranks(rs)} {'has' if len(rs) == 1 else 'have'} {show(list(value))}"
                 for value, rs in holders.items()]
        problems.append(f"{name}: " + ", ".join(parts))
    if problems:
        raise ValueError(
            "sequence-parallel ranks disagree on " + "; on ".join(problems) + " (every rank must pass the same window, "
            "dilation, sinks, global tokens, dtype, device type, B, H, H_kv, D, D_v, scale, backend and shard_sizes, "
            "with gradients on every rank or on none)"
        )


def agreed_layout(rows, shard_sizes) -> ShardLayout:
    """The shard layout from the gathered rows: their token counts, checked against ``shard_sizes`` if given."""
    held = tuple(row[1] for row in rows)
    if shard_sizes is None:
        return ShardLayout(held)
    layout = ShardLayout(tuple(shard_sizes))
    wrong = [f"rank {r} holds {h} tokens but shard_sizes says {s}"
             for r, (h, s) in enumerate(zip(held, layout.sizes)) if h != s]
    if wrong:
        raise ValueError("; ".join(wrong))
    return layout
