"""A tiny decoder-only language model whose attention is :func:`swa_lib.sliding_window_attention`.

Byte-level (256 byte tokens plus a BOS token), pre-norm, RoPE, grouped-query attention, and a
window per layer (``None`` = full causal attention). It is small enough to train on a laptop CPU in
a minute on a small text corpus shipped with the package (:mod:`swa_lib.lab.training`), and exists to make the KV-cache
and attention-sink chapters concrete, not to be a good language model.

Three ways to run it, which must agree (tests/test_model.py):

* ``model(tokens)``: one forward pass over the whole sequence with the band mask;
* ``model.prefill`` + ``model.step`` with :class:`~swa_lib.kv_cache.RollingKVCache` per layer;
* the same with :class:`~swa_lib.kv_cache.SinkKVCache` (which changes the computation on
  purpose once the stream is longer than the cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..attention import sliding_window_attention
from ..kv_cache import FullKVCache, RollingKVCache, SinkKVCache
from ..masks import UNBOUNDED
from ..rope import apply_rope, rope_cos_sin, rotate

__all__ = [
    "BOS",
    "VOCAB_SIZE",
    "encode",
    "decode",
    "ModelConfig",
    "TinyLM",
]

#: Token ids 0..255 are bytes; 256 marks the beginning of a sequence.
BOS = 256
VOCAB_SIZE = 257


def encode(text: str, *, bos: bool = True) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as token ids (int64), preceded by BOS unless ``bos=False``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = list(text.encode("utf-8"))
    return torch.tensor(([BOS] if bos else []) + ids, dtype=torch.long)


def decode(tokens) -> str:
    """Token ids back to text (BOS dropped, invalid UTF-8 replaced)."""
    ids = [int(t) for t in torch.as_tensor(tokens).flatten()]
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


@dataclass
class ModelConfig:
    """Shape of a :class:`TinyLM`.

    ``windows`` gives each layer's causal window as ``left`` (the query sees itself and ``left``
    keys before it, window ``(left, 0)``), or ``None`` for full causal attention; its length is
    the number of layers.
    """

    dim: int = 64
    heads: int = 4
    heads_kv: int = 4
    windows: tuple = (None, None, None, None)
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self):
        self.windows = tuple(self.windows)
        if not self.windows:
            raise ValueError("windows must name at least one layer")
        for w in self.windows:
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
                raise ValueError(f"each window must be None or an int >= 0, got {w!r}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim ({self.dim}) must split into {self.heads} heads of even size")
        if self.heads % self.heads_kv:
            raise ValueError(f"heads ({self.heads}) must be a multiple of heads_kv ({self.heads_kv})")

    @property
    def layers(self) -> int:
        return len(self.windows)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class Attention(nn.Module):
    """Causal (windowed) multi-head attention with RoPE and grouped-query heads."""

    def __init__(self, cfg: ModelConfig, window: Optional[int]):
        super().__init__()
        self.cfg, self.window = cfg, window
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.heads * hd, bias=False)
        self.wkv = nn.Linear(cfg.dim, 2 * cfg.heads_kv * hd, bias=False)
        self.wo = nn.Linear(cfg.heads * hd, cfg.dim, bias=False)

    @property
    def pattern_window(self) -> tuple[int, int]:
        return (UNBOUNDED if self.window is None else self.window, 0)

    def project(self, x: torch.Tensor):
        """``x`` (B, N, dim) -> q (B, H, N, D), k and v (B, H_kv, N, D), before RoPE."""
        b, n, _ = x.shape
        hd = self.cfg.head_dim
        q = self.wq(x).view(b, n, self.cfg.heads, hd).transpose(1, 2)  # (B, H, N, D)
        k, v = self.wkv(x).view(b, n, 2, self.cfg.heads_kv, hd).permute(2, 0, 3, 1, 4)  # 2 x (B, H_kv, N, D)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = out.shape
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, dim)

    def rotate_qk(self, q, k, positions, rope=None):
        """RoPE for q and k at ``positions``; ``rope``: their ``(cos, sin)`` tables, if already built."""
        if rope is None:
            rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_base, dtype=q.dtype)
        return rotate(q, *rope), rotate(k, *rope)

    def forward(self, x, positions, *, backend="sdpa", cache=None, capture=None, rope=None):
        """``rope``: the ``(cos, sin)`` tables of ``positions`` (built here when not given)."""
        q, k, v = self.project(x)
        base = self.cfg.rope_base
        if isinstance(cache, SinkKVCache):
            k_ctx, v_ctx, key_pos, query_pos = cache.update(k, v)  # keys before RoPE
            q, k_ctx = apply_rope(q, query_pos, base), apply_rope(k_ctx, key_pos, base)
            window = (k_ctx.shape[2], 0)  # the cache is the window: see everything in it
        else:
            q, k = self.rotate_qk(q, k, positions, rope)
            k_ctx, v_ctx = (k, v) if cache is None else cache.update(k, v)
            window = self.pattern_window
            if isinstance(cache, RollingKVCache) and cache.attention_window != window:
                raise ValueError(f"layer window {window} but the cache serves {cache.attention_window}")
        if capture is not None:
            capture.append((q.detach(), k_ctx.detach()))
        return self.merge(self.attend(q, k_ctx, v_ctx, window, backend=backend))

    def attend(self, q, k, v, window, *, backend="sdpa") -> torch.Tensor:
        """The attention itself, on rotated ``q`` (B, H, N, D) and ``k``, ``v`` (B, H_kv, N_k, D):
        the one step a variant of this layer replaces."""
        return sliding_window_attention(q, k, v, window, backend=backend)  # (B, H, N, D)


class Block(nn.Module):
    """One pre-norm transformer block's parameters (attention and MLP); :meth:`TinyLM.forward_with` runs it."""

    def __init__(self, cfg: ModelConfig, window: Optional[int]):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg, window)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim, bias=False),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim, bias=False),
        )


