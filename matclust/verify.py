"""Checking and reading back a result store: ``verify`` and ``reconstruct``.

``verify`` runs in two stages:

(a) structural checks of the store (:func:`check_structure_v1` for the matclust/1 layout): every
    attribute and array that ``reconstruct``, ``inspect`` or a plain h5py/zarr reader relies
    on, with one message per inconsistency. What they learn about each cluster is kept in flat
    per-cluster arrays (:class:`StoreLayout`), never as per-cluster objects, so a store of a
    million clusters costs a few bytes per cluster;
(b) one sequential pass over the input that compares every matrix with what its cluster stores
    (:func:`compare_with_input`), reading the stored columns piece by piece within a budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from matclust import defaults
from matclust.engine.linalg import (ScaledSums, as_compute, column_norms2, column_ranges, peak,
                                    peak_exponents, relative_errors, sqnorm, sqnorm_scaled,
                                    times_power2)
from matclust.errors import InputError
from matclust import limits
from matclust.limits import verify_plan
from matclust.store import ResultStore
from matclust.streaming import cluster_parts

#: Squared norms for which error_terms keeps the unscaled sums.
PLAIN_RANGE = (2.0**-800, 2.0**800)

#: Orthonormality tolerance of a stored basis, in units of its precision's machine epsilon.
ORTHO_ULPS = 1e3

#: Keys ``params`` must hold: what reconstruct, verify and inspect read from it.
REQUIRED_PARAMS = ("method", "order", "rank", "eps", "patience", "input", "dataset", "transpose")
#: Keys of the report that inspect shows and that must agree with the arrays.
REQUIRED_REPORT = ("K", "m", "clusters", "singletons", "compression_ratio", "max_error",
                   "cluster_stats")
#: The dtypes a store holds its numbers in (the input's precision; see docs/design.md).
STORED_DTYPES = tuple(np.dtype(d) for d in ("float32", "float64", "complex64", "complex128"))

#: Messages kept per store: a store broken everywhere is summarised, not listed in full.
MAX_PROBLEMS = 50

#: How a cluster is stored, in :attr:`StoreLayout.kind`.
BROKEN, FACTORED, RAW = 0, 1, 2


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


class Problems(list):
    """The inconsistencies found, one message each; beyond MAX_PROBLEMS only counted."""

    def __init__(self):
        super().__init__()
        self.dropped = 0

    def add(self, message: str) -> None:
        if len(self) < MAX_PROBLEMS:
            self.append(message)
        else:
            self.dropped += 1

    def messages(self) -> list[str]:
        more = [f"... and {self.dropped} more inconsistencies"] if self.dropped else []
        return list(self) + more


@dataclass
class StoreLayout:
    """What the structural checks established, per cluster in flat arrays.

    ``kind[c]`` is FACTORED, RAW or BROKEN (unusable: never decoded); ``ascending[c]`` whether
    its members are in ascending index order; ``col_offset[i]`` the first column of matrix i in
    its cluster's stored array; ``labels`` the store's labels with -1 for matrices whose cluster
    is broken; ``m`` the row count (None when undetermined), ``dtypes`` the stored dtypes;
    ``params_ok`` whether params holds every key with a usable value."""

    kind: np.ndarray
    ascending: np.ndarray
    col_offset: np.ndarray
    labels: np.ndarray
    m: int | None
    dtypes: list[np.dtype]
    params_ok: bool


def check_structure_v1(store: ResultStore, problems: Problems, progress=None) -> StoreLayout | None:
    """Structural checks of a matclust/1 store, without the input: attributes, labels, widths,
    names, then every cluster (members, labels, shapes, dtypes, orthonormal bases), then the
    report against the arrays. Appends one message per inconsistency to ``problems``.

    Returns the layout, or None when the store is too broken to look at its clusters (no usable
    labels, widths or params)."""
    where = store.path
    params, report = store.params, store.report
    before = len(problems) + problems.dropped
    if params is None:
        problems.add(f"{where}: attribute 'params' is missing or not a JSON object")
    else:
        missing = [k for k in REQUIRED_PARAMS if k not in params]
        if missing:
            problems.add(f"{where}: params lacks {', '.join(missing)}")
    rank = params.get("rank") if params else None
    if params and "rank" in params and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        problems.add(f"{where}: params rank is {rank!r}, not an integer >= 1")
        rank = None
    eps = params.get("eps") if params else None
    if params and "eps" in params and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                                       or not 0 < eps < 1):
        problems.add(f"{where}: params eps is {eps!r}, not a number in (0, 1)")
    params_ok = len(problems) + problems.dropped == before
    if report is None:
        problems.add(f"{where}: attribute 'report' is missing or not a JSON object")
    elif any(k not in report for k in REQUIRED_REPORT):
        problems.add(f"{where}: report lacks "
                     f"{', '.join(k for k in REQUIRED_REPORT if k not in report)}")
        report = None

    labels, widths = store.labels, store.widths
    if labels is None:
        problems.add(f"{where}: 'labels' is missing or not a 1-D integer array")
    if widths is None:
        problems.add(f"{where}: 'widths' is missing or not a 1-D integer array")
    if labels is None or widths is None or not isinstance(rank, int):
        return None
    K = len(labels)
    if len(widths) != K:
        problems.add(f"{where}: 'widths' has {len(widths)} entries for {K} labels")
        return None
    if K and widths.min() < 1:
        problems.add(f"{where}: 'widths' has an entry {int(widths.min())} < 1 "
                     f"(matrix {int(np.argmin(widths))})")
        return None
    if store.names is not None and len(store.names) != K:
        problems.add(f"{where}: 'names' has {len(store.names)} entries for {K} labels")

    names = store.cluster_names()
    C = len(names)
    expected_names = {str(c) for c in range(C)}
    if set(names) != expected_names:
        odd = sorted(set(names) - expected_names)[:3]
        problems.add(f"{where}: clusters are not numbered 0..{C - 1} (found {', '.join(odd)})")
    bad = np.flatnonzero((labels < 0) | (labels >= C))
    if len(bad):
        problems.add(f"{where}: labels[{bad[0]}] = {labels[bad[0]]} is not a cluster id "
                     f"0..{C - 1} ({len(bad)} such labels)")

    kind = np.zeros(C, dtype=np.int8)
    ascending = np.zeros(C, dtype=bool)
    col_offset = np.zeros(K, dtype=np.int64)
    seen = np.zeros(K, dtype=np.int32)
    ranks = np.full(C, -1, dtype=np.int64)
    sizes = np.zeros(C, dtype=np.int64)
    columns = np.zeros(C, dtype=np.int64)
    rows: set[int] = set()
    dtypes: set[np.dtype] = set()
    if progress:
        progress.start("checking", C)
    for c in range(C):
        prefix = f"clusters/{c}"
        members = _members(store, prefix, K, problems)
        if members is not None:
            seen[members] += 1
            sizes[c] = len(members)
            disagree = np.flatnonzero(labels[members] != c)
            if len(disagree):
                i = members[disagree[0]]
                problems.add(f"{prefix}: member {i} has label {labels[i]}, not {c}")
            else:
                w = widths[members]
                columns[c] = int(w.sum())
                col_offset[members] = np.cumsum(w) - w
                ascending[c] = bool(np.all(np.diff(members) > 0))
                kind[c], ranks[c] = _stored_arrays(store, prefix, rank, int(columns[c]), problems,
                                                   rows, dtypes)
        if progress:
            progress.advance(1)
    if len(rows) > 1:
        problems.add(f"{where}: clusters have different row counts {sorted(rows)}")
    missing, repeated = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
    if len(missing):
        problems.add(f"{where}: {len(missing)} input matrices are in no cluster "
                     f"(first: {missing[0]})")
    if len(repeated):
        problems.add(f"{where}: {len(repeated)} input matrices are in several clusters "
                     f"(first: {repeated[0]})")
    m = next(iter(rows)) if len(rows) == 1 else None
    if report is not None:
        _check_report(where, report, K, m, C, sizes, columns, ranks, kind, problems)
    usable = np.where((labels >= 0) & (labels < C), labels, 0)
    return StoreLayout(kind, ascending, col_offset,
                       np.where((labels >= 0) & (labels < C) & (kind[usable] != BROKEN), labels, -1),
                       m, sorted(dtypes, key=str), params_ok)


def _members(store, prefix, K, problems):
    """The members of a cluster, or None (with a message) when they are unusable."""
    handle = store.array(f"{prefix}/members")
    if handle is None:
        problems.add(f"{prefix}: no 'members' array")
        return None
    if handle.ndim != 1 or np.dtype(handle.dtype).kind not in "iu":
        problems.add(f"{prefix}/members: {handle.dtype} of shape {handle.shape}, "
                     f"not a 1-D integer array")
        return None
    members = np.asarray(handle[...], dtype=np.int64)
    if len(members) == 0:
        problems.add(f"{prefix}/members: empty")
        return None
    out = np.flatnonzero((members < 0) | (members >= K))
    if len(out):
        problems.add(f"{prefix}/members: index {members[out[0]]} out of range 0..{K - 1}")
        return None
    if len(np.unique(members)) != len(members):
        problems.add(f"{prefix}/members: an index appears twice")
        return None
    return members


def _stored_arrays(store, prefix, rank, n_columns, problems, rows: set, dtypes: set):
    """(kind, rank of the basis) of a cluster after checking its stored arrays' shapes and
    dtypes, and its basis's orthonormality; kind BROKEN (with a message) when unusable."""
    basis, coeffs, raw = (store.array(f"{prefix}/{key}") for key in ("basis", "coefficients", "raw"))
    present = [a for a in (basis, coeffs, raw) if a is not None]
    for arr, key in ((basis, "basis"), (coeffs, "coefficients"), (raw, "raw")):
        if arr is not None and (arr.ndim != 2 or np.dtype(arr.dtype) not in STORED_DTYPES):
            problems.add(f"{prefix}/{key}: {arr.dtype} of shape {arr.shape}, not a 2-D "
                         f"array of {', '.join(str(d) for d in STORED_DTYPES)}")
            return BROKEN, -1
    dtypes.update(np.dtype(a.dtype) for a in present)
    if raw is not None and basis is None and coeffs is None:
        rows.add(raw.shape[0])
        if raw.shape[1] != n_columns:
            problems.add(f"{prefix}/raw: {raw.shape[1]} columns, but its members' widths "
                         f"add up to {n_columns}")
            return BROKEN, -1
        return RAW, 0
    if basis is None or coeffs is None or raw is not None:
        problems.add(f"{prefix}: holds {', '.join(k for k, a in (('basis', basis), ('coefficients', coeffs), ('raw', raw)) if a is not None) or 'nothing'}; "
                     f"expected basis and coefficients, or raw")
        return BROKEN, -1
    m, r = basis.shape
    rows.add(m)
    if not 1 <= r <= min(rank, m):
        problems.add(f"{prefix}/basis: {r} columns, not 1..{min(rank, m)} (rank {rank}, {m} rows)")
        return BROKEN, -1
    if coeffs.shape != (r, n_columns):
        problems.add(f"{prefix}/coefficients: shape {coeffs.shape}, but the basis has {r} "
                     f"columns and the members' widths add up to {n_columns}")
        return BROKEN, -1
    u = as_compute(np.asarray(basis[...]))
    gram = u.conj().T @ u
    if not np.abs(gram - np.eye(r)).max(initial=0.0) <= ORTHO_ULPS * np.finfo(basis.dtype).eps:
        problems.add(f"{prefix}/basis: columns are not orthonormal")
        return BROKEN, -1
    return FACTORED, r


