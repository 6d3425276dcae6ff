"""The reports of a conformance run (deco.conformance): the text table with a diagnosis under
each failure, a JSON report for a port's own CI (one record per vector), and JUnit XML for the CI
services that display it. The same for --python, --onnx and --outputs.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deco.atomic import atomic_write
from deco.conformance.kit import Result, format_table, passed, summary

JUNIT_SUITE = "deco-conformance"


def _number(value: float) -> float | None:
    """JSON has no NaN or inf: not measured (or not finite) is null."""
    return value if math.isfinite(value) else None


def details(results: Iterable[Result]) -> str:
    """The diagnosis of each failed vector, a few indented lines each ("" when none failed)."""
    blocks = []
    for r in results:
        if r.status not in ("FAIL", "ERROR"):
            continue
        head = f"{r.status} {r.vector} ({r.component})"
        if not math.isnan(r.max_rel):
            head += f": max rel err {r.max_rel:.3e} > tolerance {r.tolerance:.0e}"
        elif r.note:
            head += f": {r.note}"
        lines = r.diagnosis.lines() if r.diagnosis is not None else []
        blocks.append("\n".join([head, *(f"  {line}" for line in lines)]))
    return "\n".join(blocks)


def text_report(results: Sequence[Result]) -> str:
    """The table, the diagnoses of the failures and the summary line (last)."""
    parts = [format_table(results)]
    more = details(results)
    if more:
        parts += ["", more, ""]
    parts.append(summary(results))
    return "\n".join(parts)


def record(r: Result) -> dict[str, Any]:
    """One vector's JSON record: status, error, tolerance, note, worst element, location, hint,
    and the catalogue variants that explain the output (`explanations`, best first)."""
    d = r.diagnosis
    return {
        "vector": r.vector, "component": r.component, "status": r.status,
        "max_abs": _number(r.max_abs), "max_rel": _number(r.max_rel),
        "tolerance": _number(r.tolerance), "note": r.note,
        "worst": None if d is None or d.worst is None else {
            "index": list(d.worst.index), "got": _number(d.worst.got),
            "expected": _number(d.worst.expected)},
        "location": None if d is None or d.location is None else {
            "kind": d.location.kind, "axis": d.location.axis, "indices": list(d.location.indices),
            "text": d.location.text},
        "hint": None if d is None or d.hint is None else asdict(d.hint),
        "explanations": [] if d is None else [e.record() for e in d.explanations],
    }


def json_report(results: Sequence[Result]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "FAIL", "ERROR", "skipped")}
    report = {"passed": passed(results), "summary": summary(results), "counts": counts,
              "results": [record(r) for r in results]}
    return json.dumps(report, indent=1, allow_nan=False)


def junit_xml(results: Sequence[Result]) -> bytes:
    """A <testsuites> with one <testsuite> and a <testcase> per vector (classname: component);
    FAIL is a <failure>, ERROR an <error>, skipped a <skipped>, each with the diagnosis."""
    counts = {s: sum(r.status == s for r in results) for s in ("FAIL", "ERROR", "skipped")}
    root = ET.Element("testsuites")
    suite = ET.SubElement(root, "testsuite", name=JUNIT_SUITE, tests=str(len(results)),
                          failures=str(counts["FAIL"]), errors=str(counts["ERROR"]),
                          skipped=str(counts["skipped"]))
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=r.component, name=r.vector)
        if r.status == "pass":
            continue
        if r.status == "skipped":
            ET.SubElement(case, "skipped", message=r.note or "not provided")
            continue
        message = r.note or f"max rel err {r.max_rel:.3e} > tolerance {r.tolerance:.0e}"
        if r.diagnosis is not None and r.diagnosis.hint is not None:
            message += f"; hint: {r.diagnosis.hint.text}"
        element = ET.SubElement(case, "failure" if r.status == "FAIL" else "error",
                                message=message, type=r.status)
        element.text = details([r])
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data


def report(results: Sequence[Result], *, as_json: bool = False, junit: Path | None = None) -> int:
    """Print the run's report (text, or JSON with --json), write JUnit XML to `junit` if given,
    and return the exit status: 0 when the port passed, 1 otherwise."""
    print(json_report(results) if as_json else text_report(results))
    if junit is not None:
        data = junit_xml(results)
        atomic_write(junit, lambda tmp: Path(tmp).write_bytes(data))
    return 0 if passed(results) else 1
