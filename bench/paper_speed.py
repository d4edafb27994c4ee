"""The paper's `fit` against `MatrixClusterer(...).fit(X)`, side by side in one process.

    python bench/paper_speed.py --paper-src DIR [--only rgb minilm_10k gray pde] [--repeat 3]

DIR is a checkout of the paper's public code (github.com/mshamrai/concatenated-matrix-svd; not
shipped with matclust); its `src/clustering/approximate.py` is loaded from there, without the
package's `__init__` (which needs hdbscan). This script sets OPENBLAS_NUM_THREADS=1 before numpy
is imported: the paper's code is at its fastest with one BLAS thread (6-40x slower with two on
the 2-core VM), and matclust runs under the same setting here (its clustering loop is
single-threaded anyway; its residual scans would use a second thread in the CLI).

Per collection (built in bench/data on first use, see bench/compression.py), with its rank and
eps, both tools get the same in-memory collection: the paper's code a list of 2-D arrays (as
stored: float32 stays float32), matclust the same (K, m, n) array. Both run the incremental
estimator with the residual order, patience 10 and oversampling 5 (the paper's defaults).
Timed, alternately, `repeat` times each (the minimum is kept: this machine is shared):

* paper: `ApproximateClusterAlgorithm(eps, r_target=rank, sorting_strategy="residual").fit`;
* matclust paper setting: `MatrixClusterer(rank, eps, guarantee="cluster", encoding="plain")
  .fit(X)`, the paper's method and storage: the comparison the speed goal is about;
* matclust default: `guarantee="matrix", encoding="compact"` (every matrix within eps, the
  quantised store), for reference.

With ``--command``, also the whole `matclust cluster` command (default flags: read, cluster,
encode, write a store) in a subprocess with the machine's usual BLAS threads, timed alongside.

Printed: seconds, clusters, the compression ratio (the paper's definition, from each tool's
labels: params_S = min(r (m + N), m N) per cluster of two or more, m N per singleton), the
speed-up paper / matclust and the ratio of compression ratios matclust / paper. The default
setting's ratio is given from its report instead (its own-rank singletons and rounded numbers
are not in the paper's count).
"""

from __future__ import annotations

import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy is imported
os.environ.setdefault("TQDM_DISABLE", "1")  # the paper code's progress bars

import argparse  # noqa: E402
import importlib  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compression import COLLECTIONS, collection_path, only_dataset  # noqa: E402
from runner import command_seconds  # noqa: E402

from matclust import MatrixClusterer  # noqa: E402
from matclust.report import paper_params  # noqa: E402

DEFAULT = ["rgb", "minilm_10k", "gray", "pde"]


def paper_class(paper_src: str):
    """The paper's ApproximateClusterAlgorithm, loaded from its source folder."""
    package = types.ModuleType("paper_clustering")
    package.__path__ = [os.path.join(os.path.abspath(paper_src), "src", "clustering")]
    sys.modules["paper_clustering"] = package
    return importlib.import_module("paper_clustering.approximate").ApproximateClusterAlgorithm


def compression_ratio(labels: np.ndarray, widths: np.ndarray, m: int, rank: int) -> float:
    """The paper's compression ratio of a partition."""
    params = sum(paper_params(rank, m, int(widths[labels == c].sum()), int(np.sum(labels == c)))
                 for c in np.unique(labels))
    return m * int(widths.sum()) / params


def timed(fit) -> tuple[float, object]:
    started = time.perf_counter()
    result = fit()
    return time.perf_counter() - started, result


def whole_command(path: str, rank: int, eps: float) -> float:
    """Seconds of `matclust cluster` with its default flags, BLAS threads as usual."""
    with tempfile.TemporaryDirectory() as tmp:
        return command_seconds(path, os.path.join(tmp, "r.h5"), rank, eps,
                               drop=("OPENBLAS_NUM_THREADS",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper-src", required=True, help="checkout of the paper's code")
    parser.add_argument("--only", nargs="+", choices=list(COLLECTIONS), default=DEFAULT)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the minimum is kept")
    parser.add_argument("--command", action="store_true",
                        help="also time the whole `matclust cluster` command")
    args = parser.parse_args()
    approximate = paper_class(args.paper_src)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, numpy {np.__version__}, OPENBLAS_NUM_THREADS=1")
    print("| collection | paper fit s | matclust paper setting s | speed-up | CR paper / matclust | "
          "CR ratio | clusters paper / matclust | matclust default s | speed-up | default CR |"
          + (" command s | speed-up |" if args.command else ""))
    print("|---|---:|---:|---:|---|---:|---|---:|---:|---:|" + ("---:|---:|" if args.command else ""))
    for name in args.only:
        path = collection_path(name)
        if path is None:
            continue
        rank, eps = COLLECTIONS[name][3], COLLECTIONS[name][4]
        _, x = only_dataset(path)
        x = np.ascontiguousarray(x)
        blocks = [np.array(b) for b in x]
        widths = np.full(len(x), x.shape[2])
        runs = {"paper": [], "plain": [], "default": [], "command": []}
        for _ in range(args.repeat):
            seconds, paper = timed(lambda: approximate(
                eps=eps, r_target=rank, sorting_strategy="residual").fit(blocks))
            runs["paper"].append(seconds)
            seconds, plain = timed(lambda: MatrixClusterer(
                rank=rank, eps=eps, guarantee="cluster", encoding="plain").fit(x))
            runs["plain"].append(seconds)
            seconds, default = timed(lambda: MatrixClusterer(rank=rank, eps=eps).fit(x))
            runs["default"].append(seconds)
            if args.command:
                runs["command"].append(whole_command(path, rank, eps))
        best = {k: min(v) for k, v in runs.items() if v}
        m = x.shape[1]
        cr_paper = compression_ratio(np.asarray(paper.labels_), widths, m, rank)
        cr_plain = compression_ratio(plain.labels_, widths, m, rank)
        print(f"| {name} {x.shape[0]} x {m}x{x.shape[2]} {x.dtype}, r {rank}, eps {eps} | "
              f"{best['paper']:.3f} | {best['plain']:.3f} | {best['paper'] / best['plain']:.2f}x | "
              f"{cr_paper:.4f} / {cr_plain:.4f} | {cr_plain / cr_paper:.4f} | "
              f"{len(np.unique(paper.labels_))} / {plain.n_clusters_} | {best['default']:.3f} | "
              f"{best['paper'] / best['default']:.2f}x | {default.compression_ratio_:.4f} |"
              + (f" {best['command']:.2f} | {best['paper'] / best['command']:.1f}x |"
                 if args.command else ""), flush=True)


if __name__ == "__main__":
    main()
