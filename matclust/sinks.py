"""Where formed clusters go: the plain matclust/1 arrays or the compact encoding.

One sink per run. Both clustering paths feed it: the in-memory driver hands over each cluster
as it is formed (:meth:`consume`), the out-of-core planner the whole plan
(:meth:`store_planned`), and :meth:`finish` returns the labels, the per-cluster statistics, the
stored numbers and the largest error of any one matrix.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from matclust.blas import CORES, ahead_on_all_cores, on_all_cores, single_threaded
from matclust.compact import CompactEncoder, max_code_bound
from matclust.encode import EncodedCluster, encode
from matclust.engine import budget as qb
from matclust.engine.linalg import relative_errors
from matclust.format2 import CompactWriter
from matclust.report import cluster_stat


class PlainSink:
    """Basis and coefficients (or raw columns) at the input's precision, one group per cluster."""

    def __init__(self, source, params, estimator, writer):
        self.source, self.params, self.estimator, self.writer = source, params, estimator, writer
        self.labels = np.full(source.K, -1, dtype=np.int64)
        self.encoded: list[EncodedCluster] = []
        self.kept: list[EncodedCluster] = []

    def consume(self, formed, reader) -> None:
        enc = encode(formed, reader, self.params["eps"], self.estimator,
                     error_control=self.estimator is not None,
                     per_matrix=self.params["guarantee"] == "matrix")
        cid = len(self.encoded)
        self.labels[enc.members] = cid
        if self.writer is not None:
            write_cluster(self.writer, cid, enc)
            enc = enc.on_disk()  # written: keep the numbers, not the arrays
        else:
            self.kept.append(enc)
        self.encoded.append(enc)

    def clusters_done(self, reader) -> None:
        """Every cluster has been consumed: nothing waits here."""

    def store_planned(self, planned, form_eps, budget, progress, passes=None) -> None:
        """``passes``: how the passes over the input run (see ``store_planned_compact``); the
        plain layout takes only its bases from them."""
        from matclust.streaming import store_planned

        self.labels, self.encoded = store_planned(
            self.source, planned, self.params["rank"], self.params["eps"], self.writer, budget,
            progress, per_matrix=self.params["guarantee"] == "matrix",
            accumulate=passes.accumulate if passes is not None else None)

    def finish(self):
        if self.writer is not None:
            self.writer.write_array("labels", self.labels)
            self.writer.write_array("widths", self.source.widths.astype(np.int64))
            if self.source.names is not None:
                self.writer.write_strings("names", self.source.names)
        stats = [cluster_stat(cid, enc) for cid, enc in enumerate(self.encoded)]
        numbers = sum(enc.numbers for enc in self.encoded)
        worst = max((enc.max_matrix_error for enc in self.encoded), default=0.0)
        return self.labels, stats, numbers, worst


def codes_of_one(source, rank: int) -> int:
    """The most codes one matrix of ``source`` may have (its own budget bounds each one's
    size: :func:`matclust.compact.max_code_bound`; one step for a group is used only where
    its codes keep within that)."""
    parts = 2 if source.dtype.kind == "c" else 1
    return parts * max(source.m, int(rank)) * int(source.widths.max())


def unscaled(group, exponents: np.ndarray):
    """``group``, encoded from its members multiplied by 2^exponents (one per member, in
    member order), brought back to the members' own magnitude: every step divided by its
    member's power of two, and the group's norms' unit (``shift``) by the first one's (one
    power of two for a whole cluster; matrices apart from the collection's scale are alone)."""
    moved = qb.to_own_scale(group.quantised.exponents, group.shift, exponents, 0)
    if moved is not None:
        group.quantised.exponents, group.shift = moved[0], int(moved[1])
    return group


def unscaled_alone(batch, exponents: np.ndarray):
    """What :func:`unscaled` does to a group, for an :class:`~matclust.compact.AloneBatch` of
    matrices encoded multiplied by 2^exponents (one per matrix, in batch order) at once."""
    moved = qb.to_own_scale(batch.exponents, batch.shifts, exponents, slice(None))
    if moved is not None:
        batch.exponents, batch.shifts = moved
    return batch


def write_cluster(writer, cid: int, enc: EncodedCluster) -> None:
    prefix = f"clusters/{cid}"
    writer.write_array(f"{prefix}/members", enc.members.astype(np.int64))
    if enc.basis is not None:
        writer.write_array(f"{prefix}/basis", enc.basis)
        writer.write_array(f"{prefix}/coefficients", enc.coefficients)
    else:
        writer.write_array(f"{prefix}/raw", enc.raw)


