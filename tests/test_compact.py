"""The compact encoding (matclust/2) and the per-matrix guarantee, checked against the input
with the independent decoder of tests/conftest.py (numpy + h5py/zarr only)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import check_compact, decode_compact, load_input, read_store, run_inprocess, write_planted
from matclust.engine import budget as qb


# -- the numerics -------------------------------------------------------------------------------
def test_zigzag_and_steps_round_trip():
    codes = np.array([0, -1, 1, -2, 2, 12345, -(2**40)], dtype=np.int64)
    assert np.array_equal(qb.unzigzag(qb.zigzag(codes)), codes)
    assert list(qb.zigzag(codes[:5])) == [0, 1, 2, 3, 4]
    steps = np.array([1e-300, 3e-5, 0.1, 1.0, 7.5, 1e300])
    e = qb.step_exponents(steps)
    got = qb.step_values(e)
    # the grid value never exceeds the step asked for, and is within one grid point of it
    assert np.all(got <= steps) and np.all(got > steps * 2 ** (-1 / 16) * (1 - 1e-12))
    assert qb.step_values(np.array([qb.ZERO_STEP]))[0] == 0.0


@pytest.mark.parametrize("complex_data", [False, True])
@pytest.mark.parametrize("allocation", ["matrix", "proportional", "uniform"])
def test_quantise_meets_eps_on_decoded_values(complex_data, allocation):
    rng = np.random.default_rng(3)
    m, r, widths = 24, 5, [3, 1, 6, 2]
    basis, _ = np.linalg.qr(rng.standard_normal((m, r)))
    blocks = []
    for k, n in enumerate(widths):
        b = basis @ rng.standard_normal((r, n)) + 0.01 * rng.standard_normal((m, n))
        if complex_data:
            b = b + 1j * (basis @ rng.standard_normal((r, n)))
        blocks.append(b * 10.0 ** (3 * k))  # norms 1 .. 1e9
    data = np.hstack(blocks)
    offsets = np.concatenate([[0], np.cumsum(widths)])
    rounded = basis.astype(np.complex64 if complex_data else np.float16)
    eps = 0.05
    q = qb.quantise(rounded, data, offsets, eps, allocation)
    assert q is not None
    errs = []
    for j, block in enumerate(blocks):
        codes = q.matrix_codes(offsets, j)
        dec = qb.decode(rounded, codes, qb.step_values(q.exponents[j : j + 1])[0], complex_data)
        errs.append(np.linalg.norm(block - dec) / np.linalg.norm(block))
        assert np.isclose(np.linalg.norm(block - dec) ** 2, q.err2[j], rtol=1e-9)
    if allocation != "matrix":
        total = np.sqrt(sum(np.linalg.norm(b - qb.decode(rounded, q.matrix_codes(offsets, j),
                        qb.step_values(q.exponents[j:j + 1])[0], complex_data)) ** 2
                        for j, b in enumerate(blocks)) / sum(np.linalg.norm(b) ** 2 for b in blocks))
        assert total <= eps
    else:
        assert max(errs) <= eps
        # the budget is spent, not wasted: every matrix lands close below eps
        assert min(errs) > 0.6 * eps


@pytest.mark.parametrize("allocation", ["matrix", "uniform"])
def test_steps_found_on_predicted_errors_are_checked_on_decoded_values(monkeypatch, allocation):
    """The step search runs on errors predicted from the coefficients; the decoded values have
    the last word. With predictions spoiled to a quarter of the truth the steps found are too
    coarse, the decoded check must catch it, and every matrix still lands within eps."""
    rng = np.random.default_rng(7)
    m, r, widths = 20, 4, [2, 3, 1, 4, 2]
    basis, _ = np.linalg.qr(rng.standard_normal((m, r)))
    blocks = [basis @ rng.standard_normal((r, n)) + 0.005 * rng.standard_normal((m, n))
              for n in widths]
    data = np.hstack(blocks)
    offsets = np.concatenate([[0], np.cumsum(widths)])
    rounded = basis.astype(np.float16)
    real_predicted = qb._GroupErrors.predicted
    spoiled = []

    def optimistic(self, exps):
        codes, err2 = real_predicted(self, exps)
        spoiled.append(codes is None)
        return codes, err2 * 0.25 if codes is None else err2

    monkeypatch.setattr(qb._GroupErrors, "predicted", optimistic)
    eps = 0.05
    q = qb.quantise(rounded, data, offsets, eps, allocation)
    assert q is not None and any(spoiled)
    errs = []
    for j, block in enumerate(blocks):
        dec = qb.decode(rounded, q.matrix_codes(offsets, j),
                        qb.step_values(q.exponents[j: j + 1])[0], False)
        errs.append(np.linalg.norm(block - dec) ** 2)
        assert np.isclose(errs[-1], q.err2[j], rtol=1e-9)
    norms2 = [np.linalg.norm(b) ** 2 for b in blocks]
    if allocation == "matrix":
        assert all(e <= eps ** 2 * n2 for e, n2 in zip(errs, norms2))
    else:
        assert sum(errs) <= eps ** 2 * sum(norms2)


def test_what_a_basis_derives_is_reused_for_its_parts_and_forgotten_with_it():
    """Out of core the parts of a cluster share its rounded basis, whose projector, Gram
    matrix and norm are derived once: the parts encode as with a fresh copy of the basis each
    (nothing stale), every decoded matrix within eps, and the derived arrays go with the
    basis."""
    import gc

    from matclust.compact import CompactEncoder

    rng = np.random.default_rng(5)
    enc = CompactEncoder(0.1, "matrix", 4, 20, np.float32)
    basis = enc.rounded(np.linalg.qr(rng.standard_normal((20, 4)))[0])
    for part in range(3):
        data = basis.astype(np.float64) @ rng.standard_normal((4, 30)) \
            + 0.005 * rng.standard_normal((20, 30))
        offsets = np.arange(0, 31, 3)
        shared = qb.quantise(basis, data, offsets, 0.1)
        fresh = qb.quantise(basis.copy(), data, offsets, 0.1)
        np.testing.assert_array_equal(shared.codes, fresh.codes)
        np.testing.assert_array_equal(shared.exponents, fresh.exponents)
        steps = qb.step_values(shared.exponents)
        for j, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            decoded = qb.decode(basis, shared.codes[:, a:b], steps[j], False)
            assert np.sum((data[:, a:b] - decoded) ** 2) <= 0.1 ** 2 * np.sum(data[:, a:b] ** 2)
    key = id(basis)
    assert key in qb._DERIVED
    del basis, shared, fresh
    gc.collect()
    assert key not in qb._DERIVED


def test_a_step_that_cannot_fail_exists():
    """The raw step 2 sqrt(budget / count) bounds every entry's rounding: no check needed."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 5)) ** 3
    eps = 0.01
    h = 2 * np.sqrt(eps**2 * np.sum(a * a) / a.size)
    err = np.linalg.norm(a - h * np.rint(a / h)) / np.linalg.norm(a)
    assert err <= eps


