"""diffusers' LoRA conventions on the DeCo pipelines, found by running diffusers' own
PeftLoraLoaderMixinTests against them (issue 27): `attention_kwargs={"scale": s}` scales the
loaded adapters for one call (and leaves set_adapters' weights as they were), and
`fuse_lora(lora_scale=s)` fuses at that scale, the class embedding's LoRA (`y_embed`, peft's
lora_embedding_A/B) included.

Oracle: the same pipeline on a copy of the transformer whose LoRA B matrices are multiplied by s
(the adapter's product B A is linear in B, so this is the adapter at scale s, reached without
any of the scaling code under test), and the transformer without adapters for s = 0.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers import rel_err, require_module, tiny_transformer

require_module("diffusers")
peft = require_module("peft")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from deco.diffusers import DeCoPipeline, DeCoTextPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: Targets by kind: linears of both models, and the class embedding of the class model.
TARGETS = {"class": ["qkv", "w2", "y_embed"], "text": ["qkv", "kv_text", "w12"]}
TOL = 1e-5  # float32: the same products, the adapter added in another order than a scaled B


def pipeline(kind: str, transformer: Any) -> Any:
    parts = (None, None) if kind == "text" else ()
    pipe = (DeCoTextPipeline if kind == "text" else DeCoPipeline)(*parts, transformer,
                                                                  FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_adapter(kind: str, name: str = "a") -> Any:
    """A tiny transformer with a random LoRA (A and B random, so it changes the output)."""
    transformer = tiny_transformer(kind)
    torch.manual_seed(0)
    transformer.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS[kind],
                                            init_lora_weights=False), adapter_name=name)
    return transformer


def scaled_copy(transformer: Any, s: float) -> Any:
    """The transformer with every LoRA B (linear and embedding) multiplied by s."""
    out = copy.deepcopy(transformer)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if ".lora_B." in name or ".lora_embedding_B." in name:
                p.mul_(s)
    return out


def images(pipe: Any, kind: str, **kwargs: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    cond = ({"prompt_embeds": torch.randn(2, 6, 24, generator=gen),
             "negative_prompt_embeds": torch.zeros(6, 24)} if kind == "text"
            else {"class_labels": [3, 7]})
    out: torch.Tensor = pipe(**cond, guidance_scale=3.0, num_inference_steps=2, latents=x,
                             output_type="latent", **kwargs).images
    return out


@pytest.mark.parametrize("kind", ["class", "text"])
def test_attention_kwargs_scale_the_adapters_for_one_call(kind: str) -> None:
    transformer = with_adapter(kind)
    pipe = pipeline(kind, transformer)
    full, half = images(pipe, kind), images(pipeline(kind, scaled_copy(transformer, 0.5)), kind)
    base = images(pipeline(kind, tiny_transformer(kind)), kind)
    assert rel_err(full, base) > 1e-2 and rel_err(half, full) > 1e-3  # the adapter and its scale matter
    assert rel_err(images(pipe, kind, attention_kwargs={"scale": 0.5}), half) <= TOL
    assert rel_err(images(pipe, kind, attention_kwargs={"scale": 0.0}), base) <= TOL
    assert torch.equal(images(pipe, kind), full)  # the scales are restored after each call
    # set_adapters' weight is kept across a call at scale 0 (diffusers' unscale would reset it),
    # and composes with the call's scale.
    pipe.set_adapters(["a"], [0.5])
    assert rel_err(images(pipe, kind, attention_kwargs={"scale": 0.0}), base) <= TOL
    assert rel_err(images(pipe, kind), half) <= TOL
    assert rel_err(images(pipe, kind, attention_kwargs={"scale": 2.0}), full) <= TOL


def test_fuse_lora_at_a_scale_fuses_the_class_embedding_too() -> None:
    """fuse_lora(lora_scale=0.5) with a y_embed adapter gives the adapter at 0.5 (diffusers'
    scale_layer would leave the embedding at 1); unfuse_lora subtracts it exactly (unloading
    then gives the base model's images)."""
    transformer = with_adapter("class")
    pipe = pipeline("class", transformer)
    half = images(pipeline("class", scaled_copy(transformer, 0.5)), "class")
    base = images(pipeline("class", tiny_transformer("class")), "class")
    pipe.fuse_lora(lora_scale=0.5)
    assert rel_err(images(pipe, "class"), half) <= TOL
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert rel_err(images(pipe, "class"), base) <= TOL


@pytest.mark.parametrize(("value", "error", "message"), [
    ({"scale": 0.5, "foo": 1}, TypeError, r"attention_kwargs: expected None or \{'scale'"),
    ([0.5], TypeError, "attention_kwargs: expected None"),
    ({"scale": "0.5"}, ValueError, "attention_kwargs: 'scale' must be a finite number"),
    ({"scale": float("nan")}, ValueError, "attention_kwargs: 'scale' must be a finite number"),
])
def test_bad_attention_kwargs_name_the_argument(value: Any, error: type[Exception], message: str) -> None:
    pipe = pipeline("class", tiny_transformer("class"))
    with pytest.raises(error, match=message):
        images(pipe, "class", attention_kwargs=value)
