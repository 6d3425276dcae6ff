"""`deco.optimized.gemm`: float32 CPU linear layers on oneDNN, against float64 NumPy products.

The oracle is NumPy in float64 (x W^T + b and its three gradients g W, g^T x, sum g), never the
other backend. Products are measured by `product_err` (error over the magnitude of the summed
terms, the quantity float32 rounding is proportional to) against PRODUCT_RTOL = 2e-6: measured
float32 errors stay <= 2.7e-7 over 1500 random shapes, while the same products with TF32- or
bfloat16-rounded operands score >= 1.8e-5, so the bound tells a float32 product from a
reduced-precision one. The whole-model test uses the spec's float32 bound (1e-5 relative,
spec/00-conventions.md §5). Every float32 case also asserts that the oneDNN Function really ran,
so the test cannot pass on the fallback by accident.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_weights, rel_err, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from deco import reference as R
from deco.optimized import DeCo, cpu_gemm, cpu_gemm_backend, gemm, onednn_available, set_cpu_gemm

pytestmark = pytest.mark.skipif(not onednn_available(),
                                reason="oneDNN linear is not available on this CPU / build")
RTOL = 1e-5
PRODUCT_RTOL = 2e-6


def used_onednn(out: torch.Tensor) -> bool:
    """Whether the autograd graph of `out` goes through the oneDNN Function."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "_OneDNNLinearBackward":
            return True
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


def product_err(got: np.ndarray, expected: np.ndarray, magnitude: np.ndarray) -> float:
    """max |got - expected| / max(magnitude), magnitude the sum of |terms| of each entry.

    The float32 error of a sum of products is bounded by the sum of the terms' magnitudes
    (|a| |b|), not by the result: a random sum that cancels (say g^T x over 196 rows with one
    input and one output) can be 1000x smaller than its terms, and measured against itself its
    correct float32 rounding looks like 1e-5."""
    return float(np.max(np.abs(got - expected), initial=0.0) / max(np.max(magnitude, initial=0.0), 1e-300))


def check_linear(x64: np.ndarray, w64: np.ndarray, b64: np.ndarray | None, g64: np.ndarray,
                 x: torch.Tensor, grads: tuple[bool, bool, bool]) -> None:
    """Run gemm.linear on float32 tensors (x given, possibly strided) and compare with NumPy."""
    w = torch.tensor(w64, dtype=torch.float32, requires_grad=grads[1])
    b = None if b64 is None else torch.tensor(b64, dtype=torch.float32, requires_grad=grads[2])
    x.requires_grad_(grads[0])
    out = gemm.linear(x, w, b)
    expected = x64 @ w64.T + (0.0 if b64 is None else b64)
    magnitude = np.abs(x64) @ np.abs(w64.T) + (0.0 if b64 is None else np.abs(b64))
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert product_err(out.detach().numpy(), expected, magnitude) <= PRODUCT_RTOL
    if not any(grads[: 2 if b is None else 3]):
        return
    assert used_onednn(out)
    out.backward(torch.tensor(g64, dtype=torch.float32))
    x2, g2 = x64.reshape(-1, x64.shape[-1]), g64.reshape(-1, g64.shape[-1])
    if grads[0]:
        assert x.grad is not None
        assert product_err(x.grad.numpy(), g64 @ w64, np.abs(g64) @ np.abs(w64)) <= PRODUCT_RTOL
    if grads[1]:
        assert w.grad is not None
        assert product_err(w.grad.numpy(), g2.T @ x2, np.abs(g2.T) @ np.abs(x2)) <= PRODUCT_RTOL
    if b is not None and grads[2]:
        assert b.grad is not None
        assert product_err(b.grad.numpy(), g2.sum(0), np.abs(g2).sum(0)) <= PRODUCT_RTOL


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 300), n_in=st.integers(1, 70), n_out=st.integers(1, 70),
       bias=st.booleans(), layout=st.sampled_from(["contiguous", "transposed", "3d"]),
       grads=st.tuples(st.booleans(), st.booleans(), st.booleans()), seed=st.integers(0, 2**16))
