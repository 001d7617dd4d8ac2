"""How the CPU benchmarks time one call, the same way for every implementation."""

from __future__ import annotations

import time

#: Timed calls go on until they add up to MIN_TIMED_S seconds (at most MAX_REPEATS calls).
MIN_TIMED_S, MAX_REPEATS = 1.5, 20


def time_calls(fn, repeats: int, extend: bool = True) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of the median call of ``fn``.

    ``fn`` is called ``repeats`` times one after the other (after the caller's warm-up), and,
    with ``extend`` and ``repeats > 1``, again while the calls add up to less than
    :data:`MIN_TIMED_S` (at most :data:`MAX_REPEATS` calls). The median call, not the fastest:
    on a shared machine a burst of other work spoils a few calls rather than the figure, whether
    it slows them down or, through a changing clock, speeds them up; the minimum follows the
    luckiest call, which made one peer's row twice as fast as its neighbours' in one run.
    """
    times = []
    while len(times) < repeats or (extend and repeats > 1 and len(times) < MAX_REPEATS
                                   and sum(t for t, _ in times) < MIN_TIMED_S):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return sorted(times)[(len(times) - 1) // 2]
