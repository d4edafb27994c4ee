"""Crash safety around one output: a lock per output and a checkpoint to resume from.

A run writing OUTPUT holds, from start to end, three hidden siblings (``store.hidden_sibling``):

* ``.NAME.matclust-lock``: an exclusive ``flock`` on an open descriptor. The kernel releases it
  when the process ends, however it ends (``kill -9`` included), so a lock is never stale; a
  second run writing the same OUTPUT meanwhile fails at once (exit 2) naming the holder's pid.
* ``.NAME.matclust-tmp-<pid>``: the store being written (``store.ResultWriter``). Once the lock
  is held, temporaries of killed runs are removed (``store.clean_leftovers``).
* ``.NAME.matclust-ckpt``: an append-only log of the clusters formed so far, in order. After a
  crash, ``--resume`` rebuilds those clusters from the input (the exact basis is recomputed:
  a half-written temporary store is never reopened), tells the driver which matrices are taken
  (``GreedyDriver.restore``) and continues; the driver is deterministic, so the result equals an
  uninterrupted run's. The log is removed when the run succeeds.

A sharded run (``--shards``, ``--workers``, ``--scheduler``) records each shard's plan instead,
once the shard is planned: after a crash ``--resume`` plans only the shards missing from the
log, then merges and stores as an uninterrupted run does (planning is most of such a run;
the merge and the store stage are run again).

Log format: ``MAGIC``, then records ``u32 length | u32 crc32(payload) | payload``. The first
payload is ``b"H"`` + a JSON header (the parameters that shape the clustering and the input's
identity); each further one is ``b"C"`` + ``<qBd`` (cluster id, grew, bound or NaN for a
patience singleton) + the members as little-endian int64, or, in a sharded run's log,
``b"S"`` + ``<I`` (the shard's number) + its plan (``matclust.stages.plan_bytes``: NumPy's npz,
read back without pickle). Records are written unbuffered (a ``kill -9`` loses none) and
fsync'd about once a second (a shard's plan at once; a power cut loses at most that). A
short record or a bad checksum (a torn write) ends the log; it is cut off before appending.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import time
import zlib
from typing import Iterator

import numpy as np

from matclust.errors import InputError, WriteFailure
from matclust.locations import is_url
from matclust.store import clean_leftovers, hidden_sibling

logger = logging.getLogger(__name__)

MAGIC = b"MATCLUST-CKPT-1\n"
_FRAME = struct.Struct("<II")
_CLUSTER = struct.Struct("<qBd")
_SHARD = struct.Struct("<I")
#: Seconds between fsyncs of the log.
FSYNC_SECONDS = 1.0
#: Parameters that do not shape the clustering; every other one must be the same to resume
#: (the input is compared through its identity). A run killed for memory can thus be resumed
#: with another --memory-limit.
IGNORED_PARAMS = ("input", "memory_limit", "config")


# ---------------------------------------------------------------------------------------------
# The guard: lock + leftovers + checkpoint, for the duration of one run
# ---------------------------------------------------------------------------------------------
class OutputGuard:
    """Held while a run writes ``output``: the lock, cleanup of dead runs' temporaries, and
    the checkpoint (see the module docstring). Use as a context manager around the run.

    On success the checkpoint is removed; on a bad-input error (:class:`InputError`) too, since
    there is nothing to resume; on any other failure it is kept for ``resume``.
    """

    def __new__(cls, output, *args, **kwargs):
        # A URL is guarded by matclust.objectstore's subclass (a lease-based lock object).
        if cls is OutputGuard and is_url(output):
            from matclust.objectstore import RemoteOutputGuard

            cls = RemoteOutputGuard
        return super().__new__(cls)

    def __init__(self, output, resume: bool = False):
        self.output = os.fspath(output)
        self.path = os.path.abspath(self.output)
        self.resume = bool(resume)
        self.lock_path = hidden_sibling(self.path, "lock")
        self.log: CheckpointLog | None = None
        self._fd: int | None = None
        self._checkpoint_started = False  # this run created or opened its checkpoint file

    def __enter__(self) -> "OutputGuard":
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise InputError(f"{self.output}: the output's folder {parent} does not exist")
        self._fd = _acquire(self.lock_path, self.output)
        try:
            clean_leftovers(self.path)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.log is not None:
                self.log.close()
                if exc_type is None or issubclass(exc_type, InputError):
                    self.log.remove()
            if exc_type is not None and issubclass(exc_type, WriteFailure):
                self._after_write_failure(exc)
        finally:
            self._release()
        return False

    def _after_write_failure(self, exc: WriteFailure) -> None:
        """The disk filled up: keep a checkpoint that holds clusters, and say so (the user
        frees space and resumes); remove one that holds nothing worth resuming."""
        path = hidden_sibling(self.path, "ckpt")
        kept = self.log.kept if self.log is not None else ""
        if kept:
            raise WriteFailure(f"{exc}; the {kept} made so far are kept in "
                               f"{path}: free some space and run again with --resume to "
                               "continue from them") from None
        if self._checkpoint_started:
            try:
                os.unlink(path)
            except OSError:
                pass

    def checkpoint(self, params: dict, source, norms2: np.ndarray) -> "CheckpointLog":
        """Open the checkpoint: continue its log with ``resume`` (after checking that the
        parameters and the input are the same), else start a new one."""
        header = {"params": {k: v for k, v in params.items() if k not in IGNORED_PARAMS},
                  "input": input_identity(source, norms2)}
        header = json.loads(json.dumps(header))  # compared with one read back from JSON
        self._checkpoint_started = True
        self.log = CheckpointLog.open(hidden_sibling(self.path, "ckpt"), header, self.resume,
                                      source.K, self.output)
        return self.log

    def _release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)  # still ours: a waiting run re-checks the inode
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _acquire(lock_path: str, output: str) -> int:
    """Take the exclusive lock at ``lock_path``; InputError naming the holder when taken."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InputError(f"{output}: cannot create the lock file {lock_path}: "
                             f"{exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(f"{output} is being written by another matclust run "
                                 f"(pid {holder})") from None
            raise
        # The holder we waited on may have unlinked the file before we locked it: only the
        # file still at lock_path counts.
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


