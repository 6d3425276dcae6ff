"""int8 exports (`deco export-onnx --dtype int8`, deco.deploy.quantize): onnxruntime's dynamic
quantisation of the velocity graph, alone or inside the generator graph.

Oracles: the float32 torch model (`deco.optimized`, and `deco.optimized.sample` for the
generator), the float32 export's own interface (the int8 graph must offer the same one), the file's
initializers as onnx reads them, and `deco.outputs.to_uint8` for the image output.

Bounds (max |int8 - torch| / max |torch|), measured on random tiny models (helpers.random_weights,
every weight non-zero, activations O(1)), seeds 0..9 each of DeCo-tiny/4, DiT-tiny/4 and
DeCo-T2I-tiny/4 (30 models):
- velocity graph: int8 error 0.021..0.113 (worst: DeCo-tiny/4 seed 0); a model with other weights
  (what a wrong export would compute) is off by 1.04..1.95. VELOCITY_BOUND = 0.25 =
  RTOL_BY_DTYPE["int8"]: 2.2x the worst int8 error measured, 4x below the closest wrong model.
- generator (8 steps; Euler unguided, Heun and Adams guided with g = 3): int8 error 0.03..0.66
  (worst: DeCo-tiny/4 seed 3, Heun): a random model amplifies each step's rounding, and the guidance
  3x more; two different models' clamped samples differ by 2 (opposite saturation).
  GENERATOR_BOUND = 1.0 = GENERATOR_RTOL_BY_DTYPE["int8"] (the export's own check): 1.5x the worst
  measured, 2x below a wrong model. That is a weak separation, so the velocity tests carry the
  precision; the generator tests carry the wrapping (interface, metadata, weights, image output).
On the trained digits model (bench/RESULTS.md, "int8 on the digits demo"): velocity 0.03..0.13 on
noised real digits at t = 0..0.96 (the worst near t = 1, where v is small), 1.9x below the bound;
the 25-step guided generator 0.27 (mean |error| 0.015 on [-1, 1]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import rel_err, save_checkpoint, tiny_config, tiny_model

from deco.cli import main
from deco.config import DeCoConfig
from deco.deploy.export import GENERATOR_RTOL_BY_DTYPE, RTOL_BY_DTYPE, export_onnx
from deco.deploy.generator import export_generator
from deco.deploy.generator_check import example_feed, torch_sample
from deco.deploy.quantize import export_int8, export_int8_generator
from deco.optimized.sampling import SampleSettings
from deco.outputs import to_uint8

VELOCITY_BOUND = 0.25
GENERATOR_BOUND = 1.0
#: A wrong model (other random weights) is off by at least this much (measured: >= 1.04).
WRONG_FLOOR = 1.0
TEXT = DeCoConfig.preset("DeCo-T2I-tiny/4")


@pytest.fixture(scope="module")
def class_model() -> torch.nn.Module:
    return tiny_model(tiny_config("deco"), seed=1)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def interface(path: Path) -> tuple[list[tuple[str, int, list[str | int]]], ...]:
    """(inputs, outputs) as (name, element type, shape with symbolic names) lists."""
    graph = onnx.load(str(path)).graph

    def describe(values: list[onnx.ValueInfoProto]) -> list[tuple[str, int, list[str | int]]]:
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
    return describe(list(graph.input)), describe(list(graph.output))


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def weight_types(path: Path) -> dict[str, int]:
    """Bytes of initializer data per element type name."""
    out: dict[str, int] = {}
    for t in onnx.load(str(path)).graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        out[name] = out.get(name, 0) + onnx.numpy_helper.to_array(t).nbytes
    return out


def check_int8_file(int8: Path, float32: Path) -> None:
    """Same interface and metadata as the float32 export (plus the quantisation), int8 weights,
    a smaller file."""
    assert interface(int8) == interface(float32)
    meta, float_meta = metadata(int8), metadata(float32)
    assert set(meta) == set(float_meta) | {"deco_quantization"}
    assert meta["deco_dtype"] == "int8" and "dynamic int8" in meta["deco_quantization"]
    assert {k: v for k, v in meta.items() if k not in ("deco_dtype", "deco_quantization")} == \
        {k: v for k, v in float_meta.items() if k != "deco_dtype"}
    types = weight_types(int8)
    # The linear layers hold most weights: int8 must be most of the bytes, float32 what is left
    # (norm gains, biases, the label table, the quantisation scales).
    assert types["INT8"] > 0.6 * sum(types.values()), types
    assert int8.stat().st_size < 0.5 * float32.stat().st_size


@pytest.mark.parametrize("config, cfg", [(tiny_config("deco"), False), (tiny_config("baseline"), True),
                                         (TEXT, True)], ids=["deco", "baseline-cfg", "text-cfg"])
def test_int8_velocity_graph(config: DeCoConfig, cfg: bool, tmp_path: Path) -> None:
    model, wrong = tiny_model(config, seed=2), tiny_model(config, seed=102)
    int8 = export_int8(model, tmp_path / "int8.onnx", cfg=cfg)
    check_int8_file(int8, export_onnx(model, tmp_path / "float32.onnx", cfg=cfg))
    rng = np.random.default_rng(0)
    b = 3
    inputs: list[np.ndarray] = [rng.standard_normal((b, 3, 16, 24)).astype(np.float32),
                                rng.random(b).astype(np.float32)]
    if config.is_text:
        text = (b, config.text_length, config.text_dim)
        inputs += [rng.standard_normal(text).astype(np.float32) for _ in range(2 if cfg else 1)]
    else:
        inputs.append(np.array([0, 5, config.num_classes]))
    if cfg:
        inputs.append(np.asarray(2.0, np.float32))
    names = [i.name for i in onnx.load(str(int8)).graph.input]
    got = session(int8).run(["v"], dict(zip(names, inputs, strict=True)))[0]
    with torch.no_grad():
        run = (lambda m: _guided(m, config)) if cfg else (lambda m: m)
        expected = run(model)(*map(torch.from_numpy, inputs)).numpy()
        other = run(wrong)(*map(torch.from_numpy, inputs)).numpy()
    assert rel_err(got, expected) <= VELOCITY_BOUND
    assert rel_err(other, expected) >= WRONG_FLOOR  # the bound tells a wrong model apart


def _guided(model: torch.nn.Module, config: DeCoConfig) -> torch.nn.Module:
    from deco.deploy.export import guided

    return guided(model, config)


@pytest.mark.parametrize("settings", [SampleSettings(steps=4), SampleSettings(steps=4, solver="heun",
                                                                              guidance=2.0)],
                         ids=["euler", "heun-guided"])
def test_int8_generator_graph(class_model: torch.nn.Module, settings: SampleSettings,
                              tmp_path: Path) -> None:
    int8 = export_int8_generator(class_model, tmp_path / "int8.onnx", settings)
    check_int8_file(int8, export_generator(class_model, tmp_path / "float32.onnx", settings))
    feed = example_feed(class_model.config, settings.guidance != 1.0, 3, (16, 8), settings.guidance)
    sample, image = session(int8).run(["sample", "image"], feed)
    with torch.no_grad():
        expected = torch_sample(class_model, feed, settings).numpy()
    assert rel_err(sample, expected) <= GENERATOR_BOUND
    np.testing.assert_array_equal(image, to_uint8(torch.from_numpy(sample)))
    assert GENERATOR_BOUND == GENERATOR_RTOL_BY_DTYPE["int8"] and VELOCITY_BOUND == RTOL_BY_DTYPE["int8"]


def test_quantizer_leaves_no_float_linear_weights(class_model: torch.nn.Module, tmp_path: Path) -> None:
    """Every MatMul/Gemm of the float32 graph that reads a weight (an initializer) is replaced by
    an integer product reading an int8 initializer."""
    path = export_int8(class_model, tmp_path / "int8.onnx")
    # the float32 graph it quantises: the straight-line decoder (deco.deploy.quantize)
    float_graph = onnx.load(str(export_onnx(class_model, tmp_path / "f.onnx", decoder_chunk_rows=None))).graph
    float_weights = {t.name for t in float_graph.initializer}
    linear = [n for n in float_graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in float_weights]
    graph = onnx.load(str(path)).graph
    int8_weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    integer = [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] in int8_weights]
    assert len(linear) > 0 and len(integer) == len(linear)
    remaining = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in float_weights]
    assert remaining == []


# ------------------------------------------------------------------------------ command line
def test_command_line_int8_generator_and_overwrite(class_model: torch.nn.Module, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """deco export-onnx --generator --dtype int8, the --force rule, then deco onnx-check."""
    checkpoint = save_checkpoint(class_model, tmp_path)
    out = tmp_path / "g.onnx"
    flags = ["export-onnx", str(checkpoint), str(out), "--generator", "--steps", "3", "--dtype", "int8"]
    assert main(flags) == 0
    assert "generator: euler, 3 steps" in capsys.readouterr().out
    assert metadata(out)["deco_dtype"] == "int8"
    before = out.read_bytes()
    assert main(flags) == 2  # an existing output is refused without --force
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and out.read_bytes() == before
    assert main([*flags, "--force"]) == 0
    capsys.readouterr()
    assert main(["onnx-check", str(out), "--batch", "2", "--resolution", "8", "12"]) == 0
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--external-data"], "--external-data: "),
    (["--steps", "4"], "--steps: "),
    (["--generator", "--steps", "0"], "--steps: "),
    (["--generator", "--cfg"], "--cfg: "),
    (["--generator", "--solver", "rk4"], "--solver: "),
])
def test_bad_int8_options_are_one_line_and_write_nothing(
        class_model: torch.nn.Module, tmp_path: Path, flags: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = save_checkpoint(class_model, tmp_path)
    out = tmp_path / "out" / "g.onnx"
    out.parent.mkdir()
    assert main(["export-onnx", str(checkpoint), str(out), "--dtype", "int8", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert list(out.parent.iterdir()) == []


def test_export_int8_checks_its_arguments(class_model: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"^model: "):
        export_int8(torch.nn.Linear(2, 2), tmp_path / "v.onnx")
    with pytest.raises(FileNotFoundError, match=r"^output: "):
        export_int8(class_model, tmp_path / "no" / "v.onnx")
    with pytest.raises(TypeError, match=r"^settings: "):
        export_int8_generator(class_model, tmp_path / "g.onnx", {"steps": 3})
    assert list(tmp_path.iterdir()) == []
