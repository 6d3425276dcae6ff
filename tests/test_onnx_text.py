"""ONNX export of the text-to-image model (spec/06): graphs with inputs x, t, text (and for --cfg
the null text and the guidance), `deco onnx-check`, the onnxruntime-only sampler (Euler, Adams,
text + null text) and `deco conformance --onnx` on the text forward vector; against
deco.optimized (torch) and the float64 reference, on the tiny text model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from helpers import REPO_ROOT, random_weights, rel_err

from deco.cli import main
from deco.config import DeCoConfig
from deco.deploy.export import export_onnx
from deco.deploy.runtime import OnnxVelocityModel
from deco.deploy.runtime import sample as onnx_sample
from deco.optimized.weights import build_model
from deco.reference import Model, save_weights
from deco.reference.sampling import guided_velocity

#: spec/00-conventions.md §5: a float32 implementation vs the float64 reference (tiny models).
FLOAT32_RTOL = 1e-5
#: The issue's bound for onnxruntime vs the optimized model through a whole sampling run.
SAMPLER_RTOL = 1e-4
CONFIG = DeCoConfig.preset("DeCo-T2I-tiny/4")  # D 64, 4 heads, 3 DiT + 2 refine blocks, T 8, E 48


class TinyText:
    """The tiny text model as float32 weights, its reference and torch versions, its weight file
    and its two graphs (velocity and cfg)."""

    def __init__(self, folder: Path) -> None:
        self.weights = {k: v.astype(np.float32) for k, v in random_weights(CONFIG, seed=4).items()}
        self.reference = Model(CONFIG, self.weights)
        model = build_model(CONFIG)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in self.weights.items()})
        self.torch = model.eval()
        self.checkpoint = folder / "t2i.safetensors"
        save_weights(self.checkpoint, CONFIG, self.weights)
        self.velocity = OnnxVelocityModel(export_onnx(self.torch, folder / "t2i.onnx"))
        self.cfg = OnnxVelocityModel(export_onnx(self.torch, folder / "t2i_cfg.onnx", cfg=True))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyText:
    return TinyText(tmp_path_factory.mktemp("onnx_text"))


def inputs(batch: int, h: int, w: int, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """x, t (one time for the batch, as guidance needs), text (B, T, E), a null text (T, E)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, h, w)).astype(np.float32)
    t = np.full(batch, rng.uniform(0.1, 0.9), dtype=np.float32)
    text = rng.standard_normal((batch, CONFIG.text_length, CONFIG.text_dim)).astype(np.float32)
    null = rng.standard_normal((CONFIG.text_length, CONFIG.text_dim)).astype(np.float32)
    return x, t, text, null


def torch_forward(tiny: TinyText, x: Any, t: Any, text: Any) -> Any:
    with torch.no_grad():
        out = tiny.torch(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text))
    return out.double().numpy()


def dims(value: Any) -> list[Any]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


# ------------------------------------------------------------------------------------- export
def test_graph_inputs_are_x_t_and_text(tiny: TinyText) -> None:
    proto = onnx.load(str(tiny.velocity.path))
    graph_inputs = {i.name: dims(i) for i in proto.graph.input}
    assert graph_inputs == {"x": ["batch", 3, "height", "width"], "t": ["batch"],
                            "text": ["batch", CONFIG.text_length, CONFIG.text_dim]}
    assert proto.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert tiny.velocity.config == CONFIG and tiny.velocity.graph == "velocity"
    cfg_inputs = [(i.name, dims(i)) for i in onnx.load(str(tiny.cfg.path)).graph.input]
    assert cfg_inputs == [("x", ["batch", 3, "height", "width"]), ("t", ["batch"]),
                          ("text", ["batch", CONFIG.text_length, CONFIG.text_dim]),
                          ("null", ["batch", CONFIG.text_length, CONFIG.text_dim]),
                          ("guidance", [])]


