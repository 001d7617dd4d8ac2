"""Global tokens: loop oracle == dense == auto, and our Longformer layer == transformers' layer.

The real peer is Hugging Face transformers' ``LongformerSelfAttention`` with random weights: our
:class:`swa_lib.longformer.LongformerSelfAttention` loads its weights and must give the same
output (fp32, atol 1e-5) with and without global tokens and with padding, at sequence lengths the
transformers layer accepts (a multiple of ``attention_window``; the padding to such a length
happens in ``LongformerModel``, not in the layer).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import swa_lib
from swa_lib.backends import BACKENDS
from swa_lib.longformer import (
    LongformerAttentionConfig,
    LongformerSelfAttention,
    hf_layer_attention_mask,
    split_hf_attention_mask,
)

transformers = pytest.importorskip("transformers")
from transformers.models.longformer.modeling_longformer import (  # noqa: E402
    LongformerSelfAttention as HFLongformerSelfAttention,
)


# -- global tokens through the public API: every backend == the loop oracle -----------------


def capable_backends(dilation=False):
    """Every registered CPU backend that runs here and claims global tokens (and dilation, if
    asked), the loop oracle aside: backends that gain the features later are tested automatically."""
    return [
        name for name in swa_lib.available_backends()
        if name != "loop" and BACKENDS[name].global_tokens and (BACKENDS[name].dilation or not dilation)
        and "cpu" in BACKENDS[name].devices and torch.float64 in BACKENDS[name].dtypes
    ]


@pytest.mark.parametrize("n", [1, 7, 13])
@pytest.mark.parametrize("window", [(0, 0), (2, 1), (1, 0), (3, 3)])
def test_global_tokens_loop_dense_auto_forward_and_grad(n, window, make_qkv, global_sets):
    for name, positions in global_sets(n).items():
        results = {}
        for backend in ("loop", *capable_backends(), "auto"):
            q, k, v = make_qkv(1, 2, n, 4, seed=n, requires_grad=True)
            g = torch.tensor(positions, dtype=torch.long)
            out = swa_lib.sliding_window_attention(q, k, v, window, global_tokens=g, backend=backend)
            weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
            grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
            results[backend] = (out.detach(), *grads)
        for backend in (*capable_backends(), "auto"):
            for a, b in zip(results[backend], results["loop"]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{backend} {name} {window}")


def test_global_tokens_per_batch_and_with_dilation(make_qkv):
    """Different global sets per batch element (a (B, N) mask), with per-head dilation."""
    n = 11
    q, k, v = make_qkv(2, 3, n, 4, seed=5)
    g = torch.zeros(2, n, dtype=torch.bool)
    g[0, 0] = True
    g[1, [4, 10]] = True
    for dilation in (1, 2, (1, 2, 3)):
        loop = swa_lib.sliding_window_attention(q, k, v, (4, 4), global_tokens=g, dilation=dilation, backend="loop")
        for backend in (*capable_backends(dilation=True), "auto"):
            out = swa_lib.sliding_window_attention(q, k, v, (4, 4), global_tokens=g, dilation=dilation, backend=backend)
            torch.testing.assert_close(out, loop, rtol=1e-10, atol=1e-10)


def test_global_token_is_counted_once(make_qkv):
    """A global key inside the band appears once in the softmax: with all tokens global and a
    window wider than the sequence, the result is plain full attention (not double-weighted)."""
    n = 9
    q, k, v = make_qkv(1, 1, n, 4, seed=1)
    full = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v
    out = swa_lib.sliding_window_attention(q, k, v, (n, n), global_tokens=torch.arange(n), backend="dense")
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)
    out = swa_lib.sliding_window_attention(q, k, v, (2, 2), global_tokens=[3], backend="loop")
    band_mask = swa_lib.window_mask(n, (2, 2))
    band_mask[:, 3] = True
    band_mask[3, :] = True
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~band_mask, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, rtol=1e-12, atol=1e-12)


# -- the transformers peer -------------------------------------------------------------------


def hf_layer(hidden=16, heads=2, attention_window=4, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LongformerConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        attention_window=[attention_window],
        num_hidden_layers=1,
        attention_probs_dropout_prob=0.0,
    )
    layer = HFLongformerSelfAttention(cfg, layer_id=0).eval()
    with torch.no_grad():  # make the biases non-zero so a missing bias would show
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def run_hf(layer, x, mask):
    glob, pad = split_hf_attention_mask(mask)
    with torch.no_grad():
        return layer(
            x, attention_mask=mask, is_index_masked=pad, is_index_global_attn=glob, is_global_attn=bool(glob.any())
        )[0]


CASES = {
    "local only": (None, None),
    "global [CLS]": ([[0], [0]], None),
    "global start/middle/end": ([[0, 7, 15], [3]], None),
    "padding": (None, [16, 11]),
    "global + padding": ([[0, 5], [2, 9]], [16, 11]),
    "left padding": ([[], [6]], "left"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("hidden,heads,attention_window,n", [(16, 2, 4, 16), (24, 3, 8, 16), (12, 4, 6, 18)])
def test_matches_transformers_longformer(case, hidden, heads, attention_window, n):
    glob_pos, lengths = CASES[case]
    layer = hf_layer(hidden, heads, attention_window, seed=attention_window)
    ours = LongformerSelfAttention.from_hf(layer)
    b = 2
    x = torch.randn(b, n, hidden, generator=torch.Generator().manual_seed(n))
    real = None
    if lengths == "left":
        real = torch.ones(b, n)
        real[1, :3] = 0
    elif lengths is not None:
        real = (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).float()
    globm = None
    if glob_pos is not None:
        globm = torch.zeros(b, n)
        for i, pos in enumerate(glob_pos):
            globm[i, [p % n for p in pos]] = 1
    mask = hf_layer_attention_mask(real, globm, shape=(b, n))
    expected = run_hf(layer, x, mask)
    glob, pad = split_hf_attention_mask(mask)
    with torch.no_grad():
        out = ours(x, global_tokens=glob, padding=pad)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if pad.any():  # padding queries output exactly zero, as in transformers
        assert bool((out[pad] == 0).all())


def test_matches_transformers_with_finfo_min_mask_and_explicit_backends():
    """transformers >= 4.4x writes finfo.min / finfo.max into the layer mask; same result."""
    layer = hf_layer(16, 2, 4, seed=3)
    n = 12
    x = torch.randn(2, n, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, n)
    mask[0, 0] = torch.finfo(torch.float32).max
    mask[1, 9:] = torch.finfo(torch.float32).min
    mask[1, 4] = torch.finfo(torch.float32).max
    expected = run_hf(layer, x, mask)
    glob, pad = split_hf_attention_mask(mask)
    for backend in ("auto", "dense", "loop"):
        ours = LongformerSelfAttention.from_hf(layer, backend=backend)
        with torch.no_grad():
            out = ours(x, glob, pad)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5, msg=backend)


def test_gradients_flow_and_match_float64_loop():
    """Gradients of our layer through 'auto' equal those through the loop oracle (float64)."""
    cfg = LongformerAttentionConfig(hidden_size=8, num_heads=2, attention_window=4, dilation=(1, 2))
    torch.manual_seed(0)
    layer = LongformerSelfAttention(cfg).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    glob = torch.zeros(2, 9, dtype=torch.bool)
    glob[0, 4] = True
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 7:] = True
    grads = {}
    for backend in ("loop", "auto"):
        layer.backend = backend
        xx = x.clone().requires_grad_(True)
        out = layer(xx, glob, pad)
        assert torch.isfinite(out).all()
        params = [xx, *layer.parameters()]
        grads[backend] = torch.autograd.grad(out.square().sum(), params)
    for a, b in zip(grads["auto"], grads["loop"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_dilation_one_per_head_equals_separate_layers():
    """Per-head dilation in the module == running each head's dilation separately."""
    cfg = LongformerAttentionConfig(hidden_size=8, num_heads=2, attention_window=6, dilation=(1, 3))
    torch.manual_seed(1)
    layer = LongformerSelfAttention(cfg)
    x = torch.randn(1, 13, 8)
    out = layer(x)
    for head, d in enumerate((1, 3)):
        single = LongformerSelfAttention(LongformerAttentionConfig(8, 2, 6, dilation=d))
        single.load_state_dict(layer.state_dict())
        torch.testing.assert_close(out[..., head * 4:(head + 1) * 4], single(x)[..., head * 4:(head + 1) * 4])


