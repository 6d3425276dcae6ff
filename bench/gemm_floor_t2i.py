"""The matrix-product floor of a text-to-image training step, measured (needs $DECO_RELEASE_SRC;
the sizes of bench/test_bench_release_t2i.py):

    OMP_NUM_THREADS=1 DECO_RELEASE_SRC=/path/to/release python bench/gemm_floor_t2i.py [--compile]

Why: issue #10 asks for a training step 2x the release's. Both models compute the same
products (the same layers on the same tokens), so a step can never be faster than the time its
products take on their own. This script records every matrix product of one training step of each
model (torch.profiler with input shapes: aten::mm, addmm, bmm, baddbmm), replays each shape on
fresh tensors of that shape, and prints, in process CPU time (one thread, medians of 5 rounds):

* the step as measured (common.train_step, the AdamW of each side as noted below);
* the sum of its products replayed in isolation (the floor: every other op costing nothing);
* ours' optimizer step alone, foreach and fused (the Trainer's choice);
* what a 2x step would have to take;
* with --compile, both models' eval forward and training step (fused AdamW for both) in eager
  mode and under torch.compile (inductor, which fuses the elementwise work between products;
  needs a C++ compiler; the first calls, which compile, are not timed).

Replaying on contiguous tensors without the surrounding ops is, if anything, faster than in the
step (warm caches, no transposed operands), so the floor it gives is optimistic for ours.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable

import torch
from common import adamw, release_source, train_step
from test_bench_release_t2i import CONFIG, load_release_t2i, make_batch, models
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from deco.optimized import cpu_gemm_backend

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
ROUNDS = 5


def cpu_seconds(fn: Callable[[], object], rounds: int = ROUNDS) -> float:
    """Median process CPU time of `fn` over `rounds` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def step_products(model: nn.Module, optimizer: torch.optim.Optimizer,
                  data: tuple[Tensor, ...]) -> Counter[tuple[str, tuple[tuple[int, ...], ...]]]:
    """(op, input shapes) -> count, for every matrix product of one training step."""
    train_step(model, optimizer, data)  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        train_step(model, optimizer, data)
    found: Counter[tuple[str, tuple[tuple[int, ...], ...]]] = Counter()
    for event in prof.events():
        if event.name in GEMMS:
            shapes = tuple(tuple(s) for s in event.input_shapes if s)
            found[(event.name, shapes)] += 1
    return found


def replay(op: str, shapes: tuple[tuple[int, ...], ...]) -> Callable[[], object]:
    """A call of `op` on fresh float32 tensors of `shapes`."""
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g) for s in shapes]
    fn = {"aten::mm": torch.mm, "aten::bmm": torch.bmm,
          "aten::addmm": torch.addmm, "aten::baddbmm": torch.baddbmm}[op]
    return lambda: fn(*args[:3])


def products_seconds(found: Counter[tuple[str, tuple[tuple[int, ...], ...]]]) -> tuple[float, float]:
    """(CPU seconds, GFLOP) of all products replayed, each shape timed once and weighted by count."""
    seconds = flop = 0.0
    for (op, shapes), count in found.items():
        seconds += count * cpu_seconds(replay(op, shapes), rounds=3)
        m, k = shapes[-2][-2], shapes[-2][-1]
        n = shapes[-1][-1]
        batch = shapes[-2][0] if len(shapes[-2]) == 3 else 1
        flop += count * 2.0 * batch * m * k * n
    return seconds, flop / 1e9


def main() -> None:
    root = release_source()
    if root is None:
        sys.exit("DECO_RELEASE_SRC: point it at the release's folder")
    torch.manual_seed(0)
    pairs = models(load_release_t2i(root), CONFIG)
    data = make_batch(CONFIG, 2, 256)
    rows = {}
    for impl, (model, backend) in pairs.items():
        model.train()
        with cpu_gemm_backend(backend):
            optimizer = adamw(model)
            step = cpu_seconds(lambda: train_step(model, optimizer, data))  # noqa: B023
            found = step_products(model, optimizer, data)
            floor, gflop = products_seconds(found)
        rows[impl] = (step, floor, gflop, sum(found.values()))
    ours = pairs["ours"][0]
    for p in ours.parameters():  # gradients of the right shapes for a timed optimizer step
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {kind: torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.0, **{kind: True})
                  for kind in ("foreach", "fused")}
    adam = {kind: cpu_seconds(opt.step) for kind, opt in optimizers.items()}
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| model | training step | its products alone (replayed) | product GFLOP | products |")
    print("| --- | --- | --- | --- | --- |")
    for impl, (step, floor, gflop, n) in rows.items():
        print(f"| {impl} | {step * 1e3:.0f} ms | {floor * 1e3:.0f} ms | {gflop:.1f} | {n} |")
    print(f"ours' AdamW step alone: foreach {adam['foreach'] * 1e3:.0f} ms, "
          f"fused {adam['fused'] * 1e3:.0f} ms")
    need = rows["release"][0] / 2
    print(f"a 2x step must take <= {need * 1e3:.0f} ms; ours' products alone + fused AdamW "
          f"= {(rows['ours'][1] + adam['fused']) * 1e3:.0f} ms")
    if "--compile" in sys.argv[1:]:
        compiled_vs_eager(pairs, data)


def compiled_vs_eager(pairs: dict[str, tuple[nn.Module, str]], data: tuple[Tensor, ...]) -> None:
    """Eval forward and training step (fused AdamW) of both models, eager and compiled."""
    print("| model | mode | eval forward | training step (fused AdamW) |")
    print("| --- | --- | --- | --- |")
    for impl, (model, backend) in pairs.items():
        for mode in ("eager", "compiled"):
            run: nn.Module = torch.compile(model) if mode == "compiled" else model  # type: ignore[assignment]
            with cpu_gemm_backend(backend):
                run.eval()
                with torch.no_grad():
                    forward = cpu_seconds(lambda: run(*data[:3]))  # noqa: B023
                run.train()
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
                step = cpu_seconds(lambda: train_step(run, optimizer, data))  # noqa: B023
            print(f"| {impl} | {mode} | {forward * 1e3:.0f} ms | {step * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
