"""Pruning methods as Lightning callbacks, and the core they share (masks, groups, schedules)."""

from prunelab.pruning.admm import ADMMPruning
from prunelab.pruning.base import PruningCallback
from prunelab.pruning.checks import check_compression
from prunelab.pruning.eigendamage import EigenDamagePruning
from prunelab.pruning.magnitude import MagnitudePruning
from prunelab.pruning.obd import OBDPruning

METHODS = {"magnitude": MagnitudePruning, "admm": ADMMPruning, "eigendamage": EigenDamagePruning,
           "obd": OBDPruning}

__all__ = ["ADMMPruning", "EigenDamagePruning", "METHODS", "MagnitudePruning", "OBDPruning", "PruningCallback",
           "check_compression"]
