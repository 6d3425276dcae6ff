"""onnxruntime (CPU provider) vs torch eager, lever by lever, side by side in one process
(bench/RESULTS.md §6).

    python bench/ort_levers.py s16 [--rounds 15]   # DeCo-S/16, 256x256, batch 1, velocity graph
    python bench/ort_levers.py t2i [--rounds 15]   # the text model of RESULTS_t2i.md, batch 2

Each lever is one graph (an export variant) or one set of session options. Every round runs torch
once and then each onnxruntime session once, so load from other processes spreads over all of
them alike; the table gives medians over the rounds. One intra-op thread for both sides is timed
in process CPU time (robust on a shared machine); two threads for both sides in wall-clock time.
Every graph is first checked against torch (<= 1e-4 relative to max|v|). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import our_model, randomize
from torch import Tensor

import deco.optimized.layers as layers
from deco.config import NORM_EPS, DeCoConfig
from deco.deploy.export import export_onnx
from deco.deploy.optimize import optimize_for_ort, session_options
from deco.optimized import build_model

T2I = DeCoConfig("t2i", 3, 16, 384, 6, 8, 3, 32, 0, 4.0, 2, 512, 64)  # bench/test_bench_release_t2i.py


@contextlib.contextmanager
def decomposed_layer_norm() -> Iterator[None]:
    """The export before this work: the decoder's LayerNorm traced as centring + rms_norm
    (mean, sub, pow, mean, add, sqrt, div in the graph)."""
    saved = layers.layer_norm
    layers.layer_norm = lambda x: F.rms_norm(x - x.mean(-1, keepdim=True), (x.shape[-1],), eps=NORM_EPS)
    try:
        yield
    finally:
        layers.layer_norm = saved


@contextlib.contextmanager
def contrib_attention() -> Iterator[None]:
    """SDPA exported as onnxruntime's contrib com.microsoft::MultiHeadAttention."""
    from torch.onnx import utils

    import deco.deploy.export as export

    def sdpa(g: Any, q: Any, k: Any, v: Any, *_: Any) -> Any:
        from torch.onnx import symbolic_helper

        heads = symbolic_helper._get_tensor_sizes(q)[1] or HEADS[0]
        shape3 = g.op("Constant", value_t=torch.tensor([0, 0, -1]))

        def to3(t: Any) -> Any:
            return g.op("Reshape", g.op("Transpose", t, perm_i=[0, 2, 1, 3]), shape3)

        out = g.op("com.microsoft::MultiHeadAttention", to3(q), to3(k), to3(v), num_heads_i=heads)
        out = g.op("Reshape", out, g.op("Constant", value_t=torch.tensor([0, 0, heads, -1])))
        return g.op("Transpose", out, perm_i=[0, 2, 1, 3])

    saved = export.symbolics

    @contextlib.contextmanager
    def with_mha(opset: int) -> Iterator[None]:
        with saved(opset):
            utils.register_custom_op_symbolic("aten::scaled_dot_product_attention", sdpa, opset)
            try:
                yield
            finally:
                utils.unregister_custom_op_symbolic("aten::scaled_dot_product_attention", opset)

    export.symbolics = with_mha  # type: ignore[assignment]
    try:
        yield
    finally:
        export.symbolics = saved  # type: ignore[assignment]


HEADS = [6]

#: export variant -> (context while exporting, export_onnx options)
EXPORTS: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "before": (decomposed_layer_norm, {"decoder_chunk_rows": None}),
    "layernorm-op": (contextlib.nullcontext, {"decoder_chunk_rows": None}),
    "loop-only": (decomposed_layer_norm, {}),
    "default": (contextlib.nullcontext, {}),
    "loop-2048": (contextlib.nullcontext, {"decoder_chunk_rows": 2048}),
    "loop-8192": (contextlib.nullcontext, {"decoder_chunk_rows": 8192}),
    "default+mha": (contrib_attention, {}),
}


