"""Global tokens, dilation and sinks in the band backends (swa_lib.backends.extensions) equal the oracles.

Global tokens at the start, middle, end, none and all; dilation 1..4 and per head; with GQA,
fewer queries than keys and a batch whose elements have different global tokens. Forward against
the loop oracle (small sizes) and dense attention; gradients against autograd through dense.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import swa_lib

BACKENDS = ["blocked", "chunked"]
N = 17


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_tokens_equal_loop_oracle(backend, make_qkv, global_sets):
    for where, positions in global_sets(N).items():
        q, k, v = make_qkv(1, 2, N, 4, seed=len(where))
        g = positions or None
        for window in [(1, 1), (3, 0)]:
            out = swa_lib.sliding_window_attention(q, k, v, window, global_tokens=g, backend=backend)
            ref = swa_lib.sliding_window_attention(q, k, v, window, global_tokens=g, backend="loop")
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=f"{where} {window}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dilation", [1, 2, 3, 4, (1, 2, 3, 4)])
def test_dilation_equals_loop_oracle(backend, dilation, make_qkv):
    q, k, v = make_qkv(1, 4, N, 4, h_kv=2, seed=5)
    for window in [(4, 4), (6, 0), (0, 5)]:
        out = swa_lib.sliding_window_attention(q, k, v, window, dilation=dilation, backend=backend)
        ref = swa_lib.sliding_window_attention(q, k, v, window, dilation=dilation, backend="loop")
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["start", "middle", "end", "mixed", "all"])
@pytest.mark.parametrize("dilation", [2, (1, 2, 3, 4)])
def test_global_and_dilation_gradients_equal_dense(backend, where, dilation, make_qkv, global_sets,
                                                   assert_same_gradients):
    q, k, v = make_qkv(2, 4, 41, 5, h_kv=2, d_v=3, seed=2, requires_grad=True)
    g = torch.zeros(2, 41, dtype=torch.bool)
    g[0, global_sets(41)[where]] = True
    g[1, [7, 8]] = True  # the batch elements differ
    kwargs = dict(global_tokens=g, dilation=dilation, sinks=1 if where == "middle" else 0)
    out = swa_lib.sliding_window_attention(q, k, v, (6, 3), backend=backend, **kwargs)
    ref = swa_lib.sliding_window_attention(q, k, v, (6, 3), backend="dense", **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert_same_gradients((out,), (ref,), (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_global_dilation_sinks(backend, make_qkv):
    q, k, v = make_qkv(1, 2, 11, 3, h_kv=1, requires_grad=True, seed=4)
    fn = lambda q, k, v: swa_lib.sliding_window_attention(  # noqa: E731
        q, k, v, (2, 1), global_tokens=[5], dilation=(1, 2), sinks=1, backend=backend
    )
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_queries_than_keys_with_everything(backend, make_qkv):
    q, k, v = make_qkv(2, 4, 40, 4, h_kv=2, n_q=9, seed=6)
    for kwargs in [dict(sinks=2), dict(global_tokens=[0, 35]), dict(dilation=(1, 2, 3, 2), global_tokens=[3], sinks=1)]:
        out = swa_lib.sliding_window_attention(q, k, v, (5, 0), backend=backend, **kwargs)
        ref = swa_lib.sliding_window_attention(q, k, v, (5, 0), backend="dense", **kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 40),
    left=st.integers(0, 12),
    right=st.integers(0, 12),
    dilation=st.integers(1, 4),
    sinks=st.integers(0, 3),
    globals_=st.lists(st.integers(0, 39), max_size=4),
)
def test_property_blocked_equals_dense(n, left, right, dilation, sinks, globals_, make_qkv):
    q, k, v = make_qkv(1, 2, n, 3, seed=n)
    g = sorted({x for x in globals_ if x < n}) or None
    kwargs = dict(dilation=dilation, sinks=sinks, global_tokens=g)
    out = swa_lib.sliding_window_attention(q, k, v, (left, right), backend="blocked", **kwargs)
    ref = swa_lib.sliding_window_attention(q, k, v, (left, right), backend="dense", **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
