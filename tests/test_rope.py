"""RoPE: the vectorised rotation against the complex-number loop, and the relative-position property."""

import pytest
import torch

from swa_lib.rope import apply_rope, apply_rope_reference, rope_cos_sin, rope_frequencies, rotate


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


@pytest.mark.parametrize("fn", [apply_rope, apply_rope_reference])
@pytest.mark.parametrize(
    "x, positions, kwargs, error, match",
    [
        # integer x would be rotated in integer arithmetic (cos/sin rounded to 0 or 1)
        (torch.arange(16).view(1, 1, 2, 8), torch.tensor([0, 1]), {}, TypeError, r"x must be a floating-point.*int64"),
        (None, torch.arange(5), {}, TypeError, r"x must be a torch.Tensor.*NoneType"),
        (torch.randn(1, 4, 8), torch.arange(4), {}, ValueError, r"x must have 4 dims \(B, H, N, D\), got 3 dims with shape \(1, 4, 8\)"),
        (torch.randn(1, 1, 5, 8), None, {}, TypeError, r"positions must be integers.*None"),
        (torch.randn(1, 1, 5, 8), "abc", {}, TypeError, r"positions must be integers.*'abc'"),
        (torch.randn(1, 1, 5, 8), torch.arange(5) * 1j, {}, TypeError, r"positions must be integers.*complex"),
        # a batch of positions must match x's batch: neither broadcast nor a torch size error
        (torch.randn(1, 2, 5, 8), torch.arange(5).expand(3, 5), {}, ValueError,
         r"positions.*\(3, 5\).*x.*\(1, 2, 5, 8\)"),
        (torch.randn(3, 2, 5, 8), torch.arange(5).expand(2, 5), {}, ValueError,
         r"positions.*\(2, 5\).*x.*\(3, 2, 5, 8\)"),
        (torch.randn(1, 1, 5, 8), torch.arange(5), {"base": None}, TypeError, r"base.*None"),
        (torch.randn(1, 1, 5, 8), torch.arange(5), {"base": torch.tensor([1e4, 2.0])}, TypeError, r"base.*Tensor"),
        (torch.randn(1, 1, 5, 8), torch.arange(5), {"base": True}, TypeError, r"base.*bool"),
        (torch.randn(1, 1, 5, 8), torch.arange(5), {"base": float("inf")}, ValueError, r"base.*inf"),
        (torch.randn(1, 1, 5, 8), torch.arange(5), {"base": 1.0}, ValueError, r"base.*1\.0"),
        (torch.randn(1, 1, 5, 7), torch.arange(5), {}, ValueError, r"even head dimension, got 7"),
    ],
)
def test_apply_rope_bad_arguments(fn, x, positions, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(x, positions, **kwargs)


def test_valid_base_and_positions_forms_still_work():
    x = torch.randn(2, 1, 3, 4, dtype=torch.float64)
    expected = apply_rope(x, torch.tensor([0, 1, 2]), 10000.0)
    assert torch.equal(apply_rope(x, [0, 1, 2], 10000), expected)
    assert torch.equal(apply_rope(x, torch.tensor([0, 1, 2]), torch.tensor(10000.0, dtype=torch.float64)), expected)
    assert torch.equal(apply_rope(x, torch.tensor([[0, 1, 2]] * 2)), expected)


@pytest.mark.parametrize(
    "positions, kwargs, error, match",
    [
        ([0, 1, 2], {}, TypeError, r"positions must be an integer torch.Tensor, got list"),
        (torch.arange(3.0), {}, TypeError, r"positions must be integers, got dtype torch.float32"),
        (torch.tensor([True, False]), {}, TypeError, r"positions must be integers, got dtype torch.bool"),
        (torch.arange(3), {"dtype": torch.int32}, TypeError, r"dtype must be a floating-point.*int32"),
        (torch.arange(3), {"dtype": "float32"}, TypeError, r"dtype must be a floating-point.*'float32'"),
        (torch.arange(3), {"base": None}, TypeError, r"base.*None"),
    ],
)
def test_rope_cos_sin_bad_arguments(positions, kwargs, error, match):
    with pytest.raises(error, match=match):
        rope_cos_sin(positions, 8, **kwargs)


@pytest.mark.parametrize(
    "x, cos, sin, error, match",
    [
        (torch.randn(1, 1, 2, 7), torch.ones(2, 7), torch.zeros(2, 7), ValueError,
         r"even head dimension D, got x of shape \(1, 1, 2, 7\)"),
        (torch.randn(1, 1, 5, 8), *rope_cos_sin(torch.arange(4), 8), ValueError,
         r"cos and sin must have shape \(N, D\) = \(5, 8\).*got \(4, 8\)"),
        (torch.randn(1, 1, 5, 8), *rope_cos_sin(torch.arange(5), 4), ValueError, r"cos and sin.*got \(5, 4\)"),
        (torch.randn(1, 2, 5, 8), *rope_cos_sin(torch.arange(5).expand(3, 5)[:, None], 8), ValueError,
         r"cos and sin.*x of shape \(1, 2, 5, 8\), got \(3, 1, 5, 8\)"),
        (torch.randn(1, 1, 5, 8), torch.ones(5, 8), torch.zeros(4, 8), ValueError,
         r"cos and sin must have the same shape, got \(5, 8\) and \(4, 8\)"),
        (torch.randn(1, 1, 5, 8), torch.ones(5, 8, dtype=torch.long), torch.zeros(5, 8), TypeError, r"cos.*int64"),
        (torch.randn(1, 1, 5, 8), torch.ones(5, 8), None, TypeError, r"sin must be a torch.Tensor, got NoneType"),
        (torch.arange(40).view(1, 1, 5, 8), torch.ones(5, 8), torch.zeros(5, 8), TypeError, r"x must be.*int64"),
        (torch.randn(5, 8), torch.ones(5, 8), torch.zeros(5, 8), ValueError, r"x must have 4 dims"),
    ],
)
def test_rotate_bad_arguments(x, cos, sin, error, match):
    with pytest.raises(error, match=match):
        rotate(x, cos, sin)


def test_rotate_accepts_both_table_shapes():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    pos = torch.arange(5)
    torch.testing.assert_close(rotate(x, *rope_cos_sin(pos, 8, dtype=x.dtype)), apply_rope(x, pos), rtol=0, atol=0)
    cos, sin = rope_cos_sin(pos.expand(2, 5), 8, dtype=x.dtype)
    torch.testing.assert_close(rotate(x, cos[:, None], sin[:, None]), apply_rope(x, pos), rtol=0, atol=0)
