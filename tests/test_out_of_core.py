"""The out-of-core mode: clustering on per-matrix summaries, storing in sequential passes.

Everything asserted here is recomputed independently with numpy from the input (read back with
h5py / zarr through conftest): every stored cluster's error, the exact best rank-r error of every
cluster (SVD of the concatenation), the contract's store layout. matclust writes the inputs.

Out-of-core stores list each cluster's members in ascending index order (the streaming passes
need it), not in the order they joined; the contract checker of conftest expects the greedy
order's largest member first, so the clusters are re-ordered (columns with them) before it runs.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

import matclust.sources.base as sources_base
import matclust.streaming as streaming
from conftest import (PAPER, check_partition, check_stored_dtypes, concat, load_input, read_store,
                      run_matclust, sq, wide)
from matclust import MatrixClusterer
from matclust import limits
from matclust.collections_io import write_collection
from matclust.engine.estimators import make_estimator
from matclust.errors import InputError
from matclust.sample import planted_collection
from matclust.sources import array_source, open_source
from matclust.sources.summary import SummaryReader
from matclust.store import ResultWriter
from matclust.verify import verify_store

DATASET = "matrices"


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Small SVDs (the checks' and matclust's) on one BLAS thread: with other processes busy,
    OpenBLAS threads made this module two to three times slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ---------------------------------------------------------------------------------------------
# Independent helpers
# ---------------------------------------------------------------------------------------------
def best_error(mats, r: int) -> float:
    """e_r(S) of the concatenation, from its tail singular values (numpy SVD)."""
    s2 = np.linalg.svd(concat(mats), compute_uv=False) ** 2
    total = float(np.sum(s2))
    return 0.0 if total == 0 else float(np.sqrt(min(1.0, np.sum(s2[r:]) / total)))


def write_input(path, mats, layout, chunk_len=None):
    data = np.stack(mats) if layout == "stack" else list(mats)
    write_collection(str(path), data, layout=layout, dataset=DATASET, chunk_len=chunk_len)
    return str(path)


def largest_first(cluster: dict, widths: np.ndarray, norms: np.ndarray) -> dict:
    """The cluster with its largest-norm member first (ties: lowest index), columns with it."""
    members = cluster["members"]
    lead = int(np.lexsort((members, -norms[members]))[0])
    perm = np.r_[lead, np.delete(np.arange(len(members)), lead)]
    offsets = np.concatenate([[0], np.cumsum(widths[members])])
    cols = np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in perm])
    out = {"members": members[perm]}
    for key in ("coefficients", "raw"):
        if key in cluster:
            out[key] = cluster[key][:, cols]
    if "basis" in cluster:
        out["basis"] = cluster["basis"]
    return out


def check_out_of_core_store(store_path, input_path, *, rank, eps, method="incremental",
                            order="residual", transpose=False):
    """Assert that an out-of-core result store honours the contract (README.md) and the guarantee.

    Returns (store, input matrices as clustered, recomputed errors)."""
    st = read_store(store_path)
    mats, names, on_disk = load_input(input_path, DATASET, transpose)
    where = f"store {store_path}"
    assert st.attrs.get("format") == "matclust/1" and st.attrs.get("complete") is True, where
    p = st.params
    assert p["mode"] == "out-of-core", f"{where}: params mode {p.get('mode')!r}"
    assert p["method"] == method and p["order"] == order and p["rank"] == rank, where
    assert p["eps"] == pytest.approx(eps) and p["transpose"] is transpose, where
    assert os.path.realpath(p["input"]) == os.path.realpath(input_path), where
    assert st.report["params"] == p, where
    assert st.cluster_keys == [str(c) for c in range(len(st.clusters))], where
    assert st.names == names, where
    widths = np.array([a.shape[1] for a in mats])
    norms = np.array([sq(a) for a in mats])
    m = mats[0].shape[0]
    for c, cl in enumerate(st.clusters):
        members = cl["members"]
        assert np.all(np.diff(members) > 0), f"{where}: cluster {c} members not ascending"
        # Raw versus factored: factored only when it pays (the paper's rule), and a cluster
        # that pays is stored raw only when rounding left no room below eps.
        N = int(widths[members].sum())
        pays = len(members) >= 2 and rank * (m + N) < m * N
        if "basis" in cl:
            assert pays, f"{where}: cluster {c} stored factored though r(m+N) >= mN"
        elif pays:
            e_r = best_error([mats[i] for i in members], rank)
            single = np.finfo(np.dtype(on_disk) if np.dtype(on_disk).kind != "i" else np.float32)
            assert e_r > eps - 64 * single.eps, f"{where}: cluster {c} stored raw needlessly"
    reordered = [largest_first(cl, widths, norms) for cl in st.clusters]
    errors = check_partition(mats, st.labels, reordered, st.report, rank=rank, eps=eps,
                             where=where, input_itemsize=np.dtype(on_disk).itemsize)
    check_stored_dtypes(store_path, on_disk, st)
    ver = verify_store(store_path)
    assert ver["ok"], f"{where}: verify: {ver['problems']} over eps {ver['over_eps']}"
    return st, mats, errors


def fit_out_of_core(input_path, out, *, transpose=False, **params):
    src = open_source(input_path, DATASET, transpose)
    with src:
        return MatrixClusterer(guarantee="cluster", encoding="plain", mode="out-of-core", **params).fit(src, str(out))


# ---------------------------------------------------------------------------------------------
# Collections
# ---------------------------------------------------------------------------------------------
def collection(kind, dtype, K, m, widths, seed, *, scale=1.0, subspaces=3, sub_rank=2,
               noise=0.01):
    """Matrices (m x widths[i]) of one kind, with an all-zero matrix and duplicates planted."""
    rng = np.random.default_rng(seed)
    cplx = np.dtype(dtype).kind == "c"

    def gauss(*shape):
        g = rng.standard_normal(shape)
        return g + 1j * rng.standard_normal(shape) if cplx else g

    bases = [np.linalg.qr(gauss(m, sub_rank))[0] for _ in range(subspaces)]
    mats = []
    for i in range(K):
        n = int(widths[i])
        if kind == "random":
            a = gauss(m, n)
        else:
            a = bases[rng.integers(subspaces)] @ gauss(sub_rank, n)
            if kind == "planted":
                a = a + noise * np.linalg.norm(a) / np.sqrt(m * n) * gauss(m, n)
        mats.append(a * 10 ** rng.uniform(-1, 1) * scale)
    mats[1] = np.zeros_like(mats[1])
    for dup in (4, 7):  # duplicates of matrix 2 (same width)
        if widths[dup] == widths[2]:
            mats[dup] = mats[2].copy()
    mats[K - 1] = mats[2].copy() if widths[K - 1] == widths[2] else mats[K - 1]
    return [a.astype(dtype) for a in mats]


GUARANTEE_CASES = [
    # id, kind, dtype, layout, K, m, (n_min, n_max), rank, eps, method, order, scale, out, transpose
    ("random-f32-stack", "random", "float32", "stack", 70, 6, (4, 4), 3, 0.3, "incremental",
     "residual", 1.0, ".h5", False),
    ("planted-f64-group", "planted", "float64", "group", 90, 10, (1, 7), 3, 0.05, "incremental",
     "norm", 1.0, ".zarr", False),
    ("planted-c64-wide", "planted", "complex64", "stack", 80, 8, (6, 6), 2, 0.05, "incremental",
     "residual", 1.0, ".h5", False),
    ("random-c128-group", "random", "complex128", "group", 60, 5, (1, 6), 2, 0.5, "residual",
     "residual", 1.0, ".zarr", False),
    ("lowrank-f64-exact", "lowrank", "float64", "stack", 80, 9, (3, 3), 2, 1e-3, "incremental",
     "residual", 1.0, ".h5", False),
    ("lowrank-f32-weyl", "lowrank", "float32", "group", 60, 7, (1, 2), 2, 0.02, "weyl", "norm",
     1.0, ".zarr", False),
    ("tiny-f32", "planted", "float32", "stack", 70, 8, (5, 5), 3, 0.05, "incremental",
     "residual", 1e-30, ".zarr", False),
    ("huge-f64", "planted", "float64", "group", 70, 8, (2, 9), 3, 0.05, "residual", "norm",
     1e30, ".h5", False),
    ("huge-c128-transposed", "planted", "complex128", "group", 50, 6, (3, 8), 2, 0.1,
     "incremental", "residual", 1e30, ".h5", True),
]


@pytest.mark.parametrize("case", GUARANTEE_CASES, ids=[c[0] for c in GUARANTEE_CASES])
def test_guarantee(tmp_path, case):
    (_, kind, dtype, layout, K, m, (lo, hi), rank, eps, method, order, scale, ext,
     transpose) = case
    rng = np.random.default_rng(zlib.crc32(case[0].encode()))
    widths = np.full(K, lo) if layout == "stack" else rng.integers(lo, hi + 1, size=K)
    mats = collection(kind, dtype, K, m, widths, seed=len(case[0]), scale=scale)
    on_disk = [a.T.copy() for a in mats] if transpose else mats
    inp = write_input(tmp_path / f"in{'.h5' if ext == '.zarr' else '.zarr'}", on_disk, layout)
    out = tmp_path / f"out{ext}"
    mc = fit_out_of_core(inp, out, transpose=transpose, rank=rank, eps=eps, method=method,
                         order=order, patience=3)
    st, clustered, errors = check_out_of_core_store(out, inp, rank=rank, eps=eps, method=method,
                                                    order=order, transpose=transpose)
    assert max(errors) <= eps
    assert np.array_equal(mc.labels_, st.labels)
    # every reported bound covers the best rank-r error of its cluster (checked with 1e-9
    # slack in check_partition; here with a relative one for the all-zero / e_r = 0 cases)
    for c, cl in enumerate(st.clusters):
        e_r = best_error([clustered[i] for i in cl["members"]], rank)
        assert mc.cluster_stats_[c]["bound"] >= e_r * (1 - 1e-9), (c, mc.cluster_stats_[c], e_r)


def test_patience_singletons_report_their_exact_error(tmp_path):
    """Singletons emitted by the patience shortcut were never bounded by an estimator; their
    reported bound must still cover e_r (it was 0, the raw storage error, before)."""
    rng = np.random.default_rng(5)
    mats = [rng.standard_normal((6, 5)) for _ in range(40)]
    inp = write_input(tmp_path / "in.h5", mats, "stack")
    mc = fit_out_of_core(inp, tmp_path / "out.h5", rank=2, eps=0.05, patience=1)
    singles = [s for s in mc.cluster_stats_ if s["size"] == 1]
    assert len(singles) >= 30
    st = read_store(tmp_path / "out.h5")
    exact = 0
    for s in singles:
        members = st.clusters[s["id"]]["members"]
        e_r = best_error([mats[i] for i in members], 2)
        assert e_r > 0.1 and s["bound"] >= e_r * (1 - 1e-12), (s, e_r)
        exact += s["bound"] == pytest.approx(e_r, rel=1e-9)  # the patience ones: e_r itself
    assert exact >= 30
    check_out_of_core_store(tmp_path / "out.h5", inp, rank=2, eps=0.05)


def test_eps_below_single_precision_uses_double_summaries(tmp_path):
    """eps = 1e-6 is below what float32 summaries can certify (their rounding floor is ~2.6e-4):
    the summaries are kept in float64, so exactly low-rank matrices still cluster, and every
    stored cluster honours eps."""
    mats = collection("lowrank", "float64", 30, 8, np.full(30, 1), seed=3)
    inp = write_input(tmp_path / "in.h5", mats, "stack")
    mc = fit_out_of_core(inp, tmp_path / "out.zarr", rank=3, eps=1e-6, patience=0)
    assert any(s["size"] > 3 for s in mc.cluster_stats_)
    check_out_of_core_store(tmp_path / "out.zarr", inp, rank=3, eps=1e-6)


def test_small_eps_quality_on_exactly_low_rank(tmp_path):
    """eps below float32's rounding floor (~2.6e-4): the summaries are kept in float64."""
    mats, _ = planted_collection(300, 12, 3, 3, 2, 0.0, "float64", None, 0, 10.0)
    inp = write_input(tmp_path / "in.h5", list(mats), "stack")
    params = dict(rank=3, eps=1e-4)
    mem = MatrixClusterer(guarantee="cluster", encoding="plain", mode="in-memory", **params).fit(list(mats), str(tmp_path / "a.h5"))
    ooc = fit_out_of_core(inp, tmp_path / "b.h5", **params)
    assert ooc.compression_ratio_ >= 0.97 * mem.compression_ratio_


