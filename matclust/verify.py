"""Checking and reading back a result store: ``verify`` and ``reconstruct``."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from matclust import defaults
from matclust.engine import budget as qb
from matclust.engine.linalg import as_compute, sqnorm
from matclust.errors import InputError
from matclust.sources import open_source
from matclust.sources.base import column_ranges
from matclust.store import ResultStore
from matclust.streaming import cluster_parts

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


def verify_store(path, input_path=None, dataset=None, memory_limit: int = defaults.MEMORY_LIMIT,
                 progress=None, fill_missing: bool | None = None) -> dict:
    """Recompute every cluster's error from the input and check the store's structure.

    ``fill_missing``: read missing chunks as the fill value (default: as the store's run did).

    Returns a dict with ``ok`` (every cluster within eps and no structural problem),
    ``max_error``, ``over_eps`` (cluster ids), ``problems`` (descriptions) and ``errors``.
    """
    with ResultStore(path) as store:
        params = store.params
        try:
            eps, rank = float(params["eps"]), int(params["rank"])
            recorded_input = params["input"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: damaged result store: its params lack a valid "
                             f"{exc if isinstance(exc, KeyError) else 'eps or rank'}") from None
        if fill_missing is None:  # as the run that wrote the store read its input
            fill_missing = bool(params.get("fill_missing", False))
        src = open_source(input_path or recorded_input,
                          dataset if dataset is not None else params.get("dataset"),
                          bool(params.get("transpose", False)), fill_missing)
        with src:
            if store.compact is not None:
                return _verify_compact(store, src, eps, params.get("guarantee", "cluster"),
                                       progress)
            return _verify(store, src, eps, rank, memory_limit, progress)


def _verify_compact(store: ResultStore, src, eps: float, guarantee: str, progress) -> dict:
    """Decode every matrix of a compact store and compare it with the input, in one pass.

    Errors are computed per matrix on both sides scaled by the same power of two (exact), so
    no magnitude under- or overflows; cluster errors combine them at a common scale."""
    reader = store.compact
    problems = reader.consistency_problems()
    if len(store.labels) != src.K:
        raise InputError(f"{store.path}: has {len(store.labels)} labels but the input "
                         f"{src.where} has {src.K} matrices")
    if not problems and np.any(store.widths != src.widths):
        j = int(np.flatnonzero(store.widths != src.widths)[0])
        problems.append(f"widths disagree with the input (matrix {j}: {store.widths[j]} stored, "
                        f"{src.widths[j]} in the input)")
    K = src.K
    shift = np.zeros(K, dtype=np.int64)
    err2 = np.zeros(K)
    norm2 = np.zeros(K)
    if not problems:
        if progress:
            progress.start("verifying", K)
        for batch in src.iter_batches():
            start, stop = int(batch.indices[0]), int(batch.indices[-1]) + 1
            for j, (i, decoded) in enumerate(reader.decode_range(start, stop)):
                a = as_compute(batch.block(j))
                shift[i], err2[i], norm2[i] = scaled_error2(a, decoded)
            if progress:
                progress.advance(len(batch))
    with np.errstate(divide="ignore", invalid="ignore"):
        matrix_errors = np.where(norm2 > 0, np.sqrt(err2 / np.where(norm2 > 0, norm2, 1)),
                                 np.where(err2 > 0, np.inf, 0.0))
    # Cluster errors: every member's sums brought to the cluster's largest scale.
    C = store.n_clusters
    top = np.full(C, np.iinfo(np.int64).min)
    labels = np.clip(store.labels, 0, max(C - 1, 0))
    np.maximum.at(top, labels, shift)
    e2 = np.zeros(C)
    n2 = np.zeros(C)
    np.add.at(e2, labels, np.ldexp(err2, 2 * (shift - top[labels])))
    np.add.at(n2, labels, np.ldexp(norm2, 2 * (shift - top[labels])))
    with np.errstate(divide="ignore", invalid="ignore"):
        cluster_errors = np.where(n2 > 0, np.sqrt(e2 / np.where(n2 > 0, n2, 1)),
                                  np.where(e2 > 0, np.inf, 0.0))
    checked = matrix_errors if guarantee == "matrix" else cluster_errors
    over = [int(c) for c in np.flatnonzero(~(checked <= eps))] if not problems else []
    worst = int(np.argmax(matrix_errors)) if K and not problems else None
    finite = cluster_errors[np.isfinite(cluster_errors)]
    return {
        "ok": not over and not problems,
        "clusters": C,
        "eps": eps,
        "guarantee": guarantee,
        "max_error": float(finite.max(initial=0.0)),
        "max_matrix_error": float(matrix_errors[worst]) if worst is not None else 0.0,
        "worst_matrix": worst,
        "over_eps": over,
        "problems": problems,
        "errors": [float(e) if np.isfinite(e) else None for e in cluster_errors],
    }


def scaled_error2(a: np.ndarray, decoded: np.ndarray) -> tuple[int, float, float]:
    """(s, ||A - D||^2, ||A||^2) with both sides scaled by 2^-s, s the binary exponent of the
    largest |entry| of A (or of D when A is zero): exact scaling, so neither sum under- or
    overflows whatever the magnitude."""
    peak = float(np.max(np.abs(a))) if a.size else 0.0
    if peak == 0.0:
        peak = float(np.max(np.abs(decoded))) if decoded.size else 0.0
    s = int(np.frexp(peak)[1]) if peak > 0 and np.isfinite(peak) else 0
    a_s, d_s = qb.scaled_pow2(a, -s), qb.scaled_pow2(decoded, -s)
    return s, sqnorm(a_s - d_s), sqnorm(a_s)


def _verify(store: ResultStore, src, eps: float, rank: int, memory_limit: int, progress) -> dict:
    """Structure first (members, labels, shapes, orthonormal bases), then one sequential pass
    over the input that compares every matrix with what its cluster stores."""
    if len(store.labels) != src.K:
        raise InputError(f"{store.path}: has {len(store.labels)} labels but the input "
                         f"{src.where} has {src.K} matrices")
    problems: list[str] = []
    clusters, col_offset, seen = _check_structure(store, src, rank, problems, progress)
    err2 = np.zeros(store.n_clusters)
    norm2 = np.zeros(store.n_clusters)
    labels = np.where(np.isin(store.labels, [c for c, info in enumerate(clusters) if info]),
                      store.labels, -1)
    cache = _StoredColumns(clusters, max(16 * 2**20, memory_limit // 4))
    for c, part in cluster_parts(src, labels, progress, "verifying"):
        if c < 0:
            continue
        cols = column_ranges(col_offset[part.indices], np.diff(part.offsets))
        data = as_compute(part.data)
        norm2[c] += sqnorm(data)
        err2[c] += sqnorm(data - cache.columns(c, cols))
    errors = []
    for c in range(store.n_clusters):
        if not clusters[c]:
            errors.append(float("inf"))
        elif norm2[c] > 0:
            errors.append(float(np.sqrt(err2[c] / norm2[c])))
        else:  # an all-zero cluster: any stored non-zero is an infinite relative error
            errors.append(0.0 if err2[c] == 0 else float("inf"))
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

    def columns(self, c: int, cols: np.ndarray) -> np.ndarray:
        info = self.clusters[c]
        if info["sorted"]:
            lo, hi = int(cols.min()), int(cols.max()) + 1
            stored = np.asarray(info["stored"][:, lo:hi])[:, cols - lo]
        else:
            stored = self._whole(c)[:, cols]
        return cluster_columns(info["basis"], stored)

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
        bad = [i for i in indices or () if not 0 <= i < K]  # before numpy: any int may come
        if bad:
            raise InputError(f"{path}: index {bad[0]} out of range (the store holds K = {K})")
        wanted = np.arange(K) if not indices else np.asarray(indices, dtype=np.int64)
        transpose = bool(store.params.get("transpose", False))
        if store.compact is not None:
            dtype = np.dtype(store.params.get("stored_dtype", "float64"))
            out = {}
            for i in np.unique(wanted):
                for _, block in store.compact.decode_range(int(i), int(i) + 1):
                    block = block.astype(dtype)
                    out[int(i)] = block.T if transpose else block
            return [(int(i), out[int(i)]) for i in wanted], store.names, store.params
        out: dict[int, np.ndarray] = {}
        for c in np.unique(store.labels[wanted]):
            cluster = store.cluster(int(c))
            basis, stored = cluster_arrays(cluster)
            dtype = stored.dtype
            cols = cluster_columns(basis, stored)
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
