"""Guaranteed lower bounds L <= E_r(S) on a cluster's top-r energy, maintained block by block.

Each estimator turns into an upper bound on the cluster's best rank-r relative error through
``e_r(S) <= sqrt(1 - L / ||M_S||_F^2)`` (``||M_S||_F^2`` is exact). See docs/algorithms.md for
the proofs; the comments here only mark where numerics could break them and what guards
against it.

Usage pattern (the greedy driver's): ``state = est.start(seed_blocks)``, then for each candidate
``trial = state.extend(block)``; keep ``trial`` if ``trial.bound <= eps``. ``extend`` never
modifies ``state``, so a rejected candidate costs nothing to undo. ``state.prefixes(...)``
extends by the first p of several blocks taken together, for each p (the driver's groups).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from matclust import defaults
from matclust.engine.linalg import (
    EPS,
    as_compute,
    column_norms2,
    leading_directions,
    new_directions,
    project_out,
    relative_error,
    singular_values2,
    sqnorm,
    top_energy,
)

#: Safety margin for rounding in the estimators, as a multiple of r * eps_machine * ||M_S||^2.
#: It makes the bound robust to the last bits of floating point; it changes bounds by ~1e-14.
ROUNDING_MARGIN = 16.0
#: The 'residual' order measures candidates against all k = r + p tracked directions of the
#: seed when m >= this many times k, else against its top r (see order_directions).
ORDER_SPACE_FACTOR = 4
#: Rounding margin of a screened bound (see Screen), as a multiple of
#: (m + k) * eps_machine * ||M_S||^2.
SCREEN_MARGIN = 4.0


class _State:
    """Common face of an estimator's state: the cluster's norm, its energy bound and bound.

    ``extend(block, norm2=None, loss2=0.0)`` adds a block. The block may stand in for a matrix
    A (a summary whose concatenation with the others has singular values no larger than the
    real one's, see :mod:`matclust.sources.summary`): ``norm2`` is then ||A||_F^2 and ``loss2``
    the squared Frobenius distance of the block from such an exact stand-in. Mirsky's
    inequality turns the accumulated ``loss2`` into a correction that keeps the bound
    guaranteed.
    """

    rank: int
    norm2: float
    size: int
    loss2: float

    @property
    def energy(self) -> float:
        raise NotImplementedError

    @property
    def bound(self) -> float:
        """Guaranteed upper bound on the cluster's best rank-r relative error."""
        return bound_from(self.energy, self.rank, self.norm2, self.loss2)

    def extend(self, block: np.ndarray, norm2: float | None = None, loss2: float = 0.0) -> "_State":
        raise NotImplementedError

    def prefixes(self, block: np.ndarray, ends, norms2, loss2) -> "Prefixes":
        """The states after adding the first p of several blocks as one block, p = 1, 2, ...:
        see :class:`Prefixes`."""
        return Prefixes(self, block, ends, norms2, loss2)

    def order_basis(self) -> np.ndarray | None:
        """The orthonormal directions the 'residual' order measures candidates against (the
        top :func:`order_directions` left singular vectors of the blocks added so far), when
        the state tracks them exactly (None otherwise: the driver then takes the seed's top-r
        left singular vectors)."""
        return None

    def screen(self) -> "Screen | None":
        """A :class:`Screen` from this state (None when the estimator has none)."""
        return None


def bound_from(energy: float, rank: int, norm2: float, loss2: float) -> float:
    """The relative-error bound of a state with this energy lower bound (see _State)."""
    energy = energy - ROUNDING_MARGIN * rank * EPS * norm2
    if loss2 > 0.0:
        energy = max(0.0, np.sqrt(max(energy, 0.0)) - np.sqrt(loss2)) ** 2
    return relative_error(norm2, energy)


class Prefixes:
    """A state extended by the first p of several blocks taken together as one block, for each
    p: the driver tries a group of candidates at once and, when the group does not fit, looks
    for the longest prefix that does.

    ``block`` holds the blocks side by side, block i ending at column ``ends[i]``; ``norms2``
    and ``loss2`` are per block, as in ``_State.extend``. This generic form extends ``base``
    once per prefix asked for; estimators that can share the work between prefixes override
    :meth:`_state` and :meth:`bound`.
    """

    def __init__(self, base: _State, block: np.ndarray, ends, norms2, loss2):
        self.base = base
        self.block = block
        self.ends = np.asarray(ends, dtype=np.int64)
        self.norms2 = np.cumsum(norms2, dtype=np.float64)
        self.loss2 = np.cumsum(loss2, dtype=np.float64)
        self._states: dict[int, _State] = {}

    def __len__(self) -> int:
        return len(self.ends)

    def state(self, p: int) -> _State:
        """The state after the first p blocks (1 <= p <= len)."""
        if p not in self._states:
            self._states[p] = self._state(p)
        return self._states[p]

    def bound(self, p: int) -> float:
        """The bound of :meth:`state` (p); it may be computed without forming the state, and
        may then differ from the state's own in the last bits."""
        return self.state(p).bound

    def _state(self, p: int) -> _State:
        return self.base.extend(self.block[:, : self.ends[p - 1]], float(self.norms2[p - 1]),
                                float(self.loss2[p - 1]))


def order_directions(rank: int, keep: int, m: int) -> int:
    """How many of a seed's top left singular directions the 'residual' order measures
    candidates against, for an estimator tracking ``keep`` = r + p directions of m-row blocks.

    All k tracked directions (the paper's order) when they are a small part of the space: there
    they tell candidates that share the seed's structure beyond its top r from those that do not
    (PDE trajectories, 128 x 48 at r 8 + 5: compression ratio 6.59 with r, 7.22 with k). When
    k is a large part of it, most of any candidate lies inside them and the top r discriminate
    better (16 x 16 patches at r 4 + 5: 2.283 with r, 2.250 with k).
    """
    return keep if m >= ORDER_SPACE_FACTOR * keep else rank


class Estimator:
    """Base class: an estimator is its parameters; ``start`` makes a state from seed blocks."""

    name = "base"
    #: Columns worth adding in one update when several candidates are admitted together
    #: (0: one block at a time).
    group_columns = 0

    def __init__(self, rank: int):
        if rank < 1:
            raise ValueError("rank must be >= 1")
        self.rank = int(rank)
        #: How many of the seed's top directions the 'residual' order measures against (out
        #: of core, every summary keeps as many, so both modes order candidates alike).
        self.order_rank = self.rank

    def empty(self) -> _State:
        raise NotImplementedError

    def start(self, seed: Sequence[np.ndarray]) -> _State:
        state = self.empty()
        for block in seed:
            state = state.extend(block)
        return state

    def bound_of(self, blocks: Sequence[np.ndarray]) -> float:
        """Bound for a whole cluster, blocks fed in the given order (the first ones as seed)."""
        return self.start(blocks).bound

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank})"