#: Matrices pooled into one group at most (cluster guarantee), and how many later matrices'
#: codes may wait behind a pooled one before the pool is stored (bounds the memory they take).
POOL_MATRICES = 4096
PENDING_MATRICES = 65536
#: Matrices stored alone are encoded this many at a time (the matrix guarantee).
ALONE_BATCH = 256


class CompactSink:
    """The compact encoding (:mod:`matclust.compact`) into the matclust/2 arrays
    (:mod:`matclust.format2`)."""

    def __init__(self, source, params, writer, encoder=None, out=None, first: int = 0):
        """``encoder`` and ``out`` (a :class:`CompactWriter`) are made here, unless the store
        holds other matrices before the source's (an append, matclust.append: ``out`` seeded
        with the store's ``first`` matrices; the source's matrix i is the store's first + i)."""
        self.source, self.params, self.writer = source, params, writer
        self.first = int(first)
        if out is None:
            encoder = CompactEncoder(params["eps"], params["guarantee"], params["rank"],
                                     source.m, source.storage_dtype)
            code_dtype = qb.code_dtype(max_code_bound(params["eps"],
                                                      codes_of_one(source, params["rank"])))
            encoder.max_code = (int(np.iinfo(code_dtype).max) - 1) // 2
            out = CompactWriter(writer, source.K, source.m, source.widths,
                                source.dtype.kind == "c", code_dtype, encoder.basis_dtype)
        self.encoder, self.out = encoder, out
        self.kept = []  # the stored groups, when there is no store to hold them
        self.worst = 0.0
        # Cluster guarantee: matrices that join no factored cluster wait here to be stored as
        # one group of DCT coefficients with one step (matclust.compact.encode_pool).
        self.pool: list[tuple[int, np.ndarray]] = []
        self.unread: list[int] = []  # members of unfactored clusters, read in batches
        # In memory (consume), full pools of matrices stored alone wait here until there is
        # one for every core, then are encoded side by side (:meth:`encode_ready`): most come
        # at the end of a run (patience singletons), when nothing else is left to do.
        self.side_by_side = False
        self.ready: list[list] = []

    def unscale(self, group):
        """The group's steps and norms in the input's magnitude: the source multiplied every
        matrix by 2^exponents[i] when reading it (one power of two for a whole cluster;
        matrices apart from the collection's scale are alone)."""
        return unscaled(group, self.source.exponents[group.members])

    def cluster_shift(self, members) -> int:
        """The power of two that scales a cluster's norms back to the input's magnitude."""
        return -int(self.source.exponents[members[0]])

    def _add(self, group, cid=None) -> None:
        self.encode_ready()  # what came before it is stored before it (cluster ids in order)
        group = self.unscale(group)
        if self.first:
            group.members = group.members + self.first
        if cid is None:
            self.out.add(group)
        else:
            self.out.add_part(cid, group)
        if len(group.members):
            self.worst = max(self.worst, float(group.matrix_errors.max()))
        if self.writer is None:
            self.kept.append(group)

    def add_codes(self, part, cid: int) -> None:
        """A part of cluster ``cid`` as its codes are stored (out of core, where the writer
        holds the results: a :class:`matclust.format2.PartCodes`), in the working scale."""
        self.encode_ready()  # as in _add: what came before it is stored before it
        part = part.unscaled(self.source.exponents[part.members])
        if self.first:
            part = replace(part, members=part.members + self.first)
        self.out.add_codes(cid, part)
        if len(part.members):
            self.worst = max(self.worst, part.worst)

    def add_encoded(self, parts, cid: dict) -> None:
        """What a writing pass hands over, in order (``cid``: the store's cluster id of each
        planned cluster): (cluster, its part as :class:`matclust.format2.PartCodes` or None,
        the members left over) for each part, or a whole shard's parts at once
        (:class:`matclust.stages.ShardParts`, their codes kept by the task that made them)."""
        for item in parts:
            if isinstance(item, tuple):
                c, part, leftovers = item
                if part is not None:
                    self.add_codes(part, cid[c])
                self.leftovers(leftovers)
            else:
                self._add_shard_parts(item, cid)

    def _add_shard_parts(self, shard, cid: dict) -> None:
        """A shard's parts (their totals side by side, ``shard.totals``) and the members left
        over (``shard.leftovers``) as :meth:`add_codes` and :meth:`leftovers` one part after
        another add them. Only the leftover pool's flushes depend on that order, and only
        while the pool holds matrices: until the next leftovers, parts are added at once
        while it is empty."""
        totals = shard.totals
        totals = totals.unscaled(self.source.exponents[totals.members])
        cids = np.array([cid[c] for c in totals.clusters.tolist()], dtype=np.int64)
        if len(totals):
            self.worst = max(self.worst, float(totals.worst.max()))
        # (parts added before, whether they were the last part's own, the members left over)
        events, e, done = shard.leftovers, 0, 0
        while done < len(totals) or e < len(events):
            after, own, leftovers = events[e] if e < len(events) else (len(totals), False, [])
            if after == done and not own:  # an encoding that kept no member
                self.leftovers(leftovers)
                e += 1
                continue
            # One part while the pool waits (each may flush it), else all up to the leftovers.
            upto = done + 1 if self.pool else after
            self.out.add_parts(cids[done:upto], totals.slice(done, upto))
            done = upto
            if own and after == done:
                self.leftovers(leftovers)
                e += 1
            elif self.pool:
                self.leftovers(())

    def _add_alone(self, batch) -> None:
        """Matrices each stored alone (a :class:`matclust.compact.AloneBatch`; see :meth:`_add`)."""
        batch = unscaled_alone(batch, self.source.exponents[batch.members])
        worst = relative_errors(batch.err2, batch.norm2).max(initial=0.0)
        self.worst = max(self.worst, float(worst))
        if self.first:
            batch.members = batch.members + self.first
        self.out.add_alone(batch)
        if self.writer is None:
            self.kept.extend(batch.groups(self.source.m, self.out.complex))

    def consume(self, formed, reader) -> None:
        self.side_by_side = True
        if formed.basis is None and formed.batch is None:
            # Not factored: its members go to the pool; read them together, not one by one
            # (most such clusters are patience singletons: thousands of small reads).
            self.unread.extend(int(i) for i in formed.members)
            if len(self.unread) >= ALONE_BATCH:
                self.read_unread(reader)
            return
        batch = formed.batch if formed.batch is not None else reader.get(formed.members)
        batch = batch.take(np.argsort(batch.indices, kind="stable"))
        basis = formed.basis if formed.factored else None
        group, leftovers = self.encoder.encode_cluster(batch.indices, batch.data, batch.offsets,
                                                       basis, formed.bound)
        if group is not None:
            self._add(group)
        self.leftovers(leftovers)

    def read_unread(self, reader) -> None:
        if self.unread:
            batch = reader.get(np.array(self.unread, dtype=np.int64))
            self.unread = []
            self.leftovers(zip(batch.indices, batch.blocks()))

    def leftovers(self, items) -> None:
        """Matrices in no factored cluster wait in a pool: each is then stored alone (matrix
        guarantee; encoded in batches) or the pool as one group (cluster guarantee)."""
        self.pool.extend((index, np.array(block)) for index, block in items)
        # A full pool, or codes of later matrices piling up behind the pooled ones.
        full = POOL_MATRICES if self.params["guarantee"] == "cluster" else ALONE_BATCH
        if len(self.pool) >= full or (self.pool and self.out.waiting > PENDING_MATRICES):
            self.flush_pool()

    def flush_pool(self) -> None:
        if not self.pool:
            return
        self.pool.sort(key=lambda item: item[0])
        if self.params["guarantee"] == "matrix":
            self.store_alone(self.pool)
        else:
            members = np.array([i for i, _ in self.pool], dtype=np.int64)
            self._add(self.encoder.encode_pool(members, [b for _, b in self.pool]))
        self.pool = []

    def store_alone(self, items) -> None:
        """Matrices ``(index, block)``, ascending, each stored alone (the matrix guarantee),
        encoded as one batch: at once, or with ``side_by_side`` beside those of other calls,
        one batch per core (:meth:`encode_ready`)."""
        self.ready.append(list(items))
        if not self.side_by_side or len(self.ready) >= CORES:
            self.encode_ready()

    def store_all_alone(self, batches) -> None:
        """Batches of matrices ``(index, block)``, each batch ascending and after the one
        before, each matrix stored alone: what :meth:`store_alone` does batch by batch, when
        all of them are known at once (an append's matrices that fit no cluster). The cores
        encode the batches ahead while this thread stores each one in turn: the same arrays,
        and the encoding no longer waits while this thread stores (appending 13,824 MiniLM
        columns took 1.74-1.94 s against 1.79-2.01 s, alternating runs)."""
        self.encode_ready()  # what waits is stored first
        for batch in ahead_on_all_cores(self.encoder.encode_many, batches):
            self._add_alone(batch)

    def encode_ready(self) -> None:
        """Encode the full pools that wait (each with :meth:`CompactEncoder.encode_many`), on
        all cores at once, and store them in the order they filled: the same arrays as one
        after the other."""
        if self.ready:
            ready, self.ready = self.ready, []
            for batch in on_all_cores(self.encoder.encode_many, ready):
                self._add_alone(batch)

    def store_planned(self, planned, form_eps, budget, progress, passes=None) -> None:
        from matclust.streaming import store_planned_compact

        if passes is not None:  # a sharded run's tasks may write the codes themselves
            passes.codes_to(self.out)
        store_planned_compact(self.source, planned, self.params["rank"], form_eps, self,
                              budget, progress, passes)

    @staticmethod
    def recluster_bytes(budget_bytes: int) -> int:
        """What :meth:`recluster` may hold of the caches' budget: a quarter."""
        return budget_bytes // 4

    def can_recluster(self, indices: np.ndarray, budget_bytes: int) -> bool:
        """Whether :meth:`recluster` may hold the matrices of ``indices``."""
        return self._recluster_bytes(indices) <= self.recluster_bytes(budget_bytes)

    def _recluster_bytes(self, indices: np.ndarray) -> int:
        return int(self.source.widths[indices].sum()) * self.source.m * self.source.dtype.itemsize

    def recluster(self, indices: np.ndarray, budget_bytes: int, blocks=None) -> bool:
        """Cluster ``indices`` again among themselves, in memory, and add what that stores
        (out of core: the members evicted from the planned clusters). False, and nothing
        done, unless :meth:`can_recluster`. ``blocks``: their columns in the working scale,
        when already read (else one pass reads them)."""
        if not self.can_recluster(indices, budget_bytes):
            return False
        need = self._recluster_bytes(indices)
        # One sequential pass picks them out, a batch at a time: reading scattered indices at
        # once reads every storage chunk they touch together (the whole 2 GB file for 21,000
        # matrices spread over 10^6). In the working scale, as pass 2 sees them.
        from matclust.streaming import cluster_parts

        if blocks is None:
            wanted = np.full(self.source.K, -1, dtype=np.int64)
            wanted[indices] = 0
            # Copies: a block is a view of its whole batch, which it would otherwise keep alive.
            blocks = [np.array(block) for c, part in cluster_parts(self.source, wanted) if c == 0
                      for block in part.blocks()]
        sub = cluster_among_themselves(blocks, self.params, budget_bytes, need)
        for group in sub.clusters_:
            group.members = indices[group.members]
            self._add(group)
        return True

    def clusters_done(self, reader) -> None:
        """Every cluster has been consumed (in memory): encode what waits to be read."""
        with single_threaded():  # many small factorisations: see matclust.blas
            self.read_unread(reader)

    def finish(self):
        with single_threaded():
            self.flush_pool()
            self.encode_ready()
        labels, stats = self.out.finish(self.source.names)
        return labels, stats, self.out.stored_numbers, self.worst


