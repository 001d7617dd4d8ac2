"""A Longformer self-attention layer built on :func:`swa_lib.sliding_window_attention`.

Longformer :cite:`beltagy2020longformer` mixes two kinds of attention in one layer:

* every token attends to a symmetric band of ``attention_window // 2`` neighbours on each side
  and to every *global* token, with the usual ``query``/``key``/``value`` projections;
* every global token attends to *all* tokens, with a second, separate set of projections
  (``query_global``, ``key_global``, ``value_global``).

:class:`LongformerSelfAttention` reproduces Hugging Face transformers'
``LongformerSelfAttention`` (``models/longformer/modeling_longformer.py``) and can load its
weights (:meth:`LongformerSelfAttention.from_hf`). The band plus global *columns* is one call of
:func:`swa_lib.sliding_window_attention` with ``global_tokens``: the predicate of
:mod:`swa_lib.masks` already says "a key that is global is visible to every query", and a global
key that also lies inside the band is counted once, exactly as transformers does (it removes
global keys from the band and appends them as extra columns). The global *rows* are a second,
small call: ``G`` queries against all ``N`` keys, O(G * N).

Padding follows transformers' layer convention: the layer's ``attention_mask`` is ``< 0`` for
padding, ``0`` for local and ``> 0`` for global tokens (:func:`split_hf_attention_mask`).
A padding key is invisible to every query and a padding query outputs zeros. swa_lib's
attention has no key-padding argument, so the module folds the padding into the keys: an additive
score bias ``b_j`` on key ``j`` equals one extra coordinate, ``1`` on every query and ``b_j`` on
every key (``q.k + 1 * b_j``). With ``b_j`` a large negative number the weight of a padding key is
exactly zero in floating point, which is also what transformers gets by adding
``torch.finfo(dtype).min`` to those scores.

Unlike transformers' layer, the sequence length need not be a multiple of ``attention_window``,
and ``dilation`` (an int or one per head) can be set, which transformers' implementation does not
support (Longformer's paper uses it only with its custom CUDA kernel).

Limits: no attention dropout (evaluation only); cost O(N * (window + G) + G * N) per head plus the
chosen backend's overheads (the ``"dense"``/``"sdpa"`` backends are O(N^2)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .attention import global_mask, make_pattern, sliding_window_attention
from .masks import UNBOUNDED, check_int, from_longformer, global_token_positions

__all__ = ["LongformerAttentionConfig", "LongformerSelfAttention", "split_hf_attention_mask", "hf_layer_attention_mask"]


@dataclass(frozen=True)
class LongformerAttentionConfig:
    """Shape of one Longformer attention layer.

    Attributes:
        hidden_size: model width E (a multiple of ``num_heads``).
        num_heads: attention heads H; each has ``E // H`` dimensions.
        attention_window: Longformer's convention, an even total window ``w``: ``w // 2`` keys on
            each side, swa_lib window ``(w // 2, w // 2)`` (:func:`swa_lib.from_longformer`).
        dilation: an int or one int per head (swa_lib semantics: inside the window only keys with
            ``(i - j) % d == 0`` are visible).
    """

    hidden_size: int
    num_heads: int
    attention_window: int
    dilation: Union[int, tuple[int, ...]] = 1

    def __post_init__(self):
        check_int("hidden_size", self.hidden_size, 1)
        check_int("num_heads", self.num_heads, 1)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        # the entry point's checks of the window (even, >= 2) and the dilation (one per head)
        pattern = make_pattern(self.window, dilation=self.dilation, heads=self.num_heads)
        object.__setattr__(self, "dilation", pattern.dilation)  # an int, or a tuple per head

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def window(self) -> tuple[int, int]:
        """The swa_lib window ``(left, right)``."""
        return from_longformer(self.attention_window)


def split_hf_attention_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' layer mask to ``(global_tokens, padding)``, two bool tensors ``(B, N)``.

    ``LongformerModel`` turns the user's 0/1 ``attention_mask`` and ``global_attention_mask``
    into one float mask per token before its layers run: negative (``-10000`` in older releases,
    ``torch.finfo(dtype).min`` now) for padding, ``0`` for local attention, positive for global
    attention; the encoder then takes ``is_index_masked = mask < 0`` and
    ``is_index_global_attn = mask > 0``. This function does the same.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
        raise TypeError(f"attention_mask must be a (B, N) tensor, got {type(attention_mask).__name__}")
    return attention_mask > 0, attention_mask < 0


def hf_layer_attention_mask(
    attention_mask: Optional[torch.Tensor] = None,
    global_attention_mask: Optional[torch.Tensor] = None,
    *,
    shape: Optional[tuple[int, int]] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The user's 0/1 masks to the float mask transformers' attention layer takes.

    ``attention_mask`` is 1 for real tokens and 0 for padding, ``global_attention_mask`` 1 for
    global tokens (the arguments of ``LongformerModel.forward``). Returns ``(B, N)`` with
    ``-10000`` for padding, ``0`` for local and ``+10000`` for global tokens (a padding token is
    never global, as in ``LongformerModel._merge_to_attention_mask``).
    """
    for name, mask in (("attention_mask", attention_mask), ("global_attention_mask", global_attention_mask)):
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name} must be a (B, N) tensor or None, got {type(mask).__name__}")
        if mask is not None and mask.ndim != 2:
            raise ValueError(f"{name} must be a (B, N) tensor, got shape {tuple(mask.shape)}")
    if attention_mask is not None and global_attention_mask is not None:
        if attention_mask.shape != global_attention_mask.shape:
            raise ValueError(f"attention_mask and global_attention_mask must have the same shape (B, N), got "
                             f"{tuple(attention_mask.shape)} and {tuple(global_attention_mask.shape)}")
        if attention_mask.device != global_attention_mask.device:
            raise ValueError(f"attention_mask and global_attention_mask must be on one device, got "
                             f"{attention_mask.device} and {global_attention_mask.device}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (the mask holds -10000 and +10000), got {dtype!r}")
    ref = attention_mask if attention_mask is not None else global_attention_mask
    if shape is not None:
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 2:
            raise TypeError(f"shape must be a pair (B, N) of ints, got {shape!r}")
        shape = (check_int("shape[0] (B)", shape[0], 0), check_int("shape[1] (N)", shape[1], 0))
        if ref is not None and tuple(ref.shape) != shape:
            raise ValueError(f"shape {shape} disagrees with the masks' shape {tuple(ref.shape)}")
    if ref is None:
        if shape is None:
            raise ValueError("give attention_mask, global_attention_mask or shape")
        return torch.zeros(shape, dtype=dtype)
    real = torch.ones_like(ref, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    glob = torch.zeros_like(real) if global_attention_mask is None else global_attention_mask.bool()
    out = torch.zeros(real.shape, dtype=dtype, device=real.device)
    out = out.masked_fill(glob & real, 10000.0)
    return out.masked_fill(~real, -10000.0)


def _fold_key_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor):
    """Append one coordinate so that ``q'.k'_j = q.k_j + bias_j``, ``bias_j`` hugely negative on padding.

    q: (B, H, Nq, D) already scaled; k, v: (B, H, N, D); padding: (B, N) bool.
    Returns q', k', v' with head dim D + 1 (v gets a zero column, dropped by the caller).
    """
    # exp(score + bias - row_max) underflows to exactly 0 for this bias in every float dtype,
    # and half of the largest finite value cannot overflow when a score is added to it.
    bias_value = -0.5 * torch.finfo(q.dtype).max
    bias = torch.zeros(padding.shape, dtype=q.dtype, device=q.device).masked_fill(padding, bias_value)
    ones = q.new_ones(*q.shape[:-1], 1)  # (B, H, Nq, 1)
    bias = bias[:, None, :, None].expand(*k.shape[:-1], 1)  # (B, H, N, 1)
    zeros = v.new_zeros(*v.shape[:-1], 1)  # (B, H, N, 1)
    return torch.cat([q, ones], -1), torch.cat([k, bias], -1), torch.cat([v, zeros], -1)