# -- whole runs, every matrix checked against the input -------------------------------------------
CASES = [
    ("float32", "stack", ".h5", "in-memory"),
    ("float64", "group", ".zarr", "in-memory"),
    ("float16", "stack", ".zarr", "out-of-core"),
    ("int32", "stack", ".h5", "out-of-core"),
    ("complex64", "stack", ".h5", "in-memory"),
    ("complex128", "group", ".h5", "out-of-core"),
    ("float32", "group", ".h5", "out-of-core"),
]


@pytest.mark.parametrize("guarantee", ["matrix", "cluster"])
@pytest.mark.parametrize("dtype,layout,ext,mode", CASES)
def test_every_matrix_within_eps(tmp_path, dtype, layout, ext, mode, guarantee):
    inp = os.fspath(tmp_path / f"in{ext}")
    write_planted(inp, K=80, m=12, n=3, n_max=5 if layout == "group" else None, subspaces=3,
                  rank=2, noise=0.02, dtype=dtype, layout=layout)
    out = os.fspath(tmp_path / f"out{ext}")
    eps = 0.1
    res = run_inprocess("cluster", inp, "-o", out, "--rank", "3", "--eps", str(eps), "--mode", mode,
                        "--guarantee", guarantee, "--json", check=0)
    report = res.json()
    mats, _, _ = load_input(inp)
    rel = check_compact(out, mats, eps, guarantee)
    assert report["guarantee"] == guarantee and report["encoding"] == "compact"
    assert report["max_matrix_error"] >= rel.max() - 1e-9
    assert report["file_bytes"] > 0
    assert report["bytes_ratio"] == pytest.approx(report["input_bytes"] / report["file_bytes"])
    run_inprocess("verify", out, check=0)
    # reconstruct returns the same matrices as the independent decoder
    rec = os.fspath(tmp_path / f"rec{ext}")
    run_inprocess("reconstruct", out, "-o", rec, check=0)
    back, _, _ = load_input(rec)
    _, _, decoded = decode_compact(out)
    for a, b, d in zip(mats, back, decoded):
        assert b.dtype == (np.float32 if a.dtype.kind in "iuf" and a.dtype.itemsize <= 4
                           else a.dtype if a.dtype.kind in "fc" else np.float32)
        assert np.allclose(b, d, rtol=1e-6, atol=1e-6 * np.abs(d).max(initial=0))
        if guarantee == "matrix":
            a = np.asarray(a, np.complex128 if np.iscomplexobj(a) else np.float64)
            assert np.linalg.norm(a - b) <= eps * np.linalg.norm(a)


