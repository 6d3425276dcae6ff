"""Training checkpoints: one safetensors file per checkpoint, written atomically.

A checkpoint holds an arbitrary nested state (model, EMA, optimizer, step, data position, the
run's settings). Tensors go into the safetensors body under their path in the state
("trainer/optimizer/state/0/exp_avg"); everything else (numbers, strings, lists) goes into one
small JSON document stored in the safetensors header metadata, with each tensor replaced by a
reference to its key. Reading uses only `safetensors` and `json`: nothing is unpickled.

Writing: a temporary file in the destination folder, flushed and fsync'ed, then `os.replace`d
over the destination and the folder fsync'ed, so a crash at any moment leaves either the old or
the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from deco.atomic import atomic_write
from deco.config import DeCoConfig
from deco.errors import first_line
from deco.lora import adapter_shapes
from deco.paths_inside import resolve_inside
from deco.release import check_shapes
from deco.untrusted import UntrustedFileError, parse_json, read_safetensors_header

FORMAT_KEY = "deco_training_checkpoint"
FORMAT_VERSION = "1"
STATE_KEY = "state"

#: File names inside a run folder.
CHECKPOINT_NAME = "checkpoint.safetensors"
MODEL_NAME = "model.safetensors"

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"


# ------------------------------------------------------------------------------ flattening
def flatten(state: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """(JSON-able tree, tensors): every tensor in `state` replaced by {"__tensor__": key}.

    Tuples and dicts with int keys (the optimizer's per-parameter state) are tagged so that
    `unflatten` returns exactly the original structure."""
    tensors: dict[str, Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, Tensor):
            # safetensors needs contiguous, CPU, non-shared storage; clone also detaches from
            # any later in-place update of the live tensor.
            tensors[path] = value.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: path}
        if isinstance(value, Mapping):
            keys = list(value.keys())
            if all(isinstance(k, str) for k in keys):
                return {k: walk(v, f"{path}/{k}" if path else k) for k, v in value.items()}
            if all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
                return {_INTKEYS: [[k, walk(v, f"{path}/{k}")] for k, v in value.items()]}
            raise TypeError(f"state: dict keys at {path or '<root>'} must be all str or all int")
        if isinstance(value, tuple):
            return {_TUPLE: [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"state: cannot store a {type(value).__name__} at {path or '<root>'}")

    return walk(state, prefix), tensors


def unflatten(tree: Any, tensors: Mapping[str, Tensor], partial: bool = False) -> Any:
    """Inverse of `flatten`. partial: tensors absent from `tensors` become None (else an error)."""
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            key = tree[_TENSOR]
            if key not in tensors:
                if partial:
                    return None
                raise ValueError(f"checkpoint: tensor {key!r} is missing")
            return tensors[key]
        if set(tree) == {_TUPLE}:
            return tuple(unflatten(v, tensors, partial) for v in tree[_TUPLE])
        if set(tree) == {_INTKEYS}:
            return {int(k): unflatten(v, tensors, partial) for k, v in tree[_INTKEYS]}
        return {k: unflatten(v, tensors, partial) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, tensors, partial) for v in tree]
    return tree


# ------------------------------------------------------------------------------ files
def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write `state` (nested dicts/lists of tensors and JSON values) to `path` atomically.

    Refuses (ValueError) to write a state with a non-finite floating-point tensor, so a diverged
    run can never overwrite a good checkpoint with a poisoned one."""
    tree, tensors = flatten(dict(state))
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"checkpoint: refusing to save non-finite values in {key}")
    metadata = {FORMAT_KEY: FORMAT_VERSION, STATE_KEY: json.dumps(tree, allow_nan=False)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a training checkpoint file (reads only the header)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(FORMAT_KEY) == FORMAT_VERSION
    except (SafetensorError, OSError, ValueError):
        return False


#: A check of a checkpoint's state tree against its tensors' shapes, run before any tensor is read.
Validate = Callable[[Any, Mapping[str, tuple[int, ...]]], None]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    only: str | None = None, validate: Validate | None = None) -> dict[str, Any]:
    """The state written by `save_checkpoint`; FileNotFoundError / ValueError with the path.

    only: read just the tensors under this path of the state (e.g. "trainer/ema" for sampling,
    which then skips the optimizer's two moments); every other tensor comes back as None.
    validate(tree, shapes): a check of the state tree (tensor references in place) against the
    header's tensor shapes, before any tensor is read (`check_training_state`). The header is
    checked first (deco.untrusted): tensors inside the file, within the memory budget."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file: {path}")
    try:
        header = read_safetensors_header(path)
    except UntrustedFileError as exc:
        raise ValueError(f"checkpoint: {exc}") from None
    meta = header.metadata
    if meta.get(FORMAT_KEY) != FORMAT_VERSION or STATE_KEY not in meta:
        raise ValueError(f"checkpoint: {path} is not a DeCo training checkpoint")
    try:
        tree = parse_json(meta[STATE_KEY], f"{path} (state header)")
    except UntrustedFileError as exc:
        raise ValueError(f"checkpoint: {exc}") from None
    if validate is not None:
        validate(tree, header.shapes())
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            keys = [k for k in f.keys() if only is None or k.startswith(only.rstrip("/") + "/")]
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"checkpoint: {path} is unreadable or truncated ({exc})") from None
    try:
        state = unflatten(tree, tensors, partial=only is not None)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a tree not made by flatten
        raise ValueError(f"checkpoint: {path} has a malformed state header ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint: {path} does not hold a state dict")
    return state


def check_training_state(path: str | Path, parts: tuple[str, ...] = ("trainer/ema", "trainer/model")
                         ) -> Validate:
    """A `load_checkpoint` validator for a training checkpoint of `deco train`: its `config`,
    `run` and `trainer` entries present, the config valid, and the weights under each of `parts`
    exactly the config's parameters (names and shapes), before anything is loaded."""

    def validate(tree: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
        where = f"checkpoint: {path}"
        if not isinstance(tree, dict):
            raise ValueError(f"{where} does not hold a state dict")
        for key in ("config", "run", "trainer"):
            if not isinstance(tree.get(key), dict):
                raise ValueError(f"{where} has no {key!r} entry (not written by deco train?)")
        try:
            config = DeCoConfig.from_dict(tree["config"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where} has an invalid config ({first_line(exc)})") from None
        rank = tree["run"].get("lora_rank")
        for part in parts:
            prefix = part + "/"
            found = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
            try:
                check_shapes(config, found if rank is None else base_of_adapted(found, rank))
            except ValueError as exc:
                raise ValueError(f"{where}: {part} does not match its config "
                                 f"({str(exc).removeprefix('weights: ')})") from None

    return validate


def base_of_adapted(shapes: Mapping[str, tuple[int, ...]], rank: Any) -> dict[str, tuple[int, ...]]:
    """The shapes of a LoRA run's weights (`deco train --lora`, peft's names) under the base
    model's names: `M.base_layer.P` -> `M.P`, and each adapter pair `M.lora_A.<name>.weight`
    (rank, in) / `M.lora_B.<name>.weight` (out, rank) of a linear, or `M.lora_embedding_A.<name>`
    (rank, rows) / `M.lora_embedding_B.<name>` (width, rank) of an embedding (weight (rows,
    width)), checked against M's weight and left out. ValueError for a rank that is not an int
    or a pair that does not fit its layer."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"run.lora_rank must be a positive int, got {rank!r}")
    base = {k.replace(".base_layer.", "."): v for k, v in shapes.items() if ".lora_" not in k}
    for name, shape in shapes.items():
        if ".lora_" not in name:
            continue
        module, _, rest = name.partition(".lora_")
        weight = base.get(module + ".weight")
        embedding = rest.startswith("embedding_")
        rest = rest.removeprefix("embedding_")
        side = rest[:1]  # "A" or "B"
        fits = weight is not None and len(weight) == 2 and side in ("A", "B") and tuple(shape) == (
            adapter_shapes(nn.Embedding if embedding else nn.Linear, weight, rank)[side == "B"])
        named = rest[1:2] == "." and rest.endswith(".weight") != embedding  # peft's names
        if side not in ("A", "B") or not named or not fits:
            raise ValueError(f"weights: adapter tensor {name} {tuple(shape)} does not fit "
                             f"{module}.weight {weight} at rank {rank}")
    return base


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a run folder (its `checkpoint.safetensors`) or a file path."""
    path = Path(path)
    if path.is_dir():  # the folder is the user's; its checkpoint stays inside it (deco.paths_inside)
        candidate = resolve_inside(path, CHECKPOINT_NAME, what=f"checkpoint: run folder {path}")
        if not candidate.is_file():
            raise FileNotFoundError(f"checkpoint: run folder {path} has no {CHECKPOINT_NAME}")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file or folder: {path}")
    return path
