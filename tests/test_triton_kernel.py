"""The fused Triton kernel against the oracle: forward and gradients, every pattern feature.

Two modes, chosen once per process when ``swa_lib.backends.triton`` is imported:

* **no CUDA**: the kernels run in Triton's CPU interpreter. This module sets
  ``TRITON_INTERPRET=1`` before importing the kernels (Triton decides at decoration time and reads
  it again at launch, so it stays set for the pytest process; ``backend="auto"`` never picks the
  interpreter, so other test files are unaffected). Sizes are tiny (N in 1, 19, 37, 130).
* **CUDA**: the compiled kernels; the ``gpu`` tests run realistic sizes in bf16/fp16:
  ``PYTHONPATH=. python3 -m pytest tests/test_triton_kernel.py -m gpu``.

If another test file already imported ``swa_lib.backends.triton`` in the other mode, this module is
skipped with that reason rather than testing the wrong thing.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swa_lib import UNBOUNDED, AttentionPattern, dense_attention, loop_attention, sdpa_attention, sliding_window_attention
from swa_lib.backends import choose_backend
from swa_lib.masks import visible_keys

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (optional dependency swa_lib[triton])", allow_module_level=True)

HAS_CUDA = torch.cuda.is_available()
if "swa_lib.backends.triton" not in sys.modules:
    if not HAS_CUDA:
        # Explicit: CPU only through the interpreter. It must stay set for the process (Triton
        # reads it again when it launches), which is harmless to the other test files:
        # backend="auto" never picks the interpreter.
        os.environ["TRITON_INTERPRET"] = "1"
    import swa_lib.backends.triton as tk
else:
    import swa_lib.backends.triton as tk

    if not HAS_CUDA and not tk.INTERPRETER:
        pytest.skip("swa_lib.backends.triton was imported earlier in this process without "
                    "TRITON_INTERPRET=1 and there is no GPU; run this file on its own",
                    allow_module_level=True)

DEVICE = "cpu" if tk.INTERPRETER else "cuda"
interpreter = pytest.mark.skipif(not tk.INTERPRETER, reason="interpreter tests run only without a GPU")
gpu = [pytest.mark.gpu, pytest.mark.skipif(tk.INTERPRETER or not HAS_CUDA, reason="needs a CUDA GPU")]


def _inputs(b, h, h_kv, n, d, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, hh, n, d, generator=g) for hh in (h, h_kv, h_kv))
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]


def _run(fn, q, k, v, grad_out):
    """Output and (dq, dk, dv) of fn, with fresh leaves."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


def _errors(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    return [float((x.double() - y.double()).abs().max()) for x, y in zip([out_a, *grads_a], [out_b, *grads_b])]


def _global(b, n, positions):
    g = torch.zeros(b, n, dtype=torch.bool)
    for row, pos in enumerate(positions):
        g[row, pos] = True
    return g


# (name, B, H, H_kv, N, D, pattern) -- every feature, odd lengths, several blocks of 16
CASES = [
    ("n1", 1, 1, 1, 1, 16, AttentionPattern(0, 0)),
    ("diag_only", 1, 2, 2, 37, 16, AttentionPattern(0, 0)),
    ("causal5", 1, 2, 2, 37, 16, AttentionPattern(5, 0)),
    ("asym7_3", 2, 2, 2, 37, 16, AttentionPattern(7, 3)),
    ("full_NN", 1, 1, 1, 37, 32, AttentionPattern(37, 37)),
    ("unbounded_causal", 1, 1, 1, 37, 16, AttentionPattern(UNBOUNDED, 0)),
    ("anticausal_0_5", 1, 1, 1, 37, 16, AttentionPattern(0, 5)),
    ("head_dim_64", 1, 1, 1, 37, 64, AttentionPattern(5, 2)),
    ("n130_7_3_gqa", 1, 2, 1, 130, 16, AttentionPattern(7, 3)),
    ("gqa4_2", 1, 4, 2, 37, 16, AttentionPattern(20, 0)),
    ("dilation2", 1, 2, 2, 37, 16, AttentionPattern(6, 2, dilation=2)),
    ("dilation_per_head", 1, 2, 1, 37, 16, AttentionPattern(9, 3, dilation=(1, 3))),
    ("sinks_causal", 1, 2, 2, 37, 16, AttentionPattern(4, 0, sinks=3)),
    ("sinks_wide", 1, 1, 1, 37, 16, AttentionPattern(2, 5, sinks=20)),
    ("global_sym", 2, 2, 1, 37, 16, AttentionPattern(3, 2, global_tokens=_global(2, 37, [[0, 20], [36]]))),
    ("global_causal", 1, 2, 2, 37, 16, AttentionPattern(4, 0, global_tokens=_global(1, 37, [[1, 2, 30]]))),
    ("everything_n130", 1, 2, 1, 130, 16,
     AttentionPattern(5, 5, dilation=(2, 1), sinks=2, global_tokens=_global(1, 130, [[3, 64, 100]]))),
]


@interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_dense_fp32(case):
    """Forward and all three gradients equal float64 dense attention (the oracle's twin)."""
    _, b, h, h_kv, n, d, pattern = case
    q, k, v = _inputs(b, h, h_kv, n, d, torch.float32)
    grad = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(1))
    scale = d**-0.5
    ours = _run(lambda q, k, v: tk.triton_attention(q, k, v, pattern, scale), q, k, v, grad)
    ref = _run(lambda q, k, v: dense_attention(q, k, v, pattern, scale), q.double(), k.double(), v.double(), grad)
    errs = _errors(ours, ref)
    assert max(errs) < 2e-5, dict(zip(["out", "dq", "dk", "dv"], errs))


@interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
def test_unequal_blocks(blocks):
    """BLOCK_M != BLOCK_N: the forward and backward loop bounds must still agree."""
    pattern = AttentionPattern(9, 4, sinks=3, global_tokens=_global(1, 70, [[40]]))
    q, k, v = _inputs(1, 1, 1, 70, 16, torch.float32, seed=9)
    grad = torch.randn(1, 1, 70, 16, generator=torch.Generator().manual_seed(10))
    ours = _run(lambda q, k, v: tk.triton_attention(q, k, v, pattern, 0.25, blocks=blocks), q, k, v, grad)
    ref = _run(lambda q, k, v: dense_attention(q, k, v, pattern, 0.25), q.double(), k.double(), v.double(), grad)
    assert max(_errors(ours, ref)) < 2e-5


@interpreter
@pytest.mark.interpreter
def test_matches_loop_oracle():
    """Against the loop oracle itself (small: the loop is slow), all features at once."""
    pattern = AttentionPattern(3, 1, dilation=(1, 2), sinks=2, global_tokens=_global(1, 19, [[9]]))
    q, k, v = _inputs(1, 2, 1, 19, 16, torch.float32, seed=3)
    grad = torch.randn(1, 2, 19, 16, generator=torch.Generator().manual_seed(4))
    ours = _run(lambda q, k, v: tk.triton_attention(q, k, v, pattern, 0.3), q, k, v, grad)
    ref = _run(lambda q, k, v: loop_attention(q, k, v, pattern, 0.3), q.double(), k.double(), v.double(), grad)
    assert max(_errors(ours, ref)) < 2e-5


