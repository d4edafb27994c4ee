"""Writing matrix collections (the input format), for ``sample`` and ``reconstruct``."""

from __future__ import annotations

import os

import numpy as np

from matclust.errors import InputError
from matclust.safety import (COLLECTION_ATTR, check_target, disk_full_reason, require_path,
                             write_failure)
from matclust.store import (RoomCheckedFile, _remove, hidden_sibling, is_hdf5_name,
                            replace_atomically)


def write_collection(path, matrices, *, layout: str = "stack", dataset: str = "matrices",
                     names=None, zarr_format: int = 3, extra: dict | None = None,
                     overwrite: bool = False, chunk_len: int | None = None) -> None:
    """Write matrices as a 3-D array ('stack') or a group of 2-D arrays ('group').

    ``matrices`` is a 3-D array or a list of 2-D arrays (all with the same row count); ``extra``
    maps names to further arrays written at the root (e.g. planted labels). The file is built
    under a temporary name and renamed into place.
    """
    path = require_path(path, "DEST")
    check_target(path, overwrite, "collection", what="DEST")
    temp = hidden_sibling(path, f"tmp-{os.getpid()}")
    _remove(temp)
    try:
        if is_hdf5_name(path):
            _write_hdf5(temp, matrices, layout, dataset, names, extra or {}, chunk_len)
        else:
            _write_zarr(temp, matrices, layout, dataset, names, extra or {}, zarr_format, chunk_len)
        replace_atomically(temp, path)  # an old DEST stays whole until the new one is in place
    except BaseException as exc:
        _remove(temp)
        reason = disk_full_reason(exc) if isinstance(exc, Exception) else None
        if reason is None:
            raise
        kept = f"; the previous {path} is unchanged" if os.path.lexists(path) else ""
        raise write_failure(path, reason, "collection", kept) from None


def _member_names(count: int, names) -> list[str]:
    if names is not None:
        return list(names)
    width = max(4, len(str(count - 1)))
    return [f"m{i:0{width}d}" for i in range(count)]


def _stack(matrices) -> np.ndarray:
    if isinstance(matrices, np.ndarray):
        return matrices
    widths = {np.shape(a)[1] for a in matrices}
    if len(widths) != 1:
        raise InputError("matrices of different widths need the 'group' layout")
    return np.stack(matrices)


def _stack_chunks(shape, chunk_len):
    per = max(1, shape[1] * shape[2])
    default = max(1, min(shape[0], (1 << 20) // per))  # about 1M numbers per chunk
    return (min(shape[0], chunk_len or default), shape[1], shape[2])


def _write_hdf5(path, matrices, layout, dataset, names, extra, chunk_len):
    import h5py

    room = RoomCheckedFile(path)  # a full disk is reported, not a crash (see there)
    with h5py.File(room, "w") as f:
        f.attrs[COLLECTION_ATTR] = "collection"  # what --overwrite may replace later
        if layout == "stack":
            data = _stack(matrices)
            f.create_dataset(dataset, data=data, chunks=_stack_chunks(data.shape, chunk_len) if data.size else None)
        else:
            grp = f.create_group(dataset)
            for name, mat in zip(_member_names(len(matrices), names), matrices):
                grp.create_dataset(name, data=np.asarray(mat))
        for key, value in extra.items():
            f.create_dataset(key, data=value)
    room.close()
    if room.failure is not None:
        raise room.failure


def _write_zarr(path, matrices, layout, dataset, names, extra, zarr_format, chunk_len):
    import zarr

    root = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    root.attrs[COLLECTION_ATTR] = "collection"  # what --overwrite may replace later
    # Every chunk is stored, zeros included: a chunk missing from a collection matclust wrote
    # is then always damage, never a chunk of zeros left out (see matclust.sources).
    full = {"config": {"write_empty_chunks": True}}
    if layout == "stack":
        data = _stack(matrices)
        arr = root.create_array(dataset, shape=data.shape, dtype=data.dtype,
                                chunks=_stack_chunks(data.shape, chunk_len), **full)
        arr[...] = data
    else:
        grp = root.create_group(dataset)
        for name, mat in zip(_member_names(len(matrices), names), matrices):
            mat = np.asarray(mat)
            grp.create_array(name, shape=mat.shape, dtype=mat.dtype, **full)[...] = mat
    for key, value in extra.items():
        value = np.asarray(value)
        root.create_array(key, shape=value.shape, dtype=value.dtype)[...] = value
