"""The output store (README.md, "Output store"): HDF5 when the name ends in .h5/.hdf5, else Zarr.

Two layers: a tiny backend per format (attributes, arrays, strings) and the format-free
:class:`ResultWriter` / :class:`ResultStore` on top. Results are written into a temporary
sibling and renamed into place only when complete, so a crash never leaves a store that looks
like a result.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
from collections import OrderedDict
from typing import Any

import numpy as np

from matclust.errors import InputError
from matclust.locations import is_url
from matclust.safety import check_target, disk_full_reason, require_path, write_failure

logger = logging.getLogger(__name__)

#: The format this version writes (matclust/1 for --encoding plain, whose arrays are exactly
#: that layout, so older readers still take them), and every format it reads (docs/format.md).
FORMAT = "matclust/2"
PLAIN_FORMAT = "matclust/1"
READABLE_FORMATS = ("matclust/1", "matclust/2")

#: HDF5 groups the writer keeps open (the most recently used).
OPEN_GROUPS = 64


def is_hdf5_name(path) -> bool:
    return str(path).lower().endswith((".h5", ".hdf5"))


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
class _Backend:
    """What both formats share: path lookup in a root group that behaves like a mapping."""

    root: object

    def has(self, name: str) -> bool:
        return name in self.root

    def get(self, name: str):
        return self.root[name]

    def keys(self, name: str) -> list[str]:
        return list(self.root[name].keys()) if name in self.root else []


class RoomCheckedFile:
    """The file under an HDF5 store being written, seen by HDF5 through h5py's ``fileobj``
    driver: a write refused for lack of room (no space, file-size limit, quota) is recorded in
    :attr:`failure` and reported to HDF5 as done.

    With HDF5's own driver such a failure surfaces while HDF5 flushes its metadata cache, where
    h5py can only print it, and closing the file then crashed the process (SIGSEGV). Here HDF5
    never sees an error; the writer checks :attr:`failure` after every write and aborts."""

    def __init__(self, path: str):
        self._fh = open(path, "w+b", buffering=0)  # unbuffered: seek() must not flush a write
        self.failure: OSError | None = None

    def _attempt(self, action, *args):
        if self.failure is None:
            try:
                return action(*args)
            except OSError as exc:
                if disk_full_reason(exc) is None:
                    raise
                self.failure = exc
        return None

    def write(self, data) -> int:
        self._attempt(self._fh.write, data)
        return memoryview(data).nbytes

    def truncate(self, size=None):
        self._attempt(self._fh.truncate, size)
        return size

    def seek(self, *args):
        return self._fh.seek(*args)

    def tell(self):
        return self._fh.tell()

    def readinto(self, buffer):
        return self._fh.readinto(buffer)

    def read(self, *args):
        return self._fh.read(*args)

    def flush(self):
        self._attempt(self._fh.flush)

    def close(self):
        self._fh.close()


class _Hdf5Backend(_Backend):
    def __init__(self, path: str, mode: str):
        import h5py

        import hdf5plugin  # noqa: F401  (registers the zstd filter of compact stores)

        self._file = None
        if mode == "w":
            # The newest file format indexes large groups (one per cluster) with B-trees:
            # creating 14,000 clusters took 12 s with the default format.
            self._file = RoomCheckedFile(path)
            self.root = h5py.File(self._file, "w", libver="latest")
        else:
            self.root = h5py.File(path, mode)
        # The groups written to last, kept open. Not all of them: an open HDF5 group costs
        # about 1.2 KiB, 300 MiB for 250,000 clusters.
        self._groups: OrderedDict[str, object] = OrderedDict()

    @property
    def failure(self) -> OSError | None:
        return self._file.failure if self._file is not None else None

    def _parent(self, name: str):
        """The group holding ``name`` (created on first use, then cached), and the leaf name."""
        head, _, leaf = name.rpartition("/")
        if not head:
            return self.root, leaf
        group = self._groups.get(head)
        if group is None:
            import h5py

            parent, head_leaf = self._parent(head)
            # Low level, as in write(): require_group costs ~0.2 ms per cluster.
            group = parent[head_leaf] if head_leaf in parent \
                else h5py.Group(h5py.h5g.create(parent.id, head_leaf.encode()))
            self._groups[head] = group
            if len(self._groups) > OPEN_GROUPS:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(head)
        return group, leaf

    def set_attr(self, key: str, value) -> None:
        self.root.attrs[key] = value

    def attrs(self) -> dict:
        out = {}
        for key, value in self.root.attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, np.generic):
                value = value.item()
            out[key] = value
        return out

    def create(self, name: str, shape, dtype, chunks=None):
        group, leaf = self._parent(name)
        return group.create_dataset(leaf, shape=shape, dtype=dtype, chunks=chunks)

    def write(self, name: str, data: np.ndarray) -> None:
        # h5py's low-level calls: create_dataset spends ~0.2 ms in Python per array, most of
        # the writing time for small clusters. Same dataset: contiguous, no filters.
        from h5py import h5d, h5s, h5t

        group, leaf = self._parent(name)
        space = h5s.create_simple(data.shape) if data.ndim else h5s.create(h5s.SCALAR)
        dset = h5d.create(group.id, leaf.encode(), h5t.py_create(data.dtype, logical=True), space)
        if data.size:
            dset.write(h5s.ALL, h5s.ALL, data)

    def write_compressed(self, name: str, data: np.ndarray) -> None:
        group, leaf = self._parent(name)
        group.create_dataset(leaf, data=data, **_hdf5_compression(data))

    def create_appendable(self, name: str, dtype, chunk: int, shuffle: str = "bit"):
        group, leaf = self._parent(name)
        dtype = np.dtype(dtype)
        return _Hdf5Appendable(group.create_dataset(
            leaf, shape=(0,), maxshape=(None,), dtype=dtype,
            **{**_hdf5_compression(np.zeros(1, dtype), shuffle), "chunks": (chunk,)}))

    def write_strings(self, name: str, values) -> None:
        import h5py

        self.root.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())

    def read_strings(self, name: str) -> list[str]:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in self.root[name][...]]

    def flush(self) -> None:
        self.root.flush()

    def close(self) -> None:
        try:
            self.root.close()
        finally:
            if self._file is not None:
                self._file.close()


#: Compressed arrays up to this size are one chunk (HDF5 caps a chunk at 4 GiB).
WHOLE_CHUNK_BYTES = 64 << 20


def _hdf5_compression(data: np.ndarray, shuffle: str = "bit") -> dict:
    """Blosc with zstd after a bit shuffle (hdf5plugin's filter 32001): h5py reads it once
    hdf5plugin is imported. Bit shuffling puts the many all-zero high bits of small codes
    together (bench: 2 % fewer bytes than a byte shuffle on image patches). Scalars and empty
    arrays are stored plainly."""
    if data.ndim == 0 or data.size == 0:
        return {}
    import hdf5plugin

    from matclust.compact import ZSTD_LEVEL

    # One chunk where it is not large: h5py's own chunking cuts arrays into pieces of a few
    # KiB, each compressed alone.
    chunks = data.shape if data.nbytes <= WHOLE_CHUNK_BYTES else True
    mode = hdf5plugin.Blosc.BITSHUFFLE if shuffle == "bit" else hdf5plugin.Blosc.SHUFFLE
    return {"chunks": chunks, **hdf5plugin.Blosc(cname="zstd", clevel=ZSTD_LEVEL, shuffle=mode)}


class _Hdf5Appendable:
    def __init__(self, dataset):
        self.dataset = dataset

    def append(self, data: np.ndarray) -> None:
        n = self.dataset.shape[0]
        self.dataset.resize((n + len(data),))
        self.dataset[n:] = data


def copy_compressed_chunks(source, target, count: int) -> bool:
    """Append the first ``count`` chunks of the 1-D array ``source`` to the appendable
    ``target`` (empty so far) as they are stored, compressed, without decoding them (an append
    copying a store's codes). Only between arrays of one kind with the same dtype, chunk size
    and compression; False (nothing done) otherwise, and the caller copies the values."""
    if count <= 0:
        return True
    if isinstance(target, _Hdf5Appendable):
        import h5py

        dataset = target.dataset
        if not isinstance(source, h5py.Dataset) or dataset.shape[0] or \
                source.dtype != dataset.dtype or source.chunks != dataset.chunks or \
                source._filters != dataset._filters or source.shape[0] < count * source.chunks[0]:
            return False
        chunk = source.chunks[0]
        dataset.resize((count * chunk,))
        for k in range(count):
            mask, data = source.id.read_direct_chunk((k * chunk,))
            dataset.id.write_direct_chunk((k * chunk,), data, mask)
        return True
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr is a dependency
        return False
    if not isinstance(source, zarr.Array) or not isinstance(target, zarr.Array) or \
            target.shape[0] or source.dtype != target.dtype or source.chunks != target.chunks \
            or source.metadata.codecs != target.metadata.codecs \
            or source.shape[0] < count * source.chunks[0]:
        return False
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def copy():
        prototype = default_buffer_prototype()
        source_store, target_store = source.store_path, target.store_path
        for k in range(count):
            data = await (source_store / source.metadata.encode_chunk_key((k,))).get(prototype)
            if data is None:  # a chunk that is not stored: copy the values instead
                return False
            await (target_store / target.metadata.encode_chunk_key((k,))).set(data)
        return True

    target.resize((count * source.chunks[0],))
    if not sync(copy()):
        target.resize((0,))
        return False
    return True


def appendable_shuffle(array) -> str | None:
    """The shuffle, "bit" or "byte", of an array made by ``create_appendable`` (a compact
    store's codes) as its compression records it; None when it is compressed another way.
    Neither h5py nor zarr is imported for this: the array's own library already is."""
    h5py, zarr = sys.modules.get("h5py"), sys.modules.get("zarr")
    if h5py is not None and isinstance(array, h5py.Dataset):
        options = array._filters.get(str(BLOSC_FILTER), ())  # Blosc's: shuffle is the 6th
        return {2: "bit", 1: "byte"}.get(int(options[5])) if len(options) > 5 else None
    if zarr is not None and isinstance(array, zarr.Array):
        for codec in array.metadata.codecs:
            shuffle = getattr(getattr(codec, "shuffle", None), "value", None)
            if shuffle in ("bitshuffle", "shuffle"):
                return "bit" if shuffle == "bitshuffle" else "byte"
    return None


#: hdf5plugin's Blosc filter id (hdf5plugin.Blosc.filter_id).
BLOSC_FILTER = 32001


class _ZarrBackend(_Backend):
    def __init__(self, path: str, mode: str):
        import zarr

        self.root = zarr.open_group(path, mode=mode)

    def set_attr(self, key: str, value) -> None:
        self.root.attrs[key] = value

    def attrs(self) -> dict:
        return dict(self.root.attrs)

    def create(self, name: str, shape, dtype, chunks=None):
        return self.root.create_array(name, shape=shape, dtype=dtype, chunks=chunks or "auto")

    def write(self, name: str, data: np.ndarray) -> None:
        arr = self.create(name, data.shape, data.dtype)
        if data.size:
            arr[...] = data

    def write_compressed(self, name: str, data: np.ndarray) -> None:
        arr = self.root.create_array(name, shape=data.shape, dtype=data.dtype, chunks="auto",
                                     compressors=_zarr_compression(data.dtype))
        if data.size:
            arr[...] = data

    def create_appendable(self, name: str, dtype, chunk: int, shuffle: str = "bit"):
        return self.root.create_array(name, shape=(0,), dtype=dtype, chunks=(chunk,),
                                      compressors=_zarr_compression(np.dtype(dtype), shuffle))

    def write_strings(self, name: str, values) -> None:
        arr = self.root.create_array(name, shape=(len(values),), dtype=str)
        if len(values):
            arr[:] = np.array(values, dtype=str)

    def read_strings(self, name: str) -> list[str]:
        return [str(v) for v in self.root[name][...]]

    failure = None  # a full disk raises OSError straight from the write

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _zarr_compression(dtype: np.dtype, shuffle: str = "bit") -> list:
    """Zarr's Blosc codec: bit shuffle and zstd, the same pipeline as the HDF5 stores."""
    from zarr.codecs import BloscCodec

    from matclust.compact import ZSTD_LEVEL

    return [BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, typesize=np.dtype(dtype).itemsize,
                       shuffle="bitshuffle" if shuffle == "bit" else "shuffle")]


def _backend(path: str, mode: str):
    if is_url(path):  # the published result, through the root pointer
        from matclust.objectstore import open_result_backend

        return open_result_backend(path)
    return _backend_for(path, path, mode)


def _backend_for(name: str, path: str, mode: str):
    """The backend the output name asks for, opened at ``path`` (the name may be a temporary)."""
    return (_Hdf5Backend if is_hdf5_name(name) else _ZarrBackend)(path, mode)


def _sized(report: dict, size: int, compact: bool) -> None:
    report["file_bytes"] = int(size)
    report["bytes_ratio"] = report["input_bytes"] / size if size else 0.0
    if compact:  # what the matrices take on disk is the store itself
        report["stored_bytes"] = int(size)


def disk_bytes(path: str) -> int:
    """Bytes of a file, or of every file under a directory (a Zarr store)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# Atomic replacement and what killed runs leave behind
# ---------------------------------------------------------------------------------------------
#: Hidden siblings of an output ``NAME``: ``.NAME.matclust-<tag>``. ``tmp-<pid>`` is a store
#: being written (``tmp-<pid>.old``: an old store being moved aside), ``lock`` and ``ckpt``
#: belong to matclust.checkpoint. None of them is ever a result.
SIBLING_MARK = ".matclust-"


def hidden_sibling(path, tag: str) -> str:
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{SIBLING_MARK}{tag}")


def _exchange(a: str, b: str) -> bool:
    """Swap two directory entries atomically (Linux renameat2 RENAME_EXCHANGE).

    False when the platform or the file system cannot do it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(src: str, dst: str) -> None:
    """Move ``src`` to ``dst``, replacing what is there, so that a crash at any moment leaves
    ``dst`` either as it was or as ``src`` was.

    rename(2) does this for a file. A directory (a Zarr store) cannot be renamed over an existing
    entry, so the two are swapped in one step with renameat2(RENAME_EXCHANGE) and the old one,
    now at ``src``, is removed. Without that call the old entry is moved aside to
    ``src + '.old'`` first; a crash between the two renames then leaves no ``dst``, and
    :func:`clean_leftovers` puts the old one back.
    """
    if os.path.lexists(dst) and (os.path.isdir(dst) or os.path.isdir(src)):
        if _exchange(src, dst):
            _remove(src)
        else:
            old = src + ".old"
            os.replace(dst, old)
            os.replace(src, dst)
            _remove(old)
    else:
        os.replace(src, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def clean_leftovers(path) -> list[str]:
    """Remove the temporaries that killed runs writing ``path`` left behind, first restoring
    an old result that an interrupted fallback swap had moved aside. Call only while holding
    the output's lock (matclust.checkpoint), so no live run's temporary is touched.
    Returns the names removed."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    prefix = os.path.basename(hidden_sibling(path, "tmp-"))
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(prefix))
    except OSError:
        return []
    if not os.path.lexists(path):
        for name in names:
            if name.endswith(".old"):
                os.replace(os.path.join(parent, name), path)
                break
    removed = []
    for name in names:
        full = os.path.join(parent, name)
        if os.path.lexists(full):
            _remove(full)
            removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
class ResultWriter:
    """Writes one result store atomically.

    Everything goes to a hidden temporary sibling of ``path``; :meth:`commit` sets ``complete``
    last and renames it into place (replacing an old result only then). :meth:`abort` removes
    the temporary. Use as a context manager: an exception aborts.
    """

    #: The thread of :meth:`in_background` (made on first use) and the call handed to it.
    _background = None
    _in_flight = None

    def __new__(cls, path, *args, **kwargs):
        # A URL is written by matclust.objectstore's subclass (no rename in object stores).
        if cls is ResultWriter and is_url(path):
            from matclust.objectstore import RemoteResultWriter

            cls = RemoteResultWriter
        return super().__new__(cls)

    def __init__(self, path, overwrite: bool = False, fmt: str = FORMAT):
        self.name = require_path(path, "output")
        self.path = os.path.abspath(self.name)
        self.overwrite = overwrite
        check_target(self.name, overwrite, "result")  # only a matclust result is replaced
        self.temp = hidden_sibling(self.path, f"tmp-{os.getpid()}")
        _remove(self.temp)
        try:
            self._backend = _backend_for(self.path, self.temp, "w")
            self._backend.set_attr("format", fmt)
            self._backend.set_attr("complete", False)
            self._check_room()
        except BaseException as exc:
            self._fail(exc)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._fail(exc)

    def _check_room(self) -> None:
        """Raise the write refused for lack of room that HDF5 could not report."""
        failure = getattr(self, "_backend", None) and self._backend.failure
        if failure:
            raise failure

    def _fail(self, exc: BaseException) -> None:
        """Remove the temporary; a full disk becomes one WriteFailure naming the output."""
        reason = disk_full_reason(exc) if isinstance(exc, Exception) else None
        if reason is None and hasattr(self, "_backend") and self._backend.failure is not None:
            reason = disk_full_reason(self._backend.failure)  # the root cause HDF5 hid
        self.abort()
        if reason is None:
            raise exc
        kept = (f"; the previous {self.name} is unchanged" if os.path.lexists(self.path)
                else "")
        raise write_failure(self.name, reason, "output", kept + "; no temporary store was left") \
            from None

    # -- content ---------------------------------------------------------------------------
    def set_json(self, key: str, value: dict) -> None:
        self._backend.set_attr(key, json.dumps(value, allow_nan=False))

    def write_array(self, name: str, data: np.ndarray, compress: bool = False) -> None:
        data = np.ascontiguousarray(data)
        if compress:
            self._backend.write_compressed(name, data)
        else:
            self._backend.write(name, data)
        self._check_room()

    def create_appendable(self, name: str, dtype, chunk: int, shuffle: str = "bit"):
        """An empty compressed 1-D array grown by ``append(values)``; ``shuffle``: "bit" or
        "byte", applied before zstd."""
        return self._backend.create_appendable(name, dtype, chunk, shuffle)

    def in_background(self, fn, *args) -> None:
        """``fn(*args)`` in the writer's own thread, after what was handed to it before (at
        most one call waits there: the caller keeps at most two pieces of data alive). For
        appending compressed chunks: the compressor (which releases the GIL) then runs on
        another core while this thread prepares what follows. A call's failure is raised
        here by the next call, by :meth:`settle`, or when the store is completed."""
        self.settle()
        if self._background is None:
            from concurrent.futures import ThreadPoolExecutor

            self._background = ThreadPoolExecutor(1, thread_name_prefix="matclust-writer")
        self._in_flight = self._background.submit(fn, *args)

    def settle(self) -> None:
        """Wait for the call handed to :meth:`in_background`; raise its failure."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def _stop_background_checked(self) -> None:
        """Before completing: every call done, a failure raised."""
        self.settle()
        self._stop_background()

    def _stop_background(self) -> None:
        """No write goes on behind an abort (it would land after the temporary is gone)."""
        try:
            self.settle()
        except BaseException:  # the failure being handled, or one the abort makes moot
            pass
        pool, self._background = self._background, None
        if pool is not None:
            pool.shutdown(wait=True)

    def chunk_directory(self) -> str | None:
        """The directory the store is written in, when it is a Zarr store on a file system
        (other processes, a sharded run's workers, may then write chunks of its arrays
        themselves); None for HDF5 (one writer per file) and object stores."""
        if isinstance(self._backend, _ZarrBackend) and not is_url(self.temp):
            return self.temp
        return None

    def create_array(self, name: str, shape, dtype, chunks=None):
        """An empty array to be filled slice by slice (for data that is streamed)."""
        return self._backend.create(name, shape, dtype, chunks)

    def write_strings(self, name: str, values) -> None:
        self._backend.write_strings(name, list(values))
        self._check_room()

    def set_report(self, report: dict) -> None:
        """The report attribute, with ``file_bytes``: the store's size on disk as written
        (the report's own digits included: measured again until it no longer changes) and
        ``bytes_ratio`` = input_bytes / file_bytes. The first flush compresses what HDF5 still
        holds (work closing the file would do anyway); the others rewrite one attribute."""
        self.settle()
        self._backend.flush()
        compact = report.get("encoding") == "compact"
        # A compact store keeps its per-cluster statistics as arrays (docs/format.md): as JSON,
        # 250,000 clusters' statistics would outweigh the store.
        stored = {k: v for k, v in report.items() if k != "cluster_stats"} if compact else report
        for _ in range(3):
            size = self._stored_bytes()
            _sized(report, size, compact)
            _sized(stored, size, compact)
            self.set_json("report", stored)
            self._backend.flush()
            if self._stored_bytes() == size:
                break

    def _stored_bytes(self) -> int:
        return disk_bytes(self.temp)

    # -- completion ------------------------------------------------------------------------
    def commit(self) -> None:
        self._stop_background_checked()
        self._backend.set_attr("complete", True)
        self._check_room()
        self._backend.close()
        self._check_room()
        if os.path.isfile(self.temp):  # one file: cheap to make durable before it replaces
            with open(self.temp, "rb+") as fh:
                os.fsync(fh.fileno())
        # What is at the path now may have appeared during a long run: check it again.
        check_target(self.name, self.overwrite, "result")
        replace_atomically(self.temp, self.path)
        logger.info("committed the result store %s", self.path)

    def abort(self) -> None:
        logger.debug("aborted: removing the unfinished %s", self.temp)
        self._stop_background()
        try:
            if hasattr(self, "_backend"):
                self._backend.close()
        except Exception:  # closing a store that failed to write: the temporary goes anyway
            pass
        finally:
            _remove(self.temp)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class ResultStore:
    """Read access to a result store (for verify, reconstruct and inspect).

    With ``strict`` (the default) a store whose ``params`` / ``report`` attributes are not JSON
    objects, or that lacks ``labels`` or ``widths``, is an InputError. ``verify`` opens with
    ``strict=False`` so that it can name every such inconsistency itself: the attributes are
    then None when unreadable (their text stays in ``raw_attrs``), the arrays None when absent.
    """

    def __init__(self, path, strict: bool = True):
        self.path = require_path(path, "result store")
        if not is_url(self.path) and not os.path.exists(self.path):
            raise InputError(f"{self.path}: no such result store")
        try:
            self._backend = _backend(self.path, "r")
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{self.path}: not a readable matclust result store: {exc}") from None
        attrs = self._backend.attrs()
        if attrs.get("format") not in READABLE_FORMATS:
            raise InputError(f"{self.path}: not a matclust result store (format attribute missing)")
        if attrs.get("complete") is not True:
            raise InputError(f"{self.path}: incomplete result store (no 'complete' attribute)")
        self.format = attrs.get("format")
        self.raw_attrs = attrs
        self.params: dict[str, Any] = self._json_attr("params", strict)
        self.report: dict[str, Any] = self._json_attr("report", strict)
        self.compact = None
        self.names = self._backend.read_strings("names") if self._backend.has("names") else None
        if self.params is not None and self.params.get("encoding") == "compact":
            from matclust.format2 import CompactReader

            try:
                bases = self._backend.get("bases")
                self.compact = CompactReader(self._backend, bases.shape[0], bases.dtype.kind == "c")
            except (KeyError, OSError, ValueError, TypeError) as exc:
                reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                raise InputError(f"{self.path}: damaged result store: {reason}") from None
            self.labels, self.widths = self.compact.labels, self.compact.widths
            self.n_clusters = self.compact.n_clusters
        else:
            self.labels = self._int_array("labels", strict)
            self.widths = self._int_array("widths", strict)
            self.n_clusters = len(self._backend.keys("clusters"))

    def _json_attr(self, key: str, strict: bool):
        try:
            value = json.loads(self.raw_attrs[key])
        except KeyError:
            value, why = None, f"no '{key}' attribute"
        except (TypeError, ValueError) as exc:
            value, why = None, f"the '{key}' attribute is not JSON ({exc})"
        else:
            why = f"the '{key}' attribute is not a JSON object"
        if value is None or not isinstance(value, dict):
            if strict:
                raise InputError(f"{self.path}: damaged result store: {why}; run matclust "
                                 "verify on it")
            return None
        return value

    def _int_array(self, name: str, strict: bool):
        array = self.array(name)
        if array is None or array.ndim != 1 or np.dtype(array.dtype).kind not in "iu":
            if strict:
                raise InputError(f"{self.path}: '{name}' is missing or not a 1-D integer array; "
                                 f"run matclust verify on it")
            return None
        return np.asarray(array[...], dtype=np.int64)

    def array(self, name: str):
        """The lazy array at ``name`` (shape, dtype, slicing), or None when there is none."""
        if not self._backend.has(name):
            return None
        node = self._backend.get(name)
        return node if hasattr(node, "shape") and hasattr(node, "dtype") else None

    def cluster_names(self) -> list[str]:
        """The entries of the ``clusters`` group, as stored (normally "0".."C-1")."""
        return self._backend.keys("clusters")

    def handles(self, c: int) -> dict:
        """Lazy arrays of cluster c (members, and basis + coefficients or raw): sliceable
        without reading the whole array."""
        prefix = f"clusters/{c}"
        return {key: self._backend.get(f"{prefix}/{key}")
                for key in ("members", "basis", "coefficients", "raw")
                if self._backend.has(f"{prefix}/{key}")}

    def cluster(self, c: int) -> dict[str, np.ndarray]:
        """members, and basis + coefficients (factored) or raw, of cluster c."""
        prefix = f"clusters/{c}"
        out = {"members": np.asarray(self._backend.get(f"{prefix}/members")[...], dtype=np.int64)}
        for key in ("basis", "coefficients", "raw"):
            if self._backend.has(f"{prefix}/{key}"):
                out[key] = np.asarray(self._backend.get(f"{prefix}/{key}")[...])
        return out

    def close(self) -> None:
        self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
