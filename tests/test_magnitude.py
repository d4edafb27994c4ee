"""The guarantee holds at every magnitude: results do not depend on a global scale of the input.

A planted collection x is clustered as it is and as s * x for scales s across each dtype's
range (1e-300 .. 1e300 and subnormal 1e-310 in double precision; powers of two as well as
powers of ten), in memory and out of core. For every run:

* the labels equal those of x (powers of two are exact, so the working data are identical;
  for powers of ten the planted clusters are far from any tie);
* the store honours the contract when checked by conftest's independent oracle on the
  *rescaled* store (collection and stored coefficients / raw columns multiplied by the one
  power of two that brings the collection's largest entry near 1, exactly, by numpy): every
  error <= eps, reported errors equal to the recomputed ones (never below), bounds >= e_r;
* ``verify`` accepts it, and catches a store tampered at that magnitude;
* no warning is raised (warnings are errors while matclust runs here; a few runs in a
  subprocess also show stderr empty).
"""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
from conftest import (PAPER, best_error, check_partition, check_stored_dtypes, decode_compact,
                      read_store, run_inprocess, run_matclust, sq, tamper_coefficient, wide)
from test_out_of_core import largest_first

from matclust.collections_io import write_collection
from matclust.sample import planted_collection

RANK, EPS = 2, 0.1
K, M, N = 40, 8, 3

#: Scales per dtype: every one leaves each entry of the planted collection a finite normal number
#: (checked in `scaled`), except 1e-310, which makes double precision entries subnormal.
SCALES = {
    "float64": [1e-300, 1e-165, 1e-40, 1e40, 1e165, 1e300, 2.0**-1000, 2.0**1000, 1e-310],
    "complex128": [1e-300, 1e-165, 1e-40, 1e40, 1e165, 1e300, 2.0**-1000, 1e-310],
    "float32": [1e-30, 1e30, 2.0**-100, 2.0**100, "max"],
    "complex64": [1e-30, 1e30, 2.0**-90, "max"],
    "float16": [2.0**3, 2.0**10],
    "int32": [3, 1000],
    "int64": [1000, 10**12],
}
MODES = ("in-memory", "out-of-core")


def rescaled(a: np.ndarray, exponent: int) -> np.ndarray:
    """a * 2**exponent in a's own dtype (exact for these arrays), by numpy alone."""
    a = np.asarray(a)
    if np.iscomplexobj(a):
        return (np.ldexp(a.real, exponent) + 1j * np.ldexp(a.imag, exponent)).astype(a.dtype)
    return np.ldexp(a, exponent)


def peak(mats) -> float:
    return max(float(np.abs(wide(a)).max()) for a in mats)


def scaled(base: np.ndarray, dtype: str, scale) -> np.ndarray:
    """s * base in ``dtype``; ``"max"``: the largest entry just below the dtype's largest."""
    info = np.finfo(dtype) if np.dtype(dtype).kind in "fc" else None
    if scale == "max":
        scale = 0.97 * float(info.max) / peak(base)
    if info is None:  # integers: an exact integer multiple
        return base * np.asarray(scale, dtype=dtype)
    with np.errstate(under="ignore"):
        out = (wide(base) * scale).astype(dtype)
    nonzero = np.abs(wide(out))[wide(base) != 0]
    assert np.isfinite(nonzero).all() and nonzero.min() > 0, f"{dtype} x {scale} unrepresentable"
    if scale != 1e-310:  # the planted data stay normal numbers (1e-310: subnormal on purpose)
        assert nonzero.min() >= info.tiny, f"{dtype} x {scale}: subnormal entries"
    return out


def quietly(*args, check=None):
    """The CLI in this process with every warning an error: a RuntimeWarning fails the run."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return run_inprocess(*args, check=check)


def cluster(path, mode, *extra, encoding=PAPER):
    """The paper's layout by default (its arrays are checked here); ``encoding=()`` for the
    default compact one."""
    out = f"{path}.out.h5"
    res = quietly("cluster", *encoding, path, "-o", out, "--rank", RANK, "--eps", EPS, "--mode",
                  mode, "--json", *extra)
    assert res.returncode == 0 and res.stderr == "", res
    return out


def check_at_one(store_path, mats, input_dtype):
    """conftest's contract check on the store and the collection, both rescaled by the power of
    two that brings the collection's largest entry to [1/2, 1). Returns the store and errors."""
    st = read_store(store_path)
    e = int(np.frexp(peak(mats))[1])
    mats1 = [rescaled(wide(a), -e) for a in mats]
    clusters1 = [{k: rescaled(v, -e) if k in ("coefficients", "raw") else v for k, v in cl.items()}
                 for cl in st.clusters]
    if st.params["mode"] == "out-of-core":  # members ascending there; the oracle wants the seed first
        widths, norms = np.array([a.shape[1] for a in mats1]), np.array([sq(a) for a in mats1])
        clusters1 = [largest_first(cl, widths, norms) for cl in clusters1]
    errors = check_partition(mats1, st.labels, clusters1, st.report, rank=RANK, eps=EPS,
                             where=store_path, input_itemsize=np.dtype(input_dtype).itemsize)
    for stat, err in zip(st.report["cluster_stats"], errors):
        # what is reported is never below the truth (both from the same stored numbers)
        assert stat["error"] >= err * (1 - 1e-9), (store_path, stat, err)
    assert st.report["max_error"] >= max(errors) * (1 - 1e-9)
    check_stored_dtypes(store_path, input_dtype, st)
    return st, errors


