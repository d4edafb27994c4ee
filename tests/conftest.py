"""Shared fixtures for the end-to-end and API tests.

Everything here that *checks* a result is independent of matclust: input collections and result
stores are read with h5py / zarr directly and every error is recomputed with numpy. matclust is
used only to write the (planted) input collections and, of course, as the thing under test.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest

#: The S3 API server and bucket fixtures (tests/s3_server.py), defined once for the session:
#: s3fs caches its filesystems across tests, so every test must see the same endpoint.
pytest_plugins = ["s3_server"]

# ---------------------------------------------------------------------------------------------
# Running the command line
# ---------------------------------------------------------------------------------------------


@dataclass
class CliResult:
    args: list
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return _strict_json(self.stdout)

    def __str__(self) -> str:  # shown in assertion messages
        return (f"matclust {' '.join(map(str, self.args))}\n  exit {self.returncode}\n"
                f"  stdout: {self.stdout[-2000:]!r}\n  stderr: {self.stderr[-2000:]!r}")


def run_matclust(*args, cwd=None, check: int | None = None, timeout: float = 120) -> CliResult:
    """``python -m matclust ARGS`` in a subprocess (real exit codes, real stdout/stderr).

    ``check``: the exit code expected (asserted with the full output in the message).
    """
    args = [str(a) for a in args]
    env = dict(os.environ)
    env.pop("FORCE_COLOR", None)
    env["COLUMNS"] = "200"
    proc = subprocess.run([sys.executable, "-m", "matclust", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    result = CliResult(args, proc.returncode, proc.stdout, proc.stderr)
    if check is not None:
        assert result.returncode == check, f"expected exit {check}:\n{result}"
    return result


def run_inprocess(*args, check: int | None = None) -> CliResult:
    """``matclust.cli.main(ARGS)`` in this process, stdout/stderr captured.

    ``main`` is what the console command runs (``matclust.cli.run``) and produces the real
    exit codes; running it in-process saves the interpreter start-up (and imports) of a
    subprocess. Tests of what
    reaches the terminal (stdout purity, --version, error lines) use :func:`run_matclust`.
    """
    import contextlib
    import io

    from matclust.cli import main

    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code
    code = 0 if code is None else (code if isinstance(code, int) else 1)
    result = CliResult(args, code, out.getvalue(), err.getvalue())
    if check is not None:
        assert result.returncode == check, f"expected exit {check}:\n{result}"
    return result


@pytest.fixture
def cli():
    """The ``run_matclust`` helper (subprocess)."""
    return run_matclust


# ---------------------------------------------------------------------------------------------
# Writing input collections
# ---------------------------------------------------------------------------------------------

EXT = {"h5": ".h5", "zarr2": ".zarr", "zarr3": ".zarr"}


def write_planted(path, *, K=60, m=10, n=4, n_max=None, subspaces=3, rank=2, noise=0.01,
                  dtype="float64", layout="stack", fmt=None, dataset="matrices", seed=0,
                  scale_spread=10.0, transpose_on_disk=False):
    """Write a planted collection with matclust's own generator and writer.

    ``fmt``: "h5", "zarr2" or "zarr3" (default: from the file name). With ``transpose_on_disk``
    every matrix is written transposed (n_i x m), to be read back with ``--transpose``.
    Returns (path, matrices as a list of (m, n_i) arrays in input dtype, planted labels).
    """
    from matclust.collections_io import write_collection
    from matclust.sample import planted_collection

    path = os.fspath(path)
    if fmt is None:
        fmt = "h5" if path.endswith((".h5", ".hdf5")) else "zarr3"
    mats, labels = planted_collection(K, m, n, subspaces, rank, noise, dtype, n_max, seed,
                                      scale_spread)
    mats = [np.asarray(a) for a in mats]
    on_disk = [a.T.copy() for a in mats] if transpose_on_disk else mats
    if layout == "stack":
        data = np.stack(on_disk)
    else:
        data = on_disk
    write_collection(path, data, layout=layout, dataset=dataset,
                     zarr_format=3 if fmt != "zarr2" else 2, extra={"planted_labels": labels})
    return path, mats, labels


# ---------------------------------------------------------------------------------------------
# Reading inputs and result stores independently (h5py / zarr directly)
# ---------------------------------------------------------------------------------------------


def _is_h5(path) -> bool:
    return os.fspath(path).lower().endswith((".h5", ".hdf5"))


def load_input(path, dataset="matrices", transpose=False):
    """(matrices, names, on-disk dtype) of a collection, read with h5py / zarr directly.

    matrices: list of (m, n_i) arrays in the on-disk dtype (transposed when ``transpose``);
    names: sorted member names of a group, None for a 3-D array.
    """
    path = os.fspath(path)
    if _is_h5(path):
        import h5py

        with h5py.File(path, "r") as f:
            node = f[dataset]
            if isinstance(node, h5py.Dataset):
                arr = node[...]
                mats, names = [arr[i] for i in range(arr.shape[0])], None
            else:
                names = sorted(k for k in node.keys() if isinstance(node[k], h5py.Dataset))
                mats = [node[k][...] for k in names]
    else:
        import zarr

        root = zarr.open_group(path, mode="r")
        node = root[dataset]
        if isinstance(node, zarr.Array):
            arr = node[...]
            mats, names = [arr[i] for i in range(arr.shape[0])], None
        else:
            arrays = dict(node.arrays())
            names = sorted(arrays)
            mats = [arrays[k][...] for k in names]
    dtype = mats[0].dtype
    if transpose:
        mats = [a.T for a in mats]
    return [np.asarray(a) for a in mats], names, dtype


@dataclass
class Store:
    attrs: dict
    params: dict
    report: dict
    labels: np.ndarray
    names: list | None
    clusters: list = field(default_factory=list)  # dicts: members, basis, coefficients, raw
    cluster_keys: list = field(default_factory=list)


def _strict_json(text: str):
    def bad(token):
        raise AssertionError(f"non-finite number {token} in JSON")

    return json.loads(text, parse_constant=bad)


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_store(path) -> Store:
    """A result store read with h5py / zarr directly (no matclust code)."""
    path = os.fspath(path)
    clusters, keys = [], []
    if _is_h5(path):
        import h5py

        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            labels_ds = f["labels"]
            labels = labels_ds[...]
            assert labels_ds.dtype == np.int64, f"labels dtype {labels_ds.dtype}, expected int64"
            names = None
            if "names" in f:
                names = [_plain(v) for v in f["names"][...]]
            keys = list(f["clusters"].keys()) if "clusters" in f else []
            for key in keys:
                grp = f["clusters"][key]
                clusters.append({k: grp[k][...] for k in grp.keys()})
    else:
        import zarr

        root = zarr.open_group(path, mode="r")
        attrs = dict(root.attrs)
        labels = root["labels"][...]
        assert labels.dtype == np.int64, f"labels dtype {labels.dtype}, expected int64"
        names = [str(v) for v in root["names"][...]] if "names" in root else None
        if "clusters" in root:
            grp = root["clusters"]
            keys = [k for k, _ in grp.groups()]
            for key in keys:
                clusters.append({k: a[...] for k, a in grp[key].arrays()})
    # clusters/<c>: c runs 0..C-1; order the list by c.
    assert all(k.isdigit() for k in keys), f"cluster group names {keys} are not integers"
    order = sorted(range(len(keys)), key=lambda j: int(keys[j]))
    keys = [keys[j] for j in order]
    clusters = [clusters[j] for j in order]
    params = _strict_json(attrs["params"]) if "params" in attrs else {}
    report = _strict_json(attrs["report"]) if "report" in attrs else {}
    return Store(attrs, params, report, labels, names, clusters, keys)


def tree_digest(path) -> str:
    """A digest of a file or directory tree's names and contents (to show it is untouched)."""
    path = os.fspath(path)
    h = hashlib.sha256()
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            h.update(fh.read())
        return h.hexdigest()
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Independent mathematics
# ---------------------------------------------------------------------------------------------


