"""Defaults and error paths of `deco.optimized`'s public functions and of the flow helpers of its
training step (found by mutation testing).

Defaults are pinned by the release's own outputs (A.npz, float32: frequency weights and losses at
quality 85, the Heun fixture sampled with the release's default interval, time shift and Heun
variant, the Euler fixture with the default solver) and by closed forms (shift 1 is the identity,
N(0, 1) logit-normal times are scipy's expit of the draws).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import cases, random_weights, rel_err, tiny_config
from scipy.special import expit

from deco import optimized as O
from deco import reference as R
from deco.optimized.flow import drop_labels, interpolate, logit_normal_time, target_velocity, time_shift

F32_RTOL = 1e-5


@pytest.fixture(scope="module")
def npz(fixtures_dir: Path) -> Any:
    return np.load(fixtures_dir / "A.npz")


@pytest.fixture(scope="module")
def release_model(fixtures_dir: Path) -> Any:
    return O.load_model(fixtures_dir / "A.ckpt")


def _t(a: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=dtype)


# ---------------------------------------------------------------------------------- defaults
def test_frequency_weights_default_is_quality_85(npz: Any) -> None:
    w = O.frequency_weights()
    assert w.dtype == torch.float32 and w.device.type == "cpu"
    assert rel_err(w.numpy(), npz["freq_weight_q85"]) <= 1e-6
    assert rel_err(w.numpy(), npz["freq_weight_q50"]) > 1e-3


@pytest.mark.parametrize("j", [0, 1])
def test_frequency_aware_loss_default_is_quality_85(npz: Any, j: int) -> None:
    pred, target = _t(npz[f"loss{j}_pred"]), _t(npz[f"loss{j}_target"])
    got = float(O.frequency_aware_loss(pred, target))
    assert rel_err(got, npz[f"loss{j}_freq_q85"]) <= F32_RTOL
    assert rel_err(float(O.frequency_aware_loss(pred, target, quality=86)), npz[f"loss{j}_freq_q85"]) > 1e-4


def test_sample_defaults_reproduce_the_release_heun(release_model: Any, npz: Any) -> None:
    s = json.loads(bytes(npz["config"]))["heun"]
    assert (s["guidance_interval_min"], s["guidance_interval_max"], s["timeshift"]) == (0.0, 1.0, 1.0)
    assert s["exact_henu"] is False
    out = O.sample(release_model, _t(npz["sample_noise"]), _t(npz["sample_cond"], torch.int64),
                   steps=s["num_steps"], guidance=s["guidance"], solver="heun")
    assert isinstance(out, torch.Tensor)
    assert rel_err(out.numpy(), npz["heun_out"]) <= F32_RTOL


def test_sample_default_solver_is_euler(release_model: Any, npz: Any) -> None:
    s = json.loads(bytes(npz["config"]))["euler"]
    out = O.sample(release_model, _t(npz["sample_noise"]), _t(npz["sample_cond"], torch.int64),
                   steps=s["num_steps"], guidance=s["guidance"],
                   interval=(s["guidance_interval_min"], s["guidance_interval_max"]))
    assert isinstance(out, torch.Tensor)
    assert rel_err(out.numpy(), npz["euler_out"]) <= F32_RTOL


def test_time_grid_default_has_no_shift() -> None:
    assert O.time_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_time_shift_default_is_the_identity() -> None:
    t = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(time_shift(t), t)


def test_logit_normal_default_is_standard() -> None:
    n = np.random.default_rng(1).standard_normal(64) * 3
    np.testing.assert_allclose(logit_normal_time(_t(n, torch.float64)).numpy(), expit(n), rtol=1e-14)


# -------------------------------------------------------------------------------- boundaries
def test_drop_labels_uniform_draws_at_exactly_0_and_1() -> None:
    labels, u = torch.tensor([3, 4, 5]), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert drop_labels(labels, u, 0.0, 9).tolist() == [3, 4, 5]
    assert drop_labels(labels, u, 0.5, 9).tolist() == [9, 4, 5]
    assert drop_labels(labels, u, 1.0, 9).tolist() == [9, 9, 5]
    assert drop_labels(labels, u, 1.0, 9).dtype == labels.dtype
    assert drop_labels(torch.tensor([0, 1]), u[1:], 0.6, 1).tolist() == [1, 1]  # null_class = 1


def test_interpolate_endpoints() -> None:
    x, noise = torch.randn(2, 2, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(interpolate(x, noise, torch.zeros(2, dtype=torch.float64)), noise)
    assert torch.equal(interpolate(x, noise, torch.ones(2, dtype=torch.float64)), x)
    t = torch.tensor([0.25, 0.75], dtype=torch.float64)
    expected = R.interpolate(x.numpy(), noise.numpy(), t.numpy())
    np.testing.assert_allclose(interpolate(x, noise, t).numpy(), expected, rtol=1e-15)
    assert torch.equal(target_velocity(x, noise), x - noise)


@pytest.mark.parametrize(("h", "w"), [(4, 8), (8, 4), (1, 1)])
def test_loss_refuses_an_image_as_small_as_the_padding(h: int, w: int) -> None:
    z = torch.zeros(1, 3, h, w)
    with pytest.raises(ValueError, match=r"^pred: reflect padding"):
        O.frequency_aware_loss(z, z)


@pytest.mark.parametrize(("h", "w"), [(5, 8), (8, 5), (5, 13)])
def test_loss_just_above_the_padding_limit_matches_the_reference(h: int, w: int) -> None:
    rng = np.random.default_rng(h + 10 * w)
    pred, target = rng.standard_normal((2, 2, 3, h, w))
    got = float(O.frequency_aware_loss(_t(pred, torch.float64), _t(target, torch.float64)))
    assert rel_err(got, R.frequency_aware_loss(pred, target)) <= 1e-12


@pytest.mark.parametrize("architecture", ["deco", "baseline"])
def test_scalar_time_broadcasts_over_the_batch_not_the_channels(architecture: str) -> None:
    config = tiny_config(architecture)
    model = O.build_model(config).double().eval()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in random_weights(config, 5).items()})
    batch = 2
    assert batch != config.in_channels
    x = torch.randn(batch, 3, 2 * config.patch_size, config.patch_size, dtype=torch.float64)
    y = torch.tensor([0, config.num_classes])
    with torch.no_grad():
        scalar = model(x, torch.tensor(0.3, dtype=torch.float64), y)
        full = model(x, torch.full((batch,), 0.3, dtype=torch.float64), y)
    assert torch.equal(scalar, full)


# ---------------------------------------------------------------------------------- bad input
class _Zero(torch.nn.Module):
    """A velocity model with 3 real classes whose velocity is 0."""

    config = tiny_config("deco", num_classes=3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> zeros of that shape."""
        return torch.zeros_like(x)


