"""The class model's training step, ours vs the release, alternating in one process per state of
the machine's allocator (issue #29): DeCo-S/16, 256x256, batch 4, float32 (`--precision bf16`:
the forward under CPU bf16 autocast, the release's own bf16-mixed training precision), identical
weights, the same loss and AdamW (`common.train_step_phases`). Needs $DECO_RELEASE_SRC:

    DECO_RELEASE_SRC=/path/to/release python bench/train_step_ab.py            # full (~15 min)
    DECO_RELEASE_SRC=/path/to/release python bench/train_step_ab.py --quick    # ~4 min
    python bench/train_step_ab.py --impls ours --quick                          # no release

For every allocator state and thread count a fresh worker process builds both models, checks that
their forward passes agree (<= 1e-4 relative), warms each up with two steps, then runs `--rounds`
rounds, each one step of each model (the order swapped every round, so that a change in the
machine's load hits both), timing every phase (wall clock) and the whole step (wall and process
CPU time), then one eval forward each. It prints one JSON line per worker and a table.

Allocator states (`STATES`): the release's step time depends on glibc malloc's state (its
(262144, 32)-float activations are above malloc's mmap threshold, so in a fresh process every
step maps and page-faults them afresh; bench/RESULTS.md §1). "default" is glibc as it comes;
"tuned" sets GLIBC_TUNABLES so that freed memory stays with the process (no mmap for large
blocks, no trimming, a 256 MiB top pad): no page faults after the first steps. The anchor of the
comparison is the release at its fastest: the state with its lowest median step. `--memory` also
measures each model's peak resident memory of one training step in a fresh process per state
(bench/memory_probe.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from common import (
    BENCH_DIR,
    PHASES,
    PROFILES,
    adamw,
    batch_for,
    our_model,
    release_source,
    train_step_phases,
    variant,
)

from deco.optimized import cpu_gemm_backend

#: allocator state -> environment it runs under (see the module doc).
STATES: dict[str, dict[str, str]] = {
    "default": {},
    "tuned": {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
                                ":glibc.malloc.top_pad=268435456"},
}
IMPLS = ("ours", "release")
PRECISIONS = ("fp32", "bf16")


def worker(threads: int, rounds: int, impls: list[str], precision: str) -> dict[str, Any]:
    """One process's measurements: {impl: {"phases": {phase: [s, ...]}, "cpu": [...], "eval": [...]}}."""
    torch.set_num_threads(threads)
    sizes = PROFILES[os.environ.get("DECO_BENCH_PROFILE", "cpu")]["release"]
    config = sizes.config()
    ours = our_model(config)
    root = release_source()
    release = None
    if "release" in impls:
        from common import load_release_module

        if root is None:
            raise SystemExit("train_step_ab: DECO_RELEASE_SRC is not set (or run with --impls ours)")
        release = load_release_module(root)
    models = {impl: variant(impl, release, ours) for impl in impls}
    data = batch_for(config, sizes.batch, sizes.resolution)
    bf16 = precision == "bf16"
    with torch.no_grad():
        outs = {}
        for impl, (model, backend) in models.items():
            with cpu_gemm_backend(backend):
                outs[impl] = model.eval()(*data[:3])
    if "release" in outs:
        ref = outs["release"]
        err = float((outs["ours"] - ref).abs().max() / ref.abs().max())
        if err > 1e-4:
            raise SystemExit(f"train_step_ab: ours and the release disagree (max rel err {err:.1e})")
    optimizers = {impl: adamw(model) for impl, (model, _) in models.items()}
    result: dict[str, Any] = {impl: {"phases": {p: [] for p in (*PHASES, "step")}, "cpu": [], "eval": [],
                                     "eval_cpu": []}
                              for impl in impls}
    load = [os.getloadavg()[0]]
    for r in range(rounds + 2):  # two warm-up rounds
        order = impls if r % 2 == 0 else impls[::-1]
        for impl in order:
            model, backend = models[impl]
            with cpu_gemm_backend(backend):
                model.train()
                cpu0 = time.process_time()
                times = train_step_phases(model, optimizers[impl], data, bf16=bf16)
                cpu = time.process_time() - cpu0
                model.eval()
                start, cpu0 = time.perf_counter(), time.process_time()
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    model(*data[:3])
                evaluate, eval_cpu = time.perf_counter() - start, time.process_time() - cpu0
            if r >= 2:
                for phase, seconds in times.items():
                    result[impl]["phases"][phase].append(seconds)
                result[impl]["cpu"].append(cpu)
                result[impl]["eval"].append(evaluate)
                result[impl]["eval_cpu"].append(eval_cpu)
    load.append(os.getloadavg()[0])
    result["load"] = load
    return result


