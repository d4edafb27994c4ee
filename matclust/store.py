"""The output store (CONTRACT.md 'Output'): HDF5 when the name ends in .h5/.hdf5, else Zarr.

Two layers: a tiny backend per format (attributes, arrays, strings) and the format-free
:class:`ResultWriter` / :class:`ResultStore` on top. Results are written into a temporary
sibling and renamed into place only when complete, so a crash never leaves a store that looks
like a result.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from matclust.errors import InputError

FORMAT = "matclust/1"


def is_hdf5_name(path) -> bool:
    return str(path).lower().endswith((".h5", ".hdf5"))


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
class _Hdf5Backend:
    def __init__(self, path: str, mode: str):
        import h5py

        self.root = h5py.File(path, mode)

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

    def create(self, name: str, shape, dtype):
        return self.root.create_dataset(name, shape=shape, dtype=dtype)

    def write_strings(self, name: str, values) -> None:
        import h5py

        self.root.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())

    def read_strings(self, name: str) -> list[str]:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in self.root[name][...]]

    def has(self, name: str) -> bool:
        return name in self.root

    def get(self, name: str):
        return self.root[name]

    def keys(self, name: str) -> list[str]:
        return list(self.root[name].keys()) if name in self.root else []

    def flush(self) -> None:
        self.root.flush()

    def close(self) -> None:
        self.root.close()


class _ZarrBackend:
    def __init__(self, path: str, mode: str):
        import zarr

        self.root = zarr.open_group(path, mode=mode)

    def set_attr(self, key: str, value) -> None:
        self.root.attrs[key] = value

    def attrs(self) -> dict:
        return dict(self.root.attrs)

    def create(self, name: str, shape, dtype):
        return self.root.create_array(name, shape=shape, dtype=dtype)

    def write_strings(self, name: str, values) -> None:
        arr = self.root.create_array(name, shape=(len(values),), dtype=str)
        if len(values):
            arr[:] = np.array(values, dtype=str)

    def read_strings(self, name: str) -> list[str]:
        return [str(v) for v in self.root[name][...]]

    def has(self, name: str) -> bool:
        return name in self.root

    def get(self, name: str):
        return self.root[name]

    def keys(self, name: str) -> list[str]:
        return list(self.root[name].keys()) if name in self.root else []

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _backend(path: str, mode: str):
    return _backend_for(path, path, mode)


def _backend_for(name: str, path: str, mode: str):
    """The backend the output name asks for, opened at ``path`` (the name may be a temporary)."""
    return (_Hdf5Backend if is_hdf5_name(name) else _ZarrBackend)(path, mode)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
class ResultWriter:
    """Writes one result store atomically.

    Everything goes to a hidden temporary sibling of ``path``; :meth:`commit` sets ``complete``
    last and renames it into place (replacing an old result only then). :meth:`abort` removes
    the temporary. Use as a context manager: an exception aborts.
    """

    def __init__(self, path, overwrite: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        if os.path.lexists(self.path) and not overwrite:
            raise InputError(f"{path}: output exists; pass --overwrite to replace it")
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise InputError(f"{path}: the output's folder {parent} does not exist")
        base = os.path.basename(self.path)
        self.temp = os.path.join(parent, f".{base}.matclust-tmp-{os.getpid()}")
        _remove(self.temp)
        self._backend = _backend_for(self.path, self.temp, "w")
        self._backend.set_attr("format", FORMAT)
        self._backend.set_attr("complete", False)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()

    # -- content ---------------------------------------------------------------------------
    def set_json(self, key: str, value: dict) -> None:
        self._backend.set_attr(key, json.dumps(value, allow_nan=False))

    def write_array(self, name: str, data: np.ndarray) -> None:
        arr = self._backend.create(name, data.shape, data.dtype)
        if data.size:
            arr[...] = data

    def create_array(self, name: str, shape, dtype):
        """An empty array to be filled slice by slice (for data that is streamed)."""
        return self._backend.create(name, shape, dtype)

    def write_strings(self, name: str, values) -> None:
        self._backend.write_strings(name, list(values))

    # -- completion ------------------------------------------------------------------------
    def commit(self) -> None:
        self._backend.set_attr("complete", True)
        self._backend.flush()
        self._backend.close()
        if os.path.lexists(self.path):
            if os.path.isdir(self.path) or os.path.isdir(self.temp):
                # Directories cannot be swapped in one rename: move the old one aside first.
                old = self.temp + ".old"
                os.replace(self.path, old)
                os.replace(self.temp, self.path)
                _remove(old)
                return
        os.replace(self.temp, self.path)

    def abort(self) -> None:
        try:
            self._backend.close()
        finally:
            _remove(self.temp)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class ResultStore:
    """Read access to a result store (for verify, reconstruct and inspect)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise InputError(f"{self.path}: no such result store")
        try:
            self._backend = _backend(self.path, "r")
        except Exception as exc:
            raise InputError(f"{self.path}: not a readable matclust result store: {exc}") from None
        attrs = self._backend.attrs()
        if attrs.get("format") != FORMAT:
            raise InputError(f"{self.path}: not a matclust result store (format attribute missing)")
        if attrs.get("complete") is not True:
            raise InputError(f"{self.path}: incomplete result store (no 'complete' attribute)")
        self.params: dict[str, Any] = json.loads(attrs["params"])
        self.report: dict[str, Any] = json.loads(attrs["report"])
        self.labels = np.asarray(self._backend.get("labels")[...], dtype=np.int64)
        self.names = self._backend.read_strings("names") if self._backend.has("names") else None
        self.widths = np.asarray(self._backend.get("widths")[...], dtype=np.int64)
        self.n_clusters = len(self._backend.keys("clusters"))

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
