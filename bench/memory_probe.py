"""Peak-memory probe, run in a fresh process by `common.peak_memory`:

    python bench/memory_probe.py IMPL forward|train PRESET RESOLUTION BATCH   (IMPL: common.IMPLS)

Builds the model and a batch, resets the kernel's resident-set high-water mark (writing 5 to
/proc/self/clear_refs sets VmHWM to the current RSS), runs the op once (forward under no_grad,
or the first training step of `common.train_step`, which also allocates AdamW's state), and
prints one JSON line: {"baseline_mib": RSS before the op, "peak_mib": VmHWM after it,
"op_mib": their difference}. Without the reset, an earlier peak (torch's import, the model's
initialisation) could hide the op's. Weights are random (memory does not depend on their
values); the release model needs $DECO_RELEASE_SRC. Linux only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from common import IMPLS, adamw, batch_for, variant_from_env

from deco.config import DeCoConfig
from deco.optimized import set_cpu_gemm


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"memory_probe: no {field} in /proc/self/status")


def reset_peak() -> float:
    """Reset VmHWM to the current RSS and return it (MiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mib("VmRSS")


def main(impl: str, op: str, preset: str, resolution: int, batch: int) -> None:
    config = DeCoConfig.preset(preset)
    model, backend = variant_from_env(impl, config, "memory_probe")
    set_cpu_gemm(backend)
    data = batch_for(config, batch, resolution)
    optimizer = adamw(model) if op == "train" else None
    baseline = reset_peak()
    if op == "forward":
        with torch.no_grad():
            model.eval()(*data[:3])
    else:
        from common import train_step

        assert optimizer is not None
        train_step(model.train(), optimizer, data)
    peak = status_mib("VmHWM")
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak, "op_mib": peak - baseline}))


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] not in IMPLS or sys.argv[2] not in (
            "forward", "train"):
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
