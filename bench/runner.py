"""Run `matclust cluster` and `matclust verify` in subprocesses (each its own peak RSS).

The subprocesses may cache bytecode even where PYTHONDONTWRITEBYTECODE is set (as in some CI
sandboxes): an installed matclust has its .pyc files, and compiling every module again on each
run would add ~40 ms to every timing here.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time


@functools.cache
def _env() -> dict:
    """The subprocesses' environment, bytecode caching allowed; the cache is filled once."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", "import matclust.cli"], env=env, check=True)
    return env


def run_cluster(path: str, mode: str, rank: int, eps: float, dataset: str | None = None,
                memory_limit: str | None = None) -> dict:
    """Cluster ``path`` into a sibling result store; wall time, the report, verify's verdict."""
    out = os.path.join(os.path.dirname(os.path.abspath(path)),
                       os.path.basename(path).rsplit(".", 1)[0] + f".{mode}.result.h5")
    cmd = [sys.executable, "-m", "matclust", "cluster", path, "-o", out, "--rank", str(rank),
           "--eps", str(eps), "--mode", mode, "--overwrite", "--quiet", "--json"]
    if dataset:
        cmd += ["--dataset", dataset]
    if memory_limit:
        cmd += ["--memory-limit", memory_limit]
    env = _env()
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    verified = subprocess.run([sys.executable, "-m", "matclust", "verify", out, "--quiet"],
                              capture_output=True, env=env).returncode == 0
    return {"wall": wall, "report": json.loads(proc.stdout), "verified": verified}


def command_seconds(path: str, out: str, rank: int, eps: float, extra=(), src: str | None = None,
                    drop=()) -> float:
    """Wall seconds of one `matclust cluster` (``--overwrite --quiet`` and ``extra``), with
    ``src`` first on PYTHONPATH (another checkout) and the variables ``drop`` unset."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", *drop)}
    if src is not None:
        env["PYTHONPATH"] = src
    cmd = [sys.executable, "-m", "matclust", "cluster", path, "-o", out, "--rank", str(rank),
           "--eps", str(eps), "--overwrite", "--quiet", *extra]
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started
