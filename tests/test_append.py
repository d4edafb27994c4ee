"""`matclust append`: a store of one collection grown by a second one, checked against both
inputs with the independent decoder of tests/conftest.py (numpy + h5py/zarr only)."""

from __future__ import annotations

import json
import os
import re
import types

import numpy as np
import pytest

from conftest import (check_compact, decode_compact, error_close, load_input, read_store,
                      run_inprocess, tree_digest)


def write_halves(tmp_path, ext, *, K=160, m=12, n=4, subspaces=3, rank=2, noise=0.01,
                 dtype="float32", seed=0, first=None, layout="stack", n_max=None):
    """A planted collection cut in two inputs; ``first`` (planted labels -> bool) picks the
    matrices of the first input (default: the first half). Returns the two paths and both
    inputs' matrices and planted labels, in order."""
    from matclust.collections_io import write_collection
    from matclust.sample import planted_collection

    mats, labels = planted_collection(K, m, n, subspaces, rank, noise, dtype, n_max, seed, 10.0)
    mats = [np.asarray(a) for a in mats]
    in_first = np.arange(K) < K // 2 if first is None else first(labels)
    paths = []
    for part, name in ((in_first, "first"), (~in_first, "second")):
        path = os.fspath(tmp_path / f"{name}{ext}")
        chosen = [mats[i] for i in np.flatnonzero(part)]
        write_collection(path, np.stack(chosen) if layout == "stack" else chosen, layout=layout)
        paths.append(path)
    order = np.concatenate([np.flatnonzero(in_first), np.flatnonzero(~in_first)])
    return paths, [mats[i] for i in order], labels[order], int(in_first.sum())


@pytest.mark.parametrize("guarantee", ["matrix", "cluster"])
@pytest.mark.parametrize("ext", [".h5", ".zarr"])
def test_append_second_half_keeps_the_guarantee(tmp_path, ext, guarantee):
    (first, second), mats, _, K0 = write_halves(tmp_path, ext)
    store = os.fspath(tmp_path / f"store{ext}")
    eps = 0.05
    run_inprocess("cluster", first, "-o", store, "--rank", "3", "--eps", str(eps),
                  "--guarantee", guarantee, "--quiet", check=0)
    _, labels_before, decoded_before = decode_compact(store)
    report = run_inprocess("append", store, second, "--json", check=0).json()

    # Both guarantees recomputed from both inputs, read independently, in order.
    first_mats, _, _ = load_input(first)
    second_mats, _, _ = load_input(second)
    both = first_mats + second_mats
    check_compact(store, both, eps, guarantee)
    if guarantee == "matrix":
        rel = check_compact(store, both, eps, "matrix")
        assert report["max_matrix_error"] >= rel.max() - 1e-9
    # The first input's matrices decode exactly as before (their codes were not touched).
    _, labels, decoded = decode_compact(store)
    assert np.array_equal(labels[:K0], labels_before)
    for a, b in zip(decoded[:K0], decoded_before):
        assert np.array_equal(a, b)
    # Most newcomers come from the same subspaces: they join stored clusters.
    done = report["append"]
    assert done["K"] == len(second_mats) and done["joined"] >= 0.9 * len(second_mats)
    assert np.count_nonzero(labels[K0:] <= labels_before.max()) == done["joined"]
    assert report["K"] == len(both)
    inputs = report["params"]["inputs"]
    assert [os.path.realpath(e["input"]) for e in inputs] == [os.path.realpath(first),
                                                             os.path.realpath(second)]
    assert [e["K"] for e in inputs] == [K0, len(second_mats)]
    # verify reads both inputs; reconstruct and inspect work on the grown store.
    result = run_inprocess("verify", store, "--json", check=0).json()
    assert result["ok"] and result["clusters"] == report["clusters"]
    rebuilt = os.fspath(tmp_path / f"rebuilt{ext}")
    run_inprocess("reconstruct", store, "-o", rebuilt, check=0)
    back, _, _ = load_input(rebuilt)
    assert len(back) == len(both)
    for a, d in zip(back, decoded):
        assert np.allclose(a, d, rtol=1e-6, atol=1e-6 * np.abs(d).max())
    summary = run_inprocess("inspect", store, "--json", check=0).json()[0]
    assert summary["K"] == len(both) and summary["clusters"] == report["clusters"]
    assert summary["inputs"] == 2


