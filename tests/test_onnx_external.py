"""ONNX external data (the weights in one `<graph>.data` file, needed above protobuf's 2 GiB) and
float16 / bfloat16 exports, on tiny models: external data is forced (a flag, or the threshold
patched to 0), so CI exercises the code path DeCo-XL/16 takes (tests/test_onnx_full_size.py runs
the real size on request)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from helpers import REPO_ROOT, random_weights, rel_err, tiny_config

from deco.cli import main
from deco.deploy import export as onnx_export
from deco.deploy import onnx_file
from deco.deploy.export import RTOL_BY_DTYPE, data_file, export_onnx
from deco.deploy.runtime import OnnxVelocityModel
from deco.deploy.runtime import sample as onnx_sample
from deco.optimized.weights import build_model
from deco.reference import Model, save_weights

ONNX_FLOAT, ONNX_FLOAT16, ONNX_BFLOAT16 = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                           onnx.TensorProto.BFLOAT16)


def tiny(architecture: str = "deco", seed: int = 3) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    config = tiny_config(architecture)
    weights = {k: v.astype(np.float32) for k, v in random_weights(config, seed=seed).items()}
    model = build_model(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model.eval(), weights


def inputs(batch: int = 3, h: int = 8, w: int = 12) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, h, w)).astype(np.float32)
    return x, rng.uniform(0, 1, batch).astype(np.float32), rng.integers(0, 11, batch)


def torch_forward(model: torch.nn.Module, x: Any, t: Any, y: Any) -> Any:
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).double().numpy()


def external_locations(path: Path) -> set[str]:
    """The external-data locations the graph's tensors name (weights not loaded)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
            if entry.key == "location"}


def initializer_types(path: Path) -> set[int]:
    proto = onnx.load(str(path), load_external_data=False)
    return {t.data_type for t in proto.graph.initializer if len(t.dims) >= 2}  # the weight matrices


