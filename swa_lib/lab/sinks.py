"""The attention-sink demonstration: train a tiny LM, then stream text far past its context.

StreamingLLM (Xiao et al. 2023) observed that language models put a large share of attention on
the first token, whatever it is, because softmax weights must sum to one and a head with nothing
useful to attend to needs somewhere to put them. Evicting that token (a plain sliding window
over the KV cache) then breaks the model; keeping a few initial tokens (*sinks*) next to the
window repairs it. This module reproduces the pattern at toy scale on a 2-core CPU (a mild
version of it: every head of layer 0 puts a quarter to a half of its attention on BOS and
window-only eviction loses a few percent, not the collapse of a large model; chapter 10 reports
the numbers, their spread over seeds and CPUs (``benchmarks/sinks_spread.py``) and the variants
tried).

1. :func:`train_demo_model` trains a :class:`~swa_lib.lab.model.TinyLM` (4 layers, width 64, 8 heads
   of dimension 8, about 230k parameters) with full causal attention on BOS-prefixed windows of
   32 tokens of the shipped corpus (:func:`swa_lib.lab.training.corpus_text`): AdamW, betas (0.9, 0.95), learning rate 1e-2,
   weight decay 0.5, gradient clipping, 2400 steps (about 2.5 minutes with one torch thread on
   the 2-core CPU this was written on).
2. :func:`first_token_attention` measures how much attention each layer and head puts on token 0.
3. :func:`stream_eval` streams held-out text ``stream_len`` tokens long (many times the context)
   and reports perplexity for each way of bounding the cache.

:func:`run_demo` does all three. ``python -m swa_lib.lab.sinks_run --save`` (:mod:`swa_lib.lab.sinks_run`,
which also prints the demonstration's tables) stores the trained weights as package data, so the
chapter can load them (:func:`load_demo_model`) instead of training.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ..backends.dense import expand_kv, masked_softmax
from ..masks import AttentionPattern
from ..rope import apply_rope
from .model import BOS, ModelConfig, TinyLM, encode
from .training import HELDOUT_FILES, TrainConfig, corpus_text, train
from .results import path as result_path

__all__ = [
    "DemoConfig",
    "train_demo_model",
    "first_token_attention",
    "attention_maps",
    "stream_eval",
    "streaming_forward",
    "stream_with_caches",
    "run_demo",
    "findings",
    "sink_policies",
    "load_demo_model",
    "attention_by_key_kind",
    "value_norms",
]


@dataclass
class DemoConfig:
    """Everything the demonstration depends on (seeded, so results repeat on one machine)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(dim=64, heads=8, heads_kv=8, windows=(None,) * 4))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2400, batch=32, context=32, lr=1e-2,
                                                                    weight_decay=0.5, betas=(0.9, 0.95), clip=1.0))
    stream_len: int = 512  # tokens per evaluation stream (BOS + text), 16x the context
    streams: int = 4  # held-out streams evaluated side by side
    max_sinks: int = 4

    @property
    def cache(self) -> int:
        """Cache size W for streaming = the training context."""
        return self.train.context

    def as_dict(self) -> dict:
        """The settings as stored next to the results (JSON-ready)."""
        return {"model": asdict(self.model), "train": asdict(self.train), "stream_len": self.stream_len,
                "streams": self.streams, "cache": self.cache}


def train_demo_model(cfg: DemoConfig = DemoConfig(), *, progress: bool = True):
    """Train the demo model; returns ``(model, history)``."""
    torch.manual_seed(cfg.train.seed)
    model = TinyLM(cfg.model)
    tcfg = TrainConfig(**{**asdict(cfg.train), "progress": progress})
    history = train(model, corpus_text(), tcfg)
    return model, history


def heldout_streams(cfg: DemoConfig) -> torch.Tensor:
    """``(streams, stream_len)`` held-out token streams, each starting with BOS."""
    data = encode(corpus_text(HELDOUT_FILES), bos=False)
    body = cfg.stream_len - 1
    if data.numel() < cfg.streams * body:
        raise ValueError(f"held-out text has {data.numel()} bytes, need {cfg.streams * body}")
    chunks = data[: cfg.streams * body].view(cfg.streams, body)
    bos = torch.full((cfg.streams, 1), BOS, dtype=torch.long)
    return torch.cat([bos, chunks], dim=1)


