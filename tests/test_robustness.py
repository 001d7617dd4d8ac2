"""Inputs that break naive implementations: large scores in half precision."""

import pytest
import torch

import swa_lib
from swa_lib import AttentionPattern

CPU_BACKENDS = ["loop", "dense", "sdpa", "chunked", "blocked", "auto"]


def _large_qkv(dtype, n=24, d=16, seed=0):
    """q, k with norms of about 700, so q.k reaches 4.9e5 (float16 overflows at 65504) while the
    scaled logits (d ** -0.5 = 0.25) stay near 1.2e5 apart: softmax is still well defined."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, n, d, generator=gen, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True) * 700
    k = q.clone()  # every query has one key along itself: the largest score, overflowing in fp16
    v = torch.randn(1, 2, n, d, generator=gen, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("extra", ["plain", "sinks", "global"])
def test_half_precision_scores_do_not_overflow(dtype, backend, extra):
    q, k, v = _large_qkv(dtype)
    kwargs = {}
    if extra == "sinks":
        kwargs["sinks"] = 2
    elif extra == "global":
        g = torch.zeros(1, q.shape[2], dtype=torch.bool)
        g[0, [3, 17]] = True
        kwargs["global_tokens"] = g
    pattern = AttentionPattern(4, 0, **kwargs)
    out = swa_lib.sliding_window_attention(q, k, v, (4, 0), backend=backend, **kwargs)
    exact = swa_lib.loop_attention(q.double(), k.double(), v.double(), pattern, q.shape[-1] ** -0.5)
    assert out.dtype == dtype and torch.isfinite(out).all(), f"{backend}: non-finite output"
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2 * torch.finfo(dtype).eps * 8)


@pytest.mark.parametrize("kind", ["rolling", "sink", "full"])
def test_caches_keep_no_autograd_history(kind):
    """Keys that require grad must not chain every decoding step into one growing graph."""
    from swa_lib.kv_cache import FullKVCache, RollingKVCache, SinkKVCache

    make = {"rolling": lambda: RollingKVCache(1, 2, 4, 8), "sink": lambda: SinkKVCache(1, 2, 4, 8, sinks=1),
            "full": lambda: FullKVCache(1, 2, 8, initial=2)}[kind]
    cache = make()
    w = torch.randn(8, 8, requires_grad=True)
    for step in range(12):
        x = torch.randn(1, 2, 1, 8)
        k, v = x @ w, x @ w.T
        out = cache.update(k, v)
        new_k = out[0][:, :, -1:]
        assert new_k.requires_grad  # this update's keys keep their history ...
        for t in cache.tensors():  # ... the stored buffers never do
            assert not t.requires_grad and t.grad_fn is None, (step, t.grad_fn)


def test_a_backend_without_autograd_is_refused_when_only_v_needs_a_gradient(monkeypatch):
    """A gradient for v alone is still a gradient: a backend registered with autograd=False must
    not be chosen (by name it raises; "auto" passes it over), or v's gradient would be lost."""
    from swa_lib import backends

    def no_grad_fn(q, k, v, pattern, scale):
        with torch.no_grad():
            return swa_lib.dense_attention(q, k, v, pattern, scale)

    monkeypatch.setitem(backends.BACKENDS, "nograd",
                        backends.Backend("nograd", no_grad_fn, priority=10_000, autograd=False))
    q, k = torch.randn(2, 1, 2, 6, 4).unbind(0)
    v = torch.randn(1, 2, 6, 4, requires_grad=True)
    with pytest.raises(ValueError, match="does not support autograd"):
        swa_lib.sliding_window_attention(q, k, v, (2, 0), backend="nograd")
    out = swa_lib.sliding_window_attention(q, k, v, (2, 0))  # auto: passes over "nograd"
    out.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shapes", [
    ((0, 2, 5, 4), (0, 2, 5, 4), (0, 2, 5, 4)),  # empty batch
    ((1, 2, 0, 4), (1, 2, 0, 4), (1, 2, 0, 4)),  # empty sequence
    ((1, 2, 0, 4), (1, 1, 7, 4), (1, 1, 7, 4)),  # no queries against a cache of 7 keys
    ((1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 0)),  # empty value dim
], ids=["B=0", "N=0", "N_q=0", "D_v=0"])
def test_empty_inputs_give_empty_outputs_and_zero_gradients(backend, shapes):
    q, k, v = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes)
    out = swa_lib.sliding_window_attention(q, k, v, (2, 0), sinks=1, backend=backend)
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_head_dim_zero_is_rejected_with_a_message():
    q = torch.randn(1, 2, 5, 0)
    with pytest.raises(ValueError, match="head dim D of q and k must be at least 1, got D=0"):
        swa_lib.sliding_window_attention(q, q, torch.randn(1, 2, 5, 3), (2, 0))


