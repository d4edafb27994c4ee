"""How many BLAS threads each kind of work gets.

Most of the work is on small matrices (an eigh of 29 x 29, an SVD of 32 x 16), where OpenBLAS
threads cost far more than they save: measured here, eigh of 29 x 29 took ~0.1 ms on one
thread and 2-10 ms on two, and a 384 x 95 SVD 3 ms against 12-45 ms once the other core was
busy. So clustering runs single-threaded, and only the large batched products (the residuals
of a whole batch of candidates against a basis) use every core.
"""

from __future__ import annotations

from threadpoolctl import ThreadpoolController

_CONTROLLER = ThreadpoolController()
_ALL = max([info.get("num_threads", 1) for info in _CONTROLLER.info()] or [1])


def single_threaded():
    """Context: BLAS on one thread (cheap to enter: the controller is created once)."""
    return _CONTROLLER.limit(limits=1, user_api="blas")


def all_threads():
    """Context: BLAS on every thread it had at start-up (inside a single-threaded section)."""
    return _CONTROLLER.limit(limits=_ALL, user_api="blas")