def wide(a) -> np.ndarray:
    """An array in double precision (complex128 for complex input)."""
    a = np.asarray(a)
    return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


def concat(mats) -> np.ndarray:
    return np.hstack([wide(a) for a in mats])


def sq(a) -> float:
    return float(np.sum(np.abs(wide(a)) ** 2))


def best_error(mats, r: int) -> float:
    """e_r(S): best rank-r relative error of the concatenation, from its tail singular values."""
    s2 = np.linalg.svd(concat(mats), compute_uv=False) ** 2
    total = float(np.sum(s2))
    return 0.0 if total == 0 else float(np.sqrt(min(1.0, np.sum(s2[r:]) / total)))


def paper_ratio(m: int, rank: int, groups_widths) -> float:
    """The paper's compression ratio for a partition: groups_widths = [[n_i for i in S], ...]."""
    total = m * sum(sum(w) for w in groups_widths)
    params = 0
    for w in groups_widths:
        N = sum(w)
        params += m * N if len(w) < 2 else min(rank * (m + N), m * N)
    return total / params


#: Stored dtype for an input dtype (README.md, 'Output store': float32 in, float32 out; float16 and
#: integers are stored as float32; complex64 as complex64).
def contract_stored_dtype(input_dtype) -> np.dtype:
    dt = np.dtype(input_dtype)
    if dt.kind in "iu" or dt == np.float16:
        return np.dtype(np.float32)
    return dt


