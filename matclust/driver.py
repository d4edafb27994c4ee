"""The greedy driver: one clustering loop for every estimator (ALGORITHMS.md, 'The greedy driver').

    sort all blocks by norm, descending
    while blocks remain:
        seed <- the largest remaining block, plus the next largest while total columns <= r
        candidates <- the remaining blocks in 'norm' or 'residual' order
        add candidates while the estimator's bound stays <= eps; stop at the first failure
        emit the cluster; after `patience` seed-only clusters in a row, emit the rest as singletons

The driver also has the last word on the guarantee: before a cluster that will be stored
factored is emitted, its exact top-r basis is computed (it is needed for storage anyway) and its
exact error checked against eps. Should rounding ever let a bound slip below the true error,
the last-added members go back to the pool until the exact error is within eps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from matclust.engine import ExactBasis
from matclust.engine.estimators import Estimator
from matclust.engine.linalg import as_compute, relative_error
from matclust.sources.cache import CachedReader

ORDERS = ("residual", "norm")


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
    grew: bool = True  # False when no candidate was admitted beyond the seed (patience counts these)


def worth_factoring(rank: int, m: int, columns: int, size: int) -> bool:
    """The paper's rule: store U and C only when r (m + N) < m N, and never for singletons."""
    return size >= 2 and rank * (m + columns) < m * columns