def test_linear_matches_float64(rows: int, n_in: int, n_out: int, bias: bool, layout: str,
                                grads: tuple[bool, bool, bool], seed: int) -> None:
    rng = np.random.default_rng(seed)
    w64 = rng.standard_normal((n_out, n_in))
    b64 = rng.standard_normal(n_out) if bias else None
    if layout == "3d":
        x64, g64 = rng.standard_normal((2, rows, n_in)), rng.standard_normal((2, rows, n_out))
        x = torch.tensor(x64, dtype=torch.float32)
    else:
        x64, g64 = rng.standard_normal((rows, n_in)), rng.standard_normal((rows, n_out))
        x = torch.tensor(x64, dtype=torch.float32)
        if layout == "transposed":  # same values, column-major storage
            x = torch.tensor(x64.T, dtype=torch.float32).t()
    with cpu_gemm_backend("onednn"):
        check_linear(x64, w64, b64, g64, x, grads)


@pytest.mark.parametrize(("rows", "n_in", "n_out"), [
    (1024, 384, 1152), (1024, 1024, 384), (1024, 384, 8192), (8192, 32, 96), (8192, 96, 32),
    (4, 384, 2304),
])
def test_linear_model_shapes(rows: int, n_in: int, n_out: int) -> None:
    """The shapes of DeCo-S/16 at 256x256 (both branches of the dW layout choice)."""
    rng = np.random.default_rng(rows + n_in + n_out)
    x64, g64 = rng.standard_normal((rows, n_in)), rng.standard_normal((rows, n_out))
    w64, b64 = rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), rng.standard_normal(n_out)
    with cpu_gemm_backend("onednn"):
        check_linear(x64, w64, b64, g64, torch.tensor(x64, dtype=torch.float32), (True, True, True))


def test_inplace_on_result_and_empty_shapes() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    with cpu_gemm_backend("onednn"):
        out = gemm.linear(x, w).add_(1.0)  # the decoder adds its per-pixel bias in place
        out.sum().backward()
        assert x.grad is not None and torch.allclose(x.grad, w.sum(0).expand(5, 3), rtol=1e-6)
        empty = gemm.linear(torch.zeros(0, 3), w)
        no_outputs = gemm.linear(x, torch.zeros(0, 3))
    assert empty.shape == (0, 4) and no_outputs.shape == (5, 0)


@pytest.mark.parametrize("case", ["float64", "bf16-autocast", "aten", "mkldnn-disabled", "jit-trace"])
def test_fallback_to_f_linear(case: str) -> None:
    """Only plain float32 CPU eager work goes to oneDNN; the rest is F.linear."""
    dtype = torch.float64 if case == "float64" else torch.float32
    x = torch.randn(6, 4, dtype=dtype, requires_grad=True)
    layer = gemm.Linear(4, 3).to(dtype)
    if case == "bf16-autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
    elif case == "aten":
        with cpu_gemm_backend("aten"):
            out = layer(x)
    elif case == "mkldnn-disabled":
        with torch.backends.mkldnn.flags(enabled=False):
            out = layer(x)
    elif case == "jit-trace":
        traced: Any = torch.jit.trace(layer, x.detach())  # type: ignore[no-untyped-call]
        assert "aten::linear" in str(traced.graph)
        with cpu_gemm_backend("onednn"):
            out = layer(x)
        assert used_onednn(out)  # eager use after tracing is unaffected
        return
    else:
        out = layer(x)
    assert not used_onednn(out)


def test_backend_selection_errors() -> None:
    with pytest.raises(ValueError, match="backend: expected one of"):
        set_cpu_gemm("mkl")
    before = cpu_gemm()
    with pytest.raises(RuntimeError, match="boom"), cpu_gemm_backend("aten"):
        assert cpu_gemm() == "aten"
        raise RuntimeError("boom")
    assert cpu_gemm() == before


@pytest.mark.parametrize(("value", "ok"), [("aten", True), ("onednn", True), ("auto", True), (None, True),
                                         ("mkl", False)])
