"""The Python API: :class:`MatrixClusterer`, in the style of a scikit-learn estimator."""

from __future__ import annotations

import inspect
import logging
import os
import time
from contextlib import nullcontext
from typing import Sequence

import numpy as np

from matclust import defaults, limits
from matclust.baselines import (PartitionDriver, baseline_labels, is_baseline, needs_clusters,
                                 require_sklearn)
from matclust.checkpoint import OutputGuard
from matclust.compact import ENCODINGS, GUARANTEES, formation_eps
from matclust.driver import ORDERS, GreedyDriver
from matclust.sinks import CompactSink, PlainSink
from matclust.engine.estimators import canonical_method, make_estimator
from matclust.errors import InputError
from matclust.report import build_report
from matclust.safety import check_target, refuse_clashes, require_path
from matclust.sources import MatrixSource, array_source
from matclust.sources.cache import CachedReader
from matclust.sources.summary import SummaryReader, summary_dtype
from matclust.store import FORMAT, PLAIN_FORMAT, ResultWriter

logger = logging.getLogger(__name__)

MODES = ("auto", "in-memory", "out-of-core")

#: Above this much matrix data ``auto`` runs out of core even when the data would fit, provided
#: the summaries are smaller than the matrices (:func:`summaries_shrink`): they then scan
#: faster than cached batches (bench/: 20,000 planted 32 x 16 blocks 5.6 s in memory, 3.6 s out
#: of core; 100,000 of them 22 s and 9.5 s), while small collections do not repay the extra
#: passes (14,158 RGB patches, 12 MiB: 0.52 s and 0.64 s).
AUTO_OUT_OF_CORE_BYTES = 32 * 2**20


def _integer(low: int, message: str, optional: bool = False):
    """A parameter check: an integer (not a bool) >= ``low``, or None when ``optional``."""
    def check(value):
        if optional and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(message.format(value=value))
        return int(value)
    return check


def _choice(options, message: str):
    """A parameter check: one of ``options``."""
    def check(value):
        if not isinstance(value, str) or value not in options:
            raise InputError(message.format(value=value))
        return value
    return check


