"""What a failed conformance vector tells a porter (deco.conformance): the worst element, where
the error lives, and a hint when the output matches the expected one, within the tolerance,
after a common convention slip (a transposition, a sign, a factor, swapped halves, a shift...).

Every check compares the port's output, transformed, with the reference's expected output under
the run's own error measure and tolerance (spec/00-conventions.md §5): a hint is a statement
"undo this slip and you pass", never a guess from the size of the error. The arrays are the
compared ones (`deco.conformance.comparable`: RoPE angles as their (cos, sin) stack). Slips that
live inside the computation come from the catalogue (`deco.conformance.differential`: the kit
passes its explanations in), and they outrank the float32 hint (`diagnose`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from deco.conformance.differential import MOST, Explanation
from deco.conformance.fixtures import error_measure

Array = NDArray[Any]
LocationKind = Literal["everywhere", "batch", "channel", "region", "axis", "spread", "scattered", "none"]
#: A float64 port whose error lies in this window is most likely computing in float32: float32
#: rounding leaves a relative error of ~6e-8 (unit roundoff) or more, and such a port passes 1e-5.
FLOAT32_WINDOW = (1e-8, 1e-5)

_IMAGE = ("batch", "channel", "height", "width")
_TOKENS = ("batch", "token", "channel")
_ANGLES = ("cos/sin", "token", "x/y angle pair")
#: component -> the names of the axes of its compared output (a mismatched rank: "axis k").
AXES: dict[str, tuple[str, ...]] = {
    "rgb_to_ycbcr": _IMAGE,
    "block_dct": ("batch", "channel", "block row", "block column", "u (vertical frequency)",
                  "v (horizontal frequency)"),
    "frequency_weights": ("(quality, gamma) pair", "channel", "u", "v"),
    "frequency_aware_loss": ("value",),
    "timestep_features": ("batch", "feature"),
    "rope_angles": _ANGLES,
    "text_rope_angles": _ANGLES,
    "apply_rope": ("batch", "token", "head", "feature"),
    "dit_block": _TOKENS, "text_refine_block": _TOKENS, "joint_dit_block": _TOKENS,
    "text_embedding": _TOKENS,
    "dct_position_features": ("pixel", "feature"),
    "text_position_features": ("pixel", "x/y feature pair"),
    "decoder_block": ("patch", "pixel", "channel"),
    "forward": _IMAGE, "t2i_forward": _IMAGE, "euler": _IMAGE, "heun": _IMAGE, "adams": _IMAGE,
    "time_grid": ("step",),
    "adams_weights": ("step", "weight"),
}


@dataclass(frozen=True)
class Worst:
    """The element with the largest |got - expected| (or the first non-finite one)."""

    index: tuple[int, ...]
    got: float
    expected: float


@dataclass(frozen=True)
class Location:
    """Where the out-of-tolerance elements are: `kind`, the axis (batch, channel, axis) and its
    indices holding them, and a sentence."""

    kind: LocationKind
    text: str
    axis: int | None = None
    indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class Hint:
    """A convention slip that, undone, makes the output match: `slip` is a stable identifier
    (float32, sign, factor, height_width, transposed, halves, shift), `text` says what to fix,
    `factor` is the constant factor of a `factor` slip."""

    slip: str
    text: str
    factor: float | None = None


@dataclass(frozen=True)
class Diagnosis:
    worst: Worst | None
    location: Location | None
    hint: Hint | None
    #: the catalogue's variants that reproduce the output (deco.conformance.differential)
    explanations: tuple[Explanation, ...] = ()
    port_error: float = float("nan")

    def lines(self) -> list[str]:
        """The diagnosis as indented lines for the kit's text report."""
        out = []
        if self.worst is not None:
            out.append(f"worst element {list(self.worst.index)}: got {self.worst.got:.9g}, "
                       f"expected {self.worst.expected:.9g}")
        if self.location is not None:
            out.append(f"where: {self.location.text}")
        if self.hint is not None:
            out.append(f"hint: {self.hint.text}")
        shown = [e for e in self.explanations if self.hint is None or e.sentence(self.port_error)
                 != self.hint.text]
        if shown:
            out.append("also consistent with the catalogue: " + "; ".join(
                f"{'+'.join(e.names)} ({'exact' if e.exact else f'leaves {e.residual:.1e}'})"
                for e in shown))
        return out


