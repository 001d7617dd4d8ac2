"""Longformer's sliding chunks: band attention from overlapping chunks and a skew.

The algorithm of Longformer's ``sliding_chunks`` mode (Beltagy et al. 2020; Hugging Face
``LongformerSelfAttention._sliding_chunks_query_key_matmul`` and
``_sliding_chunks_matmul_attn_probs_value``), completed and generalised. With one-sided width
``w`` (Longformer's ``attention_window // 2``) and ``n`` a multiple of ``w``:

1. cut the sequence into ``C = n // w - 1`` chunks of ``2w`` tokens overlapping by ``w``:
   :func:`chunk` is a strided view (``as_strided``, no copy) of shape ``(BH, C, 2w, D)``;
2. multiply chunk pairs, ``Q_c K_c^T``: ``(BH, C, 2w, 2w)`` scores per chunk;
3. :func:`skew` every chunk matrix so that its columns become offsets ``t = j - i + w``
   (diagonals become columns), then :func:`band_from_chunks` takes each query's left half of
   the band from one chunk and its right half from the next: an ``(BH, n, 2w + 1)`` band with
   ``band[i, t] = q_i . k_{i - w + t}``;
4. mask out-of-window and out-of-sequence entries and take the softmax over the band;
5. run the same steps backwards for the probabilities (:func:`chunks_from_band`,
   :func:`unskew`) and multiply by the value chunks.

For n = 8, w = 2 the chunks are tokens 0-3, 2-5 and 4-7::

    tokens:   0 1 2 3 4 5 6 7
    chunk 0: [x x x x]
    chunk 1:     [x x x x]
    chunk 2:         [x x x x]

Each chunk product computes ``4 w^2`` scores for ``2w`` rows whose band needs about ``2 w^2``
of them: overlapping chunks do twice the useful work (chapter 5), which
:mod:`swa_lib.backends.blocked` avoids. Memory is O(n * w): the chunk products and the band.

Windows: any inclusive ``(left, right)`` runs on the band of ``w = max(left, right, 1)`` and
masks the offsets outside ``[-left, right]``, so a causal window ``(w, 0)`` wastes the right
half of the band. Any ``n`` works: the sequence is padded to a multiple of ``w`` (at least
``2w``) and the padding is masked. Fewer queries than keys are handled by padding the queries
at the front, grouped-query attention by repeating key/value heads. Backward is plain autograd.
Dilation and global tokens are added by :mod:`swa_lib.backends.extensions`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .chunked_slabs import band_mask as _band_mask  # the one band mask, shared with the inference path
from .chunked_slabs import chunked_band_inference
from .common import check_backend_args, check_band_args, compute_dtype, empty_output
from .dense import expand_kv
from ..masks import AttentionPattern

__all__ = [
    "chunk",
    "skew",
    "unskew",
    "band_from_chunks",
    "chunks_from_band",
    "sliding_chunks_scores",
    "sliding_chunks_values",
    "chunked_band_attention",
    "chunked_attention",
]


def chunk(x: torch.Tensor, w: int) -> torch.Tensor:
    """Overlapping chunks ``(BH, n, D) -> (BH, C, 2w, D)``, ``C = n // w - 1``: a strided view.

    Chunk ``c`` holds tokens ``c*w .. c*w + 2w - 1``. In memory consecutive chunks start
    ``w`` rows apart, so the view only changes strides: ``(n*D, w*D, D, 1)``.
    Needs ``x`` contiguous, ``n`` a multiple of ``w`` and ``n >= 2w``.
    """
    bh, n, d = x.shape
    if not x.is_contiguous() or n % w or n < 2 * w:
        raise ValueError(f"chunk needs a contiguous (BH, n, D) tensor with n a multiple of w and n >= 2w; got {tuple(x.shape)}, w={w}")
    return x.as_strided((bh, n // w - 1, 2 * w, d), (n * d, w * d, d, 1), x.storage_offset())


def skew(a: torch.Tensor, w: int) -> torch.Tensor:
    """Turn diagonals into columns: ``(..., 2w, 2w) -> (..., 2w, 2w + 1)``.

    ``out[x, t] = a[x, x + t - w]`` (zero where ``x + t - w`` falls outside the chunk): row x
    slides x places to the left. Done with a pad and a reshape: pad each row to ``4w`` columns
    (``w`` zeros each side), flatten, append ``2w`` zeros and read the memory back with rows of
    ``4w + 1``; each row then starts one element further along than the one above.
    """
    rows = a.shape[-2]  # 2w
    padded = F.pad(a, (w, w))  # (..., 2w, 4w): column y + w holds a[:, y]
    flat = F.pad(padded.flatten(-2), (0, rows))  # (..., 2w * (4w + 1))
    return flat.unflatten(-1, (rows, 4 * w + 1))[..., : 2 * w + 1]


def unskew(s: torch.Tensor, w: int) -> torch.Tensor:
    """The inverse of :func:`skew`: ``(..., 2w, 2w + 1) -> (..., 2w, 2w)``.

    ``out[x, y] = s[x, y - x + w]``: row x slides x places to the right (pad each row with
    ``2w`` zeros, flatten, drop the last ``2w`` values, read back with rows of ``4w``).
    """
    rows = s.shape[-2]  # 2w
    flat = F.pad(s, (0, rows)).flatten(-2)[..., :-rows]  # (..., 2w * 4w)
    return flat.unflatten(-1, (rows, 4 * w))[..., w : 3 * w]


def band_from_chunks(sk: torch.Tensor, w: int) -> torch.Tensor:
    """Assemble the band ``(BH, (C+1) w, 2w+1)`` from skewed chunk scores ``(BH, C, 2w, 2w+1)``.

    Cut the queries into ``C + 1`` blocks of ``w``. Block ``c`` is the first half of chunk
    ``c``, which holds its right half of the band (offsets ``0..w``), and the second half of
    chunk ``c - 1``, which holds its left half (offsets ``-w..-1``). The first block takes
    both halves from chunk 0 and the last block both from chunk ``C - 1``.
    """
    right = torch.cat([sk[:, :, :w, w:], sk[:, -1:, w:, w:]], dim=1)  # (BH, C+1, w, w+1)
    left = torch.cat([sk[:, :1, :w, :w], sk[:, :, w:, :w]], dim=1)  # (BH, C+1, w, w)
    return torch.cat([left, right], dim=-1).flatten(1, 2)  # (BH, (C+1) w, 2w+1)


def chunks_from_band(band: torch.Tensor, w: int) -> torch.Tensor:
    """The inverse assembly: ``(BH, (C+1) w, 2w+1) -> (BH, C, 2w, 2w+1)``.

    Every band entry goes back to the one chunk it was taken from; the other entries are 0.
    """
    blocks = band.unflatten(1, (-1, w))  # (BH, C+1, w, 2w+1)
    left, right = blocks[..., :w], blocks[..., w:]  # (BH, C+1, w, w), (BH, C+1, w, w+1)
    zl, zr = torch.zeros_like(left[:, :1]), torch.zeros_like(right[:, :1])
    # first half of chunk c: right half of block c (+ left half of block 0 for chunk 0)
    top = torch.cat([torch.cat([left[:, :1], zl.expand_as(left[:, 1:-1])], 1), right[:, :-1]], -1)
    # second half of chunk c: left half of block c + 1 (+ right half of the last block for chunk C-1)
    bottom = torch.cat([left[:, 1:], torch.cat([zr.expand_as(right[:, 1:-1]), right[:, -1:]], 1)], -1)
    return torch.cat([top, bottom], dim=2)  # (BH, C, 2w, 2w+1)


def sliding_chunks_scores(q: torch.Tensor, k: torch.Tensor, w: int) -> torch.Tensor:
    """Band of scores ``(BH, n, 2w+1)``, ``band[i, t] = q_i . k_{i-w+t}`` (0 outside the sequence).

    ``q, k``: ``(BH, n, D)``, contiguous, ``n`` a multiple of ``w``, ``n >= 2w``.
    """
    qc, kc = chunk(q, w), chunk(k, w)  # (BH, C, 2w, D) views
    scores = torch.matmul(qc, kc.transpose(-1, -2))  # (BH, C, 2w, 2w): chunk pairs
    return band_from_chunks(skew(scores, w), w)  # (BH, n, 2w+1)


def sliding_chunks_values(p: torch.Tensor, v: torch.Tensor, w: int) -> torch.Tensor:
    """``out_i = sum_t p[i, t] v_{i-w+t}``: ``p (BH, n, 2w+1)``, ``v (BH, n, Dv) -> (BH, n, Dv)``.

    The same chunks read backwards: band -> skewed chunks -> chunk matrices ``(BH, C, 2w, 2w)``
    -> products with the value chunks; each query block adds the first half of its chunk and
    the second half of the previous one.
    """
    probs = unskew(chunks_from_band(p, w), w)  # (BH, C, 2w, 2w)
    out = torch.matmul(probs, chunk(v, w))  # (BH, C, 2w, Dv)
    first = F.pad(out[:, :, :w], (0, 0, 0, 0, 0, 1))  # block c from chunk c    (BH, C+1, w, Dv)
    second = F.pad(out[:, :, w:], (0, 0, 0, 0, 1, 0))  # block c from chunk c-1 (BH, C+1, w, Dv)
    return (first + second).flatten(1, 2)


def chunked_band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain band attention by sliding chunks; returns ``(out, lse)`` like
    :func:`swa_lib.backends.blocked.band_attention` (same shapes, conventions and argument checks:
    half-precision inputs are computed in float32, ``out`` comes back in q's dtype and ``lse`` in
    the dtype it was computed in (float32 for half inputs, else q's); bad arguments raise TypeError/ValueError naming them)."""
    scale = check_band_args(q, k, v, left, right, scale)
    return _chunked_band(q, k, v, left, right, scale)


