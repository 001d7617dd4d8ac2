"""Real peer: Hugging Face transformers' Longformer sliding-chunk routines, in their own convention.

``LongformerSelfAttention._sliding_chunks_query_key_matmul(q, k, w)`` returns, for
``(B, N, H, D)`` inputs with ``N`` a multiple of ``2w``, a band ``(B, N, H, 2w + 1)`` of scores
``q_i . k_{i-w+t}`` with ``-inf`` outside the sequence; ``_sliding_chunks_matmul_attn_probs_value``
multiplies such a band of probabilities by the values. Their ``attention_window`` is converted with
``swa_lib.from_longformer``.
"""

import pytest
import torch

import swa_lib
from swa_lib.backends.chunked import _band_mask, sliding_chunks_scores, sliding_chunks_values

transformers = pytest.importorskip("transformers")
from transformers import LongformerConfig  # noqa: E402
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402


def hf_attention(attention_window: int, heads: int = 2, head_dim: int = 4):
    config = LongformerConfig(
        hidden_size=heads * head_dim, num_attention_heads=heads, attention_window=[attention_window],
        num_hidden_layers=1, attention_probs_dropout_prob=0.0,
    )
    return LongformerSelfAttention(config, layer_id=0).eval()


def qkv_bnhd(b, n, h, d, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=gen, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("attention_window,n", [(4, 8), (4, 16), (8, 24), (16, 64)])
def test_band_of_scores_equals_hf(attention_window, n):
    w = attention_window // 2
    hf = hf_attention(attention_window)
    q, k, _ = qkv_bnhd(2, n, 2, 4, seed=n)
    theirs = hf._sliding_chunks_query_key_matmul(q, k, w)  # (B, N, H, 2w+1)
    to_bh = lambda x: x.transpose(1, 2).reshape(4, n, 4).contiguous()  # noqa: E731  (B, N, H, D) -> (BH, N, D)
    ours = sliding_chunks_scores(to_bh(q), to_bh(k), w)  # (BH, N, 2w+1)
    ours = ours.masked_fill(~_band_mask(n, n, w, w, w, None), float("-inf"))
    ours = ours.reshape(2, 2, n, 2 * w + 1).transpose(1, 2)  # back to (B, N, H, 2w+1)
    assert torch.equal(torch.isinf(theirs), torch.isinf(ours))
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("attention_window,n", [(4, 8), (8, 24)])
def test_values_step_equals_hf(attention_window, n):
    w = attention_window // 2
    hf = hf_attention(attention_window)
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(2, n, 2, 2 * w + 1, generator=gen, dtype=torch.float64)
    outside = ~_band_mask(n, n, w, w, w, None)  # (N, 2w+1): keys before 0 or after N-1
    probs = probs.masked_fill(outside[None, :, None, :], 0.0)  # HF pads values with -1 there; probs are 0
    _, _, v = qkv_bnhd(2, n, 2, 4, seed=2)
    theirs = hf._sliding_chunks_matmul_attn_probs_value(probs, v, w)  # (B, N, H, D)
    ours = sliding_chunks_values(probs.transpose(1, 2).reshape(4, n, -1), v.transpose(1, 2).reshape(4, n, 4), w)
    torch.testing.assert_close(ours.reshape(2, 2, n, 4).transpose(1, 2), theirs, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", ["chunked", "blocked"])
# (attention_window=2, i.e. w=1, is left out: HF's _sliding_chunks_query_key_matmul raises a shape
# error for w=1 in transformers 5.23, because its slice ``1 - window_overlap`` is then ``0:``.)
@pytest.mark.parametrize("attention_window,n", [(4, 8), (6, 12), (8, 32), (32, 64)])
def test_local_attention_equals_hf(backend, attention_window, n):
    """HF's full local path (scale, band, softmax, values) == sliding_window_attention(from_longformer(w))."""
    w = attention_window // 2
    hf = hf_attention(attention_window)
    q, k, v = qkv_bnhd(2, n, 2, 4, seed=attention_window)
    scores = hf._sliding_chunks_query_key_matmul(q / 2.0, k, w)  # HF divides q by sqrt(head_dim) = 2
    probs = torch.softmax(scores, dim=-1)
    theirs = hf._sliding_chunks_matmul_attn_probs_value(probs, v, w)  # (B, N, H, D)
    to_bhnd = lambda x: x.transpose(1, 2)  # noqa: E731  non-contiguous views on purpose
    ours = swa_lib.sliding_window_attention(
        to_bhnd(q), to_bhnd(k), to_bhnd(v), swa_lib.from_longformer(attention_window), backend=backend
    )
    torch.testing.assert_close(ours.transpose(1, 2), theirs, rtol=1e-12, atol=1e-12)


def test_hf_needs_multiples_of_2w_we_do_not():
    """HF asserts N % 2w == 0 (LongformerModel pads); swa_lib pads internally and agrees on the overlap."""
    hf = hf_attention(8)
    q, k, v = qkv_bnhd(1, 21, 2, 4, seed=3)
    with pytest.raises(AssertionError):
        hf._sliding_chunks_query_key_matmul(q, k, 4)
    to_bhnd = lambda x: x.transpose(1, 2)  # noqa: E731
    # pad to 24 with keys that nobody may see, the way LongformerModel does (its mask is -inf there)
    out21 = swa_lib.sliding_window_attention(to_bhnd(q), to_bhnd(k), to_bhnd(v), (4, 4), backend="chunked")
    ref = swa_lib.sliding_window_attention(to_bhnd(q), to_bhnd(k), to_bhnd(v), (4, 4), backend="dense")
    torch.testing.assert_close(out21, ref, rtol=1e-12, atol=1e-12)
