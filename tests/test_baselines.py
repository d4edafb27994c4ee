"""The baselines (`cluster --method random|kmeans|hdbscan`) and `matclust compare`.

Baselines have no error control: their stores must still be valid (README.md's layout, every
error reported as it is), the report must count the clusters over eps, and `verify` must judge
them honestly: exit 0 when every cluster is within eps, exit 1 otherwise. Stores are read and
errors recomputed independently (conftest).
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from conftest import PAPER, concat, load_input, read_store, sq, wide
from matclust.api import MatrixClusterer
from matclust.cli import main


def _check_baseline_store(path, input_path, *, rank, eps, method):
    """Structure and honesty of a baseline store; returns (store, recomputed errors)."""
    st = read_store(path)
    mats, _, _ = load_input(input_path)
    K, m = len(mats), mats[0].shape[0]
    assert st.attrs["format"] == "matclust/1" and st.attrs["complete"] is True
    assert st.params["method"] == method and st.params["rank"] == rank
    assert st.labels.shape == (K,)
    seen = np.zeros(K, dtype=int)
    errors = []
    stats = st.report["cluster_stats"]
    assert len(stats) == len(st.clusters) == st.report["clusters"]
    for c, cl in enumerate(st.clusters):
        members = cl["members"]
        seen[members] += 1
        assert np.all(st.labels[members] == c)
        M = concat([mats[i] for i in members])
        if "basis" in cl:
            U, C = wide(cl["basis"]), wide(cl["coefficients"])
            assert U.shape[0] == m and U.shape[1] <= rank and C.shape == (U.shape[1], M.shape[1])
            assert np.abs(U.conj().T @ U - np.eye(U.shape[1])).max() < 1e-4
            R = U @ C
            # Stored factored at the target rank: the rule r (m + N) < m N decides, not eps.
            assert rank * (m + M.shape[1]) < m * M.shape[1] and len(members) >= 2
        else:
            R = wide(cl["raw"])
        err = math.sqrt(sq(M - R) / sq(M))
        errors.append(err)
        assert stats[c]["error"] == pytest.approx(err, rel=1e-4, abs=1e-6)
        assert stats[c]["bound"] >= stats[c]["error"] - 1e-12
    assert np.all(seen == 1)
    assert st.report["over_eps"] == sum(e > eps for e in errors)
    assert st.report["max_error"] == pytest.approx(max(errors), rel=1e-4, abs=1e-6)
    return st, errors


@pytest.fixture(scope="module")
def planted_h5(tmp_path_factory):
    from conftest import write_planted

    path = tmp_path_factory.mktemp("baselines") / "planted.h5"
    write_planted(path, K=60, m=10, n=4, subspaces=3, rank=2, noise=0.01)
    return path


@pytest.fixture(scope="module")
def near_duplicates_h5(tmp_path_factory):
    """Four groups of near-identical matrices: k-means on the flattened matrices finds them, and
    each group is rank 1 + tiny noise, so every cluster is within eps."""
    from matclust.collections_io import write_collection

    rng = np.random.default_rng(3)
    centers = [np.outer(rng.standard_normal(10), rng.standard_normal(4)) * 5 for _ in range(4)]
    mats = np.stack([centers[i % 4] + 1e-3 * rng.standard_normal((10, 4)) for i in range(48)])
    path = tmp_path_factory.mktemp("dups") / "dups.h5"
    write_collection(str(path), mats, layout="stack", dataset="matrices")
    return path


@pytest.mark.parametrize("method,extra", [("random", ["--clusters", 4]),
                                          ("kmeans", ["--clusters", 4]),
                                          ("hdbscan", [])])
def test_baseline_store_is_valid_and_verify_is_honest(method, extra, planted_h5, tmp_path, cli):
    out = tmp_path / f"{method}.h5"
    res = cli("cluster", *PAPER, planted_h5, "-o", out, "--rank", 2, "--eps", 0.05, "--method", method,
              *extra, "--json", check=0)
    report = json.loads(res.stdout)
    st, errors = _check_baseline_store(out, planted_h5, rank=2, eps=0.05, method=method)
    assert report["over_eps"] == st.report["over_eps"]
    ver = cli("verify", out, "--json")
    doc = json.loads(ver.stdout)
    expected_over = [c for c, e in enumerate(errors) if e > 0.05]
    assert doc["over_eps"] == expected_over
    assert ver.returncode == (1 if expected_over else 0), str(ver)
    if method == "random":
        # Random groups of 15 from 3 planted rank-2 subspaces cannot fit rank 2 within 5%.
        assert report["over_eps"] == report["clusters"] == 4 and ver.returncode == 1
        assert st.params["n_clusters"] == 4 and st.params["seed"] == 0


def test_kmeans_within_eps_verifies(near_duplicates_h5, tmp_path, cli):
    out = tmp_path / "km.zarr"
    res = cli("cluster", *PAPER, near_duplicates_h5, "-o", out, "--rank", 2, "--eps", 0.05,
              "--method", "kmeans", "--clusters", 4, "--seed", 1, "--json", check=0)
    report = json.loads(res.stdout)
    assert report["clusters"] == 4 and report["over_eps"] == 0 and report["max_error"] < 0.01
    _check_baseline_store(out, near_duplicates_h5, rank=2, eps=0.05, method="kmeans")
    cli("verify", out, check=0)


def test_random_is_reproducible_with_seed(planted_h5):
    a = MatrixClusterer(guarantee="cluster", encoding="plain", rank=2, eps=0.05, method="random", n_clusters=5, random_state=3)
    b = MatrixClusterer(guarantee="cluster", encoding="plain", rank=2, eps=0.05, method="random", n_clusters=5, random_state=3)
    la = a.fit_predict(np.stack(load_input(planted_h5)[0]))
    lb = b.fit_predict(np.stack(load_input(planted_h5)[0]))
    assert np.array_equal(la, lb) and len(np.unique(la)) == 5
    assert a.report_["over_eps"] == sum(s["error"] > 0.05 for s in a.cluster_stats_)


def test_random_accepts_variable_widths_kmeans_does_not(tmp_path, cli):
    from conftest import write_planted

    path, mats, _ = write_planted(tmp_path / "var.h5", K=30, m=8, n=2, n_max=5, layout="group")
    cli("cluster", *PAPER, path, "-o", tmp_path / "r.h5", "--rank", 2, "--eps", 0.1, "--method", "random",
        "--clusters", 3, check=0)
    res = cli("cluster", *PAPER, path, "-o", tmp_path / "k.h5", "--rank", 2, "--eps", 0.1,
              "--method", "kmeans", "--clusters", 3, check=2)
    assert res.stderr.startswith("error:") and "equal widths" in res.stderr
    assert str(path) in res.stderr or "var.h5" in res.stderr
    assert not (tmp_path / "k.h5").exists()


def test_clusters_option_rules(planted_h5, tmp_path, cli):
    res = cli("cluster", *PAPER, planted_h5, "-o", tmp_path / "a.h5", "--rank", 2, "--eps", 0.05,
              "--method", "kmeans", check=2)
    assert "--clusters" in res.stderr
    res = cli("cluster", *PAPER, planted_h5, "-o", tmp_path / "b.h5", "--rank", 2, "--eps", 0.05,
              "--clusters", 3, check=2)
    assert "--clusters" in res.stderr
    res = cli("cluster", *PAPER, planted_h5, "-o", tmp_path / "c.h5", "--rank", 2, "--eps", 0.05,
              "--method", "random", "--clusters", 1000, check=2)
    assert "K = 60" in res.stderr


def test_missing_scikit_learn_is_a_clear_error(planted_h5, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(SystemExit) as exc:
        main(["cluster", *PAPER, str(planted_h5), "-o", str(tmp_path / "k.h5"), "--rank", "2",
              "--eps", "0.05", "--method", "kmeans", "--clusters", "3", "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("error:") and "scikit-learn" in err and "matclust[baselines]" in err
    # random needs no extra
    with pytest.raises(SystemExit) as exc:
        main(["cluster", *PAPER, str(planted_h5), "-o", str(tmp_path / "r.h5"), "--rank", "2",
              "--eps", "0.05", "--method", "random", "--clusters", "3", "--quiet"])
    assert exc.value.code == 0


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------
def test_compare_json_rows(planted_h5, cli):
    res = cli("compare", planted_h5, "--rank", 2, "--eps", 0.05, "--json", check=0)
    rows = json.loads(res.stdout)
    assert isinstance(rows, list) and len(rows) >= 5
    methods = [r["method"] for r in rows]
    assert methods == ["incremental/residual", "incremental/norm", "residual/residual",
                       "residual/norm", "weyl/residual", "weyl/norm", "random", "kmeans"]
    for r in rows:
        assert {"compression_ratio", "max_error", "clusters", "singletons", "over_eps",
                "seconds"} <= set(r)
        assert r["compression_ratio"] >= 1.0 - 1e-12
    for r in rows[:6]:  # the bounded methods honour eps
        assert r["over_eps"] == 0 and r["max_error"] <= 0.05
    first = rows[0]
    assert rows[6]["clusters"] == first["clusters"]  # random gets as many clusters


def test_compare_table_and_method_selection(planted_h5, cli):
    res = cli("compare", planted_h5, "--rank", 2, "--eps", 0.05,
              "--methods", "weyl/norm,approximate", "--methods", "hdbscan", check=0)
    for label in ("weyl/norm", "incremental/residual", "incremental/norm", "hdbscan",
                  "compression", "over eps"):
        assert label in res.stdout
    res = cli("compare", planted_h5, "--rank", 2, "--eps", 0.05, "--methods", "nope", check=2)
    assert "unknown method" in res.stderr
    res = cli("compare", planted_h5, "--rank", 2, "--eps", 0.05, "--methods", "random", check=2)
    assert "--clusters" in res.stderr


def test_compare_runs_within_the_memory_limit_and_leaves_nothing(tmp_path, monkeypatch):
    """compare writes each run to a temporary store: a collection larger than the limit runs
    out of core (as cluster would), the results equal a cluster run's, and the temporary
    directory is gone afterwards."""
    import tempfile

    from matclust import MatrixClusterer
    from matclust.compare import compare
    from matclust.sample import planted_collection
    from matclust.sources import array_source

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    mats, _ = planted_collection(6000, 40, 12, 4, 3, 0.01, "float64", None, 5, 10.0)
    src = array_source(list(mats))
    from matclust import limits

    from matclust import defaults
    from matclust.api import summary_bytes

    # The least limit holding the summaries the run plans on (as matclust.api.cluster_plan
    # asks for them): its cache is far below the 22 MiB of matrices.
    need = summary_bytes(src, {"method": "incremental", "order": "residual", "rank": 4,
                               "eps": 0.1, "oversampling": defaults.OVERSAMPLING})
    limit = limits.smallest_limit(
        lambda x: limits.plan(x, 6000, limits.cluster_reserve(6000), need) is not None)
    result = compare(src, 4, 0.1, ["incremental/residual", "random"], n_clusters=7,
                     memory_limit=limit)
    bounded, random_row = result.rows
    assert bounded["mode"] == "out-of-core" and bounded["over_eps"] == 0
    assert random_row["mode"] == "in-memory" and random_row["clusters"] == 7
    alone = MatrixClusterer(guarantee="cluster", encoding="plain", rank=4, eps=0.1, memory_limit=limit).fit(src, str(tmp_path / "a.h5"))
    assert bounded["clusters"] == alone.n_clusters_
    assert bounded["compression_ratio"] == pytest.approx(alone.compression_ratio_, rel=1e-12)
    assert list(scratch.iterdir()) == []