@dataclass
class GreedyDriver:
    """Greedy error-bounded clustering over any estimator.

    Parameters
    ----------
    reader : CachedReader
        Access to the matrices.
    norms2, widths : ndarray, shape (K,)
        Squared Frobenius norms and column counts of every matrix.
    estimator : Estimator
        The bound (weyl, residual or incremental).
    eps : float
        Relative error every cluster must meet.
    order : {"residual", "norm"}
        Candidate order.
    patience : int
        After this many seed-only clusters in a row, the rest become singletons (0: never).
    progress : callable(int), optional
        Called with the number of matrices just assigned.
    """

    reader: CachedReader
    norms2: np.ndarray
    widths: np.ndarray
    estimator: Estimator
    eps: float
    order: str = "residual"
    patience: int = 10
    progress: Callable[[int], None] | None = None
    alive: np.ndarray = field(init=False)
    seed_only_streak: int = field(init=False, default=0)

    def __post_init__(self):
        self.rank = self.estimator.rank
        self.m = self.reader.source.m
        self.alive = np.ones(len(self.norms2), dtype=bool)
        # Descending norm; ties broken by index so the result is deterministic.
        self._by_norm = np.lexsort((np.arange(len(self.norms2)), -self.norms2))

    # -- the loop -----------------------------------------------------------------------
    def clusters(self) -> Iterator[FormedCluster]:
        """Form clusters one by one, in order; each is final when yielded."""
        cursor = 0
        while True:
            while cursor < len(self._by_norm) and not self.alive[self._by_norm[cursor]]:
                cursor += 1
            if cursor == len(self._by_norm):
                return
            if self.patience and self.seed_only_streak >= self.patience:
                yield from self._singletons(self._by_norm[cursor:])
                return
            seed = self._seed(cursor)
            members, state = self._grow(seed)
            cluster = self._finalize(members, state.bound)
            cluster.grew = len(cluster.members) > len(seed)
            self.seed_only_streak = 0 if cluster.grew else self.seed_only_streak + 1
            self.alive[cluster.members] = False
            if self.progress:
                self.progress(len(cluster.members))
            yield cluster

    def restore(self, formed: list[tuple[np.ndarray, bool]]) -> None:
        """Continue after clusters formed earlier (members, grew), e.g. from a checkpoint.

        The loop is deterministic given which matrices remain and the seed-only streak, so a
        resumed run forms exactly the clusters an uninterrupted run would have formed next.
        """
        for members, grew in formed:
            self.alive[np.asarray(members, dtype=np.int64)] = False
            self.seed_only_streak = 0 if grew else self.seed_only_streak + 1

    def _seed(self, cursor: int) -> np.ndarray:
        seed = [self._by_norm[cursor]]
        cols = self.widths[seed[0]]
        for idx in self._by_norm[cursor + 1 :]:
            if cols >= self.rank:
                break
            if not self.alive[idx]:
                continue
            if cols + self.widths[idx] > self.rank:
                break
            seed.append(idx)
            cols += self.widths[idx]
        return np.array(seed, dtype=np.int64)

    def _grow(self, seed: np.ndarray):
        seed_blocks = self.reader.get(seed).blocks()
        state = self.estimator.start(seed_blocks)
        members = list(seed)
        if state.bound > self.eps:
            return np.array(members), state
        for batch_indices in self._candidates(seed, seed_blocks):
            batch = self.reader.get(batch_indices)
            for j, idx in enumerate(batch.indices):
                trial = state.extend(batch.block(j))
                if trial.bound > self.eps:
                    return np.array(members), state
                state = trial
                members.append(int(idx))
        return np.array(members), state

    def _candidates(self, seed: np.ndarray, seed_blocks) -> Iterator[np.ndarray]:
        """Remaining indices in candidate order, in slices (reading is per slice)."""
        remaining_mask = self.alive.copy()
        remaining_mask[seed] = False
        if self.order == "norm":
            ordered = self._by_norm[::-1]
            ordered = ordered[remaining_mask[ordered]]
        else:
            ordered = self._by_residual(seed_blocks, remaining_mask)
        step = 64
        for start in range(0, len(ordered), step):
            yield ordered[start : start + step]

    def _by_residual(self, seed_blocks, remaining_mask: np.ndarray) -> np.ndarray:
        """Remaining indices by ascending ||(I - Q Q^*) A_i||_F, Q the seed's top-r basis."""
        seed = np.hstack([as_compute(b) for b in seed_blocks])
        u, s, _ = np.linalg.svd(seed, full_matrices=False)
        q = u[:, : min(self.rank, int(np.count_nonzero(s > 0)) or 1)]
        qh = q.conj().T
        residual2 = np.full(len(remaining_mask), np.inf)
        for batch in self.reader:
            keep = np.flatnonzero(remaining_mask[batch.indices])
            if len(keep) == 0:
                continue
            if len(keep) < len(batch):
                batch = batch.take(keep)
            data = as_compute(batch.data)
            resid = data - q @ (qh @ data)
            col2 = np.einsum("ij,ij->j", resid.real, resid.real)
            if np.iscomplexobj(resid):
                col2 += np.einsum("ij,ij->j", resid.imag, resid.imag)
            residual2[batch.indices] = batch.reduce_columns(col2)
        candidates = np.flatnonzero(remaining_mask)
        # Ties (e.g. duplicates, exact zeros) by index: deterministic.
        return candidates[np.lexsort((candidates, residual2[candidates]))]

    # -- the exact check ----------------------------------------------------------------
    def _finalize(self, members: np.ndarray, bound: float) -> FormedCluster:
        trimmed = 0
        while True:
            columns = int(self.widths[members].sum())
            if not worth_factoring(self.rank, self.m, columns, len(members)):
                return FormedCluster(members, columns, bound, False, trimmed=trimmed)
            acc = ExactBasis(self.m, self.rank, self.reader.source.dtype)
            for chunk in np.array_split(members, max(1, len(members) // 4096)):
                acc.add(self.reader.get(chunk).data)
            basis, sigma2 = acc.result()
            best = relative_error(acc.norm2, float(np.sum(sigma2[: self.rank])))
            if best <= self.eps:
                # After a trim the estimator's bound was for a larger cluster; the exact error
                # is then the only bound we hold.
                bound = max(bound, best) if trimmed else bound
                return FormedCluster(members, columns, bound, True, basis, best, trimmed)
            # Not reachable with exact arithmetic; guards the guarantee against rounding.
            members = members[:-1]
            trimmed += 1

    def _singletons(self, rest: np.ndarray) -> Iterator[FormedCluster]:
        for idx in rest:
            if self.alive[idx]:
                self.alive[idx] = False
                if self.progress:
                    self.progress(1)
                yield FormedCluster(np.array([idx]), int(self.widths[idx]), None, False, grew=False)
