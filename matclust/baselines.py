"""The paper's baselines: random partition, k-means and HDBSCAN (docs/algorithms.md, 'Baselines').

They have no error control. A baseline only produces a partition (labels); the
:class:`PartitionDriver` turns it into the same :class:`~matclust.driver.FormedCluster` objects
the greedy driver emits (exact top-r basis, the paper's factoring rule), so storing goes through
the same encode / store / report path. Each cluster is stored at the target rank with whatever
error it has; the report counts the clusters over eps and ``verify`` fails such a store.

k-means and HDBSCAN (scikit-learn, the optional extra ``baselines``) run on the flattened
matrices, which need equal widths; the flattened collection is held in memory.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from matclust.driver import FormedCluster, by_magnitude_descending, worth_factoring
from matclust.engine import ExactBasis
from matclust.errors import InputError, MissingExtraError
from matclust.sources.cache import CachedReader

BASELINES = ("random", "kmeans", "hdbscan")
#: HDBSCAN's smallest cluster (scikit-learn's default); smaller groups are noise -> singletons.
HDBSCAN_MIN_CLUSTER_SIZE = 5


def is_baseline(method) -> bool:
    return str(method).strip().lower() in BASELINES


def needs_clusters(method: str) -> bool:
    """Whether the baseline takes a number of clusters (random and kmeans do, hdbscan does not)."""
    return method in ("random", "kmeans")


def _sklearn_cluster(feature: str):
    try:
        import sklearn.cluster as skc
    except ImportError:
        raise MissingExtraError("scikit-learn", "baselines", feature) from None
    return skc


def require_sklearn(method: str) -> None:
    """Fail early (MissingExtraError, exit 2) when a baseline needs scikit-learn and it is missing."""
    if method in ("kmeans", "hdbscan"):
        _sklearn_cluster(f"--method {method}")


def flattened(reader: CachedReader, method: str) -> np.ndarray:
    """The collection as a (K, m * n) feature matrix (real and imaginary parts side by side for
    complex data). Needs equal widths."""
    source = reader.source
    widths = source.widths
    if len(np.unique(widths)) > 1:
        raise InputError(
            f"{source.where}: --method {method} clusters the flattened matrices, which needs "
            f"equal widths; the widths vary from {int(widths.min())} to {int(widths.max())} "
            "(use --method random, or a bounded method)")
    n = int(widths[0])
    cplx = source.dtype.kind == "c"
    features = np.empty((source.K, source.m * n * (2 if cplx else 1)), dtype=np.float64)
    for batch in reader:
        b = len(batch)
        flat = batch.data.reshape(source.m, b, n).transpose(1, 0, 2).reshape(b, source.m * n)
        if cplx:
            flat = np.hstack([flat.real, flat.imag])
        features[batch.indices] = flat
    return features


def baseline_labels(method: str, reader: CachedReader, n_clusters: int | None = None,
                    seed: int = 0) -> np.ndarray:
    """A partition of the collection by a baseline: labels (K,), any non-negative integers.

    random: a uniformly random balanced partition into ``n_clusters`` groups (any widths).
    kmeans: sklearn KMeans(n_clusters) on the flattened matrices.
    hdbscan: sklearn HDBSCAN on the flattened matrices; noise points become singletons.
    """
    K = reader.source.K
    if method not in BASELINES:
        raise InputError(f"unknown baseline '{method}'; choose {', '.join(BASELINES)}")
    if needs_clusters(method):
        if n_clusters is None:
            raise InputError(f"--method {method} needs --clusters N")
        if not 1 <= int(n_clusters) <= K:
            raise InputError(f"--clusters must be between 1 and K = {K}, got {n_clusters}")
        n_clusters = int(n_clusters)
    if method == "random":
        rng = np.random.default_rng(seed)
        labels = np.empty(K, dtype=np.int64)
        labels[rng.permutation(K)] = np.arange(K) % n_clusters
        return labels
    skc = _sklearn_cluster(f"--method {method}")
    features = flattened(reader, method)
    if method == "kmeans":
        model = skc.KMeans(n_clusters=n_clusters, random_state=seed, n_init="auto")
        return model.fit_predict(features).astype(np.int64)
    if K < 2:
        return np.zeros(K, dtype=np.int64)
    kwargs = {"min_cluster_size": min(HDBSCAN_MIN_CLUSTER_SIZE, K)}
    if "copy" in inspect.signature(skc.HDBSCAN).parameters:
        kwargs["copy"] = True  # explicit: newer scikit-learn warns about the default changing
    labels = skc.HDBSCAN(**kwargs).fit_predict(features)
    labels = labels.astype(np.int64)
    noise = np.flatnonzero(labels < 0)
    labels[noise] = labels.max(initial=-1) + 1 + np.arange(len(noise))
    return labels


@dataclass
class PartitionDriver:
    """Emits the clusters of a given partition as FormedCluster objects, in the greedy driver's
    order convention: members by descending norm, clusters by the norm of their largest member.

    A cluster worth factoring (``worth_factoring``) gets its exact top-r basis; its ``bound`` is
    its exact best error e_r(S) (there is no estimator), whatever eps is.
    """

    reader: CachedReader
    norms2: np.ndarray
    widths: np.ndarray
    labels: np.ndarray
    rank: int
    progress: Callable[[int], None] | None = None

    def clusters(self) -> Iterator[FormedCluster]:
        m = self.reader.source.m
        by_norm = by_magnitude_descending(self.norms2, self.reader.source)
        # A matrix kept apart has a scale of its own (see MatrixSource.calibrate): a group of one.
        apart = self.reader.source.apart
        groups: dict[tuple, list[int]] = {}
        for idx in by_norm:  # members by descending norm; groups in order of their largest
            key = ("apart", int(idx)) if apart[idx] else ("label", int(self.labels[idx]))
            groups.setdefault(key, []).append(int(idx))
        for members in groups.values():
            members = np.array(members, dtype=np.int64)
            columns = int(self.widths[members].sum())
            acc = ExactBasis(m, self.rank, self.reader.source.dtype)
            for chunk in np.array_split(members, max(1, len(members) // 4096)):
                acc.add(self.reader.get(chunk).data)
            basis, best = acc.basis_and_error()
            factored = worth_factoring(self.rank, m, columns, len(members))
            yield FormedCluster(members, columns, best, factored, basis if factored else None,
                                best, grew=len(members) > 1)
            if self.progress:
                self.progress(len(members))
