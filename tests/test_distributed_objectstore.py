"""A sharded run over an input in an object store (moto's S3 server, tests/s3_server.py)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("dask.distributed")

from conftest import check_compact, run_inprocess, write_planted  # noqa: E402
from test_distributed import EPS, RANK, _labels, _run  # noqa: E402


def test_shards_read_an_object_store_input(bucket, tmp_path):
    """Each task opens the input again at its URL (the source's reopen, with the storage
    options and credentials of the run): in this process and on two worker processes alike,
    the second writing its result to the object store too."""
    path, mats, _ = write_planted(tmp_path / "in.h5", K=120, m=12, n=4, subspaces=4, rank=2,
                                  dtype="float32", seed=2)
    url = bucket.upload(path)
    args = ("--rank", RANK, "--eps", EPS, "--shards", 3, "--quiet")
    run_inprocess("cluster", url, "-o", tmp_path / "here.zarr", *args, check=0)
    _run("cluster", url, "-o", bucket.url("there.zarr"), *args, "--workers", 2)
    # The published generation, fetched as it is stored.
    bucket.fs.get(bucket.published("there.zarr")[len("s3://"):], str(tmp_path / "there.zarr"),
                  recursive=True)
    assert np.array_equal(_labels(tmp_path / "here.zarr"), _labels(tmp_path / "there.zarr"))
    check_compact(tmp_path / "there.zarr", mats, EPS, "matrix")
