"""The public boundary: validation errors name the bad value; backend selection is explicit."""

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
