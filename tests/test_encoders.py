"""REPA's DINOv2 encoder (deco.train.repa) on a tiny random Dinov2Config, saved in both user layouts.

Oracles: transformers' Dinov2Model called directly on the same input; a NumPy float64 bicubic
resampler written here from the cubic-convolution formula (Keys, a = -0.75, PyTorch's
half-pixel sampling) for the preprocessing and the position-embedding resize; the original
DINOv2 parameter names as its public vision_transformer.py/layers define them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_weights, require_module, tiny_config
from numpy.typing import NDArray

transformers = require_module("transformers")

from deco.optimized import trainer as T  # noqa: E402
from deco.optimized.weights import build_model  # noqa: E402
from deco.train.repa import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    dinov2_position_embeddings,
    hf_to_original,
    load_repa_encoder,
    original_to_hf,
    repa_preprocess,
)

DIM, DEPTH, PATCH, GRID = 128, 2, 14, 4  # pretraining grid 4x4 at 56 px (ViT-B/14: 37x37 at 518)


def tiny_dinov2(seed: int = 0) -> transformers.Dinov2Model:
    """A random tiny DINOv2 (non-trivial layer scales and position embeddings)."""
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(hidden_size=DIM, num_hidden_layers=DEPTH,
                                       num_attention_heads=DIM // 64, mlp_ratio=4,
                                       image_size=GRID * PATCH, patch_size=PATCH)
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name or "position_embeddings" in name or "cls_token" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return model


@pytest.fixture(scope="module")
def model() -> transformers.Dinov2Model:
    return tiny_dinov2()


@pytest.fixture(scope="module")
def saved(model: transformers.Dinov2Model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model in the HF folder layout and in the original .pth layout."""
    folder = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(folder / "hf")
    torch.save(hf_to_original(model.state_dict()), folder / "dinov2_tiny_pretrain.pth")
    return {"hf": folder / "hf", "original": folder / "dinov2_tiny_pretrain.pth"}


