"""Property and fuzz tests (hypothesis): random shapes, scales, rank-deficient and duplicated
collections never crash, and every stored cluster verifies.

Each example goes through the Python API, ``MatrixClusterer(...).fit(X, output)``, then
``matclust.verify.verify_store`` against the same matrices written as an HDF5 collection, plus
independent checks (every index in exactly one cluster, the report's errors within eps).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import matclust  # noqa: E402
from matclust.collections_io import write_collection  # noqa: E402
from matclust.verify import verify_store  # noqa: E402

SETTINGS = dict(max_examples=int(os.environ.get("MATCLUST_FUZZ_EXAMPLES", 60)), deadline=None,
                derandomize=os.environ.get("MATCLUST_FUZZ_RANDOM") is None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

METHODS = st.sampled_from(["incremental", "residual", "weyl"])
ORDERS = st.sampled_from(["residual", "norm"])


@st.composite
def collections(draw, varying_widths: bool):
    """A collection: K matrices of m x n_i built from a few low-rank factors, with scales over
    60 orders of magnitude, exact duplicates, all-zero matrices and noise or none."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    K = draw(st.integers(1, 14))
    m = draw(st.integers(1, 9))
    complex_ = draw(st.booleans()) and draw(st.booleans())  # about one in four
    if varying_widths:
        widths = [draw(st.integers(1, 5)) for _ in range(K)]
    else:
        widths = [draw(st.integers(1, 5))] * K
    true_rank = draw(st.integers(0, m))  # 0: exact zeros; < min(m, n): rank-deficient
    n_factors = draw(st.integers(1, 3))

    def gauss(*shape):
        g = rng.standard_normal(shape)
        return g + 1j * rng.standard_normal(shape) if complex_ else g

    factors = [gauss(m, true_rank) for _ in range(n_factors)]
    noise = draw(st.sampled_from([0.0, 0.0, 1e-8, 1e-3, 0.1]))
    common_scale = 10.0 ** draw(st.integers(-30, 30))
    spread = draw(st.sampled_from([0.0, 1.0, 6.0]))
    mats = []
    for i, w in enumerate(widths):
        f = factors[i % n_factors]
        a = f @ gauss(true_rank, w) + noise * gauss(m, w)
        mats.append(a * common_scale * 10.0 ** (spread * rng.uniform(-0.5, 0.5)))
    # exact duplicates and all-zero matrices
    for i in range(K):
        roll = rng.uniform()
        if roll < 0.15 and i > 0 and widths[i - 1] == widths[i]:
            mats[i] = mats[i - 1].copy()
        elif roll < 0.2:
            mats[i] = np.zeros_like(mats[i])
    dtype = draw(st.sampled_from(["complex128", "complex64"] if complex_ else
                                 ["float64", "float64", "float32"]))
    if dtype == "float32" or dtype == "complex64":
        limit = 1e30  # well inside float32's range
        mats = [a if not np.abs(a).max(initial=0) > limit else a / np.abs(a).max() * limit
                for a in mats]
    mats = [np.ascontiguousarray(a.astype(dtype)) for a in mats]
    if not varying_widths:
        return np.stack(mats)
    return mats


def check_fit(X, rank, eps, method, order, patience, out_ext):
    K = len(X)
    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "input.h5")
        layout = "stack" if isinstance(X, np.ndarray) else "group"
        write_collection(inp, X, layout=layout, dataset="matrices")
        out = os.path.join(tmp, "result" + out_ext)
        fitted = matclust.MatrixClusterer(guarantee="cluster", encoding="plain", rank=rank, eps=eps, method=method, order=order,
                                          patience=patience).fit(X, out)
        labels = fitted.labels_
        assert labels.shape == (K,) and labels.min() == 0
        assert set(labels.tolist()) == set(range(fitted.n_clusters_))
        assert fitted.report_["max_error"] <= eps
        for s in fitted.cluster_stats_:
            assert 0.0 <= s["error"] <= eps and s["error"] <= s["bound"] + 1e-12
        result = verify_store(out, input_path=inp, dataset="matrices")
        assert result["ok"], result
        assert result["clusters"] == fitted.n_clusters_
        assert sorted(os.listdir(tmp)) == sorted(["input.h5", "result" + out_ext]), \
            "temporaries, lock or checkpoint left behind"


@settings(**SETTINGS)
@given(X=collections(varying_widths=False), rank=st.integers(1, 6),
       eps=st.floats(0.001, 0.9), method=METHODS, order=ORDERS, patience=st.integers(0, 3))
def test_stacked_collections_never_crash_and_verify(X, rank, eps, method, order, patience):
    check_fit(X, rank, eps, method, order, patience, ".h5")


@settings(**SETTINGS)
@given(X=collections(varying_widths=True), rank=st.integers(1, 6),
       eps=st.floats(0.001, 0.9), method=METHODS, order=ORDERS, patience=st.integers(0, 3))
def test_groups_of_varying_widths_never_crash_and_verify(X, rank, eps, method, order, patience):
    check_fit(X, rank, eps, method, order, patience, ".zarr")


@settings(**SETTINGS)
@given(X=collections(varying_widths=False), rank=st.integers(1, 4), eps=st.floats(0.01, 0.5),
       exponent=st.sampled_from([-30, 30]))
def test_scaling_by_a_power_of_two_keeps_the_labels(X, rank, eps, exponent):
    """Scaling every matrix by 2^(±100) is exact in floating point, so the clustering (a
    function of relative quantities only) must not change."""
    if X.dtype in (np.float32, np.complex64):
        X = X.astype(np.float64 if X.dtype == np.float32 else np.complex128)
    factor = 2.0 ** (100 if exponent > 0 else -100)
    if np.abs(X).max(initial=0.0) * factor > 1e300 or \
            (np.abs(X[X != 0]).min(initial=np.inf) * factor < 1e-290):
        return
    a = matclust.MatrixClusterer(guarantee="cluster", encoding="plain", rank=rank, eps=eps).fit(X)
    b = matclust.MatrixClusterer(guarantee="cluster", encoding="plain", rank=rank, eps=eps).fit(X * factor)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    for sa, sb in zip(a.cluster_stats_, b.cluster_stats_):
        assert sa["size"] == sb["size"] and sa["stored"] == sb["stored"]