# ---------------------------------------------------------------------------------------------
# Bound 1: Weyl (the paper's max-norm)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeylState(_State):
    rank: int
    norm2: float = 0.0
    size: int = 0
    packed: float = 0.0  # energy of the packed sub-collection T (<= rank columns)
    packed_cols: int = 0
    best: float = 0.0  # best energy bound from any single sub-collection seen
    loss2: float = 0.0

    @property
    def energy(self) -> float:
        return max(self.packed, self.best)

    def extend(self, block: np.ndarray, norm2: float | None = None, loss2: float = 0.0) -> "WeylState":
        n = block.shape[1]
        b2 = sqnorm(block)
        packed, cols, best = self.packed, self.packed_cols, self.best
        if cols + n <= self.rank and cols <= self.rank:
            # Any sub-collection with <= r columns keeps all of its energy at rank r.
            packed, cols = packed + b2, cols + n
        elif self.size == 0:
            # A first block wider than r: its own top-r energy (an SVD), not its full norm,
            # which would overstate E_r (the paper's public code does that).
            best = top_energy(singular_values2(as_compute(block)), self.rank)
            cols = self.rank + 1  # nothing can be packed beside it
        elif n <= self.rank:
            best = max(best, b2)
        return replace(self, norm2=self.norm2 + (b2 if norm2 is None else norm2),
                       size=self.size + 1, packed=packed, packed_cols=cols, best=best,
                       loss2=self.loss2 + loss2)


