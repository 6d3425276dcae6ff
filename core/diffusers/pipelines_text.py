"""`DeCoTextPipeline`: text-to-image DeCo in diffusers, with a transformers text encoder (the
release's Qwen3Model) and its tokenizer as components. The sampling loop, the common arguments
and the folder format are `DeCoPipelineBase`'s (pipelines.py).

Prompts are encoded as the release does (spec/06 §6): right padding to the model's text_length
T with truncation, the encoder's last hidden states with padding positions kept (no mask
downstream), width zero-padded or truncated to the model's text_dim E. `encode_prompt` has
diffusers' signature and return and runs without the transformer (then T must be given as
`max_sequence_length`, and the states keep the encoder's width: the pipeline fits the width
when they come back as `prompt_embeds`).
"""

# No `from __future__ import annotations`: diffusers reads __init__'s annotations at run time.
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from deco.config import RELEASE_SAMPLING

from .pipelines import DeCoPipelineBase, StepCallback, check_count, check_settings
from .transformer import DeCoTransformer2DModel, lora_scale


class DeCoTextPipeline(DeCoPipelineBase):
    """Text-to-image DeCo. The null text is the negative prompt's encoding (default "", the
    release's unconditional text)."""

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _condition_names = ("prompt_embeds", "negative_prompt_embeds")

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module,
                 transformer: DeCoTransformer2DModel, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder,
                              transformer=transformer, scheduler=scheduler)

    # ---------------------------------------------------------------------------- prompts
    def encode_prompt(
        self, prompt: str | Sequence[str] | None,
        negative_prompt: str | Sequence[str] | None = None,
        do_classifier_free_guidance: bool = True, num_images_per_prompt: int = 1,
        prompt_embeds: Tensor | None = None, negative_prompt_embeds: Tensor | None = None,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
        max_sequence_length: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(prompt_embeds (B * n, T, E), negative_prompt_embeds (B * n, T, E) or None without
        classifier-free guidance), n = num_images_per_prompt, each prompt's rows together.

        negative_prompt: one string for every prompt (default "") or one per prompt. Given
        embeddings are used as they are (repeated n times). T: `max_sequence_length`, default
        the transformer's text_length; E: the transformer's text_dim, or the encoder's width
        when there is no transformer. dtype: default the transformer's (else the encoder's)."""
        repeats = check_count(num_images_per_prompt)
        device = device or self._execution_device
        length = self.text_length(max_sequence_length)
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("prompt: pass prompt or prompt_embeds")
            prompt_embeds = self.encode_text(prompt, device, length, "prompt")
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative = "" if negative_prompt is None else negative_prompt
            batch = prompt_embeds.shape[0]
            if isinstance(negative, str):  # one encoding for every prompt
                negative_prompt_embeds = self.encode_text(negative, device, length,
                                                          "negative_prompt").expand(batch, -1, -1)
            else:
                negative_prompt_embeds = self.encode_text(negative, device, length, "negative_prompt")
                if negative_prompt_embeds.shape[0] != batch:
                    raise ValueError(f"negative_prompt: expected one string or {batch} (one per "
                                     f"prompt), got {negative_prompt_embeds.shape[0]}")
        if dtype is None:
            dtype = self.transformer.dtype if self.transformer is not None else self.text_encoder.dtype
        prompt_embeds = prompt_embeds.repeat_interleave(repeats, dim=0).to(device=device, dtype=dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(repeats, dim=0).to(
                device=device, dtype=dtype)
        return prompt_embeds, negative_prompt_embeds

    def text_length(self, max_sequence_length: Any) -> int:
        """T: `max_sequence_length`, which must equal the transformer's text_length when there
        is a transformer (its text position table has that length)."""
        model_length = None if self.transformer is None else self.transformer.deco_config.text_length
        if max_sequence_length is None:
            if model_length is None:
                raise ValueError("max_sequence_length: needed without a transformer (the "
                                 "transformer's text_length)")
            return int(model_length)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or max_sequence_length < 1 or max_sequence_length != (model_length or max_sequence_length):
            raise ValueError(f"max_sequence_length: expected the transformer's text_length "
                             f"{model_length}, got {max_sequence_length!r}" if model_length else
                             f"max_sequence_length: expected an int >= 1, got {max_sequence_length!r}")
        return max_sequence_length

    def encode_text(self, prompt: str | Sequence[str], device: torch.device, length: int,
                    name: str) -> Tensor:
        """Text-encoder states (B, T, E) of the prompts (E: the transformer's text_dim, else the
        encoder's width); errors name the argument `name`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{name}: expected a string or a non-empty list of strings")
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(f"{name}: this pipeline has no tokenizer/text encoder; pass {name}_embeds")
        tokens = self.tokenizer(prompts, padding="max_length", max_length=length,
                                truncation=True, return_tensors="pt", padding_side="right")
        states: Tensor = self.text_encoder(
            input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
        ).last_hidden_state  # (B, T, width of the encoder)
        return states if self.transformer is None else self.fit_width(states)

    def fit_width(self, states: Tensor) -> Tensor:
        """(B, T, E') -> (B, T, text_dim): zero-padded or truncated (spec/06 §6)."""
        text_dim = self.transformer.deco_config.text_dim
        width = states.shape[-1]
        if width < text_dim:
            states = torch.cat([states, states.new_zeros(*states.shape[:-1], text_dim - width)], dim=-1)
        return states[..., :text_dim]

    def check_text(self, name: str, states: Any, batch: int | None) -> Tensor:
        """Text-encoder states (B, T, E') (`batch` None: any B >= 1; else (1, T, E') or
        (batch, T, E')) on the execution device, in the transformer's dtype, width fitted to
        text_dim (E' is the encoder's width, as `encode_prompt` without a transformer gives)."""
        length = self.transformer.deco_config.text_length
        if not isinstance(states, Tensor) or not states.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor (B, {length}, E), "
                            f"got {type(states).__name__}")
        ok = states.ndim == 3 and states.shape[1] == length and states.shape[0] >= 1 \
            and states.shape[2] >= 1
        if not ok or (batch is not None and states.shape[0] not in (1, batch)):
            raise ValueError(f"{name}: expected shape ({'B' if batch is None else batch}, {length}, E) "
                             f"(E: the text encoder's width), got {tuple(states.shape)}")
        out: Tensor = self.fit_width(states).to(device=self._execution_device,
                                                dtype=self.transformer.dtype)
        return out

    # --------------------------------------------------------------------------- sampling
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
        return_dict: bool = True, num_images_per_prompt: int = 1,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  (diffusers' default)
        max_sequence_length: int | None = None, attention_kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Sample `num_images_per_prompt` images per prompt. Defaults: the release's demo
        settings (`deco.config.RELEASE_SAMPLING["t2i"]`: 25 steps, guidance 4, time shift 3; its
        scheduler is Adams of order 2). prompt_embeds (B, T, E) / negative_prompt_embeds (T, E)
        or (B, T, E) replace the encoder's outputs. The other arguments are DeCoPipeline's;
        max_sequence_length, if given, must be the transformer's text_length; attention_kwargs
        {"scale": s}: the loaded LoRA adapters' scale."""
        steps, guidance, interval, timeshift = check_settings(
            num_inference_steps, guidance_scale, guidance_interval, timeshift)
        repeats = check_count(num_images_per_prompt)
        callback, names = self.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        lora_scale(attention_kwargs)  # checked before any work
        if not self.transformer.is_text:
            raise TypeError("transformer: DeCoTextPipeline needs a text-to-image model; "
                            "use DeCoPipeline for class labels")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("prompt: pass exactly one of prompt and prompt_embeds")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("negative_prompt: pass at most one of negative_prompt and "
                             "negative_prompt_embeds")
        self.text_length(max_sequence_length)
        if prompt_embeds is not None:
            prompt_embeds = self.check_text("prompt_embeds", prompt_embeds, None)
        if negative_prompt_embeds is not None:
            if isinstance(negative_prompt_embeds, Tensor) and negative_prompt_embeds.ndim == 2:
                negative_prompt_embeds = negative_prompt_embeds.unsqueeze(0)  # (T, E): one for all
            batch = None if prompt_embeds is None else prompt_embeds.shape[0]
            negative_prompt_embeds = self.check_text("negative_prompt_embeds", negative_prompt_embeds,
                                                     batch)
        cond, null = self.encode_prompt(prompt, negative_prompt, True, 1, prompt_embeds,
                                        negative_prompt_embeds)
        assert null is not None
        null = self.check_text("negative_prompt_embeds", null, cond.shape[0]).expand_as(cond)
        cond, null = cond.repeat_interleave(repeats, dim=0), null.repeat_interleave(repeats, dim=0)
        x = self.prepare_latents(cond.shape[0], height, width, generator, latents)
        self._guidance_scale = guidance
        self._attention_kwargs = attention_kwargs
        images = self.denoise(x, cond, null, steps, interval, timeshift, callback, names)
        return self.finish(images, output_type, return_dict)
