"""Sequence parallel sliding window attention: shard the tokens over ranks, swap only halos.

Split a sequence of ``N`` tokens into ``P`` contiguous shards, one per rank of a
``torch.distributed`` process group. A query at position ``i`` only needs the keys
``i - left .. i + right``, so the rank holding positions ``[s, e)`` needs keys
``[max(0, s - left), min(N, e + right))``: its own shard plus a *halo* of ``left`` tokens from
the ranks before it and ``right`` tokens from the ranks after it. With ``P = 4``, ``left = 2``,
``right = 1`` and ``N = 16``::

    positions   0 1 2 3 | 4 5 6 7 | 8 9 a b | c d e f
    rank 1 keys     2 3 | 4 5 6 7 | 8          (halo 2 from rank 0, 1 from rank 2)

Each rank sends ``left + right`` tokens of keys and values whatever ``N`` is; all-gathering the
full K/V (what ring attention does for full attention, one block at a time) moves
``(P - 1) / P * N`` tokens per rank. A window wider than a shard is fine: the halo is then
assembled from several ranks.

:func:`sequence_parallel_attention` does the exchange with ``torch.distributed`` point-to-point
operations (``batch_isend_irecv``), computes the local attention with
:func:`swa_lib.sliding_window_attention` (so the fastest local backend runs) and returns the local
output shard. Gradients flow back through the exchange: the halo gradients are sent to the ranks
that own those keys and added there.

Extensions of the window (:mod:`swa_lib.masks`):

* ``dilation``: exact, the local key layout keeps true position differences.
* ``sinks`` S: the keys ``0 .. S-1`` are gathered from their owners to every rank.
* ``global_tokens`` (Longformer): the global keys are all-gathered and appended to every rank's
  keys; a global *query* sees the whole sequence, so its output is merged exactly from every
  rank's partial softmax with log-sum-exp weights. Global tokens must be the same for every
  batch element here (a ``(N,)`` mask or positions); a per-example ``(B, N)`` mask with differing
  rows raises ``ValueError``. Any other bad input raises what the entry point raises for it.

Agreement check: the plan is only right if every rank passes the same call (a rank with another
window or head size reads halo buffers nobody filled, or aborts inside the backend). On entry
each rank runs its own argument checks, packs what must agree into one row of 22 int64s
(``layout.AGREEMENT_SLOTS``: window left and right, dilation, sinks, count and checksum of the
global tokens' form, shape and values, dtype, device type, ``B``, ``H``, ``H_kv``, ``D``,
``D_v``, scale, backend name, ``shard_sizes`` as None or a checksum, which of q and k/v need
gradients) plus its token count, and all-gathers the rows: one collective, which also gives the
shard sizes when ``shard_sizes`` is None. Every rank checks the same rows and raises the same
``ValueError`` naming each differing field with every rank's value, e.g. ``sequence-parallel
ranks disagree on window left: rank 0 has 4, rank 1 has 8``. A rank whose own checks fail
joins the gather flagged and raises its own error; the others raise a ``ValueError`` naming it.
Token counts against ``shard_sizes`` and global tokens against ``N`` are checked after the
gather, alike on every rank. A mask on one rank and the same positions on another disagree.

Limits: self-attention only (queries, keys and values share the sharding); every shard must
hold at least one token; all ranks must make the same calls in the same order and call backward
on every rank or on none (the backward pass communicates). Tested with ``gloo`` on CPU (2 and 4
processes); the code uses only operations that ``nccl`` also provides (``batch_isend_irecv``,
``all_gather``, ``all_reduce``) and keeps tensors on their device, but has not been run on GPUs
in this repository's tests.

The plan (shard bounds, key ranges, who sends what) is :mod:`swa_lib.distributed.layout`, pure
functions of the shard sizes; this module carries it out. A self-check that compares the
sharded output and gradients with one device under ``torchrun`` (2 CPU processes, or one
process per GPU) is :mod:`swa_lib.lab.distributed_check`::

    torchrun --nproc_per_node=2 -m swa_lib.lab.distributed_check --length 4096 --window 256 0
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..attention import global_mask, sliding_window_attention, validate_call
from ..backends.dense import expand_kv
from ..masks import global_token_positions
from .layout import (
    ShardLayout,
    agreed_layout,
    agreement_row,
    check_agreement,
    halo_plan,
    halo_tokens_sent,
    rejected_row,
    shard_bounds,
    shard_sequence,
)

__all__ = [
    "shard_bounds",
    "ShardLayout",
    "sequence_parallel_attention",
    "shard_sequence",
    "gather_sequence",
    "halo_tokens_sent",
    "halo_plan",
]


# ---------------------------------------------------------------------------------------
# Communication, with autograd.
# ---------------------------------------------------------------------------------------


def _peer(group, rank: int) -> int:
    """Global rank of ``rank`` in ``group`` (P2POp wants global ranks)."""
    if group is None or group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(group, rank)


def _exchange(sends, recvs, group) -> None:
    """Post all sends ``(tensor, peer)`` and receives ``(buffer, peer)`` at once and wait."""
    ops = [dist.P2POp(dist.isend, t, _peer(group, p), group) for t, p in sends]
    ops += [dist.P2POp(dist.irecv, t, _peer(group, p), group) for t, p in recvs]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


class _HaloExchange(torch.autograd.Function):
    """``(B, H, e - s, C)`` local shard -> ``(B, H, ke - ks, C)`` shard with its halos.

    Backward sends each halo's gradient back to the rank that owns those positions, which adds
    it to the gradient of its own shard.
    """

    @staticmethod
    def forward(ctx, x, layout: ShardLayout, rank: int, left: int, right: int, group):
        s, e = layout.bounds(rank)
        ks, ke = layout.key_range(rank, left, right)
        need, give = halo_plan(layout, rank, left, right)
        sends = [(x[:, :, a - s : b - s].contiguous(), p) for p, a, b in give]
        parts, recvs = [], []
        for owner, a, b in need:
            if owner == rank:
                parts.append(x)
            else:
                buf = x.new_empty(x.shape[0], x.shape[1], b - a, x.shape[3])
                parts.append(buf)
                recvs.append((buf, owner))
        _exchange(sends, recvs, group)
        ctx.plan = (layout, rank, need, give, group, s, ks)
        return torch.cat(parts, dim=2)  # (B, H, ke - ks, C)

    @staticmethod
    def backward(ctx, grad):
        layout, rank, need, give, group, s, ks = ctx.plan
        grad = grad.contiguous()
        own = None
        sends = []
        for owner, a, b in need:
            piece = grad[:, :, a - ks : b - ks]
            if owner == rank:
                own = piece.clone()
            else:
                sends.append((piece.contiguous(), owner))
        bufs = [(grad.new_empty(grad.shape[0], grad.shape[1], b - a, grad.shape[3]), p, a, b)
                for p, a, b in give]
        _exchange(sends, [(buf, p) for buf, p, _, _ in bufs], group)
        for buf, _, a, b in bufs:
            own[:, :, a - s : b - s] += buf
        return own, None, None, None, None, None


class _AllGather(torch.autograd.Function):
    """Stack equally shaped tensors from every rank: ``x`` -> ``(P, *x.shape)``.

    Backward: rank r's input fed every rank's copy, so its gradient is the sum over ranks of
    the gradient of slot r (an all-reduce, then take slot r).
    """

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        world = dist.get_world_size(group)
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x, group=group)
        ctx.group = group
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def _gather_positions(x, positions, layout: ShardLayout, rank: int, group):
    """All-gather ``x[:, :, positions]`` (positions sorted, in the full sequence) to every rank.

    Every rank contributes the positions it owns; returns ``(B, H, len(positions), C)`` in
    position order on every rank, differentiable.
    """
    counts = []
    for r in range(layout.world_size):
        a, b = layout.bounds(r)
        counts.append(sum(1 for p in positions if a <= p < b))
    s, _ = layout.bounds(rank)
    mine = torch.tensor([p - s for p in positions if layout.bounds(rank)[0] <= p < layout.bounds(rank)[1]],
                        dtype=torch.long, device=x.device)
    width = max(counts)
    local = x.index_select(2, mine)  # (B, H, counts[rank], C)
    if counts[rank] < width:
        pad = x.new_zeros(x.shape[0], x.shape[1], width - counts[rank], x.shape[3])
        local = torch.cat([local, pad], dim=2)
    stacked = _AllGather.apply(local, group)  # (P, B, H, width, C)
    return torch.cat([stacked[r, :, :, : counts[r]] for r in range(layout.world_size)], dim=2)


# ---------------------------------------------------------------------------------------
# The public function.
# ---------------------------------------------------------------------------------------


def _global_positions(global_tokens, n: int, batch: int, device) -> list[int]:
    """Global tokens, in any form :func:`swa_lib.sliding_window_attention` takes (over the full
    sequence), as sorted positions; they must be the same for every batch element."""
    mask = global_mask(global_tokens, batch, n, device)  # (B, N): the entry point's checks
    if mask is None or not bool(mask.any()):
        return []
    if not bool((mask == mask[:1]).all()):
        raise ValueError(
            "sequence_parallel_attention needs the same global tokens for every batch element; "
            f"got global tokens whose rows differ over the batch of {batch}"
        )
    positions, counts = global_token_positions(mask[:1])
    return positions[0, : int(counts[0])].tolist()


def _collective_device(group, q) -> torch.device:
    """Where the agreement rows travel: CPU for gloo, the current GPU for nccl (whatever device
    a confused rank's ``q`` is on), else the device of ``q``."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return q.device if isinstance(q, torch.Tensor) else torch.device("cpu")


def _agree(q, k, v, window, dilation, global_tokens, sinks, scale, backend, shard_sizes, group):
    """Check this rank's arguments, then agree with every rank in one all-gather.

    Returns ``(pattern, scale, layout)``. A rank whose own checks fail still joins the
    collective (flagged) before raising its error, so the other ranks raise instead of waiting.
    """
    world = dist.get_world_size(group)
    failure, row = None, rejected_row()
    try:
        # The entry point's checks of q, k, v, window, dilation, sinks and scale, on the local shard.
        pattern, scale = validate_call(q, k, v, window, dilation=dilation, sinks=sinks, scale=scale)
        if q.shape[2] != k.shape[2]:
            raise ValueError("queries and keys must be sharded alike (self-attention): "
                             f"q has {q.shape[2]} tokens, k has {k.shape[2]}")
        sizes = None if shard_sizes is None else ShardLayout(tuple(shard_sizes)).sizes
        if sizes is not None and len(sizes) != world:
            raise ValueError(f"shard_sizes has {len(sizes)} entries but the group has {world} ranks")
        row = agreement_row(q, k, v, pattern.window, dilation=dilation, sinks=pattern.sinks,
                            global_tokens=global_tokens, scale=scale, backend=backend, shard_sizes=sizes)
    except Exception as err:  # noqa: BLE001  (re-raised below, after the collective)
        failure = err
    mine = torch.tensor(row, dtype=torch.int64, device=_collective_device(group, q))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    if failure is not None:
        raise failure
    rows = torch.stack(every).tolist()
    check_agreement(rows)
    return pattern, scale, agreed_layout(rows, sizes)


def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window,
    *,
    group=None,
    shard_sizes: Optional[Sequence[int]] = None,
    dilation=1,
    global_tokens=None,
    sinks: int = 0,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sliding window attention over a sequence sharded along N across a process group.

    Every rank of ``group`` calls this with its own contiguous shard; rank ``r`` holds positions
    ``[s_r, e_r)`` of the full sequence, in rank order. The result on every rank equals the
    matching rows of :func:`swa_lib.sliding_window_attention` on the full tensors.

    Args:
        q, k, v: the local shards ``(B, H, n_r, D)``, ``(B, H_kv, n_r, D)``, ``(B, H_kv, n_r, D_v)``.
        window: inclusive ``(left, right)`` as in :mod:`swa_lib.masks`; any width (a halo may
            span several ranks; ``UNBOUNDED`` degenerates to all-gathering K/V).
        group: the process group (default: the world).
        shard_sizes: tokens per rank; if None they come with the agreement all-gather.
        dilation, sinks, scale, backend: as in :func:`swa_lib.sliding_window_attention`;
            ``backend`` picks the local backend.
        global_tokens: over the *full* sequence, in any form
            :func:`swa_lib.sliding_window_attention` takes (a bool mask ``(N,)`` or ``(B, N)``,
            or integer positions ``(G,)`` or ``(B, G)``), the same for every batch element and
            on every rank.

    Returns:
        The local output shard ``(B, H, n_r, D_v)``.

    Raises:
        ValueError: on every rank, if the ranks disagree on anything in the agreement check
            (see the module docstring) or another rank rejected its arguments.

    Communication per rank and call: one all-gather of 22 int64s (the agreement check), the
    halo, ``left + right`` tokens of K and V at most (independent of N), plus the sink and
    global K/V/Q (all-gathered) and, with global tokens, one all-gather of ``G x (D_v + 1)``
    partial results per head.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence_parallel_attention needs an initialised torch.distributed process group")
    pattern, scale, layout = _agree(q, k, v, window, dilation, global_tokens, sinks, scale, backend,
                                    shard_sizes, group)
    left, right = pattern.window
    rank = dist.get_rank(group)
    s, e = layout.bounds(rank)
    n = layout.n
    batch, heads, d_k = q.shape[0], q.shape[1], k.shape[3]
    gpos = _global_positions(global_tokens, n, batch, q.device)
    n_sinks = min(pattern.sinks, n)
    ks, ke = layout.key_range(rank, left, right)

    # 1. Halo exchange of keys and values together: (B, H_kv, ke - ks, D + D_v).
    kv = torch.cat([k, v], dim=-1)
    kv_band = _HaloExchange.apply(kv, layout, rank, left, right, group)

    # 2. Special keys: sinks 0..S-1 and global tokens, gathered to every rank.
    special = sorted(set(range(n_sinks)) | set(gpos))
    prefix_len = min(n_sinks, ks)  # sinks left of the band, placed in front of it
    extra = [p for p in gpos if not (p < prefix_len or ks <= p < ke)]  # globals outside: appended
    if special:
        kv_special = _gather_positions(kv, special, layout, rank, group)  # (B, H_kv, len(special), C)
        where = {p: i for i, p in enumerate(special)}
        idx = torch.tensor([where[p] for p in extra], dtype=torch.long, device=q.device)
        # Both pieces are used even when empty: every rank's output must depend on the gather,
        # or autograd would skip its backward (an all-reduce) on some ranks and the others hang.
        pieces = [kv_special[:, :, :prefix_len], kv_band, kv_special.index_select(2, idx)]
        keys = torch.cat(pieces, dim=2)  # sinks are the first entries of `special`
    else:
        keys = kv_band
    k_loc, v_loc = keys[..., :d_k], keys[..., d_k:]

    # 3. Local attention. Pad the queries at the end so that the bottom-right alignment of the
    #    public function puts local query r at the key index of its true position: with
    #    n_k = prefix + (ke - ks) + extra keys and n_q = (e - s) + (ke - e) + extra rows,
    #    row r sits at r + n_k - n_q = prefix + (s - ks) + r. Position differences between a
    #    query and its band keys are then exact, so dilation and causality are untouched.
    n_pad = (ke - e) + len(extra)
    q_pad = torch.cat([q, q.new_zeros(batch, heads, n_pad, q.shape[3])], dim=2) if n_pad else q
    gmask = None
    if gpos:
        key_pos = list(range(prefix_len)) + list(range(ks, ke)) + extra
        gset = set(gpos)
        gmask = torch.tensor([p in gset for p in key_pos], dtype=torch.bool, device=q.device)
    # Sinks: when prefix_len < n_sinks the band starts at 0 (ks <= sinks), so indices are true
    # positions; otherwise the prefix holds exactly the S sinks at indices 0..S-1. Either way
    # the public "first S keys" rule is the right one.
    out = sliding_window_attention(
        q_pad, k_loc, v_loc, (left, right), dilation=dilation, global_tokens=gmask,
        sinks=n_sinks, scale=scale, backend=backend,
    )[:, :, : e - s]

    # 4. Global queries see every key: merge per-rank partial softmaxes with log-sum-exp weights.
    if gpos:
        q_glob = _gather_positions(q, gpos, layout, rank, group)  # (B, H, G, D)
        k_own, v_own = expand_kv(k, heads).float(), expand_kv(v, heads).float()  # (B, H, n_r, D)
        scores = torch.matmul(q_glob.float(), k_own.transpose(-2, -1)) * scale  # (B, H, G, n_r)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, H, G, 1)
        partial = torch.matmul(torch.exp(scores - lse), v_own)  # (B, H, G, D_v)
        stacked = _AllGather.apply(torch.cat([partial, lse], dim=-1), group)  # (P, B, H, G, D_v + 1)
        lses = stacked[..., -1:]
        weights = torch.softmax(lses, dim=0)  # exp(lse_p) / sum_p exp(lse_p)
        merged = (weights * stacked[..., :-1]).sum(0).to(out.dtype)  # (B, H, G, D_v)
        own = [i for i, p in enumerate(gpos) if s <= p < e]
        sel = torch.tensor(own, dtype=torch.long, device=q.device)
        rows = torch.tensor([gpos[i] - s for i in own], dtype=torch.long, device=q.device)
        out = out.index_copy(2, rows, merged.index_select(2, sel))
    return out


def gather_sequence(x: torch.Tensor, sizes: Sequence[int], group=None, dim: int = 2) -> torch.Tensor:
    """Reassemble the full tensor from every rank's shard (no autograd)."""
    layout = ShardLayout(tuple(sizes))
    width = max(layout.sizes)
    x = x.detach().movedim(dim, 0).contiguous()
    if x.shape[0] < width:
        x = torch.cat([x, x.new_zeros(width - x.shape[0], *x.shape[1:])])
    out = [torch.empty_like(x) for _ in range(layout.world_size)]
    dist.all_gather(out, x, group=group)
    full = torch.cat([t[:size] for t, size in zip(out, layout.sizes)])
    return full.movedim(0, dim)
