"""Opt-in: DeCo-XL/16 (682M parameters, 2.7 GB of float32 weights, over protobuf's 2 GiB limit)
and the text-to-image DeCo-XXL/16 (1.13B parameters, 4.5 GB; input `text` (1, 128, 2048))
through `export_onnx` with random weights: one external data file, onnx.checker on the path, one
onnxruntime forward at 256x256, batch 1, against torch (<= 1e-4 relative). Needs ~6 GB (XL) /
~10 GB (XXL) of RAM and minutes of CPU, so it runs only with DECO_FULL_SIZE=1 (and is marked
slow):

    DECO_FULL_SIZE=1 python -m pytest -s -m slow tests/test_onnx_full_size.py [-k XXL]

It prints (and writes to $DECO_FULL_SIZE_REPORT, if set, as JSON; one file per preset, the
preset's name appended) the times, the peak resident memory of the process and the file sizes.
DeCo-XL/16, two runs on 2 CPU cores shared with other jobs (torch 2.13, onnx 1.23, onnxruntime
1.32; times vary with the load): export 64 s / 46 s, graph 1.1 MB + data 2.73 GB, session
2.2 s / 2.8 s, one forward 0.8 s / 2.7 s (onnxruntime) and 0.8 s / 8.6 s (torch), relative
error 3.5e-7, peak RSS 5.5 GiB. DeCo-XXL/16, one run (same machine and
versions): export 152 s, graph 0.89 MB + data 4.54 GB, session 9.4 s, one forward 6.8 s
(onnxruntime) and 7.3 s (torch), relative error 4.5e-7, peak RSS 9.0 GiB (bench/RESULTS.md §3).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import rel_err

from deco.config import DeCoConfig
from deco.deploy.export import data_file, export_onnx
from deco.deploy.runtime import OnnxVelocityModel
from deco.optimized.weights import build_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("DECO_FULL_SIZE") != "1",
                       reason="full-size ONNX export: set DECO_FULL_SIZE=1 (needs ~6 GB RAM, XXL ~10 GB)"),
]

PRESETS = ["DeCo-XL/16", "DeCo-XXL/16"]


@torch.no_grad()
def random_model(config: DeCoConfig, seed: int = 0) -> torch.nn.Module:
    """Non-zero random weights in place (a fresh DeCo zeroes its output layers): norm gains
    1 + 0.1 N, everything else 0.02 N; no float64 copy of 682M numbers."""
    g = torch.Generator().manual_seed(seed)
    model = build_model(config)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1 + 0.1 * noise if "norm" in name else 0.02 * noise)
    return model.eval()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def condition(config: DeCoConfig, rng: np.random.Generator) -> np.ndarray:
    """A class label, or for the text model random text-encoder states (1, T, E)."""
    if config.is_text:
        return rng.standard_normal((1, config.text_length, config.text_dim)).astype(np.float32)
    return np.array([207])


@pytest.mark.parametrize("preset", PRESETS)
def test_full_size_export_with_external_data(tmp_path: Path, preset: str) -> None:
    config = DeCoConfig.preset(preset)
    model = random_model(config)
    params = sum(p.numel() for p in model.parameters())
    report: dict[str, float | int | str] = {"preset": preset, "parameters": params}

    start = time.perf_counter()
    path = export_onnx(model, tmp_path / "model.onnx")  # default: external data above 1 GiB
    report["export_s"] = time.perf_counter() - start
    report["peak_rss_after_export_gib"] = peak_rss_gib()

    data = data_file(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    report["graph_bytes"], report["data_bytes"] = path.stat().st_size, data.stat().st_size
    assert data.stat().st_size >= 4 * params * 0.99  # every float32 weight is in the one file
    onnx.checker.check_model(str(path), full_check=True)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 256, 256)).astype(np.float32)
    t, y = np.array([0.6], dtype=np.float32), condition(config, rng)
    start = time.perf_counter()
    graph = OnnxVelocityModel(path, providers=["CPUExecutionProvider"])
    report["session_s"] = time.perf_counter() - start
    start = time.perf_counter()
    got = graph.forward(x, t, y)
    report["onnxruntime_forward_s"] = time.perf_counter() - start
    del graph
    start = time.perf_counter()
    with torch.no_grad():
        expected = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).double().numpy()
    report["torch_forward_s"] = time.perf_counter() - start
    report["rel_err_vs_torch"] = rel_err(got, expected)
    report["peak_rss_gib"] = peak_rss_gib()
    print(json.dumps(report, indent=1))
    if os.environ.get("DECO_FULL_SIZE_REPORT"):
        name = os.environ["DECO_FULL_SIZE_REPORT"] + "." + preset.replace("/", "_")
        Path(name).write_text(json.dumps(report, indent=1) + "\n")
    assert report["rel_err_vs_torch"] <= 1e-4
