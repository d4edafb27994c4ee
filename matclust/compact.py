"""The compact encoding (store format matclust/2): what each formed cluster becomes on disk.

A cluster formed by the greedy driver (its truncation error within ``TRUNCATION_SHARE`` of the
error budget, see :func:`formation_eps`) is stored with its basis rounded to
:func:`~matclust.engine.budget.basis_dtype_for`, least-squares coefficients against the rounded
basis, and integer codes with a step per matrix that spends what is left of the budget
(:mod:`matclust.engine.budget`). With ``guarantee="matrix"`` a member whose own truncation
error leaves too little of its budget is *evicted* and stored alone; a matrix stored alone gets
its own rank (or its raw entries quantised), whichever is estimated smallest. Every encoding
is checked on decoded values before it is accepted.

The layout on disk is in docs/format.md; :class:`CompactWriter` writes it and
:class:`CompactReader` decodes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from matclust.engine import budget as qb
from matclust.engine.linalg import (column_norms2, columns_of, compute_dtype, relative_errors,
                                    times_power2)

log = logging.getLogger(__name__)

GUARANTEES = ("matrix", "cluster")
ENCODINGS = ("compact", "plain")
#: Share of eps^2 ||A||^2 a cluster's truncation may use when clusters are formed for the
#: compact encoding: clusters are formed at sqrt(0.81) eps = 0.9 eps, the rest of the budget
#: goes to quantisation. (bench/compression.py measures the trade-off.)
TRUNCATION_SHARE = 0.81
#: A member stays in its cluster while its own truncation uses at most this share of its
#: budget (a little above TRUNCATION_SHARE: the rounded basis adds a little).
EVICT_SHARE = 0.9
#: Zstd level of the compressed arrays (levels above ~10 gained < 1 % on the bench collections).
ZSTD_LEVEL = 7
#: Codes per chunk of the codes array.
CODE_CHUNK = 1 << 20


def formation_eps(eps: float, encoding: str) -> float:
    """The error the greedy driver forms clusters at: eps for plain storage; less for the
    compact encoding, which keeps part of the budget for quantisation."""
    return eps * float(np.sqrt(TRUNCATION_SHARE)) if encoding == "compact" else eps


def max_code_bound(eps: float, max_count: int) -> float:
    """An upper bound on |code| of any encoding :func:`matclust.engine.budget.quantise` can
    accept for matrices of at most ``max_count`` codes: |C_i| <= ||A_i|| (1 + 1e-2), and the
    smallest step it may try is 2^-4.07 times the safe step 2 sqrt(b_i / count), where every
    budget b_i >= (1 - EVICT_SHARE) eps^2 ||A_i||^2 (per matrix, or shared in proportion to
    the squared norms from a cluster that keeps that share).

    Note the encoder keeps 4 units of the output precision off eps; negligible here."""
    return 1.01 * 2 ** (4 + 1 / 16) * np.sqrt(max_count / ((1 - EVICT_SHARE) * eps * eps)) / 2 + 2


@dataclass
class StoredGroup:
    """One stored cluster: members (ascending input indices), the rounded basis (None: raw
    entries), the quantised codes, and its statistics."""

    members: np.ndarray
    widths: np.ndarray
    basis: np.ndarray | None
    quantised: qb.Quantised
    bound: float
    basis_norms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: The group was encoded scaled by 2^-shift (a matrix alone); norms are scaled back.
    shift: int = 0

    @property
    def rank(self) -> int:
        return 0 if self.basis is None else self.basis.shape[1]

    @property
    def norm2(self) -> float:
        return float(self.quantised.norm2.sum())

    @property
    def norm(self) -> float:
        """||M||_F of the stored members, in the input's scale."""
        return float(np.ldexp(np.sqrt(self.norm2), self.shift))

    @property
    def error(self) -> float:
        total = self.norm2
        return float(np.sqrt(self.quantised.err2.sum() / total)) if total > 0 else 0.0

    @property
    def matrix_errors(self) -> np.ndarray:
        return relative_errors(self.quantised.err2, self.quantised.norm2)


