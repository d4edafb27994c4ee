"""End-to-end acceptance tests of the command line against the contract in README.md.

Every check is made against an independent computation: inputs and result stores are read with
h5py / zarr directly and every error is recomputed with numpy (see conftest.py). matclust's own
report is only ever compared with those recomputations, never trusted.

Commands run either as subprocesses (``run_matclust``: what reaches the terminal, exit codes) or,
to keep the suite fast, in-process through ``matclust.cli.main`` (``run_inprocess``: the console
script's entry point, same exit codes, no interpreter start-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import (
    PAPER,
    best_error,
    check_store,
    check_stored_dtypes,
    concat,
    load_input,
    paper_ratio,
    read_store,
    run_inprocess,
    run_matclust,
    sq,
    tamper_coefficient,
    tree_digest,
    write_planted,
)

import matclust

METHODS = ("incremental", "residual", "weyl")
ORDERS = ("residual", "norm")


def cluster_cmd(inp, out, *, rank, eps, method=None, order=None, extra=()):
    args = ["cluster", *PAPER, inp, "-o", out, "--rank", rank, "--eps", eps, "--quiet"]
    if method:
        args += ["--method", method]
    if order:
        args += ["--order", order]
    return [*args, *extra]


def assert_verify_then_tamper(out, input_path=None, run=run_inprocess):
    """verify exits 0; after one coefficient is bumped it exits 1 (and names the cluster)."""
    extra = ["--input", input_path] if input_path else []
    run("verify", out, "--quiet", *extra, check=0)
    changed = tamper_coefficient(out)
    res = run("verify", out, "--json", "--quiet", *extra)
    assert res.returncode == 1, f"verify accepted a tampered store (cluster {changed}):\n{res}"
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and changed in doc["over_eps"], doc


def assert_error_line(res, *words):
    """Exit 2 with one `error:` line on stderr naming the given words."""
    assert res.returncode == 2, f"expected exit 2:\n{res}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), f"stderr is not one error: line:\n{res}"
    for word in words:
        assert str(word) in lines[0], f"error line does not name {word!r}:\n{res}"


# =============================================================================================
# 1. The contract of the store: every method x order on one format ...
# =============================================================================================
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_order_honours_contract(tmp_path, method, order):
    inp, _, _ = write_planted(tmp_path / "in.h5", K=90, m=12, n=3, subspaces=3, rank=2,
                              noise=0.01, dtype="float64", seed=1)
    out = tmp_path / ("out.h5" if order == "residual" else "out.zarr")
    eps = 0.2 if method == "weyl" else 0.05  # weyl is loose: give it room to form clusters
    run_matclust(*cluster_cmd(inp, out, rank=3, eps=eps, method=method, order=order), check=0)
    st, errors = check_store(out, inp, rank=3, eps=eps, method=method, order=order, patience=10)
    assert any("basis" in c for c in st.clusters), f"{method}/{order}: no factored cluster at all"
    assert len(st.clusters) < 90
    assert_verify_then_tamper(out, run=run_matclust)


# ... and every layout, dtype and format with at least one method.
LAYOUT_CASES = [
    # dtype, layout, input format, output ext, method
    ("float16", "stack", "h5", ".zarr", "weyl"),
    ("float32", "group", "zarr3", ".h5", "residual"),
    ("float64", "group", "zarr2", ".zarr", "incremental"),
    ("int32", "stack", "zarr2", ".h5", "incremental"),
    ("complex64", "group", "h5", ".h5", "residual"),
    ("complex128", "stack", "zarr3", ".zarr", "weyl"),
    ("float32", "stack", "zarr3", ".hdf5", "incremental"),
    ("int32", "group", "h5", ".zarr", "weyl"),
    ("complex64", "stack", "zarr2", ".zarr", "incremental"),
    ("float16", "group", "zarr3", ".h5", "residual"),
    ("complex128", "group", "zarr2", ".h5", "incremental"),
]


@pytest.mark.parametrize("dtype,layout,fmt,out_ext,method", LAYOUT_CASES,
                         ids=["-".join(c[:4]).replace(".", "") + "-" + c[4] for c in LAYOUT_CASES])
def test_layouts_dtypes_formats_honour_contract(tmp_path, dtype, layout, fmt, out_ext, method):
    group = layout == "group"
    inp_name = "in.h5" if fmt == "h5" else "in.zarr"
    eps = 0.25 if method == "weyl" else 0.08
    inp, mats, _ = write_planted(tmp_path / inp_name, K=70, m=10, n=2 if group else 3,
                                 n_max=5 if group else None, subspaces=3, rank=2, noise=0.01,
                                 dtype=dtype, layout=layout, fmt=fmt, seed=2)
    if group:
        assert len({a.shape[1] for a in mats}) > 1, "the group case needs variable widths"
    out = tmp_path / f"out{out_ext}"
    run_inprocess(*cluster_cmd(inp, out, rank=3, eps=eps, method=method), check=0)
    st, _ = check_store(out, inp, rank=3, eps=eps, method=method, order="residual", group=group,
                        dtype=dtype, enforce_dtype=False)
    assert any("basis" in c for c in st.clusters), "no factored cluster at all"
    if np.dtype(dtype).kind == "c":
        basis = next(c["basis"] for c in st.clusters if "basis" in c)
        assert np.iscomplexobj(basis), "complex input must get complex bases"
    # the dtype assertion last, so that verify and the tamper check are exercised regardless.
    first = read_store(out)
    assert_verify_then_tamper(out)
    check_stored_dtypes(out, np.dtype(dtype), first)


@pytest.mark.parametrize("layout,fmt", [("stack", "h5"), ("group", "zarr3")])
def test_transpose_honours_contract(tmp_path, layout, fmt):
    """--transpose clusters the transposes: write (n_i x m) matrices and check against A_i^T."""
    group = layout == "group"
    inp, _, _ = write_planted(tmp_path / ("in.h5" if fmt == "h5" else "in.zarr"), K=60, m=10,
                              n=2 if group else 3, n_max=5 if group else None, subspaces=3,
                              rank=2, noise=0.01, dtype="float32", layout=layout, fmt=fmt,
                              seed=3, transpose_on_disk=True)
    out = tmp_path / "out.zarr"
    run_inprocess(*cluster_cmd(inp, out, rank=3, eps=0.08, extra=["--transpose"]), check=0)
    st, _ = check_store(out, inp, transpose=True, rank=3, eps=0.08, method="incremental",
                        order="residual", group=group)
    assert st.report["m"] == 10
    assert_verify_then_tamper(out)


# =============================================================================================
# 2. Planted collections: near the planted partition's compression ratio
# =============================================================================================
PLANTED_CASES = {
    # K, m, n, n_max, subspaces, planted rank, noise, dtype, layout, target rank, eps
    "stack-f64": (150, 16, 4, None, 4, 3, 0.01, "float64", "stack", 3, 0.05),
    "group-f32": (120, 12, 2, 5, 5, 2, 0.01, "float32", "group", 3, 0.05),
    "stack-c128": (100, 10, 3, None, 3, 2, 0.005, "complex128", "stack", 2, 0.02),
}


@pytest.mark.parametrize("case", list(PLANTED_CASES))
def test_planted_compression_ratio(tmp_path, case):
    """incremental / residual order reaches >= 0.8 of the planted partition's ratio.

    (Only the incremental bound is held to this: the residual (pinching) and Weyl bounds drop all
    energy a block shares with the cluster's span, so on blocks from one subspace they admit
    almost nothing - a property of those bounds (docs/algorithms.md), not of the implementation.)
    """
    K, m, n, n_max, subspaces, prank, noise, dtype, layout, rank, eps = PLANTED_CASES[case]
    inp, mats, labels = write_planted(tmp_path / "planted.h5", K=K, m=m, n=n, n_max=n_max,
                                      subspaces=subspaces, rank=prank, noise=noise, dtype=dtype,
                                      layout=layout, seed=4)
    # The yardstick: the planted partition, which must itself be feasible.
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for g in groups:
        assert best_error([mats[i] for i in g], rank) <= eps, "planted partition infeasible"
    planted_cr = paper_ratio(m, rank, [[mats[i].shape[1] for i in g] for g in groups])

    out = tmp_path / "out.h5"
    run_inprocess(*cluster_cmd(inp, out, rank=rank, eps=eps, method="incremental",
                               order="residual"), check=0)
    st, _ = check_store(out, inp, rank=rank, eps=eps, method="incremental", order="residual",
                        group=layout == "group")
    groups_found = [[mats[i].shape[1] for i in c["members"]] for c in st.clusters]
    cr = paper_ratio(m, rank, groups_found)
    assert cr >= 0.8 * planted_cr, (
        f"{case}: compression ratio {cr:.3f} < 0.8 x planted {planted_cr:.3f} "
        f"({len(st.clusters)} clusters, sizes {[len(c['members']) for c in st.clusters]})")
    assert st.report["compression_ratio"] == pytest.approx(cr)


# =============================================================================================
# 3. Blocks wider than the rank: weyl never exceeds eps
# =============================================================================================
@pytest.mark.parametrize("kind,eps,order,spread", [
    ("planted3", 0.2, "norm", 30.0),       # subspaces of the target rank
    ("planted3", 0.3, "residual", 10.0),
    ("planted4", 0.6, "norm", 3.0),        # above the target rank: a block's norm overstates E_r
    ("planted4", 0.55, "residual", 3.0),
    ("random", 0.8, "norm", None),         # unstructured 12 x 10 blocks
])
def test_weyl_wide_blocks_never_exceed_eps(tmp_path, kind, eps, order, spread):
    """12 x 10 blocks at rank 3: every seed is wider than the rank, so the Weyl bound must use
    the seed's top-r energy, never its full norm (docs/algorithms.md, Bound 1)."""
    rank = 3
    if kind == "random":
        rng = np.random.default_rng(5)
        from matclust.collections_io import write_collection

        data = rng.standard_normal((60, 12, 10)) * np.exp(rng.uniform(-1, 1, (60, 1, 1)))
        inp = str(tmp_path / "in.h5")
        write_collection(inp, data)
    else:
        inp, _, _ = write_planted(tmp_path / "in.h5", K=60, m=12, n=10, subspaces=3,
                                  rank=3 if kind == "planted3" else 4, noise=0.03,
                                  dtype="float64", seed=6, scale_spread=spread)
    out = tmp_path / "out.h5"
    run_inprocess(*cluster_cmd(inp, out, rank=rank, eps=eps, method="weyl", order=order), check=0)
    # check_store recomputes every stored error (<= eps) and checks bound >= true e_r per cluster.
    st, errors = check_store(out, inp, rank=rank, eps=eps, method="weyl", order=order)
    assert max(errors) <= eps
    mats, _, _ = load_input(inp)
    multi = [c for c in st.clusters if len(c["members"]) >= 2]
    assert multi, "the case must form multi-block clusters to test anything"
    for c in multi:
        e = best_error([mats[i] for i in c["members"]], rank)
        assert e <= eps, f"weyl admitted a cluster whose best rank-{rank} error is {e} > {eps}"
    run_inprocess("verify", out, "--quiet", check=0)