def test_global_tokens_as_positions_equal_the_mask():
    """The layer takes global tokens in every form the entry point takes."""
    torch.manual_seed(2)
    layer = LongformerSelfAttention(LongformerAttentionConfig(8, 2, 4))
    x = torch.randn(2, 9, 8)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, [0, 6]] = True
    with torch.no_grad():
        want = layer(x, mask)
        for form in ([0, 6], torch.tensor([6, 0]), mask[0]):
            torch.testing.assert_close(layer(x, form), want, rtol=0, atol=0)


def test_hf_layer_attention_mask_values():
    real = torch.tensor([[1, 1, 1, 0]])
    glob = torch.tensor([[1, 0, 0, 1]])  # the padding token's global flag is dropped
    mask = hf_layer_attention_mask(real, glob)
    assert mask.tolist() == [[10000.0, 0.0, 0.0, -10000.0]]
    g, p = split_hf_attention_mask(mask)
    assert g.tolist() == [[True, False, False, False]] and p.tolist() == [[False, False, False, True]]


def test_errors_quote_bad_values():
    with pytest.raises(ValueError, match="even, got 5"):
        LongformerAttentionConfig(8, 2, 5)
    with pytest.raises(ValueError, match=r"multiple of num_heads \(3\)"):
        LongformerAttentionConfig(8, 3, 4)
    with pytest.raises(ValueError, match="dilation per head needs 2 entries"):  # the entry point's words
        LongformerAttentionConfig(8, 2, 4, dilation=(1, 2, 3))
    with pytest.raises(ValueError, match="dilation must be >= 1, got 0"):
        LongformerAttentionConfig(8, 2, 4, dilation=(1, 0))
    with pytest.raises(TypeError, match="num_heads must be an int"):
        LongformerAttentionConfig(8, 2.0, 4)
    layer = LongformerSelfAttention(LongformerAttentionConfig(8, 2, 4))
    with pytest.raises(ValueError, match="width 6"):
        layer(torch.randn(1, 5, 6))
    with pytest.raises(ValueError, match="holding only 0 and 1"):  # global tokens follow the entry point's rule
        layer(torch.randn(1, 5, 8), global_tokens=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\), got min 1, max 7"):
        layer(torch.randn(1, 5, 8), global_tokens=[1, 7])
    with pytest.raises(ValueError, match=r"padding must be a bool tensor of shape \(1, 5\)"):
        layer(torch.randn(1, 5, 8), padding=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="expected a LongformerSelfAttention"):
        LongformerSelfAttention.from_hf(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.ones(2, 6), torch.ones(2, 5)), {}, ValueError,
         r"attention_mask and global_attention_mask must have the same shape.*\(2, 6\) and \(2, 5\)"),
        (([[1, 1]],), {}, TypeError, r"attention_mask must be a \(B, N\) tensor or None, got list"),
        ((None, [[1, 1]]), {}, TypeError, r"global_attention_mask must be a \(B, N\) tensor or None, got list"),
        ((torch.ones(6),), {}, ValueError, r"attention_mask must be a \(B, N\) tensor, got shape \(6,\)"),
        ((torch.ones(2, 6),), {"dtype": torch.int8}, TypeError, r"dtype must be a floating-point.*int8"),
        ((), {"shape": (2, 6), "dtype": "float32"}, TypeError, r"dtype must be a floating-point.*'float32'"),
        ((), {"shape": (-1, 3)}, ValueError, r"shape\[0\] \(B\) must be >= 0, got -1"),
        ((), {"shape": (2, 3.0)}, TypeError, r"shape\[1\] \(N\) must be an int, got float 3.0"),
        ((), {"shape": 6}, TypeError, r"shape must be a pair \(B, N\) of ints, got 6"),
        ((torch.ones(2, 6),), {"shape": (2, 5)}, ValueError, r"shape \(2, 5\) disagrees.*\(2, 6\)"),
    ],
)
def test_hf_layer_attention_mask_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        hf_layer_attention_mask(*args, **kwargs)


