"""The compact encoding's numerics: spend each matrix's error budget on quantisation.

A group of matrices that share a basis U (a cluster, or one matrix with its own basis) is
stored as a rounded basis U~ (``basis_dtype``), and per matrix integer codes Z_i and a step
h_i, so that A_i is decoded as U~ (h_i Z_i). With C_i the least-squares coefficients against
U~ and R_i = A_i - U~ C_i (orthogonal to range U~),

    ||A_i - U~ h_i Z_i||^2 = ||R_i||^2 + ||U~ (C_i - h_i Z_i)||^2,

so what truncation leaves of eps^2 ||A_i||^2 is the budget of the quantisation error. A uniform
quantiser with step h adds about h^2 / 12 per coefficient; the step is chosen from that and then
*checked on the decoded values*: the estimate is only a starting point (with a rounded basis it
is off by up to a few per cent). A step that fails is lowered; a step of 2 sqrt(budget / count)
/ sigma_max(U~) can never fail (every coefficient moves by at most h/2), which ends the search.
The search itself compares errors predicted from the coefficients by the identity above (exact
but for rounding, and far cheaper than decoding); only the steps it settles on are decoded and
checked (:class:`_GroupErrors`).
Without a basis ("raw") the matrix's entries themselves are quantised, with the same rules.

Steps lie on the grid 2^(e/16) and are stored as the integer e (int16), which covers every
float64 magnitude; ``ZERO_STEP`` marks a matrix decoded as exactly zero. Codes are stored
zig-zag mapped to unsigned integers (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...), so that small
codes have zero high bytes whatever their sign, which byte shuffling and zstd then remove.

Budgets are per matrix (each decoded matrix within eps of itself), or, for the cluster
guarantee, the group's budget shared out in proportion to the members' squared norms.

Pure numpy, no I/O. The arguments are written out in docs/format.md and docs/algorithms.md.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from matclust.engine.linalg import column_norms2, columns_of, compute_dtype

#: Steps are 2^(e / STEP_GRID): a step is never more than 4.4 % below the one asked for.
STEP_GRID = 16
ZERO_STEP = np.iinfo(np.int16).min
#: The first step asks for this share of the budget (h^2 / 12 per coefficient is an average;
#: bench/: 0.95 passes the decoded check for >99 % of matrices on the bench collections).
FIRST_STEP_SHARE = 0.95
#: Lower a failing step this many grid notches at a time, at most MAX_NOTCHES times, before
#: falling back to the step that cannot fail.
NOTCH = 4
MAX_NOTCHES = 3
#: How far above the first step a step may grow when its matrix has budget to spare (2^2).
GROW_RANGE = 2 * STEP_GRID
#: A matrix whose squared norm is below this (after the collection's scaling) is not encoded
#: with others: its budget would underflow. It is encoded alone, rescaled by a power of two.
TINY_NORM2 = 2.0 ** -900


def basis_dtype_for(eps: float, complex_data: bool) -> np.dtype:
    """Precision of a stored basis: float16 perturbs the subspace by ~5e-4, a small part of any
    eps >= 0.01 (and the least-squares coefficients absorb part of it); finer eps need more."""
    if eps >= 0.01 and not complex_data:
        return np.dtype(np.float16)
    if eps >= 1e-5:
        return np.dtype(np.complex64 if complex_data else np.float32)
    return np.dtype(np.complex128 if complex_data else np.float64)


def step_values(exponents: np.ndarray) -> np.ndarray:
    """The steps 2^(e/16) of stored exponents (0 where e is ZERO_STEP)."""
    e = np.asarray(exponents, dtype=np.int64)
    out = np.exp2(e / STEP_GRID)
    out[e == ZERO_STEP] = 0.0
    return out


def step_exponents(steps: np.ndarray) -> np.ndarray:
    """The largest grid exponents whose step does not exceed ``steps`` (> 0)."""
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(steps) * STEP_GRID).astype(np.int64)
    # log2 may round up across a grid point; step down until the grid value is <= the step.
    e -= np.exp2(e / STEP_GRID) > steps
    return np.clip(e, ZERO_STEP + 1, np.iinfo(np.int16).max)


def shifted_steps(exponents, shift) -> np.ndarray:
    """Step exponents of values multiplied by 2^shift (exact on the grid: 16 shift), the zero
    step kept, within int16."""
    e = np.asarray(exponents, dtype=np.int64)
    moved = np.clip(e + STEP_GRID * np.asarray(shift, dtype=np.int64), ZERO_STEP + 1,
                    np.iinfo(np.int16).max)
    return np.where(e == ZERO_STEP, e, moved).astype(np.int16)


def to_own_scale(step_exponents, shift, exponents, firsts):
    """Step exponents and norms' unit ``shift`` of groups encoded from their members
    multiplied by 2^exponents (one per member, in order), brought back to the members' own
    magnitude: each member's steps by its own power of two, each group's unit by its first
    member's (``firsts``: where each group's first member is; a cluster is scaled by one
    power of two, matrices apart from the collection's scale are alone). None when every
    exponent is 0 (nothing moves)."""
    if not np.any(exponents):
        return None
    e = np.asarray(exponents, dtype=np.int64)
    return shifted_steps(step_exponents, -e), shift - e[firsts]


def zigzag(codes: np.ndarray) -> np.ndarray:
    c = np.asarray(codes, dtype=np.int64)
    return ((c << 1) ^ (c >> 63)).astype(np.uint64)


def unzigzag(u: np.ndarray) -> np.ndarray:
    u = np.asarray(u).astype(np.uint64)
    return ((u >> np.uint64(1)).astype(np.int64)) ^ -((u & np.uint64(1)).astype(np.int64))


def code_dtype(max_abs_code: float) -> np.dtype:
    """Smallest unsigned dtype holding the zig-zag map of codes up to ``max_abs_code``."""
    need = 2 * float(max_abs_code) + 1
    for dt in (np.uint8, np.uint16, np.uint32):
        if need <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


@dataclass
class Quantised:
    """A group's encoding: codes (rows x N, int64: the coefficient rows, or the matrix rows
    when raw) in the group's column order, one step exponent per matrix, and every matrix's
    decoded squared error and squared norm."""

    codes: np.ndarray
    exponents: np.ndarray
    err2: np.ndarray
    norm2: np.ndarray

    def matrix_codes(self, offsets: np.ndarray, j: int) -> np.ndarray:
        return self.codes[:, offsets[j]: offsets[j + 1]]


def least_squares_projector(basis: np.ndarray) -> np.ndarray:
    """P with P A = argmin_C ||A - U~ C||_F, for a rounded basis U~ of full column rank."""
    def projector():
        u = np.asarray(basis, dtype=compute_dtype(basis.dtype))
        return np.linalg.solve(u.conj().T @ u, u.conj().T)

    return _of_basis(basis, "projector", projector)


#: What was derived from each rounded basis (see :func:`_of_basis`), by the basis's id, and
#: the bytes of the arrays among it, which stay below DERIVED_BYTES. Parts are encoded on
#: several threads at once (one per core, or a Dask worker's threads): the lock keeps the
#: byte count true. Reentrant: a basis collected while the lock is held is forgotten by the
#: same thread (weakref.finalize runs where the last reference goes).
_DERIVED: dict[int, dict] = {}
_DERIVED_HELD = [0]
_DERIVED_LOCK = threading.RLock()
DERIVED_BYTES = 16 << 20


def _of_basis(basis: np.ndarray, what, compute):
    """``compute()``, once per basis array and ``what`` while they fit DERIVED_BYTES: out of
    core a cluster's rounded basis is the same array for each of its parts, and its
    projector, Gram matrix and norm were computed again for each (16,000 parts on 10^6
    planted matrices, each part twice). The values are the same, so are the codes.
    Forgotten when the array is."""
    derived = _DERIVED.get(id(basis))
    if derived is not None and what in derived:
        return derived[what]
    value = compute()  # outside the lock: two threads may both compute it, to the same value
    size = value.nbytes if isinstance(value, np.ndarray) else 0
    with _DERIVED_LOCK:
        if _DERIVED_HELD[0] + size > DERIVED_BYTES:
            return value
        derived = _DERIVED.get(id(basis))
        if derived is None:
            derived = _DERIVED[id(basis)] = {}
            weakref.finalize(basis, _forget_basis, id(basis))
        if what not in derived:
            derived[what] = value
            _DERIVED_HELD[0] += size
        return derived[what]


def _forget_basis(key: int) -> None:
    with _DERIVED_LOCK:
        derived = _DERIVED.pop(key, {})
        _DERIVED_HELD[0] -= sum(v.nbytes for v in derived.values() if isinstance(v, np.ndarray))


def _as_compute(basis: np.ndarray | None, dtype) -> np.ndarray | None:
    """The rounded basis in the data's compute dtype (the same array for every part)."""
    if basis is None or basis.dtype == dtype:  # (kept, it would keep itself alive)
        return basis
    dtype = np.dtype(dtype)
    return _of_basis(basis, ("as", dtype.str), lambda: np.asarray(basis, dtype=dtype))


