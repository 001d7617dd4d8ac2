"""The Triton kernel on the call shapes of real inference and training, in the interpreter.

Fewer queries than keys (chunked prefill against a cache, one-token decoding; the queries are
the last positions, as in every CPU backend), the previous kernel variant kept for the first GPU
measurement, the TMA-descriptor path, 64-bit offsets on a strided view whose row offsets pass
2**31, the split of sink and global work over programs, and the caches decoding through the
kernel. All against the loop oracle (or its float64 dense twin), forward and backward; sizes
stay tiny (the interpreter runs every program in Python).
"""

from __future__ import annotations

import pytest
import torch

from swa_lib import AttentionPattern, RollingKVCache, dense_attention, loop_attention, sliding_window_attention
from swa_lib.attention import global_mask

tk = pytest.importorskip("swa_lib.backends.triton", reason="triton is not installed")
if not tk.INTERPRETER:
    pytest.skip("these tests run the kernels in Triton's CPU interpreter", allow_module_level=True)
pytestmark = pytest.mark.interpreter


def _inputs(b, h, h_kv, n_q, n_k, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g)
    k, v = (torch.randn(b, h_kv, n_k, d, generator=g) for _ in range(2))
    grad = torch.randn(b, h, n_q, d, generator=g)
    return [x.to(dtype) for x in (q, k, v)], grad


def _run(fn, qkv, grad, dtype):
    leaves = [x.detach().to(dtype).clone().requires_grad_() for x in qkv]
    out = fn(*leaves)
    out.backward(grad.to(dtype))
    return [out.detach().double()] + [x.grad.double() for x in leaves]


def _max_errors(a, b):
    return [float((x - y).abs().max()) for x, y in zip(a, b)]


# (name, B, H, H_kv, N_q, N_k, pattern): prefill chunks and decoding, every feature
CROSS = [
    ("decode_one_token", 1, 2, 1, 1, 37, AttentionPattern(5, 0)),
    ("decode_with_sinks", 1, 2, 2, 1, 37, AttentionPattern(4, 0, sinks=3)),
    ("prefill_chunk", 1, 2, 1, 20, 37, AttentionPattern(7, 0)),
    ("prefill_symmetric", 2, 2, 2, 21, 40, AttentionPattern(6, 3)),
    ("everything", 1, 2, 1, 23, 41,
     AttentionPattern(5, 2, dilation=(1, 2), sinks=2, global_tokens=global_mask(torch.tensor([3, 30, 39]), 1, 41, "cpu"))),
]


@pytest.mark.parametrize("case", CROSS, ids=[c[0] for c in CROSS])
def test_fewer_queries_than_keys_match_the_loop_oracle(case):
    """Queries at the last N_q positions (bottom-right), as the CPU backends align them."""
    _, b, h, h_kv, n_q, n_k, pattern = case
    qkv, grad = _inputs(b, h, h_kv, n_q, n_k, 16)
    ours = _run(lambda q, k, v: tk.triton_attention(q, k, v, pattern, 0.25), qkv, grad, torch.float32)
    ref = _run(lambda q, k, v: loop_attention(q, k, v, pattern, 0.25), qkv, grad, torch.float64)
    assert max(_max_errors(ours, ref)) < 2e-5


