"""Where the stages of a sharded run execute (:mod:`matclust.stages`): in this process, one
task after another, or on a Dask cluster (``dask.distributed``), a local one of single-threaded
worker processes (``--workers N``) or an existing one (``--scheduler ADDRESS``).

Both runners offer the same five calls, so the stages are written once: ``submit(fn, *args)``
(arguments may be handles of earlier submissions), ``scatter(value)`` (a handle of a value the
client holds, as if a task had made it), ``wait(handles)``, ``gather(handles, progress)`` and
``close()``. Dask is imported only here, and only for a distributed run.

A worker that dies mid-run costs time only: Dask runs its tasks again elsewhere from their
inputs (every task is a pure function of them), and the client keeps every handle it still
needs, so nothing is lost with the worker.
"""

from __future__ import annotations

import logging

from matclust.errors import InputError

#: The Dask setting that makes worker processes trim their heap eagerly (see DaskRunner).
TRIM_SETTING = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"

#: Dask's own bookkeeping in a local cluster, turned down: every worker samples its task's
#: stack every 10 ms (the dashboard's profile, which no one sees here), every process polls
#: psutil (CPU, memory, disk and network counters) twice a second and wakes its event loop
#: every 20 ms to time it (its warning threshold is 3 s). With two workers on two cores that
#: CPU comes out of the tasks, where one worker leaves it a free core: at 10^6 planted
#: matrices each worker's event loop took 1.8 s of CPU during the plan stage (5 % of its
#: task's) and 0.8 s during the store stage, about half of that without the first two; the
#: client process (scheduler and nannies) 1.7 % of a core while it waits, 0.7 % with a 1 s
#: tick. The monitor still runs (heartbeats carry its numbers).
QUIET_LOCAL_CLUSTER = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.admin.system-monitor.disk": False,
    "distributed.admin.tick.interval": "1s",
}


class _Deferred:
    """A task of :class:`InProcess`: run when its result is first needed."""

    __slots__ = ("fn", "args", "done", "value")

    def __init__(self, fn, args):
        self.fn, self.args, self.done, self.value = fn, args, False, None

    def result(self):
        if not self.done:
            self.value = self.fn(*(_resolved(a) for a in self.args))
            self.done, self.fn, self.args = True, None, None
        return self.value


def _resolved(arg):
    if isinstance(arg, _Deferred):
        return arg.result()
    if isinstance(arg, list):
        return [_resolved(a) for a in arg]
    return arg


class InProcess:
    """Tasks in this process, each run when its result is first needed: results that the
    client consumes one by one (a shard's encoded parts) are then held one at a time."""

    workers = 1
    #: Results stay where they were made until gathered: in this process, so handing the
    #: client a shard's codes (and holding one shard at a time) is cheaper than keeping
    #: every shard's until the end (see matclust.stages.ShardCodes).
    keeps_results = False

    def submit(self, fn, *args):
        return _Deferred(fn, args)

    def scatter(self, value):
        handle = _Deferred(None, ())
        handle.done, handle.value = True, value
        return handle

    def wait(self, handles) -> None:
        for handle in handles:
            handle.result()

    def gather(self, handles, progress=None) -> list:
        out = []
        for handle in handles:
            out.append(handle.result())
            if progress is not None:
                progress.advance(1)
        return out

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "in-process"


class DaskRunner:
    """Tasks on a Dask cluster: a new local one of ``workers`` single-threaded processes, or
    the one whose scheduler listens at ``scheduler``."""

    #: A task's result stays on its worker, where later tasks given its handle use it.
    keeps_results = True

    def __init__(self, workers: int | None = None, scheduler: str | None = None):
        try:
            import dask
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise InputError("--workers and --scheduler need Dask: pip install "
                             "'matclust[distributed]'") from None
        self.cluster = None
        if scheduler is not None:
            try:
                self.client = Client(scheduler, timeout="20s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise InputError(f"--scheduler {scheduler}: cannot connect: {exc}") from None
            self.where = scheduler
        else:
            # One thread per worker: a worker is one core (the tasks keep BLAS on one
            # thread too). No memory limit from Dask: each task keeps to --memory-limit.
            # Dask starts its workers with MALLOC_TRIM_THRESHOLD_ set, which also turns off
            # glibc's adaptive mmap threshold: every large temporary is then mapped and
            # unmapped anew, and a shard's plan took 3x as long (25 s against 8-10 s here).
            with dask.config.set({TRIM_SETTING: None, **QUIET_LOCAL_CLUSTER}):
                self.cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1,
                                            processes=True, dashboard_address=None,
                                            memory_limit=0, silence_logs=logging.ERROR)
            self.client = Client(self.cluster)
            self.where = f"a local cluster of {workers} worker processes"
        self.workers = max(1, len(self.client.scheduler_info().get("workers", {})) or int(workers or 1))

    def submit(self, fn, *args):
        # pure=False: every submission is its own task (the arguments need not be hashed).
        return self.client.submit(fn, *args, pure=False)

    def scatter(self, value):
        # To a worker once, as a task's result would be: in a task's arguments instead, a
        # shard's plan (megabytes at 10^6 matrices) would travel inside the task graph.
        return self.client.scatter(value)

    def wait(self, handles) -> None:
        from dask.distributed import wait

        wait(list(handles))

    def gather(self, handles, progress=None) -> list:
        from dask.distributed import as_completed

        handles = list(handles)
        if progress is not None:
            for _ in as_completed(handles):
                progress.advance(1)
        return self.client.gather(handles)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def describe(self) -> str:
        return self.where


def make_runner(workers: int | None, scheduler: str | None):
    """The runner for the command line's options: in-process without either."""
    if workers is not None and scheduler is not None:
        raise InputError("give --workers or --scheduler, not both")
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be an integer >= 1, got {workers}")
    if workers is None and scheduler is None:
        return InProcess()
    return DaskRunner(workers, scheduler)
