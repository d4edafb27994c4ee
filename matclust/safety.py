"""What matclust may replace, and how a full disk is reported.

``--overwrite`` replaces only what matclust itself wrote: a result store (its root attribute
``format`` starts with ``matclust/``), a collection written by ``sample`` or ``reconstruct``
(root attribute :data:`COLLECTION_ATTR`), or a JSON report (an object with ``params`` and
``cluster_stats``). Anything else at the path (an ordinary folder, a foreign file, a symbolic
link, the input itself) is refused with exit 2 naming it. Paths are compared after resolving
``.``/``..`` and symbolic links, and by inode, so a hard link to the input counts as the input.
"""

from __future__ import annotations

import errno
import json
import os
import re

from matclust.errors import InputError, WriteFailure
from matclust.locations import is_url, resolve

#: Root attribute that marks a collection written by matclust (``sample``, ``reconstruct``).
COLLECTION_ATTR = "matclust_collection"
RESULT_FORMAT_PREFIX = "matclust/"

#: File names a Zarr (v2 or v3) hierarchy consists of: metadata documents and chunk keys.
_ZARR_METADATA = {"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"}
_CHUNK_KEY = re.compile(r"c|[0-9]+(\.[0-9]+)*")

_DISK_FULL = {errno.ENOSPC: "no space left on the device",
              errno.EFBIG: "file too large (a file-size limit was reached)",
              errno.EDQUOT: "disk quota exceeded"}


def exists_error(path, what: str = "output") -> InputError:
    """The one message for a target that exists when --overwrite was not given."""
    return InputError(f"{path}: {what} exists; pass --overwrite to replace it")


def require_path(path, option: str) -> str:
    """An empty path would resolve to the working directory: refuse it."""
    if path is None or not str(path).strip():
        raise InputError(f"{option}: an empty path is not a valid file name")
    return resolve(os.fspath(path))


# ---------------------------------------------------------------------------------------------
# Comparing paths
# ---------------------------------------------------------------------------------------------
def _resolved(path) -> str:
    path = resolve(os.fspath(path))
    if is_url(path):  # compared as written (scheme and host in lower case)
        scheme, rest = path.split("://", 1)
        return f"{scheme.lower()}://{rest.rstrip('/')}"
    return os.path.realpath(os.path.abspath(path))


