"""Tests for the reading layer: ``open_source`` on HDF5 and Zarr (v2 and v3) files.

Files are written with h5py / zarr directly (not with matclust's writer), so the layout on disk
is exactly what the test says. Every read is compared with the arrays that were written.
"""

from __future__ import annotations

import os
import warnings

import h5py
import numpy as np
import pytest
import zarr

from matclust.errors import InputError
from matclust.sources import array_source, list_candidates, open_source, working_dtype

FORMATS = ["h5", "zarr2", "zarr3"]

# dtype on disk -> working dtype (README.md, 'Input'; float16 widened, integers as float64)
WORKING = {
    "float16": "float32",
    "float32": "float32",
    "float64": "float64",
    "int32": "float64",
    "int64": "float64",
    "uint8": "float64",
    "complex64": "complex64",
    "complex128": "complex128",
}


# ---------------------------------------------------------------------------------------------
# Writing test files (h5py / zarr directly)
# ---------------------------------------------------------------------------------------------


def _path(tmp_path, fmt, name="in"):
    return os.fspath(tmp_path / (f"{name}.h5" if fmt == "h5" else f"{name}.zarr"))


def write(tmp_path, fmt, tree, name="in", chunks=None):
    """Write ``tree`` = {name: ndarray | {member: ndarray, ...}} (one level of groups, plus
    "a/b" style nested paths) to a new HDF5 file or Zarr store; returns its path.

    ``chunks``: {name: chunk shape} for arrays that should be chunked explicitly.
    """
    chunks = chunks or {}
    path = _path(tmp_path, fmt, name)
    if fmt == "h5":
        with h5py.File(path, "w") as f:
            for key, val in tree.items():
                if isinstance(val, dict):
                    g = f.require_group(key)
                    for mname, arr in val.items():
                        g.create_dataset(mname, data=arr, chunks=chunks.get(f"{key}/{mname}"))
                else:
                    ch = chunks.get(key)
                    # maxshape lets a chunk be longer than the data along axis 0
                    f.create_dataset(key, data=val, chunks=ch,
                                     maxshape=(None, *val.shape[1:]) if ch else None)
        return path
    zf = 2 if fmt == "zarr2" else 3
    root = zarr.open_group(path, mode="w", zarr_format=zf)

    def put(group, key, arr, ch):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unstable v3 dtypes (strings) warn
            a = group.create_array(key, shape=arr.shape, dtype=arr.dtype,
                                   chunks=ch if ch is not None else "auto")
            if arr.size:
                a[...] = arr

    for key, val in tree.items():
        if isinstance(val, dict):
            g = root.require_group(key)
            for mname, arr in val.items():
                put(g, mname, arr, chunks.get(f"{key}/{mname}"))
        else:
            parts = key.split("/")
            g = root
            for p in parts[:-1]:
                g = g.require_group(p)
            put(g, parts[-1], val, chunks.get(key))
    return path


def make_data(rng, shape, dtype):
    dt = np.dtype(dtype)
    if dt.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    if dt.kind == "u":
        return rng.integers(0, 255, size=shape).astype(dt)
    return rng.integers(-1000, 1000, size=shape).astype(dt)


def all_matrices(src):
    batch = src.read_range(0, src.K)
    return [batch.block(j) for j in range(len(batch))]


def assert_same(got, want_list, dtype):
    assert len(got) == len(want_list)
    for g, w in zip(got, want_list):
        assert g.dtype == np.dtype(dtype)
        assert g.shape == w.shape
        np.testing.assert_array_equal(g, np.asarray(w).astype(dtype))


# ---------------------------------------------------------------------------------------------
# Layouts and dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", list(WORKING))
def test_stack_layout_all_dtypes(tmp_path, fmt, dtype):
    rng = np.random.default_rng(0)
    data = make_data(rng, (7, 5, 3), dtype)
    path = write(tmp_path, fmt, {"data": data})
    with open_source(path) as src:
        assert (src.K, src.m) == (7, 5)
        assert list(src.widths) == [3] * 7
        assert src.input_dtype == np.dtype(dtype)
        assert src.dtype == np.dtype(WORKING[dtype]) == working_dtype(np.dtype(dtype))
        assert src.names is None
        assert src.dataset.strip("/") == "data"
        assert_same(all_matrices(src), list(data), WORKING[dtype])
        if np.dtype(dtype).kind == "c":
            assert np.iscomplexobj(src.read_range(0, 1).data)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", list(WORKING))
