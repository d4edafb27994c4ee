"""Code health: one e_r implementation without cancellation, MatrixClusterer as scikit-learn
expects it, defaults defined once, and logging that stays silent unless asked for.

Errors are checked against independent numpy computations (the SVD of the concatenation, or a
spectrum constructed exactly), never against matclust's own numbers.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import pathlib

import numpy as np
import pytest

from conftest import run_inprocess, write_planted
from matclust import MatrixClusterer
from matclust.engine.exact import ExactBasis, exact_error
from matclust.engine.linalg import relative_error, sqnorm, truncation_error
from matclust.errors import InputError


# =============================================================================================
# e_r: one implementation, tail-sum based
# =============================================================================================
def low_rank_cluster(tiny: float, m=20, widths=(10,) * 30, seed=0):
    """Blocks whose concatenation has singular values exactly (1, 0.5, tiny) (up to the
    rounding of forming it), and the e_r at rank 2 that spectrum implies."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((m, 3)))[0]
    v = np.linalg.qr(rng.standard_normal((sum(widths), 3)))[0]
    spectrum = np.array([1.0, 0.5, tiny])
    concat = u @ np.diag(spectrum) @ v.T
    blocks = np.split(concat, np.cumsum(widths)[:-1], axis=1)
    return blocks, tiny / np.sqrt(np.sum(spectrum**2))


@pytest.mark.parametrize("tiny", [3e-9, 1e-7])
def test_small_error_of_exactly_low_rank_cluster_does_not_cancel(tiny):
    """e_r ~ 1e-9: 1 - top/total loses it to rounding; the tail sum keeps it."""
    blocks, want = low_rank_cluster(tiny)
    concat = np.hstack(blocks)
    s2 = np.linalg.svd(concat, compute_uv=False) ** 2
    # What exact.py computed before: sqrt(1 - top_r / ||M||^2). Off by more than half, or 0.
    cancelled = relative_error(sqnorm(concat), float(np.sum(s2[:2])))
    if tiny < 1e-8:
        assert abs(cancelled - want) > 0.5 * want, f"1 - top/total gave {cancelled}, e_r {want}"
    # The tail sum, through every path that computes e_r.
    assert truncation_error(s2, 2) == pytest.approx(want, rel=1e-5)
    assert exact_error(blocks, 2) == pytest.approx(want, rel=1e-5)
    acc = ExactBasis(concat.shape[0], 2, concat.dtype)  # 300 columns: the QR compression runs
    for b in blocks:
        acc.add(b)
    assert acc.best_error() == pytest.approx(want, rel=1e-5)
    # The baselines' bound is e_r itself (random partition, one cluster).
    clf = MatrixClusterer(rank=2, eps=0.5, method="random", n_clusters=1).fit(blocks)
    assert clf.cluster_stats_[0]["bound"] == pytest.approx(want, rel=1e-5)


def test_truncation_error_against_truncated_svd():
    """sqrt of the tail / total equals ||M - M_r|| / ||M|| with M_r numpy's rank-r truncation,
    whatever the order of the values; clamped and never below either rounding of ||M||^2."""
    rng = np.random.default_rng(1)
    M = rng.standard_normal((15, 40)) * np.exp(rng.uniform(-3, 0, 40))
    u, s, vt = np.linalg.svd(M, full_matrices=False)
    for r in (0, 1, 4, 14, 15, 20):
        M_r = (u[:, :r] * s[:r]) @ vt[:r]
        want = np.linalg.norm(M - M_r) / np.linalg.norm(M)
        # (at r = rank M, numpy's M - M_r is rounding, ~1e-15; e_r itself is 0)
        assert truncation_error(s**2, r) == pytest.approx(want, rel=1e-10, abs=1e-14)
        assert truncation_error(rng.permutation(s**2), r) == pytest.approx(want, rel=1e-10, abs=1e-14)
    assert truncation_error(s**2, 15) == 0.0
    assert truncation_error(np.zeros(5), 2) == 0.0 and truncation_error([], 2) == 0.0
    assert truncation_error(s**2, 1, total=1e-30) == 1.0  # a total below the tail: clamped
    low = truncation_error(s**2, 3)
    assert truncation_error(s**2, 3, total=np.sum(s**2) * (1 + 1e-9)) == low  # larger total ignored
    assert truncation_error(s**2, 3, total=np.sum(s**2) * (1 - 1e-9)) > low


# =============================================================================================
# MatrixClusterer and scikit-learn
# =============================================================================================
def init_parameters():
    return [p for p in inspect.signature(MatrixClusterer.__init__).parameters if p != "self"]


