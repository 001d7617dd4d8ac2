"""Sequence parallel attention (swa_lib.distributed) against the single-process result.

Each world size is one ``torch.multiprocessing.spawn`` of gloo processes on 127.0.0.1 (start-up
costs seconds, so all cases of a world run in that one spawn); every rank checks its output
shard and its gradient shards against :func:`swa_lib.sliding_window_attention` on the full
tensors with the comparison of the torchrun self-check (:mod:`swa_lib.lab.distributed_check`),
the worst error over ranks is all-reduced, and rank 0 writes one JSON record per case. The
parametrised tests below then assert on those records.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swa_lib import UNBOUNDED
from swa_lib.distributed import (
    ShardLayout,
    gather_sequence,
    halo_tokens_sent,
    sequence_parallel_attention,
    shard_bounds,
)


from swa_lib.lab import distributed_check as CHECK  # noqa: E402  (the torchrun self-check)

TOL = CHECK.TOL

# name: (N, shard sizes or None for even, B, H, H_kv, D, window, options)
CASES = {
    2: {
        "causal_even": (16, None, 1, 2, 2, 8, (3, 0), {}),
        "symmetric_uneven": (13, [4, 9], 2, 2, 2, 8, (2, 2), {}),
        "window_wider_than_shard": (11, [3, 8], 1, 2, 2, 4, (5, 4), {}),
        "full_attention": (9, [5, 4], 1, 1, 1, 4, (UNBOUNDED, UNBOUNDED), {}),
        "global_symmetric": (14, [6, 8], 2, 2, 2, 8, (2, 2), {"global_tokens": [0, 9]}),
        "global_causal": (12, None, 1, 2, 1, 4, (3, 0), {"global_tokens": [5]}),
        "sinks_causal": (15, [7, 8], 1, 2, 2, 4, (2, 0), {"sinks": 3}),
        "dilation_per_head": (17, [8, 9], 1, 2, 2, 4, (6, 2), {"dilation": [1, 2]}),
        "gqa_scale_sdpa": (10, [6, 4], 1, 4, 2, 8, (3, 1), {"scale": 0.3, "backend": "sdpa"}),
        "sizes_gathered": (15, [9, 6], 1, 2, 2, 4, (3, 2), {"gather_sizes": True, "global_tokens": [4]}),
        "inference_no_grad": (15, [6, 9], 1, 2, 2, 4, (4, 0), {"no_grad": True, "sinks": 1}),
    },
    4: {
        "causal_even": (24, None, 1, 2, 2, 8, (4, 0), {}),
        "symmetric_uneven": (19, [3, 7, 2, 7], 2, 2, 1, 4, (2, 2), {}),
        "halo_spans_ranks": (17, [3, 7, 2, 5], 1, 2, 2, 4, (9, 3), {}),
        "global_symmetric": (21, [6, 5, 4, 6], 2, 2, 2, 8, (2, 1), {"global_tokens": [2, 10, 20]}),
        "global_bool_mask": (16, None, 1, 1, 1, 4, (1, 1), {"global_mask": [3, 12]}),
        "sinks_small_shards": (14, [2, 2, 5, 5], 1, 2, 2, 4, (2, 0), {"sinks": 5}),
        "everything": (23, [5, 6, 3, 9], 2, 2, 1, 4, (4, 1),
                       {"sinks": 2, "global_tokens": [1, 7, 15], "dilation": 2}),
        "unit_shards": (4, [1, 1, 1, 1], 1, 1, 1, 4, (1, 1), {"global_tokens": [2]}),
    },
}


def _run_case(world, spec, seed):
    n, sizes, b, h, h_kv, d, window, opts = spec
    sizes = sizes or [e - s for s, e in shard_bounds(n, world)]
    opts = dict(opts)
    if "global_mask" in opts:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[opts.pop("global_mask")] = True
        opts["global_tokens"] = mask[None].expand(b, n)
    elif "global_tokens" in opts:
        opts["global_tokens"] = torch.tensor(opts["global_tokens"])
    gen = torch.Generator().manual_seed(seed)  # the same full tensors on every rank
    q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, h_kv, n, d, generator=gen)
    v = torch.randn(b, h_kv, n, d, generator=gen)
    grad_out = torch.randn(b, h, n, d, generator=gen)
    grad = not opts.pop("no_grad", False)
    pass_sizes = not opts.pop("gather_sizes", False)  # else all-gathered inside
    err, out, ref = CHECK.compare_with_one_device((q, k, v), grad_out, window, sizes, pass_sizes=pass_sizes,
                                                  grad=grad, reference_backend="dense", **opts)
    assert out.requires_grad == grad
    # Reassembled output equals the reference too (exercises gather_sequence).
    err_whole = float((gather_sequence(out, sizes) - ref).abs().max())
    return {"out": float(err[0]), "dq": float(err[1]), "dk": float(err[2]), "dv": float(err[3]), "whole": err_whole}


def _errors_raised(rank, world):
    """Bad input must raise ValueError/TypeError quoting the bad value (checked on every rank)."""
    x = torch.randn(1, 1, 4, 4)
    found = {}

    def grab(name, fn):
        try:
            fn()
            found[name] = "no error"
        except (ValueError, TypeError) as err:
            found[name] = f"{type(err).__name__}: {err}"

    grab("bad_sizes_sum", lambda: sequence_parallel_attention(x, x, x, (1, 0), shard_sizes=[3] * world))
    grab("wrong_world", lambda: sequence_parallel_attention(x, x, x, (1, 0), shard_sizes=[4] * (world + 1)))
    grab("empty_shard", lambda: sequence_parallel_attention(x, x, x, (1, 0), shard_sizes=[0] + [4] * (world - 1)))
    grab("negative_window", lambda: sequence_parallel_attention(x, x, x, (-2, 0), shard_sizes=[4] * world))
    grab("per_batch_globals", lambda: sequence_parallel_attention(
        torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), (1, 0), shard_sizes=[4] * world,
        global_tokens=torch.tensor([[True] + [False] * (4 * world - 1), [False] * 4 * world])))
    grab("global_out_of_range", lambda: sequence_parallel_attention(
        x, x, x, (1, 0), shard_sizes=[4] * world, global_tokens=torch.tensor([4 * world])))
    grab("cross_length", lambda: sequence_parallel_attention(x[:, :, :2], x, x, (1, 0), shard_sizes=[4] * world))
    grab("zero_one_positions", lambda: sequence_parallel_attention(
        x, x, x, (1, 0), shard_sizes=[4] * world, global_tokens=torch.tensor([1, 0] * 2 * world)))
    grab("bad_scale", lambda: sequence_parallel_attention(x, x, x, (1, 0), shard_sizes=[4] * world, scale=0.0))
    return found


def _worker(rank, world, port, out_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        results = {}
        for i, (name, spec) in enumerate(CASES[world].items()):
            results[name] = _run_case(world, spec, seed=1000 * world + i)
        errors = _errors_raised(rank, world)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"cases": results, "errors": errors}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESULTS: dict = {}


def results_for(world, tmp_path_factory):
    if world not in _RESULTS:
        out_path = tmp_path_factory.mktemp(f"dist{world}") / "results.json"
        try:
            mp.spawn(_worker, args=(world, _free_port(), str(out_path)), nprocs=world, join=True)
            _RESULTS[world] = json.loads(out_path.read_text())
        except Exception as err:  # one failed spawn fails every case of that world, without re-spawning
            _RESULTS[world] = err
    if isinstance(_RESULTS[world], Exception):
        raise _RESULTS[world]
    return _RESULTS[world]


@pytest.mark.parametrize("world,case", [(w, c) for w in CASES for c in CASES[w]])
def test_matches_single_process(world, case, tmp_path_factory):
    errs = results_for(world, tmp_path_factory)["cases"][case]
    assert max(errs.values()) < TOL, errs


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("bad_sizes_sum", "holds 4 tokens but shard_sizes says 3"),
        ("wrong_world", "entries but the group has"),
        ("empty_shard", "tokens on rank 0 must be >= 1, got 0"),
        ("negative_window", "got -2"),
        ("per_batch_globals", "rows differ"),
        ("global_out_of_range", "max 8"),
        ("cross_length", "q has 2 tokens, k has 4"),
        # the entry point's own checks, with its messages
        ("zero_one_positions", "holding only 0 and 1"),
        ("bad_scale", "scale must be a positive finite number, got 0.0"),
    ],
)
def test_bad_input_raises(name, fragment, tmp_path_factory):
    message = results_for(2, tmp_path_factory)["errors"][name]
    assert message.startswith(("ValueError", "TypeError")) and fragment in message, message


# -- pure helpers, no process group ----------------------------------------------------------


def test_shard_bounds_cover_and_balance():
    for n in (1, 7, 10, 97):
        for p in (1, 2, 3, 4):
            if n < p:
                continue
            b = shard_bounds(n, p)
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(x[1] == y[0] for x, y in zip(b, b[1:]))
            sizes = [e - s for s, e in b]
            assert max(sizes) - min(sizes) <= 1


def test_halo_volume_is_window_not_n():
    for n in (64, 256, 4096):
        layout = ShardLayout(tuple(e - s for s, e in shard_bounds(n, 4)))
        sent = halo_tokens_sent(layout, (8, 0))
        # causal: every rank but the last sends its last 8 tokens to its right neighbour
        assert sent == [8, 8, 8, 0]
        sent = halo_tokens_sent(layout, (8, 3))
        assert sent == [8, 11, 11, 3]
    # a window wider than a shard: rank r's 3 tokens go whole to rank r + 1, and 2 of them
    # (positions 3r+1, 3r+2) also to rank r + 2, whose halo [3r+1, 3r+6) spans two ranks
    layout = ShardLayout((3, 3, 3, 3))
    assert halo_tokens_sent(layout, (5, 0)) == [3 + 2, 3 + 2, 3, 0]


def test_layout_validation():
    with pytest.raises(ValueError, match="tokens on rank 1 must be >= 1, got 0"):
        ShardLayout((3, 0))
    with pytest.raises(TypeError, match="2.5"):
        ShardLayout((3, 2.5))
    with pytest.raises(ValueError, match="got -1"):
        shard_bounds(-1, 2)


def test_needs_process_group():
    x = torch.randn(1, 1, 4, 4)
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this interpreter")
    with pytest.raises(RuntimeError, match="process group"):
        sequence_parallel_attention(x, x, x, (1, 0))


def test_self_check_shard_sizes():
    """The torchrun self-check's shards: even ones are shard_bounds', uneven ones grow with the rank."""
    assert CHECK.shard_sizes(10, 4, uneven=False) == [e - s for s, e in shard_bounds(10, 4)]
    assert CHECK.shard_sizes(1000, 2, uneven=True) == [333, 667]
    sizes = CHECK.shard_sizes(97, 4, uneven=True)
    assert sum(sizes) == 97 and sizes == sorted(sizes)
