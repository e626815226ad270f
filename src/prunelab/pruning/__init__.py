"""Pruning methods as Lightning callbacks, and the core they share (masks, groups, schedules)."""

from prunelab.pruning.admm import ADMMPruning
from prunelab.pruning.base import PruningCallback
from prunelab.pruning.checks import check_compression
from prunelab.pruning.eigendamage import EigenDamagePruning
from prunelab.pruning.increg import IncRegPruning
from prunelab.pruning.magnitude import MagnitudePruning
from prunelab.pruning.obd import OBDPruning
from prunelab.pruning.spp import SPPPruning

METHODS = {"magnitude": MagnitudePruning, "admm": ADMMPruning, "increg": IncRegPruning, "spp": SPPPruning,
           "eigendamage": EigenDamagePruning, "obd": OBDPruning}

__all__ = ["ADMMPruning", "EigenDamagePruning", "IncRegPruning", "METHODS", "MagnitudePruning", "OBDPruning",
           "PruningCallback", "SPPPruning",
           "check_compression"]
