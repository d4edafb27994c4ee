"""A bounded cache of chunk-aligned batches in front of a source.

The greedy driver revisits the remaining matrices once per cluster it forms. When the whole
collection fits in the memory budget, every batch is read from disk once and kept; otherwise
the least recently used batches are dropped and re-read when needed. Either way the memory held
is at most ``budget_bytes`` plus one batch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import numpy as np

from matclust.engine.linalg import column_norms2, distinct, residual_columns2
from matclust.sources.base import Batch, MatrixSource

#: A cached batch is compacted once this share of its matrices is discarded. Scans multiply
#: every column they hold, so a low share saves products; each compaction copies the rest.
COMPACT_FRACTION = 0.125


class CachedReader:
    """Chunk-aligned, LRU-cached access to a :class:`MatrixSource`.

    Parameters
    ----------
    source : MatrixSource
    budget_bytes : int
        Most bytes of matrix data kept between calls.
    """

    #: The blocks are the matrices themselves: no rounding to account for (see BlockReader).
    loss2 = None

    def __init__(self, source: MatrixSource, budget_bytes: int):
        self.source = source
        self.budget_bytes = int(budget_bytes)
        self.ranges = source.chunk_ranges()
        self._starts = np.array([s for s, _ in self.ranges], dtype=np.int64)
        self._cache: OrderedDict[int, Batch] = OrderedDict()
        self._norms2: dict[int, np.ndarray] = {}  # column norms of the cached batches
        self._held = 0
        self._gone = np.zeros(source.K, dtype=bool)  # see discard()

    def __len__(self) -> int:
        return len(self.ranges)

    def batch(self, k: int) -> Batch:
        """The k-th chunk-aligned batch."""
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        start, stop = self.ranges[k]
        batch = self.source.read_range(start, stop)
        size = batch.data.nbytes
        if size <= self.budget_bytes:
            while self._held + size > self.budget_bytes and self._cache:
                gone, old = self._cache.popitem(last=False)
                self._norms2.pop(gone, None)
                self._held -= old.data.nbytes
            self._cache[k] = batch
            self._held += size
        return batch

    def rescale(self) -> None:
        """Bring the cached batches to the source's working scale after it was calibrated
        (they were read before; see ``MatrixSource.calibrate``)."""
        for batch in self._cache.values():
            self.source.to_working_scale(batch)
        self._norms2.clear()

    def __iter__(self) -> Iterator[Batch]:
        for k in range(len(self.ranges)):
            yield self.batch(k)

    def discard(self, indices) -> None:
        """Mark matrices as no longer needed (e.g. clustered and written). A cached batch is
        compacted once COMPACT_FRACTION of it is such matrices, so residual scans neither copy
        nor multiply them again; should a discarded matrix be asked for after all, it is read
        again."""
        self._gone[np.asarray(indices, dtype=np.int64)] = True

    #: Several bases cost as much as one by one: the products, not the pass, are the work.
    shared_scans = False

    def residuals2(self, q: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """||(I - Q Q^*) A_i||_F^2 for the candidates (sorted indices), a batch at a time."""
        wanted = np.zeros(self.source.K, dtype=bool)
        wanted[candidates] = True
        out = np.zeros(self.source.K)
        for k in range(len(self.ranges)):
            start, stop = self.ranges[k]
            if not wanted[start:stop].any():
                continue
            batch = self._compacted(k)
            keep = np.flatnonzero(wanted[batch.indices])
            if 2 * len(keep) < len(batch):
                # Mostly not wanted (the seed, or matrices not yet discarded): copying the
                # wanted ones out is cheaper than the product over all.
                batch, norms2 = batch.take(keep), None
            else:
                norms2 = self.column_norms2(k, batch)
            out[batch.indices] = batch.reduce_columns(residual_columns2(q, batch.data, norms2))
        return out[candidates]

    def _compacted(self, k: int) -> Batch:
        """Batch k without its discarded matrices, once they are COMPACT_FRACTION of it (kept so)."""
        batch = self.batch(k)
        live = ~self._gone[batch.indices]
        if np.count_nonzero(~live) <= COMPACT_FRACTION * len(batch) or k not in self._cache:
            return batch
        compact = batch.take(np.flatnonzero(live))
        if k in self._norms2:
            self._norms2[k] = self._norms2[k][np.repeat(live, np.diff(batch.offsets))]
        self._cache[k] = compact
        self._held -= batch.data.nbytes - compact.data.nbytes
        return compact

    def column_norms2(self, k: int, batch: Batch) -> np.ndarray:
        """Squared norms of the columns of ``batch``, batch k as just returned by ``batch(k)``
        (or compacted); kept while the batch is cached."""
        norms2 = self._norms2.get(k)
        if norms2 is None:
            norms2 = column_norms2(batch.data)
            if self._cache.get(k) is batch:
                self._norms2[k] = norms2
        return norms2

    def get(self, indices) -> Batch:
        """Matrices by index, in the given order."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return self.source.read(indices)
        which = np.searchsorted(self._starts, indices, side="right") - 1
        parts = []
        for k in distinct(which):
            sel = np.flatnonzero(which == k)
            batch = self.batch(int(k))
            # Batches hold ascending indices, all of their range unless compacted.
            at = np.minimum(np.searchsorted(batch.indices, indices[sel]), max(len(batch) - 1, 0))
            found = batch.indices[at] == indices[sel] if len(batch) else np.zeros(len(sel), bool)
            if not found.all():
                missing = sel[~found]
                parts.append((missing, self.source.read(indices[missing]), np.arange(len(missing))))
                sel, at = sel[found], at[found]
            parts.append((sel, batch, at))
        return self.source.gather(indices, parts)
