"""Layer 2: launching the kernels (checks, block sizes, autotuning, grids), and Python views of
the kernels' loop bounds.

What the backend can run (devices, dtypes, head dims, equal lengths) is its row of the
capability table in :mod:`swa_lib.backends`; :class:`Prepared` asks that row and raises with its
reason. Argument checks of the public entry points are :func:`swa_lib.attention.validate_call`'s.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from ...masks import AttentionPattern, global_token_positions
from ..registry import BACKENDS
from . import kernels, tiles
from .kernels import INTERPRETER

__all__ = ["Prepared", "launch_forward", "launch_backward", "on_device", "autotune_configs", "key_block_range",
           "query_block_range", "visited_tiles"]

# Scores are kept in base 2 so the kernels can use exp2: log2(e) goes into the score scale.
_LOG2E = 1.4426950408889634


# ---- the loop bounds, from Python (the launcher's tests and the chapter's tile picture) -------
def key_block_range(start_m: int, block_m: int, block_n: int, n: int, left: int, right: int):
    """Python view of the kernel's loop bounds: key blocks ``[lo, hi)`` for a query block."""
    return tiles.key_block_range.fn(start_m, block_m, block_n, n, left, right)


def query_block_range(start_n, block_m, block_n, n, left, right, sinks=0):
    """Python view of the dk/dv kernel's bounds: query blocks ``[lo, hi)`` for a key block."""
    return tiles.query_block_range.fn(start_n, block_m, block_n, n, left, right, sinks)


def visited_tiles(n: int, pattern: AttentionPattern, block_m: int, block_n: int, batch: int = 0):
    """Which (query block, key block) tiles the forward kernel computes, as a bool tensor.

    Uses the kernels' own bound functions. Gathered global keys are drawn as the key blocks that
    hold them; global query rows as full rows of tiles (the "full row" pass).
    """
    left, right, sinks = min(pattern.left, n), min(pattern.right, n), min(pattern.sinks, n)
    n_qb, n_kb = triton.cdiv(n, block_m), triton.cdiv(n, block_n)
    visited = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    g = pattern.global_tokens
    g_pos = [] if g is None else torch.nonzero(g[batch]).flatten().tolist()
    for qb in range(n_qb):
        lo, hi = key_block_range(qb * block_m, block_m, block_n, n, left, right)
        visited[qb, lo:hi] = True
        visited[qb, : tiles.sink_block_end.fn(sinks, lo, block_n)] = True
        for j in g_pos:
            visited[qb, j // block_n] = True
    for i in g_pos:
        visited[i // block_m, :] = True
    return visited


# ---- block sizes and autotuning ---------------------------------------------------------------
def autotune_configs(kind: str) -> list:
    """The block sizes and launch parameters tried on a GPU, per kernel ("fwd", "dq", "dkdv").

    The interpreter skips autotuning (each trial would run the whole kernel in Python) and
    uses :data:`_INTERPRETER_BLOCKS`. Configs that do not fit the GPU are discarded by Triton's
    autotuner when they fail to compile.
    """
    if kind == "fwd":  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        settings = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                    (64, 128, 4, 3), (32, 32, 4, 1)]
    elif kind == "dq":
        settings = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (32, 64, 4, 3),
                    (32, 32, 4, 1)]
    elif kind == "dkdv":
        settings = [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2),
                    (16, 128, 4, 3), (32, 32, 4, 1)]
    else:
        raise ValueError(f"kind must be 'fwd', 'dq' or 'dkdv', got {kind!r}")
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in settings]


_DELTA_BLOCK = 16 if INTERPRETER else 64
_INTERPRETER_BLOCKS = (16, 16)  # small tiles: tiny test sizes still span several blocks
_TUNE_KEY = ["N", "LEFT", "RIGHT", "SINKS", "HEAD_DIM", "GROUP", "HAS_DILATION", "HAS_SINKS", "HAS_GLOBAL",
             "PRECISION"]


