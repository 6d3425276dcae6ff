"""The conformance kit's diagnosis (deco.conformance.diagnose) on synthetic arrays: each slip
detector recognises its slip, applied by hand to a random array, and nothing else; the
localisation names the region that was changed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from deco.conformance.diagnose import axis_names, locate, regions, slip_hint, worst_element

TOL = 1e-10
rng = np.random.default_rng(7)
X4 = rng.standard_normal((2, 3, 4, 6))  # (B, C, H, W): non-square, so H/W swaps change the shape


def hint(component: str, got: np.ndarray, expected: np.ndarray, precision: str = "float64",
         tol: float = TOL) -> str | None:
    found = slip_hint(component, got, expected, tol, precision)
    return None if found is None else found.slip


def test_last_two_axes_transposed() -> None:
    square = rng.standard_normal((2, 3, 8, 8))  # frequency_weights-like: (pairs, channel, u, v)
    assert hint("frequency_weights", np.swapaxes(square, -1, -2), square) == "transposed"
    # A different shape is recognised too: (.., 6, 4) for (.., 4, 6).
    assert hint("block_dct", np.swapaxes(X4, -1, -2), X4) == "transposed"


def test_height_and_width_swapped() -> None:
    assert hint("forward", np.swapaxes(X4, 2, 3), X4) == "height_width"
    dct = rng.standard_normal((1, 3, 2, 3, 8, 8))
    assert hint("block_dct", np.swapaxes(np.swapaxes(dct, 2, 3), 4, 5), dct) == "height_width"
    # RoPE angles compared through (cos, sin): x and y of each interleaved pair exchanged.
    angles = rng.uniform(-3, 3, (2, 15, 8))
    swapped = angles.reshape(2, 15, 4, 2)[..., ::-1].reshape(2, 15, 8)
    assert hint("rope_angles", swapped, angles) == "height_width"


def test_sign_flipped_and_constant_factor() -> None:
    assert hint("dit_block", -X4[0], X4[0]) == "sign"
    found = slip_hint("dit_block", 2.5 * X4[0], X4[0], TOL, "float64")
    assert found is not None and found.slip == "factor" and found.factor == pytest.approx(2.5)
    assert "2.5 times" in found.text
    # One number is a multiple of any other: no factor hint for a scalar.
    assert hint("frequency_aware_loss", np.array([0.3]), np.array([0.4])) is None


def test_halves_of_the_last_axis_swapped() -> None:
    features = rng.standard_normal((6, 256))
    assert hint("timestep_features", np.roll(features, 128, -1), features) == "halves"


@pytest.mark.parametrize("direction", [1, -1])
def test_shift_by_one(direction: int) -> None:
    grid = np.cumsum(rng.uniform(0.1, 1.0, 9))
    got = np.roll(grid, direction)
    got[0 if direction == 1 else -1] = 123.0  # the element shifted in from outside
    found = slip_hint("time_grid", got, grid, TOL, "float64")
    assert found is not None and found.slip == "shift" and "axis 0 (step)" in found.text


def test_float32_rounding_of_a_float64_port() -> None:
    rounded = X4.astype(np.float32).astype(np.float64)
    assert hint("forward", rounded, X4) == "float32"
    found = slip_hint("forward", rounded, X4, TOL, "float64")
    assert found is not None and "looks like float32: declare precision" in found.text
    # Declared float32, the same error is no slip (and passes the float32 tolerance anyway).
    assert hint("forward", rounded, X4, precision="float32", tol=1e-5) is None
    # An error far above float32 rounding is not taken for it.
    assert hint("forward", X4 * (1 + 1e-3 * rng.standard_normal(X4.shape)), X4) is None


def test_an_unrelated_error_gets_no_hint() -> None:
    noisy = X4 + 0.1 * rng.standard_normal(X4.shape)
    for component in ("forward", "block_dct", "timestep_features", "rope_angles", "time_grid"):
        assert hint(component, noisy, X4) is None, component
    # A slip plus an error beyond the tolerance is not a match: the hint promises a pass.
    assert hint("forward", np.swapaxes(X4, 2, 3) + 1e-6, X4) is None
    assert hint("forward", X4[:, :, :, :4], X4) is None  # a shape no slip explains


def test_worst_element_and_non_finite() -> None:
    got = X4.copy()
    got[1, 2, 3, 4] += 5.0
    worst = worst_element(got, X4)
    assert worst.index == (1, 2, 3, 4) and worst.expected == X4[1, 2, 3, 4]
    assert worst.got == pytest.approx(X4[1, 2, 3, 4] + 5.0)
    got[0, 1, 0, 2] = np.nan
    assert worst_element(got, X4).index == (0, 1, 0, 2)


def _mask(region: tuple[slice | int, ...]) -> np.ndarray:
    mask = np.zeros(X4.shape, bool)
    mask[region] = True
    return mask


@pytest.mark.parametrize("region, kind, axis, indices", [
    ((slice(None),), "everywhere", None, ()),
    ((1,), "batch", 0, (1,)),
    ((slice(None), 2), "channel", 1, (2,)),
    ((slice(None), slice(None), slice(None), slice(1, 3)), "axis", 3, (1, 2)),
    ((0, 1, 2, 3), "batch", 0, (0,)),  # one element lies in one batch element
])
def test_location(region: tuple[slice | int, ...], kind: str, axis: int | None,
                  indices: tuple[int, ...]) -> None:
    where = locate(_mask(region), ("batch", "channel", "height", "width"))
    assert (where.kind, where.axis, where.indices) == (kind, axis, indices), where.text


def test_scattered_location() -> None:
    mask = np.zeros((5, 4), bool)
    mask[1, 2] = mask[3, 0] = True
    where = locate(mask, ("step", "weight"))
    assert where.kind == "scattered" and "2 of 20 elements" in where.text


def test_everywhere_only_when_every_element_is_off() -> None:
    mask = np.ones((2, 3, 4, 4), bool)
    mask[0, 0, 0, 0] = False  # every index of every axis still holds an error
    where = locate(mask, ("batch", "channel", "height", "width"))
    assert where.kind == "spread" and "not every element" in where.text


def test_named_regions_of_the_block_dct_and_time_features() -> None:
    shape = (2, 3, 2, 2, 8, 8)
    names = axis_names("block_dct", len(shape))
    dc = np.zeros(shape, bool)
    dc[..., 0, 0] = True
    where = locate(dc, names, regions("block_dct", shape, (13, 16)))
    assert where.kind == "region" and "only the DC coefficient" in where.text
    border = np.zeros(shape, bool)
    border[:, :, 1, :, 3, 5] = True  # the last block row: the image's 13 rows were padded to 16
    where = locate(border, names, regions("block_dct", shape, (13, 16)))
    assert where.kind == "region" and "padded border" in where.text
    # Without padding on that axis the last block row is no border: not named as one.
    assert "padded border" not in locate(border, names, regions("block_dct", shape, (16, 16))).text
    sin = np.zeros((6, 256), bool)
    sin[:, 130] = True
    where = locate(sin, axis_names("timestep_features", 2), regions("timestep_features", (6, 256), None))
    assert where.kind == "region" and "sin half" in where.text