class WeylEstimator(Estimator):
    """Weyl's monotonicity bound: E_r(S) >= E_r(T) for the packed seed T. Needs only norms
    (plus one SVD when the seed block is wider than the rank)."""

    name = "weyl"

    def empty(self) -> WeylState:
        return WeylState(rank=self.rank)


# ---------------------------------------------------------------------------------------------
# Bound 2: incremental residuals (the paper's residuals)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResidualState(_State):
    rank: int
    q: np.ndarray
    sigma2: np.ndarray  # the r largest squared singular values of the residuals so far
    norm2: float = 0.0
    size: int = 0
    loss2: float = 0.0

    @property
    def energy(self) -> float:
        return float(np.sum(self.sigma2))

    def extend(self, block: np.ndarray, norm2: float | None = None, loss2: float = 0.0) -> "ResidualState":
        a = as_compute(block)
        q = self.q
        if q.dtype != a.dtype:  # real state, complex block (or the reverse): widen both
            a = a.astype(np.result_type(a, q))
            q = q.astype(a.dtype)
        a2 = sqnorm(a)
        resid = project_out(q, a)
        # Only the directions added to Q count: the pinching argument holds for the diagonal
        # blocks U_t^* A_t, whose singular values are exactly the kept ones.
        w, diag_block, _ = new_directions(resid, np.sqrt(a2), q.shape[0] - q.shape[1], q)
        merged = np.concatenate([self.sigma2, singular_values2(diag_block)])
        if len(merged) > self.rank:
            merged = np.sort(merged)[-self.rank :]
        return ResidualState(self.rank, np.hstack([q, w]) if w.shape[1] else q, merged,
                             self.norm2 + (a2 if norm2 is None else norm2), self.size + 1,
                             self.loss2 + loss2)


class ResidualEstimator(Estimator):
    """Pinching bound: the r largest squared singular values of the successive residuals."""

    name = "residual"

    def __init__(self, rank: int, m: int, complex_data: bool = False):
        super().__init__(rank)
        self.m = int(m)
        self.dtype = np.complex128 if complex_data else np.float64

    def empty(self) -> ResidualState:
        return ResidualState(self.rank, np.zeros((self.m, 0), self.dtype), np.zeros(0))


# ---------------------------------------------------------------------------------------------
# Estimator 3: incremental truncated SVD (the paper's approximate)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IncrementalState(_State):
    rank: int
    keep: int  # k = r + p tracked directions
    q: np.ndarray  # m x k', orthonormal
    lam: np.ndarray  # k', descending: Q diag(lam) Q^* <= M M^* (Loewner)
    norm2: float = 0.0
    size: int = 0
    slack: float = 0.0  # accumulated Loewner slack from directions dropped as numerically null
    loss2: float = 0.0

    @property
    def energy(self) -> float:
        return float(np.sum(self.lam[: self.rank])) - self.rank * self.slack

    def extend(self, block: np.ndarray, norm2: float | None = None, loss2: float = 0.0) -> "IncrementalState":
        norm2 = sqnorm(block) if norm2 is None else norm2
        return _IncrementalPrefixes(self, block, [block.shape[1]], [norm2], [loss2]).state(1)

    def prefixes(self, block, ends, norms2, loss2) -> "Prefixes":
        return _IncrementalPrefixes(self, block, ends, norms2, loss2)

    def _slack_after(self, anorm: float, dropped: float) -> float:
        # Dropping a residual of spectral size d perturbs the Gram by at most 2||A|| d + d^2;
        # charging it to every one of the r energies keeps L a guaranteed lower bound.
        return self.slack + (2.0 * anorm * dropped + dropped**2 if dropped else 0.0)

    def _top(self, eig) -> tuple[np.ndarray, np.ndarray]:
        """The k largest eigenpairs of an eigh result (ascending), descending, clipped at 0."""
        mu, v = eig
        top = np.arange(len(mu) - 1, max(len(mu) - self.keep, 0) - 1, -1)
        return np.clip(mu[top], 0.0, None), v[:, top]

    def screen(self) -> "Screen":
        return Screen(self)

    def order_basis(self) -> np.ndarray | None:
        # After one update from empty, Q diag(lam) Q^* is the block's Gram up to directions
        # dropped as numerically null, so the leading columns are its top singular vectors.
        # Those dropped are the smallest: with r columns kept they are not among the top r.
        if self.size != 1 or not self.q.shape[1] or (self.slack and self.q.shape[1] < self.rank):
            return None
        wanted = order_directions(self.rank, self.keep, self.q.shape[0])
        return self.q[:, : min(wanted, int(np.count_nonzero(self.lam > 0)) or 1)]


