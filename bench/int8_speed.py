"""int8 vs float32 velocity graph speed at a larger size (random weights; speed only).

    nice -n 10 python bench/int8_speed.py DeCo-S/16 256 --threads 1 --rounds 7

Exports the velocity graph of a randomly initialised preset in float32 and int8 (deco.deploy.
quantize), and times one call (batch 1) of each in onnxruntime's CPU provider with the same
threads, alternating rounds; prints the median seconds, the speed-up and the file sizes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset")
    parser.add_argument("size", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import onnxruntime as ort
    import torch

    from deco.config import DeCoConfig
    from deco.deploy.export import export_onnx
    from deco.deploy.quantize import export_int8
    from deco.optimized.weights import build_model

    torch.manual_seed(0)
    model = build_model(DeCoConfig.preset(args.preset)).eval()
    for p in model.parameters():  # AdaLN-Zero leaves zeros: give every weight a value
        torch.nn.init.normal_(p, std=0.02)
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((1, 3, args.size, args.size)).astype(np.float32),
            "t": np.array([0.5], np.float32), "y": np.array([1])}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"float32": export_onnx(model, Path(tmp) / "f.onnx"),
                 "int8": export_int8(model, Path(tmp) / "q.onnx")}
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                    for k, p in paths.items()}
        sizes = {k: os.path.getsize(p) for k, p in paths.items()}
        for s in sessions.values():
            s.run(["v"], feed)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(["v"], feed)
                times[k].append(time.perf_counter() - t0)
    base = float(np.median(times["float32"]))
    print(f"{args.preset} {args.size}x{args.size}, batch 1, {args.threads} thread(s), load {os.getloadavg()}")
    for k in sessions:
        med = float(np.median(times[k]))
        print(f"| {k} | {sizes[k] / 1e6:.1f} MB | {med:.4f} s | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
