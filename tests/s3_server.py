"""A real S3 API server (moto's) on 127.0.0.1 for the tests of URLs, and helpers around it.

tests/conftest.py loads this module as a plugin, so its fixtures are defined once: the first
test that asks for the server starts it, and it is stopped at the end of the session (s3fs
caches its filesystems, endpoint included, across tests: one server for all of them). What a
bucket holds is inspected with fsspec directly, independently of matclust.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

#: Lease of the lock of runs that get killed: short, so that a test can wait it out, and
#: long enough for the next command to meet it on a busy machine.
LEASE = 5.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free port of 127.0.0.1, for every test of the session."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    port = _free_port()
    script = os.path.join(os.path.dirname(sys.executable), "moto_server")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "moto.server"]
    server = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None, "the S3 server exited at start-up"
                assert time.monotonic() < deadline, "the S3 server did not start in 30 s"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


class Bucket:
    """A fresh bucket on the server, and the fsspec filesystem the test inspects it with."""

    def __init__(self, fs, name: str):
        self.fs, self.name = fs, name

    def url(self, key: str) -> str:
        return f"s3://{self.name}/{key}"

    def upload(self, local) -> str:
        key = os.path.basename(os.fspath(local))
        self.fs.put(os.fspath(local), f"{self.name}/{key}", recursive=os.path.isdir(local))
        return self.url(key)

    def entries(self, key: str) -> list[str]:
        self.fs.invalidate_cache()
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.name}/{key}",
                                                                    detail=False))
        except FileNotFoundError:
            return []

    def pointer(self, key: str) -> dict | None:
        """The attributes of the root zarr.json at ``key`` (None when there is none)."""
        self.fs.invalidate_cache()
        try:
            return json.loads(self.fs.cat_file(f"{self.name}/{key}/zarr.json"))["attributes"]
        except FileNotFoundError:
            return None

    def published(self, key: str) -> str:
        """The URL of the generation the root pointer at ``key`` names."""
        attrs = self.pointer(key)
        assert attrs is not None and attrs["complete"] is True, attrs
        return self.url(f"{key}/{attrs['generation']}")


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # checkpoints of URL outputs
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    name = f"mc-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return Bucket(fs, name)


def spawn_matclust(command: str, *args, lease: float = LEASE) -> subprocess.Popen:
    """``matclust COMMAND ARGS`` in a child process (to be killed), with the lock's lease."""
    env = {**os.environ, "MATCLUST_LOCK_LEASE": str(lease)}
    return subprocess.Popen([sys.executable, "-m", "matclust", command, *map(str, args)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, what: str, proc=None, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def writing_generation(bucket, key, other):
    """A generation under ``key`` other than ``other`` whose clusters are being written."""
    for name in bucket.entries(key):
        if name.startswith("gen-") and name != other and \
                "clusters" in bucket.entries(f"{key}/{name}"):
            return name
    return None