def _tuned(kernel, kind: str, key: list):
    """The kernel behind Triton's autotuner on a GPU; the plain kernel in the interpreter."""
    return kernel if INTERPRETER else triton.autotune(configs=autotune_configs(kind), key=key)(kernel)


# kind -> (plain kernel, autotuned kernel, the block size that its grid's first axis counts)
_KERNELS = {
    "fwd": (kernels.fwd_kernel, _tuned(kernels.fwd_kernel, "fwd", _TUNE_KEY + ["FULL_ROWS"]), "BLOCK_M"),
    "dq": (kernels.bwd_dq_kernel, _tuned(kernels.bwd_dq_kernel, "dq", _TUNE_KEY + ["FULL_ROWS"]), "BLOCK_M"),
    "dkdv": (kernels.bwd_dkdv_kernel, _tuned(kernels.bwd_dkdv_kernel, "dkdv", _TUNE_KEY), "BLOCK_N"),
}


def _blocks(blocks: Optional[tuple]) -> dict:
    """Launch keywords: fixed blocks (interpreter, or a caller's choice) or none (autotune)."""
    if blocks is None and INTERPRETER:
        blocks = _INTERPRETER_BLOCKS
    if blocks is None:
        return {}
    bm, bn = blocks
    for name, b in (("block_m", bm), ("block_n", bn)):
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b!r}")
    return {"BLOCK_M": bm, "BLOCK_N": bn}


def _launch(kind: str, grid_rows: int, other_dim: int, blocks: dict, *args, **kwargs):
    """Launch with fixed blocks, or with a grid that follows the autotuner's BLOCK_M/BLOCK_N."""
    plain, tuned, which = _KERNELS[kind]
    if blocks:
        plain[(triton.cdiv(grid_rows, blocks[which]), other_dim)](*args, **kwargs, **blocks)
    else:
        tuned[lambda meta: (triton.cdiv(grid_rows, meta[which]), other_dim)](*args, **kwargs)


# ---- the checks and the launches ----------------------------------------------------------------
def _device_hint() -> str:
    """What this process's kernels run on, and how to get the other mode."""
    if INTERPRETER:
        return ("; this process runs the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1 was set "
                "when swa_lib.backends.triton was imported)")
    return ("; the compiled kernels need CUDA tensors (for CPU tensors set TRITON_INTERPRET=1 before "
            "swa_lib.backends.triton is first imported)")


class Prepared:
    """Checked launch parameters shared by the forward and backward passes.

    A call that the backend's row of the capability table refuses raises ``ValueError`` with the
    row's reason (and, when the device is the reason, how to get the kernels' other mode).
    """

    def __init__(self, q, k, v, pattern: AttentionPattern, scale: float, blocks):
        if not isinstance(pattern, AttentionPattern):
            raise TypeError(f"pattern must be an AttentionPattern, got {type(pattern).__name__}")
        row = BACKENDS["triton"]
        reason = row.unsupported(q, k, pattern, v)
        if reason is not None:
            if q.device.type not in row.devices_now():
                reason += _device_hint()
            raise ValueError(reason)
        batch, heads, n, d = q.shape
        if 0 in (batch, heads, n):
            raise ValueError(f"empty input: q has shape {tuple(q.shape)}")
        heads_kv = k.shape[1]
        self.shape = (batch, heads, heads_kv, n, d)
        self.group = heads // heads_kv
        self.left, self.right, self.sinks = min(pattern.left, n), min(pattern.right, n), min(pattern.sinks, n)
        dev = q.device
        # a dilation of at least n lets a query see only itself in the window, as n does: cut to n, so
        # that 2**40 fits the kernels' int32 like every other size here
        self.dil = torch.tensor([min(d, n) for d in pattern.dilation_per_head(heads)], dtype=torch.int32, device=dev)
        self.has_dilation = pattern.max_dilation > 1
        g = pattern.global_tokens
        if g is not None and g.shape != (batch, n):
            raise ValueError(f"global_tokens must have shape ({batch}, {n}), got {tuple(g.shape)}")
        positions, counts = (None, None) if g is None else global_token_positions(g.to(dev))
        self.g_max = 0 if positions is None else positions.shape[1]
        self.has_global = self.g_max > 0
        if self.has_global:
            self.gmask = g.to(device=dev, dtype=torch.int8).contiguous()  # (B, N)
            self.gidx = positions.to(torch.int32).contiguous()  # (B, G_MAX), padded past counts[b]
            self.gcnt = counts.to(torch.int32).contiguous()  # (B,)
        else:  # never read: the kernels compile the global-token code out
            self.gmask = torch.zeros(1, dtype=torch.int8, device=dev)
            self.gidx = self.gcnt = torch.zeros(1, dtype=torch.int32, device=dev)
        self.scale = float(scale)
        self.qk_scale = self.scale * _LOG2E
        self.precision = "tf32x3" if q.dtype == torch.float32 else "tf32"  # fp32: 3xTF32 ~ fp32 accuracy
        self.blocks = _blocks(blocks)

    def constexprs(self) -> dict:
        """The compile-time arguments every launch of this call shares."""
        return dict(
            GROUP=self.group, HEAD_DIM=self.shape[4], HAS_DILATION=self.has_dilation,
            HAS_SINKS=self.sinks > 0, HAS_GLOBAL=self.has_global, PRECISION=self.precision,
        )


