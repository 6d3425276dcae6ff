"""DeCoTransformer2DModel under diffusers' model conventions, the checks of diffusers' own model
test mixins (tests/models/testing_utils: LayerwiseCasting, GroupOffload, Attention,
AttentionBackend, device maps) written as our own tests, on tiny random models (class and text).

Oracles: the plain `deco.optimized` model with the same weights (attention processors must not
change its output by a bit), the same model with its weights rounded to the storage dtype by
hand (layerwise casting is exactly that rounding), attention written out in float64 (a custom
processor), and the uncast float32 output for the size of the casting error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_DIFFUSERS_CONFIGS, rel_err, require_module, tiny_transformer

require_module("diffusers")
require_module("accelerate")

from diffusers.models.attention_dispatch import (  # noqa: E402
    _AttentionBackendRegistry,
    attention_backend,
)

from deco.diffusers import DeCoAttention, DeCoAttnProcessor, DeCoTransformer2DModel  # noqa: E402
from deco.optimized.weights import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "global_attention_backend")


@pytest.fixture
def global_attention_backend() -> Any:
    """diffusers' set_attention_backend also sets the process-wide backend: restore it."""
    active, _ = _AttentionBackendRegistry.get_active_backend()
    yield
    _AttentionBackendRegistry.set_active_backend(active)

CONFIGS = TINY_DIFFUSERS_CONFIGS
KINDS = list(CONFIGS)
tiny = tiny_transformer


def inputs(kind: str, batch: int = 2) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    out: dict[str, Any] = {"hidden_states": torch.randn(batch, 3, 16, 16, generator=gen),
                           "timestep": torch.rand(batch, generator=gen)}
    if kind == "text":
        out["encoder_hidden_states"] = torch.randn(batch, 6, 24, generator=gen)
    else:
        out["class_labels"] = torch.tensor([3, 7, 1, 0][:batch])
    return out


def run(model: Any, args: dict[str, Any], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in args.items()}
    with torch.no_grad():
        out: torch.Tensor = model(**cast, return_dict=False)[0]
    return out.float()


def plain(model: DeCoTransformer2DModel) -> torch.nn.Module:
    """The deco.optimized model of the same config and weights, with its own attention."""
    net = build_model(model.deco_config)
    net.load_state_dict(model.model.state_dict())
    return net.eval()


def plain_run(net: torch.nn.Module, kind: str, args: dict[str, Any]) -> torch.Tensor:
    cond = args["encoder_hidden_states" if kind == "text" else "class_labels"]
    with torch.no_grad():
        out: torch.Tensor = net(args["hidden_states"], args["timestep"], cond)
    return out


# ------------------------------------------------------------------------ layerwise casting
#: Modules the casting must leave in the compute dtype: diffusers' default patterns (norms) and
#: the model's `_skip_layerwise_casting_patterns`, written out here by name.
KEPT = re.compile(r"norm|patch_embed|text_embed|decoder\.(pixel_embed|input_proj|blocks\.\d+\.adaln)")
COMBOS = [(torch.float16, torch.float32), (torch.float8_e4m3fn, torch.float32),
          (torch.float8_e5m2, torch.float32), (torch.float8_e4m3fn, torch.bfloat16),
          (torch.float16, torch.bfloat16)]


def rounded_by_hand(model: DeCoTransformer2DModel, storage: torch.dtype,
                    compute: torch.dtype) -> DeCoTransformer2DModel:
    """What layerwise casting computes on a model cast to `compute` first (as diffusers' tests
    do): the weights of every linear and embedding outside KEPT rounded from `compute` to
    `storage`, everything run in `compute`."""
    copy = tiny("text" if model.is_text else "class")
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, module in copy.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and not KEPT.search(name):
                for p in module.parameters(recurse=False):
                    p.copy_(p.to(compute).to(storage).float())
    return copy.to(compute)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("storage", "compute"), COMBOS, ids=lambda d: str(d).split(".")[-1])
