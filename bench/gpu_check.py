"""One command for a short GPU lease: every CUDA check and the paper's GPU numbers in one run.

    python bench/gpu_check.py --out DIR            # on a CUDA machine (~7 minutes on an H100/H200)
    python bench/gpu_check.py --out DIR --only generator --budget-s 540   # section 6 alone
    python bench/gpu_check.py --out DIR --dry-run  # the same code paths on the CPU, tiny sizes
    nox -s gpu -- --out DIR                        # the same, through nox (no install step)

Needs only this checkout and a Python whose torch has CUDA: when `deco` is not installed, the
script maps the checkout's folders onto the package (`core/` -> deco, `reference/`, `optimized/`,
`spec/vectors/`) in a temporary folder of symbolic links and puts that on the import path (also
for the pytest it starts), so nothing is installed or downloaded.

Sections, in this order (one is skipped, with the reason recorded, when its estimated time would
take the run past `--budget-s`; the cheap, decisive ones come first):
1. environment: card, driver, versions, command;
2. cuda-tests: `pytest -m cuda tests` (optimized vs reference on CUDA: float32 with TF32 off,
   bfloat16 within a calibrated bound, CUDA-graph capture of a forward);
3. sampling: DeCo-XL/16, 256x256, batch 1, 100 Euler steps with CFG (3.0 on (0.1, 1]), bfloat16
   weights: eager and CUDA graphs here, torch.compile and torch.compile "reduce-overhead" after
   the training (target <= 0.25 s on an H100; the paper's 1.05 s was an A800); the variants of
   bench/test_bench_cuda.py; first_s is the first run, compilation or capture included;
4. training: one XL/16 iteration at batch 32, 256x256, bfloat16 autocast: our `Trainer.step`,
   and our model and the release's `PixNerDiT` (identical weights, checked to agree first) under
   the same loss and AdamW (bench/common.py); the release needs $DECO_RELEASE_SRC and is skipped
   with a message without it (it is not on a GPU machine unless carried there);
5. onnxruntime: the XL graph (external data) on onnxruntime-gpu's CUDA provider, float32 (vs torch
   <= 1e-4) and float16 (<= 1e-2), when that provider is installed;
6. generator: the XL generator graph (the whole 100-step guided Euler sampler in one ONNX graph)
   on onnxruntime's CUDA and TensorRT (float32, fp16) providers vs torch's sample on the same
   noise: time per image, first run (session and engine build), agreement (bench/gpu_generator.py;
   TensorRT engines are cached in DIR/trt-engines). With the default budget it is mostly skipped
   after sections 1-5: run it alone with `--only generator`.

Writes DIR/gpu_check.json (every number, the card, versions and command) and DIR/gpu_check.md
(the same as a table) after every section, so a run cut short still leaves its results; the
pytest output goes to DIR/pytest_cuda.log. Exit status 0 when nothing failed, 1 otherwise, 2 for
a usage error (e.g. no CUDA device without --dry-run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
#: The checkout's folder of each sub-package (as pyproject.toml's package-dir maps them).
PACKAGE_DIRS = {"reference": "reference", "optimized": "optimized", "vectors": "spec/vectors"}


# ---------------------------------------------------------------------------------- setup
def ensure_deco() -> str | None:
    """Make `import deco` work; returns the folder put on the path (None: already installed).

    The checkout has no `deco` folder (core/ becomes deco at install time), so a temporary
    folder gets deco/ holding links to core/'s files and to the sub-package folders."""
    try:
        import deco  # noqa: F401
        return None
    except ImportError:
        pass
    root = Path(tempfile.mkdtemp(prefix="deco-gpu-check-"))
    package = root / "deco"
    package.mkdir()
    for entry in (REPO / "core").iterdir():
        (package / entry.name).symlink_to(entry)
    for name, folder in PACKAGE_DIRS.items():
        (package / name).symlink_to(REPO / folder)
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return str(root)


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the paper's (full) or tiny ones (dry run, CPU)."""

    preset: str
    resolution: int
    steps: int
    train_batch: int
    rounds: int
    warmup: int
    test_targets: tuple[str, ...]
    #: Rough seconds per section on an H100/H200, for the time budget (0: never skip).
    estimates: dict[str, float] = field(default_factory=dict)