class _IncrementalPrefixes(Prefixes):
    """Prefixes of a group for the incremental estimator, sharing one factorisation of the
    whole group: the first p blocks' Gram in an orthonormal basis F of span [Q, group] is
    G_0 + Z_p Z_p^*, G_0 the state's Gram and Z_p the coordinates of their columns. Its top-r
    eigenvalues alone (eigvalsh) give a prefix's bound; the eigenvectors are computed only for
    the state that is kept.
    """

    def __init__(self, base: "IncrementalState", block, ends, norms2, loss2):
        super().__init__(base, block, ends, norms2, loss2)
        a, q = as_compute(block), base.q
        if q.dtype != a.dtype:  # real state, complex block (or the reverse): widen both
            a = a.astype(np.result_type(a, q))
            q = q.astype(a.dtype)
        self.a, self.q = a, q
        # ||A_p||_F of each prefix: the scale of what may be dropped, and of the slack.
        column2 = np.cumsum(column_norms2(a)) if a.shape[1] else np.zeros(1)
        self.anorms = np.sqrt(column2[np.maximum(self.ends - 1, 0)])
        m, k1 = q.shape
        if m <= k1 + a.shape[1]:
            # The full space is no larger than [Q, new directions]: the top k of
            # Q diag(lam) Q^* + A_p A_p^* directly. Nothing is dropped, and no SVD is needed.
            self.mode, self.tracked = "full", (q * base.lam) @ q.conj().T
        elif not k1 and a.shape[1]:
            # From empty, G is diagonal in the block's own left singular vectors: they and
            # their squared singular values are the state, with nothing to rotate.
            self.mode = "empty"
        elif a.shape[1] >= max(k1, 1):
            # One Householder QR of [Q, A] = F R: F's first k1 columns span Q (Q = F_1 T, T
            # upper triangular and orthogonal) and the others are orthonormal to them to
            # working precision whatever A's numerical rank, so every new direction is kept and
            # nothing is dropped. In the basis F the first p blocks' Gram is
            # T diag(lam) T^* + Z_p Z_p^*, Z = R's last columns. It costs about m (k1 + c)^2,
            # the projections below m k1 c plus an SVD of the m x c residual, and a QR when
            # its smallest directions lean into span(Q) (most updates on smooth data): for
            # 128 x 48 PDE blocks 0.16 ms against 0.42 ms + 0.13 ms, but for 8 MiniLM columns
            # against k1 = 37 0.45 ms against 0.10 ms; hence this path from c >= k1 on.
            self.mode = "projected"
            self.f, r = np.linalg.qr(np.hstack([q, a]))
            t = r[:k1, :k1]
            self.tracked = np.zeros_like(r, shape=(r.shape[0],) * 2)
            self.tracked[:k1, :k1] = (t * base.lam) @ t.conj().T
            self.z, self.dropped = r[:, k1:], 0.0
        else:
            self.mode = "projected"
            qh = q.conj().T
            y = qh @ a
            resid = a - q @ y
            y2 = qh @ resid  # second projection: keeps [Q, W] orthonormal
            resid -= q @ y2
            y += y2
            # Directions are dropped relative to the whole group's norm; what a prefix's
            # columns have outside W is no larger than the group's (a column subset).
            self.w, b, self.dropped = new_directions(resid, self.anorms[-1], m - k1, q)
            self.f = None  # [Q, W], formed only for a state that is kept
            self.z = np.vstack([y, b])  # A = [Q, W] Z up to the dropped part
            lam = np.concatenate([base.lam, np.zeros(self.w.shape[1])])
            self.tracked = np.diag(lam).astype(y.dtype)

    def _gram(self, p: int) -> np.ndarray:
        z = (self.a if self.mode == "full" else self.z)[:, : self.ends[p - 1]]
        return self.tracked + z @ z.conj().T

    def _slack(self, p: int) -> float:
        dropped = self.dropped if self.mode == "projected" else 0.0
        return self.base._slack_after(float(self.anorms[p - 1]), dropped)

    def bound(self, p: int) -> float:
        if p in self._states or self.mode == "empty":
            return self.state(p).bound
        base = self.base
        mu = np.linalg.eigvalsh(self._gram(p))
        energy = float(np.sum(np.clip(mu[::-1][: base.rank], 0.0, None))) - base.rank * self._slack(p)
        return bound_from(energy, base.rank, base.norm2 + float(self.norms2[p - 1]),
                          base.loss2 + float(self.loss2[p - 1]))

    def _state(self, p: int) -> "IncrementalState":
        base = self.base
        if self.mode == "empty":
            a = self.a[:, : self.ends[p - 1]]
            w, s, dropped = leading_directions(a, float(self.anorms[p - 1]), a.shape[0])
            top = min(base.keep, len(s))
            basis, lam = w[:, :top], s[:top] ** 2
            slack = base._slack_after(float(self.anorms[p - 1]), dropped)
        else:
            lam, v = base._top(np.linalg.eigh(self._gram(p)))
            k1 = self.q.shape[1]
            if self.mode == "full":
                basis = v
            elif self.f is not None:
                basis = self.f @ v
            else:
                basis = self.q @ v[:k1] + self.w @ v[k1:] if self.w.shape[1] else self.q @ v
            slack = self._slack(p)
        return IncrementalState(base.rank, base.keep, basis, lam,
                                base.norm2 + float(self.norms2[p - 1]), base.size + 1, slack,
                                base.loss2 + float(self.loss2[p - 1]))


