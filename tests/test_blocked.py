"""The "blocked" backend (query blocks x one key band each) equals the oracles, forward and gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import swa_lib
from swa_lib.backends.blocked import band_attention
from swa_lib.backends.dense import expand_kv

BACKEND = "blocked"
# forward against dense and the loop oracle, and non-contiguous inputs: test_backends_agree.py


def dense_lse(q, k, window, scale):
    """Log-sum-exp of each row over its visible keys, the dense way (the oracle for lse)."""
    mask = swa_lib.AttentionPattern(*window).mask(q.shape[2], k.shape[2])
    s = q @ expand_kv(k, q.shape[1]).transpose(-1, -2) * scale
    return torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)


@pytest.mark.parametrize("block", [1, 4, 16, 64])
@pytest.mark.parametrize("n", [97, 113])
def test_block_sizes_and_lse(block, n, make_qkv):
    """Any block size (n not a multiple of it, bands longer than n) gives the same out and lse."""
    q, k, v = make_qkv(1, 2, n, 8, seed=block)
    for window in [(5, 3), (0, 17), (40, 0), (2 * n, 2 * n)]:
        out, lse = band_attention(q, k, v, *window, 0.3, block_size=block)
        ref = swa_lib.dense_attention(q, k, v, swa_lib.AttentionPattern(*window), 0.3)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, dense_lse(q, k, window, 0.3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [(0, 0), (1, 0), (3, 2), (9, 9), (40, 40)])
def test_gradients_equal_dense(window, make_qkv, assert_same_gradients):
    """Gradients of out and of lse (the custom backward) equal autograd through dense attention."""
    q, k, v = make_qkv(2, 4, 37, 5, h_kv=2, d_v=3, seed=3, requires_grad=True)
    out, lse = band_attention(q, k, v, *window, 0.4, block_size=8)
    ref = swa_lib.dense_attention(q, k, v, swa_lib.AttentionPattern(*window), 0.4)
    ref_lse = dense_lse(q, k, window, 0.4)
    assert_same_gradients((out, lse), (ref, ref_lse), (q, k, v))


@pytest.mark.parametrize("window", [(0, 0), (2, 1), (6, 6)])
def test_gradcheck(window, make_qkv):
    q, k, v = make_qkv(1, 2, 9, 3, h_kv=1, requires_grad=True, seed=1)
    fn = lambda q, k, v: band_attention(q, k, v, *window, 0.5, block_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_fewer_queries_than_keys_and_gqa(make_qkv, assert_same_gradients):
    q, k, v = make_qkv(2, 6, 50, 8, h_kv=3, n_q=13, seed=5, requires_grad=True)
    for window in [(4, 0), (4, 4), (60, 2)]:
        out = swa_lib.sliding_window_attention(q, k, v, window, backend=BACKEND)
        ref = swa_lib.sliding_window_attention(q, k, v, window, backend="dense")
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        assert_same_gradients((out,), (ref,), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_against_float64(dtype, make_qkv):
    """fp32/bf16 (computed in fp32) stay within a small multiple of dense attention's own error."""
    q, k, v = make_qkv(1, 2, 200, 32, seed=7)
    ref = swa_lib.dense_attention(q, k, v, swa_lib.AttentionPattern(16, 16), 32**-0.5)
    low = [t.to(dtype) for t in (q, k, v)]
    out = swa_lib.sliding_window_attention(*low, (16, 16), backend=BACKEND)
    dense = swa_lib.sliding_window_attention(*low, (16, 16), backend="dense")
    assert out.dtype == dtype
    err, err_dense = (out.double() - ref).abs().max(), (dense.double() - ref).abs().max()
    ulp = torch.finfo(dtype).eps * ref.abs().max()  # AUTHORING.md's rule: 2x dense + 4 ulp
    assert err <= 2 * err_dense + 4 * ulp, (err, err_dense, ulp)