def test_layerwise_casting_is_rounding_of_the_stored_weights(kind: str, storage: torch.dtype,
                                                             compute: torch.dtype) -> None:
    model = tiny(kind)
    args = inputs(kind)
    expected = run(rounded_by_hand(model, storage, compute), args, compute)
    full = run(model, args)
    model.to(compute).enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    stored = {p.dtype for name, p in model.named_parameters() if name.endswith("qkv.weight")}
    assert stored == {storage}
    assert model.model.decoder.input_proj.weight.dtype == compute  # folded: kept
    got = run(model, args, compute)
    assert torch.equal(got, expected)
    # ... and the rounding happened: the output moved (by 0.003 (fp16) to ~1 (e5m2) of its
    # size on these random models, whose weights are far from fp8's grid).
    assert rel_err(got.numpy(), full.numpy()) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_layerwise_casting_trains(kind: str) -> None:
    """diffusers' test_layerwise_casting_training: a backward pass under fp8 storage works and
    reaches every trainable weight the forward used."""
    model = tiny(kind).train()
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(p.dtype == torch.float32)
    args = inputs(kind)
    loss = model(**args, return_dict=False)[0].square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------- offloading
GROUPS = [("block", {"offload_type": "block_level", "num_blocks_per_group": 1}),
          ("leaf", {"offload_type": "leaf_level"}),
          ("block-disk", {"offload_type": "block_level", "num_blocks_per_group": 1, "disk": True}),
          ("leaf-disk", {"offload_type": "leaf_level", "disk": True})]
#: Folded and unfolded pixel decoders (`PixelDecoder.folding`) compute the same function in
#: float32 with different roundings: outputs of size ~1 agree to a few float32 ulps (measured
#: ~1e-7 relative on these models); 1e-5 is the project's float32 tolerance.
UNFOLDED_RTOL = 1e-5


def unfolded_run(model: DeCoTransformer2DModel, args: dict[str, Any]) -> torch.Tensor:
    """The model's output with the pixel decoder's weight folding off (then on again)."""
    model.model.set_weight_folding(False)
    try:
        return run(model, args)
    finally:
        model.model.set_weight_folding(True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("name", "options"), GROUPS, ids=[g[0] for g in GROUPS])
