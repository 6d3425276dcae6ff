"""The model's forward reads no tensor value on the host (no device sync, CUDA-graph capturable);
label ranges are checked once per `sample` call and per `Trainer.step` instead."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import random_weights, rel_err, tiny_config

from deco.optimized.checks import check_label_range
from deco.optimized.gemm import full_float32_products
from deco.optimized.sampling import sample
from deco.optimized.trainer import Trainer
from deco.optimized.weights import build_model

#: Every way Python code turns a tensor's value into a host value.
HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "__array__")


class HostRead(AssertionError):
    """A tensor value was read on the host where none may be."""


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Make every host read of a torch.Tensor's value raise HostRead for the duration."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guard(name: str) -> Any:
        def raise_(*_: Any, **__: Any) -> Any:
            raise HostRead(f"Tensor.{name} called")
        return raise_

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, guard(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def tiny_model(architecture: str, device: str = "cpu") -> torch.nn.Module:
    config = tiny_config(architecture)
    model = build_model(config)
    model.load_state_dict({k: torch.from_numpy(v).float() for k, v in random_weights(config).items()})
    return model.to(device).eval()


def inputs(b: int = 2, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, 8, 12, generator=g)
    return x.to(device), torch.rand(b, generator=g).to(device), torch.tensor([3, 10][:b]).to(device)


def test_the_guard_catches_a_host_read() -> None:
    """The detector is live: the label check (one host read, by design) trips it."""
    with no_host_reads(), pytest.raises(HostRead):
        check_label_range("y", torch.tensor([1, 2]), 10)


@pytest.mark.parametrize("architecture", ["deco", "baseline"])
def test_forward_reads_no_tensor_value(architecture: str) -> None:
    model = tiny_model(architecture)
    x, t, y = inputs()
    with torch.no_grad():
        expected = model(x, t, y)
        with no_host_reads():
            got = model(x, t, y)
            scalar_t = model(x, 0.25, y)  # a Python-number t is broadcast without a host read
            zero_d = model(x, torch.tensor(0.25), y)
    assert torch.equal(got, expected)
    assert torch.equal(scalar_t, zero_d)
    if architecture == "deco":
        with torch.no_grad(), no_host_reads():
            model.semantic(x, t, y)


@pytest.mark.parametrize("labels", [[0, 11], [-1, 0]])
def test_sample_checks_the_label_range_once(labels: list[int]) -> None:
    model = tiny_model("deco")
    with pytest.raises(ValueError, match=r"^labels: labels must lie in 0\.\.10"):
        sample(model, torch.zeros(2, 3, 8, 8), torch.tensor(labels), steps=2)


def test_sample_reads_labels_once_per_call() -> None:
    model = tiny_model("deco")
    calls = []
    original = torch.Tensor.tolist

    def counting(self: torch.Tensor) -> Any:
        calls.append(tuple(self.shape))
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "tolist", counting)
        sample(model, torch.zeros(2, 3, 8, 8), torch.tensor([1, 10]), steps=4, guidance=2.0)
    assert calls == [(2,)]  # the (min, max) pair, once for all four steps


@pytest.mark.parametrize("labels", [[0, 11], [-1, 0]])
def test_trainer_checks_the_label_range(labels: list[int]) -> None:
    trainer = Trainer(tiny_model("deco"))
    with pytest.raises(ValueError, match=r"^y: labels must lie in 0\.\.10"):
        trainer.step(torch.zeros(2, 3, 8, 8), torch.tensor(labels))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("architecture", ["deco", "baseline"])
def test_forward_is_captured_by_a_cuda_graph(architecture: str) -> None:
    """Capture one forward, replay it on new inputs copied into the static ones, and compare
    with an eager forward on those inputs; eager runs under torch's sync debug mode "error"."""
    model = tiny_model(architecture, "cuda")
    static = list(inputs(device="cuda"))
    with torch.no_grad(), full_float32_products():
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
            model(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(*static)
        labels = torch.tensor([10, 0], device="cuda")
        fresh = [torch.randn_like(static[0]), torch.rand_like(static[1]), labels]
        for dst, src in zip(static, fresh, strict=True):
            dst.copy_(src)
        graph.replay()
        torch.cuda.set_sync_debug_mode("error")
        try:
            expected = model(*fresh)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert rel_err(out.cpu().double().numpy(), expected.cpu().double().numpy()) <= 1e-6
