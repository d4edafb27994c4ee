"""The compact layout of a matclust/2 store (docs/format.md): writing and decoding.

Flat arrays instead of one group per cluster: a store of 250,000 clusters is a handful of
compressed arrays, and matrix i's codes are found from the labels, widths and ranks alone.

* ``labels`` (K,) int64, ``widths`` (K,) int64, ``names`` (K,) for group inputs;
* ``step_exponents`` (K,) int16: matrix i's step is 2^(e_i / 16) (``-32768``: zero);
* ``codes`` (T,) unsigned, zig-zag mapped: matrix i's codes are the next
  rows_i * n_i (twice that for complex data) values, matrices in index order, each as a
  (rows_i, n_i) array in row-major order (complex: the real rows, then the imaginary ones);
  rows_i = cluster_ranks[labels[i]], or m where that rank is 0 (raw entries);
* ``cluster_ranks`` (C,) int32; ``bases`` (m, R): the bases of the clusters with rank > 0 side
  by side, in cluster order; A_i = bases[:, b_c : b_c + r_c] @ (step_i * Z_i), or step_i * Z_i;
* per factored cluster (r_c > 0, in cluster order): ``cluster_norms`` float64 in [1/2, 1) and
  ``cluster_norm_exponents`` int32, ||M_c||_F = fraction * 2^exponent; ``basis_norms`` (R,)
  float64: the norm captured along each basis column, in units of the same power of two;
  ``cluster_bounds`` float32 (rounded up): the method's bound;
* ``cluster_errors`` (C,) float32, rounded up: every cluster's stored relative error.

Every array but ``labels``/``widths``-sized metadata is compressed with byte shuffle + zstd
(h5py with hdf5plugin; zarr's Blosc codec).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import numpy as np

from matclust.compact import CODE_CHUNK, AloneBatch, StoredGroup
from matclust.engine import budget as qb
from matclust.engine.linalg import column_ranges, distinct
from matclust.store import appendable_shuffle, copy_compressed_chunks

#: Codes compressed both ways to choose the shuffle (the first ones written). 2^16 chose as
#: 2^18 did on the five bench collections, by similar margins (bit against byte shuffle, zlib
#: bytes: RGB 11,855/11,270, gray 11,969/12,917, MiniLM 23,673/26,771, PDE 2,381/2,188,
#: planted 35,496/33,828), for a quarter of the time (the choice cost 3 % of the RGB run).
SHUFFLE_SAMPLE = 1 << 16
#: Chunks of codes handed to the store at a time. Compressing them was most of what a sharded
#: run's client did once its workers were done (10^6 planted: 123 chunks, ~0.1 s each on one
#: core); Zarr compresses the chunks of one write concurrently, and the writer's thread does
#: it while the client goes on adding parts (:meth:`ResultWriter.in_background`).
FLUSH_CHUNKS = 4

ARRAYS = ("labels", "widths", "step_exponents", "codes", "cluster_ranks", "bases",
          "cluster_norms", "cluster_norm_exponents", "basis_norms", "cluster_bounds",
          "cluster_errors")


def _byte_shuffled(a: np.ndarray) -> bytes:
    """The bytes of ``a`` grouped by significance (what Blosc's byte shuffle does)."""
    return a.view(np.uint8).reshape(len(a), a.itemsize).T.tobytes()


def _bit_shuffled(a: np.ndarray) -> bytes:
    """The bits of ``a`` grouped by significance (what Blosc's bit shuffle does)."""
    bits = np.unpackbits(a.view(np.uint8).reshape(len(a), a.itemsize), axis=1, bitorder="little")
    return np.packbits(bits.T, axis=1, bitorder="little").tobytes()


def _round_up32(x) -> np.ndarray:
    """float32 values never below ``x`` (reported errors must not shrink)."""
    x = np.asarray(x, dtype=np.float64)
    y = x.astype(np.float32)
    return np.where(y.astype(np.float64) < x, np.nextafter(y, np.float32(np.inf)), y).astype(np.float32)


@dataclass
class PartCodes:
    """A part of a cluster as :class:`CompactWriter` stores it: its members (ascending), their
    widths and step exponents, its totals (squared norm and error, in units of 2^shift; the
    energy along each basis column), its bound, the largest error of one member, and every
    member's codes as stored (flattened, zig-zagged, in the codes dtype; member j's are
    ``codes[code_offsets[j]:code_offsets[j + 1]]``). A fraction of the size of the group it
    comes from (int64 codes): what a sharded run's encoding tasks hand back."""

    members: np.ndarray
    widths: np.ndarray
    exponents: np.ndarray
    norm2: float
    err2: float
    bound: float
    basis_norms: np.ndarray
    shift: int
    worst: float
    codes: np.ndarray
    code_offsets: np.ndarray

    @classmethod
    def of(cls, group: StoredGroup, complex_data: bool, code_dtype) -> "PartCodes":
        widths = np.asarray(group.widths, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        raw, codes = group.basis is None, group.quantised.codes
        if not raw and len(widths) and np.all(widths == widths[0]):
            # Matrices of one width: every one's codes row-major, one after the other, at once.
            n = int(widths[0])
            flat = codes.reshape(codes.shape[0], len(widths), n).transpose(1, 0, 2).ravel()
        else:
            flat = np.concatenate([np.zeros(0, np.int64)] + [
                qb.flatten_codes(group.quantised.matrix_codes(offsets, j), raw, complex_data)
                for j in range(len(group.members))])
        worst = float(group.matrix_errors.max()) if len(group.members) else 0.0
        return cls(np.asarray(group.members, dtype=np.int64), widths,
                   np.asarray(group.quantised.exponents, dtype=np.int16), group.norm2,
                   float(group.quantised.err2.sum()), float(group.bound),
                   np.asarray(group.basis_norms, dtype=np.float64), int(group.shift), worst,
                   qb.zigzag(flat).astype(code_dtype), offsets * codes.shape[0])

    def unscaled(self, exponents: np.ndarray) -> "PartCodes":
        """The part encoded from its members multiplied by 2^exponents (one per member), in
        their own magnitude (what :func:`matclust.sinks.unscaled` does to a group)."""
        moved = qb.to_own_scale(self.exponents, self.shift, exponents, 0)
        return self if moved is None else replace(self, exponents=moved[0], shift=int(moved[1]))


@dataclass
class PartTotals:
    """Consecutive parts, each a :class:`PartCodes` without its codes, side by side in arrays
    (what a sharded run's encoding task hands the client when it writes the codes itself):
    part j is of cluster ``clusters[j]`` (the plan's numbering), its members
    ``members[starts[j]:starts[j + 1]]`` with their step ``exponents``, its totals
    ``norm2[j]`` ... ``worst[j]``, its energy along each basis column
    ``basis_norms[basis_starts[j]:basis_starts[j + 1]]``. Shipped as a dozen arrays, not
    thousands of objects."""

    clusters: np.ndarray
    starts: np.ndarray
    members: np.ndarray
    exponents: np.ndarray
    norm2: np.ndarray
    err2: np.ndarray
    bound: np.ndarray
    shift: np.ndarray
    worst: np.ndarray
    basis_starts: np.ndarray
    basis_norms: np.ndarray

    @classmethod
    def of(cls, parts: list[tuple[int, PartCodes]]) -> "PartTotals":
        def joined(name, dtype):
            return np.concatenate([np.zeros(0, dtype)] + [getattr(p, name) for _, p in parts])

        def starts(name):
            return np.concatenate([[0], np.cumsum([len(getattr(p, name)) for _, p in parts],
                                                  dtype=np.int64)]).astype(np.int64)

        def scalars(name, dtype):
            return np.array([getattr(p, name) for _, p in parts], dtype=dtype)

        return cls(np.array([c for c, _ in parts], dtype=np.int64), starts("members"),
                   joined("members", np.int64), joined("exponents", np.int16),
                   scalars("norm2", np.float64), scalars("err2", np.float64),
                   scalars("bound", np.float64), scalars("shift", np.int64),
                   scalars("worst", np.float64), starts("basis_norms"),
                   joined("basis_norms", np.float64))

    def __len__(self) -> int:
        return len(self.clusters)

    def slice(self, a: int, b: int) -> "PartTotals":
        """Parts a..b-1."""
        m0, m1 = self.starts[a], self.starts[b]
        n0, n1 = self.basis_starts[a], self.basis_starts[b]
        return PartTotals(self.clusters[a:b], self.starts[a : b + 1] - m0, self.members[m0:m1],
                          self.exponents[m0:m1], self.norm2[a:b], self.err2[a:b],
                          self.bound[a:b], self.shift[a:b], self.worst[a:b],
                          self.basis_starts[a : b + 1] - n0, self.basis_norms[n0:n1])

    def unscaled(self, exponents: np.ndarray) -> "PartTotals":
        """What :meth:`PartCodes.unscaled` does to each part (``exponents``: per member)."""
        moved = qb.to_own_scale(self.exponents, self.shift, exponents, self.starts[:-1])
        return self if moved is None else replace(self, exponents=moved[0], shift=moved[1])


def code_offsets(rows: np.ndarray, widths: np.ndarray, complex_data: bool) -> np.ndarray:
    """Where each matrix's codes start in the codes array, and their end: matrix i has
    rows_i x n_i codes (rows_i its cluster's rank, or m for raw entries), twice that for
    complex data (docs/format.md)."""
    counts = np.asarray(rows, dtype=np.int64) * widths * (2 if complex_data else 1)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class CompactWriter:
    """Collects stored groups and writes the compact arrays.

    A cluster is declared (:meth:`new_cluster`) and its members arrive as groups
    (:meth:`add_part`), in one piece (in memory) or one per input batch (out of core). Codes
    reach the store in matrix index order, appended as soon as every matrix before them is
    encoded, so a pass over the input in index order holds only one batch's codes; the
    in-memory path, which forms clusters in any order, holds them until the end. Clusters left
    without members (all evicted) are dropped and the ids closed up when finishing.
    """

    def __init__(self, writer, K: int, m: int, widths: np.ndarray, complex_data: bool,
                 code_dtype, basis_dtype):
        self.writer = writer
        self.K, self.m = int(K), int(m)
        self.widths = np.asarray(widths, dtype=np.int64)
        self.code_dtype = np.dtype(code_dtype)
        self.complex = bool(complex_data)
        self.basis_dtype = np.dtype(basis_dtype)
        self.labels = np.full(self.K, -1, dtype=np.int64)
        self.exponents = np.zeros(self.K, dtype=np.int16)
        # Zig-zagged codes of runs of consecutive matrices, by the first one's index, with the
        # run's length: written once every matrix before them is.
        self._pending: dict[int, tuple[np.ndarray, int]] = {}
        self._waiting = 0
        self._next = 0
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._codes = None  # created with the first codes: see _codes_array
        self.shuffle = None  # of the codes array: chosen on the first codes, or seed()'s
        self.clusters: list[dict] = []
        self.code_count = 0
        # Codes made and written elsewhere (see place_codes_elsewhere): None, or what writes
        # them, the matrices accounted for so far, and the codes made here meanwhile.
        self._placer = None
        self._placed: np.ndarray | None = None
        self._fills: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def place_codes_elsewhere(self, placer) -> None:
        """From now on parts may come without their codes (``PartCodes.codes`` None: a sharded
        run's tasks keep them, :class:`matclust.stages.ShardCodes`). ``placer`` (None: there
        is no store) writes every matrix's codes when finishing: ``placer.codes(lo, hi,
        offsets, fills)`` returns codes lo..hi-1 of the store, ``placer.start(array, offsets,
        fills)`` starts writing them all, given where each matrix's codes start (``offsets``,
        known once every cluster's rank is) and the codes made here (``fills``: members
        ascending, their codes as stored, offsets), ``placer.finish()`` waits until they are
        written and ``placer.abandon()`` until nothing writes any more (the store is not to be
        finished). The other arrays are written meanwhile. Everything else is kept as before,
        in the same order: the labels, statistics and the order in which matrices are
        accounted for (:attr:`waiting`) do not depend on where the codes go."""
        if self._next or self._waiting or self._buffer:
            raise RuntimeError("place_codes_elsewhere() must come before any codes")
        self._placer = placer
        self._placed = np.zeros(self.K, dtype=bool)

    # -- clusters and their parts ---------------------------------------------------------
    def new_cluster(self, basis: np.ndarray | None, bound: float = 0.0, shift: int = 0) -> int:
        self.clusters.append({"basis": basis, "bound": float(bound), "shift": int(shift),
                              "norm2": 0.0, "err2": 0.0, "size": 0, "columns": 0,
                              "rows2": None if basis is None else np.zeros(basis.shape[1])})
        return len(self.clusters) - 1

    def add(self, group: StoredGroup) -> int:
        """A group that is a whole cluster of its own; returns its id."""
        cid = self.new_cluster(group.basis, group.bound, group.shift)
        self.add_part(cid, group)
        return cid

    def add_part(self, cid: int, group: StoredGroup) -> None:
        self.add_codes(cid, PartCodes.of(group, self.complex, self.code_dtype))

    def add_codes(self, cid: int, part: "PartCodes") -> None:
        """A part of cluster ``cid`` whose codes are already as stored (:class:`PartCodes`:
        what :meth:`add_part` makes of a group; a sharded run's tasks make it themselves)."""
        self._account(cid, part.shift, part.norm2, part.err2, part.basis_norms,
                      len(part.members), int(part.widths.sum()), part.bound)
        self.labels[part.members] = cid
        self.exponents[part.members] = part.exponents
        if part.codes is None and self._placed is None:
            raise RuntimeError("a part without its codes, and nothing to place them")
        self._pend(part.members, part.codes, part.code_offsets, zigzagged=True)
        self._drain()

    def add_parts(self, cids: np.ndarray, parts: PartTotals) -> None:
        """:meth:`add_codes` for each of ``parts`` in turn (part j to cluster ``cids[j]``),
        their codes placed elsewhere (:meth:`place_codes_elsewhere`): the same sums in the same
        order, the per-matrix arrays at once."""
        if self._placed is None:
            raise RuntimeError("parts without their codes, and nothing to place them")
        widths = self.widths[parts.members]
        columns = np.add.reduceat(widths, parts.starts[:-1]) if len(widths) else widths
        sizes = np.diff(parts.starts)
        for j, (cid, size, norm2, err2, bound, shift) in enumerate(zip(
                cids.tolist(), sizes.tolist(), parts.norm2.tolist(), parts.err2.tolist(),
                parts.bound.tolist(), parts.shift.tolist())):
            along = parts.basis_norms[parts.basis_starts[j]: parts.basis_starts[j + 1]]
            self._account(cid, shift, norm2, err2, along, size, int(columns[j]), bound)
        self.labels[parts.members] = np.repeat(cids, sizes)
        self.exponents[parts.members] = parts.exponents
        self._placed[parts.members] = True
        self._waiting += len(parts.members)
        self._advance()

    def _account(self, cid: int, shift: int, norm2: float, err2: float, basis_norms,
                 size: int, columns: int, bound: float) -> None:
        """A part's totals (in units of 2^shift) added to cluster ``cid``'s statistics."""
        info = self.clusters[cid]
        norm2, err2, rows2 = self._in_cluster_scale(info, shift, norm2, err2, basis_norms)
        info.pop("error", None)  # a seeded cluster's stored error no longer holds
        info["norm2"] += norm2
        info["err2"] += err2
        info["size"] += size
        info["columns"] += columns
        info["bound"] = max(info["bound"], bound)
        if info["rows2"] is not None and len(basis_norms):
            info["rows2"] += rows2

    @staticmethod
    def _in_cluster_scale(info: dict, shift: int, norm2: float, err2: float, basis_norms):
        """A group's squared norm, squared error and squared basis norms in the units of its
        cluster. Parts of one run share the cluster's power of two; a part appended later
        (matclust.append) was encoded at its own, 2^shift."""
        d = 2 * (shift - info["shift"])
        rows2 = np.asarray(basis_norms, dtype=np.float64) ** 2
        if d == 0:
            return norm2, err2, rows2
        with np.errstate(over="ignore", under="ignore"):  # inf: the caller's to refuse
            return float(np.ldexp(norm2, d)), float(np.ldexp(err2, d)), np.ldexp(rows2, d)

    def error_with(self, cid: int, group: StoredGroup) -> float:
        """Cluster ``cid``'s relative error were ``group`` added to it: the energy-weighted
        sqrt((E_c + E_g) / (N_c + N_g)) of squared errors E and squared norms N, the cluster's
        own as recorded (for a seeded cluster, its stored error rounded up: an upper bound)."""
        info = self.clusters[cid]
        norm2, err2, _ = self._in_cluster_scale(info, group.shift, group.norm2,
                                                float(group.quantised.err2.sum()),
                                                group.basis_norms)
        total = info["norm2"] + norm2
        with np.errstate(invalid="ignore"):  # inf / inf: NaN, not a number the caller accepts
            return float(np.sqrt((info["err2"] + err2) / total)) if total > 0 else 0.0

    def seed(self, reader: "CompactReader") -> None:
        """Start from a complete store (an append, matclust.append): its K0 matrices become
        matrices 0..K0-1 here and its clusters 0..C0-1, their codes copied as stored (widened
        to this writer's code dtype where it is larger). Groups added afterwards hold matrices
        K0.. and join those clusters (:meth:`add_part`) or form new ones. Call before any
        group is added."""
        if self._next or self.clusters:
            raise RuntimeError("seed() must come first")
        if reader.codes_dtype.itemsize > self.code_dtype.itemsize:
            raise ValueError(f"codes of {reader.codes_dtype} do not fit {self.code_dtype}")
        K0, C0 = len(reader.labels), reader.n_clusters
        self.labels[:K0] = reader.labels
        self.exponents[:K0] = reader.exponents
        summary = reader.summaries()
        errors = summary["cluster_errors"].astype(np.float64)
        # Plain Python numbers, for the per-cluster loop (13,824 MiniLM clusters: 0.04 s
        # with a NumPy scalar for each of these).
        sizes = np.bincount(reader.labels, minlength=C0).tolist()
        columns = np.bincount(reader.labels, weights=reader.widths,
                              minlength=C0).astype(np.int64).tolist()
        factored = (np.asarray(reader.ranks) > 0).tolist()
        err2s = (errors ** 2).tolist()
        f = 0  # index among the factored clusters
        for c, error in enumerate(errors.tolist()):
            info = {"basis": None, "bound": 0.0, "shift": 0, "norm2": 1.0,
                    "err2": err2s[c], "size": sizes[c], "columns": columns[c],
                    "rows2": None, "error": error}
            if factored[c]:
                # Norms in units of 2^exponent (docs/format.md): ||M_c|| = fraction there.
                fraction = float(summary["cluster_norms"][f])
                b0, b1 = reader.basis_offsets[c], reader.basis_offsets[c + 1]
                info.update(basis=reader.basis(c), bound=float(summary["cluster_bounds"][f]),
                            shift=int(summary["cluster_norm_exponents"][f]),
                            norm2=fraction ** 2, err2=(errors[c] * fraction) ** 2,
                            rows2=summary["basis_norms"][b0:b1].astype(np.float64) ** 2)
                f += 1
            self.clusters.append(info)
        self._next = K0
        # The old store's shuffle: its chunks can then be copied as stored, and choosing one
        # again (compressing a sample both ways) cost more than the copy (MiniLM: 0.05 s).
        self.shuffle = reader.codes_shuffle
        total = int(reader.code_offsets[-1])
        self.code_count = total
        # Whole chunks straight to the new array, compressed as they are stored where the
        # arrays allow it; the last partial one waits in the buffer for the codes that follow
        # it (no chunk is compressed twice).
        whole = total - total % CODE_CHUNK
        copied = 0
        if whole and self.writer is not None:
            target = self._codes_array(np.asarray(reader.codes_slice(0, SHUFFLE_SAMPLE)))
            if copy_compressed_chunks(reader._codes, target, whole // CODE_CHUNK):
                copied = whole
        step = 8 * CODE_CHUNK
        for lo in range(copied, whole, step):
            codes = np.asarray(reader.codes_slice(lo, min(lo + step, whole)))
            self._codes_array(codes).append(codes.astype(self.code_dtype))
        if whole < total:
            tail = np.asarray(reader.codes_slice(whole, total))
            self._buffer.append(tail.astype(np.uint64))
            self._buffered += len(tail)

    def add_alone(self, batch: AloneBatch) -> None:
        """Matrices each a cluster of its own, in batch order (what :meth:`add` does for each,
        at once: thousands of them come together)."""
        first = len(self.clusters)
        self.labels[batch.members] = np.arange(first, first + len(batch))
        self.exponents[batch.members] = batch.exponents
        for basis, bound, shift, norm2, err2, width, along in zip(
                batch.bases, batch.bounds.tolist(), batch.shifts.tolist(), batch.norm2.tolist(),
                batch.err2.tolist(), batch.widths.tolist(), batch.basis_norms):
            self.clusters.append({
                "basis": basis, "bound": bound, "shift": shift, "norm2": norm2, "err2": err2,
                "size": 1, "columns": width, "rows2": None if basis is None else along ** 2})
        self._pend(batch.members, batch.codes, batch.code_offsets)
        self._drain()

    def stats(self) -> list[dict]:
        """Per non-empty cluster, in id order: size, columns, rank, bound, error, stored."""
        out = []
        for info in self.clusters:
            size = info["size"]
            if not size:
                continue
            error = info.get("error")  # a seeded cluster's, left as it was stored
            if error is None:
                norm2 = info["norm2"]
                error = math.sqrt(info["err2"] / norm2) if norm2 > 0 else 0.0
            basis = info["basis"]
            rank = 0 if basis is None else int(basis.shape[1])
            out.append({"id": len(out), "size": size, "columns": info["columns"],
                        "rank": rank, "bound": max(info["bound"], error), "error": error,
                        "stored": "factored" if rank else "raw"})
        return out

    @property
    def waiting(self) -> int:
        """Matrices encoded but not yet written, waiting for an earlier one."""
        return self._waiting

    @property
    def stored_numbers(self) -> int:
        return self.code_count + sum(i["basis"].size for i in self.clusters
                                     if i["size"] and i["basis"] is not None)

    # -- codes, in index order --------------------------------------------------------------
    def _drain(self) -> None:
        if self._placed is not None:
            self._advance()
            return
        while self._next in self._pending:
            codes, count = self._pending.pop(self._next)
            self._buffer.append(codes)
            self._buffered += codes.size
            self.code_count += codes.size
            self._next += count
            self._waiting -= count
            if self._buffered >= FLUSH_CHUNKS * CODE_CHUNK:
                self._flush()

    def _pend(self, members: np.ndarray, flat: np.ndarray, offsets: np.ndarray,
              zigzagged: bool = False) -> None:
        """Codes of ``members`` (ascending), matrix j's ``flat[offsets[j]:offsets[j + 1]]``
        as stored (zig-zagged here unless ``zigzagged``), to be written in index order
        (:meth:`_drain`); kept as runs of consecutive matrices (one dictionary entry per run,
        not per matrix)."""
        members = np.asarray(members, dtype=np.int64)
        if not len(members):
            return
        if not zigzagged:
            flat = qb.zigzag(flat).astype(self.code_dtype)
        if self._placed is not None:  # codes elsewhere: only which matrices are accounted for
            if flat is not None:
                self._fills.append((members, flat, np.asarray(offsets, dtype=np.int64)))
            self._placed[members] = True
            self._waiting += len(members)
            return
        starts = np.concatenate([[0], np.flatnonzero(np.diff(members) != 1) + 1, [len(members)]])
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
            self._pending[int(members[a])] = (flat[offsets[a]: offsets[b]], b - a)
        self._waiting += len(members)

    def _advance(self) -> None:
        """:meth:`_drain` when the codes are placed elsewhere: past every matrix accounted
        for, a window at a time (one part moves it little; a long-awaited one may move it far)."""
        start = self._next
        while self._next < self.K:
            window = self._placed[self._next: self._next + 4096]
            if window.all():
                self._next += len(window)
                continue
            self._next += int(np.argmin(window))
            break
        self._waiting -= self._next - start

    def _code_offsets(self) -> np.ndarray:
        """Where each matrix's codes start in the store, and their end (as
        :class:`CompactReader` finds them)."""
        rows = np.array([self.m if i["basis"] is None else i["basis"].shape[1]
                         for i in self.clusters], dtype=np.int64)
        return code_offsets(rows[self.labels], self.widths, self.complex)

    def _fill_codes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The codes made here (not by the tasks), members ascending: members, codes, offsets."""
        if not self._fills:
            return np.zeros(0, np.int64), np.zeros(0, self.code_dtype), np.zeros(1, np.int64)
        members = np.concatenate([f[0] for f in self._fills])
        codes = np.concatenate([f[1] for f in self._fills]).astype(self.code_dtype, copy=False)
        starts = np.concatenate([f[2][:-1] + base for f, base in zip(
            self._fills, np.cumsum([0] + [len(f[1]) for f in self._fills[:-1]]))])
        counts = np.concatenate([np.diff(f[2]) for f in self._fills])
        order = np.argsort(members, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(counts[order])]).astype(np.int64)
        return members[order], codes[column_ranges(starts[order], counts[order])], offsets

    def _codes_array(self, sample: np.ndarray):
        """The codes array, with the shuffle that suits the first codes: a bit shuffle for
        sparse codes (DCT coefficients: most high bits zero), a byte shuffle for dense ones
        (weights: zstd's Huffman stage then sees whole low bytes; bench: 10 % on MiniLM
        columns). Chosen by compressing a sample both ways with zlib, a stand-in for zstd
        that every Python has."""
        if self._codes is None:
            if self.shuffle is None:
                sample = sample[:SHUFFLE_SAMPLE].astype(self.code_dtype)
                self.shuffle = "bit" if len(zlib.compress(_bit_shuffled(sample), 6)) <= \
                    len(zlib.compress(_byte_shuffled(sample), 6)) else "byte"
            self._codes = self.writer.create_appendable("codes", self.code_dtype, CODE_CHUNK,
                                                        self.shuffle)
        return self._codes

    def _flush(self) -> None:
        if not self._buffer or self.writer is None:
            return
        flat = np.concatenate(self._buffer).astype(self.code_dtype, copy=False)
        # Whole chunks only until the end, so no chunk is compressed twice.
        keep = len(flat) - len(flat) % CODE_CHUNK if self._next < self.K else len(flat)
        if keep:
            # Compressed in the writer's thread while this one goes on (see FLUSH_CHUNKS).
            self.writer.in_background(self._codes_array(flat).append, flat[:keep])
        self._buffer = [flat[keep:]] if keep < len(flat) else []
        self._buffered = len(flat) - keep

    def _place_codes(self) -> bool:
        """Every code of the store, written by the placer (see :meth:`place_codes_elsewhere`)
        into the codes array, created here at its full length with the shuffle that suits its
        first codes, as the store would have chosen it. Returns whether the placer is writing
        (to be waited for with ``finish()``)."""
        offsets, fills = self._code_offsets(), self._fill_codes()
        self.code_count = int(offsets[-1])
        if self.writer is None or not self.code_count:
            return False
        self.writer.settle()
        sample = self._placer.codes(0, min(SHUFFLE_SAMPLE, self.code_count), offsets, fills)
        array = self._codes_array(sample)
        array.resize((self.code_count,))
        self._placer.start(array, offsets, fills)
        return True

    def finish(self, names=None) -> tuple[np.ndarray, list[dict]]:
        """Write every array but ``codes`` (already written) once every matrix is encoded;
        returns the final labels and the clusters' statistics (:meth:`stats`)."""
        if self._next != self.K:
            raise RuntimeError(f"matrix {self._next} was never encoded")
        placing = False
        if self._placed is not None:
            placing = self._place_codes()
        else:
            self._flush()
        # Codes placed elsewhere are written by a sharded run's tasks while this thread
        # writes the other arrays (at 10^6 planted matrices, 0.6 s that followed them).
        try:
            if self.writer is not None:
                self.writer.settle()  # every code written here
                self._codes_array(np.zeros(1, dtype=self.code_dtype))  # no codes at all: empty
            labels, stats = self._write_arrays(names)
        except BaseException:
            if placing:  # nothing may write once the unfinished store is removed
                self._placer.abandon()
            raise
        if placing:
            self._placer.finish()
        return labels, stats

    def _write_arrays(self, names) -> tuple[np.ndarray, list[dict]]:
        """Every array but ``codes``; the final labels and the clusters' statistics."""
        used = [c for c, info in enumerate(self.clusters) if info["size"]]
        renumber = np.full(len(self.clusters), -1, dtype=np.int64)
        renumber[used] = np.arange(len(used))
        self.labels = renumber[self.labels]
        kept = [self.clusters[c] for c in used]
        bases = [i["basis"] for i in kept if i["basis"] is not None]
        stats = self.stats()
        w = self.writer
        if w is None:  # results kept in memory (the API without an output store)
            return self.labels, stats
        w.write_array("labels", self.labels, compress=True)
        w.write_array("widths", self.widths, compress=True)
        w.write_array("step_exponents", self.exponents, compress=True)
        w.write_array("cluster_ranks", np.array([s["rank"] for s in stats], dtype=np.int32),
                      compress=True)
        stacked = np.hstack(bases) if bases else np.zeros((self.m, 0))
        w.write_array("bases", stacked.astype(self.basis_dtype), compress=True)
        # Per factored cluster (what merges and appends bound newcomers with): its norm as a
        # fraction in [1/2, 1) and a power of two (a norm of 1e300-sized entries overflows a
        # float), the norm captured along each basis column in the same power of two, its bound.
        factored = [(i, s) for i, s in zip(kept, stats) if i["basis"] is not None]
        fractions, exponents, along = [], [], []
        for info, _ in factored:
            fraction, e = np.frexp(np.sqrt(info["norm2"]))
            fractions.append(fraction)
            exponents.append(int(e) + info["shift"])
            along.append(np.ldexp(np.sqrt(info["rows2"]), -int(e)))
        w.write_array("cluster_norms", np.asarray(fractions, dtype=np.float64), compress=True)
        w.write_array("cluster_norm_exponents", np.asarray(exponents, dtype=np.int32),
                      compress=True)
        w.write_array("basis_norms", np.concatenate(along) if along else np.zeros(0),
                      compress=True)
        w.write_array("cluster_bounds", _round_up32([s["bound"] for _, s in factored]),
                      compress=True)
        w.write_array("cluster_errors", _round_up32([s["error"] for s in stats]), compress=True)
        if names is not None:
            w.write_strings("names", names)
        return self.labels, stats


class CompactReader:
    """Decodes matrices of a compact store (read through a store backend)."""

    def __init__(self, backend, m: int, complex_data: bool):
        get = self._get = backend.get
        self.missing = [name for name in ARRAYS if not backend.has(name)]
        if self.missing:
            raise KeyError(f"no {', '.join(self.missing)} array")
        self._factored_arrays = {name: get(name).shape[0] for name in
                                 ("cluster_norms", "cluster_norm_exponents", "cluster_bounds")}
        self._errors_len = get("cluster_errors").shape[0]
        self._basis_norms_len = get("basis_norms").shape[0]
        self.m = int(m)
        self.complex = bool(complex_data)
        self.labels = np.asarray(get("labels")[...], dtype=np.int64)
        self.widths = np.asarray(get("widths")[...], dtype=np.int64)
        self.exponents = np.asarray(get("step_exponents")[...], dtype=np.int64)
        self.ranks = np.asarray(get("cluster_ranks")[...], dtype=np.int64)
        self._codes = get("codes")
        self._bases_handle = get("bases")
        self._bases = None
        self.basis_offsets = np.concatenate([[0], np.cumsum(self.ranks)]).astype(np.int64)
        rows = np.where(self.ranks[self.labels] > 0, self.ranks[self.labels], self.m)
        self.code_offsets = code_offsets(rows, self.widths, self.complex)
        self.rows = rows

    @property
    def n_clusters(self) -> int:
        return len(self.ranks)

    def codes_slice(self, lo: int, hi: int) -> np.ndarray:
        """Codes lo..hi-1 as stored (zig-zag mapped)."""
        return np.asarray(self._codes[lo:hi])

    @property
    def bases_dtype(self) -> np.dtype:
        return np.dtype(self._bases_handle.dtype)

    @property
    def codes_dtype(self) -> np.dtype:
        return np.dtype(self._codes.dtype)

    @property
    def codes_shuffle(self) -> str | None:
        """The codes array's shuffle, "bit" or "byte" (None: compressed some other way)."""
        return appendable_shuffle(self._codes)

    def summaries(self) -> dict:
        """The per-cluster arrays an append or a merge bounds a union with (docs/format.md):
        cluster_norms, cluster_norm_exponents, basis_norms, cluster_bounds (per factored
        cluster) and cluster_errors (per cluster)."""
        return {name: np.asarray(self._get(name)[...]) for name in
                ("cluster_norms", "cluster_norm_exponents", "basis_norms", "cluster_bounds",
                 "cluster_errors")}

    def basis(self, c: int) -> np.ndarray | None:
        if self.ranks[c] == 0:
            return None
        if self._bases is None:
            self._bases = np.asarray(self._bases_handle[...])
        return self._bases[:, self.basis_offsets[c]: self.basis_offsets[c + 1]]

    def decode_range(self, start: int, stop: int):
        """(index, matrix) for matrices start..stop-1, decoded in double precision."""
        lo, hi = self.code_offsets[start], self.code_offsets[stop]
        flat = qb.unzigzag(np.asarray(self._codes[lo:hi])) if hi > lo else np.zeros(0, np.int64)
        steps = qb.step_values(self.exponents[start:stop])
        for j, i in enumerate(range(start, stop)):
            a, b = self.code_offsets[i] - lo, self.code_offsets[i + 1] - lo
            raw = self.ranks[self.labels[i]] == 0
            codes = qb.unflatten_codes(flat[a:b], self.rows[i], self.widths[i], raw, self.complex)
            yield i, qb.decode(self.basis(int(self.labels[i])), codes, steps[j], self.complex)

    def consistency_problems(self) -> list[str]:
        """What the decoder relies on, checked: sizes agree, labels in range, codes complete."""
        problems = []
        K, C = len(self.labels), len(self.ranks)
        if len(self.widths) != K or len(self.exponents) != K:
            problems.append(f"labels ({K}), widths ({len(self.widths)}) and step_exponents "
                            f"({len(self.exponents)}) differ in length")
            return problems
        if K and (self.labels.min() < 0 or self.labels.max() >= C):
            problems.append(f"labels outside 0..{C - 1}")
            return problems
        if C and len(distinct(self.labels)) != C:
            problems.append("some cluster has no member")
        if np.any(self.widths < 1):
            problems.append("widths must be >= 1")
        if np.any(self.ranks < 0):
            problems.append("negative cluster rank")
        if self._codes.shape[0] != self.code_offsets[-1]:
            problems.append(f"codes holds {self._codes.shape[0]} values; labels, widths and ranks "
                            f"need {self.code_offsets[-1]}")
        factored = int(np.count_nonzero(self.ranks > 0))
        for name, length in self._factored_arrays.items():
            if length != factored:
                problems.append(f"{name} has {length} entries for {factored} factored clusters")
        if self._errors_len != C:
            problems.append(f"cluster_errors has {self._errors_len} entries for {C} clusters")
        if self._basis_norms_len != int(self.basis_offsets[-1]):
            problems.append(f"basis_norms has {self._basis_norms_len} entries for "
                            f"{int(self.basis_offsets[-1])} basis columns")
        shape = tuple(self._bases_handle.shape)
        if shape != (self.m, int(self.basis_offsets[-1])):
            problems.append(f"bases has shape {shape}; the ranks need ({self.m}, "
                            f"{int(self.basis_offsets[-1])})")
        return problems
