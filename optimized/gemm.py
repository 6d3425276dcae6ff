"""Linear layers whose float32 CPU matrix products run on oneDNN where that is faster.

An implementation choice, not a spec matter: the spec fixes the product and its float32
tolerance (spec/00-conventions.md §5), not the library that computes it.

Why: PyTorch's CPU wheels send float32 `F.linear` / `mm` to MKL's sgemm, and MKL does not pick
its AVX-512 kernels on non-Intel x86 processors (on the AMD EPYC, Zen 5, of bench/RESULTS.md,
MKL_VERBOSE names its generic "Intel(R) Architecture processors" path, while ONEDNN_VERBOSE shows
oneDNN running avx512_core kernels). Measured there on one core: ~100 GFLOP/s for MKL against
200-250 GFLOP/s for oneDNN, which PyTorch also ships, on the shapes of DeCo-S/16. The DiT's and
the decoder's matrix products are most of a training step, so this is the largest single
speed-up of the CPU path. On Intel CPUs MKL uses AVX-512 and is faster (below), so there the
default leaves the products to PyTorch.

The result is the same float32 product (oneDNN's default "strict" float math: float32 inputs,
float32 accumulation, no bfloat16/TF32 down-conversion); rounding differs from MKL's only in the
order of the float32 sums (~1e-7 relative). `tests/test_optimized_gemm.py` checks the forward
and both gradients against float64 products over many shapes.

oneDNN is used only where it is known to help and is safe: float32 tensors on an x86-64 CPU, no
autocast, not while tracing/compiling/exporting (the graph must keep plain `F.linear`, which
exporters and compilers understand). Everything else (float64, bfloat16, CUDA, ARM) takes
`F.linear`. `DECO_CPU_GEMM=aten` in the environment, `set_cpu_gemm("aten")`, or PyTorch's own
`torch.backends.mkldnn.flags(enabled=False)` turns it off; do that for second derivatives
(`create_graph=True`), which the oneDNN path does not provide.

The default is "auto" (`auto_backend`): MKL ("aten") on Intel processors, oneDNN elsewhere on
x86-64. On Intel MKL does use its AVX-512 kernels and is the faster of the two: on the Intel Xeon
(Sapphire Rapids, KVM guest) of bench/RESULTS.md §3, one thread, a (512, 384) x (384, 3072)
product takes 7.0 ms with MKL (173 GFLOP/s) against 7.9 ms with oneDNN, and the text model's DiT
trunk forward + backward 633 ms against 839 ms. The choice is by CPU vendor, not by a timing at
import: a timing on a shared machine is noisy and would make the backend, hence the float32
rounding, differ from run to run.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

_BACKENDS = ("onednn", "aten")
_CHOICES = ("auto", *_BACKENDS)  # what DECO_CPU_GEMM and set_cpu_gemm accept


def is_tracing() -> bool:
    """True under torch.compile, jit tracing or ONNX export: no data-dependent Python control
    flow then (value checks, shape-dependent loops), and only standard ops in the graph."""
    tracing = torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]
    return bool(torch.compiler.is_compiling() or tracing or torch.onnx.is_in_onnx_export())


def onednn_available() -> bool:
    """Whether this PyTorch build and CPU offer the oneDNN linear (x86-64 only, see above)."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...), "" when unknown: Linux's
    /proc/cpuinfo vendor_id, else `platform.processor()` (which names the vendor on Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return platform.processor()


def auto_backend() -> str:
    """The backend "auto" stands for: "aten" (MKL) on Intel CPUs, "onednn" on other x86-64 CPUs
    that have it, "aten" where oneDNN's linear is not available (module doc)."""
    if not onednn_available() or "intel" in cpu_vendor().lower():
        return "aten"
    return "onednn"


def _resolve(choice: str, name: str) -> str:
    """A checked entry of _CHOICES as a backend; `name` is what the error names."""
    if choice not in _CHOICES:
        raise ValueError(f"{name}: expected one of {_CHOICES}, got {choice!r}")
    return auto_backend() if choice == "auto" else choice


def _initial_backend() -> str:
    choice = _resolve(os.environ.get("DECO_CPU_GEMM", "auto"), "DECO_CPU_GEMM")
    return choice if onednn_available() else "aten"


_backend = _initial_backend()


def set_cpu_gemm(backend: str) -> str:
    """Choose the float32 CPU matrix-product backend ("onednn", "aten", or "auto": see
    `auto_backend`); returns the previous one. "onednn" on a machine without it raises (rather
    than silently measuring the other)."""
    global _backend
    backend = _resolve(backend, "backend")
    if backend == "onednn" and not onednn_available():
        raise RuntimeError("backend: oneDNN linear is not available in this PyTorch build or CPU")
    previous, _backend = _backend, backend
    return previous


@contextlib.contextmanager
def cpu_gemm_backend(backend: str) -> Iterator[None]:
    """`with cpu_gemm_backend("aten"): ...` runs the block with that backend ("auto" too), then
    restores the previous one."""
    previous = set_cpu_gemm(backend)
    try:
        yield
    finally:
        set_cpu_gemm(previous)


@contextlib.contextmanager
def full_float32_products() -> Iterator[None]:
    """Run a block with CUDA's TF32 matmul and cuDNN modes off (TF32 rounds float32 inputs to
    10 mantissa bits, far outside the float32 tolerance of spec/00 §5), then restore them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cpu_gemm() -> str:
    """The float32 CPU matrix-product backend in use: "onednn" or "aten"."""
    return _backend


def _uses_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (
        _backend == "onednn"
        and not is_tracing()  # first: the checks below would be recorded by a tracer
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.numel() > 0
        and weight.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and bool(torch.backends.mkldnn.enabled)  # a user who switched oneDNN off means it
    )


def _mm_t(a: Tensor, b: Tensor) -> Tensor:
    """a (M, K) @ b (N, K).T -> (M, N), both possibly strided, on oneDNN."""
    out: Tensor = torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return out


def _weight_grad(g: Tensor, x: Tensor) -> Tensor:
    """oneDNN dW = g^T x (out, in) for float32 g (rows, out), x (rows, in).

    The choices below were timed on the shapes of DeCo-S/16 (RESULTS.md's machine):
    - transposed operands go in as strided views: oneDNN reorders them itself, and an explicit
      copy first was slower;
    - a much wider than tall result (the decoder's condition projection, 384 -> 8192) is ~1.4x
      faster computed as (x^T g)^T, even counting the copy back to the (out, in) layout that
      the gradient must have;
    - when a side is <= 32 wide (the pixel decoder's products) `torch.mm` reads the transposes
      for free and was faster over a whole training step with two threads; with the narrower
      operand on the left: for the decoder's pixel embedding (3 -> 32) (x^T g)^T takes 75 us a
      chunk against 420 us for g^T x (8192 rows, one thread, bench/RESULTS.md §9)."""
    rows, n_out, n_in = g.shape[0], g.shape[1], x.shape[1]
    if min(n_out, n_in) <= 32:
        return torch.mm(x.t(), g).t().contiguous() if n_in < n_out else torch.mm(g.t(), x)
    if n_out >= 4 * n_in and rows >= n_in:
        return _mm_t(x.t(), g.t()).t().contiguous()
    return _mm_t(g.t(), x.t())


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with all three products (forward, dx, dW) on oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """x (rows, in), weight (out, in), bias (out,) or None -> (rows, out)."""
        out: Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        # An alias of the weight, as F.linear saves a view: a hook that swaps the parameter's
        # data after the forward (diffusers' layerwise casting stores it back in float8) must
        # not change the matrix the backward multiplies by.
        ctx.save_for_backward(x, weight.detach())
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors  # (rows, in), (out, in); grad (rows, out)
        needs_x, needs_w, needs_b = ctx.needs_input_grad
        gx = _mm_t(grad, weight.t()) if needs_x else None  # (rows, in)
        gw = _weight_grad(grad, x) if needs_w else None  # (out, in)
        gb = grad.sum(0) if needs_b else None  # (out,)
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`; on float32 x86-64 CPUs computed by oneDNN (module doc)."""
    if _uses_onednn(x, weight, bias):
        # Reshapes stay outside the Function, so autograd sees ordinary views (in-place ops
        # on the result remain legal).
        out: Tensor = _OneDNNLinear.apply(  # type: ignore[no-untyped-call]
            x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, init and state_dict) computing through `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
