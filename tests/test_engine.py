"""Property tests for the engine: every estimator's bound is a guaranteed upper bound.

The reference throughout is an independent computation: ``np.linalg.svd`` of the horizontal
concatenation of the blocks, with the best rank-r error taken from the *tail* singular values
(``sum_{j > r} s_j^2 / sum_j s_j^2``), which has no cancellation even for exactly low-rank data.
matclust's own ``exact_error`` is only cross-checked against it, never used as the reference.

docs/algorithms.md is the specification: Weyl, residual (pinching) and incremental truncated SVD are
all lower bounds on the top-r energy E_r(S), hence upper bounds on e_r(S).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matclust.engine import (
    ExactBasis,
    IncrementalEstimator,
    ResidualEstimator,
    WeylEstimator,
    exact_error,
    make_estimator,
)

SLACK = 1e-9  # allowed amount by which a bound may fall short of the true error

# ---------------------------------------------------------------------------------------------
# The independent reference
# ---------------------------------------------------------------------------------------------


def _concat(blocks) -> np.ndarray:
    blocks = [np.asarray(b) for b in blocks]
    cplx = any(np.iscomplexobj(b) for b in blocks)
    dt = np.complex128 if cplx else np.float64
    return np.hstack([b.astype(dt) for b in blocks])


def reference(blocks, r: int) -> tuple[float, float, float]:
    """(true e_r, true top-r energy E_r, ||M||_F^2) from numpy's SVD of the concatenation."""
    m = _concat(blocks)
    s = np.linalg.svd(m, compute_uv=False)
    s2 = s.astype(np.float64) ** 2
    total = float(np.sum(s2))
    if total == 0.0:
        return 0.0, 0.0, 0.0
    tail = float(np.sum(s2[r:]))
    return float(np.sqrt(min(1.0, tail / total))), float(np.sum(s2[:r])), total


def estimators(r: int, m: int, cplx: bool):
    """Every estimator configuration under test."""
    return [
        WeylEstimator(r),
        ResidualEstimator(r, m, cplx),
        IncrementalEstimator(r, m, cplx),  # default oversampling (5)
        IncrementalEstimator(r, m, cplx, oversampling=0),
        IncrementalEstimator(r, m, cplx, oversampling=2),
    ]


def check_cluster(blocks, r: int, *, prefixes: bool = True, what: str = "") -> dict:
    """Assert every estimator's bound >= the true error (for the whole cluster and, when
    ``prefixes``, for every prefix state built along the way). Returns the final bounds."""
    blocks = [np.asarray(b) for b in blocks]
    m = blocks[0].shape[0]
    cplx = any(np.iscomplexobj(b) for b in blocks)
    truths = []
    if prefixes:
        truths = [reference(blocks[: t + 1], r) for t in range(len(blocks))]
    else:
        truths = [None] * (len(blocks) - 1) + [reference(blocks, r)]
    out = {}
    for est in estimators(r, m, cplx):
        state = est.empty()
        for t, block in enumerate(blocks):
            state = state.extend(block)
            if truths[t] is None:
                continue
            err, energy, total = truths[t]
            bound = state.bound
            assert np.isfinite(bound) and 0.0 <= bound <= 1.0, (what, est, t, bound)
            assert bound >= err - SLACK, (
                f"{what}: {est!r} bound {bound!r} < true error {err!r} "
                f"(prefix of {t + 1} blocks, r={r}, m={m})"
            )
            # The lower-bound claim itself, on the energy (before the rounding margin).
            assert state.energy <= energy + 1e-12 * total + 1e-300, (
                f"{what}: {est!r} energy {state.energy!r} exceeds E_r {energy!r} "
                f"(||M||^2 = {total!r}, prefix {t + 1})"
            )
            assert state.size == t + 1
        # bound_of gives the same as feeding the blocks one at a time.
        assert est.bound_of(blocks) == pytest.approx(state.bound, abs=1e-15)
        out[type(est).__name__ + str(getattr(est, "oversampling", ""))] = state.bound
    return out


def orth_defect(q: np.ndarray) -> float:
    if q.shape[1] == 0:
        return 0.0
    return float(np.linalg.norm(q.conj().T @ q - np.eye(q.shape[1])))


# ---------------------------------------------------------------------------------------------
# Data generators (numpy, seeded)
# ---------------------------------------------------------------------------------------------


def gauss(rng, shape, cplx=False):
    if cplx:
        return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    return rng.standard_normal(shape)


def random_blocks(rng, m, widths, cplx=False, scales=None):
    blocks = [gauss(rng, (m, n), cplx) for n in widths]
    if scales is not None:
        blocks = [b * s for b, s in zip(blocks, scales)]
    return blocks


