"""Checking and reading back a result store: ``verify`` and ``reconstruct``."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from matclust.engine.linalg import (ScaledSums, as_compute, peak, peak_exponents, sqnorm,
                                    sqnorm_scaled, times_power2)
from matclust.errors import InputError
from matclust.sources import open_source
from matclust.sources.base import column_ranges
from matclust.store import ResultStore
from matclust.streaming import cluster_parts

#: Squared norms for which error_terms keeps the unscaled sums.
PLAIN_RANGE = (2.0**-800, 2.0**800)

#: Orthonormality tolerance of a stored basis, in units of its precision's machine epsilon.
ORTHO_ULPS = 1e3


def cluster_arrays(cluster: dict):
    """(U, C) of a factored cluster, or (None, raw) of a raw one."""
    if "basis" in cluster:
        return cluster["basis"], cluster["coefficients"]
    if "raw" in cluster:
        return None, cluster["raw"]
    raise KeyError("neither basis/coefficients nor raw")


def cluster_columns(basis, stored) -> np.ndarray:
    """The cluster's stored columns, expanded (m x N_c) in double precision."""
    if basis is None:
        return as_compute(stored)
    return as_compute(basis) @ as_compute(stored)


def error_terms(data, basis, stored):
    """Squared error and squared norm of input columns ``data`` against what is stored for
    them (``basis @ stored``, or ``stored`` itself when ``basis`` is None), each as a pair
    (f, e) standing for f * 2**e (see ScaledSums).

    Both are computed at a power of two that brings the larger of the input's and the stored
    numbers' largest entries to [1/2, 1), exactly, and the error is rescaled once more on its
    own: nothing under- or overflows at any magnitude, and nothing depends on the scale the
    clustering worked in, so a store wrong at 1e-300 or 1e300 is caught as at 1.

    The plain sums are used when they are safely inside the range (the usual case; it saves
    the rescaling): a squared norm in [2**-800, 2**800] leaves room for relative errors down
    to 2**-100 before the squared error could underflow."""
    with np.errstate(all="ignore"):  # an overflow shows in the sums: redone scaled below
        plain_norm2 = sqnorm(data)
        plain_err2 = sqnorm(as_compute(data) - cluster_columns(basis, stored))
    if PLAIN_RANGE[0] <= plain_norm2 <= PLAIN_RANGE[1] and np.isfinite(plain_err2):
        return (plain_err2, 0), (plain_norm2, 0)
    if not np.isfinite(stored).all():
        return (float("inf"), 0), sqnorm_scaled(data)
    e = int(peak_exponents(max(peak(data), peak(stored))))
    data = times_power2(as_compute(data), -e)
    err2, err_exp = sqnorm_scaled(data - cluster_columns(basis, times_power2(as_compute(stored), -e)))
    norm2, norm_exp = sqnorm_scaled(data)
    return (err2, err_exp + 2 * e), (norm2, norm_exp + 2 * e)


def verify_store(path, input_path=None, dataset=None, memory_limit: int = 2**30,
                 progress=None) -> dict:
    """Recompute every cluster's error from the input and check the store's structure.

    Returns a dict with ``ok`` (every cluster within eps and no structural problem),
    ``max_error``, ``over_eps`` (cluster ids), ``problems`` (descriptions) and ``errors``.
    """
    with ResultStore(path) as store:
        params = store.params
        eps = float(params["eps"])
        src = open_source(input_path or params["input"],
                          dataset if dataset is not None else params.get("dataset"),
                          bool(params.get("transpose", False)))
        with src:
            return _verify(store, src, eps, int(params["rank"]), memory_limit, progress)