# ---------------------------------------------------------------------------------------------
# Clusters spanning many input batches: _ColumnSink offsets
# ---------------------------------------------------------------------------------------------
class _FakeWriter:
    def __init__(self):
        self.arrays, self.created = {}, []

    def write_array(self, name, data):
        assert name not in self.arrays
        self.arrays[name] = np.array(data, copy=True)

    def create_array(self, name, shape, dtype, chunks=None):
        assert name not in self.arrays
        self.created.append((name, chunks))
        self.arrays[name] = np.full(shape, np.nan, dtype=dtype)
        return self.arrays[name]


@pytest.mark.parametrize("total", [1, 4, 5, 12, 13, 37])
def test_column_sink_writes_every_column_in_place(monkeypatch, total):
    monkeypatch.setattr(streaming, "COLUMN_CHUNK", 4)
    rng = np.random.default_rng(total)
    full = rng.standard_normal((3, total)).astype(np.float32)
    writer = _FakeWriter()
    sink = streaming._ColumnSink(writer, "x", 3, total, np.float32)
    cuts = np.sort(rng.integers(0, total + 1, size=5))
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, total]):
        sink.add(full[:, a:b])  # pieces of any size, some empty
    sink.flush()
    sink.flush()  # a second flush writes nothing more
    assert np.array_equal(writer.arrays["x"], full)
    assert (total > 4) == bool(writer.created), writer.created  # one piece when it fits


