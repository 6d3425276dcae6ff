"""Ours vs the release's text-to-image model, side by side (needs $DECO_RELEASE_SRC): hidden 384,
6 heads, 8 DiT + 3 decoder blocks (width 32), 2 text refine blocks, 64 text tokens of width 512,
256x256, batch 2, float32 on the CPU, identical weights. One forward pass and one training step
(the same AdamW and loss code, `common.train_step`), for ours with its default float32 GEMM
backend and for the release as it is ("release", PyTorch's default GEMM).

The release's t2i model file imports its own `src.models.layers` package, so the release folder
goes on sys.path (in this process only); it is run, never copied.

    DECO_RELEASE_SRC=/path/to/release python bench/test_bench_release_t2i.py   # quick ratio
    DECO_RELEASE_SRC=... python bench/test_bench_release_t2i.py memory IMPL forward|train

The second form prints one JSON line with the peak resident memory of one op in this fresh
process (bench/memory_probe.py's method: VmHWM reset just before the op); the first runs it for
both models and both ops after the timings.
"""

from __future__ import annotations

import importlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from common import adamw, randomize, record, release_source, train_step
from torch import Tensor, nn

from deco.config import DeCoConfig
from deco.optimized import build_model, cpu_gemm_backend
from deco.optimized.gemm import auto_backend
from deco.release import portable_name

CONFIG = DeCoConfig("t2i", 3, 16, 384, 6, 8, 3, 32, 0, 4.0, 2, 512, 64)
SMOKE = DeCoConfig("t2i", 3, 16, 64, 2, 1, 1, 8, 0, 4.0, 1, 16, 4)
IMPLS = ("ours", "release")


def load_release_t2i(root: Path) -> ModuleType:
    """The release's `src.models.transformer.dit_t2i_DeCo` module, imported from `root`."""
    if not (root / "src/models/transformer/dit_t2i_DeCo.py").is_file():
        raise FileNotFoundError(f"DECO_RELEASE_SRC: {root} has no src/models/transformer/dit_t2i_DeCo.py")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("src.models.transformer.dit_t2i_DeCo")


def release_twin(module: ModuleType, ours: nn.Module) -> nn.Module:
    """The release's t2i `PixNerDiT` holding exactly our model's weights."""
    cfg: DeCoConfig = ours.config  # type: ignore[assignment]
    twin: nn.Module = module.PixNerDiT(
        in_channels=cfg.in_channels, num_groups=cfg.num_heads, hidden_size=cfg.hidden_size,
        decoder_hidden_size=cfg.decoder_width, num_encoder_blocks=cfg.depth,
        num_decoder_blocks=cfg.decoder_depth, num_text_blocks=cfg.text_depth,
        patch_size=cfg.patch_size, txt_embed_dim=cfg.text_dim, txt_max_length=cfg.text_length,
    )
    state = ours.state_dict()
    mapped = {k: state[portable_name(k)].reshape(v.shape) for k, v in twin.state_dict().items()}
    if {portable_name(k) for k in mapped} != set(state):
        raise ValueError("release: parameter sets differ")
    twin.load_state_dict(mapped)
    return twin