# =============================================================================================
# 4. reconstruct reproduces each cluster's reported error
# =============================================================================================
RECON_CASES = [
    # dtype, layout, format, transpose, output ext, dest ext
    ("float32", "stack", "h5", False, ".h5", ".h5"),
    ("float64", "group", "zarr2", False, ".zarr", ".zarr"),
    ("complex64", "stack", "zarr3", True, ".h5", ".zarr"),
    ("float64", "group", "h5", True, ".zarr", ".h5"),
    ("int32", "stack", "h5", False, ".zarr", ".h5"),
]


@pytest.mark.parametrize("dtype,layout,fmt,transpose,out_ext,dest_ext", RECON_CASES,
                         ids=["-".join(map(str, c)).replace(".", "") for c in RECON_CASES])
def test_reconstruct_reproduces_reported_errors(tmp_path, dtype, layout, fmt, transpose,
                                                out_ext, dest_ext):
    group = layout == "group"
    inp, _, _ = write_planted(tmp_path / ("in.h5" if fmt == "h5" else "in.zarr"), K=50, m=10,
                              n=2 if group else 3, n_max=5 if group else None, subspaces=3,
                              rank=2, noise=0.02, dtype=dtype, layout=layout, fmt=fmt, seed=7,
                              transpose_on_disk=transpose)
    out = tmp_path / f"out{out_ext}"
    extra = ["--transpose"] if transpose else []
    run_inprocess(*cluster_cmd(inp, out, rank=3, eps=0.1, extra=extra), check=0)
    st = read_store(out)
    on_disk, names, _ = load_input(inp)  # as stored in the input, not transposed

    dest = tmp_path / f"dest{dest_ext}"
    run_inprocess("reconstruct", out, "-o", dest, check=0)
    rebuilt, rebuilt_names, _ = load_input(dest)
    assert len(rebuilt) == len(on_disk)
    if group:
        assert rebuilt_names == names, "reconstruct must keep the group's member names"
    for a, b in zip(on_disk, rebuilt):
        assert a.shape == b.shape, f"reconstructed shape {b.shape} != input {a.shape}"
        assert np.iscomplexobj(b) == np.iscomplexobj(a)
    for c, cl in enumerate(st.clusters):
        members = cl["members"]
        num = sum(sq(np.asarray(on_disk[i], np.complex128) - rebuilt[i]) for i in members)
        den = sum(sq(on_disk[i]) for i in members)
        err = float(np.sqrt(num / den))
        reported = st.report["cluster_stats"][c]["error"]
        assert err <= 0.1 * (1 + 1e-6) + 1e-7
        assert abs(err - reported) <= 1e-6 + 1e-4 * reported, \
            f"cluster {c}: reconstruction error {err}, reported {reported}"

    # --index: only those matrices, in the order asked, equal to the full reconstruction.
    wanted = [7, 2, 31, 2 + len(on_disk) // 2]
    dest2 = tmp_path / f"some{dest_ext}"
    args = ["reconstruct", out, "-o", dest2]
    for i in wanted:
        args += ["--index", i]
    run_inprocess(*args, check=0)
    part, part_names, _ = load_input(dest2)
    assert len(part) == len(wanted)
    if group:
        by_name = dict(zip(part_names, part))
        assert sorted(part_names) == sorted(names[i] for i in wanted)
        part = [by_name[names[i]] for i in wanted]
    for i, mat in zip(wanted, part):
        np.testing.assert_array_equal(mat, rebuilt[i], err_msg=f"--index {i}")

    # an index out of range is bad usage
    res = run_matclust("reconstruct", out, "-o", tmp_path / "bad.h5", "--index", len(on_disk))
    assert res.returncode == 2 and res.stderr.startswith("error:"), str(res)


# =============================================================================================
# 5. The command line: config, json, report, overwrite, inspect, sample, version, aliases
# =============================================================================================
@pytest.fixture
def small_input(tmp_path):
    inp, mats, labels = write_planted(tmp_path / "in.h5", K=40, m=8, n=3, subspaces=2, rank=2,
                                      noise=0.01, seed=8)
    return inp


def test_config_toml_and_flags_override(tmp_path, small_input):
    cfg = tmp_path / "run.toml"
    out = tmp_path / "from_config.h5"
    cfg.write_text(f'output = "{out}"\nrank = 2\neps = 0.2\nmethod = "residuals"\n'
                   f'order = "norm"\npatience = 4\nmemory-limit = "160MiB"\nquiet = true\n')
    res = run_matclust("cluster", *PAPER, small_input, "--config", cfg, check=0)
    assert res.stdout == "", "quiet = true in the config must silence stdout"
    st, _ = check_store(out, small_input, rank=2, eps=0.2, method="residual", order="norm",
                        patience=4)
    assert st.params["memory_limit"] == 160 * 2**20

    # flags override the file, whichever side of --config they are on
    out2 = tmp_path / "override.zarr"
    run_matclust("cluster", *PAPER, small_input, "--eps", 0.1, "--config", cfg, "-o", out2,
                 "--method", "weyl", check=0)
    check_store(out2, small_input, rank=2, eps=0.1, method="weyl", order="norm", patience=4)
    assert not os.path.exists(out) or read_store(out).params["method"] == "residual"


def test_config_accepts_option_spellings(tmp_path, small_input):
    """Keys are the options' own names: `report = ...` and `json = true` like --report / --json."""
    cfg = tmp_path / "cfg.toml"
    rep_file = tmp_path / "r.json"
    out = tmp_path / "o.h5"
    cfg.write_text(f'rank = 2\neps = 0.1\nreport = "{rep_file}"\njson = true\n'
                   f'output = "{out}"\nmemory_limit = "256MiB"\n')
    res = run_matclust("cluster", *PAPER, small_input, "--config", cfg)
    assert res.returncode == 0, f"config keys named like the options were refused:\n{res}"
    assert json.loads(res.stdout) == json.loads(rep_file.read_text()) == read_store(out).report


def test_config_unknown_key_exits_2(tmp_path, small_input):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('rank = 2\neps = 0.1\nrnak_typo = 3\n')
    out = tmp_path / "out.h5"
    res = run_matclust("cluster", *PAPER, small_input, "-o", out, "--config", cfg)
    assert_error_line(res, "rnak_typo")
    assert not os.path.exists(out)


def test_json_prints_exactly_the_report(tmp_path, small_input):
    out = tmp_path / "out.h5"
    rep_file = tmp_path / "report.json"
    res = run_matclust("cluster", *PAPER, small_input, "-o", out, "--rank", 2, "--eps", 0.1, "--json",
                       "--report", rep_file, check=0)
    doc = json.loads(res.stdout)  # the whole of stdout is one JSON document
    decoder = json.JSONDecoder()
    _, end = decoder.raw_decode(res.stdout.lstrip())
    assert res.stdout.lstrip()[end:].strip() == "", "stdout holds more than one JSON document"
    assert isinstance(doc, dict)
    assert "\u2501" not in res.stderr and "\r" not in res.stderr, \
        f"progress bars on a stderr that is not a TTY:\n{res}"
    stored = read_store(out).report
    assert doc == stored, "--json differs from the store's report attribute"
    assert json.loads(rep_file.read_text()) == doc, "--report differs from --json"
    check_store(out, small_input, rank=2, eps=0.1, method="incremental", order="residual")


def test_json_on_error_prints_nothing_on_stdout(tmp_path, small_input):
    res = run_matclust("cluster", *PAPER, small_input, "-o", tmp_path / "o.h5", "--rank", 2,
                       "--eps", 7, "--json")
    assert_error_line(res, "eps")
    assert res.stdout == ""


def test_report_file_and_quiet(tmp_path, small_input):
    out = tmp_path / "out.zarr"
    rep_file = tmp_path / "report.json"
    res = run_matclust("cluster", *PAPER, small_input, "-o", out, "--rank", 2, "--eps", 0.1, "--quiet",
                       "--report", rep_file, check=0)
    assert res.stdout == ""
    assert json.loads(rep_file.read_text()) == read_store(out).report


def test_default_output_is_a_table_not_json(tmp_path, small_input):
    res = run_matclust("cluster", *PAPER, small_input, "-o", tmp_path / "o.h5", "--rank", 2,
                       "--eps", 0.1, check=0)
    assert "compression" in res.stdout


@pytest.mark.parametrize("ext", [".h5", ".zarr"])
def test_overwrite(tmp_path, small_input, ext):
    out = tmp_path / f"out{ext}"
    run_matclust("cluster", *PAPER, small_input, "-o", out, "--rank", 2, "--eps", 0.1, "--quiet", check=0)
    before = tree_digest(out)
    res = run_matclust("cluster", *PAPER, small_input, "-o", out, "--rank", 2, "--eps", 0.2, "--quiet")
    assert_error_line(res, str(out))
    assert tree_digest(out) == before, "an existing OUTPUT was modified without --overwrite"

    run_matclust("cluster", *PAPER, small_input, "-o", out, "--rank", 2, "--eps", 0.2, "--quiet",
                 "--overwrite", check=0)
    st, _ = check_store(out, small_input, rank=2, eps=0.2, method="incremental", order="residual")
    leftovers = [f for f in os.listdir(tmp_path) if "tmp" in f]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_overwrite_refuses_foreign_file(tmp_path, small_input):
    out = tmp_path / "precious.h5"
    out.write_text("not a matclust store\n")
    res = run_matclust("cluster", *PAPER, small_input, "-o", out, "--rank", 2, "--eps", 0.1)
    assert_error_line(res, str(out))
    assert out.read_text() == "not a matclust store\n"


def test_inspect_json(tmp_path):
    from matclust.collections_io import write_collection

    # a stack and a group with variable widths, in two files
    stack, _, _ = write_planted(tmp_path / "s.h5", K=30, m=9, n=4, dtype="float32")
    group, gmats, _ = write_planted(tmp_path / "g.zarr", K=25, m=7, n=2, n_max=6, layout="group",
                                    dtype="complex64", fmt="zarr2")
    res = run_matclust("inspect", stack, "--json", check=0)
    doc = json.loads(res.stdout)
    assert isinstance(doc, list) and len(doc) == 1
    row = doc[0]
    assert (row["K"], row["m"], row["n_min"], row["n_max"]) == (30, 9, 4, 4)
    assert row["layout"] == "stack" and row["input_dtype"] == "float32"
    assert row["dataset"].strip("/") == "matrices"

    doc = json.loads(run_matclust("inspect", group, "--json", check=0).stdout)
    widths = [a.shape[1] for a in gmats]
    assert len(doc) == 1 and doc[0]["layout"] == "group"
    assert (doc[0]["K"], doc[0]["m"], doc[0]["n_min"], doc[0]["n_max"]) == (25, 7, min(widths), max(widths))
    assert doc[0]["input_dtype"] == "complex64"

    # several candidates: all listed; --dataset selects one
    two = tmp_path / "two.h5"
    write_collection(two, np.zeros((5, 4, 3)), dataset="a")
    import h5py

    with h5py.File(two, "a") as f:
        f.create_dataset("b/c", data=np.ones((6, 4, 2), dtype=np.float32))
    doc = json.loads(run_matclust("inspect", two, "--json", check=0).stdout)
    assert sorted(d["dataset"].strip("/") for d in doc) == ["a", "b/c"]
    doc = json.loads(run_matclust("inspect", two, "--dataset", "b/c", "--json", check=0).stdout)
    assert len(doc) == 1 and doc[0]["K"] == 6 and doc[0]["n_max"] == 2

    # a result store
    out = tmp_path / "out.zarr"
    run_matclust(*cluster_cmd(stack, out, rank=2, eps=0.1), check=0)
    doc = json.loads(run_matclust("inspect", out, "--json", check=0).stdout)
    docs = doc if isinstance(doc, list) else [doc]
    assert len(docs) == 1
    st = read_store(out)
    assert docs[0]["clusters"] == len(st.clusters) and docs[0]["K"] == 30
    assert docs[0]["compression_ratio"] == pytest.approx(st.report["compression_ratio"])


def test_several_candidates_need_dataset(tmp_path):
    from matclust.collections_io import write_collection

    two = tmp_path / "two.h5"
    write_collection(two, np.random.default_rng(0).standard_normal((20, 6, 2)), dataset="a")
    import h5py

    with h5py.File(two, "a") as f:
        f.create_dataset("b", data=np.ones((6, 4, 2)))
    res = run_matclust("cluster", *PAPER, two, "-o", tmp_path / "o.h5", "--rank", 2, "--eps", 0.1)
    assert_error_line(res, str(two), "a", "b")
    out = tmp_path / "o.h5"
    run_matclust("cluster", *PAPER, two, "-o", out, "--rank", 2, "--eps", 0.3, "--dataset", "a",
                 "--quiet", check=0)
    check_store(out, two, dataset="a", rank=2, eps=0.3, method="incremental", order="residual")


@pytest.mark.parametrize("args,words", [
    (["--method", "kmeans"], ["kmeans"]),
    (["--order", "random"], ["random"]),
    (["--eps", "1.5"], ["eps"]),
    (["--rank", "0"], ["rank"]),
    (["--dataset", "nope"], ["nope"]),
])
def test_bad_usage_exits_2(tmp_path, small_input, args, words):
    base = {"--rank": "2", "--eps": "0.1"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    out = tmp_path / "o.h5"
    res = run_matclust("cluster", *PAPER, small_input, "-o", out, *flat)
    assert_error_line(res, *words)
    assert not os.path.exists(out)


def test_bad_input_exits_2(tmp_path):
    missing = tmp_path / "missing.h5"
    res = run_matclust("cluster", *PAPER, missing, "-o", tmp_path / "o.h5", "--rank", 2, "--eps", 0.1)
    assert_error_line(res, str(missing))
    bad = tmp_path / "bools.h5"
    import h5py

    with h5py.File(bad, "w") as f:
        f.create_dataset("matrices", data=np.zeros((4, 3, 2), dtype=bool))
    res = run_matclust("cluster", *PAPER, bad, "-o", tmp_path / "o.h5", "--rank", 2, "--eps", 0.1)
    assert_error_line(res, str(bad), "matrices")
    nan = tmp_path / "nan.h5"
    data = np.ones((5, 3, 2))
    data[3, 1, 1] = np.nan
    with h5py.File(nan, "w") as f:
        f.create_dataset("matrices", data=data)
    res = run_matclust("cluster", *PAPER, nan, "-o", tmp_path / "o.h5", "--rank", 2, "--eps", 0.1)
    assert_error_line(res, str(nan), "matrices", "3")


@pytest.mark.parametrize("alias,canonical", [("approximate", "incremental"),
                                             ("residuals", "residual"), ("max_norm", "weyl")])
def test_method_aliases(tmp_path, small_input, alias, canonical):
    eps = 0.3
    a, b = tmp_path / "alias.h5", tmp_path / "canonical.h5"
    run_inprocess(*cluster_cmd(small_input, a, rank=2, eps=eps, method=alias), check=0)
    run_inprocess(*cluster_cmd(small_input, b, rank=2, eps=eps, method=canonical), check=0)
    st, _ = check_store(a, small_input, rank=2, eps=eps, method=canonical, order="residual")
    np.testing.assert_array_equal(st.labels, read_store(b).labels)


def test_version():
    res = run_matclust("--version", check=0)
    assert matclust.__version__ in res.stdout
    res = run_matclust("--help", check=0)
    for command in ("cluster", "verify", "reconstruct", "inspect", "sample"):
        assert command in res.stdout


def test_verify_json_and_other_cwd(tmp_path, small_input):
    """A store made with relative paths verifies from anywhere (and with --input)."""
    work = tmp_path / "work"
    work.mkdir()
    os.replace(small_input, work / "in.h5")
    run_matclust("cluster", *PAPER, "in.h5", "-o", "out.h5", "--rank", 2, "--eps", 0.1, "--quiet",
                 cwd=work, check=0)
    res = run_matclust("verify", work / "out.h5", "--json", cwd=tmp_path)
    assert res.returncode == 0, f"verify from another directory failed:\n{res}"
    doc = json.loads(res.stdout)
    assert doc["ok"] is True and doc["over_eps"] == [] and doc["problems"] == []
    st, errors = check_store(work / "out.h5", work / "in.h5", rank=2, eps=0.1,
                             method="incremental", order="residual")
    assert doc["clusters"] == len(st.clusters)
    assert np.allclose(doc["errors"], errors, rtol=1e-6, atol=1e-9)
    run_matclust("verify", work / "out.h5", "--input", work / "in.h5", "--quiet", check=0)


def test_verify_rejects_incomplete_store(tmp_path, small_input):
    out = tmp_path / "out.h5"
    run_matclust(*cluster_cmd(small_input, out, rank=2, eps=0.1), check=0)
    import h5py

    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = False
    res = run_matclust("verify", out)
    assert res.returncode in (1, 2) and "error" in res.stderr.lower(), str(res)


def test_reconstruct_refuses_existing_dest(tmp_path, small_input):
    out = tmp_path / "out.h5"
    run_inprocess(*cluster_cmd(small_input, out, rank=2, eps=0.1), check=0)
    dest = tmp_path / "dest.h5"
    dest.write_bytes(b"keep me")
    res = run_matclust("reconstruct", out, "-o", dest)
    assert_error_line(res, str(dest))
    assert dest.read_bytes() == b"keep me"
    # --overwrite replaces only a collection matclust wrote, never a file of the user's
    res = run_matclust("reconstruct", out, "-o", dest, "--overwrite")
    assert_error_line(res, str(dest))
    assert dest.read_bytes() == b"keep me"
    dest.unlink()
    run_matclust("reconstruct", out, "-o", dest, check=0)
    run_matclust("reconstruct", out, "-o", dest, "--overwrite", check=0)
    assert len(load_input(dest)[0]) == 40


def test_integers_beyond_float32_precision_keep_the_guarantee(tmp_path):
    """int32 matrices with large entries and an eps below float32 precision.

    Integers are stored as float32 (README.md), which cannot hold such entries exactly: a raw
    cluster then carries ~3e-8 relative rounding. Whatever matclust does about it (refuse with
    exit 2, or store those clusters so they are exact), it must never exit 0 with a store whose
    clusters exceed eps.
    """
    from matclust.collections_io import write_collection

    rng = np.random.default_rng(14)
    data = np.rint(rng.standard_normal((20, 6, 3)) * 2**28).astype(np.int32)
    inp = str(tmp_path / "big.h5")
    write_collection(inp, data)
    out = tmp_path / "out.h5"
    res = run_inprocess(*cluster_cmd(inp, out, rank=2, eps=1e-9))
    if res.returncode == 2:
        assert res.stderr.startswith("error:") and not os.path.exists(out)
        return
    assert res.returncode == 0, str(res)
    mats, _, _ = load_input(inp)
    st = read_store(out)
    worst = 0.0
    for cl in st.clusters:
        M = concat([mats[i] for i in cl["members"]])
        R = cl["raw"].astype(np.float64) if "raw" in cl else \
            cl["basis"].astype(np.float64) @ cl["coefficients"].astype(np.float64)
        worst = max(worst, float(np.sqrt(sq(M - R) / sq(M))))
    verify = run_inprocess("verify", out, "--quiet")
    assert worst <= 1e-9 and verify.returncode == 0, (
        f"cluster exited 0 but the stored clusters' errors reach {worst:.3g} > eps 1e-9 "
        f"(integers rounded to float32); verify exits {verify.returncode}")


# -- sample ----------------------------------------------------------------------------------
def test_sample_stack_hdf5_exact_low_rank(tmp_path):
    dest = tmp_path / "s.h5"
    run_matclust("sample", dest, "-K", 30, "-m", 9, "-n", 3, "--subspaces", 2, "--rank", 2,
                 "--noise", 0, "--dtype", "float64", "--layout", "stack", check=0)
    import h5py

    with h5py.File(dest, "r") as f:
        data, labels = f["matrices"][...], f["planted_labels"][...]
    assert data.shape == (30, 9, 3) and data.dtype == np.float64
    assert labels.shape == (30,) and set(labels) <= {0, 1}
    for c in set(labels):
        M = concat(list(data[labels == c]))
        s = np.linalg.svd(M, compute_uv=False)
        assert s[2] <= 1e-10 * s[0], "noise 0: each planted group has rank <= 2"
    # an existing DEST is refused without --overwrite, replaced with it
    res = run_matclust("sample", dest, "-K", 5)
    assert res.returncode == 2
    run_matclust("sample", dest, "-K", 5, "-m", 4, "--overwrite", check=0)
    with h5py.File(dest, "r") as f:
        assert f["matrices"].shape == (5, 4, 8)


@pytest.mark.parametrize("zarr_format", ["2", "3"])
def test_sample_group_zarr(tmp_path, zarr_format):
    dest = tmp_path / "g.zarr"
    noise = 0.05
    run_matclust("sample", dest, "-K", 40, "-m", 12, "-n", 3, "--cols-max", 6, "--subspaces", 3,
                 "--rank", 2, "--noise", noise, "--dtype", "complex64", "--layout", "group",
                 "--zarr-format", zarr_format, "--dataset", "coll", check=0)
    marker = ".zgroup" if zarr_format == "2" else "zarr.json"
    assert os.path.exists(dest / marker), f"not a Zarr v{zarr_format} store"
    mats, names, dtype = load_input(dest, "coll")
    assert len(mats) == 40 and dtype == np.complex64
    widths = [a.shape[1] for a in mats]
    assert all(a.shape[0] == 12 for a in mats) and 3 <= min(widths) and max(widths) <= 6
    import zarr

    labels = zarr.open_group(dest, mode="r")["planted_labels"][...]
    assert set(labels) <= {0, 1, 2}
    for c in set(labels):
        e = best_error([mats[i] for i in np.flatnonzero(labels == c)], 2)
        assert 0.3 * noise < e < 2 * noise, f"planted group {c}: rank-2 error {e} vs noise {noise}"


@pytest.mark.parametrize("dtype", ["int32", "float16"])
def test_sample_dtypes_then_cluster(tmp_path, dtype):
    dest = tmp_path / "s.h5"
    run_matclust("sample", dest, "-K", 40, "-m", 8, "-n", 3, "--subspaces", 2, "--rank", 2,
                 "--dtype", dtype, check=0)
    mats, _, on_disk = load_input(dest)
    assert on_disk == np.dtype(dtype) and len(mats) == 40
    out = tmp_path / "o.h5"
    run_inprocess(*cluster_cmd(dest, out, rank=3, eps=0.1), check=0)
    check_store(out, dest, rank=3, eps=0.1, method="incremental", order="residual")
    run_inprocess("verify", out, "--quiet", check=0)


def test_cli_sets_the_blas_thread_timeout_before_numpy_loads():
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when numpy loads it: importing matclust
    must not load numpy, so that the CLI can shorten how long idle BLAS threads spin; a value
    the user set is kept."""
    code = ("import os, sys; import matclust; assert 'numpy' not in sys.modules; "
            "import matclust.cli; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "16"
    env["OPENBLAS_THREAD_TIMEOUT"] = "20"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "20"