@interpreter
@pytest.mark.interpreter
def test_double_backward_raises_instead_of_dropping_the_second_order_term():
    q, k, v = _inputs(1, 2, 1, 19, 16, torch.float32, seed=8)
    out = sliding_window_attention(q, k, v, (4, 0), backend="triton")
    with pytest.raises(RuntimeError, match="backend 'triton' has no double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    (gq,) = torch.autograd.grad(sliding_window_attention(q, k, v, (4, 0), backend="triton").sum(), q)
    assert gq.shape == q.shape  # first-order gradients are unaffected


@interpreter
@pytest.mark.interpreter
def test_fp16_within_pytorch_error():
    """fp16: error vs float64 within 2x (forward) / 3x (gradients) of PyTorch's own fp16 error."""
    pattern = AttentionPattern(7, 3, sinks=1)
    q, k, v = _inputs(1, 2, 1, 37, 16, torch.float16, seed=5)
    grad = torch.randn(1, 2, 37, 16, generator=torch.Generator().manual_seed(6))
    ref = _run(lambda q, k, v: dense_attention(q, k, v, pattern, 0.25), q.double(), k.double(), v.double(), grad)
    # PyTorch's own fp16 attention (SDPA with the pattern's mask; swa_lib's dense path sums in fp32)
    torch_fp16 = _run(lambda q, k, v: sdpa_attention(q, k, v, pattern, 0.25), q, k, v, grad)
    ours = _run(lambda q, k, v: tk.triton_attention(q, k, v, pattern, 0.25), q, k, v, grad)
    assert ours[0].dtype == torch.float16 and all(g.dtype == torch.float16 for g in ours[1])
    budget = [2, 3, 3, 3]
    for name, e_ours, e_torch, factor in zip(["out", "dq", "dk", "dv"], _errors(ours, ref), _errors(torch_fp16, ref), budget):
        assert e_ours <= factor * e_torch + 1e-4, (name, e_ours, e_torch)


@interpreter
@pytest.mark.interpreter
def test_non_contiguous_inputs_and_public_function():
    """Strides are passed, not assumed: (B, N, H, D) storage viewed as (B, H, N, D)."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 37, 2, 16, generator=g).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    out = tk.triton_sliding_window_attention(q, k, v, (5, 2), global_tokens=[4], sinks=1)
    ref = sliding_window_attention(q, k, v, (5, 2), global_tokens=[4], sinks=1, backend="dense")
    assert float((out - ref).abs().max()) < 2e-5


@interpreter
@pytest.mark.interpreter
def test_registry_named_only_in_interpreter():
    """'triton' runs when asked for by name; 'auto' never picks the interpreter."""
    q, k, v = _inputs(1, 2, 2, 37, 16, torch.float32)
    pattern = AttentionPattern(5, 0)
    assert choose_backend("auto", q, k, pattern).name != "triton"
    assert choose_backend("triton", q, k, pattern).name == "triton"
    with torch.no_grad():
        out = sliding_window_attention(q, k, v, (5, 0), backend="triton")
        ref = sliding_window_attention(q, k, v, (5, 0), backend="dense")
    assert float((out - ref).abs().max()) < 2e-5
    with pytest.raises(ValueError, match="does not support dtype torch.bfloat16 on 'cpu'"):
        sliding_window_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), (5, 0), backend="triton")


@interpreter
@pytest.mark.interpreter
def test_block_skipping_never_reads_outside_the_band():
    """Poison k, v with NaN in one key block: queries whose tiles skip it stay exact.

    A tile that was visited would turn NaN into the output (NaN * 0 is NaN), so this shows the
    kernel does not even load the skipped blocks.
    """
    n, bm, bn = 130, 16, 16
    pattern = AttentionPattern(10, 3)
    q, k, v = (x.detach() for x in _inputs(1, 1, 1, n, 16, torch.float32, seed=8))
    ref = dense_attention(q, k, v, pattern, 0.25)
    poisoned = 4  # keys 64..79
    k[:, :, poisoned * bn : (poisoned + 1) * bn] = float("nan")
    v[:, :, poisoned * bn : (poisoned + 1) * bn] = float("nan")
    out = tk.triton_attention(q, k, v, pattern, 0.25, blocks=(bm, bn))
    tiles = tk.visited_tiles(n, pattern, bm, bn)
    for qb in range(tiles.shape[0]):
        rows = slice(qb * bm, min((qb + 1) * bm, n))
        if tiles[qb, poisoned]:
            assert torch.isnan(out[..., rows, :]).any(), f"query block {qb} should have read block {poisoned}"
        else:
            assert float((out[..., rows, :] - ref[..., rows, :]).abs().max()) < 2e-5
    assert int(tiles[:, poisoned].sum()) == 3  # only the blocks whose band reaches keys 64..79


@interpreter
@pytest.mark.interpreter
def test_bad_inputs_raise_clearly():
    """The kernel's limits are its row of the capability table: the direct function refuses what
    backend="triton" refuses, with the same ValueError and message."""
    q, k, v = _inputs(1, 2, 2, 17, 16, torch.float32)
    bad = [  # q, k, v, window, the reason given
        (q[..., :12], k[..., :12], v[..., :12], (2, 0), "backend 'triton' supports head dims"),
        (q.bfloat16(), k.bfloat16(), v.bfloat16(), (2, 0), "does not support dtype torch.bfloat16 on 'cpu'"),
        (q, k[:, :, :4], v[:, :, :4], (2, 0), "more queries than keys is not supported"),
        (q, k, v.repeat(1, 1, 1, 2), (2, 0), "needs v's head dim"),
        (q, k, v, (-1, 0), "window left must be >= 0, got -1"),
    ]
    for *args, reason in bad:
        with pytest.raises(ValueError, match=reason):
            tk.triton_sliding_window_attention(*args)
        with pytest.raises(ValueError, match=reason):
            sliding_window_attention(*args, backend="triton")
    with pytest.raises(ValueError, match="power of two"):
        tk.triton_sliding_window_attention(q, k, v, (2, 0), blocks=(24, 16))
    with pytest.raises(ValueError, match="does not run on device 'meta'.*Triton's CPU interpreter"):
        tk.triton_attention(*(x.detach().to("meta") for x in (q, k, v)), AttentionPattern(2, 0), 0.25)
    with pytest.raises(ValueError, match="empty input"):
        tk.triton_attention(q[:0], k[:0], v[:0], AttentionPattern(2, 0), 0.25)


@interpreter
def test_the_launcher_reads_the_capability_table(monkeypatch):
    """No second copy of the limits: narrow the table's row and the launcher follows it."""
    import dataclasses

    from swa_lib.backends import BACKENDS

    q, k, v = (x.detach() for x in _inputs(1, 1, 1, 17, 32, torch.float32))
    monkeypatch.setitem(BACKENDS, "triton", dataclasses.replace(BACKENDS["triton"], head_dims=frozenset({16})))
    with pytest.raises(ValueError, match=r"supports head dims \[16\], got 32"):
        tk.triton_attention(q, k, v, AttentionPattern(2, 0), 0.25)


# ---- pure-Python checks of the loop bounds (fast, no kernel launch) ------------------------
def _needed_tiles(pattern, n, bm, bn, n_q=None):
    """(query block, key block) tiles holding a visible pair, queries the last n_q of n."""
    n_q = n if n_q is None else n_q
    mask = pattern.mask(n_q, n)[0, 0]
    n_qb, n_kb = -(-n_q // bm), -(-n // bn)
    blocks = mask.new_zeros(n_qb * bm, n_kb * bn)
    blocks[:n_q, :n] = mask
    return blocks.reshape(n_qb, bm, n_kb, bn).any(3).any(1)  # (n_qb, n_kb)


def _assert_band_query_blocks(n, left, right, bm, bn, n_q=None):
    """The dk/dv kernel's query blocks [lo, hi) of each key block = the blocks holding a query
    that sees it through the band (what a sink key adds beyond it is the column pass's)."""
    band = _needed_tiles(AttentionPattern(left, right), n, bm, bn, n_q)
    for kb in range(band.shape[1]):
        lo, hi = tk.query_block_range(kb * bn, bm, bn, n, left, right, n_q=n_q)
        rows = torch.nonzero(band[:, kb]).flatten().tolist()
        assert list(range(lo, hi)) == (list(range(rows[0], rows[-1] + 1)) if rows else []), kb


@pytest.mark.parametrize("n,left,right,sinks,bm,bn", [
    (1, 0, 0, 0, 16, 16), (37, 5, 0, 0, 16, 16), (130, 7, 3, 0, 16, 32), (130, 130, 130, 0, 32, 16),
    (200, 40, 0, 5, 64, 32), (97, 0, 9, 40, 16, 16),
])
def test_loop_bounds_cover_exactly_the_needed_blocks(n, left, right, sinks, bm, bn):
    """Forward: key blocks [lo, hi) (+ sink blocks) = the blocks holding a visible key.
    Backward: query blocks [lo, hi) = the blocks holding a query that sees the key block through
    the band (what a sink key adds beyond it is the column pass's, over every query block)."""
    pattern = AttentionPattern(left, right, sinks=sinks)
    assert torch.equal(tk.visited_tiles(n, pattern, bm, bn), _needed_tiles(pattern, n, bm, bn))
    _assert_band_query_blocks(n, left, right, bm, bn)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 150), left=st.integers(0, 160), right=st.integers(0, 160), sinks=st.integers(0, 40),
       bm=st.sampled_from([16, 32, 64]), bn=st.sampled_from([16, 32, 64]), n_q=st.integers(1, 150))
