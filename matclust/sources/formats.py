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
from matclust.sources.base import MatrixSource

logger = logging.getLogger(__name__)

ROOT = "/"


@dataclass
class Node:
    """One array or group in a file: its normalised path and what it holds."""

    path: str
    kind: str  # "array" | "group"
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


class _Container:
    """A format's file: list nodes, get one node's children. Subclasses fill in the I/O."""

    def __init__(self, path: str):
        self.path = path

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
        return [self._node(_norm(f"{group.path}/{name}" if group.path != ROOT else name), obj)
                for name, obj in self._members(group.obj)]

    def close(self) -> None:
        pass

    def candidates(self) -> list[Node]:
        return [n for n in self.nodes() if _is_candidate(n, self.children(n) if n.kind == "group" else [])]

    def select(self, dataset: str | None) -> Node:
        nodes = {n.path: n for n in self.nodes()}
        if dataset is not None:
            key = _norm(dataset)
            if key not in nodes:
                names = ", ".join(f"'{p}'" for p in sorted(nodes) if p != ROOT) or "none"
                raise InputError(f"{self.path}: no dataset '{dataset}' (it holds: {names})")
            return nodes[key]
        found = self.candidates()
        if len(found) == 1:
            return found[0]
        if not found:
            arrays = [n for n in nodes.values() if n.kind == "array"]
            held = ", ".join(_describe(n) for n in arrays) or "no arrays at all"
            raise InputError(
                f"{self.path}: no candidate dataset (a 3-D array (K, m, n) or a group of 2-D "
                f"arrays); it holds {held}"
            )
        listing = ", ".join(f"'{n.path}'" for n in found)
        raise InputError(
            f"{self.path}: several candidate datasets ({listing}); choose one with --dataset"
        )

    def source(self, dataset: str | None, transpose: bool) -> MatrixSource:
        node = self.select(dataset)
        if node.kind == "array":
            src = MatrixSource(self.path, node.path, transpose, stack=node.obj)
        else:
            members = sorted(
                ((c.path.rsplit("/", 1)[-1], c.obj) for c in self.children(node) if c.kind == "array"),
                key=lambda item: item[0],
            )
            src = MatrixSource(self.path, node.path, transpose, members=members)
        src.close = self.close  # the source owns the file handle from here on
        return src


class _Hdf5(_Container):
    def __init__(self, path: str):
        super().__init__(path)
        import h5py

        try:
            self.file = h5py.File(path, "r")
        except OSError as exc:
            raise InputError(f"{path}: cannot open as HDF5 (truncated or corrupt file?): {exc}") from None

    def nodes(self) -> list[Node]:
        import h5py

        found = [self._node(ROOT, self.file)]

        def visit(name, obj):
            if isinstance(obj, (h5py.Dataset, h5py.Group)):  # not committed datatypes
                found.append(self._node(_norm(name), obj))

        try:
            self.file.visititems(visit)
        except (OSError, RuntimeError, KeyError) as exc:
            raise InputError(f"{self.path}: cannot read the HDF5 structure (truncated or corrupt file?): {exc}") from None
        return found

    def _is_array(self, obj) -> bool:
        import h5py

        return isinstance(obj, h5py.Dataset)

    def _members(self, group) -> list:
        return list(group.items())

    def close(self) -> None:
        self.file.close()


class _Zarr(_Container):
    def __init__(self, path: str):
        super().__init__(path)
        import zarr

        try:
            self.root = zarr.open(path, mode="r")
        except Exception as exc:  # zarr raises several unrelated types for "not a store"
            raise InputError(f"{path}: not a Zarr store (v2 or v3) and not an HDF5 file: {exc}") from None

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
        return sorted(group.members())


def _container(path: str) -> _Container:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        return _Zarr(path)
    import h5py

    if h5py.is_hdf5(path):
        return _Hdf5(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\x89HDF"):
        return _Hdf5(path)  # damaged superblock: h5py will say why
    raise InputError(f"{path}: neither an HDF5 file nor a Zarr store (a directory)")


def open_source(path, dataset: str | None = None, transpose: bool = False) -> MatrixSource:
    """Open the matrix collection at ``path`` (HDF5 file or Zarr store).

    Parameters
    ----------
    path : str or PathLike
        An HDF5 file or a Zarr (v2 or v3) store directory.
    dataset : str, optional
        Path of the 3-D array or group inside the file. Without it, the only candidate is used.
    transpose : bool
        Cluster the transposes of the matrices (shared column space of A_i^T).

    Raises
    ------
    InputError
        Missing or unreadable file, no or several candidates, bad shapes or dtypes.
    """
    container = _container(os.fspath(path))
    try:
        source = container.source(dataset, transpose)
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