def build(which: str) -> tuple[Any, dict[str, np.ndarray], tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    if which == "s16":
        config, batch = DeCoConfig.preset("DeCo-S/16"), 1
    else:
        config, batch = T2I, 2
    model = randomize(build_model(config)) if which == "t2i" else our_model(config)
    model.eval()
    x = torch.rand(batch, 3, 256, 256, generator=g) * 2 - 1
    t = torch.rand(batch, generator=g) * 0.98 + 0.01
    cond = (torch.randn(batch, config.text_length, config.text_dim, generator=g) if config.is_text
            else torch.randint(0, config.num_classes, (batch,), generator=g))
    names = ["x", "t", "text" if config.is_text else "y"]
    feed = {n: a.numpy() for n, a in zip(names, (x, t, cond), strict=True)}
    HEADS[0] = config.num_heads
    return model, feed, (x, t, cond)


def sessions(model: Any, folder: Path, expected: np.ndarray, feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """lever -> an onnxruntime session with one intra-op thread, each checked against torch."""
    import onnxruntime as ort

    graphs = {}
    for name, (context, options) in EXPORTS.items():
        with context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graphs[name] = export_onnx(model, folder / f"{name}.onnx", **options)
    default = graphs["default"]

    def make(path: Path, **options: Any) -> Any:
        return ort.InferenceSession(str(path), sess_options=session_options(**options),
                                    providers=["CPUExecutionProvider"])

    out = {f"export {n}": make(p, threads=1) for n, p in graphs.items()}
    for level in ("disable", "basic", "extended", "all"):
        out[f"level {level}"] = make(default, threads=1, level=level)
    for level in ("extended", "all"):
        saved = optimize_for_ort(default, level=level)
        out[f"saved {level}, loaded with level disable"] = make(saved, threads=1, level="disable")
    out["execution mode parallel"] = make(default, threads=1, sequential=False)
    out["memory pattern off"] = make(default, threads=1, memory_pattern=False)
    out["cpu arena off"] = make(default, threads=1, cpu_arena=False)
    for name, session in out.items():
        got = session.run(["v"], feed)[0]
        err = float(np.abs(got - expected).max() / np.abs(expected).max())
        if err > 1e-4:
            raise SystemExit(f"{name}: onnxruntime disagrees with torch: {err:.2e}")
    return out


def rounds(model: Any, inputs: tuple[Tensor, ...], runs: dict[str, Callable[[], Any]], count: int,
           clock: Callable[[], float]) -> dict[str, float]:
    """Median seconds of each run over `count` alternating rounds (torch first in each)."""
    times: dict[str, list[float]] = {"torch": [], **{k: [] for k in runs}}
    for _ in range(count + 1):  # the first round warms up
        with torch.no_grad():
            start = clock()
            model(*inputs)
            times["torch"].append(clock() - start)
        for name, run in runs.items():
            start = clock()
            run()
            times[name].append(clock() - start)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("s16", "t2i"))
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    import onnxruntime as ort

    model, feed, inputs = build(args.model)
    torch.set_num_threads(1)
    with torch.no_grad():
        expected = model(*inputs).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        table = sessions(model, Path(tmp), expected, feed)
        load = [os.getloadavg()[0]]
        one = rounds(model, inputs, {k: (lambda s=s: s.run(["v"], feed)) for k, s in table.items()},
                     args.rounds, time.process_time)
        load.append(os.getloadavg()[0])
        default = Path(tmp) / "default.onnx"
        two_threads = ort.InferenceSession(str(default), sess_options=session_options(threads=2),
                                           providers=["CPUExecutionProvider"])
        one_wall = ort.InferenceSession(str(default), sess_options=session_options(threads=1),
                                        providers=["CPUExecutionProvider"])
        wall1 = rounds(model, inputs, {"1 thread, wall": lambda: one_wall.run(["v"], feed)},
                       args.rounds, time.perf_counter)
        torch.set_num_threads(2)
        wall2 = rounds(model, inputs, {"2 threads, wall": lambda: two_threads.run(["v"], feed)},
                       args.rounds, time.perf_counter)
        load.append(os.getloadavg()[0])
    print(f"| lever ({args.model}) | onnxruntime | torch | torch / onnxruntime |")
    print("| --- | --- | --- | --- |")
    for name, seconds in one.items():
        if name != "torch":
            print(f"| {name} (1 thread, CPU time) | {seconds * 1e3:.0f} ms | {one['torch'] * 1e3:.0f} ms "
                  f"| {one['torch'] / seconds:.2f}x |")
    for result in (wall1, wall2):
        name = next(k for k in result if k != "torch")
        print(f"| default export, {name} | {result[name] * 1e3:.0f} ms | {result['torch'] * 1e3:.0f} ms "
              f"| {result['torch'] / result[name]:.2f}x |")
    print(f"\nload average (1 min) before / between / after: {', '.join(f'{x:.1f}' for x in load)}; "
          f"onnxruntime {ort.__version__}, torch {torch.__version__}, rounds {args.rounds}", file=sys.stdout)


if __name__ == "__main__":
    main()
