"""Edge inputs succeed and verify: all-zero matrices, a single matrix, magnitudes around 1e-30
and 1e30 (same labels as the unscaled collection), duplicates, integers, float16."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import PAPER, check_store, read_store, run_matclust
from matclust.sample import planted_collection

RANK, EPS = 2, 0.05


def write(path, data, dataset="matrices"):
    from matclust.collections_io import write_collection

    layout = "stack" if isinstance(data, np.ndarray) else "group"
    write_collection(os.fspath(path), data, layout=layout, dataset=dataset)
    return os.fspath(path)


def cluster_ok(inp, out, cwd, *extra, rank=RANK, eps=EPS, group=False, dataset="matrices"):
    """Run, then check the store against the contract and with ``matclust verify``."""
    from matclust.verify import verify_store

    run_matclust("cluster", *PAPER, inp, "-o", out, "--rank", rank, "--eps", eps, "--quiet", *extra,
                 cwd=cwd, check=0)
    out = os.path.join(cwd, out)
    st, errors = check_store(out, os.path.join(cwd, inp), rank=rank, eps=eps,
                             method="incremental", order="residual", group=group, dataset=dataset,
                             enforce_dtype=False)
    result = verify_store(out)
    assert result["ok"], result
    assert [os.path.basename(out)] == [n for n in os.listdir(cwd) if n.startswith(".") or n == os.path.basename(out)]
    return st


def planted(K=60, m=10, n=3, dtype="float64", seed=0, subspaces=4):
    mats, _ = planted_collection(K, m, n, subspaces, RANK, 0.01, dtype, None, seed, 10.0)
    return np.asarray(mats)


@pytest.mark.parametrize("out", ["zeros.h5", "zeros.zarr"])
def test_all_zero_matrices(tmp_path, out):
    write(tmp_path / "zeros_in.h5", np.zeros((12, 6, 3)))
    st = cluster_ok("zeros_in.h5", out, tmp_path)
    assert st.report["max_error"] == 0.0


def test_some_zero_matrices_among_others(tmp_path):
    data = planted(K=30)
    data[[3, 10, 17]] = 0.0
    write(tmp_path / "mixed.h5", data)
    cluster_ok("mixed.h5", "mixed_out.h5", tmp_path)


@pytest.mark.parametrize("shape", [(1, 8, 3), (1, 1, 1), (1, 5, 9)])
def test_a_single_matrix(tmp_path, shape):
    write(tmp_path / "one.h5", np.random.default_rng(0).standard_normal(shape))
    st = cluster_ok("one.h5", "one_out.h5", tmp_path)
    assert list(st.labels) == [0]


def test_a_single_member_group(tmp_path):
    write(tmp_path / "onegroup.h5", [np.random.default_rng(0).standard_normal((7, 4))])
    cluster_ok("onegroup.h5", "onegroup_out.zarr", tmp_path, group=True)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tiny_and_huge_magnitudes_cluster_like_the_unscaled(tmp_path, dtype):
    base = planted(K=60, dtype="float64", seed=4)
    labels = {}
    for scale in (1.0, 1e-30, 1e30):
        name = f"scaled_{scale:g}.h5"
        write(tmp_path / name, (base * scale).astype(dtype))
        st = cluster_ok(name, f"out_{scale:g}.h5", tmp_path)
        labels[scale] = st.labels
        assert st.report["max_error"] <= EPS
    np.testing.assert_array_equal(labels[1e-30], labels[1.0])
    np.testing.assert_array_equal(labels[1e30], labels[1.0])


def test_duplicated_matrices(tmp_path):
    base = planted(K=10, seed=2)
    data = np.concatenate([base, base, base[:4], base[:4]])  # every matrix at least twice
    write(tmp_path / "dups.h5", data)
    st = cluster_ok("dups.h5", "dups_out.h5", tmp_path)
    assert len(st.clusters) < len(data)


def test_all_identical_matrices(tmp_path):
    one = np.random.default_rng(3).standard_normal((8, 3))
    write(tmp_path / "same.h5", np.stack([one] * 25))
    st = cluster_ok("same.h5", "same_out.h5", tmp_path, rank=3)
    assert len(st.clusters) == 1, "identical rank-3 matrices fit one rank-3 cluster"


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "int16"])
def test_integers(tmp_path, dtype):
    rng = np.random.default_rng(5)
    if dtype == "uint8":
        data = rng.integers(0, 255, size=(30, 6, 3)).astype(dtype)
    else:
        data = planted(K=30, dtype=dtype, seed=5)
    write(tmp_path / "ints.h5", data)
    cluster_ok("ints.h5", "ints_out.h5", tmp_path)


def test_float16(tmp_path):
    write(tmp_path / "half.h5", planted(K=40, dtype="float16", seed=6))
    cluster_ok("half.h5", "half_out.zarr", tmp_path)


def test_float16_group_with_varying_widths(tmp_path):
    rng = np.random.default_rng(7)
    mats = [rng.standard_normal((6, int(w))).astype(np.float16) for w in rng.integers(1, 5, 15)]
    write(tmp_path / "halfgroup.h5", mats, dataset="g")
    cluster_ok("halfgroup.h5", "halfgroup_out.h5", tmp_path, group=True, dataset="g")


def test_rank_larger_than_the_matrices(tmp_path):
    write(tmp_path / "small.h5", planted(K=20, m=3, n=2, seed=8))
    st = cluster_ok("small.h5", "small_out.h5", tmp_path, rank=5)
    assert st.report["max_error"] <= EPS
    assert read_store(os.path.join(tmp_path, "small_out.h5")).labels.shape == (20,)