@pytest.mark.parametrize("dtype,layout,in_ext", [("float32", "group", ".h5"),
                                                 ("complex64", "stack", ".zarr")])
def test_clusters_spanning_many_batches(tmp_path, monkeypatch, dtype, layout, in_ext):
    """Tiny input batches and storage chunks: every factored cluster's columns arrive in many
    batches and are written in many pieces; the stored offsets must still match."""
    monkeypatch.setattr(sources_base, "TARGET_BATCH_BYTES", 400)
    monkeypatch.setattr(streaming, "COLUMN_CHUNK", 7)
    created = []
    real_create = ResultWriter.create_array

    def spy(self, name, shape, dtype, chunks=None):
        created.append((name, shape, chunks))
        return real_create(self, name, shape, dtype, chunks)

    monkeypatch.setattr(ResultWriter, "create_array", spy)
    rng = np.random.default_rng(11)
    widths = rng.integers(1, 6, size=120) if layout == "group" else np.full(120, 3)
    mats = collection("planted", dtype, 120, 8, widths, seed=4, subspaces=4)
    inp = write_input(tmp_path / f"in{in_ext}", mats, layout, chunk_len=2)  # chunks of 2
    for ext in (".h5", ".zarr"):
        created.clear()
        out = tmp_path / f"out{ext}"
        fit_out_of_core(inp, out, rank=2, eps=0.05, patience=0)
        with open_source(inp, DATASET) as src:
            ranges = src.chunk_ranges()
        assert len(ranges) >= 20, ranges  # the patch took effect: many small batches
        st, _, _ = check_out_of_core_store(out, inp, rank=2, eps=0.05)
        starts = np.array([s for s, _ in ranges])
        spans = [len(np.unique(np.searchsorted(starts, cl["members"], side="right")))
                 for cl in st.clusters if "basis" in cl]
        assert len(spans) >= 3 and min(sorted(spans)[-3:]) >= 5, spans
        pieces = [c for c in created if c[0].endswith("/coefficients")]
        assert len(pieces) >= 3 and all(c[2] == (2, 7) for c in pieces), created


