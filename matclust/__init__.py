"""matclust: error-bounded clustering of matrix collections with shared truncated-SVD bases.

Implements M. Shamrai, "Concatenated Matrix SVD: Compression Bounds, Incremental Approximation,
and Error-Constrained Clustering" (arXiv:2601.11626).
"""

__version__ = "0.1.0"

__all__ = ["MatrixClusterer", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that the command line can configure the BLAS library before
    # numpy loads it (see matclust.cli).
    if name == "MatrixClusterer":
        from matclust.api import MatrixClusterer

        return MatrixClusterer
    raise AttributeError(f"module 'matclust' has no attribute {name!r}")
