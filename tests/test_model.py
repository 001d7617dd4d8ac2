"""The tiny LM: cached decoding (rolling buffer, chunked prefill) equals the full band-masked pass."""

import pytest
import torch

from swa_lib.kv_cache import FullKVCache, RollingKVCache
from swa_lib.lab.model import BOS, ModelConfig, TinyLM, decode, encode
from swa_lib.lab.training import TrainConfig, make_batches, train


def tiny(windows=(3, 5, None), heads=4, heads_kv=2, dim=32, seed=0):
    torch.manual_seed(seed)
    return TinyLM(ModelConfig(dim=dim, heads=heads, heads_kv=heads_kv, windows=windows)).eval()


@pytest.mark.parametrize("windows", [(4, 4), (3, 7, 5), (5, None)])
@pytest.mark.parametrize("chunk", [1, 3, 5, 8])
def test_rolling_decode_equals_full_forward(windows, chunk):
    """N is 3-5x the largest window; B > 1; GQA; fp32 to 1e-5."""
    model = tiny(windows)
    w = max(x for x in windows if x is not None) + 1  # slots of the largest rolling cache
    n = 4 * w + 3
    tokens = torch.randint(0, 257, (3, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        full = model(tokens)  # (B, N, vocab): one pass with each layer's band mask
        caches = model.new_caches(3, max_chunk=chunk)
        chunked = model.prefill(tokens, caches, chunk_size=chunk)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)
    assert [type(c) for c in caches] == [FullKVCache if x is None else RollingKVCache for x in windows]
    for c, x in zip(caches, windows):
        if x is not None:
            assert c.k.shape == (3, 2, x + 1, 8)


def test_prefill_then_token_by_token():
    model = tiny((4, 6))
    tokens = torch.randint(0, 257, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
        caches = model.new_caches(2, max_chunk=7)
        first = model.prefill(tokens[:, :11], caches, chunk_size=7)
        rest = [model(tokens[:, i:i + 1], start=i, caches=caches) for i in range(11, 30)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, rtol=0, atol=1e-5)


def test_band_mask_limits_the_receptive_field():
    """Logits at position i depend on tokens i - sum(windows) .. i only (one hop per layer)."""
    model = tiny((2, 3))
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    changed = tokens.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    diff = (a - b).abs().amax(-1)[0]  # (N,)
    assert diff[:4].max() == 0 and diff[4 + 5 + 1:].max() == 0  # reach = 2 + 3
    assert diff[4 + 5] > 0


@pytest.mark.parametrize("backend", ["dense", "sdpa"])
def test_backends_agree_forward_and_gradients(backend):
    model = tiny((3, None))
    tokens = torch.randint(0, 257, (2, 13), generator=torch.Generator().manual_seed(1))
    ref = model(tokens, backend="loop")
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = model(tokens, backend=backend)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for g, r in zip((p.grad for p in model.parameters()), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_generation_uses_the_caches_consistently():
    model = tiny((4, 4))
    a = model.generate("def f(x):", 40, cache="rolling")
    b = model.generate("def f(x):", 40, cache="full")  # a growing cache + band mask: same result
    c = model.generate("def f(x):", 40, cache="rolling", chunk_size=2)
    assert a == b == c and len(a.encode("utf-8", errors="replace")) > 0
    s1 = model.generate("x", 20, temperature=1.0, seed=1)
    s2 = model.generate("x", 20, temperature=1.0, seed=1)
    assert s1 == s2


def test_prompt_too_long_without_chunking():
    model = tiny((4, 4))
    caches = model.new_caches(1)
    with pytest.raises(ValueError, match="max_chunk=5"):
        model.prefill(encode("a prompt longer than five bytes")[None], caches)
    assert model.prefill(encode("ok")[None], model.new_caches(1)).shape == (1, 3, 257)


def test_tokenizer_round_trip():
    t = encode("héllo")
    assert t[0] == BOS and t.dtype == torch.long and t.numel() == 1 + len("héllo".encode())
    assert decode(t) == "héllo"


def test_misuse_errors():
    model = tiny((4, 4))
    with pytest.raises(TypeError, match="float32"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="257"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.tensor([1, 2]))
    caches = model.new_caches(1)
    with pytest.raises(ValueError, match="start=3"):
        model(torch.tensor([[1]]), start=3, caches=caches)
    with pytest.raises(ValueError, match="one cache per layer"):
        model(torch.tensor([[1]]), caches=caches[:1])
    with pytest.raises(ValueError, match="'paged'"):
        model.new_caches(1, "paged")
    with pytest.raises(ValueError, match="-1"):
        ModelConfig(windows=(-1,))
    with pytest.raises(ValueError, match="heads_kv"):
        ModelConfig(dim=32, heads=4, heads_kv=3)
    # a cache built for another window is refused
    bad = [RollingKVCache(1, 2, 9, 8) for _ in range(2)]
    with pytest.raises(ValueError, match="window"):
        model(torch.tensor([[1]]), caches=bad)


@pytest.mark.slow
def test_training_reduces_loss():
    model = tiny((None, None), dim=32)
    text = "def add(a, b):\n    return a + b\n" * 50
    hist = train(model, text, TrainConfig(steps=40, batch=8, context=16, log_every=20, progress=False))
    assert len(hist) == 2 and hist[-1][1] < 0.85 * hist[0][1]  # measured: 5.21 -> 4.07 nats


def test_batches_start_with_bos():
    data = torch.arange(100) % 256
    b = make_batches(data, 4, 10, torch.Generator().manual_seed(0))
    assert b.shape == (4, 11) and (b[:, 0] == BOS).all()
    assert ((b[:, 2:] - b[:, 1:-1]) == 1).all()  # consecutive bytes


def test_training_corpus_is_shipped_and_the_same_on_every_python():
    """The tiny LM's text comes from swa_lib/lab/data, not from the running Python's standard library
    (whose files change between versions), so stored results do not depend on the Python."""
    import hashlib

    from swa_lib.lab.training import HELDOUT_FILES, TRAIN_FILES, corpus_text

    digests = {files: hashlib.sha256(corpus_text(files).encode()).hexdigest()[:16]
               for files in (TRAIN_FILES, HELDOUT_FILES)}
    assert digests == {TRAIN_FILES: "02a0133ea94a4dbc", HELDOUT_FILES: "3102460238588683"}
    assert not set(TRAIN_FILES) & set(HELDOUT_FILES)
    with pytest.raises(ValueError, match="nope.py"):
        corpus_text(["nope.py"])
