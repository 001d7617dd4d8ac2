"""The "chunked" backend (Longformer's sliding chunks + skew) equals the oracles; its pieces are checked one by one."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import swa_lib
from swa_lib.backends.chunked import (
    band_from_chunks,
    chunk,
    chunked_band_attention,
    chunks_from_band,
    skew,
    sliding_chunks_scores,
    sliding_chunks_values,
    unskew,
)
from swa_lib.backends.dense import expand_kv

BACKEND = "chunked"
# forward against dense and the loop oracle, and non-contiguous inputs: test_backends_agree.py


def dense_band(q, k, w):
    """band[i, t] = q_i . k_{i-w+t} read off the dense S = Q K^T (0 outside the sequence)."""
    s = q @ k.transpose(-1, -2)  # (BH, n, n)
    n = q.shape[1]
    band = torch.zeros(q.shape[0], n, 2 * w + 1, dtype=q.dtype)
    for i in range(n):
        for t in range(2 * w + 1):
            j = i - w + t
            if 0 <= j < n:
                band[:, i, t] = s[:, i, j]
    return band


def test_chunks_are_a_strided_view():
    x = torch.arange(8 * 2, dtype=torch.float64).reshape(1, 8, 2)
    c = chunk(x, 2)
    assert c.shape == (1, 3, 4, 2)
    assert c.data_ptr() == x.data_ptr() and c.stride() == (16, 4, 2, 1)  # no copy
    for ci in range(3):
        torch.testing.assert_close(c[0, ci], x[0, 2 * ci : 2 * ci + 4])
    with pytest.raises(ValueError, match="multiple of w"):
        chunk(torch.zeros(1, 7, 2), 2)


@pytest.mark.parametrize("w", [1, 2, 3, 5])
def test_skew_moves_diagonals_to_columns_and_unskew_inverts_it(w):
    a = torch.randn(2, 3, 2 * w, 2 * w, dtype=torch.float64)
    s = skew(a, w)
    assert s.shape == (2, 3, 2 * w, 2 * w + 1)
    for x in range(2 * w):
        for t in range(2 * w + 1):
            y = x + t - w
            want = a[..., x, y] if 0 <= y < 2 * w else torch.zeros(2, 3, dtype=torch.float64)
            torch.testing.assert_close(s[..., x, t], want)
    # unskew recovers every entry the band keeps (|x - y| <= w) and zeros the corners
    x, y = torch.arange(2 * w)[:, None], torch.arange(2 * w)[None, :]
    torch.testing.assert_close(unskew(s, w), a * ((x - y).abs() <= w))


@pytest.mark.parametrize("n,w", [(8, 2), (12, 3), (10, 5), (6, 1), (16, 4)])
def test_band_of_scores_equals_dense_band(n, w):
    """The 8-token example of chapter 5 and friends: chunks + skew give exactly the band of Q K^T."""
    gen = torch.Generator().manual_seed(n)
    q, k = torch.randn(2, n, 3, generator=gen, dtype=torch.float64), torch.randn(2, n, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(sliding_chunks_scores(q, k, w), dense_band(q, k, w), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("n,w", [(8, 2), (12, 3), (16, 4)])
def test_values_step_equals_dense_product(n, w):
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(2, n, 2 * w + 1, generator=gen, dtype=torch.float64)
    v = torch.randn(2, n, 3, generator=gen, dtype=torch.float64)
    dense = torch.zeros(2, n, n, dtype=torch.float64)
    for i in range(n):
        for t in range(2 * w + 1):
            if 0 <= i - w + t < n:
                dense[:, i, i - w + t] = p[:, i, t]
    torch.testing.assert_close(sliding_chunks_values(p, v, w), dense @ v, rtol=1e-13, atol=1e-13)
    # every band entry goes to exactly one chunk and comes back from it
    torch.testing.assert_close(band_from_chunks(chunks_from_band(p, w), w), p)


@pytest.mark.parametrize("window", [(0, 0), (1, 0), (3, 2), (9, 9), (0, 6)])
def test_gradients_equal_dense(window, make_qkv, assert_same_gradients):
    q, k, v = make_qkv(2, 4, 37, 5, h_kv=2, d_v=3, seed=3, requires_grad=True)
    out, lse = chunked_band_attention(q, k, v, *window, 0.4)
    ref = swa_lib.dense_attention(q, k, v, swa_lib.AttentionPattern(*window), 0.4)
    mask = swa_lib.AttentionPattern(*window).mask(37)
    ref_lse = torch.logsumexp((q @ expand_kv(k, 4).transpose(-1, -2) * 0.4).masked_fill(~mask, float("-inf")), -1)
    assert_same_gradients((out, lse), (ref, ref_lse), (q, k, v))


@pytest.mark.parametrize("window", [(0, 0), (2, 1), (4, 4)])
def test_gradcheck(window, make_qkv):
    q, k, v = make_qkv(1, 2, 9, 3, h_kv=1, requires_grad=True, seed=1)
    fn = lambda q, k, v: swa_lib.sliding_window_attention(q, k, v, window, backend=BACKEND)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_fewer_queries_than_keys_and_gqa(make_qkv):
    q, k, v = make_qkv(2, 6, 50, 8, h_kv=3, n_q=13, seed=5)
    for window in [(4, 0), (4, 4), (60, 2)]:
        out = swa_lib.sliding_window_attention(q, k, v, window, backend=BACKEND)
        ref = swa_lib.sliding_window_attention(q, k, v, window, backend="dense")
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 60), n_q=st.integers(1, 60), left=st.integers(0, 70), right=st.integers(0, 70))
def test_property_equals_dense(n, n_q, left, right, make_qkv):
    n_q = min(n_q, n)
    q, k, v = make_qkv(1, 2, n, 3, n_q=n_q, seed=n + 7 * left)
    out = swa_lib.sliding_window_attention(q, k, v, (left, right), backend=BACKEND)
    ref = swa_lib.sliding_window_attention(q, k, v, (left, right), backend="dense")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_skewed_halves_are_the_skew_read_in_place():
    """The strided views of the inference path hold exactly what skew + band_from_chunks
    assemble (the band of the dense scores), with no copy."""
    from swa_lib.backends.chunked_slabs import skewed_halves

    w, n = 3, 18
    q, k = torch.randn(1, n, 4, dtype=torch.float64), torch.randn(1, n, 4, dtype=torch.float64)
    scores = chunk(q, w) @ chunk(k, w).transpose(-1, -2)  # (1, C, 2w, 2w), C = n / w - 1
    band = band_from_chunks(skew(scores, w), w)[0]  # (n, 2w + 1)
    blocks = scores.shape[1] - 1  # blocks 1 .. C - 1 have both chunks they read from
    left, right = skewed_halves(scores[0].contiguous(), w, blocks)
    inner = band[w : (blocks + 1) * w].view(blocks, w, 2 * w + 1)
    assert torch.equal(left, inner[:, :, :w]) and torch.equal(right, inner[:, :, w:])


@pytest.fixture
def shared_work(monkeypatch):
    """Small pieces shared among three workers (the path of long sequences on many cores)."""
    from swa_lib.backends import bands

    monkeypatch.setattr(bands, "SLAB_SCORES", 16)
    monkeypatch.setattr("swa_lib.backends.chunked_slabs.SLAB_SCORES", 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("n, n_q, window, h_kv, d_v", [
    (97, 97, (5, 3), 2, 3),
    (113, 40, (0, 17), 1, 5),
    (50, 50, (60, 60), 4, 4),
    (64, 1, (8, 0), 2, 4),
    (48, 48, (4, 4), 4, 2),
])
def test_inference_path_equals_the_step_by_step_one(n, n_q, window, h_kv, d_v, shared, make_qkv, request):
    """Without gradients chunked_band_attention runs slab by slab (chunked_slabs); with them,
    one step per function under autograd. Both give the same out and lse."""
    if shared:
        request.getfixturevalue("shared_work")
    q, k, v = make_qkv(2, 4, n, 6, h_kv=h_kv, n_q=n_q, d_v=d_v, seed=n, requires_grad=True)
    out, lse = chunked_band_attention(q, k, v, *window, 0.4)  # autograd path
    assert out.requires_grad
    with torch.no_grad():
        fast_out, fast_lse = chunked_band_attention(q, k, v, *window, 0.4)
    torch.testing.assert_close(fast_out, out.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_lse, lse.detach(), rtol=1e-12, atol=1e-12)