def tamper_relative(store_path, factor=0.75) -> None:
    """Multiply every stored number of the largest cluster by ``factor``: its relative error
    grows by about 1 - factor at any magnitude (a wrong store that underflow would hide)."""
    st = read_store(store_path)
    target = max(range(len(st.clusters)), key=lambda c: len(st.clusters[c]["members"]))
    key = "coefficients" if "coefficients" in st.clusters[target] else "raw"
    with h5py.File(store_path, "r+") as f:
        ds = f[f"clusters/{target}/{key}"]
        ds[...] = ds[...] * factor


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(SCALES))
def test_results_do_not_depend_on_magnitude(tmp_path, dtype, mode):
    base, _ = planted_collection(K, M, N, 4, RANK, 0.01, dtype, None, 0, 10.0)
    ref_path = str(tmp_path / "x.h5")
    write_collection(ref_path, base, layout="stack", dataset="matrices")
    ref_store, _ = check_at_one(cluster(ref_path, mode), list(base), dtype)
    assert len(ref_store.clusters) < K // 2  # the planted structure was found: labels mean something
    for scale in SCALES[dtype]:
        x = scaled(base, dtype, scale)
        path = str(tmp_path / f"x{scale}.h5")
        write_collection(path, x, layout="stack", dataset="matrices")
        store = cluster(path, mode)
        st, errors = check_at_one(store, list(x), dtype)
        assert np.array_equal(st.labels, ref_store.labels), (dtype, mode, scale)
        assert max(errors) <= EPS
        res = quietly("verify", store, check=0)
        assert "OK" in res.stdout and res.stderr == ""
    quietly("reconstruct", store, "-o", str(tmp_path / "back.h5"), check=0)
    # verify catches a wrong store at the last (most extreme) magnitude too
    tamper_relative(store)
    res = quietly("verify", store)
    assert res.returncode == 1 and "FAILED" in res.stdout, res


def compact_errors(store_path, mats) -> np.ndarray:
    """Every matrix's relative error in a compact store, from conftest's independent decoder,
    input and decoded matrix both rescaled by the matrix's own power of two (exact)."""
    _, _, decoded = decode_compact(store_path)
    out = []
    for a, d in zip(mats, decoded):
        e = int(np.frexp(float(np.abs(wide(a)).max()))[1])
        a1, d1 = rescaled(wide(a), -e), rescaled(np.asarray(d, wide(a).dtype), -e)
        out.append(np.linalg.norm(a1 - d1) / np.linalg.norm(a1))
    return np.array(out)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float64", "complex128", "float32", "int64"])
def test_compact_results_do_not_depend_on_magnitude(tmp_path, dtype, mode):
    """The default encoding: same labels at every scale, every matrix within eps of itself
    (checked by an independent decoder at the matrix's own scale), verify accepts the store and
    catches one damaged at the most extreme scale."""
    base, _ = planted_collection(K, M, N, 4, RANK, 0.01, dtype, None, 0, 10.0)
    labels = None
    for scale in [1] + SCALES[dtype]:
        x = scaled(base, dtype, scale) if scale != 1 else base
        path = str(tmp_path / f"x{scale}.h5")
        write_collection(path, x, layout="stack", dataset="matrices")
        store = cluster(path, mode, encoding=())
        with h5py.File(store) as f:
            got = f["labels"][...]
        labels = got if labels is None else labels
        assert np.array_equal(got, labels), (dtype, mode, scale)
        assert compact_errors(store, list(x)).max() <= EPS, (dtype, mode, scale)
        res = quietly("verify", store, check=0)
        assert "OK" in res.stdout and res.stderr == ""
    import hdf5plugin  # noqa: F401  (the store's filter)

    with h5py.File(store, "r+") as f:  # a wrong code: that matrix is far off at any scale
        codes = f["codes"][...]
        codes[:8] += 40
        f["codes"][...] = codes
    res = quietly("verify", store)
    assert res.returncode == 1 and "FAILED" in res.stdout, res


@pytest.mark.parametrize("scale", [1e-300, 1e-310, 1e300])
def test_verify_catches_tampering_at_extreme_magnitudes(tmp_path, scale):
    base, _ = planted_collection(K, M, N, 4, RANK, 0.01, "float64", None, 0, 10.0)
    path = str(tmp_path / "x.h5")
    write_collection(path, base * scale, layout="stack", dataset="matrices")
    for tamper in (tamper_relative, tamper_coefficient):
        store = cluster(path, "in-memory", "--overwrite")
        quietly("verify", store, check=0)
        tamper(store)
        res = quietly("verify", store)
        assert res.returncode == 1 and "FAILED" in res.stdout, (tamper.__name__, res)