def test_auto_prefers_blocked_on_cpu(make_qkv):
    q, k, v = make_qkv(1, 1, 64, 4)
    pattern = swa_lib.make_pattern((4, 4))
    assert swa_lib.backends.choose_backend("auto", q, k, pattern).name == "blocked"


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60),
    n_q=st.integers(1, 60),
    left=st.integers(0, 70),
    right=st.integers(0, 70),
    block=st.integers(1, 20),
    heads_kv=st.sampled_from([1, 2]),
)
def test_property_equals_dense(n, n_q, left, right, block, heads_kv, make_qkv):
    n_q = min(n_q, n)
    q, k, v = make_qkv(1, 2, n, 3, h_kv=heads_kv, n_q=n_q, seed=n + 7 * left)
    out, lse = band_attention(q, k, v, left, right, 0.7, block_size=block)
    ref = swa_lib.dense_attention(q, k, v, swa_lib.AttentionPattern(left, right), 0.7)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, dense_lse(q, k, (left, right), 0.7), rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    left=st.integers(0, 300),
    block=st.integers(1, 64),
    most=st.integers(1, 1 << 16),
    min_slabs=st.integers(0, 12),
)
def test_plan_slabs(n, left, block, most, min_slabs):
    """The slabs cover every block once, in order, edge blocks apart from interior ones; no slab
    holds more than ``slab_scores`` scores (unless one block alone does); the interior is cut
    into at least ``min_slabs`` slabs unless that would leave one with fewer than SLAB_SCORES."""
    from unittest import mock

    from swa_lib.backends import bands

    with mock.patch.object(bands, "SLAB_SCORES", 4096):
        plan = bands.make_plan(n, n, left, left, block, slab_scores=most, min_slabs=min_slabs)
    segs = plan.segments
    assert [a for a, _ in segs] == [0] + [b for _, b in segs[:-1]] and segs[-1][1] == plan.num_blocks
    assert all(a < b for a, b in segs)
    t_lo, t_hi = plan.interior
    assert all(b <= t_lo or a >= t_hi or (t_lo <= a and b <= t_hi) for a, b in segs)
    per_block = plan.block * plan.band
    assert all(b - a == 1 or (b - a) * per_block <= most for a, b in segs)
    inner = [b - a for a, b in segs if t_lo <= a and b <= t_hi]
    assert max(inner, default=0) - min(inner, default=0) <= 1  # equal, to a block
    least = max(1, 4096 // per_block)
    assert len(inner) >= min(min_slabs, sum(inner) // least)
    if len(inner) > -(-sum(inner) // max(1, most // per_block)):  # more slabs than their size asks
        assert min(inner) >= least


@pytest.mark.parametrize("min_slabs, sizes", [
    (1, [248, 248]),     # the fused forward on one thread, four heads: few, large kernel calls
    (2, [248, 248]),     # two threads: two slabs per head, four per worker
    (8, [62] * 8),       # eight threads, or one head on two
    (100, [62] * 8),     # no slab below SLAB_SCORES (60 blocks of 32 x 544 scores)
    (0, [248, 248]),     # 0 acts as 1
])
def test_plan_cuts_the_interior_for_the_workers(min_slabs, sizes):
    from swa_lib.backends import bands

    plan = bands.make_plan(16384, 16384, 256, 256, 32, slab_scores=1 << 23, min_slabs=min_slabs)
    t_lo, t_hi = plan.interior
    assert (t_lo, t_hi) == (8, 504)
    assert [b - a for a, b in plan.segments if t_lo <= a and b <= t_hi] == sizes


@pytest.fixture
def shared_work(monkeypatch):
    """Every call shared among three workers, in small slabs: many pieces per head, run in
    whatever order the threads take them (the path large calls take on a multi-core CPU).
    Only the first few edge masks fit the mask cache; the rest are built for every head."""
    from swa_lib.backends import bands, blocked

    monkeypatch.setattr(blocked, "SHARE_SCORES", 0)
    monkeypatch.setattr(bands, "SLAB_SCORES", 64)
    monkeypatch.setattr(blocked, "FUSED_SLAB_SCORES", 64)
    monkeypatch.setattr(blocked, "MASK_CACHE_SCORES", 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("n, n_q, window, h_kv, d_v", [
    (97, 97, (5, 3), 2, 3),      # interior slabs and gathered edges at both ends, GQA
    (113, 40, (0, 17), 1, 5),    # fewer queries than keys, a partial last block
    (50, 50, (60, 60), 4, 4),    # bands longer than the sequence: every block sees all keys
    (64, 1, (8, 0), 2, 4),       # one-token decode
])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "step_by_step"])
def test_shared_work_equals_dense_and_is_deterministic(n, n_q, window, h_kv, d_v, fused, make_qkv,
                                                       assert_same_gradients, shared_work, monkeypatch):
    """Out, lse and all gradients equal dense attention when the pieces run on three workers,
    on both slab paths (PyTorch's fused CPU kernel, where it applies, and the step-by-step one),
    and two runs give the same bits (the key/value gradients are added up in a fixed order)."""
    from swa_lib.backends import blocked, slabs, workers

    if fused:
        assert slabs.fused_available(torch.zeros(1, 1, dtype=torch.float64), 1)
    else:
        monkeypatch.setattr(blocked, "fused_available", lambda q, d_v: False)

    assert workers.worker_count(10) == 3
    q, k, v = make_qkv(2, 4, n, 6, h_kv=h_kv, n_q=n_q, d_v=d_v, seed=n, requires_grad=True)
    out, lse = band_attention(q, k, v, *window, 0.4, block_size=4)
    ref = swa_lib.dense_attention(q, k, v, swa_lib.AttentionPattern(*window), 0.4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, dense_lse(q, k, window, 0.4), rtol=1e-12, atol=1e-12)
    assert_same_gradients((out, lse), (ref, dense_lse(q, k, window, 0.4)), (q, k, v))  # through lse
    out, ref = band_attention(q, k, v, *window, 0.4, block_size=4)[0], swa_lib.dense_attention(
        q, k, v, swa_lib.AttentionPattern(*window), 0.4)
    assert_same_gradients((out,), (ref,), (q, k, v))  # out alone: the fused backward where it applies
    runs = []  # three runs; in each, gradients through out and lse, and through out alone
    for _ in range(3):
        o, l_ = band_attention(q, k, v, *window, 0.4, block_size=4)
        with_lse = torch.autograd.grad((o * 1.5).sum() + l_.sum(), (q, k, v), retain_graph=True)
        runs.append((*with_lse, *torch.autograd.grad((o * o).sum(), (q, k, v))))
    for grads in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], grads))
    assert torch.get_num_threads() == 3  # the caller's thread count is restored