def test_an_integer_01_mask_for_global_tokens_is_not_read_as_positions():
    q = torch.randn(2, 1, 8, 4)
    hf_mask = torch.zeros(2, 8, dtype=torch.long)  # Hugging Face's global_attention_mask format
    hf_mask[:, 3] = 1
    with pytest.raises(ValueError, match=r"pass global_tokens=mask.bool\(\)"):
        swa_lib.sliding_window_attention(q, q, q, (1, 1), global_tokens=hf_mask)
    as_bool = swa_lib.sliding_window_attention(q, q, q, (1, 1), global_tokens=hf_mask.bool())
    as_positions = swa_lib.sliding_window_attention(q, q, q, (1, 1), global_tokens=torch.tensor([3]))
    torch.testing.assert_close(as_bool, as_positions)


def test_one_cache_object_for_several_layers_is_rejected():
    from swa_lib.lab.model import ModelConfig, TinyLM

    torch.manual_seed(0)
    model = TinyLM(ModelConfig(dim=16, heads=2, heads_kv=2, windows=(4, 4, 4))).eval()
    tokens = torch.randint(0, 256, (1, 6))
    (cache,) = model.new_caches(1)[:1]
    with torch.no_grad(), pytest.raises(ValueError, match=r"layers \[1, 2\] are objects already given"):
        model(tokens, caches=[cache] * 3)


