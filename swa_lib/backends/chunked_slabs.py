"""Longformer's sliding chunks for inference: the same steps, slab by slab, without the copies.

:mod:`swa_lib.backends.chunked` spells the algorithm out one step per function, each step a new
tensor: the skew pads every chunk matrix, the band is concatenated from halves, and the values
step rebuilds full chunk matrices from the band. Every intermediate is as large as the whole
sequence's chunk products. This module runs the same arithmetic (chunk-pair products,
skew into the band, softmax, reverse skew, products with the value chunks) for a few query
blocks at a time, so the intermediates stay small, and does the two skews as *strided copies*:

* the skew: in a contiguous ``(2w, 2w)`` chunk matrix, row ``x`` starts ``2w * x`` numbers in,
  so entry ``(x, x + t - w)`` lies at ``x * (2w + 1) + t - w``. Reading the chunk matrix with a
  row stride of ``2w + 1`` instead of ``2w`` turns diagonals into columns: the band's right half
  is one strided view of the chunk products (:func:`skewed_halves`), its left half another,
  and each is copied once into the band;
* the reverse skew writes the probabilities back through the same two views into a buffer of
  chunk matrices whose other entries (the corners) stay zero from one slab to the next.

A *piece* (the unit of work shared among threads by :func:`~swa_lib.backends.workers.run_pieces`)
is a run of query blocks of one head; its chunks are the blocks' own plus the one before. Chunks
that reach past either end of the sequence are built from zero-padded copies of the few rows
they need (what :mod:`swa_lib.backends.chunked` does for the whole sequence), and an exact
mask hides what does not exist. No autograd: :func:`swa_lib.backends.chunked.chunked_band_attention`
uses this path when no gradient is needed and the step-by-step one (plain autograd) otherwise.
"""

from __future__ import annotations


import torch

from .bands import SLAB_SCORES, padded_rows
from .common import in_compute_dtype
from .workers import run_pieces, scratch_buffer

__all__ = ["chunked_band_inference", "skewed_halves", "band_mask"]


