"""The distributed path (matclust/stages.py, matclust/distributed.py): speed and quality.

    python bench/distributed.py --K 100000                 # speed: single process vs workers
    python bench/distributed.py --K 100000 --K 1000000 --shards 4
    python bench/distributed.py --quality --only planted rgb minilm_10k

Speed: on the planted collection of bench/scale.py (K matrices of 32 x 16 float32, 500 rank-6
subspaces, rank 8, eps 0.1, --memory-limit 1GiB, the default matrix guarantee and compact
encoding), the wall time of today's single-process out-of-core run, of `--workers 1` and of
`--workers 2` at the same `--shards` (the same work, so the ratio is the scaling of the
distributed path itself), with each run's stage seconds and the merge's size.

Quality: the compression ratio of `--shards 2` and `--shards 8` (in this process: the labels
are those of any runner at the same shards) over the single-process run's, on the planted
collection and on the collections of bench/compression.py (RGB patches, MiniLM weight
columns) at that script's rank and eps; "bytes" is the single-process store's size over the
sharded one's.

Every run is `matclust cluster` in a subprocess (wall time measured around it) and its store is
checked with `matclust verify`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from collections_builder import planted  # noqa: E402
from runner import _env as subprocess_env  # noqa: E402

#: name -> (file in the data folder, rank, eps); rank/eps as in bench/compression.py.
QUALITY = {
    "planted": ("planted_{K}.h5", 8, 0.1),
    "rgb": ("rgb_patches.h5", 20, 0.05),
    "minilm_10k": ("minilm_10k.h5", 32, 0.2),
}


def run(path: str, rank: int, eps: float, *extra: str) -> dict:
    out = os.path.join(os.path.dirname(path), "distributed.result.zarr")
    cmd = [sys.executable, "-m", "matclust", "cluster", path, "-o", out, "--rank", str(rank),
           "--eps", str(eps), "--memory-limit", "1GiB", "--overwrite", "--quiet", "--json",
           *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    verified = subprocess.run([sys.executable, "-m", "matclust", "verify", out, "--quiet"],
                              capture_output=True, env=subprocess_env()).returncode == 0
    return {"wall": wall, "report": json.loads(proc.stdout), "verified": verified}


def speed(K: int, shards: int, data_dir: str) -> None:
    path = os.path.join(data_dir, f"planted_{K}.h5")
    if not os.path.exists(path):
        planted(path, K)
    print(f"\nK = {K}, --shards {shards} for the distributed runs")
    print(f"{'run':>22} {'wall s':>8} {'plan s':>7} {'merge s':>8} {'store s':>8} "
          f"{'merged':>7} {'clusters':>8} {'CR':>7} {'verify':>6}")
    walls = {}
    for name, extra in (("single process", ("--mode", "out-of-core")),
                        ("--workers 1", ("--workers", "1", "--shards", str(shards))),
                        ("--workers 2", ("--workers", "2", "--shards", str(shards)))):
        result = run(path, 8, 0.1, *extra)
        rep, st = result["report"], result["report"].get("stages", {})
        walls[name] = result["wall"]
        cell = lambda key, fmt: format(st[key], fmt) if key in st else "-"  # noqa: E731
        print(f"{name:>22} {result['wall']:>8.1f} {cell('plan_seconds', '.1f'):>7} "
              f"{cell('merge_seconds', '.2f'):>8} {cell('store_seconds', '.1f'):>8} "
              f"{cell('summaries_merged', 'd'):>7} {rep['clusters']:>8} "
              f"{rep['compression_ratio']:>7.3f} {'ok' if result['verified'] else 'FAIL':>6}",
              flush=True)
    print(f"--workers 2 / --workers 1: {walls['--workers 2'] / walls['--workers 1']:.2f}; "
          f"--workers 2 / single process: {walls['--workers 2'] / walls['single process']:.2f}")


def quality(names: list[str], K: int, data_dir: str) -> None:
    print(f"\n{'collection':>12} {'rank':>4} {'eps':>5} {'single CR':>9} "
          f"{'2 shards':>9} {'ratio':>6} {'bytes':>6} {'8 shards':>9} {'ratio':>6} {'bytes':>6} "
          f"{'verify':>6}")
    for name in names:
        file, rank, eps = QUALITY[name]
        path = os.path.join(data_dir, file.format(K=K))
        if not os.path.exists(path):
            if name != "planted":
                print(f"{name:>12}: {path} missing (build it as bench/compression.py says)")
                continue
            planted(path, K)
        single = run(path, rank, eps, "--mode", "out-of-core")
        cells, ok = [], single["verified"]
        for shards in (2, 8):
            result = run(path, rank, eps, "--shards", str(shards))
            ratio = result["report"]["compression_ratio"] / single["report"]["compression_ratio"]
            # bytes: the stores' sizes, single over sharded (above 1: the sharded one is smaller)
            size = single["report"]["stored_bytes"] / result["report"]["stored_bytes"]
            cells.append(f"{result['report']['compression_ratio']:>9.3f} {ratio:>6.3f} {size:>6.3f}")
            ok = ok and result["verified"]
        print(f"{name:>12} {rank:>4} {eps:>5} {single['report']['compression_ratio']:>9.3f} "
              f"{' '.join(cells)} {'ok' if ok else 'FAIL':>6}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--K", type=int, action="append", help="planted sizes (repeatable)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--quality", action="store_true", help="the quality table instead")
    parser.add_argument("--only", nargs="+", default=list(QUALITY), choices=list(QUALITY))
    parser.add_argument("--data-dir", default=os.path.join(HERE, "data"))
    args = parser.parse_args()
    os.makedirs(args.data_dir, exist_ok=True)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}")
    if args.quality:
        quality(args.only, (args.K or [100000])[0], args.data_dir)
    else:
        for K in args.K or [100000]:
            speed(K, args.shards, args.data_dir)


if __name__ == "__main__":
    main()
