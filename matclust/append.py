"""Appending a collection to an existing result store (``matclust append``).

The new matrices get the indices K0, K0 + 1, ... after the store's K0 matrices. Each first
tries the store's factored clusters *as stored*: their rounded bases are fixed, so a newcomer's
error against one is exact and cheap to compute, and the existing members' codes stay as they
are (:class:`StoredBases` screens every pair at once; :meth:`CompactEncoder.encode_cluster
<matclust.compact.CompactEncoder.encode_cluster>` then encodes and checks on decoded values).
A newcomer joins a cluster when

* matrix guarantee: its own decoded error, after its own quantisation, is within eps;
* cluster guarantee: in addition the cluster's energy-weighted error with it stays within eps,
  sqrt((e_c^2 N_c^2 + E) / (N_c^2 + N)) <= eps, with the cluster's stored norm N_c
  (``cluster_norms`` * 2^``cluster_norm_exponents``) and stored error e_c (``cluster_errors``,
  rounded up, so e_c^2 N_c^2 bounds its squared error from above), and the newcomers' own
  squared error E and squared norm N (docs/format.md, "Appends").

The others are clustered among themselves with the store's own parameters
(:class:`~matclust.api.MatrixClusterer`, in memory) into new clusters with new ids, unless a
probe finds no seed whose basis fits enough of them for a factored cluster: then each is
stored alone at once (:func:`_may_cluster`). Plain
(matclust/1) stores are grown the same way (:func:`_append_plain`): a joined cluster's group
gains the new members' coefficients against its stored basis. The grown store is written next
to the old one and renamed over it when complete (the old one stays
intact until then), under the store's lock (:mod:`matclust.checkpoint`). A store at a URL is
grown the way ``cluster --overwrite`` replaces one there (:mod:`matclust.objectstore`): the grown
store is a new generation, published by one PUT of the root pointer under the lease lock.

:func:`open_inputs` reads every input a store records, in order, as one collection (for
``verify``).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from matclust import defaults, limits
from matclust.blas import CORES, on_all_cores, single_threaded
from matclust.checkpoint import OutputGuard
from matclust.compact import EVICT_SHARE, AloneBatch, CompactEncoder, max_code_bound
from matclust.engine import budget as qb
from matclust.engine.linalg import column_norms2, columns_of, distinct, times_power2
from matclust.errors import InputError
from matclust.format2 import CompactWriter
from matclust.report import build_report
from matclust.locations import is_hdf5_url, is_url, refuse_read_only
from matclust.safety import refuse_clashes, require_path, same_entry
from matclust.sinks import (ALONE_BATCH, CompactSink, cluster_among_themselves, codes_of_one,
                            unscaled)
from matclust.sources import open_source
from matclust.sources.base import Batch
from matclust.sources.cache import CachedReader
from matclust.store import FORMAT, ResultStore, ResultWriter

logger = logging.getLogger(__name__)

#: Bytes of (projections x columns) computed at once while screening newcomers.
SCREEN_BYTES = 32 * 2**20


# ---------------------------------------------------------------------------------------------
# The inputs a store records
# ---------------------------------------------------------------------------------------------
def recorded_inputs(params: dict, K: int, where: str = "the store") -> list[dict]:
    """Every input the store was built from, in order: ``{input, dataset, K}`` each. A store
    never appended to records one input (``input``, ``dataset``) holding all K matrices."""
    inputs = params.get("inputs")
    if inputs is None:
        return [{"input": params.get("input"), "dataset": params.get("dataset"), "K": int(K)}]
    valid = isinstance(inputs, list) and inputs and all(
        isinstance(e, dict) and isinstance(e.get("input"), str)
        and isinstance(e.get("dataset"), (str, type(None)))
        and isinstance(e.get("K"), int) and e["K"] >= 1 for e in inputs)
    if not valid or sum(e["K"] for e in inputs) != K:
        raise InputError(f"{where}: damaged result store: its params 'inputs' do not list "
                         f"inputs of {K} matrices in all ({{input, dataset, K}} each)")
    return [dict(entry) for entry in inputs]


def _dataset_key(dataset) -> str:
    return str(dataset or "").strip("/")


def _same_input(entry: dict, path: str, dataset) -> bool:
    recorded = entry.get("input")
    if recorded is None:
        return False
    return same_entry(recorded, path) and \
        _dataset_key(entry.get("dataset")) == _dataset_key(dataset)


class ConcatenatedInputs:
    """Several collections read one after another as one (a store's recorded inputs): K,
    widths, m and ``iter_batches`` with indices running on from one input to the next."""

    def __init__(self, sources: list):
        self.sources = sources
        self.firsts = np.concatenate([[0], np.cumsum([s.K for s in sources])]).astype(np.int64)
        self.K = int(self.firsts[-1])
        self.m = sources[0].m
        self.widths = np.concatenate([s.widths for s in sources])
        self.where = " + ".join(s.where for s in sources)
        self.input_dtype = np.result_type(*(s.input_dtype for s in sources))
        self.storage_dtype = np.result_type(*(s.storage_dtype for s in sources))
        self.names = None

    def iter_batches(self, target_bytes: int | None = None):
        for first, source in zip(self.firsts, self.sources):
            for batch in source.iter_batches(target_bytes):
                yield Batch(batch.indices + first, batch.data, batch.offsets)

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_inputs(params: dict, K: int, input_path=None, dataset=None, fill_missing: bool = False,
                where: str = "the store"):
    """The collection a store was built from: its one input (``input_path`` / ``dataset``
    override what is recorded), or every recorded input in order, read as one."""
    transpose = bool(params.get("transpose", False))
    inputs = recorded_inputs(params, K, where)
    if len(inputs) == 1:
        return open_source(input_path or inputs[0]["input"],
                           dataset if dataset is not None else inputs[0]["dataset"], transpose,
                           fill_missing)
    if input_path is not None or dataset is not None:
        raise InputError(f"{where}: built from {len(inputs)} inputs (matclust append); it is "
                         "checked against all of them as recorded, so --input and --dataset "
                         "do not apply")
    sources = []
    try:
        for entry in inputs:
            source = open_source(entry["input"], entry["dataset"], transpose, fill_missing)
            sources.append(source)
            if source.K != entry["K"]:
                raise InputError(f"{source.where}: holds {source.K} matrices, but {where} "
                                 f"recorded {entry['K']} from it")
    except BaseException:
        for source in sources:
            source.close()
        raise
    return ConcatenatedInputs(sources)


# ---------------------------------------------------------------------------------------------
# Newcomers against stored bases
# ---------------------------------------------------------------------------------------------
class StoredBases:
    """The factored clusters of a store, for measuring newcomers against their stored
    (rounded) bases all at once.

    A rounded basis U is not exactly orthonormal; with U^H U = L L^H, Q = U L^-H is an
    orthonormal basis of the same range, and ||Q^H a||^2 is the energy of a's least-squares
    fit by U. All Q^H are stacked (R x m) so that one product screens a batch against every
    cluster."""

    def __init__(self, reader, complex_data: bool):
        self.ids = np.flatnonzero(reader.ranks > 0)
        self.ranks = reader.ranks[self.ids]
        self.starts = np.concatenate([[0], np.cumsum(self.ranks)]).astype(np.int64)
        dtype = np.complex128 if complex_data else np.float64
        self.qh = np.empty((int(self.starts[-1]), reader.m), dtype=dtype)
        for r in distinct(self.ranks):
            which = np.flatnonzero(self.ranks == r)
            u = np.stack([reader.basis(int(self.ids[k])) for k in which]).astype(dtype)
            gram = np.swapaxes(u.conj(), 1, 2) @ u
            lower = np.linalg.cholesky(gram)
            qh = np.linalg.solve(lower, np.swapaxes(u.conj(), 1, 2))  # L^-1 U^H, (F_r, r, m)
            rows = (self.starts[which][:, None] + np.arange(r)[None, :]).ravel()
            self.qh[rows] = qh.reshape(-1, reader.m)

    def __len__(self) -> int:
        return len(self.ids)

    def best(self, batch, norm2: np.ndarray, allowed2: np.ndarray, share: float = EVICT_SHARE,
             screen_bytes: int = SCREEN_BYTES):
        """For every matrix of ``batch``: the cluster (a store id, -1 for none) whose stored
        basis fits it within ``share`` of ``allowed2`` (its squared error budget) with
        the fewest estimated code bits, and that fit's squared truncation error. At most
        ``screen_bytes`` of products are held at once.

        Bits: r_c n_i coefficients of energy P at the step the rest of the budget allows,
        about r_c n_i / 2 log2(2 pi e P / (12 (allowed2 - T))) (a quantised Gaussian; see
        docs/format.md); ties go to the lower cluster id.

        Two stages. With A_i = sum_j s_j u_j v_j^H and P_c the projection on cluster c's
        range, ||(I - P_c) A_i||^2 >= sum_{j <= k} s_j^2 ||(I - P_c) u_j||^2: the leading
        LEADING directions of every matrix rule out, against every cluster at once and
        cheaply, the clusters that cannot fit it; the exact truncation error is computed for
        the pairs left."""
        B = len(batch)
        best_bits = np.full(B, np.inf)
        best_id = np.full(B, -1, dtype=np.int64)
        best_trunc = np.zeros(B)
        if not len(self) or not B:
            return best_id, best_trunc
        limit = share * allowed2
        widths = np.diff(batch.offsets)
        found_f, found_i = [], []  # (cluster, batch position) pairs still possible
        if widths.max() <= LEADING + 1:
            # The leading directions would be most of each matrix: ruling out pairs costs
            # about what measuring them exactly does, so every pair is measured.
            f, i = np.nonzero(np.broadcast_to((norm2 > 0)[None, :], (len(self), B)))
            found_f.append(f)
            found_i.append(i)
            f0 = len(self)
        else:
            lead, lead_offsets, lead2 = _leading(batch, LEADING)
            per_row = max(1, screen_bytes // (16 * lead.shape[1]))
            qh_lead = self.qh.astype(lead.dtype)
            f0 = 0
        while f0 < len(self):
            f1 = int(np.searchsorted(self.starts, self.starts[f0] + per_row, side="right")) - 1
            f1 = min(max(f1, f0 + 1), len(self))
            lo, hi = self.starts[f0], self.starts[f1]
            energy = np.abs(qh_lead[lo:hi] @ lead).astype(np.float64) ** 2
            energy = np.add.reduceat(energy, self.starts[f0:f1] - lo, axis=0)
            captured = np.add.reduceat(energy, lead_offsets[:-1], axis=1)  # (clusters, B)
            # Single precision rounds the captured energy by ~1e-6 of it: leave that room.
            possible = lead2[None, :] - captured * (1 + 1e-5) <= limit[None, :]
            f, i = np.nonzero(possible & (norm2 > 0)[None, :])
            found_f.append(f + f0)
            found_i.append(i)
            f0 = f1
        found_f, found_i = np.concatenate(found_f), np.concatenate(found_i)
        order = np.argsort(found_f, kind="stable")
        found_f, found_i = found_f[order], found_i[order]
        bounds = np.searchsorted(found_f, np.arange(len(self) + 1))
        data = batch.data
        for f in np.flatnonzero(np.diff(bounds)):
            positions = found_i[bounds[f]:bounds[f + 1]]
            whole = len(positions) == B  # every matrix: no need to gather their columns
            sub = np.concatenate([[0], np.cumsum(widths[positions])]).astype(np.int64)
            proj = qb.per_matrix(column_norms2(self.qh[self.starts[f]:self.starts[f + 1]]
                                               @ (data if whole else
                                                  data[:, columns_of(batch.offsets, positions)])),
                                 sub)
            trunc = np.maximum(norm2[positions] - proj, 0.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                bits = self.ranks[f] * widths[positions] * np.maximum(
                    0.5 * np.log2(2 * np.pi * np.e / 12 * proj / (allowed2[positions] - trunc)), 0)
            bits = np.where(trunc <= limit[positions], bits, np.inf)
            better = bits < best_bits[positions]  # clusters come in id order: ties keep the first
            take = positions[better]
            best_bits[take] = bits[better]
            best_id[take] = self.ids[f]
            best_trunc[take] = trunc[better]
        return best_id, best_trunc


#: Leading directions of each matrix used to rule out clusters (see StoredBases.best).
LEADING = 2


def _leading(batch, k: int):
    """Per matrix of ``batch``, its leading k directions scaled by their singular values
    (the matrix itself when it has at most k columns), side by side (single precision, for
    screening), their offsets, and the squared norm they hold."""
    widths = np.diff(batch.offsets)
    keep = np.minimum(widths, k)
    offsets = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
    out = np.empty((batch.data.shape[0], int(offsets[-1])),
                   dtype=np.complex64 if np.iscomplexobj(batch.data) else np.float32)
    held = np.zeros(len(batch))
    for n in distinct(widths):
        which = np.flatnonzero(widths == n)
        stack = np.stack([batch.block(int(j)) for j in which]).astype(
            np.complex128 if np.iscomplexobj(batch.data) else np.float64)
        if n > k:  # from the smaller Gram matrix: s_j u_j = A v_j, or u_j sqrt(lambda_j)
            m = stack.shape[1]
            if n <= m:
                _, v = np.linalg.eigh(np.swapaxes(stack.conj(), 1, 2) @ stack)
                stack = stack @ v[:, :, -k:]
            else:
                lam, u = np.linalg.eigh(stack @ np.swapaxes(stack.conj(), 1, 2))
                stack = u[:, :, -k:] * np.sqrt(np.maximum(lam[:, None, -k:], 0.0))
        held[which] = np.sum(np.abs(stack) ** 2, axis=(1, 2))
        cols = columns_of(offsets, which)
        out[:, cols] = np.concatenate(list(stack), axis=1) if len(which) else out[:, cols]
    return out, offsets, held


# ---------------------------------------------------------------------------------------------
# The append
# ---------------------------------------------------------------------------------------------
def append_to_store(store_path, input_path, dataset=None, transpose=None,
                    memory_limit: int = defaults.MEMORY_LIMIT,
                    progress=None, fill_missing: bool = False, resume: bool = False) -> dict:
    """Add the matrices of ``input_path`` to the result store ``store_path``; returns the
    grown store's report (with an ``append`` entry: what this append did).

    The new matrices clustered among themselves are checkpointed beside the store as
    ``cluster`` checkpoints its clusters; ``resume`` continues an interrupted append of the
    same input to the same store from there (the rest is recomputed: the screening and the
    joins are cheap and deterministic)."""
    started = time.perf_counter()
    store_path = require_path(store_path, "STORE")
    input_path = require_path(input_path, "INPUT")
    _require_store(store_path)
    refuse_clashes(("store", store_path), [("input", input_path)])
    with OutputGuard(store_path, resume=resume) as guard:
        with ResultStore(store_path) as old:
            params = dict(old.params)
            _refuse_unappendable(old, store_path)
            K0 = len(old.labels)
            inputs = recorded_inputs(params, K0, store_path)
            if transpose is None:
                transpose = bool(params.get("transpose", False))
            elif bool(transpose) != bool(params.get("transpose", False)):
                was = "transposed (--transpose)" if params.get("transpose") else \
                    "as stored (--no-transpose)"
                raise InputError(f"{store_path}: its matrices were read {was}; INPUT must be "
                                 "read the same way (reconstruct undoes one choice for all)")
            with open_source(input_path, dataset, transpose, fill_missing) as source:
                for k, entry in enumerate(inputs):
                    if _same_input(entry, source.path, source.dataset):
                        raise InputError(f"{source.where}: already in {store_path} (input "
                                         f"{k + 1} of {len(inputs)}); an input is appended once")
                _check_compatible(old, source, params, store_path)
                # As `cluster` records it: an absolute path, or the URL as given.
                recorded = os.path.abspath(source.path) if os.path.exists(source.path) \
                    else source.path
                params["inputs"] = inputs + [{"input": recorded, "dataset": source.dataset,
                                              "K": int(source.K)}]
                run = _append_compact if old.compact is not None else _append_plain
                # BLAS on one thread, as clustering runs (matclust.blas): the work is many
                # products of a few thousand columns by a basis, where a second thread cost
                # more than it saved (the 4,604 RGB patches joining the first stored cluster:
                # encoded in 0.22 s of CPU on two threads, 0.07 s on one).
                with single_threaded():
                    return run(old, source, params, store_path, memory_limit, progress,
                               started, guard)


def _require_store(path: str) -> None:
    """InputError unless a result store is there (at a URL: a published one that may be
    replaced); checked before the lock is taken, so that nothing is created where there is no
    store."""
    if not is_url(path):
        if not os.path.exists(path):
            raise InputError(f"{path}: no such result store")
        return
    from matclust.objectstore import RemoteOutput

    if is_hdf5_url(path):
        raise InputError(f"{path}: an HDF5 result at a URL cannot be grown in place (object "
                         "stores have no rename to replace it atomically); append to a local "
                         "copy and upload that, or cluster to a Zarr URL")
    output = RemoteOutput(path)
    refuse_read_only(path, "store")
    if output.root_attrs() is None:
        raise output.missing_root()
    # The grown store replaces this one as `cluster --overwrite` would: the same rules.
    output.check_target(overwrite=True, what="store")


def _refuse_unappendable(old: ResultStore, path: str) -> None:
    from matclust.baselines import is_baseline
    from matclust.verify import Problems, check_structure_v1

    if is_baseline(old.params.get("method")):
        raise InputError(f"{path}: made by the baseline {old.params.get('method')}, without "
                         "error control; appends keep a guarantee it does not have")
    if old.compact is not None:
        problems = old.compact.consistency_problems()
    else:
        problems = Problems()
        check_structure_v1(old, problems)
    if problems:
        raise InputError(f"{path}: inconsistent result store ({problems[0]}); see matclust "
                         "verify")


def _check_compatible(old: ResultStore, source, params: dict, path: str) -> None:
    m = old.compact.m if old.compact is not None else int(old.report["m"])
    if source.m != m:
        what = "columns (with --transpose)" if source.transpose else "rows"
        raise InputError(f"{source.where}: matrices of {source.m} {what}; the store {path} "
                         f"holds matrices of {m} rows")
    stored = np.dtype(params.get("stored_dtype", "float64"))
    new = np.dtype(source.storage_dtype)
    if (stored.kind == "c") != (new.kind == "c"):
        kinds = {True: "complex", False: "real"}
        raise InputError(f"{source.where}: {kinds[new.kind == 'c']} matrices "
                         f"({source.input_dtype}); the store {path} holds "
                         f"{kinds[stored.kind == 'c']} ones ({stored})")
    if not np.can_cast(new, stored, "safe"):
        raise InputError(f"{source.where}: {source.input_dtype} matrices need {new} to be "
                         f"rebuilt; the store {path} rebuilds {stored} (cluster the inputs "
                         "together instead)")


def _append_compact(old: ResultStore, source, params: dict, store_path: str, memory_limit: int,
                    progress, started: float, guard) -> dict:
    from matclust.api import NullProgress, scan_norms

    progress = progress or NullProgress()
    reader_old = old.compact
    K0, K1, m = len(reader_old.labels), source.K, source.m
    complex_data = reader_old.complex
    eps, guarantee = float(params["eps"]), params["guarantee"]
    stored_dtype = np.dtype(params.get("stored_dtype", "float64"))
    encoder = CompactEncoder(eps, guarantee, int(params["rank"]), m, stored_dtype)
    needed = qb.code_dtype(max_code_bound(eps, codes_of_one(source, int(params["rank"]))))
    code_dtype = np.promote_types(needed, reader_old.codes_dtype)
    encoder.max_code = (int(np.iinfo(code_dtype).max) - 1) // 2
    if encoder.basis_dtype != reader_old.bases_dtype:  # new bases go beside the old ones
        raise InputError(f"{store_path}: its bases are {reader_old.bases_dtype}, not the "
                         f"{encoder.basis_dtype} its eps asks for; cluster the inputs together")

    # The new matrices are held in memory (cached as read, and copied for those clustered
    # anew below), beside the stored bases prepared for screening.
    stored = StoredBases(reader_old, complex_data)
    held = stored.qh.nbytes + 2 * source.matrix_bytes

    run_plan = _append_plan(source, store_path, held, memory_limit)
    source.batch_limit = run_plan.batch
    reader = CachedReader(source, source.matrix_bytes)
    norms2 = scan_norms(reader, progress)  # calibrates: one power of two for all but apart ones
    # Screening against every stored basis; apart matrices (their own scale) and zero or tiny
    # ones are clustered with the others instead.
    choice = np.full(K1, -1, dtype=np.int64)
    progress.start("screening", K1)

    def screened(part):
        return stored.best(part, norms2[part.indices], encoder.eps ** 2 * norms2[part.indices],
                           screen_bytes=SCREEN_BYTES // CORES)[0]

    for k in range(len(reader)):
        batch = reader.batch(k)
        # A piece per core (the products are most of the screening: 7,079 RGB patches against
        # 6 stored bases took 23 ms on one core).
        best = np.concatenate(on_all_cores(screened, _pieces(batch, CORES)))
        usable = ~source.apart[batch.indices] & (norms2[batch.indices] >= qb.TINY_NORM2)
        choice[batch.indices] = np.where(usable, best, -1)
        progress.advance(len(batch))

    writer = ResultWriter(store_path, overwrite=True, fmt=FORMAT)
    with writer:
        widths = np.concatenate([reader_old.widths, source.widths])
        out = CompactWriter(writer, K0 + K1, m, widths, complex_data, code_dtype,
                            encoder.basis_dtype)
        out.seed(reader_old)
        sink = CompactSink(source, params, writer, encoder, out, first=K0)  # for matrices alone
        worst = float(old.report.get("max_matrix_error", 0.0))
        joined = 0
        leftover = [np.flatnonzero(choice < 0)]
        for c, (group, rest) in _joining(encoder, reader, reader_old, choice, run_plan.batch):
            leftover.append(np.array([i for i, _ in rest], dtype=np.int64))
            if group is None:
                continue
            group = unscaled(group, source.exponents[group.members])
            union = out.error_with(int(c), group)
            # Not finite: the cluster's and the new members' magnitudes lie too far apart for
            # one unit (~2^500); above eps: cannot happen, each part meets eps by itself.
            if not np.isfinite(union) or (guarantee == "cluster" and union > encoder.eps):
                leftover.append(group.members)
                continue
            worst = max(worst, float(group.matrix_errors.max()))
            group.members = group.members + K0
            out.add_part(int(c), group)
            joined += len(group.members)
        leftover = np.sort(np.concatenate(leftover))
        logger.info("%d of %d new matrices joined stored clusters; %d clustered anew",
                    joined, K1, len(leftover))
        new_clusters = 0
        if len(leftover) and not _may_cluster(source, reader, norms2, leftover, params,
                                              encoder.eps):
            logger.info("no seed's basis fits enough of them for a factored cluster: each "
                        "is stored alone")
            _store_alone(sink, reader, leftover)
            worst = max(worst, sink.worst)
            new_clusters = len(leftover)
        elif len(leftover):
            groups, sub_worst = _cluster_anew(source, reader, leftover, params,
                                              run_plan.cache, guard)
            worst = max(worst, sub_worst)
            for group in groups:
                group.members = leftover[group.members] + K0
            # In the sub-run's order (its cluster ids); the many single matrices batched.
            alone = []
            for group in groups + [None]:
                if group is not None and len(group.members) == 1:
                    alone.append(group)
                    continue
                out.add_alone(AloneBatch.of(alone, out.complex))
                alone = []
                if group is not None:
                    out.add(group)
            new_clusters = len(groups)
        names = _names(old.names, source.names, params["inputs"])
        labels, stats = out.finish(names)
        report = build_report(params, K0 + K1, m, int(params["rank"]), eps, stats,
                              out.stored_numbers, source.input_dtype.itemsize,
                              stored_dtype.itemsize, time.perf_counter() - started, worst)
        _commit(writer, old, report, params, source, joined, new_clusters, started)
    return report


def _pieces(batch: Batch, count: int) -> list[Batch]:
    """``batch`` cut into at most ``count`` runs of consecutive matrices (views of it)."""
    if len(batch) < 2:
        return [batch]
    bounds = distinct(np.linspace(0, len(batch), count + 1).astype(np.int64))
    return [batch.span(a, b) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def _joining(encoder: CompactEncoder, reader, reader_old, choice: np.ndarray, batch_bytes: int):
    """For every stored cluster some new matrices chose (``choice``, -1 for none), in id
    order: its id, and ``encoder.encode_cluster``'s group of them against its stored basis
    and the matrices it left out. Clusters side by side, one per core, while their matrices
    take at most ``batch_bytes`` together (the plan's working unit) or those of the largest
    one (what one at a time holds at its peak); read here: the reader is not shared between
    threads."""
    ids = distinct(choice[choice >= 0])
    source = reader.source
    sizes = np.bincount(choice[choice >= 0], weights=source.widths[choice >= 0],
                        minlength=int(ids[-1]) + 1 if len(ids) else 0)[ids] * \
        source.m * source.dtype.itemsize
    limit = max(batch_bytes, float(sizes.max(initial=0)))

    def encoded(item):
        _, batch, basis = item
        return encoder.encode_cluster(batch.indices, batch.data, batch.offsets, basis, 0.0,
                                      whole=False)

    lo = 0
    while lo < len(ids):
        hi = lo + 1
        while hi < len(ids) and hi - lo < CORES and sizes[lo: hi + 1].sum() <= limit:
            hi += 1
        items = [(int(c), reader.get(np.flatnonzero(choice == c)), reader_old.basis(int(c)))
                 for c in ids[lo: hi]]
        yield from zip([c for c, _, _ in items], on_all_cores(encoded, items))
        lo = hi


class _PlainClusters:
    """A plain (matclust/1) store's clusters held in memory, seen as :class:`StoredBases`
    reads a compact one: ``ranks``, ``basis(c)``, ``m``."""

    def __init__(self, store: ResultStore):
        self.clusters = [store.cluster(c) for c in range(store.n_clusters)]
        self.m = int(store.report["m"])
        self.ranks = np.array([cl["basis"].shape[1] if "basis" in cl else 0
                               for cl in self.clusters], dtype=np.int64)

    def basis(self, c: int):
        return self.clusters[c].get("basis")


def _append_plain(old: ResultStore, source, params: dict, store_path: str, memory_limit: int,
                  progress, started: float, guard) -> dict:
    """The plain layout: every cluster group is copied, those new matrices joined extended by
    their coefficients against the stored basis (at the stored precision, the error computed
    on exactly what is stored), the new clusters written as a first run writes them."""
    from matclust.api import NullProgress, scan_norms
    from matclust.encode import EncodedCluster
    from matclust.report import cluster_stat
    from matclust.sinks import write_cluster
    from matclust.store import PLAIN_FORMAT

    progress = progress or NullProgress()
    K0, K1, m = len(old.labels), source.K, source.m
    eps, guarantee = float(params["eps"]), params["guarantee"]
    stats = old.report["cluster_stats"]
    # Plain arrays are not compressed: the store's size is what its clusters take in memory.
    held = _store_bytes(store_path) + 2 * source.matrix_bytes

    run_plan = _append_plan(source, store_path, held, memory_limit)
    stored = _PlainClusters(old)
    bases = StoredBases(stored, source.dtype.kind == "c")
    source.batch_limit = run_plan.batch
    reader = CachedReader(source, source.matrix_bytes)
    norms2 = scan_norms(reader, progress)
    # Without quantisation the whole budget goes to truncation; rounding the coefficients to
    # the stored precision is checked exactly below.
    choice = np.full(K1, -1, dtype=np.int64)
    for k in range(len(reader)):
        batch = reader.batch(k)
        norm2 = norms2[batch.indices]
        best, _ = bases.best(batch, norm2, eps ** 2 * norm2, share=1.0)
        usable = ~source.apart[batch.indices] & (norm2 > 0)
        choice[batch.indices] = np.where(usable, best, -1)

    encoded = []  # every cluster as it will be written, old ones first
    worst = float(old.report.get("max_matrix_error", 0.0))
    leftover = [np.flatnonzero(choice < 0)]
    joined = 0
    for c, cl in enumerate(stored.clusters):
        s = stats[c]
        members = np.flatnonzero(choice == c)
        enc = EncodedCluster(cl["members"], int(s["columns"]), float(s["bound"]),
                             float(s["error"]), basis=cl.get("basis"),
                             coefficients=cl.get("coefficients"), raw=cl.get("raw"))
        if len(members):
            part = _plain_part(enc, reader.get(members), source, eps, guarantee)
            leftover.append(members[~part["kept"]])
            if part["kept"].any():
                kept = members[part["kept"]]
                enc.error = _union_error(enc, s, part)  # from the old members' arrays
                enc.members = np.concatenate([enc.members, kept + K0])
                enc.columns += int(source.widths[kept].sum())
                enc.coefficients = np.hstack([enc.coefficients, part["coefficients"]])
                enc.bound = max(enc.bound, enc.error)
                worst = max(worst, part["worst"])
                joined += len(kept)
        encoded.append(enc)
    leftover = np.sort(np.concatenate(leftover))
    new_clusters = 0
    if len(leftover):
        groups, sub_worst = _cluster_anew(source, reader, leftover, params, run_plan.cache,
                                          guard, encoding="plain")
        worst = max(worst, sub_worst)
        for enc in groups:
            enc.members = leftover[enc.members] + K0
            encoded.append(enc)
        new_clusters = len(groups)

    labels = np.empty(K0 + K1, dtype=np.int64)
    for c, enc in enumerate(encoded):
        labels[enc.members] = c
    new_stats = [cluster_stat(c, enc) for c, enc in enumerate(encoded)]
    with ResultWriter(store_path, overwrite=True, fmt=PLAIN_FORMAT) as writer:
        for c, enc in enumerate(encoded):
            write_cluster(writer, c, enc)
        writer.write_array("labels", labels)
        writer.write_array("widths", np.concatenate([old.widths, source.widths]))
        names = _names(old.names, source.names, params["inputs"])
        if names is not None:
            writer.write_strings("names", names)
        stored_dtype = np.dtype(params.get("stored_dtype", "float64"))
        report = build_report(params, K0 + K1, m, int(params["rank"]), eps, new_stats,
                              sum(enc.numbers for enc in encoded), source.input_dtype.itemsize,
                              stored_dtype.itemsize, time.perf_counter() - started, worst)
        _commit(writer, old, report, params, source, joined, new_clusters, started)
    return report


def _store_bytes(path: str) -> int:
    if is_url(path):
        from matclust.objectstore import published_bytes

        return published_bytes(path)
    from matclust.store import disk_bytes

    return disk_bytes(path)


def _plain_part(enc, batch, source, eps: float, guarantee: str) -> dict:
    """New matrices (``batch``, in the working scale) against a plain cluster's stored basis:
    their coefficients at the stored precision and which of them keep the guarantee, each on
    its own (matrix) or together (cluster; the worst off leave until they do). Errors are
    those of exactly what is stored."""
    from matclust.engine.exact import coefficients
    from matclust.engine.linalg import as_compute

    basis = as_compute(enc.basis)
    data = as_compute(batch.data)
    coeffs, back = source.to_storage(coefficients(basis, data), batch.indices,
                                     enc.basis.dtype)
    kept = np.zeros(len(batch), dtype=bool)
    if back is None:  # a coefficient overflows the stored dtype: these are clustered anew
        return {"kept": kept}
    err2 = batch.reduce_columns(column_norms2(data - basis @ back))
    norm2 = batch.reduce_columns(column_norms2(data))
    kept = err2 <= eps * eps * norm2
    if guarantee == "cluster":
        kept[:] = True
        for j in np.argsort(-(err2 / norm2), kind="stable"):
            if err2[kept].sum() <= eps * eps * norm2[kept].sum():
                break
            kept[j] = False
    cols = columns_of(batch.offsets, np.flatnonzero(kept))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.sqrt(err2[kept] / norm2[kept])
    exps = source.exponents[batch.indices[kept]]
    return {"kept": kept, "coefficients": coeffs[:, cols],
            "err2": (float(err2[kept].sum()), -2 * int(exps[0]) if len(exps) else 0),
            "norm2": (float(norm2[kept].sum()), -2 * int(exps[0]) if len(exps) else 0),
            "worst": float(rel.max(initial=0.0))}


def _union_error(enc, stat: dict, part: dict) -> float:
    """The relative error of a plain cluster with new members: sqrt((e_c^2 N_c^2 + E) /
    (N_c^2 + N)), with the cluster's stored error e_c and norm N_c (recovered from what is
    stored, ||U C||^2 = N_c^2 (1 - e_c^2), the residual being orthogonal to the basis) and the
    new members' squared error E and norm N. Both parts are within eps, so is the union:
    where the numbers leave the floating range, that bound, max(e_c, e_new), is reported."""
    from matclust.engine.linalg import ScaledSums, as_compute, sqnorm_scaled

    e_c = float(stat["error"])
    f, e = sqnorm_scaled(as_compute(enc.basis) @ as_compute(enc.coefficients))
    err, norm = ScaledSums(1), ScaledSums(1)
    if e_c < 1:
        norm.add(0, f / (1 - e_c * e_c), e)
        err.add(0, f * e_c * e_c / (1 - e_c * e_c), e)
    err.add(0, *part["err2"])
    norm.add(0, *part["norm2"])
    union = err.sqrt_ratio(0, norm)
    new = np.sqrt(part["err2"][0] / part["norm2"][0]) if part["norm2"][0] > 0 else 0.0
    return union if np.isfinite(union) else max(e_c, float(new))


def _cluster_anew(source, reader, indices: np.ndarray, params: dict, budget_bytes: int,
                  guard, encoding: str = "compact"):
    """The stored groups (and their largest matrix error) of the matrices ``indices``
    clustered among themselves with the store's parameters, in the input's own magnitude (the
    run calibrates them itself, so matrices apart from the others' scale are kept apart as a
    first run would). The run may use what the plan left for caches (``budget_bytes``); its
    own model counts the interpreter once more, which errs on the safe side. It keeps its
    checkpoint through ``guard``, the lock held on the store being grown."""
    batch = reader.get(indices)
    exps = source.exponents[indices]
    blocks = [times_power2(np.array(block), -int(e)) for block, e in zip(batch.blocks(), exps)]
    del batch
    if len({block.shape for block in blocks}) == 1:
        blocks = np.stack(blocks)  # read as one array, not matrix by matrix
    # The blocks are in the working dtype (float64 for integers), which the store rebuilds in
    # its stored dtype (float32): the run keeps that rounding's room off eps as the store's
    # first run did.
    stored_dtype = np.dtype(params.get("stored_dtype", "float64"))
    overrides = {}
    if encoding == "compact":
        overrides["eps"] = float(params["eps"]) - 4 * float(np.finfo(stored_dtype).eps)
    need = sum(block.nbytes for block in blocks)
    # The run's checkpoint names the store and every input (the new one last): a resumed
    # append must grow the same store by the same input; the matrices themselves are checked
    # through their norms, as for any run.
    identity = {"store": guard.output, "inputs": params["inputs"]}
    sub = cluster_among_themselves(blocks, params, budget_bytes, need, encoding, guard,
                                   identity, **overrides)
    return sub.clusters_, float(sub.report_["max_matrix_error"])


#: Bytes of (matrices x seed directions) measured at once by :func:`_may_cluster`.
PROBE_BYTES = 32 * 2**20


def _may_cluster(source, reader, norms2: np.ndarray, leftover: np.ndarray, params: dict,
                 eps: float) -> bool:
    """Whether the matrices ``leftover`` (none of which a stored basis fits) may hold a cluster
    worth storing factored; if not, each is stored alone at once (:func:`_store_alone`),
    which is what clustering them among themselves ends in, without that run's cost (about
    half an append of 5,000 MiniLM columns: scans, a greedy run, encodings copied over).

    The probe asks what the greedy run asks first, for its first ``patience`` seeds (the
    largest matrices, packed to at most rank columns each, as the driver packs them): do the
    matrices that fit a seed's top-r basis within the formation error make a cluster worth
    factoring (enough columns: r (m + N) < m N)? The driver gives up on a collection after
    ``patience`` clusters in a row that did not grow; here no seed has even the members a
    factored cluster would need. It is a judgement, not a proof: a cluster the greedy run
    would form around a later seed, or whose basis moves far from its seed's, is missed.
    What that may cost is compression only: every matrix alone meets eps by its own
    encoding. Measured (docs/benchmarks.md, "Appends"): MiniLM columns and RGB patches take
    this path (the run they skip formed no factored cluster among the 5,000 columns, one of
    10 patches among the 2,270 patches; the grown stores came out 0.5 % and 0.9 % smaller,
    their new cluster ids in index order), planted blocks from new subspaces do not
    (tests/test_append.py). The cluster guarantee pools
    matrices alone into one group (:meth:`matclust.compact.CompactEncoder.encode_pool`), and
    ``patience`` 0 never gives up: both cluster the leftovers as before."""
    from matclust.compact import formation_eps
    from matclust.driver import by_norm_descending, pack_seed, seed_basis, worth_factoring

    patience = int(params.get("patience", defaults.PATIENCE))
    if params["guarantee"] != "matrix" or patience <= 0:
        return True
    eligible = leftover[~source.apart[leftover] & (norms2[leftover] >= qb.TINY_NORM2)]
    if len(eligible) < 2:
        return False  # one matrix is a cluster of one whatever the run
    rank, m, widths = int(params["rank"]), source.m, source.widths
    limit2 = formation_eps(eps, "compact") ** 2 * norms2[eligible]
    ordered = eligible[by_norm_descending(norms2[eligible])]
    alive = np.zeros(len(widths), dtype=bool)
    alive[eligible] = True
    bases = []
    for _ in range(patience):
        live = ordered[alive[ordered]]
        if not len(live):
            break
        seed = pack_seed(live, widths, rank)
        alive[seed] = False
        bases.append(seed_basis(reader.get(seed).blocks(), rank))
    starts = np.concatenate([[0], np.cumsum([b.shape[1] for b in bases])[:-1]]).astype(np.int64)
    # Every seed's basis, (sum of ranks, m), in single precision as screening is (half the
    # time of double); the room left for its rounding below errs towards clustering.
    qh = np.concatenate(bases, axis=1).conj().T.astype(
        np.complex64 if source.dtype.kind == "c" else np.float32)
    # The reader's batches as they are (views of its cache), not gathered copies: on 29,534
    # MiniLM columns the copies took 0.38 s, three times the products. The products run a
    # piece per core.
    position = np.full(len(widths), -1, dtype=np.int64)
    position[eligible] = np.arange(len(eligible))
    captured = np.zeros((len(bases), len(eligible)))
    per_piece = max(1, PROBE_BYTES // (CORES * 8 * max(qh.shape[0], m) * int(widths.max())))

    def probed(part):
        energy = np.abs(qh @ part.data.astype(qh.dtype, copy=False)) ** 2
        energy = np.add.reduceat(energy, starts, axis=0)  # (seeds, columns)
        return np.add.reduceat(energy, part.offsets[:-1], axis=1)

    for k in range(len(reader)):
        batch = reader.batch(k)
        keep = np.flatnonzero(position[batch.indices] >= 0)
        if len(keep) < len(batch):
            if not len(keep):
                continue
            batch = batch.take(keep)
        pieces = _pieces(batch, max(CORES, -(-len(batch) // per_piece)))
        for lo in range(0, len(pieces), CORES):
            for part, got in zip(pieces[lo: lo + CORES],
                                 on_all_cores(probed, pieces[lo: lo + CORES])):
                captured[:, position[part.indices]] = got
    fits = norms2[eligible][None, :] - captured * (1 + 1e-5) <= limit2[None, :]
    return any(worth_factoring(rank, m, int(widths[eligible[row]].sum()), int(row.sum()))
               for row in fits)


def _store_alone(sink: CompactSink, reader, leftover: np.ndarray) -> None:
    """Each matrix of ``leftover`` (ascending) stored alone through ``sink``, as a run of them
    among themselves stores its singletons (the matrix guarantee: each at its own rank or by
    its DCT coefficients, checked on decoded values): in batches, encoded on every core ahead
    of the one being stored, stored in order (29,534 MiniLM columns took 1.09 s of a 2.14 s
    append on one core)."""
    chunks = (leftover[lo: lo + ALONE_BATCH] for lo in range(0, len(leftover), ALONE_BATCH))
    sink.store_all_alone(list(zip(chunk.tolist(), reader.get(chunk).blocks()))
                         for chunk in chunks)


def _names(old_names, new_names, inputs: list[dict]):
    """Member names of the grown store (None when neither input has any). A group's members
    are read back in sorted name order, so the names must sort in index order: the new input's
    names are kept when they do, else prefixed with the input's number ("003-name"), and the
    older names with theirs too when even that does not sort after them. A collection without
    names contributes its indices, zero-padded."""
    if old_names is None and new_names is None:
        return None
    K0, K1 = sum(e["K"] for e in inputs[:-1]), inputs[-1]["K"]
    digits = len(str(K0 + K1 - 1))
    old_names = list(old_names) if old_names is not None else \
        [f"{i:0{digits}d}" for i in range(K0)]
    new_names = list(new_names) if new_names is not None else \
        [f"{K0 + i:0{digits}d}" for i in range(K1)]

    def in_order(names):
        return len(set(names)) == len(names) and all(a < b for a, b in zip(names, names[1:]))

    for names in (old_names + new_names,
                  old_names + [f"{len(inputs):03d}-{name}" for name in new_names]):
        if in_order(names):
            return names
    numbers = np.repeat(np.arange(1, len(inputs) + 1), [e["K"] for e in inputs])
    names = [f"{k:03d}-{name}" for k, name in zip(numbers, old_names + new_names)]
    if not in_order(names):
        raise InputError(f"{inputs[-1]['input']}: its member names repeat or do not sort in "
                         "index order with the store's")
    return names


def _append_plan(source, store_path, held: int, memory_limit: int) -> limits.Plan:
    """The memory plan of appending ``source`` with ``held`` bytes kept beside it, or
    InputError naming the smallest limit that works."""
    return limits.plan_or_refuse(f"{source.where}: appending {source.K} matrices to {store_path}",
                                 memory_limit, source.K, limits.cluster_reserve(source.K), held)


def _commit(writer, old, report: dict, params: dict, source, joined: int, new_clusters: int,
            started: float) -> None:
    """Complete the grown store: the report gains the input bytes of every input and what this
    append did; the old store is closed (done reading: the new one replaces it)."""
    report["input_bytes"] = int(old.report.get("input_bytes", 0)) + \
        source.m * int(source.widths.sum()) * source.input_dtype.itemsize
    report["append"] = {"input": params["inputs"][-1]["input"], "dataset": source.dataset,
                        "K": int(source.K), "joined": int(joined),
                        "new_clusters": int(new_clusters),
                        "seconds": round(time.perf_counter() - started, 3)}
    writer.set_json("params", params)
    writer.set_report(report)
    old.close()
    writer.commit()
