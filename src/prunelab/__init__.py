"""prunelab: an experiment-tracking training service for neural-network pruning."""

__version__ = "0.1.0"