REPORT_KEYS = {"params", "K", "m", "clusters", "singletons", "compression_ratio", "stored_ratio",
               "input_bytes", "stored_bytes", "max_error", "eps", "seconds", "peak_rss_mb",
               "cluster_stats"}
STAT_KEYS = {"id", "size", "columns", "rank", "bound", "error", "stored"}
PARAM_KEYS = {"method", "order", "rank", "eps", "patience", "input", "dataset", "transpose"}


def ortho_tol(dtype) -> float:
    return 1e-4 if np.dtype(dtype) in (np.float32, np.complex64) else 1e-10


def error_close(a: float, b: float, dtype) -> bool:
    """Two computations of the same error agree (up to the storage precision's rounding)."""
    single = np.dtype(dtype) in (np.float32, np.complex64, np.float16)
    return abs(a - b) <= (1e-6 if single else 1e-10) + 1e-4 * max(a, b)


def check_partition(mats, labels, clusters, rep, *, rank, eps, where="", input_itemsize=None):
    """Assert that a clustering honours README.md's contract, recomputing everything from ``mats``.

    mats: the input matrices (m x n_i, as clustered); labels: (K,) cluster ids; clusters: dicts
    with members and basis + coefficients or raw, in cluster-id order; rep: the report (with
    cluster_stats). Returns every cluster's recomputed error.
    """
    K, m = len(mats), mats[0].shape[0]
    widths = np.array([a.shape[1] for a in mats])
    if input_itemsize is None:
        input_itemsize = np.asarray(mats[0]).dtype.itemsize

    # -- labels and membership ------------------------------------------------------------
    labels = np.asarray(labels)
    assert labels.dtype == np.int64, f"{where}: labels dtype {labels.dtype}"
    assert labels.shape == (K,), f"{where}: labels shape {labels.shape}, K = {K}"
    C = len(clusters)
    seen = np.zeros(K, dtype=int)
    for c, cl in enumerate(clusters):
        members = cl["members"]
        assert members.dtype == np.int64 and members.ndim == 1 and len(members) >= 1
        assert members.min() >= 0 and members.max() < K
        seen[members] += 1
        assert np.all(labels[members] == c), f"{where}: labels disagree with cluster {c}"
    assert np.all(seen == 1), f"{where}: indices in != 1 cluster: {np.flatnonzero(seen != 1)}"

    # -- greedy order: each cluster starts at the largest matrix not in an earlier cluster --
    norms = np.array([sq(a) for a in mats])
    for c, cl in enumerate(clusters):
        later = np.concatenate([x["members"] for x in clusters[c:]])
        first = norms[cl["members"][0]]
        assert first >= norms[later].max() * (1 - 1e-9), \
            f"{where}: cluster {c} does not start at the largest remaining matrix"

    # -- per-cluster arrays and errors --------------------------------------------------------
    stats = rep.get("cluster_stats", [])
    assert len(stats) == C, f"{where}: {len(stats)} cluster_stats for {C} clusters"
    errors, numbers, groups, stored_bytes = [], 0, [], 0
    for c, cl in enumerate(clusters):
        members = cl["members"]
        blocks = [mats[i] for i in members]
        M = concat(blocks)
        N = M.shape[1]
        groups.append([int(widths[i]) for i in members])
        stat = stats[c]
        assert STAT_KEYS <= set(stat), f"{where}: cluster_stats[{c}] lacks {STAT_KEYS - set(stat)}"
        assert stat["id"] == c and stat["size"] == len(members) and stat["columns"] == N
        if "basis" in cl:
            assert "raw" not in cl, f"{where}: cluster {c} has basis and raw"
            U, Cf = cl["basis"], cl["coefficients"]
            assert U.dtype == Cf.dtype, f"{where}: cluster {c} basis {U.dtype}, coefficients {Cf.dtype}"
            r_c = U.shape[1]
            assert U.shape == (m, r_c) and 1 <= r_c <= rank and Cf.shape == (r_c, N), \
                f"{where}: cluster {c} basis {U.shape}, coefficients {Cf.shape}, m={m}, N={N}"
            G = wide(U).conj().T @ wide(U)
            assert np.abs(G - np.eye(r_c)).max() <= ortho_tol(U.dtype), \
                f"{where}: cluster {c} basis not orthonormal"
            R = wide(U) @ wide(Cf)
            assert stat["stored"] == "factored" and stat["rank"] == r_c
            numbers += U.size + Cf.size
            stored_bytes += U.nbytes + Cf.nbytes
        else:
            assert "raw" in cl and "coefficients" not in cl, f"{where}: cluster {c}: {sorted(cl)}"
            raw = cl["raw"]
            assert raw.shape == (m, N)
            R = wide(raw)
            assert stat["stored"] == "raw"
            numbers += raw.size
            stored_bytes += raw.nbytes
        total = sq(M)
        err = 0.0 if total == 0 else math.sqrt(sq(M - R) / total)
        errors.append(err)
        assert err <= eps * (1 + 1e-12), f"{where}: cluster {c} error {err} > eps {eps}"
        assert error_close(err, stat["error"], R.dtype if "raw" in cl else cl["basis"].dtype), \
            f"{where}: cluster {c} reported error {stat['error']}, recomputed {err}"
        e_best = best_error(blocks, rank)
        assert stat["bound"] >= stat["error"] - 1e-12, f"{where}: cluster {c} bound < error"
        assert stat["bound"] >= e_best - 1e-9, \
            f"{where}: cluster {c} bound {stat['bound']} < true e_r {e_best}"
        if len(members) >= 2:  # a cluster only grows while its bound is within eps
            assert stat["bound"] <= eps, f"{where}: cluster {c} bound {stat['bound']} > eps"

    # -- the report ------------------------------------------------------------------------
    assert REPORT_KEYS <= set(rep), f"{where}: report lacks {REPORT_KEYS - set(rep)}"
    assert rep["K"] == K and rep["m"] == m and rep["clusters"] == C
    assert rep["singletons"] == sum(1 for g in groups if len(g) == 1)
    assert rep["eps"] == pytest.approx(eps)
    assert rep["compression_ratio"] == pytest.approx(paper_ratio(m, rank, groups), rel=1e-12)
    assert rep["stored_ratio"] == pytest.approx(m * widths.sum() / numbers, rel=1e-12)
    assert rep["input_bytes"] == m * widths.sum() * input_itemsize
    assert rep["stored_bytes"] == stored_bytes, f"{where}: stored_bytes {rep['stored_bytes']} != {stored_bytes}"
    assert rep["max_error"] == pytest.approx(max(errors), rel=1e-4, abs=1e-6)
    assert rep["seconds"] >= 0 and rep["peak_rss_mb"] > 0
    assert all(isinstance(rep[k], (int, float)) for k in REPORT_KEYS - {"params", "cluster_stats"})
    return errors


