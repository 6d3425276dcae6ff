"""`deco.optimized`: the fast PyTorch implementation of DeCo (spec/), tested against `deco.reference`."""

from deco.config import DeCoConfig

from .gemm import cpu_gemm, cpu_gemm_backend, onednn_available, set_cpu_gemm
from .io import load_model, save_model
from .loss import flow_matching_loss, frequency_aware_loss, frequency_weights
from .model import BaselineDiT, DeCo, DiffusionTransformer, build_model
from .sampling import sample, time_grid
from .train import Draws, NonFiniteLossError, TrainConfig, Trainer

__all__ = [
    "BaselineDiT",
    "DeCo",
    "DeCoConfig",
    "DiffusionTransformer",
    "Draws",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "build_model",
    "cpu_gemm",
    "cpu_gemm_backend",
    "flow_matching_loss",
    "frequency_aware_loss",
    "frequency_weights",
    "load_model",
    "onednn_available",
    "sample",
    "save_model",
    "set_cpu_gemm",
    "time_grid",
]
