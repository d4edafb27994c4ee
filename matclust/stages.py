"""A run in stages over shards of the collection: plan, merge, store (docs/scaling.md).

* **plan** (:func:`plan_shard`): one shard, a range of consecutive matrices aligned to the
  storage chunks, is clustered on its own as the out-of-core path clusters a whole
  collection (per-matrix summaries and the greedy driver), with some room left below the
  formation error for the merge (``PLAN_SHARE``). Each of its clusters leaves a
  :class:`ClusterSummary`: its members, its exact energy ||M||_F^2 and a stand-in block F
  whose Gram matrix lies below M M^* in Loewner order (up to the summaries' rounding, whose
  size it carries along as ``loss2``).
* **merge** (:func:`merge_summaries`): the same greedy driver runs over the clusters of
  several shards, each cluster one block, read through :class:`StandinReader`. Merging is a
  tree: each merge takes the outputs of at most ``MERGE_FANIN`` earlier tasks.
* **store**: the merged plan is stored as the out-of-core path stores its plan
  (:mod:`matclust.streaming`), its passes over the input one task per shard
  (:class:`ShardedPasses`), their results added to the store by the client in index order;
  on Dask, into a Zarr store on a file system, the encoding tasks keep their codes and write
  the store's code chunks themselves once the client knows where each matrix's codes start
  (:class:`ShardCodes`).

Each stage function is a pure, deterministic function of its arguments, so the same code runs
in this process one task after another (:class:`matclust.distributed.InProcess`) or as Dask
tasks, which Dask may run again on another worker after a worker is lost: the result does not
change.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from matclust.blas import one_core
from matclust.compact import formation_eps
from matclust.driver import FormedCluster, GreedyDriver, by_magnitude_descending, worth_factoring
from matclust.engine.estimators import make_estimator
from matclust.engine.linalg import column_ranges
from matclust.sources.base import Batch, MatrixSource
from matclust.sources.summary import SummaryReader

logger = logging.getLogger(__name__)

#: Shards form clusters at this share of the formation error. A cluster filled up to the
#: error (with small matrices of other kinds, which fit anywhere) cannot absorb another
#: shard's part of the same cluster, since the union's squared error is at least the
#: energy-weighted mean of the parts'; a little room keeps those matrices out of the shards'
#: clusters until the merge, where they join whole clusters. Measured (bench/distributed.py
#: collections, 2 and 8 shards): 1.0 left 92 of the 500 planted clusters split in two at 2
#: shards (store 1.3 % larger than one process's); 0.9 none (0.2 % larger at 2 shards, 0.6 %
#: smaller at 8); 0.8 made RGB patches' store larger at 8 shards (452 KB against 444 KB).
PLAN_SHARE = 0.9
#: Shards' (or earlier merges') cluster lists one merge task takes at most.
MERGE_FANIN = 4
#: Matrices per shard that the default shard count aims at (about 512 MiB of 32 x 16 float32).
SHARD_MATRICES = 1 << 18


def stand_in_columns(rank: int, m: int) -> int:
    """Columns of a cluster's stand-in: enough directions beyond the rank that the merged bound
    still sees how well two clusters' subspaces line up, and small against the data."""
    return int(min(m, max(4 * rank, 16)))


