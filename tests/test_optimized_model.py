"""`deco.optimized` DeCo / BaselineDiT against the float64 NumPy reference (spec/03-model.md).

Random configurations and random non-zero weights (no AdaLN-Zero layer hides a wiring mistake):
float64 agrees with the reference to 1e-10 relative, float32 (weights cast from the same float64
draws) to 1e-5. Also: the portable parameter layout of every preset, the initialisation,
gradients against finite differences, torch.compile, bfloat16 autocast and input validation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_weights, rel_err, require_module, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from deco import reference as R
from deco.config import PRESETS, DeCoConfig, parameter_count, parameter_shapes
from deco.optimized import BaselineDiT, DeCo, build_model
from deco.optimized.text_to_image import TextDeCo

SETTINGS = settings(max_examples=20, deadline=None)
F64_RTOL = 1e-10
F32_RTOL = 1e-5


def torch_model(config: DeCoConfig, weights: dict[str, Any], dtype: torch.dtype) -> DeCo | BaselineDiT:
    model = build_model(config).to(dtype)
    model.load_state_dict({k: torch.as_tensor(v, dtype=dtype) for k, v in weights.items()})
    return model.eval()


def inputs(config: DeCoConfig, batch: int, gh: int, gw: int, seed: int) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(seed)
    p = config.patch_size
    x = rng.standard_normal((batch, config.in_channels, gh * p, gw * p))
    t = rng.uniform(0.0, 1.0, batch)
    y = rng.integers(0, config.num_classes + 1, batch)  # includes the null class
    return x, t, y


def run(model: Any, method: str, x: Any, t: Any, y: Any, dtype: torch.dtype) -> Any:
    with torch.no_grad():
        out = getattr(model, method)(torch.as_tensor(x, dtype=dtype), torch.as_tensor(t, dtype=dtype),
                                     torch.as_tensor(y))
    return out.double().numpy()


@st.composite
def configs(draw: Any, min_width: int = 1, max_width: int = 12) -> DeCoConfig:
    heads = draw(st.integers(1, 3))
    return DeCoConfig(
        architecture=draw(st.sampled_from(["deco", "baseline"])),
        in_channels=draw(st.integers(1, 4)),
        patch_size=draw(st.integers(1, 16)),
        hidden_size=heads * draw(st.sampled_from([4, 8, 12])),
        num_heads=heads,
        depth=draw(st.integers(1, 3)),
        decoder_depth=draw(st.integers(1, 3)),
        decoder_width=draw(st.integers(min_width, max_width)),
        num_classes=draw(st.integers(1, 7)),
        mlp_ratio=draw(st.sampled_from([1.0, 2.5, 4.0])),
    )


# --------------------------------------------------------------------------- layout and presets
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_the_portable_parameter_layout(name: str) -> None:
    config = DeCoConfig.preset(name)
    with torch.device("meta"):  # XL costs nothing
        model = build_model(config)
    assert isinstance(model, {"deco": DeCo, "t2i": TextDeCo, "baseline": BaselineDiT}[config.architecture])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == parameter_shapes(config)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(config)


def test_classes_reject_the_other_architecture() -> None:
    with pytest.raises(ValueError, match=r"^config"):
        DeCo(tiny_config("baseline"))
    with pytest.raises(ValueError, match=r"^config"):
        BaselineDiT(tiny_config("deco"))
    with pytest.raises(TypeError, match=r"^config"):
        build_model({"architecture": "deco"})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- vs reference
def check_against_reference(config: DeCoConfig, batch: int, gh: int, gw: int, chunk_rows: int,
                            seed: int, dtype: torch.dtype, rtol: float) -> None:
    weights = random_weights(config, seed)
    x, t, y = inputs(config, batch, gh, gw, seed + 1)
    ref = R.Model(config, weights)
    model = torch_model(config, weights, dtype)
    if isinstance(model, DeCo):
        model.decoder.chunk_rows = chunk_rows  # a small value decodes many chunks
    folded = run(model, "forward", x, t, y, dtype)
    assert rel_err(folded, ref.forward(x, t, y)) <= rtol
    if isinstance(model, DeCo):
        assert rel_err(run(model, "semantic", x, t, y, dtype), ref.semantic(x, t, y)) <= rtol
        # The unfolded pixel decoder (PixelDecoder.folding) is the same function.
        model.set_weight_folding(False)
        unfolded = run(model, "forward", x, t, y, dtype)
        assert rel_err(unfolded, ref.forward(x, t, y)) <= rtol
        assert rel_err(unfolded, folded) <= rtol


@SETTINGS
@given(config=configs(), batch=st.integers(1, 3), gh=st.integers(1, 4), gw=st.integers(1, 4),
       chunk_rows=st.sampled_from([1, 5, 64, 16384]), seed=st.integers(0, 2**31))
def test_float64_matches_reference(config: DeCoConfig, batch: int, gh: int, gw: int,
                                   chunk_rows: int, seed: int) -> None:
    check_against_reference(config, batch, gh, gw, chunk_rows, seed, torch.float64, F64_RTOL)


# The float32 comparison uses decoder widths >= 12: a LayerNorm over a handful of channels is
# ill-conditioned with random weights (a plain float32 torch decoder written like the reference
# measured up to 1e-4 at width 4 and 1.1e-5 at width 8), whatever the implementation.
@SETTINGS
@given(config=configs(min_width=12, max_width=20), batch=st.integers(1, 3), gh=st.integers(1, 4),
       gw=st.integers(1, 4), chunk_rows=st.sampled_from([1, 5, 64, 16384]),
       seed=st.integers(0, 2**31))
def test_float32_matches_reference(config: DeCoConfig, batch: int, gh: int, gw: int,
                                   chunk_rows: int, seed: int) -> None:
    check_against_reference(config, batch, gh, gw, chunk_rows, seed, torch.float32, F32_RTOL)


def test_forward_accepts_scalar_times_strided_images_and_casts_to_the_model_dtype() -> None:
    config = tiny_config("deco")
    weights = random_weights(config, 3)
    x, _, y = inputs(config, 2, 2, 3, 4)
    x = x.astype(np.float32)  # exactly representable in both dtypes
    expected = R.Model(config, weights).forward(x, np.full(2, 0.3), y)
    model = torch_model(config, weights, torch.float64)
    with torch.no_grad():
        got = model(torch.as_tensor(x), 0.3, torch.as_tensor(y))
        got0d = model(torch.as_tensor(x), torch.tensor(0.3, dtype=torch.float64),
                      torch.as_tensor(y, dtype=torch.int32))
        strided = torch.as_tensor(x).transpose(2, 3).contiguous().transpose(2, 3)  # same values
        got_strided = model(strided, 0.3, torch.as_tensor(y))
    assert got.dtype == got0d.dtype == torch.float64
    assert rel_err(got.numpy(), expected) <= F64_RTOL
    assert rel_err(got0d.numpy(), expected) <= F64_RTOL
    assert rel_err(got_strided.numpy(), expected) <= F64_RTOL


@pytest.mark.parametrize("architecture", ["deco", "baseline"])
def test_empty_batch_gives_empty_velocities(architecture: str) -> None:
    model = build_model(tiny_config(architecture))
    x, t, y = torch.zeros(0, 3, 8, 12), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        assert model(x, t, y).shape == (0, 3, 8, 12)
        if isinstance(model, DeCo):
            assert model.semantic(x, t, y).shape == (0, model.config.hidden_size, 2, 3)


# -------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(("architecture", "fold"), [("deco", True), ("deco", False), ("baseline", True)])
def test_gradients_match_finite_differences(architecture: str, fold: bool) -> None:
    """Backward (through the folded embeddings/modulations, or the unfolded decoder, and the
    chunked decoder) against central differences, for the input and along a random direction
    in weight space."""
    config = tiny_config(architecture, depth=2, decoder_depth=2)
    torch.manual_seed(0)
    model = torch_model(config, random_weights(config, 5), torch.float64)
    if isinstance(model, DeCo):
        model.decoder.chunk_rows = 40  # 3 chunks of 2 patches for 6 patches
        model.set_weight_folding(fold)
    x0, t, y = (torch.as_tensor(a) for a in inputs(config, 1, 2, 3, 6))
    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: model(v, t, y), (x,), eps=1e-6, atol=1e-7, fast_mode=True)

    params = dict(model.named_parameters())
    direction = {k: torch.randn_like(v) for k, v in params.items()}
    target = torch.randn(x0.shape, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (model(x0, t, y) * target).sum()

    model.zero_grad()
    loss().backward()
    analytic = sum(float((params[k].grad * d).sum()) for k, d in direction.items())  # type: ignore[operator]
    eps = 1e-6
    with torch.no_grad():
        for k, d in direction.items():
            params[k].add_(eps * d)
        plus = float(loss())
        for k, d in direction.items():
            params[k].sub_(2 * eps * d)
        minus = float(loss())
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))


# ---------------------------------------------------------------------------- weight folding
def test_hooked_or_replaced_decoder_layers_turn_folding_off() -> None:
    """PixelDecoder.folding: on by default; off when switched off, when a folded layer's forward
    is replaced on the instance (what diffusers' and accelerate's hooks do) or its class is
    (peft, quantizers); a torch forward hook leaves it on (deco.lora finds called layers so)."""
    model = build_model(tiny_config("deco"))
    assert isinstance(model, DeCo) and model.decoder.folding()
    with pytest.raises(TypeError, match=r"^enabled: expected a bool"):
        model.set_weight_folding(0)  # type: ignore[arg-type]
    model.set_weight_folding(False)
    assert not model.decoder.folding()
    model.set_weight_folding(True)
    handle = model.decoder.input_proj.register_forward_hook(lambda *_: None)
    assert model.decoder.folding()
    handle.remove()
    norm = model.decoder.blocks[-1].norm
    norm.forward = norm.forward  # type: ignore[method-assign]  # an instance forward, as hooks set
    assert not model.decoder.folding()
    del norm.forward
    assert model.decoder.folding()
    model.decoder.pixel_embed.__class__ = torch.nn.Linear
    assert not model.decoder.folding()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lora_on_folded_decoder_layers_takes_effect(dtype: torch.dtype) -> None:
    """peft LoRA layers on the decoder's pixel_embed, input_proj and adaln (layers the folded
    decoder never calls) act: the output is the reference's with W + scaling * B A merged by hand."""
    peft = require_module("peft")
    config = tiny_config("deco", decoder_width=12, decoder_depth=2)
    weights = random_weights(config, 11)
    model = torch_model(config, weights, dtype)
    targets = r"decoder\.(pixel_embed|input_proj|blocks\.\d+\.adaln)"
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets), model)
    merged = dict(weights)
    gen = torch.Generator().manual_seed(0)
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_B"):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            with torch.no_grad():
                b.copy_(torch.randn(b.shape, generator=gen, dtype=dtype) * 0.3)  # peft starts at B = 0
            delta = (b.detach().double() @ a.detach().double()).numpy() * 1.5  # scaling = alpha / r
            merged[f"{name}.weight"] = weights[f"{name}.weight"] + delta
    assert len(merged.keys() ^ weights.keys()) == 0 and not model.decoder.folding()
    x, t, y = inputs(config, 2, 2, 3, 12)
    expected = R.Model(config, merged).forward(x, t, y)
    assert rel_err(run(model, "forward", x, t, y, dtype), expected) <= (F64_RTOL if dtype == torch.float64
                                                                        else F32_RTOL)


