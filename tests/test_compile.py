"""torch.compile: swa_lib runs inside a compiled graph as one custom operator, without breaks."""

import pytest
import torch

import swa_lib
from swa_lib.backends import ops


def _inputs(n=70, heads=4, heads_kv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, n, d, generator=g, requires_grad=True) for h in (heads, heads_kv, heads_kv)]


def _global(n=70):
    glob = torch.zeros(2, n, dtype=torch.bool)
    glob[0, [3, n // 2]] = True
    glob[1, n - 1] = True
    return glob


FEATURES = {
    "causal": dict(window=(8, 0)),
    "symmetric": dict(window=(5, 3)),
    "dilation per head": dict(window=(12, 0), dilation=(1, 2, 1, 3)),
    "sinks": dict(window=(6, 0), sinks=2),
    "global tokens": dict(window=(4, 4), global_tokens=_global()),
}


def _call(q, k, v, *, backend, **kw):
    return swa_lib.sliding_window_attention(q, k, v, backend=backend, **kw)


@pytest.mark.parametrize("backend", ["blocked", "chunked", "dense"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_no_graph_breaks_and_the_same_numbers(feature, backend):
    """Dynamo captures the whole call as one graph (the backend hidden in the operator), and
    the captured graph gives the eager forward and gradients."""
    kw = FEATURES[feature]

    def f(q, k, v):
        return _call(q, k, v, backend=backend, **kw).square().sum()

    q, k, v = _inputs()
    explained = torch._dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    q2, k2, v2 = _inputs()
    loss_ref = f(q2, k2, v2)
    grads_ref = torch.autograd.grad(loss_ref, (q2, k2, v2))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inductor_fullgraph_forward_and_backward_in_a_model():
    """The default compiler (inductor) compiles a small attention layer end to end."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 96)

    def layer(x):
        q, k, v = proj(x).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
        return swa_lib.sliding_window_attention(q, k, v, (16, 0)).sum()

    x = torch.randn(2, 100, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)  # inductor
    # compile afresh: a cached graph from an older version of the operator would be reused
    import torch._functorch.config as functorch_config

    fresh = {"enable_autograd_cache": False} if hasattr(functorch_config, "enable_autograd_cache") else {}
    with torch._inductor.config.patch(fx_graph_cache=False), functorch_config.patch(**fresh):
        loss = compiled(x)
        (gx,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_()
    loss_ref = layer(x2)
    (gx_ref,) = torch.autograd.grad(loss_ref, x2)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)


def test_the_operator_passes_torch_library_opcheck():
    """Schema, fake (meta) implementation and autograd registration are consistent."""
    q, k, v = _inputs(n=20)
    cases = [
        (q, k, v, 4, 0, [1], 0, None, 0.25, "blocked"),
        (q, k, v, 6, 2, [1, 2, 1, 3], 2, _global(20), 0.25, "blocked"),
        (q, k, v, 3, 3, [1], 1, None, 0.25, "chunked"),
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.swa_lib.attention.default, args)


def test_the_operator_is_only_used_when_compiling(monkeypatch):
    """Eager calls go straight to the backend: no extra dispatch, no recomputing backward."""
    q, k, v = _inputs(n=20)

    def refuse(*args, **kwargs):
        raise AssertionError("the custom operator was called in eager mode")

    monkeypatch.setattr(ops, "call_op", refuse)
    out = swa_lib.sliding_window_attention(q, k, v, (4, 0), backend="blocked")
    expected = swa_lib.blocked_attention(q, k, v, swa_lib.AttentionPattern(4, 0), 16**-0.5)
    assert torch.equal(out, expected)
    assert "swa_lib" not in type(out.grad_fn).__name__
