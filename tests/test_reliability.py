"""Reliability: atomic results under kill -9, --resume, the per-output lock, determinism.

Every run here is a real subprocess. Kills are either timed (a collection that takes a couple of
seconds) or injected at exact points of the commit (a small wrapper script that replaces one
function of matclust.store with one that SIGKILLs its own process), so "right around the
rename" is hit every time rather than by luck.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import PAPER, read_store, run_matclust, tree_digest, write_planted

RANK, EPS = 3, 0.05
BIG = dict(K=6000, m=24, n=6, subspaces=600, rank=3, noise=0.01, dtype="float32", seed=7)
SMALL = dict(K=150, m=12, n=4, subspaces=10, rank=3, noise=0.01, dtype="float64", seed=3)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _env():
    env = dict(os.environ)
    env.pop("FORCE_COLOR", None)
    return env


def spawn(*args, cwd) -> subprocess.Popen:
    """``python -m matclust ARGS`` started in the background."""
    return subprocess.Popen([sys.executable, "-m", "matclust", *map(str, args)], cwd=cwd,
                            env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def cluster_args(inp, out, *extra, eps=EPS):
    return ["cluster", *PAPER, inp, "-o", out, "--rank", RANK, "--eps", eps, "--quiet", *extra]


#: Runs the CLI after replacing one step of the commit with a SIGKILL of this very process.
INJECT = textwrap.dedent(r"""
    import os, signal, sys
    import matclust.store as store

    point, argv = sys.argv[1], sys.argv[2:]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "before-commit":            # everything written, 'complete' not yet set
        store.ResultWriter.commit = lambda self: die()
    elif point == "before-rename":          # complete, closed, not yet in place
        store.replace_atomically = lambda src, dst: die()
    elif point == "after-rename":           # in place; the run has not cleaned up yet
        real = store.replace_atomically
        def after(src, dst):
            real(src, dst)
            die()
        store.replace_atomically = after
    elif point == "after-exchange":         # directory swapped in; old one not yet removed
        real_exchange = store._exchange
        def exchange(a, b):
            ok = real_exchange(a, b)
            die()
        store._exchange = exchange
    elif point == "between-renames":        # no renameat2: old moved aside, new not yet in place
        store._exchange = lambda a, b: False
        real_replace = os.replace
        def replace(a, b):
            real_replace(a, b)
            if str(b).endswith(".old"):
                die()
        os.replace = replace
    else:
        raise SystemExit(f"unknown point {point}")

    from matclust.cli import main
    main(argv)
""")


def run_injected(point, args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", INJECT, point, *map(str, args)], cwd=cwd,
                          env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)


def verified(path) -> bool:
    """``matclust verify`` in process: every cluster within eps, the structure sound."""
    from matclust.verify import verify_store

    result = verify_store(path)
    assert result["ok"], result
    return True


def labels_of(path) -> np.ndarray:
    return read_store(path).labels


def stats_of(path) -> list:
    return read_store(path).report["cluster_stats"]


def hidden(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def assert_not_a_result(path, reference_labels, old_digest):
    """A leftover temporary is hidden and incomplete, or a whole store: the new result (killed
    between setting 'complete' and the rename) or the old one (killed after swapping it out)."""
    if os.path.isdir(path):
        try:
            import zarr

            attrs = dict(zarr.open_group(path, mode="r").attrs)
        except Exception:
            return
    else:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                attrs = dict(f.attrs)
        except Exception:
            return
    if attrs.get("complete") is True and tree_digest(path) != old_digest:
        np.testing.assert_array_equal(read_store_any(path).labels, reference_labels)


def read_store_any(path):
    """read_store for a temporary, whose name does not say HDF5 or Zarr."""
    if os.path.isdir(path):
        return read_store(path)
    link = path + ".h5"
    os.symlink(path, link)
    try:
        return read_store(link)
    finally:
        os.unlink(link)


def assert_intact_or_absent(out, old_digest, reference_labels, folder):
    """After a kill: OUTPUT is absent, the old complete one untouched, or the new complete one
    (after the rename) with the reference labels; nothing else looks like a result."""
    if os.path.lexists(out):
        if old_digest is not None and tree_digest(out) == old_digest:
            pass
        else:
            st = read_store(out)
            assert st.attrs.get("complete") is True
            np.testing.assert_array_equal(st.labels, reference_labels)
        assert verified(out)
    for name in hidden(folder):
        if ".matclust-tmp-" in name and not name.endswith(".old"):
            assert_not_a_result(os.path.join(folder, name), reference_labels, old_digest)


def read_ckpt(out, K):
    """What matclust.checkpoint.read_log finds in OUTPUT's checkpoint (None: no usable one)."""
    from matclust.checkpoint import read_log
    from matclust.store import hidden_sibling

    return read_log(hidden_sibling(out, "ckpt"), K)


