"""`deco.optimized`: the fast PyTorch implementation of DeCo (spec/), tested against the float64 reference
(`reference/`; the two meet only in the tests).

One module per spec chapter, with the reference's module and function names: `checks` (00),
`flow` (01), `frequency` (02), `model` (03; its building blocks in `layers`, the CPU matrix
products in `gemm`), `sampling` (04), `weights` (05); `trainer` is the training step.
"""

from deco.config import DeCoConfig
from deco.errors import FieldError

from .flow import (
    drop_labels,
    drop_text,
    flow_matching_loss,
    interpolate,
    logit_normal_time,
    target_velocity,
    time_shift,
    uniform_time,
)
from .frequency import block_dct, frequency_aware_loss, frequency_weights, rgb_to_ycbcr
from .gemm import cpu_gemm, cpu_gemm_backend, full_float32_products, onednn_available, set_cpu_gemm
from .model import BaselineDiT, DeCo, DiffusionTransformer
from .sampling import SampleSettings, adams_weights, sample, sample_with, time_grid
from .text_to_image import TextDeCo
from .trainer import Draws, NonFiniteLossError, TrainConfig, Trainer
from .weights import build_model, load_model, save_model

__all__ = [
    "BaselineDiT",
    "DeCo",
    "DeCoConfig",
    "DiffusionTransformer",
    "Draws",
    "FieldError",
    "NonFiniteLossError",
    "SampleSettings",
    "TextDeCo",
    "TrainConfig",
    "Trainer",
    "adams_weights",
    "block_dct",
    "build_model",
    "cpu_gemm",
    "cpu_gemm_backend",
    "drop_labels",
    "drop_text",
    "flow_matching_loss",
    "frequency_aware_loss",
    "frequency_weights",
    "full_float32_products",
    "interpolate",
    "load_model",
    "logit_normal_time",
    "onednn_available",
    "rgb_to_ycbcr",
    "sample",
    "sample_with",
    "save_model",
    "set_cpu_gemm",
    "target_velocity",
    "time_grid",
    "time_shift",
    "uniform_time",
]
