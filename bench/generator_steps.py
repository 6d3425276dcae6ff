"""Generator graphs: ONNX `Loop` vs unrolled steps (deco.onnx_generator), side by side in one process.

    OMP_NUM_THREADS=1 python bench/generator_steps.py [PRESET] [RESOLUTION] [STEPS ...]

For each step count: the file size, the export time, onnxruntime's session creation time and
the latency of one image (median of 3, 1 intra-op thread) of the Loop and the unrolled graph
(Euler, guidance 3 on the interval (0, 1), so N - 1 guided steps of batch 2), beside the same
sampling driven step by step from Python over the velocity graph (`deco.onnx_runtime.sample`) and
`deco.optimized.sample` in torch. Random non-zero weights (bench/common.py). Prints a Markdown
table for bench/RESULTS.md.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import our_model

from deco.config import DeCoConfig
from deco.onnx_export import export_onnx
from deco.onnx_generator import example_feed, export_generator, torch_sample
from deco.onnx_runtime import OnnxVelocityModel, _session
from deco.onnx_runtime import sample as onnx_sample
from deco.optimized.sampling import SampleSettings


def median_seconds(fn: Any, rounds: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str]) -> None:
    preset = argv[0] if argv else "DeCo-S/16"
    size = int(argv[1]) if len(argv) > 1 else 64
    steps_list = [int(s) for s in argv[2:]] or [10, 25, 100]
    torch.set_num_threads(1)
    model = our_model(DeCoConfig.preset(preset)).eval()
    folder = Path(tempfile.mkdtemp(prefix="deco-gen-bench-"))
    velocity = OnnxVelocityModel(export_onnx(model, folder / "velocity.onnx"), threads=1)
    vsize = velocity.path.stat().st_size
    print(f"{preset}, {size}x{size}, batch 1, Euler, guidance 3, interval (0, 1); velocity graph "
          f"{vsize / 1e6:.1f} MB")
    print("| steps | graph | file MB | export s | session s | s / image |")
    print("| --- | --- | --- | --- | --- | --- |")
    for steps in steps_list:
        rows(model, velocity, folder, steps, size)


def rows(model: Any, velocity: OnnxVelocityModel, folder: Path, steps: int, size: int) -> None:
    """The table's rows for one step count."""
    settings = SampleSettings(steps=steps, guidance=3.0, solver="euler")
    feed = example_feed(model.config, True, 1, (size, size), 3.0)
    for mode in ("loop", "unrolled"):
        path = folder / f"{mode}{steps}.onnx"
        t0 = time.perf_counter()
        export_generator(model, path, settings, unrolled=mode == "unrolled")
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        session = _session(path, ["CPUExecutionProvider"], 1)
        session_s = time.perf_counter() - t0
        latency = median_seconds(lambda s=session: s.run(["sample"], feed))
        print(f"| {steps} | {mode} | {path.stat().st_size / 1e6:.1f} | {export_s:.1f} | "
              f"{session_s:.2f} | {latency:.3f} |", flush=True)
    python_loop = median_seconds(lambda: onnx_sample(velocity, feed["noise"], feed["labels"],
                                                     **settings.options()))
    vsize = velocity.path.stat().st_size
    print(f"| {steps} | velocity graph, Python steps | {vsize / 1e6:.1f} | | | {python_loop:.3f} |")
    with torch.no_grad():
        eager = median_seconds(lambda: torch_sample(model, feed, settings))
    print(f"| {steps} | torch deco.optimized.sample | | | | {eager:.3f} |", flush=True)

if __name__ == "__main__":
    main(sys.argv[1:])
