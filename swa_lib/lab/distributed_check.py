#!/usr/bin/env python3
"""Self-check of sequence parallel attention under torchrun: sharded against one device.

    torchrun --nproc_per_node=2 -m swa_lib.lab.distributed_check --length 4096 --window 256 0
    torchrun --nproc_per_node=8 -m swa_lib.lab.distributed_check --length 131072 --window 4096 0

Every process builds the same random full tensors, computes the one-device result of
:func:`swa_lib.sliding_window_attention` and its gradients, then runs
:func:`swa_lib.distributed.sequence_parallel_attention` on its own shard; the largest
differences over all processes are reduced to process 0, which prints them. One process per GPU
(``nccl``) where CUDA is available, else CPU processes (``gloo``). tests/test_distributed.py
runs :func:`compare_with_one_device` on 2 and 4 CPU processes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..attention import sliding_window_attention
from ..distributed import (
    ShardLayout,
    halo_tokens_sent,
    sequence_parallel_attention,
    shard_bounds,
    shard_sequence,
)

NAMES = ("output", "grad q", "grad k", "grad v")
TOL, TOL_TEXT = 1e-5, "1e-5"


def compare_with_one_device(full, grad_out, window, sizes, *, pass_sizes=True, grad=True,
                            reference_backend="auto", **options):
    """Run one sharded call on this rank and compare it with the whole sequence on one device.

    Args:
        full: the full ``q, k, v``, the same on every rank; ``grad_out`` the full output gradient.
        sizes: tokens per rank; ``pass_sizes=False`` lets the function all-gather them instead.
        grad: also compare the gradients of q, k and v (else the call runs without autograd).
        options: ``dilation``, ``global_tokens``, ``sinks``, ``scale`` (both calls), ``backend``
            (the sharded call; the one-device call uses ``reference_backend``).

    Returns:
        ``(errors, out, ref)``: max |sharded - one device| of the output and the three
        gradients (zeros without ``grad``), the worst over all ranks; this rank's output shard;
        the full one-device output.
    """
    rank = dist.get_rank()
    backend = options.pop("backend", "auto")
    ref_in = [t.clone().requires_grad_() for t in full]
    ref = sliding_window_attention(*ref_in, window, backend=reference_backend, **options)
    ref.backward(grad_out)
    local = [shard_sequence(t, rank, sizes).clone().requires_grad_(grad) for t in full]
    with torch.set_grad_enabled(grad):
        out = sequence_parallel_attention(*local, window, shard_sizes=sizes if pass_sizes else None,
                                          backend=backend, **options)
    errors = [(out - shard_sequence(ref, rank, sizes)).abs().max()]
    if grad:
        out.backward(shard_sequence(grad_out, rank, sizes))
        errors += [(a.grad - shard_sequence(b.grad, rank, sizes)).abs().max() for a, b in zip(local, ref_in)]
    else:
        errors += [torch.zeros((), device=out.device)] * 3
    errors = torch.stack(errors).detach()
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    return errors, out, ref.detach()


def shard_sizes(length: int, world: int, uneven: bool) -> list[int]:
    """Even shards, or (``uneven``) rank r's share proportional to r + 1."""
    if not uneven:
        return [e - s for s, e in shard_bounds(length, world)]
    weights = [r + 1 for r in range(world)]
    sizes = [length * w // sum(weights) for w in weights]
    sizes[-1] += length - sum(sizes)
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="compare sequence_parallel_attention with one device")
    parser.add_argument("--length", type=int, default=1000, help="total sequence length N")
    parser.add_argument("--window", type=int, nargs=2, default=(64, 0), metavar=("LEFT", "RIGHT"))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--global-tokens", type=int, nargs="*", default=[], help="positions in the full sequence")
    parser.add_argument("--sinks", type=int, default=0)
    parser.add_argument("--uneven", action="store_true", help="give rank r a share proportional to r + 1")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        sizes = shard_sizes(args.length, world, args.uneven)
        gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
        q, k, v, grad_out = [torch.randn(1, args.heads, args.length, args.dim, generator=gen, dtype=torch.float64)
                             .float().to(device) for _ in range(4)]
        options = {"sinks": args.sinks}
        if args.global_tokens:
            options["global_tokens"] = torch.tensor(args.global_tokens)
        window = tuple(args.window)
        errors, _, _ = compare_with_one_device((q, k, v), grad_out, window, sizes, **options)
        if rank == 0:
            print(f"{world} ranks ({dist.get_backend()}), N = {args.length}, window = {window}, shard sizes = {sizes}")
            print(f"halo tokens sent per rank: {halo_tokens_sent(ShardLayout(tuple(sizes)), window)}")
            for name, err in zip(NAMES, errors.tolist()):
                print(f"  {name:<7} max |sharded - one device| < {TOL_TEXT}: {err < TOL}")
        return 0 if bool((errors < TOL).all()) else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
