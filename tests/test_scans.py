"""The candidate scans behind the residual order: readers' residuals against numpy, before and
after matrices are discarded (and their storage compacted), and the piecewise sort."""

from __future__ import annotations

import numpy as np
import pytest

from matclust import defaults
from matclust.api import summary_directions
from matclust.driver import GreedyDriver, ascending_pieces, by_ascending
from matclust.engine import make_estimator
from matclust.engine.linalg import residual_columns2
from matclust.sources import array_source
from matclust.sources.cache import CachedReader
from matclust.sources.summary import SummaryReader


def collection(rng, K, m, widths, cplx=False, dtype=None):
    dtype = dtype or (np.complex128 if cplx else np.float64)
    mats = []
    for n in widths:
        a = rng.standard_normal((m, n))
        if cplx:
            a = a + 1j * rng.standard_normal((m, n))
        mats.append((a * 10.0 ** rng.uniform(-2, 2)).astype(dtype))
    return mats


def residual2_numpy(q, a):
    a = a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)
    return float(np.linalg.norm(a - q @ (q.conj().T @ a)) ** 2)


def basis(rng, m, k, cplx=False):
    x = rng.standard_normal((m, k)) + (1j * rng.standard_normal((m, k)) if cplx else 0)
    return np.linalg.qr(x)[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64])
def test_residual_columns2_matches_numpy_also_where_it_cancels(dtype):
    rng = np.random.default_rng(0)
    cplx = np.dtype(dtype).kind == "c"
    m, k = 30, 6
    q = basis(rng, m, k, cplx)
    inside = q @ (rng.standard_normal((k, 40)) + (1j * rng.standard_normal((k, 40)) if cplx else 0))
    # columns almost inside span(Q): ||a||^2 - ||Q^* a||^2 would be rounding noise there
    data = np.hstack([inside + 1e-5 * rng.standard_normal((m, 40)), rng.standard_normal((m, 40))])
    data = data.astype(dtype)
    got = residual_columns2(q, data)
    want = np.array([residual2_numpy(q, data[:, [j]]) for j in range(data.shape[1])])
    # single precision: the near-span residuals (1e-5 of the norms) carry ~1e-2 relative
    # rounding; without the recomputation they would be off by far more than themselves.
    # Double precision takes them from the difference of norms (~1e-10 of them here): off by
    # ~eps64 of the norm, ~1e-6 relative, as accurate as the single-precision recomputation.
    single = dtype in (np.float32, np.complex64)
    np.testing.assert_allclose(got[:40], want[:40], rtol=2e-2 if single else 1e-5)
    np.testing.assert_allclose(got[40:], want[40:], rtol=1e-5 if single else 1e-12)
    assert got[:40].max() < 1e-6 * got[40:].min()  # the near-span columns do come out small


