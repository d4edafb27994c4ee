"""Inputs and results at URLs, against a real S3 API server (moto's) on 127.0.0.1.

The server is a subprocess started and stopped by tests/s3_server.py. What a store holds is read independently:
the root pointer with fsspec, the published generation with zarr and numpy
(conftest.decode_compact), following docs/objectstores.md; matclust is the thing under test.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from conftest import check_compact, decode_compact, load_input, run_inprocess, write_planted
from s3_server import LEASE, spawn_matclust, wait_for, writing_generation

pytest.importorskip("s3fs")
pytest.importorskip("moto")

#: The options of every small clustering run here.
RUN = ("--rank", "2", "--eps", "0.1", "--quiet")


def big_input(bucket, tmp_path):
    """An input whose plain store takes long to write to the server (hundreds of clusters,
    a few objects each): runs writing it can be caught mid-write."""
    path, _, _ = write_planted(tmp_path / "big.h5", K=400, m=16, n=4, subspaces=200, rank=2,
                               dtype="float32", seed=3)
    return bucket.upload(path)


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["h5", "zarr-group"])
def test_s3_to_s3_equals_the_local_run(bucket, tmp_path, kind):
    """cluster s3:// -> s3://, then verify, inspect and reconstruct from s3://: the same
    labels, decoded matrices and rebuilt collection as the same run on local files."""
    if kind == "h5":
        local_in, mats, _ = write_planted(tmp_path / "in.h5", K=100, m=12, n=4, subspaces=4,
                                          rank=2, dtype="float32")
    else:
        local_in, mats, _ = write_planted(tmp_path / "in.zarr", K=24, m=12, n=3, n_max=6,
                                          layout="group", subspaces=3, rank=2, seed=1)
    url_in = bucket.upload(local_in)
    local_out, url_out = tmp_path / "res.zarr", bucket.url("res.zarr")
    run_inprocess("cluster", local_in, "-o", local_out, *RUN, check=0)
    run_inprocess("cluster", url_in, "-o", url_out, *RUN, check=0)

    assert bucket.entries("res.zarr") == sorted(["zarr.json", bucket.published("res.zarr")
                                                 .rsplit("/", 1)[-1]])  # no lock left
    attrs, labels, decoded = decode_compact(bucket.published("res.zarr"))
    _, local_labels, local_decoded = decode_compact(local_out)
    assert json.loads(attrs["params"])["input"] == url_in
    np.testing.assert_array_equal(labels, local_labels)
    for a, b in zip(decoded, local_decoded):
        np.testing.assert_array_equal(a, b)
    check_compact(bucket.published("res.zarr"), mats, 0.1)  # the guarantee, from the input

    verdict = run_inprocess("verify", url_out, "--json", check=0).json()
    assert verdict["ok"] and verdict["clusters"] == len(np.unique(local_labels))
    shown = run_inprocess("inspect", url_out, "--json", check=0).json()[0]
    local_shown = run_inprocess("inspect", local_out, "--json", check=0).json()[0]
    assert shown["input"] == url_in
    assert {k: v for k, v in shown.items() if k not in ("input", "file_bytes", "bytes_ratio")} \
        == {k: v for k, v in local_shown.items() if k not in ("input", "file_bytes", "bytes_ratio")}
    run_inprocess("reconstruct", url_out, "-o", tmp_path / "rec.zarr", check=0)
    run_inprocess("reconstruct", local_out, "-o", tmp_path / "local_rec.zarr", check=0)
    rebuilt, names, _ = load_input(tmp_path / "rec.zarr")
    local_rebuilt, local_names, _ = load_input(tmp_path / "local_rec.zarr")
    assert names == local_names and len(rebuilt) == len(mats)
    for a, b in zip(rebuilt, local_rebuilt):
        np.testing.assert_array_equal(a, b)


def test_hdf5_at_a_url_is_read_with_the_collector_paused(bucket, tmp_path, monkeypatch):
    """h5py holds its global lock while it reads a file object, and s3fs serves the read on
    fsspec's event-loop thread: a garbage collection there that frees an h5py object would
    wait for that lock forever (a run of this suite hung so). Every read of an HDF5 input at
    an s3:// URL waits with the cyclic collector paused, and the collector is back on after;
    with an h5py object in cyclic garbage and collections at nearly every allocation, the run
    completes."""
    import gc

    import h5py
    import s3fs

    local_in, mats, _ = write_planted(tmp_path / "in.h5", K=300, m=12, n=4, subspaces=4,
                                      rank=2, dtype="float32")
    url_in = bucket.upload(local_in)
    states = []
    real_fetch = s3fs.core.S3File._fetch_range

    def fetch(self, start, end):
        states.append(gc.isenabled())
        return real_fetch(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", fetch)
    with h5py.File(local_in, "r") as f:
        junk = [f["matrices"].id]
        junk.append(junk)  # only the cyclic collector frees it
        del junk
        thresholds = gc.get_threshold()
        gc.set_threshold(1, 1, 1)
        try:
            run_inprocess("cluster", url_in, "-o", tmp_path / "out.zarr", *RUN, check=0)
        finally:
            gc.set_threshold(*thresholds)
    assert states and not any(states), states
    assert gc.isenabled()
    check_compact(tmp_path / "out.zarr", mats, 0.1, "matrix")


def test_memory_urls_through_the_api(tmp_path):
    """memory:// in-process: a source opened from a URL survives pickling (it is opened again
    from its URL), and a result written there is read back, verified and not replaced
    without overwrite."""
    import fsspec

    from matclust.api import MatrixClusterer
    from matclust.errors import InputError
    from matclust.sources import open_source
    from matclust.store import ResultStore
    from matclust.verify import verify_store

    local, mats, _ = write_planted(tmp_path / "in.zarr", K=40, m=8, n=3, subspaces=2, rank=2)
    root = f"mc-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    fs.put(local, f"/{root}/in.zarr", recursive=True)
    try:
        source = open_source(f"memory://{root}/in.zarr")
        copy = pickle.loads(pickle.dumps(source))
        np.testing.assert_array_equal(copy.read_range(0, 40).data, source.read_range(0, 40).data)
        model = MatrixClusterer(rank=2, eps=0.1).fit(source, f"memory://{root}/out.zarr")
        with ResultStore(f"memory://{root}/out.zarr") as store:
            np.testing.assert_array_equal(store.labels, model.labels_)
        assert verify_store(f"memory://{root}/out.zarr")["ok"]
        with pytest.raises(InputError, match="exists; pass --overwrite"):
            MatrixClusterer(rank=2, eps=0.1).fit(source, f"memory://{root}/out.zarr")
    finally:
        fs.rm(f"/{root}", recursive=True)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------
def test_bad_urls_and_options_are_refused(bucket, tmp_path):
    local_in, _, _ = write_planted(tmp_path / "in.h5", K=30, m=8, n=3)
    url_in = bucket.upload(local_in)

    r = run_inprocess("cluster", url_in, "-o", bucket.url("res.h5"), *RUN, check=2)
    assert bucket.url("res.h5") in r.stderr and "HDF5" in r.stderr
    assert bucket.entries("res.h5") == []
    r = run_inprocess("cluster", url_in, "-o", bucket.url("r.zarr"), *RUN,
                      "--storage-options", "{endpoint", check=2)
    assert "--storage-options" in r.stderr and "JSON" in r.stderr
    r = run_inprocess("verify", bucket.url("r.zarr"), "--storage-options", "[1]", check=2)
    assert "--storage-options" in r.stderr

    # --overwrite replaces a matclust result only: a prefix holding someone's object stays.
    bucket.fs.pipe_file(f"{bucket.name}/mine/notes.txt", b"my notes")
    r = run_inprocess("cluster", url_in, "-o", bucket.url("mine"), *RUN, "--overwrite", check=2)
    assert bucket.url("mine") in r.stderr and "not a matclust result" in r.stderr
    assert bucket.fs.cat_file(f"{bucket.name}/mine/notes.txt") == b"my notes"
    assert bucket.entries("mine") == ["notes.txt"]

    r = run_inprocess("verify", bucket.url("nothing.zarr"), check=2)
    assert bucket.url("nothing.zarr") in r.stderr
    r = run_inprocess("cluster", url_in, "-o", f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/r",
                      *RUN, check=2)
    assert "bucket" in r.stderr and "does not exist" in r.stderr


# ---------------------------------------------------------------------------------------------
# Killed runs and concurrent runs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("previous", [False, True], ids=["first-write", "overwrite"])
def test_killed_run_leaves_nothing_readers_take(bucket, tmp_path, previous):
    """SIGKILL mid-write: verify/inspect/reconstruct refuse a store never completed; with
    --overwrite the previous result is read intact. The dead run's lock holds OUTPUT until its
    lease runs out; the next run then removes the half-written generation."""
    url_in = big_input(bucket, tmp_path)
    small, _, _ = write_planted(tmp_path / "small.h5", K=30, m=16, n=4)
    small_in = bucket.upload(small)
    out = bucket.url("res.zarr")
    before = None
    if previous:
        run_inprocess("cluster", small_in, "-o", out, *RUN, check=0)
        before = bucket.pointer("res.zarr")["generation"]
        _, labels_before, decoded_before = decode_compact(bucket.published("res.zarr"))
    run = spawn_matclust("cluster", url_in, "-o", out, *RUN, "--encoding", "plain", "--guarantee",
                        "cluster", *(["--overwrite"] if previous else []))
    try:
        wait_for(lambda: writing_generation(bucket, "res.zarr", before), "clusters written", run)
    finally:
        run.kill()
        run.wait()
    killed_at = time.monotonic()
    half_written = writing_generation(bucket, "res.zarr", before)
    assert half_written is not None

    if previous:
        assert bucket.pointer("res.zarr")["generation"] == before
        _, labels_now, decoded_now = decode_compact(bucket.published("res.zarr"))
        np.testing.assert_array_equal(labels_now, labels_before)
        for a, b in zip(decoded_now, decoded_before):
            np.testing.assert_array_equal(a, b)
        assert run_inprocess("verify", out, "--json", check=0).json()["ok"]
        assert run_inprocess("inspect", out, "--json", check=0).json()[0]["encoding"] == "compact"
    else:
        assert bucket.pointer("res.zarr") is None
        for command in (("verify", out), ("inspect", out),
                        ("reconstruct", out, "-o", tmp_path / "rec.zarr")):
            r = run_inprocess(*command, check=2)
            assert out in r.stderr and "incomplete result store" in r.stderr, r
        assert not (tmp_path / "rec.zarr").exists()
        import zarr

        with pytest.raises(Exception):
            zarr.open_group(out, mode="r")  # a plain Zarr reader finds no group either

    # The dead run's lock is still within its lease: a new run is refused, naming it.
    r = run_inprocess("cluster", small_in, "-o", out, *RUN, "--overwrite", check=2)
    assert "being written by another matclust run" in r.stderr and f"pid {run.pid}" in r.stderr
    if not previous:
        return  # waiting the lease out once (below) is enough
    time.sleep(max(0.0, LEASE + 0.5 - (time.monotonic() - killed_at)))
    run_inprocess("cluster", small_in, "-o", out, *RUN, "--overwrite", check=0)
    generation = bucket.pointer("res.zarr")["generation"]
    assert bucket.entries("res.zarr") == sorted(["zarr.json", generation])
    assert half_written != generation and before != generation


def test_second_concurrent_run_is_refused(bucket, tmp_path):
    """While a run writes OUTPUT its lock object is there: a second run on OUTPUT exits 2
    naming the first; the first, stopped by SIGTERM, removes its generation and its lock."""
    url_in = big_input(bucket, tmp_path)
    out = bucket.url("res.zarr")
    first = spawn_matclust("cluster", url_in, "-o", out, *RUN, "--encoding", "plain", lease=60)
    try:
        wait_for(lambda: writing_generation(bucket, "res.zarr", None), "clusters written", first)
        assert ".matclust-lock" in bucket.entries("res.zarr")
        r = run_inprocess("cluster", url_in, "-o", out, *RUN, "--overwrite", check=2)
        assert "being written by another matclust run" in r.stderr
        assert f"pid {first.pid}" in r.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert bucket.entries("res.zarr") == []  # no generation, no lock: the URL is free again


def test_lock_lease_renewal_takeover_and_loss(bucket, monkeypatch):
    """The lock object directly: held -> a second taker is refused; renewed while held; a dead
    holder's lock (not renewed for a lease) is taken over; a holder whose lock was replaced
    notices before publishing and does not delete the other run's lock."""
    from matclust.errors import InputError, WriteFailure
    from matclust.objectstore import RemoteLock, RemoteOutput

    monkeypatch.setenv("MATCLUST_LOCK_LEASE", "0.4")
    key = f"{bucket.name}/res.zarr/.matclust-lock"

    def body():
        bucket.fs.invalidate_cache()
        return json.loads(bucket.fs.cat_file(key))

    bucket.fs.pipe_file(key, json.dumps({"pid": 1, "host": "elsewhere", "run": "dead",
                                         "renewed": time.time() - 10, "lease": 0.4}).encode())
    lock = RemoteLock(RemoteOutput(bucket.url("res.zarr"))).acquire()  # a dead run's lock
    try:
        first = body()
        assert first["run"] == lock.run and first["pid"] == os.getpid()
        with pytest.raises(InputError, match="being written by another matclust run"):
            RemoteLock(RemoteOutput(bucket.url("res.zarr"))).acquire()
        wait_for(lambda: body()["renewed"] > first["renewed"], "a renewal", timeout=5)
        lock.confirm()  # still ours
        bucket.fs.pipe_file(key, json.dumps({"pid": 2, "host": "elsewhere", "run": "other",
                                             "renewed": time.time(), "lease": 60}).encode())
        with pytest.raises(WriteFailure, match="lost the output's lock"):
            lock.confirm()
    finally:
        lock.release()
    assert body()["run"] == "other"