class Screen:
    """Blocks admitted to a cluster without an update of its incremental state.

    Let Q (orthonormal, k columns) and lam be the state's tracked directions and energies, so
    that Q diag(lam) Q^* <= M M^* (up to the state's slack). For blocks A_1..A_j added since,
    the k x k matrix diag(lam) + sum_i Y_i Y_i^*, Y_i = Q^* A_i, is Q^* (Q diag(lam) Q^* +
    sum_i A_i A_i^*) Q <= Q^* M M^* Q (M now with the A_i), and the sum of its top r eigenvalues
    is at most E_r(M) (Ky Fan: a compression has no larger top-r sum). So that sum, less the
    state's slack, is a lower bound on the cluster's top-r energy that costs a k x m by m x n
    product and a k x k eigenvalue problem per block, instead of a QR and an eigendecomposition
    of k + n. It misses only what the blocks have outside span(Q).

    The driver screens candidates while this bound admits them; the first one it does not
    admit is tried with one update by every held block and itself (:meth:`fold`), a group
    update, which bounds at least as tightly as updates one block at a time.
    """

    def __init__(self, state: "IncrementalState"):
        self.state = state
        self.q = state.q
        self.gram = np.diag(state.lam).astype(state.q.dtype)
        self.blocks: list[np.ndarray] = []
        self.norms2: list[float] = []
        self.loss2: list[float] = []
        self.margin2 = 0.0  # the blocks' squared norms, the scale of the products' rounding
        self._bound: float | None = None  # None: no block admitted yet

    def __bool__(self) -> bool:
        return bool(self.blocks)

    def admits(self, block: np.ndarray, norm2: float, loss2: float, eps: float) -> bool:
        """Whether ``block`` joins on the screen; it is held for :meth:`fold` either way."""
        a, q, state = as_compute(block), self.q, self.state
        if q.dtype != a.dtype:  # real state, complex block (or the reverse): widen both
            a = a.astype(np.result_type(a, q))
            q = self.q = q.astype(a.dtype)
            self.gram = self.gram.astype(a.dtype)
        y = q.conj().T @ a
        self.gram = self.gram + y @ y.conj().T
        self.blocks.append(block)
        self.norms2.append(norm2)
        self.loss2.append(loss2)
        self.margin2 += sqnorm(a)
        mu = np.linalg.eigvalsh(self.gram)[::-1][: state.rank]
        # The products and the eigenvalues round by ~(m + k) eps times the blocks' energy;
        # charged generously, on top of every bound's own margin.
        rounding = SCREEN_MARGIN * (q.shape[0] + q.shape[1]) * EPS * (self.margin2 + state.norm2)
        energy = float(np.sum(np.clip(mu, 0.0, None))) - state.rank * state.slack - rounding
        bound = bound_from(energy, state.rank, state.norm2 + sum(self.norms2),
                           state.loss2 + sum(self.loss2))
        if bound > eps:
            return False
        self._bound = bound
        return True

    def fold(self) -> Prefixes:
        """The state extended by every held block (the last one not admitted) as one group."""
        ends = np.cumsum([b.shape[1] for b in self.blocks])
        return self.state.prefixes(np.hstack(self.blocks), ends, self.norms2, self.loss2)

    @property
    def bound(self) -> float:
        """The bound of the state with the admitted blocks."""
        return self.state.bound if self._bound is None else self._bound


