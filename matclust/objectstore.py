"""Result stores at URLs (object stores): atomic publication without rename, and a lock.

An object store has no rename and no ``flock``, so a result at ``OUTPUT`` (a URL; always Zarr)
is laid out as follows (docs/objectstores.md says what each store kind guarantees)::

    OUTPUT/zarr.json          the root pointer: a Zarr group whose attributes are
                              {"format", "complete": true, "generation": "gen-..."}
    OUTPUT/gen-<time>-<hex>/  one complete result store (the layout of docs/format.md)
    OUTPUT/.matclust-lock     present while a run writes OUTPUT

A run writes its result under a fresh generation prefix, sets that store's own ``complete``
attribute last, then switches the root pointer with one PUT (an object is replaced whole:
readers see the old pointer or the new one) and only then deletes the previous generation.
Readers follow the pointer and never take a store without it: a killed run leaves a
generation nothing points to (removed by the next run on OUTPUT), and an old result stays
readable until the new one is complete. A store uploaded as is (the root holds the result
itself, no ``generation``) is read from the root.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import warnings

from matclust.checkpoint import OutputGuard
from matclust.errors import InputError, WriteFailure
from matclust.locations import (filesystem, is_hdf5_url, join, open_file, protocol,
                                refuse_read_only, remote_errors, zarr_store)
from matclust.safety import _CHUNK_KEY, _ZARR_METADATA, RESULT_FORMAT_PREFIX, exists_error
from matclust.store import FORMAT, ResultWriter, _Hdf5Backend, _ZarrBackend

logger = logging.getLogger(__name__)

POINTER = "zarr.json"
LOCK = ".matclust-lock"
_GENERATION = re.compile(r"gen-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")
#: Protocols whose servers take S3's conditional writes (If-None-Match / If-Match) through s3fs.
_CONDITIONAL = ("s3", "s3a")
#: Object stores whose first path component is a bucket (or container) that must exist.
_BUCKETED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
#: Seconds a lock stays valid without renewal (the holder renews it every quarter of that).
#: A lock left by a killed run blocks OUTPUT this long. Environment: MATCLUST_LOCK_LEASE.
DEFAULT_LEASE = 60.0


def lease_seconds() -> float:
    try:
        value = float(os.environ.get("MATCLUST_LOCK_LEASE", DEFAULT_LEASE))
    except ValueError:
        raise InputError("MATCLUST_LOCK_LEASE: not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise InputError("MATCLUST_LOCK_LEASE: must be a positive number of seconds")
    return value


def new_generation() -> str:
    return f"gen-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


class RemoteOutput:
    """The objects under one OUTPUT URL: its pointer, generations and lock."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.path = filesystem(self.url)
        self.path = self.path.rstrip("/")

    def key(self, name: str) -> str:
        return join(self.path, name)

    # -- what is there ---------------------------------------------------------------------
    def root_attrs(self) -> dict | None:
        """The attributes of the root ``zarr.json``; None when there is none."""
        with remote_errors(self.url, "read the store's root"):
            try:
                data = self.fs.cat_file(self.key(POINTER))
            except FileNotFoundError:
                return None
        try:
            doc = json.loads(data)
        except ValueError:
            return {}
        attrs = doc.get("attributes", {}) if isinstance(doc, dict) else {}
        return attrs if isinstance(attrs, dict) else {}

    def entries(self) -> list[str]:
        """Names directly under OUTPUT (objects and prefixes); empty when there are none."""
        self.fs.invalidate_cache(self.path)
        with remote_errors(self.url, "list the store"):
            try:
                return sorted(_basename(p) for p in self.fs.ls(self.path, detail=False)
                              if p.rstrip("/") != self.path)
            except (FileNotFoundError, NotADirectoryError):
                return []

    def is_object(self) -> bool:
        with remote_errors(self.url, "look up the output"):
            try:
                return self.fs.isfile(self.path)
            except FileNotFoundError:
                return False

    def foreign_objects(self, limit: int = 3) -> list[str]:
        """Objects under OUTPUT that are neither Zarr metadata, chunks nor the lock."""
        self.fs.invalidate_cache(self.path)
        found = []
        with remote_errors(self.url, "list the store"):
            for full in self.fs.find(self.path):
                name = _basename(full)
                if name not in _ZARR_METADATA and not _CHUNK_KEY.fullmatch(name) and name != LOCK:
                    found.append(full[len(self.path):].lstrip("/"))
                    if len(found) >= limit:
                        break
        return found

    def missing_root(self) -> InputError:
        """The error for a URL with no root ``zarr.json``: leftovers of a run, or nothing."""
        entries = self.entries()
        if entries and all(_GENERATION.fullmatch(e) or e == LOCK for e in entries):
            return InputError(f"{self.url}: incomplete result store: no complete result was "
                              "published there (a matclust run writing it was interrupted or "
                              "is still running)")
        if entries:
            return InputError(f"{self.url}: not a Zarr store or HDF5 file (no zarr.json at its "
                              f"root; it holds {', '.join(entries[:5])})")
        return InputError(f"{self.url}: no such file, object or store")

    # -- may it be written? ----------------------------------------------------------------
    def check_target(self, overwrite: bool, what: str = "output") -> None:
        """The rules of matclust.safety.check_target for a URL: its bucket must exist; what is
        there needs ``overwrite`` and must be a matclust result with nothing else in it. The
        leftovers of a killed run (generations nothing points to, a lock) count as nothing."""
        refuse_read_only(self.url, what)
        if is_hdf5_url(self.url):
            raise InputError(f"{self.url}: an HDF5 result cannot be written to an object store "
                             "(HDF5 needs a seekable local file and a rename to replace a "
                             "result atomically): name the output without .h5/.hdf5 to write "
                             "Zarr, or write a local file and upload it")
        if protocol(self.url) in _BUCKETED:
            bucket = self.path.split("/", 1)[0]
            with remote_errors(self.url, "look up the bucket"):
                try:
                    self.fs.info(bucket)
                except FileNotFoundError:
                    raise InputError(f"{self.url}: the bucket '{bucket}' does not exist") \
                        from None
            if "/" not in self.path:
                raise InputError(f"{self.url}: name a prefix inside the bucket "
                                 f"(e.g. {self.url.rstrip('/')}/result.zarr)")
        if self.is_object():
            if not overwrite:
                raise exists_error(self.url, what)
            raise InputError(f"{self.url}: {what} is an object, not a matclust result store; "
                             "--overwrite replaces nothing else")
        if all(_GENERATION.fullmatch(e) or e == LOCK for e in self.entries()):
            return  # nothing there, or only what killed runs left (cleaned under the lock)
        if not overwrite:
            raise exists_error(self.url, what)
        attrs = self.root_attrs()
        if attrs is None or not str(attrs.get("format", "")).startswith(RESULT_FORMAT_PREFIX):
            raise InputError(f"{self.url}: {what} holds objects that are not a matclust result "
                             "store; --overwrite replaces nothing else (remove them yourself "
                             "or choose another URL)")
        foreign = self.foreign_objects()
        if foreign:
            raise InputError(f"{self.url}: {what} also holds objects matclust did not write "
                             f"({', '.join(foreign)}); --overwrite would delete them")

    # -- publishing ------------------------------------------------------------------------
    def publish(self, generation: str, fmt: str) -> None:
        """Point the root at ``generation``: one PUT of a small Zarr group document."""
        doc = {"zarr_format": 3, "node_type": "group",
               "attributes": {"format": fmt, "complete": True, "generation": generation}}
        with remote_errors(self.url, "publish the result (write the root pointer)"):
            self.fs.pipe_file(self.key(POINTER), json.dumps(doc, indent=2).encode())
        logger.info("published %s as the result at %s", generation, self.url)

    def remove_stale(self, keep: str) -> list[str]:
        """Delete what the pointer, now naming ``keep``, does not point to: old generations,
        and a replaced store's own arrays at the root (check_target established that matclust
        wrote them)."""
        removed = []
        for name in self.entries():
            if name in (POINTER, LOCK, keep):
                continue
            try:
                self.fs.rm(self.key(name), recursive=True)
                removed.append(name)
            except FileNotFoundError:
                pass
        if removed:
            logger.info("removed %s from %s", ", ".join(removed), self.url)
        return removed

    def clean_leftovers(self) -> list[str]:
        """Generations that no pointer names (killed runs'); call only while holding the lock."""
        attrs = self.root_attrs() or {}
        current = attrs.get("generation")
        removed = []
        for name in self.entries():
            if _GENERATION.fullmatch(name) and name != current:
                with remote_errors(self.url, "remove a killed run's leftovers"):
                    self.fs.rm(self.key(name), recursive=True)
                removed.append(name)
        return removed


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def open_result_backend(url: str):
    """The backend of the result published at ``url`` (following the root pointer), for
    ResultStore; InputError when nothing complete is published there."""
    if is_hdf5_url(url):  # an HDF5 result uploaded as one object
        fs, path = filesystem(url)
        with remote_errors(url, "open the result store"):
            if not fs.isfile(path):
                raise InputError(f"{url}: no such result store")
            return _Hdf5Backend(open_file(url), "r")
    output = RemoteOutput(url)
    attrs = output.root_attrs()
    if attrs is None:
        raise output.missing_root()
    generation = attrs.get("generation")
    if generation is None:  # a store uploaded as is: the result is the root itself
        with remote_errors(url, "open the result store"):
            return _ZarrBackend(zarr_store(output.url, read_only=True), "r")
    if not isinstance(generation, str) or not _GENERATION.fullmatch(generation) \
            or attrs.get("complete") is not True:
        raise InputError(f"{url}: damaged root pointer (generation {generation!r}, complete "
                         f"{attrs.get('complete')!r})")
    with remote_errors(url, "open the result store"):
        return _ZarrBackend(zarr_store(join(output.url, generation), read_only=True), "r")