def check_store(store_path, input_path, *, dataset="matrices", transpose=False, rank, eps,
                method, order, patience=None, group=False, dtype=None, enforce_dtype=True):
    """Assert that the result store honours README.md's contract, recomputing everything from the input.

    With ``enforce_dtype=False`` the stored dtypes are not compared with the contract here (the
    caller does it last, so that the other checks still run); use :func:`check_stored_dtypes`.
    Returns (store, errors): the store as read and every cluster's recomputed error.
    """
    st = read_store(store_path)
    mats, names, on_disk_dtype = load_input(input_path, dataset, transpose)
    if dtype is not None:
        assert on_disk_dtype == np.dtype(dtype)
    where = f"store {store_path} (input {input_path}, {on_disk_dtype}, method {method}/{order})"

    # -- root attributes ------------------------------------------------------------------
    assert st.attrs.get("format") == "matclust/1", f"{where}: format attr {st.attrs.get('format')!r}"
    assert st.attrs.get("complete") is True, f"{where}: complete attr {st.attrs.get('complete')!r}"
    assert isinstance(st.attrs.get("params"), str) and isinstance(st.attrs.get("report"), str)
    p = st.params
    assert PARAM_KEYS <= set(p), f"{where}: params lacks {PARAM_KEYS - set(p)}"
    assert p["method"] == method and p["order"] == order, f"{where}: params {p}"
    assert p["rank"] == rank and p["eps"] == pytest.approx(eps) and p["transpose"] is transpose
    assert p["dataset"].strip("/") == dataset.strip("/")
    # recorded so that `verify` finds the input again from any working directory
    assert os.path.isabs(p["input"]), f"{where}: params input {p['input']!r} is not absolute"
    assert os.path.realpath(p["input"]) == os.path.realpath(input_path), f"{where}: params {p}"
    if patience is not None:
        assert p["patience"] == patience

    C = len(st.clusters)
    assert st.cluster_keys == [str(c) for c in range(C)], f"{where}: cluster ids {st.cluster_keys}"
    if group:
        assert st.names == names, f"{where}: names {st.names} != input members {names}"
    assert st.report["params"] == p, f"{where}: report params differ from the params attribute"
    errors = check_partition(mats, st.labels, st.clusters, st.report, rank=rank, eps=eps,
                             where=where, input_itemsize=np.dtype(on_disk_dtype).itemsize)
    if enforce_dtype:
        check_stored_dtypes(store_path, on_disk_dtype, st)
    return st, errors


