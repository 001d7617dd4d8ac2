"""Property tests: every backend against the float64 loop oracle on random calls, and bad input
refused with a message that names the argument.

(a) Differential: random small shapes (empty dims and grouped-query heads included), windows,
dilations, sinks, global tokens, dtypes (large-magnitude half inputs included) and layouts
(transposed ``(B, N, H, D)`` views, expanded, strided), forward and backward, for every CPU backend
and, in a separate ``interpreter`` test with a few tiny examples, for Triton's interpreter. A
backend that cannot run a case is skipped by asking the registry (``Backend.unsupported``).
(b) Bad input: random malformed arguments for the entry point and the exported backend
functions raise TypeError or ValueError whose message names the argument.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import swa_lib
from swa_lib import UNBOUNDED, AttentionPattern
from swa_lib.attention import validate_call
from swa_lib.backends import BACKENDS

LAYOUTS = ("contiguous", "transposed", "expanded", "strided")
HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def cpu_backends() -> tuple:
    """The registered backends usable here, except Triton (on a CPU only its slow interpreter)."""
    return tuple(name for name in swa_lib.available_backends() if name != "triton")


@dataclass(frozen=True)
class Case:
    b: int
    h_kv: int
    group: int
    n_q: int
    n_k: int
    d: int
    d_v: int
    dtype: torch.dtype
    large: bool  # q and k rows of norm 300: q.k up to 9e4, beyond float16's 65504
    layouts: tuple
    seed: int
    kwargs: dict  # window, dilation, sinks, global_tokens, scale


@st.composite
def cases(draw, triton: bool = False) -> Case:
    if triton:  # the kernel's limits: D in {16, ...}, D_v = D, N_q = N_k, no bfloat16 in the interpreter
        b, n_k, d = 1, draw(st.integers(1, 20)), 16  # (empty inputs never reach a backend)
        n_q, d_v = n_k, d
        dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    else:  # one case in three has an empty dim
        zero = draw(st.sampled_from([None, None, None, None, None, None, "b", "n_q", "n_k", "d_v"]))
        b = 0 if zero == "b" else draw(st.integers(1, 2))
        n_k = 0 if zero == "n_k" else draw(st.integers(1, 12))
        n_q = 0 if zero in ("n_q", "n_k") else draw(st.integers(1, n_k))
        d, d_v = draw(st.sampled_from([1, 4, 8])), 0 if zero == "d_v" else draw(st.sampled_from([3, 8]))
        dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    h_kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    heads = h_kv * group
    side = st.one_of(st.integers(0, n_k + 1), st.sampled_from([UNBOUNDED, 2**64]))
    kwargs = dict(window=(draw(side), draw(side)), sinks=draw(st.integers(0, 3)))
    kwargs["dilation"] = draw(st.one_of(st.integers(1, 4), st.just(2**40),
                                        st.tuples(*[st.integers(1, 4)] * heads)))
    positions = draw(st.lists(st.integers(0, n_k - 1), max_size=3, unique=True)) if n_k else []
    form = draw(st.sampled_from(["positions", "tensor", "mask", "batch mask"]))
    if positions and form == "positions":
        kwargs["global_tokens"] = positions
    elif positions and form == "tensor":
        kwargs["global_tokens"] = torch.tensor(positions)
    elif positions:
        mask = torch.zeros(n_k, dtype=torch.bool)
        mask[positions] = True
        kwargs["global_tokens"] = mask if form == "mask" else mask[None].expand(b, -1).clone()
    kwargs["scale"] = draw(st.one_of(st.none(), st.floats(0.1, 2.0)))
    # Large inputs only in half precision, where they overflow a naive float16 product. In float32
    # nothing overflows, and a score of 9e4 carries a rounding error of 5e-3 that every float32
    # computation (the log-sum-exp merge of sinks and global tokens included) passes on: the test
    # would measure that conditioning, not the backends.
    large = dtype in HALF and draw(st.booleans())
    layouts = tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3))
    return Case(b, h_kv, group, n_q, n_k, d, d_v, dtype, large, layouts, draw(st.integers(0, 2**16)), kwargs)


def _lay_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of x, in another memory layout (a view, differentiable like x)."""
    if layout == "transposed":  # what a Hugging Face model holds: (B, N, H, D) memory
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "expanded":  # one batch row broadcast to B (stride 0); values change, fine here
        return x[:1].expand(x.shape[0], -1, -1, -1) if x.shape[0] else x
    if layout == "strided":  # every other element of a wider last dim
        return torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]
    return x