def planted_blocks(rng, m, widths, k, noise, cplx=False):
    """Blocks from one shared k-dim subspace plus relative noise."""
    u, _ = np.linalg.qr(gauss(rng, (m, k), cplx))
    out = []
    for n in widths:
        c = gauss(rng, (k, n), cplx) * rng.uniform(0.2, 3.0)
        b = u @ c
        if noise:
            b = b + noise * np.linalg.norm(b) / np.sqrt(m * n) * gauss(rng, (m, n), cplx)
        out.append(b)
    return out


def by_norm_desc(blocks):
    return sorted(blocks, key=lambda b: -np.linalg.norm(b))


def cast(blocks, dtype):
    return [np.asarray(b).astype(dtype) for b in blocks]


# ---------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------


def test_reference_agrees_with_matclust_exact_error():
    rng = np.random.default_rng(0)
    for trial in range(40):
        m = int(rng.integers(2, 15))
        cplx = bool(trial % 2)
        blocks = random_blocks(rng, m, rng.integers(1, 8, size=rng.integers(1, 6)), cplx)
        r = int(rng.integers(1, m + 1))
        err, _, _ = reference(blocks, r)
        assert exact_error(blocks, r) == pytest.approx(err, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# Hypothesis: general random clusters
# ---------------------------------------------------------------------------------------------

DTYPES = [np.float64, np.float32, np.complex128, np.complex64]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    m=st.integers(1, 16),
    k_blocks=st.integers(1, 12),
    max_width=st.integers(1, 20),
    r=st.integers(1, 10),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["gauss", "planted", "exact_lowrank", "mixed_scale", "sorted"]),
)
def test_bounds_hold_random(seed, m, k_blocks, max_width, r, dtype, kind):
    rng = np.random.default_rng(seed)
    cplx = np.dtype(dtype).kind == "c"
    widths = rng.integers(1, max_width + 1, size=k_blocks)
    if kind == "gauss":
        blocks = random_blocks(rng, m, widths, cplx)
    elif kind == "planted":
        blocks = planted_blocks(rng, m, widths, int(rng.integers(1, m + 1)), 1e-3, cplx)
    elif kind == "exact_lowrank":
        blocks = planted_blocks(rng, m, widths, int(rng.integers(1, m + 1)), 0.0, cplx)
    elif kind == "mixed_scale":
        blocks = random_blocks(rng, m, widths, cplx, scales=10.0 ** rng.uniform(-8, 8, k_blocks))
    else:
        blocks = by_norm_desc(random_blocks(rng, m, widths, cplx, scales=rng.uniform(0.1, 10, k_blocks)))
    blocks = cast(blocks, dtype)
    check_cluster(blocks, r, what=f"{kind} {np.dtype(dtype)}")


# ---------------------------------------------------------------------------------------------
# Seeded families
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_variable_widths_and_wide_blocks(dtype):
    """Variable block widths, including blocks far wider than the rank and than m."""
    rng = np.random.default_rng(1)
    cplx = np.dtype(dtype).kind == "c"
    for trial in range(30):
        m = int(rng.integers(3, 25))
        r = int(rng.integers(1, min(m, 8) + 1))
        widths = rng.choice([1, 2, r, r + 1, 2 * r + 3, m, m + 7, 3 * m], size=rng.integers(1, 9))
        blocks = cast(random_blocks(rng, m, widths, cplx, rng.uniform(0.05, 5, len(widths))), dtype)
        check_cluster(blocks, r, what=f"widths {list(widths)}")
        check_cluster(by_norm_desc(blocks), r, prefixes=False, what="sorted")


def test_weyl_wide_seed_regression():
    """500 random clusters of 20 x 10 blocks at r = 3 (docs/algorithms.md, Bound 1): the Weyl seed
    must use the top-r energy of a block wider than r, never its full norm."""
    rng = np.random.default_rng(2)
    r = 3
    naive_violations = 0
    est = WeylEstimator(r)
    for trial in range(500):
        k = int(rng.integers(1, 9))
        blocks = by_norm_desc(random_blocks(rng, 20, [10] * k, scales=rng.uniform(0.5, 2, k)))
        err, _, total = reference(blocks, r)
        bound = est.bound_of(blocks)
        assert bound >= err - SLACK, (trial, bound, err)
        # The full-norm seed of the paper's public code: shows that the data does separate the
        # correct seed from the broken one.
        naive = np.sqrt(max(0.0, 1 - np.linalg.norm(blocks[0]) ** 2 / total))
        naive_violations += naive < err - SLACK
    assert naive_violations > 250