def check_stored_dtypes(store_path, input_dtype, st=None):
    """Every stored basis / coefficients / raw array has the contract's dtype for the input."""
    st = st or read_store(store_path)
    want = contract_stored_dtype(input_dtype)
    found = {str(a.dtype) for cl in st.clusters for k, a in cl.items() if k != "members"}
    assert found == {str(want)}, (
        f"store {store_path}: {np.dtype(input_dtype)} input stored as {sorted(found)}; "
        f"README.md says {want} ('float16 and integers are stored as float32; "
        f"complex64 as complex64')")


def tamper_coefficient(store_path) -> int:
    """Bump one coefficient of a factored cluster by a large amount (or one raw number when no
    cluster is factored). Returns the cluster id changed."""
    st = read_store(store_path)
    target = next((c for c, cl in enumerate(st.clusters) if "coefficients" in cl), None)
    key = "coefficients"
    if target is None:
        target, key = 0, "raw"
    name = f"clusters/{target}/{key}"
    if _is_h5(store_path):
        import h5py

        with h5py.File(store_path, "r+") as f:
            ds = f[name]
            big = 10.0 * float(np.abs(ds[...]).max()) + 10.0
            ds[0, 0] = ds[0, 0] + big
    else:
        import zarr

        arr = zarr.open_array(os.path.join(os.fspath(store_path), name), mode="r+")
        big = 10.0 * float(np.abs(arr[...]).max()) + 10.0
        arr[0, 0] = arr[0, 0] + big
    return target


