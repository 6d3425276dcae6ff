"""`deco onnx-check`: run an exported graph in onnxruntime against the torch model and the
float64 reference rebuilt from the weight file recorded in the graph (its SHA-256 must match),
and the ONNX model of the conformance vectors (`deco conformance --export-vector-model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deco.config import DeCoConfig
from deco.conformance.fixtures import error_measure
from deco.deploy.export import (
    GENERATOR_RTOL_BY_DTYPE,
    GRAPH_CFG,
    ONNX_CHECK_RTOL,
    RTOL_BY_DTYPE,
    export_onnx,
    guided,
)
from deco.deploy.generator import GRAPH_GENERATOR
from deco.deploy.generator_check import example_feed, recorded_graph_settings, run_generator, torch_sample
from deco.deploy.runtime import OnnxVelocityModel
from deco.generate import load_for_sampling
from deco.optimized.weights import build_model, load_model
from deco.outputs import to_uint8
from deco.plan_identity import file_sha256 as sha256_file
from deco.reference import Model, load_weights
from deco.reference.sampling import guided_velocity
from deco.release import read_release_checkpoint


@dataclass(frozen=True)
class CheckRow:
    """One comparison of `deco onnx-check`; it passes when max_rel <= bound."""
    pair: str
    max_abs: float
    max_rel: float
    bound: float = ONNX_CHECK_RTOL


def _reference_weights(checkpoint: Path) -> dict[str, Any]:
    """float64 weights read without deco.optimized: a DeCo .safetensors file through the
    reference's loader, anything else as a release checkpoint."""
    if checkpoint.suffix == ".safetensors":
        return load_weights(checkpoint)[1]
    state = read_release_checkpoint(checkpoint)[1]
    return {k: v.double().numpy() for k, v in state.items()}


def _recorded_checkpoint(meta: dict[str, str], checkpoint: Path | None) -> Path:
    """The weight file the graph came from: `checkpoint` or the recorded path, SHA-256 checked."""
    if checkpoint is None:
        if "deco_checkpoint" not in meta:
            raise ValueError("checkpoint: the graph records no weight file; pass --checkpoint")
        checkpoint = Path(meta["deco_checkpoint"])
        if not checkpoint.is_file():
            raise FileNotFoundError(
                f"checkpoint: {checkpoint} (recorded in the graph) does not exist; pass --checkpoint")
    expected = meta.get("deco_checkpoint_sha256")
    if expected is None:
        raise ValueError("checkpoint: the graph records no SHA-256 of its weights; cannot verify "
                         f"that {checkpoint} holds them")
    if sha256_file(checkpoint) != expected:
        raise ValueError(f"checkpoint: {checkpoint} is not the file the graph was exported from "
                         "(SHA-256 differs)")
    return checkpoint


def _random_inputs(config: DeCoConfig, meta: dict[str, str], batch: int,
                   resolution: tuple[int, int] | None, seed: int) -> tuple[Any, Any, Any, Any]:
    """(x, t, condition, null): labels with the null class among them and null None for a class
    model; for the text model random text (B, T, E) and one random null text (T, E)."""
    if meta.get("deco_batch", "dynamic") != "dynamic":
        batch = int(meta["deco_batch"])
    if meta.get("deco_resolution", "dynamic") != "dynamic":
        h, w = (int(s) for s in meta["deco_resolution"].split("x"))
    else:
        h, w = resolution or (2 * config.patch_size, 3 * config.patch_size)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, config.in_channels, h, w)).astype(np.float32)
    # One shared time (as in sampling, and as the reference's guided_velocity needs).
    t = np.full(batch, rng.uniform(0.05, 0.95), dtype=np.float32)
    if config.is_text:
        text_shape = (config.text_length, config.text_dim)
        text = rng.standard_normal((batch, *text_shape)).astype(np.float32)
        return x, t, text, rng.standard_normal(text_shape).astype(np.float32)
    y = rng.integers(0, config.num_classes + 1, batch)
    y[-1] = config.num_classes  # always include the null class
    return x, t, y, None


