"""`deco.diffusers`: DeCo in the diffusers ecosystem (optional extra: `pip install .[diffusers]`).

`DeCoTransformer2DModel` wraps `deco.optimized`'s models as a diffusers `ModelMixin`;
`DeCoPipeline` (class-to-image) and `DeCoTextPipeline` (text-to-image) sample with diffusers'
`FlowMatchEulerDiscreteScheduler` or this package's `DeCoHeunScheduler` / `DeCoAdamsScheduler`,
with the results of `deco.optimized.sample`. `deco convert CKPT DIR --to diffusers` writes a
pipeline folder (`write_pipeline`). Nothing else in `deco` imports this package or diffusers.
"""

from .attention import DeCoAttention, DeCoAttnProcessor
from .convert import imagenet_id2label, write_pipeline
from .lora import DeCoLoraLoaderMixin
from .pipelines import DeCoPipeline, DeCoPipelineBase
from .pipelines_text import DeCoTextPipeline
from .schedulers import DeCoAdamsScheduler, DeCoHeunScheduler, DeCoScheduler
from .transformer import DeCoTransformer2DModel

__all__ = [
    "DeCoAdamsScheduler",
    "DeCoAttention",
    "DeCoAttnProcessor",
    "DeCoHeunScheduler",
    "DeCoLoraLoaderMixin",
    "DeCoPipeline",
    "DeCoPipelineBase",
    "DeCoScheduler",
    "DeCoTextPipeline",
    "DeCoTransformer2DModel",
    "imagenet_id2label",
    "write_pipeline",
]
