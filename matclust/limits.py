"""The memory model behind ``--memory-limit``: what a command holds, and the smallest limit
that works.

The limit covers the peak resident memory of the whole process. It is split into

* the baseline: the interpreter with numpy, h5py, zarr and the CLI imported, thread pools
  started, before any data is read;
* per input matrix: the flat arrays every command keeps for the whole run (norms, widths,
  labels, offsets, flags);
* per cluster: what is kept of each cluster until the report is written (its statistics, the
  report's entry, the writer's bookkeeping); in the worst case every matrix is a cluster;
* working memory: the batches read from the input and their temporaries, a fixed multiple of
  the batch size, which is chosen to fit;
* whatever remains: caches (matrices, summaries, stored columns).

The constants were measured with ``/usr/bin/time -v`` (maximum resident set size) on planted
and random collections of 50,000 and 250,000 matrices of 32 x 16 float32 (``bench/limits.py``).
A command whose needs exceed the limit refuses before any work (exit 2) and names the smallest
limit the model accepts: :func:`smallest_limit` finds it by bisection on the same model, so the
named limit is exactly one the command then runs within.
"""

from __future__ import annotations

from dataclasses import dataclass

from matclust.errors import InputError

MiB = 2**20

#: The process before data: `python -c "import matclust.cli, matclust.api, matclust.verify,
#: h5py, zarr, rich.console"` peaks at 62 MiB; a run on a 20-matrix input at 79 MiB (thread pools,
#: OpenBLAS buffers, HDF5's caches); the compact encoding adds about 11 MiB (its codecs'
#: imports: 76 -> 87 MiB) and 10 MiB at run time (zstd contexts; 20,000 x 32x16 out of core at
#: a 162 MiB limit: 161 MiB plain, 172 MiB compact). Rounded up.
BASELINE_BYTES = 128 * MiB
#: Per input matrix, held for the whole run. Clustering: norms, widths, labels, order, flags,
#: and the summaries' scale, norm, loss and tail (about 120 bytes), the residuals scanned
#: ahead for the next two seeds (16) and the scan's arrays for three bases beyond one's (16);
#: verify: labels, widths, offsets, seen counts (about 40 bytes). Rounded up, for the
#: allocator's slack.
PER_MATRIX_BYTES = 192
#: Per cluster kept until the end: the formed and encoded cluster records, the statistics dict,
#: its part of the report's JSON (written and parsed back), the writer's column sink. Measured:
#: 250,000 singletons took 2.6 KiB each before the writer stopped keeping every HDF5 group open,
#: 1.4 KiB after.
PER_CLUSTER_BYTES = 1536
#: Peak working memory of a sequential pass per byte of input batch: the batch as read and its
#: reordered copy, the next batch read ahead, the double-precision copy and its products
#: (summaries: Gram matrices and eigenvectors per matrix). Measured 11x on 32 x 16 float32.
WORK_PER_BATCH_BYTE = 12
#: Batches are never made smaller than this: smaller ones multiply per-batch overheads.
MIN_BATCH_BYTES = 1 * MiB
#: Batches larger than this gain nothing in speed (see matclust.sources.base).
MAX_BATCH_BYTES = 16 * MiB


#: Clusters a clustering run reserves memory for up front: an eighth of the matrices, at
#: least 65,536 (never more than K). Reserving for K (every matrix a singleton) made a 10^6
#: run that forms 983 clusters ask for 2.2 GiB; a run that forms more than it reserved stops
#: with an error naming the limit for K clusters (:func:`cluster_reserve`).
RESERVED_CLUSTER_SHARE = 8
MIN_RESERVED_CLUSTERS = 1 << 16


def cluster_reserve(K: int) -> int:
    return min(K, max(K // RESERVED_CLUSTER_SHARE, MIN_RESERVED_CLUSTERS))


@dataclass
class Plan:
    batch: int  # bytes of input per batch
    cache: int  # bytes left for caches: summaries, matrices, stored columns


def plan(limit: int, K: int, clusters: int, cache_needed: int = 0) -> Plan | None:
    """Split ``limit`` for a run over K matrices forming at most ``clusters`` clusters that
    needs ``cache_needed`` bytes of cache at the least. None when it does not fit."""
    fixed = BASELINE_BYTES + PER_MATRIX_BYTES * K + PER_CLUSTER_BYTES * clusters
    room = limit - fixed - cache_needed
    if room < WORK_PER_BATCH_BYTE * MIN_BATCH_BYTES:
        return None
    # Batches take up to half of what is free; the rest goes to the caches.
    batch = int(min(MAX_BATCH_BYTES, max(MIN_BATCH_BYTES, room // (2 * WORK_PER_BATCH_BYTE))))
    return Plan(batch, limit - fixed - WORK_PER_BATCH_BYTE * batch)


def smallest_limit(fits) -> int:
    """The smallest limit (to the MiB) for which ``fits(limit)`` is true; ``fits`` must be
    monotone."""
    lo, hi = 1, 1
    while not fits(hi * MiB):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * MiB):
            hi = mid
        else:
            lo = mid
    return hi * MiB


def refuse(what: str, limit: int, fits) -> InputError:
    """The error for a limit too small, naming the smallest one that works."""
    need = smallest_limit(fits)
    return InputError(f"{what} needs --memory-limit {need // MiB}MiB at least "
                      f"(given {limit / MiB:.0f}MiB)")


def plan_or_refuse(what: str, limit: int, K: int, clusters: int, cache_needed: int = 0) -> Plan:
    """:func:`plan`, or the refusal of ``what`` (the work, in words) naming the smallest limit
    that works."""
    got = plan(limit, K, clusters, cache_needed)
    if got is None:
        raise refuse(what, limit, lambda x: plan(x, K, clusters, cache_needed) is not None)
    return got


def verify_plan(limit: int, K: int, C: int) -> Plan:
    """Batches and stored-column cache of verify (and reconstruct), or the refusal."""
    return plan_or_refuse(f"checking {K} matrices in {C} clusters", limit, K, C)
