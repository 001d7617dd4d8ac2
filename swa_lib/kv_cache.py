"""KV caches for decoding with a sliding window: a rolling buffer and attention sinks.

A causal window ``(left, 0)`` lets a query see ``W = left + 1`` keys, itself included. While
decoding, older keys can never be seen again, so the cache needs only ``W`` slots
(Mistral 7B, Jiang et al. 2023, section 2). :class:`RollingKVCache` writes the token at
position ``p`` into slot ``p mod W``; after 11 tokens with ``W = 4`` (digits are positions)::

    slot:        0   1   2   3
    contents:    8   9  10   7        next write: position 11 -> slot 3

:func:`unrotate` turns the slots back into chronological order ``7 8 9 10`` so the public
attention function, whose key positions are the key indices, can be called with the
window unchanged. Keys are stored *after* RoPE, at their true positions.

:class:`SinkKVCache` (StreamingLLM, Xiao et al. 2023) keeps the first ``S`` tokens for good plus
the most recent ``W - S``. Its keys are stored *before* RoPE and rotated at their position
inside the cache at every step, so query-key distances never exceed ``W - 1``, the range
seen in training. ``positions="original"`` keeps the original positions instead: the naive
variant, whose sink-to-query distances grow without bound (the book shows why that fails).

:class:`FullKVCache` is the growing cache of dense attention, the baseline.

Life cycle of every cache: construct (buffers are allocated once), then call ``update`` with
the new keys/values of each step; it returns what attention needs. ``reset()`` starts over.
Memory: ``RollingKVCache`` and ``SinkKVCache`` hold ``2 * B * H_kv * W * D`` numbers whatever
the number of tokens; the temporary context returned by ``RollingKVCache.update`` has
``min(n, W) + C`` keys for a chunk of ``C`` new tokens (``SinkKVCache``'s at most ``W``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention import check_tensor
from .masks import check_int

__all__ = ["unrotate", "RollingKVCache", "SinkKVCache", "FullKVCache"]


def unrotate(buffer: torch.Tensor, seen: int) -> torch.Tensor:
    """Chronological view of a ring buffer ``(B, H, W, D)`` after ``seen`` writes.

    Position ``p`` lives in slot ``p % W``. With ``seen <= W`` the first ``seen`` slots are
    already in order; after that the oldest entry sits in slot ``seen % W``. Pure: returns a new
    tensor (or a slice) and never changes ``buffer``.
    """
    if buffer.ndim != 4:
        raise ValueError(f"buffer must have shape (B, H, W, D), got {tuple(buffer.shape)}")
    check_int("seen", seen, 0)
    w = buffer.shape[2]
    if seen <= w:
        return buffer[:, :, :seen]
    start = seen % w
    return torch.cat([buffer[:, :, start:], buffer[:, :, :start]], dim=2)  # (B, H, W, D)


class _CacheBase:
    """Shared validation for the caches: fixed batch, heads, head dim, dtype and device.

    Every cache stores *detached* copies of the keys and values it is given. What ``update``
    returns still carries the new tokens' autograd history (gradients reach this update's keys
    and values), but not that of tokens cached by earlier updates, as in Transformer-XL's
    memory. Otherwise a cache fed keys that require grad would keep every step's graph alive and
    grow without bound while its buffers stay the same size.
    """

    def __init__(self, batch: int, heads_kv: int, capacity: int, head_dim: int, *, dtype, device):
        for name, value in (("batch", batch), ("heads_kv", heads_kv), ("head_dim", head_dim), ("cache size", capacity)):
            check_int(name, value, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.batch, self.heads_kv, self.head_dim = batch, heads_kv, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.seen = 0  # tokens written so far = position of the next token

    def _check_new(self, k: torch.Tensor, v: torch.Tensor) -> int:
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x)  # a floating-point (B, H, N, D) tensor, as the entry point wants
            if (x.shape[0], x.shape[1], x.shape[3]) != (self.batch, self.heads_kv, self.head_dim):
                expected = (self.batch, self.heads_kv, x.shape[2], self.head_dim)
                raise ValueError(f"{name} must have shape {expected} (B, H_kv, N, D), got {tuple(x.shape)}")
            if x.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {x.dtype} but the cache holds {self.dtype}")
            if x.device != self.device:
                raise ValueError(f"{name} is on device {x.device} but the cache lives on {self.device}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k and v must have the same number of tokens, got {k.shape[2]} and {v.shape[2]}")
        if k.shape[2] == 0:
            raise ValueError("update needs at least one new token, got N=0")
        return k.shape[2]

    def _alloc(self, n: int) -> torch.Tensor:
        return torch.zeros(self.batch, self.heads_kv, n, self.head_dim, dtype=self.dtype, device=self.device)

    def reset(self) -> None:
        self.seen = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (constant for the rolling and sink caches)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class RollingKVCache(_CacheBase):
    """Mistral's rolling buffer: ``W`` slots, the token at position ``p`` goes to slot ``p mod W``.

    Serves a causal window ``(W - 1, 0)``: each query sees itself and the ``W - 1`` keys before it.
    Keys are stored as given (for a RoPE model: already rotated at their true positions).

    Args:
        batch, heads_kv, head_dim: shape of the stored keys/values ``(B, H_kv, W, D)``.
        window: ``W``, the number of slots.
        max_chunk: the most new tokens one :meth:`update` accepts (default ``W``); longer
            prompts must be fed in chunks (:meth:`swa_lib.lab.model.TinyLM.prefill` does it), which
            bounds the temporary context at ``W + max_chunk`` keys.
        dtype, device: of the buffers; updates must match them exactly.
    """

    def __init__(self, batch: int, heads_kv: int, window: int, head_dim: int, *,
                 max_chunk: Optional[int] = None, dtype=torch.float32, device="cpu"):
        super().__init__(batch, heads_kv, window, head_dim, dtype=dtype, device=device)
        self.window = window
        self.max_chunk = window if max_chunk is None else check_int("max_chunk", max_chunk, 1)
        self.k = self._alloc(window)  # (B, H_kv, W, D)
        self.v = self._alloc(window)  # (B, H_kv, W, D)

    @property
    def attention_window(self) -> tuple[int, int]:
        """The ``(left, right)`` window this cache serves."""
        return (self.window - 1, 0)

    def tensors(self):
        return (self.k, self.v)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys and values in chronological order, ``(B, H_kv, min(seen, W), D)``."""
        return unrotate(self.k, self.seen), unrotate(self.v, self.seen)

    def slots(self) -> list:
        """Which position each slot holds (-1 = empty); for pictures and tests."""
        out = [-1] * self.window
        for p in range(max(0, self.seen - self.window), self.seen):
            out[p % self.window] = p
        return out

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``C`` new tokens and return the keys/values their queries need.

        Args:
            k, v: ``(B, H_kv, C, D)`` for positions ``seen .. seen + C - 1``, ``C <= max_chunk``.

        Returns:
            ``(k_ctx, v_ctx)`` of shape ``(B, H_kv, min(seen, W) + C, D)`` in chronological order,
            ending with the new tokens. Call
            ``sliding_window_attention(q, k_ctx, v_ctx, window=cache.attention_window)``: the ``C``
            queries are the last ``C`` key positions (bottom-right alignment), and every key a
            query in the chunk may see is in the context.
        """
        c = self._check_new(k, v)
        if c > self.max_chunk:
            raise ValueError(
                f"got {c} new tokens but this cache takes at most "
                f"max_chunk={self.max_chunk} per update; feed long prompts in chunks "
                "(TinyLM.prefill(..., chunk_size=...))"
            )
        old_k, old_v = self.keys_values()  # (B, H_kv, min(seen, W), D)
        k_ctx = torch.cat([old_k, k], dim=2)  # (B, H_kv, min(seen, W) + C, D)
        v_ctx = torch.cat([old_v, v], dim=2)
        # Only the last W new tokens survive; write each to slot position % W.
        keep = min(c, self.window)
        pos = torch.arange(self.seen + c - keep, self.seen + c, device=self.device)
        slots = pos % self.window  # (keep,), all distinct
        # stored detached: the cache keeps no autograd history
        self.k[:, :, slots] = k[:, :, c - keep:].detach()
        self.v[:, :, slots] = v[:, :, c - keep:].detach()
        self.seen += c
        return k_ctx, v_ctx


class SinkKVCache(_CacheBase):
    """StreamingLLM's cache: the first ``sinks`` tokens plus the most recent ``window - sinks``.

    Keys are stored *before* RoPE; :meth:`update` returns them in cache order together with the
    positions at which to rotate them and the queries.

    Args:
        batch, heads_kv, head_dim: shape of the stored keys/values.
        window: total number of cached tokens ``W`` (sinks included).
        sinks: ``S``, how many initial tokens are kept for ever (0 gives window-only eviction).
        positions: ``"cache"`` (StreamingLLM: position = index inside the cache) or
            ``"original"`` (naive: every token keeps its position in the stream).
        dtype, device: of the buffers.

    An update of several tokens must fit in the filling cache (``seen + C <= W``); beyond that,
    each update takes exactly one token (the cache view then changes with every token, so a
    chunk of queries would need different keys each).
    """

    def __init__(self, batch: int, heads_kv: int, window: int, head_dim: int, *, sinks: int = 4,
                 positions: str = "cache", dtype=torch.float32, device="cpu"):
        super().__init__(batch, heads_kv, window, head_dim, dtype=dtype, device=device)
        if check_int("sinks", sinks, 0) >= window:
            raise ValueError(f"sinks must be below window={window}, got {sinks}")
        if positions not in ("cache", "original"):
            raise ValueError(f"positions must be 'cache' or 'original', got {positions!r}")
        self.window, self.sinks, self.positions = window, sinks, positions
        self.recent = window - sinks
        self.sink_k, self.sink_v = self._alloc(sinks), self._alloc(sinks)  # (B, H_kv, S, D)
        self.ring_k, self.ring_v = self._alloc(self.recent), self._alloc(self.recent)  # (B, H_kv, W-S, D)

    def tensors(self):
        return (self.sink_k, self.sink_v, self.ring_k, self.ring_v)

    def _ring_seen(self) -> int:
        return max(0, self.seen - self.sinks)

    def cached_positions(self) -> torch.Tensor:
        """Original stream positions of the cached tokens, in cache order."""
        s = min(self.seen, self.sinks)
        n_ring = min(self._ring_seen(), self.recent)
        return torch.cat([torch.arange(s), torch.arange(self.seen - n_ring, self.seen)]).to(self.device)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Add new tokens (keys before RoPE) and return ``(k_ctx, v_ctx, key_pos, query_pos)``.

        ``k_ctx, v_ctx``: ``(B, H_kv, L, D)`` cached tokens then the new ones, ``L <= W``;
        ``key_pos`` ``(L,)``: positions at which to rotate ``k_ctx``; ``query_pos`` ``(C,)``: the
        same for the ``C`` new queries (the last ``C`` entries of ``key_pos``). Attend with the
        causal window ``(L, 0)``: everything in the context is visible.
        """
        c = self._check_new(k, v)
        if self.seen + c > self.window and c != 1:
            raise ValueError(
                f"got {c} new tokens; a SinkKVCache takes several tokens only while it is filling "
                f"(seen {self.seen} of window {self.window}), then one per update"
            )
        if self.seen + c <= self.window:
            # Filling: nothing evicted yet; cached tokens are positions 0 .. seen-1.
            old_pos = self.cached_positions()
            s = min(self.seen, self.sinks)
            old_k = torch.cat([self.sink_k[:, :, :s], unrotate(self.ring_k, self._ring_seen())], dim=2)
            old_v = torch.cat([self.sink_v[:, :, :s], unrotate(self.ring_v, self._ring_seen())], dim=2)
        else:
            # Full: the new token evicts the oldest non-sink token.
            ring_k, ring_v = unrotate(self.ring_k, self._ring_seen()), unrotate(self.ring_v, self._ring_seen())
            keep = self.recent - 1  # recent tokens kept alongside the new one
            ring_k, ring_v = ring_k[:, :, ring_k.shape[2] - keep:], ring_v[:, :, ring_v.shape[2] - keep:]
            old_k = torch.cat([self.sink_k, ring_k], dim=2)
            old_v = torch.cat([self.sink_v, ring_v], dim=2)
            all_pos = self.cached_positions()
            old_pos = torch.cat([all_pos[: self.sinks], all_pos[all_pos.numel() - keep:]])
        k_ctx, v_ctx = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)  # (B, H_kv, L, D)
        new_pos = torch.arange(self.seen, self.seen + c, device=self.device)
        # Store: the first S tokens of the stream go to the sinks, the rest to the ring.
        for i in range(c):
            p = self.seen + i
            k_i, v_i = k[:, :, i].detach(), v[:, :, i].detach()  # stored without autograd history
            if p < self.sinks:
                self.sink_k[:, :, p], self.sink_v[:, :, p] = k_i, v_i
            else:
                slot = (p - self.sinks) % self.recent
                self.ring_k[:, :, slot], self.ring_v[:, :, slot] = k_i, v_i
        self.seen += c
        L = k_ctx.shape[2]
        if self.positions == "cache":
            key_pos = torch.arange(L, device=self.device)
        else:
            key_pos = torch.cat([old_pos.to(self.device), new_pos])
        return k_ctx, v_ctx, key_pos, key_pos[L - c:]