def test_weyl_matches_packing_rule():
    """With blocks no wider than r, in norm order, the Weyl bound is the packed-seed formula."""
    rng = np.random.default_rng(3)
    for trial in range(50):
        m, r = 12, int(rng.integers(2, 7))
        widths = rng.integers(1, r + 1, size=8)
        blocks = by_norm_desc(random_blocks(rng, m, widths, scales=rng.uniform(0.1, 3, 8)))
        total = sum(np.linalg.norm(b) ** 2 for b in blocks)
        packed, cols = 0.0, 0
        for b in blocks:
            if cols + b.shape[1] <= r:
                packed, cols = packed + np.linalg.norm(b) ** 2, cols + b.shape[1]
        expected = np.sqrt(max(0.0, 1 - packed / total))
        got = WeylEstimator(r).bound_of(blocks)
        assert got >= expected - 1e-12
        assert got == pytest.approx(expected, abs=1e-6)
        assert got >= reference(blocks, r)[0] - SLACK


@pytest.mark.parametrize("cplx", [False, True])
def test_exactly_low_rank(cplx):
    """All blocks from one rank-2 (or rank-k) subspace: residuals ~1e-12, true error ~0. This is
    where the paper's public code lost orthogonality and underestimated the error."""
    rng = np.random.default_rng(4 + cplx)
    for trial in range(25):
        m = int(rng.integers(4, 40))
        k = 2 if trial % 2 == 0 else int(rng.integers(1, min(m, 6)))
        widths = rng.integers(1, 12, size=rng.integers(2, 40))
        noise = [0.0, 1e-12, 1e-14, 1e-9][trial % 4]
        blocks = planted_blocks(rng, m, widths, k, noise, cplx)
        for r in sorted({max(1, k - 1), k, k + 1}):
            check_cluster(blocks, r, prefixes=trial < 8, what=f"low-rank k={k} noise={noise}")
            if r == k - 1:
                # The true error is substantial: the bounds must not collapse to 0.
                assert reference(blocks, r)[0] > 1e-3


@pytest.mark.parametrize("cplx", [False, True])
def test_incremental_q_stays_orthonormal(cplx):
    rng = np.random.default_rng(6 + cplx)
    for trial in range(20):
        m = int(rng.integers(3, 40))
        k = int(rng.integers(1, min(m, 4) + 1))
        widths = rng.integers(1, 15, size=60)
        noise = [0.0, 1e-12, 1e-13, 1e-10][trial % 4]
        blocks = planted_blocks(rng, m, widths, k, noise, cplx)
        r = int(rng.integers(1, k + 2))
        for p in (0, 5, m):
            inc = IncrementalEstimator(r, m, cplx, oversampling=p).empty()
            res = ResidualEstimator(r, m, cplx).empty()
            for t, b in enumerate(blocks):
                inc = inc.extend(b)
                res = res.extend(b)
                assert orth_defect(inc.q) < 1e-10, (trial, p, t, orth_defect(inc.q))
                assert orth_defect(res.q) < 1e-10, (trial, t, orth_defect(res.q))
                assert inc.q.shape[1] <= min(m, r + p)
                assert res.q.shape[1] <= m
            err, energy, total = reference(blocks, r)
            assert inc.bound >= err - SLACK
            assert inc.energy <= energy + 1e-12 * total
            if r >= k:
                # Exactly (or nearly) low-rank: the tracked estimate is tight, not stuck at 0.
                assert inc.bound < 1e-5 + 10 * noise ** 0.5


@pytest.mark.parametrize("cplx", [False, True])
def test_graded_spectrum(cplx):
    """Smooth-data-like clusters (PDE trajectories): singular values decaying geometrically from
    1 down past machine precision, so many directions sit right around the drop tolerance."""
    rng = np.random.default_rng(40 + cplx)
    for trial in range(30):
        m = int(rng.integers(3, 30))
        u, _ = np.linalg.qr(gauss(rng, (m, m), cplx))
        decay = 10.0 ** (-rng.uniform(0.3, 3) * np.arange(m))
        blocks = [u @ (gauss(rng, (m, int(rng.integers(1, 10))), cplx) * decay[:, None])
                  for _ in range(int(rng.integers(2, 40)))]
        r = int(rng.integers(1, m + 1))
        check_cluster(blocks, r, prefixes=trial < 6, what="graded")
        for est in (IncrementalEstimator(r, m, cplx), ResidualEstimator(r, m, cplx)):
            assert orth_defect(est.start(blocks).q) < 1e-10