def make_batch(config: DeCoConfig, batch: int, resolution: int, seed: int = 0) -> tuple[Tensor, ...]:
    """(x, t, text, noise): images in [-1, 1], times in (0, 1), text states, noise."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, resolution, resolution)
    x = torch.rand(shape, generator=g) * 2 - 1
    t = torch.rand(batch, generator=g) * 0.98 + 0.01
    text = torch.randn(batch, config.text_length, config.text_dim, generator=g)
    return x, t, text, torch.randn(shape, generator=g)


def models(release: ModuleType, config: DeCoConfig) -> dict[str, tuple[nn.Module, str]]:
    """impl -> (model, float32 CPU GEMM backend), same weights, checked to agree."""
    ours = randomize(build_model(config))
    return {"ours": (ours, auto_backend()), "release": (release_twin(release, ours), "aten")}


def check_agreement(pairs: dict[str, tuple[nn.Module, str]], data: tuple[Tensor, ...]) -> float:
    """Max relative difference of the two forwards (timings mean something only if they agree)."""
    outs = []
    with torch.no_grad():
        for model, backend in pairs.values():
            with cpu_gemm_backend(backend):
                outs.append(model.eval()(*data[:3]))
    return float((outs[0] - outs[1]).abs().max() / outs[1].abs().max())


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest) -> tuple[dict[str, tuple[nn.Module, str]], tuple[Tensor, ...]]:
    root = release_source()
    if root is None:
        pytest.skip("DECO_RELEASE_SRC is not set (point it at the release's folder to compare)")
    smoke = request.config.getoption("benchmark_disable")
    config = SMOKE if smoke else CONFIG
    pairs = models(load_release_t2i(root), config)
    data = make_batch(config, 2, 32 if smoke else 256)
    err = check_agreement(pairs, data)
    assert err <= 1e-4, f"ours and the release disagree: max rel err {err:.2e}"
    return pairs, data


@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark: Any, pair: Any, impl: str) -> None:
    pairs, data = pair
    model, backend = pairs[impl]
    model.eval()
    with cpu_gemm_backend(backend), torch.no_grad():
        benchmark.pedantic(lambda: model(*data[:3]), rounds=5, warmup_rounds=1)
    record(benchmark, impl=impl, backend=backend, op="t2i forward")


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark: Any, pair: Any, impl: str) -> None:
    pairs, data = pair
    model, backend = pairs[impl]
    model.train()
    optimizer = adamw(model)
    with cpu_gemm_backend(backend):
        benchmark.pedantic(lambda: train_step(model, optimizer, data), rounds=5, warmup_rounds=1)
    record(benchmark, impl=impl, backend=backend, op="t2i train step")


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call. With one thread the CPU time is the measure that
    other processes on a shared machine disturb least."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(rounds: int = 5) -> None:
    """Print forward and training-step medians of both and their ratios (no pytest needed).
    Rounds alternate between the two models so that a change in machine load hits both."""
    root = release_source()
    if root is None:
        raise SystemExit("test_bench_release_t2i: DECO_RELEASE_SRC is not set")
    pairs = models(load_release_t2i(root), CONFIG)
    data = make_batch(CONFIG, 2, 256)
    print(f"threads {torch.get_num_threads()}, agreement {check_agreement(pairs, data):.1e}")
    optimizers = {impl: adamw(model) for impl, (model, _) in pairs.items()}
    ops: dict[str, Callable[[str], object]] = {
        "forward": lambda impl: pairs[impl][0].eval()(*data[:3]),
        "train": lambda impl: train_step(pairs[impl][0].train(), optimizers[impl], data),
    }
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for op, run in ops.items():
        for r in range(rounds + 1):  # round 0 warms up
            for impl in IMPLS:
                with cpu_gemm_backend(pairs[impl][1]), torch.set_grad_enabled(op == "train"):
                    sample = _timed(lambda impl=impl, run=run: run(impl))
                if r:
                    times.setdefault((op, impl), []).append(sample)
    for op in ops:
        med = {impl: [statistics.median(v) for v in zip(*times[op, impl], strict=True)] for impl in IMPLS}
        for impl in IMPLS:
            print(f"{op:8s} {impl:8s} ({pairs[impl][1]}): wall {med[impl][0] * 1e3:7.1f} ms, "
                  f"cpu {med[impl][1] * 1e3:7.1f} ms")
        print(f"{op:8s} release / ours: wall {med['release'][0] / med['ours'][0]:.2f}x, "
              f"cpu {med['release'][1] / med['ours'][1]:.2f}x")


def peak_memory(impl: str, op: str) -> dict[str, float]:
    """One op's peak memory for `impl`, measured in this process (call it in a fresh one)."""
    from memory_probe import reset_peak, status_mib

    root = release_source()
    if root is None:
        raise SystemExit("test_bench_release_t2i: DECO_RELEASE_SRC is not set")
    model, backend = models(load_release_t2i(root), CONFIG)[impl]
    data = make_batch(CONFIG, 2, 256)
    optimizer = adamw(model)
    with cpu_gemm_backend(backend):
        baseline = reset_peak()
        if op == "forward":
            with torch.no_grad():
                model.eval()(*data[:3])
        else:
            train_step(model.train(), optimizer, data)
    peak = status_mib("VmHWM")
    return {"baseline_mib": baseline, "peak_mib": peak, "op_mib": peak - baseline}


def memory_table() -> None:
    """Peak memory of both models' forward and training step, each in a fresh process."""
    for op in ("forward", "train"):
        mib = {}
        for impl in IMPLS:
            done = subprocess.run([sys.executable, __file__, "memory", impl, op], check=True,
                                  capture_output=True, text=True)
            mib[impl] = json.loads(done.stdout.strip().splitlines()[-1])["op_mib"]
        print(f"{op:8s} peak memory: ours {mib['ours']:.0f} MiB, release {mib['release']:.0f} MiB, "
              f"ours / release {mib['ours'] / mib['release']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "memory" and sys.argv[2] in IMPLS and sys.argv[3] in (
            "forward", "train"):
        print(json.dumps(peak_memory(sys.argv[2], sys.argv[3])))
    elif len(sys.argv) == 1:
        main()
        memory_table()
    else:
        raise SystemExit(__doc__)