# ---------------------------------------------------------------------------------------------
# The compact layout (docs/format.md), decoded with numpy + h5py/hdf5plugin or zarr alone
# ---------------------------------------------------------------------------------------------
def decode_compact(path):
    """(attrs, labels, every matrix decoded in float64/complex128) of a compact store, following
    docs/format.md only: codes zig-zag mapped, matrices in index order, each (rows, n_i)
    row-major (complex: real rows then imaginary rows), step 2^(e/16), -32768 meaning 0; with
    rank 0 the codes are DCT coefficients (inverted here with scipy, not matclust's own DCT)."""
    path = os.fspath(path)
    names = ("labels", "widths", "step_exponents", "codes", "cluster_ranks", "bases")
    if _is_h5(path):
        import h5py
        import hdf5plugin  # noqa: F401

        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            arr = {k: f[k][...] for k in names}
    else:
        import zarr

        root = zarr.open_group(path, mode="r")
        attrs = dict(root.attrs)
        arr = {k: root[k][...] for k in names}
    labels = arr["labels"].astype(np.int64)
    ranks = arr["cluster_ranks"].astype(np.int64)
    bases = arr["bases"]
    m = bases.shape[0]
    cplx = bases.dtype.kind == "c"
    u = arr["codes"].astype(np.uint64)
    codes = (u >> np.uint64(1)).astype(np.int64) ^ -(u & np.uint64(1)).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(ranks)])
    pos = 0
    out = []
    for i, (c, n) in enumerate(zip(labels, arr["widths"].astype(np.int64))):
        r = int(ranks[c])
        rows = (r if r else m) * (2 if cplx else 1)
        flat = codes[pos: pos + rows * n]
        pos += rows * n
        if r:
            z = flat.reshape(rows, n).astype(np.float64)
        else:  # DCT coefficients are stored by frequency i + j, then i (real part first)
            z = np.empty((rows, n))
            half = rows // 2 if cplx else rows
            ii, jj = np.meshgrid(np.arange(half), np.arange(n), indexing="ij")
            order = sorted(range(half * n), key=lambda t: (ii.ravel()[t] + jj.ravel()[t], ii.ravel()[t]))
            for p, part in enumerate(np.split(flat, 2) if cplx else [flat]):
                block = np.empty(half * n)
                block[order] = part
                z[p * half:(p + 1) * half] = block.reshape(half, n)
        e = int(arr["step_exponents"][i])
        z = z * (0.0 if e == -32768 else 2.0 ** (e / 16))
        if cplx:
            z = z[: rows // 2] + 1j * z[rows // 2:]
        if r:
            out.append(bases[:, starts[c]: starts[c] + r].astype(z.dtype if cplx else np.float64) @ z)
        else:  # no basis: the codes are the matrix's orthonormal 2-D DCT-II coefficients
            from scipy.fft import idctn

            out.append(idctn(z, type=2, norm="ortho"))
    assert pos == len(codes), f"{len(codes) - pos} codes left over"
    return attrs, labels, out


def check_compact(store_path, mats, eps, guarantee="matrix"):
    """Every matrix (or every cluster) of a compact store within eps of the input ``mats``
    (computed here with numpy, in double precision); returns the per-matrix errors."""
    attrs, labels, decoded = decode_compact(store_path)
    assert attrs["format"] == "matclust/2" and attrs["complete"] in (True, 1)
    assert len(decoded) == len(mats)
    err2 = np.array([sq(np.asarray(a, np.complex128 if np.iscomplexobj(a) else np.float64) - d)
                     for a, d in zip(mats, decoded)])
    norm2 = np.array([sq(a) for a in mats])
    rel = np.sqrt(np.where(norm2 > 0, err2 / np.where(norm2 > 0, norm2, 1), np.where(err2 > 0, np.inf, 0)))
    if guarantee == "matrix":
        assert rel.max() <= eps, f"matrix {int(np.argmax(rel))} has error {rel.max()} > {eps}"
    else:
        for c in np.unique(labels):
            sel = labels == c
            e = np.sqrt(err2[sel].sum() / norm2[sel].sum()) if norm2[sel].sum() > 0 else 0.0
            assert e <= eps, f"cluster {c} has error {e} > {eps}"
    return rel


#: The paper's setting: its per-cluster guarantee, stored as float bases and coefficients
#: (matclust/1 layout). The tests of the paper's method run with it; tests/test_compact.py
#: covers the default compact encoding and the per-matrix guarantee.
PAPER = ("--guarantee", "cluster", "--encoding", "plain")
PAPER_PARAMS = {"guarantee": "cluster", "encoding": "plain"}
