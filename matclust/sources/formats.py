"""Opening HDF5 files and Zarr stores, and finding the collection inside them.

Everything format-specific lives here: how to open, how to walk the hierarchy, how to turn the
library's exceptions into :class:`~matclust.errors.InputError`. The resulting
:class:`~matclust.sources.base.MatrixSource` only slices arrays.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from matclust.errors import InputError
from matclust.locations import is_url, resolve, storage_options, use_storage_options
from matclust.sources.base import MatrixSource

logger = logging.getLogger(__name__)

ROOT = "/"


@dataclass
class Node:
    """One array or group in a file: its normalised path and what it holds."""

    path: str
    kind: str  # "array" | "group" | "broken" (a link whose target is missing; obj: why)
    obj: object
    ndim: int = 0  # arrays only
    shape: tuple = ()


def _norm(path: str) -> str:
    path = path.strip("/")
    return path if path else ROOT


def _is_candidate(node: Node, children: list[Node]) -> bool:
    if node.kind == "array":
        return node.ndim == 3
    arrays = [c for c in children if c.kind == "array"]
    return bool(arrays) and all(a.ndim == 2 for a in arrays)


def _describe(node: Node) -> str:
    if node.kind == "array":
        return f"'{node.path}' ({node.ndim}-D array, shape {node.shape})"
    return f"'{node.path}' (group)"


#: Names listed in a message before "and N more": the message stays one readable line.
MAX_LISTED = 12


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")


class _Container:
    """A format's file: list nodes, get one node's children. Subclasses fill in the I/O."""

    def __init__(self, path: str, fill_missing: bool = False):
        self.path = path
        #: Read a missing chunk or virtual-dataset source as the fill value instead of failing.
        self.fill_missing = fill_missing

    def root_attrs(self) -> dict:
        raise NotImplementedError

    def refuse_result_store(self) -> None:
        """A matclust result store is not a collection: say so instead of listing its arrays."""
        from matclust.safety import RESULT_FORMAT_PREFIX

        try:
            fmt = str(self.root_attrs().get("format", ""))
        except Exception:  # unreadable attributes: the walk below says what is wrong
            return
        if fmt.startswith(RESULT_FORMAT_PREFIX):
            raise InputError(f"{self.path}: is a matclust result store, not a matrix collection "
                             "(matclust reconstruct rebuilds its matrices)")

    def find_missing(self, array, start: int, stop: int):
        """(description, first, last + 1) of the first stored piece of ``array`` that rows
        start..stop-1 of its first axis need and that is missing, or None."""
        return None

    def check_complete(self, node: Node) -> None:
        """Raise when pieces of the chosen collection are missing (checked once, at open)."""

    def nodes(self) -> list[Node]:
        raise NotImplementedError

    def _is_array(self, obj) -> bool:
        raise NotImplementedError

    def _node(self, path: str, obj) -> Node:
        if self._is_array(obj):
            return Node(path, "array", obj, obj.ndim, tuple(obj.shape))
        return Node(path, "group", obj)

    def _members(self, group) -> list:
        """(name, object) pairs of a group's direct members."""
        raise NotImplementedError

    def children(self, group: Node) -> list[Node]:
        out = [self._node(_norm(f"{group.path}/{name}" if group.path != ROOT else name), obj)
               for name, obj in self._members(group.obj)]
        for position, child in enumerate(sorted(out, key=lambda n: n.path)):
            if child.kind == "broken":  # a matrix of this group cannot be read
                raise InputError(f"{self.path}: matrix {position} ('{child.path}') is missing: "
                                 f"{child.obj}")
        return out

    def close(self) -> None:
        pass

    def candidates(self) -> list[Node]:
        return [n for n in self.nodes() if _is_candidate(n, self.children(n) if n.kind == "group" else [])]

    def select(self, dataset: str | None) -> Node:
        nodes = {n.path: n for n in self.nodes()}
        broken = [n for n in nodes.values() if n.kind == "broken"]
        if dataset is not None:
            key = _norm(dataset)
            if key not in nodes:
                names = _listing([f"'{p}'" for p in sorted(nodes) if p != ROOT]) or "none"
                raise InputError(f"{self.path}: no dataset '{dataset}' (it holds: {names})")
            if nodes[key].kind == "broken":
                raise InputError(f"{self.path}: dataset '{key}' is missing: {nodes[key].obj}")
            return nodes[key]
        if broken:  # the collection may be the part that is missing: no guessing
            raise InputError(f"{self.path}: '{broken[0].path}' is missing: {broken[0].obj}")
        found = self.candidates()
        if len(found) == 1:
            return found[0]
        if not found:
            arrays = [n for n in nodes.values() if n.kind == "array"]
            held = _listing([_describe(n) for n in arrays]) or "no arrays at all"
            raise InputError(
                f"{self.path}: no candidate dataset (a 3-D array (K, m, n) or a group of 2-D "
                f"arrays); it holds {held}"
            )
        listing = _listing([f"'{n.path}'" for n in found])
        raise InputError(
            f"{self.path}: several candidate datasets ({listing}); choose one with --dataset"
        )

    def source(self, dataset: str | None, transpose: bool) -> MatrixSource:
        node = self.select(dataset)
        missing = None if self.fill_missing else self.find_missing
        if not self.fill_missing:
            self.check_complete(node)
        if node.kind == "array":
            src = MatrixSource(self.path, node.path, transpose, stack=node.obj,
                               find_missing=missing)
        else:
            members = sorted(
                ((c.path.rsplit("/", 1)[-1], c.obj) for c in self.children(node) if c.kind == "array"),
                key=lambda item: item[0],
            )
            src = MatrixSource(self.path, node.path, transpose, members=members,
                               find_missing=missing)
        src.close = self.close  # the source owns the file handle from here on
        return src