def test_group_layout_variable_widths_sorted_names(tmp_path, fmt, dtype):
    rng = np.random.default_rng(1)
    # Written in an unsorted order; sorted (string order): a10 < a2 < b < c
    members = {name: make_data(rng, (4, n), dtype)
               for name, n in [("c", 2), ("a2", 5), ("b", 1), ("a10", 3)]}
    path = write(tmp_path, fmt, {"grp": members})
    with open_source(path) as src:
        assert src.names == ["a10", "a2", "b", "c"]
        assert (src.K, src.m) == (4, 4)
        assert list(src.widths) == [3, 5, 1, 2]
        assert src.dtype == np.dtype(WORKING[dtype])
        assert_same(all_matrices(src), [members[k] for k in src.names], WORKING[dtype])
        assert "a2" in src.describe(1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_group_mixed_dtypes_promote(tmp_path, fmt):
    rng = np.random.default_rng(2)
    members = {"x": make_data(rng, (3, 2), "int32"), "y": make_data(rng, (3, 4), "float32")}
    path = write(tmp_path, fmt, {"g": members})
    with open_source(path) as src:
        assert src.dtype in (np.dtype("float64"), np.dtype("float32"))
        got = all_matrices(src)
        np.testing.assert_array_equal(got[0], members["x"].astype(src.dtype))
        np.testing.assert_array_equal(got[1], members["y"].astype(src.dtype))


@pytest.mark.parametrize("fmt", FORMATS)
def test_transpose_stack_and_group(tmp_path, fmt):
    rng = np.random.default_rng(3)
    stack = make_data(rng, (6, 5, 3), "float64")
    members = {"m0": make_data(rng, (2, 4), "complex128"), "m1": make_data(rng, (7, 4), "complex128")}
    path = write(tmp_path, fmt, {"stack": stack, "grp": members})
    with open_source(path, dataset="stack", transpose=True) as src:
        assert (src.K, src.m) == (6, 3) and list(src.widths) == [5] * 6
        assert src.transpose
        assert_same(all_matrices(src), [a.T for a in stack], "float64")
        b = src.read([4, 1])
        np.testing.assert_array_equal(b.block(0), stack[4].T)
        np.testing.assert_array_equal(b.block(1), stack[1].T)
    with open_source(path, dataset="grp", transpose=True) as src:
        assert (src.K, src.m) == (2, 4) and list(src.widths) == [2, 7]
        assert_same(all_matrices(src), [members["m0"].T, members["m1"].T], "complex128")
    # Without transpose the group's members have different row counts: an error naming one.
    with pytest.raises(InputError, match="m1|m0"):
        open_source(path, dataset="grp")


# ---------------------------------------------------------------------------------------------
# Finding the dataset
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_autodetect_single_stack_among_other_arrays(tmp_path, fmt):
    rng = np.random.default_rng(4)
    data = make_data(rng, (3, 4, 2), "float64")
    tree = {"data": data, "labels": np.arange(3), "meta/extra": np.zeros(5)}
    path = write(tmp_path, fmt, tree)
    with open_source(path) as src:
        assert src.dataset.strip("/") == "data"
        assert_same(all_matrices(src), list(data), "float64")
    # explicit, with or without a leading slash
    for name in ("data", "/data"):
        with open_source(path, dataset=name) as src:
            assert src.K == 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_autodetect_single_group(tmp_path, fmt):
    rng = np.random.default_rng(5)
    members = {"p": make_data(rng, (3, 2), "float32"), "q": make_data(rng, (3, 1), "float32")}
    path = write(tmp_path, fmt, {"nested/inner": members} if fmt != "h5" else {"inner": members})
    with open_source(path) as src:
        assert src.names == ["p", "q"]
        assert src.dataset.strip("/").endswith("inner")


@pytest.mark.parametrize("fmt", FORMATS)
def test_root_group_of_2d_arrays(tmp_path, fmt):
    rng = np.random.default_rng(6)
    members = {"b": make_data(rng, (3, 2), "float64"), "a": make_data(rng, (3, 4), "float64")}
    path = write(tmp_path, fmt, members)
    with open_source(path) as src:
        assert src.names == ["a", "b"]
        assert_same(all_matrices(src), [members["a"], members["b"]], "float64")


@pytest.mark.parametrize("fmt", FORMATS)
def test_several_candidates_need_dataset(tmp_path, fmt):
    rng = np.random.default_rng(7)
    tree = {
        "first": make_data(rng, (2, 3, 3), "float64"),
        "second": make_data(rng, (4, 3, 3), "float64"),
        "grp": {"x": make_data(rng, (3, 1), "float64")},
    }
    path = write(tmp_path, fmt, tree)
    with pytest.raises(InputError) as info:
        open_source(path)
    msg = str(info.value)
    assert "first" in msg and "second" in msg and "grp" in msg
    assert path in msg
    with open_source(path, dataset="second") as src:
        assert src.K == 4
    with open_source(path, dataset="grp") as src:
        assert src.K == 1 and src.names == ["x"]
    cands = list_candidates(path)
    assert sorted(c["dataset"].strip("/") for c in cands) == ["first", "grp", "second"]
    by_name = {c["dataset"].strip("/"): c for c in cands}
    assert by_name["second"]["K"] == 4 and by_name["second"]["layout"] == "stack"
    assert by_name["grp"]["layout"] == "group"


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_dataset(tmp_path, fmt):
    path = write(tmp_path, fmt, {"data": np.zeros((2, 3, 3))})
    with pytest.raises(InputError) as info:
        open_source(path, dataset="nope")
    assert "nope" in str(info.value) and path in str(info.value)
    assert "data" in str(info.value)  # lists what the file holds


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(6,), (2, 3, 4, 5)], ids=["1d", "4d"])
def test_wrong_rank_arrays(tmp_path, fmt, shape):
    path = write(tmp_path, fmt, {"arr": np.ones(shape)})
    with pytest.raises(InputError) as info:
        open_source(path)  # no candidate
    assert path in str(info.value) and "arr" in str(info.value)
    with pytest.raises(InputError) as info:
        open_source(path, dataset="arr")
    assert f"{len(shape)}-D" in str(info.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_group_member_not_2d(tmp_path, fmt):
    path = write(tmp_path, fmt, {"g": {"ok": np.ones((3, 2)), "bad": np.ones((3, 2, 2))}})
    with pytest.raises(InputError, match="bad"):
        open_source(path, dataset="g")


@pytest.mark.parametrize("fmt", FORMATS)
def test_group_members_with_different_row_counts(tmp_path, fmt):
    members = {"alpha": np.ones((4, 2)), "beta": np.ones((4, 3)), "gamma": np.ones((5, 2))}
    path = write(tmp_path, fmt, {"g": members})
    with pytest.raises(InputError) as info:
        open_source(path, dataset="g")
    msg = str(info.value)
    assert "gamma" in msg and path in msg
    # auto-detection finds the group, then rejects it the same way
    with pytest.raises(InputError, match="gamma"):
        open_source(path)


# ---------------------------------------------------------------------------------------------
# Degenerate and bad data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape,what", [((0, 3, 2), "K = 0"), ((3, 0, 2), "m = 0"),
                                        ((3, 2, 0), "columns")])