def axis_names(component: str, ndim: int) -> tuple[str, ...]:
    names = AXES.get(component, ())
    return names if len(names) == ndim else tuple(f"axis {k}" for k in range(ndim))


# ------------------------------------------------------------------------------ where and worst
def worst_element(got: Array, expected: Array) -> Worst:
    """The first non-finite element of `got` if any, else the largest |got - expected|."""
    bad = ~np.isfinite(got)
    flat = int(np.argmax(bad)) if bad.any() else int(np.argmax(np.abs(got - expected)))
    index = tuple(int(i) for i in np.unravel_index(flat, got.shape))
    return Worst(index, float(got[index]), float(expected[index]))


def _indices_text(indices: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:8])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > 8 else "")


Region = tuple[str, Array]  # (a name, a boolean mask of the output's shape)


def regions(component: str, shape: tuple[int, ...], image_hw: tuple[int, int] | None) -> list[Region]:
    """Named parts of a component's output that a convention slip tends to confine an error to:
    the DC coefficient (block DCT, weights), the blocks touching the padded border (block DCT of
    an image whose sides are not multiples of 8), the cos or sin half (time features)."""
    out: list[Region] = []
    names = axis_names(component, len(shape))
    if component in ("block_dct", "frequency_weights") and names == AXES[component]:
        dc = np.zeros(shape, bool)
        dc[..., 0, 0] = True
        out.append(("only the DC coefficient (u = v = 0)", dc))
    if component == "block_dct" and image_hw is not None and names == AXES[component]:
        border = np.zeros(shape, bool)
        if image_hw[0] % 8:
            border[:, :, -1] = True
        if image_hw[1] % 8:
            border[:, :, :, -1] = True
        if border.any():
            out.append(("only the blocks touching the padded border (the last block row and/or "
                        "column, where the reflect padding lies)", border))
    if component == "timestep_features" and len(shape) == 2 and shape[1] % 2 == 0:
        half = np.zeros(shape, bool)
        half[:, : shape[1] // 2] = True
        out += [("only the cos half (features 0 .. 127)", half),
                ("only the sin half (features 128 .. 255)", ~half)]
    return out


def locate(mask: Array, names: Sequence[str], named: Sequence[Region] = ()) -> Location:
    """Describe the True elements of `mask` (the out-of-tolerance ones): everywhere (every
    element), in one batch element or channel, inside a named region (`named`), along one axis (a
    subset of one axis' indices, every position of the others), or scattered."""
    count, total = int(mask.sum()), mask.size
    if count == 0:
        return Location("none", "no element out of tolerance")
    if total == 1:
        return Location("everywhere", "everywhere (the output's single element)")
    share = f"{count} of {total} elements out of tolerance"
    if count == total:
        return Location("everywhere", f"everywhere ({share})")
    hits = [tuple(int(i) for i in np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim)
                                                                    if a != k))))
            for k in range(mask.ndim)]
    partial = [k for k in range(mask.ndim) if len(hits[k]) < mask.shape[k]]
    for kind in ("batch", "channel"):
        for k in partial:
            if names[k] == kind and len(hits[k]) == 1:
                return Location(kind, f"in one {kind}: index {hits[k][0]} of axis {k} ({share})",
                                k, hits[k])
    for text, region in named:
        if region.shape == mask.shape and not region.all() and not np.any(mask & ~region):
            return Location("region", f"{text} ({share})")
    if len(partial) == 1:
        k = partial[0]
        expected_mask = np.zeros(mask.shape[k], bool)
        expected_mask[list(hits[k])] = True
        shape = [1] * mask.ndim
        shape[k] = mask.shape[k]
        if np.array_equal(mask, np.broadcast_to(expected_mask.reshape(shape), mask.shape)):
            return Location("axis", f"along axis {k} ({names[k]}): at indices "
                            f"{_indices_text(hits[k])}, at every position of the other axes "
                            f"({share})", k, hits[k])
    if not partial:
        return Location("spread", f"spread over every index of every axis, but not every element "
                        f"({share})")
    where = "; ".join(f"axis {k} ({names[k]}) indices {_indices_text(hits[k])}" for k in partial)
    return Location("scattered", f"scattered: {share}, confined to {where}")