def _eps(value) -> float:
    """A parameter check: a number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
            or not 0.0 < float(value) < 1.0:
        raise InputError(f"eps must be a number in (0, 1), got {value!r}")
    return float(value)


def _method(value) -> str:
    """A parameter check: a bounded method (paper aliases accepted, the canonical name
    returned) or a baseline."""
    if is_baseline(value):
        return str(value).strip().lower()
    try:
        return canonical_method(str(value))
    except ValueError:
        raise InputError(
            f"unknown method '{value}'; choose incremental, residual or weyl "
            "(aliases approximate, residuals, max_norm), or a baseline random, kmeans, hdbscan"
        ) from None


def _same(value, default) -> bool:
    """Whether a parameter still has its default (repr leaves it out)."""
    try:
        return bool(value == default) and type(value) is type(default)
    except (TypeError, ValueError):  # e.g. an array, whose == is elementwise
        return False


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
        matrices do not fit the budget, or exceed ``AUTO_OUT_OF_CORE_BYTES`` (32 MiB) and are
        wider than the rank (their summaries are then the smaller; :func:`summaries_shrink`).
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
        The report (its keys: README.md, "Output store").
    n_clusters_ : int
    compression_ratio_ : float
        The paper's compression ratio.

    Notes
    -----
    The candidate bound is guaranteed (see docs/algorithms.md); in addition each cluster's exact
    error is computed from its exact basis before it is emitted, so ``error <= eps`` holds for
    every stored cluster even if rounding ever defeated a bound.

    The parameters follow scikit-learn's conventions (without depending on it):
    ``get_params``/``set_params``, ``sklearn.base.clone``, ``fit_predict``; they are checked
    when fitting (:attr:`_parameter_constraints`), each against one declared constraint.

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

    def __init__(self, rank: int = defaults.RANK, eps: float = defaults.EPS,
                 method: str = defaults.METHOD, order: str = defaults.ORDER,
                 patience: int = defaults.PATIENCE, oversampling: int = defaults.OVERSAMPLING,
                 memory_limit: int = defaults.MEMORY_LIMIT, n_clusters: int | None = None,
                 random_state: int = defaults.SEED, mode: str = defaults.MODE,
                 guarantee: str = defaults.GUARANTEE, encoding: str = defaults.ENCODING,
                 shards: int | None = None):
        # Only stored: validation happens in fit, so get_params/set_params/clone see exactly
        # what was given (the scikit-learn convention).
        self.guarantee = guarantee
        self.encoding = encoding
        self.shards = shards
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

    #: Every parameter of ``__init__`` and its check: a callable returning the normalised value
    #: or raising InputError. Checked in this order; rules between parameters are in _validated.
    _parameter_constraints = {
        "method": _method,
        "n_clusters": _integer(1, "--clusters must be an integer >= 1, got {value!r}", True),
        "order": _choice(ORDERS, "unknown order '{value}'; choose residual or norm"),
        "rank": _integer(1, "rank must be an integer >= 1, got {value!r}"),
        "eps": _eps,
        "patience": _integer(0, "patience must be an integer >= 0, got {value!r}"),
        "oversampling": _integer(0, "oversampling must be an integer >= 0, got {value!r}"),
        "memory_limit": _integer(2**20, "memory limit must be at least 1 MiB, got {value!r}"),
        "mode": _choice(MODES, "unknown mode '{value}'; choose " + ", ".join(MODES)),
        "random_state": _integer(0, "random_state must be an integer >= 0, got {value!r}"),
        "guarantee": _choice(GUARANTEES, "unknown guarantee '{value}'; choose matrix or cluster"),
        "encoding": _choice(ENCODINGS, "unknown encoding '{value}'; choose compact or plain"),
        "shards": _integer(1, "--shards must be an integer >= 1, got {value!r}", True),
    }

    # -- scikit-learn's estimator protocol ----------------------------------------------------
    @classmethod
    def _get_param_names(cls) -> list[str]:
        """The parameters of ``__init__``, sorted (as scikit-learn's BaseEstimator has them)."""
        signature = inspect.signature(cls.__init__)
        return sorted(p.name for p in signature.parameters.values()
                      if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))

    def get_params(self, deep: bool = True) -> dict:
        """The parameters as given to ``__init__`` or ``set_params`` (``deep`` is accepted for
        scikit-learn; no parameter is itself an estimator)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params) -> "MatrixClusterer":
        """Set parameters by name (checked when fitting, like those given to ``__init__``)."""
        valid = self._get_param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}; "
                                 f"valid parameters: {', '.join(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        """The class and the parameters that differ from their defaults, as scikit-learn shows."""
        signature = inspect.signature(type(self).__init__).parameters  # in signature order
        changed = [f"{name}={getattr(self, name)!r}" for name, p in signature.items()
                   if name != "self" and not _same(getattr(self, name), p.default)]
        return f"{type(self).__name__}({', '.join(changed)})"

    # -- validation, in one place -------------------------------------------------------------
    def _validated(self) -> dict:
        values = {name: check(getattr(self, name))
                  for name, check in self._parameter_constraints.items()}
        method = values["method"]
        baseline = is_baseline(method)
        if values["n_clusters"] is not None and not (baseline and needs_clusters(method)):
            raise InputError(f"--clusters applies only to --method random or kmeans, not {method}")
        if baseline and needs_clusters(method) and values["n_clusters"] is None:
            raise InputError(f"--method {method} needs --clusters N")
        if baseline:
            require_sklearn(method)
        if values["shards"] is not None and (baseline or values["mode"] == "in-memory"):
            raise InputError("--shards (and --workers, --scheduler) run the out-of-core path, "
                             f"not --mode in-memory or a baseline ({method})")
        if baseline and values["mode"] == "out-of-core":
            raise InputError(f"--mode out-of-core applies to incremental, residual and weyl, "
                             f"not the baseline {method}")
        # The run's parameters, as recorded in the report and the store.
        params = {name: value for name, value in values.items()
                  if name not in ("n_clusters", "random_state", "shards")}
        if values["shards"] is not None:  # a sharded run (matclust.stages) records its shards
            params["shards"] = values["shards"]
        if baseline:  # no error control: stored as the paper would, whatever the guarantee
            params.update({"guarantee": "cluster", "encoding": "plain"})
        if baseline:  # no candidate order; the partition's own parameters instead
            params.update({"order": None, "n_clusters": values["n_clusters"],
                           "seed": values["random_state"]})
        return params

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, X, output=None, *, overwrite: bool = False, progress=None,
            extra_params: dict | None = None, resume: bool = False,
            runner=None) -> "MatrixClusterer":
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
        runner : matclust.distributed.DaskRunner or InProcess, optional
            Where the stages of a sharded run execute (:mod:`matclust.stages`); with a runner
            the run is sharded (``shards`` defaults to a multiple of its workers). A sharded
            run checkpoints each shard's plan: ``resume`` plans only the shards missing, with
            the same ``shards``.

        Returns
        -------
        self

        Notes
        -----
        While ``output`` is written, its lock is held (a second run on it fails) and a
        checkpoint of the formed clusters is kept beside it (see :mod:`matclust.checkpoint`).
        """
        if output is None:
            return self._fit(X, None, overwrite, progress, extra_params, None, runner)
        self._validated()  # bad parameters fail before the output's lock is taken
        # Nothing is locked or written before it is clear that OUTPUT may be written: it is
        # not the input, and whatever is there is a matclust result the caller may replace.
        output = require_path(output, "output")
        if isinstance(X, MatrixSource):
            refuse_clashes(("output", output), [("input", X.path)])
        check_target(output, overwrite, "result")
        with OutputGuard(output, resume=resume) as guard:
            return self._fit(X, output, overwrite, progress, extra_params, guard, runner)

    def _fit(self, X, output, overwrite, progress, extra_params, guard,
             runner=None) -> "MatrixClusterer":
        source = as_source(X)
        try:
            return self._fit_source(source, output, overwrite, progress, extra_params, guard,
                                    runner)
        finally:
            source.calibrate(None)  # a caller's source reads its values as they are again

    def _fit_source(self, source, output, overwrite, progress, extra_params, guard,
                    runner=None) -> "MatrixClusterer":
        started = time.perf_counter()
        params = self._validated()
        progress = progress or NullProgress()
        # An absolute path, so that `verify` finds the input from any working directory.
        recorded = os.path.abspath(source.path) if os.path.exists(source.path) else source.path
        params.update({"input": recorded, "dataset": source.dataset,
                       "transpose": source.transpose, "stored_dtype": str(source.storage_dtype),
                       **(extra_params or {})})
        if runner is not None or params.get("shards") is not None:
            return self._fit_sharded(source, params, output, overwrite, progress, runner, started,
                                     guard)
        # Every matrix may end up a cluster of its own: the plan reserves room for that.
        in_memory_plan = limits.plan(params["memory_limit"], source.K,
                                     limits.cluster_reserve(source.K))
        fits = in_memory_plan is not None and source.matrix_bytes <= in_memory_plan.cache
        out_of_core = params["mode"] == "out-of-core" or (
            params["mode"] == "auto" and output is not None
            and not is_baseline(params["method"])
            and (not fits or (source.matrix_bytes > AUTO_OUT_OF_CORE_BYTES
                              and summaries_shrink(source, params))))
        run_plan = cluster_plan(source, params, out_of_core)
        budget = run_plan.cache
        source.batch_limit = run_plan.batch
        reader = CachedReader(source, budget)
        # Record the mode that ran (auto resolves to one of the two), for reports and scripts.
        params["mode"] = "out-of-core" if out_of_core else "in-memory"
        logger.info("%s run, method %s, rank %d, eps %g: %.1f MiB of matrices, budget %.0f MiB",
                    params["mode"], params["method"], params["rank"], params["eps"],
                    source.matrix_bytes / 2**20, budget / 2**20)

        baseline = is_baseline(params["method"])
        compact = params["encoding"] == "compact"
        # Clusters are formed at the error the storage leaves for truncation (less than eps
        # when quantisation needs part of the budget); matrices above it leave and are
        # clustered again: required by the matrix guarantee, and with the compact encoding
        # better clusters for the cluster guarantee too (bench: 89,836 bytes without, fewer
        # with, on the planted sample), so that its store is never the larger. Only
        # `--guarantee cluster --encoding plain` keeps the paper's clusters exactly.
        form_eps = formation_eps(params["eps"], params["encoding"])
        evict_above = form_eps if params["guarantee"] == "matrix" or compact else None
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
                driver = GreedyDriver(reader, norms2, source.widths, estimator, form_eps,
                                      params["order"], params["patience"], progress.advance,
                                      evict_above=evict_above)

        writer, sink = _writer_and_sink(source, params, estimator, output, overwrite)
        with writer if writer is not None else nullcontext():
            if out_of_core:
                del reader  # the summaries stand in for the matrices from here on
                self._plan_out_of_core(source, params, estimator, budget, guard, sink,
                                       progress, form_eps)
            else:
                self._cluster_in_memory(source, driver, reader, guard, sink, params, progress)
            return self._finish(source, params, sink, writer, started)

    def _fit_sharded(self, source, params, output, overwrite, progress, runner, started, guard):
        """Plan per shard, merge, store (:mod:`matclust.stages`), on ``runner``; each shard's
        plan is checkpointed (``guard``), so that ``resume`` plans only the missing ones."""
        from matclust.distributed import InProcess
        from matclust.stages import StageTimes, default_shards, plan_and_merge

        runner = runner if runner is not None else InProcess()
        if params.get("shards") is None:
            params["shards"] = default_shards(source.K, runner.workers)
        if output is None:
            raise InputError(f"{source.where}: a sharded run writes its results straight to an "
                             "output store; give one")
        params["mode"] = "out-of-core"
        # The client stores the plan: it holds batches and accumulators, never summaries.
        client_plan = cluster_plan(source, params, False)
        budget, source.batch_limit = client_plan.cache, client_plan.batch
        form_eps = formation_eps(params["eps"], params["encoding"])
        estimator = make_estimator(params["method"], params["rank"], source.m,
                                   source.dtype.kind == "c", params["oversampling"])
        logger.info("sharded run on %s: %d shards", runner.describe(), params["shards"])
        times = StageTimes()
        writer, sink = _writer_and_sink(source, params, estimator, output, overwrite)
        # The client has not read the matrices yet: the input is known by its file and shape.
        log = guard.checkpoint(params, source, None) if guard is not None else None
        with writer:
            planned, passes = plan_and_merge(source, params, runner, progress, times, log)
            sink.store_planned(planned, form_eps, budget, progress, passes)
            return self._finish(source, params, sink, writer, started, times, runner)

    def _finish(self, source, params, sink, writer, started, times=None, runner=None):
        """Every cluster is in the sink: the labels and statistics, the report (with a sharded
        run's stage ``times``), the store committed; the fitted attributes."""
        labels, stats, stored_numbers, max_matrix_error = sink.finish()
        logger.info("%d clusters formed and encoded after %.2f s", len(stats),
                    time.perf_counter() - started)
        if times is not None:
            times.store = time.perf_counter() - times.merged_at
        report = build_report(params, source.K, source.m, params["rank"], params["eps"],
                              stats, stored_numbers, source.input_dtype.itemsize,
                              source.storage_dtype.itemsize, time.perf_counter() - started,
                              max_matrix_error)
        if times is not None:
            report["stages"] = {"runner": runner.describe(), **times.report()}
        if writer is not None:
            writer.set_json("params", params)
            writer.set_report(report)
            writer.commit()
        self.labels_ = labels
        self.clusters_ = sink.kept
        self.cluster_stats_ = stats
        self.report_ = report
        self.n_clusters_ = len(stats)
        self.compression_ratio_ = report["compression_ratio"]
        return self

    @staticmethod
    def _cluster_in_memory(source, driver, reader, guard, sink, params, progress):
        """Form clusters with the data at hand; encode and write each as it is formed."""
        # The checkpoint hands back the clusters of an interrupted run first (with resume)
        # and records every new one as it is formed.
        log = guard.checkpoint(params, source, driver.norms2) \
            if guard is not None and isinstance(driver, GreedyDriver) else None
        progress.start("clustering", source.K)
        for formed in within_reserve(log.clusters(driver) if log else driver.clusters(), source,
                                     params, False):
            sink.consume(formed, reader)
        sink.clusters_done(reader)

    def _plan_out_of_core(self, source, params, estimator, budget, guard, sink, progress,
                          form_eps):
        """Plan the clusters on per-matrix summaries, then store them in sequential passes."""
        if sink.writer is None:
            raise InputError(f"{source.where}: out-of-core mode writes its results straight to "
                             f"an output store ({source.matrix_bytes / 2**20:.0f} MiB of "
                             f"matrices); give one")
        summaries = SummaryReader(source, summary_directions(source, params), budget, form_eps,
                                  progress)
        logger.info("summary pass over the input: %d directions of each matrix, %s",
                    summaries.s, summaries.store_dtype)
        driver = GreedyDriver(summaries, summaries.norms2, source.widths, estimator,
                              form_eps, params["order"], params["patience"],
                              progress.advance, exact_check=False)
        # Planning is what a crash would lose: the checkpoint records it as in memory.
        log = guard.checkpoint(params, source, summaries.norms2) if guard is not None else None
        progress.start("clustering", source.K)
        planned = list(within_reserve(log.clusters(driver) if log else driver.clusters(), source,
                                      params, True))
        del driver, summaries
        sink.store_planned(planned, form_eps, budget, progress)

    def fit_predict(self, X, **kwargs) -> np.ndarray:
        """Fit (keywords as for :meth:`fit`) and return ``labels_``."""
        return self.fit(X, **kwargs).labels_