def run_worker(state: str, threads: int, rounds: int, impls: list[str], precision: str) -> dict[str, Any]:
    env = dict(os.environ, **STATES[state])
    cmd = [sys.executable, __file__, "--worker", str(threads), "--rounds", str(rounds),
           "--impls", ",".join(impls), "--precision", precision]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"train_step_ab: worker ({state}, {threads} threads) failed:\n{done.stderr}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def peak_train_mib(state: str, impl: str) -> float:
    """Peak RSS growth of one training step in a fresh process under `state` (memory_probe)."""
    sizes = PROFILES[os.environ.get("DECO_BENCH_PROFILE", "cpu")]["release"]
    cmd = [sys.executable, str(BENCH_DIR / "memory_probe.py"), impl, "train", sizes.preset,
           str(sizes.resolution), str(sizes.batch)]
    done = subprocess.run(cmd, env=dict(os.environ, **STATES[state]), capture_output=True,
                          text=True, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["op_mib"])


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def report(results: dict[tuple[str, int], dict[str, Any]], impls: list[str], precision: str) -> None:
    """Markdown tables: per state and thread count, each phase's median and the ratios."""
    print(f"\n{precision}:\n")
    print("| state | threads | load | model | " + " | ".join(PHASES) + " | step (wall) | step (CPU) "
          "| eval forward |")
    print("| --- " * (8 + len(PHASES)) + "|")
    for (state, threads), res in results.items():
        load = "-".join(f"{v:.1f}" for v in res["load"])
        for impl in impls:
            cells = [f"{median_ms(res[impl]['phases'][p]):.0f}" for p in (*PHASES, "step")]
            print(f"| {state} | {threads} | {load} | {impl} | " + " | ".join(cells)
                  + f" | {median_ms(res[impl]['cpu']):.0f} | {median_ms(res[impl]['eval']):.0f} |")
    if "release" not in impls:
        return
    print("\nRatios release / ours (same state); the anchor is the release's state with the lowest "
          "median step (CPU time at 1 thread, where the load of a shared machine disturbs it least; "
          "wall time otherwise).")
    print("\n| threads | anchor state | release step | ours step | step ratio (wall) | step ratio (CPU) "
          "| ours' fastest state, ratio | eval forward ratio (wall / CPU) |")
    print("| --- " * 8 + "|")
    for threads in sorted({t for _, t in results}, reverse=True):
        per = {s: r for (s, t), r in results.items() if t == threads}
        key = "cpu" if threads == 1 else "wall"
        step = {s: {(i, k): median_ms(r[i]["cpu"] if k == "cpu" else r[i]["phases"]["step"])
                    for i in impls for k in ("cpu", "wall")} for s, r in per.items()}
        anchor = min(step, key=lambda s: step[s][("release", key)])
        best = min(step, key=lambda s: step[s][("ours", key)])
        a = step[anchor]
        ev = [median_ms(per[anchor]["release"][k]) / median_ms(per[anchor]["ours"][k])
              for k in ("eval", "eval_cpu")]
        print(f"| {threads} | {anchor} | {a[('release', key)]:.0f} ms | {a[('ours', key)]:.0f} ms "
              f"| {a[('release', 'wall')] / a[('ours', 'wall')]:.2f}x "
              f"| {a[('release', 'cpu')] / a[('ours', 'cpu')]:.2f}x "
              f"| {best}, {a[('release', key)] / step[best][('ours', key)]:.2f}x "
              f"| {ev[0]:.2f}x / {ev[1]:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per worker (default 7, quick 3)")
    parser.add_argument("--threads", default="2,1", help="thread counts, comma-separated")
    parser.add_argument("--states", default=",".join(STATES), help="allocator states (STATES)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="ours,release or ours")
    parser.add_argument("--quick", action="store_true", help="3 rounds (about 3 minutes in all)")
    parser.add_argument("--memory", action="store_true", help="also peak memory per state")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 (the forward under CPU bf16 "
                        "autocast, the release's bf16-mixed) or both, comma-separated")
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    if not impls or any(i not in IMPLS for i in impls) or impls[0] != "ours":
        parser.error(f"--impls: expected 'ours' or 'ours,release', got {args.impls!r}")
    rounds = args.rounds or (3 if args.quick else 7)
    precisions = args.precision.split(",")
    if not precisions or any(p not in PRECISIONS for p in precisions):
        parser.error(f"--precision: expected names from {PRECISIONS}, got {args.precision!r}")
    if args.worker is not None:
        print(json.dumps(worker(args.worker, rounds, impls, precisions[0])))
        return
    states = args.states.split(",")
    if any(s not in STATES for s in states):
        parser.error(f"--states: expected names from {sorted(STATES)}, got {args.states!r}")
    print(f"torch {torch.__version__}, {rounds} rounds, load average at start {os.getloadavg()[0]:.2f}")
    for precision in precisions:
        results = {(s, int(t)): run_worker(s, int(t), rounds, impls, precision)
                   for t in args.threads.split(",") for s in states}
        report(results, impls, precision)
    if args.memory:
        for state in states:
            mib = {impl: peak_train_mib(state, impl) for impl in impls}
            print(f"peak memory of one training step, {state}: "
                  + ", ".join(f"{i} {m:.0f} MiB" for i, m in mib.items()))


if __name__ == "__main__":
    main()