@dataclass
class AloneBatch:
    """Matrices each stored alone (a cluster of its own), as arrays over the batch instead of
    one :class:`StoredGroup` apiece (thousands come at once: per-matrix objects were a fifth
    of the RGB patches' encoding time). Matrix j: ``codes[code_offsets[j]:code_offsets[j+1]]``
    as stored (:func:`matclust.engine.budget.flatten_codes`), its step exponent, its norms and
    errors in its own scale 2^shifts[j], and ``bases[j]`` (None: its DCT coefficients)."""

    members: np.ndarray
    widths: np.ndarray
    exponents: np.ndarray
    shifts: np.ndarray
    norm2: np.ndarray
    err2: np.ndarray
    codes: np.ndarray
    code_offsets: np.ndarray
    bases: list
    basis_norms: list

    def __len__(self) -> int:
        return len(self.members)

    @property
    def bounds(self) -> np.ndarray:
        """Each matrix's own relative error (its cluster's bound)."""
        return relative_errors(self.err2, self.norm2, if_zero=0.0)

    @classmethod
    def of(cls, groups: list[StoredGroup], complex_data: bool) -> "AloneBatch":
        """The batch of groups of one matrix each."""
        flats = [qb.flatten_codes(g.quantised.codes, g.basis is None, complex_data)
                 for g in groups]
        sizes = np.fromiter((f.size for f in flats), np.int64, len(flats))
        return cls(
            np.fromiter((int(g.members[0]) for g in groups), np.int64, len(groups)),
            np.fromiter((int(g.widths[0]) for g in groups), np.int64, len(groups)),
            np.fromiter((int(g.quantised.exponents[0]) for g in groups), np.int16, len(groups)),
            np.fromiter((g.shift for g in groups), np.int64, len(groups)),
            np.fromiter((float(g.quantised.norm2[0]) for g in groups), float, len(groups)),
            np.fromiter((float(g.quantised.err2[0]) for g in groups), float, len(groups)),
            np.concatenate(flats) if flats else np.zeros(0, np.int64),
            np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            [g.basis for g in groups],
            [np.asarray(g.basis_norms, float) if g.basis is not None else None for g in groups])

    def groups(self, m: int, complex_data: bool) -> list[StoredGroup]:
        """One :class:`StoredGroup` per matrix (the API's results without a store)."""
        out = []
        bounds = self.bounds
        for j in range(len(self)):
            basis, n = self.bases[j], int(self.widths[j])
            flat = self.codes[self.code_offsets[j]: self.code_offsets[j + 1]]
            rows = m if basis is None else basis.shape[1]
            q = qb.Quantised(qb.unflatten_codes(flat, rows, n, basis is None, complex_data),
                             self.exponents[j: j + 1].copy(), self.err2[j: j + 1].copy(),
                             self.norm2[j: j + 1].copy())
            group = StoredGroup(self.members[j: j + 1].copy(), self.widths[j: j + 1].copy(),
                                basis, q, float(bounds[j]), shift=int(self.shifts[j]))
            if basis is not None:
                group.basis_norms = self.basis_norms[j]
            out.append(group)
        return out


