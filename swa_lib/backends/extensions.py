"""Dilation, global tokens and sinks on top of any band backend, exactly and in O(N * (w + g)).

A *band function* ``band_fn(q, k, v, left, right, scale) -> (out, lse)`` computes plain sliding
window attention and the log-sum-exp of every row (:func:`swa_lib.backends.blocked.band_attention`,
:func:`swa_lib.backends.chunked.chunked_band_attention`). This module turns it into the full
:class:`~swa_lib.masks.AttentionPattern`:

* **Dilation d** (one per head allowed). Query ``i`` sees keys ``j = i - m d`` inside the window.
  Such ``i`` and ``j`` share their residue ``i mod d``, so the tokens split into ``d``
  interleaved subsequences ``r, r + d, r + 2d, ...``; on each, the dilated window is a plain
  window ``(left // d, right // d)``. Dilation therefore costs the same as an undilated window
  with the same number of keys: ``d`` band calls on sequences ``d`` times shorter.
* **Global tokens and sinks** are extra *key columns*: the ``g`` global keys and the first
  ``sinks`` keys. Their scores ``(N, g)`` are computed densely, entries already inside a query's
  band (or not allowed: a sink to the right of ``i + right``) are masked so nothing counts twice,
  and the two softmaxes are merged exactly through the band's log-sum-exp::

      M   = max(lse_band, max_j s_j)                       (a shift for stability)
      Z   = exp(lse_band - M) + sum_j exp(s_j - M)
      out = (exp(lse_band - M) * out_band + sum_j exp(s_j - M) v_j) / Z

* **Global query rows** attend to every key: ``(g, N)`` scores, computed densely and written over
  those rows.

Nothing falls back to an ``(N, N)`` mask: the extra work is O(N * g * D) per head. Everything is
ordinary autograd on top of the band function's own gradients (which include the lse).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..masks import AttentionPattern

__all__ = ["extended_attention", "dilated_band"]

BandFn = Callable[..., tuple]


def _kv_heads(x: torch.Tensor, heads: list[int], group: int) -> torch.Tensor:
    """Key/value heads read by the given query heads: (B, H_kv, N, D) -> (B, len(heads), N, D)."""
    idx = torch.tensor([h // group for h in heads], device=x.device)
    return x.index_select(1, idx)


def dilated_band(band_fn: BandFn, q, k, v, left: int, right: int, scale: float, dilation: tuple):
    """Band attention with per-head dilation by splitting into residue classes; ``(out, lse)``."""
    heads = q.shape[1]
    if all(d == 1 for d in dilation):
        return band_fn(q, k, v, left, right, scale)
    batch, _, n_q, _ = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    group = heads // k.shape[1]
    offset = n_k - n_q
    out = q.new_zeros(batch, heads, n_q, d_v)
    lse = None
    for d in sorted(set(dilation)):
        hs = [h for h in range(heads) if dilation[h] == d]
        if len(hs) == heads:  # one dilation for all heads: no head selection, no copies
            h_idx = slice(None)
            qd, kd, vd = q, k, v
        else:
            h_idx = torch.tensor(hs, device=q.device)
            qd, kd, vd = q.index_select(1, h_idx), _kv_heads(k, hs, group), _kv_heads(v, hs, group)
        if d > min(max(left, right), n_k - 1):
            # No other key in the window is a multiple of d away: every residue class would run the
            # band (0, 0), which is one band call (0, 0) on the whole sequence (not d calls: d may be huge).
            o_d, l_d = band_fn(qd, kd, vd, 0, 0, scale)
            if lse is None:
                lse = l_d.new_zeros(batch, heads, n_q)
            out[:, h_idx] = o_d.to(out.dtype)
            lse[:, h_idx] = l_d
            continue
        for r in range(d):
            first_q = (r - offset) % d  # first query row whose position (row + offset) is = r mod d
            q_r, k_r, v_r = qd[:, :, first_q::d], kd[:, :, r::d], vd[:, :, r::d]
            if q_r.shape[2] == 0:
                continue
            o_r, l_r = band_fn(q_r, k_r, v_r, left // d, right // d, scale)
            if lse is None:
                lse = l_r.new_zeros(batch, heads, n_q)
            out[:, h_idx, first_q::d] = o_r.to(out.dtype)
            lse[:, h_idx, first_q::d] = l_r
    return out, lse


def extended_attention(band_fn: BandFn, q, k, v, pattern: AttentionPattern, scale: float) -> torch.Tensor:
    """Attention under the full pattern (dilation, global tokens, sinks) using ``band_fn``.

    Shapes as in :func:`swa_lib.sliding_window_attention` (GQA and ``N_q <= N_k`` included).
    """
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    group = heads // k.shape[1]
    offset = n_k - n_q
    left, right = min(pattern.left, n_k), min(pattern.right, n_k)
    dilation = pattern.dilation_per_head(heads)
    out_band, lse_band = dilated_band(band_fn, q, k, v, left, right, scale, dilation)
    g = pattern.global_tokens  # (B, n_k) bool or None
    if g is None and pattern.sinks == 0:
        return out_band
    acc = lse_band.dtype  # the band's compute dtype (float32 for half inputs): extra scores use it too
    out_band = out_band.to(acc)
    dil = torch.tensor(dilation, device=q.device)[:, None, None]  # (H, 1, 1)
    qpos = torch.arange(offset, n_k, device=q.device)  # (n_q,) query positions
    kv_all = torch.arange(k.shape[1], device=q.device).repeat_interleave(group)  # kv head of each query head
    rows = []
    for b in range(batch):
        # --- extra key columns: global keys and sinks --------------------------------------------
        is_global = g[b] if g is not None else torch.zeros(n_k, dtype=torch.bool, device=q.device)
        extra = is_global.clone()
        extra[: pattern.sinks] = True
        cols = extra.nonzero()[:, 0]  # (G,)
        o_b = out_band[b]  # (H, n_q, Dv)
        if len(cols):
            kc, vc = k[b].index_select(1, cols), v[b].index_select(1, cols)  # (H_kv, G, D)
            if group > 1:
                kc, vc = kc.index_select(0, kv_all), vc.index_select(0, kv_all)  # (H, G, D)
            s = torch.matmul(q[b].to(acc), kc.to(acc).transpose(-1, -2)) * scale  # (H, n_q, G)
            delta = qpos[:, None] - cols[None, :]  # (n_q, G): i - j
            in_band = (delta <= left) & (-delta <= right) & (delta[None] % dil == 0)  # (H, n_q, G)
            allowed = is_global[cols][None, None, :] | ((cols < pattern.sinks)[None, :] & (-delta <= right))[None]
            s = s.masked_fill(~(allowed & ~in_band), float("-inf"))
            m = torch.maximum(lse_band[b], s.amax(-1)).detach()  # (H, n_q), finite
            w_band = torch.exp(lse_band[b] - m)  # > 0: every row sees itself in the band
            e = torch.exp(s - m[..., None])  # (H, n_q, G); 0 where masked
            inv = 1.0 / (w_band + e.sum(-1))  # (H, n_q)
            o_b = torch.baddbmm(o_b * (w_band * inv)[..., None], e * inv[..., None], vc.to(e.dtype))
        # --- global query rows attend to every key -------------------------------------------
        g_rows = is_global[offset:].nonzero()[:, 0]  # query rows that are global
        if len(g_rows):
            kf, vf = k[b], v[b]  # (H_kv, n_k, D)
            if group > 1:
                kf, vf = kf.index_select(0, kv_all), vf.index_select(0, kv_all)  # (H, n_k, D)
            s = torch.matmul(q[b][:, g_rows].to(acc), kf.to(acc).transpose(-1, -2)) * scale  # (H, Gq, n_k)
            p = torch.softmax(s, dim=-1)
            o_g = torch.matmul(p, vf.to(acc)).to(o_b.dtype)  # (H, Gq, Dv)
            o_b = o_b.index_put((torch.arange(heads, device=q.device)[:, None], g_rows[None, :]), o_g)
        rows.append(o_b)
    out = rows[0][None] if batch == 1 else torch.stack(rows)
    return out.to(q.dtype)