def _check_report(where, report, K, m, C, sizes, columns, ranks, kind, problems) -> None:
    """The report's headline numbers and cluster_stats against the arrays."""
    for key, actual in (("K", K), ("m", m), ("clusters", C)):
        if actual is not None and report[key] != actual:
            problems.add(f"{where}: report says {key} = {report[key]!r}, the arrays {actual}")
    stats = report["cluster_stats"]
    if not isinstance(stats, list) or len(stats) != C:
        problems.add(f"{where}: report has {len(stats) if isinstance(stats, list) else 'no'} "
                     f"cluster_stats for {C} clusters")
        return
    for c, s in enumerate(stats):
        if not isinstance(s, dict):
            problems.add(f"{where}: report cluster_stats[{c}] is not an object")
            continue
        if kind[c] == BROKEN:
            continue
        stored = "factored" if kind[c] == FACTORED else "raw"
        for key, actual in (("size", sizes[c]), ("columns", columns[c]), ("rank", ranks[c]),
                            ("stored", stored)):
            if s.get(key) != actual:
                problems.add(f"{where}: report cluster_stats[{c}] {key} = {s.get(key)!r}, "
                             f"cluster {c} has {actual}")
    singletons = int(np.count_nonzero(sizes == 1))
    if report["singletons"] != singletons:
        problems.add(f"{where}: report says singletons = {report['singletons']!r}, "
                     f"the arrays {singletons}")


