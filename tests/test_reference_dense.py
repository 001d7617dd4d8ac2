"""Loop oracle == dense == SDPA with the band mask, forward and gradients, on awkward sizes."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import swa_lib
from swa_lib.backends.dense import masked_softmax

SIZES = [1, 7, 97, 113]


def windows_for(n):
    return [(0, 0), (1, 0), (3, 2), (n, n), (n, 0)]


def sdpa_peer(q, k, v, window):
    """PyTorch's own attention with our band mask: the external peer."""
    mask = swa_lib.window_mask(k.shape[2], window)[-q.shape[2]:]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("n", SIZES)
def test_dense_equals_sdpa_peer(n, make_qkv):
    q, k, v = make_qkv(2, 3, n, 16, seed=n)
    for window in windows_for(n):
        out = swa_lib.sliding_window_attention(q, k, v, window, backend="dense")
        torch.testing.assert_close(out, sdpa_peer(q, k, v, window), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 7, 23])
def test_loop_equals_dense_and_sdpa(n, make_qkv):
    q, k, v = make_qkv(2, 2, n, 4, seed=n)
    for window in windows_for(n):
        loop = swa_lib.sliding_window_attention(q, k, v, window, backend="loop")
        dense = swa_lib.sliding_window_attention(q, k, v, window, backend="dense")
        torch.testing.assert_close(loop, dense, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loop, sdpa_peer(q, k, v, window), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [97, 113])
def test_loop_equals_dense_long(n, make_qkv):
    # the loop is slow: one batch, one head, two windows
    q, k, v = make_qkv(1, 1, n, 4, seed=n)
    for window in [(3, 2), (n, 0)]:
        loop = swa_lib.sliding_window_attention(q, k, v, window, backend="loop")
        dense = swa_lib.sliding_window_attention(q, k, v, window, backend="dense")
        torch.testing.assert_close(loop, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["loop", "dense", "sdpa"])