# ---------------------------------------------------------------------------------------------
# The input's identity
# ---------------------------------------------------------------------------------------------
def _digest(array: np.ndarray) -> str:
    import hashlib  # here: loading OpenSSL takes 2.5 ms, which only a checkpointed run needs

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:32]


def _stamp(path: str) -> dict:
    """Size and modification time of a file, or of a directory tree (a Zarr store)."""
    if os.path.isfile(path):
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    size, mtime = 0, os.stat(path).st_mtime_ns
    for dirpath, _, filenames in os.walk(path):
        mtime = max(mtime, os.stat(dirpath).st_mtime_ns)
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name))
            size += st.st_size
            mtime = max(mtime, st.st_mtime_ns)
    return {"size": size, "mtime_ns": mtime}


def input_identity(source, norms2: np.ndarray | None) -> dict:
    """What must not change between a run and its resumption: where the collection is, its
    shape and dtype, the file's size and mtime, and a digest of every matrix's norm (none for
    a sharded run, whose client does not read the matrices before its shards are planned)."""
    path = source.path
    ident = {"path": os.path.realpath(path) if os.path.exists(path) else path,
             "dataset": source.dataset, "transpose": bool(source.transpose),
             "K": int(source.K), "m": int(source.m), "dtype": str(source.input_dtype),
             "widths": _digest(np.asarray(source.widths, dtype="<i8"))}
    if norms2 is not None:
        ident["norms"] = _digest(np.asarray(norms2, dtype="<f8"))
    if os.path.exists(path):
        ident.update(_stamp(path))
    return ident


def _mismatch(old: dict, new: dict) -> str | None:
    """The first difference between two headers, in words; None when they agree."""
    old_params = old.get("params", {})
    for key in sorted(set(old_params) | set(new["params"])):
        a, b = old_params.get(key), new["params"].get(key)
        if a != b:
            why = f"it was written with {key} = {a!r}, this run has {b!r}"
            if key == "shards" and a is not None and b is not None:
                # The default count follows the workers: other workers, another count.
                why += f" (pass --shards {a} to resume it on these workers)"
            return why
    oi, ni = old.get("input", {}), new["input"]
    if oi.get("path") != ni.get("path"):
        return f"it was written for the input {oi.get('path')}, this run reads {ni.get('path')}"
    for key in ("dataset", "transpose", "K", "m", "dtype", "widths"):
        if oi.get(key) != ni.get(key):
            return f"the input's {key} changed ({oi.get(key)!r} -> {ni.get(key)!r})"
    if (oi.get("size"), oi.get("mtime_ns")) != (ni.get("size"), ni.get("mtime_ns")):
        return f"the input {ni.get('path')} was modified since (size or modification time differ)"
    if oi.get("norms") != ni.get("norms"):
        return "the input's matrices changed since (their norms differ)"
    return None


