"""`matclust append` on stores and inputs at URLs, against a real S3 API server (moto's, started
by tests/s3_server.py). The grown store is read independently (the root pointer with fsspec, the
published generation with conftest.decode_compact) and checked against both inputs as written
locally before they were uploaded."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from conftest import check_compact, decode_compact, load_input, run_inprocess
from s3_server import LEASE, spawn_matclust, wait_for
from test_append import write_halves

pytest.importorskip("s3fs")
pytest.importorskip("moto")

EPS = 0.05
RUN = ("--rank", "3", "--eps", str(EPS), "--quiet")


def test_s3_store_grows_by_an_s3_input(bucket, tmp_path):
    """cluster s3:// -> s3://, append s3:// to it: a new generation is published, the old one
    removed; the grown store meets the guarantee on both inputs, the first input's matrices
    decode as before, both URLs are recorded, and verify reads them again from the bucket."""
    (first, second), _, _, K0 = write_halves(tmp_path, ".h5")
    url_first, url_second = bucket.upload(first), bucket.upload(second)
    store = bucket.url("store.zarr")
    run_inprocess("cluster", url_first, "-o", store, *RUN, check=0)
    before = bucket.pointer("store.zarr")["generation"]
    _, labels_before, decoded_before = decode_compact(bucket.published("store.zarr"))

    report = run_inprocess("append", store, url_second, "--json", check=0).json()
    after = bucket.pointer("store.zarr")["generation"]
    assert after != before
    assert bucket.entries("store.zarr") == sorted(["zarr.json", after])  # no lock, no old one
    both = load_input(first)[0] + load_input(second)[0]
    check_compact(bucket.published("store.zarr"), both, EPS)
    _, labels, decoded = decode_compact(bucket.published("store.zarr"))
    np.testing.assert_array_equal(labels[:K0], labels_before)
    for a, b in zip(decoded[:K0], decoded_before):
        np.testing.assert_array_equal(a, b)
    assert report["append"]["joined"] >= 0.9 * (len(both) - K0)
    assert [(e["input"], e["K"]) for e in report["params"]["inputs"]] == \
        [(url_first, K0), (url_second, len(both) - K0)]
    assert run_inprocess("verify", store, "--json", check=0).json()["ok"]

    # The same input again (spelled another way) is refused; the store is left as it was.
    for again in (url_second, url_second + "/", url_second.replace("s3://", "S3://")):
        r = run_inprocess("append", store, again, check=2)
        assert r.stderr.startswith("error:") and "already in" in r.stderr, r
    assert bucket.pointer("store.zarr")["generation"] == after
    assert bucket.entries("store.zarr") == sorted(["zarr.json", after])

    # verify reads the appended input from the bucket: changed there, the store fails it.
    mats = load_input(second)[0]
    mats[3] = -2.0 * mats[3] + 1.0
    from matclust.collections_io import write_collection

    changed = os.fspath(tmp_path / "changed" / "second.h5")
    os.makedirs(os.path.dirname(changed))
    write_collection(changed, np.stack(mats))
    bucket.fs.put(changed, f"{bucket.name}/second.h5")
    assert run_inprocess("verify", store, "--json", check=1).json()["ok"] is False


def test_killed_append_leaves_the_previous_store(bucket, tmp_path):
    """An append caught between writing its generation and publishing it (stopped there, then
    killed with SIGKILL): the pointer still names the previous store, which verify accepts and
    which decodes as before; a concurrent append meanwhile is refused naming the first. Once
    the dead run's lease has run out the append is run again and the dead run's generation is
    removed."""
    (first, second), mats, _, K0 = write_halves(tmp_path, ".h5", K=1200, m=24, subspaces=6)
    url_first, url_second = bucket.upload(first), bucket.upload(second)
    store = bucket.url("store.zarr")
    run_inprocess("cluster", url_first, "-o", store, *RUN, check=0)
    before = bucket.pointer("store.zarr")["generation"]
    _, labels_before, decoded_before = decode_compact(bucket.published("store.zarr"))

    def new_generation():
        return [e for e in bucket.entries("store.zarr") if e.startswith("gen-") and e != before]

    run = spawn_matclust("append", store, url_second, "--quiet")
    try:
        wait_for(new_generation, "the append's generation", run)
        run.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        assert bucket.pointer("store.zarr")["generation"] == before, "published already"
        r = run_inprocess("append", store, url_second, check=2)
        assert "being written by another matclust run" in r.stderr and f"pid {run.pid}" in r.stderr
    finally:
        run.kill()
        run.wait()
    half_written = new_generation()
    assert len(half_written) == 1
    assert bucket.pointer("store.zarr")["generation"] == before
    assert run_inprocess("verify", store, "--json", check=0).json()["ok"]
    _, labels_now, decoded_now = decode_compact(bucket.published("store.zarr"))
    np.testing.assert_array_equal(labels_now, labels_before)
    for a, b in zip(decoded_now, decoded_before):
        np.testing.assert_array_equal(a, b)

    time.sleep(max(0.0, LEASE + 0.5 - (time.monotonic() - stopped_at)))
    run_inprocess("append", store, url_second, "--quiet", check=0)
    after = bucket.pointer("store.zarr")["generation"]
    assert bucket.entries("store.zarr") == sorted(["zarr.json", after])
    assert after not in (before, half_written[0])
    check_compact(bucket.published("store.zarr"), load_input(first)[0] + load_input(second)[0],
                  EPS)


@pytest.mark.parametrize("store_at,input_at", [("local", "s3"), ("s3", "file")])
def test_stores_and_inputs_in_different_places(bucket, s3_endpoint, tmp_path, monkeypatch,
                                               store_at, input_at):
    """A local store grown by an s3:// input, an s3:// store by a file:// input (recorded as the
    local path it names): both inputs are recorded as given and verify reads them again. The
    endpoint comes from --storage-options instead of the environment."""
    (first, second), _, _, K0 = write_halves(tmp_path, ".zarr", K=80)
    store = bucket.url("store.zarr") if store_at == "s3" else os.fspath(tmp_path / "store.zarr")
    new = bucket.upload(second) if input_at == "s3" else f"file://{second}"
    run_inprocess("cluster", first, "-o", store, *RUN, check=0)
    options = ("--storage-options", json.dumps({"endpoint_url": s3_endpoint}))
    with monkeypatch.context() as env:
        env.delenv("AWS_ENDPOINT_URL")
        report = run_inprocess("append", store, new, "--json", *options, check=0).json()
        assert run_inprocess("verify", store, "--json", *options, check=0).json()["ok"]
    recorded = [e["input"] for e in report["params"]["inputs"]]
    assert recorded == [first, new if input_at == "s3" else second]
    published = bucket.published("store.zarr") if store_at == "s3" else store
    check_compact(published, load_input(first)[0] + load_input(second)[0], EPS)
    if store_at == "s3":
        assert bucket.entries("store.zarr") == sorted(["zarr.json", published.rsplit("/", 1)[-1]])
    else:
        assert sorted(os.listdir(tmp_path)) == ["first.zarr", "second.zarr", "store.zarr"]


def test_memory_store_through_the_python_function(tmp_path):
    """memory:// (one process): append_to_store grows a store there; a missing store, an input
    appended twice and a URL that is not a result are refused naming the URL."""
    import uuid

    import fsspec

    from matclust.api import MatrixClusterer
    from matclust.append import append_to_store
    from matclust.errors import InputError
    from matclust.sources import open_source
    from matclust.verify import verify_store

    (first, second), mats, _, K0 = write_halves(tmp_path, ".zarr", K=60)
    root = f"mc-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    fs.put(second, f"/{root}/second.zarr", recursive=True)
    store, new = f"memory://{root}/store.zarr", f"memory://{root}/second.zarr"
    try:
        MatrixClusterer(rank=3, eps=EPS).fit(open_source(first), store)
        report = append_to_store(store, new)
        assert report["append"]["K"] == len(mats) - K0
        assert [e["input"] for e in report["params"]["inputs"]] == [first, new]
        assert verify_store(store)["ok"]
        with pytest.raises(InputError, match="already in"):
            append_to_store(store, new)
        with pytest.raises(InputError, match=f"memory://{root}/nothing.zarr: no such"):
            append_to_store(f"memory://{root}/nothing.zarr", new)
        with pytest.raises(InputError, match="not a Zarr store"):
            append_to_store(f"memory://{root}", new)
        assert not fs.exists(f"/{root}/nothing.zarr")

        # A store uploaded as is (its arrays at the root) grows into a generation; its root
        # arrays are removed once the pointer names that generation.
        local = os.fspath(tmp_path / "local.zarr")
        MatrixClusterer(rank=3, eps=EPS).fit(open_source(first), local)
        fs.put(local, f"/{root}/up.zarr", recursive=True)
        append_to_store(f"memory://{root}/up.zarr", new)
        entries = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"/{root}/up.zarr", detail=False))
        assert len(entries) == 2 and entries[0].startswith("gen-") and entries[1] == "zarr.json"
        assert verify_store(f"memory://{root}/up.zarr")["ok"]
    finally:
        fs.rm(f"/{root}", recursive=True)


def test_refusals_at_urls(bucket, tmp_path):
    """Exit 2, one line naming the URL, and nothing created: no store there, an uploaded HDF5
    result (cannot be replaced without a rename), a missing bucket, a read-only protocol."""
    (first, second), _, _, _ = write_halves(tmp_path, ".h5", K=40)
    url_second = bucket.upload(second)
    h5_store = os.fspath(tmp_path / "h5store.h5")
    run_inprocess("cluster", first, "-o", h5_store, *RUN, check=0)
    uploaded = bucket.upload(h5_store)
    cases = [(bucket.url("nothing.zarr"), "no such"),
             (uploaded, "HDF5 result at a URL"),
             ("s3://no-such-bucket-for-matclust-tests/store.zarr", "no such"),
             ("http://127.0.0.1:9/store.zarr", "read only")]
    for store, message in cases:
        r = run_inprocess("append", store, url_second, check=2)
        assert r.stderr.startswith(f"error: {store}") and message in r.stderr, r
        assert r.stderr.count("\n") == 1
    assert bucket.entries("nothing.zarr") == []
    assert sorted(bucket.entries("")) == ["h5store.h5", "second.h5"]
    assert run_inprocess("verify", uploaded, "--json", check=0).json()["ok"]


def test_plain_store_at_s3(bucket, tmp_path):
    """A plain (matclust/1) store at s3:// grows too: every cluster of the published generation,
    read with zarr, meets the cluster guarantee on both inputs (numpy), the stored clusters
    keep their old columns, and verify accepts it."""
    from conftest import read_store

    (first, second), _, _, K0 = write_halves(tmp_path, ".h5", K=60, subspaces=2)
    url_first, url_second = bucket.upload(first), bucket.upload(second)
    store = bucket.url("store.zarr")
    run_inprocess("cluster", url_first, "-o", store, *RUN, "--encoding", "plain", "--guarantee",
                  "cluster", check=0)
    before = read_store(bucket.published("store.zarr"))
    report = run_inprocess("append", store, url_second, "--json", check=0).json()
    after = read_store(bucket.published("store.zarr"))
    assert after.attrs["format"] == "matclust/1" and report["append"]["joined"] > 0
    mats = load_input(first)[0] + load_input(second)[0]
    for c, cl in enumerate(after.clusters):
        stored = cl["basis"].astype(float) @ cl["coefficients"] if "basis" in cl \
            else cl["raw"].astype(float)
        block = np.concatenate([mats[i] for i in cl["members"]], axis=1).astype(float)
        assert np.linalg.norm(block - stored) <= EPS * np.linalg.norm(block)
        if c < len(before.clusters) and "coefficients" in cl:
            old = before.clusters[c]["coefficients"]
            np.testing.assert_array_equal(cl["coefficients"][:, :old.shape[1]], old)
    assert sorted(np.concatenate([cl["members"] for cl in after.clusters])) == \
        list(range(len(mats)))
    assert run_inprocess("verify", store, "--json", check=0).json()["ok"]


def test_whole_code_chunks_are_copied_into_the_new_generation(tmp_path, monkeypatch):
    """A store at a URL whose codes fill more than one chunk: the new generation gets the old
    generation's whole chunk objects byte for byte (copied compressed through zarr's store),
    and every old matrix decodes as before."""
    import uuid

    import fsspec

    import matclust.format2
    import matclust.store
    from matclust.api import MatrixClusterer
    from matclust.append import append_to_store
    from matclust.collections_io import write_collection
    from matclust.sources import open_source

    copies = []

    def spy(source, target, count):
        copies.append((count, matclust.store.copy_compressed_chunks(source, target, count)))
        return copies[-1][1]

    monkeypatch.setattr(matclust.format2, "copy_compressed_chunks", spy)
    noise = np.random.default_rng(4).standard_normal((2160, 32, 16)).astype(np.float32)
    first, second = os.fspath(tmp_path / "first.zarr"), os.fspath(tmp_path / "second.zarr")
    write_collection(first, noise[:2100])  # 2100 x 512 codes stored alone: one whole chunk
    write_collection(second, noise[2100:])
    root = f"mc-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    store = f"memory://{root}/store.zarr"

    def published():
        generation = json.loads(fs.cat_file(f"/{root}/store.zarr/zarr.json"))["attributes"]
        return f"/{root}/store.zarr/{generation['generation']}"

    try:
        MatrixClusterer(rank=3, eps=EPS).fit(open_source(first), store)
        before = published()
        chunk = fs.cat_file(f"{before}/codes/c/0")
        _, _, decoded_before = decode_compact(f"memory:/{before}")
        append_to_store(store, second)
        after = published()
        assert after != before and copies == [(1, True)]
        assert fs.cat_file(f"{after}/codes/c/0") == chunk
        _, _, decoded = decode_compact(f"memory:/{after}")
        for a, b in zip(decoded[:2100], decoded_before):
            np.testing.assert_array_equal(a, b)
        check_compact(f"memory:/{after}", list(noise), EPS)
    finally:
        fs.rm(f"/{root}", recursive=True)
