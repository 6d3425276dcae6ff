"""One side-by-side variant's training step, timed in a fresh process (complements the
pytest-benchmark session, where every variant shares one process and its allocator state):

    DECO_RELEASE_SRC=/path/to/release python bench/fresh_process.py IMPL [THREADS]

IMPL is one of common.IMPLS. Prints "IMPL threads median_s min_s" over 7 steps after one warm-up,
for DeCo-S/16, 256x256, batch 4, float32 (the "release" sizes of $DECO_BENCH_PROFILE, default
"cpu", in common.PROFILES).
"""

from __future__ import annotations

import os
import sys
import time

import torch
from common import IMPLS, PROFILES, adamw, batch_for, train_step, variant_from_env

from deco.optimized import cpu_gemm_backend


def main(impl: str, threads: int) -> None:
    torch.set_num_threads(threads)
    sizes = PROFILES[os.environ.get("DECO_BENCH_PROFILE", "cpu")]["release"]
    config = sizes.config()
    model, backend = variant_from_env(impl, config, "fresh_process")
    data = batch_for(config, sizes.batch, sizes.resolution)
    model.train()
    optimizer = adamw(model)
    times = []
    with cpu_gemm_backend(backend):
        train_step(model, optimizer, data)
        for _ in range(sizes.rounds):
            start = time.perf_counter()
            train_step(model, optimizer, data)
            times.append(time.perf_counter() - start)
    print(f"{impl} {threads} {sorted(times)[len(times) // 2]:.3f} {min(times):.3f}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] not in IMPLS:
        raise SystemExit(__doc__)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else torch.get_num_threads())
