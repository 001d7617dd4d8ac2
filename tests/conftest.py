"""Shared fixtures and helpers for the swa_lib test suite."""

from __future__ import annotations

import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg")  # this process only; nbval kernels keep the inline backend

# Without a GPU, the suite runs Triton kernels in Triton's CPU interpreter. The choice must be
# made before anything imports triton (torch.compile, FlexAttention and transformers may), so it
# is made here, once, for the whole test session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _random_qkv(b=1, h=2, n=7, d=8, *, h_kv=None, n_q=None, d_v=None, dtype=torch.float64, seed=0,
                requires_grad=False):
    """Random q, k, v of shape (B, H, N, D) (k/v with H_kv heads), seeded."""
    gen = torch.Generator().manual_seed(seed)
    h_kv = h if h_kv is None else h_kv
    n_q = n if n_q is None else n_q
    d_v = d if d_v is None else d_v
    q = torch.randn(b, h, n_q, d, generator=gen, dtype=dtype)
    k = torch.randn(b, h_kv, n, d, generator=gen, dtype=dtype)
    v = torch.randn(b, h_kv, n, d_v, generator=gen, dtype=dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def _global_sets(n):
    """Named global-token sets for length n: none, start, middle, end, all, and three mixtures."""
    return {
        "none": [],
        "start": [0],
        "middle": [n // 2],
        "end": [n - 1],
        "start+end": [0, n - 1],
        "mixed": sorted({0, n // 3, n - 1}),
        "scattered": sorted({1, n // 3, n - 2} & set(range(n))),
        "all": list(range(n)),
    }


# The fixtures hand out the factories themselves. Session scope: a factory holds no state, and
# hypothesis refuses function-scoped fixtures in @given tests (they would not be reset between
# its examples).
@pytest.fixture(scope="session")
def make_qkv():
    """``make_qkv(b, h, n, d, *, h_kv, n_q, d_v, dtype, seed, requires_grad) -> (q, k, v)``."""
    return _random_qkv


@pytest.fixture(scope="session")
def global_sets():
    """``global_sets(n) -> {name: positions}``: none, start, middle, end, all and mixtures."""
    return _global_sets


def _assert_same_gradients(got, want, inputs, *, rtol=1e-10, atol=1e-10):
    """The gradients w.r.t. ``inputs`` of two computations agree: ``got`` and ``want`` are
    tuples of outputs (e.g. ``(out, lse)``), each weighted by the same random tensor."""
    weights = [torch.randn_like(t) for t in got]
    grads_got = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, weights)), inputs)
    grads_want = torch.autograd.grad(sum((t * w).sum() for t, w in zip(want, weights)), inputs)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.fixture(scope="session")
def assert_same_gradients():
    """``assert_same_gradients((out, lse), (ref, ref_lse), (q, k, v))``: their gradients agree."""
    return _assert_same_gradients