@pytest.mark.parametrize("guarantee", ["matrix", "cluster"])
def test_new_subspaces_form_new_clusters(tmp_path, guarantee):
    """The first input holds subspaces 0 and 1 only; the second the rest of them and two new
    subspaces: those form new clusters, the others join the stored ones."""
    rng = np.random.default_rng(5)
    pick = rng.random(240) < 0.5

    def first(labels):
        return (labels < 2) & pick[: len(labels)]

    (one, two), mats, planted, K0 = write_halves(tmp_path, ".h5", K=240, subspaces=4,
                                                 first=first, noise=0.005)
    store = os.fspath(tmp_path / "store.h5")
    eps = 0.05
    run_inprocess("cluster", one, "-o", store, "--rank", "2", "--eps", str(eps),
                  "--guarantee", guarantee, "--quiet", check=0)
    _, before, _ = decode_compact(store)
    C0 = before.max() + 1
    report = run_inprocess("append", store, two, "--json", check=0).json()
    both = load_input(one)[0] + load_input(two)[0]
    check_compact(store, both, eps, guarantee)
    _, labels, _ = decode_compact(store)
    new = labels[K0:]
    old_kind = planted[K0:] < 2
    # Old subspaces joined stored clusters; the new subspaces are in new clusters only.
    assert np.all(new[~old_kind] >= C0)
    assert np.mean(new[old_kind] < C0) >= 0.9
    assert report["append"]["new_clusters"] >= 2
    assert report["clusters"] == labels.max() + 1
    # A new cluster holds the members of one new subspace (greedy clusters may split one).
    for c in np.unique(new[~old_kind]):
        assert len(set(planted[K0:][new == c])) == 1
    run_inprocess("verify", store, check=0)


def test_appends_chain_and_verify_checks_every_input(tmp_path):
    (one, two), mats, _, K0 = write_halves(tmp_path, ".zarr", K=120)
    three = os.fspath(tmp_path / "third.zarr")
    from matclust.collections_io import write_collection

    write_collection(three, np.stack(load_input(two)[0][:10]) * 3.0)
    store = os.fspath(tmp_path / "store.zarr")
    run_inprocess("cluster", one, "-o", store, "--rank", "3", "--eps", "0.05", "--quiet", check=0)
    run_inprocess("append", store, two, "--quiet", check=0)
    report = run_inprocess("append", store, three, "--json", check=0).json()
    assert [e["K"] for e in report["params"]["inputs"]] == [K0, 120 - K0, 10]
    check_compact(store, load_input(one)[0] + load_input(two)[0] + load_input(three)[0], 0.05)
    run_inprocess("verify", store, check=0)
    # --input names one collection: a store of three is checked against all three.
    res = run_inprocess("verify", store, "--input", one, check=2)
    assert res.stderr.startswith("error:") and "3 inputs" in res.stderr
    # verify really reads the last input: changed, it fails.
    import zarr

    arr = zarr.open_array(os.path.join(three, "matrices"), mode="r+")
    arr[4] = arr[4] * -1.0
    assert run_inprocess("verify", store, "--json", check=1).json()["ok"] is False


@pytest.mark.parametrize("dtype,layout,n_max", [("complex64", "stack", None),
                                                ("int32", "group", 6), ("float64", "group", 6)])
def test_other_dtypes_and_groups(tmp_path, dtype, layout, n_max):
    """Groups of matrices of several widths (names repeated in both inputs: the new ones are
    renamed) and every dtype family."""
    (one, two), _, _, K0 = write_halves(tmp_path, ".h5", K=80, dtype=dtype, layout=layout,
                                        n_max=n_max)
    store = os.fspath(tmp_path / "store.h5")
    run_inprocess("cluster", one, "-o", store, "--rank", "3", "--eps", "0.05", "--quiet", check=0)
    run_inprocess("append", store, two, "--quiet", check=0)
    first, names1, _ = load_input(one)
    second, names2, _ = load_input(two)
    check_compact(store, first + second, 0.05)
    run_inprocess("verify", store, check=0)
    rebuilt = os.fspath(tmp_path / "rebuilt.h5")
    run_inprocess("reconstruct", store, "-o", rebuilt, check=0)
    back, names, _ = load_input(rebuilt)
    if layout == "group":
        assert len(set(names)) == len(back) == K0 + len(second)
    for a, b in zip(first + second, back):
        a = np.asarray(a, np.complex128 if np.iscomplexobj(a) else np.float64)
        assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(a) * (1 + 1e-6)


