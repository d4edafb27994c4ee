"""Per-matrix summaries that stand in for a collection too large for memory.

For each matrix A_i (m x n_i) the summary keeps F_i = U_s diag(sigma_1..s), its top-s left
singular directions scaled by their singular values, rounded to a compact dtype. F_i has the
Gram matrix of A_i V_s V_s^* (a right-contraction of A_i), so for any cluster S the
concatenation of the F_i has singular values no larger than those of M_S: a lower bound on the
top-r energy computed from the exact F_i is a lower bound for M_S itself.

The rounding is accounted for exactly: with delta_i = ||F~_i - F_i||_F stored per matrix,
Mirsky's inequality gives sqrt(E_r(F_S)) >= sqrt(E_r(F~_S)) - sqrt(sum_S delta_i^2), so the
estimators stay guaranteed when fed the rounded summaries (see ``loss2``). The true squared
norms ||A_i||_F^2 are kept separately, exactly.

Memory: K x m x s numbers of 2 (int16) or 4 (float32) bytes, chosen to fit the budget; s is
at most n_i and at most the directions asked for: the target rank r (an r-dimensional basis
captures at most the top-r energy of each member), or as many as the residual order measures
candidates against when that is more (the estimator's ``order_rank``), so that the summaries
order candidates as the matrices do. More directions only tighten the bounds: F_i stays a
right-contraction of A_i.

Two-byte summaries are fixed point: int16 scaled by the summary's largest entry. Against
float16 (also two bytes) their rounding loss measured 2-6x smaller on planted, Gaussian and
real weight collections and about equal on single spikes, and they widen to single precision
for the scans about 4x faster.
"""

from __future__ import annotations

import numpy as np

from matclust.blas import CORES, on_all_cores
from matclust.engine.linalg import compute_dtype, peak, peak_exponents, times_power2
from matclust.errors import InputError
from matclust.sources.base import Batch, MatrixSource

#: Summary numbers per piece of a residual scan: small enough that a piece's single-precision
#: copy, its product with the basis and the squares stay in cache.
SCAN_PIECE_NUMBERS = 1 << 18

#: Compact the stored summaries once this fraction of them belongs to discarded matrices.
COMPACT_FRACTION = 0.125


#: Rounding a summary to a dtype of unit roundoff u costs a cluster's bound a floor of about
#: sqrt(FLOOR_PER_ULP * u) (Mirsky's correction; measured: 2.6e-4 for float32, 0.024 for float16).
FLOOR_PER_ULP = 0.6
#: A summary dtype is used only when its floor is at most eps / FLOOR_MARGIN.
FLOOR_MARGIN = 3.0
#: Fixed point (int16) is rated at float16's unit roundoff, which it matched in the worst case
#: measured (see the module docstring).
FIXED_POINT_UNIT = float(np.finfo(np.float16).eps)
FIXED_POINT_MAX = 32767


def unit_roundoff(dtype: np.dtype) -> float:
    dtype = np.dtype(dtype)
    return FIXED_POINT_UNIT if dtype.kind == "i" else float(np.finfo(dtype).eps)


def summary_dtype(eps: float, complex_data: bool, numbers: int, budget_bytes: int) -> np.dtype:
    """Single precision when it holds ``numbers`` values in the budget (tight bounds, fast
    products), else two-byte fixed point, provided the dtype's rounding floor stays at most
    eps / FLOOR_MARGIN; double precision when eps needs it. When nothing fits, the cheapest
    precise-enough dtype (fewer directions are then kept)."""
    kinds = (np.complex64, np.complex128) if complex_data else (np.float32, np.int16, np.float64)
    precise = [np.dtype(d) for d in kinds
               if np.sqrt(FLOOR_PER_ULP * unit_roundoff(d)) <= eps / FLOOR_MARGIN] or [np.dtype(kinds[-1])]
    for dtype in precise:
        if numbers * dtype.itemsize <= budget_bytes:
            return dtype
    return min(precise, key=lambda d: d.itemsize)


def _sqnorms(stack: np.ndarray) -> np.ndarray:
    """Squared Frobenius norm of each matrix of a stack (b, m, n)."""
    out = np.einsum("bij,bij->b", stack.real, stack.real)
    if np.iscomplexobj(stack):
        out = out + np.einsum("bij,bij->b", stack.imag, stack.imag)
    return out


