"""Storing clusters planned out of core: exact bases and coefficients in two sequential passes.

When the greedy driver runs on summaries (:mod:`matclust.sources.summary`), only the members of
each cluster are known at the end; their data are scattered over the file. Reading each
cluster's members would re-read the file once per cluster, so instead:

* pass 1 streams the input once and feeds each factored cluster's columns to its
  :class:`~matclust.engine.exact.ExactBasis` (clusters are processed in groups whose
  accumulators fit the memory budget, one pass per group);
* pass 2 streams the input again and writes, per cluster, its coefficients (or raw columns) and
  accumulates its exact stored error.

Each cluster's members are stored in ascending index order, so within every input batch a
cluster's columns are one contiguous slice of its coefficient array. Coefficient columns are
buffered per cluster and written a storage chunk at a time.

A cluster whose exact error exceeds eps (only possible through rounding, as every admitted
cluster had a guaranteed bound <= eps) is stored raw; as stored, every cluster honours eps.
"""

from __future__ import annotations

import logging

import numpy as np

from matclust.blas import single_threaded
from matclust.driver import FormedCluster
from matclust.encode import EncodedCluster, worst_member
from matclust.engine import ExactBasis
from matclust.engine.exact import coefficients, pending_limit
from matclust.engine.linalg import (as_compute, column_norms2, singular_values2, sqnorm,
                                    truncation_error)
from matclust.sources.base import Batch, MatrixSource

logger = logging.getLogger(__name__)

#: Room left below eps, in units of the storage precision, for what rounding adds when storing.
STORAGE_ULPS = 16

#: Columns per storage chunk of a coefficient or raw array written in pieces.
COLUMN_CHUNK = 4096

#: Input bytes the compact checking and writing passes hold before encoding what they hold,
#: cluster by cluster (at most an eighth of the caches' budget; :func:`held_parts`). One input
#: batch at a time, the 10^6 planted matrices (500 clusters) came in 122,786 parts of ~8
#: matrices, and the per-part costs of encoding them (step searches, least squares,
#: bookkeeping) were most of those passes. The parts of a cluster encode as one, to the same
#: codes (the matrix guarantee's steps are per matrix; with the cluster guarantee each part
#: still meets eps on its own).
WRITE_HOLD_BYTES = 64 << 20


def split_by_cluster(labels: np.ndarray, batch):
    """(cluster id, sub-batch) for every cluster present in a batch, members in index order.
    The batch is reordered by cluster once; the sub-batches are views of that copy."""
    lab = labels[batch.indices]
    order = np.argsort(lab, kind="stable")
    # (Matrices of one width move as whole blocks, Batch.take: this copy is most of what the
    # storing passes do besides encoding.)
    grouped = batch.take(order)
    sorted_lab = lab[order]
    edges = np.concatenate([[0], np.flatnonzero(np.diff(sorted_lab)) + 1, [len(order)]])
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):
        yield int(sorted_lab[a]), grouped.span(a, b)


def cluster_parts(source: MatrixSource, labels: np.ndarray, progress=None, phase: str = "reading",
                  batch_bytes: int | None = None):
    """One sequential pass over ``source``: (cluster id, sub-batch) for every cluster present in
    each batch (see :func:`split_by_cluster`); ``progress`` counts the matrices passed.
    ``batch_bytes``: input bytes per batch (default: the source's)."""
    if progress:
        progress.start(phase, source.K)
    for batch in source.iter_batches(batch_bytes):
        yield from split_by_cluster(labels, batch)
        if progress:
            progress.advance(len(batch))


def held_parts(parts, hold: int):
    """The (cluster id, sub-batch) pairs of :func:`cluster_parts`, each cluster's sub-batches
    joined into one while up to ``hold`` bytes of them wait (see WRITE_HOLD_BYTES); clusters
    in id order each time the bytes held reach ``hold``, members in index order."""
    waiting: dict[int, list[Batch]] = {}
    held = 0
    for c, part in parts:
        waiting.setdefault(c, []).append(part)
        held += part.data.nbytes
        if held >= hold:
            for k in sorted(waiting):
                yield k, _joined(waiting.pop(k))
            held = 0
    for k in sorted(waiting):
        yield k, _joined(waiting.pop(k))


def _held(parts, hold: int | None):
    """:func:`held_parts` when ``hold`` is given, else the parts as they come."""
    return parts if hold is None else held_parts(parts, hold)


