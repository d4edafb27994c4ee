"""The greedy driver: one clustering loop for every estimator (docs/algorithms.md, "The greedy
driver").

    sort all blocks by norm, descending
    while blocks remain:
        seed <- the largest remaining block, plus the next largest while total columns <= r
        candidates <- the remaining blocks in 'norm' or 'residual' order
        add candidates while the estimator's bound stays <= eps; stop at the first failure
        emit the cluster; after `patience` clusters in a row that kept no more than their seed
        (or handed back more members than they kept), emit the rest as singletons

The driver also has the last word on the guarantee: before a cluster that will be stored
factored is emitted, its exact top-r basis is computed (it is needed for storage anyway) and its
exact error checked against eps. Should rounding ever let a bound slip below the true error,
the last-added members go back to the pool until the exact error is within eps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np

from matclust import defaults
from matclust.blas import single_threaded
from matclust.engine import ExactBasis
from matclust.engine.exact import pending_limit
from matclust.engine.estimators import Estimator
from matclust.engine.linalg import (as_compute, column_norms2, columns_of, residual_columns2,
                                    sqnorm)
from matclust.sources.base import Batch

logger = logging.getLogger(__name__)

ORDERS = ("residual", "norm")
#: A cluster's columns are kept as they are admitted, up to this size, so that its exact basis
#: and its encoding do not gather them again.
KEEP_MEMBERS_BYTES = 32 << 20
#: A member's error against a basis computed as ||A||^2 - ||basis^* A||^2 that lies within this
#: fraction of ||A||^2 of the eviction limit is computed again from the residual (rounding
#: moves either by ~1e-16 ||A||^2: far less).
CLOSE_TO_LIMIT = 1e-9
#: A candidate whose squared residual against the seed's order basis is at most this fraction
#: of its energy lies inside it as far as both modes can tell: single-precision scans and
#: summaries resolve ~1e-7 of a matrix's energy (see GreedyDriver._by_residual).
ORDER_TIE = 1e-6
#: With a reader whose scans share a pass (out of core: the summaries), each residual scan
#: also measures the remaining matrices against the bases of this many seeds that would come
#: next should the cluster being formed take none of them; a later cluster whose seed is one
#: of those uses that scan instead of its own (see GreedyDriver._scan_ahead). Measured on
#: 500,000 summaries of 8 x 32 at r = 8: a pass for 1, 2 and 3 bases took 59, 95 and 135 ms;
#: on planted 10^5 out of core, 2 ahead left 170 passes for 500 clusters (1 ahead: 253).
SEEDS_AHEAD = 2


@dataclass
class FormedCluster:
    """A cluster as the driver emits it.

    ``members`` are input indices in column order; ``basis`` is the exact top-r basis (compute
    dtype) when the cluster is worth storing factored, else None; ``best_error`` is e_r(S).
    """

    members: np.ndarray
    columns: int
    bound: float | None  # None: not evaluated (patience singletons); the writer fills it in
    factored: bool
    basis: np.ndarray | None = None
    best_error: float = 0.0
    trimmed: int = 0  # members handed back because the exact error exceeded eps (should be 0)
    #: False when the cluster kept no more than its seed, or handed back more members than it
    #: kept (patience counts these)
    grew: bool = True
    batch: Batch | None = None  # the members' columns as read, when the driver kept them


def worth_factoring(rank: int, m: int, columns: int, size: int) -> bool:
    """The paper's rule: store U and C only when r (m + N) < m N, and never for singletons."""
    return size >= 2 and rank * (m + columns) < m * columns


# -- the seed rule and the candidate orders, shared with the bound study (matclust.study) -------
def by_norm_descending(norms2: np.ndarray) -> np.ndarray:
    """Positions by descending squared norm; ties by position, so the order is deterministic."""
    norms2 = np.asarray(norms2)
    return np.lexsort((np.arange(len(norms2)), -norms2))