# ------------------------------------------------------------------ NumPy oracle
def cubic_weights(t: NDArray[np.float64], a: float = -0.75) -> NDArray[np.float64]:
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int, step: float) -> NDArray[np.float64]:
    """(n_out, n_in): output i samples the input at (i + 0.5)·step - 0.5 with the 4 nearest taps,
    indices clamped at the border (PyTorch's bicubic, align_corners=False)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * step - 0.5
        base = int(np.floor(x))
        for j in range(base - 1, base + 3):
            m[i, min(max(j, 0), n_in - 1)] += cubic_weights(np.array(x - j))
    return m


def resize(x: NDArray[np.float64], out: tuple[int, int], steps: tuple[float, float]) -> NDArray[np.float64]:
    """Separable bicubic resize of (..., H, W)."""
    mh = bicubic_matrix(x.shape[-2], out[0], steps[0])
    mw = bicubic_matrix(x.shape[-1], out[1], steps[1])
    return np.einsum("ih,...hw,jw->...ij", mh, x, mw)


# ------------------------------------------------------------------ tests
def test_original_names_are_dinov2s(model: transformers.Dinov2Model) -> None:
    """The converted names are those of facebookresearch/dinov2 (DinoVisionTransformer with
    block_chunks=0, as its hub models): every one of them, with the original shapes."""
    state = hf_to_original(model.state_dict())
    block = {"norm1.weight": (DIM,), "norm1.bias": (DIM,), "attn.qkv.weight": (3 * DIM, DIM),
             "attn.qkv.bias": (3 * DIM,), "attn.proj.weight": (DIM, DIM), "attn.proj.bias": (DIM,),
             "ls1.gamma": (DIM,), "norm2.weight": (DIM,), "norm2.bias": (DIM,),
             "mlp.fc1.weight": (4 * DIM, DIM), "mlp.fc1.bias": (4 * DIM,), "mlp.fc2.weight": (DIM, 4 * DIM),
             "mlp.fc2.bias": (DIM,), "ls2.gamma": (DIM,)}
    expected = {"cls_token": (1, 1, DIM), "pos_embed": (1, 1 + GRID * GRID, DIM), "mask_token": (1, DIM),
                "patch_embed.proj.weight": (DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": (DIM,),
                "norm.weight": (DIM,), "norm.bias": (DIM,)}
    expected |= {f"blocks.{i}.{k}": s for i in range(DEPTH) for k, s in block.items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # qkv is q, k and v stacked in that order (the original splits qkv.reshape(B, N, 3, heads, hd))
    hf = model.state_dict()
    q_name = next(k for k in hf if k.startswith("encoder.layer.0.attention.") and
                  ("q_proj.weight" in k or "query.weight" in k))
    torch.testing.assert_close(state["blocks.0.attn.qkv.weight"][:DIM], hf[q_name], rtol=0, atol=0)


def test_name_conversion_round_trips(model: transformers.Dinov2Model) -> None:
    hf = model.state_dict()
    back = original_to_hf(hf_to_original(hf), hf.keys())
    assert back.keys() == hf.keys()
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_features_match_dinov2model(model: transformers.Dinov2Model, saved: dict[str, Path],
                                    layout: str) -> None:
    """At the pretraining grid (64 px -> 56 px -> 4x4) the encoder is Dinov2Model's patch tokens."""
    encoder = load_repa_encoder(saved[layout], "cpu", torch.float32, base_patch_size=16)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    got = encoder(x)
    with torch.no_grad():
        expected = model(pixel_values=repa_preprocess(x, 16, PATCH)).last_hidden_state[:, 1:]
    assert got.shape == (2, GRID * GRID, DIM)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.train().training


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_features_on_another_grid(model: transformers.Dinov2Model, saved: dict[str, Path],
                                  layout: str) -> None:
    """48 px -> 42 px -> 3x3 tokens: Dinov2Model built for that grid, its position embeddings
    resized by the NumPy oracle the original way (scale (3 + 0.1) / 4), gives the same tokens."""
    encoder = load_repa_encoder(saved[layout], "cpu", torch.float32)
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    got = encoder(x)
    pos = model.embeddings.position_embeddings.detach().double().numpy()
    step = GRID / (3 + 0.1)
    patches = pos[0, 1:].reshape(GRID, GRID, DIM).transpose(2, 0, 1)
    resized = resize(patches, (3, 3), (step, step)).transpose(1, 2, 0).reshape(1, 9, DIM)
    small = transformers.Dinov2Model(transformers.Dinov2Config(**{**model.config.to_dict(),
                                                                  "image_size": 3 * PATCH})).eval()
    state = dict(model.state_dict())
    state["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([pos[:, :1], resized], axis=1)).float()
    small.load_state_dict(state)
    with torch.no_grad():
        expected = small(pixel_values=repa_preprocess(x)).last_hidden_state[:, 1:]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    twin = copy.deepcopy(encoder)  # the override follows the copy's own weights
    with torch.no_grad():
        twin.model.embeddings.position_embeddings.mul_(0.0)
    assert not torch.allclose(twin(x), got, atol=1e-3)
    torch.testing.assert_close(encoder(x), got, rtol=0, atol=0)


def test_position_embeddings_against_numpy() -> None:
    generator = torch.Generator().manual_seed(3)
    pos = torch.randn(1, 1 + 37 * 37, 5, generator=generator, dtype=torch.float64)
    got = dinov2_position_embeddings(pos, 16, 16).numpy()  # the release at 256 px
    patches = pos[0, 1:].numpy().reshape(37, 37, 5).transpose(2, 0, 1)
    step = 37 / 16.1
    expected = resize(patches, (16, 16), (step, step)).transpose(1, 2, 0).reshape(256, 5)
    np.testing.assert_allclose(got[0, 0], pos[0, 0].numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(got[0, 1:], expected, rtol=0, atol=1e-5)  # interpolated in float32
    assert dinov2_position_embeddings(pos, 37, 37) is pos


def test_preprocess_by_hand() -> None:
    """[-1, 1] -> [0, 1] -> (v - mean) / std per channel -> bicubic to 14/16 of the size."""
    x = torch.rand(2, 3, 32, 48, dtype=torch.float64) * 2 - 1
    got = repa_preprocess(x).numpy()
    mean = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    normalised = ((x.numpy() + 1) / 2 - mean) / std
    expected = resize(normalised, (28, 42), (32 / 28, 48 / 42))
    assert got.shape == (2, 3, 28, 42)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_repa_loss_with_the_encoder(saved: dict[str, Path], model: transformers.Dinov2Model) -> None:
    """Trainer._repa_loss on given DiT tokens = mean(1 - cos(projector(tokens), DINOv2 tokens)),
    the projector (Linear, SiLU, Linear, SiLU, Linear) and the cosine done here in float64.
    DeCo-tiny/4 on 16x16 images: a 4x4 grid; the encoder sees 56x56 (base patch 4), its own grid."""
    config = tiny_config()
    dit = build_model(config).double()
    dit.load_state_dict({k: torch.from_numpy(v) for k, v in random_weights(config, seed=0).items()})
    encoder = load_repa_encoder(saved["original"], "cpu", torch.float32, base_patch_size=config.patch_size)
    trainer = T.Trainer(dit, T.TrainConfig(repa_layer=2, repa_encoder_dim=DIM), encoder=encoder)
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(3, 3, 16, 16, generator=generator, dtype=torch.float64) * 2 - 1
    tokens = torch.randn(3, 16, config.hidden_size, generator=generator, dtype=torch.float64)
    got = trainer._repa_loss(tokens, x).item()

    with torch.no_grad():
        pixels = repa_preprocess(x.float(), config.patch_size, PATCH)
        target = model(pixel_values=pixels).last_hidden_state[:, 1:].double().numpy()  # (3, 16, DIM)
    h = tokens.numpy()
    assert trainer.projector is not None
    linears = [m for m in trainer.projector if hasattr(m, "weight")]
    for i, layer in enumerate(linears):
        h = h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
        if i < len(linears) - 1:
            h = h / (1 + np.exp(-h))  # SiLU
    cos = (h * target).sum(-1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(target, axis=-1))
    expected = float(np.mean(1 - cos))
    assert 0.5 < expected < 1.5  # random directions: a non-degenerate case
    assert abs(got - expected) < 1e-5


def test_bad_paths_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^path: no such file or folder"):
        load_repa_encoder(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"^path: .* is not a checkpoint \(") as info:
        load_repa_encoder(junk)
    assert len(str(info.value).splitlines()) == 1
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match=r"^path: not an original DINOv2 ViT state dict"):
        load_repa_encoder(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^path: .* has no config.json"):
        load_repa_encoder(tmp_path / "empty")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "config.json").write_text('{"model_type": "dinov2"}')
    with pytest.raises(ValueError, match=r"^path: cannot load the DINOv2 folder .* no file named"):
        load_repa_encoder(tmp_path / "torn")
    (tmp_path / "torn" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"^path: cannot load the DINOv2 folder"):
        load_repa_encoder(tmp_path / "torn")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ValueError, match=r"^path: .* model_type 'clip'"):
        load_repa_encoder(tmp_path / "clip")


