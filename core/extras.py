"""Which optional extra of deco-diffusion installs a missing package: one table, one message.

A command that needs an optional package (onnx to export, transformers for a text encoder, ...)
imports it inside its handler; when it is missing, the import error (or a library's own error
raised from it, e.g. torch's "Module onnx is not installed!") is reported by `deco` in one line
naming the extra to install (`missing_extra`), exit status 2. Standard library only.
"""

from __future__ import annotations

#: Top-level module -> the extra of pyproject.toml that installs it (the first one, where several do).
MODULE_EXTRAS: dict[str, str] = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "openvino": "deploy",
    "transformers": "text",
    "tokenizers": "text",
    "webdataset": "text",
    "diffusers": "diffusers",
    "torch_fidelity": "metrics",
}

#: Commands (or flags) for which another extra than MODULE_EXTRAS's is the one to install: a
#: class-conditional run with REPA needs transformers for DINOv2 only ([repa], not [text]).
COMMAND_EXTRAS: dict[tuple[str, str], str] = {
    ("repa", "transformers"): "repa",
}


def install_command(extra: str) -> str:
    """What to run to get `extra`: pip install 'deco-diffusion[EXTRA]'."""
    return f"pip install 'deco-diffusion[{extra}]'"


def missing_module(exc: BaseException) -> str | None:
    """The top-level name of an optional module whose absence caused `exc` (found along its
    chain of causes), None when `exc` has another cause."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ImportError) and current.name:
            top = current.name.split(".")[0]
            if top in MODULE_EXTRAS:
                return top
        current = current.__cause__ or current.__context__
    return None


def missing_extra(exc: BaseException, command: str) -> str | None:
    """One line for a user when `exc` comes from a missing optional module: which package, and
    the extra that installs it; None otherwise. command: the deco sub-command (or "repa")."""
    module = missing_module(exc)
    if module is None:
        return None
    extra = COMMAND_EXTRAS.get((command, module), MODULE_EXTRAS[module])
    return f"needs the optional package {module}, which is not installed: {install_command(extra)}"