def test_matrices_far_below_the_rest_are_stored_on_their_own(tmp_path):
    """A collection mixing 1e300 and 1e-300 matrices: no single scale serves both, so the
    small ones are stored as singletons in their own scale. Every cluster's error is checked
    at its own scale (a power of two per cluster); the labels do not move when the whole
    collection is scaled by a power of two."""
    base, _ = planted_collection(K, M, N, 4, RANK, 0.01, "float64", None, 0, 10.0)
    big = np.arange(K) % 2 == 0
    mixed = np.where(big[:, None, None], base * 1e300, base * 1e-300)
    labels = None
    for shift in (0, -40):
        for mode in MODES:
            path = str(tmp_path / f"mixed{shift}{mode}.h5")
            x = rescaled(mixed, shift)
            write_collection(path, x, layout="stack", dataset="matrices")
            store = cluster(path, mode)
            st = read_store(store)
            labels = st.labels if labels is None else labels
            assert np.array_equal(st.labels, labels), (shift, mode)
            for c, cl in enumerate(st.clusters):
                members = cl["members"]
                e = int(np.frexp(peak([x[i] for i in members]))[1])
                blocks = [rescaled(wide(x[i]), -e) for i in members]
                if "raw" in cl:
                    stored = rescaled(wide(cl["raw"]), -e)
                else:
                    stored = wide(cl["basis"]) @ rescaled(wide(cl["coefficients"]), -e)
                concat = np.hstack(blocks)
                true = np.linalg.norm(concat - stored) / np.linalg.norm(concat)
                stat = st.report["cluster_stats"][c]
                assert true <= EPS and stat["error"] >= true * (1 - 1e-9), (c, true, stat)
                assert stat["bound"] >= best_error(blocks, RANK) - 1e-9
                if not big[members].all():
                    assert len(members) == 1, f"cluster {c} mixes 1e300 and 1e-300 matrices"
            # the large matrices still share clusters (only the small ones are kept apart)
            assert len(st.clusters) < K // 2 + K // 4
            quietly("verify", store, check=0)


def test_no_warning_reaches_stderr(tmp_path):
    """Every command in a subprocess at the extremes: stderr stays empty. (The runs above
    already turn any warning into a failure in-process; this shows the real stderr.)"""
    base, _ = planted_collection(K, M, N, 4, RANK, 0.01, "float64", None, 0, 10.0)
    cases = {"f64": (base / peak(base) * 1.7e308, "in-memory"),
             "f32": (scaled(base.astype(np.float32), "float32", "max"), "out-of-core")}
    for name, (x, mode) in cases.items():
        path, store = str(tmp_path / f"{name}.h5"), str(tmp_path / f"{name}-out.h5")
        write_collection(path, x, layout="stack", dataset="matrices")
        runs = [("cluster", path, "-o", store, "--rank", RANK, "--eps", EPS, "--mode", mode, "--json"),
                ("cluster", *PAPER, path, "-o", store, "--rank", RANK, "--eps", EPS, "--mode", mode,
                 "--json", "--overwrite"),
                ("verify", store, "--quiet"),
                ("reconstruct", store, "-o", str(tmp_path / f"{name}-back.h5"))]
        if name == "f64":
            runs.append(("bounds", str(tmp_path / "tiny.h5"), "--rank", RANK, "--sizes", "2:6:2",
                         "--trials", "2", "-o", str(tmp_path / "tiny.csv"), "--quiet"))
            write_collection(str(tmp_path / "tiny.h5"), base * 1e-310, layout="stack",
                             dataset="matrices")
        for args in runs:
            res = run_matclust(*args, check=0)
            assert res.stderr.strip() in ("", f"wrote {K} matrices to {tmp_path / f'{name}-back.h5'}"), res


def test_bound_study_does_not_depend_on_magnitude(tmp_path):
    """`bounds` at 1e-300, 1e-310 and 1e300: the same true errors and bounds as at 1."""
    import csv

    base, _ = planted_collection(K, M, N, 4, RANK, 0.01, "float64", None, 0, 10.0)
    rows = {}
    for scale in (1.0, 1e-300, 1e-310, 1e300):
        path = str(tmp_path / f"x{scale}.h5")
        write_collection(path, base * scale, layout="stack", dataset="matrices")
        out = str(tmp_path / f"x{scale}.csv")
        res = quietly("bounds", path, "--rank", RANK, "--sizes", "2:10:4", "--trials", 3, "-o", out,
                      "--quiet")
        assert res.returncode == 0, res
        with open(out) as fh:
            rows[scale] = list(csv.DictReader(fh))
    ref = rows[1.0]
    for scale, got in rows.items():
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            for key in a:
                if key.endswith("seconds") or key in ("size", "trial"):
                    continue
                # subnormal inputs carry fewer digits: compare at that precision
                tol = 1e-6 if scale == 1e-310 else 1e-12
                assert float(b[key]) == pytest.approx(float(a[key]), rel=tol, abs=tol), (scale, key)