def check_against_input(store: ResultStore, layout: StoreLayout, src, problems: Problems) -> None:
    """What the store must share with the input it was made from: K, m, widths, dtype."""
    where = store.path
    if len(store.labels) != src.K:
        problems.add(f"{where}: has {len(store.labels)} labels but the input {src.where} has "
                     f"{src.K} matrices")
        return
    differ = np.flatnonzero(store.widths != src.widths)
    if len(differ):
        i = differ[0]
        problems.add(f"{where}: widths[{i}] = {store.widths[i]} but matrix {i} of {src.where} "
                     f"has {src.widths[i]} columns ({len(differ)} widths differ)")
    if layout.m is not None and layout.m != src.m:
        problems.add(f"{where}: clusters have {layout.m} rows, the input's matrices {src.m}")
    # The input's storage precision or wider (integers too large for float32 are kept exact).
    for dtype in layout.dtypes:
        if not np.can_cast(src.storage_dtype, dtype, "safe"):
            problems.add(f"{where}: clusters are stored as {dtype}, less precise than the "
                         f"{src.storage_dtype} that input of dtype {src.input_dtype} needs")


def verify_store(path, input_path=None, dataset=None, memory_limit: int = defaults.MEMORY_LIMIT,
                 progress=None, fill_missing: bool | None = None) -> dict:
    """Check the store's structure, then recompute every cluster's error from the input.

    ``fill_missing``: read missing chunks as the fill value (default: as the store's run did).

    Returns a dict with ``ok`` (every cluster within eps and no structural problem),
    ``max_error``, ``over_eps`` (cluster ids), ``problems`` (descriptions) and ``errors``.
    """
    with ResultStore(path, strict=False) as store:
        if store.params is None:  # nothing says what to verify against: bad input, not a verdict
            store._json_attr("params", strict=True)
        params = store.params or {}
        if fill_missing is None:  # as the run that wrote the store read its input
            fill_missing = bool(params.get("fill_missing", False))
        if store.compact is not None:
            try:
                eps, recorded_input = float(params["eps"]), params["input"]
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{path}: damaged result store: its params lack a valid "
                                 f"{exc if isinstance(exc, KeyError) else 'eps'}") from None
            from matclust.append import open_inputs  # every input an append recorded

            with open_inputs({**params, "input": recorded_input}, len(store.labels), input_path,
                             dataset, fill_missing, path) as src:
                return _verify_compact(store, src, eps, params.get("guarantee", "cluster"),
                                       progress)
        if store.labels is not None:  # refuse a limit too small before any work
            verify_plan(memory_limit, len(store.labels), store.n_clusters)
        problems = Problems()
        layout = check_structure_v1(store, problems, progress)
        if layout is None or not layout.params_ok:
            return _verdict(store, None, None, problems)
        from matclust.append import open_inputs  # every input an append recorded

        with open_inputs(params, len(store.labels), input_path, dataset, fill_missing,
                         path) as src:
            found = len(problems)
            check_against_input(store, layout, src, problems)
            if len(problems) > found:  # the arrays do not line up with the input
                return _verdict(store, None, None, problems)
            guarantee = params.get("guarantee", "cluster")
            errors, matrix_errors = compare_with_input(store, layout, src, memory_limit,
                                                       progress, guarantee == "matrix")
        return _verdict(store, errors, float(params["eps"]), problems, guarantee, matrix_errors)


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
    matrix_errors = relative_errors(err2, norm2)
    # Cluster errors: every member's sums brought to the cluster's largest scale.
    C = store.n_clusters
    top = np.full(C, np.iinfo(np.int64).min)
    labels = np.clip(store.labels, 0, max(C - 1, 0))
    np.maximum.at(top, labels, shift)
    e2 = np.zeros(C)
    n2 = np.zeros(C)
    np.add.at(e2, labels, np.ldexp(err2, 2 * (shift - top[labels])))
    np.add.at(n2, labels, np.ldexp(norm2, 2 * (shift - top[labels])))
    cluster_errors = relative_errors(e2, n2)
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
    a_s, d_s = times_power2(a, -s), times_power2(decoded, -s)
    return s, sqnorm(a_s - d_s), sqnorm(a_s)