def test_store_planned_offsets_and_raw_fallback(monkeypatch):
    """store_planned on hand-made plans, interleaved over many batches: a cluster whose exact
    error leaves less than the storage rounding's room below eps is stored raw (columns in
    ascending member order), the others factored; patience singletons get their exact e_r."""
    from matclust.driver import FormedCluster

    monkeypatch.setattr(sources_base, "TARGET_BATCH_BYTES", 200)
    monkeypatch.setattr(streaming, "COLUMN_CHUNK", 3)
    rng = np.random.default_rng(2)
    K, m, rank = 41, 6, 2
    widths = rng.integers(1, 5, size=K)
    basis = np.linalg.qr(rng.standard_normal((m, rank)))[0]
    mats = []
    for i in range(K):
        noise = 1e-3 if i % 2 == 0 else 3e-2
        a = basis @ rng.standard_normal((rank, widths[i]))
        mats.append((a + noise * rng.standard_normal((m, widths[i]))).astype(np.float32))
    even, odd = np.arange(0, K - 1, 2), np.arange(1, K - 1, 2)
    e_even = best_error([mats[i] for i in even], rank)
    e_odd = best_error([mats[i] for i in odd], rank)
    eps = e_odd + 1e-6  # within 16 float32 ulps of eps: no room for rounding
    assert e_even < eps / 10
    planned = [FormedCluster(rng.permutation(even), int(widths[even].sum()), 0.9 * eps, True),
               FormedCluster(rng.permutation(odd), int(widths[odd].sum()), eps, True),
               FormedCluster(np.array([K - 1]), int(widths[K - 1]), None, False)]
    writer = _FakeWriter()
    src = array_source(mats)
    assert len(src.chunk_ranges()) >= 10
    labels, encoded = streaming.store_planned(src, planned, rank, eps, writer, 2**24)
    assert labels.tolist() == [0 if i % 2 == 0 else 1 for i in range(K - 1)] + [2]
    arrays = writer.arrays
    assert np.array_equal(arrays["clusters/0/members"], even)
    assert np.array_equal(arrays["clusters/1/members"], odd)
    # cluster 0: factored, columns of the members in ascending order
    U, C = wide(arrays["clusters/0/basis"]), wide(arrays["clusters/0/coefficients"])
    M = concat([mats[i] for i in even])
    assert U.shape == (m, rank) and C.shape == (rank, M.shape[1])
    err = np.sqrt(sq(M - U @ C) / sq(M))
    assert err <= eps and err == pytest.approx(e_even, rel=1e-3)
    assert encoded[0].rank == rank and encoded[0].error == pytest.approx(err, rel=1e-6)
    assert encoded[0].bound == pytest.approx(0.9 * eps)
    # cluster 1: raw, exactly the members' columns side by side
    assert "clusters/1/basis" not in arrays
    assert np.array_equal(arrays["clusters/1/raw"], np.hstack([mats[i] for i in odd]))
    assert encoded[1].rank == 0 and encoded[1].error == 0.0 and encoded[1].bound == eps
    # the singleton: raw, bound = its own e_r
    assert np.array_equal(arrays["clusters/2/raw"], mats[K - 1])
    assert encoded[2].bound == pytest.approx(best_error([mats[K - 1]], rank), rel=1e-9)
    assert [e.numbers for e in encoded] == [U.size + C.size, m * int(widths[odd].sum()),
                                            m * int(widths[K - 1])]