class TinyLM(nn.Module):
    """Decoder-only byte-level LM. ``model(tokens)`` maps (B, N) ids to (B, N, vocab) logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, w) for w in cfg.windows)
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def _check_tokens(self, tokens) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long:
            raise TypeError(f"tokens must be an int64 tensor, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, N), got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got {int(tokens.min())}..{int(tokens.max())}")
        return tokens

    def forward(self, tokens, *, start: int = 0, caches=None, backend: str = "sdpa", capture=None):
        """Logits ``(B, N, vocab)`` for tokens at positions ``start .. start + N - 1``.

        Without ``caches`` this is the full forward pass (each layer's band mask). With
        ``caches`` (one per layer, from :meth:`new_caches`), the tokens continue the cached
        sequence and ``start`` must equal the caches' ``seen``. ``capture``, a list, receives
        each layer's rotated ``(q, k)`` for attention pictures. ``backend`` is passed to
        :func:`~swa_lib.sliding_window_attention`; the default ``"sdpa"`` suits the short
        sequences this model sees (``"auto"`` may pick a banded backend that is slower when a
        layer's window is unbounded).
        """
        tokens = self._check_tokens(tokens)
        if caches is not None:
            if len(caches) != self.cfg.layers:
                raise ValueError(f"need one cache per layer ({self.cfg.layers}), got {len(caches)}")
            shared = [i for i, c in enumerate(caches) if any(c is d for d in caches[:i])]
            if shared:  # e.g. [cache] * layers: every layer would write into the same buffers
                raise ValueError(f"each layer needs its own cache, but the caches of layers {shared} are objects "
                                 "already given for an earlier layer; build them with model.new_caches(...)")
            if any(c.seen != caches[0].seen for c in caches):
                raise ValueError(f"the caches have seen different numbers of tokens: {[c.seen for c in caches]}")
            if caches[0].seen != start:
                raise ValueError(f"start={start} but the caches have seen {caches[0].seen} tokens")
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        rope = None  # RoPE tables, built once for all layers (sink caches rotate at cache positions instead)
        if caches is None or not isinstance(caches[0], SinkKVCache):
            rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_base, dtype=self.embed.weight.dtype)

        def attention(i: int, attn: Attention, h: torch.Tensor) -> torch.Tensor:
            cache = None if caches is None else caches[i]
            return attn(h, positions, backend=backend, cache=cache, capture=capture, rope=rope)

        return self.forward_with(tokens, attention)

    def forward_with(self, tokens: torch.Tensor, attention) -> torch.Tensor:
        """The network around any attention: logits ``(B, N, vocab)``, where block ``i`` adds
        ``attention(i, block.attn, h)`` (``h``: the block's normalised input, (B, N, dim)) to the
        residual stream. :meth:`forward` passes the layers' own attention; an experiment that
        changes only the attention (the sinks demo's streaming view) passes its own."""
        x = self.embed(tokens)  # (B, N, dim)
        for i, block in enumerate(self.blocks):
            x = x + attention(i, block.attn, block.norm1(x))
            x = x + block.mlp(block.norm2(x))
        return self.head(self.norm(x))  # (B, N, vocab)

    # -- decoding -------------------------------------------------------------------------
    def new_caches(self, batch: int, kind: str = "rolling", *, sinks: int = 4, window: Optional[int] = None,
                   positions: str = "cache", max_chunk: Optional[int] = None):
        """One cache per layer.

        ``kind="rolling"``: a :class:`RollingKVCache` of ``left + 1`` slots for each windowed
        layer (a :class:`FullKVCache` for a full-attention layer); ``"full"``: growing caches
        everywhere; ``"sink"``: a :class:`SinkKVCache` of ``window`` tokens with ``sinks``
        sinks in every layer (StreamingLLM applies it to a model trained with full attention).
        """
        p = next(self.parameters())
        cfg, kw = self.cfg, dict(dtype=p.dtype, device=p.device)
        if kind == "rolling":
            return [
                FullKVCache(batch, cfg.heads_kv, cfg.head_dim, **kw) if w is None
                else RollingKVCache(batch, cfg.heads_kv, w + 1, cfg.head_dim, max_chunk=max_chunk, **kw)
                for w in cfg.windows
            ]
        if kind == "full":
            return [FullKVCache(batch, cfg.heads_kv, cfg.head_dim, **kw) for _ in cfg.windows]
        if kind == "sink":
            if window is None:
                raise ValueError("a sink cache needs window= (total cached tokens)")
            return [SinkKVCache(batch, cfg.heads_kv, window, cfg.head_dim, sinks=sinks, positions=positions, **kw)
                    for _ in cfg.windows]
        raise ValueError(f"kind must be 'rolling', 'full' or 'sink', got {kind!r}")

    @torch.no_grad()
    def prefill(self, tokens, caches, *, chunk_size: Optional[int] = None, backend: str = "sdpa"):
        """Feed a prompt ``(B, N)`` into fresh or partly filled caches, ``chunk_size`` tokens at a time.

        Returns the logits of all prompt tokens ``(B, N, vocab)``. ``chunk_size=None`` sends the
        prompt at once (a rolling cache refuses more than its ``max_chunk`` tokens per update).
        """
        tokens = self._check_tokens(tokens)
        n = tokens.shape[1]
        size = n if chunk_size is None else chunk_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        out, start = [], caches[0].seen
        for i in range(0, n, size):
            out.append(self(tokens[:, i:i + size], start=start + i, caches=caches, backend=backend))
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 100, *, cache: str = "rolling", sinks: int = 4,
                 window: Optional[int] = None, chunk_size: Optional[int] = None, temperature: float = 0.0,
                 seed: int = 0, backend: str = "sdpa") -> str:
        """Continue ``prompt`` (BOS is prepended) by ``max_new_tokens`` bytes, one token per step.

        ``temperature=0`` is greedy; otherwise sampling with a seeded generator. The prompt goes
        through :meth:`prefill` in chunks of ``chunk_size`` tokens (default for rolling caches: the
        smallest window's ``W``; a sink cache takes one token at a time), then each new token
        through the caches. ``cache``, ``sinks``, ``window``: as in :meth:`new_caches`.
        """
        tokens = encode(prompt)[None].to(next(self.parameters()).device)  # (1, N)
        windows = [w + 1 for w in self.cfg.windows if w is not None]
        if chunk_size is None and cache == "rolling" and windows:
            chunk_size = min(windows)  # what the smallest rolling cache takes per update
        caches = self.new_caches(1, cache, sinks=sinks, window=window, max_chunk=chunk_size)
        if cache == "sink":  # a full sink cache takes one token per step
            logits = self.prefill(tokens, caches, chunk_size=1, backend=backend)[:, -1]
        else:
            logits = self.prefill(tokens, caches, chunk_size=chunk_size, backend=backend)[:, -1]
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits[0, :256].float() / temperature, dim=-1).cpu()
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            else:
                nxt = int(logits[0, :256].argmax())
            out.append(nxt)
            step = torch.tensor([[nxt]], device=tokens.device)
            logits = self(step, start=caches[0].seen, caches=caches, backend=backend)[:, -1]
        return decode(out)