def test_empty_dimensions(tmp_path, fmt, shape, what):
    path = write(tmp_path, fmt, {"data": np.zeros(shape)})
    with pytest.raises(InputError) as info:
        open_source(path, dataset="data")
    assert what in str(info.value) and path in str(info.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_group(tmp_path, fmt):
    path = _path(tmp_path, fmt)
    if fmt == "h5":
        with h5py.File(path, "w") as f:
            f.create_group("g")
    else:
        zarr.open_group(path, mode="w", zarr_format=2 if fmt == "zarr2" else 3).require_group("g")
    with pytest.raises(InputError):
        open_source(path, dataset="g")
    with pytest.raises(InputError):
        open_source(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_group_member_with_no_columns(tmp_path, fmt):
    path = write(tmp_path, fmt, {"g": {"a": np.ones((3, 2)), "b": np.ones((3, 0))}})
    with pytest.raises(InputError, match="'b'"):
        open_source(path, dataset="g")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "complex64"])
def test_nonfinite_stack_detected_on_read(tmp_path, fmt, bad, dtype):
    rng = np.random.default_rng(8)
    data = make_data(rng, (9, 4, 3), dtype)
    data[5, 2, 1] = bad
    path = write(tmp_path, fmt, {"data": data}, chunks={"data": (2, 4, 3)})
    with open_source(path) as src:
        np.testing.assert_array_equal(src.read_range(0, 5).data[:, :3], data[0].astype(src.dtype))
        for read in (lambda: src.read_range(0, 9), lambda: src.read_range(5, 6),
                     lambda: src.read([7, 5, 0]), lambda: list(src.iter_batches(1))):
            with pytest.raises(InputError) as info:
                read()
            msg = str(info.value)
            assert "matrix 5" in msg and path in msg and "data" in msg
        # ranges not touching matrix 5 read fine
        assert_same(src.read_range(6, 9).blocks(), list(data[6:9]), src.dtype)
        assert_same(src.read([4, 0]).blocks(), [data[4], data[0]], src.dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nonfinite_group_member_named(tmp_path, fmt):
    rng = np.random.default_rng(9)
    members = {f"m{i}": make_data(rng, (3, 1 + i), "float64") for i in range(4)}
    members["m2"][0, 0] = np.nan
    members["m3"][1, 1] = np.inf
    path = write(tmp_path, fmt, {"g": members})
    with open_source(path) as src:
        with pytest.raises(InputError) as info:
            src.read_range(0, 4)
        assert "matrix 2" in str(info.value) and "m2" in str(info.value)
        with pytest.raises(InputError) as info:
            src.read([3])
        assert "matrix 3" in str(info.value) and "m3" in str(info.value)
        assert_same(src.read([1, 0]).blocks(), [members["m1"], members["m0"]], "float64")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["bool", "bytes", "unicode"])