def test_low_norm_members_are_not_lost(tmp_path):
    """A cluster may meet eps while a tiny member is lost; the matrix guarantee forbids it."""
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.standard_normal((16, 2)))
    mats = [basis @ rng.standard_normal((2, 4)) + 0.001 * rng.standard_normal((16, 4))
            for _ in range(30)]
    mats += [1e-3 * rng.standard_normal((16, 4)) for _ in range(3)]  # unrelated and tiny
    import h5py

    inp = os.fspath(tmp_path / "in.h5")
    with h5py.File(inp, "w") as f:
        f["matrices"] = np.stack(mats)
    for guarantee in ("cluster", "matrix"):
        out = os.fspath(tmp_path / f"{guarantee}.h5")
        run_inprocess("cluster", inp, "-o", out, "--rank", "2", "--eps", "0.05",
                      "--guarantee", guarantee, "--encoding", "plain", "--json", check=0)
        store = read_store(out)
        errors = []
        for cl in store.clusters:
            for j, i in enumerate(cl["members"]):
                off = 4 * j
                dec = cl["raw"][:, off:off + 4] if "raw" in cl else \
                    cl["basis"] @ cl["coefficients"][:, off:off + 4]
                errors.append(np.linalg.norm(mats[i] - dec) / np.linalg.norm(mats[i]))
        if guarantee == "matrix":
            assert max(errors) <= 0.05
        else:
            assert max(errors) > 0.05  # the paper's guarantee lets the tiny members go


def test_cluster_guarantee_never_larger_and_verify_catches_tampering(tmp_path):
    inp = os.fspath(tmp_path / "in.h5")
    write_planted(inp, K=120, m=16, n=4, subspaces=4, rank=3, noise=0.02, dtype="float32")
    sizes = {}
    for g in ("matrix", "cluster"):
        out = os.fspath(tmp_path / f"{g}.h5")
        sizes[g] = run_inprocess("cluster", inp, "-o", out, "--rank", "4", "--eps", "0.05",
                                 "--guarantee", g, "--json", check=0).json()["file_bytes"]
        assert sizes[g] == os.path.getsize(out) or abs(sizes[g] - os.path.getsize(out)) < 64
    assert sizes["cluster"] <= sizes["matrix"]
    # Change one code: verify must find the matrix over eps (exit 1).
    import h5py
    import hdf5plugin  # noqa: F401

    out = os.fspath(tmp_path / "matrix.h5")
    with h5py.File(out, "r+") as f:
        codes = f["codes"][...]
        codes[0] += 60
        f["codes"][...] = codes
    run_inprocess("verify", out, check=1)


