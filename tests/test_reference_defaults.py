"""Defaults, boundaries and rarely taken error paths of `deco.reference` (found by mutation testing).

A call that leaves an argument out must equal the paper's / release's setting, shown against an
independent oracle: the release's own outputs (A.npz: frequency weights and losses at quality 85,
the Heun fixture sampled with the release's default interval, time shift and Heun variant),
closed forms (shift 1 is the identity, N(0, 1) logit-normal times are scipy's expit of the draws)
or a hand-written Euler loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import FIXTURE_RTOL, random_weights, rel_err, tiny_config
from scipy.special import expit

from deco import reference as R
from deco.reference.frequency import JPEG_CHROMINANCE, JPEG_LUMINANCE, reflect_pad
from deco.reference.sampling import guidance_at


@pytest.fixture(scope="module")
def npz(fixtures_dir: Path) -> Any:
    return np.load(fixtures_dir / "A.npz")


@pytest.fixture(scope="module")
def release_model(fixtures_dir: Path) -> R.Model:
    from deco.release import read_release_checkpoint

    config, state = read_release_checkpoint(fixtures_dir / "A.ckpt", "ema")
    return R.Model(config, {k: v.numpy() for k, v in state.items()})


# ---------------------------------------------------------------------------------- defaults
def test_frequency_weights_default_is_quality_85_gamma_1(npz: Any) -> None:
    assert rel_err(R.frequency_weights(), npz["freq_weight_q85"]) <= FIXTURE_RTOL
    assert rel_err(R.frequency_weights(), npz["freq_weight_q50"]) > 100 * FIXTURE_RTOL  # tells q apart


def test_every_base_table_entry_matches_the_release(npz: Any) -> None:
    """At quality 50 the quantisation table is the base table T and w = (mean Q / Q) / mean, so the
    release's q50 weights give T = T[0, 0] w[0, 0] / w entry by entry (T[0, 0] = 16 luminance,
    17 chrominance, Annex K). Quality 85 alone cannot see every entry: floor((30 T + 50) / 100)
    maps neighbouring integers to the same step."""
    w50 = npz["freq_weight_q50"].astype(np.float64)
    tables = [(JPEG_LUMINANCE, 16), (JPEG_CHROMINANCE, 17), (JPEG_CHROMINANCE, 17)]  # Y, Cb, Cr
    for c, (base, corner) in enumerate(tables):
        recovered = corner * w50[c, 0, 0] / w50[c]
        np.testing.assert_allclose(recovered, np.round(recovered), atol=1e-3)  # integers, up to float32
        np.testing.assert_array_equal(np.round(recovered), base)


def test_quantisation_rounds_half_up() -> None:
    """Q = floor((T scale + 50) / 100): at quality 50 (scale 100) a step of 1.49 rounds to 1 and
    1.5 to 2. The JPEG tables are integers and never reach such a tie, so only a non-table base
    pins the offset 50."""
    np.testing.assert_array_equal(R.quantisation_table(np.array([[1.49, 1.5, 2.5]]), 50), [[1, 2, 3]])


@pytest.mark.parametrize("j", [0, 1])
def test_frequency_aware_loss_default_is_quality_85(npz: Any, j: int) -> None:
    pred, target = npz[f"loss{j}_pred"], npz[f"loss{j}_target"]
    assert rel_err(R.frequency_aware_loss(pred, target), npz[f"loss{j}_freq_q85"]) <= FIXTURE_RTOL
    # the neighbouring qualities give measurably different losses, so the check can fail
    assert rel_err(R.frequency_aware_loss(pred, target, quality=86), npz[f"loss{j}_freq_q85"]) > 1e-4


def test_time_shift_default_is_the_identity() -> None:
    t = np.random.default_rng(0).uniform(size=50)
    np.testing.assert_array_equal(R.time_shift(t), t)


def test_logit_normal_default_is_standard() -> None:
    n = np.random.default_rng(1).standard_normal(64) * 3
    np.testing.assert_allclose(R.logit_normal_time(n), expit(n), rtol=1e-14, atol=0)


def test_sample_defaults_reproduce_the_release_heun(release_model: R.Model, npz: Any) -> None:
    """The Heun fixture was sampled with the release's defaults (interval (0, 1), time shift 1,
    the velocity-reusing Heun): leaving those out must reproduce it."""
    s = json.loads(bytes(npz["config"]))["heun"]
    assert (s["guidance_interval_min"], s["guidance_interval_max"], s["timeshift"]) == (0.0, 1.0, 1.0)
    assert s["exact_henu"] is False
    out = R.sample(release_model, npz["sample_noise"], npz["sample_cond"], steps=s["num_steps"],
                   guidance=s["guidance"], solver="heun")
    assert rel_err(out, npz["heun_out"]) <= FIXTURE_RTOL


def test_sample_default_solver_is_euler(release_model: R.Model, npz: Any) -> None:
    s = json.loads(bytes(npz["config"]))["euler"]
    out = R.sample(release_model, npz["sample_noise"], npz["sample_cond"], steps=s["num_steps"],
                   guidance=s["guidance"], interval=(s["guidance_interval_min"], s["guidance_interval_max"]))
    assert rel_err(out, npz["euler_out"]) <= FIXTURE_RTOL


class _Linear:
    """v(x, t, y) = a_y x + b_y t: a toy class-conditional velocity field (class 2 is the null)."""

    config = type("C", (), {"num_classes": 2})()

    def __init__(self) -> None:
        self.a = np.array([0.5, -1.0, 0.25])
        self.b = np.array([1.0, 2.0, -0.5])

    def forward(self, x: Any, t: Any, y: Any) -> Any:
        shape = (-1,) + (1,) * (x.ndim - 1)
        return self.a[y].reshape(shape) * x + self.b[y].reshape(shape) * np.asarray(t).reshape(shape)


def test_sample_default_interval_guides_every_step_after_the_first() -> None:
    """Hand-written Euler with the guidance in force on (0, 1]: only t_0 = 0 is unguided."""
    model, g, steps = _Linear(), 3.0, 4
    noise = np.random.default_rng(2).standard_normal((2, 1, 2, 2))
    labels = np.array([0, 1])
    x = noise.copy()
    for i in range(steps):
        t = i / steps
        scale = 1.0 if i == 0 else g
        cond = model.forward(x, np.full(2, t), labels)
        null = model.forward(x, np.full(2, t), np.full(2, 2))
        x = x + (1 / steps) * (null + scale * (cond - null))
    np.testing.assert_allclose(R.sample(model, noise, labels, steps=steps, guidance=g), x, rtol=1e-13)
    assert guidance_at(1.0, g, (0.0, 1.0)) == g and guidance_at(0.0, g, (0.0, 1.0)) == 1.0


# -------------------------------------------------------------------------------- boundaries
@pytest.mark.parametrize(("h", "w"), [(4, 8), (8, 4), (4, 4), (1, 8), (3, 5)])
def test_reflect_pad_refuses_an_image_as_small_as_the_padding(h: int, w: int) -> None:
    """Padding 4 rows onto 4 (pad = size) would need the edge twice: refused, like torch."""
    with pytest.raises(ValueError, match=r"^x: reflect padding"):
        R.block_dct(np.zeros((1, 3, h, w)))
    with pytest.raises(ValueError, match=r"^pred:|^x:"):
        R.frequency_aware_loss(np.zeros((1, 3, h, w)), np.zeros((1, 3, h, w)))


@pytest.mark.parametrize(("h", "w"), [(5, 8), (8, 5), (5, 5), (9, 13)])
def test_reflect_pad_just_above_the_limit(h: int, w: int) -> None:
    x = np.random.default_rng(h * w).standard_normal((1, 2, h, w))
    ph, pw = (-h) % 8, (-w) % 8
    padded = reflect_pad(x)
    assert padded.shape == (1, 2, h + ph, w + pw)
    for i in range(ph):  # mirror without repeating the edge: row h + i is row h - 2 - i
        np.testing.assert_array_equal(padded[:, :, h + i, :w], x[:, :, h - 2 - i, :])
    for j in range(pw):
        np.testing.assert_array_equal(padded[:, :, :h, w + j], x[:, :, :, w - 2 - j])


def test_drop_labels_uniform_draws_at_exactly_0_and_1() -> None:
    labels, u = np.array([3, 4, 5]), np.array([0.0, 0.5, 1.0])
    np.testing.assert_array_equal(R.drop_labels(labels, u, 0.0, 9), [3, 4, 5])  # 0 < 0 is false
    np.testing.assert_array_equal(R.drop_labels(labels, u, 0.5, 9), [9, 4, 5])  # 0.5 < 0.5 is false
    np.testing.assert_array_equal(R.drop_labels(labels, u, 1.0, 9), [9, 9, 5])  # 1 < 1 is false
    just_below = np.nextafter(u, -1.0)  # the largest doubles below 0 (invalid), 0.5 and 1
    np.testing.assert_array_equal(R.drop_labels(labels[1:], just_below[1:], 0.5, 9), [9, 5])


def test_drop_labels_null_class_one() -> None:
    np.testing.assert_array_equal(R.drop_labels(np.array([0, 1, 0]), np.array([0.9, 0.9, 0.1]), 0.5, 1),
                                  [0, 1, 1])
    with pytest.raises(ValueError, match=r"^labels:"):
        R.drop_labels(np.array([0, 2]), np.array([0.9, 0.9]), 0.5, 1)


def test_drop_labels_rejects_out_of_range_labels() -> None:
    for bad in ([0, 11], [-1, 3]):
        with pytest.raises(ValueError, match=r"^labels: labels must lie in 0\.\.10"):
            R.drop_labels(np.array(bad), np.array([0.9, 0.9]), 0.5, 10)
    np.testing.assert_array_equal(R.drop_labels(np.array([10, 0]), np.array([0.9, 0.9]), 0.5, 10),
                                  [10, 0])  # the null class itself is a valid label


@pytest.mark.parametrize("labels", [np.zeros((2, 2), dtype=np.int64), np.int64(3)])
def test_drop_labels_rejects_non_1d_labels(labels: Any) -> None:
    with pytest.raises(ValueError, match=r"^labels: expected a 1-D array"):
        R.drop_labels(labels, np.zeros(np.shape(labels)), 0.5, 10)


def test_uniform_time_accepts_the_closed_interval() -> None:
    np.testing.assert_array_equal(R.uniform_time([0.0, 1.0]), [0.0, 1.0])
    for bad in (-np.nextafter(0.0, 1.0), np.nextafter(1.0, 2.0)):
        with pytest.raises(ValueError, match=r"^uniform:"):
            R.uniform_time([0.5, bad])


def test_time_shift_rejects_t_just_above_1() -> None:
    assert R.time_shift(1.0, 3.0) == 1.0
    with pytest.raises(ValueError, match=r"^t:"):
        R.time_shift(np.nextafter(1.0, 2.0), 3.0)
    with pytest.raises(ValueError, match=r"^t:"):
        R.time_shift(-np.nextafter(0.0, 1.0), 3.0)


@pytest.mark.parametrize("noise_shape", [(2, 3, 4, 1), (1, 3, 4, 4), (3, 4, 4), (2, 1, 4, 4)])
def test_interpolate_rejects_broadcastable_noise(noise_shape: tuple[int, ...]) -> None:
    """NumPy would broadcast these silently; the spec asks for the exact shape of x."""
    x = np.zeros((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"^noise: expected the shape of x"):
        R.interpolate(x, np.zeros(noise_shape), [0.5, 0.5])
    with pytest.raises(ValueError, match=r"^noise: expected the shape of x"):
        R.target_velocity(x, np.zeros(noise_shape))


# ------------------------------------------------------------------------------ broadcasting
@pytest.mark.parametrize("architecture", ["deco", "baseline"])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_scalar_time_broadcasts_over_the_batch_not_the_channels(architecture: str, batch: int) -> None:
    config = tiny_config(architecture)
    assert config.in_channels == 3 and batch != config.in_channels
    model = R.Model(config, random_weights(config, 4))
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, 3, 2 * config.patch_size, config.patch_size))
    y = rng.integers(0, config.num_classes + 1, batch)
    np.testing.assert_array_equal(model.forward(x, 0.3, y), model.forward(x, np.full(batch, 0.3), y))