class LongformerSelfAttention(nn.Module):
    """Longformer's self-attention (band + global tokens), computed with swa_lib.

    Input ``hidden_states (B, N, E)``; output ``(B, N, E)``, before the output projection (as in
    transformers, where ``LongformerSelfOutput`` follows). Weights are named as in transformers,
    so ``load_state_dict`` works on a transformers layer's ``state_dict()``.
    """

    def __init__(self, config: LongformerAttentionConfig, *, backend: str = "auto"):
        super().__init__()
        if not isinstance(config, LongformerAttentionConfig):
            raise TypeError(f"config must be a swa_lib LongformerAttentionConfig, got {type(config).__name__}")
        self.config = config
        self.backend = backend
        e = config.hidden_size
        self.query, self.key, self.value = nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e)
        self.query_global, self.key_global, self.value_global = nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e)

    @classmethod
    def from_hf(cls, hf_layer: nn.Module, *, dilation: Union[int, Sequence[int]] = 1, backend: str = "auto"):
        """Build from a transformers ``LongformerSelfAttention`` and copy its six projections."""
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            if not isinstance(getattr(hf_layer, name, None), nn.Linear):
                raise TypeError(
                    f"{type(hf_layer).__name__} has no nn.Linear {name!r}; expected a LongformerSelfAttention"
                )
        window = 2 * int(hf_layer.one_sided_attn_window_size)
        config = LongformerAttentionConfig(hf_layer.embed_dim, int(hf_layer.num_heads), window, dilation)
        module = cls(config, backend=backend).to(dtype=hf_layer.query.weight.dtype, device=hf_layer.query.weight.device)
        module.load_state_dict(hf_layer.state_dict())
        return module

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, E) -> (B, H, N, E / H)."""
        b, n, _ = x.shape
        return x.reshape(b, n, self.config.num_heads, self.config.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        global_tokens: Optional[torch.Tensor] = None,
        padding: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Longformer attention of ``hidden_states (B, N, E)``.

        Args:
            global_tokens: tokens with global attention, in any form
                :func:`swa_lib.sliding_window_attention` takes: a bool mask ``(B, N)`` or
                ``(N,)``, or integer positions ``(G,)`` or ``(B, G)``.
            padding: bool ``(B, N)``, True for padding tokens (invisible; their output is 0).
                Use :func:`split_hf_attention_mask` to get both from transformers' layer mask.
        """
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a (B, N, E) tensor, got {type(hidden_states).__name__}")
        if hidden_states.ndim != 3:
            raise ValueError(f"hidden_states must be (B, N, E), got {hidden_states.shape!r}")
        b, n, e = hidden_states.shape
        if e != self.config.hidden_size:
            raise ValueError(f"hidden_states has width {e}, the layer expects {self.config.hidden_size}")
        weight = self.query.weight
        if hidden_states.device != weight.device:
            raise ValueError(f"hidden_states is on {hidden_states.device} but the layer's parameters are on "
                             f"{weight.device}; move one with .to(...)")
        if hidden_states.dtype != weight.dtype and not torch.is_autocast_enabled(hidden_states.device.type):
            raise TypeError(f"hidden_states has dtype {hidden_states.dtype} but the layer's parameters have dtype "
                            f"{weight.dtype}; convert one with .to(...)")
        glob = global_mask(global_tokens, b, n, hidden_states.device)  # (B, N) or None: the entry point's rule
        if padding is not None:
            if not isinstance(padding, torch.Tensor):
                raise TypeError(f"padding must be a bool tensor of shape ({b}, {n}), got {type(padding).__name__}")
            if padding.dtype != torch.bool:
                raise TypeError(
                    f"padding must be a bool tensor of shape ({b}, {n}) (True for padding), got dtype {padding.dtype} "
                    f"and shape {tuple(padding.shape)}; for transformers' 0/1 attention_mask (1 = real token) pass "
                    "padding=attention_mask == 0, for its layer mask use split_hf_attention_mask")
            if padding.shape != (b, n):
                raise ValueError(f"padding must be a bool tensor of shape ({b}, {n}), got shape {tuple(padding.shape)}")
            padding = padding.to(hidden_states.device) if bool(padding.any()) else None
        if glob is not None and padding is not None:
            glob = glob & ~padding  # a padding token is never global (transformers' merge rule)
        if glob is not None and not bool(glob.any()):
            glob = None

        scale = self.config.head_dim**-0.5
        # Local projections: the band and the global columns. Scale q first, as transformers does.
        q = self._heads(self.query(hidden_states)) * scale  # (B, H, N, D)
        k = self._heads(self.key(hidden_states))  # (B, H, N, D)
        v = self._heads(self.value(hidden_states))  # (B, H, N, D)
        d = q.shape[-1]
        if padding is not None:
            q, k, v = _fold_key_bias(q, k, v, padding)  # head dim D + 1
        out = sliding_window_attention(
            q, k, v, self.config.window, dilation=self.config.dilation, global_tokens=glob,
            scale=1.0, backend=self.backend,
        )[..., :d]  # (B, H, N, D)

        if glob is not None:
            out = self._global_rows(hidden_states, out, glob, padding, scale)
        if padding is not None:
            out = out.masked_fill(padding[:, None, :, None], 0.0)
        return out.transpose(1, 2).reshape(b, n, e)  # (B, N, E)

    def _global_rows(self, x, out, glob, padding, scale):
        """Replace the rows of global tokens by their attention over all keys (global projections)."""
        b, n, _ = x.shape
        order, counts = global_token_positions(glob)  # (B, G): padded slots are masked below
        g_max = order.shape[1]
        valid = torch.arange(g_max, device=x.device)[None] < counts[:, None]  # (B, G)
        x_g = torch.gather(x, 1, order[..., None].expand(b, g_max, x.shape[-1]))  # (B, G, E)
        q_g = self._heads(self.query_global(x_g)) * scale  # (B, H, G, D)
        k_g = self._heads(self.key_global(x))  # (B, H, N, D)
        v_g = self._heads(self.value_global(x))  # (B, H, N, D)
        d = q_g.shape[-1]
        if padding is not None:
            q_g, k_g, v_g = _fold_key_bias(q_g, k_g, v_g, padding)
        # every global query sees every key: an unbounded window
        rows = sliding_window_attention(
            q_g, k_g, v_g, (UNBOUNDED, UNBOUNDED), scale=1.0, backend=self.backend
        )[..., :d]  # (B, H, G, D)
        # scatter the valid rows back to their positions
        bi, gi = valid.nonzero(as_tuple=True)
        pos = order[bi, gi]
        out = out.clone()
        out[bi, :, pos] = rows[bi, :, gi]
        return out
