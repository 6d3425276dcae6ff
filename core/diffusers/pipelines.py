"""diffusers pipelines for DeCo: `DeCoPipeline` (class-to-image) here and `DeCoTextPipeline`
(text-to-image, with a Qwen3 text encoder and its tokenizer as components, in pipelines_text.py).

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

Both take diffusers' common arguments: `num_images_per_prompt`, `generator` (one, or a list with
one per image), `latents`, `output_type` ("pil", "np", "pt", "latent"), `return_dict` and
`callback_on_step_end(pipe, step, timestep, callback_kwargs)` called after every model
evaluation with the tensors named in `callback_on_step_end_tensor_inputs` (a subset of
`pipe._callback_tensor_inputs`); the tensors it returns replace the pipeline's. During a call,
`pipe.guidance_scale` and `pipe.num_timesteps` are the current guidance scale (a callback may
change `pipe._guidance_scale`: the following steps use it) and the number of evaluations.
"""

# No `from __future__ import annotations` here: diffusers reads the pipelines' __init__
# annotations at run time (inspect.signature) to check the components it loads.
import json
import math
import numbers
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from deco.atomic import atomic_write
from deco.optimized.sampling import guidance_at, guided_velocity, time_grid

from .lora import DeCoLoraLoaderMixin
from .schedulers import DeCoScheduler
from .transformer import DeCoTransformer2DModel, lora_scale

#: The module written beside model_index.json for DiffusionPipeline.from_pretrained.
SHIM_MODULE = "pipeline_deco"
SHIM_SOURCE = '''"""DeCo pipelines for DiffusionPipeline.from_pretrained(folder, trust_remote_code=True): they
live in the installed package deco.diffusers (pip install "deco-diffusion[diffusers]")."""

from deco.diffusers import DeCoPipeline, DeCoTextPipeline

__all__ = ["DeCoPipeline", "DeCoTextPipeline"]
'''

#: Step = (scheduler timestep, DeCo time of the model call, the call's guidance scale as a
#: function of the pipeline's guidance scale: the scale inside the guidance interval, else 1).
Step = tuple[Tensor, float, Callable[[float], float]]
#: A step-end callback: (pipe, step index, timestep, tensors) -> tensors.
StepCallback = Callable[[Any, int, Tensor, dict[str, Tensor]], dict[str, Tensor]]


