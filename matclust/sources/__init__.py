"""Sources: read matrix collections chunk-wise from HDF5, Zarr or memory."""

from matclust.sources.base import Batch, MatrixSource, working_dtype
from matclust.sources.formats import list_candidates, open_source
from matclust.sources.memory import array_source

__all__ = ["Batch", "MatrixSource", "array_source", "list_candidates", "open_source", "working_dtype"]