def _refused(store, *args, match: str):
    before = tree_digest(store) if os.path.exists(store) else None
    res = run_inprocess("append", store, *args, check=2)
    assert res.stderr.startswith("error:") and match in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1
    if before is not None:
        assert tree_digest(store) == before
    return res


def test_bad_appends_are_refused_and_leave_the_store(tmp_path):
    from matclust.collections_io import write_collection

    (one, two), _, _, _ = write_halves(tmp_path, ".h5", K=60)
    store = os.fspath(tmp_path / "store.h5")
    run_inprocess("cluster", one, "-o", store, "--rank", "3", "--eps", "0.05", "--quiet", check=0)
    _refused(store, one, match="already in")  # the store's own input
    run_inprocess("append", store, two, "--quiet", check=0)
    _refused(store, two, match="already in")  # appended twice
    rng = np.random.default_rng(0)
    rows = os.fspath(tmp_path / "rows.h5")
    write_collection(rows, rng.standard_normal((5, 13, 4)).astype(np.float32))
    _refused(store, rows, match="13 rows")
    cplx = os.fspath(tmp_path / "complex.h5")
    write_collection(cplx, (rng.standard_normal((5, 12, 4)) + 1j).astype(np.complex64))
    _refused(store, cplx, match="complex")
    wide = os.fspath(tmp_path / "wide.h5")
    write_collection(wide, rng.standard_normal((5, 12, 4)))  # float64 into a float32 store
    _refused(store, wide, match="float64")
    _refused(store, rows, "--transpose", match="read the same way")
    _refused(os.fspath(tmp_path / "nothing.h5"), two, match="no such result store")
    _refused(store, os.fspath(tmp_path / "missing.h5"), match="missing.h5")
    baseline = os.fspath(tmp_path / "baseline.h5")
    run_inprocess("cluster", one, "-o", baseline, "--rank", "3", "--eps", "0.05", "--method",
                  "random", "--clusters", "3", "--quiet", check=0)
    _refused(baseline, two, match="without error control")


def test_a_memory_limit_too_small_is_refused_naming_one_that_works(tmp_path):
    (one, two), mats, _, _ = write_halves(tmp_path, ".h5", K=60)
    store = os.fspath(tmp_path / "store.h5")
    run_inprocess("cluster", one, "-o", store, "--rank", "3", "--eps", "0.05", "--quiet", check=0)
    res = _refused(store, two, "--memory-limit", "1MiB", match="appending 30 matrices")
    named = re.search(r"needs --memory-limit (\d+)MiB at least \(given 1MiB\)", res.stderr)
    assert named, res.stderr
    limit = int(named.group(1))
    _refused(store, two, "--memory-limit", f"{limit - 1}MiB", match="appending 30 matrices")
    run_inprocess("append", store, two, "--memory-limit", f"{limit}MiB", "--quiet", check=0)
    check_compact(store, mats, 0.05)


def test_a_failed_append_leaves_the_old_store(tmp_path, monkeypatch):
    """A failure after the new store was begun: the old one is untouched, no temporary and
    no lock remain, and the append can be run again."""
    import matclust.append as append_module

    (one, two), mats, _, _ = write_halves(tmp_path, ".zarr", K=80, subspaces=4)
    store = os.fspath(tmp_path / "store.zarr")
    run_inprocess("cluster", one, "-o", store, "--rank", "3", "--eps", "0.05", "--quiet", check=0)
    before = tree_digest(store)

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(append_module, "_names", broken)
    res = run_inprocess("append", store, two, check=1)
    assert res.stderr.startswith("error:")
    assert tree_digest(store) == before
    assert sorted(os.listdir(tmp_path)) == sorted(["first.zarr", "second.zarr", "store.zarr"])
    monkeypatch.undo()
    run_inprocess("append", store, two, "--quiet", check=0)
    check_compact(store, mats, 0.05)


