"""The Python API: :class:`MatrixClusterer`, in the style of a scikit-learn estimator."""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from typing import Sequence

import numpy as np

from matclust.baselines import (PartitionDriver, baseline_labels, is_baseline, needs_clusters,
                                 require_sklearn)
from matclust.checkpoint import OutputGuard
from matclust.driver import ORDERS, GreedyDriver
from matclust.encode import EncodedCluster, encode
from matclust.engine.estimators import canonical_method, make_estimator
from matclust.errors import InputError
from matclust.report import build_report, cluster_stat
from matclust.sources import ArraySource, MatrixSource
from matclust.sources.cache import CachedReader
from matclust.sources.summary import SummaryReader
from matclust.store import ResultWriter
from matclust.streaming import store_planned

MODES = ("auto", "in-memory", "out-of-core")

#: Memory assumed taken by the interpreter, numpy and libraries before any data is read.
BASELINE_BYTES = 160 * 2**20
#: Per-matrix bookkeeping held for the whole run (norms, widths, labels, order, flags).
PER_MATRIX_BYTES = 48
#: Above this much matrix data ``auto`` runs out of core even when the data would fit: its
#: compacted summaries scan faster than cached batches (bench/: 27,648 MiniLM columns 9.2 s in
#: memory, 7.4 s out of core; 20,000 planted 32 x 16 blocks 5.6 s and 3.6 s; 100,000 of them
#: 22 s and 9.5 s), while small collections do not repay its extra passes (14,158 RGB
#: patches, 12 MiB: 0.52 s and 0.64 s).
AUTO_OUT_OF_CORE_BYTES = 32 * 2**20