def skewed_halves(chunks: torch.Tensor, w: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The band of ``blocks`` query blocks as two strided views of contiguous chunk matrices
    ``chunks (blocks + 1, 2w, 2w)`` (chunk ``c`` is the one before block ``c``'s own):

    * ``right (blocks, w, w + 1)``: offsets ``0 .. w`` of block ``c``, row ``x``, read from its
      own chunk ``c + 1``, row ``x``, column ``x + t``;
    * ``left (blocks, w, w)``: offsets ``-w .. -1``, read from chunk ``c``, row ``x + w``,
      column ``x + t``.

    Both views read the chunk matrices with row stride ``2w + 1``: the skew, with no copy.
    """
    size = 4 * w * w  # numbers per chunk matrix
    right = chunks.as_strided((blocks, w, w + 1), (size, 2 * w + 1, 1), chunks.storage_offset() + size)
    left = chunks.as_strided((blocks, w, w), (size, 2 * w + 1, 1), chunks.storage_offset() + 2 * w * w)
    return left, right


def _chunks(rows: torch.Tensor, w: int, count: int) -> torch.Tensor:
    """``count`` chunks of ``2w`` rows overlapping by ``w`` of ``rows ((count + 1) w, D)``: a view."""
    step = rows.stride(0)
    return rows.as_strided((count, 2 * w, rows.shape[1]), (w * step, step, 1), rows.storage_offset())


def band_mask(n: int, rows: int, w: int, left: int, right: int, device, first_row: int = 0) -> torch.Tensor:
    """``(rows, 2w+1)`` True where the band entry is a visible key of a real query, for the
    query positions ``first_row .. first_row + rows - 1``.

    Padding rows (``i >= n``) stay fully visible so that they remain finite; they are dropped.
    """
    i = torch.arange(first_row, first_row + rows, device=device)[:, None]
    t = torch.arange(2 * w + 1, device=device)[None, :]
    j = i - w + t  # key position of band entry (i, t)
    ok = (t >= w - left) & (t <= w + right) & (j >= 0) & (j < n)
    return ok | (i >= n)


def chunked_band_inference(q, k, v, left: int, right: int, scale: float, with_lse: bool = True):
    """:func:`swa_lib.backends.chunked.chunked_band_attention` without autograd: ``(out, lse)``
    for checked, non-empty arguments, computed slab by slab (see the module docstring)."""
    batch, heads, n_q, d = q.shape
    heads_kv, n_k, d_v = k.shape[1], k.shape[2], v.shape[3]
    group = heads // heads_kv
    offset = n_k - n_q
    left, right = min(left, n_k - 1), min(right, n_k - 1)
    w = max(left, right, 1)
    q, k, v = (in_compute_dtype(x) for x in (q, k, v))
    out = torch.empty(batch, heads, n_q, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, n_q, dtype=q.dtype, device=q.device) if with_lse else None
    t = torch.arange(2 * w + 1, device=q.device)
    window = (t >= w - left) & (t <= w + right)  # (2w + 1,): offsets inside the window
    column_mask = None if bool(window.all()) else \
        torch.zeros(2 * w + 1, dtype=q.dtype, device=q.device).masked_fill_(~window, float("-inf"))
    per_piece = max(1, SLAB_SCORES // (4 * w * w))  # blocks per piece: a few chunk matrices
    last = -(-n_k // w)  # blocks holding real queries: offset // w .. last - 1
    starts = list(range(offset // w, last, per_piece))

    def piece(i: int, scratch: dict) -> None:
        bh, si = divmod(i, len(starts))
        b, h = divmod(bh, heads)
        c0 = starts[si]
        c1 = min(last, c0 + per_piece)
        nb = c1 - c0
        first = (c0 - 1) * w  # position of the first row of the piece's first chunk
        rows = (nb + 2) * w
        inside = first >= max(offset, 0) and first + rows <= n_k
        qr = padded_rows(q[b, h], first - offset, rows)
        kr, vr = padded_rows(k[b, h // group], first, rows), padded_rows(v[b, h // group], first, rows)
        scores = scratch_buffer(scratch, "scores", (nb + 1, 2 * w, 2 * w), q)
        scores.baddbmm_(_chunks(qr, w, nb + 1), _chunks(kr, w, nb + 1).transpose(1, 2), beta=0, alpha=scale)
        band = scratch_buffer(scratch, "band", (nb, w, 2 * w + 1), q)
        sk_left, sk_right = skewed_halves(scores, w, nb)
        band[:, :, :w].copy_(sk_left)
        band[:, :, w:].copy_(sk_right)
        if not inside:  # keys or queries past either end: the exact mask
            ok = band_mask(n_k, nb * w, w, left, right, q.device, first_row=c0 * w)
            band.masked_fill_(~ok.view(nb, w, 2 * w + 1), float("-inf"))
        elif column_mask is not None:
            band.add_(column_mask)
        probs = scratch_buffer(scratch, "probs", band.shape, q)
        torch.ops.aten._softmax.out(band, -1, False, out=probs)  # every row sees a key: finite
        p_chunks = scratch_buffer(scratch, "p_chunks", (nb + 1, 2 * w, 2 * w), q, zero=True)  # corners stay 0
        p_left, p_right = skewed_halves(p_chunks, w, nb)
        p_left.copy_(probs[:, :, :w])
        p_right.copy_(probs[:, :, w:])
        o = torch.bmm(p_chunks, _chunks(vr, w, nb + 1), out=scratch_buffer(scratch, "o", (nb + 1, 2 * w, d_v), q))
        lo, hi = c0 * w - offset, c1 * w - offset  # q rows of the piece's blocks
        if inside:
            torch.add(o[1:, :w], o[:-1, w:], out=out[b, h, lo:hi].view(nb, w, d_v))
        else:  # some rows are padding: keep the real ones (there is at least one)
            r0, r1 = max(lo, 0), min(hi, n_q)
            out[b, h, r0:r1] = (o[1:, :w] + o[:-1, w:]).flatten(0, 1)[r0 - lo : r1 - lo]
        if with_lse:
            r0, r1 = max(lo, 0), min(hi, n_q)
            lse[b, h, r0:r1] = band.amax(-1).sub_(probs.amax(-1).log_()).flatten()[r0 - lo : r1 - lo]

    run_pieces(batch * heads * len(starts), piece, share=batch * heads * n_q * w >= 1 << 16)
    return out, lse