def test_environment_variable(value: str | None, ok: bool) -> None:
    """DECO_CPU_GEMM picks the backend at import; "auto" (also when unset) resolves by vendor."""
    code = "import deco.optimized as o; print(o.cpu_gemm())"
    env = {k: v for k, v in os.environ.items() if k != "DECO_CPU_GEMM"}
    if value is not None:
        env["DECO_CPU_GEMM"] = value
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if ok:
        expected = gemm.auto_backend() if value in ("auto", None) else value
        assert done.returncode == 0 and done.stdout.strip() == expected
    else:
        assert done.returncode != 0 and "DECO_CPU_GEMM: expected one of" in done.stderr


@pytest.mark.parametrize(("vendor", "expected"), [
    ("GenuineIntel", "aten"), ("AuthenticAMD", "onednn"), ("HygonGenuine", "onednn"), ("", "onednn"),
])
def test_auto_backend_by_vendor(monkeypatch: pytest.MonkeyPatch, vendor: str, expected: str) -> None:
    """"auto" is MKL on Intel CPUs (where it is the faster GEMM, bench/RESULTS.md §3) and oneDNN
    on the other x86-64 CPUs; set_cpu_gemm("auto") resolves to that name."""
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: vendor)
    assert gemm.auto_backend() == expected
    with cpu_gemm_backend("auto"):
        assert cpu_gemm() == expected
    monkeypatch.setattr(gemm, "onednn_available", lambda: False)
    assert gemm.auto_backend() == "aten"


def test_cpu_vendor_reads_cpuinfo() -> None:
    """On Linux the vendor is /proc/cpuinfo's vendor_id (independently parsed here)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            ids = [line.split(":", 1)[1].strip() for line in info if line.startswith("vendor_id")]
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if not ids:
        pytest.skip("/proc/cpuinfo names no vendor_id")
    assert gemm.cpu_vendor() == ids[0]


@pytest.mark.parametrize("backend", ["onednn", "aten"])
def test_deco_float32_gradients_against_reference(backend: str) -> None:
    """A whole DeCo forward + backward in float32 on each backend, against the float64
    reference: the forward against the reference, the parameter gradients against the float64
    model (float64 never takes the oneDNN path; its gradients are checked against finite
    differences of the reference in test_optimized_model.py)."""
    config = tiny_config("deco")
    weights = random_weights(config, seed=3)
    rng = np.random.default_rng(0)
    x, t, y = rng.standard_normal((2, 3, 8, 12)), rng.uniform(0, 1, 2), np.array([1, 0])
    expected = R.Model(config, weights).forward(x, t, y)

    def run(dtype: torch.dtype) -> tuple[np.ndarray, dict[str, np.ndarray], bool]:
        model = DeCo(config).to(dtype)
        model.load_state_dict({k: torch.as_tensor(v, dtype=dtype) for k, v in weights.items()})
        out = model(torch.as_tensor(x, dtype=dtype), torch.as_tensor(t, dtype=dtype), torch.as_tensor(y))
        onednn = used_onednn(out)
        (out.double() ** 2).sum().backward()
        grads = {k: p.grad.double().numpy() for k, p in model.named_parameters() if p.grad is not None}
        return out.detach().double().numpy(), grads, onednn

    with cpu_gemm_backend(backend):
        out32, grads32, onednn32 = run(torch.float32)
    _, grads64, onednn64 = run(torch.float64)
    assert onednn32 == (backend == "onednn") and not onednn64  # the backend under test really ran
    assert rel_err(out32, expected) <= RTOL
    assert grads32.keys() == grads64.keys()
    worst = max(rel_err(grads32[k], grads64[k]) for k in grads64)
    assert worst <= RTOL, worst


def test_full_float32_products_turns_tf32_off_and_restores_it() -> None:
    from deco.optimized.gemm import full_float32_products

    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = True
        with full_float32_products():
            assert [f.allow_tf32 for f in flags] == [False, False]
        assert [f.allow_tf32 for f in flags] == [True, True]
        with pytest.raises(RuntimeError), full_float32_products():
            raise RuntimeError("inside")
        assert [f.allow_tf32 for f in flags] == [True, True]
    finally:
        for f, value in zip(flags, saved, strict=True):
            f.allow_tf32 = value