#: The estimates are guesses (no CUDA run of this project had happened when they were written):
#: compile times dominate; a run records its real times, so adjust them from its JSON.
FULL = Plan("DeCo-XL/16", 256, 100, 32, rounds=5, warmup=2, test_targets=("tests",), estimates={
    "cuda-tests": 90, "sampling/eager": 20, "sampling/cuda-graphs": 25, "training/ours-trainer": 30,
    "training/ours": 30, "training/release": 40, "sampling/compile": 120,
    "sampling/compile-reduce-overhead": 90, "onnxruntime/float32": 100, "onnxruntime/float16": 90,
    # export ~120 s on 16 CPU cores, torch reference ~1.5 s per image; a TensorRT engine build of
    # the XL loop may take minutes
    "generator/export": 150, "generator/cuda": 60, "generator/tensorrt": 240,
    "generator/tensorrt-fp16": 240})
DRY = Plan("DeCo-tiny/4", 16, 3, 2, rounds=2, warmup=1,
           test_targets=("tests/test_cuda_device.py", "tests/test_sync_free.py"))
#: The paper's reference number and the brief's target for the sampling run.
PAPER_A800_S, TARGET_H100_S = 1.05, 0.25


@dataclass
class Report:
    """Results so far; written out as JSON and markdown after every section."""

    out: Path
    plan: Plan
    budget_s: float
    environment: dict[str, Any] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, key: str) -> bool:
        return self.elapsed() + self.plan.estimates.get(key, 0.0) <= self.budget_s

    def add(self, section: str, name: str, status: str, note: str = "", **metrics: Any) -> None:
        self.results.append({"section": section, "name": name, "status": status, "note": note,
                             "elapsed_at_end_s": round(self.elapsed(), 2), **metrics})
        print(f"[{self.elapsed():6.1f}s] {section}/{name}: {status} {note} "
              f"{json.dumps(metrics, default=str)}", flush=True)
        self.write()

    def write(self) -> None:
        from deco.atomic import atomic_write

        data = {"environment": self.environment, "budget_s": self.budget_s,
                "elapsed_s": round(self.elapsed(), 2), "results": self.results}
        text = json.dumps(data, indent=1, default=str) + "\n"
        atomic_write(self.out / "gpu_check.json", lambda p: Path(p).write_text(text))
        markdown = markdown_report(data)
        atomic_write(self.out / "gpu_check.md", lambda p: Path(p).write_text(markdown))


