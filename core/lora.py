"""LoRA adapters on `deco.optimized` models, through peft, in diffusers' LoRA file format.

    targets = resolve_targets(model)                     # the default targets' full names
    add_lora(model, rank=8, targets=targets)             # peft layers; only they train
    save_adapter(model, "pytorch_lora_weights.safetensors")
    load_adapter(other, "pytorch_lora_weights.safetensors")   # into a plain model
    plain = merge_adapter(other)                          # W + (alpha/r) B A, the peft layers removed

The layers are peft's own (`peft.inject_adapter_in_model` with a `LoraConfig`): our linears are
`nn.Linear` subclasses, which peft wraps as it wraps any linear. The file is what diffusers'
`save_lora_weights` writes for a pipeline's `transformer` component: safetensors, keys
`transformer.model.<module>.lora_A.weight` / `.lora_B.weight` (`DeCoTransformer2DModel` holds the
`deco.optimized` model as its submodule `model`), and the LoraConfig as JSON under the metadata
key `lora_adapter_metadata`, each field prefixed `transformer.`. So `pipe.load_lora_weights(file)`
reads a `deco train --lora` adapter, and `load_adapter` reads one saved by diffusers.

Which modules can carry LoRA: a linear whose `forward` the model calls, and the class embedding
`y_embed` (an `nn.Embedding`: peft's embedding LoRA, E[i] + (alpha/r) B A[:, i], tensors
`lora_embedding_A` (r, classes + 1) and `lora_embedding_B` (hidden, r), no `.weight`, as peft and
diffusers name them). It is not a default target: name it (`--lora-targets ... y_embed`) to let a
fine-tune move the labels' embeddings, which a new class needs (bench/RESULTS.md §10). The pixel decoder folds
some of its weights into others before use (`pixel_embed`, `input_proj` and the decoder blocks'
`adaln`: see `deco.optimized.layers.PixelDecoder`); a LoRA there would change nothing, so
`resolve_targets` leaves them out, found by running the model once on a one-patch input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from deco.atomic import atomic_write

#: diffusers' file name for LoRA weights (`LORA_WEIGHT_NAME_SAFE`).
ADAPTER_NAME = "pytorch_lora_weights.safetensors"
#: Key prefix of the transformer's LoRA tensors in a pipeline's file (see the module docstring).
KEY_PREFIX = "transformer.model."
#: Prefix of the LoraConfig fields in the metadata.
METADATA_PREFIX = "transformer."
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
#: Default targets (module-name suffixes): the attention and MLP products of the DiT blocks (and
#: of the text model's refine blocks), for the class models and for the text model.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "class": ("qkv", "proj", "w1", "w2", "w3"),
    "text": ("qkv", "kv_text", "proj", "w12", "w3"),
}
M = TypeVar("M", bound=nn.Module)
ADAPTER = "default"  # peft's adapter name inside the model
MAX_RANK = 4096  # a file's rank above this is refused before any allocation

__all__ = [
    "ADAPTER_NAME",
    "DEFAULT_TARGETS",
    "KEY_PREFIX",
    "adapter_shapes",
    "adapter_state",
    "add_lora",
    "has_lora",
    "load_adapter",
    "merge_adapter",
    "read_adapter",
    "resolve_targets",
    "save_adapter",
    "trainable_count",
]


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ImportError(f"LoRA needs peft (pip install 'deco-diffusion[lora]'): {exc}") from None
    return peft


#: The layer types a LoRA can adapt, and the names of their A and B tensors in a file.
ADAPTABLE = (nn.Linear, nn.Embedding)
PARTS: dict[type[nn.Module], tuple[str, str]] = {nn.Linear: ("lora_A.weight", "lora_B.weight"),
                                                  nn.Embedding: ("lora_embedding_A", "lora_embedding_B")}


def _split_key(key: str) -> tuple[str, type[nn.Module], int] | None:
    """("blocks.0.attn.qkv", nn.Linear, 0) for "blocks.0.attn.qkv.lora_A.weight" (0: A, 1: B);
    None for a key that is no LoRA tensor."""
    for kind, parts in PARTS.items():
        for i, part in enumerate(parts):
            if key.endswith("." + part) and len(key) > len(part) + 1:
                return key[: -len(part) - 1], kind, i
    return None


def adapter_shapes(kind: type[nn.Module], weight: Sequence[int], rank: int
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of A and B of a rank-`rank` LoRA of a layer of `kind` whose weight has shape
    `weight` (peft's: a linear's (out, in) gets A (r, in), B (out, r); an embedding's (rows,
    width) gets A (r, rows), B (width, r))."""
    first, second = weight
    if kind is nn.Embedding:
        return (rank, first), (second, rank)
    return (rank, second), (first, rank)


