"""The paper's bound study: on random clusters, every estimator's bound against the exact error.

For each cluster size and trial, ``size`` distinct matrices are drawn at random, the exact best
rank-r error e_r(S) is computed from the SVD of their concatenation, and each estimator bounds
the same cluster, fed in the order the greedy driver would feed it (:func:`feeding_order`):

    weyl                  Weyl's bound (the paper's max-norm), norm order
    residual_norm         incremental residuals (the paper's residuals), norm order
    residual_residual     incremental residuals, residual order
    incremental_norm      incremental truncated SVD (the paper's approximate), norm order
    incremental_residual  incremental truncated SVD, residual order

('norm': the seed, then ascending norm; 'residual': the seed, then ascending residual against
the seed's top-r basis.) Every bound must be >= the exact error (docs/algorithms.md); a bound below
it is a *violation*. Pure computation over a MatrixSource; rendering lives in the CLI.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from matclust import defaults
from matclust.driver import feeding_order
from matclust.engine import make_estimator
from matclust.engine.exact import exact_error
from matclust.engine.linalg import at_common_scale
from matclust.errors import InputError, MissingExtraError
from matclust.sources.cache import CachedReader

#: The estimator columns, in CSV order: (column, method, order).
ESTIMATORS = (
    ("weyl", "weyl", "norm"),
    ("residual_norm", "residual", "norm"),
    ("residual_residual", "residual", "residual"),
    ("incremental_norm", "incremental", "norm"),
    ("incremental_residual", "incremental", "residual"),
)
ESTIMATOR_NAMES = tuple(name for name, _, _ in ESTIMATORS)
#: The CSV header: the issue's columns, then the seconds each estimator (and the exact SVD) took.
#: Written into the bound study's PNG (its "Software" text).
PLOT_MARK = "matclust bounds"
COLUMNS = ("size", "trial", "true_error", *ESTIMATOR_NAMES,
           *(f"{name}_seconds" for name in ESTIMATOR_NAMES), "exact_seconds")
#: A bound counts as a violation when it is below the exact error by more than this (absolute);
#: the exact error itself is only accurate to ~1e-15.
VIOLATION_TOL = 1e-12


def parse_sizes(text: str) -> list[int]:
    """'A:B[:STEP]' -> [A, A+STEP, ..., <= B] (B included when reached); 'A' -> [A]."""
    parts = str(text).split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--sizes '{text}': expected A:B[:STEP] with integers") from None
    if len(nums) == 1:
        nums = [nums[0], nums[0], 1]
    elif len(nums) == 2:
        nums.append(1)
    if len(nums) != 3:
        raise InputError(f"--sizes '{text}': expected A:B[:STEP]")
    a, b, step = nums
    if a < 1 or b < a or step < 1:
        raise InputError(f"--sizes '{text}': need 1 <= A <= B and STEP >= 1")
    return list(range(a, b + 1, step))


@dataclass
class StudyResult:
    """Rows (one dict per cluster, keys = COLUMNS) and the summary per estimator."""

    rows: list[dict]
    rank: int
    params: dict = field(default_factory=dict)

    @property
    def violations(self) -> int:
        return sum(s["violations"] for s in self.summary())

    def summary(self) -> list[dict]:
        """Per estimator: mean bound, mean true error, mean (bound - true), mean bound / true
        (over clusters with true error > 0), the largest shortfall and violations, seconds."""
        true = np.array([r["true_error"] for r in self.rows])
        out = []
        for name in ESTIMATOR_NAMES:
            bound = np.array([r[name] for r in self.rows])
            gap = bound - true
            positive = true > 0
            out.append({
                "estimator": name,
                "mean_bound": float(bound.mean()) if len(bound) else 0.0,
                "mean_true_error": float(true.mean()) if len(true) else 0.0,
                "mean_gap": float(gap.mean()) if len(gap) else 0.0,
                "mean_ratio": float(np.mean(bound[positive] / true[positive]))
                if positive.any() else 1.0,
                "min_gap": float(gap.min()) if len(gap) else 0.0,
                "violations": int(np.count_nonzero(gap < -VIOLATION_TOL)),
                "seconds": float(sum(r[f"{name}_seconds"] for r in self.rows)),
            })
        return out

    def tightest(self) -> str:
        """The estimator with the smallest mean bound (all bound the same clusters)."""
        return min(self.summary(), key=lambda s: s["mean_bound"])["estimator"]

    def write_csv(self, path) -> None:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def bound_study(source, rank: int, sizes, trials: int, seed: int = defaults.SEED,
                oversampling: int = defaults.OVERSAMPLING,
                progress: Callable[[int], None] | None = None, estimator_factory=None,
                memory_limit: int = 256 * 2**20) -> StudyResult:
    """Run the study over a MatrixSource.

    Parameters
    ----------
    source : MatrixSource
    rank : int
    sizes : iterable of int
        Cluster sizes (each <= K).
    trials : int
        Random clusters per size.
    seed : int
        Seed of ``numpy.random.default_rng``; each trial draws ``size`` distinct indices.
    progress : callable(int), optional
        Called with 1 after each cluster.
    estimator_factory : callable(method, rank, m, complex, oversampling), optional
        Replaces :func:`matclust.engine.make_estimator` (tests use it to break a bound).
    memory_limit : int
        Bytes of matrix data kept cached between trials (the chunks read from disk).
    """
    sizes = [int(s) for s in sizes]
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise InputError(f"--rank must be an integer >= 1, got {rank!r}")
    if trials < 1:
        raise InputError(f"--trials must be >= 1, got {trials}")
    if not sizes:
        raise InputError("no cluster sizes given")
    if max(sizes) > source.K:
        raise InputError(f"{source.where}: cluster size {max(sizes)} exceeds the number of "
                         f"matrices (K = {source.K})")
    factory = estimator_factory or make_estimator
    cplx = source.dtype.kind == "c"
    estimators = {name: factory(method, rank, source.m, cplx, oversampling)
                  for name, method, _ in ESTIMATORS}
    from matclust import limits

    study_plan = limits.plan_or_refuse(f"{source.where}: the bound study of {source.K} matrices",
                                       memory_limit, source.K, 0)
    reader = CachedReader(source, study_plan.cache)
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        for trial in range(trials):
            indices = np.sort(rng.choice(source.K, size=size, replace=False))
            # One power of two for the cluster: its errors and bounds hold at any magnitude.
            blocks = at_common_scale(reader.get(indices).blocks())
            started = time.perf_counter()
            row = {"size": size, "trial": trial, "true_error": exact_error(blocks, rank)}
            exact_seconds = time.perf_counter() - started
            orders = {order: feeding_order(blocks, rank, order) for order in ("norm", "residual")}
            timings = {}
            for name, _, order in ESTIMATORS:
                fed = [blocks[i] for i in orders[order]]
                started = time.perf_counter()
                row[name] = float(estimators[name].bound_of(fed))
                timings[f"{name}_seconds"] = time.perf_counter() - started
            row.update(timings)
            row["exact_seconds"] = exact_seconds
            rows.append(row)
            if progress:
                progress(1)
    params = {"input": source.path, "dataset": source.dataset, "rank": int(rank),
              "sizes": sizes, "trials": int(trials), "seed": int(seed),
              "oversampling": int(oversampling)}
    return StudyResult(rows, int(rank), params)


# ---------------------------------------------------------------------------------------------
# The figure (matplotlib: the optional extra 'plot')
# ---------------------------------------------------------------------------------------------
LABELS = {
    "weyl": "Weyl (max-norm)",
    "residual_norm": "residual, norm order",
    "residual_residual": "residual, residual order",
    "incremental_norm": "incremental, norm order",
    "incremental_residual": "incremental, residual order",
}
STYLES = {
    "weyl": ("tab:red", "v", ":"),
    "residual_norm": ("tab:orange", "s", "--"),
    "residual_residual": ("tab:orange", "s", "-"),
    "incremental_norm": ("tab:blue", "o", "--"),
    "incremental_residual": ("tab:blue", "o", "-"),
}


def require_matplotlib():
    """The matplotlib Figure class, or MissingExtraError naming the extra 'plot'."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError("matplotlib", "plot", "--plot") from None
    return Figure


