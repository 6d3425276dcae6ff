"""Writing a diffusers pipeline folder from a DeCo checkpoint (`deco convert ... --to diffusers`).

The folder holds model_index.json, transformer/ (config.json + safetensors), scheduler/ and,
for the text-to-image model, text_encoder/ and tokenizer/ (re-saved from the given folder):
the release's default samplers, Euler for class-to-image and Adams of order 2 for text-to-image.
It is written under a temporary name beside the target and renamed into place, so a reader
never sees a half-written folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from deco.optimized.weights import load_weights
from deco.output_policy import write_folder

from .pipelines import DeCoPipeline, DeCoPipelineBase
from .pipelines_text import DeCoTextPipeline
from .schedulers import DeCoAdamsScheduler
from .transformer import DeCoTransformer2DModel


def imagenet_id2label() -> dict[str, str]:
    """The 1000 ImageNet-1k class names, id -> name (the class order of ImageNet training
    folders sorted by synset, as the release trains; names as torchvision lists them)."""
    text = resources.files("deco.diffusers").joinpath("imagenet_classes.txt").read_text()
    names = text.splitlines()
    return {str(i): name for i, name in enumerate(names)}


def read_id2label(path: str | Path) -> dict[str, str]:
    """A text file with one class name per line, line i naming class i."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels: no such file: {path}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return {str(i): name for i, name in enumerate(names)}


def build_pipeline(checkpoint: str | Path, *, weights: str = "ema", text_encoder: str | Path | None = None,
                   id2label: dict[str, str] | None = None, sample_size: int = 256,
                   dtype: torch.dtype | None = None) -> DeCoPipelineBase:
    """The pipeline of a release `.ckpt` or a DeCo `.safetensors` file (either model kind);
    the transformer in `dtype` (default: as stored)."""
    config, state = load_weights(checkpoint, weights)
    if config.is_text and text_encoder is None:
        raise ValueError("text_encoder: a text-to-image checkpoint needs the folder of its text "
                         "encoder and tokenizer (the release: Qwen3-1.7B), e.g. --text-encoder DIR")
    if not config.is_text and text_encoder is not None:
        raise ValueError("text_encoder: only a text-to-image checkpoint takes a text encoder")
    if id2label is None and not config.is_text and config.num_classes == 1000:
        id2label = imagenet_id2label()
    with torch.device("meta"):  # every parameter is assigned from the file below
        transformer = DeCoTransformer2DModel(**config.to_dict(), id2label=id2label,
                                             sample_size=sample_size)
    transformer.model.load_state_dict(state, strict=True, assign=True)
    transformer.eval()
    if dtype is not None:
        # nn.Module's own cast: diffusers' `to` warns on any dtype cast that "modules ... should
        # be kept in float32: []" even when the list is empty, as it is for DeCo.
        torch.nn.Module.to(transformer, dtype)
    if text_encoder is None:
        return DeCoPipeline(transformer, FlowMatchEulerDiscreteScheduler())
    tokenizer, encoder = load_text_encoder(text_encoder)
    return DeCoTextPipeline(tokenizer, encoder, transformer, DeCoAdamsScheduler(order=2))


def load_text_encoder(folder: str | Path) -> tuple[Any, Any]:
    """(tokenizer, text encoder's base model) from a transformers folder, offline."""
    from transformers import AutoModel, AutoTokenizer  # here: transformers is an optional extra

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"text_encoder: {folder} is not a transformers model folder "
                                f"(no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    return tokenizer, encoder


def write_pipeline(checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                   **options: Any) -> DeCoPipelineBase:
    """Convert `checkpoint` into the pipeline folder `out_dir`, which must not exist yet unless
    `overwrite` (then it is replaced as a whole: deco.output_policy.write_folder); `options` are
    `build_pipeline`'s. Returns the pipeline."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output: {out} already exists")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output: folder {out.parent} does not exist")
    pipe = build_pipeline(checkpoint, **options)
    write_folder(out, pipe.save_pretrained)
    return pipe
