"""The paper's sizes on a CUDA GPU (skipped without one; not run for RESULTS.md, which had none).

- Sampling: DeCo-XL/16 at 256x256, batch 1, 100 Euler steps with classifier-free guidance
  (scale 3, interval (0.1, 1]), bfloat16 weights; eager, manual CUDA graphs, torch.compile, and
  torch.compile with CUDA graphs ("reduce-overhead"). The paper reports 1.05 s on an A800.
- Training: DeCo-XL/16 and DiT-XL/16 at 256x256, batch 32, one Trainer step with bf16 autocast;
  peak CUDA memory in extra_info.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from common import batch_for, our_model, record
from torch import Tensor, nn

from deco.config import DeCoConfig
from deco.optimized.sampling import sample
from deco.optimized.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.cuda


class GraphedVelocity:
    """A model whose forward is replayed from a CUDA graph, one graph per input shape (the
    sampler calls it with batch B on unguided steps and 2B on guided ones)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.config = model, model.config
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]] = {}

    def _capture(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]:
        static = [x.clone(), t.clone(), y.clone()]
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph, as CUDA graphs require
            for _ in range(2):
                self.model(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(*static)
        return graph, static, out

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        key = tuple(x.shape)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, t, y)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, (x, t, y), strict=True):
            dst.copy_(src)
        graph.replay()
        return out.clone()


def compiled(mode: str | None) -> Callable[[nn.Module], Any]:
    def wrap(model: nn.Module) -> Any:
        fn: Any = torch.compile(model, mode=mode)
        fn.config = model.config  # the sampler reads config.num_classes
        return fn

    return wrap


VARIANTS: dict[str, Callable[[nn.Module], Any]] = {
    "eager": lambda m: m,
    "cuda-graphs": GraphedVelocity,
    "compile": compiled(None),
    "compile-reduce-overhead": compiled("reduce-overhead"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sampling_xl_256_100_steps(benchmark: Any, cuda: torch.device, variant: str) -> None:
    config = DeCoConfig.preset("DeCo-XL/16")
    model = our_model(config).to(cuda, torch.bfloat16).eval()
    runner = VARIANTS[variant](model)
    noise = torch.randn(1, 3, 256, 256, device=cuda, dtype=torch.bfloat16)
    labels = torch.tensor([207], device=cuda)
    options = {"steps": 100, "guidance": 3.0, "interval": (0.1, 1.0), "solver": "euler"}

    def run() -> Tensor:
        out = sample(runner, noise, labels, **options)
        torch.cuda.synchronize()
        assert isinstance(out, Tensor)
        return out

    benchmark.group = "CUDA sampling DeCo-XL/16 256px b1, 100 Euler steps, CFG, bf16"
    out = benchmark.pedantic(run, rounds=5, warmup_rounds=2)  # warm-up compiles / captures
    assert torch.isfinite(out.float()).all()
    record(benchmark, variant=variant, device=torch.cuda.get_device_name(), **options)


@pytest.mark.parametrize("preset", ["DeCo-XL/16", "DiT-XL/16"])
def test_train_iteration_xl_256_b32(benchmark: Any, cuda: torch.device, preset: str) -> None:
    config = DeCoConfig.preset(preset)
    trainer = Trainer(our_model(config).to(cuda), TrainConfig(bf16=True))
    x, _, y, _ = batch_for(config, 32, 256)
    x, y = x.to(cuda), y.to(cuda)

    def step() -> dict[str, float]:
        return trainer.step(x, y)  # returns Python floats: the step has synchronised

    torch.cuda.reset_peak_memory_stats()
    benchmark.group = "CUDA training iteration XL/16 256px b32, bf16 autocast"
    benchmark.pedantic(step, rounds=5, warmup_rounds=2)
    record(benchmark, preset=preset, device=torch.cuda.get_device_name(),
           peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