def test_non_numeric_dtype(tmp_path, fmt, kind):
    if kind == "bool":
        arr = np.ones((2, 3, 3), dtype=bool)
    elif kind == "bytes":
        arr = np.full((2, 3, 3), b"ab", dtype="S2")
    else:
        if fmt == "h5":
            pytest.skip("HDF5 has no fixed-width unicode type")
        arr = np.full((2, 3, 3), "ab", dtype="<U2")
    path = write(tmp_path, fmt, {"data": arr, "g": {"member": arr[0]}})
    with pytest.raises(InputError) as info:
        open_source(path, dataset="data")
    assert "dtype" in str(info.value) and path in str(info.value)
    with pytest.raises(InputError, match="member"):
        open_source(path, dataset="g")


def test_hdf5_variable_length_strings(tmp_path):
    path = os.fspath(tmp_path / "s.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.array([[["a", "bc"]]], dtype=object),
                         dtype=h5py.string_dtype())
    with pytest.raises(InputError, match="dtype"):
        open_source(path, dataset="data")


def test_missing_file(tmp_path):
    path = os.fspath(tmp_path / "nothere.h5")
    with pytest.raises(InputError, match="nothere"):
        open_source(path)
    with pytest.raises(InputError):
        list_candidates(path)


def test_plain_text_file(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("this is not an HDF5 file\n" * 20)
    with pytest.raises(InputError, match="notes.h5"):
        open_source(path)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(InputError):
        open_source(other)


def test_empty_file_and_empty_directory(tmp_path):
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(InputError):
        open_source(empty)
    d = tmp_path / "emptydir.zarr"
    d.mkdir()
    with pytest.raises(InputError):
        open_source(d)


def _read_everything(path, dataset=None):
    with open_source(path, dataset=dataset) as src:
        for _ in src.iter_batches():
            pass


@pytest.mark.parametrize("chunked", [False, True])
def test_truncated_hdf5(tmp_path, chunked):
    rng = np.random.default_rng(10)
    path = os.fspath(tmp_path / "trunc.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=rng.standard_normal((64, 20, 10)),
                         chunks=(4, 20, 10) if chunked else None)
    _read_everything(path)  # valid before truncation
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(InputError) as info:
        _read_everything(path)
    assert "trunc.h5" in str(info.value)


def test_hdf5_with_damaged_superblock(tmp_path):
    path = os.fspath(tmp_path / "bad.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.ones((2, 3, 3)))
    raw = bytearray(open(path, "rb").read())
    raw[8:64] = b"\xff" * 56  # keep the signature, wreck what follows
    with open(path, "wb") as fh:
        fh.write(raw)
    with pytest.raises(InputError):
        _read_everything(path)


def test_corrupt_hdf5_chunk(tmp_path):
    """The file opens (its size is intact) but a compressed chunk is garbage: reading it is an
    InputError naming the file and the matrices, not a raw h5py OSError."""
    rng = np.random.default_rng(15)
    path = os.fspath(tmp_path / "corrupt.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=rng.standard_normal((8, 20, 10)), chunks=(2, 20, 10),
                         compression="gzip")
    with h5py.File(path, "r") as f:
        info = f["data"].id.get_chunk_info(1)  # matrices 2..3
        offset, size = info.byte_offset, info.size
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00\xff" * (size // 2))
    with open_source(path) as src:
        src.read_range(0, 2)  # an intact chunk
        with pytest.raises(InputError) as info:
            src.read_range(0, 8)
        assert "corrupt.h5" in str(info.value) and "data" in str(info.value)


@pytest.mark.parametrize("fmt", ["zarr2", "zarr3"])
def test_corrupt_zarr_chunk(tmp_path, fmt):
    rng = np.random.default_rng(11)
    data = rng.standard_normal((8, 4, 3))
    path = write(tmp_path, fmt, {"data": data}, chunks={"data": (2, 4, 3)})
    chunk_files = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(path, "data"))
                   for f in fs if not f.startswith(".") and f not in ("zarr.json",)]
    assert chunk_files
    for cf in chunk_files:
        with open(cf, "wb") as fh:
            fh.write(b"garbage, not a compressed chunk")
    with pytest.raises(InputError) as info:
        _read_everything(path)
    assert path in str(info.value)


