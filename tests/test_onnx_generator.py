"""Generator graphs (`deco export-onnx --generator`, deco.deploy.generator, spec/04 §7): the whole
sampler in one ONNX graph, run in onnxruntime against `deco.optimized.sample` with the same
settings and noise (an independent implementation of the sampler: a Python loop over the torch
model), and its uint8 image against `deco.outputs.to_uint8`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import rel_err, release_fixtures, save_checkpoint, tiny_config, tiny_model

from deco.cli import main
from deco.config import DeCoConfig
from deco.deploy.export import export_onnx
from deco.deploy.generator import export_generator, input_names
from deco.deploy.generator_check import example_feed, torch_sample
from deco.optimized.sampling import SampleSettings
from deco.optimized.weights import load_model
from deco.outputs import to_uint8

#: The issue's bound for a whole sampling run, onnxruntime vs deco.optimized (relative to max|x|).
SAMPLER_RTOL = 1e-4
TEXT = DeCoConfig.preset("DeCo-T2I-tiny/4")
#: Steps 4, time shift 1: the grid is (0, 1/4, 1/2, 3/4, 1), so both interval edges are grid
#: points (and, for Adams, running sums of exact binary fractions): 1/4 is unguided (the lower
#: bound is strict), 3/4 guided by Euler and Heun (low < t <= high) but not by Adams (strict).
EDGES = (0.25, 0.75)


@pytest.fixture(scope="module")
def class_model() -> torch.nn.Module:
    return tiny_model(tiny_config("deco"), seed=3)


@pytest.fixture(scope="module")
def text_model() -> torch.nn.Module:
    return tiny_model(TEXT, seed=4)


def run(path: Path, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sample, image = session.run(["sample", "image"], feed)
    return sample, image


def expected(model: torch.nn.Module, feed: dict[str, np.ndarray], settings: SampleSettings) -> np.ndarray:
    """deco.optimized.sample (float32, the feed's guidance), clamped like the graph's output."""
    with torch.no_grad():
        return torch_sample(model, feed, settings).double().numpy()


@pytest.fixture(scope="module")
def class_graphs(class_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One guided graph per solver: 4 steps, guidance 3 on the interval EDGES."""
    folder = tmp_path_factory.mktemp("generator")
    return {solver: export_generator(class_model, folder / f"{solver}.onnx", class_settings(solver))
            for solver in ("euler", "heun", "adams")}


def class_settings(solver: str) -> SampleSettings:
    return SampleSettings(steps=4, guidance=3.0, interval=EDGES, timeshift=1.0, solver=solver)


# ----------------------------------------------------------------------- solvers and guidance
@pytest.mark.parametrize("solver", ["euler", "heun", "adams"])
def test_class_generator_matches_the_optimized_sampler_at_two_batches_and_sizes(
        class_model: torch.nn.Module, class_graphs: dict[str, Path], solver: str) -> None:
    settings, path = class_settings(solver), class_graphs[solver]
    config = class_model.config
    for batch, size, seed in [(2, (8, 12), 0), (3, (16, 8), 1)]:  # one file, two batches and sizes
        feed = example_feed(config, True, batch, size, 3.0, seed)
        sample, image = run(path, feed)
        assert sample.shape == (batch, 3, *size) and image.shape == (batch, *size, 3)
        assert rel_err(sample, expected(class_model, feed, settings)) <= SAMPLER_RTOL
    # The guidance scale is an input: the same file at scale 1 (and 0, the null branch alone).
    for scale in (1.0, 0.0):
        feed["guidance"] = np.asarray(scale, dtype=np.float32)
        assert rel_err(run(path, feed)[0], expected(class_model, feed, settings)) <= SAMPLER_RTOL
    # Guidance changes the sample, so the interval mask above was really exercised.
    feed3 = {**feed, "guidance": np.asarray(3.0, dtype=np.float32)}
    assert rel_err(run(path, feed3)[0], run(path, feed)[0]) > 1e-3


def test_unguided_export_has_no_guidance_input(class_model: torch.nn.Module, tmp_path: Path) -> None:
    """Also the external-data path of XL/XXL generators: weights in ONE file beside the graph."""
    from deco.deploy.export import data_file

    settings = SampleSettings(steps=3, guidance=1.0, solver="heun", timeshift=2.0)
    path = export_generator(class_model, tmp_path / "u.onnx", settings, external_data=True)
    weights = sum(p.numel() * 4 for p in class_model.parameters())
    # Once: about the float32 parameters (tensors under 1 KiB stay in the graph, onnx's default).
    assert 0.9 * weights < data_file(path).stat().st_size < 1.1 * weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.onnx", "u.onnx.data"]
    proto = onnx.load(str(path))
    names = [i.name for i in proto.graph.input]
    assert names == ["noise", "labels"] == input_names(class_model.config, False)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["deco_guided"] == "false" and meta["deco_inputs"] == "noise,labels"
    feed = example_feed(class_model.config, False, 2, (12, 8), 1.0, seed=2)
    assert rel_err(run(path, feed)[0], expected(class_model, feed, settings)) <= SAMPLER_RTOL


@pytest.mark.parametrize("solver, guidance", [("adams", 4.0), ("euler", 1.0)])
def test_text_generator_matches_the_optimized_sampler(text_model: torch.nn.Module, tmp_path: Path,
                                                      solver: str, guidance: float) -> None:
    settings = SampleSettings(steps=5, guidance=guidance, interval=(0.0, 1.0), timeshift=3.0,
                              solver=solver)
    guided = guidance != 1.0
    path = export_generator(text_model, tmp_path / "t.onnx", settings)
    names = [i.name for i in onnx.load(str(path)).graph.input]
    assert names == (["noise", "text", "null_text", "guidance"] if guided else ["noise", "text"])
    for batch, size, seed in [(2, (8, 12), 0), (1, (16, 4), 1)]:
        feed = example_feed(TEXT, guided, batch, size, guidance, seed)
        assert rel_err(run(path, feed)[0], expected(text_model, feed, settings)) <= SAMPLER_RTOL


# ------------------------------------------------------------------------------------- outputs
def test_image_is_to_uint8_of_the_sample(class_model: torch.nn.Module, class_graphs: dict[str, Path]) -> None:
    """`image` rounds like deco.outputs.to_uint8 (clamp, (x + 1) 127.5, half to even): exactly
    on the graph's own sample, and within one level of the torch sampler's pixels."""
    feed = example_feed(class_model.config, True, 4, (16, 16), 3.0)
    sample, image = run(class_graphs["euler"], feed)
    assert image.dtype == np.uint8
    assert 0.01 < np.mean(np.abs(sample) == 1.0) < 0.99  # random weights: the clamp matters too
    np.testing.assert_array_equal(image, to_uint8(torch.from_numpy(sample)))
    pixels = to_uint8(torch.from_numpy(expected(class_model, feed, class_settings("euler"))))
    assert np.max(np.abs(image.astype(int) - pixels.astype(int))) <= 1


def test_weights_are_stored_once_and_metadata_records_every_setting(
        class_model: torch.nn.Module, tmp_path: Path) -> None:
    velocity = export_onnx(class_model, tmp_path / "v.onnx")
    settings = SampleSettings(steps=100, guidance=2.5, interval=(0.1, 0.9), timeshift=1.5, solver="adams")
    path = export_generator(class_model, tmp_path / "g100.onnx", settings)
    # 100 steps: the velocity graph's size plus three 100-row tables and a few dozen nodes.
    assert path.stat().st_size < 1.05 * velocity.stat().st_size
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert DeCoConfig.from_json(meta["config"]) == class_model.config
    assert {k: meta[k] for k in ("deco_graph", "deco_solver", "deco_steps", "deco_guidance", "deco_interval",
                                 "deco_timeshift", "deco_guided", "deco_inputs", "deco_outputs")} == {
        "deco_graph": "generator", "deco_solver": "adams", "deco_steps": "100", "deco_guidance": "2.5",
        "deco_interval": "0.1 0.9", "deco_timeshift": "1.5", "deco_guided": "true",
        "deco_inputs": "noise,labels,guidance", "deco_outputs": "sample,image"}


def test_generator_carries_the_chunked_decoder(class_graphs: dict[str, Path]) -> None:
    """The sampling Loop's body holds the velocity graph's decoder Scan (deco.deploy.optimize), whose
    own body reads the decoder's weights from the main graph."""
    graph = onnx.load(str(class_graphs["euler"])).graph
    (loop,) = [n for n in graph.node if n.op_type == "Loop"]
    scans = [n for n in loop.attribute[0].g.node if n.op_type == "Scan"]
    assert len(scans) == 1
    weights = {t.name for t in graph.initializer}
    assert "/decoder0/blocks.0.fc1" in weights and "/decoder0/blocks.0.fc1" in {
        i for n in scans[0].attribute[0].g.node for i in n.input}


def test_generator_refuses_a_subgraph_reading_other_outer_values(tmp_path: Path) -> None:
    """The inliner renames the velocity graph's node outputs, so a subgraph may read only weights."""
    from onnx import TensorProto, helper

    from deco.deploy.generator_graph import _split_velocity

    inner = helper.make_graph([helper.make_node("Identity", ["h"], ["out"])], "then", [],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("If", ["c"], ["v"], then_branch=inner,
                                                                  else_branch=inner)],
        "velocity", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                     helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, None)])
    with pytest.raises(ValueError, match="the velocity graph's If node reads 'h' from outside"):
        _split_velocity(helper.make_model(graph), tiny_config("deco"))