def _writer_and_sink(source, params, estimator, output, overwrite):
    """The result store (None without ``output``) and the sink that encodes into it."""
    compact = params["encoding"] == "compact"
    writer = ResultWriter(output, overwrite, FORMAT if compact else PLAIN_FORMAT) \
        if output is not None else None
    sink = (CompactSink(source, params, writer) if compact
            else PlainSink(source, params, estimator, writer))
    return writer, sink


def summary_directions(source: MatrixSource, params: dict) -> int:
    """Directions each out-of-core summary keeps at most: as many as the residual order measures
    candidates against (the estimator's ``order_rank``), so that the summaries order candidates
    as the matrices do in memory (PDE trajectories, 128 x 48 at r 8 + 5: compression ratio
    6.65 out of core with r directions, against 7.22 in memory)."""
    if is_baseline(params["method"]) or params["order"] != "residual":
        return params["rank"]
    return make_estimator(params["method"], params["rank"], source.m, source.dtype.kind == "c",
                          params["oversampling"]).order_rank


def summary_bytes(source: MatrixSource, params: dict) -> int:
    """The least memory summaries with every direction need (the cheapest precise-enough dtype).
    Fewer directions would leave bounds too loose to admit anything: all singletons."""
    s = int(min(summary_directions(source, params), source.m, int(source.widths.max())))
    dtype = summary_dtype(params["eps"], source.dtype.kind == "c", 1, 0)
    return source.K * source.m * s * dtype.itemsize