def test_visited_tiles_property(n, left, right, sinks, bm, bn, n_q):
    """Property: the kernel's bounds visit exactly the tiles that hold a visible (i, j), also
    with fewer queries than keys (the last n_q positions); the dk/dv band range likewise."""
    n_q = min(n_q, n)
    pattern = AttentionPattern(left, right, sinks=sinks)
    assert torch.equal(tk.visited_tiles(n, pattern, bm, bn, n_q=n_q), _needed_tiles(pattern, n, bm, bn, n_q))
    _assert_band_query_blocks(n, left, right, bm, bn, n_q)


def test_tiles_grow_linearly_with_n():
    """Block skipping: tiles visited per query block stay constant as n grows (O(n * w))."""
    pattern = AttentionPattern(256, 0)
    counts = [int(tk.visited_tiles(n, pattern, 64, 64).sum()) for n in (1024, 2048, 4096)]
    assert counts[2] - counts[1] == 2 * (counts[1] - counts[0])  # doubling n doubles the increment
    assert counts[2] <= (4096 // 64) * (256 // 64 + 1)  # at most window/block + 1 tiles per row


def test_import_swa_lib_does_not_import_triton():
    """Importing swa_lib (or calling it with backend="auto" on CPU) must not import Triton; the
    lazy export does, on first use. Without GPU or interpreter, "triton" is unavailable."""
    import subprocess

    code = ("import sys, torch, swa_lib; assert 'triton' not in sys.modules; "
            "q = torch.randn(1, 1, 8, 16); swa_lib.sliding_window_attention(q, q, q, (2, 0)); "
            "assert 'triton' not in sys.modules, 'auto imported triton'; ")
    if not HAS_CUDA:  # no GPU and no interpreter chosen: the backend must say it cannot run
        code += ("assert 'triton' not in swa_lib.available_backends(); "
                 "import pytest; "
                 "pytest.raises(ValueError, swa_lib.sliding_window_attention, q, q, q, (2, 0), backend='triton'); ")
    code += "f = swa_lib.triton_sliding_window_attention; assert 'triton' in sys.modules"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_autotune_configs_are_valid():
    for kind in ("fwd", "dq", "dkdv"):
        for cfg in tk.autotune_configs(kind):
            assert cfg.kwargs["BLOCK_M"] >= 16 and cfg.kwargs["BLOCK_N"] >= 16
        assert len(tk.autotune_configs(kind, 90)) <= len(tk.autotune_configs(kind))
    with pytest.raises(ValueError, match="'bwd'"):
        tk.autotune_configs("bwd")


# ---- GPU: realistic sizes, low precision, tolerances from PyTorch's own error --------------
GPU_CASES = [
    ("causal", 2, 8, 2, 2048 + 17, 128, AttentionPattern(256, 0)),
    ("symmetric", 1, 8, 8, 4096 + 5, 64, AttentionPattern(128, 128)),
    ("features", 1, 4, 2, 1024 + 3, 128,
     AttentionPattern(64, 16, dilation=(1, 2, 3, 1), sinks=4,
                      global_tokens=_global(1, 1024 + 3, [[0, 500, 1026]]))),
    ("head_dim_32", 2, 4, 4, 999, 32, AttentionPattern(100, 0)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
@gpu[0]
@gpu[1]
def test_gpu_low_precision_within_pytorch_error(case, dtype):
    """Error vs float64 at most 2x (forward) / 3x (gradients) PyTorch SDPA's error in the same dtype."""
    _, b, h, h_kv, n, d, pattern = case
    q, k, v = _inputs(b, h, h_kv, n, d, dtype, seed=11)
    grad = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(12))
    scale = d**-0.5

    ref = _run(lambda q, k, v: dense_attention(q, k, v, pattern, scale), q.double(), k.double(), v.double(), grad.cuda())
    peer = _run(lambda q, k, v: sdpa_attention(q, k, v, pattern, scale), q, k, v, grad.cuda())
    ours = _run(lambda q, k, v: tk.triton_attention(q, k, v, pattern, scale), q, k, v, grad.cuda())
    for name, e_ours, e_peer, factor in zip(["out", "dq", "dk", "dv"], _errors(ours, ref), _errors(peer, ref), [2, 3, 3, 3]):
        assert e_ours <= factor * e_peer, (name, e_ours, e_peer)


@pytest.mark.parametrize("case", GPU_CASES[:3], ids=[c[0] for c in GPU_CASES[:3]])
@gpu[0]
@gpu[1]
def test_gpu_fp32_tight(case):
    _, b, h, h_kv, n, d, pattern = case
    q, k, v = _inputs(b, h, h_kv, n, d, torch.float32, seed=13)
    grad = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(14)).cuda()
    ours = _run(lambda q, k, v: tk.triton_attention(q, k, v, pattern, d**-0.5), q, k, v, grad)
    ref = _run(lambda q, k, v: dense_attention(q, k, v, pattern, d**-0.5), q.double(), k.double(), v.double(), grad)
    assert max(_errors(ours, ref)) < 1e-3


@pytest.mark.parametrize("variant,tma", [("current", None), ("current", False), ("previous", None)])
@pytest.mark.parametrize("n_q", [1, 300, 2048 + 17])
@gpu[0]
@gpu[1]
def test_gpu_fewer_queries_and_every_variant(n_q, variant, tma):
    """Decoding, a prefill chunk and the full sequence (queries the last n_q positions), with the
    current kernel (TMA on Hopper, and without) and the previous one: within PyTorch's error."""
    n, pattern = 2048 + 17, AttentionPattern(256, 0, sinks=4)
    g = torch.Generator().manual_seed(15)
    q = torch.randn(1, 8, n_q, 128, generator=g).cuda().bfloat16().requires_grad_()
    k, v = (torch.randn(1, 2, n, 128, generator=g).cuda().bfloat16().requires_grad_() for _ in range(2))
    grad = torch.randn(1, 8, n_q, 128, generator=g).cuda()
    ref = _run(lambda q, k, v: dense_attention(q, k, v, pattern, 128**-0.5), q.double(), k.double(), v.double(),
               grad)
    peer = _run(lambda q, k, v: sdpa_attention(q, k, v, pattern, 128**-0.5), q, k, v, grad)
    ours = _run(lambda q, k, v: tk.triton_attention(q, k, v, pattern, 128**-0.5, variant=variant, tma=tma),
                q, k, v, grad)
    for name, e_ours, e_peer, factor in zip(["out", "dq", "dk", "dv"], _errors(ours, ref), _errors(peer, ref),
                                            [2, 3, 3, 3]):
        assert e_ours <= factor * e_peer, (name, e_ours, e_peer)


@gpu[0]
@gpu[1]
def test_gpu_packed_documents_in_one_launch():
    from swa_lib import varlen_sliding_window_attention

    lengths = [700, 1, 2048, 333]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    g = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(sum(lengths), h, 64, generator=g).cuda().half() for h in (8, 2, 2))
    out = varlen_sliding_window_attention(q, k, v, cu, (128, 0), sinks=2, backend="triton")
    ref = varlen_sliding_window_attention(q.double(), k.double(), v.double(), cu, (128, 0), sinks=2,
                                          backend="blocked")
    peer = varlen_sliding_window_attention(q, k, v, cu, (128, 0), sinks=2, backend="sdpa")
    assert float((out.double() - ref).abs().max()) <= 2 * float((peer.double() - ref).abs().max())


