"""A rough estimate of the memory a training run needs, checked before anything is allocated.

A run that does not fit is otherwise killed by the kernel (exit 137) with no message, e.g. a
`--model cfg.json` of `{}` (every default: DeCo-XL/16) on a laptop. The estimate counts, in float32:
the weights, their gradients, AdamW's two moments, the EMA copy, one more copy of weights + EMA +
moments while a checkpoint is serialised, and the activations that backward keeps. It is an
order of magnitude, not an accounting: the refusal says the numbers, so a user can tell.
"""

from __future__ import annotations

import torch

from deco.config import DeCoConfig, parameter_count
from deco.errors import FieldError

GIB = 1024**3
#: float32 bytes per parameter: weights 4, gradient 4, AdamW moments 8, EMA 4, and the copy of
#: weights, EMA and moments (16) that writing a checkpoint makes.
BYTES_PER_PARAMETER = 36
#: float32 values per token and DiT block that backward keeps (normed inputs, q/k/v, attention
#: output, the SwiGLU's three F-wide products, residuals), in units of the hidden width.
ACTIVATIONS_PER_TOKEN = 24
#: The same per pixel and decoder block, in units of the decoder width.
ACTIVATIONS_PER_PIXEL = 10


def estimate_bytes(config: DeCoConfig, batch: int, resolution: int) -> int:
    """Bytes a training step of this process needs (see the module docstring)."""
    tokens = (resolution // config.patch_size) ** 2
    dit = ACTIVATIONS_PER_TOKEN * tokens * config.hidden_size * config.depth
    decoder = ACTIVATIONS_PER_PIXEL * resolution**2 * config.decoder_width * config.decoder_depth
    if config.architecture == "baseline":
        decoder = 0
    return BYTES_PER_PARAMETER * parameter_count(config) + 4 * batch * (dit + decoder)


def free_bytes(device: torch.device) -> int | None:
    """Free memory of the device: the GPU's, or the CPU's available RAM (Linux); None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(config: DeCoConfig, batch: int, resolution: int, device: torch.device,
                 free: int | None = None) -> None:
    """Refuse a run whose estimate exceeds the free memory, with a one-line FieldError("model")."""
    free = free_bytes(device) if free is None else free
    need = estimate_bytes(config, batch, resolution)
    if free is not None and need > free:
        raise FieldError(
            "model",
            f"this run needs about {need / GIB:.1f} GiB ({parameter_count(config):,} parameters with "
            f"gradients, AdamW state, EMA and a checkpoint copy, plus activations for a batch of "
            f"{batch} at {resolution}x{resolution}), but {device.type} has {free / GIB:.1f} GiB "
            f"free; choose a smaller --model or --batch-size",
        )

