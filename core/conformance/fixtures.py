"""Conformance of `deco.reference` with the release's outputs in `shared/fixtures/` (A.npz, T.npz).

`reference_checks(folder)` recomputes every stored release output with the float64 reference and
returns one `Check` per key (the text-to-image outputs of T.npz prefixed `T.`, when present);
`deco check-fixtures` prints them as a table and the test-suite asserts them. The release ran in
float32, so the tolerance is 1e-5 relative to the largest magnitude of the expected array
(spec/00-conventions.md §5).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deco import reference as R
from deco.reference.sampling import adams, adams_weights, euler, time_grid
from deco.release import read_release_checkpoint
from deco.untrusted import json_object, parse_json, read_npz

FIXTURE_TOLERANCE = 1e-5


def default_folder() -> Path:
    """$DECO_FIXTURES, else ../shared/fixtures relative to the working directory (the layout
    of a checkout with the shared folder beside it)."""
    env = os.environ.get("DECO_FIXTURES")
    return Path(env) if env else Path.cwd().parent / "shared" / "fixtures"


@dataclass(frozen=True)
class Check:
    name: str
    max_abs: float
    max_rel: float  # max |got - expected| / max |expected|
    tolerance: float = FIXTURE_TOLERANCE

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= self.tolerance


def error_measure(got: Any, expected: Any) -> tuple[float, float]:
    """(max|got - exp|, max|got - exp| / max|exp|), spec/00-conventions.md §5 (absolute error
    where exp is all zeros). The project's one definition: fixtures, conformance and ONNX checks."""
    err = float(np.max(np.abs(got - expected))) if np.size(expected) else 0.0
    scale = float(np.max(np.abs(expected))) if np.size(expected) else 0.0
    return err, (err / scale if scale > 0 else err)


def compare(name: str, got: Any, expected: Any, tolerance: float = FIXTURE_TOLERANCE) -> Check:
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return Check(name, float("inf"), float("inf"), tolerance)
    return Check(name, *error_measure(got, expected), tolerance)


def _load(folder: Path, name: str = "A.npz") -> tuple[Any, dict[str, Any]]:
    npz = folder / name
    if not npz.is_file():
        raise FileNotFoundError(f"fixtures: {npz} not found (set DECO_FIXTURES or --fixtures)")
    data = FixtureArrays(npz, read_npz(npz))  # headers checked (deco.untrusted)
    return data, json_object(parse_json(bytes(data["config"]), f"{npz} (config)"), f"{npz} (config)")


class FixtureArrays(dict[str, Any]):
    """The arrays of a fixtures file; a missing one is a ValueError naming the file and key."""

    def __init__(self, path: Path, arrays: dict[str, Any]) -> None:
        super().__init__(arrays)
        self.path = path

    def __missing__(self, key: str) -> Any:
        raise ValueError(f"fixtures: {self.path} has no array {key!r} (not the release's fixtures "
                         "file, or an older one)")


def reference_checks(folder: str | Path | None = None) -> list[Check]:
    """Every comparison of the reference against the release fixture."""
    return list(_iter_checks(Path(folder) if folder else default_folder()))


