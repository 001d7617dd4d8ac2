"""The implementations benchmarks/cpu.py runs side by side, on the same tensors.

Each peer is built by :func:`make_peer` for one direction: ``"forward"`` (inference, under
``torch.no_grad``) or ``"train"`` (forward and backward: the output's sum is back-propagated to
q, k and v). A peer that cannot run a case raises :class:`NotApplicable` with the reason.

  loop           swa_lib.loop_attention, the oracle (small n only)
  sdpa_dense     torch.nn.functional.scaled_dot_product_attention with a dense (n, n) bool band
                 mask (built once outside the timing; its bytes are added to the peak)
  hf_longformer  Hugging Face transformers' LongformerSelfAttention._sliding_chunks_query_key_matmul
                 + softmax + _sliding_chunks_matmul_attn_probs_value, on (B, N, H, D) inputs. It only
                 has symmetric bands: for (512, 0) it runs the w=512 band with the right half masked.
  flex_compiled  torch.nn.attention.flex_attention with a sliding-window mask_mod and a block mask,
                 under torch.compile; forward only (FlexAttention has no CPU backward)
  chunked        swa_lib backend "chunked" (Longformer's algorithm)
  blocked        swa_lib backend "blocked" (what backend="auto" picks on a CPU)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import swa_lib
from swa_lib.masks import AttentionPattern

PEERS = ["loop", "sdpa_dense", "hf_longformer", "flex_compiled", "chunked", "blocked"]


class NotApplicable(Exception):
    """A peer that does not run this case (HF needs n % 2w == 0; Flex has no CPU backward)."""


def _hf(q, k, v, window, scale):
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    n, (left, right) = q.shape[2], window
    heads, d = q.shape[1], q.shape[3]
    w = max(left, right)
    if n % (2 * w):
        raise NotApplicable(f"HF needs n % (2w) == 0 (n={n}, w={w})")
    config = LongformerConfig(hidden_size=heads * d, num_attention_heads=heads, attention_window=[2 * w],
                              num_hidden_layers=1)
    hf = LongformerSelfAttention(config, layer_id=0).eval()
    extra = None
    if (left, right) != (w, w):  # one-sided window: mask the unused offsets of the band
        t = torch.arange(2 * w + 1)
        extra = torch.zeros(2 * w + 1).masked_fill_((t < w - left) | (t > w + right), float("-inf"))

    def run(qh, kh, vh):  # (B, N, H, D), their layout
        scores = hf._sliding_chunks_query_key_matmul(qh * scale, kh, w)  # (B, N, H, 2w+1)
        if extra is not None:
            scores = scores + extra
        return hf._sliding_chunks_matmul_attn_probs_value(torch.softmax(scores, dim=-1), vh, w)

    note = "" if extra is None else f"band w={w}, half masked"
    return run, note


def make_peer(name: str, q, k, v, window, scale, direction: str = "forward"):
    """``(callable, extra_bytes, note)``; the callable runs one forward (or forward and
    backward) pass and returns the output (B, H, N, D)."""
    n = q.shape[2]
    left, right = window
    train = direction == "train"
    if name == "flex_compiled" and train:
        raise NotApplicable("FlexAttention has no backward on the CPU")
    if train:
        q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))

    def finish(out):
        if train:
            out.sum().backward()
        return out.detach()

    extra, note = 0, ""
    if name == "loop":
        pattern = AttentionPattern(left, right)
        fn = lambda: swa_lib.loop_attention(q, k, v, pattern, scale)  # noqa: E731
    elif name == "sdpa_dense":
        mask = torch.ones(n, n, dtype=torch.bool).tril_(right).triu_(-left)  # (n, n) band, 1 byte each
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # noqa: E731
        extra, note = mask.numel(), "mask bytes added"
    elif name == "hf_longformer":
        run, note = _hf(q, k, v, window, scale)
        layout = [x.detach().transpose(1, 2).contiguous().requires_grad_(train) for x in (q, k, v)]

        def fn():
            return run(*layout).transpose(1, 2)

        if train:
            q, k, v = layout  # their gradients are what the backward computes
    elif name == "flex_compiled":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx <= left) & (kv_idx - q_idx <= right)

        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu")
        compiled = torch.compile(flex_attention, dynamic=False)
        fn = lambda: compiled(q, k, v, block_mask=block_mask, scale=scale)  # noqa: E731
    elif name in ("chunked", "blocked"):
        fn = lambda: swa_lib.sliding_window_attention(q, k, v, window, scale=scale, backend=name)  # noqa: E731
    else:
        raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")

    def call():
        for x in (q, k, v):
            if train:
                x.grad = None
        if train:
            return finish(fn())
        with torch.no_grad():
            return fn()

    return call, extra, note