def test_cached_reader_after_discards():
    rng = np.random.default_rng(1)
    K, m = 300, 12
    widths = rng.integers(1, 5, K)
    mats = collection(rng, K, m, widths, dtype=np.float32)
    src = array_source(mats)
    reader = CachedReader(src, 1 << 30)
    q = basis(rng, m, 4)
    alive = np.ones(K, bool)
    for round_ in range(6):
        gone = rng.choice(np.flatnonzero(alive), size=alive.sum() // 2, replace=False)
        alive[gone] = False
        reader.discard(gone)
        candidates = np.flatnonzero(alive)
        got = reader.residuals2(q, candidates)
        want = np.array([residual2_numpy(q, mats[i]) for i in candidates])
        np.testing.assert_allclose(got, want, rtol=1e-4)
        # discarded matrices are still served (read again), and live ones exactly
        ask = rng.choice(K, size=20, replace=False)
        batch = reader.get(ask)
        for j, i in enumerate(ask):
            np.testing.assert_array_equal(batch.block(j), mats[i])
    assert reader._held < sum(a.nbytes for a in mats) / 4  # the compacted batches shrank


@pytest.mark.parametrize("cplx", [False, True])
def test_summary_reader_after_discards(cplx):
    rng = np.random.default_rng(2 + cplx)
    K, m, rank = 400, 10, 3
    widths = rng.integers(1, 6, K)
    mats = collection(rng, K, m, widths, cplx)
    reader = SummaryReader(array_source(mats), rank, 1 << 30, eps=0.1)
    q = basis(rng, m, rank, cplx)
    before_blocks = reader.blocks_of(np.arange(K))
    before = reader.residuals2(q, np.arange(K))
    # independent: residual of the summary F_i against Q, plus the energy outside F_i
    for i in rng.choice(K, 25, replace=False):
        f = before_blocks[i]
        want = residual2_numpy(q, f) + reader.tail2[i]
        assert before[i] == pytest.approx(want, rel=1e-4, abs=1e-6 * reader.norms2[i])
    alive = np.ones(K, bool)
    while alive.sum() > 10:
        gone = rng.choice(np.flatnonzero(alive), size=alive.sum() // 3, replace=False)
        alive[gone] = False
        reader.discard(gone)
        candidates = np.flatnonzero(alive)
        np.testing.assert_allclose(reader.residuals2(q, candidates), before[candidates],
                                   rtol=1e-6, atol=1e-9 * reader.norms2.max())
    assert reader.live < K / 2  # compacted
    # summaries of discarded matrices come back the same (recomputed from the source)
    ask = rng.choice(K, 30, replace=False)
    np.testing.assert_allclose(reader.blocks_of(ask), before_blocks[ask], rtol=0,
                               atol=1e-12 * np.sqrt(reader.norms2.max()))
    # and asking for a discarded one as a candidate still gives its residual
    dead = np.flatnonzero(~alive)[:5]
    np.testing.assert_allclose(reader.residuals2(q, dead), before[dead], rtol=1e-5,
                               atol=1e-9 * reader.norms2.max())


@pytest.mark.parametrize("cplx", [False, True])
def test_several_bases_scanned_at_once_give_each_its_own_scan(cplx):
    """One pass for several bases gives every basis exactly (bit for bit) what a pass of its
    own gives, before and after discards, for compacted-away candidates too: so scanning
    ahead (the driver's SEEDS_AHEAD) cannot change an order."""
    rng = np.random.default_rng(7 + cplx)
    K, m, rank = 500, 12, 3
    mats = collection(rng, K, m, rng.integers(1, 6, K), cplx)
    reader = SummaryReader(array_source(mats), rank, 1 << 30, eps=0.1)
    qs = [basis(rng, m, k, cplx) for k in (rank, rank + 2, 1)]
    alive = np.ones(K, bool)
    for _ in range(4):
        candidates = np.flatnonzero(alive)
        together = reader.residuals2_many(qs, candidates)
        for q, got in zip(qs, together):
            np.testing.assert_array_equal(got, reader.residuals2(q, candidates))
        gone = rng.choice(candidates, size=len(candidates) // 2, replace=False)
        alive[gone] = False
        reader.discard(gone)
    assert reader.live < K / 2  # compacted: some candidates below are served from the source
    dead = np.flatnonzero(~alive)[:7]
    for q, got in zip(qs, reader.residuals2_many(qs, dead)):
        np.testing.assert_array_equal(got, reader.residuals2(q, dead))


def test_scanning_ahead_forms_the_same_clusters_in_fewer_passes(monkeypatch):
    """Out of core (the driver on summaries), scans made ahead for the next seeds give the
    clusters, bounds and order of scanning each seed on its own, with fewer passes over the
    summaries."""
    import matclust.driver as driver_module
    from matclust.sample import planted_collection

    mats, _ = planted_collection(3000, 16, 6, 40, 3, 0.01, "float64", None, 4, 10.0)
    rank, eps = 4, 0.1

    def run(ahead):
        monkeypatch.setattr(driver_module, "SEEDS_AHEAD", ahead)
        source = array_source(mats)
        reader = SummaryReader(source, rank, 1 << 30, eps=eps)
        passes = []
        real = reader.residuals2_many
        monkeypatch.setattr(reader, "residuals2_many",
                            lambda qs, c: passes.append(len(qs)) or real(qs, c))
        driver = GreedyDriver(reader, reader.norms2, source.widths,
                              make_estimator("incremental", rank, source.m, False,
                                             defaults.OVERSAMPLING),
                              eps, exact_check=False)
        return [(c.members.tolist(), c.bound) for c in driver.clusters()], passes

    alone, passes_alone = run(0)
    ahead, passes_ahead = run(2)
    assert ahead == alone
    assert len(alone) > 20 and set(passes_alone) == {1}
    assert len(passes_ahead) < 0.6 * len(passes_alone)  # most seeds were scanned ahead


def test_ascending_pieces_is_the_full_stable_order():
    rng = np.random.default_rng(3)
    for trial in range(200):
        K = int(rng.integers(0, 2000))
        if trial % 2:  # many ties
            key = rng.integers(0, int(rng.integers(1, 30)), K).astype(float)
        else:
            key = rng.standard_normal(K)
        candidates = np.sort(rng.choice(K, size=int(rng.integers(0, K + 1)), replace=False))
        pieces = list(ascending_pieces(candidates, key, first=int(rng.integers(1, 200))))
        got = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        # independent reference: sort by (key, index)
        want = candidates[np.lexsort((candidates, key[candidates]))]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, by_ascending(candidates, key))


@pytest.mark.parametrize("keep_bytes", [None, 0])
def test_driver_emits_the_members_columns_and_trims_what_the_exact_check_rejects(keep_bytes, monkeypatch):
    """An estimator whose bound is far too optimistic (the true one halved) admits clusters
    over eps; the driver's exact check must hand members back until the exact error (numpy's
    SVD of the concatenation) is within eps. The columns the driver hands on with a cluster
    (kept as admitted, or read again after a trim or past the keep limit) are its members'."""
    from matclust import driver as drv
    from matclust.engine import exact_error, make_estimator

    if keep_bytes is not None:
        monkeypatch.setattr(drv, "KEEP_MEMBERS_BYTES", keep_bytes)
    rng = np.random.default_rng(8)
    mats = [rng.standard_normal((10, 3)) for _ in range(60)]
    source = array_source(mats)
    reader = CachedReader(source, 1 << 30)
    norms2 = np.array([np.sum(a**2) for a in mats])
    estimator = make_estimator("incremental", 2, 10)

    class Optimistic:
        rank, group_columns = estimator.rank, estimator.group_columns

        def empty(self):
            return Halved(estimator.empty())

    class Halved:
        def __init__(self, state):
            self.state = state

        bound = property(lambda self: self.state.bound / 2)
        order_basis = lambda self: self.state.order_basis()  # noqa: E731
        screen = lambda self: None  # noqa: E731  (every candidate through an update)

        def prefixes(self, block, ends, norms2, loss2):
            inner = self.state.prefixes(block, ends, norms2, loss2)

            class Wrapped:
                __len__ = inner.__len__
                state = lambda _, p: Halved(inner.state(p))  # noqa: E731
                bound = lambda _, p: inner.bound(p) / 2  # noqa: E731

            return Wrapped()

    eps = 0.6
    driver = drv.GreedyDriver(reader, norms2, source.widths, Optimistic(), eps)
    clusters = list(driver.clusters())
    assert sum(c.trimmed for c in clusters) > 0
    assert sorted(np.concatenate([c.members for c in clusters]).tolist()) == list(range(60))
    for c in clusters:
        if c.factored:
            assert exact_error([mats[i] for i in c.members], 2) <= eps + 1e-12
        if c.batch is not None:
            np.testing.assert_array_equal(c.batch.indices, c.members)
            np.testing.assert_array_equal(c.batch.data, np.hstack([mats[i] for i in c.members]))
    assert any(c.batch is not None for c in clusters) == (keep_bytes is None)


@pytest.mark.parametrize("keep_bytes", [None, 0])
def test_driver_evicts_every_member_over_the_limit_from_large_clusters(keep_bytes, monkeypatch):
    """With ``evict_above`` every member of an emitted factored cluster is within it against
    the cluster's own top-r basis (numpy's SVD of the concatenation), the cluster within eps,
    and every matrix is emitted once. The clusters here are wider than the exact basis's
    buffer, so eviction rounds run on the members' downdated Gram before the exact basis."""
    from matclust import driver as drv
    from matclust.engine import exact_error, make_estimator
    from matclust.engine.exact import pending_limit

    if keep_bytes is not None:
        monkeypatch.setattr(drv, "KEEP_MEMBERS_BYTES", keep_bytes)
    rng = np.random.default_rng(9)
    m, r, eps, limit = 6, 2, 0.3, 0.2
    plane = np.linalg.qr(rng.standard_normal((m, r)))[0]
    # Most matrices near one plane, with noise of every size: some members are over the limit
    # while the cluster as a whole is within eps.
    noise = 10.0 ** rng.uniform(-3, -0.2, 400)
    mats = [plane @ rng.standard_normal((r, 3)) + s * rng.standard_normal((m, 3)) for s in noise]
    source = array_source(mats)
    reader = CachedReader(source, 1 << 30)
    norms2 = np.array([np.sum(a**2) for a in mats])
    driver = drv.GreedyDriver(reader, norms2, source.widths, make_estimator("incremental", r, m),
                              eps, evict_above=limit)
    clusters = list(driver.clusters())
    assert sorted(np.concatenate([c.members for c in clusters]).tolist()) == list(range(len(mats)))
    wide = [c for c in clusters if c.factored and c.columns > pending_limit(m)]
    assert wide and any(c.trimmed for c in wide), "no eviction from a wide cluster: shows nothing"
    for c in clusters:
        if not c.factored:
            continue
        blocks = [mats[i] for i in c.members]
        assert exact_error(blocks, r) <= eps + 1e-12
        u = np.linalg.svd(np.hstack(blocks))[0][:, :r]
        own = [np.linalg.norm(b - u @ (u.T @ b)) / np.linalg.norm(b) for b in blocks[1:]]
        assert max(own, default=0.0) <= limit * (1 + 1e-9)


def test_both_modes_order_wide_and_tall_candidates_alike():
    """Blocks with m >= 4 (r + p) rows and more than r columns (PDE trajectories): the residual
    order measures candidates against the seed's r + p tracked directions, in memory on the
    matrices and out of core on their summaries, which then keep r + p directions too (here
    all of each matrix). Many candidates lie inside those directions (their residual is
    rounding, different in each mode); they come first in both, by their residual against the
    seed's top r. Checked against numpy."""
    rng = np.random.default_rng(7)
    m, n, rank, K = 64, 16, 2, 90
    estimator = make_estimator("incremental", rank, m)
    k = estimator.order_rank
    assert k == rank + defaults.OVERSAMPLING and m >= 4 * k  # the rule applies
    shared = basis(rng, m, k)
    mats = []
    for i in range(K):
        if i % 3:  # inside the shared k directions, with more or less energy beyond the top r
            spectrum = np.r_[np.ones(rank), rng.uniform(0, 0.3, k - rank)] * rng.uniform(1, 3)
            mats.append(shared @ (spectrum[:, None] * basis(rng, n, k).T))
        else:  # of rank k too (their summaries hold them whole), partly outside the k
            tilted = basis(rng, m, k) * rng.uniform(0.05, 0.5) + shared
            mats.append(tilted @ rng.standard_normal((k, n)))
    mats[0] = shared @ (np.linspace(3, 1, k)[:, None] * 4 * basis(rng, n, k).T)  # the seed
    source = array_source(mats)
    params = {"method": "incremental", "rank": rank, "oversampling": defaults.OVERSAMPLING,
              "order": "residual"}
    directions = summary_directions(source, params)  # what an out-of-core run keeps
    assert directions == k
    orders = []
    for reader in (CachedReader(source, 1 << 30),
                   SummaryReader(source, directions, 1 << 30, eps=0.05)):
        norms2 = np.array([float(np.sum(a * a)) for a in mats]) if isinstance(reader, CachedReader) \
            else reader.norms2
        driver = GreedyDriver(reader, norms2, source.widths, estimator, 0.05)
        seed = driver._seed(0)
        batch = reader.get(seed)
        state = driver._prefixes(estimator.empty(), batch, 0, len(seed)).state(len(seed))
        orders.append(np.concatenate(list(driver._candidates(seed, batch.blocks(), state))))
    assert list(seed) == [0]
    np.testing.assert_array_equal(orders[0], orders[1])
    # independent: numpy's top directions of the seed
    u = np.linalg.svd(mats[0])[0]
    outside_k = np.array([residual2_numpy(u[:, :k], a) / np.sum(a * a) for a in mats])
    outside_r = np.array([residual2_numpy(u[:, :rank], a) for a in mats])
    inside = np.flatnonzero(outside_k < 1e-9)[1:]
    assert len(inside) > K / 2
    np.testing.assert_array_equal(orders[0][: len(inside)], inside[np.argsort(outside_r[inside])])