def _verdict(store, errors, eps, problems: Problems, guarantee: str | None = None,
             matrix_errors: np.ndarray | None = None) -> dict:
    """The verdict on a plain store: under the matrix guarantee (with ``matrix_errors``)
    ``over_eps`` lists matrices, under the cluster guarantee clusters, as for compact ones."""
    guarantee = guarantee or (store.params or {}).get("guarantee", "cluster")
    checked = matrix_errors if guarantee == "matrix" and matrix_errors is not None else errors
    over = [] if checked is None else [int(c) for c, e in enumerate(checked) if not e <= eps]
    finite = [] if errors is None else [e for e in errors if np.isfinite(e)]
    verdict = {
        "ok": errors is not None and not over and not problems,
        "clusters": store.n_clusters,
        "eps": eps if eps is not None else (store.params or {}).get("eps"),
        "guarantee": guarantee,
        "max_error": max(finite, default=0.0),
        "over_eps": over,
        "problems": problems.messages(),
        "errors": None if errors is None else [e if np.isfinite(e) else None for e in errors],
    }
    if matrix_errors is not None and len(matrix_errors):
        worst = int(np.argmax(np.where(np.isnan(matrix_errors), np.inf, matrix_errors)))
        verdict["max_matrix_error"] = float(matrix_errors[worst])
        verdict["worst_matrix"] = worst
    return verdict