def test_incremental_q_orthonormal_random_saturating():
    """Random data pushing the tracked basis to span the whole space (the naive variant's
    failure mode): Q stays orthonormal and the energy never exceeds E_r."""
    rng = np.random.default_rng(8)
    for trial in range(40):
        m = int(rng.integers(2, 9))
        cplx = bool(trial % 2)
        r = int(rng.integers(1, m + 1))
        blocks = random_blocks(rng, m, rng.integers(1, 6, size=25), cplx,
                               scales=10.0 ** rng.uniform(-3, 3, 25))
        st_ = IncrementalEstimator(r, m, cplx, oversampling=int(rng.integers(0, 6))).empty()
        for b in blocks:
            st_ = st_.extend(b)
            assert orth_defect(st_.q) < 1e-10
        err, energy, total = reference(blocks, r)
        assert st_.energy <= energy + 1e-13 * total
        assert st_.bound >= err - SLACK


@pytest.mark.parametrize("cplx", [False, True])
def test_rank_deficient_blocks(cplx):
    """Blocks whose own rank is below their width (repeated / zero columns)."""
    rng = np.random.default_rng(9 + cplx)
    for trial in range(30):
        m = int(rng.integers(3, 20))
        blocks = []
        for _ in range(int(rng.integers(1, 10))):
            n = int(rng.integers(1, 12))
            rk = int(rng.integers(0, min(m, n) + 1))
            b = gauss(rng, (m, rk), cplx) @ gauss(rng, (rk, n), cplx) if rk else np.zeros((m, n))
            if n > 1 and rng.random() < 0.3:
                b[:, int(rng.integers(n))] = 0
            blocks.append(b.astype(np.complex128) if cplx else b)
        r = int(rng.integers(1, m + 1))
        check_cluster(blocks, r, what="rank-deficient")


@pytest.mark.parametrize("cplx", [False, True])
def test_duplicated_blocks(cplx):
    rng = np.random.default_rng(11 + cplx)
    for trial in range(25):
        m = int(rng.integers(2, 20))
        base = random_blocks(rng, m, rng.integers(1, 8, size=rng.integers(1, 4)), cplx)
        blocks = []
        for _ in range(int(rng.integers(2, 15))):
            b = base[int(rng.integers(len(base)))]
            scale = [1.0, 1.0, -1.0, 1e-3, 7.0][int(rng.integers(5))]
            blocks.append(b * scale)
        r = int(rng.integers(1, m + 1))
        check_cluster(blocks, r, what="duplicated")
        # Exact copies of one block: the concatenation has the block's rank.
        same = [base[0]] * 10
        check_cluster(same, r, prefixes=False, what="copies")
        b = base[0]
        if np.linalg.matrix_rank(b) <= r:
            assert IncrementalEstimator(r, m, cplx).bound_of(same) < 1e-6


@pytest.mark.parametrize("cplx", [False, True])
def test_rank_saturated(cplx):
    """m small (3..6), many blocks, r close to m: the tracked bases span the whole space."""
    rng = np.random.default_rng(13 + cplx)
    for trial in range(40):
        m = int(rng.integers(3, 7))
        r = int(rng.integers(max(1, m - 2), m + 1))
        widths = rng.integers(1, 2 * m, size=rng.integers(10, 50))
        if trial % 3 == 0:
            blocks = planted_blocks(rng, m, widths, int(rng.integers(1, m + 1)), 1e-2, cplx)
        else:
            blocks = random_blocks(rng, m, widths, cplx, scales=rng.uniform(0.1, 10, len(widths)))
        if trial % 2:
            blocks = by_norm_desc(blocks)
        b = check_cluster(blocks, r, prefixes=trial < 10, what=f"saturated m={m} r={r}")
        if r == m:
            # rank r >= m: the true error is 0 and the incremental estimate reaches it.
            assert b["IncrementalEstimator5"] < 1e-6


@pytest.mark.parametrize("scale", [1e-30, 1e-15, 1e15, 1e30])
@pytest.mark.parametrize("cplx", [False, True])
def test_tiny_and_huge_scales(scale, cplx):
    rng = np.random.default_rng(15)
    for trial in range(10):
        m = int(rng.integers(2, 15))
        widths = rng.integers(1, 10, size=rng.integers(1, 10))
        if trial % 2:
            blocks = planted_blocks(rng, m, widths, int(rng.integers(1, m + 1)), 0.0, cplx)
        else:
            blocks = random_blocks(rng, m, widths, cplx)
        blocks = [b * scale for b in blocks]
        r = int(rng.integers(1, m + 1))
        bounds = check_cluster(blocks, r, what=f"scale {scale}")
        # Scale invariance: the bound does not depend on the units.
        unscaled = check_cluster([b / scale for b in blocks], r, prefixes=False)
        for key in bounds:
            assert bounds[key] == pytest.approx(unscaled[key], abs=1e-6)


