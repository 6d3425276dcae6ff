"""ONNX export (deco.deploy.export), the onnxruntime sampler (deco.deploy.runtime) and their CLI
commands, checked against deco.optimized (torch) and the float64 reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from helpers import REPO_ROOT, random_weights, rel_err, tiny_config

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


def torch_model(config: DeCoConfig, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    model = build_model(config)
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()})
    return model.eval()


class Tiny:
    """A tiny model as float32 weights, its reference and torch versions, and its weight file."""

    def __init__(self, architecture: str, folder: Path) -> None:
        self.config = tiny_config(architecture)
        self.weights = {k: v.astype(np.float32) for k, v in random_weights(self.config, seed=3).items()}
        self.reference = Model(self.config, self.weights)
        self.torch = torch_model(self.config, self.weights)
        self.checkpoint = folder / f"{architecture}.safetensors"
        save_weights(self.checkpoint, self.config, self.weights)


@pytest.fixture(scope="module", params=["deco", "baseline"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return Tiny(request.param, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def velocity_graph(tiny: Tiny) -> OnnxVelocityModel:
    path = export_onnx(tiny.torch, tiny.checkpoint.with_suffix(".onnx"))
    return OnnxVelocityModel(path)


def inputs(config: DeCoConfig, batch: int, h: int, w: int, seed: int = 0) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, config.in_channels, h, w)).astype(np.float32)
    t = rng.uniform(0, 1, batch).astype(np.float32)
    y = rng.integers(0, config.num_classes + 1, batch)
    return x, t, y


# ------------------------------------------------------------------------------------- export
def test_graph_passes_the_checker_and_carries_the_config(velocity_graph: OnnxVelocityModel,
                                                         tiny: Tiny) -> None:
    proto = onnx.load(str(velocity_graph.path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["deco_format"] == "1" and meta["deco_graph"] == "velocity"
    assert DeCoConfig.from_json(meta["config"]) == tiny.config
    assert velocity_graph.config == tiny.config
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", tiny.config.in_channels, "height", "width"]


@pytest.mark.parametrize("batch, h, w", [(2, 8, 12), (1, 16, 16), (5, 4, 20), (3, 24, 8)])
def test_dynamic_graph_matches_torch_and_reference_at_any_size(
        velocity_graph: OnnxVelocityModel, tiny: Tiny, batch: int, h: int, w: int) -> None:
    x, t, y = inputs(tiny.config, batch, h, w)
    got = velocity_graph.forward(x, t, y)
    with torch.no_grad():
        mine = tiny.torch(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).double().numpy()
    assert rel_err(got, tiny.reference.forward(x, t, y)) <= FLOAT32_RTOL
    assert rel_err(got, mine) <= FLOAT32_RTOL


def test_fixed_batch_and_resolution(tiny: Tiny, tmp_path: Path) -> None:
    graph = OnnxVelocityModel(export_onnx(tiny.torch, tmp_path / "fixed.onnx", batch=3,
                                          resolution=(8, 16), opset=18))
    dims = [d.dim_value for d in onnx.load(str(graph.path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, tiny.config.in_channels, 8, 16]
    assert graph.metadata["deco_resolution"] == "8x16" and graph.metadata["deco_batch"] == "3"
    x, t, y = inputs(tiny.config, 3, 8, 16)
    assert rel_err(graph.forward(x, t, y), tiny.reference.forward(x, t, y)) <= FLOAT32_RTOL
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        graph.forward(*inputs(tiny.config, 2, 8, 16))


def test_cfg_graph_is_the_guided_velocity(tiny: Tiny, tmp_path: Path) -> None:
    graph = OnnxVelocityModel(export_onnx(tiny.torch, tmp_path / "cfg.onnx", cfg=True))
    assert graph.graph == "cfg"
    x, _, y = inputs(tiny.config, 3, 8, 12)
    t = np.full(3, 0.4, dtype=np.float32)
    for g in (0.0, 1.0, 3.5):
        expected = guided_velocity(tiny.reference, x.astype(np.float64), 0.4, y, g)
        assert rel_err(graph.guided_velocity(x, t, y, g), expected) <= FLOAT32_RTOL
    with pytest.raises(ValueError, match=r"^path: .*'cfg' graph"):
        graph.forward(x, t, y)


@pytest.mark.parametrize("options, message", [
    ({"opset": 13}, "^opset: "),
    ({"batch": 0}, "^batch: "),
    ({"resolution": (8, 10)}, "^resolution: "),
])
def test_export_rejects_bad_options(tiny: Tiny, tmp_path: Path, options: dict[str, Any],
                                    message: str) -> None:
    with pytest.raises(ValueError, match=message):
        export_onnx(tiny.torch, tmp_path / "bad.onnx", **options)


class FrozenBatch(torch.nn.Module):
    """A model whose Python code turns the batch size into a constant while tracing."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(int(x.shape[0]), 1, 1, 1)
        return self.model(x, t, y) * scale