# ------------------------------------------------------------------------------------- slips
Transform = Callable[[Array], "Array | None"]


def _swap_height_width(component: str) -> Transform:
    """Undo a height/width mix-up: swap the height and width axes (and, for the block DCT, the
    block grid's axes together with the coefficient's (u, v)); where the last axis interleaves
    x and y pairs (RoPE angles, the text model's position features), swap each pair."""
    def undo(got: Array) -> Array | None:
        names = axis_names(component, got.ndim)
        if "height" in names and "width" in names:
            return np.swapaxes(got, names.index("height"), names.index("width"))
        if "block row" in names:
            return np.swapaxes(np.swapaxes(got, 2, 3), 4, 5)
        if names and names[-1].startswith("x/y") and got.shape[-1] % 2 == 0:
            return got.reshape(*got.shape[:-1], -1, 2)[..., ::-1].reshape(got.shape)
        return None

    return undo


def _transposed(got: Array) -> Array | None:
    return np.swapaxes(got, -1, -2) if got.ndim >= 2 else None


def _halves(got: Array) -> Array | None:
    n = got.shape[-1] if got.ndim else 0
    return np.concatenate([got[..., n // 2:], got[..., :n // 2]], -1) if n >= 2 and n % 2 == 0 else None


def matches(candidate: Array | None, expected: Array, tol: float) -> bool:
    if candidate is None or candidate.shape != expected.shape or not np.all(np.isfinite(candidate)):
        return False
    return error_measure(candidate, expected)[1] <= tol


def _factor(got: Array, expected: Array, tol: float) -> Hint | None:
    """got = k * expected for a constant k (other than 1 and -1, which have hints of their own);
    only for two or more non-zero expected elements, since any scalar is a multiple of another."""
    if got.shape != expected.shape or np.count_nonzero(expected) < 2 or not np.any(got):
        return None
    k = float(np.vdot(got, expected) / np.vdot(expected, expected))
    if k == 0.0 or abs(k - 1.0) <= tol or abs(k + 1.0) <= tol or not matches(got / k, expected, tol):
        return None
    return Hint("factor", f"a constant factor: the output is {k:.6g} times the expected one "
                f"(multiply by {1 / k:.6g})", k)


def _shift(got: Array, expected: Array, tol: float, names: Sequence[str]) -> Hint | None:
    """got, shifted by one index along an axis (length >= 3), matches expected on the overlap,
    and did not already match there unshifted."""
    if got.shape != expected.shape:
        return None
    scale = float(np.max(np.abs(expected))) or 1.0
    for k in range(got.ndim):
        if got.shape[k] < 3:
            continue
        head = [slice(None)] * got.ndim
        tail = [slice(None)] * got.ndim
        head[k], tail[k] = slice(None, -1), slice(1, None)
        for late, ahead in ((tuple(tail), tuple(head)), (tuple(head), tuple(tail))):
            moved = float(np.max(np.abs(got[late] - expected[ahead]))) / scale
            still = float(np.max(np.abs(got[late] - expected[late]))) / scale
            if moved <= tol < still:
                which = "i + 1 of the output is element i" if late == tuple(tail) else \
                    "i of the output is element i + 1"
                return Hint("shift", f"a shift by one along axis {k} ({names[k]}): element {which} "
                            f"of the expected one; check the indexing along that axis")
    return None


def _float32(got: Array, expected: Array, precision: str) -> Hint | None:
    if precision != "float64" or got.shape != expected.shape:
        return None
    err = error_measure(got, expected)[1]
    if FLOAT32_WINDOW[0] < err <= FLOAT32_WINDOW[1]:
        return Hint("float32", f"looks like float32: declare precision (precision = \"float32\" on "
                    f"the port, or --precision float32); the error {err:.2e} is float32 rounding, "
                    f"within the float32 tolerance {FLOAT32_WINDOW[1]:.0e} (only if the port "
                    f"does compute in float32: no catalogued convention explains it, but a float64 "
                    f"port this far off has a difference of its own)")
    return None


def output_slip(component: str, got: Array, expected: Array, tol: float) -> Hint | None:
    """The first slip of the output's layout or scale that, undone, makes `got` match."""
    names = axis_names(component, got.ndim)
    simple: list[tuple[str, Transform, str]] = [
        ("sign", np.negative, "the sign flipped: the output is minus the expected one"),
        ("height_width", _swap_height_width(component),
         "height and width swapped (x and y): matches after exchanging them"),
        ("transposed", _transposed, "the last two axes transposed: matches after swapping them"),
        ("halves", _halves, "the two halves of the last axis swapped (e.g. the cos/sin order): "
                            "matches after exchanging them"),
    ]
    for slip, undo, text in simple:
        if matches(undo(got), expected, tol):
            return Hint(slip, text)
    return _factor(got, expected, tol) or _shift(got, expected, tol, names)


def slip_hint(component: str, got: Array, expected: Array, tol: float, precision: str) -> Hint | None:
    """The first convention slip that, undone, makes `got` match `expected` within `tol` (the
    float32 rounding of a port declared float64 among them), without the catalogue."""
    return _float32(got, expected, precision) or output_slip(component, got, expected, tol)


# ------------------------------------------------------------------------------------- entry
def _catalogue_hint(best: Explanation, port_error: float) -> Hint:
    return Hint("+".join(best.names), best.sentence(port_error))


def diagnose(component: str, got: Array, expected: Array, tol: float, precision: str,
             explanations: Sequence[Explanation] = (),
             image_hw: tuple[int, int] | None = None) -> Diagnosis:
    """The diagnosis of a failed vector of `component` from its compared output `got` and
    `expected`, and the catalogue's `explanations` (deco.conformance.differential, best first).

    The hint, in order: a slip of the output's layout or scale (exact); a catalogue variant that
    reproduces the output; float32 rounding, only when the error is in the float32 window and no
    variant explains it better (a hint must never widen the tolerance of a wrong port); a
    variant that explains most of the error."""
    port_error = error_measure(got, expected)[1] if got.shape == expected.shape else float("inf")
    hint = output_slip(component, got, expected, tol) if got.shape == expected.shape else None
    if hint is None and explanations and explanations[0].exact:
        hint = _catalogue_hint(explanations[0], port_error)
    if hint is None:
        better = bool(explanations) and explanations[0].residual * MOST <= port_error
        hint = None if better else _float32(got, expected, precision)
    if hint is None and explanations:
        hint = _catalogue_hint(explanations[0], port_error)
    if got.shape != expected.shape:
        return Diagnosis(None, None, hint, tuple(explanations), port_error)
    names = axis_names(component, got.ndim)
    scale = float(np.max(np.abs(expected))) or 1.0
    with np.errstate(invalid="ignore"):
        mask = ~np.isfinite(got) | (np.abs(got - expected) > tol * scale)
    where = locate(mask, names, regions(component, got.shape, image_hw))
    return Diagnosis(worst_element(got, expected), where, hint, tuple(explanations), port_error)
