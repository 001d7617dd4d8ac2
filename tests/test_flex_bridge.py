"""The FlexAttention bridge: one AttentionPattern, the same attention on swa_lib and FlexAttention.

For every feature (windows causal, symmetric, empty and wider than the sequence; dilation, one
and per head; sinks; global tokens per batch row; all at once), with as many queries as keys,
fewer (chunked prefill) and one (decoding), with grouped-query heads and awkward lengths:

- the ``mask_mod`` evaluated by torch's own ``create_mask`` is exactly ``pattern.mask``;
- the ``BlockMask`` lists exactly the tiles holding an allowed pair, and as full exactly the
  tiles where every pair is allowed;
- eager ``flex_attention`` (PyTorch's dense reference) equals ``sliding_window_attention`` in
  float64, and compiled ``flex_attention``, which skips the tiles the BlockMask leaves out,
  equals it in float32.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swa_lib
from swa_lib.integrations import flex

torch_flex = pytest.importorskip("torch.nn.attention.flex_attention")

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ROOT = Path(__file__).resolve().parent.parent
B, H, H_KV, D = 2, 4, 2, 8
TILE = 16  # small tiles, so a short sequence has skipped, partial and full ones


def _global(n_k):
    g = torch.zeros(B, n_k, dtype=torch.bool)
    g[0, [3, n_k // 2]] = True  # two global tokens in row 0, one elsewhere in row 1
    g[1, n_k - 5] = True
    return g


#: name -> (window, keyword arguments of sliding_window_attention, given n_k)
FEATURES = {
    "causal": ((8, 0), lambda n: {}),
    "symmetric": ((5, 5), lambda n: {}),
    "window 0": ((0, 0), lambda n: {}),
    "wider than N": ((10**12, 10**12), lambda n: {}),
    "dilation": ((12, 12), lambda n: {"dilation": 3}),
    "dilation per head": ((9, 0), lambda n: {"dilation": (1, 2, 3, 4)}),
    "sinks": ((6, 0), lambda n: {"sinks": 4}),
    "global tokens": ((4, 4), lambda n: {"global_tokens": _global(n)}),
    "everything": ((7, 2), lambda n: {"dilation": (1, 2, 3, 4), "sinks": 3, "global_tokens": _global(n)}),
}
LENGTHS = [(97, 97), (37, 113), (1, 61)]  # (N_q, N_k): self-attention, chunked prefill, decoding


def _case(feature, n_q, n_k, dtype=torch.float64, seed=0):
    window, extra = FEATURES[feature]
    kwargs = extra(n_k)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n_q, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H_KV, n_k, D, generator=g, dtype=dtype) for _ in range(2))
    pattern = swa_lib.make_pattern(window, batch=B, heads=H, n=n_k, **kwargs)
    return q, k, v, window, kwargs, pattern


@pytest.mark.parametrize("n_q, n_k", LENGTHS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_mask_mod_is_the_pattern(feature, n_q, n_k):
    *_, pattern = _case(feature, n_q, n_k)
    got = torch_flex.create_mask(flex.to_mask_mod(pattern, n_q, n_k, device="cpu"), B, H, n_q, n_k, "cpu")
    expected = pattern.mask(n_q, n_k, num_heads=H).expand(B, H, n_q, n_k)
    assert got.dtype == torch.bool and torch.equal(got, expected)


def _tiles(mask: torch.Tensor, reduce) -> torch.Tensor:
    """``reduce`` (any / all) over each TILE x TILE tile of a (B, H, N_q, N_k) mask, the edges
    padded with False as create_block_mask pads them."""
    n_q, n_k = mask.shape[-2:]
    padded = torch.nn.functional.pad(mask, (0, -n_k % TILE, 0, -n_q % TILE))
    b, h, rows, cols = padded.shape
    tiles = padded.view(b, h, rows // TILE, TILE, cols // TILE, TILE).transpose(3, 4)
    return reduce(reduce(tiles, -1), -1)


def _full_tiles(block_mask) -> torch.Tensor:
    """The tiles a BlockMask marks full, as a dense (B, H, rows, cols) bool tensor."""
    counts, indices = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    rows, cols = counts.shape[-1], -(-block_mask.shape[-1] // TILE)  # tiles down, tiles across
    dense = torch.zeros(*counts.shape[:2], rows, cols, dtype=torch.bool)
    for b, h, r in torch.cartesian_prod(*(torch.arange(s) for s in counts.shape)).tolist():
        dense[b, h, r, indices[b, h, r, :counts[b, h, r]]] = True
    return dense


@pytest.mark.parametrize("n_q, n_k", LENGTHS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_block_mask_lists_exactly_the_tiles_in_use(feature, n_q, n_k):
    *_, pattern = _case(feature, n_q, n_k)
    block_mask = flex.to_block_mask(pattern, n_q, n_k, device="cpu", block_size=TILE)
    batch = B if pattern.global_tokens is not None else 1
    heads = H if not isinstance(pattern.dilation, int) else 1
    assert block_mask.shape == (batch, heads, n_q, n_k)
    mask = pattern.mask(n_q, n_k, num_heads=heads)  # (batch, heads, N_q, N_k)
    assert torch.equal(block_mask.to_dense().bool(), _tiles(mask, torch.any))  # partial or full
    assert torch.equal(_full_tiles(block_mask), _tiles(mask, torch.all))


def test_a_narrow_window_skips_tiles():
    pattern = swa_lib.make_pattern((8, 0), n=256)
    block_mask = flex.to_block_mask(pattern, 256, device="cpu", block_size=TILE)
    assert int(block_mask.to_dense().sum()) == 16 + 15  # the diagonal tiles and the ones below them
    assert block_mask.sparsity() > 80


@pytest.mark.parametrize("n_q, n_k", LENGTHS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_flex_attention_equals_swa_lib(feature, n_q, n_k):
    q, k, v, window, kwargs, pattern = _case(feature, n_q, n_k)
    expected = swa_lib.sliding_window_attention(q, k, v, window, **kwargs)
    got = flex.flex_attention(q, k, v, pattern)
    assert got.shape == expected.shape == (B, H, n_q, D)
    assert (got - expected).abs().max().item() < 1e-12
    scaled = flex.flex_attention(q, k, v, pattern, scale=0.3)
    assert (scaled - swa_lib.sliding_window_attention(q, k, v, window, scale=0.3, **kwargs)).abs().max() < 1e-12


def test_compiled_flex_attention_skips_tiles_and_agrees():
    """The compiled kernel reads the BlockMask (eager flex_attention only evaluates mask_mod)."""
    q, k, v, window, kwargs, pattern = _case("everything", 37, 113, dtype=torch.float32)
    block_mask = flex.to_block_mask(pattern, 37, 113, num_heads=H, device="cpu", block_size=TILE)
    assert block_mask.sparsity() > 0
    got = torch.compile(torch_flex.flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=True)
    expected = swa_lib.sliding_window_attention(q, k, v, window, **kwargs)
    assert (got - expected).abs().max().item() < 1e-5


def test_a_block_mask_built_once_serves_many_calls():
    q, k, v, window, kwargs, pattern = _case("sinks", 37, 113)
    block_mask = flex.to_block_mask(pattern, 37, 113, device="cpu")
    for x in (q, 2 * q):
        got = flex.flex_attention(x, k, v, pattern, block_mask=block_mask)
        assert (got - swa_lib.sliding_window_attention(x, k, v, window, **kwargs)).abs().max() < 1e-12


def test_errors_name_the_bad_value():
    pattern = swa_lib.AttentionPattern(3, 0, dilation=(1, 2))
    with pytest.raises(TypeError, match=r"must be a swa_lib.AttentionPattern \(see .*\), got tuple"):
        flex.to_mask_mod((3, 0), 8)
    with pytest.raises(ValueError, match="more queries than keys is not supported: n_q=9 > n_k=8"):
        flex.to_mask_mod(pattern, 9, 8)
    with pytest.raises(ValueError, match="n_q must be >= 1, got 0"):
        flex.to_block_mask(pattern, 0, 8, device="cpu")
    with pytest.raises(ValueError, match="pattern.dilation has 2 entries .* but num_heads=4"):
        flex.to_block_mask(pattern, 8, device="cpu", num_heads=4)
    g = swa_lib.AttentionPattern(3, 0, global_tokens=torch.zeros(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="global_tokens has 7 positions but there are n_k=8 keys"):
        flex.to_mask_mod(g, 8)
    q = k = v = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="pattern.dilation has 2 entries"):
        flex.flex_attention(q, k, v, pattern)


def test_importing_swa_lib_loads_neither_transformers_nor_flex():
    code = ("import sys, swa_lib, swa_lib.integrations.flex, swa_lib.integrations.transformers; "
            "print('transformers' in sys.modules, 'torch.nn.attention.flex_attention' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]