def _iter_checks(folder: Path) -> Iterator[Check]:
    a, cfg = _load(folder)

    def model(name: str) -> R.Model:
        config, state = read_release_checkpoint(folder / name, "ema")
        return R.Model(config, {k: v.numpy() for k, v in state.items()})

    deco, base = model("A.ckpt"), model("A-baseline.ckpt")
    x, t, y = a["forward_x"], a["forward_t"], a["forward_y"]
    yield compare("forward_out", deco.forward(x, t, y), a["forward_out"])
    yield compare("forward_dit_out", deco.semantic(x, t, y), a["forward_dit_out"])
    yield compare("baseline_forward_out", base.forward(x, t, y), a["baseline_forward_out"])
    yield compare("dct_matrix", R.dct_matrix(8), a["dct_matrix"])
    for q in cfg["qualities"]:
        yield compare(f"freq_weight_q{q}", R.frequency_weights(q), a[f"freq_weight_q{q}"])
    for j in range(len(cfg["loss_shapes"])):
        pred, target = a[f"loss{j}_pred"], a[f"loss{j}_target"]
        ycc = R.rgb_to_ycbcr(pred)
        yield compare(f"loss{j}_ycbcr", ycc, a[f"loss{j}_ycbcr"])
        yield compare(f"loss{j}_dct", R.block_dct(ycc), a[f"loss{j}_dct"])
        yield compare(f"loss{j}_fm", R.flow_matching_loss(pred, target), a[f"loss{j}_fm"])
        for q in cfg["qualities"]:
            got = R.frequency_aware_loss(pred, target, quality=q)
            yield compare(f"loss{j}_freq_q{q}", got, a[f"loss{j}_freq_q{q}"])
    noise, labels = a["sample_noise"], a["sample_cond"]
    for solver in ("euler", "heun"):
        s = cfg[solver]
        grid = time_grid(s["num_steps"], s["timeshift"])
        yield compare(f"{solver}_timesteps", grid, a[f"{solver}_timesteps"])
        kwargs: dict[str, Any] = dict(
            steps=s["num_steps"], guidance=s["guidance"], timeshift=s["timeshift"],
            interval=(s["guidance_interval_min"], s["guidance_interval_max"]), solver=solver,
            exact_heun=bool(s.get("exact_henu", False)),
        )
        yield compare(f"{solver}_out", R.sample(deco, noise, labels, **kwargs), a[f"{solver}_out"])
        if solver == "euler":
            traj: list[Any] = []
            euler(deco, noise.astype(np.float64), labels, grid, s["guidance"],
                  kwargs["interval"], traj)
            yield compare("euler_traj", np.stack(traj), a["euler_traj"])
    if (folder / "T.npz").is_file():
        yield from _text_checks(folder)


def _text_checks(folder: Path) -> Iterator[Check]:
    """The text-to-image outputs of T.npz (spec/06), named `T.<key>`."""
    a, cfg = _load(folder, "T.npz")

    def model(weights: Any) -> R.Model:
        config, state = read_release_checkpoint(folder / "T.ckpt", weights)
        return R.Model(config, {k: v.numpy() for k, v in state.items()})

    ema = model("ema")
    x, t, text = a["forward_x"], a["forward_t"], a["forward_text"]
    yield compare("T.forward_out", ema.forward(x, t, text), a["forward_out"])
    yield compare("T.forward_out_online", model("online").forward(x, t, text), a["forward_out_online"])
    noise, prompt, null = a["sample_noise"], a["sample_text"], a["sample_null_text"]
    for solver, key in (("euler", "euler"), ("adams", "adam")):
        s = cfg[key]
        interval = (s["guidance_interval_min"], s["guidance_interval_max"])
        grid = time_grid(s["num_steps"], s["timeshift"])
        yield compare(f"T.{key}_timesteps", grid, a[f"{key}_timesteps"])
        got = R.sample(ema, noise, prompt, null, steps=s["num_steps"], guidance=s["guidance"],
                       interval=interval, timeshift=s["timeshift"], solver=solver,
                       order=s.get("order", 2))
        yield compare(f"T.{key}_out", got, a[f"{key}_out"])
    s = cfg["adam"]
    weights = adams_weights(time_grid(s["num_steps"], s["timeshift"]), s["order"])
    coeffs = np.zeros(a["adam_coeffs"].shape)
    for i, w in enumerate(weights):
        coeffs[i, : len(w)] = w
    yield compare("T.adam_coeffs", coeffs, a["adam_coeffs"])
    traj: list[Any] = []
    adams(ema, noise.astype(np.float64), prompt.astype(np.float64), time_grid(s["num_steps"],
          s["timeshift"]), s["guidance"], (s["guidance_interval_min"], s["guidance_interval_max"]),
          s["order"], traj, null.astype(np.float64))
    yield compare("T.adam_traj", np.stack(traj), a["adam_traj"])


def format_table(checks: list[Check]) -> str:
    rows = [f"{'output':<24} {'max abs err':>12} {'max rel err':>12} {'tolerance':>10}  result"]
    for c in checks:
        rows.append(
            f"{c.name:<24} {c.max_abs:12.3e} {c.max_rel:12.3e} {c.tolerance:10.0e}  "
            f"{'pass' if c.passed else 'FAIL'}"
        )
    passed = sum(c.passed for c in checks)
    rows.append(f"{passed}/{len(checks)} release outputs reproduced")
    return "\n".join(rows)

