"""Sharded and distributed runs (matclust/stages.py, matclust/distributed.py): the guarantee at
1, 2 and 8 shards recomputed from the input, the same labels in this process, on a local Dask
cluster and on a real one started here, and a run that survives a worker killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import PAPER, check_compact, read_store, run_inprocess, write_planted
from matclust.distributed import InProcess
from test_out_of_core import check_out_of_core_store

pytest.importorskip("dask.distributed")

RANK, EPS = 3, 0.1


def _labels(store) -> np.ndarray:
    return read_store(store).labels if read_store(store).attrs.get("format") == "matclust/1" \
        else _compact_labels(store)


def _compact_labels(store) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(str(store), mode="r")["labels"][...])


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Clusters planted across the whole index range (each shard sees every subspace), with
    magnitudes spread over a decade and noise near eps, so shards' clusters must be merged and
    some members leave their cluster when stored."""
    path = tmp_path_factory.mktemp("dist") / "planted.h5"
    return write_planted(path, K=480, m=12, n=4, subspaces=5, rank=2, noise=0.03, seed=3,
                         dtype="float32")


@pytest.mark.parametrize("shards", [1, 2, 8])
@pytest.mark.parametrize("paper", [False, True], ids=["default", "paper"])
def test_guarantee_holds_at_every_shard_count(collection, tmp_path, shards, paper):
    path, mats, _ = collection
    out = tmp_path / "out.zarr"
    mode = PAPER if paper else ()
    result = run_inprocess("cluster", path, "-o", out, "--rank", RANK, "--eps", EPS,
                           "--shards", shards, *mode, "--json", check=0)
    report = result.json()
    assert report["params"]["shards"] == shards
    assert report["stages"]["shards"] == shards
    assert report["stages"]["summaries_merged"] >= shards  # each shard's clusters were merged
    if paper:
        check_out_of_core_store(out, path, rank=RANK, eps=EPS)
    else:
        check_compact(out, mats, EPS, "matrix")
    # Sharding costs little here: the merge joins the shards' parts of each planted cluster.
    single = run_inprocess("cluster", path, "-o", tmp_path / "one.zarr", "--rank", RANK, "--eps",
                           EPS, "--mode", "out-of-core", *mode, "--json", check=0).json()
    assert report["compression_ratio"] >= 0.9 * single["compression_ratio"]


def _arrays(store) -> dict:
    import zarr

    root = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(root[name][...]) for name in root.array_keys()}


