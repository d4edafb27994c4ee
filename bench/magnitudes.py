"""A planted collection clustered at scales across each dtype's range, in memory and out of core:
whether the labels equal those at scale 1, the largest true error (recomputed by numpy on the
store and input rescaled by one power of two), and verify's verdict. Prints a Markdown table.

    python bench/magnitudes.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import read_store, run_inprocess, wide  # noqa: E402
from test_magnitude import EPS, K, M, MODES, N, RANK, SCALES, peak, rescaled, scaled  # noqa: E402

from matclust.collections_io import write_collection  # noqa: E402
from matclust.sample import planted_collection  # noqa: E402


def true_errors(store, mats):
    st = read_store(store)
    e = int(np.frexp(peak(mats))[1])
    out = []
    for cl in st.clusters:
        a = np.hstack([rescaled(wide(mats[i]), -e) for i in cl["members"]])
        b = rescaled(wide(cl["raw"]), -e) if "raw" in cl else \
            wide(cl["basis"]) @ rescaled(wide(cl["coefficients"]), -e)
        out.append(np.linalg.norm(a - b) / np.linalg.norm(a))
    return st, max(out)


def main() -> None:
    print("| dtype | scale | mode | labels equal | max true error | verify |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, scales in SCALES.items():
            base, _ = planted_collection(K, M, N, 4, RANK, 0.01, dtype, None, 0, 10.0)
            for mode in MODES:
                ref = None
                for scale in [1] + scales:
                    x = base if scale == 1 else scaled(base, dtype, scale)
                    path = os.path.join(tmp, f"{dtype}-{mode}-{scale}.h5")
                    write_collection(path, x, layout="stack", dataset="matrices")
                    run_inprocess("cluster", path, "-o", path + ".out.h5", "--rank", RANK, "--eps",
                                  EPS, "--mode", mode, "--json", check=0)
                    st, worst = true_errors(path + ".out.h5", list(x))
                    ref = st.labels if ref is None else ref
                    verdict = run_inprocess("verify", path + ".out.h5").returncode
                    label = scale if isinstance(scale, str) else f"{scale:.3g}"
                    print(f"| {dtype} | {label} | {mode} | {np.array_equal(st.labels, ref)} | "
                          f"{worst:.6f} | {'OK' if verdict == 0 else f'exit {verdict}'} |")


if __name__ == "__main__":
    main()
