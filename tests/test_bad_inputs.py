"""Bad input: exit 2, exactly one ``error:`` line on stderr naming the culprit, nothing left.

Each case writes its input into a fresh folder, runs ``matclust cluster`` in a subprocess and
checks that the folder afterwards holds exactly what it held before (no OUTPUT, no temporary,
lock or checkpoint; an existing OUTPUT byte for byte as it was).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import PAPER, run_matclust, tree_digest

RNG = np.random.default_rng(0)


def h5(path, **datasets):
    import h5py

    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            if isinstance(data, dict):
                grp = f.create_group(name)
                for member, arr in data.items():
                    grp.create_dataset(member, data=arr)
            else:
                f.create_dataset(name, data=data)


def zarr_store(path, **datasets):
    import zarr

    root = zarr.open_group(path, mode="w")
    for name, data in datasets.items():
        if isinstance(data, dict):
            grp = root.create_group(name)
            for member, arr in data.items():
                grp.create_array(member, shape=arr.shape, dtype=arr.dtype)[...] = arr
        else:
            root.create_array(name, shape=data.shape, dtype=data.dtype)[...] = data


def good(shape=(20, 6, 3)):
    return RNG.standard_normal(shape)


def with_bad(value, index, shape=(12, 5, 3)):
    x = good(shape)
    x[index, 1, 2] = value
    return x


# -- input builders: each returns the INPUT argument ---------------------------------------------
def missing(d):
    return "nowhere.h5"


def text_file(d):
    (d / "notes.h5").write_text("these are not matrices\n")
    return "notes.h5"


def plain_directory(d):
    (d / "folder.zarr").mkdir()
    (d / "folder.zarr" / "readme.txt").write_text("not a zarr store")
    return "folder.zarr"


def truncated(d):
    h5(d / "whole.h5", matrices=good((200, 8, 4)))
    data = (d / "whole.h5").read_bytes()
    (d / "truncated.h5").write_bytes(data[: len(data) // 2])
    (d / "whole.h5").unlink()
    return "truncated.h5"


def corrupt_chunks(d):
    """Opens fine; reading a compressed chunk fails (zeroed bytes in the middle)."""
    import h5py

    with h5py.File(d / "corrupt.h5", "w") as f:
        f.create_dataset("matrices", data=good((400, 8, 3)), chunks=(50, 8, 3), compression="gzip")
    data = bytearray((d / "corrupt.h5").read_bytes())
    mid = len(data) // 2
    data[mid: mid + 400] = bytes(400)
    (d / "corrupt.h5").write_bytes(bytes(data))
    return "corrupt.h5"


def no_candidate(d):
    h5(d / "flat.h5", vector=np.arange(5.0), table=RNG.standard_normal((3, 4, 5, 2)))
    return "flat.h5"


def several(d):
    h5(d / "two.h5", a=good(), b=good())
    return "two.h5"


def dims(d):
    h5(d / "dims.h5", one=np.arange(6.0), four=RNG.standard_normal((2, 3, 4, 5)), ok=good())
    return "dims.h5"


def ragged_rows(d):
    h5(d / "ragged.h5", g={"a": good((5, 2)), "b": good((5, 3)), "c": good((6, 2))})
    return "ragged.h5"


def ragged_rows_zarr(d):
    zarr_store(d / "ragged.zarr", g={"a": good((5, 2)), "b": good((4, 3))})
    return "ragged.zarr"


def k_zero(d):
    h5(d / "k0.h5", matrices=np.zeros((0, 5, 3)))
    return "k0.h5"


def m_zero(d):
    h5(d / "m0.h5", matrices=np.zeros((4, 0, 3)))
    return "m0.h5"


def nan(d):
    h5(d / "nan.h5", matrices=with_bad(np.nan, 7))
    return "nan.h5"


def inf(d):
    h5(d / "inf.h5", matrices=with_bad(-np.inf, 3))
    return "inf.h5"


def nan_member(d):
    bad = good((5, 2))
    bad[0, 0] = np.nan
    h5(d / "nangroup.h5", g={"a": good((5, 2)), "b": good((5, 3)), "c": bad})
    return "nangroup.h5"


def nan_zarr(d):
    zarr_store(d / "nan.zarr", matrices=with_bad(np.nan, 11))
    return "nan.zarr"


def strings(d):
    h5(d / "strings.h5", matrices=np.array([[["ab", "cd"]] * 3] * 4, dtype="S2"))
    return "strings.h5"


def vlen_strings(d):
    import h5py

    with h5py.File(d / "vstrings.h5", "w") as f:
        f.create_dataset("matrices", data=np.array([[["x", "yy"]] * 3] * 2, dtype=object),
                         dtype=h5py.string_dtype())
    return "vstrings.h5"


def booleans(d):
    h5(d / "bool.h5", matrices=np.ones((4, 3, 2), dtype=bool))
    return "bool.h5"


def structured(d):
    h5(d / "struct.h5", matrices=np.zeros((4, 3, 2), dtype=[("re", "f8"), ("flag", "i4")]))
    return "struct.h5"


def ok_input(d):
    h5(d / "ok.h5", matrices=good())
    return "ok.h5"


def bad_toml(d):
    (d / "bad.toml").write_text("rank = = 3\n")
    return ok_input(d)


def unknown_key(d):
    (d / "extra.toml").write_text('rank = 2\neps = 0.1\nbogus_option = "x"\n')
    return ok_input(d)


ARGS = ["-o", "out.h5", "--rank", "2", "--eps", "0.1"]

#: (id, builder, extra command-line arguments (replacing ARGS when it starts with '!'),
#:  substrings the one error line must contain)
CASES = [
    ("missing-file", missing, [], ["nowhere.h5", "no such file"]),
    ("not-hdf5-or-zarr", text_file, [], ["notes.h5", "neither an HDF5 file nor a Zarr store"]),
    ("directory-not-zarr", plain_directory, [], ["folder.zarr", "not a Zarr store"]),
    ("truncated-hdf5", truncated, [], ["truncated.h5", "truncated"]),
    ("corrupt-chunk", corrupt_chunks, [], ["corrupt.h5:matrices", "cannot read matrices 0..", "corrupt"]),
    ("no-candidate", no_candidate, [], ["flat.h5", "no candidate dataset", "'vector'", "4-D"]),
    ("several-candidates", several, [], ["two.h5", "several candidate", "'a'", "'b'", "--dataset"]),
    ("unknown-dataset", several, ["--dataset", "zz"], ["two.h5", "no dataset 'zz'", "'a'"]),
    ("1-D", dims, ["--dataset", "one"], ["dims.h5:one", "1-D"]),
    ("4-D", dims, ["--dataset", "four"], ["dims.h5:four", "4-D"]),
    ("row-counts-differ", ragged_rows, [], ["ragged.h5:g", "member 'c'", "6 rows"]),
    ("row-counts-differ-zarr", ragged_rows_zarr, [], ["ragged.zarr:g", "member 'b'", "4 rows"]),
    ("K=0", k_zero, [], ["k0.h5", "K = 0"]),
    ("m=0", m_zero, [], ["m0.h5", "m = 0"]),
    ("NaN", nan, [], ["nan.h5:matrices", "matrix 7 ", "NaN"]),
    ("Inf", inf, [], ["inf.h5:matrices", "matrix 3 ", "Inf"]),
    ("NaN-in-group-member", nan_member, [], ["nangroup.h5:g", "matrix 2 ('c')", "NaN"]),
    ("NaN-zarr", nan_zarr, [], ["nan.zarr:matrices", "matrix 11 ", "NaN"]),
    ("strings", strings, [], ["strings.h5:matrices", "dtype |S2"]),
    ("variable-length-strings", vlen_strings, [], ["vstrings.h5:matrices", "dtype object"]),
    ("bool", booleans, [], ["bool.h5:matrices", "dtype bool"]),
    ("structured", structured, [], ["struct.h5:matrices", "dtype [("]),
    ("rank-0", ok_input, ["!", "-o", "out.h5", "--rank", "0", "--eps", "0.1"], ["rank", "got 0"]),
    ("rank-negative", ok_input, ["!", "-o", "out.h5", "--rank", "-3", "--eps", "0.1"], ["rank", "got -3"]),
    ("eps-0", ok_input, ["!", "-o", "out.h5", "--rank", "2", "--eps", "0"], ["eps", "(0, 1)"]),
    ("eps-1", ok_input, ["!", "-o", "out.h5", "--rank", "2", "--eps", "1"], ["eps", "(0, 1)"]),
    ("eps-negative", ok_input, ["!", "-o", "out.h5", "--rank", "2", "--eps", "-0.5"], ["eps", "(0, 1)"]),
    ("eps-nan", ok_input, ["!", "-o", "out.h5", "--rank", "2", "--eps", "nan"], ["eps", "nan"]),
    ("unknown-method", ok_input, ["--method", "magic"], ["method 'magic'"]),
    ("malformed-toml", bad_toml, ["--config", "bad.toml"], ["bad.toml", "malformed TOML"]),
    ("unknown-config-key", unknown_key, ["!", "-o", "out.h5", "--config", "extra.toml"],
     ["extra.toml", "unknown config key 'bogus_option'"]),
]


def listing(folder):
    return {name: tree_digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def check_rejected(res, folder, before, expected):
    assert res.returncode == 2, res
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line:\n{res}"
    assert lines[0].startswith("error: "), res
    for part in expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert res.stdout == "", res
    assert listing(folder) == before, "the run left files behind or changed some"


@pytest.mark.parametrize("case_id,build,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_the_culprit(tmp_path, case_id, build, extra, expected):
    inp = build(tmp_path)
    args = extra[1:] if extra[:1] == ["!"] else ARGS + extra
    before = listing(tmp_path)
    res = run_matclust("cluster", *PAPER, inp, *args, "--quiet", cwd=tmp_path)
    check_rejected(res, tmp_path, before, expected)


@pytest.mark.parametrize("out", ["out.h5", "out.zarr"])
def test_existing_output_without_overwrite_is_left_untouched(tmp_path, out):
    inp = ok_input(tmp_path)
    run_matclust("cluster", *PAPER, inp, "-o", out, "--rank", "2", "--eps", "0.3", "--quiet",
                 cwd=tmp_path, check=0)
    before = listing(tmp_path)
    res = run_matclust("cluster", *PAPER, inp, "-o", out, "--rank", "3", "--eps", "0.1", "--quiet",
                       cwd=tmp_path)
    check_rejected(res, tmp_path, before, [out, "output exists", "--overwrite"])


def test_json_mode_keeps_stdout_empty_on_error(tmp_path):
    inp = nan(tmp_path)
    before = listing(tmp_path)
    res = run_matclust("cluster", *PAPER, inp, *ARGS, "--json", cwd=tmp_path)
    check_rejected(res, tmp_path, before, ["matrix 7 "])


def test_output_folder_missing(tmp_path):
    inp = ok_input(tmp_path)
    before = listing(tmp_path)
    res = run_matclust("cluster", *PAPER, inp, "-o", "no/such/dir/out.h5", "--rank", "2", "--eps", "0.1",
                       cwd=tmp_path)
    check_rejected(res, tmp_path, before, ["no/such/dir/out.h5", "does not exist"])


@pytest.mark.parametrize("encoding", ["plain", "compact"])
def test_input_error_mid_run_leaves_nothing(tmp_path, monkeypatch, encoding):
    """An InputError raised while clusters are being written (after the temporary store, the
    lock and the checkpoint exist) removes all of them."""
    import matclust
    import matclust.compact as compact
    import matclust.sinks as sinks
    from matclust.errors import InputError

    owner, name = (sinks, "encode") if encoding == "plain" else (compact.CompactEncoder,
                                                                   "encode_cluster")
    real_encode, calls = getattr(owner, name), []

    def failing_encode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise InputError("data.h5:matrices: cannot read matrix 5 (simulated)")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing_encode)
    X = np.random.default_rng(1).standard_normal((40, 6, 2))
    for out in ("mid.h5", "mid.zarr"):
        calls.clear()
        with pytest.raises(InputError, match="simulated"):
            matclust.MatrixClusterer(guarantee="cluster", encoding=encoding, rank=2, eps=0.05,
                                     patience=0).fit(X, tmp_path / out)
        assert len(calls) == 3
        assert os.listdir(tmp_path) == [], sorted(os.listdir(tmp_path))
