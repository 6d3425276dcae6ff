"""Shared pieces of the benchmarks: sizes per profile, models with non-zero random weights, the
release's model with identical weights, one common training step, and peak-memory probes.

Profiles (`DECO_BENCH_PROFILE`, or chosen by bench/conftest.py):
- "cpu": the sizes RESULTS.md reports on a CPU (default when timing);
- "smoke": tiny sizes, so that `pytest bench --benchmark-disable` runs every code path in
  seconds (CI);
- CUDA benchmarks always use the paper's sizes (bench/test_bench_cuda.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deco.config import DeCoConfig
from deco.optimized.frequency import frequency_aware_loss
from deco.optimized.gemm import auto_backend, linear, onednn_available
from deco.optimized.weights import build_model
from deco.release import portable_name

BENCH_DIR = Path(__file__).resolve().parent
RELEASE_FILE = Path("src/models/transformer/dit_c2i_DeCo.py")


@dataclass(frozen=True)
class Sizes:
    """Model preset, image size and batch for one kind of benchmark."""

    preset: str
    resolution: int
    batch: int
    rounds: int = 3
    steps: int = 0  # sampling steps

    def config(self, architecture: str = "deco") -> DeCoConfig:
        if architecture == "deco":
            return DeCoConfig.preset(self.preset)
        return DeCoConfig.preset(self.preset.replace("DeCo-", "DiT-"))


#: profile -> benchmark kind -> sizes. "release" is the side-by-side comparison of the brief:
#: DeCo-S/16, 256x256, batch 4, float32.
PROFILES: dict[str, dict[str, Sizes]] = {
    "cpu": {
        "forward": Sizes("DeCo-S/16", 256, 4, rounds=5),
        "train": Sizes("DeCo-S/16", 128, 4, rounds=5),
        "sample": Sizes("DeCo-S/16", 128, 2, rounds=3, steps=10),
        "loss": Sizes("DeCo-S/16", 256, 8, rounds=20),
        "onnx": Sizes("DeCo-S/16", 256, 1, rounds=10),
        "release": Sizes("DeCo-S/16", 256, 4, rounds=7),
    },
    "smoke": {
        "forward": Sizes("DeCo-tiny/4", 16, 2, rounds=1),
        "train": Sizes("DeCo-tiny/4", 16, 2, rounds=1),
        "sample": Sizes("DeCo-tiny/4", 16, 1, rounds=1, steps=2),
        "loss": Sizes("DeCo-tiny/4", 32, 2, rounds=1),
        "onnx": Sizes("DeCo-tiny/4", 16, 1, rounds=1),
        "release": Sizes("DeCo-S/16", 64, 1, rounds=1),
    },
}


# ---------------------------------------------------------------------------------- models
@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere (a fresh model zeroes its output layers, which would make
    agreement checks vacuous): norm gains 1 + 0.1 N, everything else 0.02 N."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        p.copy_(1 + 0.1 * noise if "norm" in name else 0.02 * noise)
    return model


def our_model(config: DeCoConfig, seed: int = 0) -> nn.Module:
    return randomize(build_model(config), seed)


def release_source() -> Path | None:
    """$DECO_RELEASE_SRC (the release's folder, containing src/), or None when unset."""
    env = os.environ.get("DECO_RELEASE_SRC")
    return Path(env) if env else None


def load_release_module(root: Path) -> ModuleType:
    """The release's DeCo model file, loaded by path (its package __init__ files import training
    code we do not need). The release is only *run* here, never copied."""
    path = root / RELEASE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"DECO_RELEASE_SRC: {path} does not exist")
    spec = importlib.util.spec_from_file_location("deco_release_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def release_model(module: ModuleType, config: DeCoConfig) -> nn.Module:
    """The release's `PixNerDiT` for a DeCo config (the release counts decoder blocks in
    `num_blocks`)."""
    if config.architecture != "deco":
        raise ValueError("config: the release's PixNerDiT is DeCo only")
    model: nn.Module = module.PixNerDiT(
        in_channels=config.in_channels, num_groups=config.num_heads, hidden_size=config.hidden_size,
        hidden_size_x=config.decoder_width, num_blocks=config.depth + config.decoder_depth,
        num_cond_blocks=config.depth, patch_size=config.patch_size, num_classes=config.num_classes,
    )
    return model


def onednn_linears(model: nn.Module) -> nn.Module:
    """`model` (the release's) with every `nn.Linear` computed by our `deco.optimized.gemm.linear`
    (oneDNN for float32 on x86-64 CPUs): separates what the matrix-product backend gives from
    what our model's layout gives."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(  # type: ignore[method-assign]
                lambda self, x: linear(x, self.weight, self.bias), module)
    return model


#: Side-by-side variants: ours and the release's model, each with both float32 CPU matrix-product
#: backends (bench/RESULTS.md explains why the backend matters on this CPU).
IMPLS = ("ours", "ours-aten", "release", "release-onednn")


def variant(impl: str, release: ModuleType | None, ours: nn.Module) -> tuple[nn.Module, str]:
    """(model, backend) for an entry of IMPLS; the model holds `ours`'s weights. The backend is
    the one its linear layers actually use: for "ours" deco's default ("auto": MKL on Intel CPUs,
    oneDNN on others, see deco.optimized.gemm), "aten" for "ours-aten" and for the plain release,
    whose `nn.Linear`s never consult deco's setting, oneDNN for "release-onednn" where this
    machine has it."""
    default = "onednn" if onednn_available() else "aten"
    if impl.startswith("ours"):
        return ours, "aten" if impl == "ours-aten" else auto_backend()
    if release is None:
        raise ValueError("release: the release's module is needed for " + impl)
    twin = release_twin(release, ours)
    if impl == "release-onednn":
        return onednn_linears(twin), default
    return twin, "aten"


def variant_from_env(impl: str, config: DeCoConfig, caller: str) -> tuple[nn.Module, str]:
    """`variant` for a script run: a fresh model of `config`, the release from $DECO_RELEASE_SRC
    (exits with a one-line message naming `caller` when a release variant needs it unset)."""
    root = release_source()
    if impl.startswith("release") and root is None:
        raise SystemExit(f"{caller}: DECO_RELEASE_SRC is not set")
    return variant(impl, None if root is None else load_release_module(root), our_model(config))


def release_twin(module: ModuleType, ours: nn.Module) -> nn.Module:
    """The release's model holding exactly our model's weights (names mapped by deco.release)."""
    state = ours.state_dict()
    twin = release_model(module, ours.config)  # type: ignore[arg-type]
    mapped = {k: state[portable_name(k)].reshape(v.shape) for k, v in twin.state_dict().items()}
    if {portable_name(k) for k in mapped} != set(state):
        raise ValueError("release: parameter sets differ")
    twin.load_state_dict(mapped)
    return twin


# ----------------------------------------------------------------------------------- inputs
def batch_for(config: DeCoConfig, batch: int, resolution: int, seed: int = 0) -> tuple[Tensor, ...]:
    """(x, t, y, noise): images in [-1, 1], times in (0, 1), labels, noise."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, resolution, resolution)
    x = torch.rand(shape, generator=g) * 2 - 1
    t = torch.rand(batch, generator=g) * 0.98 + 0.01
    y = torch.randint(0, config.num_classes, (batch,), generator=g)
    return x, t, y, torch.randn(shape, generator=g)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, ...]) -> float:
    """forward + flow-matching MSE + frequency-aware loss + backward + optimizer step: the same
    loss code for any model, so that two models are compared on the model alone."""
    x, t, y, noise = batch
    tb = t.view(-1, 1, 1, 1)
    x_t, v = tb * x + (1 - tb) * noise, x - noise
    pred = model(x_t, t, y)
    loss = F.mse_loss(pred, v) + frequency_aware_loss(pred, v)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