def check_onnx(
    path: str | Path, *, checkpoint: str | Path | None = None, batch: int = 2,
    resolution: tuple[int, int] | None = None, guidance: float = 3.0, seed: int = 0,
) -> tuple[list[CheckRow], list[str]]:
    """Errors between onnxruntime, deco.optimized (float32) and the float64 reference on random
    inputs, and the onnxruntime providers used. A "cfg" graph is compared on the guided
    velocity; the reference's is `deco.reference.sampling.guided_velocity`. A text model gets
    random text (B, T, E) and, for a cfg graph, one random null text (T, E) for the batch. A
    generator graph is compared with `deco.optimized.sample` (`check_generator`)."""

    graph = OnnxVelocityModel(path)
    source = _recorded_checkpoint(graph.metadata, None if checkpoint is None else Path(checkpoint))
    if graph.graph == GRAPH_GENERATOR:
        rows = check_generator(graph.path, graph.metadata, source, batch, resolution, guidance, seed)
        return rows, graph.providers
    reference = Model(graph.config, _reference_weights(source))
    if reference.config != graph.config:
        raise ValueError(f"checkpoint: {source} holds a different config than the graph")
    net = load_model(source).to(device="cpu", dtype=torch.float32).eval()
    x, t, y, null = _random_inputs(graph.config, graph.metadata, batch, resolution, seed)
    with torch.no_grad():
        if graph.graph == GRAPH_CFG:
            got = graph.guided_velocity(x, t, y, guidance, null)
            # The torch and reference branches take the null batched like the condition.
            null_batch = None if null is None else np.broadcast_to(null, y.shape)
            inputs = [x, t, y, *([] if null_batch is None else [np.ascontiguousarray(null_batch)])]
            torch_out = guided(net, graph.config)(*map(torch.from_numpy, inputs), torch.tensor(guidance))
            expected = guided_velocity(reference, x.astype(np.float64), float(t[0]), y, guidance,
                                       null_batch)
        else:
            got = graph.forward(x, t, y)
            torch_out = net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y))
            expected = reference.forward(x, t, y)
    mine = torch_out.double().numpy()
    # The torch model is float32 whatever the graph's weight dtype; the graph's rows get its bound.
    bound = RTOL_BY_DTYPE.get(graph.metadata.get("deco_dtype", "float32"), ONNX_CHECK_RTOL)
    rows = [CheckRow(pair, *error_measure(a, b), bound=limit) for pair, a, b, limit in [
        ("onnxruntime vs reference", got, expected, bound),
        ("torch vs reference", mine, expected, ONNX_CHECK_RTOL),
        ("onnxruntime vs torch", got, mine, bound),
    ]]
    return rows, graph.providers


def format_check(rows: list[CheckRow]) -> str:
    lines = [f"{'comparison':<26}{'max abs err':>14}{'max rel err':>14}{'bound':>10}"]
    lines += [f"{r.pair:<26}{r.max_abs:>14.3e}{r.max_rel:>14.3e}{r.bound:>10.0e}" for r in rows]
    return "\n".join(lines)


def export_vector_model(vectors: list[Any], architecture: str, path: str | Path) -> Path:
    """Export the model of the conformance kit's forward vector for `architecture` (its weights
    are in the vector file), for `deco conformance --onnx`."""
    matches = [v for v in vectors if v.component in ("forward", "t2i_forward")
               and (v.config or {}).get("architecture") == architecture]
    if not matches:
        raise ValueError(f"architecture: no forward vector for {architecture!r}")
    vector = matches[0]
    model = build_model(DeCoConfig.from_dict(vector.config))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in vector.weights.items()})
    return export_onnx(model, path, metadata={"deco_vector": vector.name})


def check_generator(path: Path, metadata: dict[str, str], checkpoint: Path, batch: int,
                    resolution: tuple[int, int] | None, guidance: float, seed: int) -> list[Any]:
    """`deco onnx-check` of a generator graph: its `sample` against `deco.optimized.sample` in
    float64 and float32 (the model of `checkpoint`, loaded like `deco sample` does), and its
    `image` against `deco.outputs.to_uint8` of its own `sample`: the same float32 operations,
    so they must agree exactly (bound 0)."""
    config = DeCoConfig.from_json(metadata["config"])
    settings = recorded_graph_settings(metadata)
    guided = metadata["deco_guided"] == "true"
    if metadata.get("deco_batch", "dynamic") != "dynamic":
        batch = int(metadata["deco_batch"])
    if metadata.get("deco_resolution", "dynamic") != "dynamic":
        h, w = (int(s) for s in metadata["deco_resolution"].split("x"))
    else:
        h, w = resolution or (2 * config.patch_size, 3 * config.patch_size)
    feed = example_feed(config, guided, batch, (h, w), guidance, seed)
    model = load_for_sampling(checkpoint, torch.device("cpu"), text=True).model
    if model.config != config:
        raise ValueError(f"checkpoint: {checkpoint} holds a different config than the graph")
    dtype = metadata.get("deco_dtype", "float32")
    sample, image = run_generator(path, feed, dtype)
    with torch.no_grad():
        mine32 = torch_sample(model.float(), feed, settings)
        exact = torch_sample(model.double(), feed, settings).numpy()
    mine = mine32.double().numpy()
    bound = GENERATOR_RTOL_BY_DTYPE.get(dtype, ONNX_CHECK_RTOL)
    rows = [CheckRow(pair, *error_measure(np.asarray(a, np.float64), b), bound=limit)
            for pair, a, b, limit in [("onnxruntime vs float64", sample, exact, bound),
                                      ("torch vs float64", mine, exact, ONNX_CHECK_RTOL),
                                      ("onnxruntime vs torch", sample, mine, bound)]]
    pixels = to_uint8(torch.from_numpy(np.asarray(sample))).astype(np.int64)
    levels = float(np.max(np.abs(image.astype(np.int64) - pixels)))
    rows.append(CheckRow("image vs to_uint8(sample)", levels, levels / 255, bound=0.0))
    return rows