# ---------------------------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------------------------
def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(end offset, payload) of every intact record after MAGIC; stops at a torn one."""
    pos = len(MAGIC)
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        start, end = pos + _FRAME.size, pos + _FRAME.size + length
        if end > len(data) or zlib.crc32(data[start:end]) != crc:
            return
        yield end, data[start:end]
        pos = end


def read_log(path: str, K: int):
    """(header, entries, valid length, shard plans) of a checkpoint, or None when there is no
    usable one.

    ``entries``: [(members, grew, bound or None)], in formation order, up to the first torn or
    inconsistent record; ``shard plans``: {shard number: its plan's bytes} (a sharded run's)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    if not data.startswith(MAGIC):
        return None
    header, entries, valid, shards = None, [], len(MAGIC), {}
    taken = np.zeros(K, dtype=bool)
    for end, payload in _records(data):
        if header is None:
            if payload[:1] != b"H":
                return None
            try:
                header = json.loads(payload[1:].decode())
            except ValueError:
                return None
        elif payload[:1] == b"S" and len(payload) > 1 + _SHARD.size and not entries:
            shards[_SHARD.unpack_from(payload, 1)[0]] = payload[1 + _SHARD.size:]
        else:
            if payload[:1] != b"C" or (len(payload) - 1 - _CLUSTER.size) % 8 or shards:
                break
            cid, grew, bound = _CLUSTER.unpack_from(payload, 1)
            members = np.frombuffer(payload, dtype="<i8", offset=1 + _CLUSTER.size).astype(np.int64)
            if (cid != len(entries) or len(members) == 0 or members.min() < 0
                    or members.max() >= K or taken[members].any()
                    or len(np.unique(members)) != len(members)):
                break
            taken[members] = True
            entries.append((members, bool(grew), None if np.isnan(bound) else float(bound)))
        valid = end
    if header is None:
        return None
    return header, entries, valid, shards


class CheckpointLog:
    """The append-only log of formed clusters of one run (see the module docstring)."""

    def __init__(self, path: str, fd: int, restored: list, shard_plans: dict | None = None):
        self.path = path
        self._fd = fd
        #: [(members, grew, bound)] read back from an interrupted run's log (resume only).
        self.restored = restored
        #: {shard number: plan bytes} read back from an interrupted sharded run's log.
        self.shard_plans = dict(shard_plans or {})
        self._count = len(restored)
        self._shards = len(self.shard_plans)
        self._synced = time.monotonic()

    @property
    def kept(self) -> str:
        """What the log holds, in words ("12 clusters", "3 shard plans"); empty when nothing."""
        if self._shards:
            return f"{self._shards} shard plan{'s' if self._shards > 1 else ''}"
        return f"{self._count} clusters" if self._count else ""

    @classmethod
    def open(cls, path: str, header: dict, resume: bool, K: int, output: str) -> "CheckpointLog":
        found = read_log(path, K) if resume else None
        if found is not None:
            old_header, entries, valid, shard_plans = found
            why = _mismatch(old_header, header)
            if why is not None:
                raise InputError(f"{output}: cannot resume from the checkpoint {path}: {why}; "
                                 "run without --resume to start over")
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            os.ftruncate(fd, valid)  # drop a torn last record before appending
            os.lseek(fd, 0, os.SEEK_END)
            if shard_plans:
                logger.info("resuming from %s: %d shard plans made before", path,
                            len(shard_plans))
            else:
                logger.info("resuming from %s: %d clusters formed before", path, len(entries))
            return cls(path, fd, entries, shard_plans)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        log = cls(path, fd, [])
        log._write(MAGIC + _frame(b"H" + json.dumps(header, sort_keys=True).encode()))
        os.fsync(fd)
        return log

    def clusters(self, driver) -> Iterator:
        """The driver's clusters, in order: first those of the log (rebuilt from the input),
        then new ones, each recorded before it is handed on."""
        driver.restore([(members, grew) for members, grew, _ in self.restored])
        for members, grew, bound in self.restored:
            cluster = driver.rebuild(members, bound, grew)
            if driver.progress:
                driver.progress(len(members))
            yield cluster
        for cluster in driver.clusters():
            self.record(cluster)
            yield cluster

    def record(self, cluster) -> None:
        """Append one formed cluster (members, grew, bound)."""
        bound = float("nan") if cluster.bound is None else float(cluster.bound)
        members = np.asarray(cluster.members, dtype="<i8")
        payload = b"C" + _CLUSTER.pack(self._count, bool(cluster.grew), bound) + members.tobytes()
        self._write(_frame(payload))
        self._count += 1
        now = time.monotonic()
        if now - self._synced >= FSYNC_SECONDS:
            os.fsync(self._fd)
            self._synced = now

    def record_shard(self, index: int, plan: bytes) -> None:
        """Append shard ``index``'s plan (a sharded run; see the module docstring), durable at
        once: it stands for minutes of a worker's planning."""
        self._write(_frame(b"S" + _SHARD.pack(index) + plan))
        self._shards += 1
        os.fsync(self._fd)
        self._synced = time.monotonic()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
