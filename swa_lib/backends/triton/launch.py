"""Layer 2: launching the kernels (checks, block sizes, grids, the reductions of split work).

What the backend can run (devices, dtypes, head dims, the GPU's shared memory) is its row of
the capability table in :mod:`swa_lib.backends`; :class:`Prepared` asks that row and raises with
its reason. Argument checks of the public entry points are :func:`swa_lib.attention.validate_call`'s.
Each pass is planned as a list of :class:`Launch` (kernel, grid, arguments) before anything
runs, so the compile check (:mod:`.compiled`) specialises exactly what a launch would.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple, Optional

import torch
import triton

from ...masks import AttentionPattern, global_token_positions
from ..registry import BACKENDS
from . import kernels
from .kernels import INTERPRETER
from .tilemap import chunk_size
from .tuning import KERNELS, bucket, set_descriptor_blocks

__all__ = ["Prepared", "Launch", "forward_plan", "backward_plan", "run", "launch_forward", "launch_backward",
           "on_device", "VARIANTS"]

# Scores are kept in base 2 so the kernels can use exp2: log2(e) goes into the score scale.
_LOG2E = 1.4426950408889634
_DELTA_BLOCK = 16 if INTERPRETER else 64
_INTERPRETER_BLOCKS = (16, 16)  # small tiles: tiny test sizes still span several blocks
_PAD = 128  # gathered lists and partial buffers are padded to a multiple of the largest block
#: "current": one band loop, dk/dv transposed, TMA where the GPU has it; "previous": the kernel
#: before them (three loops, untransposed dk/dv, pointer loads), kept until a GPU measures both.
VARIANTS = ("current", "previous")


class Launch(NamedTuple):
    """One kernel launch: grid (cdiv(rows, block), other, chunks) and its arguments."""

    kind: str  # "fwd", "dq", "dkdv" (autotuned) or "delta"
    rows: int
    other: int
    chunks: int
    args: tuple
    kwargs: dict


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


def _device_hint() -> str:
    """What this process's kernels run on, and how to get the other mode."""
    if INTERPRETER:
        return ("; this process runs the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1 was set "
                "when swa_lib.backends.triton was imported)")
    return ("; the compiled kernels need CUDA tensors (for CPU tensors set TRITON_INTERPRET=1 before "
            "swa_lib.backends.triton is first imported)")


def _tma_ready(*tensors) -> bool:
    """TMA descriptors need 16-bit (here) rows with unit stride, 16-byte aligned everything, and
    no zero stride (a broadcast view) where a dimension has more than one element."""
    return all(t.dtype in (torch.float16, torch.bfloat16) and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 and (s > 0 or n == 1)
                       for s, n in zip(t.stride()[:-1], t.shape[:-1])) for t in tensors)


def _padded(n: int) -> int:
    """Rows of a gathered list or partial buffer for n entries: a positive multiple of _PAD."""
    return triton.cdiv(max(n, 1), _PAD) * _PAD


def _needs_int64(*tensors) -> bool:
    """Whether a row offset inside one (batch, head) sequence can pass 2**31 - 1 elements."""
    return any((t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3)) >= 2**31 for t in tensors)