def same_entry(a, b) -> bool:
    """``a`` and ``b`` name the same file or folder (through ``./``, symbolic or hard links)."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass  # one of them does not exist yet
    return _resolved(a) == _resolved(b)


def nested(inner, outer) -> bool:
    """``inner`` lies inside the folder ``outer``."""
    inner, outer = _resolved(inner), _resolved(outer)
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def refuse_clashes(target: tuple[str, str], others) -> None:
    """InputError when the ``(role, path)`` to be written is, holds or lies inside one of
    ``others`` (``(role, path)`` pairs, e.g. the input): writing it would destroy them."""
    role, path = target
    for other_role, other in others:
        if other is None:
            continue
        if same_entry(path, other):
            raise InputError(f"{path}: {role} is the {other_role} ({other}); choose another path")
        if nested(path, other):
            raise InputError(f"{path}: {role} lies inside the {other_role} {other}; "
                             "choose a path outside it")
        if nested(other, path):
            raise InputError(f"{path}: {role} holds the {other_role} {other}; "
                             "choose another path")


# ---------------------------------------------------------------------------------------------
# What matclust wrote
# ---------------------------------------------------------------------------------------------
def root_attrs(path) -> dict | None:
    """The root attributes of an HDF5 file or a Zarr hierarchy; None for anything else."""
    path = os.fspath(path)
    try:
        if os.path.isfile(path):
            import h5py

            if not h5py.is_hdf5(path):
                return None
            with h5py.File(path, "r") as f:
                return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        if os.path.isdir(path):
            import zarr

            return dict(zarr.open_group(path, mode="r").attrs)
    except Exception:  # unreadable or not a hierarchy at all: not something matclust wrote
        return None
    return None


def is_result_store(path) -> bool:
    """A matclust result store, complete or left incomplete by an interrupted writer."""
    attrs = root_attrs(path)
    return attrs is not None and str(attrs.get("format", "")).startswith(RESULT_FORMAT_PREFIX)


def _foreign_files(folder: str, limit: int = 3) -> list[str]:
    """Files in a Zarr folder that are neither metadata nor chunks (the user's own)."""
    found = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if name not in _ZARR_METADATA and not _CHUNK_KEY.fullmatch(name):
                found.append(os.path.relpath(os.path.join(dirpath, name), folder))
                if len(found) >= limit:
                    return found
    return found


def _is_report(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read(64 * 2**20))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "params" in doc and "cluster_stats" in doc


def _is_study_csv(path) -> bool:
    """The bound study's CSV: its first line is the study's header."""
    from matclust.study import COLUMNS

    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().rstrip("\r\n") == ",".join(COLUMNS)
    except (OSError, UnicodeDecodeError):
        return False


def _is_study_plot(path) -> bool:
    """The bound study's plot: a PNG carrying the study's mark in its text chunks."""
    from matclust.study import PLOT_MARK

    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and PLOT_MARK.encode() in head


_KINDS = {
    "result": ("a matclust result store", is_result_store),
    "collection": ("a collection written by matclust sample or reconstruct",
                   lambda p: (root_attrs(p) or {}).get(COLLECTION_ATTR) is not None),
    "report": ("a matclust JSON report", _is_report),
    "study": ("a bound study's CSV written by matclust bounds", _is_study_csv),
    "plot": ("a bound study's plot written by matclust bounds", _is_study_plot),
}


def check_target(path, overwrite: bool, kind: str, what: str = "output") -> None:
    """May ``path`` be written? Its folder must exist; an existing entry needs ``overwrite``
    and must be what matclust writes there (``kind``: result, collection or report)."""
    path = resolve(os.fspath(path))
    if is_url(path):
        if kind != "result":
            raise InputError(f"{path}: the {what} must be a local path (only result stores are "
                             "written to URLs)")
        from matclust.objectstore import RemoteOutput

        return RemoteOutput(path).check_target(overwrite, what)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"{path}: the {what}'s folder {parent} does not exist")
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise exists_error(path, what)
    label, recognise = _KINDS[kind]
    if os.path.islink(path):
        raise InputError(f"{path}: {what} is a symbolic link; --overwrite replaces only "
                         f"{label}, not links (remove the link or choose another path)")
    if not recognise(path):
        entry = "a folder" if os.path.isdir(path) else "a file"
        raise InputError(f"{path}: {what} is {entry} that is not {label}; --overwrite "
                         "replaces nothing else (remove it yourself or choose another path)")
    if os.path.isdir(path):
        foreign = _foreign_files(path)
        if foreign:
            raise InputError(f"{path}: {what} also holds files matclust did not write "
                             f"({', '.join(foreign)}); --overwrite would delete them")


# ---------------------------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------------------------
def disk_full_reason(exc: BaseException | None) -> str | None:
    """Why a write failed for lack of room (no space, file-size limit, quota), else None.

    Follows the exception's causes: libraries wrap the OSError (h5py's messages carry only the
    text ``errno = 28``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return _DISK_FULL[exc.errno]
        text = str(exc)
        for code, reason in _DISK_FULL.items():
            if f"errno = {code}," in text or os.strerror(code) in text:
                return reason
        exc = exc.__cause__ or exc.__context__
    return None


def write_failure(path, reason: str, what: str = "output", note: str = "") -> WriteFailure:
    return WriteFailure(f"{path}: the {what} could not be written: {reason}{note}")


def write_text_atomically(path, text: str, what: str) -> None:
    """Write a small text file through a hidden temporary renamed into place, so a failed
    write leaves the previous file as it was; a full disk is a :class:`WriteFailure`."""
    from matclust.store import hidden_sibling

    temp = hidden_sibling(path, f"tmp-{os.getpid()}")
    try:
        with open(temp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        try:
            os.remove(temp)
        except OSError:
            pass
        reason = disk_full_reason(exc) if isinstance(exc, Exception) else None
        if reason is not None:
            raise write_failure(path, reason, what, f"; the previous {what} is unchanged"
                                if os.path.exists(path) else "") from None
        raise
