"""The exact shared basis of a cluster and the exact error of what is stored.

The top-r left singular vectors of M_S are computed from a running "square root" W of
M_S M_S^* (W W^* = M_S M_S^*, at most m columns): columns are buffered and, whenever the buffer
grows past ``pending_limit(m)`` columns, compressed to W = R^* by a Householder QR of
[W, buffer]^* (only R is formed). One SVD of the final W gives the basis. This is one pass over
the members, memory O(m (m + pending_limit(m))), and unlike accumulating the Gram matrix it
does not square the condition number, so small errors (exactly low-rank clusters) come out
accurately.
"""

from __future__ import annotations

import numpy as np

from matclust.engine.linalg import compute_dtype, sqnorm, truncation_error


def pending_limit(m: int) -> int:
    """Columns buffered before a compression: at least 2m, and enough that small m does not
    pay a QR call every few blocks."""
    return max(2 * int(m), 256)


class ExactBasis:
    """Accumulates a cluster's columns and yields its exact top-r basis.

    Parameters
    ----------
    m : int
        Row count of the blocks.
    rank : int
        Number of basis vectors wanted.
    dtype : numpy dtype
        Dtype of the data (real or complex); computation is in double precision.
    """

    def __init__(self, m: int, rank: int, dtype):
        self.m = int(m)
        self.rank = int(rank)
        self.dtype = compute_dtype(dtype)
        self._root = np.zeros((self.m, 0), self.dtype)
        self._pending: list[np.ndarray] = []
        self._pending_cols = 0
        self._limit = pending_limit(self.m)
        self.norm2 = 0.0
        self.columns = 0

    def add(self, data: np.ndarray) -> None:
        """Add columns (m x c), e.g. one batch of members side by side."""
        data = np.asarray(data, dtype=self.dtype)
        self.norm2 += sqnorm(data)
        self.columns += data.shape[1]
        self._pending.append(data)
        self._pending_cols += data.shape[1]
        if self._pending_cols > self._limit:
            self._compress()

    def _compress(self) -> None:
        stacked = np.hstack([self._root, *self._pending])
        if stacked.shape[1] > self.m:  # [W, buffer] = R^* Q^*, so R^* R = [W, buffer][W, buffer]^*
            stacked = np.linalg.qr(stacked.conj().T, mode="r").conj().T
        self._root = stacked
        self._pending, self._pending_cols = [], 0

    def root(self) -> np.ndarray:
        """W (m x at most m columns) with W W^* = M M^* for the columns added so far: all
        another accumulator needs to take them over (:meth:`merge`)."""
        self._compress()
        return self._root

    def merge(self, root: np.ndarray, norm2: float, columns: int) -> None:
        """Take over another accumulator's columns: its :meth:`root`, exact energy and count
        (its root's own energy differs from the columns' by rounding only)."""
        root = np.asarray(root, dtype=self.dtype)
        self.norm2 += float(norm2)
        self.columns += int(columns)
        self._pending.append(root)
        self._pending_cols += root.shape[1]
        if self._pending_cols > self._limit:
            self._compress()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(U, sigma2): the top-r left singular vectors (m x min(r, rank M)) and every squared
        singular value of M_S, descending."""
        self._compress()
        u, s, _ = np.linalg.svd(self._root, full_matrices=False)
        r = min(self.rank, u.shape[1])
        return u[:, :r], s**2

    def basis_and_error(self) -> tuple[np.ndarray, float]:
        """(U, e_r(S)): the top-r basis and the best rank-r relative error, from one SVD (the
        stored error is computed directly from what is stored)."""
        basis, sigma2 = self.result()
        return basis, truncation_error(sigma2, self.rank, self.norm2)

    def best_error(self) -> float:
        """e_r(S) from the singular values."""
        return self.basis_and_error()[1]


def coefficients(basis: np.ndarray, data: np.ndarray) -> np.ndarray:
    """C = U^* A for columns A (m x c)."""
    return basis.conj().T @ data


def residual_norm2(basis: np.ndarray, coeffs: np.ndarray, data: np.ndarray) -> float:
    """||A - U C||_F^2 computed directly in double precision (no cancellation against ||C||^2)."""
    cdt = compute_dtype(data.dtype)
    diff = np.asarray(data, cdt) - np.asarray(basis, cdt) @ np.asarray(coeffs, cdt)
    return sqnorm(diff)


def exact_error(blocks, rank: int) -> float:
    """e_r(S) of a list of blocks by one SVD of their concatenation (a reference for tests)."""
    m = np.hstack([np.asarray(b, compute_dtype(np.asarray(b).dtype)) for b in blocks])
    s2 = np.linalg.svd(m, compute_uv=False) ** 2
    return truncation_error(s2, rank, sqnorm(m))