class TransformerVelocity:
    """The transformer as deco.optimized.sampling's VelocityModel, so that the pipelines guide
    with `deco.optimized.sampling.guided_velocity` itself. Calls go through the transformer's
    forward, where diffusers' offload hooks are attached."""

    def __init__(self, transformer: DeCoTransformer2DModel,
                 attention_kwargs: dict[str, Any] | None = None) -> None:
        self.transformer = transformer
        self.key = "encoder_hidden_states" if transformer.is_text else "class_labels"
        self.extra = {} if attention_kwargs is None else {"attention_kwargs": attention_kwargs}

    @property
    def config(self) -> Any:
        return self.transformer.deco_config

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Velocity (B, C, H, W) for x (B, C, H, W), t (B,) and the condition y."""
        out: Tensor = self.transformer(x, t, **{self.key: y}, **self.extra, return_dict=False)[0]
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

    #: The tensors a step-end callback may read and replace ("latents": the current sample).
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]
    #: The names under which a callback sees (cond, null); None: not shown (class labels).
    _condition_names: tuple[str, str] | None = None
    _guidance_scale = 1.0
    _num_timesteps = 0
    _attention_kwargs: dict[str, Any] | None = None

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of the running (or last) call."""
        return self._guidance_scale

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        """The running (or last) call's attention_kwargs ({"scale": LoRA scale} or None)."""
        return self._attention_kwargs

    @property
    def num_timesteps(self) -> int:
        """The number of model evaluations of the running (or last) call."""
        return self._num_timesteps

    def schedule(self, steps: int, timeshift: float, interval: tuple[float, float],
                 device: torch.device) -> list[Step]:
        """Set the scheduler to DeCo's grid and list its model evaluations."""
        scheduler = self.scheduler
        if isinstance(scheduler, DeCoScheduler):
            scheduler.set_timesteps(steps, device=device, timeshift=timeshift)
            return [(ts, t, partial(scheduler.guidance_scale, i, interval=interval))
                    for i, (ts, t) in enumerate(zip(scheduler.timesteps, scheduler.model_times,
                                                    strict=True))]
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            check_euler_scheduler(scheduler)
            grid = time_grid(steps, timeshift)
            # Euler decides guidance and calls the model at the float64 grid (spec/04 §2): the
            # scheduler's float32 sigmas could move a grid time across an interval bound.
            scheduler.set_timesteps(sigmas=[1.0 - t for t in grid[:-1]], device=device)
            return [(ts, t, partial(guidance_at, t, interval=interval))
                    for ts, t in zip(scheduler.timesteps, grid[:-1], strict=True)]
        raise TypeError(f"scheduler: expected FlowMatchEulerDiscreteScheduler, DeCoHeunScheduler or "
                        f"DeCoAdamsScheduler, got {type(scheduler).__name__}")

    def denoise(self, latents: Tensor, cond: Tensor, null: Tensor, steps: int,
                interval: tuple[float, float], timeshift: float,
                callback: StepCallback | None = None, callback_inputs: Sequence[str] = ()) -> Tensor:
        """Integrate from the noise `latents` (B, C, H, W) to the images (t = 1), guided with
        `self._guidance_scale` (read at every step: a callback may change it)."""
        x = latents
        model = TransformerVelocity(self.transformer, self._attention_kwargs)
        plan = self.schedule(steps, timeshift, interval, x.device)
        self._num_timesteps = len(plan)
        for i, (timestep, t, scale) in enumerate(self.progress_bar(plan)):
            v = guided_velocity(model, x, t, cond, null, scale(self._guidance_scale))  # spec/04 §2
            # diffusers' flow-matching output is d x / d sigma = -v (sigma = 1 - t).
            x = self.scheduler.step(-v, timestep, x, return_dict=False)[0]
            if callback is not None:
                x, cond, null = self.run_callback(callback, callback_inputs, i, timestep, x, cond, null)
        return x

    def run_callback(self, callback: StepCallback, names: Sequence[str], i: int, timestep: Tensor,
                     x: Tensor, cond: Tensor, null: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Call the step-end callback with the tensors `names`; take back what it returns."""
        state = {"latents": x}
        if self._condition_names is not None:
            state.update(zip(self._condition_names, (cond, null), strict=True))
        out = callback(self, i, timestep, {name: state[name] for name in names})
        if not isinstance(out, dict):
            raise TypeError(f"callback_on_step_end: expected it to return a dict of tensors, "
                            f"got {type(out).__name__}")
        x = out.get("latents", x)
        if self._condition_names is not None:
            cond, null = (out.get(name, value) for name, value in
                          zip(self._condition_names, (cond, null), strict=True))
        return x, cond, null

    def check_callback(self, callback: Any, names: Any) -> tuple[StepCallback | None, list[str]]:
        """callback_on_step_end (a function, a diffusers PipelineCallback or
        MultiPipelineCallbacks, or None) and the tensor names it reads."""
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            names = callback.tensor_inputs
        if callback is not None and not callable(callback):
            raise TypeError(f"callback_on_step_end: expected a callable, got {type(callback).__name__}")
        if isinstance(names, str) or not isinstance(names, Sequence) \
                or any(n not in self._callback_tensor_inputs for n in names):
            raise ValueError(f"callback_on_step_end_tensor_inputs: expected names among "
                             f"{self._callback_tensor_inputs}, got {names!r}")
        return callback, list(names)

    def prepare_latents(self, batch: int, height: int | None, width: int | None,
                        generator: Any, latents: Tensor | None) -> Tensor:
        """The starting noise (B, C, H, W): `latents` if given, else standard normal noise (a
        list of generators: one per image, or one for all, as diffusers' randn_tensor takes)."""
        cfg = self.transformer.deco_config
        device, dtype = self._execution_device, self.transformer.dtype
        if latents is not None:
            if not isinstance(latents, Tensor) or not latents.is_floating_point():
                raise TypeError(f"latents: expected a floating-point tensor, got {type(latents).__name__}")
            if latents.ndim != 4 or latents.shape[0] != batch or latents.shape[1] != cfg.in_channels:
                raise ValueError(f"latents: expected shape ({batch}, {cfg.in_channels}, H, W), "
                                 f"got {tuple(latents.shape)}")
            return latents.to(device=device, dtype=dtype)
        if isinstance(generator, list) and len(generator) not in (1, batch):
            raise ValueError(f"generator: a list needs one generator per image ({batch}) or "
                             f"one for all, got {len(generator)}")
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
        """class_labels (ids, names, or a mix; a tensor of ids; nested lists such as [[1], [1]]
        are flattened, as DiTPipeline does) -> (B,) ids in 0..null_class."""
        items = flatten_labels(class_labels)
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
        num_images_per_prompt: int = 1, callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  (diffusers' default)
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Sample `num_images_per_prompt` images per label (label-major order).
        guidance_interval (low, high): the steps whose scale is `guidance_scale` (Euler/Heun:
        low < t <= high at the step's start; Adams: low < t < high); elsewhere 1. timeshift:
        DeCo's time shift of the grid (spec/01 §3). latents: the starting noise (B, C, H, W),
        else drawn with `generator`. The callback arguments: the module doc. attention_kwargs:
        diffusers' {"scale": s}, the loaded LoRA adapters' scale (DeCoTransformer2DModel.forward).
        Returns an ImagePipelineOutput."""
        steps, guidance, interval, timeshift = check_settings(
            num_inference_steps, guidance_scale, guidance_interval, timeshift)
        repeats = check_count(num_images_per_prompt)
        callback, names = self.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        lora_scale(attention_kwargs)  # checked before any work
        if self.transformer.is_text:
            raise TypeError("transformer: DeCoPipeline needs a class-to-image model; "
                            "use DeCoTextPipeline for text-to-image")
        device = self._execution_device
        labels = self.class_ids(class_labels, device).repeat_interleave(repeats)
        x = self.prepare_latents(labels.shape[0], height, width, generator, latents)
        null = torch.full_like(labels, self.null_class)
        self._guidance_scale = guidance
        self._attention_kwargs = attention_kwargs
        images = self.denoise(x, labels, null, steps, interval, timeshift, callback, names)
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


def check_count(num_images_per_prompt: Any) -> int:
    """num_images_per_prompt: an int >= 1."""
    n = num_images_per_prompt
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"num_images_per_prompt: expected an int >= 1, got {n!r}")
    return int(n)


def flatten_labels(class_labels: Any) -> list[Any]:
    """class_labels as a flat list of items (ids or names): a tensor of integer ids, one id or
    name, or (nested) sequences of them."""
    if isinstance(class_labels, Tensor):
        if class_labels.is_floating_point() or class_labels.is_complex():
            raise TypeError(f"class_labels: expected integer ids, got dtype {class_labels.dtype}")
        items: list[Any] = class_labels.reshape(-1).tolist()
        return items
    if isinstance(class_labels, (int, str)) and not isinstance(class_labels, bool):
        return [class_labels]
    if isinstance(class_labels, Sequence):
        return [item for entry in class_labels for item in
                (flatten_labels(entry) if isinstance(entry, (Sequence, Tensor))
                 and not isinstance(entry, str) else [entry])]
    raise TypeError(f"class_labels: expected class ids or names, got {type(class_labels).__name__}")


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