def test_get_set_params_and_clone():
    sklearn_base = pytest.importorskip("sklearn.base")
    clf = MatrixClusterer(rank=4, eps=0.1, method="weyl", n_clusters=None)
    params = clf.get_params()
    assert sorted(params) == sorted(init_parameters())
    assert params["rank"] == 4 and params["eps"] == 0.1 and params["method"] == "weyl"
    assert params["patience"] == inspect.signature(MatrixClusterer).parameters["patience"].default

    twin = sklearn_base.clone(clf)
    assert twin is not clf and type(twin) is MatrixClusterer
    assert twin.get_params() == params

    X = np.random.default_rng(2).standard_normal((30, 8, 3))
    clf.fit(X)
    fresh = sklearn_base.clone(clf)  # a clone is unfitted
    assert not hasattr(fresh, "labels_") and fresh.get_params() == params

    assert clf.set_params(eps=0.3, order="norm") is clf
    assert clf.get_params()["eps"] == 0.3 and clf.order == "norm"
    assert clf.fit(X).report_["params"]["eps"] == 0.3
    with pytest.raises(ValueError, match="ranks"):
        clf.set_params(ranks=3)


def test_repr_shows_changed_parameters_and_round_trips():
    assert repr(MatrixClusterer()) == "MatrixClusterer()"
    clf = MatrixClusterer(rank=4, eps=0.1, mode="out-of-core")
    assert repr(clf) == "MatrixClusterer(rank=4, eps=0.1, mode='out-of-core')"
    assert eval(repr(clf), {"MatrixClusterer": MatrixClusterer}).get_params() == clf.get_params()


def test_every_parameter_has_one_declared_constraint():
    """The constraints dict names exactly the parameters of __init__, and each one rejects a
    value of the wrong kind with InputError (the message names the parameter)."""
    assert sorted(MatrixClusterer._parameter_constraints) == sorted(init_parameters())
    names = {"n_clusters": "--clusters", "memory_limit": "memory limit", "random_state": "random_state"}
    for name in init_parameters():
        clf = MatrixClusterer(rank=3, eps=0.1).set_params(**{name: object()})
        with pytest.raises(InputError, match=names.get(name, name)):
            clf._validated()
    MatrixClusterer(rank=3, eps=0.1)._validated()  # the defaults themselves are valid


def test_fit_predict_returns_the_labels_of_fit():
    X = np.random.default_rng(3).standard_normal((40, 10, 2))
    labels = MatrixClusterer(rank=3, eps=0.6).fit_predict(X)
    fitted = MatrixClusterer(rank=3, eps=0.6).fit(X)
    assert labels.shape == (40,) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, fitted.labels_)


def test_cli_defaults_are_the_api_defaults():
    """Each default is defined once: the cluster and compare commands show the signature's."""
    import click

    from matclust.cli import cli, parse_size
    from matclust.compare import compare

    signature = inspect.signature(MatrixClusterer).parameters
    option_of = {"seed": "random_state"}
    for command in ("cluster", "compare"):
        ctx = click.Context(cli.commands[command])
        for opt in cli.commands[command].params:
            name = option_of.get(opt.name, opt.name)
            default = opt.get_default(ctx)
            if name in signature and opt.show_default:  # every default the help shows
                default = parse_size(default) if name == "memory_limit" else default
                assert default == signature[name].default, f"{command} --{opt.name}"
    compare_defaults = inspect.signature(compare).parameters
    for name in ("patience", "oversampling", "memory_limit"):
        assert compare_defaults[name].default == signature[name].default
    assert compare_defaults["seed"].default == signature["random_state"].default


# =============================================================================================
# logging
# =============================================================================================
@pytest.fixture
def restore_logging():
    yield
    from matclust.cli import _configure_logging

    _configure_logging(0)  # what any later run without -v does
    assert not [h for h in logging.getLogger("matclust").handlers if getattr(h, "matclust_cli", 0)]
    assert logging.getLogger("matclust").level == logging.NOTSET


def test_verbose_logs_stages_on_stderr_and_default_is_silent(tmp_path, restore_logging):
    path, _, _ = write_planted(tmp_path / "in.h5", K=40)
    quiet = run_inprocess("cluster", path, "-o", tmp_path / "a.h5", "--rank", 2, "--eps", 0.1,
                          "--json", check=0)
    assert quiet.stderr == ""
    info = run_inprocess("-v", "cluster", path, "-o", tmp_path / "b.h5", "--rank", 2,
                         "--eps", 0.1, "--json", check=0)
    report = json.loads(info.stdout)  # stdout stays the JSON document alone
    assert report["clusters"] == json.loads(quiet.stdout)["clusters"]
    for stage in ("matclust.sources.formats: opened", "matclust.api: in-memory run",
                  "matclust.store: committed"):
        assert stage in info.stderr, info.stderr
    assert "matclust.driver: cluster of" not in info.stderr  # that is -vv
    debug = run_inprocess("-vv", "cluster", path, "-o", tmp_path / "c.h5", "--rank", 2,
                          "--eps", 0.1, "--quiet", "--mode", "out-of-core", check=0)
    lines = [ln for ln in debug.stderr.splitlines() if "matclust.driver: cluster of" in ln]
    # One line per cluster the driver forms (out of core: planned, then any formed again from
    # the members the storing pass evicts), so at least one and never more than K.
    assert 1 <= len(lines) <= 40
    assert "matclust.streaming: writing pass" in debug.stderr


def test_library_code_does_not_print():
    """Output is the CLI's business: no print() anywhere else in the package."""
    package = pathlib.Path(__file__).resolve().parents[1] / "matclust"
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