def _want(layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`adapter_shapes` of a linear or embedding `layer` of the model."""
    weight = layer.weight
    assert isinstance(weight, Tensor)
    return adapter_shapes(nn.Embedding if isinstance(layer, nn.Embedding) else nn.Linear,
                          tuple(weight.shape), rank)


def has_lora(model: nn.Module) -> bool:
    """Whether peft LoRA layers are in the model."""
    return any(".lora_A." in name or ".lora_embedding_A." in name for name, _ in model.named_parameters())


def _called_layers(model: nn.Module) -> set[str]:
    """Names of the linears and embeddings whose forward runs in one forward pass on a one-patch input."""
    cfg: Any = model.config
    called: set[str] = set()
    hooks = [module.register_forward_hook(lambda *_, n=name: called.add(n))
             for name, module in model.named_modules() if isinstance(module, ADAPTABLE)]
    param = next(model.parameters())
    x = torch.zeros(1, cfg.in_channels, cfg.patch_size, cfg.patch_size, device=param.device,
                    dtype=param.dtype)
    cond = (torch.zeros(1, cfg.text_length, cfg.text_dim, device=param.device, dtype=param.dtype)
            if cfg.is_text else torch.zeros(1, dtype=torch.long, device=param.device))
    try:
        with torch.no_grad():
            model(x, torch.full((1,), 0.5, device=param.device), cond)
    finally:
        for hook in hooks:
            hook.remove()
    return called


def resolve_targets(model: nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """The full names of the model's linears (and embeddings: "y_embed") that `targets` name
    (None: `DEFAULT_TARGETS` of the model's kind): a target is a module-name suffix ("qkv"
    matches every `blocks.N.attn.qkv`) or a full name. Linears the forward does not call (their
    weight is folded into another product, so LoRA there would have no effect) are left out:
    "adaln" takes the DiT blocks' and not the decoder blocks'. Errors (ValueError, naming
    `lora_targets`) for a target that matches no layer, or only layers that are not called."""
    if targets is None:
        targets = DEFAULT_TARGETS["text" if getattr(model.config, "is_text", False) else "class"]
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"lora_targets: expected a non-empty list of module names, got {targets!r}")
    linears = [name for name, m in model.named_modules() if isinstance(m, ADAPTABLE)]
    matched: list[str] = []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"lora_targets: {target!r} names no linear or embedding layer of "
                             f"this model (their names end in {', '.join(suffixes)})")
        matched += [n for n in hits if n not in matched]
    called = _called_layers(model)
    for target in targets:
        hits = [n for n in matched if n == target or n.endswith("." + target)]
        if not any(n in called for n in hits):
            raise ValueError(f"lora_targets: {hits[0]} is not called by the model's forward (its weight "
                             f"is folded into another product), so a LoRA there would do nothing")
    return [n for n in matched if n in called]


def add_lora(model: M, rank: int, targets: Sequence[str], alpha: float | None = None,
             rslora: bool = False) -> M:
    """Wrap the layers `targets` (full names, `resolve_targets`) with peft LoRA layers of rank
    `rank`, scale alpha / rank (alpha default: rank; rslora: alpha / sqrt(rank)), B = 0 (the
    model is unchanged until trained); freeze everything else. Returns the model (in place)."""
    peft = _peft()
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise ValueError(f"lora_rank: expected an int in 1..{MAX_RANK}, got {rank!r}")
    if has_lora(model):
        raise ValueError("model: already has LoRA layers")
    # One regex of the exact names: peft reads a list as name *suffixes*, and "blocks.0.adaln"
    # would also take "decoder.blocks.0.adaln". The optional "model." is the diffusers wrapper's.
    pattern = r"(?:model\.)?(?:" + "|".join(re.escape(t) for t in targets) + ")"
    config = peft.LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha,
                             target_modules=pattern, lora_dropout=0.0, bias="none", use_rslora=rslora)
    model.requires_grad_(False)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # in place
    model._deco_lora_config = config  # what save_adapter records
    return model


def trainable_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors under their file keys (`KEY_PREFIX` + module + .lora_A/B.weight)."""
    peft = _peft()
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER)
    if not state:
        raise ValueError("model: has no LoRA layers")
    return {KEY_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write the adapter as diffusers writes a pipeline's LoRA (module docstring), atomically."""
    config: Any = getattr(model, "_deco_lora_config", None)
    if config is None:
        config = getattr(model, "peft_config")[ADAPTER]  # noqa: B009  # peft's record on the model
    fields = {METADATA_PREFIX + k: sorted(v) if isinstance(v, set) else v
              for k, v in config.to_dict().items()}
    meta = {"format": "pt", METADATA_KEY: json.dumps(fields, indent=2, sort_keys=True, default=str)}
    tensors = adapter_state(model)
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(LoRA settings {"r", "lora_alpha", "use_rslora"}, tensors by module: {module: A, B}
    flattened as "module.lora_A.weight" ...) of an adapter file, checked: safetensors, every key
    `KEY_PREFIX`<module>.lora_A|lora_B.weight (an embedding's: .lora_embedding_A|B), 2-D float
    tensors, A (r, in) and B (out, r) of one rank per module, both of one kind. Without
    metadata, alpha = rank (diffusers' rule). ValueError names `lora`."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
            bad = [k for k in keys if not (k.startswith(KEY_PREFIX) and _split_key(k[len(KEY_PREFIX):]))]
            if bad or not keys:
                raise ValueError(f"{path} is not a DeCo LoRA adapter (key {bad[0] if bad else 'none'!r}; "
                                 f"expected {KEY_PREFIX}<module>.lora_A.weight / .lora_B.weight, or "
                                 f".lora_embedding_A / _B)")
            wrong = [k for k in keys if len(shapes[k]) != 2 or dtypes[k] not in ("F16", "BF16", "F32", "F64")]
            if wrong:
                raise ValueError(f"{path}: {wrong[0]} must be a 2-D float tensor, got {dtypes[wrong[0]]} "
                                 f"{shapes[wrong[0]]}")
            found: dict[str, dict[int, tuple[type[nn.Module], tuple[int, ...]]]] = {}
            for k in keys:
                module, kind, ab = _split_key(k[len(KEY_PREFIX):]) or ("", nn.Linear, 0)
                found.setdefault(module, {})[ab] = kind, shapes[k]
            ranks = set()
            for m, parts in sorted(found.items()):
                a, b = (parts.get(i, (None, None)) for i in (0, 1))
                if a[1] is None or b[1] is None or a[0] is not b[0] or a[1][0] != b[1][1] \
                        or not 1 <= a[1][0] <= MAX_RANK:
                    raise ValueError(f"{path}: {m} needs lora_A (r, in) and lora_B (out, r) (or "
                                     f"lora_embedding_A and _B) with one rank r in 1..{MAX_RANK}, got "
                                     f"{a[1]} and {b[1]}")
                ranks.add(a[1][0])
            tensors = {k[len(KEY_PREFIX):]: f.get_tensor(k).float() for k in keys}
    except (OSError, RuntimeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    if len(ranks) != 1:
        raise ValueError(f"{path}: modules of different ranks {sorted(ranks)} are not supported")
    rank = ranks.pop()
    settings: dict[str, Any] = {"r": rank, "lora_alpha": float(rank), "use_rslora": False}
    if METADATA_KEY in meta:
        try:
            fields = json.loads(meta[METADATA_KEY])
        except ValueError:
            raise ValueError(f"{path}: its {METADATA_KEY} metadata is not JSON") from None
        if not isinstance(fields, dict):
            fields = {}
        fields = {k.removeprefix(METADATA_PREFIX): v for k, v in fields.items()}
        if fields.get("r", rank) != rank or fields.get("use_dora") or fields.get("rank_pattern") \
                or fields.get("alpha_pattern"):
            raise ValueError(f"{path}: only plain LoRA of one rank is supported (metadata r="
                             f"{fields.get('r')}, use_dora={fields.get('use_dora')}, rank/alpha patterns)")
        alpha = fields.get("lora_alpha", rank)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
        settings.update(lora_alpha=float(alpha), use_rslora=bool(fields.get("use_rslora", False)))
    return settings, tensors


def load_adapter(model: M, path: str | Path) -> M:
    """Add the adapter in `path` to a plain model (unmerged peft layers, all weights frozen);
    the file's modules and shapes are checked against the model first."""
    peft = _peft()
    settings, tensors = read_adapter(path)
    modules = dict(model.named_modules())
    targets = set()
    for key, value in tensors.items():
        name, kind, ab = _split_key(key) or ("", nn.Linear, 0)  # read_adapter checked every key
        layer = modules.get(name)
        if not isinstance(layer, kind):
            what = "an embedding" if kind is nn.Embedding else "a linear layer"
            raise ValueError(f"lora: {path} adapts {name}, which is not {what} of this model")
        want = _want(layer, settings["r"])[ab]
        if tuple(value.shape) != want:
            raise ValueError(f"lora: {path}: {key} has shape {tuple(value.shape)}, the model needs {want}")
        targets.add(name)
    add_lora(model, settings["r"], resolve_targets(model, sorted(targets)), alpha=settings["lora_alpha"],
             rslora=settings["use_rslora"])
    param = next(model.parameters())
    result = peft.set_peft_model_state_dict(
        model, {k: v.to(param.device, param.dtype) for k, v in tensors.items()}, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"lora: {path} does not fit the model ({(missing or result.unexpected_keys)[0]})")
    return model


def merge_adapter(model: M) -> M:
    """Fold every LoRA layer into its linear (peft's `merge`: W += scale B A) and put the plain
    linear back in its place: the model's state dict is the plain one again. In place."""
    peft = _peft()
    for name, module in list(model.named_modules()):
        if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "_deco_lora_config"):
        del model._deco_lora_config
    return model
