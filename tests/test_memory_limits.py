"""--memory-limit: malformed sizes are refused naming the option; a limit too small refuses
naming the smallest limit that works, and that limit does work within itself (peak RSS of the
whole child process)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from conftest import run_inprocess, write_planted


@pytest.mark.parametrize("size", ["1e999", "1.5.5G", "...", "nan", "-1", "0", "inf", "12 parsecs"])
@pytest.mark.parametrize("command", ["cluster", "verify", "reconstruct", "compare", "bounds"])
def test_bad_sizes_name_the_option(command, size, tmp_path):
    args = {"cluster": ["cluster", "in.h5", "-o", tmp_path / "o.h5", "--rank", 2, "--eps", 0.1],
            "verify": ["verify", "s.h5"], "reconstruct": ["reconstruct", "s.h5", "-o", tmp_path / "r.h5"],
            "compare": ["compare", "in.h5", "--rank", 2, "--eps", 0.1],
            "bounds": ["bounds", "in.h5", "--rank", 2, "-o", tmp_path / "b.csv"]}[command]
    res = run_inprocess(*args, "--memory-limit", size)
    assert res.returncode == 2 and res.stderr.startswith("error: --memory-limit:"), str(res)
    assert len(res.stderr.strip().splitlines()) == 1


def child_peak_mib(args) -> tuple[int, float, str]:
    """Exit code, peak RSS (MiB; NaN when unmeasurable) and stderr of ``python -m matclust
    ARGS``. Measured by /usr/bin/time: getrusage(RUSAGE_CHILDREN) would count the pages of this
    (large) test process that the child shares between fork and exec."""
    timer = ["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") else []
    proc = subprocess.run([*timer, sys.executable, "-m", "matclust", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return proc.returncode, int(peak.group(1)) / 1024 if peak else float("nan"), proc.stderr


def test_too_small_names_a_limit_that_works(tmp_path):
    inp, _, _ = write_planted(tmp_path / "in.h5", K=20000, m=32, n=16, subspaces=20, rank=4,
                              dtype="float32")  # 41 MB of matrices
    out = tmp_path / "out.h5"
    base = ["cluster", inp, "-o", out, "--rank", 4, "--eps", 0.1, "--quiet",
            "--mode", "out-of-core"]
    code, _, err = child_peak_mib([*base, "--memory-limit", "64MiB"])
    named = re.search(r"needs --memory-limit (\d+)MiB at least", err)
    assert code == 2 and named and not out.exists(), err
    limit = int(named.group(1))
    code, _, err = child_peak_mib([*base, "--memory-limit", f"{limit - 1}MiB"])
    assert code == 2, err  # the smallest: one MiB less is refused
    code, peak, err = child_peak_mib([*base, "--memory-limit", f"{limit}MiB"])
    assert code == 0, err
    assert math.isnan(peak) or peak <= limit, f"peak RSS {peak:.0f} MiB over the named limit {limit} MiB"
    code, peak, err = child_peak_mib(["verify", out, "--quiet", "--memory-limit", f"{limit}MiB"])
    assert code == 0 and (math.isnan(peak) or peak <= limit), (peak, err)


def test_more_clusters_than_reserved_stop_with_the_limit_for_all(tmp_path, monkeypatch):
    """The plan reserves memory for K/8 clusters (at least 65,536); a run that forms more stops
    with an error naming the limit for K clusters, and writes nothing."""
    import numpy as np

    from matclust import limits
    from matclust.api import MatrixClusterer
    from matclust.errors import InputError

    monkeypatch.setattr(limits, "MIN_RESERVED_CLUSTERS", 4)
    X = np.random.default_rng(0).standard_normal((64, 12, 4))  # unrelated: 64 singletons
    out = tmp_path / "o.h5"
    with pytest.raises(InputError, match=r"form more than 8 clusters.*needs --memory-limit \d+MiB"):
        MatrixClusterer(rank=2, eps=0.05).fit(X, out)
    assert not out.exists() and os.listdir(tmp_path) == []