def test_bad_images() -> None:
    with pytest.raises(ValueError, match=r"^x: expected a floating-point \(B, 3, H, W\)"):
        repa_preprocess(torch.zeros(2, 1, 8, 8))


def vitb14_original_shapes() -> dict[str, tuple[int, ...]]:
    """dinov2_vitb14_pretrain.pth as DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=768,
    depth=12, mlp_ratio=4, init_values=1e-5, block_chunks=0) defines it."""
    d = 768
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d), "pos_embed": (1, 1 + 37 * 37, d), "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,),
        "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(12):
        for name, shape in {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
                            "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
                            "ls1.gamma": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
                            "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,),
                            "mlp.fc2.weight": (d, 4 * d), "mlp.fc2.bias": (d,), "ls2.gamma": (d,)}.items():
            shapes[f"blocks.{i}.{name}"] = shape
    return shapes


def test_vitb14_layout_converts_to_dinov2_base() -> None:
    """The full-size original layout (no weights: meta tensors) gives facebook/dinov2-base's
    config, and its converted names and shapes are exactly that model's."""
    from deco.train.repa import config_from_original

    state = {k: torch.empty(s, device="meta") for k, s in vitb14_original_shapes().items()}
    config = config_from_original(state)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.patch_size, config.image_size, config.mlp_ratio) == (14, 518, 4)
    with torch.device("meta"):
        target = transformers.Dinov2Model(config)
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    converted = original_to_hf(state, expected.keys())
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_deco_train_with_repa_encoder(saved: dict[str, Path], tmp_path: Path, layout: str) -> None:
    """`deco train --repa-encoder`: the paper's recipe from the command line. REPA's loss is
    logged (1 - cosine of a fresh projector: near 1, never 0), the projector is checkpointed, and
    the run records the encoder so --resume rebuilds it."""
    from deco.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from deco.cli import main

    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--model", "DeCo-tiny/4", "--steps", "2", "--batch-size", "4",
            "--sample-steps", "1", "--log-every", "1", "--device", "cpu",
            "--repa-encoder", str(saved[layout]), "--repa-layer", "2"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(0.5 < r["repa"] < 1.5 for r in records)
    assert all(r["loss"] > r["fm"] + r["freq"] for r in records)  # REPA's weighted term is in the loss
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["trainer"]["projector"] is not None
    assert state["run"]["repa_encoder"] == str(saved[layout])
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 0


def test_deco_train_repa_errors_are_one_line(saved: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from deco.cli import main

    base = ["train", "--out", str(tmp_path / "run"), "--steps", "1", "--device", "cpu"]
    for extra, needles in [(["--repa-encoder", str(tmp_path / "missing.pth")], ["--repa-encoder", "no such"]),
                           (["--repa-encoder", str(saved["hf"])], ["--repa-layer", "1..3"]),
                           (["--repa-layer", "2"], ["--repa-layer", "--repa-encoder"])]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