def test_members_evicted_out_of_core_are_clustered_again(tmp_path, monkeypatch):
    """Out of core the storing pass finds the members above 0.9 eps; they are clustered again
    among themselves (not stored alone), and every matrix still meets eps."""
    import matclust.sinks as sinks

    inp = os.fspath(tmp_path / "in.h5")
    write_planted(inp, K=400, m=16, n=4, subspaces=4, rank=3, noise=0.05, dtype="float32")
    mats, _, _ = load_input(inp)
    calls = []
    real = sinks.CompactSink.recluster

    def spy(self, indices, budget, *blocks):
        calls.append(len(indices))
        return real(self, indices, budget, *blocks)

    monkeypatch.setattr(sinks.CompactSink, "recluster", spy)
    reports = {}
    for mode in ("in-memory", "out-of-core"):
        out = os.fspath(tmp_path / f"{mode}.h5")
        reports[mode] = run_inprocess("cluster", inp, "-o", out, "--rank", "3", "--eps", "0.1",
                                      "--mode", mode, "--json", check=0).json()
        check_compact(out, mats, 0.1, "matrix")
    assert calls and calls[0] > 0, "no member was evicted: the test shows nothing"
    assert reports["out-of-core"]["singletons"] < calls[0]  # most joined clusters again


def test_evicted_members_kept_by_the_checking_pass_store_as_read_again(tmp_path, monkeypatch):
    """Out of core the checking pass keeps the evicted members' columns for their recluster
    (no pass of its own to read them again); with nothing kept (keep_bytes 0) they are read
    again. Both stores are identical, labels and decoded matrices, and within eps."""
    import matclust.sinks as sinks
    import matclust.streaming as streaming

    inp = os.fspath(tmp_path / "in.h5")
    write_planted(inp, K=400, m=16, n=4, subspaces=4, rank=3, noise=0.05, dtype="float32",
                  scale_spread=10.0)
    mats, _, _ = load_input(inp)
    given = []
    real = sinks.CompactSink.recluster

    def spy(self, indices, budget, blocks=None):
        given.append(blocks is not None)
        return real(self, indices, budget, blocks)

    monkeypatch.setattr(sinks.CompactSink, "recluster", spy)
    local = streaming.LocalPasses

    class KeepNothing(local):
        def __init__(self, source, progress=None, keep_bytes=0):
            super().__init__(source, progress, keep_bytes=0)

    stores = []
    for passes in (local, KeepNothing):
        monkeypatch.setattr(streaming, "LocalPasses", passes)
        out = os.fspath(tmp_path / f"{passes.__name__}.h5")
        run_inprocess("cluster", inp, "-o", out, "--rank", "3", "--eps", "0.1", "--mode",
                      "out-of-core", check=0)
        check_compact(out, mats, 0.1, "matrix")
        stores.append(decode_compact(out))
    assert given == [True, False], "the recluster did not run, or kept nothing: nothing shown"
    (_, labels0, dec0), (_, labels1, dec1) = stores
    np.testing.assert_array_equal(labels0, labels1)
    for a, b in zip(dec0, dec1):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["incremental", "residual", "weyl"])
@pytest.mark.parametrize("mode", ["in-memory", "out-of-core"])
def test_every_method_keeps_every_matrix_within_eps(tmp_path, method, mode):
    inp = os.fspath(tmp_path / "in.zarr")
    write_planted(inp, K=90, m=10, n=3, subspaces=3, rank=2, noise=0.02, dtype="float32")
    mats, _, _ = load_input(inp)
    for guarantee in ("matrix", "cluster"):
        out = os.fspath(tmp_path / f"{guarantee}.zarr")
        run_inprocess("cluster", inp, "-o", out, "--rank", "3", "--eps", "0.15", "--method",
                      method, "--mode", mode, "--guarantee", guarantee, "--json", check=0)
        check_compact(out, mats, 0.15, guarantee)


@pytest.mark.parametrize("guarantee", ["matrix", "cluster"])
def test_writing_pass_encodes_held_parts_of_clusters_as_one(tmp_path, monkeypatch, guarantee):
    """Out of core the writing pass holds the input batches' shares of each cluster and
    encodes them together: with tiny batches (every cluster in many of them, of varying
    sizes) the store meets the guarantee, and with the matrix guarantee its codes, steps and
    labels are those of encoding every batch's share at once (each held for no time)."""
    import matclust.sources.base as sources_base
    import matclust.streaming as streaming

    monkeypatch.setattr(sources_base, "TARGET_BATCH_BYTES", 700)
    inp = os.fspath(tmp_path / "in.h5")
    write_planted(inp, K=300, m=12, n=3, n_max=5, subspaces=3, rank=2, noise=0.03, layout="group")
    mats, _, _ = load_input(inp)
    stores = {}
    for hold in (0, 1 << 30):
        monkeypatch.setattr(streaming, "WRITE_HOLD_BYTES", hold)
        out = os.fspath(tmp_path / f"held{hold}.h5")
        run_inprocess("cluster", inp, "-o", out, "--rank", "2", "--eps", "0.1", "--mode",
                      "out-of-core", "--guarantee", guarantee, check=0)
        check_compact(out, mats, 0.1, guarantee)
        stores[hold] = decode_compact(out)
    if guarantee == "matrix":
        (_, labels0, dec0), (_, labels1, dec1) = stores[0], stores[1 << 30]
        np.testing.assert_array_equal(labels0, labels1)
        for a, b in zip(dec0, dec1):
            np.testing.assert_array_equal(a, b)


