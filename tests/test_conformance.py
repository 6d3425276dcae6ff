"""The conformance kit (deco.conformance, spec/vectors): vectors are current, and the runner tells
a correct port from one with a single planted defect, component by component."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REPO_ROOT
from safetensors import safe_open
from test_conformance_domain import STAGE_DEFECTS, STAGE_HINTS

from deco import conformance as kit
from deco import reference as ref
from deco.cli import main
from deco.conformance.vectors import write_vectors
from deco.reference import model as ref_model
from deco.reference import sampling as ref_sampling
from deco.reference import text_to_image as ref_t2i
from deco.reference.frequency import JPEG_CHROMINANCE, JPEG_LUMINANCE

VECTORS = REPO_ROOT / "spec" / "vectors"


@pytest.fixture(scope="module")
def vectors() -> list[kit.Vector]:
    return kit.load_vectors(VECTORS)


def failing_components(results: list[kit.Result]) -> set[str]:
    return {r.component for r in results if r.status in ("FAIL", "ERROR")}


# ------------------------------------------------------------------------- the vectors themselves
def _read(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    with safe_open(str(path), framework="np") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}


def test_committed_vectors_are_what_the_reference_computes_now(tmp_path: Path) -> None:
    write_vectors(tmp_path)
    committed = sorted(p.name for p in VECTORS.glob("*.safetensors"))
    assert committed == sorted(p.name for p in tmp_path.glob("*.safetensors"))
    for name in committed:
        meta_old, old = _read(VECTORS / name)
        meta_new, new = _read(tmp_path / name)
        assert meta_old == meta_new, name
        assert old.keys() == new.keys(), name
        for key in old:
            assert old[key].dtype == new[key].dtype and old[key].shape == new[key].shape, (name, key)
            if key == "expected":
                scale = max(float(np.max(np.abs(new[key]))), 1e-300)
                assert np.max(np.abs(old[key] - new[key])) / scale <= 1e-12, (name, key)
            else:
                np.testing.assert_array_equal(old[key], new[key], err_msg=f"{name} {key}")


def test_vectors_are_small_and_cover_every_component(vectors: list[kit.Vector]) -> None:
    size = sum(p.stat().st_size for p in VECTORS.glob("*.safetensors"))
    assert size < 2_500_000  # the 114 vectors hold 1.9 MB, of which the three forward vectors 0.8
    assert {v.component for v in vectors} == set(kit.COMPONENTS)
    weights = [w for v in vectors for w in v.weights.values()]
    assert weights and all(w.dtype == np.float32 for w in weights)


def test_a_corrupt_vector_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"^vectors: "):
        kit.load_vectors(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^vectors: "):
        kit.load_vectors(tmp_path / "missing")


# ---------------------------------------------------------------------------- the kit's own ports
@pytest.mark.parametrize("port", [kit.ReferencePort(), kit.OptimizedPort(), kit.OptimizedPort32()],
                         ids=["reference", "optimized-float64", "optimized-float32"])
def test_reference_and_optimized_ports_pass_every_vector(port: Any, vectors: list[kit.Vector]) -> None:
    results = kit.run_port(port, vectors)
    # The optimized loss never forms the two block DCTs, so it has no weighted-error stage
    # (stage_ports.OptimizedStages): those vectors, and only those, are skipped for it.
    lacks = set() if isinstance(port, kit.ReferencePort) else {"weighted_error"}
    assert [r for r in results if r.status != "pass" and r.component not in lacks] == []
    assert {r.status for r in results if r.component in lacks} <= {"skipped"}
    assert kit.passed(results)


def test_the_reference_agrees_with_itself_exactly(vectors: list[kit.Vector]) -> None:
    results = kit.run_port(kit.ReferencePort(), vectors)
    assert max(r.max_rel for r in results) <= 1e-12


class Float32DeclaredFloat64(kit.OptimizedPort32):
    """The float32 port, computing in float32, with a float64 declaration."""

    precision = "float64"

    def __init__(self) -> None:
        super().__init__()
        self.dtype = self.torch.float32


def test_float32_results_fail_the_float64_tolerance_with_a_hint(vectors: list[kit.Vector]) -> None:
    results = kit.run_port(Float32DeclaredFloat64(), vectors)
    assert {"forward", "block_dct", "euler"} <= failing_components(results)
    assert {r.component for r in results if r.status == "skipped"} == {"weighted_error"}
    failed = [r for r in results if r.status not in ("pass", "skipped")]
    assert all(r.status == "FAIL" and r.diagnosis and r.diagnosis.hint for r in failed), failed
    assert {r.diagnosis.hint.slip for r in failed if r.diagnosis and r.diagnosis.hint} == {"float32"}
    assert "looks like float32: declare precision" in failed[0].diagnosis.hint.text  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- planted defects
def _weights_with_scale(quality: int, gamma: float) -> np.ndarray:
    scale = 200.0 - 2.0 * quality  # the q >= 50 branch of the IJG scaling used for every q
    out = []
    for base in (JPEG_LUMINANCE, JPEG_CHROMINANCE, JPEG_CHROMINANCE):
        q = np.clip(np.floor((base * scale + 50.0) / 100.0), 1.0, 255.0)
        w = (q.mean() / q) ** gamma
        out.append(w / w.mean())
    return np.stack(out)


def _euler_half_open_interval(model: Any, noise: Any, labels: Any, steps: int, timeshift: float,
                              guidance: float, interval: tuple[float, float]) -> np.ndarray:
    x = noise
    for t_cur, t_next in pairwise(ref.time_grid(steps, timeshift)):
        g = guidance if interval[0] <= t_cur < interval[1] else 1.0  # edges the wrong way round
        x = x + (t_next - t_cur) * ref_sampling.guided_velocity(model, x, t_cur, labels, g)
    return np.asarray(x)


def _heun_corrects_last_step(model: Any, noise: Any, labels: Any, steps: int, timeshift: float,
                             guidance: float, interval: tuple[float, float], exact: bool) -> np.ndarray:
    x, v_reuse = noise, None
    for t_cur, t_next in pairwise(ref.time_grid(steps, timeshift)):
        g = ref_sampling.guidance_at(t_cur, guidance, interval)
        v = ref_sampling.guided_velocity(model, x, t_cur, labels, g) if exact or v_reuse is None \
            else v_reuse
        v_hat = ref_sampling.guided_velocity(model, x + (t_next - t_cur) * v, t_next, labels, g)
        x, v_reuse = x + (t_next - t_cur) * 0.5 * (v + v_hat), v_hat
    return np.asarray(x)


def _ungated(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """adaln rows of gate1 and gate2 set to (0, bias 1): both residual gates become 1."""
    w = {k: np.array(v, dtype=np.float64) for k, v in weights.items()}
    d = w["adaln.bias"].shape[0] // 6
    for chunk in (2, 5):
        w["adaln.weight"][chunk * d:(chunk + 1) * d] = 0.0
        w["adaln.bias"][chunk * d:(chunk + 1) * d] = 1.0
    return w


def _no_layernorm_affine(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    w = dict(weights)
    w["norm.weight"], w["norm.bias"] = np.ones_like(w["norm.weight"]), np.zeros_like(w["norm.bias"])
    return w


def _float64(weights: dict[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}


def _position_table_inside_the_norm(text: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    w = _float64(weights)
    h = ref_model.linear(text, w, "text_embed") + w["text_pos_embed"]
    return ref_model.rms_norm(h, w["text_embed.norm.weight"])


def _refine_with_rope(x: np.ndarray, c: np.ndarray, weights: dict[str, np.ndarray],
                      heads: int) -> np.ndarray:
    """The text tokens rotated like a 1 x T row of image tokens."""
    angles = ref_model.rope_angles(1, x.shape[1], x.shape[2] // heads)
    return ref_model.dit_block(x, c, _float64(weights, "text_blocks.0."), 0, heads, angles,
                               group="text_blocks")


def _joint_block_without_text(x: np.ndarray, text: np.ndarray, c: np.ndarray,
                              weights: dict[str, np.ndarray], heads: int,
                              angles: np.ndarray) -> np.ndarray:
    return ref_model.dit_block(x, c, _float64(weights, "blocks.0."), 0, heads, angles)


def _t2i_with_dct_features(cfg: dict[str, Any], weights: dict[str, np.ndarray], x: np.ndarray,
                           t: np.ndarray, text: np.ndarray) -> np.ndarray:
    config, w = ref.DeCoConfig.from_dict(cfg), _float64(weights)
    s = ref_t2i.t2i_semantic(x, t, text, config, w)
    return ref_model.pixel_decoder(x, s, config, w, ref_model.dct_position_features(config.patch_size))


def _adams_inclusive_upper(model: Any, noise: Any, cond: Any, null: Any, steps: int,
                           timeshift: float, guidance: float, interval: tuple[float, float],
                           order: int) -> np.ndarray:
    """Adams with Euler's interval low < t <= high instead of the strict low < t < high."""
    grid = ref.time_grid(steps, timeshift)
    null = None if null is None else np.broadcast_to(null, np.shape(cond))
    x, t, history = noise, 0.0, []
    for i, w in enumerate(ref_sampling.adams_weights(grid, order)):
        g = ref_sampling.guidance_at(t, guidance, interval)
        history.append(ref_sampling.guided_velocity(model, x, t, cond, g, null))
        dt = grid[i + 1] - grid[i]
        x = x + dt * sum((wj * vj for wj, vj in zip(w, history[-len(w):], strict=True)),
                         np.zeros_like(x))
        t += dt
    return np.asarray(x)