def _joined(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    widths = np.concatenate([np.diff(p.offsets) for p in parts])
    return Batch(np.concatenate([p.indices for p in parts]), np.hstack([p.data for p in parts]),
                 np.concatenate([[0], np.cumsum(widths)]).astype(np.int64))


class _ColumnSink:
    """Writes one cluster's (rows x N) array left to right, a storage chunk at a time.

    The buffer is allocated on first use and released when the array is complete; an array
    that fits one buffer is written in one piece when complete, so no handle stays open for it
    (HDF5 keeps a chunk cache per open dataset).
    """

    def __init__(self, writer, name: str, rows: int, total: int, dtype, width: int | None = None):
        self.writer, self.name = writer, name
        self.shape, self.dtype = (rows, total), dtype
        self.width = min(total, width or COLUMN_CHUNK)
        self.array = None
        self.buffer = None
        self.filled = 0  # columns in the buffer
        self.flushed = 0  # columns written

    def add(self, cols: np.ndarray) -> None:
        while cols.shape[1]:
            if self.buffer is None:
                self.buffer = np.empty((self.shape[0], self.width), dtype=self.dtype)
            take = min(cols.shape[1], self.width - self.filled)
            self.buffer[:, self.filled : self.filled + take] = cols[:, :take]
            self.filled += take
            cols = cols[:, take:]
            if self.filled == self.width:
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        if self.array is None and self.filled == self.shape[1]:
            self.writer.write_array(self.name, self.buffer[:, : self.filled])
        else:
            if self.array is None:
                self.array = self.writer.create_array(self.name, self.shape, self.dtype,
                                                      chunks=(self.shape[0], self.width))
            self.array[:, self.flushed : self.flushed + self.filled] = self.buffer[:, : self.filled]
        self.flushed += self.filled
        self.filled = 0
        if self.flushed == self.shape[1]:
            self.array = self.buffer = None


def _labels_of(planned: list[FormedCluster], K: int) -> np.ndarray:
    """Sort every cluster's members (one slice per batch) and label the input."""
    labels = np.full(K, -1, dtype=np.int64)
    for c, cluster in enumerate(planned):
        cluster.members = np.sort(cluster.members)
        labels[cluster.members] = c
    return labels


def store_planned(source: MatrixSource, planned: list[FormedCluster], rank: int, eps: float,
                  writer, budget_bytes: int, progress=None, per_matrix: bool = False,
                  accumulate=None):
    """Compute bases, coefficients and exact errors of planned clusters; write them.

    Returns (labels, list of EncodedCluster without their arrays). The arrays go to ``writer``
    (required: out-of-core results are never held in memory). With ``per_matrix``, one more
    pass finds the members whose own error against their cluster's stored basis exceeds eps
    and stores them as raw singletons (the others keep the basis: their errors do not change).
    """
    labels = _labels_of(planned, source.K)
    with single_threaded():  # many small products: see matclust.blas
        bases = _exact_bases(source, planned, labels, rank, eps, budget_bytes, progress,
                             accumulate=accumulate)
        if per_matrix and bases:
            planned, bases = _evict_members(source, planned, labels, bases, eps, progress)
            labels = _labels_of(planned, source.K)
        return labels, _write_clusters(source, planned, labels, bases, rank, writer,
                                       budget_bytes, progress)


def _evict_members(source, planned, labels, bases, eps, progress):
    """One pass: members of factored clusters whose error as stored exceeds eps leave as
    singletons (appended to the plan, in index order)."""
    dtype = source.storage_dtype
    stored = {c: as_compute(b.astype(dtype)) for c, b in bases.items()}
    out: list[np.ndarray] = []
    for c, part in cluster_parts(source, labels, progress, "checking"):
        basis = stored.get(c)
        if basis is None:
            continue
        data = as_compute(part.data)
        coeffs = coefficients(basis, data).astype(dtype)
        err2 = part.reduce_columns(column_norms2(data - basis @ as_compute(coeffs)))
        norm2 = part.reduce_columns(column_norms2(data))
        out.append(part.indices[err2 > eps * eps * norm2])
    evicted = np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)
    if not len(evicted):
        return planned, bases
    gone = np.zeros(source.K, dtype=bool)
    gone[evicted] = True
    for c, cluster in enumerate(planned):
        if c in bases:
            cluster.members = cluster.members[~gone[cluster.members]]
            cluster.columns = int(source.widths[cluster.members].sum())
    # Clusters left empty are dropped; one left with a single member is stored raw.
    kept, kept_bases = [], {}
    for c, cluster in enumerate(planned):
        if not len(cluster.members):
            continue
        if c in bases and len(cluster.members) >= 2:
            kept_bases[len(kept)] = bases[c]
        cluster.factored = len(kept) in kept_bases
        kept.append(cluster)
    singles = [FormedCluster(np.array([i]), int(source.widths[i]), None, False, grew=False)
               for i in evicted]
    return kept + singles, kept_bases