def test_a_store_being_written_is_not_appended_to(tmp_path):
    from matclust.checkpoint import OutputGuard

    (one, two), _, _, _ = write_halves(tmp_path, ".h5", K=40)
    store = os.fspath(tmp_path / "store.h5")
    run_inprocess("cluster", one, "-o", store, "--rank", "3", "--eps", "0.05", "--quiet", check=0)
    with OutputGuard(store):
        _refused(store, two, match="being written by another matclust run")
    run_inprocess("append", store, two, "--quiet", check=0)


def test_screening_finds_every_stored_basis_that_fits(tmp_path):
    """StoredBases.best against a brute-force least-squares fit of every new matrix by every
    stored basis (numpy's lstsq): a matrix gets a cluster exactly when one fits it within
    0.9 of its budget, and the fit it reports is that cluster's."""
    from matclust.append import StoredBases
    from matclust.sources.base import Batch
    from matclust.store import ResultStore

    (one, two), _, _, _ = write_halves(tmp_path, ".h5", K=200, subspaces=4, noise=0.03,
                                       dtype="float64")
    store = os.fspath(tmp_path / "store.h5")
    run_inprocess("cluster", one, "-o", store, "--rank", "3", "--eps", "0.1", "--quiet", check=0)
    new, _, _ = load_input(two)
    rng = np.random.default_rng(1)
    new = new + [rng.standard_normal(new[0].shape) for _ in range(5)]  # fit nothing
    data = np.hstack(new)
    offsets = np.concatenate([[0], np.cumsum([a.shape[1] for a in new])])
    norm2 = np.array([np.sum(a * a) for a in new])
    allowed2 = 0.1 ** 2 * norm2
    with ResultStore(store) as st:
        reader = st.compact
        chosen, trunc = StoredBases(reader, False).best(
            Batch(np.arange(len(new)), data, offsets), norm2, allowed2)
        factored = np.flatnonzero(reader.ranks > 0)
        exact = np.array([[np.sum((a - reader.basis(int(c)).astype(float) @ np.linalg.lstsq(
            reader.basis(int(c)).astype(float), a, rcond=None)[0]) ** 2) for c in factored]
            for a in new])
    fits = exact <= 0.9 * allowed2[:, None]
    assert fits.any(axis=1).sum() >= len(new) // 2 and not fits[-5:].any()
    assert np.array_equal(chosen >= 0, fits.any(axis=1))
    for i in np.flatnonzero(chosen >= 0):
        k = int(np.flatnonzero(factored == chosen[i])[0])
        assert fits[i, k] and np.isclose(trunc[i], exact[i, k], rtol=1e-6, atol=1e-12 * norm2[i])


def test_verify_names_damaged_input_records(tmp_path):
    """The recorded inputs of a grown store are its params: damaged, verify says so (exit 2)."""
    import json

    import h5py

    (one, two), _, _, _ = write_halves(tmp_path, ".h5", K=40)
    store = os.fspath(tmp_path / "store.h5")
    run_inprocess("cluster", one, "-o", store, "--rank", "3", "--eps", "0.05", "--quiet", check=0)
    run_inprocess("append", store, two, "--quiet", check=0)
    with h5py.File(store, "r+") as f:
        params = json.loads(f.attrs["params"])
        params["inputs"][1]["K"] += 1
        f.attrs["params"] = json.dumps(params)
    res = run_inprocess("verify", store, check=2)
    assert res.stderr.startswith("error:") and "'inputs'" in res.stderr


def test_wider_new_matrices_widen_the_codes(tmp_path):
    """New matrices whose codes need a wider integer type: the old codes are copied widened
    and still decode as before."""
    from matclust.collections_io import write_collection
    from matclust.sample import planted_collection

    narrow, _ = planted_collection(50, 12, 4, 3, 2, 0.01, "float32", None, 3, 10.0)
    wide, _ = planted_collection(6, 12, 900, 3, 2, 0.01, "float32", None, 3, 10.0)
    one, two = os.fspath(tmp_path / "narrow.h5"), os.fspath(tmp_path / "wide.h5")
    write_collection(one, narrow)
    write_collection(two, wide)
    store = os.fspath(tmp_path / "store.zarr")
    run_inprocess("cluster", one, "-o", store, "--rank", "3", "--eps", "0.05", "--quiet", check=0)
    _, _, before = decode_compact(store)
    import zarr

    assert zarr.open_group(store)["codes"].dtype == np.uint16
    run_inprocess("append", store, two, "--quiet", check=0)
    assert zarr.open_group(store)["codes"].dtype == np.uint32
    _, _, after = decode_compact(store)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    check_compact(store, load_input(one)[0] + load_input(two)[0], 0.05)


