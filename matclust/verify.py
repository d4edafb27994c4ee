"""Checking and reading back a result store: ``verify`` and ``reconstruct``."""

from __future__ import annotations

import numpy as np

from matclust.engine.linalg import as_compute, sqnorm
from matclust.errors import InputError
from matclust.sources import open_source
from matclust.sources.cache import CachedReader
from matclust.store import ResultStore

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
    problems: list[str] = []
    if len(store.labels) != src.K:
        raise InputError(f"{store.path}: has {len(store.labels)} labels but the input "
                         f"{src.where} has {src.K} matrices")
    reader = CachedReader(src, max(16 * 2**20, memory_limit // 2))
    seen = np.zeros(src.K, dtype=np.int64)
    errors, over = [], []
    if progress:
        progress.start("verifying", store.n_clusters)
    for c in range(store.n_clusters):
        cluster = store.cluster(c)
        members = cluster["members"]
        if len(members) == 0 or members.min() < 0 or members.max() >= src.K:
            problems.append(f"cluster {c}: member indices out of range")
            errors.append(float("inf"))
            continue
        seen[members] += 1
        if np.any(store.labels[members] != c):
            problems.append(f"cluster {c}: labels disagree with its members")
        try:
            basis, stored = cluster_arrays(cluster)
        except KeyError:
            problems.append(f"cluster {c}: no basis/coefficients and no raw data")
            errors.append(float("inf"))
            continue
        batch = reader.get(members)
        expected_cols = batch.data.shape[1]
        if stored.shape[1] != expected_cols or (basis is None and stored.shape[0] != src.m):
            problems.append(f"cluster {c}: stored shape {stored.shape} does not match "
                            f"{src.m} x {expected_cols}")
            errors.append(float("inf"))
            continue
        if basis is not None:
            if basis.shape[0] != src.m or basis.shape[1] > rank or basis.shape[1] != stored.shape[0]:
                problems.append(f"cluster {c}: basis shape {basis.shape} does not fit m={src.m}, rank={rank}")
            gram = as_compute(basis).conj().T @ as_compute(basis)
            tol = ORTHO_ULPS * np.finfo(basis.dtype).eps
            if np.abs(gram - np.eye(gram.shape[0])).max(initial=0.0) > tol:
                problems.append(f"cluster {c}: basis columns are not orthonormal")
        data = as_compute(batch.data)
        total = sqnorm(data)
        diff = data - cluster_columns(basis, stored)
        if total > 0:
            err = float(np.sqrt(sqnorm(diff) / total))
        else:  # an all-zero cluster: any stored non-zero is an infinite relative error
            err = 0.0 if sqnorm(diff) == 0 else float("inf")
        errors.append(err)
        if not err <= eps:
            over.append(c)
        if progress:
            progress.advance(1)
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