NOISE = torch.zeros(2, 3, 8, 8)
IMG = torch.zeros(1, 3, 8, 8)
X4, L2, U2 = torch.zeros(2, 3, 4, 4), torch.tensor([1, 2]), torch.tensor([0.1, 0.2])


def _sample(**kwargs: Any) -> Any:
    args: dict[str, Any] = {"noise": NOISE, "labels": torch.tensor([0, 3]), "steps": 2}
    args.update(kwargs)
    return O.sample(_Zero(), args.pop("noise"), args.pop("labels"), **args)


BAD_INPUTS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("sample-interval-scalar", lambda: _sample(interval=0.5), TypeError, "interval"),
    ("sample-interval-triple", lambda: _sample(interval=(0.0, 0.5, 1.0)), TypeError, "interval"),
    ("sample-interval-string", lambda: _sample(interval="01"), TypeError, "interval"),
    ("sample-interval-order", lambda: _sample(interval=(0.8, 0.2)), ValueError, "interval"),
    ("sample-interval-nan", lambda: _sample(interval=(float("nan"), 1.0)), ValueError, "interval"),
    ("sample-solver-int", lambda: _sample(solver=3), TypeError, "solver"),
    ("sample-solver-none", lambda: _sample(solver=None), TypeError, "solver"),
    ("sample-solver-name", lambda: _sample(solver="rk4"), ValueError, "solver"),
    ("sample-steps-zero", lambda: _sample(steps=0), ValueError, "steps"),
    ("sample-steps-float", lambda: _sample(steps=2.0), TypeError, "steps"),
    ("sample-timeshift-zero", lambda: _sample(timeshift=0.0), ValueError, "timeshift"),
    ("sample-timeshift-str", lambda: _sample(timeshift="2"), TypeError, "timeshift"),
    ("sample-guidance-nan", lambda: _sample(guidance=float("nan")), ValueError, "guidance"),
    ("sample-noise-int", lambda: _sample(noise=NOISE.long()), TypeError, "noise"),
    ("sample-noise-rank", lambda: _sample(noise=torch.zeros(2, 3, 8)), ValueError, "noise"),
    ("sample-labels-range", lambda: _sample(labels=torch.tensor([0, 4])), ValueError, "labels"),
    ("sample-labels-float", lambda: _sample(labels=torch.tensor([0.0, 1.0])), TypeError, "labels"),
    ("weights-quality-0", lambda: O.frequency_weights(0), ValueError, "quality"),
    ("weights-quality-101", lambda: O.frequency_weights(101), ValueError, "quality"),
    ("weights-quality-float", lambda: O.frequency_weights(85.0), TypeError, "quality"),  # type: ignore
    ("weights-quality-bool", lambda: O.frequency_weights(True), TypeError, "quality"),
    ("weights-gamma-nan", lambda: O.frequency_weights(85, float("nan")), ValueError, "gamma"),
    ("weights-gamma-str", lambda: O.frequency_weights(85, "1"), TypeError, "gamma"),  # type: ignore[arg-type]
    ("loss-quality-101", lambda: O.frequency_aware_loss(IMG, IMG, quality=101), ValueError, "quality"),
    ("loss-gamma-inf", lambda: O.frequency_aware_loss(IMG, IMG, gamma=float("inf")), ValueError, "gamma"),
    ("loss-pred-array", lambda: O.frequency_aware_loss(IMG.numpy(), IMG), TypeError, "pred"),  # type: ignore
    ("loss-pred-int", lambda: O.frequency_aware_loss(IMG.long(), IMG), TypeError, "pred"),
    ("loss-pred-channels", lambda: O.frequency_aware_loss(torch.zeros(1, 4, 8, 8), IMG), ValueError, "pred"),
    ("loss-target-shape", lambda: O.frequency_aware_loss(IMG, NOISE), ValueError, "target"),
    ("fm-target-shape", lambda: O.flow_matching_loss(IMG, NOISE), ValueError, "target"),
    ("shift-zero", lambda: time_shift(torch.tensor([0.5]), 0.0), ValueError, "shift"),
    ("shift-negative", lambda: time_shift(torch.tensor([0.5]), -2.0), ValueError, "shift"),
    ("drop-p-range", lambda: drop_labels(L2, U2, 1.5, 10), ValueError, "p"),
    ("drop-labels-float", lambda: drop_labels(L2.double(), U2, 0.5, 10), TypeError, "labels"),
    ("drop-labels-2d", lambda: drop_labels(L2[None], U2[None], 0.5, 10), TypeError, "labels"),
    ("drop-uniform-shape", lambda: drop_labels(L2, U2[:1], 0.5, 10), ValueError, "uniform"),
    ("drop-labels-above-null", lambda: drop_labels(L2, U2, 0.5, 1), ValueError, "labels"),
    ("drop-labels-negative", lambda: drop_labels(-L2, U2, 0.5, 10), ValueError, "labels"),
    ("interpolate-noise-broadcast", lambda: interpolate(X4, X4[..., :1], torch.ones(2)), ValueError, "noise"),
    ("interpolate-noise-batch", lambda: interpolate(X4, X4[:1], torch.ones(2)), ValueError, "noise"),
]


@pytest.mark.parametrize(("call", "error", "name"), cases(BAD_INPUTS))
def test_bad_input_names_the_argument(call: Callable[[], object], error: type[Exception], name: str) -> None:
    with pytest.raises(error, match=rf"^{name}:"):
        call()