class SummaryReader:
    """Reader over summaries, with the interface the greedy driver uses.

    Parameters
    ----------
    source : MatrixSource
    directions : int
        Summaries keep at most this many directions (the target rank, or the estimator's
        ``order_rank`` when larger, see ``matclust.api.summary_directions``).
    budget_bytes : int
        Memory for the summaries.
    eps : float
        The error bound the summaries will serve; it sets their precision.
    progress : object with ``start`` / ``advance``, optional

    Attributes
    ----------
    norms2 : ndarray (K,)
        Exact squared Frobenius norms of the matrices.
    loss2 : ndarray (K,)
        Squared rounding error of each stored summary.
    tail2 : ndarray (K,)
        Energy of each matrix outside its summary, ||A_i||^2 - ||F_i||^2 (>= 0).
    s : int
        Directions kept per matrix.
    """

    def __init__(self, source: MatrixSource, directions: int, budget_bytes: int, eps: float = 0.1,
                 progress=None):
        self.source = source
        K, m = source.K, source.m
        s = int(min(directions, m, int(source.widths.max())))
        self.store_dtype = summary_dtype(eps, source.dtype.kind == "c", K * m * s, budget_bytes)
        per_number = self.store_dtype.itemsize
        s = int(min(s, budget_bytes // max(1, K * m * per_number)))
        if s < 1:
            raise InputError(
                f"{source.where}: {K} matrices of {m} rows need at least "
                f"{K * m * per_number / 2**20:.0f} MiB for their summaries; raise --memory-limit"
            )
        self.s = s
        # Stored transposed, (K, s, m): the residuals of a whole block of candidates against a
        # basis are then one matrix product of a (b s) x m array.
        self.F = np.zeros((K, s, m), dtype=self.store_dtype)
        self.kept2 = np.zeros(K, dtype=np.float64)  # ||F~_i||^2 of the stored (rounded) summary
        self.scale = np.zeros(K, dtype=np.float64)
        self.norms2 = np.zeros(K, dtype=np.float64)
        self.loss2 = np.zeros(K, dtype=np.float64)
        self.tail2 = np.zeros(K, dtype=np.float64)
        # Rows [0, live) of F hold the summaries not yet compacted away, in ascending matrix
        # order: matrix owner[j] is in row j, matrix i in row row[i] (-1 once compacted away).
        self.owner = np.arange(K, dtype=np.int64)
        self.row = np.arange(K, dtype=np.int64)
        self.live = K
        self._gone = np.zeros(K, dtype=bool)
        self._scan(progress)
        self._to_working_scale()

    # -- building -------------------------------------------------------------------------
    def _scan(self, progress) -> None:
        """One pass: every matrix's summary, each computed in the matrix's own scale (its
        largest entry brought to [1/2, 1) by a power of two; see :meth:`_to_working_scale`).
        A batch is split over the cores (each part writes its own rows)."""
        source = self.source
        source.calibrate(None)  # read the values as they are; the scale is chosen after the pass
        self._peaks = np.zeros(source.K, dtype=np.float64)
        if progress:
            progress.start("summarising", source.K)
        for batch in source.iter_batches():
            widths = np.diff(batch.offsets)
            data = batch.data.astype(compute_dtype(batch.data.dtype), copy=False)
            if np.all(widths == widths[0]):
                b, n = len(batch), int(widths[0])
                stack = data.reshape(source.m, b, n).transpose(1, 0, 2)
                cuts = np.linspace(0, b, CORES + 1).astype(int)
                parts = [(batch.indices[lo:hi], stack[lo:hi]) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]
            else:
                parts = [(batch.indices[j : j + 1], data[None, :, batch.offsets[j] : batch.offsets[j + 1]])
                         for j in range(len(batch))]
            on_all_cores(lambda part: self._summarise(*part), parts)
            if progress:
                progress.advance(len(batch))

    def _summarise(self, indices: np.ndarray, stack: np.ndarray) -> None:
        peaks = peak(stack, axis=(1, 2))
        self._peaks[indices] = peaks
        stack = times_power2(stack, -peak_exponents(peaks)[:, None, None])
        rounded, scale, kept2, exact2, norms2, loss2 = self._summaries(stack)
        self.F[indices] = rounded
        self.kept2[indices] = kept2
        self.scale[indices] = scale
        self.norms2[indices] = norms2
        self.loss2[indices] = loss2
        self.tail2[indices] = np.maximum(norms2 - exact2, 0.0)

    def _to_working_scale(self) -> None:
        """Calibrate the source from the peaks the pass found and bring the summaries from each
        matrix's own scale to the source's working scale: F_i is linear in A_i, so only the
        stored scale factors and the squared quantities change, by exact powers of two (by
        2**-800 at most, see ``apart_bits``: nothing underflows)."""
        source = self.source
        source.calibrate(self._peaks)
        # Working minus own exponent; 0 for all-zero matrices, whose summaries are zero anyway.
        shift = np.where(self._peaks > 0, source.exponents + peak_exponents(self._peaks), 0)
        del self._peaks
        self.scale = np.ldexp(self.scale, shift)
        for name in ("kept2", "norms2", "loss2", "tail2"):
            setattr(self, name, np.ldexp(getattr(self, name), 2 * shift))

    def _summaries(self, stack: np.ndarray):
        """Summaries of a stack of matrices (b, m, n) in double precision: the rounded F_i
        transposed (b, s, m) and their scales, then ||F~_i||^2, ||F_i||^2, ||A_i||^2 and the
        squared rounding errors ||F~_i - F_i||^2."""
        norms2 = _sqnorms(stack)
        b, m, n = stack.shape
        k = min(self.s, n)
        if n <= m:
            # F = A V_s with V_s the top eigenvectors of A^* A (n x n): A times orthonormal
            # columns is a right-contraction however V_s is rounded, and the small Gram's
            # eigh is cheaper than the SVD of A.
            _, v = np.linalg.eigh(stack.conj().transpose(0, 2, 1) @ stack)  # ascending
            exact = stack @ v[:, :, ::-1][:, :, :k]
        else:
            u, sig, _ = np.linalg.svd(stack, full_matrices=False)
            exact = u[:, :, :k] * sig[:, None, :k]
        exact2 = _sqnorms(exact)
        if self.store_dtype.kind == "i":
            # the largest entry maps to FIXED_POINT_MAX; rounding to nearest
            scale = np.abs(exact).max(axis=(1, 2), initial=0.0) / FIXED_POINT_MAX
            safe = np.where(scale > 0, scale, 1.0)
            rounded = np.rint(exact / safe[:, None, None]).astype(self.store_dtype)
        else:  # normalised, so no summary under- or overflows
            safe = np.where(exact2 > 0, np.sqrt(exact2), 1.0)
            rounded = (exact / safe[:, None, None]).astype(self.store_dtype)
        back = rounded.astype(exact.dtype) * safe[:, None, None]
        out = np.zeros((b, self.s, m), dtype=self.store_dtype)
        out[:, :k, :] = rounded.transpose(0, 2, 1)
        return out, safe, _sqnorms(back), exact2, norms2, _sqnorms(back - exact)

    # -- the reader interface -------------------------------------------------------------
    def blocks_of(self, indices) -> np.ndarray:
        """Summaries (len, m, s) in double precision."""
        indices = np.asarray(indices, dtype=np.int64)
        dtype = compute_dtype(self.store_dtype)
        rows = self.row[indices]
        stored = self.F[np.maximum(rows, 0)]
        if np.any(rows < 0):  # compacted away after discard(): summarise them again
            batch = self.source.read(indices[rows < 0])
            stored[rows < 0] = np.concatenate(
                [self._summaries(b.astype(dtype)[None])[0] for b in batch.blocks()])
        return stored.transpose(0, 2, 1).astype(dtype) * self.scale[indices, None, None]

    def get(self, indices) -> Batch:
        indices = np.asarray(indices, dtype=np.int64)
        stack = self.blocks_of(indices)
        b, m, s = stack.shape
        data = stack.transpose(1, 0, 2).reshape(m, b * s)
        return Batch(indices, data, np.arange(0, b * s + 1, s, dtype=np.int64))

    def discard(self, indices) -> None:
        """Mark matrices as clustered: their summaries are no longer scanned, and their rows
        are reclaimed (compacted) once they are a noticeable share of the scan."""
        self._gone[np.asarray(indices, dtype=np.int64)] = True
        gone_rows = np.count_nonzero(self._gone[self.owner[: self.live]])
        if gone_rows > COMPACT_FRACTION * self.live:
            self._compact()

    def _compact(self) -> None:
        keep = np.flatnonzero(~self._gone[self.owner[: self.live]])
        # Rows only move towards the front (keep[j] >= j), so copying front to back in
        # pieces never overwrites a row still to be moved, and needs no second array.
        for lo, hi in self._pieces(len(keep)):
            self.F[lo:hi] = self.F[keep[lo:hi]]
        self.row[self.owner[: self.live]] = -1
        self.owner[: len(keep)] = self.owner[keep]
        self.live = len(keep)
        self.row[self.owner[: self.live]] = np.arange(self.live)

    #: Scanning several bases at once costs little more than one: one pass over the stored
    #: summaries, each piece widened to single precision once (see the driver's seeds ahead).
    shared_scans = True

    def residuals2(self, q: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Estimated ||(I - Q Q^*) A_i||^2 for the candidates: what Q misses of the summary,
        plus the energy outside the summary (which Q may or may not capture)."""
        return self.residuals2_many([q], candidates)[0]

    def residuals2_many(self, qs: list[np.ndarray], candidates: np.ndarray) -> list[np.ndarray]:
        """:meth:`residuals2` for each basis of ``qs``, in one pass over the summaries.

        Every stored row is scanned (contiguous, no gathering), in cache-sized pieces split
        over the cores; candidates whose row was compacted away are scanned on their own.
        Each basis gets the products it would get alone (the same shapes), so its values do
        not depend on which bases were scanned with it."""
        dtype = np.complex64 if np.iscomplexobj(qs[0]) else np.float32
        qhs = [q.conj().T.astype(dtype) for q in qs]
        captured = np.empty((len(qs), self.live), dtype=np.float64)  # of the stored (unscaled) rows
        on_all_cores(lambda share: self._captured(qhs, *share, captured), self._shares(self.live))
        candidates = np.asarray(candidates, dtype=np.int64)
        rows = self.row[candidates]
        inside = rows >= 0
        outside = np.flatnonzero(~inside)
        blocks = self.blocks_of(candidates[outside]) if len(outside) else None
        out = []
        for q, mine in zip(qs, captured):
            got = np.empty(len(candidates), dtype=np.float64)
            got[inside] = mine[rows[inside]] * self.scale[candidates[inside]] ** 2
            if blocks is not None:  # compacted away after discard(), yet asked for
                got[outside] = np.sum(np.abs(q.conj().T @ blocks) ** 2, axis=(1, 2))
            out.append(np.maximum(self.kept2[candidates] - got + self.tail2[candidates], 0.0))
        return out

    def _piece_rows(self) -> int:
        """Stored rows per piece: SCAN_PIECE_NUMBERS numbers."""
        return max(1, SCAN_PIECE_NUMBERS // (self.F.shape[1] * self.F.shape[2]))

    def _pieces(self, rows: int) -> list[tuple[int, int]]:
        """Row ranges [lo, hi) of at most SCAN_PIECE_NUMBERS stored numbers each."""
        step = self._piece_rows()
        return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]

    def _shares(self, rows: int) -> list[tuple[int, int]]:
        """Rows [0, rows) cut into one range per core, at piece boundaries."""
        pieces = -(-rows // self._piece_rows())
        cuts = np.linspace(0, pieces, CORES + 1).astype(np.int64) * self._piece_rows()
        return [(int(lo), int(min(hi, rows))) for lo, hi in zip(cuts[:-1], cuts[1:]) if lo < hi]

    def _captured(self, qhs: list[np.ndarray], lo: int, hi: int, out: np.ndarray) -> None:
        """||Q^* F_j||_F^2 of the stored summaries in rows [lo, hi), for each Q^* of ``qhs``,
        into out[:, lo:hi], a piece at a time.

        The summaries are scaled to O(1) entries, so the single-precision products neither
        under- nor overflow. Their squares are taken in double precision (exactly) and each
        matrix's s x r of them summed by one matrix-vector product: per 1,024 summaries of
        8 x 32 at r = 8, 22 us against 48 us for single-precision squares summed by
        ``sum(dtype=float64)`` (a third of the whole scan). (Summed in single precision, 8 us,
        the sums move by ~1e-7, enough to reorder near ties: RGB patches out of core then
        stored 0.4 % larger; these move by ~2e-8 and gave the same clusters and codes.) A piece is
        widened once for all the bases: the pass over the summaries, not the products, is
        what several bases share. The working arrays are made once for the range: made anew
        for every piece, those of a few hundred KB went back to the system and were faulted
        in again each time (r = 32 on 200,000 summaries of 8 x 32: 100,000 page faults a
        scan, three times its time)."""
        _, s, m = self.F.shape
        step = self._piece_rows()
        dtype = qhs[0].dtype
        # A complex product is summed as its real and imaginary parts side by side.
        parts = 2 if dtype.kind == "c" else 1
        widest = max(qh.shape[0] for qh in qhs)
        wide_buf = np.empty(step * s * m, dtype)
        proj_buf = np.empty(step * s * widest, dtype)
        sq_buf = np.empty(step * s * widest * parts, np.float64)
        ones = np.ones(s * widest * parts)
        for a in range(lo, hi, step):
            b = min(step, hi - a)
            wide = wide_buf[: b * s * m].reshape(b * s, m)
            np.copyto(wide, self.F[a: a + b].reshape(b * s, m), casting="same_kind")
            for qh, row in zip(qhs, out):
                r = qh.shape[0]
                proj = proj_buf[: b * s * r].reshape(b * s, r)
                np.matmul(wide, qh.T, out=proj)
                flat = proj.view(np.float32) if parts == 2 else proj
                sq = sq_buf[: b * s * r * parts].reshape(b, s * r * parts)
                np.square(flat.reshape(b, s * r * parts), out=sq, dtype=np.float64)
                np.matmul(sq, ones[: s * r * parts], out=row[a: a + b])