@pytest.mark.parametrize("cplx", [False, True])
def test_a_shard_plan_reads_back_from_its_checkpoint_bytes_exactly(cplx):
    """What a checkpoint keeps of a shard's plan (matclust.stages.plan_bytes) reads back with
    every field equal, of the same type (arrays: same dtype), a bound not evaluated still None,
    and a plan without clusters too."""
    from dataclasses import fields, replace

    from matclust.stages import ClusterSummary, ShardPlan, plan_bytes, plan_from_bytes

    rng = np.random.default_rng(5)

    def summary(width):
        standin = rng.standard_normal((7, width))
        if cplx:
            standin = standin + 1j * rng.standard_normal((7, width))
        return ClusterSummary(rng.integers(0, 1000, 4), 12, float(rng.random()), standin,
                              1e-9, None, False, -3, True, 17, 0.25)

    clusters = [summary(3), replace(summary(1), bound=0.07, apart=True, grew=False)]
    plan = ShardPlan(100, clusters, rng.random(50), rng.integers(-4, 4, 50),
                     rng.random(50) < 0.2, 1.5)
    empty = ShardPlan(0, [], np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
    for original in (plan, empty):
        back = plan_from_bytes(plan_bytes(original))
        pairs = [(f.name, getattr(original, f.name), getattr(back, f.name))
                 for f in fields(ShardPlan) if f.name != "clusters"]
        assert len(back.clusters) == len(original.clusters)
        for a, b in zip(original.clusters, back.clusters):
            pairs += [(f.name, getattr(a, f.name), getattr(b, f.name))
                      for f in fields(ClusterSummary)]
        for name, a, b in pairs:
            if isinstance(a, np.ndarray):
                assert b.dtype == a.dtype and np.array_equal(a, b), name
            else:
                assert type(b) is type(a) and b == a, name


def test_a_sharded_run_resumes_on_workers_from_the_plans_it_checkpointed(collection, tmp_path,
                                                                        monkeypatch):
    """A sharded run that fails once its shards are planned keeps every shard's plan in its
    checkpoint (matclust.checkpoint); `--resume` on two Dask workers makes none of them again
    (the workers get them from the client) and writes the store of an uninterrupted run,
    array for array."""
    import matclust.stages
    from matclust.checkpoint import read_log
    from matclust.store import hidden_sibling

    path, mats, _ = collection
    args = ("--rank", RANK, "--eps", EPS, "--shards", 4, "--quiet")
    run_inprocess("cluster", path, "-o", tmp_path / "whole.zarr", *args, check=0)

    def merge_fails(*_):
        raise RuntimeError("merge failed")

    monkeypatch.setattr(matclust.stages, "merge_summaries", merge_fails)
    out = tmp_path / "out.zarr"
    failed = run_inprocess("cluster", path, "-o", out, *args)
    assert failed.returncode == 1 and "merge failed" in failed.stderr
    monkeypatch.undo()
    assert not os.path.lexists(out)
    header, entries, _, plans = read_log(hidden_sibling(str(out), "ckpt"), len(mats))
    assert sorted(plans) == [0, 1, 2, 3] and entries == []
    assert header["params"]["shards"] == 4

    resumed = _run("-v", "cluster", path, "-o", out, *args, "--workers", 2, "--resume")
    assert "4 of 4 shard plans taken from the checkpoint" in resumed.stderr
    whole, grown = _arrays(tmp_path / "whole.zarr"), _arrays(out)
    assert sorted(grown) == sorted(whole)
    for name, values in whole.items():
        assert np.array_equal(grown[name], values), f"{name} differs"
    assert not os.path.lexists(hidden_sibling(str(out), "ckpt"))


def test_same_shards_same_store_in_process_and_on_workers(collection, tmp_path, monkeypatch):
    """The store's content does not depend on where the shards' codes were made or how they
    were written: in this process, on two workers, and in code chunks so small that the
    writer hands it dozens of them in the background (matclust.format2.FLUSH_CHUNKS at a
    time), every array holds the same values, and every matrix decodes within eps."""
    import matclust.format2

    path, mats, _ = collection
    args = ("--rank", RANK, "--eps", EPS, "--shards", 4, "--quiet")
    run_inprocess("cluster", path, "-o", tmp_path / "here.zarr", *args, check=0)
    _run("cluster", path, "-o", tmp_path / "there.zarr", *args, "--workers", 2)
    monkeypatch.setattr(matclust.format2, "CODE_CHUNK", 64)
    run_inprocess("cluster", path, "-o", tmp_path / "chunked.zarr", *args, check=0)
    here = _arrays(tmp_path / "here.zarr")
    assert len(here["codes"]) > 20 * 64 * matclust.format2.FLUSH_CHUNKS  # many appends
    for other in ("there.zarr", "chunked.zarr"):
        arrays = _arrays(tmp_path / other)
        assert sorted(arrays) == sorted(here)
        for name, values in here.items():
            assert np.array_equal(arrays[name], values), f"{other}: {name} differs"
    import zarr

    assert zarr.open_group(str(tmp_path / "chunked.zarr"), mode="r")["codes"].chunks == (64,)
    for store in ("here.zarr", "there.zarr", "chunked.zarr"):
        check_compact(tmp_path / store, mats, EPS, "matrix")


def test_codes_written_by_the_tasks_make_the_same_store(tmp_path, monkeypatch):
    """Where the runner keeps results on its workers, the encoding tasks write the store's
    code chunks themselves and the client only the chunks two shards share
    (matclust.stages.ShardCodes). With code chunks of 64 values (dozens shared by shards),
    matrices stored alone by the client between the tasks' codes, and the pool of those
    flushed early because codes wait behind it (sinks.PENDING_MATRICES), every array is the
    one the client writes itself: with the tasks in this process, with workers that do not
    see the store (every code comes back to the client), and on two worker processes."""
    import zarr

    import matclust.distributed
    import matclust.format2
    import matclust.sinks
    import matclust.stages

    path, mats, _ = write_planted(tmp_path / "noisy.h5", K=480, m=12, n=4, subspaces=5, rank=2,
                                  noise=0.1, seed=3, dtype="float32")
    monkeypatch.setattr(matclust.format2, "CODE_CHUNK", 64)
    monkeypatch.setattr(matclust.sinks, "PENDING_MATRICES", 8)
    early = []
    flush_pool = matclust.sinks.CompactSink.flush_pool

    def spied(sink):
        early.append(len(sink.pool) < matclust.sinks.ALONE_BATCH and sink.out.waiting > 8)
        return flush_pool(sink)

    monkeypatch.setattr(matclust.sinks.CompactSink, "flush_pool", spied)
    args = ("--rank", RANK, "--eps", EPS, "--shards", 4, "--quiet")
    run_inprocess("cluster", path, "-o", tmp_path / "client.zarr", *args, check=0)
    assert any(early)  # some matrices were stored alone while later codes waited
    monkeypatch.setattr(matclust.distributed.InProcess, "keeps_results", True)
    placed = []
    start = matclust.stages.ShardCodes.start
    monkeypatch.setattr(matclust.stages.ShardCodes, "start",
                        lambda self, *a: placed.append(1) or start(self, *a))
    run_inprocess("cluster", path, "-o", tmp_path / "tasks.zarr", *args, check=0)
    open_codes = matclust.stages._open_codes
    monkeypatch.setattr(matclust.stages, "_open_codes", lambda where: None)
    run_inprocess("cluster", path, "-o", tmp_path / "unseen.zarr", *args, check=0)
    monkeypatch.setattr(matclust.stages, "_open_codes", open_codes)
    run_inprocess("cluster", path, "-o", tmp_path / "workers.zarr", *args, "--workers", 2,
                  check=0)
    assert len(placed) == 3
    client = _arrays(tmp_path / "client.zarr")
    assert len(client["codes"]) > 20 * 64
    for other in ("tasks.zarr", "unseen.zarr", "workers.zarr"):
        arrays = _arrays(tmp_path / other)
        assert sorted(arrays) == sorted(client)
        for name, values in client.items():
            assert np.array_equal(arrays[name], values), f"{other}: {name} differs"
        assert zarr.open_group(str(tmp_path / other), mode="r")["codes"].chunks == (64,)
    check_compact(tmp_path / "workers.zarr", mats, EPS, "matrix")


def assert_failed_for_room_keeping_the_plans(result, folder) -> None:
    """A sharded run of 4 shards writing ``folder``/out.zarr failed for lack of room: exit 1,
    one error line naming the store and the full disk, and nothing left but the checkpoint of
    the shards' plans, which that line names for --resume."""
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "out.zarr" in lines[0]
    assert "no space" in lines[0].lower(), lines[0]
    assert "4 shard plans" in lines[0] and "--resume" in lines[0], lines[0]
    assert sorted(os.listdir(folder)) == [".out.zarr.matclust-ckpt"]


def test_a_full_disk_while_the_tasks_write_codes_leaves_only_the_plans(collection, tmp_path,
                                                                      monkeypatch):
    """A code-writing task that finds no room fails the run with one error line (exit 1),
    and no store, finished or not, is left behind: only the checkpoint of the shards' plans,
    which the message names for --resume."""
    import errno

    import matclust.distributed
    import matclust.format2
    import matclust.stages

    path, _, _ = collection

    class Full:
        def __setitem__(self, key, value):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matclust.format2, "CODE_CHUNK", 64)  # the tasks write whole chunks
    monkeypatch.setattr(matclust.distributed.InProcess, "keeps_results", True)
    monkeypatch.setattr(matclust.stages, "_open_codes", lambda where: Full())
    out = tmp_path / "out.zarr"
    result = run_inprocess("cluster", path, "-o", out, "--rank", RANK, "--eps", EPS,
                           "--shards", 4, "--quiet")
    assert_failed_for_room_keeping_the_plans(result, tmp_path)


