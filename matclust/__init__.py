"""matclust: error-bounded clustering of matrix collections with shared truncated-SVD bases.

Implements M. Shamrai, "Concatenated Matrix SVD: Compression Bounds, Incremental Approximation,
and Error-Constrained Clustering" (arXiv:2601.11626).
"""

__version__ = "0.1.0"

try:  # the API imports everything; keep the engine importable while it is missing
    from matclust.api import MatrixClusterer  # noqa: E402
except ModuleNotFoundError:
    pass

__all__ = ["MatrixClusterer", "__version__"]
