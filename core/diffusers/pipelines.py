"""diffusers pipelines for DeCo: `DeCoPipeline` (class-to-image) and `DeCoTextPipeline`
(text-to-image, with a Qwen3 text encoder and its tokenizer as components).

Both integrate DeCo's ODE from t = 0 (noise) to t = 1 (images) with classifier-free guidance
exactly as `deco.optimized.sample` does (spec/04): its `guided_velocity` (u + g (c - u) from one
batch [null; cond], the null branch skipped where the scale is 1) and the scheduler's own rule
for which steps are guided. The scheduler is diffusers' `FlowMatchEulerDiscreteScheduler` (Euler
on DeCo's grid, given as explicit sigmas = 1 - t) or `DeCoHeunScheduler` / `DeCoAdamsScheduler`.

Loading: `DeCoPipeline.from_pretrained(folder)` (or `DeCoTextPipeline`) reads a folder written by
`save_pretrained` or `deco convert CKPT DIR --to diffusers`. diffusers' generic
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works too: the folder holds a
one-line module, `pipeline_deco.py`, that imports these classes from the installed package
(diffusers looks pipeline classes up in its own namespace and accepts any other class only
through such a module).
"""

# No `from __future__ import annotations` here: diffusers reads the pipelines' __init__
# annotations at run time (inspect.signature) to check the components it loads.
import json
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from deco.atomic import atomic_write
from deco.config import RELEASE_SAMPLING
from deco.optimized.sampling import guidance_at, guided_velocity, time_grid

from .lora import DeCoLoraLoaderMixin
from .schedulers import DeCoScheduler
from .transformer import DeCoTransformer2DModel

#: The module written beside model_index.json for DiffusionPipeline.from_pretrained.
SHIM_MODULE = "pipeline_deco"
SHIM_SOURCE = '''"""DeCo pipelines for DiffusionPipeline.from_pretrained(folder, trust_remote_code=True): they
live in the installed package deco.diffusers (pip install "deco-diffusion[diffusers]")."""

from deco.diffusers import DeCoPipeline, DeCoTextPipeline

__all__ = ["DeCoPipeline", "DeCoTextPipeline"]
'''

#: Step = (scheduler timestep, DeCo time of the model call, guidance scale of the call).
Step = tuple[Tensor, float, float]