def _chunked_band(q, k, v, left: int, right: int, scale: float):
    """:func:`chunked_band_attention` on checked arguments (the band function of the backend)."""
    batch, heads, n_q, _ = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    if 0 in (batch, heads, n_q):  # no rows (with D_v of 0 the rows' lse is still computed)
        return empty_output(q, k, v), q.new_zeros(batch, heads, n_q, dtype=compute_dtype(q.dtype))
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
        # inference: the same steps slab by slab, the skews as strided copies (no autograd)
        out, lse = chunked_band_inference(q, k, v, left, right, scale)
        return out.to(q.dtype), lse
    offset = n_k - n_q
    left, right = min(left, n_k - 1), min(right, n_k - 1)
    w = max(left, right, 1)
    n_pad = max(2 * w, -(-n_k // w) * w)
    acc = compute_dtype(q.dtype)
    k, v = expand_kv(k, heads).to(acc), expand_kv(v, heads).to(acc)  # (B, H, n_k, D)
    # Queries are the last n_q positions: pad them at the front to the full length.
    # contiguous: chunk() builds overlapping views by strides (inputs may be (B, N, H, D) transposed)
    qp = F.pad(q.to(acc) * scale, (0, 0, offset, n_pad - n_k)).reshape(batch * heads, n_pad, -1).contiguous()
    kp = F.pad(k, (0, 0, 0, n_pad - n_k)).reshape(batch * heads, n_pad, -1).contiguous()
    vp = F.pad(v, (0, 0, 0, n_pad - n_k)).reshape(batch * heads, n_pad, -1).contiguous()
    scores = sliding_chunks_scores(qp, kp, w)  # (BH, n_pad, 2w+1)
    scores = scores.masked_fill(~_band_mask(n_k, n_pad, w, left, right, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (BH, n_pad, 2w+1); finite: every row sees a key
    # log-sum-exp without a second pass of exp: P at the arg max equals exp(S_max - lse)
    lse = scores.amax(-1) - torch.log(probs.amax(-1))  # (BH, n_pad)
    out = sliding_chunks_values(probs, vp, w)  # (BH, n_pad, Dv)
    out = out.reshape(batch, heads, n_pad, d_v)[:, :, offset:n_k].to(q.dtype)
    return out, lse.reshape(batch, heads, n_pad)[:, :, offset:n_k]


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern, scale: float
) -> torch.Tensor:
    """The ``"chunked"`` backend: ``fn(q, k, v, pattern, scale) -> out``.

    Time O(B * H * N * w * D) with ``w = max(left, right)`` (about twice the band's useful
    work), memory O(B * H * N * w). Patterns with dilation, global tokens or sinks go through
    :mod:`swa_lib.backends.extensions`. Arguments are checked as
    :func:`swa_lib.sliding_window_attention` checks them.
    """
    pattern, scale = check_backend_args(q, k, v, pattern, scale)
    empty = empty_output(q, k, v)
    if empty is not None:
        return empty
    if not pattern.is_plain:
        from .extensions import extended_attention

        return extended_attention(_chunked_band, q, k, v, pattern, scale)
    return _chunked_band(q, k, v, pattern.left, pattern.right, scale)[0]