def plot_study(result: StudyResult, path, title: str | None = None) -> None:
    """Left: the true error against cluster size with every estimator's bound (means over the
    trials; the grey band is the true error's range). Right: how far above the true error each
    bound lies (mean of bound - true error, log scale; a violation would be negative)."""
    Figure = require_matplotlib()
    sizes = sorted({r["size"] for r in result.rows})
    by_size = {s: [r for r in result.rows if r["size"] == s] for s in sizes}

    def mean(key):
        return [float(np.mean([r[key] for r in by_size[s]])) for s in sizes]

    def mean_gap(key):
        return [max(float(np.mean([r[key] - r["true_error"] for r in by_size[s]])), 1e-16)
                for s in sizes]

    fig = Figure(figsize=(10.0, 4.4), dpi=90)
    ax, gap_ax = fig.subplots(1, 2)
    handles = []
    for name in ESTIMATOR_NAMES:
        color, marker, style = STYLES[name]
        z = 4 if name == "weyl" else 3  # Weyl often coincides with residual: draw it on top
        (line,) = ax.plot(sizes, mean(name), linestyle=style, marker=marker, markersize=4,
                          color=color, linewidth=1.4, label=f"{LABELS[name]} bound", zorder=z)
        gap_ax.plot(sizes, mean_gap(name), linestyle=style, marker=marker, markersize=4,
                    color=color, linewidth=1.4, zorder=z)
        handles.append(line)
    lo = [min(r["true_error"] for r in by_size[s]) for s in sizes]
    hi = [max(r["true_error"] for r in by_size[s]) for s in sizes]
    ax.fill_between(sizes, lo, hi, color="black", alpha=0.12, linewidth=0)
    (true_line,) = ax.plot(sizes, mean("true_error"), color="black", linewidth=2.2, marker="o",
                           markersize=4, label="true error $e_r(S)$ (SVD)", zorder=5)
    handles.append(true_line)
    ax.set_xlabel("cluster size (matrices)")
    ax.set_ylabel("relative error (mean over trials)")
    ax.set_ylim(0, 1.02)
    ax.set_title("true error and bounds", fontsize=10)
    gap_ax.set_yscale("log")
    gap_ax.set_xlabel("cluster size (matrices)")
    gap_ax.set_ylabel("bound - true error (mean)")
    gap_ax.set_title("looseness of each bound (lower is tighter)", fontsize=10)
    for a in (ax, gap_ax):
        a.grid(True, alpha=0.3)
    trials = result.params.get("trials", "?")
    fig.suptitle(title or f"Bound study: rank {result.rank}, {len(result.rows)} random clusters "
                          f"({trials} per size), {result.violations} violations", fontsize=11)
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    # The mark lets --overwrite tell a plot matclust wrote from a picture of the user's.
    fig.savefig(path, format="png", metadata={"Software": PLOT_MARK})