def test_all_zero_blocks():
    for cplx in (False, True):
        dt = np.complex128 if cplx else np.float64
        m = 5
        zeros = [np.zeros((m, n), dt) for n in (1, 3, 7)]
        for est in estimators(2, m, cplx):
            st_ = est.start(zeros)
            assert st_.bound == 0.0
            assert st_.norm2 == 0.0
        rng = np.random.default_rng(16)
        for trial in range(10):
            mixed = zeros + random_blocks(rng, m, [2, 4], cplx) + zeros
            order = rng.permutation(len(mixed))
            check_cluster([mixed[i] for i in order], int(rng.integers(1, 6)), what="zeros mixed")


@pytest.mark.parametrize("cplx", [False, True])
def test_single_block(cplx):
    rng = np.random.default_rng(17 + cplx)
    for trial in range(40):
        m = int(rng.integers(1, 20))
        n = int(rng.integers(1, 30))
        block = gauss(rng, (m, n), cplx)
        r = int(rng.integers(1, 10))
        err, _, _ = reference([block], r)
        bounds = check_cluster([block], r, what="single")
        # Every estimator is exact on one block (up to the rounding margin).
        for key, b in bounds.items():
            assert b == pytest.approx(err, abs=1e-6), key


def test_complex64_input_uses_complex_arithmetic():
    """complex64 blocks (not only complex128) with a phase structure a real-only computation
    would miss: A_i = u c_i with complex u; rank 1 over C but rank 2 over R."""
    rng = np.random.default_rng(19)
    for trial in range(20):
        m = int(rng.integers(3, 15))
        u = gauss(rng, (m, 1), True)
        blocks = [(u @ gauss(rng, (1, int(rng.integers(1, 6))), True)).astype(np.complex64)
                  for _ in range(int(rng.integers(2, 12)))]
        check_cluster(blocks, 1, what="complex64 rank-1")
        assert IncrementalEstimator(1, m, True).bound_of(blocks) < 1e-3
        assert reference(blocks, 1)[0] < 1e-3
        assert reference([np.hstack([b.real, b.imag]) for b in blocks], 1)[0] > 1e-2


@pytest.mark.filterwarnings("error::numpy.exceptions.ComplexWarning")
def test_estimator_dtype_mismatch():
    """Complex blocks into an estimator made for real data still give valid bounds (the state
    widens to complex, never drops imaginary parts), and real blocks into a complex one too."""
    rng = np.random.default_rng(20)
    for trial in range(10):
        m = 8
        blocks = random_blocks(rng, m, [3, 5, 2, 4], True)
        for est in (ResidualEstimator(2, m, False), IncrementalEstimator(2, m, False),
                    ResidualEstimator(2, m, True), IncrementalEstimator(2, m, True)):
            st_ = est.start(blocks)
            assert st_.bound >= reference(blocks, 2)[0] - SLACK
            assert np.iscomplexobj(st_.q) and orth_defect(st_.q) < 1e-10
            real = [b.real for b in blocks]
            assert est.bound_of(real) >= reference(real, 2)[0] - SLACK
            mixed = [blocks[0].real, blocks[1], blocks[2].real, blocks[3]]
            st_ = est.start(mixed)
            assert st_.bound >= reference(mixed, 2)[0] - SLACK
            assert orth_defect(st_.q) < 1e-10


def test_extend_does_not_modify_state():
    rng = np.random.default_rng(21)
    m = 10
    blocks = random_blocks(rng, m, [3, 4, 2])
    extra = gauss(rng, (m, 5))
    for est in estimators(2, m, False):
        st_ = est.start(blocks)
        before = (st_.bound, st_.size, st_.norm2, getattr(st_, "q", np.zeros(0)).copy())
        trial = st_.extend(extra)
        assert trial.size == st_.size + 1
        assert (st_.bound, st_.size, st_.norm2) == before[:3]
        if hasattr(st_, "q"):
            np.testing.assert_array_equal(st_.q, before[3])
        # Two different candidates from the same state are independent.
        again = st_.extend(extra)
        assert again.bound == trial.bound


def test_make_estimator_aliases():
    for name, cls in [("incremental", IncrementalEstimator), ("approximate", IncrementalEstimator),
                      ("residual", ResidualEstimator), ("residuals", ResidualEstimator),
                      ("weyl", WeylEstimator), ("max_norm", WeylEstimator),
                      ("max-norm", WeylEstimator), ("Weyl", WeylEstimator)]:
        assert isinstance(make_estimator(name, 3, 10), cls)
    with pytest.raises(ValueError):
        make_estimator("nope", 3, 10)
    with pytest.raises(ValueError):
        WeylEstimator(0)


