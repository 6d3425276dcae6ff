"""onnxruntime's CPU provider vs torch eager at ONE intra-op thread each, side by side in one run:
the class model (DeCo-S/16, 256x256, batch 1) and the text model of RESULTS_t2i.md (256x256,
batch 2), velocity graphs as `export_onnx` writes them by default (pixel decoder as a Scan over
chunks, deco.deploy.optimize), and the same graph saved by onnxruntime already optimised
(`optimize_for_ort`, loaded back with optimisation off). Under --benchmark-disable (CI's smoke
run) tiny models. bench/ort_levers.py measures each lever separately (bench/RESULTS.md §6).

    pytest bench/test_bench_ort.py --benchmark-only --benchmark-timer time.process_time
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from common import Sizes, our_model, record

from deco.config import DeCoConfig
from deco.deploy.export import ONNX_CHECK_RTOL, export_onnx
from deco.deploy.optimize import optimize_for_ort
from deco.deploy.runtime import OnnxVelocityModel

#: model -> (config, batch, resolution, rounds) per profile
CASES = {
    "cpu": {"deco": (DeCoConfig.preset("DeCo-S/16"), 1, 256, 15),
            "t2i": (DeCoConfig("t2i", 3, 16, 384, 6, 8, 3, 32, 0, 4.0, 2, 512, 64), 2, 256, 9)},
    "smoke": {"deco": (DeCoConfig.preset("DeCo-tiny/4"), 1, 16, 1),
              "t2i": (DeCoConfig.preset("DeCo-T2I-tiny/4"), 1, 16, 1)},
}


@pytest.fixture
def one_thread() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module", params=["deco", "t2i"])
def graphs(request: pytest.FixtureRequest, profile: dict[str, Sizes],
           tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, dict[str, Any], int]:
    kind = "smoke" if profile["onnx"].preset == "DeCo-tiny/4" else "cpu"
    config, batch, resolution, rounds = CASES[kind][request.param]
    model = our_model(config).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1
    t = torch.rand(batch, generator=g) * 0.98 + 0.01
    cond = (torch.randn(batch, config.text_length, config.text_dim, generator=g) if config.is_text
            else torch.randint(0, config.num_classes, (batch,), generator=g))
    path = export_onnx(model, Path(tmp_path_factory.mktemp("ort")) / f"{request.param}.onnx")
    runtimes = {"onnxruntime": OnnxVelocityModel(path, threads=1),
                "onnxruntime-saved": OnnxVelocityModel(optimize_for_ort(path), threads=1, level="disable")}
    inputs = {"model": model, "torch": (x, t, cond),
              "feed": {"x": x.numpy(), "t": t.numpy(), ("text" if config.is_text else "y"): cond.numpy()}}
    return request.param, inputs, runtimes, rounds


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "onnxruntime-saved"])
def test_velocity_one_thread(benchmark: Any, graphs: Any, runtime: str, one_thread: None) -> None:
    name, inputs, runtimes, rounds = graphs
    model, feed = inputs["model"], inputs["feed"]
    with torch.no_grad():
        expected = model(*inputs["torch"]).numpy()
    errors = {}
    for key, graph in runtimes.items():
        got = graph.session.run(["v"], feed)[0]
        errors[key] = float(np.abs(got - expected).max() / np.abs(expected).max())
        assert errors[key] <= ONNX_CHECK_RTOL, f"{key} disagrees with torch: {errors[key]:.2e}"

    benchmark.group = f"velocity {name}, 1 thread"
    if runtime == "torch":
        with torch.no_grad():
            benchmark.pedantic(model, args=inputs["torch"], rounds=rounds, warmup_rounds=1)
    else:
        benchmark.pedantic(runtimes[runtime].session.run, args=(["v"], feed), rounds=rounds,
                           warmup_rounds=1)
    record(benchmark, runtime=runtime, max_rel_err=errors)
