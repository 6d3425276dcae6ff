"""Running and checking generator graphs (deco.onnx_generator, spec/04 §7): random feeds,
`deco.optimized.sample` on the same feed, the export's own agreement check and `deco onnx-check`'s
rows for a generator graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deco.config import DeCoConfig
from deco.optimized.sampling import SampleSettings

from .onnx_generator import OUTPUTS


def example_feed(config: DeCoConfig, guided: bool, batch: int, size: tuple[int, int], guidance: float,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Random generator inputs: labels with the null class among them, or random text with one
    random null text broadcast over the batch."""
    rng = np.random.default_rng(seed)
    feed = {"noise": rng.standard_normal((batch, config.in_channels, *size)).astype(np.float32)}
    if config.is_text:
        shape = (config.text_length, config.text_dim)
        feed["text"] = rng.standard_normal((batch, *shape)).astype(np.float32)
        if guided:
            null = rng.standard_normal(shape).astype(np.float32)
            feed["null_text"] = np.ascontiguousarray(np.broadcast_to(null, (batch, *shape)))
    else:
        labels = rng.integers(0, config.num_classes + 1, batch)
        labels[-1] = config.num_classes
        feed["labels"] = labels.astype(np.int64)
    if guided:
        feed["guidance"] = np.asarray(guidance, dtype=np.float32)
    return feed


def torch_sample(model: nn.Module, feed: dict[str, np.ndarray], settings: SampleSettings) -> torch.Tensor:
    """`deco.optimized.sample` on a generator feed (the model's own dtype; float32 noise cast to it)."""
    from deco.optimized.sampling import sample

    dtype = next(model.parameters()).dtype
    noise = torch.tensor(feed["noise"], dtype=dtype)
    cond = torch.tensor(feed["text" if "text" in feed else "labels"])
    if cond.is_floating_point():
        cond = cond.to(dtype)
    null = None if "null_text" not in feed else torch.tensor(feed["null_text"], dtype=dtype)
    options = settings.options()
    options["guidance"] = float(feed["guidance"]) if "guidance" in feed else 1.0
    out = sample(model, noise, cond, null, **options)
    assert isinstance(out, torch.Tensor)
    return out.clamp(-1.0, 1.0)


def run_generator(path: Path, feed: dict[str, np.ndarray], dtype: str = "float32") -> list[Any]:
    """[sample, image] of the graph at `path` on the CPU: onnxruntime, or onnx's reference
    evaluator for bfloat16 (onnxruntime's CPU provider has no bfloat16 kernels)."""
    if dtype == "bfloat16":
        from onnx.reference import ReferenceEvaluator

        outputs: Any = ReferenceEvaluator(str(path)).run(OUTPUTS, feed)
        return list(outputs)
    from .onnx_runtime import _session

    return list(_session(path, ["CPUExecutionProvider"], None).run(OUTPUTS, feed))


def check_export(model: nn.Module, path: Path, settings: SampleSettings, guided: bool,
                     batch: int | None, resolution: tuple[int, int] | None, dtype: str) -> None:
    """The exported generator against `deco.optimized.sample` (float32, CPU) on random inputs
    at a small size, to the dtype's bound (relative to max|expected|)."""
    from .onnx_export import RTOL_BY_DTYPE, _cpu_copy

    config: DeCoConfig = model.config  # type: ignore[assignment]
    p = config.patch_size
    scale = settings.guidance if settings.guidance != 1.0 else 3.0
    feed = example_feed(config, guided, batch or 2, resolution or (p, 2 * p), scale)
    with torch.no_grad():
        expected = torch_sample(_cpu_copy(model, torch.float32), feed, settings).double().numpy()
    got = np.asarray(run_generator(path, feed, dtype)[0], dtype=np.float64)
    err = float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), 1e-30))
    if not err <= RTOL_BY_DTYPE[dtype]:
        raise ValueError(f"model: the generator graph differs from deco.optimized.sample by a relative "
                         f"{err:.1e} (bound {RTOL_BY_DTYPE[dtype]:g})")


# ------------------------------------------------------------------------------ deco onnx-check
def recorded_graph_settings(metadata: dict[str, str]) -> SampleSettings:
    """The sampler settings a generator graph's metadata records."""
    low, high = (float(v) for v in metadata["deco_interval"].split())
    return SampleSettings(steps=int(metadata["deco_steps"]), guidance=float(metadata["deco_guidance"]),
                          interval=(low, high), timeshift=float(metadata["deco_timeshift"]),
                          solver=metadata["deco_solver"])


def check_generator(path: Path, metadata: dict[str, str], checkpoint: Path, batch: int,
                    resolution: tuple[int, int] | None, guidance: float, seed: int) -> list[Any]:
    """`deco onnx-check` of a generator graph: its `sample` against `deco.optimized.sample` in
    float64 and float32 (the model of `checkpoint`, loaded like `deco sample` does), and its
    `image` against `deco.outputs.to_uint8` of its own `sample`: the same float32 operations,
    so they must agree exactly (bound 0)."""
    from deco.fixtures import error_measure

    from .evaluation import load_for_sampling
    from .onnx_check import CheckRow
    from .onnx_export import ONNX_CHECK_RTOL, RTOL_BY_DTYPE
    from .outputs import to_uint8

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
    bound = RTOL_BY_DTYPE.get(dtype, ONNX_CHECK_RTOL)
    rows = [CheckRow(pair, *error_measure(np.asarray(a, np.float64), b), bound=limit)
            for pair, a, b, limit in [("onnxruntime vs float64", sample, exact, bound),
                                      ("torch vs float64", mine, exact, ONNX_CHECK_RTOL),
                                      ("onnxruntime vs torch", sample, mine, bound)]]
    pixels = to_uint8(torch.from_numpy(np.asarray(sample))).astype(np.int64)
    levels = float(np.max(np.abs(image.astype(np.int64) - pixels)))
    rows.append(CheckRow("image vs to_uint8(sample)", levels, levels / 255, bound=0.0))
    return rows