# ---------------------------------------------------------------------------------------------
# Reading: ranges, arbitrary indices, batches, chunk alignment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "complex128", "int64"])
def test_reads_reproduce_stack(tmp_path, fmt, dtype):
    rng = np.random.default_rng(12)
    K, m, n = 23, 6, 4
    data = make_data(rng, (K, m, n), dtype)
    path = write(tmp_path, fmt, {"data": data}, chunks={"data": (4, m, n)})
    wd = WORKING[dtype]
    want = list(data)
    with open_source(path) as src:
        assert src.matrix_bytes == K * m * n * np.dtype(wd).itemsize
        for start, stop in [(0, K), (0, 1), (3, 9), (4, 8), (22, 23), (5, 5)]:
            b = src.read_range(start, stop)
            assert list(b.indices) == list(range(start, stop))
            assert b.data.shape == (m, (stop - start) * n)
            assert_same(b.blocks(), want[start:stop], wd)
        for idx in ([5, 0, 22, 3], [22, 21, 20], [7, 7, 1, 7], [], list(rng.permutation(K)),
                    list(rng.integers(0, K, size=40))):
            b = src.read(idx)
            assert list(b.indices) == list(idx)
            assert_same(b.blocks(), [want[i] for i in idx], wd)
        for target in (1, m * n * 4 * 3, 10**9):
            got, seen = [], []
            for b in src.iter_batches(target):
                got += b.blocks()
                seen += list(b.indices)
            assert seen == list(range(K))
            assert_same(got, want, wd)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_reproduce_group(tmp_path, fmt):
    rng = np.random.default_rng(13)
    widths = rng.integers(1, 7, size=15)
    members = {f"mat{i:02d}": make_data(rng, (5, int(w)), "float64") for i, w in enumerate(widths)}
    path = write(tmp_path, fmt, {"g": members})
    want = [members[k] for k in sorted(members)]
    with open_source(path) as src:
        assert list(src.widths) == list(widths)
        assert list(src.offsets) == [0, *np.cumsum(widths)]
        assert_same(all_matrices(src), want, "float64")
        b = src.read_range(4, 9)
        assert_same(b.blocks(), want[4:9], "float64")
        for idx in ([14, 0, 3], [2, 2, 9], list(rng.permutation(15))):
            b = src.read(idx)
            assert list(b.indices) == idx
            assert_same(b.blocks(), [want[i] for i in idx], "float64")
            assert list(np.diff(b.offsets)) == [int(widths[i]) for i in idx]
        got = [blk for b in src.iter_batches(1) for blk in b.blocks()]
        assert_same(got, want, "float64")