def store_planned_compact(source: MatrixSource, planned: list[FormedCluster], rank: int,
                          form_eps: float, sink, budget_bytes: int, progress=None,
                          passes=None) -> None:
    """The compact encoding of planned clusters: pass 1 as :func:`store_planned`; pass 2
    encodes each input batch's share of every cluster (:mod:`matclust.compact`; a member
    evicted there is stored alone at once) and appends the codes in index order.

    ``passes``: how the passes over the input run (:class:`LocalPasses`, sequential, by
    default; a sharded run's go over its shards in parallel, :mod:`matclust.stages`)."""
    # The checking pass keeps the evicted members' columns while they fit what the recluster
    # may hold (sink.recluster_bytes), sparing it a pass of its own to pick them out.
    passes = passes or LocalPasses(source, progress,
                                  keep_bytes=sink.recluster_bytes(budget_bytes))
    labels = _labels_of(planned, source.K)
    encoder, out = sink.encoder, sink.out
    hold = min(WRITE_HOLD_BYTES, budget_bytes // 8)  # see held_parts
    with single_threaded():
        bases = _exact_bases(source, planned, labels, rank, form_eps, budget_bytes, progress,
                             float_coefficients=False, accumulate=passes.accumulate)
        rounded = {c: encoder.rounded(bases.pop(c)) for c in sorted(bases)}
        if sink.params["guarantee"] == "matrix" and rounded:
            # Members that leave their cluster here (their own error is above 0.9 eps) would
            # be stored alone; clustered again among themselves (in memory: they are few)
            # most join clusters of their own. Their codes wait for the writing pass.
            logger.info("checking pass over the input: members of %d factored clusters",
                        len(rounded))
            evicted, blocks = passes.evicted(labels, rounded, encoder, hold)
            dissolved = _dissolved(planned, labels, rounded, evicted, rank, source)
            logger.info("%d members evicted; %d more in clusters dissolved (no longer worth "
                        "a basis)", len(evicted), len(dissolved))
            if len(dissolved):
                # A cluster left with too few members for its basis to pay (as the in-memory
                # driver decides after its evictions): all its members are clustered again.
                # MiniLM columns, rank 32: 207 such bases took 5.3 MB against 1.4 MB in memory.
                evicted = np.union1d(evicted, dissolved)
                blocks = None  # read again: the dissolved members' columns were not kept
            again = len(evicted) > 0 and sink.can_recluster(evicted, budget_bytes)
            if again:
                labels = labels.copy()
                labels[evicted] = -1
            else:
                blocks = None
        else:
            again = False
        cid = {c: out.new_cluster(rounded[c], planned[c].bound or 0.0,
                                  sink.cluster_shift(planned[c].members)) for c in rounded}
        logger.info("writing pass over the input: %d clusters, %d factored (compact)",
                    len(planned), len(rounded))
        bounds = {c: cl.bound for c, cl in enumerate(planned)}
        # A sharded run's encoding tasks start here; the evicted members are clustered again
        # in this process meanwhile (it sat idle: 10^6 planted, 2 workers, --shards 2).
        parts = passes.encoded(labels, rounded, bounds, encoder, out.code_dtype, hold)
        if again:
            sink.recluster(evicted, budget_bytes, blocks)
            blocks = None  # not held through the writing pass
        sink.add_encoded(parts, cid)


def _dissolved(planned, labels, rounded, evicted, rank: int, source) -> np.ndarray:
    """Members of the factored clusters that their evictions leave not worth storing factored
    (:func:`matclust.driver.worth_factoring`); those clusters leave ``rounded``."""
    from matclust.driver import worth_factoring

    stays = labels >= 0
    stays[evicted] = False
    count = np.bincount(labels[stays], minlength=len(planned))
    columns = np.bincount(labels[stays], weights=source.widths[stays], minlength=len(planned))
    gone = [c for c in rounded if not worth_factoring(rank, source.m, int(columns[c]), int(count[c]))]
    for c in gone:
        del rounded[c]
    return np.flatnonzero(np.isin(labels, gone)) if gone else np.zeros(0, dtype=np.int64)


class LocalPasses:
    """The storing passes as sequential passes over ``source`` in this process. ``keep_bytes``:
    the checking pass keeps the evicted members' columns up to this many bytes."""

    def __init__(self, source: MatrixSource, progress=None, keep_bytes: int = 0):
        self.source, self.progress, self.keep_bytes = source, progress, keep_bytes

    def accumulate(self, group, labels, rank) -> dict:
        """Every cluster of ``group``'s :class:`ExactBasis`, fed its members' columns."""
        return accumulate_bases(self.source, labels, group, rank, self.progress)

    def evicted(self, labels, rounded, encoder, hold=None):
        """The members the encoder would evict from their factored cluster, ascending, and
        their columns (None, to be read again, beyond ``keep_bytes``). ``hold``: see
        :func:`held_parts`."""
        return evicted_members(self.source, labels, rounded, encoder, self.progress,
                               keep_blocks=True, hold=hold, keep_bytes=self.keep_bytes)

    def encoded(self, labels, rounded, bounds, encoder, code_dtype, hold=None):
        """(cluster, its codes as stored or None, leftovers) for each cluster's part in each
        batch (or each ``hold`` bytes of batches, :func:`held_parts`), members labelled -1
        skipped; codes in ``code_dtype`` (:class:`matclust.format2.PartCodes`)."""
        return encoded_parts(self.source, labels, rounded, bounds, encoder, code_dtype,
                             self.progress, hold=hold)


def accumulate_bases(source, labels, group, rank, progress=None, phase="bases") -> dict:
    accs = {c: ExactBasis(source.m, rank, source.dtype) for c in group}
    for c, part in cluster_parts(source, labels, progress, phase):
        acc = accs.get(c)
        if acc is not None:
            acc.add(part.data)
    return accs


def encoded_parts(source, labels, rounded, bounds, encoder, code_dtype, progress=None,
                  first: int = 0, hold: int | None = None):
    """See :meth:`LocalPasses.encoded`; ``first`` is added to the indices of ``source`` (a
    shard's) to make them the collection's."""
    from matclust.format2 import PartCodes

    for c, part in _held(cluster_parts(source, labels, progress, "writing"), hold):
        if c < 0:  # clustered again
            continue
        group, leftovers = encoder.encode_cluster(part.indices + first, part.data, part.offsets,
                                                  rounded.get(c), bounds[c], whole=False)
        codes = None if group is None else PartCodes.of(group, encoder.complex, code_dtype)
        yield c, codes, leftovers


def evicted_members(source, labels, rounded, encoder, progress=None, keep_blocks=False,
                    hold: int | None = None, keep_bytes: int | None = None):
    """One pass: the members of factored clusters that the encoder would evict (as
    :meth:`matclust.compact.CompactEncoder.encode_cluster` decides), in index order; with
    ``keep_blocks``, also their columns (copied), in that order, or None once they take more
    than ``keep_bytes`` (no limit: None)."""
    from matclust.engine import budget as qb

    out, blocks, kept = [], [], 0
    for c, part in _held(cluster_parts(source, labels, progress, "checking"), hold):
        basis = rounded.get(c)
        if basis is None:
            continue
        data = as_compute(part.data)
        _, trunc2 = qb.truncation(basis, data, part.offsets)
        norm2 = qb.per_matrix(column_norms2(data), part.offsets)
        gone = np.flatnonzero(~encoder.keeps(data, part.offsets, norm2, trunc2))
        out.append(part.indices[gone])
        if keep_blocks and blocks is not None:
            taken = [np.array(part.block(j)) for j in gone]
            blocks.extend(taken)
            kept += sum(block.nbytes for block in taken)
            if keep_bytes is not None and kept > keep_bytes:
                blocks = None  # more than may be held: they are read again if needed
    indices = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    order = np.argsort(indices, kind="stable")
    if keep_blocks:
        return indices[order], None if blocks is None else [blocks[j] for j in order]
    return indices[order]


def _groups_within(factored, planned, m: int, budget_bytes: int, complex_data: bool):
    """Consecutive groups of clusters whose basis accumulators fit the budget together: one
    input pass per group. An accumulator holds at most m x min(m + pending_limit(m), N_c)
    numbers (plus one batch's columns of the cluster, which the batch itself bounds)."""
    itemsize = 16 if complex_data else 8
    group, held = [], 0
    for c in factored:
        need = m * min(m + pending_limit(m), planned[c].columns) * itemsize
        if group and held + need > budget_bytes:
            yield group
            group, held = [], 0
        group.append(c)
        held += need
    if group:
        yield group


def _exact_bases(source, planned, labels, rank, eps, budget_bytes, progress,
                 float_coefficients: bool = True, accumulate=None) -> dict[int, np.ndarray]:
    """Every factored cluster's exact basis, in passes over the input. ``float_coefficients``:
    coefficients will be stored as floats of the storage dtype, which must hold them (the
    compact encoding's codes and steps hold any magnitude). ``accumulate(group, labels,
    rank)``: the clusters' accumulators fed their columns (default: one pass here)."""
    if accumulate is None:
        accumulate = LocalPasses(source, progress).accumulate
    m = source.m
    factored = [c for c, cl in enumerate(planned) if cl.factored]
    bases: dict[int, np.ndarray] = {}
    for group in _groups_within(factored, planned, m, budget_bytes, source.dtype.kind == "c"):
        logger.info("bases pass over the input: %d of %d factored clusters", len(group),
                    len(factored))
        accs = accumulate(group, labels, rank)
        for c, acc in accs.items():
            basis, best = acc.basis_and_error()
            planned[c].best_error = best
            # Leave room for rounding to the storage precision, which pass 2 adds to e_r.
            # The coefficients are decided before any is written: each is at most the
            # cluster's norm, and must stay finite in the storage dtype at the input's
            # magnitude (entries near float32's largest can overflow there).
            if best <= eps - STORAGE_ULPS * np.finfo(source.storage_dtype).eps and (
                    not float_coefficients or
                    source.storable(np.sqrt(acc.norm2), planned[c].members, source.storage_dtype)):
                bases[c] = basis
            else:  # rounding defeated a bound, or too large to store factored: store raw
                logger.info("cluster %d: exact error %.3g leaves no room below eps, or its "
                            "coefficients would overflow; stored raw", c, best)
                planned[c].factored = False
    return bases


def _write_clusters(source, planned, labels, bases, rank, writer, budget_bytes, progress):
    m, dtype = source.m, source.storage_dtype
    sinks, encoded = {}, []
    # Every cluster may hold a partly filled buffer at once: size them to fit the budget.
    rows = sum(bases[c].shape[1] if c in bases else m for c in range(len(planned)))
    width = int(np.clip(budget_bytes // max(1, rows * np.dtype(dtype).itemsize), 16, COLUMN_CHUNK))
    for c, cl in enumerate(planned):
        prefix = f"clusters/{c}"
        writer.write_array(f"{prefix}/members", cl.members.astype(np.int64))
        if c in bases:
            basis = bases[c].astype(dtype)
            bases[c] = basis
            writer.write_array(f"{prefix}/basis", basis)
            sinks[c] = _ColumnSink(writer, f"{prefix}/coefficients", basis.shape[1], cl.columns,
                                   dtype, width)
        else:
            sinks[c] = _ColumnSink(writer, f"{prefix}/raw", m, cl.columns, dtype, width)
    logger.info("writing pass over the input: %d clusters, %d factored", len(planned), len(bases))
    err2 = np.zeros(len(planned))
    norm2 = np.zeros(len(planned))
    worst = np.zeros(len(planned))
    # Patience singletons were never bounded (bound None): their exact e_r, the tightest bound,
    # from the matrix's own singular values (a singleton lies within one batch).
    singleton_error = {}
    for c, part in cluster_parts(source, labels, progress, "writing"):
        data = as_compute(part.data)
        norm2[c] += sqnorm(data)
        if planned[c].bound is None:
            singleton_error[c] = truncation_error(singular_values2(data), rank)
        # Stored numbers are unscaled to the input's magnitude by the source; `back` is what
        # they read back as in the working scale, where the error is computed.
        if c in bases:
            basis = bases[c]
            coeffs, back = source.to_storage(coefficients(as_compute(basis), data), part.indices, dtype)
            diff = data - as_compute(basis) @ _finite(back, c)
            sinks[c].add(coeffs)
        else:
            raw, back = source.to_storage(data, part.indices, dtype)
            diff = data - _finite(back, c)
            sinks[c].add(raw)
        err2[c] += sqnorm(diff)
        worst[c] = max(worst[c], worst_member(part, diff))
    for sink in sinks.values():
        sink.flush()
    for c, cl in enumerate(planned):
        error = float(np.sqrt(err2[c] / norm2[c])) if norm2[c] > 0 else 0.0
        bound = cl.bound if cl.bound is not None else singleton_error[c]
        basis = bases.get(c)
        numbers = basis.size + basis.shape[1] * cl.columns if basis is not None else m * cl.columns
        encoded.append(EncodedCluster(cl.members, cl.columns, max(bound, error), error,
                                      stored_numbers=numbers,
                                      rank=0 if basis is None else basis.shape[1],
                                      max_matrix_error=float(worst[c])))
    return encoded


def _finite(back, c: int) -> np.ndarray:
    """Stored numbers read back; ``source.storable`` (coefficients) and the input's own range
    (raw) keep them finite, so None here is a defect, not bad input."""
    if back is None:
        raise RuntimeError(f"cluster {c}: a stored number overflowed the storage dtype")
    return back
