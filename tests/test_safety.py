"""Safety: nothing the user owns is replaced, a full disk is one error line, missing data is
never read as zeros, and nothing a user can cause ends in a traceback.

Every refusal is checked for its exact outcome: the exit code, one ``error:`` line of at most a
few hundred characters naming the culprit, and the folder byte for byte as it was (no output,
no temporary, no lock or checkpoint).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import load_input, read_store, run_inprocess, run_matclust, tree_digest, write_planted

CLUSTER = ("--rank", 2, "--eps", 0.1, "--quiet")
MAX_LINE = 420  # "error: " and the 400 characters the CLI allows


def assert_one_error(res, code: int, *names):
    """Exit ``code``, exactly one short ``error:`` line on stderr naming every one of ``names``."""
    assert res.returncode == code, f"expected exit {code}:\n{res}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), f"not one error: line:\n{res}"
    assert len(lines[0]) <= MAX_LINE, f"error line of {len(lines[0])} characters:\n{res}"
    for name in names:
        assert str(name) in lines[0], f"the error line does not name {name!r}:\n{res}"
    return lines[0]


def temporaries(folder) -> list[str]:
    return [n for n in os.listdir(folder) if ".matclust-" in n]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with a small planted collection ``in.h5``, as the working directory."""
    monkeypatch.chdir(tmp_path)
    write_planted(tmp_path / "in.h5", K=30, m=8, n=3)
    return tmp_path


def refused(work, args, code, *names):
    """Run ``args`` in-process; assert the refusal and that the folder did not change."""
    before = tree_digest(work)
    res = run_inprocess(*args)
    line = assert_one_error(res, code, *names)
    assert tree_digest(work) == before, f"the folder changed:\n{res}"
    assert not temporaries(work)
    return line


# =============================================================================================
# 1. --overwrite replaces only what matclust wrote; no path may clash with another
# =============================================================================================
def _ordinary_folder(d):
    (d / "mine").mkdir()
    (d / "mine" / "thesis.tex").write_text("years of work")
    return "mine"


def _foreign_hdf5(d):
    import h5py

    with h5py.File(d / "theirs.h5", "w") as f:
        f["data"] = np.arange(4.0)
    return "theirs.h5"


def _foreign_zarr(d):
    import zarr

    zarr.open_group(d / "theirs.zarr", mode="w").create_array("x", shape=(3,), dtype="f8")
    return "theirs.zarr"


def _result_with_notes(d):
    run_inprocess("cluster", "in.h5", "-o", "res.zarr", *CLUSTER, check=0)
    (d / "res.zarr" / "notes.txt").write_text("my notes")
    return "res.zarr"


def _symlink_to_result(d):
    run_inprocess("cluster", "in.h5", "-o", "res.h5", *CLUSTER, check=0)
    os.symlink("res.h5", d / "link.h5")
    return "link.h5"


@pytest.mark.parametrize("target", [_ordinary_folder, _foreign_hdf5, _foreign_zarr,
                                    _result_with_notes, _symlink_to_result])
def test_overwrite_refuses_anything_but_a_result_store(work, target):
    name = target(work)
    line = refused(work, ["cluster", "in.h5", "-o", name, *CLUSTER, "--overwrite"], 2, name)
    assert "--overwrite" in line or "link" in line


def test_output_dot_is_refused_and_nothing_is_deleted(work):
    refused(work, ["cluster", "in.h5", "-o", ".", *CLUSTER, "--overwrite"], 2, "input")


def test_empty_output_path_is_a_usage_error(work):
    refused(work, ["cluster", "in.h5", "-o", "", *CLUSTER, "--overwrite"], 2, "-o/--output",
            "empty")


@pytest.mark.parametrize("fmt", [".h5", ".zarr"])
def test_overwrite_replaces_a_result_store_even_an_incomplete_one(work, fmt):
    out = f"out{fmt}"
    run_inprocess("cluster", "in.h5", "-o", out, *CLUSTER, check=0)
    if fmt == ".h5":
        import h5py

        with h5py.File(out, "r+") as f:  # as left by a matclust that died before commit
            f.attrs["complete"] = False
    else:
        import zarr

        zarr.open_group(out, mode="r+").attrs["complete"] = False
    run_inprocess("cluster", "in.h5", "-o", out, "--rank", 2, "--eps", 0.2, "--quiet",
                  "--overwrite", check=0)
    st = read_store(out)
    assert st.attrs["complete"] is True and st.params["eps"] == 0.2
    assert not temporaries(work)