@pytest.mark.parametrize("guarantee", ["matrix", "cluster"])
@pytest.mark.parametrize("ext", [".h5", ".zarr"])
def test_plain_stores_take_appends(tmp_path, ext, guarantee):
    """A plain (matclust/1) store: the joined clusters' groups grow by the new members'
    coefficients against the stored basis, the old columns unchanged; every matrix (matrix
    guarantee) or cluster (cluster guarantee) recomputed from both inputs with numpy."""
    rng = np.random.default_rng(2)
    pick = rng.random(200) < 0.5
    (one, two), _, planted, K0 = write_halves(
        tmp_path, ext, K=200, subspaces=4, noise=0.01, first=lambda lab: (lab < 3) & pick)
    store = os.fspath(tmp_path / f"store{ext}")
    eps = 0.05
    run_inprocess("cluster", one, "-o", store, "--rank", "3", "--eps", str(eps), "--encoding",
                  "plain", "--guarantee", guarantee, "--quiet", check=0)
    before = read_store(store)
    report = run_inprocess("append", store, two, "--json", check=0).json()
    after = read_store(store)
    assert after.attrs["format"] == "matclust/1" and after.report == report
    mats = load_input(one)[0] + load_input(two)[0]
    C0 = len(before.clusters)
    errors = np.zeros(len(mats))
    for c, cl in enumerate(after.clusters):
        members = cl["members"]
        assert np.all(after.labels[members] == c)
        stored = cl["basis"].astype(float) @ cl["coefficients"] if "basis" in cl \
            else cl["raw"].astype(float)
        offsets = np.concatenate([[0], np.cumsum([mats[i].shape[1] for i in members])])
        err2 = norm2 = 0.0
        for j, i in enumerate(members):
            d = np.sum((mats[i] - stored[:, offsets[j]:offsets[j + 1]]) ** 2)
            errors[i] = np.sqrt(d / np.sum(mats[i] ** 2.0))
            err2, norm2 = err2 + d, norm2 + np.sum(mats[i] ** 2.0)
        error = np.sqrt(err2 / norm2)
        assert error <= eps
        assert error_close(error, report["cluster_stats"][c]["error"], np.float32)
        if c < C0:  # the stored members first, their arrays as they were
            old = before.clusters[c]
            assert np.array_equal(members[:len(old["members"])], old["members"])
            for key in ("basis", "raw"):
                if key in old:
                    assert np.array_equal(cl[key], old[key])
            if "coefficients" in old:
                width = old["coefficients"].shape[1]
                assert np.array_equal(cl["coefficients"][:, :width], old["coefficients"])
    seen = np.bincount(np.concatenate([cl["members"] for cl in after.clusters]),
                       minlength=len(mats))
    assert np.all(seen == 1)
    if guarantee == "matrix":
        assert errors.max() <= eps
    # The new subspace forms new clusters; the others mostly joined.
    new = after.labels[K0:]
    assert np.all(new[planted[K0:] == 3] >= C0) and report["append"]["new_clusters"] >= 1
    assert np.mean(new[planted[K0:] < 3] < C0) >= 0.9
    assert report["append"]["joined"] == np.count_nonzero(new < C0)
    run_inprocess("verify", store, check=0)
    rebuilt = os.fspath(tmp_path / f"rebuilt{ext}")
    run_inprocess("reconstruct", store, "-o", rebuilt, check=0)
    assert len(load_input(rebuilt)[0]) == len(mats)