# ---------------------------------------------------------------------------------------------
# The Mirsky-corrected bound, fed summaries directly
# ---------------------------------------------------------------------------------------------
def _summaries(mats, rank, precision):
    src = array_source(mats)
    K, m = len(mats), mats[0].shape[0]
    s = min(rank, m, max(a.shape[1] for a in mats))
    need = K * m * s * (8 if np.iscomplexobj(mats[0]) else 4)
    # eps 0.01 rules out two-byte fixed point (rated at float16's floor, ~0.024); eps 0.1
    # allows it, and a budget one byte short of single precision forces it.
    if precision == "single":
        return SummaryReader(src, rank, need, eps=0.01)
    reader = SummaryReader(src, rank, need - 1, eps=0.1)
    return reader


@pytest.mark.parametrize("dtype,precision", [("float32", "single"), ("float64", "single"),
                                             ("float64", "half"), ("float32", "half"),
                                             ("complex64", "single"), ("complex128", "single")])
def test_summary_bound_covers_exact_error(dtype, precision):
    rng = np.random.default_rng(len(dtype) + len(precision))
    cplx = np.dtype(dtype).kind == "c"
    checked, uncorrected_misses = 0, 0
    for trial in range(6):
        K, m, rank = 36, int(rng.integers(4, 12)), int(rng.integers(1, 4))
        kind = ("random", "lowrank", "planted")[trial % 3]
        widths = rng.integers(1, 7, size=K)
        mats = collection(kind, dtype, K, m, widths, seed=trial, sub_rank=max(1, rank - trial % 2),
                          noise=1e-4)
        mats = [a * 10 ** rng.uniform(-3, 3) for a in mats]
        mats = [a.astype(dtype) for a in mats]
        rd = _summaries(mats, rank, precision)
        assert rd.store_dtype == np.dtype(
            np.complex64 if cplx else (np.float32 if precision == "single" else np.int16))
        # the summary's own invariants, from numpy
        for i in range(K):
            # the reader works in its source's working scale: matrix i times 2**exponents[i]
            a = wide(mats[i]) * 2.0 ** int(rd.source.exponents[i])
            sig = np.linalg.svd(a, compute_uv=False)
            assert rd.norms2[i] == pytest.approx(float(np.sum(sig**2)), rel=1e-12, abs=0)
            f = rd.blocks_of([i])[0]
            sf = np.linalg.svd(f, compute_uv=False)[: len(sig)]
            top = np.zeros(len(sf))
            top[: min(rd.s, len(sig))] = sig[: rd.s]
            # Mirsky for the rounding alone: |sigma(F~) - sigma(F)|_2 <= delta
            assert np.linalg.norm(sf - top) <= np.sqrt(rd.loss2[i]) * (1 + 1e-6) + 1e-12 * sig[0]
        for method in ("incremental", "residual", "weyl"):
            est = make_estimator(method, rank, m, cplx)
            for _ in range(12):
                S = rng.choice(K, size=int(rng.integers(1, 16)), replace=False)
                state = plain = est.empty()
                for i, block in zip(S, rd.blocks_of(S)):
                    state = state.extend(block, float(rd.norms2[i]), float(rd.loss2[i]))
                    plain = plain.extend(block, float(rd.norms2[i]), 0.0)
                e_r = best_error([mats[i] for i in S], rank)
                assert state.bound >= e_r, (trial, method, S, state.bound, e_r)
                uncorrected_misses += plain.bound < e_r - 1e-12
                checked += 1
    assert checked == 6 * 3 * 12
    if not cplx:
        # the check has teeth: without the Mirsky correction the bound fails somewhere
        assert uncorrected_misses > 0