def _same(d):
    return "in.h5", "input"


def _dot_slash(d):
    return "./in.h5", "input"


def _symlink(d):
    os.symlink("in.h5", d / "alias.h5")
    return "alias.h5", "input"


def _hardlink(d):
    os.link(d / "in.h5", d / "twin.h5")
    return "twin.h5", "input"


@pytest.mark.parametrize("alias", [_same, _dot_slash, _symlink, _hardlink])
def test_output_that_is_the_input_is_refused(work, alias):
    out, word = alias(work)
    for extra in ((), ("--overwrite",)):
        refused(work, ["cluster", "in.h5", "-o", out, *CLUSTER, *extra], 2, out, word)


def test_output_inside_the_input_store_is_refused(work):
    write_planted(work / "in.zarr", K=20, m=6, n=2)
    refused(work, ["cluster", "in.zarr", "-o", "in.zarr/out.h5", *CLUSTER], 2, "inside",
            "in.zarr")


def test_output_holding_the_input_is_refused(work):
    run_inprocess("cluster", "in.h5", "-o", "res.zarr", *CLUSTER, check=0)
    write_planted(work / "res.zarr" / "inner.h5", K=20, m=6, n=2)
    refused(work, ["cluster", "res.zarr/inner.h5", "-o", "res.zarr", *CLUSTER, "--overwrite"],
            2, "holds", "inner.h5")


@pytest.mark.parametrize("report, words", [
    ("out.h5", ("report", "output")),
    ("in.h5", ("report", "input")),
    ("nowhere/report.json", ("nowhere", "does not exist")),
    ("", ("--report", "empty")),
])
def test_report_path_checked_before_any_work(work, report, words):
    refused(work, ["cluster", "in.h5", "-o", "out.h5", *CLUSTER, "--report", report], 2, *words)


def test_report_replaces_only_a_matclust_report(work):
    (work / "mine.json").write_text('{"my": "data"}')
    refused(work, ["cluster", "in.h5", "-o", "out.h5", *CLUSTER, "--report", "mine.json",
                   "--overwrite"], 2, "mine.json", "not a matclust JSON report")
    refused(work, ["cluster", "in.h5", "-o", "out.h5", *CLUSTER, "--report", "mine.json"], 2,
            "mine.json", "--overwrite")
    run_inprocess("cluster", "in.h5", "-o", "out.h5", *CLUSTER, "--report", "r.json", check=0)
    run_inprocess("cluster", "in.h5", "-o", "out.h5", *CLUSTER, "--report", "r.json",
                  "--overwrite", check=0)


@pytest.fixture
def stored(work):
    run_inprocess("cluster", "in.h5", "-o", "out.h5", *CLUSTER, check=0)
    return work


def test_reconstruct_refuses_the_store_and_its_input(stored):
    refused(stored, ["reconstruct", "out.h5", "-o", "out.h5", "--overwrite"], 2, "result store")
    refused(stored, ["reconstruct", "out.h5", "-o", "in.h5", "--overwrite"], 2, "input")
    os.symlink("in.h5", stored / "alias.h5")
    refused(stored, ["reconstruct", "out.h5", "-o", "alias.h5", "--overwrite"], 2, "input")
    name = _ordinary_folder(stored)
    refused(stored, ["reconstruct", "out.h5", "-o", name, "--overwrite"], 2, name,
            "not a collection written by matclust")
    refused(stored, ["reconstruct", "out.h5", "-o", "", "--overwrite"], 2, "empty")


def test_reconstruct_replaces_its_own_collection(stored):
    run_inprocess("reconstruct", "out.h5", "-o", "back.h5", check=0)
    run_inprocess("reconstruct", "out.h5", "-o", "back.h5", "--overwrite", "--index", 3,
                  check=0)
    assert len(load_input(stored / "back.h5")[0]) == 1


def test_sample_overwrite_refuses_a_foreign_file(work):
    name = _foreign_hdf5(work)
    refused(work, ["sample", name, "-K", 5, "--overwrite"], 2, name, "not a collection")


