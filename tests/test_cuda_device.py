"""deco.optimized on a CUDA device against the float64 reference (`pytest -m cuda`; skipped
without CUDA): float32 with TF32 off for the forward of both architectures and for guided Euler and
Heun sampling, and bfloat16 weights within the calibrated bound of spec/00 §5: at most
BF16_FACTOR (4) times the error of the float64 reference fed the bf16-rounded weights and inputs
(the rounding floor), and far above float32 rounding (bfloat16 really ran). The CPU test below
runs everywhere and keeps the rule honest for a model cast entirely to bfloat16: over 24 draws
of these tiny models (DeCo and baseline) the ratio to the floor was 1.5-2.9 (median 1.9).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_weights, rel_err, tiny_config
from test_optimized_model import BF16_FACTOR, bf16_round

from deco import reference as R
from deco.optimized.gemm import full_float32_products
from deco.optimized.sampling import sample
from deco.optimized.weights import build_model

#: spec/00-conventions.md §5: float32 vs the float64 reference on tiny models.
F32_RTOL = 1e-5
#: Below this a "bfloat16" result is float32 in disguise (bfloat16's unit roundoff is 3.9e-3).
BF16_MIN_ERROR = 1e-3

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def case(architecture: str, seed: int) -> tuple[Any, dict[str, np.ndarray], tuple[Any, Any, Any]]:
    config = tiny_config(architecture)
    weights = random_weights(config, seed)
    rng = np.random.default_rng(seed)
    x, t, y = rng.standard_normal((3, 3, 8, 12)), rng.uniform(0, 1, 3), rng.integers(0, 11, 3)
    return config, weights, (x, t, y)


def forward(config: Any, weights: dict[str, np.ndarray], data: tuple[Any, Any, Any], device: str,
            dtype: torch.dtype) -> np.ndarray:
    model = build_model(config)
    model.load_state_dict({k: torch.from_numpy(v).float() for k, v in weights.items()})
    model = model.to(device, dtype).eval()
    x, t, y = data
    with torch.no_grad():
        out = model(torch.as_tensor(x, dtype=torch.float32, device=device),
                    torch.as_tensor(t, dtype=torch.float32, device=device), torch.as_tensor(y, device=device))
    result: np.ndarray = out.cpu().double().numpy()
    return result


def check_bfloat16(architecture: str, seed: int, device: str) -> None:
    """The bfloat16 model's error is above float32 rounding and within BF16_FACTOR x the floor."""
    config, weights, data = case(architecture, seed)
    expected = R.Model(config, weights).forward(*data)
    err = rel_err(forward(config, weights, data, device, torch.bfloat16), expected)
    x, t, y = data
    floor = R.Model(config, {k: bf16_round(v) for k, v in weights.items()}).forward(
        bf16_round(x), bf16_round(t), y)
    err_floor = rel_err(floor, expected)
    assert BF16_MIN_ERROR < err <= BF16_FACTOR * err_floor, f"bf16 {err:.2e} vs floor {err_floor:.2e}"


@pytest.mark.parametrize("architecture", ["deco", "baseline"])
@pytest.mark.parametrize("seed", [0, 5])
def test_bfloat16_bound_on_the_cpu(architecture: str, seed: int) -> None:
    check_bfloat16(architecture, seed, "cpu")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("architecture", ["deco", "baseline"])
def test_cuda_float32_forward_without_tf32(architecture: str) -> None:
    config, weights, data = case(architecture, 2)
    with full_float32_products():
        got = forward(config, weights, data, "cuda", torch.float32)
    assert rel_err(got, R.Model(config, weights).forward(*data)) <= F32_RTOL


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("architecture", ["deco", "baseline"])
@pytest.mark.parametrize("seed", [0, 5])
def test_cuda_bfloat16_forward_within_the_calibrated_bound(architecture: str, seed: int) -> None:
    check_bfloat16(architecture, seed, "cuda")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_cuda_float32_guided_sampling_matches_reference(solver: str) -> None:
    config, weights, _ = case("deco", 4)
    rng = np.random.default_rng(4)
    noise, labels = rng.standard_normal((2, 3, 8, 12)), np.array([3, 7])
    options: dict[str, Any] = {"steps": 5, "guidance": 2.5, "interval": (0.2, 1.0), "solver": solver}
    model = build_model(config)
    model.load_state_dict({k: torch.from_numpy(v).float() for k, v in weights.items()})
    model = model.cuda().eval()
    with full_float32_products():
        got = sample(model, torch.as_tensor(noise, dtype=torch.float32, device="cuda"),
                     torch.as_tensor(labels, device="cuda"), **options)
    assert isinstance(got, torch.Tensor)
    expected = R.sample(R.Model(config, weights), noise, labels, **options)
    assert rel_err(got.cpu().double().numpy(), expected) <= F32_RTOL
