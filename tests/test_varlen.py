"""Packed documents: each document attends on its own, exactly as separate calls would."""

import pytest
import torch

import swa_lib
from swa_lib import AttentionPattern, loop_attention, varlen_sliding_window_attention

LENGTHS = [7, 1, 0, 19, 12]  # awkward: a one-token document and an empty one


def _packed(lengths, heads=4, heads_kv=2, d=8, dtype=torch.float64, seed=0, total_k=None):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, d, generator=g, dtype=dtype)
    k = torch.randn(total, heads_kv, d, generator=g, dtype=dtype)
    v = torch.randn(total, heads_kv, d + 3, generator=g, dtype=dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, cu


def _per_document(q, k, v, cu_q, cu_k, pattern, scale):
    """The oracle: each document through the float64 loop reference on its own."""
    outs = []
    for d in range(len(cu_q) - 1):
        a, b, c, e = int(cu_q[d]), int(cu_q[d + 1]), int(cu_k[d]), int(cu_k[d + 1])
        if b == a:
            continue
        view = lambda x, s, t: x[s:t].permute(1, 0, 2)[None]  # noqa: E731
        outs.append(loop_attention(view(q, a, b), view(k, c, e), view(v, c, e), pattern, scale)[0].permute(1, 0, 2))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["blocked", "chunked", "dense", "auto"])
@pytest.mark.parametrize("kw", [dict(window=(3, 0)), dict(window=(2, 4)),
                                dict(window=(5, 0), sinks=2), dict(window=(6, 2), dilation=(1, 2, 1, 3))],
                         ids=["causal", "symmetric", "sinks", "dilation"])
def test_equals_separate_calls_forward_and_backward(backend, kw):
    q, k, v, cu = _packed(LENGTHS)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = varlen_sliding_window_attention(*leaves, cu, backend=backend, **kw)
    pattern = AttentionPattern(*kw["window"], dilation=kw.get("dilation", 1), sinks=kw.get("sinks", 0))
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = _per_document(*ref_leaves, cu, cu, pattern, 8**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_no_window_crosses_a_document_border():
    """Changing one document's tokens changes no other document's output."""
    q, k, v, cu = _packed([10, 10, 10], dtype=torch.float32)
    out = varlen_sliding_window_attention(q, k, v, cu, (16, 16))
    k2, v2 = k.clone(), v.clone()
    k2[10:20] += 1.0
    v2[10:20] -= 2.0
    out2 = varlen_sliding_window_attention(q, k2, v2, cu, (16, 16))
    assert torch.equal(out[:10], out2[:10]) and torch.equal(out[20:], out2[20:])
    assert not torch.allclose(out[10:20], out2[10:20])
    packed_as_one = swa_lib.sliding_window_attention(*(x.permute(1, 0, 2)[None] for x in (q, k, v)), (16, 16))
    assert not torch.allclose(packed_as_one[0].permute(1, 0, 2), out)  # one window over all would leak


def test_fewer_queries_than_keys_per_document_is_bottom_right_aligned():
    """Decoding packed requests: each document's queries are its last positions."""
    lengths_k, lengths_q = [9, 5, 12], [2, 5, 1]
    g = torch.Generator().manual_seed(3)
    k = torch.randn(sum(lengths_k), 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lengths_k), 2, 8, generator=g, dtype=torch.float64)
    q = torch.randn(sum(lengths_q), 2, 8, generator=g, dtype=torch.float64)
    cu_k = torch.tensor([0, 9, 14, 26])
    cu_q = torch.tensor([0, 2, 7, 8])
    out = varlen_sliding_window_attention(q, k, v, cu_q, (3, 0), cu_seqlens_k=cu_k)
    ref = _per_document(q, k, v, cu_q, cu_k, AttentionPattern(3, 0), 8**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_bad_input_names_the_bad_value():
    q, k, v, cu = _packed([4, 4])
    with pytest.raises(TypeError, match="cu_seqlens_q must hold int32 or int64 offsets, got dtype torch.float32"):
        varlen_sliding_window_attention(q, k, v, cu.float(), (2, 0))
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0, got 1"):
        varlen_sliding_window_attention(q, k, v, torch.tensor([1, 4, 8]), (2, 0))
    with pytest.raises(ValueError, match="must end at the number of packed tokens 8, got 7"):
        varlen_sliding_window_attention(q, k, v, torch.tensor([0, 4, 7]), (2, 0))
    with pytest.raises(ValueError, match="must not decrease: document 1 runs from 5 to 3"):
        varlen_sliding_window_attention(q, k, v, torch.tensor([0, 5, 3, 8]), (2, 0))
    with pytest.raises(ValueError, match=r"q must be a packed \(total, heads, head_dim\) tensor, got \(1, 4, 8, 8\)"):
        varlen_sliding_window_attention(q[None].transpose(1, 2), k, v, cu, (2, 0))
    with pytest.raises(ValueError, match="document 0 has 4 queries but only 2 keys"):
        varlen_sliding_window_attention(q, k[:6], v[:6], cu, (2, 0), cu_seqlens_k=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="cu_seqlens_q has 2 documents, cu_seqlens_k 1"):
        varlen_sliding_window_attention(q, k, v, cu, (2, 0), cu_seqlens_k=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="window"):
        varlen_sliding_window_attention(q, k, v, cu, (-1, 0))


def test_no_queries_gives_an_empty_result():
    q, k, v, cu = _packed([0, 0])
    out = varlen_sliding_window_attention(q, k, v, cu, (2, 0))
    assert out.shape == (0, 4, 11)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(window="bad"), TypeError, "window must be a pair"),
        (dict(dilation=0), ValueError, "dilation must be >= 1, got 0"),
        (dict(sinks=-1), ValueError, "sinks must be >= 0, got -1"),
        (dict(scale=-1.0), ValueError, "scale must be a positive finite number, got -1.0"),
        (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
        (dict(heads=3), ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
        (dict(dtype=torch.long), TypeError, "q must be a floating-point tensor, got dtype torch.int64"),
    ],
)
@pytest.mark.parametrize("lengths", [[0], [0, 0], [3, 0, 2]], ids=["no tokens", "empty documents", "tokens"])
def test_bad_arguments_are_refused_with_or_without_tokens(lengths, kw, error, match):
    """No tokens at all is no excuse to skip the checks: the same call with tokens, and
    sliding_window_attention itself, refuse the same arguments."""
    kw = dict(kw)
    dtype = kw.pop("dtype", torch.float64)
    q, k, v, cu = _packed(lengths, heads=kw.pop("heads", 4))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    kw = {"window": (2, 0), **kw}
    with pytest.raises(error, match=match):
        varlen_sliding_window_attention(q, k, v, cu, kw.pop("window"), **kw)