@pytest.mark.parametrize("backend", ["loop", "dense", "sdpa", "chunked", "blocked"])
def test_double_backward_works_or_raises(backend):
    """A gradient penalty needs create_graph=True; a backend either supports it exactly or says
    it does not. Silently returning first-order gradients without a graph is the one wrong answer."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))

    def penalty(name):
        out = swa_lib.sliding_window_attention(q, k, v, (3, 1), backend=name)
        (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        return torch.autograd.grad(gq.square().sum(), v)[0]

    if backend == "blocked":
        with pytest.raises(RuntimeError, match="backend 'blocked' has no double backward"):
            penalty(backend)
    elif backend == "sdpa":  # PyTorch's fused CPU kernel says so itself
        with pytest.raises(RuntimeError, match="not implemented"):
            penalty(backend)
    else:
        torch.testing.assert_close(penalty(backend), penalty("dense"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("n,window", [(64, (8, 8)), (37, (5, 0)), (48, (16, 16))])
def test_hugging_face_layout_views(backend, batch, n, window):
    """(B, N, H, D) tensors transposed to (B, H, N, D), the views Hugging Face models hold."""
    x = torch.randn(batch, n, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    view = x.transpose(1, 2)
    assert not view.is_contiguous()
    out = swa_lib.sliding_window_attention(view, view, view, window, backend=backend)
    ref = swa_lib.sliding_window_attention(view.contiguous(), view.contiguous(), view.contiguous(), window, backend="dense")
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sizes_beyond_the_sequence_behave_like_the_sequence(backend):
    """Windows and sinks of 2**64 and a dilation of 10**7 see what sequence-sized ones see, quickly
    (they used to overflow int64, or loop over every residue for minutes)."""
    import time

    q, k, v = (torch.randn(1, 4, 30, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
               for s in range(3))
    cases = [
        (dict(window=(2**64, 2**64)), dict(window=(30, 30))),
        (dict(window=(3, 0), sinks=2**64), dict(window=(3, 0), sinks=30)),
        (dict(window=(6, 2), dilation=10**7), dict(window=(6, 2), dilation=30)),
        (dict(window=(6, 2), dilation=(1, 10**7, 2, 2**40)), dict(window=(6, 2), dilation=(1, 30, 2, 30))),
    ]
    for huge, same in cases:
        start = time.perf_counter()
        a = swa_lib.sliding_window_attention(q, k, v, backend=backend, **huge)
        assert time.perf_counter() - start < 10, huge
        b = swa_lib.sliding_window_attention(q, k, v, backend=backend, **same)
        torch.testing.assert_close(a, b, msg=str(huge))
    # a dilation of at least n: inside the window each query sees only itself
    only_self = swa_lib.sliding_window_attention(q, k, v, (6, 2), dilation=30, backend=backend)
    torch.testing.assert_close(only_self, v)


def test_numpy_scales_and_string_dilations():
    import numpy as np

    q = torch.randn(1, 2, 6, 4)
    ref = swa_lib.sliding_window_attention(q, q, q, (2, 0), scale=0.5)
    for scale in (np.float32(0.5), np.float64(0.5), np.int64(1) / 2):
        torch.testing.assert_close(swa_lib.sliding_window_attention(q, q, q, (2, 0), scale=scale), ref)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        swa_lib.sliding_window_attention(q, q, q, (2, 0), scale=np.float32("nan"))
    with pytest.raises(TypeError, match="dilation must be an int or a sequence of ints .* got '2'"):
        swa_lib.sliding_window_attention(q, q, q, (2, 0), dilation="2")


def test_meta_tensors_get_the_reason_no_backend_runs_them():
    from swa_lib.backends import BACKENDS

    q = torch.randn(1, 2, 5, 4, device="meta")
    for kwargs in ({}, {"global_tokens": [1]}, {"sinks": 1, "dilation": 2}):  # global tokens: no value is read
        with pytest.raises(ValueError, match="no registered backend can run this call: device 'meta' is not "
                                             "supported by any backend; ") as info:
            swa_lib.sliding_window_attention(q, q, q, (2, 0), **kwargs)
        for name, row in BACKENDS.items():  # one reason per backend "auto" may choose
            assert not row.auto or f"backend {name!r}" in str(info.value), (name, str(info.value))
    assert "does not run on device 'meta'" in str(info.value)


LOW_LEVEL = ["loop_attention", "dense_attention", "sdpa_attention", "chunked_attention", "blocked_attention",
             "band_attention", "chunked_band_attention"]


def _low_level(name, q, k, v, window=(1, 0), scale=0.5, **pattern):
    fn = getattr(swa_lib, name)
    if name in ("band_attention", "chunked_band_attention"):
        return fn(q, k, v, *window, scale)[0]
    return fn(q, k, v, AttentionPattern(*window, **pattern), scale)


@pytest.mark.parametrize("name", LOW_LEVEL)
def test_exported_backend_functions_refuse_more_queries_than_keys(name):
    """The one way a query row could see no key: N_q > N_k puts queries before key 0. The
    exported functions used to take it and give NaN rows (blocked), zeros (loop) or a result
    of the wrong shape (chunked); like the entry point they now refuse it, naming q and k."""
    q, k = torch.randn(1, 1, 6, 4, dtype=torch.float64), torch.randn(1, 1, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="more queries than keys is not supported: q has N=6, k has N=3"):
        _low_level(name, q, k, k)


@pytest.mark.parametrize("name", ["band_attention", "chunked_band_attention"])
@pytest.mark.parametrize("left,right,scale,error,message", [
    (-1, 0, 0.5, ValueError, "left must be >= 0, got -1"),  # an empty window: used to give NaN rows
    (0, -3, 0.5, ValueError, "right must be >= 0, got -3"),
    (True, 0, 0.5, TypeError, "left must be an int, got bool"),
    (1.5, 0, 0.5, TypeError, "left must be an int, got float"),
    (1, 0, float("nan"), ValueError, "scale must be a positive finite number, got nan"),  # used to give NaN
])
def test_band_functions_check_their_window_and_scale(name, left, right, scale, error, message):
    q = torch.randn(1, 1, 5, 4)
    with pytest.raises(error, match=message):
        getattr(swa_lib, name)(q, q, q, left, right, scale)


@pytest.mark.parametrize("name", LOW_LEVEL)
def test_exported_backend_functions_check_their_tensors(name):
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):  # used to be AttributeError
        _low_level(name, q.tolist(), q, q)
    with pytest.raises(ValueError, match="k must have 4 dims"):  # used to be ZeroDivisionError
        _low_level(name, q, q[0], q)
    with pytest.raises(ValueError, match="k and v must agree in heads and length"):  # used to be accepted
        _low_level(name, q, q, q[:, :, :3])


@pytest.mark.parametrize("name", ["loop_attention", "dense_attention", "sdpa_attention", "chunked_attention",
                                  "blocked_attention"])
def test_exported_backend_functions_check_the_pattern(name):
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(TypeError, match="pattern must be a swa_lib.AttentionPattern"):  # was AttributeError
        getattr(swa_lib, name)(q, q, q, (1, 0), 0.5)
    with pytest.raises(ValueError, match=r"pattern.global_tokens must have shape \(B, N_k\) = \(1, 5\), got \(2, 5\)"):
        _low_level(name, q, q, q, global_tokens=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="pattern.dilation has 3 entries"):
        _low_level(name, q, q, q, dilation=(1, 2, 3))
    # sizes beyond the sequence are cut as the entry point cuts them (they used to overflow int64)
    ref = swa_lib.sliding_window_attention(q, q, q, (5, 5), sinks=5, dilation=(1, 5), backend="dense")
    got = _low_level(name, q, q, q, window=(2**64, 2**64), sinks=2**64, dilation=(1, 2**70))
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("name", LOW_LEVEL)
@pytest.mark.parametrize("shapes", [((0, 2, 5, 4), (0, 2, 5, 4), (0, 2, 5, 4)),
                                    ((1, 2, 0, 4), (1, 2, 7, 4), (1, 2, 7, 4)),
                                    ((1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 0))], ids=["B=0", "N_q=0", "D_v=0"])
def test_exported_backend_functions_give_empty_results_for_empty_inputs(name, shapes):
    q, k, v = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes)
    out = _low_level(name, q, k, v, sinks=1, dilation=2)
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("backend", ["loop", "dense", "sdpa", "chunked", "blocked"])
def test_the_sparsest_rows_see_exactly_themselves(backend):
    """The closest a call comes to a fully masked row: window (0, 0), a dilation beyond the
    sequence, fewer queries than keys. Each query sees only its own key, so the output is that
    key's value, dq and dk are zero and dv is the upstream gradient, on every CPU backend."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 8, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, 4, 3, 8, dtype=torch.float64, generator=gen)
    for window, dilation in (((0, 0), 1), ((5, 5), 2**40)):
        out = swa_lib.sliding_window_attention(q, k, v, window, dilation=dilation, backend=backend)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        own = v.detach()[:, :, 4:].repeat_interleave(2, dim=1)  # query row r is position r + 4; GQA 4 -> 2
        torch.testing.assert_close(out, own, rtol=0, atol=1e-12)
        for zero in (dq, dk):  # (up to rounding: dS = P * (dP - delta) cancels in floating point)
            torch.testing.assert_close(zero, torch.zeros_like(zero), rtol=0, atol=1e-12)
        expected_dv = torch.zeros_like(v)
        expected_dv[:, :, 4:] = grad.unflatten(1, (2, 2)).sum(2)
        torch.testing.assert_close(dv, expected_dv, rtol=0, atol=1e-12)


