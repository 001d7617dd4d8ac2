"""The public boundary: validation errors name the bad value; backend selection is explicit."""

import re

import pytest
import torch

import swa_lib


def call(q, k, v, window=(1, 1), **kw):
    return swa_lib.sliding_window_attention(q, k, v, window, **kw)


def test_wrong_ndim(make_qkv):
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dims \(B, H, N, D\), got 3 dims"):
        call(q[0], k, v)


def test_not_a_tensor(make_qkv):
    q, k, v = make_qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got list"):
        call(q, k.tolist(), v)


def test_integer_dtype(make_qkv):
    q, k, v = make_qkv()
    with pytest.raises(TypeError, match="v must be a floating-point tensor, got dtype torch.int64"):
        call(q, k, v.long())


def test_mixed_dtypes(make_qkv):
    q, k, v = make_qkv()
    with pytest.raises(TypeError, match="share a dtype"):
        call(q, k.float(), v)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 2, 7, 8), (2, 2, 7, 8), (2, 2, 7, 8)), "batch sizes differ"),
        (((1, 2, 7, 8), (1, 2, 7, 4), (1, 2, 7, 8)), "head dims differ"),
        (((1, 2, 7, 8), (1, 2, 7, 8), (1, 2, 6, 8)), "k and v must agree"),
        (((1, 3, 7, 8), (1, 2, 7, 8), (1, 2, 7, 8)), r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
        (((1, 2, 9, 8), (1, 2, 7, 8), (1, 2, 7, 8)), "more queries than keys"),
    ],
)
def test_shape_mismatches(shapes, message):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        call(q, k, v)


def test_different_devices(make_qkv):
    q, k, v = make_qkv()
    k = k.to("meta")
    with pytest.raises(ValueError, match="one device"):
        call(q, k, v)


def test_negative_window(make_qkv):
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="window left must be >= 0, got -3"):
        call(q, k, v, (-3, 0))


def test_single_int_window_points_to_converters(make_qkv):
    q, k, v = make_qkv()
    with pytest.raises(TypeError, match="from_mistral"):
        call(q, k, v, 4)


def test_unknown_backend_lists_choices(make_qkv):
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match=r"unknown backend 'fast'; choose one of \['auto', 'loop', 'dense'"):
        call(q, k, v, backend="fast")


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), "x"])
def test_bad_scale(scale, make_qkv):
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        call(q, k, v, scale=scale)