def by_magnitude_descending(norms2: np.ndarray, source) -> np.ndarray:
    """:func:`by_norm_descending` for squared norms in the working scale of ``source`` (see
    ``MatrixSource.calibrate``). Matrices the source keeps apart have their own scale; in true
    magnitude they come after every other nonzero matrix, and they come so here, by their true
    norms (exact zeros last). Without such matrices, exactly ``by_norm_descending(norms2)``."""
    apart = source.apart
    if not apart.any():
        return by_norm_descending(norms2)
    # log2 of the true squared norms relative to the shared scale: finite for every nonzero.
    # (A shard of a larger collection may hold only matrices apart: any reference will do.)
    shared = source.exponents[~apart][0] if not apart.all() else 0
    relative = 2 * (shared - source.exponents)
    with np.errstate(divide="ignore"):  # log2(0) = -inf: exact zeros last
        key = np.log2(norms2) + relative
    return by_norm_descending(key)


def pack_seed(ordered: np.ndarray, widths: np.ndarray, rank: int,
              alive: np.ndarray | None = None) -> np.ndarray:
    """The seed: ``ordered[0]`` (the largest remaining block) plus the next largest while the
    total column count stays <= rank. ``ordered`` is by descending norm; entries not ``alive``
    are skipped; packing stops at the first live block that does not fit."""
    seed = [ordered[0]]
    cols = widths[seed[0]]
    for idx in ordered[1:]:
        if cols >= rank:
            break
        if alive is not None and not alive[idx]:
            continue
        if cols + widths[idx] > rank:
            break
        seed.append(idx)
        cols += widths[idx]
    return np.array(seed, dtype=np.int64)


def seed_basis(seed_blocks, rank: int) -> np.ndarray:
    """The seed's top-r left singular vectors (fewer when the seed has lower rank)."""
    seed = np.hstack([as_compute(b) for b in seed_blocks])
    u, s, _ = np.linalg.svd(seed, full_matrices=False)
    return u[:, : min(rank, int(np.count_nonzero(s > 0)) or 1)]


def by_ascending(candidates: np.ndarray, key: np.ndarray) -> np.ndarray:
    """``candidates`` by ascending ``key[candidates]``; ties by index (duplicates, exact zeros)."""
    # candidates are ascending, so a stable sort breaks ties by index.
    candidates = np.asarray(candidates)
    if len(candidates) > 1 and np.any(np.diff(candidates) < 0):
        candidates = np.sort(candidates)
    return candidates[np.argsort(key[candidates], kind="stable")]


def ascending_pieces(candidates: np.ndarray, key: np.ndarray, first: int = 256) -> Iterator[np.ndarray]:
    """``by_ascending(candidates, key)`` in consecutive pieces of growing size, each sorted
    only when it is reached. The greedy driver usually stops after a few hundred candidates;
    sorting all of them for every cluster cost more than the scan that produced the keys."""
    candidates = np.asarray(candidates)
    values = key[candidates]
    size = first
    while len(candidates) > size:
        # Everything up to the size-th smallest value, ties included: pieces split by value,
        # so together they are exactly the full stable order.
        head = values <= np.partition(values, size - 1)[size - 1]
        yield by_ascending(candidates[head], key)
        candidates, values = candidates[~head], values[~head]
        size *= 4
    if len(candidates):
        yield by_ascending(candidates, key)


