"""`deco.optimized.sample` against `deco.reference.sample` (spec/04-sampling.md), in float64.

Random solver settings (Euler, Heun exact and velocity-reusing, 1-4 steps, guidance scale and
interval, time shift) on a tiny model with random non-zero weights agree to 1e-10 relative.
The release's own sampler outputs are checked in test_optimized_weights.py (fixtures).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_weights, rel_err, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from deco import reference as R
from deco.optimized import DeCo, build_model, sample, time_grid
from deco.reference.sampling import euler as reference_euler

SETTINGS = settings(max_examples=20, deadline=None)
F64_RTOL = 1e-10


def models(architecture: str, seed: int) -> tuple[R.Model, Any]:
    config = tiny_config(architecture)
    weights = random_weights(config, seed)
    model = build_model(config).double()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    return R.Model(config, weights), model.eval()


def draws(batch: int, seed: int, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, 8, 4)), rng.integers(0, num_classes, batch)


@SETTINGS
@given(
    architecture=st.sampled_from(["deco", "baseline"]),
    solver=st.sampled_from(["euler", "heun", "adams"]),
    exact_heun=st.booleans(),
    steps=st.integers(1, 4),
    guidance=st.one_of(st.just(1.0), st.floats(0.0, 4.0)),
    bounds=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).map(sorted),
    timeshift=st.floats(0.25, 4.0),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2**31),
)
def test_sample_matches_reference(architecture: str, solver: str, exact_heun: bool, steps: int,
                                  guidance: float, bounds: list[float], timeshift: float,
                                  batch: int, seed: int) -> None:
    ref, model = models(architecture, seed)
    noise, labels = draws(batch, seed + 1)
    kwargs: dict[str, Any] = dict(steps=steps, guidance=guidance, interval=tuple(bounds),
                                  timeshift=timeshift, solver=solver, exact_heun=exact_heun)
    expected = R.sample(ref, noise, labels, **kwargs)
    got = sample(model, torch.as_tensor(noise), torch.as_tensor(labels), **kwargs)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    assert rel_err(got.numpy(), expected) <= F64_RTOL


@pytest.mark.parametrize("steps", [1, 3])
def test_euler_trajectory_matches_reference(steps: int) -> None:
    ref, model = models("deco", 1)
    noise, labels = draws(2, 2)
    interval = (0.2, 0.9)
    trajectory: list[Any] = []
    grid = R.time_grid(steps, 2.0)
    reference_euler(ref, noise, labels, grid, 3.0, interval, trajectory)
    out, states = sample(model, torch.as_tensor(noise), torch.as_tensor(labels), steps=steps,
                         guidance=3.0, interval=interval, timeshift=2.0, return_trajectory=True)
    assert states.shape == (steps + 1, *noise.shape)
    assert rel_err(states.numpy(), np.stack(trajectory)) <= F64_RTOL
    assert torch.equal(states[-1], out)


@pytest.mark.parametrize("timeshift", [0.5, 1.0, 3.0])
def test_time_grid_matches_reference(timeshift: float) -> None:
    np.testing.assert_allclose(time_grid(5, timeshift), R.time_grid(5, timeshift), rtol=1e-15)


class CountingModel(torch.nn.Module):
    """Records the batch size of every call, to see when the null branch is evaluated."""

    def __init__(self, model: DeCo) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.model(x, t, y)


def test_null_branch_is_evaluated_only_where_guidance_is_in_force() -> None:
    _, model = models("deco", 3)
    noise, labels = (torch.as_tensor(a) for a in draws(2, 4))
    counting = CountingModel(model)
    sample(counting, noise, labels, steps=4, guidance=1.0)
    assert counting.batches == [2, 2, 2, 2]
    counting.batches.clear()
    # grid 0, .25, .5, .75, 1: guidance in force where 0.3 < t <= 1 (steps starting at .5, .75)
    sample(counting, noise, labels, steps=4, guidance=2.0, interval=(0.3, 1.0), solver="heun",
           exact_heun=True)
    # Heun exact: predictor and corrector per step, a plain Euler last step.
    assert counting.batches == [2, 2, 2, 2, 4, 4, 4]


def test_sample_runs_in_inference_mode() -> None:
    _, model = models("baseline", 5)
    noise, labels = draws(1, 6)
    out = sample(model, torch.as_tensor(noise), labels.tolist(), steps=2, guidance=2.0)
    assert out.is_inference() and not out.requires_grad


def _bad_calls() -> list[Any]:
    noise = torch.zeros(2, 3, 8, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1])
    ok: dict[str, Any] = dict(steps=2)
    return [
        pytest.param(noise[0], labels, ok, ValueError, "^noise", id="noise-rank"),
        pytest.param(noise.numpy(), labels, ok, TypeError, "^noise", id="noise-numpy"),
        pytest.param(noise.long(), labels, ok, TypeError, "^noise", id="noise-int"),
        pytest.param(noise, torch.tensor([0.0, 1.0]), ok, TypeError, "^labels", id="labels-float"),
        pytest.param(noise, torch.tensor([0]), ok, ValueError, "^labels", id="labels-shape"),
        pytest.param(noise, torch.tensor([0, 11]), ok, ValueError, "^labels", id="labels-range"),
        pytest.param(noise, torch.tensor([-1, 0]), ok, ValueError, "^labels", id="labels-negative"),
        pytest.param(noise, "ab", ok, TypeError, "^labels", id="labels-str"),
        pytest.param(noise, labels, dict(steps=0), ValueError, "^steps", id="steps-zero"),
        pytest.param(noise, labels, dict(steps=2.0), TypeError, "^steps", id="steps-float"),
        pytest.param(noise, labels, dict(steps=True), TypeError, "^steps", id="steps-bool"),
        pytest.param(noise, labels, dict(steps=2, guidance=float("nan")), ValueError, "^guidance",
                     id="guidance-nan"),
        pytest.param(noise, labels, dict(steps=2, guidance="2"), TypeError, "^guidance",
                     id="guidance-str"),
        pytest.param(noise, labels, dict(steps=2, interval=(0.6, 0.4)), ValueError, "^interval",
                     id="interval-order"),
        pytest.param(noise, labels, dict(steps=2, interval=(0.0, 1.5)), ValueError, "^interval",
                     id="interval-range"),
        pytest.param(noise, labels, dict(steps=2, interval=0.5), TypeError, "^interval",
                     id="interval-scalar"),
        pytest.param(noise, labels, dict(steps=2, timeshift=0.0), ValueError, "^timeshift",
                     id="timeshift-zero"),
        pytest.param(noise, labels, dict(steps=2, solver="rk4"), ValueError, "^solver",
                     id="solver"),
    ]


@pytest.mark.parametrize(("noise", "labels", "kwargs", "error", "match"), _bad_calls())
def test_bad_input_names_the_argument(noise: Any, labels: Any, kwargs: dict[str, Any],
                                      error: type, match: str) -> None:
    _, model = models("deco", 0)
    with pytest.raises(error, match=match):
        sample(model, noise, labels, **kwargs)


@settings(max_examples=10, deadline=None)
@given(order=st.integers(1, 4), steps=st.integers(1, 5), guidance=st.floats(0.0, 4.0),
       seed=st.integers(0, 2**31))
def test_adams_and_null_labels_match_reference(order: int, steps: int, guidance: float,
                                               seed: int) -> None:
    # The class models' unconditional branch may be given as labels (default: the null class).
    ref, model = models("deco", seed)
    noise, labels = draws(2, seed + 1)
    null = np.array([10, 3])
    kwargs: dict[str, Any] = dict(steps=steps, guidance=guidance, solver="adams", order=order)
    expected = R.sample(ref, noise, labels, null, **kwargs)
    got = sample(model, torch.as_tensor(noise), torch.as_tensor(labels), torch.as_tensor(null), **kwargs)
    assert rel_err(got, expected) < F64_RTOL
    default = sample(model, torch.as_tensor(noise), torch.as_tensor(labels), **kwargs)
    explicit = sample(model, torch.as_tensor(noise), torch.as_tensor(labels), torch.full((2,), 10),
                      **kwargs)
    assert torch.equal(default, explicit)
