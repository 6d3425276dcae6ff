"""The domain and stage vectors of the conformance kit (deco.conformance.domain, .stages): each
vector states its domain; the stage vectors chain to their composite (checked against the
reference's own composite functions, not the stage code); guidance below or at 1 is covered (a
port that guides only when g > 1 fails); a failed composite lists its stages' verdicts, through
--python and through the file protocol.

`STAGE_DEFECTS` / `STAGE_HINTS` extend test_conformance.DEFECTS / HINTS: one planted defect per
new component, run there by the same tests as every other component."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REPO_ROOT
from safetensors.numpy import save_file

from deco import conformance as kit
from deco import reference as ref
from deco.cli import main
from deco.conformance.stages import stage_verdicts, stages_of
from deco.reference import flow as ref_flow
from deco.reference import sampling as ref_sampling

VECTORS = REPO_ROOT / "spec" / "vectors"
R = kit.ReferencePort


def _guided_only_above_one(model: Any, x: Any, t: float, cond: Any, null: Any, g: float) -> Any:
    """The slip of a real third-party port: guidance applied only when g > 1, so g = 0 and
    0 < g < 1 (and g < 0) silently give the conditional velocity."""
    return R.guided_velocity(model, x, t, cond, null, g if g > 1 else 1.0)


def _symmetric_pad(x: np.ndarray) -> np.ndarray:
    pads = ((0, 0), (0, 0), (0, (-x.shape[2]) % 8), (0, (-x.shape[3]) % 8))
    return np.pad(x, pads, mode="symmetric")  # repeats the edge sample: x[H] = x[H-1]


def _euler_step_late_velocity(model: Any, x: Any, labels: Any, t_cur: float, t_next: float,
                              g: float) -> Any:
    return x + (t_next - t_cur) * ref_sampling.guided_velocity(model, x, t_next, labels, g)


def _heun_step_corrector_only(model: Any, x: Any, labels: Any, t_cur: float, t_next: float,
                              g: float) -> Any:
    dt = t_next - t_cur
    v = ref_sampling.guided_velocity(model, x, t_cur, labels, g)
    return x + dt * ref_sampling.guided_velocity(model, x + dt * v, t_next, labels, g)


#: component -> (defect, implementation replacing the reference's), as test_conformance.DEFECTS.
STAGE_DEFECTS: dict[str, tuple[str, Any]] = {
    "interpolate": ("t and 1 - t exchanged", lambda x, n, t: ref_flow.interpolate(n, x, t)),
    "target_velocity": ("noise - x", lambda x, n: n - x),
    "time_shift": ("shift inverted", lambda t, s: ref_flow.time_shift(t, 1.0 / s)),
    "reflect_pad": ("edge sample repeated (symmetric padding)", _symmetric_pad),
    "weighted_error": ("weights transposed", lambda a, b, w: R.weighted_error(
        a, b, np.swapaxes(w, -1, -2))),
    "guidance_at": ("interval low <= t < high", lambda t, g, i: g if i[0] <= t < i[1] else 1.0),
    "adams_guidance_at": ("interval low < t <= high", lambda t, g, i: g if i[0] < t <= i[1] else 1.0),
    "guided_velocity": ("guidance only when g > 1", _guided_only_above_one),
    "euler_step": ("velocity taken at t_next", _euler_step_late_velocity),
    "heun_step": ("corrector velocity alone (no average)", _heun_step_corrector_only),
}

#: The slip the kit names for each (None: no hint may be given). Scales decided with the wrong
#: interval ends are the right ones moved by one step: "shift" is literally what the output shows.
STAGE_HINTS: dict[str, str | None] = {**dict.fromkeys(STAGE_DEFECTS), "target_velocity": "sign",
                                      "guidance_at": "shift"}


@pytest.fixture(scope="module")
def vectors() -> list[kit.Vector]:
    return kit.load_vectors(VECTORS)


def by_name(vectors: list[kit.Vector]) -> dict[str, kit.Vector]:
    return {v.name: v for v in vectors}


def test_every_vector_states_its_domain(vectors: list[kit.Vector],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert all(v.domain for v in vectors), [v.name for v in vectors if not v.domain]
    assert main(["conformance", "--vectors", str(VECTORS), "--list", "--json"]) == 0
    listed = {r["vector"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["euler_guidance_0"]["domain"].startswith("guidance 0")
    assert listed["loss_q85_dct"]["stage_of"] == "loss_q85" and listed["loss_q85"]["stage_of"] is None
    assert main(["conformance", "--vectors", str(VECTORS), "--list"]) == 0
    out = capsys.readouterr().out
    assert "  domain: guidance 0.5 (between 0 and 1)" in out and "  stage of: loss_q85 " in out


def test_guidance_is_covered_where_conventions_diverge(vectors: list[kit.Vector]) -> None:
    scales = {v.args["guidance"] for v in vectors if v.component in ("euler", "heun", "adams")}
    assert {0.0, 0.5, 1.0} <= scales and min(scales) < 0 and max(scales) >= 10
    # each (quality, gamma) region of the weights in a vector of its own
    regions = [{(q < 50, g == 1.0) for q, g in zip(v.inputs["quality"], v.inputs["gamma"], strict=True)}
               for v in vectors if v.component == "frequency_weights" and v.stage_of is None]
    assert all(len(r) == 1 for r in regions) and set().union(*regions) == {
        (True, True), (True, False), (False, True), (False, False)}


def test_loss_stages_chain_to_the_loss(vectors: list[kit.Vector]) -> None:
    """Each stage's input is the stage before's expected output, and the last stage's expected
    is the loss the reference's frequency_aware_loss computed (a separate code path)."""
    named = by_name(vectors)
    losses = [v for v in vectors if v.component == "frequency_aware_loss" and v.stage_of is None]
    assert len(losses) == 4
    for loss in losses:
        s = {k: named[f"{loss.name}_{k}"] for k in ("ycbcr", "padding", "dct", "weights",
                                                      "weighted_error")}
        b = loss.inputs["pred"].shape[0]
        np.testing.assert_array_equal(s["ycbcr"].inputs["x"],
                                      np.concatenate([loss.inputs["pred"], loss.inputs["target"]]))
        np.testing.assert_array_equal(s["padding"].inputs["x"], s["ycbcr"].expected)
        np.testing.assert_array_equal(s["dct"].inputs["x"], s["ycbcr"].expected)
        assert s["padding"].expected.shape[2:] == (8 * s["dct"].expected.shape[2],
                                                   8 * s["dct"].expected.shape[3])
        np.testing.assert_array_equal(s["weighted_error"].inputs["coeffs_pred"], s["dct"].expected[:b])
        np.testing.assert_array_equal(s["weighted_error"].inputs["weights"], s["weights"].expected[0])
        np.testing.assert_allclose(s["weighted_error"].expected, loss.expected, rtol=1e-12)


