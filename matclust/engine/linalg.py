"""Small numerical helpers shared by the estimators and the exact basis. Pure numpy."""

from __future__ import annotations

import numpy as np

#: Relative size (against ||A||_F) below which a new direction of a block is treated as
#: numerically inside the tracked span. Directions this small are dominated by rounding after
#: two projections; keeping them would cost the tracked basis its orthogonality.
DROP_TOL = 1e-10

EPS = np.finfo(np.float64).eps

#: Largest |Q^* w| tolerated for a new direction w before it is re-orthogonalised against Q.
LEAN_TOL = 64 * EPS


def compute_dtype(dtype) -> np.dtype:
    """float64 or complex128: all bounds are computed in double precision."""
    return np.dtype(np.complex128 if np.dtype(dtype).kind == "c" else np.float64)


def as_compute(block: np.ndarray) -> np.ndarray:
    return np.asarray(block, dtype=compute_dtype(block.dtype))


def sqnorm(a: np.ndarray) -> float:
    """Squared Frobenius norm, real even for complex input, accumulated in double precision
    (a float32 dot product loses ~1e-7 relative, which moves a bound by far more than that
    when the error is small)."""
    v = np.asarray(a).ravel()
    v = v.astype(compute_dtype(v.dtype), copy=False)
    return float(np.real(np.vdot(v, v)))


def relative_error(norm2: float, energy: float) -> float:
    """sqrt(1 - energy / norm2), clipped to [0, 1]; 0 for an all-zero cluster.

    The form of every bound, where ``energy`` is a lower bound on the top-r energy. An error
    from the singular values themselves is :func:`truncation_error` (no cancellation)."""
    if norm2 <= 0.0:
        return 0.0
    return float(np.sqrt(min(1.0, max(0.0, 1.0 - energy / norm2))))


def truncation_error(sigma2: np.ndarray, rank: int, total: float | None = None) -> float:
    """e_r: the best rank-r relative error of a matrix M from its squared singular values.

    ``sigma2`` holds every nonzero squared singular value of M, in any order; ``total`` is
    ||M||_F^2 when it was accumulated separately (it defaults to the sum of ``sigma2``).
    The error is sqrt(tail / total) with the tail (all but the r largest) summed directly:
    the textbook sqrt(1 - top_r / total) cancels, so an exactly low-rank M with e_r = 1e-9
    comes out as 0 or ~1e-8 (docs/algorithms.md, "The stored error"). Of the two roundings of
    ||M||_F^2 the smaller is the denominator, so the result errs high, never low. Clamped to
    [0, 1]; 0 for an all-zero M.
    """
    sigma2 = np.sort(np.maximum(np.asarray(sigma2, dtype=np.float64).ravel(), 0.0))  # ascending
    denominator = float(np.sum(sigma2))
    if total is not None:
        denominator = min(denominator, float(total))
    if denominator <= 0.0:
        return 0.0
    tail = float(np.sum(sigma2[: max(len(sigma2) - int(rank), 0)]))
    return float(np.sqrt(min(1.0, tail / denominator)))


def relative_errors(err2, norm2, if_zero: float = np.inf) -> np.ndarray:
    """sqrt(err2 / norm2) element-wise; where norm2 is 0: 0 when err2 is 0 too (a zero matrix
    stored exactly), else ``if_zero`` (anything stored for a zero matrix is wrong)."""
    err2, norm2 = np.asarray(err2, dtype=np.float64), np.asarray(norm2, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm2 > 0, np.sqrt(err2 / np.where(norm2 > 0, norm2, 1.0)),
                        np.where(err2 > 0, if_zero, 0.0))


def top_energy(sigma2: np.ndarray, r: int) -> float:
    """Sum of the r largest entries."""
    if len(sigma2) <= r:
        return float(np.sum(sigma2))
    return float(np.sum(np.partition(sigma2, len(sigma2) - r)[-r:]))


def singular_values2(a: np.ndarray) -> np.ndarray:
    """Squared singular values of a (any shape)."""
    if a.size == 0:
        return np.zeros(0)
    return np.linalg.svd(a, compute_uv=False) ** 2


def project_out(q: np.ndarray, a: np.ndarray) -> np.ndarray:
    """(I - Q Q^*) a, projected twice ("twice is enough") so the result stays orthogonal to Q."""
    if q.shape[1] == 0:
        return a.copy()
    r = a - q @ (q.conj().T @ a)
    return r - q @ (q.conj().T @ r)


