"""The band backends ("blocked", "chunked") equal the dense and loop oracles on awkward sizes and windows.

Backend-specific checks (block sizes, chunks and skew, custom backward) stay in test_blocked.py
and test_chunked.py; what both backends must pass alike lives here.
"""

import pytest
import torch

import swa_lib

BACKENDS = ["blocked", "chunked"]
SIZES = [1, 7, 97, 113]
# one awkward window per backend: for "blocked" a band longer than a block and not a multiple of it
EXTRA_WINDOW = {"blocked": (70, 1), "chunked": (10, 1)}


def windows_for(backend, n):
    """The foundation's awkward windows, windows larger than n, and the backend's extra one."""
    return [(0, 0), (1, 0), (3, 2), (n, n), (n, 0), (0, n + 5), EXTRA_WINDOW[backend]]


def assert_equals_oracle(q, k, v, backend, oracle):
    """backend == oracle at 1e-12 on every window of windows_for(backend, N)."""
    for window in windows_for(backend, k.shape[2]):
        out = swa_lib.sliding_window_attention(q, k, v, window, backend=backend)
        ref = swa_lib.sliding_window_attention(q, k, v, window, backend=oracle)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_forward_equals_dense(backend, n, make_qkv):
    assert_equals_oracle(*make_qkv(2, 3, n, 16, seed=n), backend, "dense")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [7, 23])
def test_forward_equals_loop_oracle(backend, n, make_qkv):
    assert_equals_oracle(*make_qkv(1, 2, n, 4, seed=n), backend, "loop")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Transposed q/k and a strided v give what their contiguous copies give through dense."""
    base = torch.randn(1, 97, 3, 16, dtype=torch.float64)  # (B, N, H, D) layout, transposed below
    q, k = base.transpose(1, 2), (2 * base).transpose(1, 2)
    v = torch.randn(1, 3, 97, 32, dtype=torch.float64)[..., ::2]  # strided last dim
    assert not (q.is_contiguous() or v.is_contiguous())
    out = swa_lib.sliding_window_attention(q, k, v, (5, 7), backend=backend)
    ref = swa_lib.sliding_window_attention(q.contiguous(), k.contiguous(), v.contiguous(), (5, 7), backend="dense")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
