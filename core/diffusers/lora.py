"""diffusers' LoRA loading for the DeCo pipelines: `DeCoLoraLoaderMixin`.

DeCo's pipelines have one LoRA-loadable component, the `transformer` (a `DeCoTransformer2DModel`
with diffusers' `PeftAdapterMixin`), and no key conversion: an adapter file holds diffusers'
names, `transformer.model.<module>.lora_A.weight` (`deco.lora` writes the same from `deco train
--lora`). diffusers' own loader for such pipelines (one transformer, files in its format) is the
one Sana, CogVideoX, Mochi and LTX-Video share; DeCo takes it as it is, so

    pipe.load_lora_weights(folder_or_file, adapter_name="digits")
    pipe.set_adapters(["digits"], [0.8]); pipe.fuse_lora(); pipe.unfuse_lora()
    DeCoPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(t))

are diffusers' code paths (`LoraBaseMixin`), nothing re-implemented here. The class embedding's
adapter (`y_embed`: peft's `lora_embedding_A/B`) loads the same way. Two conventions live in
`DeCoTransformer2DModel`: `attention_kwargs={"scale": s}` of a pipeline call (the adapters at s
for that call) and `fuse_lora(lora_scale=s)` for embedding adapters (see there).
"""

from typing import ClassVar

from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin


class DeCoLoraLoaderMixin(SanaLoraLoaderMixin):  # type: ignore[misc]
    """Load, save, fuse and unfuse LoRA adapters of a DeCo pipeline's `transformer`."""

    _lora_loadable_modules: ClassVar[list[str]] = ["transformer"]
    transformer_name = "transformer"


__all__ = ["DeCoLoraLoaderMixin"]
