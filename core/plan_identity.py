"""Binding resumable work to everything that determines its output.

A resumable command (`deco sample --count`, `deco embed-text`, `deco train --resume`) keeps what
it finished on disk and skips it on a rerun. That is only right when the rerun would produce the
same thing: the same model and the same settings. So the command records a *plan*, a JSON
object of every input that decides its output (the model's identity as a hash of its tensors or
file, and every setting), and a rerun compares its own plan with the recorded one: a difference
is refused with one line that names what changed, never mixed.

    plan = {"model_sha256": tensors_sha256(model.state_dict()), "guidance": 3.0, ...}
    check_plan(recorded, plan)   # PlanMismatch naming e.g. "guidance 3.0 -> 1.5"
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["PlanMismatch", "check_plan", "file_sha256", "plan_changes", "tensors_sha256"]


class PlanMismatch(ValueError):
    """A recorded plan differs from this run's; `changes` lists "key old -> new" per field."""

    def __init__(self, what: str, changes: list[str]) -> None:
        self.what, self.changes = what, changes
        #: the first three changes, "; "-separated
        self.shown = "; ".join(changes[:3]) + (f" (and {len(changes) - 3} more)" if len(changes) > 3 else "")
        super().__init__(f"{what}: {self.shown}")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """Hex SHA-256 of named tensors (torch or NumPy): names, dtypes, shapes and bytes, in name
    order. The identity of a model whatever file holds it (a run folder's checkpoint, a
    safetensors file, a release .ckpt), and independent of where the tensors live."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        if hasattr(value, "detach"):  # torch: bfloat16 has no NumPy dtype, so hash raw bytes

            value = value.detach().cpu().contiguous()
            dtype, shape = str(value.dtype).removeprefix("torch."), tuple(value.shape)
            data = value.reshape(-1).view(torch.uint8).numpy().tobytes()
        else:
            array = np.ascontiguousarray(value)
            dtype, shape, data = str(array.dtype), array.shape, array.tobytes()
        header = f"{name}\0{dtype}\0{','.join(map(str, shape))}\0".encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"sample.guidance": 3.0, ...}: nested dicts flattened to dotted keys."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _show(value: Any) -> str:
    text = repr(value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        text = value[:12] + "..."  # a hash
    return text


def plan_changes(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """"key old -> new" for every field (dotted, nested) that differs, in key order; a field
    absent on one side shows as <none>."""
    old, new = _flat(recorded), _flat(wanted)
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            changes.append(f"{key} {'<none>' if a is missing else _show(a)} -> "
                           f"{'<none>' if b is missing else _show(b)}")
    return changes


def check_plan(recorded: Mapping[str, Any], wanted: Mapping[str, Any], what: str) -> None:
    """PlanMismatch (a ValueError) naming the changed fields unless the plans are equal."""
    changes = plan_changes(recorded, wanted)
    if changes:
        raise PlanMismatch(what, changes)
