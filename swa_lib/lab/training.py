"""Training the tiny LM: the shipped corpus, random BOS-prefixed batches, and one optimisation loop.

:func:`fit` is the loop every experiment shares (AdamW, warm-up then cosine decay, gradient
clipping); :func:`train` fits a :class:`~swa_lib.lab.model.TinyLM` to text from
:func:`corpus_text`, the corpus shipped in ``swa_lib/lab/data`` (nothing is downloaded).
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import BOS, TinyLM, encode

__all__ = ["TRAIN_FILES", "HELDOUT_FILES", "corpus_text", "make_batches", "TrainConfig", "lr_factor", "fit", "train"]


#: Training text: these modules of the shipped corpus (see :func:`corpus_text`).
TRAIN_FILES = ("argparse.py", "textwrap.py", "string.py", "shlex.py", "fractions.py", "calendar.py",
               "csv.py", "difflib.py", "heapq.py", "bisect.py", "queue.py", "sched.py")
#: Held-out text for evaluation.
HELDOUT_FILES = ("pprint.py", "base64.py")

_CORPUS = "corpus.json.gz"


def corpus_text(files: Sequence[str] = TRAIN_FILES) -> str:
    """Concatenate modules of the corpus shipped in ``swa_lib/lab/data`` (nothing is downloaded).

    The corpus is a fixed copy of fourteen CPython 3.11.7 standard-library sources (PSF License
    Version 2; ``swa_lib/lab/data/README.md`` says where it comes from), so training and evaluation see
    the same bytes on every Python version and machine.
    """
    with resources.files("swa_lib.lab.data").joinpath(_CORPUS).open("rb") as f:
        texts = json.loads(gzip.decompress(f.read()))["files"]
    missing = [name for name in files if name not in texts]
    if missing:
        raise ValueError(f"not in the shipped corpus: {missing}; it holds {sorted(texts)}")
    return "\n".join(texts[name] for name in files)


def make_batches(data: torch.Tensor, batch: int, context: int, generator: torch.Generator) -> torch.Tensor:
    """Random training windows ``(batch, context + 1)``: BOS, then ``context`` bytes of ``data``.

    Every sequence starts with BOS (the token the model can learn to use as an attention sink).
    The model sees ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``.
    """
    starts = torch.randint(0, data.numel() - context, (batch,), generator=generator)
    idx = starts[:, None] + torch.arange(context)  # (batch, context)
    bos = torch.full((batch, 1), BOS, dtype=torch.long)
    return torch.cat([bos, data[idx]], dim=1)  # (batch, context + 1)


@dataclass
class TrainConfig:
    """Optimisation settings for :func:`train` (AdamW, cosine decay, gradient clipping)."""

    steps: int = 1500
    batch: int = 32
    context: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.5
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0
    warmup: int = 50
    seed: int = 0
    log_every: int = 50
    progress: bool = True


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier: linear warm-up over ``cfg.warmup`` steps, then cosine decay to 10%."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def fit(model: nn.Module, cfg: TrainConfig, batch_loss, *, progress: bool = False) -> list:
    """The optimisation loop shared by every training helper; returns ``[(step, mean loss), ...]``.

    ``batch_loss(step)`` draws a batch and returns its scalar loss. AdamW with ``cfg``'s
    hyper-parameters, :func:`lr_factor` schedule, gradient clipping at ``cfg.clip``; the loss is
    averaged over every ``cfg.log_every`` steps. Leaves the model in eval mode.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, desc="training", mininterval=1.0)
        except ImportError:  # pragma: no cover
            bar = None
    history, running = [], 0.0
    model.train()
    for step in range(cfg.steps):
        loss = batch_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % cfg.log_every == 0:
            history.append((step + 1, running / cfg.log_every))
            running = 0.0
            if bar is not None:
                bar.set_postfix(loss=f"{history[-1][1]:.3f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return history


def train(model: TinyLM, text: str, cfg: TrainConfig = TrainConfig(), *,
          backend: str = "sdpa") -> list:
    """Train ``model`` on random BOS-prefixed windows of ``text``; returns ``[(step, loss), ...]``.

    Loss is the mean cross-entropy in nats per byte, logged every ``cfg.log_every`` steps
    (averaged over those steps). Deterministic for a given seed on a given machine.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = encode(text, bos=False)

    def batch_loss(step):
        batch = make_batches(data, cfg.batch, cfg.context, gen)  # (B, context + 1)
        logits = model(batch[:, :-1], backend=backend)  # (B, context, vocab)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    return fit(model, cfg, batch_loss, progress=cfg.progress)
