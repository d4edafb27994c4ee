"""Turn a formed cluster into what is stored: basis and coefficients, or the raw columns.

The stored error is computed directly, sum_i ||A_i - U C_i||_F^2 with U and C as stored (in the
output's precision), never as ||M||^2 - ||C||^2, whose cancellation destroys small errors. A
factored cluster whose stored error would exceed eps (possible only when storage precision is
coarser than eps) is stored raw instead, so every stored cluster honours eps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from matclust.driver import FormedCluster
from matclust.engine.exact import coefficients
from matclust.engine.linalg import as_compute, column_norms2, relative_errors, sqnorm
from matclust.sources.cache import CachedReader


@dataclass
class EncodedCluster:
    members: np.ndarray
    columns: int
    bound: float
    error: float
    basis: np.ndarray | None = None  # (m, r_c), storage dtype
    coefficients: np.ndarray | None = None  # (r_c, N_c), storage dtype
    raw: np.ndarray | None = None  # (m, N_c), storage dtype
    stored_numbers: int | None = None  # when the arrays went straight to disk (out of core)
    max_matrix_error: float = 0.0  # the largest relative error of one member, as stored

    rank: int = -1  # columns of the basis (0 when raw); derived from the arrays when held

    def __post_init__(self):
        if self.rank < 0:
            self.rank = 0 if self.basis is None else self.basis.shape[1]

    @property
    def stored(self) -> str:
        return "factored" if self.rank else "raw"

    def on_disk(self) -> "EncodedCluster":
        """The same cluster without its arrays (once they are written)."""
        return replace(self, basis=None, coefficients=None, raw=None, stored_numbers=self.numbers)

    @property
    def numbers(self) -> int:
        if self.stored_numbers is not None:
            return self.stored_numbers
        if self.basis is not None:
            return self.basis.size + self.coefficients.size
        return self.raw.size


def encode(cluster: FormedCluster, reader: CachedReader, eps: float, estimator, *,
           error_control: bool = True, per_matrix: bool = False) -> EncodedCluster:
    """Compute what a cluster stores, and the exact error of exactly that.

    With ``error_control=False`` (the baselines) a factored cluster is stored factored whatever
    its error; the report then counts it over eps and ``verify`` fails the store. With
    ``per_matrix`` every member must be within eps as stored, else the cluster is stored raw
    (the driver evicts members above eps first, so only rounding can cause that).
    """
    batch = cluster.batch if cluster.batch is not None else reader.get(cluster.members)
    dtype = reader.source.storage_dtype
    bound = cluster.bound
    if bound is None:
        bound = estimator.bound_of(batch.blocks())
    data = as_compute(batch.data)  # in the source's working scale, as is every error below
    norm2 = sqnorm(data)
    # The stored numbers are unscaled to the input's magnitude by the source, which also says
    # what they read back as (`back`), so the stored error is that of exactly what is stored.
    to_storage = reader.source.to_storage
    if cluster.factored:
        basis = np.ascontiguousarray(cluster.basis.astype(dtype))
        coeffs, back = to_storage(coefficients(as_compute(basis), data), batch.indices, dtype)
        # back is None when a coefficient overflows the storage dtype: stored raw instead.
        error = worst = None
        if back is not None:
            diff = data - as_compute(basis) @ as_compute(back)
            worst = worst_member(batch, diff)
            error = _relative(sqnorm(diff), norm2)
        if error is not None and ((error <= eps and (worst <= eps or not per_matrix))
                                  or not error_control):
            # The estimator bounds e_r(S); what is stored also carries rounding to the storage
            # precision, so the reported bound is the larger of the two (both are <= eps).
            return EncodedCluster(cluster.members, cluster.columns, max(bound, error), error,
                                  basis=basis, coefficients=np.ascontiguousarray(coeffs),
                                  max_matrix_error=worst)
    raw, back = to_storage(data, batch.indices, dtype)
    error = worst = None
    if back is not None:
        worst = worst_member(batch, data - back)
        error = _relative(sqnorm(data - back), norm2)
    if error is None or error > eps or worst > eps:
        # Only integers beyond 2**24 round in float32; store those exactly instead.
        raw, back = to_storage(data, batch.indices, np.float64)
        worst = worst_member(batch, data - back)
        error = _relative(sqnorm(data - back), norm2)
    return EncodedCluster(cluster.members, cluster.columns, max(bound, error), error,
                          raw=np.ascontiguousarray(raw), max_matrix_error=worst)


def worst_member(batch, diff: np.ndarray) -> float:
    """The largest relative error ||A_i - A~_i|| / ||A_i|| of the members of ``batch``, given
    the stored columns' differences ``diff`` (zero members: 0 if stored exactly, else 1)."""
    err2 = batch.reduce_columns(column_norms2(diff))
    norm2 = batch.reduce_columns(column_norms2(as_compute(batch.data)))
    return float(relative_errors(err2, norm2, if_zero=1.0).max(initial=0.0))


def _relative(err2: float, norm2: float) -> float:
    return float(np.sqrt(err2 / norm2)) if norm2 > 0 else 0.0
