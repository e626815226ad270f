"""Pruning methods as Lightning callbacks, and the core they share (masks, groups, schedules)."""

from prunelab.pruning.admm import ADMMPruning
from prunelab.pruning.base import PruningCallback
from prunelab.pruning.checks import check_compression
from prunelab.pruning.increg import IncRegPruning
from prunelab.pruning.magnitude import MagnitudePruning
from prunelab.pruning.spp import SPPPruning

METHODS = {"magnitude": MagnitudePruning, "admm": ADMMPruning, "increg": IncRegPruning, "spp": SPPPruning}

__all__ = ["ADMMPruning", "IncRegPruning", "METHODS", "MagnitudePruning", "PruningCallback", "SPPPruning",
           "check_compression"]