def new_directions(r: np.ndarray, scale: float, room: int, q: np.ndarray | None = None):
    """Orthonormal directions of a residual r worth tracking, and what r has along them.

    Returns (W, B, dropped): r ~ W B with W orthonormal (m x j, j <= ``room``) spanning the
    left singular directions of r whose singular value exceeds DROP_TOL * scale, B = W^* r, and
    ``dropped`` >= ||r - W B||_2 (the largest singular value not kept, plus the
    re-orthogonalisation correction below).

    With ``q`` (the tracked basis r was projected against), W is re-orthogonalised against it.
    The SVD's backward error is relative to ||r||, so a left singular vector whose singular value
    is small against ||r|| (say 1e-10) can lean into span(Q) by eps ||r|| / s_j ~ 1e-6 even
    though r itself is orthogonal to Q; kept, such directions compound block after block until
    [Q, W] is far from orthonormal and the estimate overshoots E_r. So: project the kept
    directions out of Q (twice) and orthonormalise them (QR).
    """
    m, n = r.shape
    if n == 0 or room <= 0:
        # Nothing can be kept: all of r is dropped (its Frobenius norm bounds its 2-norm).
        return r[:, :0], np.zeros((0, n), r.dtype), float(np.sqrt(sqnorm(r)))
    w, s, dropped = leading_directions(r, scale, room)
    keep = len(s)
    # The repair costs a QR; it is needed only when some kept direction leans into span(Q),
    # which one small product measures.
    if q is not None and q.shape[1] and keep and np.abs(q.conj().T @ w).max() > LEAN_TOL:
        kept = w * s[:keep]  # the part of r the unrepaired directions carry
        w, _ = np.linalg.qr(project_out(q, w))
        # r - W W^* r = (I - W W^*) kept + (I - W W^*) (the dropped part); bound both spectrally.
        dropped += float(np.sqrt(sqnorm(kept - w @ (w.conj().T @ kept))))
    return w, w.conj().T @ r, dropped


def leading_directions(r: np.ndarray, scale: float, room: int):
    """(U, s, dropped): the left singular vectors of r (m x n, n >= 1) whose singular value
    exceeds DROP_TOL * scale, at most ``room`` of them, their singular values, and the largest
    singular value not kept (0.0 when none is left out)."""
    u, s, _ = np.linalg.svd(r, full_matrices=False)
    keep = min(int(np.count_nonzero(s > DROP_TOL * scale)), room)
    dropped = float(s[keep]) if keep < len(s) else 0.0
    return u[:, :keep], s[:keep], dropped


#: A column whose residual is below this fraction of its squared norm is recomputed from the
#: residual itself: ||a||^2 - ||Q^* a||^2 in single precision cancels to noise there. In double
#: precision the same relative accuracy holds down to this times eps64 / eps32 (~2e-12): a
#: quarter of the PDE trajectories' columns lie between the two, and paid two more products.
CANCELLATION = 1e-3


def residual_columns2(q: np.ndarray, data: np.ndarray, norms2: np.ndarray | None = None) -> np.ndarray:
    """Per column a of ``data``: ||(I - Q Q^*) a||^2, in double precision (sum per matrix with
    Batch.reduce_columns). ``norms2``: the columns' squared norms, if known.

    The result only orders candidates (their bounds are computed in double precision), so it
    is computed in the data's own precision, as ||a||^2 - ||Q^* a||^2: one product with Q^*
    instead of forming the residual. Where that difference is small against ||a||^2 it is
    mostly rounding, and those columns are recomputed from their residual.
    """
    dtype = np.result_type(data.dtype, q.dtype)
    if data.dtype in (np.float32, np.complex64):
        dtype = np.complex64 if dtype.kind == "c" else np.float32
    data, qh = data.astype(dtype, copy=False), q.conj().T.astype(dtype, copy=False)
    if norms2 is None:
        norms2 = column_norms2(data)
    out = norms2 - column_norms2(qh @ data)
    cancellation = CANCELLATION * np.finfo(dtype).eps / np.finfo(np.float32).eps
    suspect = np.flatnonzero(out < cancellation * norms2)
    if len(suspect):
        # (Matrices inside span(Q) have every column here: then no copy of them. The residual
        # is formed in place of Q Q^* a: each fresh array of this size costs its pages' first
        # touch, more than the arithmetic on this 2-core VM.)
        sub = data if len(suspect) == data.shape[1] else np.take(data, suspect, axis=1)
        residual = qh.conj().T @ (qh @ sub)
        out[suspect] = column_norms2(np.subtract(sub, residual, out=residual))
    return out


def column_norms2(a: np.ndarray) -> np.ndarray:
    """Squared norm of every column, summed in double precision (single precision squares
    underflow at magnitudes ~1e-30)."""
    out = np.einsum("ij,ij->j", a.real, a.real, dtype=np.float64)
    if np.iscomplexobj(a):
        out += np.einsum("ij,ij->j", a.imag, a.imag, dtype=np.float64)
    return out


