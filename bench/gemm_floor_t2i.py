"""The matrix-product floor of a text-to-image training step, measured (needs $DECO_RELEASE_SRC;
the sizes of bench/test_bench_release_t2i.py):

    OMP_NUM_THREADS=1 DECO_RELEASE_SRC=/path/to/release python bench/gemm_floor_t2i.py [--compile] [--bf16]

Why: issue #10 asks for a training step 2x the release's. Both models compute the same
products (the same layers on the same tokens), so a step can never be faster than the time its
products take on their own. This script records every matrix product of one training step of each
model (torch.profiler with input shapes: aten::mm, addmm, bmm, baddbmm and oneDNN's linear, which
ours uses on AMD CPUs; the helpers of bench/gemm_floor_c2i.py), replays each shape on
fresh tensors of that shape, and prints, in process CPU time (one thread, medians of 5 rounds):

* the step as measured (common.train_step, the AdamW of each side as noted below);
* the sum of its products replayed in isolation (the floor: every other op costing nothing);
* ours' optimizer step alone, foreach and fused (the Trainer's choice);
* what a 2x step would have to take;
* with --bf16, both steps with the forward under CPU bf16 autocast (the release's bf16-mixed),
  the products replayed in bfloat16 (bench/gemm_floor_c2i.py --bf16);
* with --compile, both models' eval forward and training step (fused AdamW for both) in eager
  mode and under torch.compile (inductor, which fuses the elementwise work between products;
  needs a C++ compiler; the first calls, which compile, are not timed).

Replaying on contiguous tensors without the surrounding ops is, if anything, faster than in the
step (warm caches, no transposed operands), so the floor it gives is optimistic for ours.
"""

from __future__ import annotations

import sys

import gemm_floor_c2i
import torch
from common import adamw, release_source, train_step, train_step_phases
from gemm_floor_c2i import cpu_seconds, floor_seconds, products_of
from test_bench_release_t2i import CONFIG, load_release_t2i, make_batch, models
from torch import Tensor, nn

from deco.optimized import cpu_gemm_backend


def main() -> None:
    root = release_source()
    if root is None:
        sys.exit("DECO_RELEASE_SRC: point it at the release's folder")
    torch.manual_seed(0)
    pairs = models(load_release_t2i(root), CONFIG)
    data = make_batch(CONFIG, 2, 256)
    bf16 = gemm_floor_c2i.BF16 = "--bf16" in sys.argv[1:]
    rows = {}
    for impl, (model, backend) in pairs.items():
        model.train()
        with cpu_gemm_backend(backend):
            optimizer = adamw(model)
            step = cpu_seconds(lambda: train_step_phases(model, optimizer, data, bf16=bf16))  # noqa: B023
            found = products_of(lambda: train_step_phases(model, optimizer, data, bf16=bf16))  # noqa: B023
            floor, gflop = floor_seconds(found)
        rows[impl] = (step, floor, gflop, sum(found.values()))
    ours = pairs["ours"][0]
    for p in ours.parameters():  # gradients of the right shapes for a timed optimizer step
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {kind: torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.0, **{kind: True})
                  for kind in ("foreach", "fused")}
    adam = {kind: cpu_seconds(opt.step) for kind, opt in optimizers.items()}
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"{'bf16 autocast' if bf16 else 'float32'}")
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
