"""The reading layer: a collection of matrices seen through chunk-aligned batches.

A *source* knows the collection's shape (K matrices of m x n_i), its dtype and its on-disk
chunking, and hands out :class:`Batch` objects. It never holds more than the batch it is
reading; caching across batches is the caller's decision (see ``matclust.pool``).

Two layouts are supported (README.md, "Input"):

* a 3-D array (K, m, n): matrix i is ``array[i]``;
* a group of 2-D arrays (m, n_i): matrix i is the i-th member in sorted name order.

Both HDF5 datasets and Zarr arrays slice into numpy arrays, so one implementation serves both;
the format modules only open files and list candidate datasets.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from matclust.engine.linalg import as_compute, columns_of, peak, peak_exponents, times_power2
from matclust.errors import InputError

#: Bytes of matrix data aimed at per batch read: large enough to amortise per-call overhead,
#: small enough that a handful of batches fit comfortably in memory.
TARGET_BATCH_BYTES = 16 * 2**20


def working_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype matrices are held and computed in, for an input dtype (README.md, "Input").

    float16 is widened to float32 (numpy has no fast float16 linear algebra) and integers are
    read as float64; other accepted dtypes are kept.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize in (2, 4):
        return np.dtype(np.float32)
    if dtype.kind == "f" and dtype.itemsize == 8:
        return np.dtype(np.float64)
    if dtype.kind in "iu":
        return np.dtype(np.float64)
    if dtype.kind == "c" and dtype.itemsize in (8, 16):
        return dtype
    raise ValueError(f"unsupported dtype {dtype}")


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype results are stored in: the input's precision, with float16 and integers
    stored as float32 (README.md, "Output store")."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        return np.dtype(np.float32)
    return working_dtype(dtype)


def apart_bits(dtype: np.dtype) -> int:
    """How many powers of two a matrix's largest entry may lie below the collection's largest
    and still be clustered with the others, for data held in ``dtype`` (see
    :meth:`MatrixSource.calibrate`).

    Double precision: 400. A clustered matrix then has a squared norm of at least 2**-800 in
    the working scale, so cluster norms, error energies down to 2**-200 of them and the
    estimators' rounding margins all stay normal numbers. Single precision: the largest entry
    stays 2**(mantissa + 8) above the smallest normal number, so what the working scale pushes
    below the normal range is far below the matrix's own precision.
    """
    info = np.finfo(np.dtype(dtype))
    return min(400, -int(info.minexp) - int(info.nmant) - 8)


def is_supported_dtype(dtype: np.dtype) -> bool:
    try:
        working_dtype(dtype)
    except (ValueError, TypeError):
        return False
    return True


@dataclass
class Batch:
    """Consecutive-in-memory view of several matrices: their columns side by side.

    ``data[:, offsets[j]:offsets[j + 1]]`` is matrix ``indices[j]`` (m x n_j), in the working
    dtype. One wide array (instead of a list) lets callers apply a basis to a whole batch in one
    matrix product.
    """

    indices: np.ndarray
    data: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def block(self, j: int) -> np.ndarray:
        return self.data[:, self.offsets[j] : self.offsets[j + 1]]

    def blocks(self) -> list[np.ndarray]:
        return [self.block(j) for j in range(len(self))]

    def column_owner(self) -> np.ndarray:
        """For every column of ``data``, the batch position of the matrix it belongs to."""
        return np.repeat(np.arange(len(self)), np.diff(self.offsets))

    def reduce_columns(self, values: np.ndarray) -> np.ndarray:
        """Sum a per-column quantity into a per-matrix one."""
        widths = np.diff(self.offsets)
        if len(widths) and widths.min() > 0:
            return np.add.reduceat(values, self.offsets[:-1])
        out = np.zeros(len(self), dtype=values.dtype)
        np.add.at(out, self.column_owner(), values)
        return out

    def peaks(self) -> np.ndarray:
        """Per matrix, its largest |real part| or |imaginary part| (float64): the magnitude
        :meth:`MatrixSource.calibrate` works from; never overflows."""
        return np.maximum.reduceat(peak(self.data, axis=0), self.offsets[:-1])

    def span(self, a: int, b: int) -> "Batch":
        """Matrices a..b-1 of this batch, a view of its data."""
        first = self.offsets[a]
        return Batch(self.indices[a:b], self.data[:, first : self.offsets[b]],
                     self.offsets[a : b + 1] - first)

    def take(self, positions: Sequence[int]) -> "Batch":
        """A batch of the matrices at the given positions of this batch, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        all_widths = np.diff(self.offsets)
        widths = all_widths[positions]
        offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        # np.take keeps the rows contiguous; data[:, columns] would come out column-major,
        # and every later gather from it (a cached batch compacted) would transpose.
        if len(all_widths) and np.all(all_widths == all_widths[0]):
            # Equal widths: whole matrices' rows are taken, runs of n numbers, not single
            # columns (3x faster for 128 x 48 blocks).
            m, n = self.data.shape[0], int(all_widths[0])
            data = np.take(self.data.reshape(m, len(self), n), positions, axis=1)
            return Batch(self.indices[positions], data.reshape(m, len(positions) * n), offsets)
        return Batch(self.indices[positions], np.take(self.data, columns_of(self.offsets, positions), axis=1), offsets)


