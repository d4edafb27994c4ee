"""Scale benchmark: wall time, peak RSS, compression ratio and the read-pass time.

    python bench/scale.py --K 1000000            # the out-of-core target (builds the file once)
    python bench/scale.py --K 100000 --K 1000000 # near-linear check: seconds per matrix
    python bench/scale.py --K 20000 --modes in-memory out-of-core   # scalable vs exhaustive

Each run is `matclust cluster` in a subprocess (so its peak RSS is its own) at rank 8, eps 0.1,
incremental/residual, --memory-limit 1GiB, on K matrices of 32 x 16 float32 from 500 random
rank-6 subspaces plus 1% noise (bench/collections_builder.py). The planted partition's compression ratio
is computed from the stored planted labels with the paper's definition.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from collections_builder import planted  # noqa: E402
from runner import run_cluster  # noqa: E402

from matclust.report import paper_params  # noqa: E402
from matclust.sources import open_source  # noqa: E402


def planted_ratio(path: str, rank: int) -> float:
    with h5py.File(path, "r") as f:
        labels = f["planted_labels"][...]
        _, m, n = f["matrices"].shape
    sizes = np.bincount(labels)
    sizes = sizes[sizes > 0]
    total = sum(paper_params(rank, m, int(k) * n, int(k)) for k in sizes)
    return m * n * len(labels) / total


def read_pass_seconds(path: str) -> float:
    started = time.perf_counter()
    with open_source(path) as src:
        for _ in src.iter_batches():
            pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--K", type=int, action="append", help="collection sizes (repeatable)")
    parser.add_argument("--modes", nargs="+", default=["auto"])
    parser.add_argument("--memory-limit", default="1GiB")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "data"))
    args = parser.parse_args()
    os.makedirs(args.data_dir, exist_ok=True)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    header = f"{'K':>9} {'mode':>12} {'wall s':>8} {'us/matrix':>9} {'RSS MiB':>8} {'CR':>7} " \
             f"{'CR/planted':>10} {'read s':>7} {'wall/read':>9} {'verify':>6}"
    print(header)
    for K in args.K or [100000]:
        path = os.path.join(args.data_dir, f"planted_{K}.h5")
        if not os.path.exists(path):
            planted(path, K)
        reference = planted_ratio(path, args.rank)
        read_s = read_pass_seconds(path)
        for mode in args.modes:
            result = run_cluster(path, mode, args.rank, args.eps, memory_limit=args.memory_limit)
            rep = result["report"]
            print(f"{K:>9} {rep['params']['mode'] + ('' if mode != 'auto' else '*'):>12} "
                  f"{result['wall']:>8.1f} {1e6 * result['wall'] / K:>9.1f} "
                  f"{rep['peak_rss_mb']:>8.0f} {rep['compression_ratio']:>7.3f} "
                  f"{rep['compression_ratio'] / reference:>10.3f} {read_s:>7.1f} "
                  f"{result['wall'] / read_s:>9.1f} {'ok' if result['verified'] else 'FAIL':>6}",
                  flush=True)
    print("* auto mode; CR/planted: compression ratio over the planted partition's")


if __name__ == "__main__":
    main()