def markdown_report(data: dict[str, Any]) -> str:
    """The environment as a list and the results as one table."""
    env = data["environment"]
    lines = ["# GPU check", ""]
    lines += [f"- {key}: `{value}`" for key, value in env.items()]
    lines += ["", f"Elapsed {data['elapsed_s']} s of a {data['budget_s']} s budget.", "",
              "| section | name | status | median s | min s | details |",
              "| --- | --- | --- | --- | --- | --- |"]
    skip = {"section", "name", "status", "note", "median_s", "min_s", "elapsed_at_end_s"}
    for r in data["results"]:
        details = ", ".join(f"{k}={_short(v)}" for k, v in r.items() if k not in skip)
        if r["note"]:
            details = f"{r['note']}; {details}" if details else r["note"]
        lines.append(f"| {r['section']} | {r['name']} | {r['status']} | {_short(r.get('median_s', ''))} | "
                     f"{_short(r.get('min_s', ''))} | {details.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------- helpers
def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: Any, plan: Plan) -> tuple[Any, dict[str, float]]:
    """Run `fn` once (first_s: compile/capture included), `plan.warmup` more times, then
    `plan.rounds` timed rounds; the device is synchronised around each."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(plan.warmup):
        fn()
    times = []
    for _ in range(plan.rounds):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return out, {"median_s": times[len(times) // 2], "min_s": times[0], "first_s": first,
                 "rounds": len(times)}


@contextlib.contextmanager
def peak_memory(device: Any, metrics: dict[str, Any]) -> Iterator[None]:
    """Record the peak CUDA memory of the block as metrics["peak_gib"] (CUDA only)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    yield
    if device.type == "cuda":
        metrics["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def release_free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_diff(got: Any, expected: Any) -> float:
    """max |got - expected| / max |expected|, in float64."""
    got, expected = got.double(), expected.double()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------ sections
def environment(report: Report, device: Any, dry_run: bool, shadow: str | None) -> None:
    import torch

    env: dict[str, Any] = {
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]), "dry_run": dry_run,
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
        "deco_from": "installed package" if shadow is None else f"checkout, linked at {shadow}",
        "git_commit": _git_commit(), "release_src": os.environ.get("DECO_RELEASE_SRC") or "not set",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                   driver=_nvidia_smi("driver_version"))
    for module in ("onnx", "onnxruntime", "numpy", "scipy"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = "not installed"
    with contextlib.suppress(ImportError):
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    report.environment = env
    report.write()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown (no git metadata)"


def _nvidia_smi(field_name: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


def cuda_tests(report: Report, plan: Plan) -> None:
    """`pytest -m cuda` in a subprocess; its output goes to pytest_cuda.log."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
           *plan.test_targets]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=os.environ.copy())
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    (report.out / "pytest_cuda.log").write_text(log)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                               log.strip().splitlines()[-1] if log.strip() else "")}
    ok = proc.returncode == 0 and not counts.get("failed") and not counts.get("error") \
        and not counts.get("errors")
    note = "" if ok else f"pytest exit status {proc.returncode}: see pytest_cuda.log"
    report.add("cuda-tests", "pytest", "ok" if ok else "fail", note, seconds=round(seconds, 1),
               command=" ".join(cmd[1:]), **counts)


def sampling_runner(variant: str, model: Any, device: Any) -> tuple[Any, str]:
    """The model wrapped as bench/test_bench_cuda.py's variant; on the CPU (dry run) torch.compile
    uses its "eager" backend (dynamo without code generation: seconds, not minutes)."""
    import torch
    from test_bench_cuda import VARIANTS

    if device.type == "cpu" and variant.startswith("compile"):
        runner: Any = torch.compile(model, backend="eager")
        runner.config = model.config
        return runner, "torch.compile backend=eager (CPU dry run)"
    return VARIANTS[variant](model), ""


def sampling(report: Report, plan: Plan, device: Any, variant: str,
             eager_out: dict[str, Any]) -> None:
    import torch
    from common import our_model

    from deco.config import DeCoConfig
    from deco.optimized.sampling import sample

    if variant == "cuda-graphs" and device.type != "cuda":
        report.add("sampling", variant, "skip", "needs CUDA (dry run on the CPU)")
        return
    config = DeCoConfig.preset(plan.preset)
    model = our_model(config).to(device, torch.bfloat16).eval()
    runner, note = sampling_runner(variant, model, device)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 3, plan.resolution, plan.resolution, generator=g).to(device, torch.bfloat16)
    labels = torch.tensor([207 % config.num_classes], device=device)
    options: dict[str, Any] = {"steps": plan.steps, "guidance": 3.0, "interval": (0.1, 1.0),
                               "solver": "euler"}
    metrics: dict[str, Any] = {"preset": plan.preset, "resolution": plan.resolution, "batch": 1,
                               "dtype": "bfloat16", **options}
    with peak_memory(device, metrics):
        out, times = timed(lambda: sample(runner, noise, labels, **options), device, plan)
    metrics.update(times)
    finite = bool(torch.isfinite(out.float()).all())
    if variant == "eager":
        eager_out["x"] = out
    elif "x" in eager_out:
        # bfloat16 rounding differs between eager and fused kernels, and 100 steps compound it:
        # recorded for inspection, not a pass/fail criterion (the CUDA tests check correctness).
        metrics["rel_diff_vs_eager"] = rel_diff(out, eager_out["x"])
    if device.type == "cuda" and plan.preset == "DeCo-XL/16":
        metrics.update(target_h100_s=TARGET_H100_S, paper_a800_s=PAPER_A800_S,
                       meets_target=times["median_s"] <= TARGET_H100_S)
    report.add("sampling", variant, "ok" if finite else "fail", note if finite else "non-finite output",
               **metrics)


def training(report: Report, plan: Plan, device: Any, impl: str) -> None:
    """One training iteration, bfloat16 autocast: our Trainer.step, or our model / the release's
    under bench/common.py's shared train_step (same loss, same AdamW)."""
    import torch
    from common import (
        adamw,
        batch_for,
        load_release_module,
        our_model,
        release_source,
        release_twin,
        train_step,
    )

    from deco.config import DeCoConfig
    from deco.optimized.trainer import TrainConfig, Trainer

    config = DeCoConfig.preset(plan.preset)
    metrics: dict[str, Any] = {"preset": plan.preset, "resolution": plan.resolution,
                               "batch": plan.train_batch, "autocast": "bfloat16"}
    data = [v.to(device) for v in batch_for(config, plan.train_batch, plan.resolution)]
    if impl == "ours-trainer":
        trainer = Trainer(our_model(config).to(device), TrainConfig(bf16=True))
        with peak_memory(device, metrics):
            _, times = timed(lambda: trainer.step(data[0], data[2]), device, plan)
    else:
        ours = our_model(config).to(device)
        if impl == "release":
            root = release_source()
            if root is None:
                report.add("training", impl, "skip", "DECO_RELEASE_SRC is not set: the release is not "
                           "on this machine unless carried (point it at the release's folder)")
                return
            model = release_twin(load_release_module(root), ours.cpu()).to(device)
            ours = ours.to(device)
            metrics["forward_rel_diff_vs_ours_fp32"] = _forward_agreement(ours, model, config, device)
            if metrics["forward_rel_diff_vs_ours_fp32"] > 1e-4:
                report.add("training", impl, "fail", "the release's forward disagrees with ours", **metrics)
                return
            del ours
        else:
            model = ours
        model.train()
        optimizer = adamw(model)

        def step() -> float:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return train_step(model, optimizer, tuple(data))

        with peak_memory(device, metrics):
            _, times = timed(step, device, plan)
        metrics["phases_ms"] = phase_times(model, optimizer, tuple(data), device, plan)
    metrics.update(times)
    report.add("training", impl, "ok", **metrics)


def phase_times(model: Any, optimizer: Any, data: tuple[Any, ...], device: Any,
                plan: Plan) -> dict[str, float]:
    """Median ms of each phase of common.train_step (data, forward, loss, backward, optimizer;
    bench/RESULTS.md §9 times the same phases on the CPU) over `plan.rounds` steps, bfloat16
    autocast, the device synchronised at every phase boundary."""
    import statistics

    import torch
    from common import train_step_phases

    def clock() -> float:
        synchronize(device)
        return time.perf_counter()

    with torch.autocast(device.type, dtype=torch.bfloat16):
        samples = [train_step_phases(model, optimizer, data, clock) for _ in range(plan.rounds)]
    return {p: round(statistics.median(s[p] for s in samples) * 1e3, 2) for p in samples[0]}


def _forward_agreement(ours: Any, release: Any, config: Any, device: Any) -> float:
    """float32 (TF32 off) forward of both models on one batch of 2: max relative difference."""
    import torch
    from common import batch_for

    from deco.optimized.gemm import full_float32_products

    x, t, y, _ = (v.to(device) for v in batch_for(config, 2, 64 if config.patch_size == 16 else 16, seed=1))
    with torch.no_grad(), full_float32_products():
        return rel_diff(release(x, t, y), ours.eval()(x, t, y))


def onnxruntime_gpu(report: Report, plan: Plan, device: Any, dtype: str, folder: Path) -> None:
    """Export the model (external data: forced in the dry run, automatic for XL) and time one
    forward at the sampling size in onnxruntime, after checking it against torch float32."""
    import numpy as np
    import torch
    from common import our_model

    from deco.config import DeCoConfig
    from deco.deploy.export import RTOL_BY_DTYPE, data_file, export_onnx
    from deco.deploy.runtime import OnnxVelocityModel
    from deco.optimized.gemm import full_float32_products

    try:
        import onnxruntime as ort
    except ImportError:
        report.add("onnxruntime", dtype, "skip", "onnxruntime is not installed")
        return
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        report.add("onnxruntime", dtype, "skip", f"onnxruntime-gpu is not installed (providers: "
                   f"{', '.join(ort.get_available_providers())})")
        return
    config = DeCoConfig.preset(plan.preset)
    model = our_model(config).eval()
    path = folder / f"model-{dtype}.onnx"
    start = time.perf_counter()
    # The straight-line decoder, as in gpu_generator.export_row (the chunked one is a CPU lever).
    export_onnx(model, path, dtype=dtype, external_data=True if device.type == "cpu" else None,
                decoder_chunk_rows=None)
    metrics: dict[str, Any] = {"export_s": round(time.perf_counter() - start, 1), "preset": plan.preset,
                               "resolution": plan.resolution, "batch": 1,
                               "external_data": data_file(path).is_file(), "provider": provider}
    graph = OnnxVelocityModel(path, providers=[provider])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, plan.resolution, plan.resolution, generator=g)
    t, y = torch.tensor([0.6]), torch.tensor([207 % config.num_classes])
    feed = {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()}
    got, times = timed(lambda: graph.session.run(["v"], feed)[0], torch.device("cpu"), plan)
    metrics.update(times)
    model = model.to(device)
    with torch.no_grad(), full_float32_products():
        expected = model(x.to(device), t.to(device), y.to(device)).cpu()
    err = rel_diff(torch.from_numpy(np.asarray(got)), expected)
    bound = RTOL_BY_DTYPE[dtype]
    metrics.update(rel_err_vs_torch_fp32=err, bound=bound)
    report.add("onnxruntime", dtype, "ok" if err <= bound else "fail", **metrics)
    for leftover in (path, data_file(path)):  # the XL files are 2.7 GB: not kept past the section
        leftover.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- main
SAMPLING_FIRST = ("eager", "cuda-graphs")
SAMPLING_LAST = ("compile", "compile-reduce-overhead")


def sections(report: Report, plan: Plan, device: Any, scratch: Path,
             dry_run: bool = False) -> list[tuple[str, Callable[[], None]]]:
    """(key, run) in priority order."""
    import gpu_generator

    eager: dict[str, Any] = {}

    def sample_step(v: str) -> tuple[str, Callable[[], None]]:
        return f"sampling/{v}", lambda: sampling(report, plan, device, v, eager)

    def train_step_(impl: str) -> tuple[str, Callable[[], None]]:
        return f"training/{impl}", lambda: training(report, plan, device, impl)

    def onnx_step(dtype: str) -> tuple[str, Callable[[], None]]:
        return f"onnxruntime/{dtype}", lambda: onnxruntime_gpu(report, plan, device, dtype, scratch)

    return [("cuda-tests/pytest", lambda: cuda_tests(report, plan)),
            *(sample_step(v) for v in SAMPLING_FIRST),
            *(train_step_(i) for i in ("ours-trainer", "ours", "release")),
            *(sample_step(v) for v in SAMPLING_LAST),
            onnx_step("float32"), onnx_step("float16"),
            *gpu_generator.steps(report, plan, device, scratch, dry_run)]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json/.md (created)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: the code paths only")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="skip the sections that would end after this many seconds (default 450)")
    p.add_argument("--only", nargs="+", metavar="KEY", default=None,
                   help="run only these sections or section/name keys (e.g. cuda-tests sampling "
                   "training/ours onnxruntime/float32 generator)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    shadow = ensure_deco()
    sys.path.insert(0, str(BENCH_DIR))  # common.py, test_bench_cuda.py, gpu_generator.py
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device (torch.cuda.is_available() is False); use --dry-run "
              "to run the code paths on the CPU", file=sys.stderr)
        return 2
    if args.budget_s <= 0:
        print("gpu_check: error: --budget-s: expected a positive number of seconds", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    plan = DRY if args.dry_run else FULL
    report = Report(args.out, plan, args.budget_s)
    environment(report, device, args.dry_run, shadow)
    with tempfile.TemporaryDirectory(prefix="deco-gpu-check-onnx-") as scratch:
        steps = sections(report, plan, device, Path(scratch), args.dry_run)
        keys = [k for k, _ in steps]
        names = set(keys) | {k.partition("/")[0] for k in keys}
        unknown = set(args.only or []) - names
        if unknown:
            print(f"gpu_check: error: --only: unknown {sorted(unknown)}; expected sections or keys "
                  f"of {keys}", file=sys.stderr)
            return 2
        for key, run in steps:
            section, _, name = key.partition("/")
            if args.only is not None and key not in args.only and section not in args.only:
                continue
            if not report.fits(key):
                report.add(section, name, "skip",
                           f"time budget: {report.elapsed():.0f} s used of {args.budget_s:.0f} s")
                continue
            try:
                run()
            except Exception as exc:  # one broken section must not lose the others' numbers
                report.add(section, name, "fail", f"{type(exc).__name__}: {str(exc)[:300]}")
            release_free()  # the section's models are gone with its frame: hand their memory back
    report.write()
    failed = [f"{r['section']}/{r['name']}" for r in report.results if r["status"] == "fail"]
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else "; nothing failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