def test_far_magnitudes(tmp_path):
    """New matrices 10^400 times the stored ones (same subspaces), then 10^190 times: every
    matrix still within eps (checked scaled by its own largest entry, which no power of ten
    overflows), however far the magnitudes."""
    from matclust.collections_io import write_collection
    from matclust.sample import planted_collection

    mats, _ = planted_collection(120, 12, 4, 3, 2, 0.01, "float64", None, 0, 10.0)
    parts = [mats[:60] * 1e-200, mats[60:] * 1e200, mats[60:90] * 1e-10]
    paths = [os.fspath(tmp_path / f"in{k}.h5") for k in range(3)]
    for path, part in zip(paths, parts):
        write_collection(path, part)
    store = os.fspath(tmp_path / "store.h5")
    run_inprocess("cluster", paths[0], "-o", store, "--rank", "3", "--eps", "0.05", "--quiet",
                  check=0)
    for path in paths[1:]:
        res = run_inprocess("append", store, path, "--quiet", check=0)
        assert res.stderr == ""
    run_inprocess("verify", store, check=0)
    _, _, decoded = decode_compact(store)
    originals = [a for part in parts for a in part]
    for a, d in zip(originals, decoded):
        scale = np.abs(a).max()
        assert np.linalg.norm(a / scale - d / scale) <= 0.05 * np.linalg.norm(a / scale)


@pytest.mark.parametrize("ext", [".h5", ".zarr"])
def test_old_codes_are_copied_as_stored(tmp_path, ext, monkeypatch):
    """A store whose codes fill more than one chunk (1,048,576 codes): the grown store holds
    the old store's whole chunks byte for byte, copied compressed (not decoded and encoded
    again), and every matrix decodes as before / within eps of both inputs."""
    import matclust.format2
    from matclust.collections_io import write_collection

    copies = []

    def spy(source, target, count):
        copies.append((count, matclust.store.copy_compressed_chunks(source, target, count)))
        return copies[-1][1]

    monkeypatch.setattr(matclust.format2, "copy_compressed_chunks", spy)

    rng = np.random.default_rng(4)
    noise = rng.standard_normal((2100 + 60, 32, 16)).astype(np.float32)  # stored alone: 512 codes each
    first, second = os.fspath(tmp_path / f"first{ext}"), os.fspath(tmp_path / f"second{ext}")
    write_collection(first, noise[:2100])
    write_collection(second, noise[2100:])
    store = os.fspath(tmp_path / f"store{ext}")
    run_inprocess("cluster", first, "-o", store, "--rank", "3", "--eps", "0.05", "--quiet",
                  check=0)

    def first_chunk(path):
        if ext == ".h5":
            import h5py

            with h5py.File(path, "r") as f:
                assert f["codes"].shape[0] >= f["codes"].chunks[0] == 1 << 20
                return f["codes"].id.read_direct_chunk((0,))[1]
        with open(os.path.join(path, "codes", "c", "0"), "rb") as fh:
            return fh.read()

    def shuffle(path):  # Blosc's shuffle of the codes, as the file records it
        if ext == ".h5":
            import h5py

            with h5py.File(path, "r") as f:
                return f["codes"]._filters["32001"][5]
        with open(os.path.join(path, "codes", "zarr.json")) as fh:
            codecs = json.load(fh)["codecs"]
        return [c["configuration"]["shuffle"] for c in codecs if c["name"] == "blosc"][0]

    chunk_before, shuffle_before = first_chunk(store), shuffle(store)
    _, _, decoded_before = decode_compact(store)

    def no_sampling(*args):
        raise AssertionError("the grown store's shuffle is the old store's, not chosen again")

    monkeypatch.setattr(matclust.format2, "zlib", types.SimpleNamespace(compress=no_sampling))
    run_inprocess("append", store, second, "--quiet", check=0)
    assert copies == [(1, True)]
    assert first_chunk(store) == chunk_before and shuffle(store) == shuffle_before
    _, _, decoded = decode_compact(store)
    for a, b in zip(decoded[:2100], decoded_before):
        np.testing.assert_array_equal(a, b)
    check_compact(store, list(noise), 0.05)
    run_inprocess("verify", store, check=0)