def _check_ranges(ranges, K, chunk):
    assert ranges[0][0] == 0 and ranges[-1][1] == K
    for (s0, e0), (s1, _) in zip(ranges, ranges[1:]):
        assert e0 == s1
    for s, e in ranges:
        assert s < e
        assert s % chunk == 0, (ranges, chunk)
        assert e % chunk == 0 or e == K, (ranges, chunk)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 30])
def test_chunk_ranges_aligned(tmp_path, fmt, chunk):
    K, m, n = 29, 5, 3
    data = np.arange(K * m * n, dtype=np.float64).reshape(K, m, n)
    path = write(tmp_path, fmt, {"data": data}, chunks={"data": (chunk, m, n)})
    per_matrix = m * n * 8
    with open_source(path) as src:
        assert src.summary()["chunk_len"] == chunk
        for target in (1, per_matrix, per_matrix * 5, per_matrix * chunk * 2 + 1, 10**9):
            ranges = src.chunk_ranges(target)
            _check_ranges(ranges, K, chunk)
            if target >= per_matrix * K * 2:
                assert len(ranges) == 1
            batches = list(src.iter_batches(target))
            assert [(int(b.indices[0]), int(b.indices[-1]) + 1) for b in batches] == ranges
            assert_same([blk for b in batches for blk in b.blocks()], list(data), "float64")


def test_chunk_ranges_contiguous_hdf5(tmp_path):
    data = np.ones((10, 3, 2))
    path = write(tmp_path, "h5", {"data": data})
    with open_source(path) as src:
        ranges = src.chunk_ranges(3 * 2 * 8 * 3)
        _check_ranges(ranges, 10, 1)
        assert ranges[0] == (0, 3)


# ---------------------------------------------------------------------------------------------
# Misc: summaries, closing, in-memory sources
# ---------------------------------------------------------------------------------------------


def test_summary_and_close(tmp_path):
    data = np.ones((4, 3, 2), dtype=np.float16)
    path = write(tmp_path, "h5", {"data": data}, chunks={"data": (2, 3, 2)})
    src = open_source(path)
    s = src.summary()
    assert s["K"] == 4 and s["m"] == 3 and s["n_min"] == s["n_max"] == 2 and s["columns"] == 8
    assert s["input_dtype"] == "float16" and s["dtype"] == "float32" and s["layout"] == "stack"
    src.close()
    # the file handle is released: the file can be reopened for writing
    with h5py.File(path, "a") as f:
        f.attrs["touched"] = 1


def test_array_source_roundtrip():
    rng = np.random.default_rng(14)
    stack = rng.standard_normal((5, 4, 3)).astype(np.float32)
    src = array_source(stack)
    assert (src.K, src.m, src.dtype) == (5, 4, np.dtype(np.float32))
    assert_same(src.read([4, 0]).blocks(), [stack[4], stack[0]], "float32")
    mats = [rng.standard_normal((4, n)) for n in (1, 5, 2)]
    src = array_source([a.T for a in mats], transpose=True)
    assert src.m == 4 and list(src.widths) == [1, 5, 2]
    assert_same(all_matrices(src), mats, "float64")
    with pytest.raises(InputError):
        array_source([rng.standard_normal((4, 2)), rng.standard_normal((5, 2))])
    src = array_source(mats)
    assert_same(all_matrices(src), mats, "float64")
    bad = stack.copy()
    bad[2, 0, 0] = np.nan
    with pytest.raises(InputError, match="matrix 2"):
        array_source(bad).read_range(0, 5)