# Traced at batch 2, 8x12 (a 2x3 grid): other batches, square, one-row and one-column grids
# and a taller-than-wide one, where the crossed RoPE spans of spec/06 §3 differ most.
@pytest.mark.parametrize("batch, h, w", [(2, 8, 12), (1, 16, 16), (3, 4, 20), (2, 24, 4), (1, 12, 8)])
def test_dynamic_graph_matches_torch_and_reference_at_any_size(
        tiny: TinyText, batch: int, h: int, w: int) -> None:
    x, t, text, _ = inputs(batch, h, w)
    got = tiny.velocity.forward(x, t, text)
    assert rel_err(got, tiny.reference.forward(x, t, text)) <= FLOAT32_RTOL
    assert rel_err(got, torch_forward(tiny, x, t, text)) <= FLOAT32_RTOL


def test_the_graph_reads_every_text_token(tiny: TinyText) -> None:
    """The text changes the output, a padding slot included (no mask, spec/06 §6), and the
    graph follows the reference there: it is not a constant folded in while tracing."""
    x, t, text, _ = inputs(2, 8, 12)
    base = tiny.velocity.forward(x, t, text)
    padded = text.copy()
    padded[:, -1] = 0.0
    for changed in (np.zeros_like(text), padded):
        got = tiny.velocity.forward(x, t, changed)
        assert rel_err(got, base) > 1e-3
        assert rel_err(got, tiny.reference.forward(x, t, changed)) <= FLOAT32_RTOL


@pytest.mark.parametrize("per_sample_null", [False, True], ids=["null (T, E)", "null (B, T, E)"])
def test_cfg_graph_is_the_guided_velocity_with_the_null_text(tiny: TinyText,
                                                             per_sample_null: bool) -> None:
    x, t, text, null = inputs(3, 8, 12, seed=1)
    nulls = np.stack([null, null[::-1], 0.5 * null]) if per_sample_null else null
    batched = nulls if per_sample_null else np.broadcast_to(null, text.shape)
    for g in (0.0, 1.0, 4.0):
        expected = guided_velocity(tiny.reference, x.astype(np.float64), float(t[0]), text, g, batched)
        assert rel_err(tiny.cfg.guided_velocity(x, t, text, g, nulls), expected) <= FLOAT32_RTOL
    # g = 0 is the null branch alone: the null text really is what the graph conditions on.
    assert rel_err(tiny.cfg.guided_velocity(x, t, text, 0.0, nulls),
                   tiny.velocity.forward(x, t, batched)) <= FLOAT32_RTOL


def test_bad_text_inputs_are_clear_errors(tiny: TinyText) -> None:
    x, t, text, null = inputs(2, 8, 12)
    with pytest.raises(TypeError, match=r"^text: "):
        tiny.velocity.forward(x, t, np.array([1, 2]))
    with pytest.raises(ValueError, match=r"^text: expected \(2, 8, 48\)"):
        tiny.velocity.forward(x, t, text[:, :5])
    with pytest.raises(ValueError, match=r"^null: "):
        tiny.cfg.guided_velocity(x, t, text, 3.0)
    with pytest.raises(ValueError, match=r"^null: "):
        tiny.cfg.guided_velocity(x, t, text, 3.0, null[:, :7])


def test_float16_cfg_graph_of_the_text_model(tiny: TinyText, tmp_path: Path) -> None:
    """float16 weights and compute behind the float32 interface, text and null included."""
    from deco.deploy.export import RTOL_BY_DTYPE

    graph = OnnxVelocityModel(export_onnx(tiny.torch, tmp_path / "f16.onnx", cfg=True,
                                          dtype="float16"))
    x, t, text, null = inputs(2, 12, 8, seed=5)
    expected = guided_velocity(tiny.reference, x.astype(np.float64), float(t[0]), text, 3.0,
                               np.broadcast_to(null, text.shape))
    got = graph.guided_velocity(x, t, text, 3.0, null)
    assert got.dtype == np.float64 and rel_err(got, expected) <= RTOL_BY_DTYPE["float16"]