def test_http_input_is_read_and_http_output_refused(tmp_path):
    """http(s):// is read only: a collection served over HTTP (a Zarr folder, an HDF5 file)
    clusters like the local one; an output URL there is refused."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    served = tmp_path / "www"
    served.mkdir()
    write_planted(served / "in.zarr", K=40, m=8, n=3, subspaces=2, rank=2)
    write_planted(served / "in.h5", K=40, m=8, n=3, subspaces=2, rank=2, seed=2)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for name in ("in.zarr", "in.h5"):
            run_inprocess("cluster", f"{base}/{name}", "-o", tmp_path / f"{name}-http.zarr",
                          *RUN, check=0)
            run_inprocess("cluster", served / name, "-o", tmp_path / f"{name}-local.zarr", *RUN,
                          check=0)
            _, labels, decoded = decode_compact(tmp_path / f"{name}-http.zarr")
            _, local_labels, local_decoded = decode_compact(tmp_path / f"{name}-local.zarr")
            np.testing.assert_array_equal(labels, local_labels)
            for a, b in zip(decoded, local_decoded):
                np.testing.assert_array_equal(a, b)
        r = run_inprocess("cluster", f"{base}/in.zarr", "-o", f"{base}/out.zarr", *RUN, check=2)
        assert f"{base}/out.zarr" in r.stderr and "read only" in r.stderr
        assert not (served / "out.zarr").exists()
    finally:
        server.shutdown()
        server.server_close()


def test_pickled_s3_source_reopens_in_another_process(bucket, s3_endpoint, tmp_path):
    """A source opened from s3:// with explicit storage options, pickled and read in a process
    without any AWS environment: it opens its URL again with those options (as a Dask worker
    does) and reads the same matrices, calibration included."""
    from matclust.locations import use_storage_options
    from matclust.sources import open_source

    local, mats, _ = write_planted(tmp_path / "in.h5", K=30, m=8, n=3, scale_spread=1e3)
    url = bucket.upload(local)
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    with use_storage_options(options):
        source = open_source(url)
    source.calibrate(source.read_range(0, 30).peaks())
    expected = source.read_range(0, 30).data
    child = ("import pickle, sys, numpy as np; source = pickle.load(sys.stdin.buffer); "
             "np.save(sys.stdout.buffer, source.read_range(0, 30).data)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = subprocess.run([sys.executable, "-c", child], input=pickle.dumps(source), env=env,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    import io

    np.testing.assert_array_equal(np.load(io.BytesIO(done.stdout)), expected)
    assert not np.array_equal(expected, np.concatenate(mats, axis=1))  # calibrated: scaled


def test_of_runs_racing_for_the_lock_exactly_one_gets_it(bucket):
    """Eight takers at once: the conditional put (If-None-Match: *) lets exactly one win; the
    others are refused. A server ignoring the condition would let them all through."""
    import threading

    from matclust.errors import InputError
    from matclust.objectstore import RemoteLock, RemoteOutput

    locks = [RemoteLock(RemoteOutput(bucket.url("res.zarr"))) for _ in range(8)]
    start = threading.Barrier(len(locks))
    won, refused = [], []

    def take(lock):
        start.wait()
        try:
            won.append(lock.acquire())
        except InputError:
            refused.append(lock)

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert len(won) == 1 and len(refused) == len(locks) - 1
        bucket.fs.invalidate_cache()
        assert json.loads(bucket.fs.cat_file(f"{bucket.name}/res.zarr/.matclust-lock"))["run"] \
            == won[0].run
    finally:
        for lock in won:
            lock.release()
    assert bucket.entries("res.zarr") == []