@pytest.mark.parametrize("cplx", [False, True])
def test_incremental_tightest_on_planted(cplx):
    """On planted low-rank + noise clusters the incremental bound is, on average, the tightest;
    every bound is valid."""
    rng = np.random.default_rng(22 + cplx)
    inc, res, weyl, true = [], [], [], []
    for trial in range(60):
        m = int(rng.integers(15, 40))
        k = int(rng.integers(1, 5))
        r = k
        widths = rng.integers(1, 10, size=rng.integers(2, 40))
        blocks = by_norm_desc(planted_blocks(rng, m, widths, k, float(rng.choice([1e-3, 1e-2, 0.05])), cplx))
        err = reference(blocks, r)[0]
        b_inc = IncrementalEstimator(r, m, cplx).bound_of(blocks)
        b_res = ResidualEstimator(r, m, cplx).bound_of(blocks)
        b_weyl = WeylEstimator(r).bound_of(blocks)
        for b in (b_inc, b_res, b_weyl):
            assert b >= err - SLACK
        inc.append(b_inc), res.append(b_res), weyl.append(b_weyl), true.append(err)
    assert np.mean(inc) <= np.mean(res) + 1e-12
    assert np.mean(inc) <= np.mean(weyl) + 1e-12
    # and it is close to the truth on this data
    assert np.mean(np.array(inc) - np.array(true)) < 1e-3


# ---------------------------------------------------------------------------------------------
# ExactBasis
# ---------------------------------------------------------------------------------------------


def _check_exact_basis(blocks, r, chunks_per_add=1):
    m = blocks[0].shape[0]
    dtype = np.result_type(*[b.dtype for b in blocks])
    full = _concat(blocks)
    eb = ExactBasis(m, r, dtype)
    for i in range(0, len(blocks), chunks_per_add):
        eb.add(np.hstack(blocks[i : i + chunks_per_add]))
    u, sigma2 = eb.result()
    s_ref = np.linalg.svd(full, compute_uv=False)
    s2_ref = s_ref**2
    top = float(s2_ref[0]) if len(s2_ref) else 0.0
    assert eb.columns == full.shape[1]
    assert eb.norm2 == pytest.approx(float(np.sum(s2_ref)), rel=1e-10, abs=1e-300)
    # All singular values, descending, equal numpy's (absolute tolerance against sigma_1^2).
    n_cmp = min(len(sigma2), len(s2_ref))
    assert np.all(np.diff(sigma2) <= 1e-12 * max(top, 1e-300))
    np.testing.assert_allclose(sigma2[:n_cmp], s2_ref[:n_cmp], rtol=0, atol=1e-10 * max(top, 1e-300))
    assert np.all(sigma2[n_cmp:] <= 1e-10 * max(top, 1e-300))
    # Orthonormal basis, complex if the data is complex.
    assert u.shape == (m, min(r, m, full.shape[1]))
    assert orth_defect(u) < 1e-10
    if np.iscomplexobj(full):
        assert np.iscomplexobj(u)
    # The basis achieves the optimal error (computed directly, no cancellation).
    if top > 0:
        resid = full - u @ (u.conj().T @ full)
        err_direct = np.linalg.norm(resid) / np.linalg.norm(full)
        err_ref = np.sqrt(np.sum(s2_ref[r:]) / np.sum(s2_ref))
        assert err_direct == pytest.approx(err_ref, abs=1e-7)
        assert eb.best_error() == pytest.approx(err_ref, abs=1e-7)
        # Spans numpy's top-r subspace when there is a clear gap.
        rr = u.shape[1]
        if len(s_ref) > rr and s_ref[rr - 1] > 1.5 * s_ref[rr] + 1e-12 * s_ref[0]:
            uref = np.linalg.svd(full, full_matrices=False)[0][:, :rr]
            p1 = u @ u.conj().T
            p2 = uref @ uref.conj().T
            assert np.linalg.norm(p1 - p2) < 1e-6
    return u, sigma2


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_exact_basis_matches_numpy(dtype):
    rng = np.random.default_rng(30)
    cplx = np.dtype(dtype).kind == "c"
    for trial in range(25):
        m = int(rng.integers(1, 20))
        widths = rng.integers(1, 10, size=rng.integers(1, 8))
        if trial % 3 == 0:
            blocks = planted_blocks(rng, m, widths, int(rng.integers(1, m + 1)), 1e-6, cplx)
        else:
            blocks = random_blocks(rng, m, widths, cplx)
        blocks = cast(blocks, dtype)
        _check_exact_basis(blocks, int(rng.integers(1, m + 1)))


