"""Sequence parallel attention (swa_lib.distributed) against the single-process result.

Each world size is one ``torch.multiprocessing.spawn`` of gloo processes on 127.0.0.1 (start-up
costs seconds, so all cases of a world run in that one spawn); every rank checks its output
shard and its gradient shards against :func:`swa_lib.sliding_window_attention` on the full
tensors with the comparison of the torchrun self-check (:mod:`swa_lib.lab.distributed_check`),
the worst error over ranks is all-reduced, and rank 0 writes one JSON record per case. The
parametrised tests below then assert on those records. The same spawn also makes ranks disagree
(window, global tokens, dtype, head size, ...) and collects every rank's error message; the
spawn has a deadline, so a hang fails the tests instead of stalling them.
"""

from __future__ import annotations

import json
import os
import socket
import time
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
from swa_lib.distributed.layout import AGREEMENT_SLOTS, agreed_layout, agreement_row, check_agreement, rejected_row


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


def _disagreements_raised(rank, world):
    """Rank ``world // 2`` passes something else than the others; every rank's message, by case.

    After the errors, an agreeing call must still match one device (the group stayed in step).
    """
    odd = rank == world // 2
    sizes = [4] * world

    def call(n=4, h=1, d=4, dtype=torch.float32, window=(4, 0), grad=False, shard_sizes=sizes, **options):
        x = torch.randn(1, h, n, d, dtype=dtype).requires_grad_(grad)
        return sequence_parallel_attention(x, x, x, window, shard_sizes=shard_sizes, **options)

    mask = torch.zeros(4 * world, dtype=torch.bool)
    mask[1] = True
    cases = {
        "window": lambda: call(window=(8, 0) if odd else (4, 0)),
        "global_count": lambda: call(global_tokens=torch.tensor([1, 5] if odd else [1])),
        "global_positions": lambda: call(global_tokens=torch.tensor([2] if odd else [1])),
        "global_form": lambda: call(global_tokens=mask if odd else torch.tensor([1])),
        "dtype": lambda: call(dtype=torch.float64 if odd else torch.float32),
        "head_dim": lambda: call(d=8 if odd else 4),
        "heads": lambda: call(h=2 if odd else 1),
        "sinks": lambda: call(sinks=2 if odd else 0),
        "dilation": lambda: call(dilation=2 if odd else 1),
        "scale": lambda: call(scale=0.25 if odd else None),
        "backend": lambda: call(backend="dense" if odd else "auto"),
        "gradients": lambda: call(grad=odd),
        "shard_sizes": lambda: call(shard_sizes=None if odd else sizes),
        "held_tokens": lambda: call(n=5 if odd else 4),
        "several": lambda: call(window=(8, 0) if odd else (4, 0), dtype=torch.float64 if odd else torch.float32),
        "rejected": lambda: call(window=(-2, 0) if odd else (4, 0)),
    }
    found = {}
    for name, fn in cases.items():
        try:
            fn()
            found[name] = "no error"
        except Exception as err:  # noqa: BLE001  (the tests check the type)
            found[name] = f"{type(err).__name__}: {err}"
    full_sizes = [3 + r for r in range(world)]
    gen = torch.Generator().manual_seed(7)
    q, k, v, g = [torch.randn(1, 2, sum(full_sizes), 4, generator=gen) for _ in range(4)]
    err, _, _ = CHECK.compare_with_one_device((q, k, v), g, (3, 1), full_sizes, reference_backend="dense",
                                              global_tokens=torch.tensor([2]))
    found["agreeing_after_errors"] = float(err.max())
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
        disagree = [None] * world  # every rank's messages, gathered (the group must still be in step)
        dist.all_gather_object(disagree, _disagreements_raised(rank, world))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"cases": results, "errors": errors, "disagree": disagree}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEADLINE_S = 240  # for one whole spawn; a hang inside gloo would otherwise stall the suite


def _spawn(world: int, out_path: str) -> None:
    ctx = mp.spawn(_worker, args=(world, _free_port(), out_path), nprocs=world, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"the {world}-process spawn ran past {DEADLINE_S} s (a rank hangs)")


_RESULTS: dict = {}


def results_for(world, tmp_path_factory):
    if world not in _RESULTS:
        out_path = tmp_path_factory.mktemp(f"dist{world}") / "results.json"
        try:
            _spawn(world, str(out_path))
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


def _holders(world: int, mine, odd) -> str:
    """How the message lists the values: every rank but ``world // 2`` has ``mine``."""
    if world == 2:
        return f"rank 0 has {mine}, rank 1 has {odd}"
    return f"ranks 0-1, 3 have {mine}, rank 2 has {odd}"


