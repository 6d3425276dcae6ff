"""Inference latency of one forward pass: onnxruntime (CPU provider, or CUDA where available) on
the exported graph vs torch eager on the same weights, float32, with as many intra-op threads
as torch uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from common import Sizes, batch_for, our_model, record

from deco.deploy.export import export_onnx
from deco.deploy.runtime import OnnxVelocityModel

ARCHS = ["deco", "baseline"]


@pytest.fixture(scope="module", params=ARCHS)
def exported(request: pytest.FixtureRequest, profile: dict[str, Sizes],
             tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, OnnxVelocityModel, Sizes]:
    sizes = profile["onnx"]
    model = our_model(sizes.config(request.param)).eval()
    path = export_onnx(model, Path(tmp_path_factory.mktemp("onnx")) / f"{request.param}.onnx")
    # The same number of threads as torch, so that CPU times compare like with like.
    return request.param, model, OnnxVelocityModel(path, threads=torch.get_num_threads()), sizes


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_inference(benchmark: Any, exported: Any, runtime: str) -> None:
    arch, model, graph, sizes = exported
    x, t, y, _ = batch_for(model.config, sizes.batch, sizes.resolution)
    feed = {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()}
    with torch.no_grad():
        expected = model(x, t, y).numpy()
    got = graph.session.run(["v"], feed)[0]
    err = float(np.abs(got - expected).max() / np.abs(expected).max())
    assert err <= 1e-4, f"onnxruntime disagrees with torch: {err:.2e}"

    benchmark.group = f"inference {arch} {sizes.resolution}px b{sizes.batch}"
    if runtime == "torch":
        with torch.no_grad():
            benchmark.pedantic(model, args=(x, t, y), rounds=sizes.rounds, warmup_rounds=1)
    else:
        benchmark.pedantic(graph.session.run, args=(["v"], feed), rounds=sizes.rounds, warmup_rounds=1)
    record(benchmark, runtime=runtime, providers=graph.providers, max_rel_err=err)
