"""DeCoPipeline and DeCoTextPipeline under diffusers' pipeline conventions, the checks of
diffusers' PipelineTesterMixin written as our own tests (encode_prompt in isolation,
num_images_per_prompt, per-image generators, callback_on_step_end, output types, nested class
labels), on tiny random models and a tiny random Qwen3.

Oracles: the same pipeline run image by image, the tokenizer and encoder called by hand, the
sampler's raw output ("latent") mapped to images by hand, and the pipeline's own earlier steps
(a callback sees the sample the next step starts from).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import rel_err, require_module, tiny_text_encoder, tiny_transformer

require_module("diffusers")
transformers = require_module("transformers")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from deco.diffusers import (  # noqa: E402
    DeCoAdamsScheduler,
    DeCoHeunScheduler,
    DeCoPipeline,
    DeCoTextPipeline,
)
from deco.optimized.flow import interpolate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a red fox in the snow"]


@pytest.fixture(scope="module")
def class_pipe() -> DeCoPipeline:
    pipe = DeCoPipeline(tiny_transformer("class"), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    folder = tiny_text_encoder(tmp_path_factory.mktemp("qwen3"), [*PROMPTS, "a bowl of fruit"])
    return (transformers.AutoTokenizer.from_pretrained(folder),
            transformers.AutoModel.from_pretrained(folder).eval())


@pytest.fixture(scope="module")
def text_pipe(encoder: tuple[Any, Any]) -> DeCoTextPipeline:
    pipe = DeCoTextPipeline(*encoder, tiny_transformer("text"), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    kwargs = {"num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "latent", **kwargs}
    out: torch.Tensor = pipe(*args, **kwargs).images
    return out


def seeds(*values: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(v) for v in values]


# ------------------------------------------------------------------------------ prompts
def test_encode_prompt_without_the_transformer(encoder: tuple[Any, Any],
                                               text_pipe: DeCoTextPipeline) -> None:
    """diffusers' test_encode_prompt_works_in_isolation: embeddings from a pipeline holding only
    the tokenizer and encoder drive a pipeline without them to the same images."""
    tokenizer, model = encoder
    alone = DeCoTextPipeline(tokenizer, model, None, None)
    with pytest.raises(ValueError, match=r"^max_sequence_length: needed without a transformer"):
        alone.encode_prompt(PROMPTS)
    with torch.no_grad():
        cond, null = alone.encode_prompt(PROMPTS, negative_prompt="a bowl", max_sequence_length=6)
        ids = tokenizer(PROMPTS, padding="max_length", max_length=6, truncation=True,
                        return_tensors="pt")
        by_hand = model(**ids).last_hidden_state  # (2, 6, 32): the encoder's width
    assert null is not None and cond.shape == null.shape == (2, 6, 32)
    assert torch.equal(cond, by_hand)
    embeds_only = DeCoTextPipeline(None, None, text_pipe.transformer, FlowMatchEulerDiscreteScheduler())
    embeds_only.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = sample(text_pipe, PROMPTS, negative_prompt="a bowl", latents=noise)
    got = sample(embeds_only, prompt_embeds=cond, negative_prompt_embeds=null, latents=noise)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match=r"^prompt: this pipeline has no tokenizer"):
        sample(embeds_only, PROMPTS)


def test_encode_prompt_signature_and_repeats(text_pipe: DeCoTextPipeline) -> None:
    cond, null = text_pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert null is None and cond.shape == (2, 6, 24)  # the transformer's text_dim: truncated
    many, neg = text_pipe.encode_prompt(PROMPTS, num_images_per_prompt=3)
    assert neg is not None and many.shape == neg.shape == (6, 6, 24)
    assert torch.equal(many, cond.repeat_interleave(3, dim=0))
    assert torch.equal(neg, text_pipe.encode_prompt("")[0].expand(6, -1, -1))
    with pytest.raises(ValueError, match=r"^max_sequence_length: expected the transformer's text_length 6"):
        text_pipe.encode_prompt(PROMPTS, max_sequence_length=8)


# ------------------------------------------------------------------- images and generators
def test_num_images_per_prompt_with_a_generator_per_image(class_pipe: DeCoPipeline,
                                                          text_pipe: DeCoTextPipeline) -> None:
    """Image k of a batch equals the image sampled alone from generator k. Tolerance: a batch and
    a single image round differently in float32; one evaluation of this random model differs by
    5e-6 of its size, three steps guided with scale 3 by up to 1.6e-5 (measured): bound 5e-5."""
    batch = sample(class_pipe, [1, 2], num_images_per_prompt=2, generator=seeds(10, 11, 12, 13))
    assert batch.shape == (4, 3, 16, 16)
    for k, label in enumerate([1, 1, 2, 2]):
        alone = sample(class_pipe, [label], generator=seeds(10 + k))
        assert rel_err(batch[k : k + 1].numpy(), alone.numpy()) < 5e-5
    texts = sample(text_pipe, PROMPTS, num_images_per_prompt=2, generator=seeds(1, 2, 3, 4))
    assert texts.shape == (4, 3, 16, 16)
    alone = sample(text_pipe, PROMPTS[1], generator=seeds(4))
    assert rel_err(texts[3:].numpy(), alone.numpy()) < 5e-5
    with pytest.raises(ValueError, match=r"^generator: a list needs one generator per image \(4\)"):
        sample(class_pipe, [1, 2], num_images_per_prompt=2, generator=seeds(1, 2, 3))
    with pytest.raises(ValueError, match=r"^num_images_per_prompt: expected an int >= 1"):
        sample(class_pipe, [1], num_images_per_prompt=0)


def test_nested_class_labels_are_flattened(class_pipe: DeCoPipeline) -> None:
    """DiTPipeline's convention: class_labels=[[1], [2]] is [1, 2]."""
    expected = sample(class_pipe, [1, 2], generator=seeds(5))
    assert torch.equal(sample(class_pipe, [[1], [2]], generator=seeds(5)), expected)
    assert torch.equal(sample(class_pipe, torch.tensor([[1], [2]]), generator=seeds(5)), expected)
    with pytest.raises(TypeError, match=r"^class_labels: expected class ids or names"):
        sample(class_pipe, [[1.5]])


