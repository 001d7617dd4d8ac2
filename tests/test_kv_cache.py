"""Rolling-buffer and sink KV caches: contents, attention equivalence, constant memory, misuse."""

import pytest
import torch

from swa_lib import RollingKVCache, SinkKVCache, dense_attention, sliding_window_attention
from swa_lib.kv_cache import FullKVCache, unrotate
from swa_lib.masks import AttentionPattern


def stream(b, h, n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype), torch.randn(b, h, n, d, generator=g, dtype=dtype))


# -- unrotate -------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [1, 3, 4])
def test_unrotate_orders_positions(w):
    for seen in range(0, 4 * w + 2):
        buf = torch.full((1, 1, w, 1), -1.0)
        for p in range(seen):
            buf[0, 0, p % w, 0] = p
        before = buf.clone()
        out = unrotate(buf, seen)
        expected = torch.arange(max(0, seen - w), seen, dtype=torch.float32)
        assert torch.equal(out[0, 0, :, 0], expected), (seen, out.flatten())
        assert torch.equal(buf, before)  # pure


def test_unrotate_errors():
    with pytest.raises(ValueError, match="shape"):
        unrotate(torch.zeros(3, 4), 1)
    with pytest.raises(ValueError, match="-1"):
        unrotate(torch.zeros(1, 1, 3, 4), -1)


# -- rolling cache ----------------------------------------------------------------------------
def test_slots_picture_after_eleven_tokens():
    c = RollingKVCache(1, 1, 4, 2)
    k, v = stream(1, 1, 11, 2)
    for i in range(11):
        c.update(k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert c.slots() == [8, 9, 10, 7]  # the module docstring's picture
    kk, _ = c.keys_values()
    torch.testing.assert_close(kk, k[:, :, 7:11], rtol=0, atol=0)


@pytest.mark.parametrize("w, n, chunks", [
    (5, 23, [1]), (5, 23, [3]), (5, 23, [5]), (4, 17, [2, 3, 1, 4]), (7, 29, [7, 1, 6]), (1, 9, [1]),
])
def test_rolling_context_and_attention_match_full_band(w, n, chunks):
    """Chunked updates + attention with the cache == one band-masked pass over everything."""
    b, hq, hkv, d = 2, 4, 2, 8  # B > 1 and GQA
    k, v = stream(b, hkv, n, d, seed=n)
    q = torch.randn(b, hq, n, d, generator=torch.Generator().manual_seed(99))
    full = dense_attention(q, k, v, AttentionPattern(w - 1, 0), d ** -0.5)  # (B, H, N, D)
    cache = RollingKVCache(b, hkv, w, d, max_chunk=max(chunks))
    outs, start, i = [], 0, 0
    while start < n:
        c = min(chunks[i % len(chunks)], n - start)
        k_ctx, v_ctx = cache.update(k[:, :, start:start + c], v[:, :, start:start + c])
        first = max(0, start - w)
        torch.testing.assert_close(k_ctx, k[:, :, first:start + c], rtol=0, atol=0)
        torch.testing.assert_close(v_ctx, v[:, :, first:start + c], rtol=0, atol=0)
        outs.append(sliding_window_attention(q[:, :, start:start + c], k_ctx, v_ctx, cache.attention_window))
        start += c
        i += 1
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=0, atol=1e-6)


def test_update_longer_than_window_keeps_last_w():
    cache = RollingKVCache(1, 1, 4, 2, max_chunk=10)
    k, v = stream(1, 1, 10, 2)
    k_ctx, _ = cache.update(k, v)
    torch.testing.assert_close(k_ctx, k)
    torch.testing.assert_close(cache.keys_values()[0], k[:, :, 6:])


def test_memory_constant():
    w = 8
    cache = RollingKVCache(2, 2, w, 4)
    k, v = stream(2, 2, 10 * w, 4)
    ptrs = [t.data_ptr() for t in cache.tensors()]
    sizes = {}
    for i in range(10 * w):
        cache.update(k[:, :, i:i + 1], v[:, :, i:i + 1])
        if i + 1 in (w, 10 * w):
            sizes[i + 1] = ([tuple(t.shape) for t in cache.tensors()], cache.nbytes)
    assert sizes[w] == sizes[10 * w] == ([(2, 2, w, 4)] * 2, 2 * 2 * 2 * w * 4 * 4)
    assert [t.data_ptr() for t in cache.tensors()] == ptrs  # never reallocated
    sink = SinkKVCache(2, 2, w, 4, sinks=3)
    for i in range(10 * w):
        sink.update(k[:, :, i:i + 1], v[:, :, i:i + 1])
        if i + 1 == w:
            at_w = sink.nbytes
    assert sink.nbytes == at_w == 2 * 2 * 2 * w * 4 * 4
    full = FullKVCache(2, 2, 4, initial=4)
    full.update(k[:, :, :w], v[:, :, :w])
    at_w = full.nbytes
    full.update(k[:, :, w:], v[:, :, w:])
    assert full.nbytes >= 10 * at_w // 2  # the baseline grows