# -- the Triton kernel reads cu_seqlens itself: one launch per kernel for every document -----
@pytest.mark.interpreter
@pytest.mark.parametrize("kw", [dict(window=(3, 1)), dict(window=(5, 0), sinks=2),
                                dict(window=(4, 2), dilation=(1, 2, 1, 3))], ids=["band", "sinks", "dilation"])
def test_triton_packs_all_documents_into_one_launch(kw, monkeypatch):
    """Against the per-document loop oracle, forward and backward, with a document that has
    fewer queries than keys, an empty one and a one-token one; each kernel is launched once."""
    tk = pytest.importorskip("swa_lib.backends.triton", reason="triton is not installed")
    device = "cpu" if tk.INTERPRETER else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("compiled Triton kernels need a GPU")
    lengths_k, lengths_q = [9, 5, 0, 40, 1], [2, 5, 0, 33, 1]
    g = torch.Generator().manual_seed(5)
    q = torch.randn(sum(lengths_q), 4, 16, generator=g)
    k, v = (torch.randn(sum(lengths_k), 2, 16, generator=g) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(x).cumsum(0).tolist()) for x in (lengths_q, lengths_k))
    launched = []
    run = tk.launch.run
    monkeypatch.setattr(tk.launch, "run", lambda launch, blocks: (launched.append(launch.kind), run(launch, blocks)))
    leaves = [x.to(device).clone().requires_grad_() for x in (q, k, v)]
    out = varlen_sliding_window_attention(*leaves, cu_q, cu_seqlens_k=cu_k, backend="triton", **kw)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad.to(device))
    kinds = ["fwd", "delta", "dq", "dkdv"] + (["dkdv"] if kw.get("sinks") else [])  # + the sinks' columns
    assert sorted(launched) == sorted(kinds)
    pattern = AttentionPattern(*kw["window"], dilation=kw.get("dilation", 1), sinks=kw.get("sinks", 0))
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = _per_document(*ref_leaves, cu_q, cu_k, pattern, 16**-0.5)
    ref.backward(grad.double())
    for a, b in zip([out, *(x.grad for x in leaves)], [ref, *(x.grad for x in ref_leaves)]):
        assert float((a.detach().cpu().double() - b.detach()).abs().max()) < 2e-5