class FullKVCache(_CacheBase):
    """The growing cache of dense attention: keeps every token (memory grows linearly).

    Storage doubles when full (amortised O(1) appends, as a Python list does).
    """

    def __init__(self, batch: int, heads_kv: int, head_dim: int, *, initial: int = 64,
                 dtype=torch.float32, device="cpu"):
        super().__init__(batch, heads_kv, initial, head_dim, dtype=dtype, device=device)
        self.k, self.v = self._alloc(initial), self._alloc(initial)

    def tensors(self):
        return (self.k, self.v)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``C`` tokens; return all keys/values so far ``(B, H_kv, seen, D)``."""
        c = self._check_new(k, v)
        need = self.seen + c
        if need > self.k.shape[2]:
            size = max(need, 2 * self.k.shape[2])
            new_k, new_v = self._alloc(size), self._alloc(size)
            new_k[:, :, : self.seen], new_v[:, :, : self.seen] = self.k[:, :, : self.seen], self.v[:, :, : self.seen]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.seen:need], self.v[:, :, self.seen:need] = k.detach(), v.detach()
        old, self.seen = self.seen, need
        if k.requires_grad or v.requires_grad:  # hand back the new tokens with their history
            return torch.cat([self.k[:, :, :old], k], dim=2), torch.cat([self.v[:, :, :old], v], dim=2)
        return self.k[:, :, :need], self.v[:, :, :need]