def test_sampler_steps_agree_with_the_reference_samplers(vectors: list[kit.Vector]) -> None:
    """heun_step then an Euler step is the reference heun on a 3-point grid (exact); euler_step
    is the reference euler on a 2-point grid; both with the scale in force everywhere."""
    named = by_name(vectors)
    inf = (-np.inf, np.inf)
    for v in vectors:
        if v.component not in ("euler_step", "heun_step"):
            continue
        model = kit.VelocityModel(named["forward_deco"].config or {}, named["forward_deco"].weights)
        x, labels, a = v.inputs["x"], v.inputs["labels"], v.args
        t0, t1, g = a["t_cur"], a["t_next"], a["guidance"]
        if v.component == "euler_step":
            want = ref_sampling.euler(model, x, labels, np.array([t0, t1]), g, inf)
            np.testing.assert_allclose(v.expected, want, rtol=1e-12, atol=1e-14)
        else:
            t2 = min(1.0, 2 * t1 - t0)
            full = ref_sampling.heun(model, x, labels, np.array([t0, t1, t2]), g, inf, exact=True)
            after = ref_sampling.euler(model, v.expected, labels, np.array([t1, t2]), g, inf)
            np.testing.assert_allclose(after, full, rtol=1e-12, atol=1e-14)
        assert named[str(v.stage_of)].component == v.component.removesuffix("_step")


class GuidanceOnlyAboveOne(kit.ReferencePort):
    """A sampler that guides only when g > 1 (its guided velocity is the reference's)."""

    @staticmethod
    def euler(model: Any, noise: Any, labels: Any, steps: int, shift: float, g: float,
              interval: tuple[float, float]) -> Any:
        return R.euler(model, noise, labels, steps, shift, g if g > 1 else 1.0, interval)

    @staticmethod
    def heun(model: Any, noise: Any, labels: Any, steps: int, shift: float, g: float,
             interval: tuple[float, float], exact: bool) -> Any:
        return R.heun(model, noise, labels, steps, shift, g if g > 1 else 1.0, interval, exact)


def test_guidance_only_above_one_fails(vectors: list[kit.Vector]) -> None:
    results = {r.vector: r for r in kit.run_port(GuidanceOnlyAboveOne(), vectors)}
    failed = {n for n, r in results.items() if r.status != "pass"}
    assert failed == {"euler_guidance_0", "heun_guidance_half", "heun_guidance_negative"}
    assert min(results[n].max_rel for n in failed) > 1e-2
    # Every stage passes (its guided velocity is right): the scale is decided in the sampler.
    assert results["euler_guidance_0"].note == (
        "stage vectors euler_guidance_0_*: grid pass, guidance_scales pass, guided_velocity pass, "
        "step pass (every stage passes: the stages are combined differently)")


class TransposedDctLoss(kit.ReferencePort):
    """A loss built from the port's own stages, its block DCT transposed."""

    @staticmethod
    def block_dct(x: Any) -> Any:
        return np.swapaxes(ref.block_dct(x), -1, -2)

    @staticmethod
    def frequency_aware_loss(pred: Any, target: Any, quality: int, gamma: float) -> float:
        d = TransposedDctLoss.block_dct
        return R.weighted_error(d(ref.rgb_to_ycbcr(pred)), d(ref.rgb_to_ycbcr(target)),
                                ref.frequency_weights(quality, gamma))


def test_a_failed_loss_names_its_failing_stage(vectors: list[kit.Vector], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    results = {r.vector: r for r in kit.run_port(TransposedDctLoss(), vectors)}
    assert results["loss_q85"].status == "FAIL"
    want = ("stage vectors loss_q85_*: ycbcr pass, padding pass, dct FAIL, weights pass, "
            "weighted_error pass")
    assert results["loss_q85"].note == want
    assert results["loss_q85_dct"].note == ""  # a stage vector has no stages of its own
    # The same through the file protocol: the port's outputs written as files.
    named = by_name(vectors)
    for name in ("loss_q85", *stages_of(vectors)["loss_q85"]):
        got = kit.CALLERS[named[name].component](TransposedDctLoss, named[name], named)
        save_file({"out": np.asarray(got, dtype=np.float64)}, str(tmp_path / f"{name}.safetensors"))
    assert main(["conformance", "--vectors", str(VECTORS), "--outputs", str(tmp_path), "--json"]) == 1
    records = {r["vector"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert records["loss_q85"]["note"] == want


def test_stage_verdicts_without_stages() -> None:
    assert stage_verdicts("ycbcr", [], {}) is None
    assert stage_verdicts("x", [], {"x": ["x_a"]}) is None  # its stage vectors did not run