def _norm2(u: np.ndarray) -> float:
    """sigma_max(u), 1 for a basis of no columns."""
    return _of_basis(u, "sigma_max", lambda: float(np.linalg.norm(u, 2)) if u.shape[1] else 1.0)


def _gram(u: np.ndarray) -> np.ndarray:
    return _of_basis(u, "gram", lambda: u.conj().T @ u)


def per_matrix(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sums of per-column ``values`` over each matrix's columns (offsets: K+1, widths >= 1)."""
    return np.add.reduceat(values, offsets[:-1]) if len(values) else np.zeros(len(offsets) - 1)


def _real_view(a: np.ndarray) -> np.ndarray:
    """Real and imaginary parts as separate rows (codes of complex coefficients)."""
    return np.concatenate([a.real, a.imag], axis=0) if np.iscomplexobj(a) else a


def _complex_from(rows: np.ndarray, complex_data: bool) -> np.ndarray:
    if not complex_data:
        return rows
    half = rows.shape[0] // 2
    return rows[:half] + 1j * rows[half:]


def truncation(basis_rounded: np.ndarray | None, data: np.ndarray, offsets: np.ndarray):
    """(C, R2): least-squares coefficients against U~ (the data themselves when raw) and every
    matrix's squared residual ||A_i - U~ C_i||^2 (0 when raw)."""
    if basis_rounded is None:
        return data, np.zeros(len(offsets) - 1)
    coeffs = least_squares_projector(basis_rounded) @ data
    resid = data - _as_compute(basis_rounded, data.dtype) @ coeffs
    return coeffs, per_matrix(column_norms2(resid), offsets)


def quantise(basis_rounded: np.ndarray | None, data: np.ndarray, offsets: np.ndarray,
             eps: float, allocation: str = "matrix", coeffs: np.ndarray | None = None,
             trunc2: np.ndarray | None = None) -> Quantised | None:
    """Codes and steps for a group of matrices (columns ``data``, compute dtype, side by side
    with ``offsets``) so that every matrix decodes within ``eps`` of itself (``allocation``
    "matrix"), or the group within ``eps`` of itself (the other two). None when truncation
    alone leaves no budget (the caller encodes otherwise).

    "proportional" hands the group's budget eps^2 sum ||A_i||^2 - sum ||R_i||^2 out in
    proportion to the members' squared norms, so steps stay proportional to the matrices'
    norms, as with per-matrix budgets; "uniform" gives every coefficient of the group one step,
    the fewest bits for a given total squared error when coefficients are many and smooth
    (reverse water-filling), and matrices far below the rest then cost almost nothing.
    """
    if coeffs is None:
        coeffs, trunc2 = truncation(basis_rounded, data, offsets)
    widths = np.diff(offsets)
    rows = coeffs.shape[0] * (2 if np.iscomplexobj(coeffs) else 1)
    norm2 = per_matrix(column_norms2(data), offsets)
    count = rows * widths.astype(np.float64)
    if allocation == "matrix":
        allowed2 = eps * eps * norm2
    else:
        total = float(norm2.sum())
        spare = eps * eps * total - float(trunc2.sum())
        if spare < 0:
            return None
        if allocation == "proportional":
            allowed2 = trunc2 + (spare * norm2 / total if total > 0 else 0.0)
        else:  # one budget, one step for the whole group: checked as one
            return _quantise_uniform(basis_rounded, data, offsets, coeffs, trunc2, norm2,
                                     eps * eps * total, spare, float(count.sum()))
    u = _as_compute(basis_rounded, data.dtype)
    sigma_max = 1.0 if u is None else _norm2(u)
    budget = allowed2 - trunc2
    if np.any(budget < 0):
        return None
    zero = norm2 == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.sqrt(12.0 * FIRST_STEP_SHARE * budget / count)
        safe = 2.0 * np.sqrt(budget / count) / sigma_max * (1 - 1e-6)
    exps = np.where(zero | (first <= 0), ZERO_STEP, step_exponents(np.where(first > 0, first, 1.0)))
    safe_exps = np.where(safe > 0, step_exponents(np.where(safe > 0, safe, 1.0)), ZERO_STEP)
    errors = _GroupErrors(u, data, coeffs, trunc2, offsets)
    found = _largest_steps(errors.predicted, exps.astype(np.int64), allowed2, safe_exps,
                           widths)
    if found is None:
        return None
    exps, codes, err2 = found
    if codes is None:  # predicted: now decode, and check
        codes, err2 = errors.decoded(exps)
    fails = np.flatnonzero(err2 > allowed2)
    if len(fails):
        # The prediction passed a step the decoded values do not (rounding, at the very edge
        # of a budget): those matrices are searched again on decoded values alone.
        sub = errors.part(fails)
        found = _largest_steps(sub.decoded, exps[fails], allowed2[fails], safe_exps[fails],
                               sub.widths)
        if found is None:
            return None
        exps[fails], codes[:, sub.columns], err2[fails] = found
    return Quantised(codes.astype(np.int64), exps.astype(np.int16), err2, norm2)


def _largest_steps(evaluate, exps: np.ndarray, allowed2: np.ndarray, safe_exps: np.ndarray,
                   widths: np.ndarray):
    """Per matrix, a step exponent whose squared error is within ``allowed2``, as large as the
    search finds: from ``exps`` lower a failing step a few notches, then to the step that
    cannot fail (``safe_exps``); then raise each step while its matrix still passes (the
    h^2/12 estimate overstates the error of coefficients smaller than the step: they round to
    0 and cost only their own size), by bisection over GROW_RANGE grid points.

    ``evaluate(exponents)`` gives (codes or None, squared errors) (see :class:`_GroupErrors`);
    ``widths``: the matrices' columns.
    Returns (exponents, their codes or None, their errors), or None when some matrix passes
    at none of the steps tried."""
    for tries in range(MAX_NOTCHES + 2):
        codes, err2 = evaluate(exps)
        fails = err2 > allowed2
        if not fails.any():
            break
        if tries == MAX_NOTCHES + 1:
            return None
        if tries < MAX_NOTCHES:
            exps = np.where(fails & (exps != ZERO_STEP), exps - NOTCH, exps)
        else:  # the step that cannot fail (up to rounding in the check itself)
            exps = np.where(fails, np.where(safe_exps != ZERO_STEP,
                                            np.minimum(exps, safe_exps), ZERO_STEP), exps)
    lo = exps.copy()
    hi = np.where(exps == ZERO_STEP, exps, exps + GROW_RANGE)
    while True:
        open_ = hi - lo > 1
        if not open_.any():
            return lo, codes, err2
        mid = np.where(open_, (lo + hi) // 2, lo)
        c2, e2 = evaluate(mid)
        ok = open_ & (e2 <= allowed2)
        lo = np.where(ok, mid, lo)
        hi = np.where(open_ & ~ok, mid, hi)
        if ok.any():
            err2 = np.where(ok, e2, err2)
            if codes is not None:
                cols = np.repeat(ok, widths)
                codes[:, cols] = c2[:, cols]


class _GroupErrors:
    """Every matrix's squared error ||A_i - U~ h_i Z_i||^2 for given step exponents, two ways.

    ``decoded``: from the decoded matrices themselves (what the guarantee is checked on).
    ``predicted``: ||R_i||^2 + ||U~ (C_i - h_i Z_i)||^2 with the Gram matrix U~^* U~, the same
    number but for rounding (R_i is orthogonal to range U~: C_i are least-squares coefficients)
    at a fraction of the cost: r x r products on the coefficients instead of m x r ones and
    m x N arrays. The step search runs on the predicted errors; the steps it settles on are
    then decoded and checked. Without a basis both are the decoded error."""

    def __init__(self, u, data, coeffs, trunc2, offsets):
        self.u, self.data, self.trunc2 = u, data, trunc2
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.widths = np.diff(self.offsets)
        self.complex = np.iscomplexobj(coeffs)
        self.coeffs = coeffs
        self.real_coeffs = _real_view(coeffs)
        self.gram = None if u is None else _gram(u)

    def _rounded(self, exps):
        """Codes (float, integral) and the steps of every column."""
        steps = np.repeat(step_values(exps), self.widths)
        zero = steps <= 0
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = self.real_coeffs / np.where(zero, 1.0, steps)
        np.rint(codes, out=codes)
        if zero.any():
            codes[:, zero] = 0.0
        return codes, steps

    def decoded(self, exps):
        """(codes, as integral floats; squared errors of the decoded matrices)."""
        codes, steps = self._rounded(exps)
        decoded = _complex_from(codes * steps, self.complex)
        if self.u is not None:
            decoded = self.u @ decoded
        decoded -= self.data  # the sign does not change a norm
        return codes, per_matrix(column_norms2(decoded), self.offsets)

    def predicted(self, exps):
        """(None, the predicted squared errors); decoded ones without a basis."""
        if self.u is None:
            return self.decoded(exps)
        codes, steps = self._rounded(exps)
        codes *= steps
        moved = _complex_from(self.real_coeffs - codes, self.complex)  # C_i - h_i Z_i
        # (conj() of real values would only copy them: this runs ~6 times per part)
        along = np.einsum("ij,ij->j", moved.conj() if self.complex else moved,
                          self.gram @ moved).real
        return None, self.trunc2 + per_matrix(along, self.offsets)

    def part(self, matrices: np.ndarray) -> "_GroupErrors":
        """The same for some of the matrices (``columns``: theirs in the group)."""
        widths = self.widths[matrices]
        columns = columns_of(self.offsets, matrices)
        sub = _GroupErrors(self.u, self.data[:, columns], self.coeffs[:, columns],
                           self.trunc2[matrices],
                           np.concatenate([[0], np.cumsum(widths)]).astype(np.int64))
        sub.columns = columns
        return sub


def _quantise_uniform(basis_rounded, data, offsets, coeffs, trunc2, norm2, allowed, spare,
                      count) -> Quantised | None:
    """One step for every coefficient of a group whose total error may reach ``allowed``:
    the same search as :func:`quantise` (first guess, lower until it passes, the safe step,
    then raise while it still passes), on one exponent, on predicted errors and then checked
    on the decoded values (which search again should the prediction be off)."""
    k = len(offsets) - 1
    u = _as_compute(basis_rounded, data.dtype)
    sigma_max = 1.0 if u is None else _norm2(u)
    if spare <= 0 or count == 0:
        return None
    errors = _GroupErrors(u, data, coeffs, trunc2, offsets)

    def within(evaluate):
        return lambda e: float(evaluate(np.full(k, e, dtype=np.int64))[1].sum()) <= allowed

    first = int(step_exponents(np.array([np.sqrt(12.0 * FIRST_STEP_SHARE * spare / count)]))[0])
    safe = int(step_exponents(np.array([2.0 * np.sqrt(spare / count) / sigma_max * (1 - 1e-6)]))[0])
    e = _largest_step(within(errors.predicted), first, safe)
    if e is not None:
        codes, err2 = errors.decoded(np.full(k, e, dtype=np.int64))
    if e is None or float(err2.sum()) > allowed:
        e = _largest_step(within(errors.decoded), first, safe)
        if e is None:
            return None
        codes, err2 = errors.decoded(np.full(k, e, dtype=np.int64))
    return Quantised(codes.astype(np.int64), np.full(k, e, dtype=np.int16), err2, norm2)


def _largest_step(passes, first: int, safe: int) -> int | None:
    """:func:`_largest_steps` for one step exponent shared by a group (``passes(e)``)."""
    tries = [first - NOTCH * j for j in range(MAX_NOTCHES + 1)]
    for e in tries + [min(first, safe), min(first, safe) - 4 * STEP_GRID]:
        if passes(e):
            break
    else:
        return None
    lo, hi = e, e + GROW_RANGE
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if passes(mid) else (lo, mid)
    return lo


def decode(basis_rounded: np.ndarray | None, codes: np.ndarray, step: float,
           complex_data: bool) -> np.ndarray:
    """One matrix from its codes (rows x n_i) and step: U~ (h Z), or the inverse 2-D DCT of
    h Z when it has no basis (a matrix stored alone by its DCT coefficients)."""
    coeffs = _complex_from(np.asarray(codes, dtype=np.float64) * step, complex_data)
    if basis_rounded is None:
        return from_dct(coeffs)
    return np.asarray(basis_rounded, dtype=coeffs.dtype if complex_data else np.float64) @ coeffs


@lru_cache(maxsize=64)
def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix D (n x n): D[k, i] = sqrt(2/n) cos(pi (2i + 1) k / (2n)),
    row 0 divided by sqrt(2). D A D'^T is the 2-D DCT of A, D^T C D' its inverse."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


def to_dct(a: np.ndarray) -> np.ndarray:
    """The 2-D orthonormal DCT of a matrix: smooth data (image patches, trajectories) put their
    energy in few coefficients, and the transform keeps every Frobenius norm."""
    return dct_matrix(a.shape[0]) @ a @ dct_matrix(a.shape[1]).T


def from_dct(c: np.ndarray) -> np.ndarray:
    return dct_matrix(c.shape[0]).T @ c @ dct_matrix(c.shape[1])


def to_dct_side_by_side(stack: np.ndarray) -> np.ndarray:
    """The 2-D DCTs of a stack of matrices (B, m, n), side by side (m, B n): two matrix
    products over the whole stack (a product per matrix costs far more for small ones)."""
    B, m, n = stack.shape
    left = dct_matrix(m) @ stack.transpose(1, 0, 2).reshape(m, B * n)
    return (left.reshape(m * B, n) @ dct_matrix(n).T).reshape(m, B * n)


def from_dct_side_by_side(coeffs: np.ndarray, n: int) -> np.ndarray:
    """The inverse of :func:`to_dct_side_by_side` (matrices of n columns), side by side."""
    m = coeffs.shape[0]
    left = dct_matrix(m).T @ coeffs
    return (left.reshape(-1, n) @ dct_matrix(n)).reshape(m, -1)


@lru_cache(maxsize=64)
def dct_scan(m: int, n: int) -> np.ndarray:
    """The order DCT coefficients (m x n, row-major positions) are stored in: by frequency
    i + j, then i. Large low-frequency codes come first and the zeros of the high frequencies
    form runs, which zstd codes in a few bytes (bench: 2 % on image patches)."""
    i, j = np.meshgrid(np.arange(m), np.arange(n), indexing="ij")
    return np.lexsort((i.ravel(), (i + j).ravel()))


def flatten_codes(codes: np.ndarray, raw: bool, complex_data: bool) -> np.ndarray:
    """One matrix's codes (rows x n) as stored: row-major, or in :func:`dct_scan` order when
    they are DCT coefficients (complex: the real part's, then the imaginary part's)."""
    if not raw:
        return codes.ravel()
    parts = np.split(codes, 2) if complex_data else [codes]
    return np.concatenate([p.ravel()[dct_scan(*p.shape)] for p in parts])


def unflatten_codes(flat: np.ndarray, rows: int, n: int, raw: bool,
                    complex_data: bool) -> np.ndarray:
    """The inverse of :func:`flatten_codes`: (rows x n, twice the rows when complex)."""
    if not raw:
        return flat.reshape(rows * (2 if complex_data else 1), n)
    out = []
    for p in np.split(flat, 2) if complex_data else [flat]:
        block = np.empty(rows * n, dtype=flat.dtype)
        block[dct_scan(rows, n)] = p
        out.append(block.reshape(rows, n))
    return np.concatenate(out)


def estimated_bits(values: np.ndarray, step) -> np.ndarray | float:
    """Bits an entropy coder spends on ``values`` quantised with ``step``, roughly: about
    log2(|v| / h) + 2.5 for a value that does not round to zero, a fraction of a bit for one
    that does. Used only to choose between encodings (the bytes are measured on disk). With
    ``values`` of shape (B, c) and ``step`` of shape (B,): one estimate per row."""
    values = np.abs(np.asarray(values))
    step = np.asarray(step, dtype=np.float64)
    mags = values / (step[:, None] if step.ndim else step)
    coded = mags >= 0.5
    # The logarithm only where a value is coded (most are not: a third of the time here).
    bits = np.full(mags.shape, 0.2)
    mags += 0.5
    np.log2(mags, out=bits, where=coded)
    np.add(bits, 2.5, out=bits, where=coded)
    return bits.sum(axis=-1) if step.ndim else float(bits.sum())


def own_ranks(s: np.ndarray, vt: np.ndarray, dct_coeffs: np.ndarray, eps: float,
              max_rank: int, truncation_share: float, basis_itemsize: int) -> np.ndarray:
    """For matrices of one shape, each stored alone: the rank it is stored at, 0 for its DCT
    coefficients; the choice with the fewest estimated bytes (:func:`estimated_bits`, plus the
    basis) among the ranks whose truncation leaves at least 1 - ``truncation_share`` of the
    budget.

    ``s`` (B, p), ``vt`` (B, p, n): the matrices' singular values and right singular vectors;
    ``dct_coeffs`` (B, m, n): their 2-D DCTs (complex parts count separately, as coded)."""
    B, m = dct_coeffs.shape[0], dct_coeffs.shape[1]
    total = np.sum(s ** 2, axis=1)
    allowed = eps * eps * total
    raw = _rows_real(dct_coeffs)
    with np.errstate(divide="ignore", invalid="ignore"):
        best = estimated_bits(raw, np.sqrt(12.0 * allowed / raw.shape[1])) / 8
    best_rank = np.zeros(B, dtype=np.int64)
    tails = np.concatenate([np.cumsum((s ** 2)[:, ::-1], axis=1)[:, ::-1], np.zeros((B, 1))],
                           axis=1)
    for k in range(1, min(max_rank, s.shape[1]) + 1):
        tail = tails[:, k]
        coeffs = _rows_real(s[:, :k, None] * vt[:, :k])
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.sqrt(12.0 * np.maximum(allowed - tail, 0.0) / coeffs.shape[1])
            cost = basis_itemsize * m * k + estimated_bits(coeffs, step) / 8
        better = (tail <= truncation_share * allowed) & (cost < best)
        best_rank[better], best[better] = k, cost[better]
    best_rank[total <= 0] = 0
    return best_rank


def _rows_real(a: np.ndarray) -> np.ndarray:
    """(B, ...) -> (B, c): each matrix's values in a row, complex parts as separate values."""
    flat = a.reshape(a.shape[0], -1)
    return np.concatenate([flat.real, flat.imag], axis=1) if np.iscomplexobj(flat) else flat
