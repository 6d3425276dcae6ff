"""Stage verdicts (deco.conformance): a composite vector (a loss, a sampler) that fails points at
the stage that differs.

Each composite vector of spec/vectors has *stage vectors*: the same inputs taken through one
stage of its computation (the loss: YCbCr, padding, DCT, weights, weighted error; a sampler: time
grid, guidance scales, guided velocity, one update), each with the reference's intermediate
result as `expected` and the composite's name in its `stage_of` metadata. When a composite fails,
its result's note lists the verdicts of its stages ("stage vectors loss_q85_*: ycbcr pass,
padding FAIL, ..."): the first stage that fails is where to look, and a composite that
fails while every stage passes is wrong in how it combines them.

Works on any sequence of results with `vector`, `status` and `note` fields (the kit's `Result`,
a dataclass): this module sits below the kit and imports nothing from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

__all__ = ["PIPELINE", "stage_verdicts", "stages_of", "with_stage_verdicts"]


class _Verdict(Protocol):
    @property
    def vector(self) -> str: ...

    @property
    def status(self) -> str: ...

    @property
    def note(self) -> str: ...


class _Staged(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def stage_of(self) -> str | None: ...


R = TypeVar("R", bound=_Verdict)


#: The stages in the order of the computation (the name of a stage vector is the composite's,
#: "_", the stage): the loss's (02 §1-6), then a sampler's (04).
PIPELINE = ("ycbcr", "padding", "dct", "weights", "weighted_error",
            "grid", "guidance_scales", "guided_velocity", "step", "step_weights", "last_step")


def stages_of(vectors: Iterable[_Staged]) -> dict[str, list[str]]:
    """Composite vector name -> the names of its stage vectors, in the order of `PIPELINE`
    (stages it does not name last, by name)."""
    out: dict[str, list[str]] = {}
    for v in vectors:
        if v.stage_of:
            out.setdefault(v.stage_of, []).append(v.name)

    return {c: sorted(names, key=lambda n: _rank(n.removeprefix(f"{c}_"))) for c, names in out.items()}


def _rank(stage: str) -> tuple[int, str]:
    return (PIPELINE.index(stage) if stage in PIPELINE else len(PIPELINE), stage)


def stage_verdicts(composite: str, results: Iterable[_Verdict],
                   stages: Mapping[str, Sequence[str]]) -> str | None:
    """"stage vectors loss_q85_*: ycbcr pass, padding FAIL, ..." for `composite` (None when it
    has no stage vector among `results`); "(every stage passes: ...)" added when none failed."""
    status = {r.vector: r.status for r in results}
    names = [n for n in stages.get(composite, ()) if n in status]
    if not names:
        return None
    prefix = f"{composite}_"
    text = f"stage vectors {prefix}*: " + ", ".join(
        f"{n.removeprefix(prefix)} {status[n]}" for n in names)
    if all(status[n] == "pass" for n in names):
        text += " (every stage passes: the stages are combined differently)"
    return text


def with_stage_verdicts(results: Sequence[R], vectors: Iterable[_Staged]) -> list[R]:
    """`results` with each failed composite's note extended by its stage verdicts."""
    stages = stages_of(vectors)
    out = []
    for r in results:
        text = stage_verdicts(r.vector, results, stages) if r.status in ("FAIL", "ERROR") else None
        if text is not None:
            note = f"{r.note}; {text}" if r.note else text
            r = _replace(r, note)
        out.append(r)
    return out


def _replace(result: R, note: str) -> R:
    changed: Any = dataclasses.replace(result, note=note)  # type: ignore[type-var]
    return changed  # type: ignore[no-any-return]
