"""The generator section of bench/gpu_check.py: the DeCo-XL/16 generator graph (spec/04 §7: the
whole sampler in one ONNX graph, `deco.deploy.generator.export_generator`) in onnxruntime's CUDA
and TensorRT execution providers, against torch's `deco.optimized.sample` on the same noise.

Rows (keys `generator/<row>`), in this order:
- export: the generator graph of a random DeCo-XL/16 (Euler, 100 steps, guidance 3.2 on
  (0.1, 1], the paper's class setting; weights in external data), then the torch reference:
  `deco.optimized.sample` in float32 with TF32 off on the check's device at batch 1, whose time
  per image is the row's median_s. Every other row needs this one; it is skipped (saving minutes
  of a lease) when onnxruntime has neither GPU provider, e.g. the plain CPU `onnxruntime` wheel.
- cuda: CUDAExecutionProvider (TF32 off): time per image at batch 1 and at batch 8, first_s (the
  session's creation and first run), agreement with torch <= 1e-4 (relative to max|torch|).
- tensorrt: TensorrtExecutionProvider (CUDA and CPU behind it for the nodes it declines), float32
  engine built with NVIDIA_TF32_OVERRIDE=0, batch 1 only (a new batch builds another engine),
  same 1e-4 bound; engines cached in OUT/trt-engines/tensorrt, so a second run's first_s is a
  cache load (`cached_engines_before` says which it was).
- tensorrt-fp16: the same with trt_fp16_enable, bound `FP16_BOUND`.

A row whose provider onnxruntime does not list, or that onnxruntime silently replaced by another
at session creation (a missing TensorRT library does that), is skipped with the reason. In the
dry run CPUExecutionProvider stands in for each provider (tiny model, same code path); the
options the real provider would get are recorded all the same.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROWS = ("export", "cuda", "tensorrt", "tensorrt-fp16")
#: The paper's class-to-image sampler (deco.config.RELEASE_SAMPLING["c2i"]); steps come from the plan.
GUIDANCE, INTERVAL, SOLVER = 3.2, (0.1, 1.0), "euler"
#: float32 agreement of a graph with torch, as `deco onnx-check` and the export's own check ask.
FP32_BOUND = 1e-4
#: TensorRT fp16 vs torch float32, relative to max|torch| of the clamped sample: the project's
#: float16 bound (deco.deploy.export.RTOL_BY_DTYPE["float16"]), which the export's own check holds a
#: float16-weight generator graph to. Calibration on the CPU (bench/generator_fp16.py, bench/RESULTS.md
#: §8): that graph, with every operation in float16, is within 2.0e-4 of torch on DeCo-XL/16 at 32x32
#: (Euler 100 steps, guidance 3.2 on (0.1, 1], random weights); TensorRT fp16 keeps float32 where
#: its kernels need it, so should be no worse. The 50x margin is for trained weights (larger
#: activations) and 256x256; recalibrate from the first GPU run's `rel_err_vs_torch`.
FP16_BOUND = 1e-2
PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
             "tensorrt-fp16": "TensorrtExecutionProvider"}
#: Batches timed per row (the first is also the agreement check's); TensorRT builds one engine
#: per input shape, so its rows stay at batch 1.
BATCHES = {"cuda": (1, 8), "tensorrt": (1,), "tensorrt-fp16": (1,)}


@dataclass
class Shared:
    """What the export row leaves for the provider rows."""

    path: Path | None = None
    feeds: dict[int, dict[str, Any]] = field(default_factory=dict)
    expected: Any = None  # torch's sample at batch 1, float64 NumPy


def settings(steps: int) -> Any:
    from deco.optimized.sampling import SampleSettings

    return SampleSettings(steps=steps, guidance=GUIDANCE, interval=INTERVAL, solver=SOLVER)


def feed(num_classes: int, batch: int, resolution: int, seed: int = 0) -> dict[str, Any]:
    """Generator inputs: standard normal noise, real class labels (none the null class), the
    paper's guidance scale."""
    import numpy as np

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, 3, resolution, resolution)).astype(np.float32)
    labels = (207 + 389 * np.arange(batch, dtype=np.int64)) % num_classes
    return {"noise": noise, "labels": labels, "guidance": np.asarray(GUIDANCE, dtype=np.float32)}