class _ThreadRunner(InProcess):
    """Tasks in threads of this process, running while the client goes on (as on workers),
    their results kept until gathered (as InProcess gathers): a stand-in for a Dask cluster
    whose tasks a test can slow down."""

    keeps_results, workers = True, 2

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(16)  # tasks wait for earlier ones: no deadlock

    @staticmethod
    def _resolved(arg):
        from concurrent.futures import Future

        if isinstance(arg, Future):
            return arg.result()
        return [_ThreadRunner._resolved(a) for a in arg] if isinstance(arg, list) else arg

    def submit(self, fn, *args):
        return self.pool.submit(lambda: fn(*(self._resolved(a) for a in args)))

    def scatter(self, value):
        from concurrent.futures import Future

        handle = Future()
        handle.set_result(value)
        return handle

    def wait(self, handles) -> None:
        from concurrent.futures import wait

        wait(list(handles))

    def close(self) -> None:
        self.pool.shutdown()

    def describe(self) -> str:
        return "threads"


def test_a_full_disk_while_the_client_writes_beside_the_tasks_leaves_only_the_plans(
        collection, tmp_path, monkeypatch):
    """The client writes the store's other arrays while the tasks write the codes: when that
    finds no room, the run fails with one error line (exit 1), and no store, finished or
    not, is left behind (only the checkpoint of the shards' plans): the client waits for the
    tasks before removing the unfinished store (a chunk written after that would bring its
    directory back)."""
    import errno

    import matclust.distributed
    import matclust.format2
    import matclust.stages

    path, _, _ = collection
    started = []
    write_arrays, open_codes = matclust.format2.CompactWriter._write_arrays, \
        matclust.stages._open_codes

    def full(writer, names):
        if writer.writer is None:  # a recluster's, in memory
            return write_arrays(writer, names)
        started.append(writer._placer is not None)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class Slow:  # the tasks' codes array, written late
        def __init__(self, array):
            self.array = array

        def __setitem__(self, key, value):
            time.sleep(0.3)
            self.array[key] = value

    monkeypatch.setattr(matclust.format2, "CODE_CHUNK", 64)  # the tasks write whole chunks
    monkeypatch.setattr(matclust.format2.CompactWriter, "_write_arrays", full)
    monkeypatch.setattr(matclust.stages, "_open_codes", lambda where: Slow(open_codes(where)))
    monkeypatch.setattr(matclust.distributed, "make_runner", lambda *a: _ThreadRunner())
    out = tmp_path / "out.zarr"
    result = run_inprocess("cluster", path, "-o", out, "--rank", RANK, "--eps", EPS,
                           "--shards", 4, "--workers", 2, "--quiet")
    assert started == [True]  # the tasks were writing codes
    assert_failed_for_room_keeping_the_plans(result, tmp_path)