def compare_with_input(store: ResultStore, layout: StoreLayout, src, memory_limit: int,
                       progress=None, per_matrix: bool = False):
    """One sequential pass over the input: every cluster's relative error as stored, summed as
    (fraction, exponent) pairs so that no magnitude under- or overflows (see error_terms), and
    with ``per_matrix`` every matrix's (else None)."""
    C = len(layout.kind)
    err2, norm2 = ScaledSums(C), ScaledSums(C)
    matrix_errors = np.full(src.K, np.nan) if per_matrix else None
    budget = verify_plan(memory_limit, src.K, C)
    cache = _StoredColumns(store, layout, budget.cache)
    for c, part in cluster_parts(src, layout.labels, progress, "verifying", budget.batch):
        if c < 0:
            continue
        cols = column_ranges(layout.col_offset[part.indices], np.diff(part.offsets))
        basis, stored = cache.numbers(c, cols)
        part_err2, part_norm2 = error_terms(part.data, basis, stored)
        err2.add(c, *part_err2)
        norm2.add(c, *part_norm2)
        if per_matrix:
            matrix_errors[part.indices] = _matrix_errors(part, basis, stored)
    # An all-zero cluster: 0, or infinite if anything non-zero is stored for it.
    return [err2.sqrt_ratio(c, norm2) for c in range(C)], matrix_errors


def _matrix_errors(part, basis, stored) -> np.ndarray:
    """The relative error of every matrix of ``part`` against its stored columns: from plain
    sums where they are safely in range, else with error_terms' exact rescaling."""
    with np.errstate(all="ignore"):
        err2 = part.reduce_columns(column_norms2(as_compute(part.data)
                                                 - cluster_columns(basis, stored)))
        norm2 = part.reduce_columns(column_norms2(part.data))
    rel = relative_errors(err2, norm2)
    plain = (norm2 >= PLAIN_RANGE[0]) & (norm2 <= PLAIN_RANGE[1]) & np.isfinite(err2)
    for j in np.flatnonzero(~plain):
        lo, hi = part.offsets[j], part.offsets[j + 1]
        (e, e_exp), (n, n_exp) = error_terms(part.data[:, lo:hi], basis, stored[:, lo:hi])
        sums_err, sums_norm = ScaledSums(1), ScaledSums(1)
        sums_err.add(0, e, e_exp)
        sums_norm.add(0, n, n_exp)
        rel[j] = sums_err.sqrt_ratio(0, sums_norm)
    return rel