@pytest.mark.parametrize("world", sorted(CASES))
@pytest.mark.parametrize(
    "case,fields",
    [
        ("window", [("window left", 4, 8)]),
        ("global_count", [("number of global tokens", 1, 2)]),
        ("global_positions", [("global tokens (checksum of their form, shape and values)", None, None)]),
        ("global_form", [("global tokens (checksum of their form, shape and values)", None, None)]),
        ("dtype", [("dtype", "torch.float32", "torch.float64")]),
        ("head_dim", [("head dim D of q and k", 4, 8), ("head dim D_v of v", 4, 8)]),
        ("heads", [("query heads H", 1, 2), ("key/value heads H_kv", 1, 2)]),
        ("sinks", [("sinks", 0, 2)]),
        ("dilation", [("dilation", 1, 2)]),
        ("scale", [("scale", 0.5, 0.25)]),
        ("backend", [("backend", "auto", "dense")]),
        ("gradients", [("gradients (q, k/v)", "none", "q and k/v")]),
        ("shard_sizes", [("shard_sizes", None, "None (gathered)")]),
        ("several", [("window left", 4, 8), ("dtype", "torch.float32", "torch.float64")]),
    ],
)
def test_disagreeing_ranks_raise_the_same_error(world, case, fields, tmp_path_factory):
    messages = [found[case] for found in results_for(world, tmp_path_factory)["disagree"]]
    assert len(messages) == world and len(set(messages)) == 1, messages  # the same error on every rank
    message = messages[0]
    assert message.startswith("ValueError: sequence-parallel ranks disagree on "), message
    for field, mine, odd in fields:
        assert f"{field}: " in message, (field, message)
        if mine is not None:
            assert f"{field}: {_holders(world, mine, odd)}" in message, message
        elif odd is not None:
            assert f"have {odd}" in message or f"has {odd}" in message, message


@pytest.mark.parametrize("world", sorted(CASES))
def test_token_counts_checked_on_every_rank(world, tmp_path_factory):
    messages = [found["held_tokens"] for found in results_for(world, tmp_path_factory)["disagree"]]
    assert set(messages) == {f"ValueError: rank {world // 2} holds 5 tokens but shard_sizes says 4"}, messages


@pytest.mark.parametrize("world", sorted(CASES))
def test_a_rank_that_rejects_its_inputs_does_not_leave_the_others_waiting(world, tmp_path_factory):
    messages = [found["rejected"] for found in results_for(world, tmp_path_factory)["disagree"]]
    for rank, message in enumerate(messages):
        if rank == world // 2:
            assert message.startswith("ValueError") and "got -2" in message, message
        else:
            assert message.startswith(f"ValueError: sequence-parallel rank {world // 2} rejected its inputs"), message


@pytest.mark.parametrize("world", sorted(CASES))
def test_agreeing_call_after_the_errors_still_matches(world, tmp_path_factory):
    for found in results_for(world, tmp_path_factory)["disagree"]:
        assert found["agreeing_after_errors"] < TOL, found


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


def test_agreement_rows_without_a_process_group():
    """The pure half of the agreement check: rows, their messages and the layout they give."""
    x = torch.randn(1, 2, 4, 8)

    def row(**kw):
        args = dict(dilation=1, sinks=0, global_tokens=None, scale=0.5, backend="auto", shard_sizes=None)
        return agreement_row(x, x, x, kw.pop("window", (3, 0)), **{**args, **kw})

    assert len(row()) == len(rejected_row()) == AGREEMENT_SLOTS <= 32  # one small collective
    check_agreement([row(), row()])  # agreeing rows pass
    # the same dilation per head and as one int, positions of any integer dtype: the same row
    assert row(dilation=[2, 2]) == row(dilation=2)
    assert row(global_tokens=torch.tensor([1], dtype=torch.int32)) == row(global_tokens=[1])
    assert row(global_tokens=[]) == row()
    with pytest.raises(ValueError, match=r"on window right: rank 0 has 0, ranks 1-2 have UNBOUNDED; on backend: "
                                         r"rank 0 has auto, ranks 1-2 have b{8}\.\.\. \(checksum"):
        check_agreement([row()] + [row(window=(3, UNBOUNDED), backend="b" * 20)] * 2)
    with pytest.raises(ValueError, match=r"dilation: rank 0 has 1, rank 1 has a dilation per head \(checksum"):
        check_agreement([row(), row(dilation=[1, 2])])
    # two long names with the same start still differ
    with pytest.raises(ValueError, match="on backend"):
        check_agreement([row(backend="x" * 17), row(backend="x" * 18)])
    with pytest.raises(ValueError, match="ranks 0, 2 rejected their inputs"):
        check_agreement([rejected_row(), row(), rejected_row()])
    assert agreed_layout([row(), row()], None).sizes == (4, 4)
    with pytest.raises(ValueError, match="rank 1 holds 4 tokens but shard_sizes says 5"):
        agreed_layout([row(), row()], (4, 5))


def test_self_check_shard_sizes():
    """The torchrun self-check's shards: even ones are shard_bounds', uneven ones grow with the rank."""
    assert CHECK.shard_sizes(10, 4, uneven=False) == [e - s for s, e in shard_bounds(10, 4)]
    assert CHECK.shard_sizes(1000, 2, uneven=True) == [333, 667]
    sizes = CHECK.shard_sizes(97, 4, uneven=True)
    assert sum(sizes) == 97 and sizes == sorted(sizes)
