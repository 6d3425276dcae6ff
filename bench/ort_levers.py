"""onnxruntime (CPU provider) vs torch eager, lever by lever, side by side in one process
(bench/RESULTS.md §6).

    python bench/ort_levers.py s16 [--rounds 11]   # DeCo-S/16, 256x256, batch 1, velocity graph
    python bench/ort_levers.py t2i [--rounds 11]   # the text model of RESULTS_t2i.md, batch 2
    python bench/ort_levers.py t2i --graph previous=OLD.onnx   # also a graph exported elsewhere

Each lever is one graph (the default export with one of its forms undone, or another decoder
chunk size) or one set of session options. Every graph is first checked against torch (<= 1e-4
relative to max|v|). Then, for one intra-op thread on both sides (timed in process CPU time) and
for two (wall clock), every round runs torch once and each onnxruntime session once, each run
after a pause of `--pause` seconds: the other side's idle threads have stopped spinning by then
(torch's OpenMP threads and onnxruntime's pool spin after a run; without the pause each slowed
the other's next run by 5-15 % at two threads). Medians over the rounds; prints a Markdown table.
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
from common import our_model, randomize
from torch import Tensor

import deco.deploy.optimize as optimize
import deco.optimized.layers as layers
from deco.config import DeCoConfig
from deco.deploy.export import export_onnx, relative_error
from deco.deploy.optimize import optimize_for_ort, session_options
from deco.optimized import build_model

T2I = DeCoConfig("t2i", 3, 16, 384, 6, 8, 3, 32, 0, 4.0, 2, 512, 64)  # bench/test_bench_release_t2i.py


@contextlib.contextmanager
def patched(module: Any, **values: Any) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def fused_products() -> contextlib.AbstractContextManager[None]:
    """Trunk: q/k/v (and the text model's w12 halves) as slices of one product."""
    return patched(layers, split_product=lambda x, layer, parts: layer(x).chunk(parts, dim=-1))


def six_axis_transposes() -> contextlib.AbstractContextManager[None]:
    """Decoder: the pixels gathered from and scattered to the image by one six-axis permutation."""
    def to_pixels(x: Tensor, p: int) -> Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(-1, p * p, c)

    def to_image(rows: Tensor, b: int, c: int, h: int, w: int, p: int) -> Tensor:
        return rows.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)

    return patched(layers, image_to_pixels=to_pixels, pixels_to_image=to_image)


def layer_normalization() -> contextlib.AbstractContextManager[None]:
    """Decoder: its LayerNorm as ONNX LayerNormalization instead of InstanceNormalization."""
    return patched(optimize, norm_op=lambda dtype: "LayerNormalization")


#: export variant -> (context while exporting, export_onnx options)
EXPORTS: dict[str, tuple[Callable[[], contextlib.AbstractContextManager[None]], dict[str, Any]]] = {
    "default": (contextlib.nullcontext, {}),
    "decoder straight-line (no Scan)": (contextlib.nullcontext, {"decoder_chunk_rows": None}),
    "decoder chunks of 2048 pixels": (contextlib.nullcontext, {"decoder_chunk_rows": 2048}),
    "decoder chunks of 8192 pixels": (contextlib.nullcontext, {"decoder_chunk_rows": 8192}),
    "decoder norm as LayerNormalization": (layer_normalization, {}),
    "decoder pixels by one six-axis transpose": (six_axis_transposes, {}),
    "trunk q/k/v as slices of one product": (fused_products, {}),
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
    return model, feed, (x, t, cond)


def graphs(model: Any, folder: Path, extra: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for name, (context, options) in EXPORTS.items():
        with context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = export_onnx(model, folder / f"{len(out)}.onnx", **options)
    return {**out, **extra}


def sessions(paths: dict[str, Path], threads: int, expected: np.ndarray,
             feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """lever -> an onnxruntime session, each checked against torch."""
    import onnxruntime as ort

    def make(path: Path, **options: Any) -> Any:
        return ort.InferenceSession(str(path), sess_options=session_options(threads=threads, **options),
                                    providers=["CPUExecutionProvider"])

    default = paths["default"]
    out = {name if name != "default" else "default export": make(p) for name, p in paths.items()}
    for level in ("disable", "basic", "extended"):
        out[f"optimisation level {level} (default: all)"] = make(default, level=level)
    saved = optimize_for_ort(default, level="extended")
    out["graph saved optimised at extended, loaded with level disable"] = make(saved, level="disable")
    out["execution mode parallel"] = make(default, sequential=False)
    out["memory pattern off"] = make(default, memory_pattern=False)
    out["CPU memory arena off"] = make(default, cpu_arena=False)
    for name, session in out.items():
        got = session.run(["v"], feed)[0]
        err = relative_error(got, expected)
        if err > 1e-4:
            raise SystemExit(f"{name}: onnxruntime disagrees with torch: {err:.2e}")
    return out


def rounds(model: Any, inputs: tuple[Tensor, ...], runs: dict[str, Callable[[], Any]], count: int,
           clock: Callable[[], float], pause: float) -> dict[str, float]:
    """Median seconds of each run over `count` alternating rounds (torch first in each)."""
    def torch_run() -> None:
        with torch.no_grad():
            model(*inputs)

    every = {"torch": torch_run, **runs}
    times: dict[str, list[float]] = {k: [] for k in every}
    for _ in range(count + 1):  # the first round warms up
        for name, run in every.items():
            time.sleep(pause)
            start = clock()
            run()
            times[name].append(clock() - start)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("s16", "t2i"))
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of idle before each run")
    parser.add_argument("--graph", action="append", default=[], metavar="NAME=PATH",
                        help="also time this graph (exported elsewhere, e.g. by an older commit)")
    args = parser.parse_args()
    import onnxruntime as ort

    extra = {}
    for item in args.graph:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"--graph: expected NAME=PATH of an existing file, got {item!r}")
        extra[name] = Path(path)
    model, feed, inputs = build(args.model)
    with torch.no_grad():
        expected = model(*inputs).numpy()
    results = {}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        paths = graphs(model, Path(tmp), extra)
        for threads, clock in ((1, time.process_time), (2, time.perf_counter)):
            torch.set_num_threads(threads)
            table = sessions(paths, threads, expected, feed)
            runs = {k: (lambda s=s: s.run(["v"], feed)) for k, s in table.items()}
            results[threads] = rounds(model, inputs, runs, args.rounds, clock, args.pause)
            load.append(os.getloadavg()[0])
    one, two = results[1], results[2]
    print(f"| lever ({args.model}) | 1 thread (CPU time): onnxruntime | torch | torch / ort "
          "| 2 threads (wall): onnxruntime | torch | torch / ort |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in one:
        if name != "torch":
            print(f"| {name} | {one[name] * 1e3:.0f} ms | {one['torch'] * 1e3:.0f} ms | "
                  f"{one['torch'] / one[name]:.2f}x | {two[name] * 1e3:.0f} ms | {two['torch'] * 1e3:.0f} ms "
                  f"| {two['torch'] / two[name]:.2f}x |")
    print(f"\nload average (1 min) before / after 1 thread / after 2: {', '.join(f'{x:.1f}' for x in load)}; "
          f"onnxruntime {ort.__version__}, torch {torch.__version__}, rounds {args.rounds}, "
          f"pause {args.pause} s", file=sys.stdout)


if __name__ == "__main__":
    main()