@torch.no_grad()
def attention_maps(model: TinyLM, tokens: torch.Tensor) -> list:
    """Causal attention probabilities per layer, each ``(B, H, N, N)``, from one full forward pass."""
    capture = []
    model(tokens, capture=capture)
    maps = []
    for q, k in capture:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, N, D)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, N, N)
        mask = AttentionPattern(scores.shape[-1], 0).mask(scores.shape[-2], scores.shape[-1])
        maps.append(masked_softmax(scores, mask))
    return maps


def first_token_attention(model: TinyLM, tokens: torch.Tensor, *, min_query: int = 16) -> torch.Tensor:
    """Mean attention weight on key 0 per layer and head ``(L, H)``, over queries ``>= min_query``.

    For comparison, uniform attention would give ``mean(1 / (i + 1))`` over the same queries.
    """
    maps = attention_maps(model, tokens)
    return torch.stack([a[:, :, min_query:, 0].mean(dim=(0, 2)) for a in maps])  # (L, H)


def attention_by_key_kind(model: TinyLM, tokens: torch.Tensor, *, min_query: int = 16) -> dict:
    """Where attention goes, per layer and head ``(L, H)``: mean weight on BOS (key 0), on
    whitespace bytes (space, newline), on the query itself, and on the previous token, over queries
    ``>= min_query``; with the share a uniform distribution would give to each kind.

    Used to look for sinks other than the first token (code is full of always-nearby spaces).
    """
    maps = attention_maps(model, tokens)
    n = tokens.shape[1]
    white = (tokens == ord(" ")) | (tokens == ord("\n"))  # (B, N)
    white[:, 0] = False
    causal = torch.ones(n, n).tril().bool()
    rows = slice(min_query, n)
    out = {"bos": [], "whitespace": [], "self": [], "previous": []}
    for a in maps:  # (B, H, N, N)
        a = a[:, :, rows]  # (B, H, Nq, N)
        out["bos"].append(a[..., 0].mean(dim=(0, 2)))
        out["whitespace"].append((a * white[:, None, None, :]).sum(-1).mean(dim=(0, 2)))
        out["self"].append(torch.diagonal(a, offset=min_query, dim1=-2, dim2=-1).mean(dim=(0, 2)))
        out["previous"].append(torch.diagonal(a, offset=min_query - 1, dim1=-2, dim2=-1).mean(dim=(0, 2)))
    res = {k: torch.stack(v) for k, v in out.items()}  # (L, H) each
    counts = causal[rows].sum(-1).float()  # keys per query
    res["uniform"] = {
        "bos": float((1 / counts).mean()),
        "whitespace": float(((white[:, None, :] & causal[rows][None]).sum(-1) / counts).mean()),
        "self": float((1 / counts).mean()),
    }
    return res


@torch.no_grad()
def value_norms(model: TinyLM, tokens: torch.Tensor) -> dict:
    """How much each head *writes* when it attends to a key: the norm of the key's value vector
    after the head's slice of the output projection, ``|W_o^h v_j|``, for BOS (key 0) and averaged
    over the other keys; each ``(L, H)``. A sink is a key with a large share of the attention and
    a small write: attending to it is close to doing nothing.
    """
    cfg = model.cfg
    positions = torch.arange(tokens.shape[1])
    bos, others = [], []

    def attention(_, attn, h):  # the layer's own attention, after measuring its writes
        _, _, v = attn.project(h)  # (B, H_kv, N, D)
        v = expand_kv(v, cfg.heads)  # (B, H, N, D)
        w_o = attn.wo.weight.view(cfg.dim, cfg.heads, cfg.head_dim)  # (dim, H, D)
        written = torch.einsum("ehd,bhnd->bhne", w_o, v).norm(dim=-1)  # (B, H, N)
        bos.append(written[:, :, 0].mean(0))
        others.append(written[:, :, 1:].mean(dim=(0, 2)))
        return attn(h, positions)

    model.forward_with(tokens, attention)
    return {"bos": torch.stack(bos), "others": torch.stack(others)}


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none").view(targets.shape)


@torch.no_grad()
def stream_with_caches(model: TinyLM, tokens: torch.Tensor, caches) -> torch.Tensor:
    """Feed ``tokens`` one at a time through ``caches``; logits ``(B, N, vocab)``."""
    out = [model(tokens[:, i:i + 1], start=i, caches=caches) for i in range(tokens.shape[1])]
    return torch.cat(out, dim=1)