def inputs(case: Case, device="cpu"):
    """q, k, v (dtype of the case, in its layouts, requiring grad) and an upstream gradient."""
    gen = torch.Generator().manual_seed(case.seed)
    h = case.h_kv * case.group
    shapes = [(case.b, h, case.n_q, case.d), (case.b, case.h_kv, case.n_k, case.d), (case.b, case.h_kv, case.n_k, case.d_v)]
    out = []
    for i, (shape, layout) in enumerate(zip(shapes, case.layouts)):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if case.large and i < 2:
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6) * 300
        x = x.to(device=device, dtype=case.dtype).requires_grad_()
        out.append(_lay_out(x, layout))
    grad = torch.randn(case.b, h, case.n_q, case.d_v, generator=gen, dtype=torch.float64).to(device, case.dtype)
    return out, grad


def forward_backward(q, k, v, grad, **kwargs):
    """Output and (dq, dk, dv) of one call, detached (gradients w.r.t. the given views)."""
    out = swa_lib.sliding_window_attention(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), grad, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v))]
    return [out.detach(), *grads]


def plain_reference(q, k, v, grad, pattern: AttentionPattern, scale: float, dtype):
    """Attention as plain PyTorch computes it in ``dtype``: scale q first (FlashAttention's
    reference does too), mask, softmax, weighted sum; output and gradients in ``dtype``."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    heads = q.shape[1]
    kk, vv = (t.repeat_interleave(heads // k.shape[1], dim=1) for t in (k, v))
    mask = pattern.mask(q.shape[2], k.shape[2], num_heads=heads)
    scores = torch.matmul(q * scale, kk.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), vv)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(dtype), allow_unused=True)
    return [out.detach(), *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v)))]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def assert_matches_oracle(name: str, got: list, oracle: list, plain: list, plain32: list, dtype,
                          magnitude: float = 1.0) -> None:
    """The tolerance rule of FlashAttention's tests, for every output and gradient:

        |backend - oracle| <= 2 * |plain - oracle| + atol

    where ``oracle`` is the loop backend in float64 on the same (rounded) inputs and ``plain`` is
    plain PyTorch attention computed in the inputs' dtype (:func:`plain_reference`): a backend may
    be at most twice as wrong as PyTorch itself is in that dtype. When plain PyTorch overflows in
    that dtype (large inputs), ``plain`` is its float32 computation rounded to the dtype.
    ``atol`` is four units in the last place of the largest value of the problem: the largest
    oracle output or gradient, or ``magnitude`` (at least 1), the size of the products a
    gradient is made of (:func:`problem_magnitude`). Where the plain reference happens to be
    exact (a gradient that is 0 because a row sees one key), a kernel's own formula may still
    round: ``dS = P * (dP - delta)`` cancels only up to rounding, and that rounding is then
    multiplied by the keys (for dq) or queries (for dk), of norm 300 in the large cases.
    float64 inputs are held to 1e-9 relative to that largest value.
    """
    scale = max([1.0, magnitude] + [float(o.abs().max()) for o in oracle if o.numel()])
    for what, g, o, p, p32 in zip(["out", "dq", "dk", "dv"], got, oracle, plain, plain32):
        assert g.shape == o.shape and g.dtype == dtype, f"{name} {what}: {g.shape} {g.dtype}"
        assert torch.isfinite(g).all(), f"{name} {what}: non-finite values"
        if not g.numel():
            continue
        if dtype == torch.float64:
            assert _max_err(g, o) <= 1e-9 * scale, f"{name} {what}: error {_max_err(g, o):.3g}"
            continue
        ref = p if torch.isfinite(p).all() else p32.to(dtype)
        bound = 2 * _max_err(ref, o) + 4 * torch.finfo(dtype).eps * scale
        assert _max_err(g, o) <= bound, f"{name} {what}: error {_max_err(g, o):.3g} > bound {bound:.3g}"


def problem_magnitude(q, k, v, grad, scale: float) -> float:
    """``scale * |q or k| * |dO| * |v|`` with the largest row norms: the size of the terms that
    make up dq and dk, so the size of their rounding errors."""
    def norm(t):
        return float(t.detach().double().norm(dim=-1).max()) if t.numel() else 0.0

    return scale * max(norm(q), norm(k)) * norm(grad) * norm(v)


def check_case(case: Case, backends, device="cpu") -> int:
    """Run the case on each backend that can run it; returns how many ran."""
    (q, k, v), grad = inputs(case, device)
    pattern, scale = validate_call(q, k, v, **case.kwargs)
    loose = [t.detach().double().requires_grad_() for t in (q, k, v)]
    oracle = forward_backward(*loose, grad.double(), **case.kwargs, backend="loop")
    plain = plain_reference(q, k, v, grad, pattern, scale, case.dtype)
    plain32 = plain_reference(q, k, v, grad, pattern, scale, torch.float32)
    ran = 0
    for name in backends:
        if BACKENDS[name].unsupported(q, k, pattern, v) is not None:
            continue  # e.g. triton: N_q < N_k or bfloat16 in the interpreter
        got = forward_backward(q, k, v, grad, **case.kwargs, backend=name)
        assert_matches_oracle(name, got, oracle, plain, plain32, case.dtype,
                              problem_magnitude(q, k, v, grad, scale))
        ran += 1
    return ran


@settings(max_examples=50, deadline=None)
@given(case=cases())
def test_every_cpu_backend_matches_the_float64_oracle(case):
    assert check_case(case, cpu_backends()) >= 1  # the loop backend runs everything


def _triton_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("the interpreter test runs only without a GPU")
    import swa_lib.backends.triton as tk  # conftest set TRITON_INTERPRET=1 before anything imported triton

    if not tk.INTERPRETER:
        pytest.skip("swa_lib.backends.triton was imported without TRITON_INTERPRET=1")
    return tk


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # the interpreter's masked lanes
@settings(max_examples=8, deadline=None)
@given(case=cases(triton=True))
def test_triton_in_the_interpreter_matches_the_float64_oracle(case):
    _triton_interpreter()
    check_case(case, ["triton"])


# ---- (b) bad input --------------------------------------------------------------------------------

def _good():
    q = torch.randn(1, 2, 5, 4)
    return q, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 3)


def _swap(qkv, index, value):
    out = list(qkv)
    out[index] = value
    return out


# (argument name, bad value) for each argument of each kind of entry point
BAD_TENSORS = [
    lambda x: x.tolist(), lambda x: None, lambda x: 3.0, lambda x: x[0], lambda x: x[None],
    lambda x: x.to(torch.int64), lambda x: x.bool(),
]
BAD_WINDOWS = [4, "4", (1, 2, 3), None, (-1, 0), (0, -2), (True, 0), (1.5, 0), (2, None)]
BAD_SCALES = [0, -1.0, float("nan"), float("inf"), True, "0.5"]
BAD_DILATIONS = [0, -2, True, 1.5, "2", (), (1, 0), (1, 2, 3), None]
BAD_SINKS = [-1, True, 1.5, None, "1"]
BAD_GLOBALS = [[5], [-1], torch.tensor([0, 9]), torch.zeros(5), torch.zeros(4, dtype=torch.bool),
               torch.zeros(2, 5, dtype=torch.bool), torch.tensor([[0, 1, 0, 0, 1]])]
BAD_SIDES = [-1, True, 1.5, None, "1"]
LOW_LEVEL = ["loop_attention", "dense_attention", "sdpa_attention", "chunked_attention", "blocked_attention"]
BANDS = ["band_attention", "chunked_band_attention"]


@st.composite
def bad_calls(draw):
    """(a call that must fail, the argument name its message must contain)."""
    entry = draw(st.sampled_from(["public", *LOW_LEVEL, *BANDS]))
    qkv = _good()
    kind = draw(st.sampled_from(["tensor", "mismatch", "scale", "pattern" if entry != "public" else "window",
                                 "extra"]))
    args = dict(window=(2, 0), scale=0.5)
    pattern = AttentionPattern(2, 0)
    name = None
    if kind == "tensor":
        i = draw(st.integers(0, 2))
        qkv = _swap(qkv, i, draw(st.sampled_from(BAD_TENSORS))(qkv[i]))
        name = "qkv"[i]
    elif kind == "mismatch":
        q, k, v = qkv
        name, qkv = draw(st.sampled_from([
            ("q, k, v", (q.double(), k, v)),  # dtypes
            ("q, k, v", (q, k, v.to("meta"))),  # devices
            ("batch", (q, torch.cat([k, k]), torch.cat([v, v]))),
            ("head dims", (q, k[..., :3], v)),
            ("k and v", (q, k, v[:, :, :4])),
            ("heads", (torch.randn(1, 3, 5, 4), k, v)),
            ("queries", (torch.randn(1, 2, 6, 4), k, v)),  # N_q > N_k: a query row could see no key
            ("D", (q[..., :0], k[..., :0], v)),
        ]))
    elif kind == "scale":
        args["scale"], name = draw(st.sampled_from(BAD_SCALES)), "scale"
    elif kind == "window":
        args["window"], name = draw(st.sampled_from(BAD_WINDOWS)), "window"
    elif kind == "pattern" and entry in BANDS:
        name = draw(st.sampled_from(["left", "right"]))
        args[name] = draw(st.sampled_from(BAD_SIDES))
    elif kind == "pattern":
        pattern, name = draw(st.sampled_from([
            ((2, 0), "pattern"), (None, "pattern"), ("dense", "pattern"),
            (AttentionPattern(2, 0, dilation=(1, 2, 3)), "dilation"),
            (AttentionPattern(2, 0, global_tokens=torch.zeros(1, 4, dtype=torch.bool)), "global_tokens"),
            (AttentionPattern(2, 0, global_tokens=torch.zeros(3, 5, dtype=torch.bool)), "global_tokens"),
        ]))
    elif entry == "public":
        name = draw(st.sampled_from(["dilation", "sinks", "global_tokens", "backend"]))
        args[name] = draw(st.sampled_from({"dilation": BAD_DILATIONS, "sinks": BAD_SINKS, "global_tokens": BAD_GLOBALS,
                                           "backend": ["fastest", 3, None, ("dense",)]}[name]))
    elif entry == "band_attention":
        name = draw(st.sampled_from(["block_size", "with_lse"]))
        args[name] = draw(st.sampled_from([0, -1, 1.5, True, "8"] if name == "block_size" else [1, None, "yes"]))
    else:  # extra arguments the entry point does not have: nothing more to break
        args["scale"], name = float("nan"), "scale"

    q, k, v = qkv
    if entry == "public":
        call = functools.partial(swa_lib.sliding_window_attention, q, k, v, args.pop("window"), **args)
    elif entry in BANDS:
        left, right = args.pop("left", 2), args.pop("right", 0)
        call = functools.partial(getattr(swa_lib, entry), q, k, v, left, right, args.pop("scale"),
                                 **{key: val for key, val in args.items() if key != "window"})
    else:
        call = functools.partial(getattr(swa_lib, entry), q, k, v, pattern, args["scale"])
    return entry, call, name


@settings(max_examples=300, deadline=None)
@given(bad=bad_calls())
def test_bad_input_raises_an_error_naming_the_argument(bad):
    entry, call, name = bad
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    message = str(info.value)
    assert re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message), f"{entry}: {name!r} not in {message!r}"


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_no_call_has_a_query_row_without_keys(case):
    """The contract behind "fully masked rows": with N_q <= N_k and windows >= 0 every query
    sees at least the key at its own position, so no backend ever normalises an empty row."""
    if case.n_q == 0 or case.b == 0:
        return
    (q, k, v), _ = inputs(case)
    pattern, _ = validate_call(q, k, v, **case.kwargs)
    mask = pattern.mask(case.n_q, case.n_k, num_heads=q.shape[1])
    assert bool(mask.any(-1).all())
