"""Who sees whom: the one definition of a sliding window in swa_lib.

A window is an inclusive pair ``(left, right)`` of non-negative integers.
Query ``i`` may attend to key ``j`` iff::

    i - left <= j <= i + right

``right == 0`` is a causal (one-sided) window, ``left == right`` a symmetric one.
For ``n = 7`` and ``window = (2, 1)`` the mask (rows = queries, columns = keys) is::

         j: 0 1 2 3 4 5 6
    i = 0   x x . . . . .
    i = 1   x x x . . . .
    i = 2   x x x x . . .
    i = 3   . x x x x . .
    i = 4   . . x x x x .
    i = 5   . . . x x x x
    i = 6   . . . . x x x

Three extensions refine the predicate (all optional, all off by default):

* ``dilation`` d: inside the window only keys with ``(i - j) % d == 0`` are visible, so the
  query always sees itself and the reach grows d-fold at the same number of keys
  (Longformer). One value for all heads or one per head.
* ``sinks`` S: the first S keys are always visible (StreamingLLM), as long as they do not lie
  to the right of ``i + right`` (so a causal window stays causal).
* ``global_tokens``: a boolean mask over key positions, per batch element. A global token
  attends to every token and every token attends to it (Longformer); this overrides the
  window and causality, exactly as in Longformer.

When there are fewer queries than keys (``n_q < n_k``, e.g. decoding with a cache), the
queries are the *last* ``n_q`` positions: query row ``r`` has position ``r + n_k - n_q``
(the "bottom-right" alignment FlashAttention uses).

Empty rows: with ``left, right >= 0`` and ``n_q <= n_k`` (both enforced at every entry
point) every query sees at least itself, so no row of a mask is empty. The dense softmax would
still give such a row zeros with zero gradient, as PyTorch's SDPA does, and the tests check it.

This module also holds the converters to the window conventions of other libraries; they
disagree with each other by one, and :data:`CONVENTIONS` tabulates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "AttentionPattern",
    "window_mask",
    "global_token_positions",
    "visible_keys",
    "UNBOUNDED",
    "CONVENTIONS",
    "from_longformer",
    "to_longformer",
    "from_mistral",
    "to_mistral",
    "from_flash_attn",
    "to_flash_attn",
    "from_hf",
    "to_hf",
]

#: A window side that reaches every key, whatever the sequence length.
UNBOUNDED = 2**62

Dilation = Union[int, Sequence[int]]


def check_int(name: str, value, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``, else a TypeError/ValueError naming ``name``.

    bool is refused although it is an int subclass: True as a window size is almost surely a bug.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def describe(value) -> str:
    """``value`` for an error message: a tensor by its dtype and shape, anything else by its repr."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def check_length(name: str, value, minimum: int = 0):
    """:func:`check_int` for a size (a length, a batch, a head count); a symbolic size
    (``torch.SymInt``, met when the shapes of traced tensors are passed) is left to the tracer."""
    return value if isinstance(value, torch.SymInt) else check_int(name, value, minimum)


def check_window(window) -> tuple[int, int]:
    """Validate an inclusive ``(left, right)`` window and return it as a tuple of ints."""
    if isinstance(window, (str, bytes)) or not isinstance(window, Sequence) or len(window) != 2:
        raise TypeError(
            f"window must be a pair (left, right) of ints, got {window!r}; "
            "use swa_lib.from_mistral / from_longformer / from_hf / from_flash_attn "
            "to convert a single window size"
        )
    left = check_int("window left", window[0], 0)
    right = check_int("window right", window[1], 0)
    return left, right