# ---------------------------------------------------------------------------------------------
# Half-precision summaries (small memory limit) and auto mode, on one > 16 MiB collection
# ---------------------------------------------------------------------------------------------
BIG = dict(K=1500, m=128, n=12, rank=12, eps=0.1)  # eps >= 0.073 admits int16 summaries


def summaries_limit(itemsize: int, K=BIG["K"], m=BIG["m"], s=min(BIG["rank"], BIG["m"], BIG["n"])) -> int:
    """The smallest memory limit whose plan holds the summaries at ``itemsize`` bytes a number."""
    return limits.smallest_limit(lambda x: limits.plan(x, K, K, K * m * s * itemsize) is not None)


@pytest.fixture(scope="module")
def big_runs(tmp_path_factory):
    """One planted float64 collection larger than the 16 MiB budget floor, clustered in memory
    (auto, default limit) and out of core (auto, 1 MiB limit), with the summary readers made."""
    tmp = tmp_path_factory.mktemp("big")
    K, m, n = BIG["K"], BIG["m"], BIG["n"]
    mats, _ = planted_collection(K, m, n, 5, 8, 0.01, "float64", None, 0, 10.0)
    inp = write_input(tmp / "in.h5", list(mats), "stack")
    readers = []
    real = SummaryReader.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        readers.append(self)

    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SummaryReader, "__init__", spy)
        for name, limit in (("default", 2**30), ("small", summaries_limit(2))):
            start = len(readers)
            with open_source(inp, DATASET) as src:
                mc = MatrixClusterer(guarantee="cluster", encoding="plain", rank=BIG["rank"], eps=BIG["eps"], mode="auto",
                                     memory_limit=limit).fit(src, str(tmp / f"{name}.h5"))
            runs[name] = (mc, readers[start:], tmp / f"{name}.h5")
    return inp, [np.asarray(a) for a in mats], runs


@pytest.mark.parametrize("kind", ["planted", "random", "lowrank"])
def test_two_byte_summaries_lose_no_more_than_float16(kind):
    """The int16 fixed-point summaries' rounding loss against float16 rounding of the same
    summaries (numpy): no larger on average. (That the stored loss is a valid Mirsky
    correction is checked above, with the 'half' cases.)"""
    rng = np.random.default_rng(11)
    K, m, rank = 200, 24, 6
    widths = rng.integers(2, 9, size=K)
    mats = collection(kind, "float64", K, m, widths, seed=3, sub_rank=4, noise=1e-3)
    s = min(rank, m, int(widths.max()))
    reader = SummaryReader(array_source(mats), rank, K * m * s * 4 - 1, eps=0.1)
    assert reader.store_dtype == np.int16
    ours, half = [], []
    for i, a in enumerate(mats):
        u, sig, _ = np.linalg.svd(wide(a), full_matrices=False)
        k = min(s, len(sig))
        exact = u[:, :k] * sig[:k]
        norm = np.linalg.norm(exact)
        if norm == 0:
            continue
        rounded16 = (exact / norm).astype(np.float16).astype(np.float64) * norm
        ours.append(np.sqrt(reader.loss2[i]) / norm)
        half.append(np.linalg.norm(rounded16 - exact) / norm)
    assert np.mean(ours) <= np.mean(half)


def test_half_precision_summaries_keep_the_guarantee(big_runs):
    inp, mats, runs = big_runs
    mc, readers, out = runs["small"]
    K, m, rank = BIG["K"], BIG["m"], BIG["rank"]
    budget = limits.plan(summaries_limit(2), K, K, 0).cache
    s = min(rank, m, BIG["n"])
    assert K * m * s * 4 > budget >= K * m * s * 2  # float32 does not fit, int16 does
    assert len(readers) == 1 and readers[0].store_dtype == np.int16 and readers[0].s == s
    assert readers[0].loss2.max() > 0
    st, clustered, errors = check_out_of_core_store(out, inp, rank=rank, eps=BIG["eps"])
    assert max(errors) <= BIG["eps"]
    for c, cl in enumerate(st.clusters):
        e_r = best_error([clustered[i] for i in cl["members"]], rank)
        assert mc.cluster_stats_[c]["bound"] >= e_r
    # and it still compresses like the in-memory run
    mem = runs["default"][0]
    assert mc.compression_ratio_ >= 0.97 * mem.compression_ratio_ > 5