@gpu[0]
@gpu[1]
def test_gpu_auto_picks_triton_for_long_sequences():
    q = torch.randn(1, 2, 16384, 64, device="cuda", dtype=torch.bfloat16)
    assert choose_backend("auto", q, q, AttentionPattern(512, 0)).name == "triton"


# ---- benchmarks/gpu.py: the helpers run on CPU; the measurement needs CUDA ----------------
def _bench_module():
    """benchmarks/gpu.py's names (it is a script, not a module of a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
    return types.SimpleNamespace(**runpy.run_path(str(path)))


@pytest.mark.parametrize("n,left,right", [(1, 0, 0), (37, 5, 0), (100, 7, 3), (50, 64, 64), (4096, 256, 256)])
def test_bench_keys_per_query_matches_the_mask(n, left, right):
    """The benchmark's FLOP count uses masks.visible_keys: the mask's own keys per query."""
    bench = _bench_module()
    exact = AttentionPattern(left, right).keys_per_query(n)
    assert visible_keys(n, left, right) / n == pytest.approx(exact, rel=1e-6)  # mask mean is fp32
    assert bench.useful_flops(n, 16, left, right, "fwd+bwd") == pytest.approx(
        2.5 * 4 * 16 * n * exact * bench.D, rel=1e-6)


def test_bench_table_plot_and_cpu_exit(capsys):
    bench = _bench_module()
    rows = [dict(window=[256, 256], heads=16, heads_kv=16, mode=m, n=n, method=meth,
                 ms=None if meth == "sdpa_band_mask" and n > 4096 else 0.1 * n / 4096 * (i + 1),
                 tflops=1.0, peak_gib=0.5)
            for m in bench.MODES for n in (4096, 8192, 16384) for i, meth in enumerate(bench.METHODS)]
    table = bench.format_table(rows)
    assert "OOM" in table and table.count("\n") == len(rows) + 1
    fig = bench.plot(dict(gpu="test", date="today", rows=rows))
    assert len(fig.axes) == 2
    assert bench.method_window("sdpa_flash_causal", 100, (5, 5)) == (99, 0)
    if not HAS_CUDA:
        assert bench.main([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
