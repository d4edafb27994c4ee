"""The bound study (`matclust bounds`, matclust.study): every bound >= the exact error, the
incremental bound the tightest on average, the CSV and plot outputs, and exit 1 on a violation.

The exact error is checked against an independent SVD of the concatenation (conftest.best_error).
"""

from __future__ import annotations

import csv
import struct
import sys

import numpy as np
import pytest

from conftest import best_error
from matclust.cli import main
from matclust.driver import feeding_order
from matclust.engine import make_estimator
from matclust.engine.linalg import sqnorm
from matclust.errors import InputError
from matclust.sample import planted_collection
from matclust.sources import array_source
from matclust.engine.exact import exact_error
from matclust.study import COLUMNS, ESTIMATOR_NAMES, bound_study, parse_sizes

SPEC_COLUMNS = ["size", "trial", "true_error", "weyl", "residual_norm", "residual_residual",
                "incremental_norm", "incremental_residual"]


def _collections():
    rng = np.random.default_rng(7)
    planted = planted_collection(120, 16, 3, 4, 2, 0.05, "float64", None, 1, 10.0)[0]
    # Blocks wider than the rank: Gaussian (the case where the paper's public Weyl code fails)
    # and planted subspaces of rank 5 > r = 3.
    wide = rng.standard_normal((120, 20, 10))
    wide_planted = planted_collection(120, 20, 10, 3, 5, 0.05, "float64", None, 2, 10.0)[0]
    cplx = planted_collection(120, 12, 3, 4, 2, 0.05, "complex128", None, 3, 10.0)[0]
    # Exactly low-rank (rank 2 < r): residuals vanish, the numerically delicate case.
    lowrank = planted_collection(120, 16, 3, 2, 2, 0.0, "float64", None, 4, 10.0)[0]
    return {"planted": planted, "wide": wide, "wide_planted": wide_planted, "complex": cplx,
            "lowrank": lowrank}


COLLECTIONS = _collections()


@pytest.mark.parametrize("name", sorted(COLLECTIONS))
def test_no_violations_and_incremental_tightest(name):
    X = COLLECTIONS[name]
    result = bound_study(array_source(X), 3, range(2, 31, 7), 4, seed=0)
    assert len(result.rows) == 5 * 4
    assert result.violations == 0
    for row in result.rows:
        for est in ESTIMATOR_NAMES:
            assert row[est] >= row["true_error"] - 1e-12, (name, est, row)
    summary = {s["estimator"]: s for s in result.summary()}
    inc = max(summary["incremental_norm"]["mean_bound"], summary["incremental_residual"]["mean_bound"])
    for other in ("weyl", "residual_norm", "residual_residual"):
        assert inc <= summary[other]["mean_bound"] + 1e-12, (name, summary)
    assert result.tightest().startswith("incremental")


def test_true_error_matches_independent_svd():
    X = COLLECTIONS["complex"]
    result = bound_study(array_source(X), 3, [2, 9], 3, seed=5)
    rng = np.random.default_rng(5)  # the study's draws, replayed
    for row in result.rows:
        idx = np.sort(rng.choice(len(X), size=row["size"], replace=False))
        assert row["true_error"] == pytest.approx(best_error([X[i] for i in idx], 3), abs=1e-12)


def test_exact_error_exactly_low_rank_is_tiny():
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((12, 2)))[0]
    blocks = [u @ rng.standard_normal((2, 3)) for _ in range(5)]
    assert exact_error(blocks, 2) < 1e-13


def test_feeding_order_seed_then_candidate_order():
    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal((10, 2)) * s for s in rng.uniform(0.5, 5, size=9)]
    norms = np.array([sqnorm(b) for b in blocks])
    rank = 4
    by_norm = feeding_order(blocks, rank, "norm")
    # Seed: the two largest (2 + 2 columns = rank), then ascending norm.
    assert set(by_norm[:2]) == set(np.argsort(-norms)[:2])
    assert np.all(np.diff(norms[by_norm[2:]]) >= 0)
    by_res = feeding_order(blocks, rank, "residual")
    assert list(by_res[:2]) == list(by_norm[:2])
    q = np.linalg.svd(np.hstack([blocks[i] for i in by_res[:2]]))[0][:, :rank]
    resid = [np.linalg.norm(blocks[i] - q @ (q.T @ blocks[i])) for i in by_res[2:]]
    assert np.all(np.diff(resid) >= -1e-12)
    assert sorted(by_res) == list(range(9))