def test_half_precision_quality_at_small_eps(big_runs, tmp_path):
    """eps = 0.02 is below the two-byte summaries' rated floor (~0.024): float32 summaries with fewer
    directions are used instead, and the compression matches the in-memory run."""
    inp, _, runs = big_runs
    params = dict(rank=BIG["rank"], eps=0.02)
    with open_source(inp, DATASET) as src:
        mem = MatrixClusterer(guarantee="cluster", encoding="plain", mode="in-memory", **params).fit(src, str(tmp_path / "a.h5"))
    ooc = fit_out_of_core(inp, tmp_path / "b.h5", memory_limit=summaries_limit(4), **params)
    assert ooc.compression_ratio_ >= 0.97 * mem.compression_ratio_


def test_auto_mode_picks_by_memory_limit(big_runs, tmp_path):
    _, mats, runs = big_runs
    mem, mem_readers, _ = runs["default"]
    ooc, ooc_readers, out = runs["small"]
    assert mem.report_["params"]["mode"] == "in-memory" and not mem_readers
    assert ooc.report_["params"]["mode"] == "out-of-core" and len(ooc_readers) == 1
    assert read_store(out).params["mode"] == "out-of-core"
    # in memory, members keep the order they joined in (the seed, the largest, first)
    norms = np.array([sq(a) for a in mats])
    st = read_store(runs["default"][2])
    assert any(np.any(np.diff(cl["members"]) < 0) for cl in st.clusters)
    assert all(norms[cl["members"][0]] == norms[cl["members"]].max() for cl in st.clusters)
    # without an output store, auto stays in memory whatever the limit
    mats_small = [a[:, :4] for a in mats[:200]]
    least = limits.smallest_limit(lambda x: limits.plan(x, 200, 200) is not None)
    small = MatrixClusterer(rank=4, eps=0.1, mode="auto", memory_limit=least)
    assert small.fit(mats_small).report_["params"]["mode"] == "in-memory"


@pytest.mark.parametrize("threshold,expected", [(2**20, "out-of-core"), (2**30, "in-memory")])
def test_auto_mode_runs_large_collections_out_of_core(tmp_path, monkeypatch, threshold, expected):
    """Above AUTO_OUT_OF_CORE_BYTES auto runs out of core even with room to spare (the limit
    here is the default 1 GiB); below it, in memory. Either way the store honours eps."""
    import matclust.api as api

    mats, _ = planted_collection(400, 24, 16, 4, 3, 0.01, "float64", None, 2, 10.0)
    inp = write_input(tmp_path / "in.h5", list(mats), "stack")
    assert 400 * 24 * 16 * 8 > 2**20
    monkeypatch.setattr(api, "AUTO_OUT_OF_CORE_BYTES", threshold)
    with open_source(inp, DATASET) as src:
        mc = MatrixClusterer(guarantee="cluster", encoding="plain", rank=4, eps=0.1, mode="auto").fit(src, str(tmp_path / "out.h5"))
    assert mc.report_["params"]["mode"] == expected
    assert read_store(tmp_path / "out.h5").params["mode"] == expected
    assert verify_store(str(tmp_path / "out.h5"))["ok"]


@pytest.mark.parametrize("width,expected", [(4, "in-memory"), (5, "out-of-core")])
def test_auto_mode_keeps_matrices_no_wider_than_the_rank_in_memory(tmp_path, monkeypatch, width,
                                                                   expected):
    """Above AUTO_OUT_OF_CORE_BYTES, matrices no wider than the rank run in memory (their
    summaries would be as large as they are); one column more and the summaries are the smaller,
    so auto runs out of core. Either way the store holds every matrix within eps."""
    import matclust.api as api

    mats, _ = planted_collection(300, 24, width, 3, 3, 0.01, "float64", None, 2, 10.0)
    inp = write_input(tmp_path / "in.h5", list(mats), "stack")
    assert 300 * 24 * width * 8 > 2**15
    monkeypatch.setattr(api, "AUTO_OUT_OF_CORE_BYTES", 2**15)
    out = tmp_path / "out.h5"
    with open_source(inp, DATASET) as src:
        mc = MatrixClusterer(rank=4, eps=0.1, mode="auto").fit(src, str(out))
    assert mc.report_["params"]["mode"] == expected
    assert read_store(out).params["mode"] == expected
    assert verify_store(str(out))["ok"]
    assert mc.report_["max_matrix_error"] <= 0.1


