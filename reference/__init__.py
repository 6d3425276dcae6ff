"""`deco.reference`: the readable float64 NumPy/SciPy reference of DeCo (spec/).

One function per equation of the spec, named as the spec names it. It never imports torch, so a
port can be checked against it anywhere.
"""

from deco.config import DeCoConfig

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
from .frequency import (
    block_dct,
    block_idct,
    dct_matrix,
    frequency_aware_loss,
    frequency_weights,
    quantisation_table,
    rgb_to_ycbcr,
    ycbcr_to_rgb,
)
from .sampling import adams_weights, sample, time_grid
from .weights import Model, load_model, load_weights, save_weights

__all__ = [
    "DeCoConfig",
    "Model",
    "adams_weights",
    "block_dct",
    "block_idct",
    "dct_matrix",
    "drop_labels",
    "drop_text",
    "flow_matching_loss",
    "frequency_aware_loss",
    "frequency_weights",
    "interpolate",
    "load_model",
    "load_weights",
    "logit_normal_time",
    "quantisation_table",
    "rgb_to_ycbcr",
    "sample",
    "save_weights",
    "target_velocity",
    "time_grid",
    "time_shift",
    "uniform_time",
    "ycbcr_to_rgb",
]