@dataclass(frozen=True)
class AttentionPattern:
    """The full "who sees whom" of one attention call.

    Attributes:
        left, right: inclusive window sides, ``i - left <= j <= i + right``.
        dilation: one int, or a tuple with one int per head (>= 1).
        sinks: number of leading keys that are always visible (>= 0).
        global_tokens: optional bool tensor ``(B, n_k)``; True marks a global token.
    """

    left: int
    right: int
    dilation: Union[int, tuple[int, ...]] = 1
    sinks: int = 0
    global_tokens: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        check_window((self.left, self.right))
        if isinstance(self.dilation, int) and not isinstance(self.dilation, bool):
            check_int("dilation", self.dilation, 1)
        else:
            if isinstance(self.dilation, (str, bytes)) or not isinstance(self.dilation, Sequence):
                raise TypeError(f"dilation must be an int or a sequence of ints, got {self.dilation!r}")
            if len(self.dilation) == 0:
                raise ValueError("dilation per head must not be empty")
            for d in self.dilation:
                check_int("dilation", d, 1)
            object.__setattr__(self, "dilation", tuple(self.dilation))
        check_int("sinks", self.sinks, 0)
        g = self.global_tokens
        if g is not None and (not isinstance(g, torch.Tensor) or g.dtype != torch.bool or g.ndim != 2):
            raise TypeError(f"global_tokens in a pattern must be a bool tensor of shape (B, n_k), got {describe(g)}")

    # -- small conveniences -------------------------------------------------------------
    @property
    def window(self) -> tuple[int, int]:
        return (self.left, self.right)

    @property
    def is_causal(self) -> bool:
        return self.right == 0 and self.global_tokens is None

    @property
    def is_plain(self) -> bool:
        """True when the pattern is just a band: no dilation, sinks or global tokens."""
        return self.max_dilation == 1 and self.sinks == 0 and self.global_tokens is None

    @property
    def max_dilation(self) -> int:
        return self.dilation if isinstance(self.dilation, int) else max(self.dilation)

    def head_dilation(self, head: int) -> int:
        if isinstance(self.dilation, int):
            return self.dilation
        return self.dilation[head]

    def dilation_per_head(self, num_heads: int) -> tuple[int, ...]:
        if isinstance(self.dilation, int):
            return (self.dilation,) * num_heads
        if len(self.dilation) != num_heads:
            raise ValueError(
                f"dilation has {len(self.dilation)} entries but there are {num_heads} heads"
            )
        return self.dilation

    # -- the predicate -------------------------------------------------------------------
    def allows(self, i: int, j: int, *, head: int = 0, batch: int = 0) -> bool:
        """May the query at position ``i`` attend to the key at position ``j``?

        This scalar predicate is the specification; :meth:`mask` is its vectorised form and
        every backend is tested against it.
        """
        g = self.global_tokens
        if g is not None:
            n_k = g.shape[1]
            if (0 <= i < n_k and bool(g[batch, i])) or bool(g[batch, j]):
                return True
        if j < self.sinks and j <= i + self.right:
            return True
        if not (i - self.left <= j <= i + self.right):
            return False
        return (i - j) % self.head_dilation(head) == 0

    def mask(self, n_q: int, n_k: Optional[int] = None, *, num_heads: int = 1, device=None) -> torch.Tensor:
        """Boolean mask, True where attention is allowed.

        Returns shape ``(B', H', n_q, n_k)`` with ``B' = B`` if there are global tokens (else 1)
        and ``H' = num_heads`` if the dilation is given per head (a sequence, even of equal
        values; else 1), ready to broadcast
        against scores of shape ``(B, H, n_q, n_k)``. Memory is O(n_q * n_k): this is for the
        dense and reference paths and for pictures, not for long sequences.
        """
        check_length("n_q", n_q)
        n_k = n_q if n_k is None else check_length("n_k", n_k)
        if n_q > n_k:
            raise ValueError(f"more queries than keys is not supported: n_q={n_q} > n_k={n_k}")
        # Sizes no sequence can tell apart cut down to UNBOUNDED, as the entry point cuts them: the
        # mask is the same, and 2**63 or more would not fit the int64 comparisons below.
        left, right, sinks = min(self.left, UNBOUNDED), min(self.right, UNBOUNDED), min(self.sinks, UNBOUNDED)
        qpos = torch.arange(n_k - n_q, n_k, device=device)[:, None]  # (n_q, 1)
        kpos = torch.arange(n_k, device=device)[None, :]  # (1, n_k)
        delta = qpos - kpos  # (n_q, n_k): i - j
        band = (delta <= left) & (-delta <= right)  # (n_q, n_k)
        dil = self.dilation_per_head(num_heads) if not isinstance(self.dilation, int) else (self.dilation,)
        dil = tuple(min(d, UNBOUNDED) for d in dil)  # any d >= n_k keeps only i == j in the window
        dil_t = torch.tensor(dil, device=device)[:, None, None]  # (H', 1, 1)
        allowed = band[None] & (delta[None] % dil_t == 0)  # (H', n_q, n_k)
        if sinks:
            allowed = allowed | ((kpos < sinks) & (kpos <= qpos + right))[None]
        allowed = allowed[None]  # (1, H', n_q, n_k)
        g = self.global_tokens
        if g is not None:
            if g.shape[1] != n_k:
                raise ValueError(f"global_tokens has {g.shape[1]} positions but there are {n_k} keys")
            g = g.to(device)
            g_q = g[:, n_k - n_q :]  # (B, n_q)
            allowed = allowed | g_q[:, None, :, None] | g[:, None, None, :]  # (B, H', n_q, n_k)
        return allowed

    def keys_per_query(self, n: int) -> float:
        """Average number of keys a query sees in a sequence of ``n`` tokens, averaged over the
        queries (clipped rows at both ends included) and over heads (for FLOP counts)."""
        check_length("n", n, 1)
        if self.is_plain:
            return visible_keys(n, self.left, self.right) / n
        heads = 1 if isinstance(self.dilation, int) else len(self.dilation)
        return float(self.mask(n, num_heads=heads).double().sum(-1).mean())