class CompactEncoder:
    """Encodes formed clusters and lone matrices (see the module docstring).

    Parameters
    ----------
    eps : float
        The guarantee's relative error bound.
    guarantee : {"matrix", "cluster"}
    rank : int
        The largest rank of any basis.
    m : int
        Rows of every matrix.
    storage_dtype : numpy dtype
        What reconstruct writes; its rounding is left room below eps.
    """

    def __init__(self, eps: float, guarantee: str, rank: int, m: int, storage_dtype):
        self.guarantee = guarantee
        self.rank = int(rank)
        self.m = int(m)
        storage_dtype = np.dtype(storage_dtype)
        self.complex = storage_dtype.kind == "c"
        self.basis_dtype = qb.basis_dtype_for(eps, self.complex)
        # reconstruct rounds to the output precision: leave that room (a few units of it).
        self.eps = float(eps) - 4 * float(np.finfo(storage_dtype).eps)
        #: The largest |code| the store's code dtype holds (set by the sink).
        self.max_code = np.iinfo(np.int64).max

    # -- one formed cluster -------------------------------------------------------------
    def rounded(self, basis: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(basis.astype(self.basis_dtype))

    def encode_cluster(self, members: np.ndarray, data: np.ndarray, offsets: np.ndarray,
                       basis: np.ndarray | None, bound: float | None,
                       whole: bool = True) -> tuple[StoredGroup | None, list[StoredGroup]]:
        """``members`` ascending, ``data`` their columns side by side (``offsets``), ``basis``
        the cluster's exact top-r basis or None (not worth factoring). Returns the cluster's
        stored group (None when no member stays in it) and the (index, columns) of the members
        left over, for :meth:`encode_many` or :meth:`encode_pool`. With ``whole=False`` the members are one part of a cluster (out of
        core: one input batch's share), whose group stays even with one member; with the
        cluster guarantee each part then meets eps on its own."""
        data = np.asarray(data, dtype=compute_dtype(data.dtype))
        if basis is None or (whole and len(members) < 2):
            return None, [(int(i), data[:, offsets[j]: offsets[j + 1]])
                          for j, i in enumerate(members)]
        rounded = basis if basis.dtype == self.basis_dtype else self.rounded(basis)
        coeffs, trunc2 = qb.truncation(rounded, data, offsets)
        norm2 = qb.per_matrix(column_norms2(data), offsets)
        keep = self.keeps(data, offsets, norm2, trunc2)
        if whole and keep.sum() < 2:
            keep[:] = False
        kept = np.flatnonzero(keep)
        group = None
        if len(kept):
            if len(kept) == len(members):  # all of them: no copies
                sub_data, sub_coeffs, sub_offsets = data, coeffs, np.asarray(offsets, np.int64)
            else:
                cols = columns_of(offsets, kept)
                sub_data, sub_coeffs = data[:, cols], coeffs[:, cols]
                sub_offsets = np.concatenate([[0], np.cumsum(np.diff(offsets)[kept])]).astype(np.int64)
            sub_trunc2 = trunc2[kept]
            # Per-matrix budgets first, with either guarantee (every per-matrix encoding meets
            # the cluster guarantee too, so that one never needs more bytes); the cluster
            # guarantee falls back to sharing the cluster's budget where a member's own is spent.
            q = qb.quantise(rounded, sub_data, sub_offsets, self.eps, "matrix", sub_coeffs,
                            sub_trunc2)
            if self.guarantee == "cluster":
                # One step for the whole cluster where it costs fewer bits (matrices of very
                # different norms: the small ones then cost almost nothing).
                one = qb.quantise(rounded, sub_data, sub_offsets, self.eps, "uniform",
                                  sub_coeffs, sub_trunc2)
                if one is not None and np.abs(one.codes).max(initial=0) <= self.max_code and (
                        q is None or code_bits(one) < code_bits(q)):
                    q = one
                if q is None:
                    q = qb.quantise(rounded, sub_data, sub_offsets, self.eps, "proportional",
                                    sub_coeffs, sub_trunc2)
            if q is None:
                keep[:] = False
            else:
                # The energy captured along each stored direction (later merges use it).
                rows2 = np.sum(np.abs(sub_coeffs) ** 2, axis=1)
                group = StoredGroup(members[kept], np.diff(sub_offsets), rounded, q,
                                    max(float(bound or 0.0), 0.0), np.sqrt(rows2))
        return group, [(int(members[j]), data[:, offsets[j]: offsets[j + 1]])
                       for j in np.flatnonzero(~keep)]

    def keeps(self, data, offsets, norm2, trunc2) -> np.ndarray:
        """Which members stay in their cluster (the others are evicted): their truncation
        leaves enough of the budget (matrix guarantee), or, for the cluster guarantee, all but
        the members worst off until the cluster's truncation leaves enough of its budget."""
        eps2 = self.eps * self.eps
        # A non-zero matrix whose squared norm underflows (or nearly) cannot share a budget
        # computed in this scale; alone, it is rescaled.
        tiny = norm2 < qb.TINY_NORM2
        nonzero = qb.per_matrix(np.count_nonzero(data, axis=0).astype(np.float64), offsets) > 0
        keep = ~(tiny & nonzero)
        if self.guarantee == "matrix":
            return keep & (trunc2 <= EVICT_SHARE * eps2 * norm2)
        # cluster: drop the members worst off until the cluster leaves room for quantisation
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(norm2 > 0, trunc2 / np.where(norm2 > 0, norm2, 1), 0.0)
        for j in np.argsort(-rel, kind="stable"):
            if trunc2[keep].sum() <= EVICT_SHARE * eps2 * norm2[keep].sum():
                break
            keep[j] = False
        return keep

    # -- one matrix alone ------------------------------------------------------------------
    def encode_many(self, items) -> AloneBatch:
        """Matrices ``(index, block)`` each stored alone, at its own rank or by its DCT
        coefficients (:func:`matclust.engine.budget.own_ranks` picks the one estimated
        smaller). Each is rescaled by a power of two first, so that neither its norm nor its
        budget under- or overflows; its step absorbs the scale exactly. The DCT ones are
        quantised together (one vectorised step search instead of one per matrix). Returns
        them in the order of ``items``."""
        B = len(items)
        indices = np.fromiter((int(i) for i, _ in items), np.int64, B)
        parts = 2 if self.complex else 1
        widths = np.zeros(B, np.int64)
        exponents = np.full(B, qb.ZERO_STEP, np.int16)  # zero matrices keep these
        shifts, norm2, err2 = np.zeros(B, np.int64), np.zeros(B), np.zeros(B)
        flats: list = [None] * B
        bases: list = [None] * B
        basis_norms: list = [None] * B
        by_shape: dict[tuple, list[int]] = {}
        for pos, (_, block) in enumerate(items):
            by_shape.setdefault(block.shape, []).append(pos)
        for shape, positions in by_shape.items():
            positions = np.array(positions, dtype=np.int64)
            stack = np.stack([items[p][1] for p in positions])  # to double precision at once
            stack = stack.astype(compute_dtype(stack.dtype), copy=False)
            peaks = np.abs(stack).reshape(len(positions), -1).max(axis=1)
            shape_shifts = np.where(peaks > 0, np.frexp(peaks)[1], 0).astype(np.int64)
            scaled = times_power2(stack, -shape_shifts[:, None, None])
            widths[positions] = shape[1]
            shifts[positions] = shape_shifts
            # One batched SVD and DCT for all matrices of this shape.
            u, s, vt = np.linalg.svd(scaled, full_matrices=False)
            dct_side = qb.to_dct_side_by_side(scaled)  # (m, B n)
            dct = dct_side.reshape(shape[0], len(positions), shape[1]).transpose(1, 0, 2)
            ranks = qb.own_ranks(s, vt, dct, self.eps, self.rank, EVICT_SHARE,
                                 self.basis_dtype.itemsize)
            zero = np.flatnonzero(peaks == 0)
            if len(zero):
                flats_zero = np.zeros(self.m * parts * shape[1], np.int64)
                for j in zero:
                    flats[positions[j]] = flats_zero
            raw = []  # positions in this shape's stack stored by their DCT coefficients
            for j in np.flatnonzero((peaks > 0) & (ranks > 0)):
                k, pos = int(ranks[j]), positions[j]
                basis = np.ascontiguousarray(u[j, :, :k].astype(self.basis_dtype))
                q = qb.quantise(basis, scaled[j], np.array([0, shape[1]]), self.eps)
                if q is None:
                    raw.append(j)
                    continue
                exponents[pos] = qb.shifted_steps(q.exponents, shape_shifts[j])[0]
                norm2[pos], err2[pos] = q.norm2[0], q.err2[0]
                flats[pos] = qb.flatten_codes(q.codes, False, self.complex)
                bases[pos], basis_norms[pos] = basis, s[j, :k]  # in the matrix's own scale
            raw = np.sort(np.concatenate([np.flatnonzero((peaks > 0) & (ranks == 0)),
                                          np.array(raw, dtype=np.int64)]))
            if len(raw) == len(positions):  # all of them (their DCTs as computed)
                self._dct_batch(positions, indices, scaled, dct, shape_shifts, exponents,
                                norm2, err2, flats)
            elif len(raw):
                self._dct_batch(positions[raw], indices, scaled[raw], dct[raw],
                                shape_shifts[raw], exponents, norm2, err2, flats)
        sizes = np.fromiter((f.size for f in flats), np.int64, B)
        return AloneBatch(indices, widths,
                          exponents, shifts, norm2, err2,
                          np.concatenate(flats) if B else np.zeros(0, np.int64),
                          np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                          bases, basis_norms)

    def _dct_batch(self, positions, indices, scaled, dct, shifts, exponents, norm2, err2,
                   flats) -> None:
        """Matrices of one shape by their DCT coefficients: one step search for all, then
        every one checked on its decoded matrix (one batched inverse DCT); their results go
        to ``positions`` of the other arguments (see :meth:`encode_many`)."""
        B, (m, n) = len(positions), scaled.shape[1:]
        side_by_side = dct.transpose(1, 0, 2).reshape(m, B * n)
        offsets = np.arange(0, B * n + 1, n, dtype=np.int64)
        q = qb.quantise(None, side_by_side, offsets, self.eps)
        ok = np.zeros(B, dtype=bool)
        if q is not None:
            values = q.codes * np.repeat(qb.step_values(q.exponents), n)
            if self.complex:
                values = values[:m] + 1j * values[m:]
            decoded = qb.from_dct_side_by_side(values, n)
            decoded -= scaled.transpose(1, 0, 2).reshape(m, B * n)  # the sign keeps the norm
            decoded_err2 = qb.per_matrix(column_norms2(decoded), offsets)
            codes = q.codes.reshape(q.codes.shape[0], B, n).transpose(1, 0, 2)  # (B, rows, n)
            ok = decoded_err2 <= self.eps ** 2 * q.norm2
            good = positions[ok]
            exponents[good] = qb.shifted_steps(q.exponents[ok], shifts[ok])
            norm2[good], err2[good] = q.norm2[ok], decoded_err2[ok]
            # Stored order (flatten_codes) for all at once: each part's entries in dct_scan order.
            scan = qb.dct_scan(m, n)
            kept = codes[ok]
            parts = [kept[:, :m], kept[:, m:]] if self.complex else [kept]
            flat = np.concatenate([p.reshape(len(kept), m * n)[:, scan] for p in parts], axis=1)
            for pos, row in zip(good, flat):
                flats[pos] = row
        for t in np.flatnonzero(~ok):  # the transform's rounding tipped it over: lower the target
            pos = positions[t]
            one = self._dct_codes(int(indices[pos]), scaled[t], dct[t], np.array([0, n]))
            exponents[pos] = qb.shifted_steps(one.exponents, shifts[t])[0]
            norm2[pos], err2[pos] = one.norm2[0], one.err2[0]
            flats[pos] = qb.flatten_codes(one.codes, True, self.complex)

    def _dct_codes(self, index: int, block: np.ndarray, dct: np.ndarray, offsets,
                   allocation: str = "matrix") -> qb.Quantised:
        """Codes of the DCT coefficients of one matrix (or of several side by side, each
        transformed on its own). The transform keeps Frobenius norms, so the coefficients'
        error is the matrices'; the decoded matrices are checked all the same, and the target
        lowered a little should the transform's rounding ever tip one over."""
        target = self.eps
        for _ in range(8):
            q = qb.quantise(None, dct, offsets, target, allocation)
            if q is None:  # cannot happen: the raw safe step bounds every entry's rounding
                break
            steps = qb.step_values(q.exponents)
            err2 = np.array([float(np.sum(np.abs(
                block[:, a:b] - qb.decode(None, q.codes[:, a:b], steps[j], self.complex)) ** 2))
                for j, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))])
            allowed = self.eps ** 2 * q.norm2
            if (np.all(err2 <= allowed) if allocation == "matrix"
                    else err2.sum() <= allowed.sum()):
                q.err2 = err2
                return q
            target *= 0.999
        raise RuntimeError(f"matrix {index}: no encoding met eps")

    def encode_pool(self, members: np.ndarray, blocks: list[np.ndarray]) -> StoredGroup:
        """Matrices that join no factored cluster, under the cluster guarantee: one raw group
        of DCT coefficients with one step, its total error within eps (the weaker guarantee
        lets the budget go where it buys the most, as a whole-collection compressor would)."""
        data = np.hstack([np.asarray(b, dtype=compute_dtype(b.dtype)) for b in blocks])
        widths = np.array([b.shape[1] for b in blocks], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        dct = np.hstack([qb.to_dct(data[:, a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
        q = self._dct_codes(int(members[0]), data, dct, offsets, "uniform")
        if np.abs(q.codes).max(initial=0) > self.max_code:  # keep within the codes' dtype
            q = self._dct_codes(int(members[0]), data, dct, offsets, "proportional")
        group = StoredGroup(np.asarray(members, dtype=np.int64), widths, None, q, 0.0)
        group.bound = group.error
        return group


def code_bits(q: qb.Quantised) -> float:
    """Estimated bits of a group's codes (:func:`matclust.engine.budget.estimated_bits`)."""
    return qb.estimated_bits(q.codes, 1.0)