def test_export_refuses_a_graph_frozen_to_the_traced_shape(tmp_path: Path) -> None:
    config = tiny_config("baseline")
    model = FrozenBatch(torch_model(config, random_weights(config)))
    with pytest.raises(ValueError, match=r"^model: the exported graph does not run correctly"):
        export_onnx(model, tmp_path / "frozen.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    export_onnx(model, tmp_path / "fixed.onnx", batch=2)  # a fixed batch is fine


def test_export_leaves_the_callers_model_alone(tmp_path: Path) -> None:
    config = tiny_config("baseline")
    model = torch_model(config, random_weights(config)).double().train()
    export_onnx(model, tmp_path / "m.onnx")
    assert model.training and next(model.parameters()).dtype == torch.float64


# ---------------------------------------------------------------------------- onnxruntime sampler
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_onnxruntime_sampler_matches_the_optimized_sampler(
        velocity_graph: OnnxVelocityModel, tiny: Tiny, solver: str) -> None:
    from deco.optimized.sampling import sample

    rng = np.random.default_rng(1)
    noise = rng.standard_normal((2, 3, 8, 12)).astype(np.float32)
    labels = np.array([1, 7])
    options = {"steps": 6, "guidance": 2.5, "interval": (0.2, 0.8), "timeshift": 2.0, "solver": solver}
    got = onnx_sample(velocity_graph, noise, labels, **options)
    with torch.no_grad():
        mine = sample(tiny.torch, torch.from_numpy(noise), torch.from_numpy(labels), **options)
    assert rel_err(got, mine.double().numpy()) <= 1e-4
    assert rel_err(got, onnx_sample(tiny.reference, noise, labels, **options)) <= FLOAT32_RTOL


def test_onnxruntime_sampler_never_imports_torch(velocity_graph: OnnxVelocityModel) -> None:
    code = (
        "import sys, numpy as np\n"
        "from deco.deploy.runtime import OnnxVelocityModel, sample\n"
        f"m = OnnxVelocityModel({str(velocity_graph.path)!r})\n"
        "x = sample(m, np.zeros((1, 3, 8, 8)), np.array([1]), steps=2, guidance=2.0)\n"
        "assert np.all(np.isfinite(x)) and x.shape == (1, 3, 8, 8)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------- commands
def test_export_and_check_commands(tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", str(tiny.checkpoint), str(out), "--cfg"]) == 0
    assert main(["onnx-check", str(out), "--resolution", "8", "16", "--batch", "3"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime vs reference" in text and "PASS" in text
    meta = OnnxVelocityModel(out).metadata
    assert Path(meta["deco_checkpoint"]) == tiny.checkpoint.resolve()
    assert json.loads(meta["config"]) == tiny.config.to_dict()


def test_check_fails_when_the_graph_does_not_hold_the_recorded_weights(
        tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deco.deploy.export import sha256_file

    other = torch_model(tiny.config, random_weights(tiny.config, seed=99))
    meta = {"deco_checkpoint": str(tiny.checkpoint), "deco_checkpoint_sha256": sha256_file(tiny.checkpoint)}
    path = export_onnx(other, tmp_path / "other.onnx", metadata=meta)
    assert main(["onnx-check", str(path)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_refuses_a_different_weight_file(tiny: Tiny, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", str(tiny.checkpoint), str(out)]) == 0
    other = tmp_path / "other.safetensors"
    save_weights(other, tiny.config, random_weights(tiny.config, seed=5))
    capsys.readouterr()
    assert main(["onnx-check", str(out), "--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deco onnx-check: error: checkpoint: ") and "SHA-256" in err


@pytest.mark.parametrize("argv, message", [
    (["export-onnx", "{ckpt}", "{out}", "--batch", "zero"], "--batch"),
    (["export-onnx", "{ckpt}", "{out}", "--resolution", "8", "9"], "resolution: "),
    (["export-onnx", "{ckpt}", "{out}", "--opset", "9"], "opset: "),
    (["export-onnx", "{ckpt}", "/no/such/dir/m.onnx"], "output: "),
    (["onnx-check", "{ckpt}"], "path: "),
])
def test_command_user_errors_are_one_line(argv: list[str], message: str, tiny: Tiny, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(ckpt=tiny.checkpoint, out=tmp_path / "m.onnx") for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


# --------------------------------------------------------------------------- conformance --onnx
def test_conformance_on_an_exported_vector_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vectors = REPO_ROOT / "spec" / "vectors"
    path = tmp_path / "vec.onnx"
    assert main(["conformance", "--export-vector-model", str(path), "--vectors", str(vectors)]) == 0
    assert main(["conformance", "--onnx", str(path), "--vectors", str(vectors)]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()
            if line.startswith("forward")}
    assert rows["forward_deco"].rstrip().endswith("pass")
    assert "skipped" in rows["forward_baseline"]


def test_conformance_fails_a_graph_with_other_weights(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from deco.conformance.vectors import VECTOR_MODELS

    config = VECTOR_MODELS["baseline"]
    path = export_onnx(torch_model(config, random_weights(config, seed=8)), tmp_path / "other.onnx")
    assert main(["conformance", "--onnx", str(path), "--vectors", str(REPO_ROOT / "spec" / "vectors"),
                 "--json"]) == 1
    # The diagnosis comes with --onnx too: other weights are wrong everywhere, with no slip.
    record = {r["vector"]: r for r in json.loads(capsys.readouterr().out)["results"]}["forward_baseline"]
    assert record["status"] == "FAIL" and len(record["worst"]["index"]) == 4
    assert record["location"]["kind"] == "everywhere" and record["hint"] is None