@pytest.mark.parametrize("cplx", [False, True])
def test_exact_basis_streaming_compression(cplx):
    """Many more columns than 2m: the buffer is compressed repeatedly (the streaming path)."""
    rng = np.random.default_rng(31 + cplx)
    for trial in range(12):
        m = int(rng.integers(2, 12))
        widths = rng.integers(1, 2 * m + 3, size=rng.integers(20, 80))
        assert widths.sum() > 4 * m
        kind = trial % 3
        if kind == 0:
            blocks = random_blocks(rng, m, widths, cplx)
        elif kind == 1:
            blocks = planted_blocks(rng, m, widths, int(rng.integers(1, m + 1)), 1e-8, cplx)
        else:
            blocks = planted_blocks(rng, m, widths, int(rng.integers(1, m + 1)), 0.0, cplx)
        r = int(rng.integers(1, m + 1))
        _check_exact_basis(blocks, r, chunks_per_add=int(rng.integers(1, 4)))


def test_exact_basis_exactly_low_rank_small_errors():
    """Exactly low-rank plus tiny noise: the error comes out accurately (the square root of the
    Gram matrix does not square the condition number)."""
    rng = np.random.default_rng(33)
    for trial in range(10):
        m = 30
        blocks = planted_blocks(rng, m, rng.integers(5, 20, size=40), 2, 1e-9)
        full = _concat(blocks)
        s = np.linalg.svd(full, compute_uv=False)
        err_ref = np.sqrt(np.sum(s[2:] ** 2) / np.sum(s**2))
        eb = ExactBasis(m, 2, np.float64)
        for b in blocks:
            eb.add(b)
        u, _ = eb.result()
        direct = np.linalg.norm(full - u @ (u.T @ full)) / np.linalg.norm(full)
        assert direct == pytest.approx(err_ref, rel=1e-3)
        assert orth_defect(u) < 1e-12


def test_exact_basis_zero_and_rank_over_m():
    m = 4
    eb = ExactBasis(m, 2, np.float64)
    eb.add(np.zeros((m, 3)))
    u, s2 = eb.result()
    assert np.all(s2 == 0)
    assert eb.best_error() == 0.0
    rng = np.random.default_rng(34)
    # rank larger than m: the basis has m columns and the error is 0.
    blocks = random_blocks(rng, m, [3, 3, 3])
    u, s2 = _check_exact_basis(blocks, 10)
    assert u.shape == (m, m)


@pytest.mark.parametrize("cplx", [False, True])
def test_incremental_follows_its_definition(cplx):
    """The incremental estimate equals its definition in docs/algorithms.md, computed here with
    dense m x m eigendecompositions: T <- top-k part of (T + A A^*), L = top-r sum of T's
    eigenvalues. The estimator updates in the projected space [Q, new directions] or, when m is
    small against k + c, in the full space; blocks of 1..24 columns at m = 10 and 40 take both."""
    rng = np.random.default_rng(41 + cplx)
    for trial in range(12):
        m = (10, 40)[trial % 2]
        r, p = int(rng.integers(1, 6)), int(rng.integers(0, 6))
        widths = rng.integers(1, 25, size=10)
        blocks = random_blocks(rng, m, widths, cplx, scales=10.0 ** rng.uniform(-2, 2, len(widths)))
        state = IncrementalEstimator(r, m, cplx, oversampling=p).empty()
        t = np.zeros((m, m), dtype=complex if cplx else float)
        for b in blocks:
            state = state.extend(b)
            mu, v = np.linalg.eigh(t + b @ b.conj().T)
            mu, v = mu[::-1][: r + p], v[:, ::-1][:, : r + p]
            t = (v * mu) @ v.conj().T
            want = float(np.sum(mu[:r]))
            assert state.energy == pytest.approx(want, rel=1e-9, abs=1e-12 * state.norm2), trial