def test_a_fully_masked_row_gives_zeros_in_the_dense_softmax_as_in_pytorchs_sdpa():
    """The convention swa_lib follows where a routine is handed a row without keys: zeros and
    zero gradients, what F.scaled_dot_product_attention returns (its math path normalises with
    aten._safe_softmax), not softmax's NaN."""
    import torch.nn.functional as F
    from swa_lib.backends.dense import masked_softmax

    q = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    ours = torch.matmul(masked_softmax(q @ q.transpose(-1, -2) * 0.5, mask), q)
    theirs = F.scaled_dot_product_attention(q, q, q, attn_mask=mask, scale=0.5)
    torch.testing.assert_close(ours, theirs)
    assert not ours[0, 0, 1].any()
    (g_ours,) = torch.autograd.grad(ours[0, 0, 1].sum(), q)
    assert not g_ours.any()


def _triton():
    import importlib.util

    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        pytest.skip("needs triton and no GPU (the kernels run in Triton's interpreter)")
    import swa_lib.backends.triton as tk  # conftest set TRITON_INTERPRET=1 before anything imported triton

    if not tk.INTERPRETER:
        pytest.skip("swa_lib.backends.triton was imported without TRITON_INTERPRET=1")
    return tk


@pytest.mark.interpreter
def test_triton_cuts_a_huge_dilation_to_the_sequence():
    """The kernels hold dilations in int32: 2**40 used to fail with "value cannot be converted to
    type int32 without overflow", a message that does not say which value. The entry point cuts
    dilations to N; the registry function (a pattern handed to it directly) now does too."""
    tk = _triton()
    q, k, v = (torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    huge = tk.triton_attention(q, k, v, AttentionPattern(6, 2, dilation=(2**40, 1)), 0.25)
    same = tk.triton_attention(q, k, v, AttentionPattern(6, 2, dilation=(20, 1)), 0.25)
    torch.testing.assert_close(huge, same, rtol=0, atol=0)
    torch.testing.assert_close(huge[:, 0], v[:, 0], rtol=0, atol=1e-6)  # head 0: each query sees itself


def test_longformer_config_and_padding_messages():
    from swa_lib.longformer import LongformerAttentionConfig, LongformerSelfAttention

    with pytest.raises(ValueError, match="dilation must be >= 1, got 0"):
        LongformerAttentionConfig(hidden_size=8, num_heads=2, attention_window=4, dilation=0)
    layer = LongformerSelfAttention(LongformerAttentionConfig(hidden_size=8, num_heads=2, attention_window=4))
    with pytest.raises(TypeError, match="got dtype torch.int64"):
        layer(torch.randn(1, 6, 8), padding=torch.zeros(1, 6, dtype=torch.long))


@pytest.mark.interpreter
def test_triton_sparsest_rows_see_exactly_themselves():
    """As test_the_sparsest_rows_see_exactly_themselves, for the kernel (N_q = N_k there)."""
    _triton()
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, 2, 20, 16, generator=gen)
    for window, dilation in (((0, 0), 1), ((5, 5), 2**40)):
        out = swa_lib.sliding_window_attention(q, k, v, window, dilation=dilation, backend="triton")
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        torch.testing.assert_close(out, v.detach(), rtol=0, atol=1e-6)
        for zero in (dq, dk):
            torch.testing.assert_close(zero, torch.zeros_like(zero), rtol=0, atol=1e-5)
        torch.testing.assert_close(dv, grad, rtol=0, atol=1e-6)