class NullProgress:
    """Progress sink that shows nothing (the API's default)."""

    def start(self, phase: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


class MatrixClusterer:
    """Error-bounded greedy clustering of matrices with one shared rank-r basis per cluster.

    Every cluster S it forms satisfies e_r(S) <= eps, where e_r(S) is the relative Frobenius
    error of the best rank-r approximation of the horizontal concatenation of its members; each
    cluster is then stored with its exact top-r basis (or raw, when that is smaller).

    Parameters
    ----------
    rank : int
        Target rank r of every cluster's shared basis.
    eps : float
        Relative error bound, 0 < eps < 1.
    method : {"incremental", "residual", "weyl", "random", "kmeans", "hdbscan"}
        Bound used to admit candidates (paper aliases: approximate, residuals, max_norm), or a
        baseline without error control (see :mod:`matclust.baselines`): its clusters are stored
        at the target rank whatever their error, and the report counts those over eps.
    order : {"residual", "norm"}
        Candidate order: ascending residual against the seed's basis, or ascending norm.
    patience : int
        After this many clusters in a row that could not grow beyond their seed, the remaining
        matrices are stored as singletons. 0 disables the shortcut.
    oversampling : int
        Extra directions tracked by the incremental estimator (k = rank + oversampling).
    memory_limit : int
        Bytes of memory to aim at; bounds the cache of matrices read from disk.
    mode : {"auto", "in-memory", "out-of-core"}
        ``in-memory`` runs the greedy driver on the matrices themselves (read through a cache
        bounded by ``memory_limit``; the paper's exhaustive candidate ordering). ``out-of-core``
        runs it on compact per-matrix summaries that fit the memory limit, with bounds that stay
        guaranteed, and computes the exact bases and coefficients in sequential passes
        (needs an output store). ``auto`` picks out-of-core, given an output store, when the
        matrices do not fit the budget or exceed ``AUTO_OUT_OF_CORE_BYTES`` (32 MiB).
    n_clusters : int, optional
        Number of clusters of the random and kmeans baselines.
    random_state : int
        Seed of the random and kmeans baselines.

    Attributes
    ----------
    labels_ : ndarray of int64, shape (K,)
        Cluster id of every input matrix; clusters are numbered in the order they were formed.
    clusters_ : list of EncodedCluster
        Per-cluster results (members, basis and coefficients or raw data) when fitted without
        an output store; empty when the results were written to ``output``.
    cluster_stats_ : list of dict
        Size, columns, rank, bound, error and storage kind of every cluster.
    report_ : dict
        The report of CONTRACT.md.
    n_clusters_ : int
    compression_ratio_ : float
        The paper's compression ratio.

    Notes
    -----
    The candidate bound is guaranteed (see ALGORITHMS.md); in addition each cluster's exact
    error is computed from its exact basis before it is emitted, so ``error <= eps`` holds for
    every stored cluster even if rounding ever defeated a bound.

    References
    ----------
    M. Shamrai, "Concatenated Matrix SVD: Compression Bounds, Incremental Approximation, and
    Error-Constrained Clustering", arXiv:2601.11626.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).standard_normal((20, 8, 3))
    >>> MatrixClusterer(rank=4, eps=0.5).fit(X).n_clusters_ >= 1
    True
    """

    def __init__(self, rank: int = 8, eps: float = 0.05, method: str = "incremental",
                 order: str = "residual", patience: int = 10, oversampling: int = 5,
                 memory_limit: int = 2**30, n_clusters: int | None = None,
                 random_state: int = 0, mode: str = "auto"):
        self.mode = mode
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.rank = rank
        self.eps = eps
        self.method = method
        self.order = order
        self.patience = patience
        self.oversampling = oversampling
        self.memory_limit = memory_limit

    # -- validation, in one place -------------------------------------------------------------
    def _validated(self) -> dict:
        baseline = is_baseline(self.method)
        try:
            method = str(self.method).strip().lower() if baseline else canonical_method(str(self.method))
        except ValueError:
            raise InputError(
                f"unknown method '{self.method}'; choose incremental, residual or weyl "
                "(aliases approximate, residuals, max_norm), or a baseline random, kmeans, hdbscan"
            ) from None
        if self.n_clusters is not None and not (baseline and needs_clusters(method)):
            raise InputError(f"--clusters applies only to --method random or kmeans, not {method}")
        if self.n_clusters is not None and (isinstance(self.n_clusters, bool) or not isinstance(
                self.n_clusters, (int, np.integer)) or self.n_clusters < 1):
            raise InputError(f"--clusters must be an integer >= 1, got {self.n_clusters!r}")
        if baseline and needs_clusters(method) and self.n_clusters is None:
            raise InputError(f"--method {method} needs --clusters N")
        if baseline:
            require_sklearn(method)
        if self.order not in ORDERS:
            raise InputError(f"unknown order '{self.order}'; choose residual or norm")
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise InputError(f"rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float, np.floating)) \
                or not 0.0 < float(self.eps) < 1.0:
            raise InputError(f"eps must be a number in (0, 1), got {self.eps!r}")
        if not isinstance(self.patience, (int, np.integer)) or self.patience < 0:
            raise InputError(f"patience must be an integer >= 0, got {self.patience!r}")
        if not isinstance(self.oversampling, (int, np.integer)) or self.oversampling < 0:
            raise InputError(f"oversampling must be an integer >= 0, got {self.oversampling!r}")
        if not isinstance(self.memory_limit, (int, np.integer)) or self.memory_limit < 2**20:
            raise InputError(f"memory limit must be at least 1 MiB, got {self.memory_limit!r}")
        if self.mode not in MODES:
            raise InputError(f"unknown mode '{self.mode}'; choose {', '.join(MODES)}")
        if baseline and self.mode == "out-of-core":
            raise InputError(f"--mode out-of-core applies to incremental, residual and weyl, "
                             f"not the baseline {method}")
        params = {"method": method, "order": self.order, "rank": int(self.rank),
                  "eps": float(self.eps), "patience": int(self.patience),
                  "oversampling": int(self.oversampling), "memory_limit": int(self.memory_limit),
                  "mode": self.mode}
        if baseline:  # no candidate order; the partition's own parameters instead
            params.update({"order": None, "n_clusters": self.n_clusters,
                           "seed": int(self.random_state)})
        return params

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, X, output=None, *, overwrite: bool = False, progress=None,
            extra_params: dict | None = None, resume: bool = False) -> "MatrixClusterer":
        """Cluster a collection; write the result store to ``output`` if given.

        Parameters
        ----------
        X : MatrixSource, ndarray of shape (K, m, n), or sequence of 2-D arrays (m, n_i)
        output : path, optional
            Result store to write (HDF5 if it ends in .h5/.hdf5, else Zarr).
        overwrite : bool
            Replace an existing ``output``.
        progress : object with ``start(phase, total)`` and ``advance(n)``, optional
        extra_params : dict, optional
            Recorded in the report's ``params`` (e.g. the CLI's config file).
        resume : bool
            Continue an interrupted run writing ``output`` from its checkpoint (same input and
            parameters, else InputError); without a checkpoint, run normally.

        Returns
        -------
        self

        Notes
        -----
        While ``output`` is written, its lock is held (a second run on it fails) and a
        checkpoint of the formed clusters is kept beside it (see :mod:`matclust.checkpoint`).
        """
        if output is None:
            return self._fit(X, None, overwrite, progress, extra_params, None)
        self._validated()  # bad parameters fail before the output's lock is taken
        with OutputGuard(output, resume=resume) as guard:
            return self._fit(X, output, overwrite, progress, extra_params, guard)

    def _fit(self, X, output, overwrite, progress, extra_params, guard) -> "MatrixClusterer":
        source = as_source(X)
        try:
            return self._fit_source(source, output, overwrite, progress, extra_params, guard)
        finally:
            source.calibrate(None)  # a caller's source reads its values as they are again

    def _fit_source(self, source, output, overwrite, progress, extra_params, guard) -> "MatrixClusterer":
        started = time.perf_counter()
        params = self._validated()
        progress = progress or NullProgress()
        # An absolute path, so that `verify` finds the input from any working directory.
        recorded = os.path.abspath(source.path) if os.path.exists(source.path) else source.path
        params.update({"input": recorded, "dataset": source.dataset,
                       "transpose": source.transpose, **(extra_params or {})})
        budget = max(16 * 2**20, params["memory_limit"] - BASELINE_BYTES - PER_MATRIX_BYTES * source.K)
        reader = CachedReader(source, budget)
        out_of_core = params["mode"] == "out-of-core" or (
            params["mode"] == "auto" and output is not None
            and source.matrix_bytes > min(budget, AUTO_OUT_OF_CORE_BYTES)
            and not is_baseline(params["method"]))
        # Record the mode that ran (auto resolves to one of the two), for reports and scripts.
        params["mode"] = "out-of-core" if out_of_core else "in-memory"

        baseline = is_baseline(params["method"])
        # Baselines have no error control: a partition, stored at the target rank.
        estimator = None if baseline else make_estimator(
            params["method"], params["rank"], source.m, source.dtype.kind == "c",
            params["oversampling"])
        driver = None  # out of core, the driver runs on summaries (see _plan_out_of_core)
        if not out_of_core:
            norms2 = scan_norms(reader, progress)
            if baseline:
                partition = baseline_labels(params["method"], reader, params["n_clusters"],
                                            params["seed"])
                driver = PartitionDriver(reader, norms2, source.widths, partition,
                                         params["rank"], progress.advance)
            else:
                driver = GreedyDriver(reader, norms2, source.widths, estimator, params["eps"],
                                      params["order"], params["patience"], progress.advance)

        writer = ResultWriter(output, overwrite) if output is not None else None
        with writer if writer is not None else nullcontext():
            if out_of_core:
                del reader  # the summaries stand in for the matrices from here on
                labels, encoded = self._plan_out_of_core(source, params, estimator, budget,
                                                         guard, writer, progress)
                kept = []
            else:
                labels, encoded = self._cluster_in_memory(source, params, estimator, driver,
                                                          reader, guard, writer, progress)
                kept = encoded if writer is None else []
            stats = [cluster_stat(cid, enc) for cid, enc in enumerate(encoded)]
            stored_numbers = sum(enc.numbers for enc in encoded)
            report = build_report(params, source.K, source.m, params["rank"], params["eps"],
                                  stats, stored_numbers, source.input_dtype.itemsize,
                                  source.storage_dtype.itemsize, time.perf_counter() - started)
            if writer is not None:
                writer.write_array("labels", labels)
                writer.write_array("widths", source.widths.astype(np.int64))
                if source.names is not None:
                    writer.write_strings("names", source.names)
                writer.set_json("params", params)
                writer.set_json("report", report)
                writer.commit()

        self.labels_ = labels
        self.clusters_: list[EncodedCluster] = kept
        self.cluster_stats_ = stats
        self.report_ = report
        self.n_clusters_ = len(stats)
        self.compression_ratio_ = report["compression_ratio"]
        return self

    @staticmethod
    def _cluster_in_memory(source, params, estimator, driver, reader, guard, writer, progress):
        """Form clusters with the data at hand; encode and write each as it is formed."""
        # The checkpoint hands back the clusters of an interrupted run first (with resume)
        # and records every new one as it is formed.
        log = guard.checkpoint(params, source, driver.norms2) \
            if guard is not None and hasattr(driver, "rebuild") else None
        labels = np.full(source.K, -1, dtype=np.int64)
        encoded = []
        progress.start("clustering", source.K)
        for cid, formed in enumerate(log.clusters(driver) if log else driver.clusters()):
            enc = encode(formed, reader, params["eps"], estimator,
                         error_control=estimator is not None)
            labels[enc.members] = cid
            if writer is not None:
                write_cluster(writer, cid, enc)
                enc = enc.on_disk()  # written: keep the numbers, not the arrays
            encoded.append(enc)
        return labels, encoded

    def _plan_out_of_core(self, source, params, estimator, budget, guard, writer, progress):
        """Plan the clusters on per-matrix summaries, then store them in sequential passes."""
        if writer is None:
            raise InputError(f"{source.where}: out-of-core mode writes its results straight to "
                             f"an output store ({source.matrix_bytes / 2**20:.0f} MiB of "
                             f"matrices); give one")
        summaries = SummaryReader(source, params["rank"], budget // 2, params["eps"], progress)
        driver = GreedyDriver(summaries, summaries.norms2, source.widths, estimator,
                              params["eps"], params["order"], params["patience"],
                              progress.advance, exact_check=False)
        # Planning is what a crash would lose: the checkpoint records it as in memory.
        log = guard.checkpoint(params, source, summaries.norms2) if guard is not None else None
        progress.start("clustering", source.K)
        planned = list(log.clusters(driver) if log else driver.clusters())
        del driver, summaries
        return store_planned(source, planned, params["rank"], params["eps"], writer, budget,
                             progress)

    def fit_predict(self, X, **kwargs) -> np.ndarray:
        return self.fit(X, **kwargs).labels_


def as_source(X) -> MatrixSource:
    if isinstance(X, MatrixSource):
        return X
    if isinstance(X, np.ndarray):
        if X.ndim != 3:
            raise InputError(f"array is {X.ndim}-D; expected (K, m, n) or a list of 2-D arrays")
        return ArraySource(X)
    if isinstance(X, Sequence):
        return ArraySource([np.asarray(a) for a in X])
    raise InputError(f"cannot read matrices from {type(X).__name__}")


def scan_norms(reader: CachedReader, progress) -> np.ndarray:
    """One pass over the collection: every matrix's largest entry (and, through the source,
    NaN/Inf checks), from which the source chooses its working scale (see
    ``MatrixSource.calibrate``); then the squared norms in that scale, from the batches the
    reader cached (re-read only when they did not fit its budget). The reader keeps the column
    norms of the batches it caches for its residual scans."""
    source = reader.source
    source.calibrate(None)
    peaks = np.empty(source.K, dtype=np.float64)
    progress.start("reading", source.K)
    for k in range(len(reader)):
        batch = reader.batch(k)
        peaks[batch.indices] = batch.peaks()
        progress.advance(len(batch))
    source.calibrate(peaks)
    reader.rescale()
    norms2 = np.empty(source.K, dtype=np.float64)
    for k in range(len(reader)):
        batch = reader.batch(k)
        norms2[batch.indices] = batch.reduce_columns(reader.column_norms2(k, batch))
    return norms2


def write_cluster(writer: ResultWriter, cid: int, enc: EncodedCluster) -> None:
    prefix = f"clusters/{cid}"
    writer.write_array(f"{prefix}/members", enc.members.astype(np.int64))
    if enc.basis is not None:
        writer.write_array(f"{prefix}/basis", enc.basis)
        writer.write_array(f"{prefix}/coefficients", enc.coefficients)
    else:
        writer.write_array(f"{prefix}/raw", enc.raw)