def summaries_shrink(source: MatrixSource, params: dict) -> bool:
    """Whether the summaries keep fewer directions than the matrices have columns. When they
    do not (matrices no wider than the rank), planning on them scans as many columns as the
    matrices themselves and only adds passes: 59,068 MiniLM columns (384 x 1) at rank 32,
    eps 0.2 took 50.6 s of CPU out of core and 7.7 s in memory, to the same store (every
    column stored alone: the matrix guarantee dissolved every cluster planned out of core).
    Summaries keep min(summary_directions, m, widest) directions of every matrix."""
    directions = min(summary_directions(source, params), source.m, int(source.widths.max()))
    return source.K * directions < int(source.widths.sum())


def cluster_plan(source: MatrixSource, params: dict, out_of_core: bool) -> limits.Plan:
    """How the memory limit is split for this run (see matclust.limits), or InputError naming
    the smallest limit that works."""
    need = summary_bytes(source, params) if out_of_core else 0
    what = "summaries of " if out_of_core else ""
    return limits.plan_or_refuse(
        f"{source.where}: clustering the {what}{source.K} matrices of {source.m} rows",
        params["memory_limit"], source.K, limits.cluster_reserve(source.K), need)


def within_reserve(clusters, source: MatrixSource, params: dict, out_of_core: bool):
    """The formed clusters, stopped with an error naming the limit that holds every matrix as a
    cluster of its own when more form than the plan reserved memory for (see
    :func:`matclust.limits.cluster_reserve`): never a run that outgrows its limit."""
    reserved = limits.cluster_reserve(source.K)
    for count, cluster in enumerate(clusters, 1):
        if count > reserved:
            need = summary_bytes(source, params) if out_of_core else 0
            raise limits.refuse(
                f"{source.where}: these {source.K} matrices form more than {reserved} clusters; "
                f"holding them", params["memory_limit"],
                lambda x: limits.plan(x, source.K, source.K, need) is not None)
        yield cluster


def as_source(X) -> MatrixSource:
    if isinstance(X, MatrixSource):
        return X
    if isinstance(X, np.ndarray):
        if X.ndim != 3:
            raise InputError(f"array is {X.ndim}-D; expected (K, m, n) or a list of 2-D arrays")
        return array_source(X)
    if isinstance(X, Sequence):
        return array_source([np.asarray(a) for a in X])
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