class _Hdf5(_Container):
    def __init__(self, path: str, fill_missing: bool = False, fileobj=None):
        super().__init__(path, fill_missing)
        import h5py

        self._fileobj = fileobj  # a URL's file object (matclust.locations), else None
        try:
            self.file = h5py.File(fileobj if fileobj is not None else path, "r")
        except OSError as exc:
            raise InputError(f"{path}: cannot open as HDF5 (truncated or corrupt file?): {exc}") from None

    def root_attrs(self) -> dict:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.file.attrs.items()}

    def nodes(self) -> list[Node]:
        """Every group and dataset, depth first in name order, following soft and external
        links (each object once, so link cycles end); a link whose target is missing is a
        ``broken`` node."""
        found = [self._node(ROOT, self.file)]
        seen = {self.file.id}  # object ids compare (and hash) equal for the same object
        todo = [(ROOT, self.file)]
        try:
            while todo:
                path, group = todo.pop()
                below = []
                for name, obj in self._members(group):
                    node = self._node(_norm(f"{path}/{name}"), obj)
                    if node.kind != "broken":
                        if obj.id in seen:
                            continue
                        seen.add(obj.id)
                    found.append(node)
                    if node.kind == "group":
                        below.append((node.path, obj))
                todo.extend(reversed(below))
        except (OSError, RuntimeError, KeyError) as exc:
            raise InputError(f"{self.path}: cannot read the HDF5 structure (truncated or corrupt file?): {exc}") from None
        return found

    def _node(self, path: str, obj) -> Node:
        if isinstance(obj, str):
            return Node(path, "broken", obj)
        return super()._node(path, obj)

    def _is_array(self, obj) -> bool:
        import h5py

        return isinstance(obj, h5py.Dataset)

    def _members(self, group) -> list:
        """(name, object) of a group's datasets and groups, links followed; a broken link's
        object is the sentence saying what it points to."""
        import h5py

        out = []
        for name in sorted(group):
            try:
                obj = group[name]
            except (KeyError, OSError, RuntimeError):
                link = group.get(name, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    obj = (f"it is an external link to {link.path} in {link.filename}, "
                           "which cannot be opened (missing file or dataset)")
                elif isinstance(link, h5py.SoftLink):
                    obj = f"it is a link to {link.path}, which does not exist"
                else:
                    raise
            if isinstance(obj, (str, h5py.Dataset, h5py.Group)):  # not committed datatypes
                out.append((name, obj))
        return out

    def check_complete(self, node: Node) -> None:
        """A virtual dataset reads a missing source file as its fill value: refuse that."""
        arrays = [(None, node.obj)] if node.kind == "array" else \
            [(i, c.obj) for i, c in enumerate(sorted(self.children(node), key=lambda n: n.path))
             if c.kind == "array"]
        for position, array in arrays:
            if not array.is_virtual:
                continue
            for source in array.virtual_sources():
                problem = self._missing_source(source.file_name, source.dset_name)
                if problem is None:
                    continue
                if position is None:
                    first, last = source.vspace.get_select_bounds()
                    holds = f"matrices {first[0]}..{last[0]}"
                else:
                    holds = f"matrix {position}"
                raise InputError(
                    f"{self.path}: '{node.path}' is a virtual dataset whose source {problem} "
                    f"(it holds {holds}); pass --fill-missing to read those as the fill value")

    def _missing_source(self, file_name: str, dset_name: str) -> str | None:
        """Why a virtual dataset's source cannot be read, or None when it can."""
        import h5py

        if file_name == ".":
            return None if dset_name in self.file else f"dataset {dset_name} is missing"
        if os.path.isabs(file_name):
            candidates = [file_name]
        else:  # where HDF5 looks for a relative source: its prefix, the file's folder, cwd
            prefixes = [p for p in os.environ.get("HDF5_VDS_PREFIX", "").split(":") if p]
            candidates = [os.path.join(p, file_name) for p in prefixes] + [
                os.path.join(os.path.dirname(os.path.abspath(self.path)), file_name), file_name]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            return f"file {file_name} is missing"
        try:
            with h5py.File(found, "r") as f:
                return None if dset_name in f else f"{found} has no dataset {dset_name}"
        except OSError:
            return f"file {found} cannot be opened as HDF5"

    def close(self) -> None:
        self.file.close()
        if self._fileobj is not None:
            self._fileobj.close()


class _Zarr(_Container):
    def __init__(self, path: str, fill_missing: bool = False, store=None):
        super().__init__(path, fill_missing)
        import zarr

        #: Members of each group listed so far: selecting a collection walks the hierarchy
        #: several times, and on an object store every listing is a request.
        self._listed: dict[str, list] = {}
        try:
            self.root = zarr.open(store if store is not None else path, mode="r")
        except Exception as exc:  # zarr raises several unrelated types for "not a store"
            raise InputError(f"{path}: not a Zarr store (v2 or v3) and not an HDF5 file: {exc}") from None

    def root_attrs(self) -> dict:
        return dict(self.root.attrs)

    def nodes(self) -> list[Node]:
        out, todo = [], [self._node(ROOT, self.root)]
        while todo:
            node = todo.pop(0)
            out.append(node)
            if node.kind == "group":
                todo[:0] = self.children(node)
        return out

    def _is_array(self, obj) -> bool:
        import zarr

        return isinstance(obj, zarr.Array)

    def _members(self, group) -> list:
        if group.path not in self._listed:
            self._listed[group.path] = self._list_members(group)
        return self._listed[group.path]

    def _list_members(self, group) -> list:
        import warnings

        try:
            with warnings.catch_warnings():  # "not recognized as a component": skipped anyway
                warnings.simplefilter("ignore", UserWarning)
                return sorted(group.members())
        except Exception as exc:  # a member's metadata is damaged (not JSON, wrong fields)
            where = f"group '{group.path}'" if group.path else "the root group"
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise InputError(f"{self.path}: cannot read the Zarr metadata below {where} "
                             f"(damaged zarr.json / .zarray?): {reason}") from None

    def find_missing(self, array, start: int, stop: int):
        """Zarr reads a chunk that is not stored as the fill value; a chunk is missing when
        its key is not in the store (one ``exists`` per chunk of the rows read)."""
        import itertools

        shape = tuple(array.shape)
        grid = tuple(getattr(array, "shards", None) or array.chunks)  # the stored objects
        if not shape or 0 in shape:
            return None
        first = [range(start // grid[0], -(-stop // grid[0]))]
        rest = [range(-(-size // step)) for size, step in zip(shape[1:], grid[1:])]
        exists = _key_exists(array)
        for coords in itertools.product(*first, *rest):
            key = array.metadata.encode_chunk_key(coords)
            if not exists(key):
                lo = coords[0] * grid[0]
                name = f"{array.path}/{key}" if array.path else key
                return f"chunk {name}", lo, min(lo + grid[0], shape[0])
        return None


def _key_exists(array):
    """A test whether a chunk key of ``array`` is stored: a file test in a local store."""
    store = array.store_path.store
    prefix = array.path
    root = getattr(store, "root", None)
    if root is not None:
        base = os.path.join(os.fspath(root), prefix) if prefix else os.fspath(root)
        return lambda key: os.path.exists(os.path.join(base, key))
    from zarr.core.sync import sync

    return lambda key: sync(store.exists(f"{prefix}/{key}" if prefix else key))


def _container(path: str, fill_missing: bool = False) -> _Container:
    if not path:
        raise InputError("INPUT: an empty path is not a valid file name")
    path = resolve(path)
    if is_url(path):
        container = _open_remote(path, fill_missing)
    elif not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    else:
        try:
            container = _open_container(path, fill_missing)
        except OSError as exc:  # permissions, a folder where a file is expected, I/O errors
            raise InputError(f"{path}: cannot read the input: {exc.strerror or exc}") from None
    try:
        container.refuse_result_store()
    except BaseException:
        container.close()
        raise
    return container


def _open_container(path: str, fill_missing: bool) -> _Container:
    if os.path.isdir(path):
        return _Zarr(path, fill_missing)
    import h5py

    if h5py.is_hdf5(path):
        return _Hdf5(path, fill_missing)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\x89HDF"):
        return _Hdf5(path, fill_missing)  # damaged superblock: h5py will say why
    raise InputError(f"{path}: neither an HDF5 file nor a Zarr store (a directory)")


#: Members of a group at a URL read at once (each waits for the store's answer).
REMOTE_CONCURRENT_READS = 8


def _open_remote(url: str, fill_missing: bool) -> _Container:
    """The HDF5 file (one object) or Zarr store (a prefix) at a URL."""
    from matclust.locations import filesystem, open_file, remote_errors, zarr_store

    fs, path = filesystem(url)
    with remote_errors(url, "read the input"):
        # Zarr first: a web server answers a folder's URL with a page, which looks like a file.
        if any(fs.exists(f"{path.rstrip('/')}/{name}")
               for name in ("zarr.json", ".zgroup", ".zarray")):
            return _Zarr(url, fill_missing, store=zarr_store(url, read_only=True))
        if fs.isfile(path):
            return _Hdf5(url, fill_missing, fileobj=open_file(url))
        from matclust.objectstore import RemoteOutput

        raise RemoteOutput(url).missing_root()


def reopen_source(args: tuple, state: dict) -> MatrixSource:
    """A source opened again from ``(path, dataset, transpose, fill_missing,
    storage_options)``, with the calibration it had (for MatrixSource's pickling)."""
    path, dataset, transpose, fill_missing, options = args
    with use_storage_options(options):
        source = open_source(path, dataset, transpose, fill_missing)
    source.__dict__.update(state)
    return source


def open_source(path, dataset: str | None = None, transpose: bool = False,
                fill_missing: bool = False) -> MatrixSource:
    """Open the matrix collection at ``path`` (HDF5 file or Zarr store).

    Parameters
    ----------
    path : str or PathLike
        An HDF5 file or a Zarr (v2 or v3) store directory, or a URL of one (``s3://``,
        ``gs://``, ``http(s)://``, ...; opened with the storage options in force, see
        :mod:`matclust.locations`).
    dataset : str, optional
        Path of the 3-D array or group inside the file. Without it, the only candidate is used.
    transpose : bool
        Cluster the transposes of the matrices (shared column space of A_i^T).
    fill_missing : bool
        Read a Zarr chunk that is not stored, or a virtual dataset's missing source, as the
        fill value. By default either is an error naming it and the matrices it holds (links
        are always followed; a broken one is always an error).

    Raises
    ------
    InputError
        Missing or unreadable file, no or several candidates, bad shapes or dtypes, missing
        pieces.
    """
    container = _container(os.fspath(path), fill_missing)
    try:
        source = container.source(dataset, transpose)
        remote = is_url(container.path)
        if remote and isinstance(container, _Zarr):  # each member read is a request
            source.concurrent_reads = REMOTE_CONCURRENT_READS
        source.reopen = (reopen_source, (
            container.path if remote else os.path.abspath(container.path), source.dataset,
            source.transpose, fill_missing, storage_options() if remote else {}))
        logger.info("opened %s: %d matrices of %d rows, %s, %.1f MiB", source.where, source.K,
                    source.m, source.input_dtype, source.matrix_bytes / 2**20)
        return source
    except Exception:
        container.close()
        raise


def list_candidates(path) -> list[dict]:
    """Every candidate collection in a file, for ``matclust inspect``."""
    container = _container(os.fspath(path))
    try:
        out = []
        for node in container.candidates():
            src = container.source(node.path, False)
            out.append(src.summary())
        return out
    finally:
        container.close()


