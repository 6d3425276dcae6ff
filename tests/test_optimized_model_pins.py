"""Pins for `deco.optimized.model` and `deco.optimized.layers` found by mutation testing
(tests/MUTATION.md).

- Initialisation (spec/03 §8, the release's): label table and time-MLP weights N(0, 0.02^2), patch
  embedding Xavier-uniform (bound sqrt(6 / (fan_in + fan_out))). Checked on the sample statistics
  of a fresh DeCo-tiny's weights with tolerances of >= 7 standard errors of the estimate, far
  from any other scale.
- The RoPE tables against the reference's angles on non-square grids, for the class models
  (both spans 16) and the text model (spans crossed: x positions span the grid's height).
- The constant tables (time features, RoPE, decoder position features) are built on the device
  asked for: the "meta" device stands in for a CUDA one on a CPU-only machine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import rel_err, tiny_config

from deco.optimized import layers
from deco.optimized.weights import build_model
from deco.reference import model as RM
from deco.reference import text_to_image as RT

META = torch.device("meta")


@pytest.mark.parametrize(("name", "rtol"), [("t_embed.fc1.weight", 0.1), ("t_embed.fc2.weight", 0.1),
                                            ("y_embed.weight", 0.2)])
def test_label_table_and_time_mlp_start_normal_with_std_0_02(name: str, rtol: float) -> None:
    torch.manual_seed(0)
    weight = build_model(tiny_config()).state_dict()[name].double()
    assert abs(float(weight.std()) / 0.02 - 1) < rtol, float(weight.std())
    assert abs(float(weight.mean())) < 0.02 * 8 / math.sqrt(weight.numel())


def test_patch_embedding_starts_xavier_uniform() -> None:
    torch.manual_seed(0)
    state = build_model(tiny_config()).state_dict()
    weight, bias = state["patch_embed.weight"].double(), state["patch_embed.bias"]
    bound = math.sqrt(6.0 / sum(weight.shape))
    assert float(weight.abs().max()) <= bound and float(weight.abs().max()) > 0.95 * bound
    assert abs(float(weight.std()) / (bound / math.sqrt(3.0)) - 1) < 0.1
    assert torch.count_nonzero(bias) == 0


def test_constant_tables_are_built_on_the_requested_device() -> None:
    assert layers.timestep_features(torch.zeros(2, device=META), torch.float32).device == META
    cos, sin = layers.rope_angles(2, 3, 16, META, torch.float32)
    assert cos.device == META and sin.device == META
    cos, sin = layers.text_rope_angles(2, 3, 16, META, torch.float32)
    assert cos.device == META and sin.device == META
    assert layers.dct_position_features(4, META, torch.float32).device == META
    assert layers.text_position_features(4, META, torch.float32).device == META


@pytest.mark.parametrize(("grid_h", "grid_w"), [(2, 5), (5, 2), (3, 3)])
def test_rope_tables_match_the_reference_angles(grid_h: int, grid_w: int) -> None:
    for ours, angles in ((layers.rope_angles, RM.rope_angles(grid_h, grid_w, 16)),
                         (layers.text_rope_angles, RT.text_rope_angles(grid_h, grid_w, 16))):
        cos, sin = ours(grid_h, grid_w, 16, torch.device("cpu"), torch.float64)
        assert tuple(cos.shape) == (grid_h * grid_w, 1, 8)
        assert rel_err(cos[:, 0].numpy(), np.cos(angles)) <= 1e-12
        assert rel_err(sin[:, 0].numpy(), np.sin(angles)) <= 1e-12