def global_token_positions(global_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each batch element's global token positions, in order: ``(positions, counts)``.

    ``global_mask`` is a ``(B, N)`` bool mask. ``positions`` is ``(B, G)`` int64 with
    ``G = counts.max()``; row ``b`` lists its ``counts[b]`` positions first, in increasing order,
    and is padded after them with other positions (mask them with ``counts``).
    """
    counts = global_mask.sum(1)  # (B,)
    g_max = int(counts.max()) if global_mask.shape[0] else 0
    # a stable sort of "not global" puts the global positions first, in order
    order = torch.sort((~global_mask).to(torch.int8), dim=1, stable=True).indices[:, :g_max]
    return order, counts


def visible_keys(n: int, left: int, right: int) -> int:
    """Number of (query, key) pairs a plain window ``(left, right)`` allows in ``n`` tokens: the
    sum over queries ``i`` of ``min(i + right, n - 1) - max(i - left, 0) + 1``, in closed form."""
    if n <= 0:
        return 0
    left, right = min(left, n - 1), min(right, n - 1)
    return n * (left + right + 1) - left * (left + 1) // 2 - right * (right + 1) // 2


def window_mask(
    n: int,
    window,
    *,
    dilation: int = 1,
    sinks: int = 0,
    global_tokens: Optional[torch.Tensor] = None,
    device=None,
) -> torch.Tensor:
    """Boolean ``(n, n)`` mask, True where query ``i`` may attend to key ``j``.

    ``window = (left, right)`` is inclusive: ``i - left <= j <= i + right``. With ``dilation``
    only every ``dilation``-th key inside the window is kept; ``sinks`` keeps the first keys
    visible; ``global_tokens`` (a bool tensor of shape ``(n,)``) marks tokens that see and are
    seen by all. See the module docstring for the picture.

    >>> window_mask(4, (1, 0)).int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 1, 1, 0],
            [0, 0, 1, 1]], dtype=torch.int32)
    """
    n = check_int("n", n, 0)
    left, right = check_window(window)
    if global_tokens is not None:
        if not isinstance(global_tokens, torch.Tensor) or global_tokens.dtype != torch.bool:
            raise TypeError(f"global_tokens must be a bool tensor of shape (n,), got {describe(global_tokens)}")
        if global_tokens.shape != (n,):
            raise ValueError(f"global_tokens must have shape ({n},), got {tuple(global_tokens.shape)}")
        global_tokens = global_tokens[None]
    pattern = AttentionPattern(left, right, dilation=dilation, sinks=sinks, global_tokens=global_tokens)
    return pattern.mask(n, device=device)[0, 0]


# ---------------------------------------------------------------------------------------
# Converters. Each library counts its window differently; swa_lib's is the inclusive
# (left, right) above. "keys seen" below is the number of keys a query in the middle of a
# long sequence sees, the quickest way to spot an off-by-one.
# ---------------------------------------------------------------------------------------


def from_longformer(attention_window: int) -> tuple[int, int]:
    """Longformer's ``attention_window`` (an even total size) to ``(left, right)``.

    Hugging Face ``LongformerSelfAttention`` (modeling_longformer.py) asserts that
    ``attention_window`` is positive and even, then sets
    ``self.one_sided_attn_window_size = attention_window // 2`` and lets each token see that
    many tokens on each side of itself, so it sees ``attention_window + 1`` keys.
    """
    w = check_int("attention_window", attention_window, 2)
    if w % 2:
        raise ValueError(f"Longformer's attention_window must be even, got {w}")
    return (w // 2, w // 2)


def to_longformer(window) -> int:
    """``(left, right)`` to Longformer's ``attention_window``; needs ``left == right >= 1``."""
    left, right = check_window(window)
    if left != right or left == 0:
        raise ValueError(f"Longformer windows are symmetric and non-empty; got (left, right)=({left}, {right})")
    return 2 * left