class _StoredColumns:
    """A cluster's stored columns, expanded, for given column positions.

    Members in ascending order (out-of-core stores) occupy one contiguous slice per input
    batch, which is read directly; otherwise the cluster's whole array is read once and kept in
    an LRU cache bounded by ``budget_bytes`` (a larger one is read a slice at a time). Bases are
    kept in the same cache.
    """

    def __init__(self, store: ResultStore, layout: StoreLayout, budget_bytes: int):
        self.store, self.layout = store, layout
        self.budget = budget_bytes
        self._held: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0

    def numbers(self, c: int, cols: np.ndarray):
        """(basis or None, the stored numbers of the columns ``cols``)."""
        factored = self.layout.kind[c] == FACTORED
        name = f"clusters/{c}/{'coefficients' if factored else 'raw'}"
        handle = self.store.array(name)
        lo, hi = int(cols.min()), int(cols.max()) + 1
        whole = handle.shape[0] * handle.shape[1] * np.dtype(handle.dtype).itemsize
        if not self.layout.ascending[c] and whole <= self.budget // 4:
            stored = self._cached(name, handle)[:, cols]
        else:  # the span these columns cover (contiguous for ascending members)
            stored = np.asarray(handle[:, lo:hi])[:, cols - lo]
        basis = self._cached(f"clusters/{c}/basis", self.store.array(f"clusters/{c}/basis")) \
            if factored else None
        return basis, stored

    def _cached(self, name: str, handle) -> np.ndarray:
        hit = self._held.get(name)
        if hit is not None:
            self._held.move_to_end(name)
            return hit
        arr = np.asarray(handle[...])
        while self._held and self._bytes + arr.nbytes > self.budget:
            _, old = self._held.popitem(last=False)
            self._bytes -= old.nbytes
        self._held[name] = arr
        self._bytes += arr.nbytes
        return arr


def reconstruct(path, indices=None, memory_limit: int = defaults.MEMORY_LIMIT):
    """(index, matrix) pairs for the requested input indices (all by default), in that order,
    undoing --transpose; with the store's names and params. Each cluster is read once.

    The matrices are returned together: ``memory_limit`` is checked against their size (and
    the per-matrix bookkeeping) before any is decoded."""
    with ResultStore(path) as store:
        K = len(store.labels)
        bad = [i for i in indices or () if not 0 <= i < K]  # before numpy: any int may come
        if bad:
            raise InputError(f"{path}: index {bad[0]} out of range (the store holds K = {K})")
        needed = reconstruct_bytes(store, indices)

        def fits(limit):
            return limits.plan(limit, len(store.labels), store.n_clusters, needed) is not None

        if not fits(memory_limit):
            raise limits.refuse(f"{path}: rebuilding {needed / 2**20:.0f} MiB of matrices",
                                memory_limit, fits)
        problems = Problems()
        if store.compact is not None:
            problems.extend(store.compact.consistency_problems())
        else:
            check_structure_v1(store, problems)
        if problems:  # decoding would shift or mis-size matrices
            raise InputError(f"{path}: inconsistent result store ({problems[0]}); "
                             f"see matclust verify")
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


def reconstruct_bytes(store: ResultStore, indices) -> int:
    """Memory the rebuilt matrices take at once: held twice (decoded, then stacked for
    writing), at 8 bytes a number (double precision, the widest real storage)."""
    widths = store.widths if not indices else store.widths[np.asarray(indices, dtype=np.int64) % len(store.widths)]
    m = int(store.report.get("m", 1)) if store.report else 1
    return 2 * 8 * m * int(widths.sum())