def on_device(x: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _strides(x: torch.Tensor) -> tuple:
    return tuple(x.stride())


def launch_forward(q, k, v, prep: Prepared):
    """Launch the forward kernel(s); returns out (B, H, N, D) and lse (B, H, N), base-2 fp32."""
    batch, heads, _, n, d = prep.shape
    out = torch.empty((batch, heads, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    args = (q, k, v, out, lse, prep.dil, prep.gmask, prep.gmask, prep.gidx, prep.gcnt,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            heads, n, prep.left, prep.right, prep.sinks, prep.g_max, prep.qk_scale)
    _launch("fwd", n, batch * heads, prep.blocks, *args, **prep.constexprs(), FULL_ROWS=False)
    if prep.has_global:  # overwrite the global query rows with full rows
        _launch("fwd", prep.g_max, batch * heads, prep.blocks, *args, **prep.constexprs(), FULL_ROWS=True)
    return out, lse


def launch_backward(do, q, k, v, out, lse, prep: Prepared):
    """Launch the delta, dq and dk/dv kernels; returns dq, dk, dv shaped like q, k, v."""
    batch, heads, heads_kv, n, d = prep.shape
    delta = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)  # rowsum(dO * O)
    kernels.bwd_delta_kernel[(triton.cdiv(n, _DELTA_BLOCK), batch * heads)](
        out, do, delta, *_strides(out), *_strides(do), heads, n, HEAD_DIM=d, BLOCK=_DELTA_BLOCK)
    dq = torch.empty((batch, heads, n, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, heads_kv, n, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, heads_kv, n, d), dtype=v.dtype, device=v.device)
    dq_args = (q, k, v, do, dq, lse, delta, prep.dil, prep.gmask, prep.gmask, prep.gidx, prep.gcnt,
               *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
               heads, n, prep.left, prep.right, prep.sinks, prep.g_max, prep.qk_scale, prep.scale)
    _launch("dq", n, batch * heads, prep.blocks, *dq_args, **prep.constexprs(), FULL_ROWS=False)
    if prep.has_global:
        _launch("dq", prep.g_max, batch * heads, prep.blocks, *dq_args, **prep.constexprs(), FULL_ROWS=True)
    _launch("dkdv", n, batch * heads_kv, prep.blocks,
            q, k, v, do, dk, dv, lse, delta, prep.dil, prep.gmask, prep.gmask, prep.gidx, prep.gcnt,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            heads_kv, n, prep.left, prep.right, prep.sinks, prep.g_max, prep.qk_scale, prep.scale,
            **prep.constexprs())
    return dq, dk, dv
