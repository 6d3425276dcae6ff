"""Calibration of gpu_generator.FP16_BOUND on the CPU: a float16-weight generator graph (every
operation in float16, onnxruntime's CPU provider) against `deco.optimized.sample` in float32, on
the paper's class sampler (Euler, 100 steps, guidance 3.2 on (0.1, 1]), random weights.

    OMP_NUM_THREADS=1 python bench/generator_fp16.py DeCo-XL/16 32 [SEEDS...]

Prints max|graph - torch| / max|torch| of the clamped sample per seed (batch 1, RES x RES).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from common import our_model
from gpu_generator import feed, settings

from deco.config import DeCoConfig
from deco.deploy.export import relative_error
from deco.deploy.generator import export_generator
from deco.optimized.sampling import sample


def main(preset: str, resolution: int, seeds: list[int]) -> None:
    config = DeCoConfig.preset(preset)
    model = our_model(config).eval()
    sampler = settings(100)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "generator-float16.onnx"
        start = time.perf_counter()
        export_generator(model, path, sampler, dtype="float16")
        print(f"export {time.perf_counter() - start:.0f} s", flush=True)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for seed in seeds:
            inputs = feed(config.num_classes, 1, resolution, seed=seed)
            with torch.no_grad():
                expected = sample(model, torch.from_numpy(inputs["noise"]),
                                  torch.from_numpy(inputs["labels"]), **sampler.options()).clamp(-1, 1)
            got = session.run(["sample"], inputs)[0]
            print(f"{preset} {resolution}x{resolution} seed {seed}: relative error "
                  f"{relative_error(got, expected.numpy()):.2e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3:]] or [1, 2])