def _verify(store: ResultStore, src, eps: float, rank: int, memory_limit: int, progress) -> dict:
    """Structure first (members, labels, shapes, orthonormal bases), then one sequential pass
    over the input that compares every matrix with what its cluster stores."""
    if len(store.labels) != src.K:
        raise InputError(f"{store.path}: has {len(store.labels)} labels but the input "
                         f"{src.where} has {src.K} matrices")
    problems: list[str] = []
    clusters, col_offset, seen = _check_structure(store, src, rank, problems, progress)
    # Held as (fraction, exponent) pairs: see error_terms.
    err2, norm2 = ScaledSums(store.n_clusters), ScaledSums(store.n_clusters)
    labels = np.where(np.isin(store.labels, [c for c, info in enumerate(clusters) if info]),
                      store.labels, -1)
    cache = _StoredColumns(clusters, max(16 * 2**20, memory_limit // 4))
    for c, part in cluster_parts(src, labels, progress, "verifying"):
        if c < 0:
            continue
        cols = column_ranges(col_offset[part.indices], np.diff(part.offsets))
        part_err2, part_norm2 = error_terms(part.data, *cache.numbers(c, cols))
        err2.add(c, *part_err2)
        norm2.add(c, *part_norm2)
    # An all-zero cluster: 0, or infinite if anything non-zero is stored for it.
    errors = [err2.sqrt_ratio(c, norm2) if clusters[c] else float("inf")
              for c in range(store.n_clusters)]
    over = [c for c, e in enumerate(errors) if clusters[c] and not e <= eps]
    missing = np.flatnonzero(seen == 0)
    repeated = np.flatnonzero(seen > 1)
    if len(missing):
        problems.append(f"{len(missing)} input matrices are in no cluster (first: {missing[0]})")
    if len(repeated):
        problems.append(f"{len(repeated)} input matrices are in several clusters (first: {repeated[0]})")
    finite = [e for e in errors if np.isfinite(e)]
    return {
        "ok": not over and not problems,
        "clusters": store.n_clusters,
        "eps": eps,
        "max_error": max(finite, default=0.0),
        "over_eps": over,
        "problems": problems,
        "errors": [e if np.isfinite(e) else None for e in errors],
    }


def _check_structure(store: ResultStore, src, rank: int, problems: list[str], progress):
    """Per cluster: its lazy arrays (None when unusable); the column offset of every member."""
    col_offset = np.zeros(src.K, dtype=np.int64)
    seen = np.zeros(src.K, dtype=np.int64)
    clusters: list[dict | None] = []
    if progress:
        progress.start("checking", store.n_clusters)
    for c in range(store.n_clusters):
        handles = store.handles(c)
        clusters.append(None)
        members = np.asarray(handles["members"][...], dtype=np.int64) if "members" in handles else np.zeros(0, np.int64)
        if len(members) == 0 or members.min() < 0 or members.max() >= src.K:
            problems.append(f"cluster {c}: member indices missing or out of range")
            continue
        seen[members] += 1
        if np.any(store.labels[members] != c):
            problems.append(f"cluster {c}: labels disagree with its members")
            continue
        widths = src.widths[members]
        col_offset[members] = np.cumsum(widths) - widths
        expected = (src.m, int(widths.sum()))
        if "basis" in handles and "coefficients" in handles:
            basis = np.asarray(handles["basis"][...])
            stored = handles["coefficients"]
            if basis.shape[0] != src.m or basis.shape[1] > rank or stored.shape != (basis.shape[1], expected[1]):
                problems.append(f"cluster {c}: basis {basis.shape} and coefficients {stored.shape} "
                                f"do not fit m={src.m}, rank={rank}, {expected[1]} columns")
                continue
            gram = as_compute(basis).conj().T @ as_compute(basis)
            if np.abs(gram - np.eye(gram.shape[0])).max(initial=0.0) > ORTHO_ULPS * np.finfo(basis.dtype).eps:
                problems.append(f"cluster {c}: basis columns are not orthonormal")
            clusters[c] = {"basis": as_compute(basis), "stored": stored, "sorted": _ascending(members)}
        elif "raw" in handles:
            if handles["raw"].shape != expected:
                problems.append(f"cluster {c}: raw shape {handles['raw'].shape} does not match {expected}")
                continue
            clusters[c] = {"basis": None, "stored": handles["raw"], "sorted": _ascending(members)}
        else:
            problems.append(f"cluster {c}: no basis/coefficients and no raw data")
        if progress:
            progress.advance(1)
    return clusters, col_offset, seen


def _ascending(members: np.ndarray) -> bool:
    return bool(np.all(np.diff(members) > 0))


class _StoredColumns:
    """A cluster's stored columns, expanded, for given column positions.

    Members in ascending order (out-of-core stores) occupy one contiguous slice per input
    batch, which is read directly; otherwise the cluster's whole array is read once and kept in
    an LRU cache bounded by ``budget_bytes``.
    """

    def __init__(self, clusters, budget_bytes: int):
        self.clusters = clusters
        self.budget = budget_bytes
        self._held: OrderedDict[int, np.ndarray] = OrderedDict()
        self._bytes = 0

    def numbers(self, c: int, cols: np.ndarray):
        """(basis or None, the stored numbers of the columns ``cols``)."""
        info = self.clusters[c]
        if info["sorted"]:
            lo, hi = int(cols.min()), int(cols.max()) + 1
            stored = np.asarray(info["stored"][:, lo:hi])[:, cols - lo]
        else:
            stored = self._whole(c)[:, cols]
        return info["basis"], stored

    def _whole(self, c: int) -> np.ndarray:
        hit = self._held.get(c)
        if hit is not None:
            self._held.move_to_end(c)
            return hit
        arr = np.asarray(self.clusters[c]["stored"][...])
        while self._held and self._bytes + arr.nbytes > self.budget:
            _, old = self._held.popitem(last=False)
            self._bytes -= old.nbytes
        self._held[c] = arr
        self._bytes += arr.nbytes
        return arr


def reconstruct(path, indices=None):
    """Yield (index, matrix) for the requested input indices (all by default), in that order,
    undoing --transpose. Each cluster is read once."""
    with ResultStore(path) as store:
        K = len(store.labels)
        wanted = np.arange(K) if not indices else np.asarray(indices, dtype=np.int64)
        bad = wanted[(wanted < 0) | (wanted >= K)]
        if len(bad):
            raise InputError(f"{path}: index {bad[0]} out of range (the store holds K = {K})")
        transpose = bool(store.params.get("transpose", False))
        out: dict[int, np.ndarray] = {}
        for c in np.unique(store.labels[wanted]):
            cluster = store.cluster(int(c))
            basis, stored = cluster_arrays(cluster)
            dtype = stored.dtype
            cols = cluster_columns(basis, stored)
            if basis is not None:  # a rebuilt entry may round past the dtype's largest, as the input could not
                limit = float(np.finfo(dtype).max)
                cols = np.clip(cols.real, -limit, limit) + (
                    1j * np.clip(cols.imag, -limit, limit) if np.iscomplexobj(cols) else 0)
            members = cluster["members"]
            widths = store.widths[members]
            offsets = np.concatenate([[0], np.cumsum(widths)])
            pos = {int(i): j for j, i in enumerate(members)}
            for i in wanted[store.labels[wanted] == c]:
                j = pos[int(i)]
                block = cols[:, offsets[j]: offsets[j + 1]].astype(dtype)
                out[int(i)] = block.T if transpose else block
        names = store.names
        return [(int(i), out[int(i)]) for i in wanted], names, store.params