def test_a_writer_placing_codes_elsewhere_keeps_the_order_of_one_holding_them():
    """The client's leftover pool is flushed early when codes wait behind it
    (``CompactWriter.waiting``): a writer whose codes are placed elsewhere counts the waiting
    matrices as one that holds the codes does, after every part (or every run of parts added
    at once), whatever order the parts come in; the labels, exponents and statistics (sums
    in the same order) are the same too."""
    from dataclasses import replace

    from matclust.format2 import CompactWriter, PartCodes, PartTotals

    rng = np.random.default_rng(7)
    K, m, rank = 3000, 6, 2
    widths = rng.integers(1, 4, K)
    writers = [CompactWriter(None, K, m, widths, False, np.uint16, np.float32) for _ in range(3)]
    for w in writers[1:]:
        w.place_codes_elsewhere(placer=None)  # no store: finish() writes nothing
    labels = rng.integers(0, 5, K)
    for w in writers:
        for c in range(5):
            w.new_cluster(rng.standard_normal((m, rank)) if c else None)
    # Parts of held windows (members of one cluster within a window), the windows in order,
    # the clusters in a random order within each, some windows' matrices kept back to the end.
    order, late = [], []
    for lo in range(0, K, 250):
        window = np.arange(lo, min(lo + 250, K))
        back = window[rng.random(len(window)) < 0.02]
        late.append(back)
        window = np.setdiff1d(window, back)
        order += [window[labels[window] == c] for c in rng.permutation(5)]
    late = np.concatenate(late)
    order += [late[labels[late] == c] for c in range(5)]
    # The third writer takes the parts in runs of a few at once (PartTotals), the waiting
    # matrices compared at the end of each run.
    run: list = []
    for members in order + [None]:
        if members is None or (run and rng.random() < 0.3):
            writers[2].add_parts(np.array([c for c, _ in run], dtype=np.int64),
                                 PartTotals.of(run))
            assert writers[2].waiting == writers[0].waiting
            run = []
        if members is None or not len(members):
            continue
        rows = np.where(labels[members] == 0, m, rank)
        sizes = rows * widths[members]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        part = PartCodes(members, widths[members], rng.integers(-50, 50, len(members)).astype(
            np.int16), float(rng.random() + 0.5), float(rng.random() * 0.01), 0.05,
            rng.random(rank), 0, 0.1,
            rng.integers(0, 9, offsets[-1]).astype(np.uint16), offsets)
        c = int(labels[members[0]])
        writers[0].add_codes(c, part)
        writers[1].add_codes(c, replace(part, codes=None, code_offsets=None))
        run.append((c, part))
        assert writers[0].waiting == writers[1].waiting
    assert writers[0].waiting == 0
    held, *placed = (w.finish() for w in writers)
    for w, (labels_out, stats) in zip(writers[1:], placed):
        assert np.array_equal(held[0], labels_out) and held[1] == stats
        assert np.array_equal(writers[0].exponents, w.exponents)
        assert w.code_count == writers[0].code_count == int(
            (np.where(labels == 0, m, rank) * widths).sum())


