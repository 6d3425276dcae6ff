"""`deco.optimized.TextDeCo` (spec/06-text-to-image.md) against the release's own outputs.

Oracles: T.npz, computed by the release's text-to-image PixNerDiT and its Euler / AdamLMSampler
from T.ckpt (float32; agreement ~1e-5 relative is what float32 allows); the float64 reference
`deco.reference` over random tiny configs and non-square grids (1e-10 in float64, 1e-5 in
float32); closed-form Adams-Bashforth weights; exact integrals of polynomial velocities; the
release's parameter count of DeCo-XXL/16 (1,133,759,395, counted from its model class).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import FIXTURE_RTOL, random_weights, rel_err, release_fixtures, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from deco import cli
from deco import reference as R
from deco.config import PRESETS, DeCoConfig, parameter_count
from deco.optimized import build_model, load_model, sample, save_model, time_grid
from deco.optimized.sampling import adams_weights
from deco.optimized.text_to_image import TextDeCo
from deco.release import read_release_checkpoint

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def t_dir() -> Path:
    """The fixtures folder holding T.npz and T.ckpt (skipped locally, a failure under CI)."""
    return release_fixtures("T.npz", "T.ckpt")


@pytest.fixture(scope="module")
def t_npz(t_dir: Path) -> dict[str, Any]:
    with np.load(t_dir / "T.npz") as data:
        out: dict[str, Any] = {k: data[k] for k in data.files}
    out["settings"] = json.loads(bytes(out.pop("config")))
    return out


def _t(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array)).to(dtype)


# ------------------------------------------------------------------------------- the release
def test_checkpoint_config_is_read_off_the_shapes(t_dir: Path, t_npz: dict[str, Any]) -> None:
    config, _ = read_release_checkpoint(t_dir / "T.ckpt")
    m = t_npz["settings"]["model"]
    assert config == DeCoConfig(
        "t2i", m["in_channels"], m["patch_size"], m["hidden_size"], m["num_groups"],
        m["num_encoder_blocks"], m["num_decoder_blocks"], m["decoder_hidden_size"], 0, 4.0,
        m["num_text_blocks"], m["txt_embed_dim"], m["txt_max_length"])
    assert config == PRESETS["DeCo-T2I-tiny/4"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("weights", "key"), [("ema", "forward_out"), ("online", "forward_out_online")])
def test_forward_matches_the_release(t_dir: Path, t_npz: dict[str, Any], weights: str, key: str,
                                     dtype: torch.dtype) -> None:
    model = load_model(t_dir / "T.ckpt", weights=weights, dtype=dtype)
    assert isinstance(model, TextDeCo)
    with torch.no_grad():
        out = model(_t(t_npz["forward_x"], dtype), _t(t_npz["forward_t"], dtype),
                    _t(t_npz["forward_text"], dtype))
    assert out.dtype == dtype
    # The release computed in float32: a float64 model is bounded by that rounding too.
    assert rel_err(out, t_npz[key]) < FIXTURE_RTOL


def test_online_weights_give_a_different_answer(t_dir: Path, t_npz: dict[str, Any]) -> None:
    inputs = (_t(t_npz[k], torch.float32) for k in ("forward_x", "forward_t", "forward_text"))
    x, t, text = inputs
    with torch.no_grad():
        online = load_model(t_dir / "T.ckpt", weights="online")(x, t, text)
    assert rel_err(online, t_npz["forward_out_online"]) < FIXTURE_RTOL
    assert rel_err(online, t_npz["forward_out"]) > 1e-2
    assert rel_err(t_npz["forward_out_online"], t_npz["forward_out"]) > 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_euler_matches_the_release(t_dir: Path, t_npz: dict[str, Any], dtype: torch.dtype) -> None:
    s = t_npz["settings"]["euler"]
    model = load_model(t_dir / "T.ckpt", dtype=dtype)
    assert np.allclose(time_grid(s["num_steps"], s["timeshift"]), t_npz["euler_timesteps"],
                       rtol=0, atol=1e-7)
    out = sample(model, _t(t_npz["sample_noise"], dtype), _t(t_npz["sample_text"], dtype),
                 _t(t_npz["sample_null_text"], dtype), steps=s["num_steps"],
                 guidance=s["guidance"],
                 interval=(s["guidance_interval_min"], s["guidance_interval_max"]),
                 timeshift=s["timeshift"])
    assert isinstance(out, torch.Tensor)
    assert rel_err(out, t_npz["euler_out"]) < FIXTURE_RTOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_adams_matches_the_release(t_dir: Path, t_npz: dict[str, Any], dtype: torch.dtype) -> None:
    s = t_npz["settings"]["adam"]
    model = load_model(t_dir / "T.ckpt", dtype=dtype)
    grid = time_grid(s["num_steps"], s["timeshift"])
    assert np.allclose(grid, t_npz["adam_timesteps"], rtol=0, atol=1e-7)
    weights = adams_weights(grid, s["order"])
    padded = np.zeros_like(t_npz["adam_coeffs"])
    for i, row in enumerate(weights):
        padded[i, : len(row)] = row
    assert np.allclose(padded, t_npz["adam_coeffs"], rtol=0, atol=1e-6)
    # The null text is the same for every sample: pass it once, as (T, E).
    null = _t(t_npz["sample_null_text"][0], dtype)
    assert np.array_equal(t_npz["sample_null_text"][0], t_npz["sample_null_text"][1])
    out, states = sample(model, _t(t_npz["sample_noise"], dtype), _t(t_npz["sample_text"], dtype),
                         null, steps=s["num_steps"], guidance=s["guidance"],
                         interval=(s["guidance_interval_min"], s["guidance_interval_max"]),
                         timeshift=s["timeshift"], solver="adams", order=s["order"],
                         return_trajectory=True)
    assert rel_err(states, t_npz["adam_traj"]) < FIXTURE_RTOL
    assert rel_err(out, t_npz["adam_out"]) < FIXTURE_RTOL


# ------------------------------------------------------------------------------ Adams, exactly
@pytest.mark.parametrize(("order", "expected"), [
    (1, [1.0]),
    (2, [-1 / 2, 3 / 2]),
    (3, [5 / 12, -16 / 12, 23 / 12]),
    (4, [-9 / 24, 37 / 24, -59 / 24, 55 / 24]),
])
def test_adams_weights_on_a_uniform_grid_are_adams_bashforth(order: int, expected: list[float]) -> None:
    # The textbook Adams-Bashforth coefficients (oldest first) once enough history exists.
    rows = adams_weights([i / 8 for i in range(9)], order)
    assert rows[0] == [1.0]
    for row in rows[order - 1:]:
        assert np.allclose(row, expected, rtol=0, atol=1e-12)


class PolynomialVelocity:
    """A stand-in model whose velocity is a polynomial of t only (x and labels are ignored)."""

    config = tiny_config("deco")

    def __init__(self, coeffs: list[float]) -> None:
        self.coeffs = coeffs

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v = sum(c * t.double() ** k for k, c in enumerate(self.coeffs))
        assert isinstance(v, torch.Tensor)
        return v.to(x.dtype).view(-1, 1, 1, 1).expand_as(x)

    def integral(self, a: float, b: float) -> float:
        return sum(c * (b ** (k + 1) - a ** (k + 1)) / (k + 1) for k, c in enumerate(self.coeffs))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_adams_integrates_polynomials_of_degree_order_minus_one_exactly(order: int) -> None:
    model = PolynomialVelocity([0.3, -1.1, 0.7, 2.0][:order])
    noise = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    steps, shift = 7, 2.5
    _, states = sample(model, noise, torch.tensor([0]), steps=steps, timeshift=shift,
                       solver="adams", order=order, return_trajectory=True)
    grid = time_grid(steps, shift)
    increments = (states[1:] - states[:-1])[:, 0, 0, 0, 0].tolist()
    # Steps with a full history are exact; the first order-1 steps use fewer nodes.
    for i in range(order - 1, steps):
        assert abs(increments[i] - model.integral(grid[i], grid[i + 1])) < 1e-12


def test_adams_guidance_interval_is_strict_at_both_ends() -> None:
    calls: list[tuple[float, int]] = []

    class Recorder(PolynomialVelocity):
        def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            calls.append((float(t[0]), x.shape[0]))
            return super().__call__(x, t, y)

    grid = time_grid(4)  # 0, 0.25, 0.5, 0.75
    sample(Recorder([1.0]), torch.zeros(1, 3, 4, 4), torch.tensor([1]), steps=4, guidance=2.0,
           interval=(0.25, 0.75), solver="adams")
    # Batch 2 = guided (null and conditional branches); t = 0.25 and 0.75 are outside.
    assert [b for _, b in calls] == [1, 1, 2, 1]
    assert np.allclose([t for t, _ in calls], grid[:-1], rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------- building, files
def test_xxl_parameter_count_built_as_a_module() -> None:
    config = PRESETS["DeCo-XXL/16"]
    with torch.device("meta"):
        model = build_model(config)
    assert isinstance(model, TextDeCo)
    assert sum(p.numel() for p in model.parameters()) == 1_133_759_395 == parameter_count(config)


def test_ckpt_convert_safetensors_round_trip(t_dir: Path, tmp_path: Path, t_npz: dict[str, Any]) -> None:
    out = tmp_path / "T.safetensors"
    assert cli.main(["convert", str(t_dir / "T.ckpt"), str(out)]) == 0
    direct, converted = load_model(t_dir / "T.ckpt"), load_model(out)
    assert isinstance(converted, TextDeCo) and converted.config == direct.config
    a, b = direct.state_dict(), converted.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = tmp_path / "again.safetensors"
    save_model(converted, saved)
    again = load_model(saved).state_dict()
    assert all(torch.equal(a[k], again[k]) for k in a)
    # The release keeps the position table as (1, T, D); the portable layout as (T, D).
    raw = torch.load(t_dir / "T.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(raw["ema_denoiser.y_pos_embedding"][0], a["text_pos_embed"])
    assert torch.equal(raw["denoiser.blocks.1.attn.kv_y.weight"],
                       load_model(t_dir / "T.ckpt", weights="online").state_dict()[
                           "blocks.1.attn.kv_text.weight"])


def test_fresh_model_predicts_zero_and_takes_non_square_grids() -> None:
    config = PRESETS["DeCo-T2I-tiny/4"]
    model = build_model(config)
    text = torch.randn(2, config.text_length, config.text_dim)
    for h, w in [(16, 8), (8, 16), (4, 12)]:
        x = torch.randn(2, 3, h, w)
        assert torch.equal(model(x, torch.rand(2), text), torch.zeros_like(x))
    assert model.semantic(torch.randn(1, 3, 8, 12), torch.rand(1), text[:1]).shape == (1, 64, 2, 3)


# ----------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def text_model() -> TextDeCo:
    model = build_model(PRESETS["DeCo-T2I-tiny/4"])
    assert isinstance(model, TextDeCo)
    return model


def _bad_forward() -> list[Any]:
    x, t = torch.zeros(2, 3, 8, 8), torch.rand(2)
    return [
        pytest.param(x, t, torch.zeros(2, 8, 32), ValueError, r"^text: expected shape \(2, 8, 48\)",
                     id="text-width"),
        pytest.param(x, t, torch.zeros(2, 7, 48), ValueError, r"^text: expected shape \(2, 8, 48\)",
                     id="text-length"),
        pytest.param(x, t, torch.zeros(1, 8, 48), ValueError, r"^text: expected shape \(2, 8, 48\)",
                     id="text-batch"),
        pytest.param(x, t, torch.zeros(8, 48), ValueError, r"^text:", id="text-rank"),
        pytest.param(x, t, torch.tensor([1, 2]), TypeError, r"^text: .*class labels", id="labels"),
        pytest.param(x, t, np.zeros((2, 8, 48)), TypeError, r"^text:", id="text-numpy"),
        pytest.param(torch.zeros(2, 3, 8, 6), t, torch.zeros(2, 8, 48), ValueError, r"^x:",
                     id="x-not-patches"),
        pytest.param(x, torch.rand(3), torch.zeros(2, 8, 48), ValueError, r"^t:", id="t-shape"),
    ]


@pytest.mark.parametrize(("x", "t", "text", "error", "match"), _bad_forward())
def test_bad_forward_input_names_the_argument(text_model: TextDeCo, x: Any, t: Any, text: Any,
                                              error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        text_model(x, t, text)


def test_text_given_to_the_class_model_is_refused() -> None:
    model = build_model(tiny_config("deco"))
    with pytest.raises(TypeError, match=r"^y: .*text-to-image"):
        model(torch.zeros(2, 3, 8, 8), torch.rand(2), torch.zeros(2, 8, 48))
    with pytest.raises(TypeError, match=r"^labels: .*text-to-image"):
        sample(model, torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 48), steps=1)
    with pytest.raises(TypeError, match=r"^null: expected integer class labels"):
        sample(model, torch.zeros(2, 3, 8, 8), torch.tensor([1, 2]), torch.zeros(8, 48), steps=1)


def _bad_sample() -> list[Any]:
    text, null = torch.zeros(2, 8, 48), torch.zeros(8, 48)
    return [
        pytest.param(torch.tensor([1, 2]), null, {}, TypeError, r"^labels: .*class labels", id="labels"),
        pytest.param(torch.zeros(2, 8, 40), null, {}, ValueError, r"^labels: expected shape \(2, 8, 48\)",
                     id="cond-width"),
        pytest.param(text, None, {"guidance": 2.0}, ValueError, r"^null: .*\(8, 48\)", id="null-missing"),
        pytest.param(text, torch.zeros(7, 48), {"guidance": 2.0}, ValueError, r"^null: expected shape",
                     id="null-length"),
        pytest.param(text, torch.zeros(2, 8, 48).long(), {"guidance": 2.0}, TypeError, r"^null:",
                     id="null-int"),
        pytest.param(text, null, {"solver": "adam"}, ValueError, r"^solver:", id="solver"),
        pytest.param(text, null, {"solver": "adams", "order": 0}, ValueError, r"^order:", id="order"),
    ]


@pytest.mark.parametrize(("cond", "null", "kwargs", "error", "match"), _bad_sample())
def test_bad_sample_input_names_the_argument(text_model: TextDeCo, cond: Any, null: Any,
                                             kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        sample(text_model, torch.zeros(2, 3, 8, 8), cond, null, steps=2, **kwargs)


def test_unguided_text_sampling_needs_no_null(text_model: TextDeCo) -> None:
    noise, text = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 48)
    out = sample(text_model, noise, text, steps=2, solver="adams")
    assert isinstance(out, torch.Tensor) and out.shape == noise.shape


# ------------------------------------------------------------------ optimized vs the reference
TEXT_CONFIGS = st.builds(
    lambda c, p, heads, hd, depth, dd, dw, ratio, td, te, tl: DeCoConfig(
        "t2i", c, p, heads * hd, heads, depth, dd, dw, 0, ratio, td, te, tl),
    st.integers(1, 3), st.integers(1, 4), st.integers(2, 3), st.sampled_from([4, 8]),
    st.integers(1, 2), st.integers(1, 2), st.integers(4, 12), st.sampled_from([4.0, 2.0, 2.5]),
    st.integers(1, 2), st.integers(1, 12), st.integers(1, 6),
)
# Widths of at least 4 (decoder) and 8 (hidden): a LayerNorm over 2 channels is a near sign
# function of their difference, which turns float32 rounding into O(1e-4) output changes.


def _pair(config: DeCoConfig, seed: int) -> tuple[R.Model, TextDeCo]:
    weights = random_weights(config, seed)
    model = build_model(config).double()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    assert isinstance(model, TextDeCo)
    return R.Model(config, weights), model.eval()


@settings(max_examples=20, deadline=None)
@given(config=TEXT_CONFIGS, grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       batch=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_forward_matches_the_reference(config: DeCoConfig, grid: tuple[int, int], batch: int,
                                       seed: int) -> None:
    # Non-square grids included: the crossed RoPE spans and the decoder layout show there.
    ref, model = _pair(config, seed)
    rng = np.random.default_rng(seed + 1)
    p = config.patch_size
    x = rng.standard_normal((batch, config.in_channels, grid[0] * p, grid[1] * p))
    t = rng.uniform(0, 1, batch)
    text = rng.standard_normal((batch, config.text_length, config.text_dim))
    expected = ref.forward(x, t, text)
    args64 = [torch.as_tensor(a) for a in (x, t, text)]
    args32 = [a.float() for a in args64]
    with torch.no_grad():
        got64 = model(*args64)
        semantic = model.semantic(*args64)
        model.set_weight_folding(False)  # the unfolded pixel decoder (PixelDecoder.folding)
        unfolded64 = model(*args64)
        unfolded32 = model.float()(*args32)
        model.set_weight_folding(True)
        got32 = model(*args32)
    assert rel_err(got64, expected) < 1e-10
    assert rel_err(semantic, ref.semantic(x, t, text)) < 1e-10
    assert rel_err(got32, expected) < 1e-5
    assert rel_err(unfolded64, expected) < 1e-10
    assert rel_err(unfolded32, expected) < 1e-5
    assert rel_err(unfolded32, got32) < 1e-5


@settings(max_examples=15, deadline=None)
@given(solver=st.sampled_from(["euler", "heun", "adams"]), order=st.integers(1, 4),
       steps=st.integers(1, 4), guidance=st.one_of(st.just(1.0), st.floats(0.0, 4.0)),
       bounds=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).map(sorted),
       timeshift=st.floats(0.25, 4.0), shared_null=st.booleans(), seed=st.integers(0, 2**31))
def test_text_sampling_matches_the_reference(solver: str, order: int, steps: int, guidance: float,
                                             bounds: list[float], timeshift: float,
                                             shared_null: bool, seed: int) -> None:
    config = DeCoConfig("t2i", 3, 2, 16, 2, 1, 1, 4, 0, 4.0, 1, 6, 3)
    ref, model = _pair(config, seed)
    rng = np.random.default_rng(seed + 1)
    noise = rng.standard_normal((2, 3, 4, 6))
    text = rng.standard_normal((2, 3, 6))
    null = rng.standard_normal((3, 6) if shared_null else (2, 3, 6))
    kwargs: dict[str, Any] = dict(steps=steps, guidance=guidance, interval=tuple(bounds),
                                  timeshift=timeshift, solver=solver, order=order)
    expected = R.sample(ref, noise, text, null, **kwargs)
    got = sample(model, torch.as_tensor(noise), torch.as_tensor(text), torch.as_tensor(null), **kwargs)
    assert rel_err(got, expected) < 1e-10


@pytest.mark.parametrize("command", [["sample", "--steps", "1"], ["spectrum"]])
def test_class_only_commands_refuse_a_text_model(t_dir: Path, command: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main([command[0], str(t_dir / "T.ckpt"), *command[1:]])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "text-to-image" in err and "Traceback" not in err