def test_output_types(class_pipe: DeCoPipeline) -> None:
    """"np" (B, H, W, C) and "pt" (B, C, H, W) are the raw sample mapped from [-1, 1] to [0, 1]
    and clipped; "pil" its 8-bit rounding; return_dict=False a tuple."""
    raw = sample(class_pipe, [3, 4], generator=seeds(7))
    expected = (raw / 2 + 0.5).clamp(0, 1)
    pt = sample(class_pipe, [3, 4], generator=seeds(7), output_type="pt")
    torch.testing.assert_close(pt, expected, rtol=0, atol=1e-7)
    arr = class_pipe([3, 4], num_inference_steps=3, guidance_scale=3.0, generator=seeds(7),
                     output_type="np", return_dict=False)
    assert isinstance(arr, tuple) and isinstance(arr[0], np.ndarray)
    np.testing.assert_allclose(arr[0], expected.permute(0, 2, 3, 1).numpy(), atol=1e-7)
    pil = class_pipe([3, 4], num_inference_steps=3, guidance_scale=3.0, generator=seeds(7)).images
    assert len(pil) == 2 and pil[0].size == (16, 16)
    assert np.array_equal(np.asarray(pil[1]), (arr[0][1] * 255).round().astype(np.uint8))


# ----------------------------------------------------------------------------- callbacks
def test_callback_sees_every_step_and_replaces_latents(class_pipe: DeCoPipeline) -> None:
    calls: list[tuple[int, float, torch.Tensor]] = []

    def record(pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        assert set(tensors) == {"latents"}
        calls.append((i, float(t), tensors["latents"].clone()))
        return tensors

    out = sample(class_pipe, [1, 2], generator=seeds(3), num_inference_steps=4,
                 callback_on_step_end=record)
    assert [c[0] for c in calls] == [0, 1, 2, 3] and class_pipe.num_timesteps == 4
    assert [c[1] for c in calls] == class_pipe.scheduler.timesteps.tolist()
    assert torch.equal(calls[-1][2], out)  # the last step's sample is the output

    def zero_last(pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if i == pipe.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    assert sample(class_pipe, [1], generator=seeds(3), callback_on_step_end=zero_last).abs().sum() == 0

    def restart(pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"latents": calls[1][2][:1]} if i == 1 else tensors

    # Replacing step 1's result by the recorded one of the 4-step run continues that run.
    got = sample(class_pipe, [1], generator=seeds(99), num_inference_steps=4, callback_on_step_end=restart)
    assert rel_err(got.numpy(), out[:1].numpy()) < 5e-5  # batch rounding, as above


def test_callback_changes_guidance_and_counts_evaluations(text_pipe: DeCoTextPipeline) -> None:
    """diffusers' test_callback_cfg: the scale read at every step is pipe._guidance_scale; the
    Heun scheduler's callbacks come once per model evaluation (2N - 1 for exact Heun)."""
    seen: list[tuple[int, ...]] = []

    def bump(pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        seen.append(tuple(tensors["prompt_embeds"].shape) + tuple(tensors["negative_prompt_embeds"].shape))
        pipe._guidance_scale += 1.0
        return tensors

    text_pipe.scheduler = DeCoHeunScheduler(exact=True)
    try:
        bumped = sample(text_pipe, PROMPTS, generator=seeds(8), callback_on_step_end=bump,
                        callback_on_step_end_tensor_inputs=text_pipe._callback_tensor_inputs)
        plain = sample(text_pipe, PROMPTS, generator=seeds(8))
    finally:
        text_pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    assert text_pipe.num_timesteps == 5 and len(seen) == 5 and seen[0] == (2, 6, 24, 2, 6, 24)
    assert text_pipe.guidance_scale == 3.0  # the last call, without the callback
    assert not torch.allclose(bumped, plain, atol=1e-3)
    with pytest.raises(ValueError, match=r"^callback_on_step_end_tensor_inputs: expected names"):
        sample(text_pipe, PROMPTS, callback_on_step_end=bump,
               callback_on_step_end_tensor_inputs=["noise_pred"])


def test_callback_guidance_matches_upstream_rule(class_pipe: DeCoPipeline) -> None:
    def bump(pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        pipe._guidance_scale += 1.0
        return tensors

    sample(class_pipe, [1], guidance_scale=2.0, callback_on_step_end=bump)
    assert class_pipe.guidance_scale == 2.0 + class_pipe.num_timesteps


def test_save_load_keeps_the_attention_and_pipeline(class_pipe: DeCoPipeline, tmp_path: Path) -> None:
    expected = sample(class_pipe, [1], generator=seeds(2))
    class_pipe.save_pretrained(tmp_path)
    loaded = DeCoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(sample(loaded, [1], generator=seeds(2)), expected)


@pytest.mark.parametrize("make", [DeCoHeunScheduler, DeCoAdamsScheduler])
def test_scheduler_common_api(make: Any) -> None:
    """diffusers' SchedulerCommonTest public API: init_noise_sigma, scale_model_input, and
    add_noise at the scheduler's own timesteps = DeCo's interpolation (deco.optimized.flow) at
    the plan's times; float32 timesteps: 1e-6."""
    scheduler = make()
    scheduler.set_timesteps(6, timeshift=3.0)
    x, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    assert scheduler.init_noise_sigma == 1.0 and scheduler.scale_model_input(x, 5) is x
    expected = interpolate(x, noise, torch.tensor(scheduler.model_times, dtype=torch.float32))
    torch.testing.assert_close(scheduler.add_noise(x, noise, scheduler.timesteps), expected,
                               rtol=0, atol=1e-6)
    ends = scheduler.add_noise(x[:2], noise[:2], torch.tensor([0.0, 1000.0]))
    assert torch.equal(ends[0], x[0]) and torch.equal(ends[1], noise[1])
