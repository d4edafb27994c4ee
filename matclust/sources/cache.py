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

from matclust.blas import all_threads
from matclust.sources.base import Batch, MatrixSource


class CachedReader:
    """Chunk-aligned, LRU-cached access to a :class:`MatrixSource`.

    Parameters
    ----------
    source : MatrixSource
    budget_bytes : int
        Most bytes of matrix data kept between calls.
    """

    def __init__(self, source: MatrixSource, budget_bytes: int):
        self.source = source
        self.budget_bytes = int(budget_bytes)
        self.ranges = source.chunk_ranges()
        self._starts = np.array([s for s, _ in self.ranges], dtype=np.int64)
        self._cache: OrderedDict[int, Batch] = OrderedDict()
        self._held = 0

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
                _, old = self._cache.popitem(last=False)
                self._held -= old.data.nbytes
            self._cache[k] = batch
            self._held += size
        return batch

    def __iter__(self) -> Iterator[Batch]:
        for k in range(len(self.ranges)):
            yield self.batch(k)

    def residuals2(self, q: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """||(I - Q Q^*) A_i||_F^2 for the candidates (sorted indices), a batch at a time."""
        from matclust.driver import residual_columns2

        wanted = np.zeros(self.source.K, dtype=bool)
        wanted[candidates] = True
        out = np.zeros(self.source.K)
        with all_threads():
            for batch in self:
                keep = np.flatnonzero(wanted[batch.indices])
                if len(keep) == 0:
                    continue
                if len(keep) < len(batch):
                    batch = batch.take(keep)
                out[batch.indices] = batch.reduce_columns(residual_columns2(q, batch.data))
        return out[candidates]

    def get(self, indices) -> Batch:
        """Matrices by index, in the given order."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return self.source.read(indices)
        which = np.searchsorted(self._starts, indices, side="right") - 1
        pieces, positions = [], []
        for k in np.unique(which):
            sel = np.flatnonzero(which == k)
            batch = self.batch(int(k))
            pieces.append(batch.take(indices[sel] - self.ranges[k][0]))
            positions.append(sel)
        merged = Batch.concatenate(pieces)
        order = np.concatenate(positions)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return merged.take(inverse)
