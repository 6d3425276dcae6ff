"""The class model's training step against its matrix-product floor, phase by phase and layer kind
by layer kind (issue #29; bench/gemm_floor_t2i.py does the whole step for the text model):

    OMP_NUM_THREADS=1 python bench/gemm_floor_c2i.py [--profile cpu|smoke] [--ops] [--bf16]

DeCo-S/16, 256x256, batch 4, float32 (the "release" sizes of common.PROFILES), our model only.
--bf16: the forward under CPU bf16 autocast (`Trainer`'s `cpu_bf16`, the release's bf16-mixed);
its products, the backward's included, are then bfloat16 and are replayed in bfloat16 (the float32
products of the loss, a few MFLOP, are replayed in bfloat16 too).
Every time is process CPU time, the median of ROUNDS calls after a warm-up: on a shared machine CPU
time at one thread is the least disturbed measure (wall time counts the other jobs' slices).

* Phases of `common.train_step_phases`: data, forward, loss, backward, optimizer (AdamW fused and
  foreach), and the step; next to the step, all its products (torch.profiler with shapes:
  aten::mm/addmm/bmm/baddbmm and oneDNN's linear) replayed alone on fresh contiguous tensors:
  the floor a step cannot beat.
* Layer kinds: the first module of each kind is run alone on the inputs it saw in a step
  (captured by a forward hook), forward and backward (against a random cotangent) timed
  separately, each against its own products replayed alone; "x n" is how many the model has.
  The DiT block row is the whole block (its norms and modulation included), so block minus
  attention, MLP and adaLN is what the modulation costs.

Replaying on contiguous, cache-warm tensors is, if anything, faster than inside the step, so the
floor is optimistic.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from common import PHASES, PROFILES, adamw, batch_for, our_model, train_step_phases
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")
ROUNDS = 5
BF16 = False  # set by main(): products replayed in bfloat16, modules run under CPU bf16 autocast
Products = Counter[tuple[str, tuple[tuple[int, ...], ...]]]


def cpu_seconds(fn: Callable[[], object], rounds: int = ROUNDS) -> float:
    """Median process CPU time of `fn` over `rounds` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def products_of(fn: Callable[[], object]) -> Products:
    """(op, input shapes) -> count of every matrix product one call of `fn` makes."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, autocast():
        fn()
    found: Products = Counter()
    for event in prof.events():
        if event.name in GEMMS:
            found[(event.name, tuple(tuple(s) for s in event.input_shapes if s))] += 1
    return found


def replay(op: str, shapes: tuple[tuple[int, ...], ...]) -> Callable[[], object]:
    """A call of `op` on fresh contiguous float32 (BF16: bfloat16) tensors of `shapes`."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if BF16 else torch.float32
    args = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    if op == "mkldnn::_linear_pointwise":
        bias = args[2] if len(args) > 2 else None
        return lambda: torch.ops.mkldnn._linear_pointwise(args[0], args[1], bias, "none", [], "")
    fn = {"aten::mm": torch.mm, "aten::bmm": torch.bmm,
          "aten::addmm": torch.addmm, "aten::baddbmm": torch.baddbmm}[op]
    return lambda: fn(*args[:3])


def floor_seconds(found: Products) -> tuple[float, float]:
    """(CPU seconds, GFLOP) of all products replayed, each shape timed once and weighted by count."""
    seconds = flop = 0.0
    for (op, shapes), count in found.items():
        seconds += count * cpu_seconds(replay(op, shapes), rounds=3)
        a, b = shapes[0], shapes[1]
        if op == "mkldnn::_linear_pointwise":  # a (..., K) x w (N, K)
            m, k, n = a[0] if len(a) > 1 else 1, a[-1], b[0]
            batch = 1
        else:
            if op in ("aten::addmm", "aten::baddbmm"):
                a, b = shapes[1], shapes[2]
            m, k, n = a[-2], a[-1], b[-1]
            batch = a[0] if len(a) == 3 else 1
        flop += count * 2.0 * batch * m * k * n
    return seconds, flop / 1e9


def capture(model: nn.Module, kinds: dict[str, type[nn.Module] | Callable[[nn.Module], bool]],
            run: Callable[[], object]) -> dict[str, tuple[nn.Module, tuple[Any, ...], dict[str, Any], int]]:
    """kind -> (first module of that kind, its inputs in one call of `run`, its kwargs, count)."""
    found: dict[str, tuple[nn.Module, tuple[Any, ...], dict[str, Any], int]] = {}
    hooks = []
    for kind, match in kinds.items():
        modules = [m for m in model.modules()
                   if (isinstance(m, match) if isinstance(match, type) else match(m))]
        first = modules[0]

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any,
                 kind: str = kind, n: int = len(modules)) -> None:
            if kind not in found:
                found[kind] = (mod, tuple(_fresh(a) for a in args),
                               {k: _fresh(v) for k, v in kwargs.items()}, n)
        hooks.append(first.register_forward_hook(hook, with_kwargs=True))
    run()
    for h in hooks:
        h.remove()
    return found