def test_a_shards_parts_at_once_are_stored_as_one_by_one(monkeypatch):
    """A shard's parts handed over at once (``CompactSink.add_encoded`` of a ``ShardParts``,
    their codes placed elsewhere) are stored as the same parts one by one with their codes:
    the members left over go to the pool at the same points and the pool is stored alone at
    the same points (early, while later codes wait), so every matrix gets the same cluster."""
    from matclust.format2 import PartCodes, PartTotals
    from matclust.sinks import CompactSink
    from matclust.sources import array_source
    from matclust.stages import ShardParts

    import matclust.sinks

    monkeypatch.setattr(matclust.sinks, "PENDING_MATRICES", 40)
    rng = np.random.default_rng(11)
    K, m, n, rank = 400, 6, 3, 2
    mats = rng.standard_normal((K, m, n)).astype(np.float32)
    params = {"eps": EPS, "guarantee": "matrix", "rank": rank}
    sinks = [CompactSink(array_source(mats), params, None) for _ in range(2)]
    sinks[1].out.place_codes_elsewhere(placer=None)
    bases = [rng.standard_normal((m, rank)) for _ in range(4)]
    cid = {c: [s.out.new_cluster(bases[c]) for s in sinks][0] for c in range(4)}
    labels, left = rng.integers(0, 4, K), rng.random(K) < 0.1
    items = []  # (cluster, part or None, leftovers), windows of 50 in index order
    for lo in range(0, K, 50):
        for c in rng.permutation(4).tolist():
            window = np.arange(lo, lo + 50)
            members = window[(labels[window] == c) & ~left[window]]
            gone = window[(labels[window] == c) & left[window]]
            part = None
            if len(members) and rng.random() < 0.9:
                sizes = np.full(len(members), rank * n)
                offsets = np.concatenate([[0], np.cumsum(sizes)])
                part = PartCodes(members, np.full(len(members), n), np.zeros(len(members),
                                 np.int16), float(rng.random()), 0.0, 0.05, rng.random(rank),
                                 0, 0.05, np.ones(offsets[-1], np.uint16), offsets)
            else:
                gone = np.concatenate([gone, members])
            items.append((c, part, [(int(i), mats[i]) for i in rng.permutation(gone)]))
    for c, part, leftovers in items:
        if part is not None:
            sinks[0].add_codes(part, cid[c])
        sinks[0].leftovers(leftovers)
    parts, events = [], []
    for c, part, leftovers in items:
        if part is not None:
            parts.append((c, part))
        if leftovers:
            events.append((len(parts), part is not None, leftovers))
    sinks[1].add_encoded([ShardParts(PartTotals.of(parts), events)], cid)
    one_by_one, at_once = (s.finish() for s in sinks)
    assert len(one_by_one[1]) > 10  # many clusters of one, stored in several flushes
    assert np.array_equal(one_by_one[0], at_once[0]) and one_by_one[1] == at_once[1]