def repeat(fn: Callable[[], Any], warmup: int, rounds: int, sync: Callable[[], None]) -> dict[str, Any]:
    """`warmup` untimed calls, then `rounds` timed ones (synchronised): median and min seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "rounds": rounds}


# ------------------------------------------------------------------------------ providers
def provider_chain(row: str, cache: Path) -> list[tuple[str, dict[str, str]]]:
    """The (provider, options) list of a row's session, first choice first. TensorRT's boolean
    options are the strings "True"/"False" (onnxruntime's Python binding rejects others)."""
    cuda = ("CUDAExecutionProvider", {"use_tf32": "0"})  # TF32 would miss the float32 bound
    if row == "cuda":
        return [cuda, ("CPUExecutionProvider", {})]
    trt = {"trt_fp16_enable": "True" if row == "tensorrt-fp16" else "False",
           "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
           "trt_max_workspace_size": str(8 << 30)}
    return [("TensorrtExecutionProvider", trt), cuda, ("CPUExecutionProvider", {})]


def session_chain(row: str, available: list[str], dry_run: bool,
                  cache: Path) -> list[tuple[str, dict[str, str]]] | str:
    """The chain to run `row` with, or the reason to skip it. The dry run puts the CPU provider
    in the real provider's place whatever is installed."""
    if dry_run:
        return [("CPUExecutionProvider", {})]
    wanted = PROVIDERS[row]
    if wanted not in available:
        return (f"{wanted} is not available in this onnxruntime (providers: {', '.join(available)}; "
                f"{'onnxruntime-gpu' if row == 'cuda' else 'onnxruntime-gpu with TensorRT libraries'} "
                "provides it)")
    return provider_chain(row, cache)


@contextlib.contextmanager
def no_tf32(active: bool) -> Iterator[None]:
    """NVIDIA_TF32_OVERRIDE=0 for the block (TensorRT builds float32 engines with TF32 unless
    it is set at build time; onnxruntime has no option for it), restored afterwards."""
    saved = os.environ.get("NVIDIA_TF32_OVERRIDE")
    if active:
        os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    try:
        yield
    finally:
        if active:
            if saved is None:
                os.environ.pop("NVIDIA_TF32_OVERRIDE", None)
            else:
                os.environ["NVIDIA_TF32_OVERRIDE"] = saved


def engine_files(cache: Path) -> int:
    return sum(1 for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else 0


# ------------------------------------------------------------------------------ rows
def missing_gpu_providers(available: list[str]) -> str:
    """The reason to skip the export when no row could use it (CPU-only onnxruntime, as on a
    machine with the plain `onnxruntime` wheel), else ""; it would cost minutes of a lease."""
    if set(PROVIDERS.values()) & set(available):
        return ""
    return (f"no GPU execution provider in this onnxruntime (providers: {', '.join(available)}): every "
            "row would skip; install onnxruntime-gpu (and TensorRT for its rows)")


def export_row(report: Any, plan: Any, device: Any, shared: Shared, scratch: Path, dry_run: bool) -> None:
    """Export the generator graph and run the torch reference (see the module docstring)."""
    import numpy as np
    import torch
    from common import our_model

    from deco.config import DeCoConfig
    from deco.deploy.export import data_file
    from deco.deploy.generator import export_generator
    from deco.optimized.gemm import full_float32_products
    from deco.optimized.sampling import sample

    try:
        import onnxruntime as ort
    except ImportError:
        report.add("generator", "export", "skip", "onnxruntime is not installed")
        return
    reason = "" if dry_run else missing_gpu_providers(ort.get_available_providers())
    if reason:
        report.add("generator", "export", "skip", reason)
        return
    config = DeCoConfig.preset(plan.preset)
    model = our_model(config).eval()
    sampler = settings(plan.steps)
    path = scratch / "generator.onnx"
    start = time.perf_counter()
    # External data forced on the CPU (the tiny model would fit in the graph) so the dry run
    # covers the XL path; None lets the exporter choose, which is external data for XL.
    # The straight-line decoder: the chunked one is a lever for CPU caches (bench/RESULTS.md §6);
    # on a GPU its Scan would only cut the decoder into small kernels.
    export_generator(model, path, sampler, external_data=True if device.type == "cpu" else None,
                     decoder_chunk_rows=None)
    metrics: dict[str, Any] = {
        "export_s": round(time.perf_counter() - start, 1), "preset": plan.preset,
        "resolution": plan.resolution, "batch": 1, **sampler.to_dict(),
        "external_data": data_file(path).is_file(),
        "data_gb": round(data_file(path).stat().st_size / 1e9, 2) if data_file(path).is_file() else 0.0,
        "reference": "deco.optimized.sample float32, TF32 off"}
    shared.feeds = {b: feed(config.num_classes, b, plan.resolution, seed=b) for b in (1, 8)}
    one = shared.feeds[1]
    model = model.to(device)
    noise = torch.from_numpy(one["noise"]).to(device)
    labels = torch.from_numpy(one["labels"]).to(device)

    def reference() -> Any:
        return sample(model, noise, labels, **sampler.options()).clamp(-1.0, 1.0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad(), full_float32_products():
        out = reference()
        metrics.update(repeat(reference, plan.warmup, plan.rounds, sync))
    shared.expected = out.double().cpu().numpy()
    shared.path = path
    finite = bool(np.isfinite(shared.expected).all())
    report.add("generator", "export", "ok" if finite else "fail",
               "median_s: torch's time per image" if finite else "torch's sample is not finite", **metrics)


def provider_row(report: Any, plan: Any, shared: Shared, row: str, dry_run: bool) -> None:
    """One execution provider on the exported generator (see the module docstring)."""
    from deco.deploy.export import relative_error

    if shared.path is None or shared.expected is None:
        report.add("generator", row, "skip", "needs generator/export, which was skipped or failed")
        return
    try:
        import onnxruntime as ort
    except ImportError:
        report.add("generator", row, "skip", "onnxruntime is not installed")
        return
    cache = report.out / "trt-engines" / row
    chain = session_chain(row, ort.get_available_providers(), dry_run, cache)
    if isinstance(chain, str):
        report.add("generator", row, "skip", chain)
        return
    metrics: dict[str, Any] = {"provider": PROVIDERS[row], "preset": plan.preset,
                               "resolution": plan.resolution, "steps": plan.steps,
                               "provider_options": dict(provider_chain(row, cache)[0][1])}
    if row.startswith("tensorrt"):
        cache.mkdir(parents=True, exist_ok=True)
        metrics["cached_engines_before"] = engine_files(cache)
    options = ort.SessionOptions()
    # Warnings on a GPU (why a provider was replaced, which nodes TensorRT declined); errors only
    # on the CPU stand-in.
    options.log_severity_level = 3 if dry_run else 2
    start = time.perf_counter()
    with no_tf32(row == "tensorrt" and not dry_run):
        session = ort.InferenceSession(str(shared.path), sess_options=options,
                                       providers=[p for p, _ in chain],
                                       provider_options=[o for _, o in chain])
        metrics["session_s"] = round(time.perf_counter() - start, 2)
        ran = session.get_providers()
        if ran[0] != chain[0][0]:  # e.g. TensorRT listed but its libraries missing: CUDA took over
            report.add("generator", row, "skip", f"onnxruntime replaced {chain[0][0]} by {ran[0]} "
                       "at session creation (see its log for the missing library)", **metrics)
            return
        first = session.run(["sample"], shared.feeds[1])[0]
    metrics["first_s"] = round(time.perf_counter() - start, 2)
    metrics.update(_times(session, shared, row, plan))
    if row.startswith("tensorrt"):
        metrics["cached_engines_after"] = engine_files(cache)
    err = relative_error(first, shared.expected)
    bound = FP16_BOUND if row == "tensorrt-fp16" else FP32_BOUND
    metrics.update(rel_err_vs_torch=err, bound=bound)
    note = f"CPUExecutionProvider standing in for {PROVIDERS[row]} (dry run)" if dry_run else ""
    report.add("generator", row, "ok" if err <= bound else "fail", note, **metrics)


def _times(session: Any, shared: Shared, row: str, plan: Any) -> dict[str, Any]:
    """median_s/min_s at batch 1 (plan's warmup and rounds), and for a larger batch one warm-up
    call and `plan.rounds // 2` timed ones (at least 1): seconds per image."""
    out = repeat(lambda: session.run(["sample"], shared.feeds[1]), plan.warmup, plan.rounds, lambda: None)
    for batch in BATCHES[row][1:]:
        timed = repeat(partial(session.run, ["sample"], shared.feeds[batch]), 1, max(1, plan.rounds // 2),
                       lambda: None)
        out[f"batch{batch}_median_s_per_image"] = timed["median_s"] / batch
    return out


def steps(report: Any, plan: Any, device: Any, scratch: Path,
          dry_run: bool) -> list[tuple[str, Callable[[], None]]]:
    """(key, run) of every row, for gpu_check.sections."""
    shared = Shared()

    def row_step(row: str) -> tuple[str, Callable[[], None]]:
        return f"generator/{row}", lambda: provider_row(report, plan, shared, row, dry_run)

    return [("generator/export", lambda: export_row(report, plan, device, shared, scratch, dry_run)),
            *(row_step(r) for r in ROWS[1:])]
