"""Where collections and results live: a local path, or a URL that fsspec reaches.

``s3://``, ``gs://``, ``az://``, ``memory://``, ``http(s)://`` (read only) and every other
protocol fsspec knows are URLs; ``file://`` URLs are turned into plain paths (:func:`resolve`),
so local files keep their own code paths (rename, flock) whatever way they are named. This
module is the one place that turns a URL and its storage options into something the readers
and writers use: a filesystem, a Zarr store or a file object. Nothing here is imported for a
local path, and fsspec is imported only when a URL is met.

Storage options (credentials, endpoints, ...) come from the environment the standard way
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), which the
filesystems read themselves, plus the options in force (:func:`use_storage_options`; the CLI's
``--storage-options JSON``), passed as keyword arguments to the filesystem of every URL.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import json
import re
import threading
from urllib.parse import unquote, urlsplit

from matclust.errors import InputError, MissingExtraError, WriteFailure

#: "scheme://": a URL. A Windows drive ("C:\\") has no "//" after its colon.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: Protocols whose filesystems cannot write.
READ_ONLY_PROTOCOLS = ("http", "https")
#: The package (and matclust extra) each common protocol needs.
_PACKAGES = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", None),
             "gcs": ("gcsfs", None), "az": ("adlfs", None), "abfs": ("adlfs", None),
             "abfss": ("adlfs", None), "http": ("aiohttp", None), "https": ("aiohttp", None)}

_OPTIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("matclust_storage_options",
                                                                       default=None)


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
def protocol(path) -> str | None:
    """The URL's protocol in lower case ("s3"), or None for a local path."""
    match = _URL.match(path) if isinstance(path, str) else None
    return match.group(1).lower() if match else None


def is_url(path) -> bool:
    """A URL that fsspec opens (``file://`` ones are resolved to paths first)."""
    found = protocol(path)
    return found is not None and found != "file"


def resolve(path):
    """``file://`` URLs as the local path they name; other URLs with their scheme in lower
    case (schemes are case-insensitive, fsspec's protocol names are not); paths unchanged."""
    found = protocol(path)
    if found == "file":
        parts = urlsplit(path)
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"{path}: a file:// URL names a local file (file:///path), not "
                             f"one on host '{parts.netloc}'")
        return unquote(parts.path) or "/"
    if found is not None:
        return found + path[len(found):]
    return path


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *(n.strip("/") for n in names)])


def is_hdf5_url(url: str) -> bool:
    return url.lower().rstrip("/").endswith((".h5", ".hdf5"))


# ---------------------------------------------------------------------------------------------
# Storage options
# ---------------------------------------------------------------------------------------------
def storage_options() -> dict:
    """The storage options in force (a copy)."""
    return dict(_OPTIONS.get() or {})


@contextlib.contextmanager
def use_storage_options(options: dict | None):
    """Pass ``options`` to the filesystem of every URL opened inside the ``with`` block."""
    token = _OPTIONS.set(dict(options or {}))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def parse_storage_options(text, option: str = "--storage-options") -> dict:
    """A JSON object of storage options; anything else is an InputError naming ``option``."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{option}: not valid JSON ({exc}); expected an object such as "
                         "'{\"anon\": true}'") from None
    if not isinstance(value, dict):
        raise InputError(f"{option}: expected a JSON object such as '{{\"anon\": true}}', got "
                         f"{type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------
#: Seconds an S3 request may wait for a connection and for an answer before botocore gives up
#: (and retries): without them a request to a server that stopped answering waits forever, and
#: so does a cron job. Generous beside the tests' requests (well under a second each); the
#: user's own `config_kwargs` in --storage-options take precedence.
S3_TIMEOUTS = {"connect_timeout": 30, "read_timeout": 120}


def _with_defaults(proto: str, options: dict) -> dict:
    if proto in ("s3", "s3a"):
        options["config_kwargs"] = {**S3_TIMEOUTS, **(options.get("config_kwargs") or {})}
    return options


def filesystem(url: str, options: dict | None = None):
    """(fsspec filesystem, path inside it) for ``url``, with the storage options in force (or
    ``options``); InputError for an unknown protocol, a missing package or a bad option."""
    url = resolve(url)
    proto = protocol(url)
    options = _with_defaults(proto, storage_options() if options is None else dict(options))
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise MissingExtraError("fsspec", "s3", f"{url}: reading or writing a URL") from None
    try:
        return url_to_fs(url, **options)
    except ImportError:
        package, extra = _PACKAGES.get(proto, (None, None))
        if extra:
            raise MissingExtraError(package, extra, f"{url}: the {proto}:// protocol") from None
        raise InputError(f"{url}: the {proto}:// protocol needs the package "
                         f"{package or 'that implements it for fsspec'} (pip install it)") \
            from None
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise InputError(f"{url}: fsspec knows no protocol '{proto}'") from None
        raise InputError(f"{url}: {exc}") from None
    except TypeError as exc:  # an option the filesystem does not take
        raise InputError(f"--storage-options: not accepted by the {proto}:// filesystem "
                         f"({exc})") from None


def zarr_store(url: str, read_only: bool, options: dict | None = None):
    """zarr's FsspecStore at ``url``."""
    from zarr.storage import FsspecStore

    url = resolve(url)
    filesystem(url, options)  # the same checks and messages as every other URL
    opts = _with_defaults(protocol(url),
                          storage_options() if options is None else dict(options))
    with remote_errors(url, "open"):
        return FsspecStore.from_url(url, storage_options=opts, read_only=read_only)