def published_bytes(url: str) -> int:
    """Bytes of the result published at ``url``: the generation its pointer names, or the
    root of a store uploaded as is."""
    output = RemoteOutput(url)
    generation = (output.root_attrs() or {}).get("generation")
    key = output.key(generation) if isinstance(generation, str) else output.path
    output.fs.invalidate_cache(key)
    with remote_errors(url, "measure the result store"):
        return int(output.fs.du(key))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
#: Packages whose exceptions are failures of the store or of the way to it.
_STORE_PACKAGES = ("botocore", "aiobotocore", "aiohttp", "fsspec", "s3fs", "gcsfs", "adlfs",
                   "azure", "google")


def _is_store_failure(exc: BaseException) -> bool:
    if isinstance(exc, (InputError, WriteFailure)) or not isinstance(exc, Exception):
        return False
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _STORE_PACKAGES


class RemoteResultWriter(ResultWriter):
    """ResultWriter for a URL: the store is written under a new generation prefix and
    published by the root pointer (module docstring) instead of a rename."""

    def __init__(self, path, overwrite: bool = False, fmt: str = FORMAT):
        self.name = self.path = str(path).rstrip("/")
        self.overwrite = overwrite
        self.output = RemoteOutput(self.path)
        self.output.check_target(overwrite)
        self.generation = new_generation()
        self.temp = join(self.path, self.generation)
        self._fmt = fmt
        try:
            with remote_errors(self.temp, "create the result store"):
                self._backend = _ZarrBackend(zarr_store(self.temp, read_only=False), "w")
                self._backend.set_attr("format", fmt)
                self._backend.set_attr("complete", False)
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """Remove the generation; a failure of the store itself (unreachable, refused) becomes
        one WriteFailure naming OUTPUT."""
        self.abort()
        if not _is_store_failure(exc):
            raise exc
        # zarr's writes still pending in its I/O thread are dropped at exit, each with a
        # warning that would follow the error line.
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        raise WriteFailure(f"{self.path}: the output could not be written "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); "
                           "nothing was published") from None

    def _stored_bytes(self) -> int:
        self.output.fs.invalidate_cache(self.output.key(self.generation))
        with remote_errors(self.temp, "measure the result store"):
            return int(self.output.fs.du(self.output.key(self.generation)))

    def commit(self) -> None:
        with remote_errors(self.temp, "complete the result store"):
            self._stop_background_checked()
            self._backend.set_attr("complete", True)
            self._backend.close()
        self.output.check_target(self.overwrite)  # what is there may have changed meanwhile
        lock = HELD_LOCKS.get(self.output.url)
        if lock is not None:
            lock.confirm()  # never publish after another run may have taken OUTPUT over
        self.output.publish(self.generation, self._fmt)
        try:
            self.output.remove_stale(keep=self.generation)
        except Exception as exc:  # published: the old generation is removed by the next run
            logger.warning("%s: the previous result could not be removed (%s); the next run "
                           "on it removes it", self.path, exc)

    def abort(self) -> None:
        logger.debug("aborted: removing the unfinished %s", self.temp)
        self._stop_background()
        fs, key = self.output.fs, self.output.key(self.generation)
        # A write interrupted by a signal goes on in zarr's I/O thread and may land after the
        # first removal: look again a little later (the next run on OUTPUT would remove it).
        for pause in (0.0, 0.2, 0.5):
            time.sleep(pause)
            try:
                fs.invalidate_cache(key)
                if pause and not fs.find(key):
                    return
                fs.rm(key, recursive=True)
            except FileNotFoundError:
                pass
            except Exception:  # unreachable store: the next run on OUTPUT removes it
                return


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------
def _precondition_failed(exc: OSError) -> bool:
    """A conditional write refused: the object is gone, or it is not the one we saw (s3fs
    turns S3's 412 for If-Match into EINVAL)."""
    return isinstance(exc, FileNotFoundError) or exc.errno == errno.EINVAL