def test_out_of_core_keeps_no_basis_its_evictions_made_not_worth_storing(tmp_path):
    """Single columns near four 32-dimensional subspaces, rank 16: clusters planned on the
    cluster-level bound lose most members to the matrix guarantee when stored. A basis left
    with too few members to pay for itself is dropped and its members clustered again, as in
    memory (it was 4x the in-memory store before)."""
    from matclust import MatrixClusterer

    rng = np.random.default_rng(1)
    m, K, rank = 96, 1000, 16
    bases = [np.linalg.qr(rng.standard_normal((m, 32)))[0] for _ in range(4)]
    mats = [(bases[i % 4] @ rng.standard_normal((32, 1))
             + 0.05 * rng.standard_normal((m, 1))).astype(np.float32) for i in range(K)]
    sizes = {}
    for mode in ("in-memory", "out-of-core"):
        out = tmp_path / f"{mode}.zarr"
        MatrixClusterer(rank=rank, eps=0.3, mode=mode).fit(mats, str(out))
        check_compact(out, mats, 0.3, "matrix")
        sizes[mode] = os.path.getsize(out) if out.is_file() else sum(
            f.stat().st_size for f in out.rglob("*") if f.is_file())
        _, labels, _ = decode_compact(out)
        import zarr

        ranks = zarr.open_group(str(out), mode="r")["cluster_ranks"][...]
        members = np.bincount(labels, minlength=len(ranks))
        for c in np.flatnonzero(ranks > 0):  # single columns: members = columns
            assert members[c] >= 2 and rank * (m + members[c]) < m * members[c], (mode, c)
    assert sizes["out-of-core"] <= 1.1 * sizes["in-memory"], sizes


@pytest.mark.parametrize("dtype", ["float32", "complex128"])
def test_matrices_alone_whose_batched_dct_codes_fail_are_coded_again(tmp_path, monkeypatch,
                                                                     dtype):
    """Matrices stored alone by their DCT coefficients are quantised as one batch and each is
    checked on its decoded values; one that fails is coded again on its own. With the batch's
    steps doubled behind the encoder's back every one fails, and each must still land in its
    own place in the store, within eps."""
    from matclust import compact

    real_quantise = compact.qb.quantise
    spoiled = []

    def doubled_steps(basis, data, offsets, *args, **kwargs):
        q = real_quantise(basis, data, offsets, *args, **kwargs)
        if basis is None and len(offsets) > 2 and q is not None:  # the batch of DCT codes
            q.exponents = np.where(q.exponents == qb.ZERO_STEP, q.exponents,
                                   q.exponents + qb.STEP_GRID).astype(np.int16)
            spoiled.append(len(offsets) - 1)
        return q

    monkeypatch.setattr(compact.qb, "quantise", doubled_steps)
    inp = os.fspath(tmp_path / "in.h5")
    # Noise as large as the signal: most matrices fit no cluster and are stored alone.
    write_planted(inp, K=40, m=8, n=3, n_max=5, subspaces=3, rank=2, noise=1.0, dtype=dtype,
                  layout="group")
    out = os.fspath(tmp_path / "out.h5")
    run_inprocess("cluster", inp, "-o", out, "--rank", "2", "--eps", "0.1", check=0)
    assert sum(spoiled) >= 10, "too few matrices went through the batched DCT coding"
    mats, _, _ = load_input(inp)
    assert check_compact(out, mats, 0.1).max() <= 0.1