# ------------------------------------------------------------------------ release checkpoints
def test_release_fixture_generators_from_the_command_line(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A.ckpt with the spec's defaults (Euler, no guidance; 8 steps asked for instead of 50, to
    save time) and T3.ckpt with the release's text-to-image defaults (Adams, 25 steps, guidance
    4, time shift 3), via deco export-onnx; then deco onnx-check on the text one."""
    folder = release_fixtures("A.ckpt", "T3.ckpt")
    for name, size, settings, flags in [
        ("A.ckpt", (16, 16), SampleSettings(steps=8), ["--steps", "8"]),
        ("T3.ckpt", (16, 24), SampleSettings(steps=25, guidance=4.0, timeshift=3.0, solver="adams"), []),
    ]:
        out = tmp_path / f"{name}.onnx"
        assert main(["export-onnx", str(folder / name), str(out), "--generator", *flags]) == 0
        model = load_model(folder / name)
        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert (meta["deco_solver"], meta["deco_steps"], meta["deco_guidance"]) == (
            settings.solver, str(settings.steps), repr(settings.guidance))
        feed = example_feed(model.config, settings.guidance != 1.0, 2, size, settings.guidance)
        assert rel_err(run(out, feed)[0], expected(model, feed, settings)) <= SAMPLER_RTOL
    capsys.readouterr()
    assert main(["onnx-check", str(out), "--resolution", "16", "24"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime vs float64" in text and "image vs to_uint8(sample)" in text and "PASS" in text


def test_export_and_check_commands_on_a_class_model(class_model: torch.nn.Module, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """deco export-onnx --generator with every sampler option, then deco onnx-check (float64
    sampler, float32 sampler, image vs to_uint8) at another batch and size."""
    checkpoint = save_checkpoint(class_model, tmp_path)
    out = tmp_path / "g.onnx"
    assert main(["export-onnx", str(checkpoint), str(out), "--generator", "--solver", "heun", "--steps",
                 "5", "--guidance", "2", "--interval", "0.2", "0.8", "--timeshift", "2"]) == 0
    assert "generator graph: heun, 5 steps, guidance 2 (an input)" in capsys.readouterr().out
    assert main(["onnx-check", str(out), "--batch", "3", "--resolution", "12", "8"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime vs float64" in text and "PASS" in text


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("flags, message", [
    (["--generator", "--solver", "rk4"], "--solver: "),
    (["--generator", "--steps", "0"], "--steps: "),
    (["--generator", "--steps", "-3"], "--steps: "),
    (["--generator", "--guidance", "nan"], "--guidance: "),
    (["--generator", "--interval", "0.5", "1.5"], "--interval: "),
    (["--generator", "--interval", "-0.1", "0.5"], "--interval: "),
    (["--generator", "--cfg"], "--cfg: "),
    (["--steps", "4"], "--steps: "),
])
def test_bad_generator_options_are_one_line_and_write_nothing(
        class_model: torch.nn.Module, tmp_path: Path, flags: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = save_checkpoint(class_model, tmp_path)
    out = tmp_path / "out" / "g.onnx"
    out.parent.mkdir()
    assert main(["export-onnx", str(checkpoint), str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert list(out.parent.iterdir()) == []


def test_export_generator_checks_its_arguments(class_model: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"^settings: "):
        export_generator(class_model, tmp_path / "g.onnx", {"steps": 3})  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"^output: "):
        export_generator(class_model, tmp_path / "no" / "g.onnx", SampleSettings(steps=2))