# ---------------------------------------------------------------------------------------------
# Quality against the in-memory mode
# ---------------------------------------------------------------------------------------------
QUALITY_CASES = [
    # K, m, n, n_max, subspaces, sub_rank, noise, dtype, rank, eps, layout
    (3000, 16, 4, None, 6, 3, 0.01, "float32", 4, 0.05, "stack"),
    (2000, 20, 2, 9, 8, 4, 0.02, "float64", 5, 0.05, "group"),
    (1000, 12, 6, None, 4, 2, 0.005, "complex64", 3, 0.02, "stack"),
    (1200, 24, 10, None, 5, 3, 0.01, "float64", 3, 0.03, "stack"),
]


@pytest.mark.parametrize("case", QUALITY_CASES, ids=[f"{c[7]}-K{c[0]}" for c in QUALITY_CASES])
def test_quality_matches_in_memory(tmp_path, case):
    K, m, n, n_max, subspaces, sub_rank, noise, dtype, rank, eps, layout = case
    mats, _ = planted_collection(K, m, n, subspaces, sub_rank, noise, dtype, n_max, 1, 10.0)
    mats = list(mats)
    inp = write_input(tmp_path / "in.h5", mats, layout)  # a Zarr group of 2000 arrays is slow
    with open_source(inp, DATASET) as src:
        mem = MatrixClusterer(guarantee="cluster", encoding="plain", rank=rank, eps=eps, mode="in-memory").fit(src, str(tmp_path / "a.h5"))
    ooc = fit_out_of_core(inp, tmp_path / "b.zarr", rank=rank, eps=eps)
    assert ooc.compression_ratio_ >= 0.97 * mem.compression_ratio_, (
        ooc.compression_ratio_, mem.compression_ratio_)
    assert mem.compression_ratio_ > 2  # the planted structure was found at all
    check_out_of_core_store(tmp_path / "b.zarr", inp, rank=rank, eps=eps)


# ---------------------------------------------------------------------------------------------
# Bad requests
# ---------------------------------------------------------------------------------------------
def _too_many_rows_for_summaries():
    """K * m * 2 bytes (one two-byte direction each) above the 8 MiB summary floor."""
    K, m = 65600, 64
    assert K * m * 2 > (16 * 2**20) // 2
    return K, m


def test_memory_limit_too_small_for_one_direction(tmp_path):
    K, m = _too_many_rows_for_summaries()
    X = np.broadcast_to(np.ones(1, np.float32), (K, m, 1))  # no memory behind it
    out = tmp_path / "out.h5"
    with pytest.raises(InputError, match=r"65600 matrices of 64 rows needs --memory-limit \d+MiB at least"):
        MatrixClusterer(guarantee="cluster", encoding="plain", rank=2, eps=0.1, mode="out-of-core", memory_limit=2**20).fit(X, str(out))
    assert not out.exists()


def test_memory_limit_too_small_through_the_cli(tmp_path):
    import h5py

    K, m = _too_many_rows_for_summaries()
    inp = tmp_path / "big.h5"
    with h5py.File(inp, "w") as f:  # never written: the file stays tiny
        f.create_dataset(DATASET, shape=(K, m, 1), dtype="float32", chunks=(4096, m, 1))
    out = tmp_path / "out.h5"
    res = run_matclust("cluster", *PAPER, inp, "-o", out, "--rank", 2, "--eps", 0.1,
                       "--mode", "out-of-core", "--memory-limit", "1MiB", check=2)
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and str(inp) in line and "--memory-limit" in line, res
    assert not out.exists()


def test_out_of_core_needs_an_output_store():
    X = np.random.default_rng(0).standard_normal((10, 4, 2))
    with pytest.raises(InputError, match="output store"):
        MatrixClusterer(guarantee="cluster", encoding="plain", rank=2, eps=0.1, mode="out-of-core").fit(X)


def test_out_of_core_rejects_baselines(tmp_path):
    X = np.random.default_rng(0).standard_normal((10, 4, 2))
    with pytest.raises(InputError, match="out-of-core"):
        MatrixClusterer(guarantee="cluster", encoding="plain", rank=2, eps=0.1, method="random", n_clusters=2,
                        mode="out-of-core").fit(X, str(tmp_path / "o.h5"))
    assert not (tmp_path / "o.h5").exists()
