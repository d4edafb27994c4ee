"""In-memory (the paper's exhaustive algorithm) against out-of-core, side by side in one run.

    python bench/modes.py INPUT --rank R --eps E [--dataset NAME] [--reference-seconds S]

Prints, per mode, the wall time of the whole `matclust cluster` command (read, cluster, bases,
write), the compression ratio, the number of clusters and whether `verify` passes, and the
ratio of the two. --reference-seconds prints the speed-up against a time measured elsewhere
(e.g. the paper's code's fit alone, as quoted in the out-of-core issue).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(__file__))
from runner import run_cluster  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("--dataset")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--eps", type=float, required=True)
    parser.add_argument("--reference-seconds", type=float)
    args = parser.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; "
          f"{args.input} rank {args.rank} eps {args.eps}")
    rows = {mode: run_cluster(args.input, mode, args.rank, args.eps, args.dataset)
            for mode in ("in-memory", "out-of-core")}
    print(f"{'mode':>12} {'K':>8} {'wall s':>8} {'clusters':>9} {'CR':>7} {'max err':>8} {'verify':>6}")
    for mode, r in rows.items():
        rep = r["report"]
        print(f"{mode:>12} {rep['K']:>8} {r['wall']:>8.2f} {rep['clusters']:>9} "
              f"{rep['compression_ratio']:>7.3f} {rep['max_error']:>8.4f} {'ok' if r['verified'] else 'FAIL':>6}")
    mem, ooc = rows["in-memory"], rows["out-of-core"]
    print(f"out-of-core / in-memory: time {ooc['wall'] / mem['wall']:.2f}, compression ratio "
          f"{ooc['report']['compression_ratio'] / mem['report']['compression_ratio']:.3f}")
    if args.reference_seconds:
        for mode, r in rows.items():
            print(f"{mode}: {args.reference_seconds / r['wall']:.1f}x faster than the reference "
                  f"{args.reference_seconds:.0f} s")


if __name__ == "__main__":
    main()