def _spy_cluster_anew(monkeypatch):
    """Record every run of leftovers clustered among themselves (matclust.append._cluster_anew)."""
    import matclust.append

    calls = []
    real = matclust.append._cluster_anew

    def spy(source, reader, indices, *args, **kwargs):
        calls.append(len(indices))
        return real(source, reader, indices, *args, **kwargs)

    monkeypatch.setattr(matclust.append, "_cluster_anew", spy)
    return calls


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
def test_leftovers_without_structure_are_stored_alone_as_their_run_would(tmp_path, monkeypatch,
                                                                          dtype):
    """Newcomers of random noise (no seed's basis fits others) skip clustering among
    themselves: each is stored alone, within eps of its input on decoded values, and decodes
    exactly as in the store the skipped run gives (forced here), which stores each alone too.
    The append encodes them in batches of 7 here, several ahead of the one it stores
    (matclust.blas.ahead_on_all_cores), and keeps their order."""
    import shutil

    import matclust.append
    from matclust.collections_io import write_collection

    monkeypatch.setattr(matclust.append, "ALONE_BATCH", 7)

    rng = np.random.default_rng(7)
    noise = rng.standard_normal((140, 16, 3)) * np.exp(rng.uniform(-3, 3, (140, 1, 1)))
    if dtype == "complex64":
        noise = noise + 1j * rng.standard_normal(noise.shape)
    noise = noise.astype(dtype)
    first, second = os.fspath(tmp_path / "first.h5"), os.fspath(tmp_path / "second.h5")
    write_collection(first, noise[:60])
    write_collection(second, noise[60:])
    store, forced = os.fspath(tmp_path / "store.h5"), os.fspath(tmp_path / "forced.h5")
    eps = 0.1
    run_inprocess("cluster", first, "-o", store, "--rank", "4", "--eps", str(eps), "--quiet",
                  check=0)
    shutil.copy(store, forced)
    calls = _spy_cluster_anew(monkeypatch)
    report = run_inprocess("append", store, second, "--json", check=0).json()
    assert calls == [] and report["append"]["new_clusters"] == 80
    rel = check_compact(store, list(noise), eps)
    assert report["max_matrix_error"] >= rel.max() - 1e-9
    run_inprocess("verify", store, check=0)

    monkeypatch.setattr(matclust.append, "_may_cluster", lambda *args: True)
    run_inprocess("append", forced, second, "--quiet", check=0)
    assert calls == [80]
    _, labels, decoded = decode_compact(store)
    _, forced_labels, forced_decoded = decode_compact(forced)
    assert len(np.unique(labels)) == len(np.unique(forced_labels)) == len(noise)
    np.testing.assert_array_equal(labels, forced_labels)  # new cluster ids in index order
    for a, b in zip(decoded, forced_decoded):
        np.testing.assert_array_equal(a, b)


def test_structured_leftovers_are_still_clustered(tmp_path, monkeypatch):
    """A store of noise (nothing factored) grown by blocks from a few low-rank subspaces: the
    probe finds seeds their neighbours fit, so the newcomers are clustered among themselves
    into factored clusters, every matrix within eps."""
    from matclust.collections_io import write_collection
    from matclust.sample import planted_collection

    rng = np.random.default_rng(8)
    noise = rng.standard_normal((60, 12, 4)).astype(np.float32)
    planted, _ = planted_collection(90, 12, 4, 3, 2, 0.005, "float32", None, 3, 10.0)
    planted = np.stack([np.asarray(a) for a in planted])
    first, second = os.fspath(tmp_path / "first.h5"), os.fspath(tmp_path / "second.h5")
    write_collection(first, noise)
    write_collection(second, planted)
    store = os.fspath(tmp_path / "store.h5")
    run_inprocess("cluster", first, "-o", store, "--rank", "2", "--eps", "0.05", "--quiet",
                  check=0)
    _, before, _ = decode_compact(store)
    assert len(np.unique(before)) == len(noise)  # every noise block alone: nothing to join
    calls = _spy_cluster_anew(monkeypatch)
    report = run_inprocess("append", store, second, "--json", check=0).json()
    assert calls == [len(planted)] and report["append"]["joined"] == 0
    check_compact(store, list(noise) + list(planted), 0.05)
    _, labels, _ = decode_compact(store)
    sizes = np.bincount(labels[len(noise):])
    assert sizes.max() >= 10, "the planted blocks formed no cluster"
    run_inprocess("verify", store, check=0)
