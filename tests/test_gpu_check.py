"""bench/gpu_check.py, the one command for a GPU lease: its --dry-run runs every section's code
path on the CPU at tiny sizes (what CI can check before a GPU session spends its minutes), and it
runs from a bare checkout (no installed package)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_check.py"
KEYS = ["cuda-tests/pytest", "sampling/eager", "sampling/cuda-graphs", "training/ours-trainer",
        "training/ours", "training/release", "sampling/compile", "sampling/compile-reduce-overhead",
        "onnxruntime/float32", "onnxruntime/float16", "generator/export", "generator/cuda",
        "generator/tensorrt", "generator/tensorrt-fp16"]
GENERATOR_ROWS = ("generator/cuda", "generator/tensorrt", "generator/tensorrt-fp16")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU stand-in")
def test_dry_run_runs_every_section(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DECO_RELEASE_SRC"}
    proc = run("--dry-run", "--out", str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    results = {f"{r['section']}/{r['name']}": r for r in data["results"]}
    assert list(results) == KEYS
    skipped = {k for k, r in results.items() if r["status"] == "skip"}
    # What a CPU without the release cannot run, each with its reason; everything else ran.
    assert skipped == {"sampling/cuda-graphs", "training/release"}
    assert "needs CUDA" in results["sampling/cuda-graphs"]["note"]
    assert "DECO_RELEASE_SRC" in results["training/release"]["note"]
    assert all(r["status"] == "ok" for k, r in results.items() if k not in skipped)
    assert results["cuda-tests/pytest"]["skipped"] > 0  # collected, skipped without CUDA
    for key in ("sampling/eager", "training/ours", "onnxruntime/float32"):
        assert 0 < results[key]["median_s"] < 60
    phases = results["training/ours"]["phases_ms"]  # common.train_step_phases, device-synchronised
    assert set(phases) == {"data", "forward", "loss", "backward", "optimizer", "step"}
    assert phases["step"] > 0 and all(0 <= v <= phases["step"] + 0.01 for v in phases.values())
    assert results["onnxruntime/float32"]["external_data"] is True
    assert results["onnxruntime/float32"]["rel_err_vs_torch_fp32"] <= 1e-4
    assert results["onnxruntime/float16"]["rel_err_vs_torch_fp32"] <= 1e-2
    _check_generator_rows(results, tmp_path)
    env_info = data["environment"]
    assert env_info["torch"] == torch.__version__ and env_info["dry_run"] is True
    table = (tmp_path / "gpu_check.md").read_text()
    assert sum(line.startswith("| sampling |") for line in table.splitlines()) == 4
    assert [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| generator |")] == \
        ["export", "cuda", "tensorrt", "tensorrt-fp16"]
    assert (tmp_path / "pytest_cuda.log").is_file()


def _check_generator_rows(results: dict[str, dict[str, Any]], out: Path) -> None:
    """The generator section's rows of a dry run: the CPU stood in for each provider, with the
    real provider's options recorded, and the graph sampled as torch did (3 guided Euler steps)."""
    export = results["generator/export"]
    assert export["external_data"] is True and export["steps"] == 3
    assert export["guidance"] == 3.2 and export["interval"] == [0.1, 1.0] and export["solver"] == "euler"
    for key in GENERATOR_ROWS:
        row = results[key]
        assert row["note"].startswith("CPUExecutionProvider standing in for " + row["provider"])
        assert 0 < row["median_s"] < 60 and row["first_s"] >= row["session_s"] > 0
        assert row["rel_err_vs_torch"] <= 1e-4  # float32 on the CPU, whatever the row's bound
    assert results["generator/cuda"]["batch8_median_s_per_image"] > 0
    assert results["generator/cuda"]["provider_options"] == {"use_tf32": "0"}
    for key, fp16 in (("generator/tensorrt", "False"), ("generator/tensorrt-fp16", "True")):
        options = results[key]["provider_options"]
        assert options["trt_fp16_enable"] == fp16 and options["trt_engine_cache_enable"] == "True"
        assert Path(options["trt_engine_cache_path"]).parent == out / "trt-engines"
    assert results["generator/tensorrt"]["bound"] == 1e-4