class MatrixSource:
    """A matrix collection over array-likes that slice into numpy arrays.

    Use :func:`matclust.sources.open_source` (files) or :func:`matclust.sources.array_source`
    (numpy arrays) rather than this class directly.

    Attributes
    ----------
    K, m : int
        Number of matrices and their common row count (after ``transpose``).
    widths : ndarray of int64, shape (K,)
        Column count n_i of every matrix (after ``transpose``).
    input_dtype, dtype, storage_dtype : numpy dtype
        The dtype on disk, the working dtype matrices are returned in, and the dtype results
        are stored in.
    names : list of str or None
        Member names, for group inputs.
    path, dataset : str
        Where the collection lives, for messages and for the output's ``params``.
    """

    #: Most input bytes per batch of a sequential pass (set from the memory limit's plan).
    batch_limit: int = 2**62
    #: (function, arguments) opening this collection again, set by the file readers: a source
    #: sent to another process (pickled) opens its file there by path or URL and storage
    #: options, with the calibration it had, instead of carrying open file handles.
    reopen = None
    #: Members of a group read at once per batch: more than one where every read waits for a
    #: request (a Zarr store at a URL; set by the reader that opens it).
    concurrent_reads: int = 1

    def __init__(self, path: str, dataset: str, transpose: bool, *, stack=None, members=None,
                 find_missing=None):
        self.path = str(path)
        self.dataset = dataset
        self.transpose = bool(transpose)
        #: ``find_missing(array, start, stop)``: (piece, first, stop) of a stored piece that
        #: rows start..stop-1 need and that is missing, else None; None: nothing to check.
        self._find_missing = find_missing
        self._stack = stack
        self._members = members  # list of (name, array-like), sorted by name
        if stack is not None:
            self._init_stack(stack)
        else:
            self._init_group(members)
        if self.K == 0:
            raise InputError(f"{self.where}: the collection is empty (K = 0)")
        if self.m == 0:
            raise InputError(f"{self.where}: the matrices have no rows (m = 0)")
        zero = np.flatnonzero(self.widths == 0)
        if len(zero):
            raise InputError(f"{self.where}: matrix {self.describe(int(zero[0]))} has no columns")
        self.offsets = np.concatenate([[0], np.cumsum(self.widths)]).astype(np.int64)
        self.calibrate(None)

    # -- construction ---------------------------------------------------------------------
    @property
    def where(self) -> str:
        return f"{self.path}:{self.dataset}" if self.dataset not in ("", "/") else self.path

    def _check_dtype(self, dtype, what: str) -> None:
        if not is_supported_dtype(dtype):
            raise InputError(
                f"{self.where}: {what} has dtype {np.dtype(dtype)}; expected float16/32/64, "
                "an integer type or complex64/128"
            )

    def _init_stack(self, stack) -> None:
        shape = tuple(stack.shape)
        if len(shape) != 3:
            raise InputError(
                f"{self.where}: array is {len(shape)}-D with shape {shape}; expected a 3-D array "
                "(K, m, n) or a group of 2-D arrays (m, n_i)"
            )
        self._check_dtype(stack.dtype, "the array")
        self.input_dtype = np.dtype(stack.dtype)
        self.dtype = working_dtype(self.input_dtype)
        self.storage_dtype = storage_dtype(self.input_dtype)
        K, rows, cols = shape
        self.K = K
        self.m, n = (cols, rows) if self.transpose else (rows, cols)
        self.widths = np.full(K, n, dtype=np.int64)
        self.names = None
        chunks = getattr(stack, "chunks", None)
        self._chunk_len = int(chunks[0]) if chunks else 1

    def _init_group(self, members) -> None:
        if not members:
            raise InputError(f"{self.where}: the group has no 2-D arrays (K = 0)")
        for name, arr in members:
            if len(arr.shape) != 2:
                raise InputError(
                    f"{self.where}: member '{name}' is {len(arr.shape)}-D with shape "
                    f"{tuple(arr.shape)}; every member of a group must be a 2-D array (m, n_i)"
                )
            self._check_dtype(arr.dtype, f"member '{name}'")
        dtypes = {np.dtype(arr.dtype) for _, arr in members}
        self.input_dtype = np.result_type(*dtypes)
        if not is_supported_dtype(self.input_dtype):
            raise InputError(f"{self.where}: members mix dtypes {sorted(map(str, dtypes))}")
        self.dtype = working_dtype(self.input_dtype)
        self.storage_dtype = storage_dtype(self.input_dtype)
        axis = 1 if self.transpose else 0
        first_name, first = members[0]
        self.m = int(first.shape[axis])
        for name, arr in members:
            if arr.shape[axis] != self.m:
                what = "column" if self.transpose else "row"
                raise InputError(
                    f"{self.where}: member '{name}' has {arr.shape[axis]} {what}s but "
                    f"'{first_name}' has {self.m}; all members need the same {what} count"
                    + (" (with --transpose, columns become rows)" if self.transpose else "")
                )
        self.K = len(members)
        self.widths = np.array([arr.shape[1 - axis] for _, arr in members], dtype=np.int64)
        self.names = [name for name, _ in members]
        self._chunk_len = 1

    # -- description ---------------------------------------------------------------------
    def describe(self, i: int) -> str:
        """Human name of matrix i for messages: its index, and its member name for groups."""
        return f"{i} ('{self.names[i]}')" if self.names is not None else str(i)

    @property
    def matrix_bytes(self) -> int:
        """Bytes of matrix data in the working dtype."""
        return int(self.offsets[-1]) * self.m * self.dtype.itemsize

    def summary(self) -> dict:
        widths = self.widths
        return {
            "path": self.path,
            "dataset": self.dataset,
            "layout": "stack" if self._stack is not None else "group",
            "K": int(self.K),
            "m": int(self.m),
            "n_min": int(widths.min()),
            "n_max": int(widths.max()),
            "columns": int(self.offsets[-1]),
            "input_dtype": str(self.input_dtype),
            "dtype": str(self.dtype),
            "transpose": self.transpose,
            "chunk_len": int(self._chunk_len),
        }

    # -- magnitude ----------------------------------------------------------------------------
    def calibrate(self, peaks: np.ndarray | None, top: int | None = None) -> None:
        """Choose the power of two every matrix is multiplied by when read, from each matrix's
        largest entry as read uncalibrated (:meth:`Batch.peaks`); ``None``: read the values
        as they are (the state before calibration).

        The whole collection gets one power of two, putting its largest entry in [1/2, 1):
        squared norms of any cluster then neither over- nor underflow, and since multiplying
        by a power of two is exact, everything computed afterwards is the same, bit for bit,
        for x and 2**k x. A nonzero matrix whose largest entry lies more than
        ``apart_bits(dtype)`` powers of two below the collection's is *apart*: it gets its own
        power of two (its largest entry in [1/2, 1) too) instead of underflowing, and is
        stored on its own (:attr:`apart`; the drivers make it a singleton, since a cluster
        must share one scale). ``top``: the collection's largest exponent when ``peaks`` are
        only part of it (a shard of a distributed run), at least their own largest.
        """
        self.exponents = np.zeros(self.K, dtype=np.int64)
        self.apart = np.zeros(self.K, dtype=bool)
        self._scaled = False
        if peaks is None:
            return
        peaks = np.asarray(peaks, dtype=np.float64)
        own = peak_exponents(peaks)
        top = max(int(own.max()), top) if top is not None else int(own.max())
        self.apart = (peaks > 0) & (own < top - apart_bits(self.dtype))
        self.exponents = np.where(self.apart, -own, -top).astype(np.int64)
        self._scaled = bool(self.exponents.any())

    def _column_exponents(self, indices: np.ndarray):
        """The working scale's exponent of every column of the matrices ``indices`` side by side
        (one int when they share it)."""
        exps = self.exponents[indices]
        if len(exps) == 0 or np.all(exps == exps[0]):
            return int(exps[0]) if len(exps) else 0
        return np.repeat(exps, self.widths[indices])

    def to_working_scale(self, batch: Batch) -> Batch:
        """The batch multiplied by its matrices' powers of two (see :meth:`calibrate`): the one
        place where data read are scaled. A new array, as the data read may be a view of the
        caller's (in-memory sources)."""
        if self._scaled:
            exps = self._column_exponents(batch.indices)
            if np.any(exps):
                batch.data = times_power2(batch.data, exps)
        return batch

    def to_storage(self, values: np.ndarray, indices: np.ndarray, dtype):
        """``values`` computed in the working scale for the columns of the matrices ``indices``
        (side by side; e.g. a cluster's coefficients or raw columns), as stored: multiplied
        back to the input's magnitude and rounded to ``dtype``; the one place where stored
        numbers are unscaled.

        Returns (stored, back): ``back`` is what ``stored`` reads back as in the working scale
        (double precision), for computing the stored error exactly; None when a stored number
        overflows ``dtype`` (the caller stores the cluster another way).
        """
        exps = self._column_exponents(np.asarray(indices, dtype=np.int64))
        with np.errstate(over="ignore"):  # an overflow is detected below and handled by the caller
            stored = times_power2(as_compute(values), np.negative(exps)).astype(dtype)
        if not np.isfinite(stored).all():
            return stored, None
        return stored, times_power2(as_compute(stored), exps)

    def storable(self, magnitude: float, indices: np.ndarray, dtype) -> bool:
        """Whether numbers up to ``magnitude`` in the working scale (e.g. a cluster's column
        norms, which bound its coefficients) stay finite in ``dtype`` once unscaled; for
        deciding before any is written."""
        exps = self.exponents[np.asarray(indices, dtype=np.int64)]
        # 1 - 2**-20: room for the rounding of the numbers themselves.
        limit = float(np.finfo(np.dtype(dtype)).max) * (1.0 - 2.0**-20)
        with np.errstate(over="ignore"):  # a limit beyond double precision's range is inf
            return bool(magnitude <= float(np.ldexp(limit, int(exps.min()))))

    # -- reading --------------------------------------------------------------------------
    def chunk_ranges(self, target_bytes: int | None = None) -> list[tuple[int, int]]:
        """Index ranges [start, stop) covering 0..K, aligned to the storage chunks.

        ``target_bytes`` defaults to the module's TARGET_BATCH_BYTES, read at call time (so
        tests can shrink batches by patching it)."""
        if target_bytes is None:
            target_bytes = min(TARGET_BATCH_BYTES, self.batch_limit)
        per_matrix = max(1, int(self.widths.mean() * self.m * self.input_dtype.itemsize))
        step = max(1, target_bytes // (per_matrix * self._chunk_len)) * self._chunk_len
        return [(s, min(s + step, self.K)) for s in range(0, self.K, step)]

    def iter_batches(self, target_bytes: int | None = None) -> Iterator[Batch]:
        """Every matrix, in chunk-aligned batches, in order.

        The next batch is read in a background thread while the caller works on this one
        (decompression and copying release the GIL in h5py and zarr as numpy does), so a
        sequential pass overlaps reading with computing. At most two batches are held.
        """
        ranges = self.chunk_ranges(target_bytes)
        if len(ranges) < 2:
            for start, stop in ranges:
                yield self.read_range(start, stop)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="matclust-read") as pool:
            pending = pool.submit(self.read_range, *ranges[0])
            for nxt in ranges[1:]:
                batch = pending.result()
                pending = pool.submit(self.read_range, *nxt)
                yield batch
            yield pending.result()

    def read_range(self, start: int, stop: int) -> Batch:
        """Matrices start..stop-1 as one batch (one slice per array on disk)."""
        indices = np.arange(start, stop, dtype=np.int64)
        if self._stack is not None:
            self._refuse_missing(self._stack, start, stop, lambda a, b: f"matrices {a}..{b - 1}")
            slab = self._fetch(lambda: self._stack[start:stop], f"matrices {start}..{stop - 1}")
            if self.transpose:
                slab = slab.transpose(0, 2, 1)
            b, m, n = slab.shape
            data = slab.transpose(1, 0, 2).reshape(m, b * n)
            offsets = np.arange(0, b * n + 1, n, dtype=np.int64)
        else:
            return self._read_members(indices)
        data = np.ascontiguousarray(data, dtype=self.dtype)
        self._check_finite(data, indices, offsets)
        return self.to_working_scale(Batch(indices, data, offsets))

    def _refuse_missing(self, array, start: int, stop: int, holds) -> None:
        """A stored piece the read needs is missing: an error, never the fill value."""
        if self._find_missing is None:
            return
        try:
            found = self._find_missing(array, start, stop)
        except Exception:  # a store whose keys cannot be listed: the read says what is wrong
            return
        if found is not None:
            piece, first, last = found
            raise InputError(f"{self.where}: {piece} is missing (it holds {holds(first, last)}); "
                             "writers may leave out chunks that equal the fill value: pass "
                             "--fill-missing if this store was written that way")

    def _fetch(self, read, what: str) -> np.ndarray:
        """``read()`` as an array; a file that opened but fails while reading (truncated,
        corrupt chunk, failing filter) is bad input naming the file, dataset and matrices."""
        try:
            return np.asarray(read())
        except InputError:
            raise
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise InputError(f"{self.where}: cannot read {what} (truncated or corrupt file?): "
                             f"{reason}") from None

    def _read_member(self, i: int) -> np.ndarray:
        array = self._members[i][1]
        self._refuse_missing(array, 0, array.shape[0],
                             lambda a, b: f"part of matrix {self.describe(int(i))}")
        block = self._fetch(lambda: array[...], f"matrix {self.describe(int(i))}")
        return block.T if self.transpose else block

    def _read_members(self, indices: np.ndarray) -> Batch:
        if self.concurrent_reads > 1 and len(indices) > 1:
            with ThreadPoolExecutor(max_workers=min(self.concurrent_reads, len(indices)),
                                    thread_name_prefix="matclust-member") as pool:
                parts = list(pool.map(self._read_member, indices))  # the first failure raises
        else:
            parts = [self._read_member(i) for i in indices]
        data = np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=self.dtype)
        offsets = np.concatenate([[0], np.cumsum(self.widths[indices])]).astype(np.int64)
        self._check_finite(data, indices, offsets)
        return self.to_working_scale(Batch(indices, data, offsets))

    def read(self, indices: Sequence[int]) -> Batch:
        """Arbitrary matrices, in the given order, reading each touched chunk range once."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return Batch(indices, np.zeros((self.m, 0), self.dtype), np.zeros(1, np.int64))
        if self._members is not None:
            return self._read_members(indices)
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        parts = []
        for start, stop in self.chunk_ranges():
            lo, hi = np.searchsorted(sorted_idx, [start, stop])
            if lo == hi:
                continue
            wanted = sorted_idx[lo:hi]
            first, last = int(wanted[0]), int(wanted[-1]) + 1
            parts.append((order[lo:hi], self.read_range(first, last), wanted - first))
        return self.gather(indices, parts)

    def gather(self, indices: np.ndarray, parts) -> Batch:
        """One batch of the matrices ``indices`` (in that order), copied once from ``parts``:
        triples (sel, batch, at), the requested positions ``sel`` being the matrices at
        positions ``at`` of ``batch``."""
        offsets = np.concatenate([[0], np.cumsum(self.widths[indices])]).astype(np.int64)
        out = np.empty((self.m, int(offsets[-1])), self.dtype)
        # np.take into a contiguous array is ~10x faster than assigning to fancy-indexed
        # columns: the parts are taken one after the other, then put in order by one more take.
        order = np.concatenate([sel for sel, _, _ in parts])
        if len(parts) == 1 and (np.diff(order) == 1).all():
            batch, at = parts[0][1], parts[0][2]
            np.take(batch.data, columns_of(batch.offsets, at), axis=1, out=out)
        else:
            joined = np.concatenate([np.take(batch.data, columns_of(batch.offsets, at), axis=1)
                                     for _, batch, at in parts], axis=1)
            joined_offsets = np.concatenate([[0], np.cumsum(self.widths[indices[order]])])
            position = np.empty(len(indices), dtype=np.int64)
            position[order] = np.arange(len(indices))
            np.take(joined, columns_of(joined_offsets.astype(np.int64), position), axis=1, out=out)
        return Batch(indices, out, offsets)

    def _check_finite(self, data: np.ndarray, indices: np.ndarray, offsets: np.ndarray) -> None:
        if np.isfinite(data).all():
            return
        bad_col = int(np.flatnonzero(~np.isfinite(data).all(axis=0))[0])
        j = int(np.searchsorted(offsets, bad_col, side="right") - 1)
        raise InputError(
            f"{self.where}: matrix {self.describe(int(indices[j]))} contains NaN or Inf"
        )

    def close(self) -> None:
        """Release the underlying file handle (a no-op for in-memory sources)."""

    def __reduce_ex__(self, protocol):
        if self.reopen is None:  # in-memory sources travel with their arrays
            return super().__reduce_ex__(protocol)
        function, args = self.reopen
        state = {key: getattr(self, key) for key in ("exponents", "apart", "_scaled")}
        if "batch_limit" in self.__dict__:
            state["batch_limit"] = self.batch_limit
        return function, (args, state)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
