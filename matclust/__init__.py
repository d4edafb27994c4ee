"""matclust: error-bounded clustering of matrix collections with shared truncated-SVD bases.

Implements M. Shamrai, "Concatenated Matrix SVD: Compression Bounds, Incremental Approximation,
and Error-Constrained Clustering" (arXiv:2601.11626).
"""

import logging

__version__ = "0.1.0"

# A library logs and lets the application decide where to (the CLI's -v sends it to stderr).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["MatrixClusterer", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that the command line can configure the BLAS library before
    # numpy loads it (see matclust.cli).
    if name == "MatrixClusterer":
        from matclust.api import MatrixClusterer

        return MatrixClusterer
    raise AttributeError(f"module 'matclust' has no attribute {name!r}")
