"""benchmarks/timing.py: a CPU benchmark row is the median of its timed calls, not the luckiest."""

import importlib.util
import itertools
import time
from pathlib import Path

import pytest


@pytest.fixture
def timing():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "timing.py"
    spec = importlib.util.spec_from_file_location("bench_timing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_median_call_counts_and_fast_calls_are_repeated(timing, monkeypatch):
    monkeypatch.setattr(timing, "MIN_TIMED_S", 0.5)
    durations = itertools.cycle([0.02, 0.001, 0.02])  # one call in three is lucky
    calls = []

    def fn():
        calls.append(None)
        time.sleep(next(durations))

    wall, cpu = timing.time_calls(fn, 3)
    assert wall >= 0.02  # the minimum would be 0.001
    assert cpu < 0.01  # a sleeping call uses no CPU: the pair is from one call
    assert len(calls) == timing.MAX_REPEATS  # 0.5 s of these calls is more than 20 of them


@pytest.mark.parametrize("repeats, extend, expected", [(1, True, 1), (3, False, 3), (5, True, 5)])
def test_slow_calls_run_the_given_number_of_times(timing, monkeypatch, repeats, extend, expected):
    monkeypatch.setattr(timing, "MIN_TIMED_S", 0.0)
    calls = []
    timing.time_calls(lambda: calls.append(None), repeats, extend=extend)
    assert len(calls) == expected


def test_implementations_take_turns(timing, monkeypatch):
    """Calls alternate between the implementations (starting one further along each round),
    each stops when it has its calls, and each gets the median of its own calls."""
    monkeypatch.setattr(timing, "MIN_TIMED_S", 0.0)
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    result = timing.time_rounds(fns, {"a": 4, "b": 2, "c": 1})
    assert order == ["a", "b", "c", "b", "a", "a", "a"]
    assert set(result) == set("abc")
    monkeypatch.setattr(timing, "MIN_TIMED_S", 0.05)
    slow, fast = itertools.cycle([0.03]), itertools.cycle([0.001, 0.004, 0.002])
    result = timing.time_rounds({"slow": lambda: time.sleep(next(slow)), "fast": lambda: time.sleep(next(fast))}, 2)
    assert result["slow"][0] >= 0.03 and result["fast"][0] < 0.02  # each its own median