def test_packed_blocks_come_back_as_the_same_matrices():
    """What a checking task hands back (one flat array and the shapes) unpacks to the evicted
    members' matrices as they were: same shapes, dtype, values and row-major layout (the
    recluster sees what a list of the arrays would have given it), none at all included."""
    from matclust.stages import packed_blocks, unpacked_blocks

    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.complex64):
        blocks = [(rng.standard_normal((6, n)) + (1j if dtype is np.complex64 else 0)
                   * rng.standard_normal((6, n))).astype(dtype) for n in (3, 1, 4, 3)]
        flat, shapes = packed_blocks(blocks)
        assert flat.ndim == 1 and flat.dtype == dtype
        back = unpacked_blocks(flat, shapes)
        assert len(back) == len(blocks)
        for a, b in zip(blocks, back):
            assert b.shape == a.shape and b.dtype == a.dtype and b.flags.c_contiguous
            assert np.array_equal(a, b)
    flat, shapes = packed_blocks([])
    assert unpacked_blocks(flat, shapes) == []


def test_without_workers_dask_is_not_imported(collection, tmp_path):
    path, _, _ = collection
    code = textwrap.dedent(f"""
        import sys
        from matclust.cli import main
        for extra in ([], ["--shards", "2"]):
            try:
                main(["cluster", {str(path)!r}, "-o", {str(tmp_path / 'o.zarr')!r}, "--rank", "3",
                      "--eps", "0.1", "--quiet", "--overwrite", *extra])
            except SystemExit as exc:
                assert not exc.code, exc.code
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_bad_distributed_options_are_one_line_errors(collection, tmp_path):
    path, _, _ = collection
    for extra, words in ((("--workers", 0), "--workers"), (("--shards", 0), "--shards"),
                         (("--workers", 1, "--scheduler", "tcp://127.0.0.1:9"), "not both"),
                         (("--shards", 2, "--mode", "in-memory"), "--mode in-memory")):
        result = run_inprocess("cluster", path, "-o", tmp_path / "x.zarr", "--rank", RANK,
                               "--eps", EPS, *extra)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result
        assert not (tmp_path / "x.zarr").exists()


# -- a real Dask cluster -----------------------------------------------------------------------
def _run(*args, timeout=180):
    proc = subprocess.run([sys.executable, "-m", "matclust", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _dask(*args, log):
    # The `dask` command of this interpreter's environment.
    return subprocess.Popen([sys.executable, "-m", "dask", *map(str, args)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler and two single-threaded workers (no nanny: each worker is the process
    started here, so killing it kills the worker), on 127.0.0.1; stopped in any case."""
    from dask.distributed import Client

    procs = []
    log = open(tmp_path / "dask.log", "w")
    try:
        file = tmp_path / "scheduler.json"
        procs.append(_dask("scheduler", "--host", "127.0.0.1", "--port", 0, "--no-dashboard",
                           "--scheduler-file", file, log=log))
        deadline = time.time() + 60
        while not file.exists() or not file.read_text().strip():
            assert time.time() < deadline and procs[0].poll() is None, "scheduler did not start"
            time.sleep(0.1)
        address = json.loads(file.read_text())["address"]
        for _ in range(2):
            procs.append(_dask("worker", address, "--nthreads", 1, "--no-nanny",
                               "--no-dashboard", "--host", "127.0.0.1", log=log))
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            pids = client.run(os.getpid)  # worker address -> process id
        yield address, {addr: p for addr, pid in pids.items() for p in procs if p.pid == pid}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        log.close()


def test_real_cluster_gives_the_labels_of_a_local_one(collection, tmp_path, dask_cluster):
    path, mats, _ = collection
    address, _ = dask_cluster
    args = ("--rank", RANK, "--eps", EPS, "--shards", 4, "--quiet")
    _run("cluster", path, "-o", tmp_path / "real.zarr", *args, "--scheduler", address)
    _run("cluster", path, "-o", tmp_path / "local.zarr", *args, "--workers", 2)
    assert np.array_equal(_labels(tmp_path / "real.zarr"), _labels(tmp_path / "local.zarr"))
    check_compact(tmp_path / "real.zarr", mats, EPS, "matrix")


def _worker_to_kill(client, workers, moment: str):
    """A worker of ``workers`` that is planning a shard ("planning"), or that holds a shard's
    encoded codes for the tasks that write them ("holding codes"); None while there is none."""
    seen = client.processing() if moment == "planning" else client.has_what()
    name = "plan_shard" if moment == "planning" else "shard_encoded_kept"
    for addr, keys in seen.items():
        if addr in workers and any(name in str(k) for k in keys):
            return addr
    return None


@pytest.mark.parametrize("moment", ["planning", "holding codes"])
def test_a_worker_killed_mid_run_changes_nothing(tmp_path, dask_cluster, moment):
    """SIGKILL a worker while it plans a shard, or once it holds a shard's codes (encoded,
    not yet written: they are lost with it, and Dask makes them again on the other worker):
    the run completes with the store a local run writes, array for array."""
    from dask.distributed import Client

    address, workers = dask_cluster
    path, mats, _ = write_planted(tmp_path / "big.h5", K=12000, m=16, n=8, subspaces=20, rank=3,
                                  noise=0.02, seed=5, dtype="float32")
    args = ("--rank", 4, "--eps", EPS, "--shards", 8, "--quiet")
    _run("cluster", path, "-o", tmp_path / "local.zarr", *args, "--workers", 2)
    run = subprocess.Popen([sys.executable, "-m", "matclust", "cluster", path, "-o",
                            tmp_path / "survived.zarr", *map(str, args), "--scheduler", address],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        with Client(address, timeout="30s") as client:
            deadline = time.time() + 60
            while killed is None and time.time() < deadline and run.poll() is None:
                killed = _worker_to_kill(client, workers, moment)
                if killed is not None:
                    workers[killed].send_signal(signal.SIGKILL)
                time.sleep(0.02)
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert killed is not None, f"no worker was seen {moment}"
    assert workers[killed].wait(timeout=30) == -signal.SIGKILL
    assert run.returncode == 0, err[-3000:]
    survived, local = _arrays(tmp_path / "survived.zarr"), _arrays(tmp_path / "local.zarr")
    assert survived.keys() == local.keys()
    for name in local:
        np.testing.assert_array_equal(survived[name], local[name], err_msg=name)
    check_compact(tmp_path / "survived.zarr", mats, EPS, "matrix")


def test_shards_far_below_the_collection_are_planned_in_its_scale(tmp_path):
    """The second shard's matrices lie 2^-500 below the first's: on its own that shard clusters
    them, but in the collection's scale they are kept apart (stored alone). The shard is
    planned again in the collection's scale, and the result is the unsharded one's."""
    from matclust.collections_io import write_collection

    _, mats, _ = write_planted(tmp_path / "base.h5", K=60, m=8, n=3, subspaces=2, rank=2,
                               noise=0.01, seed=7)
    mats = [a if i < 30 else np.ldexp(a, -500) for i, a in enumerate(mats)]
    path = tmp_path / "far.h5"
    write_collection(str(path), np.stack(mats), layout="stack", dataset="matrices")
    out = {}
    for name, extra in (("sharded", ("--shards", 2)), ("single", ("--mode", "out-of-core"))):
        out[name] = run_inprocess("cluster", path, "-o", tmp_path / f"{name}.zarr", "--rank", 2,
                                  "--eps", EPS, *extra, "--json", check=0).json()
        check_compact(tmp_path / f"{name}.zarr", mats, EPS, "matrix")
    labels = _labels(tmp_path / "sharded.zarr")
    assert len(np.unique(labels[30:])) == 30  # each far matrix alone
    assert out["sharded"]["singletons"] == out["single"]["singletons"]


def test_complex_collection_sharded(tmp_path):
    path, mats, _ = write_planted(tmp_path / "c.h5", K=200, m=8, n=3, subspaces=3, rank=2,
                                  noise=0.02, seed=11, dtype="complex128")
    for mode in ((), PAPER):
        out = tmp_path / f"c{len(mode)}.zarr"
        run_inprocess("cluster", path, "-o", out, "--rank", 2, "--eps", EPS, "--shards", 3,
                      *mode, check=0)
        if mode:
            check_out_of_core_store(out, path, rank=2, eps=EPS)
        else:
            check_compact(out, mats, EPS, "matrix")

