"""Counting and measuring the cost of attention (chapter 1).

Counting is exact and machine-independent: :func:`score_count` is the number of query-key
scores an attention pattern needs, :func:`attention_flops` the useful floating-point work.
Measuring is machine-dependent: :func:`time_call` gives a median wall-clock time and
:func:`peak_memory` the peak extra memory of a call -- on CUDA from the caching allocator, on
Linux CPUs from the process's peak resident set size (``VmHWM`` after resetting it through
``/proc/self/clear_refs``), which counts every page touched, torch's or not.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..masks import check_window, visible_keys

__all__ = ["score_count", "attention_flops", "time_call", "peak_memory", "can_measure_cpu_memory"]


def score_count(n: int, window=None, *, heads: int = 1, batch: int = 1) -> int:
    """Number of query-key scores: ``n^2`` per head for full attention, about ``n * (l + r + 1)``
    for a window ``(l, r)`` (exactly, counting the clipped rows at both ends).

    >>> score_count(1000), score_count(1000, (2, 2))
    (1000000, 4994)
    """
    if window is None:
        per_head = n * n
    else:
        per_head = visible_keys(n, *check_window(window))  # clipped rows at both ends counted
    return per_head * heads * batch


def attention_flops(n: int, d: int, keys_per_query: float, *, heads: int = 1, batch: int = 1) -> float:
    """Useful forward FLOPs: 2 d for each score (Q K^T) plus 2 d for each weighted value (P V)."""
    return 4.0 * batch * heads * n * keys_per_query * d


def time_call(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, best: bool = False) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs (CUDA is synchronised).

    ``best=True`` returns the fastest run instead: other programs on the machine only ever add
    time, so the minimum is the estimate least disturbed by them.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text())
    return int(match.group(1)) * 1024


def can_measure_cpu_memory() -> bool:
    """True on Linux, where the peak resident set size can be reset and read."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_bytes("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so they count again when reused."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> Optional[int]:
    """Peak memory in bytes that ``fn()`` adds while it runs, or None if it cannot be measured.

    CPU: resets the process's high-water mark, runs ``fn``, and returns ``VmHWM`` minus the
    resident size before the call. It includes allocator and page-granularity overheads (a few
    MiB), so it is meaningful for allocations of tens of MiB and more.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not can_measure_cpu_memory():
        return None
    _release_free_memory()
    base = _status_bytes("VmRSS")
    _CLEAR_REFS.write_text("5")
    result = fn()
    peak = _status_bytes("VmHWM")
    del result
    return max(0, peak - base)