def test_parse_sizes():
    assert parse_sizes("2:10:4") == [2, 6, 10]
    assert parse_sizes("2:11:4") == [2, 6, 10]
    assert parse_sizes("3:5") == [3, 4, 5]
    assert parse_sizes("7") == [7]
    for bad in ("0:5", "5:2", "a:b", "2:5:0", "1:2:3:4"):
        with pytest.raises(InputError):
            parse_sizes(bad)


def test_size_larger_than_collection_is_input_error():
    with pytest.raises(InputError, match="exceeds"):
        bound_study(array_source(COLLECTIONS["planted"]), 3, [500], 1)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_h5(tmp_path_factory):
    from conftest import write_planted

    path = tmp_path_factory.mktemp("study") / "planted.h5"
    write_planted(path, K=40, m=12, n=3, subspaces=3, rank=2, noise=0.05)
    return path


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_csv_columns_and_plot(sample_h5, tmp_path, cli):
    csv_path, png = tmp_path / "study.csv", tmp_path / "study.png"
    res = cli("bounds", sample_h5, "--rank", 2, "--sizes", "2:12:5", "--trials", 3,
              "--seed", 1, "-o", csv_path, "--plot", png, check=0)
    assert "incremental_residual" in res.stdout and "violations" not in res.stderr
    with open(csv_path) as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    assert header[:8] == SPEC_COLUMNS
    assert header == list(COLUMNS)
    assert all(c.endswith("_seconds") for c in header[8:])
    assert len(rows) == 3 * 3
    assert [int(r[0]) for r in rows] == [2, 2, 2, 7, 7, 7, 12, 12, 12]
    for r in rows:
        true = float(r[2])
        assert all(float(v) >= true - 1e-12 for v in r[3:8])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 300 and len(data) < 300_000


def test_cli_json_summary(sample_h5, tmp_path, cli):
    import json

    res = cli("bounds", sample_h5, "--rank", 2, "--sizes", "3:9:3", "--trials", 2,
              "-o", tmp_path / "s.csv", "--json", check=0)
    doc = json.loads(res.stdout)
    assert doc["violations"] == 0 and doc["clusters"] == 6
    assert [e["estimator"] for e in doc["estimators"]] == list(ESTIMATOR_NAMES)


def test_cli_exit_1_on_violation(sample_h5, tmp_path, capsys, monkeypatch):
    """An estimator whose bound falls below the true error makes the study (and CLI) fail."""

    class TooSmall:
        def __init__(self, inner):
            self.inner = inner
            self.rank = inner.rank

        def bound_of(self, blocks):
            return 0.0  # certainly below the true error of a noisy cluster

    def factory(method, rank, m, cplx=False, oversampling=5):
        est = make_estimator(method, rank, m, cplx, oversampling)
        return TooSmall(est) if method == "weyl" else est

    monkeypatch.setattr("matclust.study.make_estimator", factory)
    csv_path = tmp_path / "bad.csv"
    code, out, err = _run(["bounds", sample_h5, "--rank", 2, "--sizes", "4:8:4", "--trials", 2,
                           "-o", csv_path, "--quiet"], capsys)
    assert code == 1
    assert "fell below the true error" in err
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(float(r["weyl"]) == 0.0 for r in rows)


def test_cli_plot_without_matplotlib(sample_h5, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    csv_path = tmp_path / "s.csv"
    code, out, err = _run(["bounds", sample_h5, "--rank", 2, "--sizes", "2:4", "--trials", 1,
                           "-o", csv_path, "--plot", tmp_path / "s.png"], capsys)
    assert code == 2
    assert err.startswith("error:") and "matplotlib" in err and "matclust[plot]" in err
    assert not csv_path.exists()  # failed before running the study


def test_cli_refuses_to_overwrite(sample_h5, tmp_path, cli):
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("keep")
    res = cli("bounds", sample_h5, "--rank", 2, "--sizes", "2:3", "--trials", 1, "-o", csv_path,
              check=2)
    assert "--overwrite" in res.stderr and csv_path.read_text() == "keep"