def _fresh(value: Any) -> Any:
    """A detached copy of a tensor input, needing a gradient where the original did."""
    if isinstance(value, Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


def autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16)


def kind_row(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[float]:
    """[forward, forward floor, backward, backward floor] in CPU seconds for one module alone."""

    def forward_call() -> Tensor:
        with autocast():
            out: Tensor = module(*args, **kwargs)
        return out

    cot = torch.randn_like(forward_call())
    forward = cpu_seconds(forward_call)
    f_floor, _ = floor_seconds(products_of(forward_call))

    def backward() -> None:
        forward_call().backward(cot)

    both = cpu_seconds(backward)
    outs = [forward_call() for _ in range(2)]
    b_products = products_of(lambda: outs.pop().backward(cot))
    b_floor, _ = floor_seconds(b_products)
    return [forward, f_floor, both - forward, b_floor]


def forward_row(model: nn.Module, data: tuple[Tensor, ...]) -> tuple[float, float]:
    """(CPU seconds of the eval forward without autograd, of its products replayed alone)."""

    def forward() -> object:
        with torch.no_grad(), autocast():
            return model(*data[:3])

    model.eval()
    try:
        return cpu_seconds(forward), floor_seconds(products_of(forward))[0]
    finally:
        model.train()


def main(profile_name: str, ops: bool, bf16: bool = False) -> None:
    from deco.optimized.layers import Attention, DiTBlock, PixelDecoder, SwiGLU

    global BF16
    BF16 = bf16

    sizes = PROFILES[profile_name]["release"]
    config = sizes.config()
    torch.manual_seed(0)
    model = our_model(config).train()
    data = batch_for(config, sizes.batch, sizes.resolution)
    optimizer = adamw(model)
    def step() -> object:
        return train_step_phases(model, optimizer, data, bf16=bf16)

    step()
    print(f"DeCo {sizes.preset}, {sizes.resolution}px, batch {sizes.batch}, "
          f"{'bf16 autocast' if bf16 else 'float32'}; threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}; process CPU time, median of {ROUNDS}")
    samples = [train_step_phases(model, optimizer, data, time.process_time, bf16=bf16)
               for _ in range(ROUNDS)]
    med = {p: statistics.median(s[p] for s in samples) for p in (*PHASES, "step")}
    step_floor, gflop = floor_seconds(products_of(step))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = {kind: torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, **{kind: True})
           for kind in ("foreach", "fused")}
    adam = {kind: cpu_seconds(o.step) for kind, o in opt.items()}
    print("\n| phase | ms |\n| --- | --- |")
    for p in (*PHASES, "step"):
        print(f"| {p} | {med[p] * 1e3:.0f} |")
    print(f"| products of the step replayed alone ({gflop:.1f} GFLOP) | {step_floor * 1e3:.0f} |")
    print(f"| step / product floor | {med['step'] / step_floor:.2f}x |")
    print(f"| AdamW alone, fused / foreach | {adam['fused'] * 1e3:.0f} / {adam['foreach'] * 1e3:.0f} |")
    eval_fwd, eval_floor = forward_row(model, data)
    print(f"| eval forward (no grad) | {eval_fwd * 1e3:.0f} |")
    print(f"| its products replayed alone | {eval_floor * 1e3:.0f} |")
    kinds: dict[str, Any] = {
        "patch embed": lambda m: m is model.patch_embed,
        "time embed": lambda m: m is model.t_embed,
        "DiT block (whole)": DiTBlock,
        "attention": Attention,
        "MLP (SwiGLU)": SwiGLU,
        "adaLN (DiT block)": lambda m: any(m is b.adaln for b in model.blocks),
        "pixel decoder": PixelDecoder,
    }
    found = capture(model, kinds, step)
    print("\n| layer kind | x n | forward ms | its products alone | backward ms | its products alone |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, (module, args, kwargs, n) in found.items():
        fwd, f_floor, bwd, b_floor = kind_row(module, args, kwargs)
        cells = " | ".join(f"{v * 1e3:.1f}" for v in (fwd, f_floor, bwd, b_floor))
        print(f"| {kind} | {n} | {cells} |")
    if ops:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    args = sys.argv[1:]
    name = "cpu"
    if "--profile" in args:
        name = args[args.index("--profile") + 1]
    if name not in PROFILES:
        raise SystemExit(__doc__)
    main(name, "--ops" in args, "--bf16" in args)
