"""Wall time of the whole `matclust cluster` command: this checkout's default (compact encoding,
per-matrix guarantee) against an older matclust, side by side.

    git worktree add --detach /tmp/matclust-old 74892c4     # version one
    python bench/encoding_time.py --old-src /tmp/matclust-old [--only gray rgb ...] [--runs 3]

Both run in subprocesses of this interpreter, one after the other in every round (these
machines drift, so only ratios measured side by side mean much); the older one with its source
folder first on PYTHONPATH. Also timed: this checkout with `--guarantee cluster --encoding
plain` (the paper's storage). Prints the median of each and the ratio new / old.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from compression import COLLECTIONS, DEFAULT_COLLECTIONS, collection_path  # noqa: E402
from runner import command_seconds  # noqa: E402


def timed(src: str, path: str, out: str, rank: int, eps: float, extra: list[str]) -> float:
    return command_seconds(path, out, rank, eps, extra, src=src)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-src", required=True, help="source folder of the older matclust")
    parser.add_argument("--only", nargs="+", choices=list(COLLECTIONS), default=DEFAULT_COLLECTIONS)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print("| collection | old (v1 default) s | new default s | new paper setting s | new / old |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            path = collection_path(name)
            if path is None:
                print(f"| {name} | n/a (its builder's package is missing) | | | |")
                continue
            rank, eps = COLLECTIONS[name][3], COLLECTIONS[name][4]
            times = {"old": [], "new": [], "paper": []}
            for _ in range(args.runs):
                times["old"].append(timed(os.path.abspath(args.old_src), path,
                                          os.path.join(tmp, "old.h5"), rank, eps, []))
                times["new"].append(timed(ROOT, path, os.path.join(tmp, "new.h5"), rank, eps, []))
                times["paper"].append(timed(ROOT, path, os.path.join(tmp, "paper.h5"), rank, eps,
                                            ["--guarantee", "cluster", "--encoding", "plain"]))
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {name} | {med['old']:.2f} | {med['new']:.2f} | {med['paper']:.2f} | "
                  f"{med['new'] / med['old']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