#: The phases of `train_step`, as `train_step_phases` times them.
PHASES = ("data", "forward", "loss", "backward", "optimizer")


def train_step_phases(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, ...],
                      clock: Callable[[], float] = time.perf_counter,
                      bf16: bool = False) -> dict[str, float]:
    """`train_step` cut into PHASES, seconds of each by `clock` (wall time by default; pass one
    that synchronises a GPU first, or `time.process_time`), plus "step", their sum. bf16: the
    forward under bf16 autocast on the model's device (the release's bf16-mixed, as `Trainer`
    runs it with `cpu_bf16`/`bf16`), the loss in float32."""
    stamps = [clock()]
    x, t, y, noise = batch
    tb = t.view(-1, 1, 1, 1)
    x_t, v = tb * x + (1 - tb) * noise, x - noise
    stamps.append(clock())
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = model(x_t, t, y)
    pred = pred.float()
    stamps.append(clock())
    loss = F.mse_loss(pred, v) + frequency_aware_loss(pred, v)
    stamps.append(clock())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    stamps.append(clock())
    optimizer.step()
    stamps.append(clock())
    times = {name: b - a for name, a, b in zip(PHASES, stamps, stamps[1:], strict=False)}
    times["step"] = stamps[-1] - stamps[0]
    return times


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The side-by-side benchmarks' optimizer, the same for both models: AdamW, lr 1e-4, fused on
    the CPU as in `Trainer` (one pass over each parameter instead of foreach's chain of list
    ops; bench/RESULTS.md §9 measures the two), foreach where fused is not offered."""
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=fused, foreach=None if fused else True)


# ----------------------------------------------------------------------------- peak memory
def peak_memory(impl: str, op: str, sizes: Sizes) -> dict[str, float]:
    """Peak resident memory of one `op` ("forward" or "train") of `impl` ("ours" or "release")
    in a fresh Python process (bench/memory_probe.py), in MiB.

    tracemalloc cannot see torch's CPU allocations, and torch's CPU allocator keeps no peak
    statistics, so the probe reads the kernel's resident-set high-water mark (VmHWM), reset just
    before the op; a fresh process per measurement keeps one run's caches and allocator state
    out of the next one's."""
    cmd = [sys.executable, str(BENCH_DIR / "memory_probe.py"), impl, op, sizes.preset,
           str(sizes.resolution), str(sizes.batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def record(benchmark: Any, **info: Any) -> None:
    """Attach facts (sizes, errors, memory) to the saved benchmark JSON."""
    benchmark.extra_info.update(info)
    benchmark.extra_info["torch"] = torch.__version__
    benchmark.extra_info["threads"] = torch.get_num_threads()
