"""Work sharing for the CPU backends: the pieces of one call on all threads, pulled one by one.

A CPU backend made of framework calls (a slab of products, a softmax, another product) runs
each call on PyTorch's thread team: every call is a parallel region that ends in a barrier.
With hundreds of small regions per attention call, one descheduled thread (another program
busy on the same cores) stalls every barrier, and the call slows many times over. Here the
pieces of a call (one slab of one head, say) are independent, so :func:`run_pieces` runs them
the other way round: ``torch.get_num_threads()`` workers (the calling thread and pooled ones),
each running its pieces single-threaded and taking the next piece when it is done. No barrier
until the end, and a slowed worker simply takes fewer pieces.

Each worker asks PyTorch for one thread (``torch.set_num_threads(1)``; the per-thread OpenMP
and MKL settings), and the calling thread restores its own count when all pieces are done.
Pieces must not depend on one another, and must write disjoint memory or their own buffers.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

import torch

__all__ = ["run_pieces", "worker_count", "scratch_buffer"]

_LOCK = threading.Lock()
_POOL: list = [None, 0]  # [executor, its number of threads]


def worker_count(pieces: int) -> int:
    """How many workers :func:`run_pieces` uses for this many pieces: at most one per piece
    and one per PyTorch thread of the calling thread."""
    return max(1, min(pieces, torch.get_num_threads()))


def _executor(threads: int) -> ThreadPoolExecutor:
    with _LOCK:
        executor, size = _POOL
        if executor is None or size < threads:
            if executor is not None:
                executor.shutdown(wait=False)
            executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="swa_lib")
            _POOL[:] = [executor, threads]
        return executor


def run_pieces(count: int, piece: Callable[[int, dict], None], *, share: bool = True) -> None:
    """Call ``piece(i, scratch)`` once for every ``i`` in ``range(count)``, spread over
    :func:`worker_count` workers; ``scratch`` is a dict private to the worker (for buffers
    reused across its pieces). Pieces run under ``torch.no_grad()``. Exceptions propagate.

    With one worker (one thread, one piece, or ``share=False`` for calls too small to be worth
    waking threads for) the pieces run here, in order, with the calling thread's own PyTorch
    threads.
    """
    workers = worker_count(count) if share else 1
    if workers == 1:
        scratch: dict = {}
        with torch.no_grad():
            for i in range(count):
                piece(i, scratch)
        return
    threads = torch.get_num_threads()
    counter = itertools.count()  # next() is atomic under the GIL: each piece is taken once
    failed = threading.Event()

    def work() -> None:
        torch.set_num_threads(1)
        scratch: dict = {}
        try:
            with torch.no_grad():
                for i in iter(lambda: next(counter), None):
                    if i >= count or failed.is_set():
                        return
                    piece(i, scratch)
        except BaseException:
            failed.set()  # the other workers stop taking pieces
            raise

    futures = [_executor(workers - 1).submit(work) for _ in range(workers - 1)]
    try:
        work()
    finally:
        wait(futures)
        torch.set_num_threads(threads)
    for f in futures:
        f.result()  # re-raise a worker's exception


def scratch_buffer(scratch: dict, name: str, shape: tuple, like: torch.Tensor, zero: bool = False) -> torch.Tensor:
    """A worker's buffer ``name`` of ``shape``, reused across its pieces (fresh large allocations
    cost page faults): the front of a flat buffer of ``like``'s dtype and device, made (zeroed
    if ``zero``) when missing or too small."""
    size = 1
    for s in shape:
        size *= s
    buf = scratch.get(name)
    if buf is None or buf.numel() < size or buf.dtype != like.dtype:
        buf = scratch[name] = like.new_zeros(size) if zero else like.new_empty(size)
    return buf[:size].view(shape)