def test_hf_layer_attention_mask_valid_forms_unchanged():
    assert torch.equal(hf_layer_attention_mask(shape=(2, 3)), torch.zeros(2, 3))
    assert hf_layer_attention_mask(shape=[1, 2], dtype=torch.float64).dtype == torch.float64
    mask = hf_layer_attention_mask(None, torch.tensor([[1.0, 0.0]]), shape=(1, 2), dtype=torch.float16)
    assert mask.dtype == torch.float16 and mask.tolist() == [[10000.0, 0.0]]


@pytest.mark.parametrize(
    "hidden_states, error, match",
    [
        (torch.randn(1, 6, 8, dtype=torch.float64), TypeError,
         r"hidden_states has dtype torch.float64 but the layer's parameters have dtype torch.float32"),
        (torch.ones(1, 6, 8, dtype=torch.long), TypeError, r"hidden_states has dtype torch.int64"),
        ([[0.0] * 8], TypeError, r"hidden_states must be a \(B, N, E\) tensor, got list"),
        (torch.randn(6, 8), ValueError, r"hidden_states must be \(B, N, E\), got torch.Size\(\[6, 8\]\)"),
        (torch.randn(1, 6, 6), ValueError, r"hidden_states has width 6"),
    ],
)
def test_forward_bad_hidden_states(hidden_states, error, match):
    layer = LongformerSelfAttention(LongformerAttentionConfig(8, 2, 4))
    with pytest.raises(error, match=match):
        layer(hidden_states)


