"""deco.deploy.optimize: the pixel decoder lowered to an ONNX Scan over chunks, onnxruntime session
options and the saved onnxruntime-optimised graph, checked against the float64 reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import random_weights, rel_err, save_checkpoint, tiny_config
from onnx.reference import ReferenceEvaluator

from deco.config import DeCoConfig
from deco.deploy.export import ONNX_CHECK_RTOL, export_onnx
from deco.deploy.optimize import optimize_for_ort, optimized_path, session_options
from deco.deploy.runtime import OnnxVelocityModel
from deco.optimized.weights import build_model
from deco.reference import Model

#: spec/00-conventions.md §5: a float32 implementation vs the float64 reference (tiny models).
FLOAT32_RTOL = 1e-5


def models(architecture: str) -> tuple[torch.nn.Module, Model]:
    config = DeCoConfig.preset("DeCo-T2I-tiny/4") if architecture == "t2i" else tiny_config(architecture)
    weights = {k: v.astype(np.float32) for k, v in random_weights(config, seed=5).items()}
    model = build_model(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model.eval(), Model(config, weights)


def feed(config: object, batch: int, h: int, w: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 3, h, w)).astype(np.float32)
    t = rng.uniform(0, 1, batch).astype(np.float32)
    if getattr(config, "is_text", False):
        shape = (batch, config.text_length, config.text_dim)  # type: ignore[attr-defined]
        return {"x": x, "t": t, "text": rng.standard_normal(shape).astype(np.float32)}
    return {"x": x, "t": t, "y": rng.integers(0, 11, batch)}


def ops(path: Path) -> list[tuple[str, str]]:
    proto = onnx.load(str(path))
    found = [(n.domain, n.op_type) for n in proto.graph.node]
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += [(n.domain, n.op_type) for n in attr.g.node]
    return found


@pytest.mark.parametrize("architecture", ["deco", "t2i"])
def test_decoder_loop_over_uneven_chunks_matches_the_reference(architecture: str, tmp_path: Path) -> None:
    """3 patches (of 16 pixels) per iteration: 2 x (2x5) = 20 patches take 7 iterations, the
    last one padded with one zero patch whose rows must not reach the output."""
    model, reference = models(architecture)
    path = export_onnx(model, tmp_path / "g.onnx", decoder_chunk_rows=3 * 16)
    found = ops(path)
    assert ("", "Scan") in found and ("", "InstanceNormalization") in found
    assert {domain for domain, _ in found} == {""}  # standard ONNX only
    graph = OnnxVelocityModel(path)
    for batch, h, w in [(2, 8, 20), (1, 4, 4), (3, 12, 8)]:
        inputs = feed(model.config, batch, h, w)
        cond = inputs.get("text", inputs.get("y"))
        expected = reference.forward(inputs["x"], inputs["t"], cond)
        assert rel_err(graph.forward(inputs["x"], inputs["t"], cond), expected) <= FLOAT32_RTOL


def test_straight_decoder_remains_available(tmp_path: Path) -> None:
    model, reference = models("deco")
    path = export_onnx(model, tmp_path / "g.onnx", decoder_chunk_rows=None)
    assert ("", "Scan") not in ops(path)
    inputs = feed(model.config, 2, 8, 12)
    got = OnnxVelocityModel(path).forward(inputs["x"], inputs["t"], inputs["y"])
    assert rel_err(got, reference.forward(inputs["x"], inputs["t"], inputs["y"])) <= FLOAT32_RTOL


def test_scan_graph_runs_in_the_onnx_reference_evaluator(tmp_path: Path) -> None:
    """Another runtime than onnxruntime reads the Scan the same way."""
    model, reference = models("deco")
    path = export_onnx(model, tmp_path / "g.onnx", decoder_chunk_rows=2 * 16)
    inputs = feed(model.config, 1, 12, 8)
    got = ReferenceEvaluator(str(path)).run(["v"], inputs)[0]  # type: ignore[index]
    assert rel_err(got, reference.forward(inputs["x"], inputs["t"], inputs["y"])) <= FLOAT32_RTOL


@pytest.mark.parametrize("level", ["extended", "all"])
def test_saved_onnxruntime_graph_loads_back_and_agrees(level: str, tmp_path: Path) -> None:
    model, _ = models("deco")
    path = export_onnx(model, tmp_path / "g.onnx")
    saved = optimize_for_ort(path, level=level)
    assert saved == optimized_path(path, level) and saved.parent == path.parent
    assert not list(tmp_path.glob(".*"))  # nothing left over from writing it
    graph = OnnxVelocityModel(saved, level="disable")
    assert graph.config == model.config and graph.graph == "velocity"
    inputs = feed(model.config, 2, 8, 12)
    with torch.no_grad():
        expected = model(*(torch.from_numpy(inputs[k]) for k in ("x", "t", "y"))).numpy()
    assert rel_err(graph.forward(inputs["x"], inputs["t"], inputs["y"]), expected) <= ONNX_CHECK_RTOL


@pytest.mark.parametrize("options, message", [
    ({"threads": 0}, "threads: expected a positive int"),
    ({"threads": True}, "threads: expected a positive int"),
    ({"level": "fast"}, "level: expected one of disable, basic, extended, all"),
])
def test_session_options_reject_bad_values(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        session_options(**options)  # type: ignore[arg-type]


def test_session_options_set_what_they_say(tmp_path: Path) -> None:
    import onnxruntime as ort

    options = session_options(threads=2, level="basic", optimized_model_path=tmp_path / "o.onnx",
                              sequential=False, memory_pattern=False, cpu_arena=False, spinning=False)
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.optimized_model_filepath == str(tmp_path / "o.onnx")
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert not options.enable_mem_pattern and not options.enable_cpu_mem_arena
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("rows", [0, -4, True, 2.5])
def test_export_rejects_bad_chunk_rows(rows: object, tmp_path: Path) -> None:
    model, _ = models("deco")
    with pytest.raises(ValueError, match="decoder_chunk_rows: expected a positive int or None"):
        export_onnx(model, tmp_path / "g.onnx", decoder_chunk_rows=rows)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_optimize_for_ort_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="path: no such file"):
        optimize_for_ort(tmp_path / "absent.onnx")


class TwoEulerSteps(torch.nn.Module):
    """A generator-like graph: the same velocity model (hence the same decoder) called twice."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.full_like(x[:, 0, 0, 0], 0.2), torch.full_like(x[:, 0, 0, 0], 0.6)
        x = x + 0.4 * self.model(x, t0, y)
        out: torch.Tensor = x + 0.4 * self.model(x, t1, y)
        return out