# -- shards ------------------------------------------------------------------------------------
def shard_ranges(source: MatrixSource, shards: int) -> list[tuple[int, int]]:
    """``shards`` consecutive index ranges covering the collection, as equal as the storage
    chunks allow: a chunk is split between shards only when there are fewer chunks than
    shards (each shard then reads the whole chunk). Fewer when there are fewer matrices."""
    chunk = max(1, int(source._chunk_len))
    if -(-source.K // chunk) < shards:
        chunk = 1
    units = -(-source.K // chunk)
    cuts = sorted({int(round(i * units / shards)) for i in range(shards + 1)})
    return [(a * chunk, min(b * chunk, source.K)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def default_shards(K: int, workers: int) -> int:
    """At least one shard per worker, and shards of at most ``SHARD_MATRICES`` matrices, in a
    multiple of the workers (so every worker gets as many)."""
    workers = max(1, int(workers))
    per_worker = max(1, -(-K // (SHARD_MATRICES * workers)))
    return workers * per_worker


class _Rows:
    """Matrices ``first..stop-1`` of a 3-D array-like, indexed from 0 (slices only)."""

    def __init__(self, array, first: int, stop: int):
        self.array, self.first = array, first
        self.shape = (stop - first, *tuple(array.shape)[1:])
        self.dtype = array.dtype
        self.chunks = getattr(array, "chunks", None)

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a shard's rows are read in slices")
        start, stop, _ = key.indices(self.shape[0])
        return self.array[self.first + start : self.first + stop]


class ShardSource(MatrixSource):
    """Matrices ``first..stop-1`` of ``parent`` as a collection of their own (indices from 0).

    ``top``: the whole collection's largest peak exponent, when it is known to be above this
    shard's own (its working scale then matches the collection's; see ``calibrate``)."""

    def __init__(self, parent: MatrixSource, first: int, stop: int, top: int | None = None):
        self.parent, self.first, self.top = parent, int(first), top
        self.peaks = None  # as the summary pass found them (see calibrate)
        find = parent._find_missing
        if parent._stack is not None:
            stack, members = _Rows(parent._stack, first, stop), None
            if find is not None:  # asked with the shard's indices, answered in the collection's
                whole, parent_find = parent._stack, find
                find = lambda array, a, b: parent_find(whole, a + first, b + first)  # noqa: E731
        else:
            stack, members = None, parent._members[first:stop]
        super().__init__(parent.path, parent.dataset, parent.transpose, stack=stack,
                         members=members, find_missing=find)
        self._chunk_len = parent._chunk_len
        self.concurrent_reads = parent.concurrent_reads

    def describe(self, i: int) -> str:
        return self.parent.describe(int(i) + self.first)

    def calibrate(self, peaks, top=None) -> None:
        if peaks is not None:
            self.peaks = np.asarray(peaks, dtype=np.float64).copy()
        super().calibrate(peaks, self.top if top is None else top)


@dataclass(frozen=True)
class ShardSpec:
    """What a worker needs to read a shard: how to open the collection (``opened``: the
    source's ``reopen``, by path or URL and storage options; or an in-memory source itself),
    the range, and the collection's top exponent when the shard's own does not do (see
    ``ShardSource``)."""

    opened: object
    first: int
    stop: int
    top: int | None = None
    #: The shard's peaks, once the collection is calibrated: its matrices are then read in
    #: the collection's working scale (with ``top``, the collection's).
    peaks: np.ndarray | None = None

    def open(self) -> tuple[MatrixSource, ShardSource]:
        if isinstance(self.opened, MatrixSource):
            parent = self.opened
        else:  # a handle of the task's own (the caller's source stays open in this process)
            function, args = self.opened
            parent = function(args, {})
        shard = ShardSource(parent, self.first, self.stop, self.top)
        if self.peaks is not None:
            shard.calibrate(self.peaks)
        return parent, shard


def shard_specs(source: MatrixSource, shards: int) -> list[ShardSpec]:
    opened = source.reopen if source.reopen is not None else source
    return [ShardSpec(opened, a, b) for a, b in shard_ranges(source, shards)]


# -- what a stage hands to the next ------------------------------------------------------------
@dataclass
class ClusterSummary:
    """A cluster as one block for the merge.

    ``standin`` (m x w): F with F F^* <= M M^* in Loewner order for the cluster's matrices side
    by side M, up to rounding of squared size at most ``loss2`` (Mirsky's inequality then keeps
    every bound computed from it an upper bound, as for summaries). ``energy`` is ||M||_F^2,
    exact, in the collection's working scale (or the matrix's own, when it is ``apart``)."""

    members: np.ndarray
    columns: int
    energy: float
    standin: np.ndarray
    loss2: float
    bound: float | None  # an upper bound on the cluster's e_r; None: not evaluated
    apart: bool = False
    exponent: int = 0
    grew: bool = True
    #: The largest member (index, squared norm in the scale of ``energy``): clusters are
    #: numbered in the order of their largest members, as the greedy driver numbers them.
    lead: int = 0
    lead_norm2: float = 0.0


@dataclass
class ShardPlan:
    """A shard's clusters, and its calibration (``peaks`` per matrix; its ``exponents`` and
    ``apart`` flags as chosen from them), which the client reconciles with the collection's."""

    first: int
    clusters: list[ClusterSummary]
    peaks: np.ndarray
    exponents: np.ndarray
    apart: np.ndarray
    seconds: float = 0.0


def truncated(block: np.ndarray, columns: int, negligible: float = 0.0) -> np.ndarray:
    """The top ``columns`` of U S of ``block``, without trailing directions that hold together
    at most ``negligible`` of its energy: block V_k for orthonormal V_k, a right-contraction
    of it, so its Gram lies below the block's in Loewner order (the energy left out is counted
    as missed by every bound computed from it)."""
    if block.shape[1] <= columns and not negligible:
        return block
    if block.shape[1] > block.shape[0]:  # a square root of the Gram first: [R^*] R = B B^*
        block = np.linalg.qr(block.conj().T, mode="r").conj().T
    u, s, _ = np.linalg.svd(block, full_matrices=False)
    s2 = s**2
    # tail[k]: the energy of directions k, k+1, ...; keep up to the first negligible tail.
    tail = np.cumsum(s2[::-1])[::-1]
    keep = int(np.count_nonzero(tail > negligible * s2.sum()))
    keep = max(1, min(columns, keep))
    return u[:, :keep] * s[:keep]


#: Trailing directions of a stand-in holding at most this share of eps^2 of its energy are
#: dropped: bounds then grow by at most ~0.5 % of eps, and the merge's scans get much cheaper
#: (a planted cluster's noise spreads over every direction the rank leaves).
NEGLIGIBLE_SHARE = 0.01


# -- plan --------------------------------------------------------------------------------------
def plan_shard(spec: ShardSpec, params: dict) -> ShardPlan:
    """Cluster one shard on its summaries (as the out-of-core path does) and summarise each
    cluster for the merge. Members are indices into the whole collection."""
    from matclust.api import cluster_plan, summary_directions

    started = time.perf_counter()
    parent, shard = spec.open()
    try:
        with one_core():
            run_plan = cluster_plan(shard, params, True)
            shard.batch_limit = run_plan.batch
            form_eps = formation_eps(params["eps"], params["encoding"])
            summaries = SummaryReader(shard, summary_directions(shard, params), run_plan.cache,
                                      form_eps)
            # Shards form their clusters with room to spare, so that the merge can still join
            # the parts of one cluster that several shards found (see PLAN_SHARE).
            form_eps *= PLAN_SHARE
            estimator = make_estimator(params["method"], params["rank"], shard.m,
                                       shard.dtype.kind == "c", params["oversampling"])
            driver = GreedyDriver(summaries, summaries.norms2, shard.widths, estimator, form_eps,
                                  params["order"], params["patience"], exact_check=False)
            width = stand_in_columns(params["rank"], shard.m)
            negligible = NEGLIGIBLE_SHARE * form_eps**2
            clusters = []
            for formed in driver.clusters():
                # Before the driver discards the members' summaries.
                batch = summaries.get(formed.members)
                members = formed.members
                clusters.append(ClusterSummary(
                    members + spec.first, formed.columns,
                    float(summaries.norms2[members].sum()),
                    truncated(batch.data, width, negligible if len(members) > 1 else 0.0),
                    float(summaries.loss2[members].sum()), formed.bound,
                    bool(shard.apart[members[0]]), int(shard.exponents[members[0]]),
                    formed.grew, int(members[0]) + spec.first,
                    float(summaries.norms2[members[0]])))
        return ShardPlan(spec.first, clusters, shard.peaks, shard.exponents.copy(),
                         shard.apart.copy(), time.perf_counter() - started)
    finally:
        parent.close()


#: A ClusterSummary's scalars as a shard plan's bytes keep them: integers, then floats.
_PLAN_INTS = ("columns", "exponent", "lead", "apart", "grew")
_PLAN_FLOATS = ("energy", "loss2", "bound", "lead_norm2")


def plan_bytes(plan: ShardPlan) -> bytes:
    """A shard's plan as a checkpoint keeps it (:mod:`matclust.checkpoint`): NumPy's npz of
    its arrays, every cluster's members, stand-in and scalars side by side; read back by
    :func:`plan_from_bytes` without pickle, exactly."""
    clusters = plan.clusters
    arrays = {
        "first": np.array([plan.first], dtype=np.int64),
        "seconds": np.array([plan.seconds], dtype=np.float64),
        "peaks": plan.peaks, "exponents": plan.exponents, "apart": plan.apart,
        "members": np.concatenate([c.members for c in clusters]).astype(np.int64)
        if clusters else np.zeros(0, dtype=np.int64),
        "sizes": np.array([len(c.members) for c in clusters], dtype=np.int64),
        "standins": np.concatenate([c.standin for c in clusters], axis=1)
        if clusters else np.zeros((0, 0)),
        "widths": np.array([c.standin.shape[1] for c in clusters], dtype=np.int64),
        "ints": np.array([[int(getattr(c, k)) for k in _PLAN_INTS] for c in clusters],
                         dtype=np.int64).reshape(len(clusters), len(_PLAN_INTS)),
        # a bound not evaluated (None) as NaN: a bound is never NaN otherwise
        "floats": np.array([[np.nan if getattr(c, k) is None else getattr(c, k)
                             for k in _PLAN_FLOATS] for c in clusters],
                           dtype=np.float64).reshape(len(clusters), len(_PLAN_FLOATS)),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def plan_from_bytes(data: bytes) -> ShardPlan:
    """The plan :func:`plan_bytes` wrote."""
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        a = {key: f[key] for key in f.files}
    members = np.split(a["members"], np.cumsum(a["sizes"])[:-1]) if len(a["sizes"]) else []
    standins = np.split(a["standins"], np.cumsum(a["widths"])[:-1], axis=1) \
        if len(a["widths"]) else []
    clusters = []
    for j, (mem, standin) in enumerate(zip(members, standins)):
        ints = dict(zip(_PLAN_INTS, a["ints"][j].tolist()))
        floats = dict(zip(_PLAN_FLOATS, a["floats"][j].tolist()))
        clusters.append(ClusterSummary(
            mem, ints["columns"], floats["energy"], np.ascontiguousarray(standin),
            floats["loss2"], None if np.isnan(floats["bound"]) else floats["bound"],
            bool(ints["apart"]), ints["exponent"], bool(ints["grew"]), ints["lead"],
            floats["lead_norm2"]))
    return ShardPlan(int(a["first"][0]), clusters, a["peaks"], a["exponents"], a["apart"],
                     float(a["seconds"][0]))


def in_collection_scale(plan: ShardPlan, exponents: np.ndarray) -> list[ClusterSummary]:
    """A shard's clusters in the collection's working scale (``exponents``: the collection's
    for this shard's matrices). Exact: the scales differ by a power of two. New summaries:
    the plan stays as it was (Dask may hand the same object to a rerun of this task)."""
    out = []
    for c in plan.clusters:
        i = int(c.members[0]) - plan.first
        shift = int(exponents[i]) - int(plan.exponents[i])
        if shift:
            standin = np.ldexp(c.standin, shift) if not np.iscomplexobj(c.standin) else \
                np.ldexp(c.standin.real, shift) + 1j * np.ldexp(c.standin.imag, shift)
            energy, loss2, lead_norm2 = (float(np.ldexp(x, 2 * shift))
                                         for x in (c.energy, c.loss2, c.lead_norm2))
            c = replace(c, standin=standin, energy=energy, loss2=loss2, lead_norm2=lead_norm2,
                        exponent=int(exponents[i]))
        out.append(c)
    return out


def consistent(plan: ShardPlan, exponents: np.ndarray, apart: np.ndarray) -> bool:
    """Whether a shard's own calibration matches the collection's up to one power of two (the
    same matrices apart; the others scaled alike), so its plan holds in the collection's scale."""
    if not np.array_equal(plan.apart, apart):
        return False
    shared = ~apart
    diff = exponents[shared] - plan.exponents[shared]
    return len(diff) == 0 or bool(np.all(diff == diff[0]))


# -- merge -------------------------------------------------------------------------------------
class _StandinSpace:
    """What the greedy driver asks of a source, for clusters' stand-ins."""

    def __init__(self, m: int, dtype, apart: np.ndarray, exponents: np.ndarray):
        self.m, self.dtype, self.apart, self.exponents = m, np.dtype(dtype), apart, exponents


class StandinReader:
    """Clusters' stand-ins as the greedy driver's blocks (a :class:`~matclust.driver.BlockReader`).

    Block i is ``items[i].standin``; ``loss2`` their rounding, as for summaries. Residual scans
    estimate ||(I - Q Q^*) M_i||^2 as the energy minus what Q captures of the stand-in (the
    energy outside the stand-in counted as missed), over the blocks not yet discarded."""

    def __init__(self, items: list[ClusterSummary], m: int, complex_data: bool):
        dtype = np.complex128 if complex_data else np.float64
        self.items = items
        self.source = _StandinSpace(m, dtype, np.array([c.apart for c in items], dtype=bool),
                                    np.array([c.exponent for c in items], dtype=np.int64))
        self.loss2 = np.array([c.loss2 for c in items], dtype=np.float64)
        self.energy = np.array([c.energy for c in items], dtype=np.float64)
        widths = np.array([c.standin.shape[1] for c in items], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        self._data = (np.hstack([c.standin for c in items]).astype(dtype) if items
                      else np.zeros((m, 0), dtype))
        # Single precision for the scans (they only order candidates; bounds use `get`).
        self._data_scan = self._data.astype(np.complex64 if complex_data else np.float32)
        self._scan = self._data_scan
        self._alive = np.ones(len(items), dtype=bool)
        self._scanned = np.arange(len(items), dtype=np.int64)  # the blocks in _scan
        self._scan_offsets = self._offsets

    def _columns(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The columns of blocks ``indices`` side by side, and their offsets."""
        widths = np.diff(self._offsets)[indices]
        offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        return column_ranges(self._offsets[indices], widths), offsets

    def get(self, indices) -> Batch:
        indices = np.asarray(indices, dtype=np.int64)
        cols, offsets = self._columns(indices)
        return Batch(indices, self._data[:, cols], offsets)

    def discard(self, indices) -> None:
        """Blocks done with leave the scans (compacted once they are an eighth of them)."""
        self._alive[np.asarray(indices, dtype=np.int64)] = False
        if np.count_nonzero(~self._alive[self._scanned]) > len(self._scanned) // 8:
            self._scanned = self._scanned[self._alive[self._scanned]]
            cols, self._scan_offsets = self._columns(self._scanned)
            self._scan = self._data_scan[:, cols]

    #: The stand-ins are few (a merge's clusters): nothing to share between bases.
    shared_scans = False

    def residuals2(self, q: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Every block still scanned in one product; then the candidates' values."""
        proj = q.conj().T.astype(self._scan.dtype) @ self._scan
        per_column = np.sum(np.abs(proj) ** 2, axis=0, dtype=np.float64)
        captured = np.zeros(len(self._alive), dtype=np.float64)
        if len(self._scanned):
            captured[self._scanned] = np.add.reduceat(per_column, self._scan_offsets[:-1])
        candidates = np.asarray(candidates, dtype=np.int64)
        return np.maximum(self.energy[candidates] - captured[candidates], 0.0)


def merge_summaries(parts: list[list[ClusterSummary]], params: dict, m: int,
                    complex_data: bool) -> list[ClusterSummary]:
    """The greedy driver over the clusters of ``parts`` (each a shard's or an earlier merge's
    output), each cluster one block; every cluster it forms becomes one summary: members
    joined, energies and rounding losses added, the stand-ins side by side truncated again (a
    right-contraction, so still below in Loewner order). A cluster the driver does not grow
    is handed on as it came (its own bound holds; a bound from its stand-in can only be
    looser). The one merge step of the serial and the distributed runs."""
    items = [c for part in parts for c in part]
    if len(parts) < 2 or not items:
        return items
    with one_core():
        reader = StandinReader(items, m, complex_data)
        widths = np.array([c.columns for c in items], dtype=np.int64)
        form_eps = formation_eps(params["eps"], params["encoding"])
        estimator = make_estimator(params["method"], params["rank"], m, complex_data,
                                   params["oversampling"])
        # No patience: a shard cluster that merges with none is common (every shard's own
        # leftovers), and giving up after a few would leave later shards' copies of the same
        # cluster apart; the merge's items are few, so trying each costs little.
        driver = GreedyDriver(reader, reader.energy, widths, estimator, form_eps,
                              params["order"], 0, exact_check=False)
        width = stand_in_columns(params["rank"], m)
        negligible = NEGLIGIBLE_SHARE * form_eps**2
        out = []
        for formed in driver.clusters():
            chosen = [items[i] for i in formed.members]
            if len(chosen) == 1:
                out.append(chosen[0])
                continue
            block = reader.get(formed.members).data
            lead = min(chosen, key=lambda c: (-c.lead_norm2, c.lead))
            out.append(ClusterSummary(
                np.concatenate([c.members for c in chosen]), int(sum(c.columns for c in chosen)),
                float(sum(c.energy for c in chosen)), truncated(block, width, negligible),
                float(sum(c.loss2 for c in chosen)), formed.bound, False, chosen[0].exponent,
                True, lead.lead, lead.lead_norm2))
    return out


# -- the stages together -----------------------------------------------------------------------
@dataclass
class StageTimes:
    """Seconds per stage on the client's clock, and the merge's size."""

    plan: float = 0.0
    merge: float = 0.0
    store: float = 0.0
    shards: int = 0
    summaries_merged: int = 0
    merge_tasks: int = 0
    #: Seconds the plan tasks took, added up (their CPU share where workers share cores).
    plan_task_seconds: float = 0.0
    merged_at: float = 0.0  # perf_counter when the merge ended (the store starts)

    def report(self) -> dict:
        return {"shards": self.shards, "plan_seconds": round(self.plan, 3),
                "merge_seconds": round(self.merge, 3), "store_seconds": round(self.store, 3),
                "summaries_merged": self.summaries_merged, "merge_tasks": self.merge_tasks,
                "plan_task_seconds": round(self.plan_task_seconds, 3)}


def plan_and_merge(source: MatrixSource, params: dict, runner, progress, times: StageTimes,
                   log=None) -> tuple[list[FormedCluster], ShardedPasses]:
    """Plan every shard and merge their clusters (through ``runner``: in this process or on a
    Dask cluster); ``source`` ends up calibrated as the whole collection. The merged plan, as
    the store stage takes it, and the storing passes over the same shards.

    With a checkpoint ``log`` (:class:`matclust.checkpoint.CheckpointLog`), every shard's plan
    is recorded in it as it is gathered, and the plans it already holds (``--resume``) are
    taken from it instead of being made again."""
    started = time.perf_counter()
    specs = shard_specs(source, params["shards"])
    times.shards = len(specs)
    progress.start("planning", len(specs))
    restored = {i: plan_from_bytes(data) for i, data in (log.shard_plans if log else {}).items()
                if i < len(specs)}
    futures = [runner.scatter(restored[i]) if i in restored
               else runner.submit(plan_shard, spec, params) for i, spec in enumerate(specs)]
    # Each plan to the client as it is done (in shard order), recorded before the next: the
    # plans stay with the workers too, which merge them.
    calibrations = []
    for i, future in enumerate(futures):
        plan = restored.get(i)
        if plan is None:
            plan = runner.gather([future])[0]
            if log is not None:
                log.record_shard(i, plan_bytes(plan))
        calibrations.append(_calibration_of(plan))
        progress.advance(1)
        del plan
    if restored:
        logger.info("%d of %d shard plans taken from the checkpoint", len(restored), len(specs))
    peaks = np.concatenate([c[0] for c in calibrations])
    times.plan_task_seconds = float(sum(c[3] for c in calibrations))
    source.calibrate(peaks)
    # A shard whose largest entry is far below the collection's may have judged a matrix
    # "apart" differently: it is planned again in the collection's scale.
    top = int(np.frexp(peaks.max())[1]) if peaks.size else 0
    for i, (spec, (_, exps, apart, _)) in enumerate(zip(specs, calibrations)):
        ours = slice(spec.first, spec.stop)
        plan = ShardPlan(spec.first, [], peaks[ours], exps, apart)
        if not consistent(plan, source.exponents[ours], source.apart[ours]):
            logger.info("shard %d planned again in the collection's scale", i)
            futures[i] = runner.submit(plan_shard, ShardSpec(spec.opened, spec.first, spec.stop, top),
                                       params)
    level = [runner.submit(in_collection_scale, f, source.exponents[s.first:s.stop])
             for f, s in zip(futures, specs)]
    times.plan = time.perf_counter() - started

    started = time.perf_counter()
    complex_data = source.dtype.kind == "c"
    rounds = _merge_rounds(len(level))
    progress.start("merging", max(1, rounds))
    counts = runner.gather([runner.submit(len, f) for f in level])
    times.summaries_merged = int(sum(counts))
    while len(level) > 1:
        level = [runner.submit(merge_summaries, level[i : i + MERGE_FANIN], params, source.m,
                               complex_data)
                 for i in range(0, len(level), MERGE_FANIN)]
        times.merge_tasks += len(level)
        if len(level) > 1:
            runner.wait(level)
        progress.advance(1)
    merged = runner.gather(level)[0] if level else []
    times.merged_at = time.perf_counter()
    times.merge = times.merged_at - started
    planned = [_formed(c, params["rank"], source.m, source.widths)
               for c in in_greedy_order(merged, source.m)]
    return planned, ShardedPasses(source, specs, peaks, runner, progress)


def in_greedy_order(clusters: list[ClusterSummary], m: int) -> list[ClusterSummary]:
    """Clusters by their largest members, largest first (ties by index; matrices kept apart
    last), so that each cluster's largest member is the largest of the matrices not in an
    earlier cluster: the order in which the greedy driver forms clusters."""
    clusters = sorted(clusters, key=lambda c: c.lead)
    space = _StandinSpace(m, np.float64, np.array([c.apart for c in clusters], dtype=bool),
                          np.array([c.exponent for c in clusters], dtype=np.int64))
    order = by_magnitude_descending(np.array([c.lead_norm2 for c in clusters]), space)
    return [clusters[i] for i in order]


def _merge_rounds(n: int) -> int:
    rounds = 0
    while n > 1:
        n = -(-n // MERGE_FANIN)
        rounds += 1
    return rounds


def _calibration_of(plan: ShardPlan):
    return plan.peaks, plan.exponents, plan.apart, plan.seconds


def _formed(c: ClusterSummary, rank: int, m: int, widths: np.ndarray) -> FormedCluster:
    members = np.asarray(c.members, dtype=np.int64)
    columns = int(widths[members].sum())
    return FormedCluster(members, columns, c.bound, worth_factoring(rank, m, columns, len(members)),
                         grew=c.grew)


# -- store: the passes over the input, one task per shard --------------------------------------
def shard_roots(spec: ShardSpec, labels: np.ndarray, group: np.ndarray, rank: int) -> dict:
    """For every cluster of ``group`` with members in the shard: the root of its columns
    there, their exact energy and count (see ``ExactBasis.merge``)."""
    from matclust.streaming import accumulate_bases

    parent, shard = spec.open()
    try:
        with one_core():
            accs = accumulate_bases(shard, labels, group, rank)
            return {c: (acc.root(), acc.norm2, acc.columns) for c, acc in accs.items()
                    if acc.columns}
    finally:
        parent.close()


def shard_evicted(spec: ShardSpec, labels: np.ndarray, rounded: dict, encoder, hold=None):
    """The shard's members that leave their factored cluster, and their columns (packed, see
    :func:`packed_blocks`)."""
    from matclust.streaming import evicted_members

    parent, shard = spec.open()
    try:
        with one_core():
            indices, blocks = evicted_members(shard, labels, rounded, encoder, keep_blocks=True,
                                             hold=hold)
            return indices + spec.first, packed_blocks(blocks)
    finally:
        parent.close()


def packed_blocks(blocks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Matrices as one flat array (each one's entries in row-major order, one after another)
    and their shapes: what a task hands back instead of a list of arrays, which Dask moves as
    one frame per array (10^6 planted matrices, 2 shards: 17,000 evicted members took the
    client ~0.7 s of CPU and left the workers idle ~0.9 s between two passes)."""
    shapes = np.array([b.shape for b in blocks], dtype=np.int64).reshape(len(blocks), 2)
    dtype = blocks[0].dtype if blocks else np.float64
    flat = np.concatenate([np.zeros(0, dtype)] + [np.asarray(b).ravel() for b in blocks])
    return flat, shapes


def unpacked_blocks(flat: np.ndarray, shapes: np.ndarray) -> list[np.ndarray]:
    """The matrices of :func:`packed_blocks`, each a C-contiguous view of ``flat``."""
    ends = np.cumsum(shapes[:, 0] * shapes[:, 1])
    return [flat[end - r * c : end].reshape(r, c)
            for (r, c), end in zip(shapes.tolist(), ends.tolist())]


def shard_encoded(spec: ShardSpec, labels: np.ndarray, rounded: dict, bounds: dict, encoder,
                  code_dtype, hold=None):
    """The shard's parts of every cluster, encoded to their codes as stored, in the order the
    client adds them."""
    from matclust.streaming import encoded_parts

    parent, shard = spec.open()
    try:
        with one_core():
            return list(encoded_parts(shard, labels, rounded, bounds, encoder, code_dtype,
                                      first=spec.first, hold=hold))
    finally:
        parent.close()


@dataclass
class ShardParts:
    """A shard's encoded parts as the client adds them when their codes stay with the task
    (:meth:`matclust.sinks.CompactSink.add_encoded`): every part's totals side by side
    (:class:`~matclust.format2.PartTotals`), and the members left over, as (parts before
    them, whether they are the last of those parts' own, members with their columns)."""

    totals: object
    leftovers: list


@dataclass
class KeptCodes:
    """A shard's encoded parts as its encoding task keeps them on its worker: ``table``, what
    the client needs (:class:`ShardParts`), and every part's codes side by side (``members``,
    in part order, matrix j's codes ``codes[code_offsets[j]:code_offsets[j + 1]]``), for the
    tasks that write them (:func:`write_shard_codes`)."""

    table: ShardParts
    members: np.ndarray
    code_offsets: np.ndarray
    codes: np.ndarray


def shard_encoded_kept(spec: ShardSpec, labels: np.ndarray, rounded: dict, bounds: dict, encoder,
                       code_dtype, hold=None) -> KeptCodes:
    """:func:`shard_encoded`, its codes kept apart from what the client needs."""
    from matclust.format2 import PartTotals

    parts, leftovers, counts, codes = [], [], [], []
    for c, part, left in shard_encoded(spec, labels, rounded, bounds, encoder, code_dtype,
                                       hold):
        if part is not None:
            counts.append(np.diff(part.code_offsets))
            codes.append(part.codes)
            parts.append((c, part))
        if left:
            leftovers.append((len(parts), part is not None, left))
    totals = PartTotals.of(parts)
    counts = np.concatenate([np.zeros(0, np.int64)] + counts)
    return KeptCodes(ShardParts(totals, leftovers), totals.members,
                     np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                     np.concatenate([np.zeros(0, code_dtype)] + codes))


def _table_of(kept: KeptCodes) -> ShardParts:
    return kept.table


class _ShardLayout:
    """Where the codes of a shard's matrices lie in the store and where they are now: its
    own in ``kept``, the others (matrices clustered again or stored alone by the client) in
    ``fills`` (members, codes, offsets; only the shard's). ``offsets``: where each of the
    shard's matrices' codes start in the store, and their end."""

    def __init__(self, kept: KeptCodes, fills, offsets: np.ndarray, first: int):
        # Where each matrix's codes start: in its own codes, or (from len(own) on) in fills.
        source = np.full(len(offsets) - 1, -1, dtype=np.int64)
        source[kept.members - first] = kept.code_offsets[:-1]
        fill_members, fill_codes, fill_offsets = fills
        source[fill_members - first] = len(kept.codes) + fill_offsets[:-1]
        sizes = np.diff(offsets)
        if np.any(source < 0) or not np.array_equal(np.diff(kept.code_offsets),
                                                    sizes[kept.members - first]):
            raise RuntimeError(f"the codes of the shard from matrix {first} do not match its "
                               "labels")
        self.source, self.offsets = source, offsets
        self.own, self.fills = kept.codes, fill_codes

    def gather(self, lo: int, hi: int) -> np.ndarray:
        """Codes ``lo..hi-1`` of the store (within the shard's)."""
        offsets = self.offsets
        i0 = int(np.searchsorted(offsets, lo, "right")) - 1
        i1 = int(np.searchsorted(offsets, hi, "left"))
        index = column_ranges(self.source[i0:i1], np.diff(offsets[i0 : i1 + 1]))
        index = index[lo - offsets[i0] : hi - offsets[i0]]
        if not len(self.fills):
            return self.own[index]
        out = np.empty(len(index), dtype=self.own.dtype)
        filled = index >= len(self.own)
        out[~filled] = self.own[index[~filled]]
        out[filled] = self.fills[index[filled] - len(self.own)]
        return out


def shard_codes(kept: KeptCodes, fills, offsets: np.ndarray, first: int, lo: int, hi: int
                ) -> np.ndarray:
    """Codes ``lo..hi-1`` of the store, all within the shard whose matrices start at ``first``
    (see :class:`_ShardLayout`)."""
    return _ShardLayout(kept, fills, offsets, first).gather(lo, hi)


def write_shard_codes(kept: KeptCodes, fills, offsets: np.ndarray, first: int, total: int,
                      where: tuple[str, str] | None, chunk: int, per_write: int) -> list:
    """Write the shard's codes into the store's codes array (``where``: the store's
    directory and the array's name, as the client created it at its full length ``total``,
    chunks of ``chunk`` codes): every chunk wholly inside the shard's codes, ``per_write``
    chunks at a time (compressed here, on the worker). Returns what it did not write, as
    (first code, codes): the pieces of chunks the shard shares with its neighbours, or every
    code when this worker does not see the store. Writing again writes the same bytes (Dask
    may run it again)."""
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi == lo:
        return []
    layout = _ShardLayout(kept, fills, offsets, first)
    whole_from = -(-lo // chunk) * chunk
    whole_to = hi if hi == total else hi // chunk * chunk
    array = _open_codes(where) if where is not None else None
    if array is None or whole_from >= whole_to:
        return [(lo, layout.gather(lo, hi))]
    with one_core():
        step = per_write * chunk
        for a in range(whole_from, whole_to, step):
            b = min(a + step, whole_to)
            array[a:b] = layout.gather(a, b)
    pieces = []
    if lo < whole_from:
        pieces.append((lo, layout.gather(lo, whole_from)))
    if whole_to < hi:
        pieces.append((whole_to, layout.gather(whole_to, hi)))
    return pieces


def _open_codes(where: tuple[str, str]):
    """The codes array in the store at ``where``, or None when it is not there (a worker
    on another machine)."""
    import os

    import zarr

    directory, name = where
    if not os.path.isfile(os.path.join(directory, name, "zarr.json")):
        return None
    return zarr.open_array(store=directory, path=name, mode="r+")


class ShardCodes:
    """Codes kept by the shards' encoding tasks (:class:`KeptCodes`, one future per shard),
    written into the store's codes array by one task per shard once the client knows where
    each matrix's codes go (see :meth:`matclust.format2.CompactWriter.place_codes_elsewhere`),
    while the client writes the store's other arrays. The client writes only the code chunks
    that two shards share."""

    def __init__(self, runner, specs: list[ShardSpec], kept: list, directory: str, progress):
        self.runner, self.specs, self.kept = runner, specs, kept
        self.directory, self.progress = directory, progress

    def _fills_of(self, spec: ShardSpec, fills):
        members, codes, offsets = fills
        a, b = np.searchsorted(members, [spec.first, spec.stop])
        return members[a:b], codes[offsets[a]: offsets[b]], offsets[a : b + 1] - offsets[a]

    def codes(self, lo: int, hi: int, offsets: np.ndarray, fills) -> np.ndarray:
        """Codes lo..hi-1 of the store (for choosing its shuffle), from the shards that hold
        them."""
        handles = []
        for spec, kept in zip(self.specs, self.kept):
            a, b = max(lo, int(offsets[spec.first])), min(hi, int(offsets[spec.stop]))
            if a < b:
                handles.append(self.runner.submit(
                    shard_codes, kept, self._fills_of(spec, fills),
                    offsets[spec.first : spec.stop + 1], spec.first, a, b))
        return np.concatenate(self.runner.gather(handles))

    def start(self, array, offsets: np.ndarray, fills) -> None:
        """The tasks that write the codes into ``array`` start (see :meth:`finish`)."""
        from matclust.format2 import FLUSH_CHUNKS

        chunk, total = int(array.chunks[0]), int(array.shape[0])
        where = (self.directory, array.path)
        self.progress.start("writing codes", len(self.specs))
        self.array = array
        self.handles = [self.runner.submit(write_shard_codes, kept, self._fills_of(spec, fills),
                                           offsets[spec.first : spec.stop + 1], spec.first,
                                           total, where, chunk, FLUSH_CHUNKS)
                        for spec, kept in zip(self.specs, self.kept)]

    def abandon(self) -> None:
        """Wait until no task writes any more (their failures aside): the store is about to be
        removed unfinished, and a chunk written after that would bring its directory back."""
        handles, self.handles = self.handles, []
        if self.runner.keeps_results:
            with contextlib.suppress(Exception):
                self.runner.wait(handles)

    def finish(self) -> None:
        """Wait for the tasks; write the chunks that shards share."""
        try:
            pieces = [p for part in self.runner.gather(self.handles, self.progress) for p in part]
        except BaseException:
            self.abandon()  # the other tasks may still be writing
            raise
        self.kept = self.handles = None  # written: the workers may drop them
        array = self.array
        # The chunks shards share, from the pieces on either side (consecutive: joined).
        pieces.sort(key=lambda p: p[0])
        run, run_start, run_end = [], 0, 0
        for start, codes in pieces:
            if run and start != run_end:
                array[run_start:run_end] = np.concatenate(run)
                run = []
            if not run:
                run_start = run_end = start
            run.append(codes)
            run_end += len(codes)
        if run:
            array[run_start:run_end] = np.concatenate(run)


class ShardedPasses:
    """The storing passes of :mod:`matclust.streaming` as one task per shard on ``runner``,
    their results combined by the client in shard order (which is index order): bases from
    the shards' roots (merged by QR), evicted members with their columns, encoded parts."""

    def __init__(self, source: MatrixSource, specs: list[ShardSpec], peaks: np.ndarray, runner,
                 progress):
        # Every task reads its shard in the collection's working scale (as calibrated from
        # the peaks of every matrix, the largest setting the scale).
        top = int(np.frexp(peaks.max())[1]) if len(peaks) else 0
        self.specs = [ShardSpec(s.opened, s.first, s.stop, top, peaks[s.first:s.stop])
                      for s in specs]
        self.source, self.runner, self.progress = source, runner, progress
        self.out = None

    def codes_to(self, out) -> None:
        """The compact writer the encoded parts go to: where the runner keeps results on its
        workers and the store is a Zarr directory they can write in, the tasks keep their
        codes and write them there themselves (:class:`ShardCodes`)."""
        self.out = out

    def _each(self, phase, fn, labels, *args):
        self.progress.start(phase, len(self.specs))
        return [self.runner.submit(fn, spec, labels[spec.first:spec.stop], *args)
                for spec in self.specs]

    def accumulate(self, group, labels, rank) -> dict:
        from matclust.engine import ExactBasis

        futures = self._each("bases", shard_roots, labels, np.asarray(group), rank)
        accs = {c: ExactBasis(self.source.m, rank, self.source.dtype) for c in group}
        for part in self.runner.gather(futures, self.progress):
            for c, (root, norm2, columns) in part.items():
                accs[c].merge(root, norm2, columns)
        return accs

    def evicted(self, labels, rounded, encoder, hold=None):
        futures = self._each("checking", shard_evicted, labels, rounded, encoder, hold)
        parts = self.runner.gather(futures, self.progress)
        indices = np.concatenate([p[0] for p in parts]).astype(np.int64)
        return indices, [b for p in parts for b in unpacked_blocks(*p[1])]

    def encoded(self, labels, rounded, bounds, encoder, code_dtype, hold=None):
        """The tasks start now; their parts come from the generator returned."""
        directory = self.out.writer.chunk_directory() if (
            self.out is not None and self.out.writer is not None
            and self.runner.keeps_results) else None
        if directory is None:
            futures = self._each("writing", shard_encoded, labels, rounded, bounds, encoder,
                                 code_dtype, hold)
            return self._in_order(futures)
        kept = self._each("encoding", shard_encoded_kept, labels, rounded, bounds, encoder,
                          code_dtype, hold)
        self.out.place_codes_elsewhere(ShardCodes(self.runner, self.specs, kept, directory,
                                                  self.progress))
        return self._in_order([self.runner.submit(_table_of, k) for k in kept], whole=True)

    def _in_order(self, futures, whole: bool = False):
        """Each shard's parts (``whole``: its :class:`ShardParts` as one item), in shard
        order: the store's parts go in index order."""
        for i in range(len(futures)):
            parts = self.runner.gather([futures[i]], self.progress)[0]
            futures[i] = None  # added to the store: let the runner forget it
            if whole:
                yield parts
            else:
                yield from parts