#: The locks this process holds, by OUTPUT URL (the writer confirms its run still holds one).
HELD_LOCKS: dict[str, "RemoteLock"] = {}


class RemoteLock:
    """``OUTPUT/.matclust-lock``, created with an exclusive put and renewed while held.

    The object store cannot release a lock when its holder dies, so the lock is a lease: its
    holder rewrites it every quarter of :func:`lease_seconds`, and a lock not renewed for that
    long (its holder was killed) is taken over. On S3 creation and takeover are conditional
    puts (``If-None-Match: *``, ``If-Match: <ETag>``): of two runs exactly one gets the lock.
    Elsewhere fsspec's exclusive create is used where the filesystem has one, else a test of
    existence before the put (a narrow race; docs/objectstores.md).
    """

    def __init__(self, output: RemoteOutput):
        self.output = output
        self.key = output.key(LOCK)
        self.url = join(output.url, LOCK)
        self.run = secrets.token_hex(8)
        self.lease = lease_seconds()
        self.conditional = protocol(output.url) in _CONDITIONAL
        self._etag = None
        self._stop = threading.Event()
        self._thread = None
        self.lost: str | None = None

    def _body(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run": self.run,
                           "renewed": time.time(), "lease": self.lease}).encode()

    def _read(self):
        """(body dict or None, ETag or None) of the lock object; (None, None) when absent."""
        fs = self.output.fs
        fs.invalidate_cache(self.key)
        try:
            info = fs.info(self.key)
            data = fs.cat_file(self.key)
        except FileNotFoundError:
            return None, None
        try:
            body = json.loads(data)
        except ValueError:
            body = {}
        return (body if isinstance(body, dict) else {}), info.get("ETag")

    def _create(self) -> bool:
        """Create the lock object if there is none; False when one exists."""
        try:
            out = self.output.fs.pipe_file(self.key, self._body(), mode="create")
        except FileExistsError:
            return False
        self._etag = out.get("ETag") if isinstance(out, dict) else None
        return True

    def acquire(self) -> "RemoteLock":
        with remote_errors(self.output.url, "take the output's lock"):
            if not self._create():
                body, etag = self._read()
                if body is None:  # released meanwhile
                    if not self._create():
                        raise self._held(*self._read())
                else:
                    age = time.time() - float(body.get("renewed", 0) or 0)
                    if age <= float(body.get("lease", self.lease) or self.lease):
                        raise self._held(body, etag)
                    self._take_over(body, etag)
        self._thread = threading.Thread(target=self._renew_loop, name="matclust-lock",
                                        daemon=True)
        self._thread.start()
        HELD_LOCKS[self.output.url] = self
        return self

    def _held(self, body, etag) -> InputError:
        body = body or {}
        age = time.time() - float(body.get("renewed", 0) or 0)
        lease = float(body.get("lease", self.lease) or self.lease)
        return InputError(
            f"{self.output.url} is being written by another matclust run (pid "
            f"{body.get('pid', 'unknown')} on {body.get('host', 'an unknown host')}; its lock "
            f"{self.url} was renewed {max(age, 0):.0f} s ago and expires {lease:.0f} s after "
            "its last renewal if that run is dead)")

    def _take_over(self, body, etag) -> None:
        logger.info("%s: taking over the lock of a dead run (pid %s on %s)", self.output.url,
                    body.get("pid"), body.get("host"))
        fs = self.output.fs
        if self.conditional and etag:
            try:
                out = fs.pipe_file(self.key, self._body(), IfMatch=etag)
            except OSError as exc:
                if not _precondition_failed(exc):
                    raise
                raise self._held(*self._read()) from None  # another run took it over first
            self._etag = out.get("ETag") if isinstance(out, dict) else None
            return
        try:
            fs.rm_file(self.key)
        except FileNotFoundError:
            pass
        if not self._create():
            raise self._held(*self._read())

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                self._renew()
            except Exception as exc:  # a network blip: the next renewal may succeed
                logger.warning("%s: could not renew the lock: %s", self.output.url, exc)

    def _renew(self) -> None:
        fs = self.output.fs
        if self.conditional and self._etag:
            try:
                out = fs.pipe_file(self.key, self._body(), IfMatch=self._etag)
            except OSError as exc:
                if not _precondition_failed(exc):
                    raise
                self.lost = "the lock object was replaced or removed by someone else"
                self._stop.set()
                return
            self._etag = out.get("ETag") if isinstance(out, dict) else None
            return
        body, _ = self._read()
        if body is None or body.get("run") != self.run:
            self.lost = "the lock object was replaced or removed by someone else"
            self._stop.set()
            return
        fs.pipe_file(self.key, self._body())

    def confirm(self) -> None:
        """Raise WriteFailure unless this run still holds the lock (checked on the store)."""
        if self.lost is None:
            with remote_errors(self.output.url, "check the output's lock"):
                body, _ = self._read()
            if body is None or body.get("run") != self.run:
                self.lost = "the lock object was replaced or removed by someone else"
        if self.lost is not None:
            raise WriteFailure(f"{self.output.url}: lost the output's lock ({self.lost}: was "
                               "the run paused longer than the lock's lease?); the result was "
                               "not published")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        HELD_LOCKS.pop(self.output.url, None)
        try:
            body, etag = self._read()
            if body is not None and body.get("run") == self.run:
                if self.conditional and etag and hasattr(self.output.fs, "call_s3"):
                    bucket, key, _ = self.output.fs.split_path(self.key)
                    self.output.fs.call_s3("delete_object", Bucket=bucket, Key=key,
                                           IfMatch=etag)
                    self.output.fs.invalidate_cache(self.key)
                else:
                    self.output.fs.rm_file(self.key)
        except Exception as exc:  # it expires by itself
            logger.warning("%s: could not remove the lock (%s); it expires after %.0f s",
                           self.output.url, exc, self.lease)