# -- magnitudes: exact power-of-two scaling ------------------------------------------------------
def column_ranges(firsts: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The ranges [firsts[k], firsts[k] + widths[k]) one after another, as one index array."""
    widths = np.asarray(widths, dtype=np.int64)
    starts = np.cumsum(widths) - widths
    # Output column t of range k is firsts[k] + (t - starts[k]).
    return np.repeat(np.asarray(firsts, dtype=np.int64) - starts, widths) + np.arange(int(widths.sum()))


def columns_of(offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The column indices, in order, of the matrices at ``positions`` of a side-by-side layout
    with the given ``offsets``."""
    return column_ranges(offsets[positions], np.diff(offsets)[positions])


def distinct(values) -> np.ndarray:
    """The sorted distinct values of a 1-D integer array: ``np.unique(values)`` without its
    import of numpy.ma (numpy 2 imports it on the first call: 5-8 ms of every command)."""
    ordered = np.sort(np.asarray(values).ravel())
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))] if len(ordered) \
        else ordered


def times_power2(a: np.ndarray, exponent) -> np.ndarray:
    """``a * 2**exponent`` as a new array of a's dtype: exact unless the result leaves the
    dtype's normal range. ``exponent`` is an int or an int array broadcast against ``a`` (e.g.
    one per column). Complex arrays are scaled part by part (ldexp is real-only)."""
    a = np.asarray(a)
    if np.iscomplexobj(a):
        out = np.empty_like(a)
        out.real = times_power2(a.real, exponent)
        out.imag = times_power2(a.imag, exponent)
        return out
    e = np.asarray(exponent)
    if a.dtype.kind == "f" and e.size:
        info = np.finfo(a.dtype)
        if info.minexp <= e.min() and e.max() < info.maxexp:
            # 2**e is a normal number of a's dtype: the product is a 2**e correctly rounded,
            # the same number ldexp gives, at a fraction of its cost (one multiply against
            # a call per entry: ~2 % of a whole run on RGB patches).
            return a * np.ldexp(np.ones((), a.dtype), e)
    return np.ldexp(a, exponent)


def peak_exponents(peaks: np.ndarray) -> np.ndarray:
    """For each peak |entry| p > 0 the e with p in [2**(e-1), 2**e), so that ``2**-e p`` lies in
    [1/2, 1); 0 for p = 0."""
    return np.frexp(np.asarray(peaks, dtype=np.float64))[1].astype(np.int64)


def peak(a: np.ndarray, axis=None):
    """The largest |real part| or |imaginary part| of the entries (over ``axis``; 0 when
    empty): within a factor sqrt(2) of the largest modulus, and never overflows."""
    a = np.asarray(a)
    parts = (a.real, a.imag) if np.iscomplexobj(a) else (a,)
    out = np.zeros(()) if axis is None else 0.0
    for p in parts:
        out = np.maximum(out, np.maximum(p.max(axis=axis, initial=0), -p.min(axis=axis, initial=0)))
    return float(out) if axis is None else out.astype(np.float64)


def at_common_scale(blocks) -> list[np.ndarray]:
    """Blocks in double precision, all multiplied by the one power of two that brings their
    largest entry to [1/2, 1): relative errors and bounds of the blocks taken together are
    unchanged (exactly), and nothing of them under- or overflows."""
    blocks = [as_compute(b) for b in blocks]
    e = int(peak_exponents(max((peak(b) for b in blocks), default=0.0)))
    return [times_power2(b, -e) for b in blocks]


def sqnorm_scaled(a: np.ndarray) -> tuple[float, int]:
    """||a||_F^2 as a pair (f, e) standing for f * 2**e, computed without under- or overflow:
    ``a`` is first brought to a largest entry in [1/2, 1) by a power of two (exactly)."""
    top = peak(a)
    if top == 0.0:
        return 0.0, 0
    e = int(peak_exponents(top))
    return sqnorm(times_power2(as_compute(a), -e)), 2 * e


class ScaledSums:
    """Per slot, a sum of non-negative numbers each given as (f, e) = f * 2**e, held as such a
    pair: no partial sum under- or overflows, whatever the magnitudes summed (the squared errors
    and norms of matrices anywhere in double precision's range, e.g.)."""

    def __init__(self, slots: int):
        self.frac = np.zeros(slots)
        self.exp = np.zeros(slots, dtype=np.int64)

    def add(self, slot: int, f: float, e: int) -> None:
        if f == 0.0:
            return
        if self.frac[slot] == 0.0:
            self.frac[slot], self.exp[slot] = f, e
            return
        top = max(int(self.exp[slot]), e)
        # Shifting the smaller term down can only lose what is below the larger one's precision.
        self.frac[slot] = float(np.ldexp(self.frac[slot], int(self.exp[slot]) - top)) \
            + float(np.ldexp(f, e - top))
        self.exp[slot] = top

    def sqrt_ratio(self, slot: int, other: "ScaledSums") -> float:
        """sqrt(this slot's sum / other's), e.g. a relative error from squared error and
        norm: inf when only the denominator is 0, 0.0 when both are."""
        num, den = self.frac[slot], other.frac[slot]
        if den == 0.0:
            return 0.0 if num == 0.0 else float("inf")
        if num == 0.0:
            return 0.0
        with np.errstate(over="ignore", under="ignore"):  # inf and 0.0 are the right answers
            return float(np.sqrt(np.ldexp(num / den, int(self.exp[slot] - other.exp[slot]))))
