"""Peak-memory probe, run in a fresh process by `common.peak_memory`:

    python bench/memory_probe.py ours|release forward|train PRESET RESOLUTION BATCH

Builds the model and a batch, records the maximum RSS so far (getrusage), runs the op once
(forward under no_grad, or one training step of `common.train_step`), and prints one JSON line:
{"baseline_mib", "peak_mib", "op_mib" = peak - baseline}. Weights are random (memory does not
depend on their values); the release model needs $DECO_RELEASE_SRC.
"""

from __future__ import annotations

import json
import resource
import sys

import torch
from common import adamw, batch_for, load_release_module, our_model, release_model, release_source

from deco.config import DeCoConfig


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(impl: str, op: str, preset: str, resolution: int, batch: int) -> None:
    config = DeCoConfig.preset(preset)
    if impl == "ours":
        model = our_model(config)
    else:
        root = release_source()
        if root is None:
            raise SystemExit("memory_probe: DECO_RELEASE_SRC is not set")
        model = release_model(load_release_module(root), config)
    data = batch_for(config, batch, resolution)
    optimizer = adamw(model) if op == "train" else None
    baseline = max_rss_mib()
    if op == "forward":
        with torch.no_grad():
            model.eval()(*data[:3])
    else:
        from common import train_step

        assert optimizer is not None
        train_step(model.train(), optimizer, data)
    peak = max_rss_mib()
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak, "op_mib": peak - baseline}))


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] not in ("ours", "release") or sys.argv[2] not in (
            "forward", "train"):
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