#: What a run of matrices clustered again among themselves takes from the run they came from.
CLUSTERING_KEYS = ("rank", "eps", "method", "order", "patience", "oversampling", "guarantee")


def cluster_among_themselves(blocks, params: dict, budget_bytes: int, need: int,
                             encoding: str = "compact", guard=None, identity=None, **overrides):
    """``blocks`` (``need`` bytes) clustered in memory with ``params``' clustering parameters
    (``overrides`` replace some), fitted. The run may use what the caches were given, not the
    whole limit (on 10^6 matrices the whole limit again took the process to 2.2 GiB at 1 GiB);
    its model counts the interpreter once more, which only errs on the safe side.

    With ``guard`` (the :class:`~matclust.checkpoint.OutputGuard` of the store an append grows)
    the run keeps its checkpoint there, as ``cluster`` keeps one beside its output, headed by
    ``identity`` (what the blocks were taken from), and continues an interrupted run's when the
    guard resumes."""
    from matclust import limits
    from matclust.api import MatrixClusterer

    chosen = {**{k: params[k] for k in CLUSTERING_KEYS}, **overrides}
    model = MatrixClusterer(**chosen, encoding=encoding, mode="in-memory",
                            memory_limit=max(budget_bytes, 2 * need) + limits.BASELINE_BYTES)
    if guard is None:
        return model.fit(blocks)
    # fit() guards an output of its own; this run writes none, its caller's guard serves.
    return model._fit(blocks, None, False, None, {"appending": identity}, guard)