@torch.no_grad()
def _recompute(model: TinyLM, tokens: torch.Tensor, w: int, *, bos: bool, batch: int = 256) -> torch.Tensor:
    """Logits of positions ``w .. N-1``, each from a fresh forward pass over the last ``w`` tokens
    (or BOS + the last ``w - 1`` with ``bos=True``)."""
    b, n = tokens.shape
    span = w - 1 if bos else w
    windows = tokens[:, w - span + 1:].unfold(1, span, 1)  # (B, N - w, span): tokens i-span+1 .. i
    windows = windows.reshape(-1, span)
    if bos:
        windows = torch.cat([torch.full_like(windows[:, :1], BOS), windows], dim=1)
    last = [model(windows[i:i + batch])[:, -1] for i in range(0, windows.shape[0], batch)]
    return torch.cat(last).view(b, n - w, -1)


def streaming_forward(model: TinyLM, tokens: torch.Tensor, w: int, *, sinks: int = 0,
                      positions: str = "cache") -> torch.Tensor:
    """Logits ``(B, N, vocab)`` of streaming ``tokens`` through a :class:`SinkKVCache` of ``w`` tokens
    with ``sinks`` sinks, computed in one pass with a mask instead of token by token.

    Each token's hidden states depend only on what its own cache view holds, so one masked pass
    gives the same numbers as streaming (tests/test_sinks.py checks it against the cache). The
    view of query ``i``: keys ``j < sinks`` and ``i - (w - sinks) < j <= i`` -- the pattern
    ``AttentionPattern(w - sinks - 1, 0, sinks=sinks)``. With ``positions="cache"`` (StreamingLLM),
    once the cache is full (``i >= w``) the query sits at cache position ``w - 1`` and sink ``j`` at
    ``j``; recent keys keep their distance ``i - j`` either way, since RoPE scores depend only on the
    difference of positions. With ``positions="original"`` every token keeps its stream position.
    """
    if not 0 <= sinks < w:
        raise ValueError(f"sinks must be in [0, w={w}), got {sinks}")
    if positions not in ("cache", "original"):
        raise ValueError(f"positions must be 'cache' or 'original', got {positions!r}")
    cfg = model.cfg
    n = tokens.shape[1]
    pos = torch.arange(n)
    pattern = AttentionPattern(w - sinks - 1, 0, sinks=sinks)
    mask = pattern.mask(n)  # (1, 1, N, N)

    def attention(_, attn, h):
        q, k, v = attn.project(h)  # (B, H, N, D), (B, H_kv, N, D) x 2
        qr, kr = apply_rope(q, pos, cfg.rope_base), apply_rope(k, pos, cfg.rope_base)
        kr_h, v_h = expand_kv(kr, cfg.heads), expand_kv(v, cfg.heads)  # (B, H, N, D)
        scale = cfg.head_dim ** -0.5
        scores = qr @ kr_h.transpose(-2, -1) * scale  # (B, H, N, N)
        if positions == "cache" and sinks and n > w:
            q_fixed = apply_rope(q[:, :, w:], torch.full((n - w,), w - 1), cfg.rope_base)  # (B, H, N-w, D)
            sink_scores = q_fixed @ kr_h[:, :, :sinks].transpose(-2, -1) * scale  # (B, H, N-w, S)
            scores = scores.clone()
            scores[:, :, w:, :sinks] = sink_scores
        return attn.merge(masked_softmax(scores, mask) @ v_h)  # (B, N, dim)

    return model.forward_with(tokens, attention)


@torch.no_grad()
def stream_eval(model: TinyLM, tokens: torch.Tensor, w: int, *, max_sinks: int = 4) -> dict:
    """Perplexity (per byte) on positions ``w+1 .. N-1`` of ``tokens`` for each cache policy.

    Policies: ``dense`` (every token kept, positions up to N-1, far beyond training);
    ``window`` (last ``w`` tokens only: a :class:`SinkKVCache` with 0 sinks, the same as a
    rolling buffer); ``sinks=S`` (S first tokens + last ``w - S``, positions inside the cache);
    ``sinks=S, original positions`` (the naive variant, for the largest S);
    ``recompute`` (a fresh pass over the last ``w`` tokens for every prediction) and
    ``recompute+BOS`` (a fresh pass over BOS + the last ``w - 1``). Only predictions made once
    the cache is full are scored: before that every policy computes the same thing.
    """
    targets = tokens[:, w + 1:]  # predicted from positions w .. N-2
    inputs = tokens[:, :-1]

    def ppl(logits):  # logits for positions w .. N-2
        return math.exp(float(_nll(logits, targets).mean()))

    res = {"dense": ppl(model(inputs)[:, w:])}
    for s in range(0, max_sinks + 1):
        name = "window" if s == 0 else f"sinks={s}"
        res[name] = ppl(streaming_forward(model, inputs, w, sinks=s)[:, w:])
    res[f"sinks={max_sinks}, original positions"] = ppl(
        streaming_forward(model, inputs, w, sinks=max_sinks, positions="original")[:, w:])
    res["recompute"] = ppl(_recompute(model, inputs, w, bos=False))
    res["recompute+BOS"] = ppl(_recompute(model, inputs, w, bos=True))
    return res


