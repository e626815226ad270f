"""Pruning methods as Lightning callbacks, and the core they share (masks, groups, schedules)."""

from prunelab.pruning.admm import ADMMPruning
from prunelab.pruning.autoprune import AutoPrune
from prunelab.pruning.base import PruningCallback
from prunelab.pruning.checks import check_compression
from prunelab.pruning.magnitude import MagnitudePruning
from prunelab.pruning.slr import SLRPruning

METHODS = {"magnitude": MagnitudePruning, "admm": ADMMPruning, "slr": SLRPruning, "autoprune": AutoPrune}

__all__ = ["ADMMPruning", "AutoPrune", "METHODS", "MagnitudePruning", "PruningCallback", "SLRPruning", "check_compression"]
