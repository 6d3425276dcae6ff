"""Where a training step's time goes, ours vs the release's text-to-image model (needs
$DECO_RELEASE_SRC; the sizes of bench/test_bench_release_t2i.py):

    OMP_NUM_THREADS=1 DECO_RELEASE_SRC=/path/to/release python bench/profile_t2i.py [BACKEND] [--ops]

Prints, per model, the process CPU time of each phase of `common.train_step` (forward, loss,
backward, optimizer step) and of an eval forward: medians of 5 rounds after a warm-up, the two
models alternating so that a change in machine load hits both. BACKEND ("auto", "aten",
"onednn") is our float32 GEMM backend (default "auto"); the release always runs on PyTorch's
default. With --ops it also prints torch.profiler's 15 most expensive ops of one training step of
each; those are wall-clock times, inflated on a loaded machine, so compare their shares, not
their values, with the phase times.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import adamw, release_source, train_step
from test_bench_release_t2i import CONFIG, IMPLS, load_release_t2i, make_batch, models
from torch import nn

from deco.optimized import cpu_gemm_backend
from deco.optimized.frequency import frequency_aware_loss

PHASES = ("forward", "loss", "backward", "optimizer", "eval forward")


def cpu_time(fn: Callable[[], object]) -> tuple[float, object]:
    """(process CPU seconds, result) of one call."""
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def phases(model: nn.Module, optimizer: torch.optim.Optimizer, data: tuple[torch.Tensor, ...]
           ) -> list[float]:
    """CPU seconds of each of PHASES: `common.train_step` cut into its parts, then an eval
    forward (no autograd)."""
    x, t, text, noise = data
    tb = t.view(-1, 1, 1, 1)
    x_t, v = tb * x + (1 - tb) * noise, x - noise
    model.train()
    t_fwd, pred = cpu_time(lambda: model(x_t, t, text))
    assert isinstance(pred, torch.Tensor)
    t_loss, loss = cpu_time(lambda: F.mse_loss(pred, v) + frequency_aware_loss(pred, v))
    assert isinstance(loss, torch.Tensor)
    optimizer.zero_grad(set_to_none=True)
    t_bwd, _ = cpu_time(loss.backward)
    t_opt, _ = cpu_time(optimizer.step)
    model.eval()
    with torch.no_grad():
        t_eval, _ = cpu_time(lambda: model(x_t, t, text))
    return [t_fwd, t_loss, t_bwd, t_opt, t_eval]


def main(backend: str, ops: bool, rounds: int = 5) -> None:
    root = release_source()
    if root is None:
        raise SystemExit("profile_t2i: DECO_RELEASE_SRC is not set")
    pairs = models(load_release_t2i(root), CONFIG)
    backends = {"ours": backend, "release": pairs["release"][1]}
    data = make_batch(CONFIG, 2, 256)
    optimizers = {impl: adamw(model) for impl, (model, _) in pairs.items()}
    times: dict[str, list[list[float]]] = {impl: [] for impl in IMPLS}
    for r in range(rounds + 1):  # round 0 warms up
        for impl in IMPLS:
            with cpu_gemm_backend(backends[impl]):
                sample = phases(pairs[impl][0], optimizers[impl], data)
            if r:
                times[impl].append(sample)
    print(f"threads {torch.get_num_threads()}, CPU time, median (min-max) of {rounds} rounds")
    for impl in IMPLS:
        cols = [sorted(c) for c in zip(*times[impl], strict=True)]
        cells = [f"{name} {statistics.median(c) * 1e3:.0f} ({c[0] * 1e3:.0f}-{c[-1] * 1e3:.0f}) ms"
                 for name, c in zip(PHASES, cols, strict=True)]
        print(f"{impl:8s} ({backends[impl]}): " + ", ".join(cells))
    if ops:
        for impl in IMPLS:
            model, _ = pairs[impl]
            with cpu_gemm_backend(backends[impl]), torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                train_step(model.train(), optimizers[impl], data)
            print(f"\n{impl}: one training step, torch.profiler (wall clock)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--ops"]
    if len(args) > 1 or (args and args[0] not in ("auto", "aten", "onednn")):
        raise SystemExit(__doc__)
    main(args[0] if args else "auto", "--ops" in sys.argv[1:])