def test_rolling_errors():
    cache = RollingKVCache(2, 2, 4, 8)
    k, v = stream(2, 2, 5, 8)
    with pytest.raises(ValueError, match="max_chunk=4"):
        cache.update(k, v)  # 5 tokens at once, without chunking
    with pytest.raises(ValueError, match=r"\(2, 2, 3, 7\)"):
        cache.update(torch.zeros(2, 2, 3, 7), torch.zeros(2, 2, 3, 7))
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 8\)"):
        cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(TypeError, match="float64"):
        cache.update(k[:, :, :2].double(), v[:, :, :2].double())
    with pytest.raises(ValueError, match="meta"):
        cache.update(k[:, :, :2].to("meta"), v[:, :, :2].to("meta"))
    with pytest.raises(ValueError, match="2 and 1"):
        cache.update(k[:, :, :2], v[:, :, :1])
    with pytest.raises(ValueError, match="N=0"):
        cache.update(k[:, :, :0], v[:, :, :0])
    with pytest.raises(TypeError, match="list"):
        cache.update([1], v)
    with pytest.raises(ValueError, match=r"k must have 4 dims \(B, H, N, D\), got 3"):  # the entry point's words
        cache.update(k[0], v[0])
    with pytest.raises(TypeError, match="batch must be an int, got float 2.0"):
        RollingKVCache(2.0, 1, 4, 8)
    with pytest.raises(ValueError, match="max_chunk must be >= 1, got 0"):
        RollingKVCache(1, 1, 4, 8, max_chunk=0)
    with pytest.raises(ValueError, match="0"):
        RollingKVCache(1, 1, 0, 8)
    with pytest.raises(TypeError, match="int64"):
        RollingKVCache(1, 1, 4, 8, dtype=torch.int64)
    assert cache.seen == 0  # failed updates changed nothing


# -- sink cache -------------------------------------------------------------------------------
@pytest.mark.parametrize("sinks", [0, 1, 3])
@pytest.mark.parametrize("positions", ["cache", "original"])
def test_sink_cache_contents(sinks, positions):
    w, n = 7, 30
    k, v = stream(2, 1, n, 4, seed=sinks)
    cache = SinkKVCache(2, 1, w, 4, sinks=sinks, positions=positions)
    # fill with two chunks, then one token at a time
    steps = [3, 4] + [1] * (n - 7)
    start = 0
    for c in steps:
        k_ctx, v_ctx, key_pos, q_pos = cache.update(k[:, :, start:start + c], v[:, :, start:start + c])
        start += c
        # the context is: first `sinks` tokens and the most recent w - sinks (all while filling)
        kept = list(range(start)) if start <= w else list(range(sinks)) + list(range(start - (w - sinks), start))
        torch.testing.assert_close(k_ctx, k[:, :, kept], rtol=0, atol=0)
        torch.testing.assert_close(v_ctx, v[:, :, kept], rtol=0, atol=0)
        expected_pos = list(range(len(kept))) if positions == "cache" else kept
        assert key_pos.tolist() == expected_pos
        assert q_pos.tolist() == expected_pos[-c:]
        assert k_ctx.shape[2] <= w


def test_sink_cache_errors():
    cache = SinkKVCache(1, 1, 4, 2, sinks=1)
    k, v = stream(1, 1, 6, 2)
    cache.update(k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="one per update"):
        cache.update(k[:, :, 4:6], v[:, :, 4:6])
    with pytest.raises(ValueError, match="sinks"):
        SinkKVCache(1, 1, 4, 2, sinks=4)
    with pytest.raises(ValueError, match="'rope'"):
        SinkKVCache(1, 1, 4, 2, sinks=1, positions="rope")


def test_full_cache_grows_and_returns_everything():
    k, v = stream(1, 2, 100, 3)
    cache = FullKVCache(1, 2, 3, initial=4)
    for i in range(0, 100, 7):
        k_all, v_all = cache.update(k[:, :, i:i + 7], v[:, :, i:i + 7])
    torch.testing.assert_close(k_all, k, rtol=0, atol=0)
    torch.testing.assert_close(v_all, v, rtol=0, atol=0)