# ---------------------------------------------------------------------------- onnxruntime sampler
@pytest.mark.parametrize("solver, options", [
    ("euler", {"steps": 5, "guidance": 4.0, "interval": (0.2, 0.9), "timeshift": 1.0}),
    ("adams", {"steps": 6, "guidance": 4.0, "interval": (0.0, 1.0), "timeshift": 3.0, "order": 2}),
])
def test_onnxruntime_sampler_with_text_and_null_matches_the_optimized_sampler(
        tiny: TinyText, solver: str, options: dict[str, Any]) -> None:
    from deco.optimized.sampling import sample

    rng = np.random.default_rng(2)
    noise = rng.standard_normal((2, 3, 8, 12)).astype(np.float32)
    _, _, text, null = inputs(2, 8, 12, seed=3)
    got = onnx_sample(tiny.velocity, noise, text, null, solver=solver, **options)
    with torch.no_grad():
        mine = sample(tiny.torch, torch.from_numpy(noise), torch.from_numpy(text),
                      torch.from_numpy(null), solver=solver, **options)
    assert isinstance(mine, torch.Tensor)
    assert rel_err(got, mine.double().numpy()) <= SAMPLER_RTOL
    expected = onnx_sample(tiny.reference, noise, text, null, solver=solver, **options)
    assert rel_err(got, expected) <= FLOAT32_RTOL
    # Guidance changes the samples, so the null branch was really evaluated.
    unguided = onnx_sample(tiny.reference, noise, text, solver=solver, **{**options, "guidance": 1.0})
    assert rel_err(expected, unguided) > 1e-3


def test_onnxruntime_sampler_needs_the_null_text_for_guidance(tiny: TinyText) -> None:
    _, _, text, _ = inputs(2, 8, 12)
    with pytest.raises(ValueError, match=r"^null: "):
        onnx_sample(tiny.velocity, np.zeros((2, 3, 8, 12)), text, steps=2, guidance=3.0)


# ----------------------------------------------------------------------------------- commands
@pytest.mark.parametrize("cfg", [False, True], ids=["velocity", "cfg"])
def test_export_and_check_commands(tiny: TinyText, tmp_path: Path, cfg: bool,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", str(tiny.checkpoint), str(out), *(["--cfg"] if cfg else [])]) == 0
    assert main(["onnx-check", str(out), "--resolution", "12", "8", "--batch", "3"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime vs reference" in text and "PASS" in text
    assert OnnxVelocityModel(out).graph == ("cfg" if cfg else "velocity")


def test_check_fails_a_text_graph_with_other_weights(tiny: TinyText, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from deco.deploy.export import sha256_file

    other = build_model(CONFIG)
    other.load_state_dict({k: torch.from_numpy(v.astype(np.float32))
                           for k, v in random_weights(CONFIG, seed=9).items()})
    meta = {"deco_checkpoint": str(tiny.checkpoint), "deco_checkpoint_sha256": sha256_file(tiny.checkpoint)}
    path = export_onnx(other.eval(), tmp_path / "other.onnx", metadata=meta, cfg=True)
    assert main(["onnx-check", str(path)]) == 1
    assert "FAIL" in capsys.readouterr().out


# --------------------------------------------------------------------------- conformance --onnx
def test_conformance_runs_the_text_forward_vector(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    vectors = REPO_ROOT / "spec" / "vectors"
    path = tmp_path / "vec.onnx"
    assert main(["conformance", "--export-vector-model", str(path), "--architecture", "t2i",
                 "--vectors", str(vectors)]) == 0
    assert main(["conformance", "--onnx", str(path), "--vectors", str(vectors)]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()
            if line.startswith(("forward", "t2i_forward"))}
    assert rows["forward_t2i"].rstrip().endswith("pass")
    assert "skipped" in rows["forward_deco"] and "skipped" in rows["forward_baseline"]
