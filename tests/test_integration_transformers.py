"""swa_lib as a Hugging Face transformers attention implementation, against eager attention.

Tiny random models built from configs (nothing is downloaded): Mistral (every layer sliding),
Qwen2 (full and sliding layers mixed by ``layer_types``), Gemma 2 (local and global layers
alternating, attention soft-capping off: swa_lib has none) and Gemma 3 (alternating, with a
non-default score scale). Each pair of models shares one state dict; the eager model is the
ground truth. fp32 throughout: the two differ only in the order of floating-point sums, up to
about 2e-6 on logits of standard deviation about 0.6, so 1e-5 is tight.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from swa_lib.integrations import transformers as swa_hf  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    causal_mask_function,
    chunked_causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

WINDOW = 5  # transformers' sliding_window: each query sees 5 keys, itself included
ATOL = 1e-5
COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.1)
ALTERNATING = ["sliding_attention", "full_attention"] * 2


def _configs():
    return {
        "mistral": (transformers.MistralForCausalLM,
                    transformers.MistralConfig(sliding_window=WINDOW, head_dim=8, **COMMON)),
        "qwen2": (transformers.Qwen2ForCausalLM,
                  transformers.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, **COMMON,
                                           layer_types=["full_attention", "sliding_attention",
                                                        "sliding_attention", "full_attention"])),
        "gemma2": (transformers.Gemma2ForCausalLM,
                   transformers.Gemma2Config(sliding_window=WINDOW, head_dim=8, query_pre_attn_scalar=11,
                                             attn_logit_softcapping=None, layer_types=ALTERNATING, **COMMON)),
        "gemma3": (transformers.Gemma3ForCausalLM,
                   transformers.Gemma3TextConfig(sliding_window=WINDOW, head_dim=8, query_pre_attn_scalar=11,
                                                 layer_types=ALTERNATING, **COMMON)),
    }


MODELS = list(_configs())


def _pair(name, configs=None):
    """(eager, swa_lib) models of one architecture with the same weights, in eval mode."""
    swa_hf.register()
    cls, cfg = (configs or _configs())[name]
    torch.manual_seed(0)
    # one config object each: from_config keeps the config it gets and writes the implementation
    # into it, so a shared config would turn the eager model into a second swa_lib one
    build = transformers.AutoModelForCausalLM.from_config
    eager = build(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = build(copy.deepcopy(cfg), attn_implementation="swa_lib").eval()
    assert type(eager) is type(ours) is cls
    ours.load_state_dict(eager.state_dict())
    assert (eager.config._attn_implementation, ours.config._attn_implementation) == ("eager", "swa_lib")
    return eager, ours


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    return request.param, _pair(request.param)


def _ids(batch=2, n=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, COMMON["vocab_size"], (batch, n), generator=g)


def test_register_binds_the_backend_and_refuses_unknown_names():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    swa_hf.register()
    swa_hf.register()
    fn = AttentionInterface._global_mapping["swa_lib"]
    assert fn.func is swa_hf.swa_lib_attention and fn.keywords == {"backend": "auto"}
    assert AttentionMaskInterface._global_mapping["swa_lib"] is swa_hf.swa_lib_mask
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        swa_hf.register(backend="fastest")
    assert AttentionInterface._global_mapping["swa_lib"].keywords == {"backend": "auto"}


def test_register_refuses_a_transformers_without_query_offsets(monkeypatch):
    import transformers.masking_utils as masking_utils

    def old_sdpa_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None):
        """The signature before transformers dropped cache_position from the mask API."""

    monkeypatch.setattr(masking_utils, "sdpa_mask", old_sdpa_mask)
    with pytest.raises(ImportError, match=f"found transformers {transformers.__version__}"):
        swa_hf.register()


def test_layer_window():
    assert swa_hf.layer_window(WINDOW) == (WINDOW - 1, 0)
    assert swa_hf.layer_window(None) == (swa_hf.UNBOUNDED, 0)


@torch.no_grad()
def test_logits_match_eager_without_padding(pair):
    _, (eager, ours) = pair
    ids = _ids()  # 23 tokens: more than four windows
    diff = (eager(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < ATOL, diff


@torch.no_grad()
def test_logits_match_eager_with_left_and_right_padding(pair):
    _, (eager, ours) = pair
    ids = _ids(batch=3)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as in generate
    mask[1, -6:] = 0  # right padding, as in a training batch
    real = mask.bool()  # padded positions' outputs are never used (eager averages there, swa_lib gives 0)
    diff = (eager(ids, attention_mask=mask).logits - ours(ids, attention_mask=mask).logits)[real]
    assert diff.abs().max().item() < ATOL


@torch.no_grad()
def test_cached_prefill_then_chunk_matches_eager(pair):
    """12 tokens into a cache (sliding layers keep only their window), then 7 more at once:
    fewer queries than keys, keys cut to the window, left padding in one row."""
    _, (eager, ours) = pair
    ids = _ids(n=19, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    outs = []
    for model in (eager, ours):
        cache = transformers.DynamicCache(config=model.config)
        first = model(ids[:, :12], attention_mask=mask[:, :12], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, 12:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
        outs.append((first[mask[:, :12].bool()], second))
    assert min(layer.keys.shape[2] for layer in cache.layers) == WINDOW - 1  # sliding layers were cut
    for a, b in zip(*outs):
        assert (a - b).abs().max().item() < ATOL


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_eager(pair, cache):
    """Greedy decoding for three windows' worth of tokens, one prompt left-padded; the static
    cache hands attention all its slots, the unused ones masked. The tokens are identical and
    so, to fp32 tolerance, are the logits of every step (tiny random models repeat tokens, so
    the logits are the sharper check)."""
    _, (eager, ours) = pair
    prompt = _ids(n=8, seed=3)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=3 * WINDOW, do_sample=False, pad_token_id=0,
                  cache_implementation=cache, return_dict_in_generate=True, output_logits=True)
    expected = eager.generate(prompt, **kwargs)
    got = ours.generate(prompt, **kwargs)
    assert expected.sequences.shape == (2, 8 + 3 * WINDOW)
    assert torch.equal(expected.sequences, got.sequences)
    assert len(got.logits) == 3 * WINDOW
    assert max((a - b).abs().max().item() for a, b in zip(expected.logits, got.logits)) < ATOL


@torch.no_grad()
def test_every_layer_calls_swa_lib_with_its_window(pair, monkeypatch):
    name, (_, ours) = pair
    calls = []
    inner = swa_hf.sliding_window_attention

    def spy(q, k, v, window, **kwargs):
        calls.append((window, k.shape[1], q.shape[1], kwargs["backend"]))
        return inner(q, k, v, window, **kwargs)

    monkeypatch.setattr(swa_hf, "sliding_window_attention", spy)
    ours(_ids())
    types = ours.config.layer_types if name != "mistral" else ["sliding_attention"] * 4
    expected = [((WINDOW - 1, 0) if t == "sliding_attention" else (swa_hf.UNBOUNDED, 0), 2, 4, "auto")
                for t in types]
    assert calls == expected  # one call per layer, GQA passed through (2 key heads, 4 query heads)
    if name != "mistral":
        assert {"sliding_attention", "full_attention"} <= set(types)  # mixed models keep full layers full


@torch.no_grad()
def test_register_with_a_named_backend(monkeypatch):
    eager, ours = _pair("qwen2")
    seen = []
    inner = swa_hf.sliding_window_attention
    monkeypatch.setattr(swa_hf, "sliding_window_attention",
                        lambda *a, **kw: seen.append(kw["backend"]) or inner(*a, **kw))
    try:
        swa_hf.register(backend="dense")
        ids = _ids()
        assert (eager(ids).logits - ours(ids).logits).abs().max().item() < ATOL
    finally:
        swa_hf.register()
    assert seen == ["dense"] * 4


@torch.no_grad()
def test_a_model_that_does_not_pass_sliding_window():
    """PhiMoE calls attention without ``sliding_window``; its layers' mask is still sliding
    (config.sliding_window), so the window must come from the config, not default to full."""
    cfg = transformers.PhimoeConfig(sliding_window=WINDOW, num_local_experts=2, num_experts_per_tok=1,
                                    **{**COMMON, "num_hidden_layers": 2})
    eager, ours = _pair("phimoe", {"phimoe": (transformers.PhimoeForCausalLM, cfg)})
    ids = _ids()
    assert (eager(ids).logits - ours(ids).logits).abs().max().item() < ATOL


@torch.no_grad()
def test_the_window_changes_the_logits():
    """The same weights with no sliding window give other logits: the window is not a no-op."""
    eager, ours = _pair("mistral")
    cfg = copy.deepcopy(eager.config)
    cfg.sliding_window = None
    full = transformers.MistralForCausalLM._from_config(cfg, attn_implementation="swa_lib").eval()
    full.load_state_dict(eager.state_dict())
    ids = _ids()
    assert (ours(ids).logits - full(ids).logits)[:, WINDOW:].abs().max().item() > 1e-3
    assert (ours(ids).logits - full(ids).logits)[:, :WINDOW].abs().max().item() < ATOL


@torch.no_grad()
def test_set_attn_implementation_switches_an_existing_model():
    eager, _ = _pair("qwen2")
    ids = _ids()
    expected = eager(ids).logits
    eager.set_attn_implementation("swa_lib")
    assert eager.config._attn_implementation == "swa_lib"
    assert (eager(ids).logits - expected).abs().max().item() < ATOL


@pytest.mark.parametrize("q_len, kv_len, q_offset, kv_offset", [(300, 300, 0, 0), (1, 5, 9, 5), (7, 11, 12, 8)])
def test_the_mask_builder_skips_plain_windows(q_len, kv_len, q_offset, kv_offset):
    """No padding and the queries last: None (swa_lib computes the window itself), including
    more query rows than one check block and the offsets of a sliding cache."""
    for fn, local in ((causal_mask_function, None), (sliding_window_causal_mask_function(WINDOW), WINDOW)):
        assert swa_hf.swa_lib_mask(2, q_len, kv_len, q_offset, kv_offset, fn, local_size=local) is None
        ones = torch.ones(2, kv_offset + kv_len, dtype=torch.bool)
        assert swa_hf.swa_lib_mask(2, q_len, kv_len, q_offset, kv_offset, fn, ones, local_size=local) is None


def test_the_mask_builder_returns_transformers_mask_otherwise():
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[0, :3] = False
    fn = sliding_window_causal_mask_function(WINDOW)
    got = swa_hf.swa_lib_mask(2, 9, 9, 0, 0, fn, pad, local_size=WINDOW)
    expected = sdpa_mask(2, 9, 9, 0, 0, fn, pad, allow_is_causal_skip=False)
    assert got.dtype == torch.bool and torch.equal(got, expected)
    # a static cache: 16 slots, the queries are not the last of them
    got = swa_hf.swa_lib_mask(1, 3, 16, 4, 0, causal_mask_function)
    assert torch.equal(got, sdpa_mask(1, 3, 16, 4, 0, causal_mask_function, allow_is_causal_skip=False))


def test_a_chunked_mask_is_not_mistaken_for_a_window():
    """Llama 4's chunked attention passes its chunk size as local_size: the mask is returned and
    the attention function refuses it instead of computing a sliding window."""
    fn = chunked_causal_mask_function(3, torch.zeros(1, dtype=torch.long))
    mask = swa_hf.swa_lib_mask(1, 10, 10, 0, 0, fn, local_size=3)
    assert mask is not None and not bool(mask[0, 0, 3, 2])  # query 3 starts a chunk
    q = k = v = torch.randn(1, 2, 10, 8)
    with pytest.raises(NotImplementedError, match="not the causal window"):
        swa_hf.swa_lib_attention(torch.nn.Module(), q, k, v, mask, sliding_window=3)


def test_gemma2_softcap_raises_naming_the_value():
    swa_hf.register()
    cfg = transformers.Gemma2Config(sliding_window=WINDOW, head_dim=8, **COMMON)  # softcap 50 by default
    model = transformers.Gemma2ForCausalLM._from_config(cfg, attn_implementation="swa_lib").eval()
    with pytest.raises(NotImplementedError, match="softcap=50.0"):
        model(_ids(n=7))


def test_dropout_while_training_raises():
    swa_hf.register()
    cls, cfg = _configs()["mistral"]
    cfg.attention_dropout = 0.1
    model = cls._from_config(cfg, attn_implementation="swa_lib").train()
    with pytest.raises(NotImplementedError, match="dropout=0.1"):
        model(_ids(n=7))


def test_padding_inside_a_sequence_raises():
    _, ours = _pair("mistral")
    ids = _ids(n=9)
    mask = torch.ones_like(ids)
    mask[0, 4] = 0  # a hole: valid tokens on both sides
    with pytest.raises(NotImplementedError, match="batch row 0"):
        with torch.no_grad():
            ours(ids, attention_mask=mask)


def test_packed_documents_raise():
    """position_ids restarting mid-row mean packed documents: refused, not silently crossed."""
    _, ours = _pair("mistral")
    ids = _ids(batch=1, n=10)
    position_ids = torch.cat([torch.arange(6), torch.arange(4)])[None]
    with pytest.raises(NotImplementedError, match="packed documents"):
        with torch.no_grad():
            ours(ids, position_ids=position_ids, use_cache=False)  # packing is detected without a cache