_F = np.linspace(0, 8, 8)

#: component -> (defect, implementation replacing the reference's)
DEFECTS: dict[str, tuple[str, Any]] = {
    "rgb_to_ycbcr": ("Cb and Cr rows swapped", lambda x: ref.rgb_to_ycbcr(x)[:, [0, 2, 1]]),
    "block_dct": ("coefficients transposed (u, v swapped)",
                  lambda x: np.swapaxes(ref.block_dct(x), -1, -2)),
    "frequency_weights": ("IJG scaling 200 - 2q also below q = 50", _weights_with_scale),
    "frequency_aware_loss": ("weights transposed", lambda p, t, q, g: float(np.mean(
        np.swapaxes(ref.frequency_weights(q, g), -1, -2)[None, :, None, None]
        * (ref.block_dct(ref.rgb_to_ycbcr(p)) - ref.block_dct(ref.rgb_to_ycbcr(t))) ** 2))),
    "timestep_features": ("sin half first", lambda t: np.roll(ref_model.timestep_features(t), 128, -1)),
    "rope_angles": ("x and y axes swapped", lambda gh, gw, hd: ref_model.rope_angles(gh, gw, hd)
                    .reshape(gh * gw, hd // 4, 2)[..., ::-1].reshape(gh * gw, hd // 2)),
    "apply_rope": ("rotation in the opposite direction",
                   lambda x, a: ref_model.apply_rope(x, -a)),
    "dit_block": ("residual gates missing (gate = 1)", lambda x, c, w, h, a:
                  kit.ReferencePort.dit_block(x, c, _ungated(w), h, a)),
    "dct_position_features": ("missing 1/(1 + f_a f_b) scale", lambda p:
                              ref_model.dct_position_features(p) * (1 + np.outer(_F, _F)).reshape(64)),
    "decoder_block": ("LayerNorm affine ignored", lambda x, c, w:
                      kit.ReferencePort.decoder_block(x, c, _no_layernorm_affine(w))),
    "forward": ("time reversed (t = 1 taken as noise)", lambda cfg, w, x, t, y:
                kit.ReferencePort.forward(cfg, w, x, 1.0 - t, y)),
    "time_grid": ("shift inverted", lambda n, s: ref.time_grid(n, 1.0 / s)),
    "euler": ("guidance interval low <= t < high", _euler_half_open_interval),
    "heun": ("corrector also on the last step", _heun_corrects_last_step),
    "text_rope_angles": ("spans not crossed (x to the width, y to the height)",
                         lambda gh, gw, hd: ref_model.rope_angles(gh, gw, hd, float(gw), float(gh))),
    "text_position_features": ("row and column features exchanged", lambda p:
                               ref_t2i.text_position_features(p).reshape(p * p, 32, 2)[..., ::-1]
                               .reshape(p * p, 64)),
    "text_embedding": ("position table added before the RMSNorm", _position_table_inside_the_norm),
    "text_refine_block": ("RoPE on the text tokens", _refine_with_rope),
    "joint_dit_block": ("text ignored (image keys and values only)", _joint_block_without_text),
    "t2i_forward": ("the class model's DCT position features", _t2i_with_dct_features),
    "adams_weights": ("weights of the uniform grid (time shift ignored)", lambda grid, order:
                      ref_sampling.adams_weights(np.linspace(0.0, 1.0, len(grid)), order)),
    "adams": ("guidance interval low < t <= high", _adams_inclusive_upper),
    **STAGE_DEFECTS,  # the components of the domain and stage vectors
}


#: component -> the hints the kit may give for its planted defect: a slip of the output's layout
#: or scale, or the catalogue variant that reproduces the defect (deco.conformance.differential;
#: each defect above was written independently of the catalogue). None: no slip or variant fits,
#: and no hint may be given (e.g. Cb/Cr swapped, missing gates are no convention point).
HINTS: dict[str, set[str] | None] = {
    **dict.fromkeys(DEFECTS),
    "block_dct": {"transposed"},
    "frequency_weights": {"quality_linear_scale"},
    # Transposed weights and transposed coefficients give the same loss (w[u,v] meets d[v,u]).
    "frequency_aware_loss": {"weights_transposed", "dct_uv_swapped"},
    "timestep_features": {"halves"},
    "rope_angles": {"height_width"},
    "apply_rope": {"rope_inverse"},
    "dct_position_features": {"dct_features_no_damping"},
    "forward": {"model_time_reversed"},
    "time_grid": {"timeshift_inverted"},
    "euler": {"interval_half_open"},
    "heun": {"heun_last_step_corrected"},
    "text_rope_angles": {"text_rope_uncrossed"},
    "text_position_features": {"height_width"},
    "text_embedding": {"text_position_in_norm"},
    "t2i_forward": {"text_features_dct"},
    "adams_weights": {"adams_weights_uniform"},
    "adams": {"adams_interval_high_closed"},
    **{k: None if v is None else {v} for k, v in STAGE_HINTS.items()},
    "interpolate": {"flow_time_reversed"},
    "time_shift": {"timeshift_inverted"},
    "reflect_pad": {"pad_symmetric"},
    "adams_guidance_at": {"adams_interval_high_closed"},
    "guided_velocity": {"guidance_only_above_one"},
}


def _euler_guidance_difference_flipped(model: Any, noise: Any, labels: Any, steps: int,
                                       timeshift: float, guidance: float,
                                       interval: tuple[float, float]) -> np.ndarray:
    """Euler whose guided velocity is u + g (u - c): the sign of the guidance difference."""
    x, b = noise, noise.shape[0]
    null = np.full(b, model.config.num_classes, dtype=np.int64)
    for t_cur, t_next in pairwise(ref.time_grid(steps, timeshift)):
        g = ref_sampling.guidance_at(t_cur, guidance, interval)
        out = model.forward(np.concatenate([x, x]), np.full(2 * b, t_cur), np.concatenate([null, labels]))
        x = x + (t_next - t_cur) * (out[:b] + g * (out[:b] - out[b:]))
    return np.asarray(x)


#: More defects, beyond one per component, that must get a hint: (component, defect, port, slip).
SLIP_DEFECTS: list[tuple[str, str, Any, str]] = [
    ("euler", "sign of the guidance difference", _euler_guidance_difference_flipped,
     "guidance_sign"),
    ("forward", "velocity sign flipped (x - noise taken as noise - x)", lambda cfg, w, x, t, y:
     -kit.ReferencePort.forward(cfg, w, x, t, y), "sign"),
    ("frequency_weights", "weights not normalised to mean 1 (a constant factor per table)",
     lambda q, g: ref.frequency_weights(q, g) * 1.5, "factor"),
    ("time_grid", "grid one step late (t_i taken from i - 1)", lambda n, s: np.concatenate(
        [[0.0], ref.time_grid(n, s)[:-1]]), "shift"),
]


def defective_port(component: str, implementation: Any = None) -> Any:
    class Defective(kit.ReferencePort):
        pass

    setattr(Defective, component, staticmethod(implementation or DEFECTS[component][1]))
    return Defective()


def test_every_component_has_a_planted_defect() -> None:
    assert set(DEFECTS) == set(kit.COMPONENTS)


@pytest.mark.parametrize("component", list(DEFECTS), ids=[f"{c}: {d}" for c, (d, _) in DEFECTS.items()])
def test_a_planted_defect_fails_exactly_its_component(component: str, vectors: list[kit.Vector]) -> None:
    results = kit.run_port(defective_port(component), vectors)
    assert failing_components(results) == {component}
    assert not kit.passed(results)
    # It fails on the numbers, not by crashing, and by far more than the float32 tolerance.
    failed = [r for r in results if r.status != "pass"]
    assert all(r.status == "FAIL" and r.max_rel > 100 * kit.TOLERANCE["float32"] for r in failed), failed
    # Each failure says where it is worst, and names the slip where the defect is one.
    for r in failed:
        assert r.diagnosis is not None and r.diagnosis.worst is not None, r
        hint = r.diagnosis.hint
        assert (hint.slip if hint else None) in (HINTS[component] or {None}), (r.vector, hint)


@pytest.mark.parametrize("component, defect, implementation, slip", SLIP_DEFECTS,
                         ids=[f"{c}: {d}" for c, d, _, _ in SLIP_DEFECTS])
def test_a_convention_slip_gets_its_hint(component: str, defect: str, implementation: Any, slip: str,
                                         vectors: list[kit.Vector]) -> None:
    results = kit.run_port(defective_port(component, implementation), vectors)
    assert failing_components(results) == {component}
    for r in results:
        if r.status != "pass":
            assert r.diagnosis is not None and r.diagnosis.hint is not None, r
            assert r.diagnosis.hint.slip == slip, (r.vector, r.diagnosis.hint)


def test_each_interval_edge_matters(vectors: list[kit.Vector]) -> None:
    """Only the edge vectors catch a wrong interval end: the grid points on both edges decide."""
    results = kit.run_port(defective_port("euler"), vectors)
    assert {r.vector for r in results if r.status == "FAIL"} == {"euler_interval_edges"}
    results = kit.run_port(defective_port("adams"), vectors)
    assert {r.vector for r in results if r.status == "FAIL"} == {"adams_interval_edges"}


def _changed(vector: kit.Vector, vectors: list[kit.Vector], **inputs: np.ndarray) -> float:
    """Relative change of the reference's output when some inputs of `vector` are replaced."""
    altered = kit.Vector(vector.name, vector.component, {**vector.inputs, **inputs}, vector.args,
                         vector.weights, vector.config, vector.velocity_model, vector.expected)
    by_name = {v.name: v for v in vectors}
    result = kit.run_vector(kit.ReferencePort(), altered, by_name, "float64")
    return result.max_rel


def test_the_text_and_the_null_text_matter_in_their_vectors(vectors: list[kit.Vector]) -> None:
    """Unlike the release's T fixture (spec/06 §9), these random weights give the text a large
    influence: a port that drops or mixes up the text, or the null text, fails by far more than
    the float32 tolerance; so does one that guides at t = 0 (the strict lower end of Adams)."""
    by_name = {v.name: v for v in vectors}
    forward, adams = by_name["forward_t2i"], by_name["adams_text"]
    assert _changed(forward, vectors, text=np.zeros_like(forward.inputs["text"])) > 1e-2
    assert _changed(forward, vectors, text=forward.inputs["text"][::-1]) > 1e-2  # batch swapped
    padded = forward.inputs["text"].copy()
    padded[:, -1] = 0.0  # a padding position is part of the condition (no mask)
    assert _changed(forward, vectors, text=padded) > 1e-3
    assert _changed(adams, vectors, null=np.zeros_like(adams.inputs["null"])) > 1e-2
    assert _changed(by_name["joint_dit_block"], vectors,
                    text=np.zeros_like(by_name["joint_dit_block"].inputs["text"])) > 1e-2


def test_text_vectors_are_sensitive_to_the_norm_epsilon(vectors: list[kit.Vector],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch element 1 of the embedding and block inputs is tiny (mean square ~ epsilon): an
    RMSNorm epsilon of 1e-5 instead of 1e-6 changes the answer far beyond the float32 tolerance."""
    by_name = {v.name: v for v in vectors}
    monkeypatch.setattr(ref_model, "NORM_EPS", 1e-5)
    for name in ("text_embedding", "text_refine_block", "joint_dit_block"):
        got = kit.run_vector(kit.ReferencePort(), by_name[name], by_name, "float32")
        assert got.status == "FAIL" and got.max_rel > 1e-3, (name, got)


# ------------------------------------------------------------------------------ runner behaviour
class OnlyYCbCr:
    precision = "float64"

    @staticmethod
    def rgb_to_ycbcr(x: np.ndarray) -> np.ndarray:
        return ref.rgb_to_ycbcr(x)

    @staticmethod
    def block_dct(x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Crashing:
    @staticmethod
    def time_grid(steps: int, timeshift: float) -> np.ndarray:
        raise RuntimeError("boom")

    @staticmethod
    def timestep_features(t: np.ndarray) -> np.ndarray:
        return ref_model.timestep_features(t)[:, :128]  # wrong shape


def test_missing_components_are_skipped(vectors: list[kit.Vector]) -> None:
    results = kit.run_port(OnlyYCbCr(), vectors)
    statuses = {r.component: r.status for r in results}
    assert statuses.pop("rgb_to_ycbcr") == "pass"
    assert set(statuses.values()) == {"skipped"}
    assert kit.passed(results)


def test_a_port_that_runs_nothing_does_not_pass(vectors: list[kit.Vector]) -> None:
    results = kit.run_port(object(), vectors)
    assert all(r.status == "skipped" for r in results)
    assert not kit.passed(results)


def test_exceptions_and_wrong_shapes_are_failures(vectors: list[kit.Vector]) -> None:
    results = {r.component: r for r in kit.run_port(Crashing(), vectors)}
    assert results["time_grid"].status == "ERROR" and "boom" in results["time_grid"].note
    assert results["timestep_features"].status == "FAIL"
    assert "shape" in results["timestep_features"].note


def test_precision_must_be_known() -> None:
    class Odd:
        precision = "float16"

    with pytest.raises(ValueError, match=r"^port: precision"):
        kit.port_precision(Odd())


# --------------------------------------------------------------------------------------- CLI
def test_cli_passes_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--python", "deco.conformance:ReferencePort",
                 "--vectors", str(VECTORS)]) == 0
    out = capsys.readouterr().out
    assert "component" in out.splitlines()[0] and out.strip().endswith("0 skipped")
    rows = [line for line in out.splitlines() if line.rstrip().endswith(" pass")]
    assert len(rows) == len(list(VECTORS.glob("*.safetensors")))


def test_cli_fails_a_defective_port(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--python", "test_conformance:SwappedChroma",
                 "--vectors", str(VECTORS)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in next(line for line in out.splitlines() if line.startswith("rgb_to_ycbcr"))
    # The diagnosis: Cb and Cr swapped is wrong in channels 1 and 2, at every pixel.
    assert "where: along axis 1 (channel): at indices 1, 2, at every position" in out
    assert "worst element [" in out and out.strip().endswith("0 skipped")


class SwappedChroma(kit.ReferencePort):
    rgb_to_ycbcr = staticmethod(DEFECTS["rgb_to_ycbcr"][1])


@pytest.mark.parametrize("argv, message", [
    (["--python", "nocolon"], "python: expected MODULE:OBJECT"),
    (["--python", "no_such_module_xyz:Port"], "python: cannot import"),
    (["--python", "deco.conformance:NoSuchPort"], "python: 'deco.conformance' has no attribute"),
    (["--python", "deco.conformance:ReferencePort", "--vectors", "/no/such/dir"], "vectors: no such folder"),
])
def test_cli_user_errors_are_one_line(argv: list[str], message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_cli_write_regenerates(tmp_path: Path) -> None:
    (tmp_path / "stale.safetensors").write_bytes(b"x")
    assert main(["conformance", "--write", str(tmp_path), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in VECTORS.glob("*.safetensors"))
    meta, _ = _read(tmp_path / "forward_deco.safetensors")
    assert json.loads(meta["config"])["architecture"] == "deco"
