"""verify checks every array and attribute that reconstruct, inspect or a plain reader relies on.

Each test alters one thing in a valid store with h5py (as a user or a broken copy could) and
asserts that verify exits 1 naming that inconsistency, and that reconstruct does not write
matrices from a store that is structurally inconsistent.
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from conftest import PAPER, read_store, run_inprocess, write_planted


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A valid store of a group collection (varying widths, names), and its input, in the
    matclust/1 layout (the compact layout's checks are in tests/test_compact.py)."""
    tmp = tmp_path_factory.mktemp("verify_checks")
    inp, mats, _ = write_planted(tmp / "in.h5", K=40, m=10, n=3, n_max=6, subspaces=3, rank=2,
                                 layout="group", dtype="float64")
    out = tmp / "out.h5"
    run_inprocess("cluster", *PAPER, inp, "-o", out, "--rank", 2, "--eps", 0.1, "--quiet", check=0)
    st = read_store(out)
    assert any(len(cl["members"]) >= 2 and "coefficients" in cl for cl in st.clusters)
    assert len({m.shape[1] for m in mats}) > 1
    return inp, out


@pytest.fixture
def store(made, tmp_path):
    """A private copy of the valid store (the input stays shared and untouched)."""
    copy = tmp_path / "copy.h5"
    shutil.copy(made[1], copy)
    return made[0], copy


def verify_problems(path) -> list[str]:
    res = run_inprocess("verify", path, "--json", "--quiet")
    assert res.returncode == 1, str(res)
    return json.loads(res.stdout)["problems"]


def factored_cluster(path) -> int:
    st = read_store(path)
    return next(c for c, cl in enumerate(st.clusters) if len(cl["members"]) >= 2 and "coefficients" in cl)


def rewrite(f, name, data) -> None:
    del f[name]
    f.create_dataset(name, data=data)


def test_the_untouched_store_verifies(made):
    res = run_inprocess("verify", made[1], "--json", "--quiet", check=0)
    assert json.loads(res.stdout)["problems"] == []


def test_altered_widths_are_named_and_reconstruct_refuses(store, tmp_path):
    inp, path = store
    with h5py.File(path, "r+") as f:
        widths = f["widths"][...]
        i, j = 0, int(np.flatnonzero(widths != widths[0])[0])
        widths[i], widths[j] = widths[j], widths[i]  # same total, shifted columns
        rewrite(f, "widths", widths)
    assert any(f"widths[{i}]" in p or "coefficients" in p or "raw" in p for p in verify_problems(path))
    with h5py.File(path, "r+") as f:  # inconsistent even without the input at hand
        widths[i] += 1
        rewrite(f, "widths", widths)
    dest = tmp_path / "rebuilt.h5"
    res = run_inprocess("reconstruct", path, "-o", dest)
    assert res.returncode == 2 and "widths" in res.stderr and not dest.exists(), str(res)


def test_names_count(store):
    _, path = store
    with h5py.File(path, "r+") as f:
        names = [n.decode() for n in f["names"][...]]
        del f["names"]
        f.create_dataset("names", data=np.array(names[:-1], dtype=object), dtype=h5py.string_dtype())
    assert any("'names' has 39 entries for 40 labels" in p for p in verify_problems(path))


def test_member_duplicated(store):
    _, path = store
    c = factored_cluster(path)
    with h5py.File(path, "r+") as f:
        members = f[f"clusters/{c}/members"][...]
        members[1] = members[0]
        rewrite(f, f"clusters/{c}/members", members)
    problems = verify_problems(path)
    assert any(f"clusters/{c}/members: an index appears twice" in p for p in problems), problems


def test_member_missing(store):
    _, path = store
    c = factored_cluster(path)
    with h5py.File(path, "r+") as f:
        members = f[f"clusters/{c}/members"][...]
        rewrite(f, f"clusters/{c}/members", members[:-1])
    problems = verify_problems(path)
    assert any(f"in no cluster (first: {members[-1]})" in p for p in problems), problems
    assert any(f"clusters/{c}/coefficients: shape" in p for p in problems), problems


def test_label_out_of_range(store):
    _, path = store
    with h5py.File(path, "r+") as f:
        labels = f["labels"][...]
        C = len(f["clusters"])
        labels[3] = C + 5
        rewrite(f, "labels", labels)
    problems = verify_problems(path)
    assert any(f"labels[3] = {C + 5} is not a cluster id" in p for p in problems), problems


def test_labels_disagree_with_members(store):
    _, path = store
    with h5py.File(path, "r+") as f:
        labels = f["labels"][...]
        j = int(np.flatnonzero(labels != labels[0])[0])
        labels[0], labels[j] = labels[j], labels[0]
        rewrite(f, "labels", labels)
    problems = verify_problems(path)
    assert any("member 0 has label" in p or f"member {j} has label" in p for p in problems), problems


def test_basis_and_coefficients_disagree(store):
    _, path = store
    c = factored_cluster(path)
    with h5py.File(path, "r+") as f:
        coeffs = f[f"clusters/{c}/coefficients"][...]
        rewrite(f, f"clusters/{c}/coefficients", np.vstack([coeffs, coeffs[:1]]))
    problems = verify_problems(path)
    assert any(f"clusters/{c}/coefficients: shape ({coeffs.shape[0] + 1}, {coeffs.shape[1]})" in p
               for p in problems), problems