class Prepared:
    """Checked launch parameters shared by the forward and backward passes.

    q, k, v are ``(B, H, N, D)`` (a packed varlen call passes ``(1, H, total, D)`` views and
    ``cu_seqlens = (cu_q, cu_k)``, int32 tensors on the device, plus their Python lists). A call
    that the backend's row of the capability table refuses raises ``ValueError`` with the row's
    reason (and, when the device is the reason, how to get the kernels' other mode);
    ``for_target`` plans CPU tensors for a GPU that this process does not have (:mod:`.compiled`).
    """

    def __init__(self, q, k, v, pattern: AttentionPattern, scale: float, blocks=None, variant: str = "current",
                 tma: Optional[bool] = None, cu_seqlens=None, for_target: bool = False):
        if not isinstance(pattern, AttentionPattern):
            raise TypeError(f"pattern must be an AttentionPattern, got {type(pattern).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        row = BACKENDS["triton"]
        if for_target:  # planning for a GPU this process does not have (.compiled): no device checks
            row = dataclasses.replace(row, devices_now=None, device_dtypes=None, device_limits=None)
        reason = row.unsupported(q, k, pattern, v)
        if reason is not None:
            if q.device.type not in row.devices_now():
                reason += _device_hint()
            raise ValueError(reason)
        if 0 in q.shape[:3]:
            raise ValueError(f"empty input: q has shape {tuple(q.shape)}")
        dev = q.device
        self.heads, self.heads_kv, self.d = q.shape[1], k.shape[1], q.shape[3]
        self.group = self.heads // self.heads_kv
        self.varlen = cu_seqlens is not None
        if self.varlen:
            cu_q, cu_k, self.starts_q, self.starts_k = cu_seqlens
            self.cu = (cu_q, cu_k)
            self.batch = len(self.starts_q) - 1
            lengths = [(b - a, d - c) for a, b, c, d in zip(self.starts_q, self.starts_q[1:], self.starts_k,
                                                                 self.starts_k[1:])]
            self.n_q, self.n_k = max(x for x, _ in lengths), max(y for _, y in lengths)
        else:
            self.batch, self.n_q, self.n_k = q.shape[0], q.shape[2], k.shape[2]
            self.cu = (torch.zeros(1, dtype=torch.int32, device=dev),) * 2  # never read
        self.rows = q.shape[2]  # logsumexp rows per head
        n = self.n_k
        self.left, self.right, self.sinks = min(pattern.left, n), min(pattern.right, n), min(pattern.sinks, n)
        # a dilation of at least n lets a query see only itself in the window, as n does: cut to n, so
        # that 2**40 fits the kernels' int32 like every other size here
        self.dil = torch.tensor([min(x, n) for x in pattern.dilation_per_head(self.heads)], dtype=torch.int32,
                                device=dev)
        self.has_dilation = pattern.max_dilation > 1
        self._lists(pattern, dev)
        self.chunk = chunk_size(n, self.left, self.right)
        self.scale = float(scale)
        self.qk_scale = self.scale * _LOG2E
        self.precision = "tf32x3" if q.dtype == torch.float32 else "tf32"  # fp32: 3xTF32 ~ fp32 accuracy
        self.blocks = _blocks(blocks)
        self.variant = variant
        if tma is None:  # Hopper and newer, compiled, the current kernel
            tma = (variant == "current" and q.is_cuda and not INTERPRETER
                   and torch.cuda.get_device_capability(dev)[0] >= 9)
        # D <= 128: the head dims whose TMA kernels the compile test covers
        self.tma = bool(tma) and variant == "current" and self.d <= 128 and _tma_ready(q, k, v)

    def _lists(self, pattern, dev):
        """Global tokens as int8 mask and gathered lists, and the columns of the dk/dv column pass
        (sink keys and global keys), each list with its count per batch element."""
        g = pattern.global_tokens
        self.has_global = g is not None and bool(g.any())
        one = torch.zeros(1, dtype=torch.int32, device=dev)
        self.gmask, self.gidx, self.gcnt, self.qidx, self.qcnt = (one.to(torch.int8), one, one, one, one)
        self.g_max = self.q_max = 0
        self.q_rows = None
        if self.has_global:
            if self.varlen or g.shape != (self.batch, self.n_k):
                raise ValueError(f"global_tokens must have shape ({self.batch}, {self.n_k}), got {tuple(g.shape)}")
            g = g.to(dev)
            self.gmask = g.to(torch.int8).contiguous()  # (B, N_k)
            g_lists = positions, counts = global_token_positions(g)
            self.gidx, self.gcnt = positions.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()
            self.g_max = positions.shape[1]
            # global query rows (with as many queries as keys, the same lists)
            rows, counts = g_lists if self.n_q == self.n_k else global_token_positions(g[:, self.n_k - self.n_q:])
            self.q_max = rows.shape[1]
            if self.q_max:
                self.qidx, self.qcnt = rows.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()
                bi, si = torch.nonzero(torch.arange(self.q_max, device=dev) < counts[:, None], as_tuple=True)
                self.q_rows = (bi, si, rows[bi, si])
        self.c_max, self.cidx, self.ccnt, self.columns = 0, one, one, None
        if self.sinks or self.has_global:
            if self.sinks:
                cols = torch.zeros(self.batch, self.n_k, dtype=torch.bool, device=dev)
                cols[:, : self.sinks] = True
                if self.has_global:
                    cols |= g
                positions, counts = global_token_positions(cols)
            else:  # the columns are the global keys: their lists are made above
                positions, counts = g_lists
            if self.varlen:  # a document's sinks are its own first keys
                counts = torch.clamp(torch.tensor([d - c for c, d in zip(self.starts_k, self.starts_k[1:])],
                                                  device=dev), max=self.sinks)
            self.c_max = _padded(positions.shape[1])
            self.cidx = torch.zeros(self.batch, self.c_max, dtype=torch.int32, device=dev)
            self.cidx[:, : positions.shape[1]] = positions.to(torch.int32)
            self.ccnt = counts.to(torch.int32).contiguous()
            doc, si = torch.nonzero(torch.arange(self.c_max, device=dev) < counts[:, None], as_tuple=True)
            where, bg = self.cidx[doc, si].long(), doc  # the key's row in dk, dv, and its batch index
            if self.varlen:  # packed: one batch index, rows offset by the document's start
                where, bg = where + torch.tensor(self.starts_k[:-1], device=dev)[doc], torch.zeros_like(doc)
            self.columns = (doc, bg, si, where)

    def constexprs(self) -> dict:
        """The compile-time arguments every launch of this call shares."""
        return dict(GROUP=self.group, HEAD_DIM=self.d, HAS_DILATION=self.has_dilation, HAS_SINKS=self.sinks > 0,
                    HAS_GLOBAL=self.has_global, VARLEN=self.varlen, ONE_LOOP=self.variant == "current",
                    TMA=self.tma, PRECISION=self.precision)

    def sizes(self, pad: int) -> tuple:
        """N_Q .. TUNE_W of the kernels (PAD: rows of this launch's gathered list and partials)."""
        return (self.n_q, self.n_k, self.rows, self.left, self.right, self.sinks, self.g_max, self.q_max, self.chunk,
                pad, bucket(self.n_q), bucket(min(self.left + self.right + 1, self.n_k)))

    def descriptor(self, x):
        """A TMA descriptor of x (B, H, N, D) when this call uses TMA, else None; its tile shape
        is set per configuration (:func:`.tuning.set_descriptor_blocks`)."""
        if not self.tma:
            return None
        from triton.tools.tensor_descriptor import TensorDescriptor

        strides = list(x.stride())
        for i in (2, 1, 0):  # a dimension of one element: any stride, but a positive one
            if x.shape[i] == 1:
                strides[i] = x.shape[i + 1] * strides[i + 1]
        return TensorDescriptor(x, list(x.shape), strides, [1, 1, 16, x.shape[3]])


def on_device(x: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def run(launch: Launch, blocks: dict) -> None:
    """Launch with fixed blocks, or with a grid that follows the autotuner's BLOCK_M/BLOCK_N."""
    if launch.kind == "delta":
        kernels.bwd_delta_kernel[(triton.cdiv(launch.rows, _DELTA_BLOCK), launch.other)](
            *launch.args, **launch.kwargs, BLOCK=_DELTA_BLOCK)
        return
    plain, tuned, which = KERNELS[launch.kind]
    if blocks:
        set_descriptor_blocks(launch.kind, {**dict(zip(plain.arg_names, launch.args)), **launch.kwargs, **blocks})
        plain[(triton.cdiv(launch.rows, blocks[which]), launch.other, launch.chunks)](
            *launch.args, **launch.kwargs, **blocks)
    else:
        tuned[lambda meta: (triton.cdiv(launch.rows, meta[which]), launch.other, launch.chunks)](
            *launch.args, **launch.kwargs)


def _strides(*xs) -> tuple:
    return tuple(s for x in xs for s in x.stride())


def forward_plan(q, k, v, prep: Prepared):
    """(out, lse, launches, finish): out (B, H, N_q, D), lse (B, H, N_q) base-2 fp32, the
    launches that fill them, and finish() to run after them (merges the full-row chunks)."""
    batch, heads = q.shape[0], prep.heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    n_chunks = triton.cdiv(prep.n_k, prep.chunk)
    pad = _padded(prep.q_max)
    full = prep.q_max > 0
    shape = (n_chunks, prep.batch * heads, pad) if full else (1,)
    part_o = torch.empty(*shape, prep.d if full else 1, dtype=torch.float32, device=q.device)
    part_m, part_l = (torch.empty(shape, dtype=torch.float32, device=q.device) for _ in range(2))
    args = (q, k, v, out, lse, prep.descriptor(k), prep.descriptor(v), prep.dil, prep.gmask,
            prep.gidx, prep.gcnt, prep.qidx, prep.qcnt, *prep.cu, part_o, part_m, part_l, *_strides(q, k, v, out),
            heads, *prep.sizes(pad), prep.qk_scale)
    kw = dict(**prep.constexprs(), INT64=_needs_int64(q, k, v, out))
    launches = [Launch("fwd", prep.n_q, prep.batch * heads, 1, args, dict(kw, FULL_ROWS=False))]
    if full:  # the global query rows, over chunks of keys
        launches.append(Launch("fwd", prep.q_max, prep.batch * heads, n_chunks, args, dict(kw, FULL_ROWS=True)))

    def finish():
        if not full:
            return
        top = part_m.amax(0)  # (BH, pad): every chunk holds keys a global row sees
        w = torch.exp2(part_m - top)
        denom = (w * part_l).sum(0)
        rows = ((w[..., None] * part_o).sum(0) / denom[..., None]).view(batch, heads, pad, prep.d)
        row_lse = (top + torch.log2(denom)).view(batch, heads, pad)
        bi, si, ri = prep.q_rows
        out[bi, :, ri] = rows[bi, :, si].to(out.dtype)
        lse[bi, :, ri] = row_lse[bi, :, si]

    return out, lse, launches, finish


def backward_plan(do, q, k, v, out, lse, prep: Prepared):
    """(dq, dk, dv, launches, finish) for the backward pass, as :func:`forward_plan`."""
    batch, heads, heads_kv = q.shape[0], prep.heads, prep.heads_kv
    dev = q.device
    if prep.tma and not _tma_ready(do):  # the incoming gradient may be any view
        do = do.clone(memory_format=torch.contiguous_format)
    delta = torch.empty(q.shape[:3], dtype=torch.float32, device=dev)  # rowsum(dO * O)
    launches = [Launch("delta", q.shape[2], batch * heads, 1, (out, do, delta, *_strides(out, do), heads, q.shape[2]),
                       dict(HEAD_DIM=prep.d, INT64=_needs_int64(out, do)))]
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    columns = prep.columns is not None
    kv_dtype = torch.float32 if columns else k.dtype  # column partials are added before rounding
    dk, dv = (torch.empty(x.shape, dtype=kv_dtype, device=dev) for x in (k, v))
    int64 = _needs_int64(q, k, v, do, dq, dk, dv)
    n_chunks_k, n_chunks_q = triton.cdiv(prep.n_k, prep.chunk), triton.cdiv(prep.n_q, prep.chunk)
    pad = _padded(prep.q_max)
    full = prep.q_max > 0
    part_dq = torch.empty((n_chunks_k, prep.batch * heads, pad, prep.d) if full else (1,), dtype=torch.float32,
                          device=dev)
    kw = dict(**prep.constexprs(), INT64=int64)
    dq_args = (q, k, v, do, dq, lse, delta, prep.descriptor(k), prep.descriptor(v), prep.dil,
               prep.gmask, prep.gidx, prep.gcnt, prep.qidx, prep.qcnt, *prep.cu, part_dq,
               *_strides(q, k, v, do, dq), heads, *prep.sizes(pad), prep.qk_scale, prep.scale)
    launches.append(Launch("dq", prep.n_q, prep.batch * heads, 1, dq_args, dict(kw, FULL_ROWS=False)))
    if full:
        launches.append(Launch("dq", prep.q_max, prep.batch * heads, n_chunks_k, dq_args, dict(kw, FULL_ROWS=True)))
    c_pad = max(prep.c_max, 1)
    part_dk, part_dv = (torch.empty((n_chunks_q, prep.batch * heads_kv, c_pad, prep.d) if columns else (1,),
                                    dtype=torch.float32, device=dev) for _ in range(2))
    dkdv_args = (q, k, v, do, dk, dv, lse, delta, prep.descriptor(q), prep.descriptor(do),
                 prep.dil, prep.gmask, prep.qidx, prep.qcnt, prep.cidx, prep.ccnt, *prep.cu, part_dk, part_dv,
                 *_strides(q, k, v, do, dk, dv), heads_kv, *prep.sizes(c_pad), prep.qk_scale, prep.scale)
    launches.append(Launch("dkdv", prep.n_k, prep.batch * heads_kv, 1, dkdv_args, dict(kw, COLUMNS=False)))
    if columns:  # sink and global keys, seen from outside their band, over chunks of query rows
        launches.append(Launch("dkdv", prep.c_max, prep.batch * heads_kv, n_chunks_q, dkdv_args,
                               dict(kw, COLUMNS=True)))
    result = {}

    def finish():
        if full:
            rows = part_dq.sum(0).view(batch, heads, pad, prep.d)
            bi, si, ri = prep.q_rows
            dq[bi, :, ri] = rows[bi, :, si].to(dq.dtype)
        grads = [dk, dv]
        if columns:
            doc, bg, si, where = prep.columns
            for g, part in zip(grads, (part_dk, part_dv)):
                g[bg, :, where] += part.sum(0).view(prep.batch, heads_kv, c_pad, prep.d)[doc, :, si]
            grads = [g.to(x.dtype) for g, x in zip(grads, (k, v))]
        result["dk"], result["dv"] = grads

    return dq, result, launches, finish


def launch_forward(q, k, v, prep: Prepared):
    """Run the forward plan; returns out (B, H, N_q, D) and lse (B, H, N_q), base-2 fp32."""
    out, lse, launches, finish = forward_plan(q, k, v, prep)
    for launch in launches:
        run(launch, prep.blocks)
    finish()
    return out, lse


def launch_backward(do, q, k, v, out, lse, prep: Prepared):
    """Run the backward plan; returns dq, dk, dv shaped like q, k, v."""
    dq, result, launches, finish = backward_plan(do, q, k, v, out, lse, prep)
    for launch in launches:
        run(launch, prep.blocks)
    finish()
    return dq, result["dk"], result["dv"]
