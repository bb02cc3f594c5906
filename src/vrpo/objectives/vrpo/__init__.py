"""VRPO (../shared/docs/vrpo.md): options, reward statistics, rewards, the loss and its diagnostics."""

from vrpo.objectives.vrpo.diagnostics import gradient_shares, plot_vrpo
from vrpo.objectives.vrpo.objective import VRPO
from vrpo.objectives.vrpo.options import REWARDS, VRPOOptions, layer_plan, micro_batch
from vrpo.objectives.vrpo.rewards import Reward, frechet_reward_terms
from vrpo.objectives.vrpo.statistics import psd_sqrt

__all__ = [
    "REWARDS",
    "VRPO",
    "Reward",
    "VRPOOptions",
    "frechet_reward_terms",
    "gradient_shares",
    "layer_plan",
    "micro_batch",
    "plot_vrpo",
    "psd_sqrt",
]