@pytest.mark.parametrize("window", [(0, 0), (1, 0), (3, 2), (7, 7)])
def test_gradcheck(backend, window, make_qkv):
    q, k, v = make_qkv(1, 2, 6, 3, h_kv=1, requires_grad=True, seed=1)
    fn = lambda q, k, v: swa_lib.sliding_window_attention(q, k, v, window, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("n", [7, 97])
def test_gradients_dense_vs_sdpa_peer(n, make_qkv):
    q, k, v = make_qkv(1, 2, n, 8, requires_grad=True, seed=3)
    w = torch.randn(1, 2, n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for window in [(3, 2), (n, 0)]:
        g1 = torch.autograd.grad((swa_lib.sliding_window_attention(q, k, v, window, backend="dense") * w).sum(), (q, k, v))
        g2 = torch.autograd.grad((sdpa_peer(q, k, v, window) * w).sum(), (q, k, v))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_loop_gradients_match_dense(make_qkv):
    q, k, v = make_qkv(1, 2, 9, 4, h_kv=1, requires_grad=True, seed=5)
    kwargs = dict(dilation=[1, 2], sinks=1, global_tokens=torch.tensor([4]))
    g1 = torch.autograd.grad(swa_lib.sliding_window_attention(q, k, v, (2, 1), backend="loop", **kwargs).sum(), (q, k, v))
    g2 = torch.autograd.grad(swa_lib.sliding_window_attention(q, k, v, (2, 1), backend="dense", **kwargs).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_q", [1, 3, 7])
def test_fewer_queries_than_keys_are_bottom_aligned(n_q, make_qkv):
    q, k, v = make_qkv(1, 2, 7, 4, n_q=n_q, seed=6)
    qf, _, _ = make_qkv(1, 2, 7, 4, seed=7)
    qf[:, :, 7 - n_q:] = q  # the same queries, at the end of a full-length query tensor
    full = swa_lib.sliding_window_attention(qf, k, v, (2, 0), backend="dense")
    for backend in ("loop", "dense", "sdpa"):
        part = swa_lib.sliding_window_attention(q, k, v, (2, 0), backend=backend)
        torch.testing.assert_close(part, full[:, :, 7 - n_q:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_q, n_k", [(9, 9), (1, 9), (4, 9), (1, 1)])
def test_sdpa_mask_free_shortcuts_match_dense(n_q, n_k, make_qkv):
    """sdpa skips the mask when the window covers every key (plain call) or is exactly causal
    over equal lengths (is_causal); windows one short of each threshold must still be masked."""
    q, k, v = make_qkv(2, 4, n_k, 8, h_kv=2, n_q=n_q, requires_grad=True, seed=n_q + n_k)
    windows = [(n_k - 1, n_q - 1), (n_k - 1, 0), (n_k + 5, 0), (n_k, n_q + 3)]
    windows += [(n_k - 2, 0), (n_k - 1, n_q - 2)] if n_k > 1 and n_q > 1 else []
    for window in windows:
        dense = swa_lib.sliding_window_attention(q, k, v, window, backend="dense")
        sdpa = swa_lib.sliding_window_attention(q, k, v, window, backend="sdpa")
        torch.testing.assert_close(sdpa, dense, rtol=1e-12, atol=1e-12, msg=f"window {window}")
        g_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
        g_sdpa = torch.autograd.grad(sdpa.square().sum(), (q, k, v))
        for a, b in zip(g_sdpa, g_dense):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"gradient, window {window}")


def test_gqa_equals_repeated_heads(make_qkv):
    q, k, v = make_qkv(2, 4, 11, 4, h_kv=2, seed=8)
    out = swa_lib.sliding_window_attention(q, k, v, (3, 1), backend="dense")
    rep = swa_lib.sliding_window_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), (3, 1), backend="loop"
    )
    torch.testing.assert_close(out, rep, rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs(make_qkv):
    q, k, v = make_qkv(2, 3, 13, 4, seed=9)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    for backend in ("loop", "dense", "sdpa"):
        torch.testing.assert_close(
            swa_lib.sliding_window_attention(qt, kt, vt, (2, 2), backend=backend),
            swa_lib.sliding_window_attention(q, k, v, (2, 2), backend="dense"),
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_error_is_within_pytorch_own(dtype, make_qkv):
    """The book's tolerance rule (AUTHORING.md): at most 2x the error PyTorch's SDPA makes in the
    same dtype, plus 4 units in the last place of the output's magnitude (one element rounded the
    other way on another CPU must not fail the test)."""
    q, k, v = make_qkv(1, 2, 64, 32, seed=10)
    window = (8, 8)
    exact = sdpa_peer(q, k, v, window)
    ql, kl, vl = (x.to(dtype) for x in (q, k, v))
    ours = swa_lib.sliding_window_attention(ql, kl, vl, window, backend="dense").double()
    theirs = sdpa_peer(ql, kl, vl, window).double()
    assert ours.dtype == torch.float64
    err_ours = (ours - exact).abs().max().item()
    err_torch = (theirs - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert err_ours <= 2 * err_torch + 4 * ulp, (err_ours, err_torch, ulp)


# -- properties ---------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), extra=st.integers(0, 10), d=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_window_covering_everything_is_full_attention(n, extra, d, seed, make_qkv):
    q, k, v = make_qkv(1, 2, n, d, seed=seed)
    full = F.scaled_dot_product_attention(q, k, v)
    out = swa_lib.sliding_window_attention(q, k, v, (n + extra, n + extra), backend="dense")
    torch.testing.assert_close(out, full)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_zero_window_returns_v(n, d, seed, make_qkv):
    q, k, v = make_qkv(2, 2, n, d, seed=seed)
    for backend in ("dense", "sdpa"):
        torch.testing.assert_close(swa_lib.sliding_window_attention(q, k, v, (0, 0), backend=backend), v)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_full_left_window_is_causal_sdpa(n, d, seed, make_qkv):
    q, k, v = make_qkv(1, 2, n, d, seed=seed)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(swa_lib.sliding_window_attention(q, k, v, (n, 0), backend="dense"), causal)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), left=st.integers(0, 30), right=st.integers(0, 30), seed=st.integers(0, 10_000))
def test_attention_weights_rows_sum_to_one(n, left, right, seed, make_qkv):
    # attention applied to v = identity gives back the weight matrix itself
    q, k, _ = make_qkv(1, 1, n, 4, seed=seed)
    eye = torch.eye(n, dtype=q.dtype)[None, None]
    weights = swa_lib.sliding_window_attention(q, k, eye, (left, right), backend="dense")
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 1, n, dtype=q.dtype))
    assert (weights[0, 0][~swa_lib.window_mask(n, (left, right))] == 0).all()


def test_empty_rows_give_zeros_not_nan():
    scores = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    w = masked_softmax(scores, mask)
    assert torch.equal(w[1], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(w[[0, 2]].sum(-1), torch.ones(2, dtype=torch.float64))
    (g,) = torch.autograd.grad((w * torch.arange(4.0, dtype=torch.float64)).sum(), scores)
    assert torch.isfinite(g).all() and torch.equal(g[1], torch.zeros(4, dtype=torch.float64))
