"""Dilation through every backend == the loop oracle; schedules and their exact receptive fields."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import swa_lib
from swa_lib.backends import BACKENDS
from swa_lib.lab.receptive_field import measure_influence
from swa_lib.schedule import (
    LayerWindow,
    WindowSchedule,
    interior_keys,
    layer_offsets,
    receptive_field_size,
    receptive_field_support,
    schedule_reach,
)


# -- dilation through the public API ---------------------------------------------------------


def dilation_backends():
    """Every registered CPU backend that runs here and claims dilation (the loop oracle aside)."""
    return [
        name for name in swa_lib.available_backends()
        if name != "loop" and BACKENDS[name].dilation and "cpu" in BACKENDS[name].devices
        and torch.float64 in BACKENDS[name].dtypes
    ]


@pytest.mark.parametrize("n", [1, 7, 16])
@pytest.mark.parametrize("dilation", [1, 2, 3, 4, (1, 2, 3, 4), (4, 1, 1, 2)])
@pytest.mark.parametrize("window", [(0, 0), (5, 0), (3, 4), (8, 8)])
def test_dilation_loop_dense_auto_forward_and_grad(n, dilation, window, make_qkv):
    results = {}
    for backend in ("loop", *dilation_backends(), "auto"):
        q, k, v = make_qkv(1, 4, n, 3, seed=n, requires_grad=True)
        out = swa_lib.sliding_window_attention(q, k, v, window, dilation=dilation, backend=backend)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        results[backend] = (out.detach(), *torch.autograd.grad((out * weight).sum(), (q, k, v)))
    for backend in (*dilation_backends(), "auto"):
        for a, b in zip(results[backend], results["loop"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_dilation_mask_per_head_matches_predicate():
    pattern = swa_lib.AttentionPattern(4, 2, dilation=(1, 2, 3))
    mask = pattern.mask(11, num_heads=3)[0]  # (H, n, n)
    for h, d in enumerate((1, 2, 3)):
        for i in range(11):
            for j in range(11):
                expected = -2 <= i - j <= 4 and (i - j) % d == 0
                assert bool(mask[h, i, j]) == expected
        # same reach (span), fewer keys: the middle row has left//d + right//d + 1 keys
        assert int(mask[h, 5].sum()) == 4 // d + 2 // d + 1


# -- the schedule config ---------------------------------------------------------------------


def test_schedule_layers():
    s = WindowSchedule(num_layers=6, num_heads=4, first_window=4, last_window=24,
                       dilated_layers=3, dilated_heads=2, max_dilation=4)
    assert s.windows() == [(4, 4), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24)]
    assert s.dilations() == [(1, 1, 1, 1)] * 3 + [(1, 1, 2, 2), (1, 1, 3, 3), (1, 1, 4, 4)]
    layers = s.layers()
    assert [l.window for l in layers] == s.windows()
    causal = WindowSchedule(3, 1, 2, 2, causal=True)
    assert causal.windows() == [(2, 0)] * 3 and causal.dilations() == [(1,)] * 3
    one = WindowSchedule(2, 2, 1, 3, dilated_layers=1, dilated_heads=1, max_dilation=3)
    assert one.dilations() == [(1, 1), (1, 3)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_layers=0, num_heads=1, first_window=1, last_window=1), "num_layers must be >= 1, got 0"),
        (dict(num_layers=2, num_heads=1, first_window=-1, last_window=1), "first_window must be >= 0, got -1"),
        (dict(num_layers=2, num_heads=2, first_window=1, last_window=1, dilated_layers=3), r"dilated_layers \(3\)"),
        (dict(num_layers=2, num_heads=2, first_window=1, last_window=1, dilated_heads=3), r"dilated_heads \(3\)"),
        (dict(num_layers=2, num_heads=2, first_window=1, last_window=1, max_dilation=0), "max_dilation must be >= 1"),
    ],
)
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WindowSchedule(**kwargs)
    with pytest.raises(TypeError, match="num_heads must be an int, got float 2.0"):
        WindowSchedule(num_layers=2, num_heads=2.0, first_window=1, last_window=1)


def test_layer_offsets_and_cost():
    layer = LayerWindow((6, 3), dilation=(1, 3))
    assert layer_offsets(layer).tolist() == [-3, -2, -1, 0, 1, 2, 3, 4, 5, 6]
    assert layer_offsets(LayerWindow((6, 3), dilation=3)).tolist() == [-3, 0, 3, 6]
    assert interior_keys(LayerWindow((6, 3), dilation=3)) == 4
    assert interior_keys(layer, 2) == (10 + 4) / 2
    # the cost equals the average row sum of the mask in the middle of a long sequence
    pattern = swa_lib.AttentionPattern(6, 3, dilation=(1, 3))
    assert pattern.mask(40, num_heads=2)[0, :, 20].sum(-1).float().mean() == interior_keys(layer, 2)


def test_schedule_reach():
    assert schedule_reach([LayerWindow((4, 0), dilation=2)] * 3) == (12, 0)
    assert schedule_reach((3, 2), 5) == (15, 10)
    s = WindowSchedule(num_layers=3, num_heads=2, first_window=2, last_window=6, dilated_layers=1,
                       dilated_heads=1, max_dilation=4)
    assert schedule_reach(s) == (2 + 4 + 6, 2 + 4 + 6)  # the undilated head reaches the full span
    s = WindowSchedule(num_layers=3, num_heads=2, first_window=2, last_window=6, dilated_layers=1,
                       dilated_heads=2, max_dilation=4)
    assert schedule_reach(s) == (2 + 4 + 4, 2 + 4 + 4)  # span 6 with dilation 4: furthest key 4


# -- receptive fields: analytic == measured -------------------------------------------------


STACKS = {
    "plain": ([LayerWindow((2, 2))] * 3, 1),
    "causal dilated": ([LayerWindow((4, 0), dilation=2)] * 3, 1),
    "per-head dilation": ([LayerWindow((3, 1), dilation=(1, 3))] * 3, 2),
    "global token": ([LayerWindow((1, 1)), LayerWindow((1, 1), global_tokens=(5,)), LayerWindow((2, 0), dilation=2)], 1),
    "schedule": (WindowSchedule(4, 2, 1, 4, dilated_layers=2, dilated_heads=1, max_dilation=3), 2),
}


@pytest.mark.parametrize("name", list(STACKS))
@pytest.mark.parametrize("position", [0, 17, -1])
def test_receptive_field_equals_measured_support(name, position):
    layers, heads = STACKS[name]
    n = 41
    analytic = receptive_field_support(layers, n, position)
    spec = layers.layers() if isinstance(layers, WindowSchedule) else layers
    measured = measure_influence(spec, n, position=position, heads=heads, d_model=4 * heads, backend="dense")
    assert analytic.shape == measured.shape
    np.testing.assert_array_equal(analytic, measured > 0)


@settings(max_examples=15, deadline=None)
@given(
    left=st.integers(0, 5), right=st.integers(0, 5), d1=st.integers(1, 4), d2=st.integers(1, 4),
    layers=st.integers(1, 3), n=st.integers(1, 30), data=st.data(),
)
def test_receptive_field_property(left, right, d1, d2, layers, n, data):
    position = data.draw(st.integers(0, n - 1))
    stack = [LayerWindow((left, right), dilation=(d1, d2))] * layers
    analytic = receptive_field_support(stack, n, position)
    measured = measure_influence(stack, n, position=position, heads=2, d_model=4, backend="dense")
    np.testing.assert_array_equal(analytic, measured > 0)


def test_receptive_field_extent_matches_reach_and_holes():
    stack = [LayerWindow((4, 0), dilation=2)] * 3
    rf = receptive_field_support(stack, 50, -1)[-1]
    positions = np.flatnonzero(rf)
    assert 49 - positions.min() == schedule_reach(stack)[0] == 12
    assert set(49 - positions) == set(range(0, 13, 2))  # only even offsets: dilation leaves holes


def test_receptive_field_errors():
    with pytest.raises(ValueError, match="position must be an int in \\[-5, 5\\), got 5"):
        receptive_field_support([LayerWindow((1, 1))], 5, 5)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        receptive_field_support([LayerWindow((1, 1))], 0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dilation=0), ValueError, "dilation must be >= 1, got 0"),
        (dict(dilation=-2), ValueError, "dilation must be >= 1, got -2"),
        (dict(dilation=1.5), TypeError, "dilation must be an int .*got 1.5"),
        (dict(dilation="2"), TypeError, "dilation must be an int .*got '2'"),
        (dict(dilation=None), TypeError, "dilation must be an int .*got None"),
        (dict(dilation=True), TypeError, "dilation must be an int .*got True"),
        (dict(dilation=()), ValueError, "dilation per head must not be empty"),
        (dict(dilation=(1, 0)), ValueError, "dilation must be >= 1, got 0"),
        (dict(global_tokens=5), TypeError, "global_tokens must be None or a sequence .*got 5"),
        (dict(global_tokens="ab"), TypeError, "global_tokens must be None or a sequence .*got 'ab'"),
        (dict(global_tokens=(1.5,)), TypeError, "global_tokens position must be an int, got float 1.5"),
        (dict(global_tokens=(True,)), TypeError, "global_tokens position must be an int, got bool True"),
        (dict(global_tokens=(3, -1)), ValueError, "global_tokens position must be >= 0, got -1"),
        (dict(window=(2, -1)), ValueError, "window right must be >= 0, got -1"),
        (dict(window=4), TypeError, "window must be a pair"),
    ],
)
def test_layer_window_validates_its_fields(kwargs, error, match):
    args = {"window": (2, 1), **kwargs}
    with pytest.raises(error, match=match):
        LayerWindow(**args)


def test_layer_window_keeps_valid_fields():
    layer = LayerWindow([3, 1], dilation=[1, 3], global_tokens=[0, 4])
    assert (layer.window, layer.dilation, layer.global_tokens) == ((3, 1), (1, 3), (0, 4))
    assert LayerWindow((3, 1), global_tokens=()).global_tokens == ()


@pytest.mark.parametrize("bad", [100, 10])
def test_receptive_field_refuses_global_tokens_outside_the_sequence(bad):
    match = rf"global_tokens of layer 1 must be positions in \[0, n\) = \[0, 10\), got \(2, {bad}\)"
    with pytest.raises(ValueError, match=match):
        receptive_field_support([LayerWindow((1, 0)), LayerWindow((1, 0), global_tokens=(2, bad))], 10)
    assert receptive_field_support([LayerWindow((1, 0), global_tokens=(9,))], 10).all()  # the last position is fine


@pytest.mark.parametrize(
    "num_layers, error, match",
    [
        (0, ValueError, "num_layers must be >= 1, got 0"),
        (-1, ValueError, "num_layers must be >= 1, got -1"),
        (2.0, TypeError, "num_layers must be an int, got float 2.0"),
        (True, TypeError, "num_layers must be an int, got bool True"),
    ],
)
def test_schedule_reach_refuses_bad_num_layers(num_layers, error, match):
    with pytest.raises(error, match=match):
        schedule_reach((4, 0), num_layers)
    with pytest.raises(error, match=match):
        receptive_field_support((4, 0), 10, num_layers=num_layers)


@pytest.mark.parametrize(
    "layers, error, match",
    [
        ([4, 0], TypeError, r"layers is the list \[4, 0\], but a list holds one window per layer: .*tuple, \(4, 0\)"),
        ([4, 0, 2], TypeError, r"layers\[0\] must be a window \(left, right\) or a LayerWindow, got 4"),
        ([(4, 0), None], TypeError, r"layers\[1\] must be a window \(left, right\) or a LayerWindow, got None"),
        ((4, 0.5), TypeError, "window right must be an int, got float 0.5"),
        (4, TypeError, "layers must be a window .*got int 4"),
        (None, TypeError, "layers must be a window .*got NoneType None"),
        ([], ValueError, r"layers is an empty schedule \(\[\]\)"),
        ((), ValueError, r"layers is an empty schedule \(\(\)\)"),
    ],
)
def test_schedule_arguments_are_refused_clearly(layers, error, match):
    with pytest.raises(error, match=match):
        schedule_reach(layers)
    with pytest.raises(error, match=match):
        receptive_field_support(layers, 10)


def test_schedule_forms_that_stay_accepted():
    assert schedule_reach((4, 0), 2) == schedule_reach([(4, 0), [4, 0]]) == schedule_reach(((4, 0), (4, 0))) == (8, 0)
    assert schedule_reach(w for w in [(4, 0), (2, 1)]) == (6, 1)
    assert schedule_reach((4, 0), np.int64(3)) == (12, 0)  # a depth taken from np.arange


def test_docstring_examples_run():
    import doctest

    import swa_lib.schedule

    result = doctest.testmod(swa_lib.schedule)
    assert result.attempted >= 1 and result.failed == 0


def test_reach_of_a_plain_stack_is_layers_times_window():
    assert schedule_reach((4096, 0), 32) == (131072, 0)
    assert receptive_field_size((1, 1), 12) == 25
    assert schedule_reach(WindowSchedule(num_layers=3, num_heads=2, first_window=2, last_window=2)) == (6, 6)
