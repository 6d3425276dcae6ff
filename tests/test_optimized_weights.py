"""`deco.optimized.load_model` / `save_model` (spec/05-weights.md) and the release fixtures.

The release checkpoints are loaded directly (`.ckpt`, EMA weights, config from the shapes) and
reproduce, in float32, every model and sampler output the release computed (A.npz) to 1e-5.
DeCo `.safetensors` files written by `model.save` and by `deco convert` round-trip exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import FIXTURE_RTOL, random_weights, rel_err, tiny_config
from safetensors.torch import save_file

from deco.cli import main as deco_main
from deco.config import DeCoConfig
from deco.optimized import BaselineDiT, DeCo, build_model, load_model, sample, save_model
from deco.reference.weights import load_weights as reference_load_weights


@pytest.fixture(scope="module")
def npz(fixtures_dir: Path) -> Any:
    return np.load(fixtures_dir / "A.npz")


@pytest.fixture(scope="module")
def settings_(npz: Any) -> dict[str, Any]:
    return dict(json.loads(bytes(npz["config"])))


def forward(model: Any, npz: Any, method: str = "forward", dtype: torch.dtype = torch.float32) -> Any:
    x, t, y = (torch.as_tensor(npz[k]) for k in ("forward_x", "forward_t", "forward_y"))
    with torch.no_grad():
        return getattr(model, method)(x.to(dtype), t.to(dtype), y).double().numpy()


# ------------------------------------------------------------------------- release fixtures
def test_release_checkpoints_load_directly(fixtures_dir: Path, settings_: dict[str, Any]) -> None:
    deco, base = load_model(fixtures_dir / "A.ckpt"), load_model(fixtures_dir / "A-baseline.ckpt")
    assert isinstance(deco, DeCo) and isinstance(base, BaselineDiT)
    assert deco.patch_embed.weight.dtype == torch.float32 and not deco.training
    m = settings_["model"]
    assert (deco.config.patch_size, deco.config.hidden_size, deco.config.num_heads) == (
        m["patch_size"], m["hidden_size"], m["num_groups"])
    assert (deco.config.depth, deco.config.decoder_depth, deco.config.decoder_width) == (
        m["num_cond_blocks"], m["num_blocks"] - m["num_cond_blocks"], m["hidden_size_x"])
    assert base.config.depth == m["num_blocks"]


def test_release_forward_outputs(fixtures_dir: Path, npz: Any) -> None:
    deco = load_model(fixtures_dir / "A.ckpt")
    assert rel_err(forward(deco, npz), npz["forward_out"]) <= FIXTURE_RTOL
    assert rel_err(forward(deco, npz, "semantic"), npz["forward_dit_out"]) <= FIXTURE_RTOL
    base = load_model(fixtures_dir / "A-baseline.ckpt")
    assert rel_err(forward(base, npz), npz["baseline_forward_out"]) <= FIXTURE_RTOL


def test_online_weights_give_a_different_answer(fixtures_dir: Path, npz: Any) -> None:
    online = load_model(fixtures_dir / "A.ckpt", weights="online")
    assert rel_err(forward(online, npz), npz["forward_out"]) > 1e-3
    online_base = load_model(fixtures_dir / "A-baseline.ckpt", weights="online")
    assert rel_err(forward(online_base, npz), npz["baseline_forward_out"]) > 1e-3


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_release_sampler_outputs(fixtures_dir: Path, npz: Any, settings_: dict[str, Any],
                                 solver: str) -> None:
    s = settings_[solver]
    model = load_model(fixtures_dir / "A.ckpt")
    out, states = sample(
        model, torch.as_tensor(npz["sample_noise"], dtype=torch.float32),
        torch.as_tensor(npz["sample_cond"]), steps=s["num_steps"], guidance=s["guidance"],
        interval=(s["guidance_interval_min"], s["guidance_interval_max"]),
        timeshift=s["timeshift"], solver=solver, exact_heun=bool(s.get("exact_henu", False)),
        return_trajectory=True,
    )
    assert rel_err(out.double().numpy(), npz[f"{solver}_out"]) <= FIXTURE_RTOL
    if solver == "euler":
        assert rel_err(states.double().numpy(), npz["euler_traj"]) <= FIXTURE_RTOL


def test_float64_load_reproduces_the_release_too(fixtures_dir: Path, npz: Any) -> None:
    deco = load_model(fixtures_dir / "A.ckpt", dtype=torch.float64, device="cpu")
    assert deco.patch_embed.weight.dtype == torch.float64
    assert rel_err(forward(deco, npz, dtype=torch.float64), npz["forward_out"]) <= FIXTURE_RTOL


# ----------------------------------------------------------------------------- round trips
def _state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("architecture", ["deco", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_then_load_round_trips_exactly(tmp_path: Path, architecture: str,
                                            dtype: torch.dtype) -> None:
    config = tiny_config(architecture, num_classes=7)
    model = build_model(config).to(dtype)
    model.load_state_dict({k: torch.as_tensor(v, dtype=dtype)
                           for k, v in random_weights(config, 1).items()})
    path = tmp_path / "m.safetensors"
    model.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left
    loaded = load_model(path)
    assert type(loaded) is type(model) and loaded.config == config
    before, after = _state(model), _state(loaded)
    assert before.keys() == after.keys()
    assert all(after[k].dtype == dtype and torch.equal(before[k], after[k]) for k in before)
    # The file is the portable format: the NumPy reference reads the same config and values.
    ref_config, ref_weights = reference_load_weights(path)
    assert ref_config == config
    assert all(np.array_equal(ref_weights[k], before[k].double().numpy()) for k in before)


def test_save_overwrites_and_casts(tmp_path: Path) -> None:
    config = tiny_config("deco")
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    model = build_model(config).double()
    save_model(model, path, dtype=torch.float32)
    loaded = load_model(path)
    assert loaded.patch_embed.weight.dtype == torch.float32
    assert torch.equal(loaded.patch_embed.weight, model.patch_embed.weight.float())


@pytest.mark.parametrize("name", ["A.ckpt", "A-baseline.ckpt"])
def test_deco_convert_output_loads_like_the_checkpoint(fixtures_dir: Path, tmp_path: Path,
                                                      name: str) -> None:
    direct = load_model(fixtures_dir / name)
    for dtype in ("float32", "float64"):
        out = tmp_path / f"{dtype}.safetensors"
        assert deco_main(["convert", str(fixtures_dir / name), str(out), "--dtype", dtype]) == 0
        converted = load_model(out, dtype=torch.float32)
        assert converted.config == direct.config
        a, b = _state(direct), _state(converted)
        assert all(torch.equal(a[k], b[k]) for k in a)
    online = tmp_path / "online.safetensors"
    assert deco_main(["convert", str(fixtures_dir / name), str(online), "--weights", "online"]) == 0
    a, b = _state(load_model(fixtures_dir / name, weights="online")), _state(load_model(online))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ bad files
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^path"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match=r"^path"):
        build_model(tiny_config("deco")).save(tmp_path / "no-such-dir" / "m.safetensors")


def test_files_that_are_not_deco_weights(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match=r"^path.*without DeCo metadata"):
        load_model(plain)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"^path"):
        load_model(garbage)
    not_lightning = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, not_lightning)
    with pytest.raises(ValueError, match=r"^path.*state_dict"):
        load_model(not_lightning)


def test_truncated_and_mismatched_files(tmp_path: Path) -> None:
    config = tiny_config("deco")
    good = tmp_path / "good.safetensors"
    build_model(config).save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"^path"):
        load_model(truncated)
    mismatched = tmp_path / "mismatched.safetensors"
    other = DeCoConfig.preset("DeCo-tiny/4", num_classes=3)
    tensors = {k: v.contiguous() for k, v in build_model(other).state_dict().items()}
    save_file(tensors, str(mismatched), metadata={"deco_format": "1", "config": config.to_json()})
    with pytest.raises(ValueError, match=r"^weights"):
        load_model(mismatched)
    nonfinite = tmp_path / "nan.safetensors"
    tensors = {k: v.contiguous() for k, v in build_model(config).state_dict().items()}
    tensors["patch_embed.bias"] = torch.full_like(tensors["patch_embed.bias"], float("nan"))
    save_file(tensors, str(nonfinite), metadata={"deco_format": "1", "config": config.to_json()})
    with pytest.raises(ValueError, match=r"^weights"):
        load_model(nonfinite)


def test_bad_arguments(tmp_path: Path, fixtures_dir: Path) -> None:
    path = tmp_path / "m.safetensors"
    build_model(tiny_config("deco")).save(path)
    with pytest.raises(ValueError, match=r"^weights"):
        load_model(path, weights="best")
    with pytest.raises(ValueError, match=r"^weights"):
        load_model(path, weights="online")  # a .safetensors file holds one weight set
    with pytest.raises(TypeError, match=r"^dtype"):
        load_model(path, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"^model"):
        save_model(torch.nn.Linear(2, 2), path)  # type: ignore[arg-type]