#: Blocks of an HDF5 file fetched per request, and how many of them are kept: HDF5 reads its
#: metadata in many small pieces, and a batch of matrices is a few MiB (16 MiB held at most).
FILE_BLOCK_BYTES = 4 * 2**20
FILE_BLOCKS_KEPT = 4


def open_file(url: str, options: dict | None = None):
    """A read-only file object at ``url`` (for h5py, which reads file-like objects), read in
    blocks of FILE_BLOCK_BYTES, the last FILE_BLOCKS_KEPT kept, with the cyclic garbage
    collector paused while a read waits (:class:`CollectorPausedReads`)."""
    fs, path = filesystem(url, options)
    with remote_errors(url, "open"):
        return CollectorPausedReads(fs.open(path, "rb", block_size=FILE_BLOCK_BYTES,
                                            cache_type="blockcache",
                                            cache_options={"maxblocks": FILE_BLOCKS_KEPT}))


class CollectorPausedReads:
    """A file object whose reads run with Python's cyclic garbage collector paused.

    h5py calls a file object's methods while it holds its global lock, and the asynchronous
    filesystems (s3fs, gcsfs, adlfs, HTTP) serve a read on fsspec's event-loop thread. Should
    a collection start on that thread and free an h5py object (one left in a reference cycle),
    it would wait for the lock the reading thread holds, and the reading thread for it: a
    `cluster` from an s3:// HDF5 input hung so in the test suite (h5py's documentation
    describes the same for any file object served by another thread). Paused while a read
    waits, collections happen between reads instead, on a thread that holds the lock or none.
    Everything else is the wrapped file's."""

    _lock = threading.Lock()
    _pauses = 0  # reads under way (h5py serialises them; counted all the same)
    _was_enabled = False

    def __init__(self, fh):
        self._fh = fh

    @classmethod
    @contextlib.contextmanager
    def paused(cls):
        with cls._lock:
            if cls._pauses == 0:
                cls._was_enabled = gc.isenabled()
                gc.disable()
            cls._pauses += 1
        try:
            yield
        finally:
            with cls._lock:
                cls._pauses -= 1
                if cls._pauses == 0 and cls._was_enabled:
                    gc.enable()

    def read(self, size: int = -1) -> bytes:
        with self.paused():
            return self._fh.read(size)

    def readinto(self, buffer) -> int:
        with self.paused():
            return self._fh.readinto(buffer)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()
        return False


def refuse_read_only(url: str, what: str = "output") -> None:
    if protocol(url) in READ_ONLY_PROTOCOLS:
        raise InputError(f"{url}: {protocol(url)}:// is read only; the {what} must be a local "
                         "path or a writable URL (s3://, gs://, az://, memory://, ...)")


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


@contextlib.contextmanager
def remote_errors(url: str, action: str):
    """The object store's failures as matclust's errors: a missing object or bucket, a refused
    permission or missing credentials are the user's to fix (InputError, exit 2); anything
    else (an endpoint that does not answer, a server error) is the environment's
    (WriteFailure, exit 1)."""
    try:
        yield
    except (InputError, WriteFailure):
        raise
    except FileNotFoundError as exc:
        raise InputError(f"{url}: cannot {action}: no such object or bucket "
                         f"({_reason(exc)})") from None
    except TypeError as exc:  # the filesystem met an option it does not take only now
        if "unexpected keyword" not in str(exc):
            raise
        raise InputError(f"--storage-options: not accepted by the {protocol(url)}:// "
                         f"filesystem ({_reason(exc)})") from None
    except PermissionError as exc:
        raise InputError(f"{url}: cannot {action}: access denied ({_reason(exc)}); check the "
                         "credentials") from None
    except Exception as exc:
        name = type(exc).__name__
        if "Credentials" in name or "credentials" in str(exc):
            raise InputError(f"{url}: cannot {action}: no credentials for the object store "
                             f"({_reason(exc)}); set them in the environment (e.g. "
                             "AWS_ACCESS_KEY_ID) or with --storage-options") from None
        raise WriteFailure(f"{url}: cannot {action}: {name}: {_reason(exc)}") from None
