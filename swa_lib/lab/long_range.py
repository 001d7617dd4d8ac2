"""A synthetic long-range task for the tiny model, and four ways to give it long-range reach (chapter 11).

The task (:class:`NeedleTask`): a sequence of random letters hides one digit, the *needle*; the
last token is ``?`` and the model must answer with the digit. The distance from the needle to
the ``?`` is controlled, so accuracy can be read off as a function of distance. Every
``stride``-th position holds a marker ``|`` (a slot that one variant turns into a global token;
for the others it is just a token). Chance is 10%.

The variants (:class:`Variant`, :func:`standard_variants`), all on :class:`~swa_lib.lab.model.TinyLM`:

* ``sliding``: every layer a causal window ``(w, 0)``; reach ``layers * w`` at best;
* ``global``: the same windows plus the marker positions as *causal* global tokens (below);
* ``interleaved``: local and full-attention layers alternating (Gemma 2 style);
* ``full``: full causal attention in every layer.

Global tokens in a causal model. Longformer's global tokens see and are seen by everything,
ignoring causality; in a language model that leaks the future (a global token early in the
sequence would read the answer). :func:`causal_global_mask` therefore intersects the library's
pattern (:class:`~swa_lib.masks.AttentionPattern` with ``global_tokens``) with the causal mask:
a global token reads every *earlier* token and is read by every *later* one. A global token
at the very start can then carry nothing, which is why the global slots here are periodic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..backends.dense import expand_kv
from ..masks import AttentionPattern
from .model import BOS, Attention, ModelConfig, TinyLM
from .training import TrainConfig, fit

__all__ = [
    "DIGITS",
    "LETTERS",
    "MARK",
    "QUERY",
    "NeedleTask",
    "causal_global_mask",
    "CausalGlobalAttention",
    "GlobalTokenLM",
    "Variant",
    "standard_variants",
    "train_on_task",
    "evaluate",
    "run_variant",
]

DIGITS = torch.arange(ord("0"), ord("9") + 1)  #: the ten answers
LETTERS = torch.arange(ord("a"), ord("z") + 1)  #: filler
MARK = ord("|")  #: the token at every global slot
QUERY = ord("?")  #: the last token: "which digit did you see?"


@dataclass
class NeedleTask:
    """Sequences ``(B, context)``: BOS, letters with one digit, markers every ``stride``, then ``?``."""

    context: int = 64
    stride: int = 16

    def __post_init__(self):
        if self.context < 4:
            raise ValueError(f"context must be >= 4, got {self.context}")
        if self.stride < 2:
            raise ValueError(f"stride must be >= 2, got {self.stride}")

    def marker_positions(self) -> torch.Tensor:
        """Positions ``stride, 2*stride, ...`` before the query (BOS at 0 is not a marker)."""
        return torch.arange(self.stride, self.context - 1, self.stride)

    def distances(self) -> torch.Tensor:
        """Every distance ``(context - 1) - p`` at which a needle can sit (not on BOS or a marker)."""
        pos = torch.arange(1, self.context - 1)
        pos = pos[pos % self.stride != 0]
        return (self.context - 1 - pos).flip(0)

    def sample(self, batch: int, generator: torch.Generator, distance=None):
        """``(tokens (B, context), answers (B,), distances (B,))``; ``distance`` fixes it, else uniform."""
        n, gen = self.context, generator
        allowed = self.distances()
        if distance is None:
            dist = allowed[torch.randint(0, len(allowed), (batch,), generator=gen)]
        else:
            dist = torch.as_tensor(distance).expand(batch).clone()
            bad = ~torch.isin(dist, allowed)
            if bad.any():
                raise ValueError(f"distance {int(dist[bad][0])} is not allowed for {self}")
        tokens = LETTERS[torch.randint(0, len(LETTERS), (batch, n), generator=gen)]
        tokens[:, 0] = BOS
        tokens[:, self.marker_positions()] = MARK
        tokens[:, -1] = QUERY
        answers = DIGITS[torch.randint(0, len(DIGITS), (batch,), generator=gen)]
        tokens[torch.arange(batch), n - 1 - dist] = answers
        return tokens, answers, dist


def causal_global_mask(n: int, left: int, stride: Optional[int]) -> torch.Tensor:
    """Bool ``(n, n)`` mask: window ``(left, 0)`` plus global tokens at ``stride, 2*stride, ...``,
    intersected with causality (a global token sees all earlier tokens and all later ones see it).

    ``stride=None`` gives the plain causal band. Built from :class:`AttentionPattern`, the
    library's one definition of who sees whom.
    """
    g = None
    if stride is not None:
        pos = torch.arange(n)
        g = ((pos % stride == 0) & (pos > 0))[None]  # (1, n)
    allowed = AttentionPattern(left, 0, global_tokens=g).mask(n)[0, 0]  # (n, n)
    return allowed & torch.ones(n, n, dtype=torch.bool).tril()


class CausalGlobalAttention(Attention):
    """:class:`~swa_lib.lab.model.Attention` with causal global tokens at every ``stride``-th position.

    Full forward pass only (no KV caches): the mask is dense, O(N^2) memory, fine at the task's size.
    """

    def __init__(self, cfg: ModelConfig, window: Optional[int], stride: int):
        super().__init__(cfg, window)
        self.stride = stride

    def forward(self, x, positions, *, cache=None, **kw):
        if cache is not None:
            raise ValueError("CausalGlobalAttention has no cached decoding; call the model without caches")
        if int(positions[0]) != 0:
            raise ValueError(f"CausalGlobalAttention needs sequences that start at position 0, got {int(positions[0])}")
        return super().forward(x, positions, **kw)

    def attend(self, q, k, v, window, *, backend="sdpa"):
        n = q.shape[2]
        mask = causal_global_mask(n, min(window[0], n), self.stride).to(q.device)  # (N, N)
        k, v = expand_kv(k, self.cfg.heads), expand_kv(v, self.cfg.heads)  # (B, H, N, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, D)


class GlobalTokenLM(TinyLM):
    """A :class:`TinyLM` whose layers all use :class:`CausalGlobalAttention` (same parameters)."""

    def __init__(self, cfg: ModelConfig, stride: int):
        super().__init__(cfg)
        for block, w in zip(self.blocks, cfg.windows):
            block.attn = CausalGlobalAttention(cfg, w, stride)
        self.apply(self._init)

    def new_caches(self, *args, **kwargs):
        raise ValueError("GlobalTokenLM has no cached decoding")


@dataclass
class Variant:
    """One way to arrange attention: per-layer windows (``None`` = full) and optional global slots."""

    name: str
    windows: tuple
    global_stride: Optional[int] = None

    def build(self, dim: int = 32, heads: int = 2, seed: int = 0) -> TinyLM:
        torch.manual_seed(seed)
        cfg = ModelConfig(dim=dim, heads=heads, heads_kv=heads, windows=self.windows)
        return TinyLM(cfg) if self.global_stride is None else GlobalTokenLM(cfg, self.global_stride)

    def layer_masks(self, n: int) -> list:
        """Each layer's ``(n, n)`` bool mask: exactly what the model computes scores for."""
        return [causal_global_mask(n, n - 1 if w is None else min(w, n - 1), self.global_stride) for w in self.windows]

    def scores(self, n: int) -> int:
        """Query-key scores per head for one sequence of ``n`` tokens, summed over layers."""
        return sum(int(m.sum()) for m in self.layer_masks(n))

    def reach(self, n: int) -> int:
        """Largest distance the last token can receive information from through the masks.

        Computed by composing the layers' masks (boolean matrix products), so it accounts for
        windows, full layers and global slots alike. Distances below the reach can still be
        unreachable (sparse global slots leave gaps); :meth:`sees` gives the whole picture.
        """
        return int(n - 1 - self.sees(n).nonzero().min())

    def sees(self, n: int) -> torch.Tensor:
        """Bool ``(n,)``: may the last token's output depend on the token at each position?"""
        seen = torch.eye(n, dtype=torch.bool)
        for m in self.layer_masks(n):
            seen = (m.float() @ seen.float()) > 0  # (n, n): i depends on j after this layer
        return seen[-1]