def from_mistral(sliding_window: int) -> tuple[int, int]:
    """Mistral's ``sliding_window`` W to ``(left, right)`` = ``(W - 1, 0)``: W keys, itself included.

    This is what Mistral's models see when they run. mistral-inference's cache holds W slots and
    builds xformers' ``make_local_attention(W)`` masks, which keep keys ``i - W + 1 .. i``
    (xformers materialises them as ``triu(tril(ones), diagonal=-W + 1)``); Hugging Face's
    Mistral sees the same W keys (:func:`from_hf`). The paper's wording ("between i - W and
    i") and the prefill mask of the 2023 one-file reference (``diagonal=-sliding_window``)
    count one key more; chapter 2 of the book tells the story.
    """
    w = check_int("sliding_window", sliding_window, 1)
    return (w - 1, 0)


def to_mistral(window) -> int:
    """``(left, 0)`` to Mistral's ``sliding_window`` (= left + 1); a causal window is required."""
    left, right = check_window(window)
    if right != 0:
        raise ValueError(f"Mistral windows are causal (right == 0), got right={right}")
    return left + 1


def from_flash_attn(window_size) -> tuple[int, int]:
    """FlashAttention's ``window_size=(left, right)`` to ours; ``-1`` means unbounded.

    flash_attn_func's docstring: "query at position i will only attend to keys between
    [i + seqlen_k - seqlen_q - window_size[0], i + seqlen_k - seqlen_q + window_size[1]]
    inclusive" -- the same inclusive pair and the same bottom-right alignment as swa_lib.
    """
    if isinstance(window_size, (str, bytes)) or not isinstance(window_size, Sequence) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    out = []
    for name, w in zip(("left", "right"), window_size):
        w = check_int(f"window_size {name}", w, -1)
        out.append(UNBOUNDED if w == -1 else w)
    return (out[0], out[1])


def to_flash_attn(window) -> tuple[int, int]:
    """``(left, right)`` to FlashAttention's ``window_size`` (:data:`UNBOUNDED` becomes -1)."""
    left, right = check_window(window)
    return (-1 if left >= UNBOUNDED else left, -1 if right >= UNBOUNDED else right)


def from_hf(sliding_window: int) -> tuple[int, int]:
    """Hugging Face transformers' ``config.sliding_window`` W to ``(W - 1, 0)``.

    transformers' masking_utils.py ``sliding_window_overlay`` keeps key ``kv_idx`` for query
    ``q_idx`` iff ``kv_idx > q_idx - sliding_window`` (on top of the causal mask), so a query
    sees W keys counting itself, as Mistral's own code does (:func:`from_mistral`).
    """
    w = check_int("sliding_window", sliding_window, 1)
    return (w - 1, 0)


def to_hf(window) -> int:
    """``(left, 0)`` to transformers' ``sliding_window`` (= left + 1)."""
    left, right = check_window(window)
    if right != 0:
        raise ValueError(f"transformers' sliding_window is causal (right == 0), got right={right}")
    return left + 1


#: (library, its parameter, meaning, to swa_lib, keys seen) -- the book prints this table.
CONVENTIONS = [
    ("swa_lib", "window=(left, right)", "inclusive: i-left <= j <= i+right", "(left, right)", "left+right+1"),
    ("Longformer (HF)", "attention_window=w", "w/2 keys on each side", "(w/2, w/2)", "w+1"),
    ("Mistral (mistral-inference)", "sliding_window=W", "keys i-W+1 .. i", "(W-1, 0)", "W"),
    ("FlashAttention", "window_size=(l, r)", "keys i-l .. i+r (-1 = unbounded)", "(l, r)", "l+r+1"),
    ("HF transformers", "sliding_window=W", "keys with j > i-W, causal", "(W-1, 0)", "W"),
]