def ckpt_entries(out, K):
    found = read_ckpt(out, K)
    return [] if found is None else found[1]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A collection taking a couple of seconds, its reference result, and an older result with
    other parameters (to be overwritten)."""
    folder = tmp_path_factory.mktemp("big")
    inp = str(folder / "big.h5")
    write_planted(inp, **BIG)
    ref = str(folder / "reference.h5")
    t0 = time.monotonic()
    run_matclust(*cluster_args(inp, ref), cwd=folder, check=0)
    seconds = time.monotonic() - t0
    old = str(folder / "old.h5")
    run_matclust(*cluster_args(inp, old, eps=0.2), cwd=folder, check=0)
    return {"folder": folder, "input": inp, "ref": ref, "old": old, "seconds": seconds,
            "labels": labels_of(ref), "stats": stats_of(ref)}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    inp = str(folder / "small.h5")
    write_planted(inp, **SMALL)
    refs = {}
    for ext in (".h5", ".zarr"):
        ref = str(folder / f"reference{ext}")
        run_matclust(*cluster_args(inp, ref), cwd=folder, check=0)
        old = str(folder / f"old{ext}")
        run_matclust(*cluster_args(inp, old, eps=0.3), cwd=folder, check=0)
        refs[ext] = (ref, old)
    return {"folder": folder, "input": inp, "refs": refs,
            "labels": labels_of(refs[".h5"][0])}


def copy_tree(src, dst):
    import shutil

    if os.path.isdir(src):
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)


# ---------------------------------------------------------------------------------------------
# 1. atomic results: timed kills
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("delay", [0.2, 0.5, 1.0, "late"])
def test_kill9_at_a_moment_leaves_old_output_or_none(big, tmp_path, delay):
    """kill -9 while overwriting: OUTPUT stays the previous complete store (or is the new one
    when the kill came after the rename); then --resume finishes with the reference labels and
    leaves nothing behind."""
    out = str(tmp_path / "out.h5")
    copy_tree(big["old"], out)
    old_digest = tree_digest(out)
    if delay == "late":  # close to the end: the commit is near
        delay = max(0.3, 0.9 * big["seconds"])
    proc = spawn(*cluster_args(big["input"], out, "--overwrite"), cwd=tmp_path)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert_intact_or_absent(out, old_digest, big["labels"], tmp_path)

    run_matclust(*cluster_args(big["input"], out, "--overwrite", "--resume"), cwd=tmp_path, check=0)
    np.testing.assert_array_equal(labels_of(out), big["labels"])
    assert stats_of(out) == big["stats"]
    assert hidden(tmp_path) == [], "leftovers after a successful run"


def test_kill9_when_writing_a_new_output(big, tmp_path):
    out = str(tmp_path / "fresh.h5")
    proc = spawn(*cluster_args(big["input"], out), cwd=tmp_path)
    time.sleep(max(0.6, 0.5 * big["seconds"]))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert_intact_or_absent(out, None, big["labels"], tmp_path)
    if not os.path.lexists(out):
        # leftovers are hidden, and a plain rerun (no --resume) cleans them up
        assert all(n.startswith(".fresh.h5.matclust-") for n in hidden(tmp_path))
        run_matclust(*cluster_args(big["input"], out), cwd=tmp_path, check=0)
        np.testing.assert_array_equal(labels_of(out), big["labels"])
    assert hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 1. atomic results: kills injected at exact points of the commit
# ---------------------------------------------------------------------------------------------
POINTS = ["before-commit", "before-rename", "after-rename"]
# a file replaces a file with one rename; a directory needs a swap (or, without renameat2, two)
CASES = [(p, ".h5") for p in POINTS] + \
    [(p, ".zarr") for p in POINTS + ["after-exchange", "between-renames"]]


@pytest.mark.parametrize("point,ext", CASES)
def test_kill9_around_the_rename(small, tmp_path, ext, point):
    ref, old = small["refs"][ext]
    out = str(tmp_path / f"out{ext}")
    copy_tree(old, out)
    old_digest = tree_digest(out)
    proc = run_injected(point, cluster_args(small["input"], out, "--overwrite"), tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    if point in ("before-commit", "before-rename"):
        assert tree_digest(out) == old_digest, "the old result changed before the rename"
    elif point == "between-renames":
        # The fallback without renameat2: the old store sits aside, no OUTPUT (allowed) ...
        assert not os.path.lexists(out)
        # ... and the next run on OUTPUT puts it back before anything else.
        res = run_matclust(*cluster_args(small["input"], out), cwd=tmp_path, check=2)
        assert "output exists" in res.stderr
        assert tree_digest(out) == old_digest
    else:  # after the rename / exchange: the new, complete result
        np.testing.assert_array_equal(labels_of(out), small["labels"])
    assert_intact_or_absent(out, old_digest, small["labels"], tmp_path)

    run_matclust(*cluster_args(small["input"], out, "--overwrite", "--resume"), cwd=tmp_path, check=0)
    np.testing.assert_array_equal(labels_of(out), small["labels"])
    assert verified(out)
    assert hidden(tmp_path) == []


def test_sigterm_unwinds_cleanly_and_keeps_the_checkpoint(big, tmp_path):
    out = str(tmp_path / "out.h5")
    proc = spawn(*cluster_args(big["input"], out), cwd=tmp_path)
    deadline = time.monotonic() + 60
    while len(ckpt_entries(out, BIG["K"])) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 143
    assert not os.path.lexists(out)
    assert hidden(tmp_path) == [".out.h5.matclust-ckpt"], "temporaries or lock left after SIGTERM"
    run_matclust(*cluster_args(big["input"], out, "--resume"), cwd=tmp_path, check=0)
    np.testing.assert_array_equal(labels_of(out), big["labels"])


# ---------------------------------------------------------------------------------------------
# 2. --resume
# ---------------------------------------------------------------------------------------------
def kill_once_checkpointed(args, out, K, n, cwd) -> tuple[int, int]:
    """Start ``matclust ARGS`` writing ``out`` (K matrices), kill -9 it once its checkpoint
    holds at least n clusters: its exit code and the clusters in the checkpoint then."""
    proc = spawn(*args, cwd=cwd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if len(ckpt_entries(out, K)) >= n:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return proc.returncode, len(ckpt_entries(out, K))


def kill_after_clusters(inp, out, n, cwd, *extra):
    """Start a run, kill -9 it once its checkpoint holds at least n clusters."""
    code, done = kill_once_checkpointed(cluster_args(inp, out, *extra), out, BIG["K"], n, cwd)
    if code == 0:
        pytest.skip("the run finished before it could be killed")
    return done


@pytest.mark.parametrize("ext", [".h5", ".zarr"])
def test_resume_after_kill_gives_the_uninterrupted_result(big, tmp_path, ext):
    out = str(tmp_path / f"out{ext}")
    done = kill_after_clusters(big["input"], out, 20, tmp_path)
    assert done >= 20 and not os.path.lexists(out)
    run_matclust(*cluster_args(big["input"], out, "--resume"), cwd=tmp_path, check=0)
    np.testing.assert_array_equal(labels_of(out), big["labels"])
    assert stats_of(out) == big["stats"]
    assert verified(out)
    assert hidden(tmp_path) == [], "checkpoint, lock or temporaries left after resuming"


def test_resume_ignores_a_torn_last_record(big, tmp_path):
    from matclust.store import hidden_sibling

    out = str(tmp_path / "out.h5")
    kill_after_clusters(big["input"], out, 10, tmp_path)
    ckpt = hidden_sibling(out, "ckpt")
    with open(ckpt, "rb") as fh:
        data = fh.read()
    # a kill mid-write: half of a further record, and a flipped byte in the last whole one
    with open(ckpt, "wb") as fh:
        fh.write(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:] + data[-40:-20])
    before = len(ckpt_entries(out, BIG["K"]))
    run_matclust(*cluster_args(big["input"], out, "--resume"), cwd=tmp_path, check=0)
    assert before >= 9
    np.testing.assert_array_equal(labels_of(out), big["labels"])
    assert stats_of(out) == big["stats"]


def test_resume_refuses_other_parameters_or_a_changed_input(big, tmp_path):
    import shutil

    inp = str(tmp_path / "input.h5")
    shutil.copyfile(big["input"], inp)
    out = str(tmp_path / "out.h5")
    kill_after_clusters(inp, out, 5, tmp_path)
    ckpt = os.path.join(tmp_path, ".out.h5.matclust-ckpt")
    before = tree_digest(ckpt)

    res = run_matclust(*cluster_args(inp, out, "--resume", eps=0.06), cwd=tmp_path, check=2)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "eps" in lines[0], res
    res = run_matclust(*cluster_args(inp, out, "--resume", "--order", "norm"), cwd=tmp_path, check=2)
    assert "order" in res.stderr
    st = os.stat(inp)
    os.utime(inp, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    res = run_matclust(*cluster_args(inp, out, "--resume"), cwd=tmp_path, check=2)
    assert "input" in res.stderr and "modified" in res.stderr, res
    # refusals leave the checkpoint for a correct --resume, and no output
    assert tree_digest(ckpt) == before and not os.path.lexists(out)
    # without --resume: starts over
    run_matclust(*cluster_args(inp, out), cwd=tmp_path, check=0)
    np.testing.assert_array_equal(labels_of(out), big["labels"])
    assert hidden(tmp_path) == []


#: Shards of a sharded run in the tests below (a few tenths of a second of planning each).
SHARDS = 8


def shard_plans_in(out) -> dict:
    found = read_ckpt(out, BIG["K"])
    return {} if found is None else found[3]


@pytest.fixture(scope="module")
def sharded(big):
    """An uninterrupted sharded run of the big collection (the reference)."""
    ref = str(big["folder"] / "sharded.h5")
    run_matclust(*cluster_args(big["input"], ref, "--shards", SHARDS), cwd=big["folder"],
                 check=0)
    return {"labels": labels_of(ref), "stats": stats_of(ref)}


def test_a_killed_sharded_run_resumes_from_the_shards_it_planned(big, sharded, tmp_path):
    """kill -9 once some shards' plans are in the checkpoint: `--resume` plans only the others
    (-v says how many it took) and writes the uninterrupted run's store; a resume with another
    shard count is refused, keeping the checkpoint."""
    out = str(tmp_path / "out.h5")
    proc = spawn(*cluster_args(big["input"], out, "--shards", SHARDS), cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and len(shard_plans_in(out)) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    planned = len(shard_plans_in(out))
    assert planned >= 2 and not os.path.lexists(out)

    res = run_matclust(*cluster_args(big["input"], out, "--shards", SHARDS // 2, "--resume"),
                       cwd=tmp_path, check=2)
    assert f"--shards {SHARDS}" in res.stderr  # the count to resume with
    assert len(shard_plans_in(out)) == planned

    res = run_matclust("-v", *cluster_args(big["input"], out, "--shards", SHARDS, "--resume"),
                       cwd=tmp_path, check=0)
    assert f"{planned} of {SHARDS} shard plans taken from the checkpoint" in res.stderr
    np.testing.assert_array_equal(labels_of(out), sharded["labels"])
    assert stats_of(out) == sharded["stats"]
    assert verified(out)
    assert hidden(tmp_path) == [], "checkpoint, lock or temporaries left after resuming"


#: An append whose new matrices come from subspaces the store has not seen, so that they are
#: clustered among themselves for a couple of seconds: long enough to be killed midway.
APPEND_FIRST = dict(K=600, m=24, n=6, subspaces=60, rank=3, noise=0.01, dtype="float32", seed=11)
APPEND_SECOND = {**BIG, "seed": 12}


@pytest.fixture(scope="module")
def appended(tmp_path_factory):
    """A store of APPEND_FIRST, the second input, and the store grown by an uninterrupted
    append (the reference)."""
    folder = tmp_path_factory.mktemp("appended")
    first, second = str(folder / "first.h5"), str(folder / "second.h5")
    write_planted(first, **APPEND_FIRST)
    write_planted(second, **APPEND_SECOND)
    store = str(folder / "store.h5")
    run_matclust("cluster", first, "-o", store, "--rank", RANK, "--eps", EPS, "--quiet",
                 cwd=folder, check=0)
    grown = str(folder / "grown.h5")
    shutil.copyfile(store, grown)
    run_matclust("append", grown, second, "--quiet", cwd=folder, check=0)
    return {"store": store, "second": second, "grown": grown}


def kill_append_after_clusters(store, second, n, cwd):
    """Start an append, kill -9 it once its checkpoint holds at least n clusters."""
    code, done = kill_once_checkpointed(["append", store, second, "--quiet"], store,
                                        APPEND_SECOND["K"], n, cwd)
    assert code == -signal.SIGKILL, "the append finished before it could be killed"
    return done


def test_append_resumes_after_kill(appended, tmp_path):
    """kill -9 while the new matrices are clustered among themselves: the store is untouched,
    the checkpoint holds the clusters formed so far, and `append --resume` continues from them
    to exactly the store an uninterrupted append grows (every label and decoded matrix)."""
    from conftest import decode_compact

    store = str(tmp_path / "store.h5")
    shutil.copyfile(appended["store"], store)
    before = tree_digest(store)
    done = kill_append_after_clusters(store, appended["second"], 20, tmp_path)
    assert done >= 20
    assert tree_digest(store) == before, "a killed append changed the store"
    res = run_matclust("-v", "append", store, appended["second"], "--resume", "--quiet",
                       cwd=tmp_path, check=0)
    resumed = re.search(r"resuming from \S+: (\d+) clusters formed before", res.stderr)
    assert resumed and int(resumed.group(1)) >= done, res.stderr
    _, labels, decoded = decode_compact(store)
    _, ref_labels, ref_decoded = decode_compact(appended["grown"])
    np.testing.assert_array_equal(labels, ref_labels)
    assert len(decoded) == len(ref_decoded)
    for a, b in zip(decoded, ref_decoded):
        np.testing.assert_array_equal(a, b)
    assert verified(store)
    assert hidden(tmp_path) == [], "checkpoint, lock or temporaries left after resuming"


def test_append_resume_refuses_another_input(appended, tmp_path):
    """A checkpoint left by an append of one input is not continued by an append of another
    (exit 2, the checkpoint kept, the store untouched); a plain append starts over."""
    store = str(tmp_path / "store.h5")
    shutil.copyfile(appended["store"], store)
    before = tree_digest(store)
    kill_append_after_clusters(store, appended["second"], 5, tmp_path)
    other = str(tmp_path / "other.h5")
    write_planted(other, **{**APPEND_SECOND, "K": 3000, "seed": 13})
    res = run_matclust("append", store, other, "--resume", "--quiet", cwd=tmp_path, check=2)
    assert "cannot resume from the checkpoint" in res.stderr
    assert tree_digest(store) == before
    assert ".store.h5.matclust-ckpt" in hidden(tmp_path)
    run_matclust("append", store, appended["second"], "--quiet", cwd=tmp_path, check=0)
    assert hidden(tmp_path) == []
    np.testing.assert_array_equal(labels_of(store), labels_of(appended["grown"]))


def test_resume_without_checkpoint_runs_normally(small, tmp_path):
    out = str(tmp_path / "out.h5")
    run_matclust(*cluster_args(small["input"], out, "--resume"), cwd=tmp_path, check=0)
    np.testing.assert_array_equal(labels_of(out), small["labels"])
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("mode", ["in-memory", "out-of-core"])
def test_resume_through_the_api(small, tmp_path, mode):
    """In process: a checkpoint left by an interrupted fit is continued by fit(resume=True);
    out of core, the checkpoint records the clusters planned on the summaries."""
    import matclust
    from matclust.sources import open_source

    out = str(tmp_path / "api.h5")
    with open_source(small["input"]) as src:
        expected = matclust.MatrixClusterer(guarantee="cluster", encoding="plain", rank=RANK, eps=EPS, mode=mode).fit(
            src, str(tmp_path / "uninterrupted.h5")).labels_

    class Interrupt(Exception):
        pass

    class StopAfter:
        def __init__(self, n):
            self.n, self.seen = n, 0

        def start(self, phase, total):
            self.phase = phase

        def advance(self, n=1):
            if self.phase == "clustering":
                self.seen += 1
                if self.seen > self.n:
                    raise Interrupt

    with open_source(small["input"]) as src:
        with pytest.raises(Interrupt):
            matclust.MatrixClusterer(guarantee="cluster", encoding="plain", rank=RANK, eps=EPS, mode=mode).fit(
                src, out, progress=StopAfter(4))
    assert not os.path.lexists(out)
    assert len(ckpt_entries(out, SMALL["K"])) >= 4
    with open_source(small["input"]) as src:
        fitted = matclust.MatrixClusterer(guarantee="cluster", encoding="plain", rank=RANK, eps=EPS, mode=mode).fit(src, out, resume=True)
    np.testing.assert_array_equal(fitted.labels_, expected)
    if mode == "in-memory":
        np.testing.assert_array_equal(fitted.labels_, small["labels"])
    assert [p for p in hidden(tmp_path) if "uninterrupted" not in p] == []


# ---------------------------------------------------------------------------------------------
# 3. the lock
# ---------------------------------------------------------------------------------------------
#: Holds OUTPUT's lock the way a running `matclust cluster` does, until killed: the race with a
#: real run depends on how fast that run is, this does not.
HOLD_LOCK = textwrap.dedent(r"""
    import sys, time
    from matclust.checkpoint import OutputGuard
    with OutputGuard(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_second_run_on_the_same_output_exits_2(big, tmp_path):
    out = str(tmp_path / "out.h5")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, out], cwd=tmp_path, env=_env(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = run_matclust(*cluster_args(big["input"], out), cwd=tmp_path)
        third = run_matclust(*cluster_args(big["input"], out, "--overwrite", "--resume"), cwd=tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    for res in (second, third):
        assert res.returncode == 2, res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res
        assert lines[0] == f"error: {out} is being written by another matclust run (pid {holder.pid})"
    # kill -9 released the lock: the next run goes ahead (and cleans up after the dead one)
    run_matclust(*cluster_args(big["input"], out, "--resume"), cwd=tmp_path, check=0)
    np.testing.assert_array_equal(labels_of(out), big["labels"])
    assert hidden(tmp_path) == []


def test_lock_in_process(small, tmp_path):
    import matclust
    from matclust.checkpoint import OutputGuard
    from matclust.errors import InputError

    out = str(tmp_path / "out.zarr")
    X = np.random.default_rng(0).standard_normal((10, 6, 2))
    with OutputGuard(out):
        with pytest.raises(InputError, match=f"pid {os.getpid()}"):
            matclust.MatrixClusterer(guarantee="cluster", encoding="plain", rank=2, eps=0.3).fit(X, out)
        assert not os.path.lexists(out)
    matclust.MatrixClusterer(guarantee="cluster", encoding="plain", rank=2, eps=0.3).fit(X, out)  # released
    assert os.path.isdir(out) and hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 4. determinism
# ---------------------------------------------------------------------------------------------
def _timeless(report: dict) -> dict:
    """The report without what depends on the run's timing: its seconds and peak memory, and
    the store's size on disk (it holds the report, whose digits for those vary)."""
    sized = ("file_bytes", "bytes_ratio") + (
        ("stored_bytes",) if report.get("encoding") == "compact" else ())
    return {k: v for k, v in report.items() if k not in ("seconds", "peak_rss_mb", *sized)}


@pytest.mark.parametrize("method,order,ext", [("incremental", "residual", ".h5"),
                                              ("residual", "norm", ".zarr"),
                                              ("weyl", "residual", ".h5")])
def test_same_input_same_result(small, tmp_path, method, order, ext):
    runs = []
    for k in range(2):
        out = str(tmp_path / f"run{k}{ext}")
        run_matclust(*cluster_args(small["input"], out, "--method", method, "--order", order),
                     cwd=tmp_path, check=0)
        runs.append(read_store(out))
    a, b = runs
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.report["cluster_stats"] == b.report["cluster_stats"]
    assert _timeless(a.report) | {"params": None} == _timeless(b.report) | {"params": None}
    assert {k: v for k, v in a.params.items() if k != "input"} == \
        {k: v for k, v in b.params.items() if k != "input"}
    for ca, cb in zip(a.clusters, b.clusters):
        assert sorted(ca) == sorted(cb)
        for key in ca:
            np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)


def test_api_is_deterministic_in_process():
    import matclust

    rng = np.random.default_rng(5)
    base = np.linalg.qr(rng.standard_normal((10, 3)))[0]
    X = np.stack([base @ rng.standard_normal((3, 4)) + 0.01 * rng.standard_normal((10, 4))
                  for _ in range(80)])
    fits = [matclust.MatrixClusterer(guarantee="cluster", encoding="plain", rank=3, eps=0.05).fit(X) for _ in range(2)]
    np.testing.assert_array_equal(fits[0].labels_, fits[1].labels_)
    assert fits[0].cluster_stats_ == fits[1].cluster_stats_
    assert json.dumps(_timeless(fits[0].report_)) == json.dumps(_timeless(fits[1].report_))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_dropped_sigterm_is_raised_again_at_the_next_step(monkeypatch):
    """Python prints and drops an exception raised by a signal handler that lands in a weakref
    callback or finalizer; the run must still stop at its next progress step (seen: exit 0
    and a complete result after SIGTERM, about 1 run in 40)."""
    import weakref

    from matclust import progress

    monkeypatch.setattr(progress, "_terminated_by", None)

    class Thing:
        pass

    thing = Thing()
    weakref.finalize(thing, progress.terminate, signal.SIGTERM)
    del thing  # the finalizer raises SystemExit, which Python reports and drops
    bar = progress.RichProgress(enabled=False)
    with pytest.raises(SystemExit) as exc:
        bar.advance(1)
    assert exc.value.code == 128 + signal.SIGTERM
