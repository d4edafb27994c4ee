"""How the work uses the cores.

Most of the work is on small matrices (an eigh of 29 x 29, an SVD of 32 x 16), where OpenBLAS
threads cost far more than they save: measured here, eigh of 29 x 29 took ~0.1 ms on one
thread and 2-10 ms on two, and a 384 x 95 SVD 3 ms against 12-45 ms once the other core was
busy. So clustering runs with BLAS on one thread, and only work that is mostly not BLAS uses
every core:

* the in-memory residual scans stay on one thread too: on a machine whose other core is busy,
  a whole command measured slower with two threads for them (MiniLM 10k: 2.1 s against 1.7 s
  on one; RGB patches: 2.6 s against 2.3 s), though on an idle one two threads were faster;
* work that is mostly not BLAS (widening two-byte summaries, batched small SVDs) is cut into
  pieces that run on all cores at once (:func:`on_all_cores`; numpy releases the GIL in its
  loops and in LAPACK): the summary scan ran 1.5x faster so.

Between threaded products OpenBLAS's idle thread busy-waits; the command line shortens that
(see the top of :mod:`matclust.cli`).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from threadpoolctl import ThreadpoolController

_CONTROLLER = ThreadpoolController()
CORES = max(1, os.cpu_count() or 1)
#: One pool per process, created on first use (a worker process of a distributed run has its
#: own); the share of the cores the current thread may use is per thread (:func:`one_core`).
_POOL: ThreadPoolExecutor | None = None
_LOCAL = threading.local()


def single_threaded():
    """Context: BLAS on one thread (cheap to enter: the controller is created once)."""
    return _CONTROLLER.limit(limits=1, user_api="blas")


@contextmanager
def one_core():
    """Context: :func:`on_all_cores` runs its items in the calling thread. A task of a
    distributed run is given one core (its worker is one single-threaded process); spreading
    its work over every core of the machine would only make the workers compete."""
    before = getattr(_LOCAL, "cores", None)
    _LOCAL.cores = 1
    try:
        with single_threaded():
            yield
    finally:
        _LOCAL.cores = before


def release_cores() -> None:
    """End the pool's threads (made again on the next :func:`on_all_cores`): a command that is
    done leaves none behind (see :func:`matclust.cli.run`)."""
    global _POOL
    pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown(wait=True)


def on_all_cores(fn: Callable, items: Iterable) -> list:
    """``[fn(x) for x in items]``, the items spread over the cores, BLAS single-threaded.
    Not re-entrant: ``fn`` must not call it again (the pool's workers would wait on themselves)."""
    items = list(items)
    with single_threaded():
        if _cores() == 1 or len(items) < 2:
            return [fn(x) for x in items]
        return list(_pool().map(fn, items))


def ahead_on_all_cores(fn: Callable, items: Iterable, ahead: int = 2 * CORES) -> Iterator:
    """``fn(x)`` for each of ``items``, yielded in order, computed on the cores up to ``ahead``
    items beyond the one the caller has: what the caller does with each result (in its own
    thread) overlaps the computing of the next ones, where :func:`on_all_cores` computes a
    round of items and then waits for the caller. BLAS single-threaded; not re-entrant."""
    with single_threaded():
        if _cores() == 1:
            for x in items:
                yield fn(x)
            return
        pool, pending = _pool(), deque()
        for x in items:
            pending.append(pool.submit(fn, x))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _cores() -> int:
    """The cores the calling thread may use (one in a distributed task, see :func:`one_core`)."""
    return getattr(_LOCAL, "cores", None) or CORES


def _pool() -> ThreadPoolExecutor:
    """The process's pool (kept for the run: scans use it once per cluster)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(CORES, thread_name_prefix="matclust")
    return _POOL
