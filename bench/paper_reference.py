"""The paper's own code against `matclust cluster`, side by side on this machine.

    python bench/paper_reference.py INPUT --paper-src DIR --rank R --eps E [--dataset NAME]
                                    [--repeat N]

DIR is a checkout of the paper's public code (github.com/mshamrai/concatenated-matrix-svd); it
is not shipped with matclust and this machine cannot fetch it, so point at a copy you have. Its
`ApproximateClusterAlgorithm` (the paper's incremental estimator) runs with the residual
ordering and its defaults (oversampling 5, patience 10, tol 1e-12) on the matrices as stored
(float32 stays float32, as its data readers give them). Only its `fit` is timed, in memory,
after the whole collection was read; matclust is timed as the whole `cluster` command in a
subprocess (start-up, read, cluster, exact bases, write), then verified.

Printed per tool: seconds, clusters, compression ratio (the paper's definition, computed here
from the labels for the paper's code), the largest true error e_r(S) of a cluster (exact SVD
of the concatenation) and how many clusters exceed eps. Then the speed-up and the ratio of
compression ratios, the two numbers the out-of-core issue asks about.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from runner import run_cluster  # noqa: E402

from matclust.engine.exact import exact_error  # noqa: E402
from matclust.report import paper_params  # noqa: E402
from matclust.sources import open_source  # noqa: E402


def load_blocks(path: str, dataset: str | None) -> list[np.ndarray]:
    with open_source(path, dataset) as source:
        batch = source.read_range(0, source.K)
        return [np.array(b, dtype=b.dtype) for b in batch.blocks()]


def paper_fit(paper_src: str, blocks: list[np.ndarray], rank: int, eps: float):
    sys.path.insert(0, os.path.abspath(paper_src))
    approximate = importlib.import_module("src.clustering.approximate")
    algo = approximate.ApproximateClusterAlgorithm(eps=eps, r_target=rank,
                                                   sorting_strategy="residual")
    started = time.perf_counter()
    algo.fit(blocks)
    return time.perf_counter() - started, np.asarray(algo.labels_)


def partition_quality(blocks: list[np.ndarray], labels: np.ndarray, rank: int, eps: float) -> dict:
    m = blocks[0].shape[0]
    total_columns = sum(b.shape[1] for b in blocks)
    params, worst, over = 0, 0.0, 0
    clusters = np.unique(labels)
    for c in clusters:
        members = [blocks[i] for i in np.flatnonzero(labels == c)]
        columns = sum(b.shape[1] for b in members)
        params += paper_params(rank, m, columns, len(members))
        if len(members) > 1:
            err = exact_error([b.astype(np.float64) for b in members], rank)
            worst = max(worst, err)
            over += err > eps
    return {"clusters": len(clusters), "compression_ratio": m * total_columns / params,
            "max_error": worst, "over_eps": over}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("--paper-src", required=True)
    parser.add_argument("--dataset")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--eps", type=float, required=True)
    parser.add_argument("--repeat", type=int, default=3, help="matclust runs; the median is used")
    args = parser.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, numpy "
          f"{np.__version__}; {args.input} rank {args.rank} eps {args.eps}")

    blocks = load_blocks(args.input, args.dataset)
    paper_seconds, labels = paper_fit(args.paper_src, blocks, args.rank, args.eps)
    paper = partition_quality(blocks, labels, args.rank, args.eps)

    runs = [run_cluster(args.input, "auto", args.rank, args.eps, args.dataset)
            for _ in range(args.repeat)]
    ours_seconds = statistics.median(r["wall"] for r in runs)
    report = runs[0]["report"]
    walls = ", ".join(f"{r['wall']:.2f}" for r in runs)

    print(f"{'tool':>28} {'seconds':>8} {'clusters':>9} {'CR':>7} {'max err':>8} {'over eps':>8}")
    print(f"{'paper code, fit only':>28} {paper_seconds:>8.2f} {paper['clusters']:>9} "
          f"{paper['compression_ratio']:>7.3f} {paper['max_error']:>8.4f} {paper['over_eps']:>8}")
    print(f"{'matclust cluster (whole)':>28} {ours_seconds:>8.2f} {report['clusters']:>9} "
          f"{report['compression_ratio']:>7.3f} {report['max_error']:>8.4f} {report['over_eps']:>8}"
          f"   runs {walls}; verify "
          f"{'ok' if all(r['verified'] for r in runs) else 'FAIL'}")
    print(f"speed-up {paper_seconds / ours_seconds:.1f}x; compression ratio "
          f"{report['compression_ratio'] / paper['compression_ratio']:.3f} of the paper code's")


if __name__ == "__main__":
    main()
