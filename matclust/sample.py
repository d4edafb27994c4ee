"""A planted generator: matrices drawn from a few random low-rank subspaces plus noise.

The planted partition is the natural answer for the clustering (each subspace at rank <= r is
one cluster with error ~ noise), which makes it a yardstick for quality tests and benchmarks.
"""

from __future__ import annotations

import numpy as np

DTYPES = ("float16", "float32", "float64", "int32", "int64", "complex64", "complex128")


def planted_collection(K: int, m: int, n: int, subspaces: int, rank: int, noise: float,
                       dtype: str = "float64", n_max: int | None = None, seed: int = 0,
                       scale_spread: float = 1.0, int_scale: float = 1000.0):
    """Draw a planted collection.

    Matrix i belongs to subspace ``labels[i]`` (uniform), and is ``U_l C + noise * ||U_l C||_F
    / sqrt(m n_i) * G`` with ``U_l`` a random orthonormal m x rank basis and C, G Gaussian.
    Widths are n, or uniform in [n, n_max] when n_max is given. Norms vary by a log-uniform
    factor up to ``scale_spread``. Integer dtypes are scaled by ``int_scale`` and rounded.

    Returns
    -------
    matrices : ndarray (K, m, n) when all widths are equal, else list of (m, n_i) arrays
    labels : ndarray of int64, shape (K,)
    """
    rng = np.random.default_rng(seed)
    cplx = dtype.startswith("complex")
    rank = min(rank, m)

    def gauss(*shape):
        g = rng.standard_normal(shape)
        return g + 1j * rng.standard_normal(shape) if cplx else g

    bases = [np.linalg.qr(gauss(m, rank))[0] for _ in range(subspaces)]
    labels = rng.integers(0, subspaces, size=K).astype(np.int64)
    widths = np.full(K, n) if n_max is None else rng.integers(n, n_max + 1, size=K)
    out = []
    for i in range(K):
        w = int(widths[i])
        clean = bases[labels[i]] @ gauss(rank, w)
        mat = clean + noise * np.linalg.norm(clean) / np.sqrt(m * w) * gauss(m, w)
        mat *= scale_spread ** rng.uniform(-0.5, 0.5)
        out.append(mat)
    if dtype.startswith("int"):
        out = [np.rint(a * int_scale) for a in out]
    out = [a.astype(dtype) for a in out]
    if n_max is None:
        return np.stack(out) if K else np.zeros((0, m, n), dtype), labels
    return out, labels
