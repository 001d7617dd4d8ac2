"""The public entry point: validate once, build the pattern, dispatch to a backend."""

from __future__ import annotations

import math
import numbers
from typing import Mapping, Optional, Sequence, Union

import torch

from .backends import choose_backend
from .backends.common import compute_dtype, empty_output
from .masks import UNBOUNDED, AttentionPattern, check_length, check_window, describe

__all__ = ["sliding_window_attention", "make_pattern", "validate_call", "check_tensor", "check_qkv", "check_scale",
           "check_pattern", "global_mask"]


def check_tensor(name: str, x) -> torch.Tensor:
    """``x`` if it is a floating-point ``torch.Tensor`` with 4 dims, else a TypeError/ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have 4 dims (B, H, N, D), got {x.ndim} dims with shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_qkv(q, k, v) -> None:
    """The shapes, dtypes and devices :func:`sliding_window_attention` accepts for ``q, k, v``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (bq, hq, nq, dq), (bk, hk, nk, dk), (bv, hv, nv, _) = q.shape, k.shape, v.shape
    if not (bq == bk == bv):
        raise ValueError(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if dq != dk:
        raise ValueError(f"q and k head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if dq == 0:
        raise ValueError(f"the head dim D of q and k must be at least 1, got D=0: q {tuple(q.shape)}")
    if (hk, nk) != (hv, nv):
        raise ValueError(f"k and v must agree in heads and length: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hk})")
    if nq > nk:
        raise ValueError(f"more queries than keys is not supported: q has N={nq}, k has N={nk}")


def check_scale(scale, dtype: Optional[torch.dtype] = None) -> float:
    """``scale`` as a float if it is a positive finite real number, else a ValueError naming it.

    With ``dtype`` (that of ``q``), the scale must also fit the dtype the backends compute in
    (:func:`~swa_lib.backends.common.compute_dtype`: float32 for float16, bfloat16 and float32
    inputs): a larger one would become inf there and every output NaN.
    """
    try:
        value = float(scale) if isinstance(scale, numbers.Real) and not isinstance(scale, bool) else math.nan
    except OverflowError:  # an int or Fraction beyond float64, e.g. 10**400
        value = math.inf
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be a positive finite number, got {_shown(scale)}")
    if dtype is not None:
        acc = compute_dtype(dtype)
        if value > torch.finfo(acc).max:
            raise ValueError(f"scale must be at most {torch.finfo(acc).max:.6g}, the largest {acc} (the dtype "
                             f"{dtype} inputs are computed in), got {_shown(scale)}")
    return value


def _shown(value) -> str:
    """``repr(value)`` for a message, cut short when it is long (an int of hundreds of digits)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:20]}... ({len(text)} characters)"


def check_pattern(pattern, q: torch.Tensor, k: torch.Tensor) -> AttentionPattern:
    """``pattern`` checked against checked ``q, k`` (a dilation per query head, global tokens of
    shape ``(B, N_k)``), with sizes beyond the sequence cut down as :func:`make_pattern` cuts them.

    The exported backend functions (``fn(q, k, v, pattern, scale)``) take a pattern directly;
    this gives them the entry point's rules. TypeError/ValueError naming ``pattern`` otherwise.
    """
    if not isinstance(pattern, AttentionPattern):
        raise TypeError(f"pattern must be a swa_lib.AttentionPattern (see swa_lib.make_pattern), "
                        f"got {type(pattern).__name__}")
    heads, batch, n_k = q.shape[1], q.shape[0], k.shape[2]
    if not isinstance(pattern.dilation, int) and len(pattern.dilation) != heads:
        raise ValueError(f"pattern.dilation has {len(pattern.dilation)} entries (one per query head) "
                         f"but q has {heads} heads")
    g = pattern.global_tokens
    if g is not None and tuple(g.shape) != (batch, n_k):
        raise ValueError(f"pattern.global_tokens must have shape (B, N_k) = ({batch}, {n_k}), got {tuple(g.shape)}")
    left, right, dilation, sinks = _within_sequence(pattern.left, pattern.right, pattern.dilation, pattern.sinks, n_k)
    if (left, right, dilation, sinks) == (pattern.left, pattern.right, pattern.dilation, pattern.sinks):
        return pattern
    return AttentionPattern(left, right, dilation=dilation, sinks=sinks, global_tokens=g)


def global_mask(global_tokens, batch: int, n: int, device) -> Optional[torch.Tensor]:
    """Normalise global tokens to a bool mask ``(batch, n)`` on ``device``; None for none.

    Accepts a bool mask ``(B, n)`` or ``(n,)``, or integer positions ``(G,)`` shared by the
    batch or ``(B, G)``, and raises TypeError/ValueError for anything else.
    """
    if global_tokens is None:
        return None
    g = global_tokens
    if not isinstance(g, torch.Tensor):
        if isinstance(g, (list, tuple)) and len(g) == 0:
            return None  # an empty list of positions: no global tokens
        if isinstance(g, (set, frozenset)):
            raise TypeError(f"global_tokens must be a bool mask or integer positions in order, got a set {g!r} "
                            "(a set has no order: pass sorted(global_tokens))")
        if isinstance(g, (str, bytes, Mapping)):
            raise TypeError(f"global_tokens must be a bool mask or integer positions, got {describe(g)}")
        try:
            g = torch.as_tensor(g)
        except (OverflowError, ValueError) as e:  # e.g. a position beyond int64
            raise ValueError(f"global_tokens must be a bool mask or integer positions, got {g!r} ({e})") from None
        except (TypeError, RuntimeError) as e:  # e.g. None or an object among the positions
            raise TypeError(f"global_tokens must be a bool mask or integer positions, got {describe(g)} ({e})") from None
    if g.dtype == torch.bool:
        if g.shape not in ((batch, n), (n,)):
            raise ValueError(f"global_tokens mask must have shape ({batch}, {n}) or ({n},), got {tuple(g.shape)}")
        if g.ndim == 1:
            g = g[None].expand(batch, -1)
        return g.to(device)
    if g.dtype.is_floating_point or g.dtype.is_complex:
        raise TypeError(f"global_tokens must be a bool mask or integer indices, got dtype {g.dtype}")
    if g.shape in ((batch, n), (n,)) and n > 2 and g.numel() and bool(((g == 0) | (g == 1)).all()):
        # Integers of the mask's shape holding only 0 and 1: almost surely a 0/1 mask such as
        # Hugging Face's global_attention_mask, which read as positions would mean tokens 0 and 1.
        raise ValueError(f"global_tokens is an integer tensor of shape {tuple(g.shape)} holding only 0 and 1: "
                         "for a 0/1 mask (e.g. Hugging Face's global_attention_mask) pass global_tokens=mask.bool(); "
                         "integer global_tokens are positions")
    if g.ndim == 1:
        g = g[None].expand(batch, -1)
    if g.ndim != 2 or g.shape[0] != batch:
        raise ValueError(f"global_tokens indices must have shape (G,) or ({batch}, G), got {tuple(g.shape)}")
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= n):
        raise ValueError(f"global_tokens indices must lie in [0, {n}), got min {int(g.min())}, max {int(g.max())}")
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, g.to(device=device, dtype=torch.long), True)
    return mask


def make_pattern(
    window,
    *,
    dilation: Union[int, Sequence[int]] = 1,
    sinks: int = 0,
    global_tokens=None,
    batch: int = 1,
    heads: int = 1,
    n: Optional[int] = None,
    device=None,
) -> AttentionPattern:
    """Validate the pattern arguments of :func:`sliding_window_attention` and build the pattern."""
    left, right = check_window(window)
    batch, heads = check_length("batch", batch), check_length("heads", heads)
    if n is not None:
        n = check_length("n", n)
    if isinstance(dilation, (str, bytes)):
        raise TypeError(f"dilation must be an int or a sequence of ints (one per query head), got {dilation!r}")
    if not isinstance(dilation, int) and isinstance(dilation, Sequence) and len(dilation) != heads:
        raise ValueError(f"dilation per head needs {heads} entries (one per query head), got {len(dilation)}")
    g = None
    if global_tokens is not None:
        if n is None:
            raise ValueError("global tokens need the sequence length n")
        g = global_mask(global_tokens, batch, n, device)
        # An empty set of global tokens is no global tokens. Meta tensors hold no values, and a
        # compiled graph must not branch on them: the custom operator checks instead (ops.py).
        if (g is not None and g.device.type != "meta" and not torch.compiler.is_compiling()
                and not bool(g.any())):
            g = None
    if n is not None:
        left, right, dilation, sinks = _within_sequence(left, right, dilation, sinks, n)
    return AttentionPattern(left, right, dilation=dilation, sinks=sinks, global_tokens=g)  # validates


def _within_sequence(left: int, right: int, dilation, sinks, n: int):
    """The same sizes with what no sequence can tell apart cut down: windows and sinks to
    ``UNBOUNDED`` (2**62, so masks stay int64), a dilation to ``n`` (for ``d >= n`` a query sees
    only itself inside the window, whatever ``d`` is). 2**64 or 10**7 then cost what ``n`` costs.
    Values of the wrong type pass through unchanged, for :class:`AttentionPattern` to refuse."""
    cap = max(n, 1)

    def capped(x, limit):
        return min(x, limit) if isinstance(x, int) and not isinstance(x, bool) else x

    if isinstance(dilation, Sequence) and not isinstance(dilation, (str, bytes)):
        dilation = tuple(capped(d, cap) for d in dilation)
    else:
        dilation = capped(dilation, cap)
    return min(left, UNBOUNDED), min(right, UNBOUNDED), dilation, capped(sinks, UNBOUNDED)


def validate_call(q, k, v, window, *, dilation=1, global_tokens=None, sinks=0, scale=None):
    """Check the arguments of :func:`sliding_window_attention` once; return ``(pattern, scale)``.

    Every public entry point that takes q, k, v and a window (the Triton function included)
    goes through here, so they all reject bad input with the same messages.
    """
    check_qkv(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else check_scale(scale, q.dtype)
    pattern = make_pattern(
        window,
        dilation=dilation,
        sinks=sinks,
        global_tokens=global_tokens,
        batch=q.shape[0],
        heads=q.shape[1],
        n=k.shape[2],
        device=q.device,
    )
    return pattern, float(scale)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window,
    *,
    dilation: Union[int, Sequence[int]] = 1,
    global_tokens=None,
    sinks: int = 0,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sliding window attention: each query attends only to keys inside its window.

    Args:
        q: queries ``(B, H, N_q, D)``.
        k: keys ``(B, H_kv, N_k, D)``, with ``H`` a multiple of ``H_kv`` (grouped-query
            attention) and ``N_q <= N_k`` (queries are the last ``N_q`` positions).
        v: values ``(B, H_kv, N_k, D_v)``.
        window: inclusive ``(left, right)``: query ``i`` attends key ``j`` iff
            ``i - left <= j <= i + right``. ``(w, 0)`` is causal, ``(w, w)`` symmetric, and
            ``(N, N)`` is full attention. Other libraries' conventions: :mod:`swa_lib.masks`.
        dilation: keep only keys with ``(i - j) % dilation == 0`` inside the window; an int
            or one int per query head.
        global_tokens: tokens that attend to all and are attended by all (Longformer): a bool
            mask ``(B, N_k)`` or ``(N_k,)``, or integer positions ``(G,)`` or ``(B, G)``.
        sinks: the first ``sinks`` keys are always visible (StreamingLLM attention sinks).
        scale: score scale, default ``D ** -0.5``.
        backend: ``"auto"`` (fastest backend able to run the call on this device) or a name
            from :func:`swa_lib.available_backends` (``"loop"``, ``"dense"``, ``"sdpa"``, ...).
            A named backend that cannot run the call raises instead of falling back.

    Returns:
        ``(B, H, N_q, D_v)`` in the dtype of ``q``; empty (no backend runs) when ``B``, ``H``,
        ``N_q`` or ``D_v`` is 0, as with PyTorch's SDPA.

    Raises:
        TypeError / ValueError naming the offending value for malformed input.
    """
    pattern, scale = validate_call(q, k, v, window, dilation=dilation, global_tokens=global_tokens,
                                   sinks=sinks, scale=scale)
    chosen = choose_backend(backend, q, k, pattern, v)
    empty = empty_output(q, k, v)  # B, H, N_q or D_v of 0: an empty result, as PyTorch's SDPA gives
    if empty is not None:
        return empty
    if torch.compiler.is_compiling():  # one opaque operator for the compiler (backends/ops.py)
        from .backends.ops import call_op

        return call_op(q, k, v, pattern, scale, chosen.name)
    return chosen.fn(q, k, v, pattern, scale)
