"""`deco.optimized`: the fast PyTorch implementation of DeCo (spec/), tested against `deco.reference`."""

from .loss import flow_matching_loss, frequency_aware_loss, frequency_weights
from .train import Draws, NonFiniteLossError, TrainConfig, Trainer

__all__ = [
    "Draws",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "flow_matching_loss",
    "frequency_aware_loss",
    "frequency_weights",
]
