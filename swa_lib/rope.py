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

import torch

from .masks import check_int

__all__ = ["rope_frequencies", "rope_cos_sin", "rotate", "apply_rope", "apply_rope_reference"]


def rope_frequencies(head_dim: int, base: float = 10000.0, *, device=None) -> torch.Tensor:
    """The ``D/2`` angular frequencies ``base ** (-2m / D)``, in float64 for exact angles."""
    if check_int("head_dim", head_dim, 1) % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    if not base > 1:
        raise ValueError(f"RoPE base must be > 1, got {base!r}")
    m = torch.arange(head_dim // 2, dtype=torch.float64, device=device)
    return base ** (-2.0 * m / head_dim)  # (D/2,)


def _positions(positions, n: int, device) -> torch.Tensor:
    pos = torch.as_tensor(positions, device=device)
    if pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise TypeError(f"positions must be integers, got dtype {pos.dtype}")
    if pos.ndim not in (1, 2) or pos.shape[-1] != n:
        raise ValueError(f"positions must have shape ({n},) or (B, {n}), got {tuple(pos.shape)}")
    return pos


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0, *, dtype=torch.float32):
    """``cos`` and ``sin`` tables of shape ``(..., N, D)`` for the rotate-half layout.

    Angles are computed in float64 and rounded once, so large positions stay accurate.
    """
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
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, H, N, D), got {tuple(x.shape)}")
    pos = _positions(positions, x.shape[2], x.device)
    cos, sin = rope_cos_sin(pos, x.shape[-1], base, dtype=x.dtype)  # (N, D) or (B, N, D)
    if pos.ndim == 2:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, N, D)
    return rotate(x, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, N, D)`` with tables from :func:`rope_cos_sin` (``(N, D)`` or
    ``(B, 1, N, D)``); lets a model build the tables once per forward pass for all its layers."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, H, N, D)
    return x * cos + rotated * sin


def apply_rope_reference(x: torch.Tensor, positions, base: float = 10000.0) -> torch.Tensor:
    """The same rotation written with complex numbers, one pair at a time (the test oracle)."""
    pos = _positions(positions, x.shape[2], x.device)
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
