"""Rotary position embeddings (RoPE, Su et al. 2021).

RoPE rotates each pair of channels of a query or key by an angle proportional to the token's
position. Pair ``m`` of a head of dimension ``D`` turns at frequency
``theta_m = base ** (-2m / D)``, so a vector at position ``p`` is rotated by ``p * theta_m``.
Because rotations compose, the score between a query rotated at ``p`` and a key rotated at ``s``
depends only on ``p - s``: attention sees relative positions, which is what lets a KV cache
re-assign positions (the StreamingLLM trick in :mod:`swa_lib.kv_cache`).

Channel layout: the "rotate-half" convention of GPT-NeoX and Llama, in which pair ``m`` is
channels ``(m, m + D/2)``. :func:`apply_rope_reference` spells the rotation out with complex
numbers on that pairing; :func:`apply_rope` is the vectorised form the model uses.
"""

from __future__ import annotations

import math
import numbers

import torch

from .attention import check_tensor
from .masks import check_int

__all__ = ["rope_frequencies", "rope_cos_sin", "rotate", "apply_rope", "apply_rope_reference"]


def rope_frequencies(head_dim: int, base: float = 10000.0, *, device=None) -> torch.Tensor:
    """The ``D/2`` angular frequencies ``base ** (-2m / D)``, in float64 for exact angles."""
    if check_int("head_dim", head_dim, 1) % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    _check_base(base)
    m = torch.arange(head_dim // 2, dtype=torch.float64, device=device)
    return base ** (-2.0 * m / head_dim)  # (D/2,)


def _check_base(base) -> None:
    """A real number (or a 0-dim real tensor) that is finite and > 1, else a TypeError/ValueError naming base."""
    is_scalar_tensor = (isinstance(base, torch.Tensor) and base.ndim == 0
                        and not base.dtype.is_complex and base.dtype != torch.bool)
    if isinstance(base, bool) or not (isinstance(base, numbers.Real) or is_scalar_tensor):
        raise TypeError(f"RoPE base must be a real number, got {type(base).__name__} {base!r}")
    if not math.isfinite(base) or not base > 1:
        raise ValueError(f"RoPE base must be a finite number > 1, got {base!r}")


def _check_positions_dtype(pos: torch.Tensor) -> None:
    if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
        raise TypeError(f"positions must be integers, got dtype {pos.dtype}")


def _positions(positions, x: torch.Tensor) -> torch.Tensor:
    """``positions`` for ``x (B, H, N, D)`` as an integer tensor ``(N,)`` or ``(B, N)`` on x's device."""
    b, n = x.shape[0], x.shape[2]
    if positions is None:
        raise TypeError(f"positions must be integers of shape ({n},) or ({b}, {n}), got None")
    try:
        pos = torch.as_tensor(positions, device=x.device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"positions must be integers of shape ({n},) or ({b}, {n}), "
                        f"got {type(positions).__name__} {positions!r}") from err
    _check_positions_dtype(pos)
    if pos.ndim not in (1, 2) or pos.shape[-1] != n:
        raise ValueError(f"positions must have shape ({n},) or (B, {n}), got {tuple(pos.shape)}")
    if pos.ndim == 2 and pos.shape[0] != b:
        raise ValueError(f"positions of shape (B, N) must match the batch of x: positions has shape "
                         f"{tuple(pos.shape)}, x has shape {tuple(x.shape)}")
    return pos


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0, *, dtype=torch.float32):
    """``cos`` and ``sin`` tables of shape ``(..., N, D)`` for the rotate-half layout.

    Angles are computed in float64 and rounded once, so large positions stay accurate.
    """
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be an integer torch.Tensor, got {type(positions).__name__}")
    _check_positions_dtype(positions)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    freqs = rope_frequencies(head_dim, base, device=positions.device)  # (D/2,)
    angles = positions.to(torch.float64)[..., None] * freqs  # (..., N, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., N, D): pair m is (m, m + D/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, positions, base: float = 10000.0) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, H, N, D)`` to the given positions.

    Args:
        x: queries or keys ``(B, H, N, D)``, ``D`` even.
        positions: integer positions ``(N,)`` shared by the batch, or ``(B, N)``.
        base: RoPE base (10000 as in the paper).

    Returns a new tensor of the same shape and dtype. Position 0 is the identity.
    """
    check_tensor("x", x)
    pos = _positions(positions, x)
    cos, sin = rope_cos_sin(pos, x.shape[-1], base, dtype=x.dtype)  # (N, D) or (B, N, D)
    if pos.ndim == 2:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, N, D)
    return rotate(x, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, N, D)`` with tables from :func:`rope_cos_sin` (``(N, D)`` or
    ``(B, 1, N, D)``); lets a model build the tables once per forward pass for all its layers."""
    check_tensor("x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even head dimension D, got x of shape {tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    b, _, n, d = x.shape
    # the tables broadcast to x without changing its shape: leading dims of 1 or of x's size
    if cos.shape[-2:] != (n, d) or cos.ndim > 4 or any(
            c not in (1, s) for c, s in zip(cos.shape[-3::-1], x.shape[-3::-1])):
        raise ValueError(f"cos and sin must have shape (N, D) = ({n}, {d}) or (B, 1, N, D) = ({b}, 1, {n}, {d}) "
                         f"for x of shape {tuple(x.shape)}, got {tuple(cos.shape)}")
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, H, N, D)
    return x * cos + rotated * sin


def apply_rope_reference(x: torch.Tensor, positions, base: float = 10000.0) -> torch.Tensor:
    """The same rotation written with complex numbers, one pair at a time (the test oracle)."""
    check_tensor("x", x)
    pos = _positions(positions, x)
    if pos.ndim == 1:
        pos = pos[None].expand(x.shape[0], -1)  # (B, N)
    half = x.shape[-1] // 2
    freqs = rope_frequencies(x.shape[-1], base)
    out = torch.empty_like(x, dtype=torch.float64)
    for b in range(x.shape[0]):
        for n in range(x.shape[2]):
            for m in range(half):
                z = torch.complex(x[b, :, n, m].double(), x[b, :, n, m + half].double())
                turn = torch.polar(torch.ones((), dtype=torch.float64), pos[b, n].double() * freqs[m])
                w = z * turn
                out[b, :, n, m], out[b, :, n, m + half] = w.real, w.imag
    return out.to(x.dtype)