class TransformerVelocity:
    """The transformer as deco.optimized.sampling's VelocityModel, so that the pipelines guide
    with `deco.optimized.sampling.guided_velocity` itself. Calls go through the transformer's
    forward, where diffusers' offload hooks are attached."""

    def __init__(self, transformer: DeCoTransformer2DModel) -> None:
        self.transformer = transformer
        self.key = "encoder_hidden_states" if transformer.is_text else "class_labels"

    @property
    def config(self) -> Any:
        return self.transformer.deco_config

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Velocity (B, C, H, W) for x (B, C, H, W), t (B,) and the condition y."""
        out: Tensor = self.transformer(x, t, **{self.key: y}, return_dict=False)[0]
        return out


class DeCoPipelineBase(DiffusionPipeline, DeCoLoraLoaderMixin):  # type: ignore[misc]
    """The sampling loop, the argument checks, the output conversion and the folder format shared
    by the class- and text-conditioned pipelines; diffusers' LoRA loading (`DeCoLoraLoaderMixin`)."""

    transformer: DeCoTransformer2DModel
    scheduler: Any

    # ------------------------------------------------------------------------ folder format
    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """diffusers' save_pretrained, plus the module that lets DiffusionPipeline find the
        class (model_index.json names it as [module, class])."""
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        atomic_write(folder / f"{SHIM_MODULE}.py", lambda tmp: Path(tmp).write_text(SHIM_SOURCE))
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [SHIM_MODULE, type(self).__name__]
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        atomic_write(index_path, lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """ConfigMixin.load_config; the [module, class] pipeline name is read as this class, so
        that `DeCoPipeline.from_pretrained` runs no code from the folder."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        name = config.get("_class_name")
        if isinstance(name, list) and len(name) == 2 and name[0] == SHIM_MODULE:
            config["_class_name"] = name[1]
        return out

    # ----------------------------------------------------------------------------- sampling

    def schedule(self, steps: int, timeshift: float, guidance: float,
                 interval: tuple[float, float], device: torch.device) -> list[Step]:
        """Set the scheduler to DeCo's grid and list its model evaluations."""
        scheduler = self.scheduler
        if isinstance(scheduler, DeCoScheduler):
            scheduler.set_timesteps(steps, device=device, timeshift=timeshift)
            return [(ts, t, scheduler.guidance_scale(i, guidance, interval))
                    for i, (ts, t) in enumerate(zip(scheduler.timesteps, scheduler.model_times,
                                                    strict=True))]
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            check_euler_scheduler(scheduler)
            grid = time_grid(steps, timeshift)
            # Euler decides guidance and calls the model at the float64 grid (spec/04 §2): the
            # scheduler's float32 sigmas could move a grid time across an interval bound.
            scheduler.set_timesteps(sigmas=[1.0 - t for t in grid[:-1]], device=device)
            return [(ts, t, guidance_at(t, guidance, interval))
                    for ts, t in zip(scheduler.timesteps, grid[:-1], strict=True)]
        raise TypeError(f"scheduler: expected FlowMatchEulerDiscreteScheduler, DeCoHeunScheduler or "
                        f"DeCoAdamsScheduler, got {type(scheduler).__name__}")

    def denoise(self, latents: Tensor, cond: Tensor, null: Tensor, steps: int, guidance: float,
                interval: tuple[float, float], timeshift: float) -> Tensor:
        """Integrate from the noise `latents` (B, C, H, W) to the images (t = 1)."""
        x = latents
        model = TransformerVelocity(self.transformer)
        plan = self.schedule(steps, timeshift, guidance, interval, x.device)
        for timestep, t, scale in self.progress_bar(plan):
            v = guided_velocity(model, x, t, cond, null, scale)  # d x / d t, spec/04 §2
            # diffusers' flow-matching output is d x / d sigma = -v (sigma = 1 - t).
            x = self.scheduler.step(-v, timestep, x, return_dict=False)[0]
        return x

    def prepare_latents(self, batch: int, height: int | None, width: int | None,
                        generator: Any, latents: Tensor | None) -> Tensor:
        """The starting noise (B, C, H, W): `latents` if given, else standard normal noise."""
        cfg = self.transformer.deco_config
        device, dtype = self._execution_device, self.transformer.dtype
        if latents is not None:
            if not isinstance(latents, Tensor) or not latents.is_floating_point():
                raise TypeError(f"latents: expected a floating-point tensor, got {type(latents).__name__}")
            if latents.ndim != 4 or latents.shape[0] != batch or latents.shape[1] != cfg.in_channels:
                raise ValueError(f"latents: expected shape ({batch}, {cfg.in_channels}, H, W), "
                                 f"got {tuple(latents.shape)}")
            return latents.to(device=device, dtype=dtype)
        size = self.transformer.config.sample_size
        h, w = height or size, width or size
        for name, value in (("height", h), ("width", w)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % cfg.patch_size:
                raise ValueError(f"{name}: expected a positive multiple of the patch size "
                                 f"{cfg.patch_size}, got {value!r}")
        noise: Tensor = randn_tensor((batch, cfg.in_channels, h, w), generator=generator,
                                     device=device, dtype=dtype)
        return noise

    def finish(self, images: Tensor, output_type: str, return_dict: bool) -> Any:
        """Images in [-1, 1] -> `output_type`: "pil", "np" (B, H, W, C) or "pt" (B, C, H, W)
        in [0, 1]; "latent": the sampler's raw output, unclamped."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type: expected 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False, do_normalize=True)
        out = processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)


class DeCoPipeline(DeCoPipelineBase):
    """Class-to-image DeCo: `pipe(class_labels=[207, "tench"], guidance_scale=3.2,
    guidance_interval=(0.1, 1.0), num_inference_steps=100)` (the release's DeCo-XL 256 px
    setting). The null class is the transformer's `num_classes` (its config), not a constant."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DeCoTransformer2DModel, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        """The label of the unconditional branch, from the transformer's config."""
        return int(self.transformer.config.num_classes)

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> id from the transformer's `id2label` (names separated by commas are
        synonyms, as in the ImageNet synset lists); a name shared by two ids is left out."""
        table: dict[str, list[int]] = {}
        for key, names in (self.transformer.config.id2label or {}).items():
            for name in names.split(","):
                table.setdefault(name.strip(), []).append(int(key))
        return {name: ids[0] for name, ids in table.items() if len(set(ids)) == 1}

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class ids of ImageNet-style names (DiTPipeline.get_label_ids)."""
        names = [label] if isinstance(label, str) else list(label)
        table = self.labels
        if not table:
            raise ValueError("label: this model's config has no id2label; pass class ids")
        missing = [n for n in names if not isinstance(n, str) or n.strip() not in table]
        if missing:
            raise ValueError(f"label: {missing[0]!r} is not a class name of this model "
                             f"(see pipe.labels)")
        return [table[n.strip()] for n in names]

    def class_ids(self, class_labels: Any, device: torch.device) -> Tensor:
        """class_labels (ids, names, or a mix; a tensor of ids) -> (B,) ids in 0..null_class."""
        if isinstance(class_labels, Tensor):
            if class_labels.is_floating_point() or class_labels.is_complex():
                raise TypeError(f"class_labels: expected integer ids, got dtype {class_labels.dtype}")
            items = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (int, str)) and not isinstance(class_labels, bool):
            items = [class_labels]
        elif isinstance(class_labels, Sequence):
            items = list(class_labels)
        else:
            raise TypeError(f"class_labels: expected class ids or names, got {type(class_labels).__name__}")
        ids = []
        for item in items:
            if isinstance(item, str):
                ids.extend(self.get_label_ids(item))
            elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
                ids.append(int(item))
            else:
                raise TypeError(f"class_labels: expected class ids or names, got {item!r}")
        if not ids:
            raise ValueError("class_labels: expected at least one label")
        bad = [i for i in ids if not 0 <= i <= self.null_class]
        if bad:
            raise ValueError(f"class_labels: ids must lie in 0..{self.null_class} ({self.null_class} "
                             f"is the null class), got {bad[0]}")
        return torch.tensor(ids, dtype=torch.long, device=device)

    @torch.no_grad()
    def __call__(
        self, class_labels: Any, guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0), num_inference_steps: int = 50,
        timeshift: float = 1.0, height: int | None = None, width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
    ) -> Any:
        """Sample one image per label. guidance_interval (low, high): the steps whose scale is
        `guidance_scale` (Euler/Heun: low < t <= high at the step's start; Adams: low < t <
        high); elsewhere 1. timeshift: DeCo's time shift of the grid (spec/01 §3). latents: the
        starting noise (B, C, H, W), else drawn with `generator`. Returns an ImagePipelineOutput."""
        steps, guidance, interval, timeshift = check_settings(
            num_inference_steps, guidance_scale, guidance_interval, timeshift)
        if self.transformer.is_text:
            raise TypeError("transformer: DeCoPipeline needs a class-to-image model; "
                            "use DeCoTextPipeline for text-to-image")
        device = self._execution_device
        labels = self.class_ids(class_labels, device)
        x = self.prepare_latents(labels.shape[0], height, width, generator, latents)
        null = torch.full_like(labels, self.null_class)
        images = self.denoise(x, labels, null, steps, guidance, interval, timeshift)
        return self.finish(images, output_type, return_dict)


class DeCoTextPipeline(DeCoPipelineBase):
    """Text-to-image DeCo with a transformers text encoder (the release's Qwen3Model) and its
    tokenizer. Prompts are encoded as the release does (spec/06 §6): right padding to the model's
    text_length T with truncation, the encoder's last hidden states with padding positions kept
    (no mask downstream), width zero-padded or truncated to text_dim E. The null text is the
    negative prompt's encoding (default "", the release's unconditional text)."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module,
                 transformer: DeCoTransformer2DModel, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder,
                              transformer=transformer, scheduler=scheduler)

    def encode_prompt(self, prompt: str | Sequence[str], device: torch.device | None = None,
                      name: str = "prompt") -> Tensor:
        """Text-encoder states (B, T, E) for the prompts, in the transformer's dtype (errors
        name the argument `name`)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{name}: expected a string or a non-empty list of strings")
        cfg = self.transformer.deco_config
        device = device or self._execution_device
        tokens = self.tokenizer(prompts, padding="max_length", max_length=cfg.text_length,
                                truncation=True, return_tensors="pt", padding_side="right")
        states: Tensor = self.text_encoder(
            input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
        ).last_hidden_state  # (B, T, width of the encoder)
        width = states.shape[-1]
        if width < cfg.text_dim:
            pad = states.new_zeros(*states.shape[:-1], cfg.text_dim - width)
            states = torch.cat([states, pad], dim=-1)
        return states[..., : cfg.text_dim].to(self.transformer.dtype)

    def check_text(self, name: str, states: Any, batch: int | None) -> Tensor:
        """Text-encoder states (B, T, E) (`batch` None: any B >= 1; else (T, E), (1, T, E) or
        (batch, T, E)) on the execution device, in the transformer's dtype."""
        cfg = self.transformer.deco_config
        shape = (cfg.text_length, cfg.text_dim)
        if not isinstance(states, Tensor) or not states.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor (B, {shape[0]}, {shape[1]}), "
                            f"got {type(states).__name__}")
        if batch is not None and states.ndim == 2:
            states = states.unsqueeze(0)
        ok = states.ndim == 3 and tuple(states.shape[1:]) == shape and states.shape[0] >= 1
        if not ok or (batch is not None and states.shape[0] not in (1, batch)):
            raise ValueError(f"{name}: expected shape ({'B' if batch is None else batch}, "
                             f"{shape[0]}, {shape[1]}), got {tuple(states.shape)}")
        out: Tensor = states.to(device=self._execution_device, dtype=self.transformer.dtype)
        return out

    @torch.no_grad()
    def __call__(
        self, prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance_scale: float = RELEASE_SAMPLING["t2i"]["guidance"],
        guidance_interval: tuple[float, float] = RELEASE_SAMPLING["t2i"]["interval"],
        num_inference_steps: int = RELEASE_SAMPLING["t2i"]["steps"],
        timeshift: float = RELEASE_SAMPLING["t2i"]["timeshift"], height: int | None = None,
        width: int | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None, prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None, output_type: str = "pil",
        return_dict: bool = True,
    ) -> Any:
        """Sample one image per prompt. Defaults: the release's demo settings
        (`deco.config.RELEASE_SAMPLING["t2i"]`: 25 steps, guidance 4, time shift 3; its scheduler
        is Adams of order 2). prompt_embeds (B, T, E) /
        negative_prompt_embeds (T, E) or (B, T, E) replace the encoder's outputs. The other
        arguments are DeCoPipeline's."""
        steps, guidance, interval, timeshift = check_settings(
            num_inference_steps, guidance_scale, guidance_interval, timeshift)
        if not self.transformer.is_text:
            raise TypeError("transformer: DeCoTextPipeline needs a text-to-image model; "
                            "use DeCoPipeline for class labels")
        device = self._execution_device
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("prompt: pass exactly one of prompt and prompt_embeds")
        cond = self.encode_prompt(prompt, device) if prompt is not None else prompt_embeds
        assert cond is not None
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("negative_prompt: pass at most one of negative_prompt and "
                             "negative_prompt_embeds")
        null = negative_prompt_embeds
        if null is None:
            null = self.encode_prompt("" if negative_prompt is None else negative_prompt, device,
                                      name="negative_prompt")
        cond = self.check_text("prompt_embeds", cond, None)
        null = self.check_text("negative_prompt_embeds", null, cond.shape[0]).expand_as(cond)
        x = self.prepare_latents(cond.shape[0], height, width, generator, latents)
        images = self.denoise(x, cond, null, steps, guidance, interval, timeshift)
        return self.finish(images, output_type, return_dict)


