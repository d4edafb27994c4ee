"""Peak resident memory of each command against --memory-limit (long: big collections).

    python bench/limits.py /tmp/p250k.h5 --limits 256MiB 696MiB 1GiB

For every limit: cluster, verify, reconstruct, compare and bounds on the collection, each under
/usr/bin/time -v; prints command, limit, peak RSS ("Maximum resident set size") and exit code,
and the refusal line when a limit is too small. Build the collection first with
`python bench/collections_builder.py planted --K 250000 -o /tmp/p250k.h5`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def measured(args: list[str]) -> tuple[int, float, str]:
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "matclust", *args],
                          capture_output=True, text=True)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return proc.returncode, int(peak.group(1)) / 1024 if peak else float("nan"), " ".join(errors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("--limits", nargs="+", default=["256MiB", "1GiB"])
    parser.add_argument("--rank", default="6")
    parser.add_argument("--eps", default="0.05")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(opts.input))) as tmp:
        store, rebuilt, csv = (os.path.join(tmp, n) for n in ("s.h5", "r.h5", "b.csv"))
        print(f"{'command':12s} {'limit':>8s} {'peak MiB':>9s} exit  message")
        for limit in opts.limits:
            commands = {
                "cluster": ["cluster", opts.input, "-o", store, "--rank", opts.rank, "--eps",
                            opts.eps, "--quiet", "--overwrite"],
                "verify": ["verify", store, "--quiet"],
                "reconstruct": ["reconstruct", store, "-o", rebuilt, "--overwrite"],
                "compare": ["compare", opts.input, "--rank", opts.rank, "--eps", opts.eps,
                            "--methods", "incremental/residual", "--quiet", "--json"],
                "bounds": ["bounds", opts.input, "--rank", opts.rank, "--sizes", "2:20:6",
                           "--trials", "3", "-o", csv, "--quiet", "--overwrite"],
            }
            for name, args in commands.items():
                if name in ("verify", "reconstruct") and not os.path.exists(store):
                    continue
                code, peak, message = measured([*args, "--memory-limit", limit])
                print(f"{name:12s} {limit:>8s} {peak:9.0f} {code:4d}  {message}", flush=True)


if __name__ == "__main__":
    main()