# --------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("architecture", ["deco", "baseline"])
def test_initialisation_zeroes_the_output_layers_only(architecture: str) -> None:
    torch.manual_seed(0)
    config = tiny_config(architecture)
    model = build_model(config)
    zero = (["decoder.final.weight", "decoder.final.bias"]
            + [f"decoder.blocks.{j}.adaln.{n}" for j in range(config.decoder_depth)
               for n in ("weight", "bias")]
            if architecture == "deco" else
            ["head.adaln.weight", "head.adaln.bias", "head.linear.weight", "head.linear.bias"])
    state = model.state_dict()
    for name, value in state.items():
        if name in zero:
            assert not value.any(), name
        elif "norm" in name:
            assert value.eq(1).all() if name.endswith(".weight") else not value.any(), name
        elif value.ndim == 2:
            assert value.std() > 0, name
    assert not any(state[f"blocks.{i}.adaln.weight"].eq(0).all() for i in range(config.depth))
    assert state["y_embed.weight"].std() == pytest.approx(0.02, rel=0.3)
    x, t, y = inputs(config, 2, 2, 2, 0)
    # Zero output layers: a fresh model predicts exactly zero velocity.
    out = run(model, "forward", x, t, y, torch.float32)
    assert not out.any()


# ------------------------------------------------------------------------- compile and dtypes
def test_torch_compile_matches_reference() -> None:
    config = tiny_config("deco", depth=1, decoder_depth=1)
    weights = random_weights(config, 7)
    x, t, y = inputs(config, 2, 2, 3, 8)
    model = torch_model(config, weights, torch.float64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = run(compiled, "forward", x, t, y, torch.float64)
    assert rel_err(got, R.Model(config, weights).forward(x, t, y)) <= F64_RTOL


#: bf16 autocast may be this many times less accurate than the bf16 rounding floor (00 §5)
BF16_FACTOR = 4.0


def bf16_round(a: Any) -> Any:
    """float64 array -> the nearest bfloat16 values (round to nearest even), as float64."""
    return torch.as_tensor(np.asarray(a, dtype=np.float32)).to(torch.bfloat16).double().numpy()


@pytest.mark.parametrize("architecture", ["deco", "baseline"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfloat16_autocast_is_within_a_factor_of_the_rounding_floor(architecture: str, seed: int) -> None:
    """Calibrated bound, as FlashAttention's tests do: the error of the autocast forward against the
    float64 reference is at most BF16_FACTOR times the error of the *floor*, the float64 reference
    evaluated with the same weights and inputs rounded to bfloat16 (what storing the operands in
    bf16 costs with exact arithmetic). Autocast also rounds every matmul's activations, so its
    error exceeds the floor: measured 1.1-3.1x (median 2) on 80 draws of these presets."""
    config = tiny_config(architecture)
    weights = random_weights(config, 9 + seed)
    x, t, y = inputs(config, 8, 3, 2, 10 + seed)
    model = torch_model(config, weights, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(t, dtype=torch.float32),
                    torch.as_tensor(y))
    assert out.dtype in (torch.bfloat16, torch.float32)
    expected = R.Model(config, weights).forward(x, t, y)
    floor = R.Model(config, {k: bf16_round(v) for k, v in weights.items()}).forward(
        bf16_round(x), bf16_round(t), y)
    err, err_floor = rel_err(out.double().numpy(), expected), rel_err(floor, expected)
    assert err > 100 * F32_RTOL  # bf16 really ran: far above float32 rounding
    assert err <= BF16_FACTOR * err_floor, f"autocast {err:.2e} vs floor {err_floor:.2e}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32_matches_reference() -> None:
    config = tiny_config("deco")
    weights = random_weights(config, 11)
    x, t, y = inputs(config, 3, 2, 4, 12)
    model = torch_model(config, weights, torch.float32).cuda()
    with torch.no_grad():
        out = model(torch.as_tensor(x, dtype=torch.float32).cuda(),
                    torch.as_tensor(t, dtype=torch.float32).cuda(), torch.as_tensor(y).cuda())
    assert rel_err(out.cpu().double().numpy(), R.Model(config, weights).forward(x, t, y)) <= F32_RTOL


# ------------------------------------------------------------------------------ bad input
def _bad_inputs() -> list[Any]:
    # Label values are not checked by forward (kept sync-free): tests/test_sync_free.py.
    x = torch.zeros(2, 3, 8, 8)
    t = torch.full((2,), 0.5)
    y = torch.tensor([0, 10])
    return [
        pytest.param(x[0], t, y, ValueError, "^x", id="x-rank"),
        pytest.param(torch.zeros(2, 4, 8, 8), t, y, ValueError, "^x", id="x-channels"),
        pytest.param(torch.zeros(2, 3, 8, 6), t, y, ValueError, "^x", id="x-not-multiple-of-p"),
        pytest.param(torch.zeros(2, 3, 0, 8), t, y, ValueError, "^x", id="x-empty"),
        pytest.param(np.zeros((2, 3, 8, 8)), t, y, TypeError, "^x", id="x-numpy"),
        pytest.param(torch.zeros(2, 3, 8, 8, dtype=torch.int64), t, y, TypeError, "^x", id="x-int"),
        pytest.param(x, torch.full((3,), 0.5), y, ValueError, "^t", id="t-shape"),
        pytest.param(x, torch.full((2, 1), 0.5), y, ValueError, "^t", id="t-rank"),
        pytest.param(x, "0.5", y, TypeError, "^t", id="t-str"),
        pytest.param(x, t, torch.tensor([0.0, 1.0]), TypeError, "^y", id="y-float"),
        pytest.param(x, t, torch.tensor([0]), ValueError, "^y", id="y-shape"),
        pytest.param(x, t, [0, 1], TypeError, "^y", id="y-list"),
    ]


@pytest.mark.parametrize(("x", "t", "y", "error", "match"), _bad_inputs())
@pytest.mark.parametrize("architecture", ["deco", "baseline"])
def test_bad_input_names_the_argument(architecture: str, x: Any, t: Any, y: Any, error: type,
                                      match: str) -> None:
    model = build_model(tiny_config(architecture))
    with pytest.raises(error, match=match):
        model(x, t, y)
    if isinstance(model, DeCo):
        with pytest.raises(error, match=match):
            model.semantic(x, t, y)