def _generator_module() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_generator", REPO_ROOT / "bench" / "gpu_generator.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_generator"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_generator_rows_skip_without_their_provider_and_choose_theirs_with_it(tmp_path: Path) -> None:
    """Outside the dry run a row runs only with its own provider first in the session's list."""
    gen = _generator_module()
    cpu_only = ["CPUExecutionProvider"]
    for row in ("cuda", "tensorrt", "tensorrt-fp16"):
        reason = gen.session_chain(row, cpu_only, False, tmp_path)
        assert isinstance(reason, str) and gen.PROVIDERS[row] in reason and "not available" in reason
        assert gen.session_chain(row, cpu_only, True, tmp_path) == [("CPUExecutionProvider", {})]
    cuda_only = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert [p for p, _ in gen.session_chain("cuda", cuda_only, False, tmp_path)] == cuda_only
    assert isinstance(gen.session_chain("tensorrt", cuda_only, False, tmp_path), str)
    everything = ["TensorrtExecutionProvider", *cuda_only]
    chain = gen.session_chain("tensorrt-fp16", everything, False, tmp_path / "c")
    assert [p for p, _ in chain] == everything
    trt = chain[0][1]
    assert trt["trt_fp16_enable"] == "True" and trt["trt_engine_cache_path"] == str(tmp_path / "c")
    assert chain[1][1] == {"use_tf32": "0"}
    # The export (minutes for XL) is skipped when no row could use it.
    assert "no GPU execution provider" in gen.missing_gpu_providers(cpu_only)
    assert gen.missing_gpu_providers(cuda_only) == "" and gen.missing_gpu_providers(everything) == ""


def test_tf32_override_is_set_only_inside_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _generator_module()
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "1")
    with gen.no_tf32(True):
        assert os.environ["NVIDIA_TF32_OVERRIDE"] == "0"
    assert os.environ["NVIDIA_TF32_OVERRIDE"] == "1"
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE")
    with gen.no_tf32(True):
        assert os.environ["NVIDIA_TF32_OVERRIDE"] == "0"
    assert "NVIDIA_TF32_OVERRIDE" not in os.environ
    with gen.no_tf32(False):
        assert "NVIDIA_TF32_OVERRIDE" not in os.environ


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_a_full_run_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = run("--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("gpu_check: error: no CUDA device")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_section_is_a_usage_error(tmp_path: Path) -> None:
    proc = run("--dry-run", "--out", str(tmp_path), "--only", "sampling/warp-speed")
    assert proc.returncode == 2 and "--only: unknown" in proc.stderr


def test_runs_from_a_bare_checkout() -> None:
    """With no installed `deco`, the script links the checkout's folders into a package."""
    code = f"""
import importlib.abc, importlib.machinery, importlib.util, sys
# Hide the installed deco, editable (a finder of its own) or not (site-packages), but let the
# package that ensure_deco links into a temporary folder be found.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
class HideInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "deco" and not name.startswith("deco."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or "site-packages" in str(spec.origin or spec.submodule_search_locations):
            raise ImportError("hidden: " + name)
        return spec
sys.meta_path.insert(0, HideInstalled())
for name in [m for m in sys.modules if m == "deco" or m.startswith("deco.")]:
    del sys.modules[name]
try:
    import deco
    raise SystemExit("deco is still importable: the test cannot hide the installed package")
except ImportError:
    pass
spec = importlib.util.spec_from_file_location("gpu_check", {str(SCRIPT)!r})
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up
spec.loader.exec_module(gpu_check)
root = gpu_check.ensure_deco()
import deco.optimized.model, deco.reference, deco.deploy.export
from pathlib import Path
assert Path(deco.__file__).resolve() == Path({str(REPO_ROOT / "core" / "__init__.py")!r}).resolve()
assert Path(deco.__file__).parent == Path(root) / "deco"
vectors = Path({str(REPO_ROOT / "spec" / "vectors")!r})
assert (Path(deco.__file__).parent / "vectors").resolve() == vectors.resolve()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_sections_past_the_budget_are_skipped_with_the_reason(tmp_path: Path) -> None:
    proc = run("--dry-run", "--out", str(tmp_path), "--budget-s", "0.001")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    assert [f"{r['section']}/{r['name']}" for r in results] == KEYS
    assert all(r["status"] == "skip" and r["note"].startswith("time budget") for r in results)
