"""The window predicate, its vectorised mask, and the converters to other conventions."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import swa_lib
from swa_lib.masks import AttentionPattern, UNBOUNDED


def test_docstring_example_mask():
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(swa_lib.window_mask(7, (2, 1)), expected)


def test_syllabus_examples():
    letters = "ABCDEFG"
    # a symmetric window of total size 4 is (2, 2)
    m = swa_lib.window_mask(7, swa_lib.from_longformer(4))
    seen = {letters[i]: "".join(letters[j] for j in range(7) if m[i, j]) for i in range(7)}
    assert seen["C"] == "ABCDE"
    assert seen["F"] == "DEFG"  # clipped at the end of the sequence
    words = "The quick brown fox jumps".split()
    m = swa_lib.window_mask(5, (1, 1))  # total window 3
    assert [words[j] for j in range(5) if m[2, j]] == ["quick", "brown", "fox"]


@settings(max_examples=60, deadline=None)
@given(
    n_q=st.integers(1, 12),
    extra=st.integers(0, 5),
    left=st.integers(0, 14),
    right=st.integers(0, 14),
    dilation=st.integers(1, 4),
    sinks=st.integers(0, 3),
    use_global=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_mask_matches_predicate(n_q, extra, left, right, dilation, sinks, use_global, seed):
    n_k = n_q + extra
    g = None
    if use_global:
        g = torch.rand(2, n_k, generator=torch.Generator().manual_seed(seed)) < 0.2
    p = AttentionPattern(left, right, dilation=dilation, sinks=sinks, global_tokens=g)
    m = p.mask(n_q, n_k)
    for b in range(m.shape[0]):
        for r in range(n_q):
            for j in range(n_k):
                assert bool(m[b, 0, r, j]) == p.allows(r + n_k - n_q, j, batch=b)


def test_per_head_dilation_mask():
    p = AttentionPattern(4, 4, dilation=(1, 2, 3))
    m = p.mask(9, num_heads=3)
    assert m.shape == (1, 3, 9, 9)
    for h in range(3):
        for i in range(9):
            for j in range(9):
                assert bool(m[0, h, i, j]) == p.allows(i, j, head=h)
    # the query always sees itself, whatever the dilation
    assert m.diagonal(dim1=-2, dim2=-1).all()


def test_sinks_respect_causality():
    m = swa_lib.window_mask(8, (2, 0), sinks=2)
    assert m[7, 0] and m[7, 1] and not m[7, 2]
    assert not m[0, 1]  # sink key 1 is still in query 0's future


def test_global_tokens_row_and_column():
    g = torch.zeros(9, dtype=torch.bool)
    g[4] = True
    m = swa_lib.window_mask(9, (1, 1), global_tokens=g)
    assert m[4].all() and m[:, 4].all()
    assert not m[0, 8]


@pytest.mark.parametrize(
    "window, message",
    [
        ((-3, 0), "window left must be >= 0, got -3"),
        ((0, -1), "window right must be >= 0, got -1"),
    ],
)
def test_bad_windows_value_error(window, message):
    with pytest.raises(ValueError, match=message):
        swa_lib.window_mask(5, window)


@pytest.mark.parametrize("window", [3, "3,3", (1.5, 2), (True, 1), (1, 2, 3), None])
def test_bad_windows_type_error(window):
    with pytest.raises(TypeError, match="window"):
        swa_lib.window_mask(5, window)


def test_bad_dilation_and_sinks():
    with pytest.raises(ValueError, match="dilation must be >= 1, got 0"):
        swa_lib.window_mask(5, (1, 1), dilation=0)
    with pytest.raises(ValueError, match="sinks must be >= 0, got -2"):
        swa_lib.window_mask(5, (1, 1), sinks=-2)


HUGE = [UNBOUNDED, 2**63 - 1, 2**63, 2**64, 10**30]


@pytest.mark.parametrize("big", HUGE)
def test_sizes_beyond_the_sequence_give_the_clipped_mask(big):
    # 2**63 and up used to give an all-False mask (silently), ignore the sinks or raise
    # OverflowError / "Overflow when unpacking long long"
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    assert torch.equal(swa_lib.window_mask(4, (big, 0)), causal)
    assert torch.equal(swa_lib.window_mask(4, (0, big)), causal.T)
    assert swa_lib.window_mask(4, (big, big)).all()
    assert int(AttentionPattern(big, 0).mask(3).sum()) == 6
    assert torch.equal(swa_lib.window_mask(4, (0, 0), sinks=big), causal)
    assert torch.equal(swa_lib.window_mask(4, (3, 3), dilation=big), torch.eye(4, dtype=torch.bool))
    assert AttentionPattern(big, 0, dilation=big).keys_per_query(4) == 1.0
    p = AttentionPattern(big, 1, dilation=(big, 1), sinks=big)
    m = p.mask(3, 5, num_heads=2)
    for h in range(2):
        for r in range(3):
            for j in range(5):
                assert bool(m[0, h, r, j]) == p.allows(r + 2, j, head=h)


@pytest.mark.parametrize("pattern", [AttentionPattern(1, 0), AttentionPattern(1, 0, sinks=1),
                                     AttentionPattern(2, 1, dilation=2)])
@pytest.mark.parametrize(
    "method, args, error, message",
    [
        ("mask", (-1,), ValueError, "n_q must be >= 0, got -1"),  # was a RuntimeError from torch.arange
        ("mask", (2.5,), TypeError, "n_q must be an int, got float 2.5"),  # was a 3x3 mask
        ("mask", (True,), TypeError, "n_q must be an int, got bool True"),
        ("mask", (2, -1), ValueError, "n_k must be >= 0, got -1"),
        ("mask", (2, 3.0), TypeError, "n_k must be an int, got float 3.0"),
        ("keys_per_query", (0,), ValueError, "n must be >= 1, got 0"),  # was ZeroDivisionError or nan
        ("keys_per_query", (-3,), ValueError, "n must be >= 1, got -3"),  # was -0.0
        ("keys_per_query", (2.5,), TypeError, "n must be an int, got float 2.5"),
    ],
)
def test_bad_lengths_of_pattern_methods(pattern, method, args, error, message):
    with pytest.raises(error, match=message):
        getattr(pattern, method)(*args)


def test_empty_masks_and_one_token_still_work():
    p = AttentionPattern(1, 0, sinks=1)
    assert p.mask(0).shape == (1, 1, 0, 0)
    assert p.mask(0, 3).shape == (1, 1, 0, 3)
    assert p.keys_per_query(1) == 1.0 and AttentionPattern(1, 0).keys_per_query(1) == 1.0


def test_bad_global_tokens_of_window_mask_name_the_value():
    with pytest.raises(TypeError, match=r"global_tokens must be a bool tensor of shape \(n,\), got list \[0\]"):
        swa_lib.window_mask(4, (1, 1), global_tokens=[0])
    with pytest.raises(TypeError, match=r"global_tokens in a pattern .* got a torch.float32 tensor of shape \(1, 4\)"):
        AttentionPattern(1, 1, global_tokens=torch.zeros(1, 4))


# -- converters ---------------------------------------------------------------------------

def test_longformer_round_trip():
    assert swa_lib.from_longformer(512) == (256, 256)
    assert swa_lib.to_longformer((256, 256)) == 512
    with pytest.raises(ValueError, match="even, got 5"):
        swa_lib.from_longformer(5)
    with pytest.raises(ValueError, match="symmetric"):
        swa_lib.to_longformer((3, 0))


def test_mistral_round_trip_and_production_mask():
    w = 3
    assert swa_lib.from_mistral(4096) == (4095, 0)
    assert swa_lib.to_mistral((4095, 0)) == 4096
    assert swa_lib.from_mistral(w) == swa_lib.from_hf(w)
    # mistral-inference's masks: xformers' make_local_attention(W), materialised by xformers as
    # triu(tril(ones), diagonal=-W + 1)
    n = 9
    production = torch.triu(torch.tril(torch.ones(n, n)), diagonal=-w + 1).bool()
    assert torch.equal(swa_lib.window_mask(n, swa_lib.from_mistral(w)), production)
    # the 2023 one-file reference's prefill mask, diagonal=-W, kept one key more
    one_file_prefill = torch.triu(torch.tril(torch.ones(n, n)), diagonal=-w).bool()
    assert torch.equal(swa_lib.window_mask(n, (w, 0)), one_file_prefill)
    with pytest.raises(ValueError, match="causal"):
        swa_lib.to_mistral((3, 1))
    with pytest.raises(ValueError, match="sliding_window must be >= 1, got 0"):
        swa_lib.from_mistral(0)


def test_mistral_model_in_transformers_sees_what_from_mistral_says():
    transformers = pytest.importorskip("transformers")
    w, n = 3, 11
    cfg = transformers.MistralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=w, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.MistralModel._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        weights = model(torch.randint(0, 32, (1, n)), output_attentions=True).attentions[0][0]
    seen = weights.abs().sum(0) > 0
    assert torch.equal(seen, swa_lib.window_mask(n, swa_lib.from_mistral(w)))


def test_flash_attn_convention():
    assert swa_lib.from_flash_attn((128, 0)) == (128, 0)
    assert swa_lib.from_flash_attn((-1, -1)) == (UNBOUNDED, UNBOUNDED)
    assert swa_lib.to_flash_attn((UNBOUNDED, 0)) == (-1, 0)
    with pytest.raises(ValueError, match="window_size left must be >= -1, got -2"):
        swa_lib.from_flash_attn((-2, 0))
    # flash_attn_func's documented formula, with seqlen_q < seqlen_k (bottom-right aligned)
    n_q, n_k, (wl, wr) = 3, 8, (2, 1)
    p = AttentionPattern(*swa_lib.from_flash_attn((wl, wr)))
    m = p.mask(n_q, n_k)[0, 0]
    for i in range(n_q):
        lo, hi = i + n_k - n_q - wl, i + n_k - n_q + wr
        assert [j for j in range(n_k) if m[i, j]] == [j for j in range(n_k) if lo <= j <= hi]


def test_hf_transformers_convention_against_installed_library():
    masking_utils = pytest.importorskip("transformers.masking_utils")
    w = 4
    overlay = masking_utils.sliding_window_overlay(w)
    n = 10
    expected = torch.tensor(
        [[bool(overlay(0, 0, i, j)) and j <= i for j in range(n)] for i in range(n)]
    )
    assert torch.equal(swa_lib.window_mask(n, swa_lib.from_hf(w)), expected)
    assert swa_lib.to_hf(swa_lib.from_hf(w)) == w


def test_longformer_convention_against_installed_library():
    lf = pytest.importorskip("transformers.models.longformer.modeling_longformer")
    from transformers import LongformerConfig

    cfg = LongformerConfig(hidden_size=8, num_attention_heads=2, attention_window=[6], num_hidden_layers=1)
    layer = lf.LongformerSelfAttention(cfg, layer_id=0)
    assert (layer.one_sided_attn_window_size,) * 2 == swa_lib.from_longformer(6)


def test_conventions_table_is_consistent():
    names = [row[0] for row in swa_lib.CONVENTIONS]
    assert names[0] == "swa_lib" and len(set(names)) == len(names)
    # keys seen by a query in the middle of a long sequence, per the converters
    def keys(window):
        return window[0] + window[1] + 1

    assert keys(swa_lib.from_longformer(8)) == 8 + 1
    assert keys(swa_lib.from_mistral(8)) == 8
    assert keys(swa_lib.from_hf(8)) == 8