def test_bad_global_tokens(make_qkv):
    q, k, v = make_qkv(n=7)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 7\), got min 0, max 9"):
        call(q, k, v, global_tokens=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"mask must have shape \(1, 7\) or \(7,\), got \(5,\)"):
        call(q, k, v, global_tokens=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool mask or integer indices"):
        call(q, k, v, global_tokens=torch.zeros(7))


def test_per_head_dilation_length(make_qkv):
    q, k, v = make_qkv(h=2)
    with pytest.raises(ValueError, match="dilation per head needs 2 entries"):
        call(q, k, v, dilation=[1, 2, 3])


def test_scale_is_used(make_qkv):
    q, k, v = make_qkv()
    a = call(q, k, v, scale=0.5, backend="dense")
    b = call(q * 0.5 / q.shape[-1] ** -0.5, k, v, backend="dense")
    torch.testing.assert_close(a, b)


def test_output_dtype_and_shape_follow_inputs(make_qkv):
    q, k, v = make_qkv(2, 4, 9, 8, h_kv=2, d_v=5, dtype=torch.float32)
    out = call(q, k, v, backend="auto")
    assert out.shape == (2, 4, 9, 5) and out.dtype == torch.float32


def test_auto_never_picks_the_loop_and_covers_features(make_qkv):
    q, k, v = make_qkv()
    out = call(q, k, v, (2, 0), dilation=2, sinks=1, global_tokens=torch.tensor([3]))
    ref = call(q, k, v, (2, 0), dilation=2, sinks=1, global_tokens=torch.tensor([3]), backend="loop")
    torch.testing.assert_close(out, ref)
    from swa_lib.backends import choose_backend
    from swa_lib.attention import make_pattern

    assert choose_backend("auto", q, k, make_pattern((1, 1))).name != "loop"


def test_named_backend_that_cannot_run_raises(make_qkv):
    from swa_lib.backends import Backend, register_backend, BACKENDS

    def nope(q, k, v, pattern, scale):  # pragma: no cover - must never be called
        raise AssertionError("called")

    register_backend(Backend("_test_nodil", nope, priority=-1, dilation=False, auto=False))
    try:
        q, k, v = make_qkv()
        with pytest.raises(ValueError, match=r"does not support dilation \(got dilation=2\)"):
            call(q, k, v, dilation=2, backend="_test_nodil")
    finally:
        del BACKENDS["_test_nodil"]


def test_public_names():
    for name in ["sliding_window_attention", "window_mask", "from_longformer", "to_longformer", "from_mistral",
                 "to_mistral", "from_flash_attn", "to_flash_attn", "from_hf", "to_hf", "available_backends"]:
        assert hasattr(swa_lib, name), name
    assert {"loop", "dense", "sdpa"} <= set(swa_lib.available_backends())


def test_empty_global_tokens_mean_none(make_qkv):
    q, k, v = make_qkv()
    plain = call(q, k, v, backend="dense")
    for empty in ([], torch.zeros(7, dtype=torch.bool), torch.zeros(0, dtype=torch.long)):
        torch.testing.assert_close(call(q, k, v, global_tokens=empty, backend="dense"), plain)


def test_auto_prefers_a_fused_dense_kernel_for_wide_windows_and_banded_code_for_narrow(make_qkv):
    from swa_lib.attention import make_pattern
    from swa_lib.backends import choose_backend

    q, k, v = make_qkv(1, 1, 256, 8, dtype=torch.float32)
    assert choose_backend("auto", q, k, make_pattern((swa_lib.UNBOUNDED, 0))).name == "sdpa"
    assert choose_backend("auto", q, k, make_pattern((200, 0))).name == "sdpa"
    narrow = choose_backend("auto", q, k, make_pattern((8, 8))).name
    assert narrow not in {"sdpa", "dense", "loop"}
    long_q, long_k, _ = make_qkv(1, 1, 9000, 4, dtype=torch.float32)
    # above max_auto_len the O(N^2) route is never chosen, however wide the window
    assert choose_backend("auto", long_q, long_k, make_pattern((9000, 9000))).name not in {"sdpa", "dense"}


# -- scale that does not fit the dtype the call computes in ---------------------------------

ENTRIES = ["dense_attention", "sdpa_attention", "chunked_attention", "blocked_attention", "loop_attention",
           "band_attention", "chunked_band_attention"]


def _entry_call(entry, q, k, v, scale):
    """The public entry point (with a backend name) or an exported backend/band function."""
    if entry in ("band_attention", "chunked_band_attention"):
        return getattr(swa_lib, entry)(q, k, v, 1, 0, scale)[0]  # (out, lse)
    if entry.endswith("_attention"):
        return getattr(swa_lib, entry)(q, k, v, swa_lib.AttentionPattern(1, 0), scale)
    return call(q, k, v, (1, 0), scale=scale, backend=entry)


@pytest.mark.parametrize("entry", ["auto", "loop", "dense", "sdpa", "chunked", "blocked", *ENTRIES])
@pytest.mark.parametrize(
    "scale, dtypes",
    [
        (10**400, (torch.float32, torch.float64)),  # was OverflowError from float()
        (1e39, (torch.float32, torch.float16, torch.bfloat16)),  # was all NaN, or a RuntimeError (chunked)
        (3.5e38, (torch.float32, torch.float16)),
    ],
)
def test_scale_beyond_the_compute_dtype(entry, scale, dtypes):
    for dtype in dtypes:
        q = k = v = torch.randn(1, 2, 8, 4).to(dtype)
        with pytest.raises(ValueError, match="scale must be .*got " + re.escape(repr(scale)[:12])):
            _entry_call(entry, q, k, v, scale)


@pytest.mark.parametrize("entry", ["auto", "loop", "dense", "sdpa", "chunked", "blocked", *ENTRIES])
def test_large_scales_that_fit_still_work(entry, make_qkv):
    q, k, v = make_qkv(1, 2, 8, 4)  # float64: computed in float64, where 1e39 fits
    out = _entry_call(entry, q, k, v, 1e39)
    torch.testing.assert_close(out, call(q, k, v, (1, 0), scale=1e39, backend="loop"))
    assert out.isfinite().all()
    # the largest float32 itself fits float32 (zero scores: uniform weights over the window)
    z = torch.zeros(1, 2, 8, 4)
    out = _entry_call(entry, z, z, z + 1, float(torch.finfo(torch.float32).max))
    assert torch.equal(out, torch.ones(1, 2, 8, 4))


# -- global tokens that are neither a mask nor positions -------------------------------------

@pytest.mark.parametrize(
    "bad, error",
    [
        ([None], TypeError),
        ([1, None], TypeError),
        ({1, 2}, TypeError),  # a set has no order
        (frozenset({1}), TypeError),
        ("ab", TypeError),
        (b"ab", TypeError),
        ({1: 2}, TypeError),
        (object(), TypeError),
        ([2**70], ValueError),  # was "Overflow when unpacking long long"
    ],
)
def test_global_tokens_of_unusable_types(bad, error, make_qkv):
    q, k, v = make_qkv()
    with pytest.raises(error, match="global_tokens") as info:
        call(q, k, v, global_tokens=bad)
    assert repr(bad) in str(info.value)
    with pytest.raises(error, match="global_tokens"):
        swa_lib.make_pattern((1, 1), global_tokens=bad, n=7)


# -- make_pattern's sizes ---------------------------------------------------------------------

@pytest.mark.parametrize("with_global", [False, True])
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n=-5), ValueError, "n must be >= 0, got -5"),  # was accepted
        (dict(n=2.5), TypeError, "n must be an int, got float 2.5"),  # was accepted
        (dict(n="8"), TypeError, "n must be an int, got str '8'"),
        (dict(n=True), TypeError, "n must be an int, got bool True"),
        (dict(batch=1.5), TypeError, "batch must be an int, got float 1.5"),
        (dict(batch=-1), ValueError, "batch must be >= 0, got -1"),
        (dict(heads=1.5), TypeError, "heads must be an int, got float 1.5"),
        (dict(heads=-2), ValueError, "heads must be >= 0, got -2"),
    ],
)
def test_make_pattern_sizes(kwargs, error, message, with_global):
    kwargs = dict(kwargs)
    if with_global:
        kwargs.setdefault("n", 8)
        kwargs["global_tokens"] = [0]
    with pytest.raises(error, match=message):
        swa_lib.make_pattern((1, 1), **kwargs)