# -- a full disk -----------------------------------------------------------------------------
def run_limited(kib: int, *args, cwd) -> subprocess.CompletedProcess:
    """``matclust ARGS`` with a file-size limit of ``kib`` KiB (``ulimit -f``)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-m", "matclust", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, preexec_fn=limit,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("fmt, K, kib, encoding", [(".h5", 1000, 48, "plain"),
                                                   (".zarr", 120, 6, "plain"),
                                                   (".h5", 3000, 16, "compact"),
                                                   (".zarr", 3000, 6, "compact")])
def test_a_full_disk_leaves_the_previous_output_whole(work, fmt, K, kib, encoding):
    """``ulimit -f``: the store (HDF5: one file) or the checkpoint and the store's root
    metadata (Zarr: many small files) outgrow the limit."""
    write_planted(work / "big.h5", K=K, m=16, n=6, subspaces=40, noise=0.3)
    out = f"out{fmt}"
    args = ("cluster", "big.h5", "-o", out, "--rank", 2, "--eps", 0.3, "--quiet", "--overwrite",
            "--encoding", encoding)
    run_matclust(*args, cwd=work, check=0)
    before = tree_digest(work / out)
    proc = run_limited(kib, *args, "--method", "weyl", cwd=work)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    assert "could not be written" in lines[0] and "file too large" in lines[0], lines[0]
    assert tree_digest(work / out) == before, "the previous output changed"
    left = temporaries(work)
    assert all(n.endswith("matclust-ckpt") for n in left), left  # no temporary store, no lock
    if left:  # a checkpoint stays only when the message says how to use it
        assert "--resume" in lines[0] and left[0] in lines[0], lines[0]
        run_matclust(*args, "--method", "weyl", "--resume", cwd=work, check=0)
        run_matclust("verify", out, "--quiet", cwd=work, check=0)
        assert not temporaries(work)


def test_a_full_disk_while_writing_a_collection(work):
    proc = run_limited(16, "sample", "s.h5", "-K", 2000, "-m", 16, "-n", 8, cwd=work)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and "s.h5" in proc.stderr \
        and "file too large" in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(work / "s.h5") and not temporaries(work)


def test_a_full_disk_while_writing_the_report(work, monkeypatch):
    import errno

    import matclust.safety

    (work / "r.json").write_text('{"params": {}, "cluster_stats": []}')
    before = (work / "r.json").read_bytes()

    real_fsync = os.fsync

    def no_space(fd):  # only the report's temporary fails; the store is written as usual
        if "r.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(matclust.safety.os, "fsync", no_space)
    res = run_inprocess("cluster", "in.h5", "-o", "out.h5", *CLUSTER, "--report", "r.json",
                        "--overwrite")
    monkeypatch.undo()
    assert_one_error(res, 1, "r.json", "no space left", "out.h5")
    assert (work / "r.json").read_bytes() == before and not temporaries(work)


# =============================================================================================
# 4. Missing data is never read as zeros; links are followed
# =============================================================================================
def _virtual(work, parts=3, per=8):
    """v.h5: a virtual (K, 6, 3) stack over ``parts`` source files of ``per`` matrices."""
    import h5py

    rng = np.random.default_rng(1)
    layout = h5py.VirtualLayout(shape=(parts * per, 6, 3), dtype="f8")
    for p in range(parts):
        with h5py.File(work / f"part{p}.h5", "w") as f:
            f["m"] = rng.standard_normal((per, 6, 3))
        layout[p * per:(p + 1) * per] = h5py.VirtualSource(f"part{p}.h5", "m", shape=(per, 6, 3))
    with h5py.File(work / "v.h5", "w") as f:
        f.create_virtual_dataset("matrices", layout, fillvalue=0)
    return "v.h5"


def test_virtual_dataset_is_read_and_a_missing_source_is_an_error(work):
    inp = _virtual(work)
    run_inprocess("cluster", inp, "-o", "whole.h5", *CLUSTER, check=0)
    os.remove(work / "part1.h5")
    refused(work, ["cluster", inp, "-o", "out.h5", *CLUSTER], 2, "part1.h5", "matrices 8..15")
    run_inprocess("cluster", inp, "-o", "filled.h5", "--rank", 2, "--eps", 0.1, "--quiet",
                  "--fill-missing", "--method", "residual", check=0)


def _chunked_zarr(work, zarr_format):
    write_planted(work / "c.zarr", K=20, m=6, n=2, fmt=f"zarr{zarr_format}")
    import zarr

    data = zarr.open_array(work / "c.zarr" / "matrices", mode="r")[...]
    shutil.rmtree(work / "c.zarr")
    root = zarr.open_group(work / "c.zarr", mode="w", zarr_format=zarr_format)
    root.create_array("matrices", shape=data.shape, dtype=data.dtype, chunks=(5, 6, 2))[...] = data
    return "c.zarr"


@pytest.mark.parametrize("zarr_format, key", [(3, "c/1/0/0"), (2, "1.0.0")])
def test_zarr_missing_chunk_is_an_error_naming_it(work, zarr_format, key):
    inp = _chunked_zarr(work, zarr_format)
    os.remove(work / inp / "matrices" / key)
    refused(work, ["cluster", inp, "-o", "out.h5", *CLUSTER], 2, f"matrices/{key}",
            "matrices 5..9", "--fill-missing")
    run_inprocess("cluster", inp, "-o", "out.h5", *CLUSTER, "--fill-missing", check=0)
    # verify reads the input as the run did (recorded), and refuses when told not to fill
    run_inprocess("verify", "out.h5", "--quiet", check=0)


def test_zarr_group_member_with_a_missing_chunk_names_the_matrix(work):
    write_planted(work / "g.zarr", K=6, m=5, n=2, n_max=4, layout="group")
    victim = sorted(os.listdir(work / "g.zarr" / "matrices"))[2]
    os.remove(work / "g.zarr" / "matrices" / victim / "c" / "0" / "0")
    refused(work, ["cluster", "g.zarr", "-o", "out.h5", *CLUSTER], 2, f"matrix 2 ('{victim}')")


def test_external_links_are_followed_and_a_broken_one_is_an_error(work):
    import h5py

    with h5py.File(work / "links.h5", "w") as f:
        f["matrices"] = h5py.ExternalLink("in.h5", "/matrices")
    run_inprocess("cluster", "links.h5", "-o", "via_link.h5", *CLUSTER, check=0)
    run_inprocess("cluster", "in.h5", "-o", "direct.h5", *CLUSTER, check=0)
    assert np.array_equal(read_store("via_link.h5").labels, read_store("direct.h5").labels)

    with h5py.File(work / "broken.h5", "w") as f:
        f["matrices"] = h5py.ExternalLink("gone.h5", "/matrices")
    refused(work, ["cluster", "broken.h5", "-o", "out.h5", *CLUSTER], 2, "gone.h5", "matrices")
    refused(work, ["cluster", "broken.h5", "--dataset", "matrices", "-o", "out.h5", *CLUSTER],
            2, "gone.h5")

    with h5py.File(work / "members.h5", "w") as f:  # one matrix of a group lives elsewhere
        g = f.create_group("g")
        for i in (0, 1, 3):
            g[f"m{i}"] = np.random.default_rng(i).standard_normal((5, 2))
        g["m2"] = h5py.ExternalLink("lost.h5", "/x")
    refused(work, ["cluster", "members.h5", "-o", "out.h5", *CLUSTER], 2, "lost.h5")
    refused(work, ["cluster", "members.h5", "--dataset", "g", "-o", "out.h5", *CLUSTER], 2,
            "lost.h5", "matrix 2 ('g/m2')")


# =============================================================================================
# 5. Nothing a user can cause ends in a traceback
# =============================================================================================
def _zarr_copy(work, name):
    write_planted(work / name, K=20, m=6, n=2)
    return work / name


def test_corrupt_zarr_metadata(work):
    root = _zarr_copy(work, "a.zarr")
    (root / "zarr.json").write_text("{not json")
    refused(work, ["cluster", "a.zarr", "-o", "out.h5", *CLUSTER], 2, "a.zarr")
    inner = _zarr_copy(work, "b.zarr")
    (inner / "matrices" / "zarr.json").write_text("{not json")
    refused(work, ["cluster", "b.zarr", "-o", "out.h5", *CLUSTER], 2, "b.zarr", "metadata")
    folder = _zarr_copy(work, "c.zarr")  # a folder where a file is expected
    os.remove(folder / "zarr.json")
    os.mkdir(folder / "zarr.json")
    refused(work, ["cluster", "c.zarr", "-o", "out.h5", *CLUSTER], 2, "c.zarr")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_input(work):
    os.chmod(work / "in.h5", 0)
    refused(work, ["cluster", "in.h5", "-o", "out.h5", *CLUSTER], 2, "in.h5")


def test_huge_reconstruct_index(stored):
    refused(stored, ["reconstruct", "out.h5", "-o", "r.h5", "--index", "99999999999999999999"],
            2, "99999999999999999999", "out of range")


@pytest.mark.parametrize("option, value", [("--noise", "nan"), ("--noise", "inf"),
                                           ("--scale-spread", "-5"), ("--scale-spread", "nan")])
def test_sample_rejects_meaningless_numbers(work, option, value):
    refused(work, ["sample", "s.h5", "-K", 5, option, value], 2, option)


@pytest.mark.parametrize("content, words", [
    (b"rank = 2.7\n", ("'rank'", "integer", "2.7")),
    (b"rank = true\n", ("'rank'", "integer", "True")),
    (b"eps = true\n", ("'eps'", "number")),
    (bytes(range(256)) * 4, ("not UTF-8",)),
])
def test_config_values_of_the_wrong_type(work, content, words):
    (work / "c.toml").write_bytes(content)
    refused(work, ["cluster", "in.h5", "-o", "out.h5", "--eps", 0.1, "--rank", 2, "--config",
                   "c.toml"] if b"rank" not in content else
            ["cluster", "in.h5", "-o", "out.h5", "--eps", 0.1, "--config", "c.toml"],
            2, "c.toml", *words)


def test_result_store_as_input_is_one_short_line(stored):
    refused(stored, ["cluster", "out.h5", "-o", "again.h5", *CLUSTER], 2, "out.h5",
            "result store")


def test_many_candidates_make_one_short_line(work):
    import h5py

    with h5py.File(work / "many.h5", "w") as f:
        for i in range(500):
            f[f"stack_{i:03d}"] = np.zeros((2, 3, 2))
    refused(work, ["cluster", "many.h5", "-o", "out.h5", *CLUSTER], 2, "many.h5", "500 in all")


def test_verify_of_a_store_whose_params_are_not_json(stored):
    import h5py

    with h5py.File(stored / "out.h5", "r+") as f:
        f.attrs["params"] = "{broken"
    refused(stored, ["verify", "out.h5"], 2, "out.h5", "params", "not JSON")


def test_an_unexpected_failure_is_one_line_and_exit_1(work, monkeypatch):
    import matclust.api

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(matclust.api, "scan_norms", boom)
    res = run_inprocess("cluster", "in.h5", "-o", "out.h5", *CLUSTER, "--mode", "in-memory")
    assert_one_error(res, 1, "RuntimeError", "a bug", "MATCLUST_DEBUG")
    assert not os.path.exists(work / "out.h5") and not temporaries(work)
    monkeypatch.setenv("MATCLUST_DEBUG", "1")
    res = run_inprocess("cluster", "in.h5", "-o", "out.h5", *CLUSTER, "--mode", "in-memory")
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_bounds_overwrite_replaces_only_its_own_csv_and_plot(work):
    """`bounds --overwrite` may replace a study CSV and plot it wrote, nothing else."""
    write_planted(work / "study_in.h5", K=30, m=8, n=3)
    args = ("bounds", "study_in.h5", "--rank", 2, "--sizes", "2:4:2", "--trials", 1, "--quiet")
    (work / "mine.csv").write_text("a,b\n1,2\n")
    (work / "mine.png").write_bytes(b"\x89PNG\r\n\x1a\n not matclust's")
    before = tree_digest(work)
    res = run_matclust(*args, "-o", "mine.csv", "--overwrite", cwd=work, check=2)
    assert "mine.csv" in res.stderr and "not a bound study's CSV" in res.stderr
    res = run_matclust(*args, "-o", "s.csv", "--plot", "mine.png", "--overwrite", cwd=work, check=2)
    assert "mine.png" in res.stderr and "not a bound study's plot" in res.stderr
    assert tree_digest(work) == before
    run_matclust(*args, "-o", "s.csv", "--plot", "s.png", cwd=work, check=0)
    run_matclust(*args, "-o", "s.csv", "--plot", "s.png", "--overwrite", cwd=work, check=0)