#: Columns added at once in the full-space regime, per row of the blocks.
GROUP_ROWS_FACTOR = 16


class IncrementalEstimator(Estimator):
    """Incremental truncated SVD tracking k = rank + oversampling directions (Loewner bound)."""

    name = "incremental"

    def __init__(self, rank: int, m: int, complex_data: bool = False,
                 oversampling: int = defaults.OVERSAMPLING):
        super().__init__(rank)
        if oversampling < 0:
            raise ValueError("oversampling must be >= 0")
        self.m = int(m)
        self.oversampling = int(oversampling)
        self.dtype = np.complex128 if complex_data else np.float64
        # Blocks are cheaper to add together: one eigh of a (k + c) x (k + c) matrix instead of
        # one per block. Up to 4k columns at once measured best (14,158 RGB patches at rank 20:
        # 1.26 s with k columns, 0.77 s with 4k, 0.71 s with 8k; planted 32 x 16 blocks: no loss).
        # When m is that small the update works in the full space, whose cost barely grows
        # with the group: then up to GROUP_ROWS_FACTOR * m columns.
        keep = self.rank + self.oversampling
        self.order_rank = order_directions(self.rank, keep, self.m)
        self.group_columns = 4 * keep if self.m > 4 * keep else max(4 * keep, GROUP_ROWS_FACTOR * self.m)

    def empty(self) -> IncrementalState:
        return IncrementalState(self.rank, self.rank + self.oversampling,
                                np.zeros((self.m, 0), self.dtype), np.zeros(0))


METHODS = {"weyl": WeylEstimator, "residual": ResidualEstimator, "incremental": IncrementalEstimator}
ALIASES = {"approximate": "incremental", "residuals": "residual", "max_norm": "weyl"}


def canonical_method(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(name)
    return key


def make_estimator(method: str, rank: int, m: int, complex_data: bool = False,
                   oversampling: int = defaults.OVERSAMPLING) -> Estimator:
    """The estimator for a method name (paper aliases accepted)."""
    key = canonical_method(method)
    if key == "weyl":
        return WeylEstimator(rank)
    if key == "residual":
        return ResidualEstimator(rank, m, complex_data)
    return IncrementalEstimator(rank, m, complex_data, oversampling)