def test_make_pattern_valid_sizes_unchanged():
    assert swa_lib.make_pattern((1, 1), n=0) == swa_lib.AttentionPattern(1, 1)
    p = swa_lib.make_pattern((2**70, 0), sinks=2**70, dilation=(2**70, 1), batch=2, heads=2, n=8,
                             global_tokens=[3])
    assert (p.left, p.sinks, p.dilation) == (swa_lib.UNBOUNDED, swa_lib.UNBOUNDED, (8, 1))
    assert p.global_tokens.shape == (2, 8)


# -- the backend registry ---------------------------------------------------------------------

def _fn(q, k, v, pattern, scale):  # pragma: no cover - never called
    raise AssertionError("called")


@pytest.mark.parametrize(
    "kwargs, error, field",
    [
        (dict(fn=None), TypeError, "fn"),  # was registered, then broke every backend="auto" call
        (dict(fn="dense"), TypeError, "fn"),
        (dict(name=None), TypeError, "name"),
        (dict(name=3), TypeError, "name"),
        (dict(name=""), ValueError, "name"),
        (dict(name="auto"), ValueError, "name"),
        (dict(priority=1.5), TypeError, "priority"),
        (dict(priority=None), TypeError, "priority"),
        (dict(priority=True), TypeError, "priority"),
        (dict(devices="cpu"), TypeError, "devices"),
        (dict(devices=frozenset({1})), TypeError, "devices"),
        (dict(auto_devices=["cuda"]), TypeError, "auto_devices"),
        (dict(dtypes=frozenset({"float32"})), TypeError, "dtypes"),
        (dict(device_dtypes={"cpu": [torch.float32]}), TypeError, "device_dtypes"),
        (dict(device_dtypes=frozenset({torch.float32})), TypeError, "device_dtypes"),
        (dict(head_dims=[16]), TypeError, "head_dims"),
        (dict(auto="yes"), TypeError, "auto"),
        (dict(autograd=None), TypeError, "autograd"),
        (dict(dilation=1), TypeError, "dilation"),
        (dict(is_available=True), TypeError, "is_available"),
        (dict(devices_now=frozenset({"cpu"})), TypeError, "devices_now"),
        (dict(device_limits="none"), TypeError, "device_limits"),
        (dict(max_auto_len=-1), ValueError, "max_auto_len"),
        (dict(max_auto_len=1.5), TypeError, "max_auto_len"),
        (dict(min_auto_capability=8), TypeError, "min_auto_capability"),
    ],
)
def test_malformed_backend_is_refused(kwargs, error, field, make_qkv):
    from swa_lib.backends import BACKENDS, Backend, register_backend

    args = {"name": "_test_broken", "fn": _fn, "priority": 1000, **kwargs}
    before = dict(BACKENDS)
    try:
        with pytest.raises(error, match=field) as info:
            register_backend(Backend(**args))
        (bad,) = kwargs.values()
        shown = next(iter(bad.values())) if isinstance(bad, dict) else bad  # the bad entry of a mapping
        assert repr(shown) in str(info.value)
        assert BACKENDS == before
        q, k, v = make_qkv()
        call(q, k, v)  # "auto" still works
    finally:
        BACKENDS.clear()  # leave no broken backend behind, whatever happened
        BACKENDS.update(before)


@pytest.mark.parametrize("bad", [None, "dense", _fn])
def test_register_backend_needs_a_backend(bad):
    from swa_lib.backends import BACKENDS, register_backend

    before = dict(BACKENDS)
    try:
        with pytest.raises(TypeError, match="backend must be a swa_lib.backends.Backend, got") as info:
            register_backend(bad)  # None was an AttributeError
        assert repr(bad) in str(info.value)
    finally:
        BACKENDS.clear()
        BACKENDS.update(before)
