"""RoPE: the vectorised rotation against the complex-number loop, and the relative-position property."""

import pytest
import torch

from swa_lib.rope import apply_rope, apply_rope_reference, rope_frequencies


@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 3, 7, 8), (1, 2, 13, 6)])
def test_matches_complex_reference(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 5000, (shape[2],), generator=g)
    torch.testing.assert_close(apply_rope(x, pos), apply_rope_reference(x, pos), rtol=0, atol=1e-12)
    pos2 = torch.randint(0, 5000, (shape[0], shape[2]), generator=g)
    torch.testing.assert_close(apply_rope(x, pos2), apply_rope_reference(x, pos2), rtol=0, atol=1e-12)


def test_position_zero_is_identity_and_norm_is_kept():
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, torch.zeros(5, dtype=torch.long)), x)
    y = apply_rope(x, torch.arange(100, 105))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(y, x)


def test_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 6, 32, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 6, 32, generator=g, dtype=torch.float64)
    pq, pk = torch.tensor([5, 9, 17, 40, 41, 63]), torch.tensor([0, 3, 17, 2, 40, 60])
    base = (apply_rope(q, pq) * apply_rope(k, pk)).sum(-1)
    for shift in (1, 37, 10_000):
        shifted = (apply_rope(q, pq + shift) * apply_rope(k, pk + shift)).sum(-1)
        torch.testing.assert_close(shifted, base, rtol=0, atol=1e-9)
    # ... and the score does change with the distance
    other = (apply_rope(q, pq + 1) * apply_rope(k, pk)).sum(-1)
    assert (other - base).abs().max() > 1e-3


def test_fp32_matches_fp64_at_large_positions():
    x = torch.randn(1, 1, 4, 64, dtype=torch.float64)
    pos = torch.tensor([0, 10_000, 100_000, 1_000_000])
    torch.testing.assert_close(apply_rope(x.float(), pos).double(), apply_rope(x, pos), rtol=0, atol=1e-5)


def test_frequencies():
    f = rope_frequencies(8, 10000.0)
    torch.testing.assert_close(f, torch.tensor([1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75], dtype=torch.float64))


@pytest.mark.parametrize("dim", [0, 3, -2])
def test_bad_head_dim(dim):
    with pytest.raises(ValueError, match=str(dim)):
        rope_frequencies(dim)


def test_bad_positions():
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="float"):
        apply_rope(x, torch.arange(4.0))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        apply_rope(x, torch.arange(5))
    with pytest.raises(ValueError, match="shape"):
        apply_rope(torch.randn(4, 8), torch.arange(4))
