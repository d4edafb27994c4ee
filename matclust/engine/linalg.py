"""Small numerical helpers shared by the estimators and the exact basis. Pure numpy."""

from __future__ import annotations

import numpy as np

#: Relative size (against ||A||_F) below which a new direction of a block is treated as
#: numerically inside the tracked span. Directions this small are dominated by rounding after
#: two projections; keeping them would cost the tracked basis its orthogonality.
DROP_TOL = 1e-10

EPS = np.finfo(np.float64).eps


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
    """sqrt(1 - energy / norm2), clipped to [0, 1]; 0 for an all-zero cluster."""
    if norm2 <= 0.0:
        return 0.0
    return float(np.sqrt(min(1.0, max(0.0, 1.0 - energy / norm2))))


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
    """Orthonormal directions of a residual r worth tracking, and what they carry.

    Returns (U, s, Vh, dropped): r ~ U diag(s) Vh with the directions whose singular value
    exceeds DROP_TOL * scale (at most ``room`` of them), and an upper bound on the spectral norm
    of what U misses of r (the largest singular value not kept, plus the re-orthogonalisation
    correction below).

    With ``q`` (the tracked basis r was projected against), U is re-orthogonalised against it.
    The SVD's backward error is relative to ||r||, so a left singular vector whose singular value
    is small against ||r|| (say 1e-10) can lean into span(Q) by eps ||r|| / s_j ~ 1e-6 even
    though r itself is orthogonal to Q; kept, such directions compound block after block until
    [Q, U] is far from orthonormal and the estimate overshoots E_r. So: project the kept
    directions out of Q (twice), orthonormalise them (QR), and re-derive s and Vh from U^* r.
    """
    if r.shape[1] == 0 or room <= 0:
        s_all = np.linalg.svd(r, compute_uv=False) if r.size else np.zeros(0)
        return r[:, :0], np.zeros(0), np.zeros((0, r.shape[1]), r.dtype), float(s_all.max(initial=0.0))
    u, s, vh = np.linalg.svd(r, full_matrices=False)
    keep = int(np.count_nonzero(s > DROP_TOL * scale))
    keep = min(keep, room)
    dropped = float(s[keep]) if keep < len(s) else 0.0
    if q is None or q.shape[1] == 0 or keep == 0:
        return u[:, :keep], s[:keep], vh[:keep], dropped
    kept = u[:, :keep] * s[:keep]  # the part of r the unrepaired directions carry
    w = project_out(q, u[:, :keep])
    w, _ = np.linalg.qr(w)
    # r - W W^* r = (I - W W^*) kept + (I - W W^*) (the dropped part); bound both spectrally.
    miss = kept - w @ (w.conj().T @ kept)
    dropped += float(np.sqrt(sqnorm(miss)))
    ub, s2, vh2 = np.linalg.svd(w.conj().T @ r, full_matrices=False)
    return w @ ub, s2, vh2, dropped