def test_group_offloading_gives_the_same_output(kind: str, name: str, options: dict[str, Any],
                                                tmp_path: Path) -> None:
    """diffusers' test_group_offloading(_with_disk) on the CPU (no streams there: use_stream
    False); twice, as the hooks must restore the weights after each call. Leaf-level hooks sit
    on the decoder's own layers, so the decoder runs unfolded there: bit-equal to the same model
    unfolded without offloading, and within float32 rounding of the folded default."""
    model = tiny(kind)
    args = inputs(kind)
    folded, unfolded = run(model, args), unfolded_run(model, args)
    assert not torch.equal(folded, unfolded)  # else the comparisons below could not tell them apart
    assert rel_err(unfolded.numpy(), folded.numpy()) < UNFOLDED_RTOL
    options = dict(options)
    if options.pop("disk", False):
        options["offload_to_disk_path"] = str(tmp_path)
    model.enable_group_offload(torch.device("cpu"), use_stream=False, **options)
    if "offload_to_disk_path" in options:
        assert list(tmp_path.glob("*.safetensors"))
    leaf = options["offload_type"] == "leaf_level"
    assert model.model.decoder.folding() is not leaf
    expected = unfolded if leaf else folded
    assert torch.equal(run(model, args), expected)
    assert torch.equal(run(model, args), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_device_map_with_disk_offload(kind: str, tmp_path: Path) -> None:
    """diffusers' test_disk_offload_with(out)_safetensors on the CPU: from_pretrained with a
    device map that puts half the model on disk (accelerate's AlignDevicesHook loads a layer's
    weights only inside its forward, so the decoder runs unfolded)."""
    model = tiny(kind)
    args = inputs(kind)
    folded, unfolded = run(model, args), unfolded_run(model, args)
    for safe in (True, False):
        folder = tmp_path / f"m{safe}"
        model.save_pretrained(folder, safe_serialization=safe)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        loaded = DeCoTransformer2DModel.from_pretrained(
            folder, device_map="auto", max_memory={"cpu": size // 2}, offload_folder=str(folder / "off"))
        assert "disk" in {str(d) for d in loaded.hf_device_map.values()}
        assert not loaded.model.decoder.folding()
        got = run(loaded, args)
        assert torch.equal(got, unfolded), safe
        assert rel_err(got.numpy(), folded.numpy()) < UNFOLDED_RTOL


@pytest.mark.parametrize("kind", KINDS)
def test_device_maps(kind: str, tmp_path: Path) -> None:
    """from_pretrained(device_map=...) with accelerate ("cpu", "auto", an explicit map)."""
    model = tiny(kind)
    args = inputs(kind)
    expected = run(model, args)
    model.save_pretrained(tmp_path)
    for device_map in ("cpu", "auto", {"": "cpu"}):
        loaded = DeCoTransformer2DModel.from_pretrained(tmp_path, device_map=device_map)
        assert {str(d) for d in loaded.hf_device_map.values()} == {"cpu"}
        assert torch.equal(run(loaded, args), expected), device_map
    assert DeCoTransformer2DModel._no_split_modules == ["DiTBlock", "PixelDecoder"]


# ------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("kind", KINDS)
def test_default_processor_gives_the_plain_models_output(kind: str) -> None:
    """The default processor (native backend) changes nothing: bit-equal to deco.optimized's own
    attention; set_attention_backend("native") and the context manager too."""
    model = tiny(kind)
    args = inputs(kind)
    expected = plain_run(plain(model), kind, args)
    assert torch.equal(run(model, args), expected)
    with attention_backend("native"):
        assert torch.equal(run(model, args), expected)
    model.set_attention_backend("native")
    assert torch.equal(run(model, args), expected)
    model.reset_attention_backend()
    model.set_attention_backend("_native_math")  # SDPA's math kernel: another float32 sum order
    assert rel_err(run(model, args).numpy(), expected.numpy()) < 1e-5


class Float64Attention(DeCoAttnProcessor):
    """Attention written out: softmax(q k^T / sqrt(hd)) v in float64 on `attn.project`'s q, k, v;
    `scale` multiplies the logits (1: the spec's attention)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, image_rotary_emb: Any = None) -> torch.Tensor:
        b, n, d = hidden_states.shape
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        q, k, v = (x.double().transpose(1, 2)
                   for x in attn.project(hidden_states, cos, sin, encoder_hidden_states))
        logits = q @ k.transpose(-1, -2) * (self.scale / q.shape[-1] ** 0.5)  # (B, h, L, L+T)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        result: torch.Tensor = attn.proj(out.float())
        return result


@pytest.mark.parametrize("kind", KINDS)
def test_set_attn_processor(kind: str) -> None:
    model = tiny(kind)
    args = inputs(kind)
    expected = run(model, args)
    processors = model.attn_processors
    count = CONFIGS[kind]["depth"] + CONFIGS[kind].get("text_depth", 0)
    assert len(processors) == count
    assert all(type(p) is DeCoAttnProcessor for p in processors.values())
    assert sum(isinstance(m, DeCoAttention) for m in model.modules()) == count
    model.set_attn_processor(Float64Attention())  # the joint text attention included
    assert rel_err(run(model, args).numpy(), expected.numpy()) < 1e-5
    model.set_attn_processor({key: Float64Attention(scale=3.0) for key in processors})
    assert rel_err(run(model, args).numpy(), expected.numpy()) > 1e-2
    with pytest.raises(ValueError, match="number of processors"):
        model.set_attn_processor({next(iter(processors)): DeCoAttnProcessor()})
    model.set_attn_processor(DeCoAttnProcessor())
    assert torch.equal(run(model, args), expected)


def test_qkv_fusion_is_a_no_op() -> None:
    """QKV are stored fused: fuse_qkv_projections leaves the model (and output) as it is."""
    model = tiny("class")
    args = inputs("class")
    expected = run(model, args)
    model.fuse_qkv_projections()
    assert not any(hasattr(m, "to_qkv") for m in model.modules())
    assert torch.equal(run(model, args), expected)