def standard_variants(window: int = 8, layers: int = 2, stride: int = 16) -> list:
    """The four variants of the chapter with ``layers`` layers and causal window ``window``."""
    interleaved = tuple(window if i % 2 == 0 else None for i in range(layers))
    return [
        Variant("sliding", (window,) * layers),
        Variant("global", (window,) * layers, global_stride=stride),
        Variant("interleaved", interleaved),
        Variant("full", (None,) * layers),
    ]


def train_on_task(model: TinyLM, task: NeedleTask, cfg: TrainConfig) -> list:
    """Train on fresh task samples, loss on the answer only; returns ``[(step, mean loss), ...]``.

    Uses ``steps, batch, lr, weight_decay, betas, clip, warmup, seed, log_every`` of ``cfg``
    (``context`` comes from the task). AdamW, linear warm-up then cosine decay to 10%.
    """
    gen = torch.Generator().manual_seed(cfg.seed)

    def batch_loss(step):
        tokens, answers, _ = task.sample(cfg.batch, gen)  # (B, N), (B,)
        logits = model(tokens)[:, -1]  # (B, vocab): the prediction after "?"
        return F.cross_entropy(logits, answers)

    return fit(model, cfg, batch_loss)


@torch.no_grad()
def evaluate(model: TinyLM, task: NeedleTask, *, per_distance: int = 32, seed: int = 1234) -> dict:
    """Accuracy (fraction of correct argmax answers) at every allowed distance: ``{distance: acc}``."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    out = {}
    for d in task.distances().tolist():
        tokens, answers, _ = task.sample(per_distance, gen, distance=d)
        pred = model(tokens)[:, -1].argmax(-1)  # (B,)
        out[d] = float((pred == answers).float().mean())
    return out


def run_variant(variant: Variant, task: NeedleTask, train_cfg: TrainConfig, *, dim: int = 32, heads: int = 2,
                per_distance: int = 32) -> dict:
    """Build, train and evaluate one variant; returns a JSON-ready summary."""
    model = variant.build(dim=dim, heads=heads, seed=train_cfg.seed)
    start = time.perf_counter()
    history = train_on_task(model, task, train_cfg)
    seconds = time.perf_counter() - start
    acc = evaluate(model, task, per_distance=per_distance)
    n = task.context
    return {
        "name": variant.name,
        "windows": [w for w in variant.windows],
        "global_stride": variant.global_stride,
        "reach": variant.reach(n),
        "scores_per_token": variant.scores(n) / n,
        "final_loss": history[-1][1] if history else None,
        "history": history,
        "accuracy": {str(d): a for d, a in acc.items()},
        "train_seconds": seconds,
    }
