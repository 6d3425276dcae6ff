"""Markdown tables from a pytest-benchmark JSON file (`--benchmark-json` or an autosaved run):

    python bench/report.py .benchmarks/<machine>/0001_*.json

One table per group: median, min and mean time, rounds, and where the group compares two
implementations (extra_info "impl" or "runtime"), the speed-up over the other one (median over
median, and min over min: on a shared machine the minimum is the least disturbed round) and the
peak memory of the op recorded by the probe.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

#: In a comparison group, the implementation the others are measured against.
REFERENCE_IMPLS = ("release", "two-transform", "torch")


def _label(bench: dict[str, Any]) -> str:
    info = bench.get("extra_info", {})
    return str(info.get("impl") or info.get("runtime") or info.get("variant") or bench["name"])


def _memory(bench: dict[str, Any]) -> str:
    mem = bench.get("extra_info", {}).get("memory")
    if not mem:
        return ""
    return f"{mem['op_mib']:.0f} MiB (peak RSS {mem['peak_mib']:.0f} MiB)"


def group_table(name: str, benches: list[dict[str, Any]]) -> str:
    by_label = {_label(b): b for b in benches}
    ref = next((by_label[k] for k in REFERENCE_IMPLS if k in by_label), None)
    lines = [f"### {name}", "",
             "| what | median (s) | min (s) | mean (s) | rounds | speed-up | peak memory of the op |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, b in by_label.items():
        s = b["stats"]
        speedup = ""
        if ref is not None and b is not ref:
            r = ref["stats"]
            speedup = (f"{r['median'] / s['median']:.2f}x (min: {r['min'] / s['min']:.2f}x) "
                       f"vs {_label(ref)}")
        lines.append(f"| {label} | {s['median']:.4f} | {s['min']:.4f} | {s['mean']:.4f} | "
                     f"{s['rounds']} | {speedup} | {_memory(b)} |")
    return "\n".join(lines)


def report(path: Path) -> str:
    data = json.loads(path.read_text())
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench.get("group") or bench["name"]].append(bench)
    return "\n\n".join(group_table(name, benches) for name, benches in groups.items())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(report(Path(sys.argv[1])))