def test_a_failing_piece_raises_and_restores_the_thread_count():
    from swa_lib.backends.workers import run_pieces

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def piece(i, scratch):
            if i == 5:
                raise ArithmeticError(f"piece {i}")

        with pytest.raises(ArithmeticError, match="piece 5"):
            run_pieces(20, piece)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_masks_are_kept_across_calls_within_their_budget(make_qkv, assert_same_gradients, monkeypatch):
    """A second call with the same geometry builds no mask (edge masks depend on the plan
    only), a mask kept under inference_mode serves a call that trains, and what is kept never
    exceeds MASK_CACHE_SCORES."""
    from swa_lib.backends import bands, blocked

    built = []
    exact = bands.Plan.exact_mask
    monkeypatch.setattr(bands.Plan, "exact_mask", lambda self, *a: built.append(a) or exact(self, *a))
    monkeypatch.setattr(blocked, "_KEPT", type(blocked._KEPT)())
    q, k, v = make_qkv(1, 3, 61, 4, seed=5, requires_grad=True)
    with torch.inference_mode():
        band_attention(q, k, v, 7, 2, 0.5, block_size=8)
    assert built
    built.clear()
    out, lse = band_attention(q, k, v, 7, 2, 0.5, block_size=8)
    assert not built
    ref = swa_lib.dense_attention(q, k, v, swa_lib.AttentionPattern(7, 2), 0.5)
    assert_same_gradients((out, lse), (ref, dense_lse(q, k, (7, 2), 0.5)), (q, k, v))

    monkeypatch.setattr(blocked, "MASK_CACHE_SCORES", 500)
    for left in range(1, 12):
        band_attention(q, k, v, left, 3, 0.5, block_size=4)
        assert sum(m.numel() for m in blocked._KEPT.values()) <= 500
    assert blocked._KEPT  # the most recent masks are still there


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_interior_slabs_view_any_layout(dtype):
    """Interior slabs take their blocks and bands as strided views of the inputs themselves: a
    batch of two, heads interleaved with positions ((B, N, H, D) memory), grouped key/value
    heads and inputs that start inside a larger tensor give what contiguous copies give through
    dense attention, forward and backward (float32 takes the fused kernel's forward)."""
    g = torch.Generator().manual_seed(11)
    n, window = 300, (20, 9)  # Bq = 32: blocks 1 .. 8 are interior
    big = torch.randn(2, n + 5, 4 + 2 + 2, 16, generator=g, dtype=dtype)[:, 5:]  # storage offset
    q, k, v = (x.transpose(1, 2) for x in (big[:, :, :4], big[:, :, 4:6], big[:, :, 6:]))
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = swa_lib.sliding_window_attention(*leaves, window, backend=BACKEND)
    ref_leaves = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    ref = swa_lib.sliding_window_attention(*ref_leaves, window, backend="dense")
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    out.backward(torch.ones_like(out))
    ref.backward(torch.ones_like(ref))
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, **tol)