def test_forward_float64_layer_and_autocast_still_work():
    layer = LongformerSelfAttention(LongformerAttentionConfig(8, 2, 4)).double()
    assert layer(torch.randn(1, 6, 8, dtype=torch.float64)).dtype == torch.float64
    layer = LongformerSelfAttention(LongformerAttentionConfig(8, 2, 4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside nn.Linear
        assert layer(torch.randn(1, 6, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@settings(max_examples=10, deadline=None)
@given(
    attention_window=st.sampled_from([4, 8]),
    chunks=st.integers(1, 3),
    data=st.data(),
)
def test_matches_transformers_property(attention_window, chunks, data):
    """Random global sets and padding (on either side) at every length the layer accepts."""
    n = attention_window * chunks
    b = 2
    layer = hf_layer(12, 3, attention_window, seed=attention_window + chunks)
    ours = LongformerSelfAttention.from_hf(layer)
    real = torch.ones(b, n)
    glob = torch.zeros(b, n)
    for i in range(b):
        lo = data.draw(st.integers(0, n - 1), label="first real token")
        hi = data.draw(st.integers(lo + 1, n), label="end of real tokens")
        real[i, :lo] = 0
        real[i, hi:] = 0
        positions = data.draw(st.lists(st.integers(0, n - 1), max_size=4), label="global positions")
        glob[i, positions] = 1
    mask = hf_layer_attention_mask(real, glob)
    x = torch.randn(b, n, 12, generator=torch.Generator().manual_seed(n))
    expected = run_hf(layer, x, mask)
    g, p = split_hf_attention_mask(mask)
    with torch.no_grad():
        out = ours(x, g, p)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