@pytest.mark.parametrize("method", ["incremental", "residual", "weyl"])
@pytest.mark.parametrize("cplx", [False, True])
def test_prefixes_are_the_prefix_blocks_added_as_one(method, cplx):
    """Prefixes(p) is the state extended by the first p blocks side by side, as one block: its
    bound agrees with that extend's (the incremental estimator computes it from one shared
    projection and eigvalsh alone), its energy with the dense definition, and the states
    it hands out are the extend's. m = 12 and 60 take the full-space and projected paths."""
    rng = np.random.default_rng(53 + cplx)
    for trial in range(8):
        m = (12, 60)[trial % 2]
        r = int(rng.integers(1, 5))
        est = make_estimator(method, r, m, cplx)
        seed = random_blocks(rng, m, [r], cplx)[0]
        base = est.start([seed])
        widths = rng.integers(1, 5, size=6)
        scales = 10.0 ** rng.uniform(-3, 1, len(widths))
        if trial % 4 >= 2:  # near the seed's span: prefixes that fit and ones that do not
            blocks = [seed[:, : min(n, r)] @ gauss(rng, (min(n, r), n), cplx) * s
                      + 1e-3 * gauss(rng, (m, n), cplx) for n, s in zip(widths, scales)]
        else:
            blocks = random_blocks(rng, m, widths, cplx, scales=scales)
        group = base.prefixes(np.hstack(blocks), np.cumsum(widths),
                              [float(np.linalg.norm(b) ** 2) for b in blocks], np.zeros(len(blocks)))
        for p in range(len(blocks), 0, -1):  # bounds first, before any state is formed
            direct = base.extend(np.hstack(blocks[:p]))
            # Bounds are sqrt(1 - energy / norm2): compare the energies' share, not its root.
            assert abs(group.bound(p) ** 2 - direct.bound**2) < 1e-12, (trial, p)
        for p in range(1, len(blocks) + 1):
            direct = base.extend(np.hstack(blocks[:p]))
            state = group.state(p)
            assert abs(state.bound**2 - direct.bound**2) < 1e-12, (trial, p)
            assert state.norm2 == pytest.approx(direct.norm2, rel=1e-12)
            if method == "incremental":
                dense = _concat([seed] + blocks[:p])
                t = seed @ seed.conj().T
                mu, v = np.linalg.eigh(t)
                k = est.rank + est.oversampling
                t = (v[:, ::-1][:, :k] * mu[::-1][:k]) @ v[:, ::-1][:, :k].conj().T
                a = dense[:, seed.shape[1]:]
                want = np.sort(np.linalg.eigvalsh(t + a @ a.conj().T))[::-1][:r].sum()
                assert state.energy == pytest.approx(want, rel=1e-9, abs=1e-12 * state.norm2)


@pytest.mark.parametrize("cplx", [False, True])
def test_screen_bounds_the_cluster(cplx):
    """Blocks admitted on the incremental state's screen (no update): after each, the screen's
    bound is >= the true error of the seed plus the blocks so far (numpy's SVD), and no
    tighter than one update by all of them (fold), whose group bound is the estimator's own.
    Random, planted (exactly low-rank and with tiny noise) and wide blocks against a narrow
    tracked basis."""
    rng = np.random.default_rng(71 + cplx)
    for trial in range(12):
        m = int(rng.integers(6, 50))
        r = int(rng.integers(1, 5))
        widths = rng.integers(1, 2 * m, size=int(rng.integers(2, 7)))
        if trial % 3 == 0:
            blocks = random_blocks(rng, m, widths, cplx, scales=10.0 ** rng.uniform(-2, 1, len(widths)))
        else:
            k = int(rng.integers(1, min(m, r + 3)))
            blocks = planted_blocks(rng, m, widths, k, [0.0, 1e-12, 1e-3][trial % 3], cplx)
        seed, rest = blocks[0], blocks[1:]
        for est in (IncrementalEstimator(r, m, cplx), IncrementalEstimator(r, m, cplx, oversampling=0)):
            state = est.start([seed])
            screen = state.screen()
            for p, block in enumerate(rest, start=1):
                assert screen.admits(block, float(np.linalg.norm(block) ** 2), 0.0, eps=1.0)
                err = reference([seed] + rest[:p], r)[0]
                assert screen.bound >= err - SLACK, (trial, p, screen.bound, err)
                if trial % 3 == 1 and k <= r and seed.shape[1] >= k:
                    # The seed spans the blocks' subspace: the screen sees all of their energy.
                    assert screen.bound < 1e-5, (trial, p, screen.bound)
                folded = screen.fold()
                assert folded.bound(p) <= screen.bound + 1e-12, (trial, p)
                # Bounds are sqrt(1 - energy / norm2): compare the energies' share.
                assert abs(folded.state(p).bound ** 2
                           - state.extend(np.hstack(rest[:p])).bound ** 2) < 1e-12, (trial, p)
            # A bound above eps is refused, and the block is still held for the fold.
            tight = state.screen()
            assert not tight.admits(rest[0], float(np.linalg.norm(rest[0]) ** 2), 0.0, eps=-1.0)
            assert len(tight.fold()) == 1 and tight.bound == state.bound


@given(st.lists(st.integers(-2**40, 2**40), max_size=60))
@settings(max_examples=50, deadline=None)
def test_distinct_is_numpys_unique(values):
    from matclust.engine.linalg import distinct

    for dtype in (np.int64, np.int32):
        if dtype == np.int32:
            values = [v % 2**31 for v in values]
        a = np.array(values, dtype=dtype)
        got = distinct(a)
        assert got.dtype == a.dtype and np.array_equal(got, np.unique(a))
