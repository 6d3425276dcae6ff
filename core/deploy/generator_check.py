"""Running and checking generator graphs (deco.deploy.generator, spec/04 §7): random feeds,
`deco.optimized.sample` on the same feed, the export's own agreement check and `deco onnx-check`'s
rows for a generator graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deco.config import DeCoConfig
from deco.deploy.export import GENERATOR_RTOL_BY_DTYPE, _cpu_copy, relative_error
from deco.deploy.runtime import _session
from deco.optimized.sampling import SampleSettings, sample


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
        from onnx.reference import ReferenceEvaluator  # here: onnx is an optional extra

        outputs: Any = ReferenceEvaluator(str(path)).run(None, feed)  # all outputs: sample, image
        return list(outputs)

    return list(_session(path, ["CPUExecutionProvider"], None).run(None, feed))  # sample, image


def check_export(model: nn.Module, path: Path, settings: SampleSettings, guided: bool,
                     batch: int | None, resolution: tuple[int, int] | None, dtype: str) -> None:
    """The exported generator against `deco.optimized.sample` (float32, CPU) on random inputs
    at a small size, to the dtype's bound (relative to max|expected|)."""
    config: DeCoConfig = model.config  # type: ignore[assignment]
    p = config.patch_size
    scale = settings.guidance if settings.guidance != 1.0 else 3.0
    feed = example_feed(config, guided, batch or 2, resolution or (p, 2 * p), scale)
    with torch.no_grad():
        expected = torch_sample(_cpu_copy(model, torch.float32), feed, settings).double().numpy()
    err = relative_error(run_generator(path, feed, dtype)[0], expected)
    if not err <= GENERATOR_RTOL_BY_DTYPE[dtype]:
        raise ValueError(f"model: the generator graph differs from deco.optimized.sample by a relative "
                         f"{err:.1e} (bound {GENERATOR_RTOL_BY_DTYPE[dtype]:g})")


# ------------------------------------------------------------------------------ deco onnx-check
def recorded_graph_settings(metadata: dict[str, str]) -> SampleSettings:
    """The sampler settings a generator graph's metadata records."""
    low, high = (float(v) for v in metadata["deco_interval"].split())
    return SampleSettings(steps=int(metadata["deco_steps"]), guidance=float(metadata["deco_guidance"]),
                          interval=(low, high), timeshift=float(metadata["deco_timeshift"]),
                          solver=metadata["deco_solver"])