# ------------------------------------------------------------------------------ external data
@pytest.mark.parametrize("architecture", ["deco", "baseline"])
def test_forced_external_data_is_one_file_beside_the_graph(architecture: str, tmp_path: Path) -> None:
    model, weights = tiny(architecture)
    path = export_onnx(model, tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no strays
    assert external_locations(path) == {"m.onnx.data"}
    onnx.checker.check_model(str(path), full_check=True)
    # The graph alone holds no weights: it is far smaller than the data file.
    assert path.stat().st_size < data_file(path).stat().st_size
    assert data_file(path).stat().st_mode == path.stat().st_mode  # readable like the graph
    x, t, y = inputs()
    got = OnnxVelocityModel(path).forward(x, t, y)
    assert rel_err(got, torch_forward(model, x, t, y)) <= 1e-4
    assert rel_err(got, Model(model.config, weights).forward(x, t, y)) <= 1e-5  # type: ignore[arg-type]


def test_onnxruntime_sampler_on_an_external_data_graph(tmp_path: Path) -> None:
    from deco.optimized.sampling import sample

    model, _ = tiny()
    graph = OnnxVelocityModel(export_onnx(model, tmp_path / "m.onnx", external_data=True))
    noise = np.random.default_rng(2).standard_normal((2, 3, 8, 12)).astype(np.float32)
    labels = np.array([4, 10])
    options: dict[str, Any] = {"steps": 4, "guidance": 2.0, "interval": (0.1, 1.0)}
    got = onnx_sample(graph, noise, labels, **options)
    with torch.no_grad():
        expected = sample(model, torch.from_numpy(noise), torch.from_numpy(labels), **options)
    assert isinstance(expected, torch.Tensor)
    assert rel_err(got, expected.double().numpy()) <= 1e-4


def test_the_pair_moves_together(tmp_path: Path) -> None:
    """The data file is found relative to the graph, wherever the pair is moved."""
    model, _ = tiny()
    path = export_onnx(model, tmp_path / "m.onnx", external_data=True)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for p in (path, data_file(path)):
        shutil.move(p, moved / p.name)
    x, t, y = inputs()
    got = OnnxVelocityModel(moved / "m.onnx").forward(x, t, y)
    assert rel_err(got, torch_forward(model, x, t, y)) <= 1e-4
    (moved / "m.onnx.data").unlink()
    with pytest.raises(ValueError, match=r"^path: .*not a loadable ONNX model"):
        OnnxVelocityModel(moved / "m.onnx")


def test_threshold_chooses_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = tiny()
    small = export_onnx(model, tmp_path / "small.onnx")  # a few kB: one file
    assert not data_file(small).exists() and external_locations(small) == set()
    monkeypatch.setattr(onnx_file, "EXTERNAL_DATA_THRESHOLD", 0)
    big = export_onnx(model, tmp_path / "big.onnx")
    assert external_locations(big) == {"big.onnx.data"}
    monkeypatch.setattr(onnx_file, "EXTERNAL_DATA_THRESHOLD", 1 << 30)
    export_onnx(model, big)  # re-exported as one file: the stale data file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "small.onnx"]


def test_overwriting_a_pair_gives_the_new_pair(tmp_path: Path) -> None:
    old, _ = tiny()
    new, _ = tiny(seed=11)
    export_onnx(old, tmp_path / "m.onnx", external_data=True)
    path = export_onnx(new, tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    x, t, y = inputs()
    assert rel_err(OnnxVelocityModel(path).forward(x, t, y), torch_forward(new, x, t, y)) <= 1e-4


class FrozenBatch(torch.nn.Module):
    """A model whose Python code turns the batch size into a constant while tracing."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, y) * torch.ones(int(x.shape[0]), 1, 1, 1)


def test_a_failing_export_leaves_nothing(tmp_path: Path) -> None:
    model, _ = tiny("baseline")
    with pytest.raises(ValueError, match=r"^model: the exported graph does not run correctly"):
        export_onnx(FrozenBatch(model), tmp_path / "m.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_export_leaves_the_old_pair_alone(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = tiny()
    path = export_onnx(model, tmp_path / "m.onnx", external_data=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def interrupt(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "_check_other_shapes", interrupt)
    other, _ = tiny(seed=9)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(other, path, external_data=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_export_rejects_bad_new_options(tmp_path: Path) -> None:
    model, _ = tiny()
    with pytest.raises(ValueError, match=r"^dtype: expected one of float32, float16, bfloat16"):
        export_onnx(model, tmp_path / "m.onnx", dtype="float64")
    with pytest.raises(TypeError, match=r"^external_data: "):
        export_onnx(model, tmp_path / "m.onnx", external_data="yes")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- commands
def test_commands_with_external_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, weights = tiny()
    checkpoint = tmp_path / "w.safetensors"
    save_weights(checkpoint, model.config, weights)  # type: ignore[arg-type]
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", str(checkpoint), str(out), "--external-data", "--cfg"]) == 0
    assert f"weights in {data_file(out)}" in capsys.readouterr().out
    assert main(["onnx-check", str(out), "--batch", "3"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_conformance_on_an_external_data_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(onnx_file, "EXTERNAL_DATA_THRESHOLD", 0)
    vectors = REPO_ROOT / "spec" / "vectors"
    path = tmp_path / "vec.onnx"
    assert main(["conformance", "--export-vector-model", str(path), "--vectors", str(vectors)]) == 0
    assert data_file(path).is_file()
    assert main(["conformance", "--onnx", str(path), "--vectors", str(vectors)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("forward")]
    assert any("forward_deco" in line and line.rstrip().endswith("pass") for line in rows)


# ------------------------------------------------------------------------- float16 / bfloat16
@pytest.mark.parametrize("architecture", ["deco", "baseline"])
@pytest.mark.parametrize("cfg", [False, True])
def test_float16_graph_runs_on_the_cpu_within_its_bound(architecture: str, cfg: bool,
                                                        tmp_path: Path) -> None:
    model, _ = tiny(architecture)
    path = export_onnx(model, tmp_path / "m.onnx", dtype="float16", cfg=cfg)
    assert initializer_types(path) == {ONNX_FLOAT16}
    proto = onnx.load(str(path))
    assert [i.type.tensor_type.elem_type for i in proto.graph.input][:2] == [ONNX_FLOAT, ONNX_FLOAT]
    assert proto.graph.output[0].type.tensor_type.elem_type == ONNX_FLOAT
    graph = OnnxVelocityModel(path, providers=["CPUExecutionProvider"])
    assert graph.metadata["deco_dtype"] == "float16"
    x, _, y = inputs()
    t = np.full(3, 0.4, dtype=np.float32)
    if cfg:
        got = graph.guided_velocity(x, t, y, 3.0)
        guided = onnx_export.GuidedVelocity(model, model.config.num_classes)
        with torch.no_grad():
            expected = guided(*(torch.from_numpy(a) for a in (x, t, y)), torch.tensor(3.0)).double().numpy()
    else:
        got, expected = graph.forward(x, t, y), torch_forward(model, x, t, y)
    err = rel_err(got, expected)
    # Not float32 in disguise (that would be ~1e-7), and within the stated bound.
    assert 1e-5 < err <= RTOL_BY_DTYPE["float16"]


@pytest.mark.parametrize("architecture", ["deco", "baseline"])
def test_bfloat16_graph_within_its_bound_in_the_onnx_reference_evaluator(architecture: str,
                                                                         tmp_path: Path) -> None:
    """onnxruntime's CPU provider has no bfloat16 Gemm/MatMul, so the graph runs in onnx's own
    reference evaluator (NumPy, an executor independent of torch and onnxruntime)."""
    from onnx.reference import ReferenceEvaluator

    model, _ = tiny(architecture)
    path = export_onnx(model, tmp_path / "m.onnx", dtype="bfloat16", external_data=True)
    onnx.checker.check_model(str(path), full_check=True)
    assert initializer_types(path) == {ONNX_BFLOAT16}
    proto = onnx.load(str(path))
    assert proto.graph.output[0].type.tensor_type.elem_type == ONNX_FLOAT
    assert {p.key: p.value for p in proto.metadata_props}["deco_dtype"] == "bfloat16"
    x, t, y = inputs(2, 16, 8)
    got = ReferenceEvaluator(str(path)).run(["v"], {"x": x, "t": t, "y": y})[0]
    err = rel_err(got, torch_forward(model, x, t, y))
    assert 1e-3 < err <= RTOL_BY_DTYPE["bfloat16"]  # bfloat16 really in use, and within the bound


def test_bfloat16_weights_are_the_models_own(tmp_path: Path) -> None:
    model, _ = tiny()
    proto = onnx.load(str(export_onnx(model, tmp_path / "m.onnx", dtype="bfloat16")))
    # The DiT blocks' weight matrices are the model's own, rounded to bfloat16 (constant folding
    # renames and may transpose them, so look for each by value; the decoder's input weights are
    # folded with its DCT tables, so they cannot be found like this).
    from onnx import numpy_helper

    stored = [np.asarray(numpy_helper.to_array(t), dtype=np.float32) for t in proto.graph.initializer]
    checked = 0
    for name, weight in model.state_dict().items():
        if weight.ndim != 2 or not name.startswith("blocks."):
            continue
        rounded = weight.to(torch.bfloat16).float().numpy()
        # Fused projections are exported as one product per row block (optimized.layers.split_product).
        parts = 3 if name.endswith("attn.qkv.weight") else 1
        for block in np.split(rounded, parts):
            assert any(np.array_equal(a, block) or np.array_equal(a, block.T) for a in stored), name
        checked += 1
    assert checked == 6 * model.config.depth  # adaln, qkv, proj, w1, w2, w3 per block


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_export_still_refuses_a_frozen_graph(dtype: str, tmp_path: Path) -> None:
    model, _ = tiny("baseline")
    with pytest.raises(ValueError, match=r"^model: the exported graph does not run correctly"):
        export_onnx(FrozenBatch(model), tmp_path / "m.onnx", dtype=dtype)
    assert list(tmp_path.iterdir()) == []


def test_float16_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, weights = tiny()
    checkpoint = tmp_path / "w.safetensors"
    save_weights(checkpoint, model.config, weights)  # type: ignore[arg-type]
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", str(checkpoint), str(out), "--dtype", "float16"]) == 0
    assert main(["onnx-check", str(out)]) == 0
    text = capsys.readouterr().out
    assert "float16" in text and "1e-02" in text and "PASS" in text
