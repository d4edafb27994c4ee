"""``matclust compare``: several methods on one collection, one row each.

A method is written ``METHOD[/ORDER]``: a bounded method (incremental, residual, weyl or a paper
alias) with its candidate order, or a baseline (random, kmeans, hdbscan). A bounded method
without an order runs with both orders. Each run is a :class:`~matclust.api.MatrixClusterer`
fit that writes its store to a temporary directory (``$TMPDIR``), deleted at the end: so no
run holds its clusters in memory, and a collection too large for the memory limit runs out of
core as ``matclust cluster`` would (the row's ``mode`` says which).

The random and kmeans baselines need a number of clusters: ``n_clusters``, or by default the
number of clusters of the first bounded run (the baselines then get as many clusters as the
error-bounded method needed).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from matclust import defaults
from matclust.baselines import BASELINES, needs_clusters
from matclust.driver import ORDERS
from matclust.engine.estimators import canonical_method
from matclust.errors import InputError

DEFAULT_METHODS = ("incremental/residual", "incremental/norm", "residual/residual",
                   "residual/norm", "weyl/residual", "weyl/norm", "random", "kmeans")
ROW_KEYS = ("method", "clusters", "singletons", "compression_ratio", "max_error", "over_eps",
            "seconds", "mode")


def parse_methods(tokens) -> list[tuple[str, str | None]]:
    """['incremental', 'weyl/norm', 'kmeans', 'a,b'] -> [(method, order or None), ...]."""
    out: list[tuple[str, str | None]] = []
    for token in tokens:
        for item in str(token).split(","):
            item = item.strip()
            if not item:
                continue
            name, _, order = item.replace(":", "/").partition("/")
            name = name.strip().lower()
            if name in BASELINES:
                if order:
                    raise InputError(f"--methods '{item}': the baseline {name} takes no order")
                pairs = [(name, None)]
            else:
                try:
                    name = canonical_method(name)
                except ValueError:
                    raise InputError(
                        f"--methods '{item}': unknown method; choose incremental, residual, weyl "
                        f"(optionally /residual or /norm) or {', '.join(BASELINES)}") from None
                if order and order not in ORDERS:
                    raise InputError(f"--methods '{item}': unknown order '{order}'; "
                                     "choose residual or norm")
                pairs = [(name, order)] if order else [(name, o) for o in ORDERS]
            out.extend(p for p in pairs if p not in out)
    if not out:
        raise InputError("--methods: no method given")
    return out


def method_label(method: str, order: str | None) -> str:
    return method if order is None else f"{method}/{order}"


@dataclass
class Comparison:
    rows: list[dict]
    n_clusters: int | None = None  # what the random / kmeans baselines were given
    notes: list[str] = field(default_factory=list)


def _sklearn_available() -> bool:
    try:
        import sklearn.cluster  # noqa: F401
    except ImportError:
        return False
    return True


def compare(source, rank: int, eps: float, methods=None, *, n_clusters: int | None = None,
            seed: int = defaults.SEED, patience: int = defaults.PATIENCE,
            oversampling: int = defaults.OVERSAMPLING, memory_limit: int = defaults.MEMORY_LIMIT,
            progress=None) -> Comparison:
    """Run every method on ``source`` and return one row per run (keys ROW_KEYS), in the
    order the methods were given.

    With the default methods, kmeans is skipped (with a note) when scikit-learn is missing or
    the widths vary; asked for explicitly, those are errors.
    """
    from matclust.api import MatrixClusterer

    explicit = methods is not None
    pairs = parse_methods(methods if explicit else DEFAULT_METHODS)
    notes: list[str] = []
    if not explicit and ("kmeans", None) in pairs:
        reason = None
        if not _sklearn_available():
            reason = "needs scikit-learn: pip install 'matclust[baselines]'"
        elif len(np.unique(source.widths)) > 1:
            reason = "needs equal widths (it clusters the flattened matrices)"
        if reason:
            pairs.remove(("kmeans", None))
            notes.append(f"kmeans skipped: {reason}")
    # Bounded runs first: their cluster count is the baselines' default.
    bounded = [p for p in pairs if p[0] not in BASELINES]
    baselines = [p for p in pairs if p[0] in BASELINES]
    results: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory(prefix="matclust-compare-") as scratch:
        for run, (method, order) in enumerate(bounded + baselines):
            clusters = None
            if method in BASELINES and needs_clusters(method):
                if n_clusters is None:
                    first = next((results[p] for p in bounded if p in results), None)
                    if first is None:
                        raise InputError(f"--methods {method} needs --clusters N (or a bounded "
                                         "method to take the number of clusters from)")
                    n_clusters = int(first["clusters"])
                    notes.append(f"random/kmeans given {n_clusters} clusters, as many as "
                                 f"{first['method']} formed")
                clusters = min(int(n_clusters), source.K)
            # The paper's comparison: its per-cluster guarantee and float storage, so that the
            # methods' clusterings (not the encoding) are what the rows compare.
            est = MatrixClusterer(rank=rank, eps=eps, method=method, order=order or defaults.ORDER,
                                  patience=patience, oversampling=oversampling,
                                  memory_limit=memory_limit, n_clusters=clusters, random_state=seed,
                                  guarantee="cluster", encoding="plain")
            store = os.path.join(scratch, f"run{run}.h5")
            rep = est.fit(source, store, progress=progress).report_
            results[(method, order)] = {
                "method": method_label(method, order),
                "clusters": int(rep["clusters"]),
                "singletons": int(rep["singletons"]),
                "compression_ratio": float(rep["compression_ratio"]),
                "max_error": float(rep["max_error"]),
                "over_eps": int(rep["over_eps"]),
                "seconds": float(rep["seconds"]),
                "mode": rep["params"]["mode"],
            }
    return Comparison([results[p] for p in pairs], n_clusters, notes)
