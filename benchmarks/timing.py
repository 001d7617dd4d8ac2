"""How the CPU benchmarks time calls, the same way for every implementation."""

from __future__ import annotations

import time

#: Timed calls go on until they add up to MIN_TIMED_S seconds (at most MAX_REPEATS calls).
MIN_TIMED_S, MAX_REPEATS = 1.5, 20


def time_rounds(fns: dict, repeats, extend: bool = True) -> dict:
    """``{name: (wall seconds, process CPU seconds)}`` of the median call of each of ``fns``
    (``{name: fn}``, each warmed up by the caller), the implementations taking turns.

    The calls go in rounds: every round calls each fn still being timed once, starting one
    further along the list each round. A fn is timed ``repeats`` times (an int, or ``{name:
    int}``), and, with ``extend`` and more than one repeat, until its calls add up to
    :data:`MIN_TIMED_S` (at most :data:`MAX_REPEATS` calls); then it leaves the rounds.

    Turns, not one implementation after another: the machine's speed drifts (other programs,
    the clock, on a virtual machine the neighbours on the host; a quarter within minutes was
    seen here), and a drift then falls on every implementation alike, so that their ratio,
    the figure the comparisons are about, stays fair. The median call, not the fastest: a burst
    of other work spoils a few calls rather than the figure, whether it slows them down or,
    through a changing clock, speeds them up; the minimum follows the luckiest call, which
    made one peer's row twice as fast as its neighbours' in one run.
    """
    wanted = repeats if isinstance(repeats, dict) else dict.fromkeys(fns, repeats)
    times: dict = {name: [] for name in fns}

    def timing(name) -> bool:
        done, n = times[name], wanted[name]
        return len(done) < n or (extend and n > 1 and len(done) < MAX_REPEATS
                                 and sum(t for t, _ in done) < MIN_TIMED_S)

    turn = 0
    while names := [name for name in fns if timing(name)]:
        start = turn % len(names)
        for name in names[start:] + names[:start]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
        turn += 1
    return {name: sorted(done)[(len(done) - 1) // 2] for name, done in times.items()}


def time_calls(fn, repeats: int, extend: bool = True) -> tuple[float, float]:
    """:func:`time_rounds` of one fn: ``(wall seconds, process CPU seconds)`` of its median call."""
    return time_rounds({None: fn}, repeats, extend)[None]