@pytest.mark.parametrize("dtype, named", [("int32", "not a 2-D array"), ("float32", "less precise")])
def test_stored_dtype_changed(store, dtype, named):
    _, path = store
    c = factored_cluster(path)
    with h5py.File(path, "r+") as f:
        rewrite(f, f"clusters/{c}/coefficients", f[f"clusters/{c}/coefficients"][...].astype(dtype))
    problems = verify_problems(path)
    assert any(named in p and (f"clusters/{c}" in p or "float32" in p) for p in problems), problems


@pytest.mark.parametrize("damage, named", [
    (lambda p: {k: v for k, v in p.items() if k != "rank"}, "params lacks rank"),
    (lambda p: {k: v for k, v in p.items() if k not in ("input", "dataset")}, "params lacks input, dataset"),
    (lambda p: {**p, "eps": 2.0}, "params eps is 2.0"),
])
def test_params_damaged(store, damage, named):
    _, path = store
    with h5py.File(path, "r+") as f:
        params = json.loads(f.attrs["params"])
        changed = damage(params)
        f.attrs["params"] = changed if isinstance(changed, str) else json.dumps(changed)
    problems = verify_problems(path)
    assert any(named in p for p in problems), problems


def test_report_disagrees_with_the_arrays(store):
    _, path = store
    with h5py.File(path, "r+") as f:
        report = json.loads(f.attrs["report"])
        report["K"] += 1
        report["cluster_stats"][0]["columns"] += 1
        f.attrs["report"] = json.dumps(report)
    problems = verify_problems(path)
    assert any(f"report says K = {report['K']}" in p for p in problems), problems
    assert any("cluster_stats[0] columns" in p for p in problems), problems


def test_arrays_missing(store):
    _, path = store
    with h5py.File(path, "r+") as f:
        del f["widths"]
    assert any("'widths' is missing" in p for p in verify_problems(path))


def test_plain_store_is_verified_under_its_own_guarantee(tmp_path):
    """A plain store made with the matrix guarantee (the default): verify and inspect name the
    guarantee in its params, and verify checks every matrix. One matrix's coefficients moved
    off by 3 eps of its norm (its cluster stays within eps) is reported, as computed here."""
    inp, mats, _ = write_planted(tmp_path / "in.h5", K=60, m=10, n=3, subspaces=2, rank=2,
                                 dtype="float64")
    out = tmp_path / "out.h5"
    run_inprocess("cluster", inp, "-o", out, "--encoding", "plain", "--rank", 2, "--eps", 0.1,
                  "--quiet", check=0)
    st = read_store(out)
    assert st.params["guarantee"] == "matrix"
    shown = run_inprocess("inspect", out, "--json", check=0).json()[0]
    verdict = run_inprocess("verify", out, "--json", check=0).json()
    assert shown["guarantee"] == verdict["guarantee"] == "matrix"
    assert "(matrix guarantee)" in run_inprocess("verify", out, check=0).stdout

    # The largest factored cluster; its smallest member's columns moved off by 3 eps of its
    # norm (the basis is orthonormal: its error grows by about that).
    c = max((c for c, cl in enumerate(st.clusters) if "coefficients" in cl),
            key=lambda c: len(st.clusters[c]["members"]))
    cl = st.clusters[c]
    j = int(np.argmin([np.linalg.norm(mats[i]) for i in cl["members"]]))
    first = int(cl["members"][j])
    lo = sum(mats[i].shape[1] for i in cl["members"][:j])
    width = mats[first].shape[1]
    coeffs = cl["coefficients"].copy()
    coeffs[:, lo:lo + width] += 0.3 * np.linalg.norm(mats[first]) / np.sqrt(coeffs.shape[0] * width)
    with h5py.File(out, "r+") as f:
        f[f"clusters/{c}/coefficients"][...] = coeffs
    st = read_store(out)
    errors = np.zeros(len(mats))
    cluster_errors = []
    for cl in st.clusters:
        stored = cl["basis"] @ cl["coefficients"] if "basis" in cl else cl["raw"]
        offsets = np.concatenate([[0], np.cumsum([mats[i].shape[1] for i in cl["members"]])])
        err2 = norm2 = 0.0
        for j, i in enumerate(cl["members"]):
            d = np.sum((mats[i] - stored[:, offsets[j]:offsets[j + 1]]) ** 2)
            errors[i] = np.sqrt(d / np.sum(mats[i] ** 2))
            err2, norm2 = err2 + d, norm2 + np.sum(mats[i] ** 2)
        cluster_errors.append(np.sqrt(err2 / norm2))
    assert max(cluster_errors) <= 0.1 < errors[first]  # only the matrix guarantee is broken
    res = run_inprocess("verify", out, "--json", check=1)
    verdict = res.json()
    assert verdict["ok"] is False and verdict["guarantee"] == "matrix"
    assert verdict["over_eps"] == [int(i) for i in np.flatnonzero(errors > 0.1)] == [first]
    assert verdict["worst_matrix"] == first
    assert abs(verdict["max_matrix_error"] - errors[first]) <= 1e-9 * errors[first]
    shown = run_inprocess("verify", out, check=1).stdout
    assert "(matrix guarantee)" in shown
    assert f"matrix {first}: error {verdict['max_matrix_error']:.4g} > eps" in shown
