"""In-memory collections, for the Python API and for tests."""

from __future__ import annotations

import numpy as np

from matclust.sources.base import MatrixSource


class _Member:
    """Gives a numpy array the read-only, sliceable face of an on-disk array."""

    def __init__(self, array: np.ndarray):
        self._array = array
        self.shape = array.shape
        self.dtype = array.dtype

    def __getitem__(self, key):
        return self._array[key]


def array_source(matrices, transpose: bool = False, name: str = "<memory>") -> MatrixSource:
    """A source over a 3-D numpy array (K, m, n) or a sequence of 2-D arrays (m, n_i).

    The arrays are referenced, not copied.
    """
    if isinstance(matrices, np.ndarray):
        return MatrixSource(name, "/", transpose, stack=_Member(matrices))
    width = len(str(max(len(matrices) - 1, 0)))
    members = [(f"{i:0{width}d}", _Member(np.asarray(a))) for i, a in enumerate(matrices)]
    return MatrixSource(name, "/", transpose, members=members)
