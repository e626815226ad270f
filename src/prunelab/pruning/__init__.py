"""Pruning methods as Lightning callbacks, and the core they share (masks, groups, schedules)."""

from prunelab.pruning.admm import ADMMPruning
from prunelab.pruning.autoprune import AutoPrune
from prunelab.pruning.base import PruningCallback
from prunelab.pruning.checks import check_compression
from prunelab.pruning.eigendamage import EigenDamagePruning
from prunelab.pruning.increg import IncRegPruning
from prunelab.pruning.magnitude import MagnitudePruning
from prunelab.pruning.obd import OBDPruning
from prunelab.pruning.slr import SLRPruning
from prunelab.pruning.spp import SPPPruning

METHODS = {
    "magnitude": MagnitudePruning,
    "admm": ADMMPruning,
    "slr": SLRPruning,
    "increg": IncRegPruning,
    "spp": SPPPruning,
    "autoprune": AutoPrune,
    "eigendamage": EigenDamagePruning,
    "obd": OBDPruning,
}

__all__ = [
    "ADMMPruning",
    "AutoPrune",
    "EigenDamagePruning",
    "IncRegPruning",
    "METHODS",
    "MagnitudePruning",
    "OBDPruning",
    "PruningCallback",
    "SLRPruning",
    "SPPPruning",
    "check_compression",
]
