"""Default values of the clustering parameters, defined once.

:class:`matclust.MatrixClusterer`'s signature, the command line's options, ``compare``, the
bound study and the engine's factories all take their defaults from here, so changing one here
changes it everywhere (the help text shows the value in use).
"""

RANK = 8
EPS = 0.05
METHOD = "incremental"
ORDER = "residual"
#: Clusters in a row that did not grow past their seed before the rest become singletons (the
#: paper's code uses 10).
PATIENCE = 10
#: Extra directions the incremental estimator tracks beyond the rank (the paper's code uses 5).
OVERSAMPLING = 5
#: Bytes of memory a run aims at.
MEMORY_LIMIT = 2**30
MODE = "auto"
#: Seed of the random and k-means baselines and of the bound study's random clusters.
SEED = 0
#: Every matrix within eps of itself (the paper's guarantee is "cluster").
GUARANTEE = "matrix"
#: The smallest store: quantised codes within the error budget ("plain": float arrays).
ENCODING = "compact"