def test_rolling_cache_decodes_through_the_kernel():
    """The rolling cache hands the kernel one query against its window of keys, each step."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(3))
    cache = RollingKVCache(1, 2, 5, 16)
    for t in range(12):
        k_ctx, v_ctx = cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        out = sliding_window_attention(q[:, :, t : t + 1], k_ctx, v_ctx, cache.attention_window, backend="triton")
        ref = dense_attention(q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], AttentionPattern(4, 0), 0.25)
        assert float((out[:, :, 0] - ref[:, :, t]).abs().max()) < 2e-5


@pytest.mark.parametrize("pattern", [AttentionPattern(7, 3), AttentionPattern(
    4, 2, dilation=(1, 3), sinks=2, global_tokens=global_mask(torch.tensor([10, 44]), 1, 45, "cpu"))], ids=["band", "features"])
def test_previous_variant_still_exact(pattern):
    """The three-loop, untransposed kernel, kept selectable until a GPU has timed both."""
    qkv, grad = _inputs(1, 2, 1, 45, 45, 16, seed=2)
    ref = _run(lambda q, k, v: dense_attention(q, k, v, pattern, 0.25), qkv, grad, torch.float64)
    for variant in tk.VARIANTS:
        ours = _run(lambda q, k, v: tk.triton_attention(q, k, v, pattern, 0.25, variant=variant), qkv, grad,
                    torch.float32)
        assert max(_max_errors(ours, ref)) < 2e-5, variant
    with pytest.raises(ValueError, match="variant must be one of"):
        tk.triton_attention(*qkv, pattern, 0.25, variant="fastest")


def test_tma_descriptor_path_matches_pointer_loads():
    """The Hopper path loads band tiles through TMA descriptors (zero-filled past the rows); the
    interpreter runs it too. fp16 (descriptors need 16-byte strides), fewer queries than keys."""
    pattern = AttentionPattern(6, 1, sinks=2, global_tokens=global_mask(torch.tensor([5, 33]), 1, 40, "cpu"))
    qkv, grad = _inputs(1, 2, 1, 27, 40, 16, seed=5)
    ref = _run(lambda q, k, v: dense_attention(q, k, v, pattern, 0.25), qkv, grad, torch.float64)
    peer = _run(lambda q, k, v: dense_attention(q, k, v, pattern, 0.25), qkv, grad, torch.float16)
    runs = {tma: _run(lambda q, k, v: tk.triton_attention(q, k, v, pattern, 0.25, tma=tma), qkv, grad,
                      torch.float16) for tma in (True, False)}
    assert _max_errors(runs[True], runs[False]) == [0.0] * 4  # the same arithmetic on the same tiles
    for e_ours, e_peer, factor in zip(_max_errors(runs[True], ref), _max_errors(peer, ref), [2, 3, 3, 3]):
        assert e_ours <= factor * e_peer + 1e-4
    q = qkv[0].half()
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)  # 2 bytes off 16-byte alignment
    band = AttentionPattern(6, 1)
    assert tk.launch.Prepared(q, q, q, band, 0.25, tma=True).tma
    assert not tk.launch.Prepared(shifted, q, q, band, 0.25, tma=True).tma  # falls back to pointers
    assert not tk.launch.Prepared(q.float(), q.float(), q.float(), band, 0.25, tma=True).tma


def test_row_offsets_past_int32_use_64_bits():
    """k and v rows 2**27 elements apart: row 16 sits past 2**31, where int32 offsets wrap. The
    storage is 4 GiB of untouched virtual memory; only the rows written are ever resident."""
    n, d, stride = 20, 16, 2**27
    try:
        storage = torch.empty((n - 1) * stride + d, dtype=torch.float16)
    except RuntimeError as e:  # no 4 GiB of address space here
        pytest.skip(f"cannot reserve the strided storage: {e}")
    qkv, grad = _inputs(1, 1, 1, n, n, d, seed=6, dtype=torch.float16)
    big = storage.as_strided((1, 1, n, d), (0, 0, stride, 1))
    big.copy_(qkv[1])
    assert tk.launch._needs_int64(big) and not tk.launch._needs_int64(qkv[1])
    pattern = AttentionPattern(6, 0, sinks=1)
    with torch.no_grad():
        out = tk.triton_attention(qkv[0], big, big, pattern, 0.25)
        ref = tk.triton_attention(qkv[0], qkv[1], qkv[1], pattern, 0.25)
    assert torch.equal(out, ref)
    leaves = [qkv[0].clone().requires_grad_(), big.detach().requires_grad_()]
    tk.triton_attention(leaves[0], leaves[1], leaves[1], pattern, 0.25).backward(grad.half())
    ref_leaves = [qkv[0].clone().requires_grad_(), qkv[1].clone().requires_grad_()]
    tk.triton_attention(ref_leaves[0], ref_leaves[1], ref_leaves[1], pattern, 0.25).backward(grad.half())
    for a, b in zip(leaves, ref_leaves):
        assert torch.equal(a.grad, b.grad)


def test_sink_and_global_work_split_into_chunks_is_exact():
    """Longer than one chunk (512 positions): the full rows of global queries and the columns of
    sink and global keys run as several programs whose partial results are added up."""
    n = 530
    assert tk.tilemap.chunk_size(n, 3, 0) < n
    pattern = AttentionPattern(3, 0, sinks=2, global_tokens=global_mask(torch.tensor([7, 300, 529]), 1, n, "cpu"))
    qkv, grad = _inputs(1, 1, 1, n, n, 16, seed=7)
    ours = _run(lambda q, k, v: tk.triton_attention(q, k, v, pattern, 0.25, blocks=(64, 64)), qkv, grad,
                torch.float32)
    ref = _run(lambda q, k, v: dense_attention(q, k, v, pattern, 0.25), qkv, grad, torch.float64)
    assert max(_max_errors(ours, ref)) < 2e-5


@pytest.mark.parametrize("kind", ["fwd", "dkdv"])
def test_no_program_walks_much_more_than_the_median(kind):
    """At N = 32k with 64 x 128 tiles, window (256, 0), 4 sinks and 2 global tokens, the busiest
    program walks at most 4x the median (before the split one program walked n / BLOCK_N = 512 tiles)."""
    n = 32768
    pattern = AttentionPattern(256, 0, sinks=4, global_tokens=global_mask(torch.tensor([100, 20000]), 1, n, "cpu"))
    most, median = tk.load_balance(n, pattern, 64, 128, kind)
    assert most <= 4 * median, (most, median)
