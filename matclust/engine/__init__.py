"""The engine: error bounds, incremental SVD and the exact shared basis. Pure numpy, no I/O."""

from matclust.engine.estimators import (
    ALIASES,
    METHODS,
    IncrementalEstimator,
    ResidualEstimator,
    WeylEstimator,
    canonical_method,
    make_estimator,
)
from matclust.engine.exact import ExactBasis, exact_error

__all__ = [
    "ALIASES", "METHODS", "ExactBasis", "IncrementalEstimator", "ResidualEstimator",
    "WeylEstimator", "canonical_method", "exact_error", "make_estimator",
]