def check_settings(steps: Any, guidance: Any, interval: Any,
                   timeshift: Any) -> tuple[int, float, tuple[float, float], float]:
    """Validate the sampler settings; errors name the pipeline's argument."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"num_inference_steps: expected an int >= 1, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance):
        raise ValueError(f"guidance_scale: expected a finite number, got {guidance!r}")
    if isinstance(interval, (str, bytes)) or not isinstance(interval, Sequence) or len(interval) != 2 \
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in interval):
        raise ValueError(f"guidance_interval: expected a pair (low, high), got {interval!r}")
    low, high = float(interval[0]), float(interval[1])
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"guidance_interval: expected 0 <= low <= high <= 1, got {(low, high)}")
    if isinstance(timeshift, bool) or not isinstance(timeshift, numbers.Real) \
            or not math.isfinite(timeshift) or timeshift <= 0:
        raise ValueError(f"timeshift: expected a finite number > 0, got {timeshift!r}")
    return int(steps), float(guidance), (low, high), float(timeshift)


def check_euler_scheduler(scheduler: FlowMatchEulerDiscreteScheduler) -> None:
    """The Euler scheduler must take DeCo's sigmas unchanged: no shift of its own (DeCo's time
    shift is the pipeline's `timeshift`), no sigma remapping, deterministic steps."""
    cfg = scheduler.config
    changes = {"shift": cfg.get("shift", 1.0) != 1.0, "shift_terminal": bool(cfg.get("shift_terminal"))}
    for flag in ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas",
                 "use_beta_sigmas", "invert_sigmas", "stochastic_sampling"):
        changes[flag] = bool(cfg.get(flag, False))
    bad = [name for name, changed in changes.items() if changed]
    if bad:
        raise ValueError(f"scheduler: FlowMatchEulerDiscreteScheduler must keep DeCo's grid "
                         f"unchanged; set {', '.join(bad)} to the defaults (use the pipeline's "
                         f"timeshift for DeCo's time shift)")