def run_demo(cfg: DemoConfig = DemoConfig(), *, model: Optional[TinyLM] = None, progress: bool = True) -> dict:
    """Train (unless ``model`` is given), measure first-token attention, stream-evaluate.

    Returns a dict with ``history``, ``first_token`` (L x H list), ``uniform`` (what uniform
    attention would give), ``ppl`` (policy -> perplexity), timings, and the model under ``model``.
    """
    t0 = time.perf_counter()
    history = None
    if model is None:
        model, history = train_demo_model(cfg, progress=progress)
    t_train = time.perf_counter() - t0
    model.eval()
    streams = heldout_streams(cfg)
    short = streams[:, : cfg.cache]  # training-length sequences (BOS + context - 1 bytes)
    min_query = cfg.cache // 4
    mass = first_token_attention(model, short, min_query=min_query)
    uniform = float(torch.mean(1.0 / (torch.arange(min_query, cfg.cache) + 1.0)))
    t1 = time.perf_counter()
    ppl = stream_eval(model, streams, cfg.cache, max_sinks=cfg.max_sinks)
    return {
        "model": model,
        "history": history,
        "first_token": [[round(float(x), 4) for x in row] for row in mass],
        "uniform": round(uniform, 4),
        "ppl": {k: round(v, 4) for k, v in ppl.items()},
        "seconds_train": round(t_train, 1),
        "seconds_eval": round(time.perf_counter() - t1, 1),
    }


def sink_policies(ppl: dict) -> list:
    """Perplexities of the sink policies with cache positions: ``sinks=1`` .. ``sinks=S``."""
    return [v for k, v in ppl.items() if k.startswith("sinks=") and k[len("sinks="):].isdigit()]


def findings(result: dict) -> dict:
    """The demonstration's claims as numbers, from :func:`run_demo`'s result.

    Attention on BOS relative to the uniform share (layer 0's weakest head and its mean; the deeper
    layers' mean and strongest head), and perplexity ratios minus one: window-only eviction against the
    worst sink policy, recomputation without BOS against recomputation with it, original against
    cache positions for 4 sinks, dense attention beyond the training length (a plain ratio), and
    the largest deviation of any sink policy from recomputation with BOS.
    """
    mass, uniform, ppl = torch.tensor(result["first_token"]), result["uniform"], result["ppl"]
    ref = ppl["recompute+BOS"]
    sinks = sink_policies(ppl)
    return {
        "layer0_min_vs_uniform": round(float(mass[0].min()) / uniform, 3),
        "layer0_mean_vs_uniform": round(float(mass[0].mean()) / uniform, 3),
        "deeper_mean_vs_uniform": round(float(mass[1:].mean()) / uniform, 3),
        "deeper_max_vs_uniform": round(float(mass[1:].max()) / uniform, 3),
        "sinks_max_deviation": round(max(abs(p / ref - 1) for p in sinks), 4),
        "window_vs_worst_sinks": round(ppl["window"] / max(sinks) - 1, 4),
        "recompute_vs_recompute_bos": round(ppl["recompute"] / ref - 1, 4),
        "original_vs_cache_positions": round(ppl["sinks=4, original positions"] / ppl["sinks=4"] - 1, 4),
        "dense_vs_recompute_bos": round(ppl["dense"] / ref, 3),
    }


def load_demo_model(dtype: torch.dtype = torch.float64) -> TinyLM:
    """The model trained by ``python -m swa_lib.lab.sinks_run --save`` (weights shipped in float16).

    Loaded in float64 by default: the evaluation then rounds far below the printed digits, so the
    numbers the chapter prints are the same on every CPU (in float32 the dense perplexity already
    moves in its fifth digit from one code path to another).
    """
    p = result_path("sinks_model").with_suffix(".pt")
    if not p.exists():
        raise FileNotFoundError(f"no stored model at {p}; run python -m swa_lib.lab.sinks_run --save")
    blob = torch.load(io.BytesIO(p.read_bytes()), map_location="cpu", weights_only=True)  # tensors and plain data only
    model = TinyLM(ModelConfig(**blob["config"]))
    model.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    return model.to(dtype).eval()