def test_one_decoder_called_twice_shares_its_weights(tmp_path: Path) -> None:
    """What a generator graph (deco.deploy.generator) does: two Scans, one set of decoder weights,
    the same result as the torch steps."""
    import onnxruntime as ort

    from deco.deploy.optimize import lower_decoders, lowered_decoders
    from deco.deploy.symbolics import symbolics

    model, _ = models("deco")
    net = TwoEulerSteps(model).eval()
    x, y = torch.randn(2, 3, 8, 12), torch.tensor([1, 4])
    traced = tmp_path / "two.onnx"
    with symbolics(17), lowered_decoders() as decoders, torch.no_grad():
        torch.onnx.export(net, (x, y), str(traced), dynamo=False, opset_version=17,
                          input_names=["x", "y"], output_names=["out"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}, "out": {0: "b"}})
    assert len(decoders) == 1
    proto = lower_decoders(onnx.load(str(traced)), decoders, chunk_rows=2 * 16)
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node].count("Scan") == 2
    names = [t.name for t in proto.graph.initializer]
    assert len(names) == len(set(names))
    assert sum(name.startswith("/decoder0/blocks.0.fc1") for name in names) == 1  # the bias-free weight, once
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x3, y3 = torch.randn(3, 3, 8, 12), torch.tensor([0, 7, 10])  # another batch
    with torch.no_grad():
        expected = net(x3, y3).numpy()
    got = session.run(["out"], {"x": x3.numpy(), "y": y3.numpy()})[0]
    assert rel_err(got, expected) <= ONNX_CHECK_RTOL


@pytest.mark.parametrize("rows, scans", [("0", 0), ("32", 1)])
def test_decoder_chunks_flag(rows: str, scans: int, tmp_path: Path) -> None:
    """`deco export-onnx --decoder-chunks 0` writes the straight-line decoder (for GPU runtimes)."""
    from deco.cli import main

    model, reference = models("deco")
    checkpoint = save_checkpoint(model, tmp_path)
    out = tmp_path / "g.onnx"
    assert main(["export-onnx", str(checkpoint), str(out), "--decoder-chunks", rows]) == 0
    assert ops(out).count(("", "Scan")) == scans
    inputs = feed(model.config, 2, 8, 12)
    got = OnnxVelocityModel(out).forward(inputs["x"], inputs["t"], inputs["y"])
    assert rel_err(got, reference.forward(inputs["x"], inputs["t"], inputs["y"])) <= FLOAT32_RTOL


def test_negative_decoder_chunks_is_one_line_and_writes_nothing(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from deco.cli import main

    model, _ = models("deco")
    checkpoint = save_checkpoint(model, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export-onnx", str(checkpoint), str(out / "g.onnx"), "--decoder-chunks", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--decoder-chunks: expected 0" in err
    assert list(out.iterdir()) == []