# ---------------------------------------------------------------------------------------------
# The guard of a run writing a URL
# ---------------------------------------------------------------------------------------------
def checkpoint_home(url: str) -> str:
    """A local stand-in path for OUTPUT, under which its checkpoint is kept: an object cannot
    be appended to, so the log of formed clusters stays on this machine (``--resume`` works
    from it). ``$XDG_CACHE_HOME/matclust/checkpoints/<hash of the URL>/output``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:20]
    folder = os.path.join(cache, "matclust", "checkpoints", digest)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "url"), "w") as fh:
            fh.write(url + "\n")
    except OSError as exc:
        raise InputError(f"{url}: cannot create the local checkpoint folder {folder}: "
                         f"{exc.strerror or exc}") from None
    return os.path.join(folder, "output")


class RemoteOutputGuard(OutputGuard):
    """OutputGuard for a URL: the object-store lock instead of flock, a killed run's
    generations removed once it is held, and the checkpoint on this machine
    (:func:`checkpoint_home`)."""

    def __init__(self, output, resume: bool = False):
        super().__init__(output, resume)
        self.output = str(output).rstrip("/")
        self.path = checkpoint_home(self.output)  # the checkpoint is kept beside this path
        self._remote = RemoteOutput(self.output)
        self._lock: RemoteLock | None = None

    def __enter__(self) -> "RemoteOutputGuard":
        self._lock = RemoteLock(self._remote).acquire()
        try:
            removed = self._remote.clean_leftovers()
            if removed:
                logger.info("%s: removed what killed runs left: %s", self.output,
                            ", ".join(removed))
        except BaseException:
            self._release()
            raise
        return self

    def _after_write_failure(self, exc: WriteFailure) -> None:
        """The store failed: keep a checkpoint that holds clusters, and say so."""
        kept = self.log.kept if self.log is not None else ""
        if kept:
            raise WriteFailure(f"{exc}; the {kept} made so far are kept in "
                               f"{self.log.path}: run again with --resume once the store can "
                               "be reached to continue from them") from None
        super()._after_write_failure(exc)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