def feeding_order(blocks, rank: int, order: str) -> np.ndarray:
    """Positions of one cluster's blocks in the order the greedy driver feeds them to an
    estimator: the seed (largest-norm blocks packed to <= rank columns) first, then the rest in
    candidate order ('norm': ascending norm; 'residual': ascending residual against the seed's
    top-r basis). Used by the bound study to bound a given cluster as the driver would."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}")
    norms2 = np.array([sqnorm(b) for b in blocks])
    widths = np.array([b.shape[1] for b in blocks], dtype=np.int64)
    by_norm = by_norm_descending(norms2)
    seed = pack_seed(by_norm, widths, rank)
    rest = np.ones(len(blocks), dtype=bool)
    rest[seed] = False
    if order == "norm":
        ascending = by_norm[::-1]
        tail = ascending[rest[ascending]]
    else:
        q = seed_basis([blocks[i] for i in seed], rank)
        residual2 = np.full(len(blocks), np.inf)
        for i in np.flatnonzero(rest):
            residual2[i] = float(np.sum(residual_columns2(q, blocks[i])))
        tail = by_ascending(np.flatnonzero(rest), residual2)
    return np.concatenate([seed, tail]).astype(np.int64)


class BlockReader(Protocol):
    """What the greedy driver reads blocks through: the matrices themselves
    (:class:`~matclust.sources.cache.CachedReader`), their summaries
    (:class:`~matclust.sources.summary.SummaryReader`) or clusters' stand-ins
    (:class:`~matclust.stages.StandinReader`).

    ``source`` has ``m``, ``dtype``, ``apart`` and ``exponents`` (see ``MatrixSource``);
    ``loss2`` is None for real blocks, else every stand-in's squared rounding distance, which
    the estimators account for; ``discard`` tells the reader which blocks are done with.
    ``shared_scans`` says whether scanning several bases in one pass costs much less than
    scanning them one by one; such a reader has ``residuals2_many`` (``residuals2`` for several
    bases), and the driver scans ahead with it for the next seeds (see ``SEEDS_AHEAD``).
    """

    source: object
    loss2: np.ndarray | None
    shared_scans: bool

    def get(self, indices) -> Batch: ...

    def residuals2(self, q: np.ndarray, candidates: np.ndarray) -> np.ndarray: ...

    def discard(self, indices) -> None: ...


@dataclass
class GreedyDriver:
    """Greedy error-bounded clustering over any estimator.

    Parameters
    ----------
    reader : BlockReader
        Access to the matrices (or to blocks standing in for them).
    norms2, widths : ndarray, shape (K,)
        Squared Frobenius norms and column counts of every matrix.
    estimator : Estimator
        The bound (weyl, residual or incremental).
    eps : float
        Relative error every cluster must meet.
    order : {"residual", "norm"}
        Candidate order.
    patience : int
        After this many clusters in a row that did not grow (see ``FormedCluster.grew``), the
        rest become singletons (0: never).
    progress : callable(int), optional
        Called with the number of matrices just assigned.
    exact_check : bool
        Compute each factored cluster's exact basis and check its exact error before emitting
        it. Off when the reader serves summaries (out of core): the bases are then computed
        afterwards in sequential passes (:mod:`matclust.streaming`).
    evict_above : float, optional
        With the exact check: a member whose own relative error against the cluster's exact
        basis exceeds this goes back to the pool (it is clustered again later), and the basis
        is computed again without it, until no member exceeds it (the per-matrix guarantee;
        the cluster's first member always stays).

    """

    reader: BlockReader
    norms2: np.ndarray
    widths: np.ndarray
    estimator: Estimator
    eps: float
    order: str = defaults.ORDER
    patience: int = defaults.PATIENCE
    progress: Callable[[int], None] | None = None
    exact_check: bool = True
    evict_above: float | None = None
    alive: np.ndarray = field(init=False)
    seed_only_streak: int = field(init=False, default=0)
    #: Scans made ahead: seed (as a tuple) -> (its order basis, residuals of the matrices
    #: remaining when the scan ran, by index).
    _ahead: dict = field(init=False, default_factory=dict)
    _cursor: int = field(init=False, default=0)

    def __post_init__(self):
        self.rank = self.estimator.rank
        self.m = self.reader.source.m
        self.alive = np.ones(len(self.norms2), dtype=bool)
        # Descending norm; ties broken by index so the result is deterministic.
        self._by_norm = by_magnitude_descending(self.norms2, self.reader.source)
        # Matrices from the first one kept apart on (see MatrixSource.calibrate) are never
        # seeds or candidates: each is stored on its own, in its own scale.
        apart = np.flatnonzero(self.reader.source.apart[self._by_norm])
        self._eligible_end = int(apart[0]) if len(apart) else len(self._by_norm)
        self._eligible = np.zeros(len(self.norms2), dtype=bool)
        self._eligible[self._by_norm[: self._eligible_end]] = True
        self._loss2 = self.reader.loss2
        # Members of the last cluster: how far the next order is likely read, and how many
        # candidates to try at once first. Part of the loop's state (see restore).
        self._last_size = 0

    # -- the loop -----------------------------------------------------------------------
    def clusters(self) -> Iterator[FormedCluster]:
        """Form clusters one by one, in order; each is final when yielded.

        BLAS runs single-threaded here, the readers' residual scans included (see
        :mod:`matclust.blas`)."""
        with single_threaded():
            yield from self._clusters()

    def _clusters(self) -> Iterator[FormedCluster]:
        cursor = 0
        discard = self.reader.discard
        if not self.alive.all():  # clusters restored from a checkpoint
            discard(np.flatnonzero(~self.alive))
        while True:
            while cursor < len(self._by_norm) and not self.alive[self._by_norm[cursor]]:
                cursor += 1
            if cursor == len(self._by_norm):
                return
            if cursor >= self._eligible_end or (self.patience and self.seed_only_streak >= self.patience):
                logger.info("the remaining %d matrices are singletons (patience, or too small "
                            "against the collection to share a scale)", int(self.alive.sum()))
                yield from self._singletons(self._by_norm[cursor:])
                return
            seed = self._seed(cursor)
            self._cursor = cursor
            members, bound, kept = self._grow(seed)
            if self._loss2 is not None and int(self.widths[members].sum()) <= self.rank:
                # Stand-in blocks carry their rounding loss into the bound (Mirsky), but a
                # cluster of <= r real columns keeps all its energy at rank r: e_r = 0 exactly.
                bound = 0.0
            cluster = self._finalize(members, bound, kept)
            # A cluster that handed back more members than it kept (evicted, over the limit of
            # their own) did not grow either: late in a collection such clusters come one after
            # another, each paying a scan and a growth for a few members (RGB patches: 35 that
            # admitted ~350 and kept ~7), and those few stored alone are no larger (bytes on
            # disk: RGB 379,395 -> 377,437, PDE 120,181 -> 93,646, gray 388,717 -> 387,956).
            kept_most = self.evict_above is None or cluster.trimmed <= len(cluster.members)
            cluster.grew = len(cluster.members) > len(seed) and kept_most
            self.seed_only_streak = 0 if cluster.grew else self.seed_only_streak + 1
            self.alive[cluster.members] = False
            self._last_size = len(cluster.members)
            logger.debug("cluster of %d matrices (%d columns), bound %.4g", len(cluster.members),
                         cluster.columns, cluster.bound)
            if self.progress:
                self.progress(len(cluster.members))
            yield cluster
            discard(cluster.members)  # the consumer is done with it

    def restore(self, formed: list[tuple[np.ndarray, bool]]) -> None:
        """Continue after clusters formed earlier (members, grew), e.g. from a checkpoint.

        The loop is deterministic given which matrices remain, the seed-only streak and the
        last cluster's size, so a resumed run forms exactly the clusters an uninterrupted run
        would have formed next.
        """
        for members, grew in formed:
            self.alive[np.asarray(members, dtype=np.int64)] = False
            self.seed_only_streak = 0 if grew else self.seed_only_streak + 1
            self._last_size = len(members)

    def rebuild(self, members, bound: float | None, grew: bool) -> FormedCluster:
        """A cluster formed earlier (final members in column order, its bound, whether it grew),
        made again exactly as :meth:`clusters` emitted it: the same exact basis, from the input.
        ``bound`` None marks a patience singleton. Use with :meth:`restore`."""
        members = np.asarray(members, dtype=np.int64)
        if bound is None:
            return FormedCluster(members, int(self.widths[members].sum()), None, False, grew=False)
        cluster = self._finalize(members, bound)
        cluster.grew = bool(grew)
        return cluster

    def _seed(self, cursor: int) -> np.ndarray:
        return pack_seed(self._by_norm[cursor : self._eligible_end], self.widths, self.rank, self.alive)

    def _grow(self, seed: np.ndarray):
        """A cluster from a seed: its members in the order admitted, its bound, and their
        columns in that order if the driver kept them (else None)."""
        seed_batch = self.reader.get(seed)
        seed_blocks = seed_batch.blocks()
        # The seed as one block: it has at most r columns (or is one block), so every estimator
        # captures its energy exactly either way, and one update is cheaper than several.
        state = self._prefixes(self.estimator.empty(), seed_batch, 0, len(seed)).state(len(seed))
        members = list(seed)
        # The real columns, when the driver runs on them (not on out-of-core stand-ins).
        kept = [seed_batch.data] if self.exact_check else None
        kept_bytes = seed_batch.data.nbytes

        def admit(batch, j, take):
            nonlocal kept, kept_bytes
            members.extend(int(i) for i in batch.indices[j : j + take])
            if kept is not None:
                kept.append(batch.data[:, batch.offsets[j] : batch.offsets[j + take]])
                kept_bytes += kept[-1].nbytes
                kept = kept if kept_bytes <= KEEP_MEMBERS_BYTES else None

        if state.bound > self.eps:
            return np.array(members), state.bound, kept
        # Candidates tried together; doubles while they are admitted. Consecutive clusters
        # tend to grow alike, so the first try is about as many as the last cluster admitted
        # (a try that overshoots costs a few eigenvalue probes, one that undershoots a whole
        # update).
        run = max(1, self._last_size - len(seed))
        screen = state.screen()
        for batch_indices in self._candidates(seed, seed_blocks, state):
            batch = self.reader.get(batch_indices)
            j = 0
            while j < len(batch):
                if screen is not None and (screen or self._screens(batch, j)):
                    idx = int(batch.indices[j])
                    loss2 = 0.0 if self._loss2 is None else float(self._loss2[idx])
                    if not screen.admits(batch.block(j), float(self.norms2[idx]), loss2, self.eps):
                        # Not on the screen: one update by the blocks screened in and this one.
                        group = screen.fold()
                        if group.state(len(group)).bound > self.eps:
                            return np.array(members), screen.bound, kept
                        state = group.state(len(group))
                        screen = state.screen()
                    admit(batch, j, 1)
                    j += 1
                    continue
                take = self._group(batch, j, run)
                group = self._prefixes(state, batch, j, take)
                if group.state(take).bound > self.eps:
                    # Blocks added together as one block are bounded at least as tightly as
                    # one at a time (the state after each added block is below the sum of the
                    # Grams in Loewner order), so the first block that fails in a group fails
                    # on its own too: the cluster ends inside this group.
                    # Only the bound is needed from here: no eigenvectors for the last state.
                    take = self._longest_fit(group)
                    admit(batch, j, take)
                    return np.array(members), group.bound(take) if take else state.bound, kept
                state = group.state(take)
                admit(batch, j, take)
                j += take
                run *= 2
        return np.array(members), screen.bound if screen else state.bound, kept

    def _screens(self, batch, j: int) -> bool:
        """Whether candidate j of ``batch`` goes through the estimator's screen
        (:class:`~matclust.engine.estimators.Screen`) rather than an update: when it cannot
        share a group update with the next one (it fills the column budget alone)."""
        return 2 * int(batch.offsets[j + 1] - batch.offsets[j]) > self.estimator.group_columns

    def _longest_fit(self, group) -> int:
        """How many leading blocks of a group that does not fit do fit, added as one block
        (0 when not even the first does). Bisection: the bounded error energy only grows with
        the prefix (the relative bound nearly so; any prefix found is within eps)."""
        fits, fails = 0, len(group)
        while fails - fits > 1:
            mid = (fits + fails) // 2
            if group.bound(mid) <= self.eps:
                fits = mid
            else:
                fails = mid
        return fits

    def _group(self, batch, j: int, run: int) -> int:
        """How many candidates from position j to add in one update: up to ``run``, within the
        estimator's column budget (adding several blocks as one wider block is the same
        mathematics, so the bound stays guaranteed, and one update is far cheaper than many
        for narrow blocks). One when the estimator gains nothing from groups."""
        limit = self.estimator.group_columns
        if not limit or run == 1:
            return 1
        widths = np.diff(batch.offsets[j : j + run + 1])
        return max(1, int(np.searchsorted(np.cumsum(widths), limit, side="right")))

    def _prefixes(self, state, batch, j: int, take: int):
        """``state`` extended by the first p of the ``take`` blocks from position j of
        ``batch``, taken together as one block (:class:`~matclust.engine.estimators.Prefixes`)."""
        idx = batch.indices[j : j + take]
        first = batch.offsets[j]
        loss2 = np.zeros(take) if self._loss2 is None else self._loss2[idx]
        return state.prefixes(batch.data[:, first : batch.offsets[j + take]],
                              batch.offsets[j + 1 : j + take + 1] - first, self.norms2[idx], loss2)

    def _candidates(self, seed: np.ndarray, seed_blocks, seed_state) -> Iterator[np.ndarray]:
        """Remaining indices in candidate order, in slices (reading is per slice)."""
        remaining_mask = self.alive & self._eligible
        remaining_mask[seed] = False
        if self.order == "norm":
            ascending = self._by_norm[::-1]
            pieces = [ascending[remaining_mask[ascending]]]
        else:
            pieces = self._by_residual(seed_state.order_basis(), seed_blocks, remaining_mask,
                                       seed)
        # Read in slices of doubling size, up to 64 candidates: most clusters end within the
        # first few, and gathering columns costs in proportion to how many. The first slice is
        # twice what the last cluster admitted, within 4..16 (PDE 128 x 48 blocks, clusters of
        # ~5: 1,802 blocks gathered with 16 first, for 550 admitted).
        step = min(16, max(4, 2 * (self._last_size - len(seed))))
        for ordered in pieces:
            start = 0
            while start < len(ordered):
                yield ordered[start : start + step]
                start += step
                step = min(2 * step, 64)

    def _by_residual(self, q, seed_blocks, remaining_mask: np.ndarray,
                     seed: np.ndarray) -> Iterator[np.ndarray]:
        """Remaining indices by ascending ||(I - Q Q^*) A_i||_F, Q the seed's estimator state's
        ``order_basis`` when it has one, else the seed's top-r basis (an SVD of the seed).

        When Q has more than r directions, candidates inside span(Q) (residual below
        ORDER_TIE of their energy) come first, by ascending residual against Q's top r."""
        if q is None:
            q = seed_basis(seed_blocks, self.rank)
        candidates = np.flatnonzero(remaining_mask)
        residual2 = self._scanned_ahead(seed, q)
        if residual2 is None:
            residual2 = self._scan_ahead(q, seed, candidates)
        if q.shape[1] > self.rank:
            # Inside span(Q) the residuals are rounding: the matrices' own in memory, their
            # summaries' out of core, so each mode would order these candidates differently
            # (PDE trajectories, 128 x 48 at r 8 + 5: 367 of 550 lie inside the first seed's
            # 13 directions; compression ratio 7.22 in memory, 6.01 out of core). The residual
            # against the top r tells them apart in both, and is what the bound charges. As
            # -1 / residual: below every residual outside, in the same order among themselves.
            inside = candidates[residual2[candidates] <= ORDER_TIE * self.norms2[candidates]]
            if len(inside) > 1:
                with np.errstate(divide="ignore"):
                    residual2[inside] = -1.0 / np.maximum(
                        self.reader.residuals2(q[:, : self.rank], inside), 0.0)
        return ascending_pieces(candidates, residual2, first=max(256, 2 * self._last_size))

    def _scanned_ahead(self, seed: np.ndarray, q: np.ndarray) -> np.ndarray | None:
        """The residuals scanned ahead for this seed, if it was foreseen: by index, of every
        matrix that remained then (those remaining now among them: matrices only leave)."""
        found = self._ahead.pop(tuple(seed.tolist()), None)
        if found is None or not np.array_equal(found[0], q):
            return None
        return found[1]

    def _scan_ahead(self, q: np.ndarray, seed: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Residuals (by index; inf where not scanned) of the candidates against Q; with a
        reader whose scans share a pass, those against the next SEEDS_AHEAD seeds' order bases
        too, kept for when those seeds come (the seeds that would follow should the cluster
        being formed take none of them: the largest matrices that remain, packed as
        :meth:`_seed` packs them). A seed taken by a cluster on the way is not asked for; its
        scan is dropped with the next one. Out of core the scan is a pass over every stored
        summary, each piece read from memory and widened to single precision once for all the
        bases; what a further basis adds is its products."""
        self._ahead = {}  # not asked for: their seeds were taken, or the scan was not theirs
        ahead = self._seeds_ahead(seed) if self.reader.shared_scans else []
        scans = self.reader.residuals2_many([q] + [basis for _, basis in ahead], candidates) \
            if ahead else [self.reader.residuals2(q, candidates)]
        by_index = []
        while scans:  # (each scan's values let go once placed: K numbers per basis at a time)
            full = np.full(len(self.alive), np.inf)
            full[candidates] = scans.pop(0)
            by_index.append(full)
        self._ahead = {tuple(s.tolist()): (basis, full)
                       for (s, basis), full in zip(ahead, by_index[1:])}
        return by_index[0]

    def _seeds_ahead(self, seed: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """The next SEEDS_AHEAD seeds (and their order bases) as if the cluster of ``seed``
        took no other matrix; seeds whose bound already exceeds eps (no scan) are skipped."""
        alive = self.alive.copy()
        alive[seed] = False
        cursor, ahead = self._cursor, []
        while len(ahead) < SEEDS_AHEAD:
            while cursor < self._eligible_end and not alive[self._by_norm[cursor]]:
                cursor += 1
            if cursor >= self._eligible_end:
                break
            nxt = pack_seed(self._by_norm[cursor: self._eligible_end], self.widths, self.rank,
                            alive)
            alive[nxt] = False
            batch = self.reader.get(nxt)
            state = self._prefixes(self.estimator.empty(), batch, 0, len(nxt)).state(len(nxt))
            if state.bound > self.eps:
                continue
            basis = state.order_basis()
            ahead.append((nxt, basis if basis is not None else seed_basis(batch.blocks(), self.rank)))
        return ahead

    # -- the exact check ----------------------------------------------------------------
    def _finalize(self, members: np.ndarray, bound: float, kept=None) -> FormedCluster:
        """The cluster with its exact basis; ``kept``: its members' columns, in order, if the
        driver kept them."""
        trimmed = 0
        batch = None
        if kept is not None:
            offsets = np.concatenate([[0], np.cumsum(self.widths[members])]).astype(np.int64)
            batch = Batch(members, np.hstack(kept), offsets)
        gram = None  # see _over_provisionally
        while True:
            columns = int(self.widths[members].sum())
            factored = worth_factoring(self.rank, self.m, columns, len(members))
            if not factored or not self.exact_check:
                return FormedCluster(members, columns, bound, factored, trimmed=trimmed, batch=batch)
            if self.evict_above is not None and columns > pending_limit(self.m):
                if batch is None:
                    batch = self.reader.get(members)
                gram, over = self._over_provisionally(gram, batch)
                if over.any():
                    keep = np.flatnonzero(~over)
                    gone = as_compute(batch.data[:, columns_of(batch.offsets, np.flatnonzero(over))])
                    gram -= gone @ gone.conj().T
                    members, batch = members[keep], batch.take(keep)
                    trimmed += int(over.sum())
                    continue
            acc = ExactBasis(self.m, self.rank, self.reader.source.dtype)
            if batch is not None:
                acc.add(batch.data)
            else:
                for chunk in np.array_split(members, max(1, len(members) // 4096)):
                    acc.add(self.reader.get(chunk).data)
            basis, best = acc.basis_and_error()
            if best <= self.eps and self.evict_above is not None:
                if batch is None:
                    batch = self.reader.get(members)
                over = self._members_over(basis, batch)
                if over.any():
                    keep = np.flatnonzero(~over)
                    members, batch = members[keep], batch.take(keep)
                    trimmed += int(over.sum())
                    continue
            if best <= self.eps:
                # After a trim the estimator's bound was for a larger cluster; the exact error
                # is then the only bound we hold.
                bound = max(bound, best) if trimmed else bound
                return FormedCluster(members, columns, bound, True, basis, best, trimmed, batch=batch)
            # Not reachable with exact arithmetic; guards the guarantee against rounding.
            logger.info("exact error %.4g > eps for a cluster of %d matrices: the last one goes "
                        "back to the pool", best, len(members))
            members = members[:-1]
            trimmed += 1
            batch = None

    def _over_provisionally(self, gram, batch: Batch):
        """:meth:`_members_over` against the top-r eigenvectors of the members' Gram M M^*
        (computed once, then downdated by the caller as members leave): a round of evictions
        costs a product instead of a QR of all columns (14,158 RGB patches: 7 rounds for the
        first cluster of 13,131, 0.54 s with a QR each). The exact basis is computed once no
        member is over this one, and checked again, so what is emitted is as before."""
        if gram is None:
            data = as_compute(batch.data)
            gram = data @ data.conj().T
        _, vectors = np.linalg.eigh(gram)
        return gram, self._members_over(vectors[:, ::-1][:, : self.rank], batch)

    def _members_over(self, basis: np.ndarray, batch: Batch) -> np.ndarray:
        """Which members' own error against ``basis`` exceeds ``evict_above`` (never the
        first: the seed's largest block anchors the cluster)."""
        data = as_compute(batch.data)
        columns2 = column_norms2(data)
        norm2 = batch.reduce_columns(columns2)
        limit = self.evict_above ** 2 * norm2
        # ||A_i||^2 - ||basis^* A_i||^2: one product and no residual array (the first RGB
        # patches cluster: 7 rounds over 39,000 columns). It is off by rounding only, ~1e-16
        # ||A_i||^2, like the residual's own norm; members that close to the limit are
        # recomputed from their residual, so every decision is the residual's.
        err2 = batch.reduce_columns(columns2 - column_norms2(basis.conj().T @ data))
        close = np.flatnonzero(np.abs(err2 - limit) <= CLOSE_TO_LIMIT * norm2)
        if len(close):
            part = batch.take(close)
            sub = as_compute(part.data)
            err2[close] = part.reduce_columns(column_norms2(sub - basis @ (basis.conj().T @ sub)))
        over = err2 > limit
        over[0] = False
        return over

    def _singletons(self, rest: np.ndarray) -> Iterator[FormedCluster]:
        for idx in rest:
            if self.alive[idx]:
                self.alive[idx] = False
                if self.progress:
                    self.progress(1)
                yield FormedCluster(np.array([idx]), int(self.widths[idx]), None, False, grew=False)
