"""The portable weight file and `deco convert` (spec/05-weights.md), including bad files.

The release checkpoint is the fixture `A.ckpt`; converted tensors are compared with the
checkpoint's own tensors as raw values, independent of the renaming code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_weights, release_fixture, tiny_config
from safetensors.numpy import load_file, save_file

from deco import cli
from deco import reference as R
from deco.config import parameter_shapes
from deco.reference.weights import FORMAT_KEY, FORMAT_VERSION
from deco.release import read_release_checkpoint


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `deco argv`; argparse usage errors exit via SystemExit."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0]


def _tensor_multiset(tensors: dict[str, Any]) -> list[tuple[tuple[int, ...], bytes]]:
    return sorted((tuple(v.shape), np.asarray(v, dtype=np.float32).tobytes()) for v in tensors.values())


@pytest.fixture(scope="module")
def converted(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("converted")
    paths = {"ema": out / "A.safetensors", "online": out / "A-online.safetensors"}
    assert cli.main(["convert", str(fixtures_dir / "A.ckpt"), str(paths["ema"])]) == 0
    ckpt = str(fixtures_dir / "A.ckpt")
    assert cli.main(["convert", ckpt, str(paths["online"]), "--weights", "online"]) == 0
    return paths


def test_convert_takes_exactly_the_chosen_weight_set(fixtures_dir: Path, converted: dict[str, Path]) -> None:
    state = torch.load(fixtures_dir / "A.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    ema = {k: v.numpy() for k, v in state.items() if k.startswith("ema_denoiser.")}
    online = {k: v.numpy() for k, v in state.items() if k.startswith("denoiser.")}
    got_ema, got_online = load_file(converted["ema"]), load_file(converted["online"])
    # same tensors (values and shapes), whatever the names: nothing lost, nothing invented
    assert _tensor_multiset(got_ema) == _tensor_multiset(ema)
    assert _tensor_multiset(got_online) == _tensor_multiset(online)
    assert _tensor_multiset(got_ema) != _tensor_multiset(got_online)
    assert converted["ema"].read_bytes() != converted["online"].read_bytes()
    assert all(v.dtype == np.float32 for v in got_ema.values())
    # the names are the portable layout of the inferred config
    config, _ = R.load_weights(converted["ema"])
    assert {k: v.shape for k, v in got_ema.items()} == parameter_shapes(config)


def test_online_weights_give_a_different_answer(fixtures_dir: Path, converted: dict[str, Path]) -> None:
    a = np.load(fixtures_dir / "A.npz")
    x, t, y = a["forward_x"], a["forward_t"], a["forward_y"]
    ema, online = R.load_model(converted["ema"]), R.load_model(converted["online"])
    assert ema.config == online.config
    out_ema, out_online = ema.forward(x, t, y), online.forward(x, t, y)
    assert np.max(np.abs(out_ema - out_online)) > 1e-3 * np.max(np.abs(out_ema))


def test_convert_float64_and_config_metadata(fixtures_dir: Path, tmp_path: Path,
                                             converted: dict[str, Path]) -> None:
    out = tmp_path / "A64.safetensors"
    assert cli.main(["convert", str(fixtures_dir / "A.ckpt"), str(out), "--dtype", "float64"]) == 0
    w64, w32 = load_file(out), load_file(converted["ema"])
    assert set(w64) == set(w32)
    for k in w64:
        assert w64[k].dtype == np.float64
        np.testing.assert_array_equal(w64[k], w32[k].astype(np.float64))  # float32 source: exact
    config, _ = R.load_weights(out)
    cfg = json.loads(bytes(np.load(fixtures_dir / "A.npz")["config"]))["model"]
    assert (config.architecture, config.in_channels, config.patch_size) == ("deco", 3, cfg["patch_size"])
    assert (config.hidden_size, config.num_heads, config.num_classes) == (
        cfg["hidden_size"], cfg["num_groups"], cfg["num_classes"])
    assert (config.depth, config.decoder_depth, config.decoder_width) == (
        cfg["num_cond_blocks"], cfg["num_blocks"] - cfg["num_cond_blocks"], cfg["hidden_size_x"])


def test_convert_baseline_is_told_apart(fixtures_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "base.safetensors"
    assert cli.main(["convert", str(fixtures_dir / "A-baseline.ckpt"), str(out)]) == 0
    config, weights = R.load_weights(out)
    assert config.architecture == "baseline" and config.depth == 5
    assert "head.linear.weight" in weights
    with pytest.raises(ValueError, match=r"^semantic:"):
        R.Model(config, weights).semantic(np.zeros((1, 3, 8, 8)), [0.5], [1])


def test_save_load_round_trip(tmp_path: Path) -> None:
    for arch in ("deco", "baseline"):
        cfg = tiny_config(arch)
        w = random_weights(cfg, 5)
        path = tmp_path / f"{arch}.safetensors"
        R.save_weights(path, cfg, w, dtype=np.float64)
        config, loaded = R.load_weights(path)
        assert config == cfg
        assert set(loaded) == set(w)
        for k in w:
            np.testing.assert_array_equal(loaded[k], w[k])
        model = R.load_model(path)
        x = np.random.default_rng(0).standard_normal((1, 3, 8, 8))
        np.testing.assert_array_equal(model.forward(x, [0.3], [2]), R.Model(cfg, w).forward(x, [0.3], [2]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline.safetensors", "deco.safetensors"]


# ---------------------------------------------------------------------------------- bad files
def _truncate(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.fixture(scope="module")
def bad_files(fixtures_dir: Path, converted: dict[str, Path],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    files = {
        "ckpt-truncated": _truncate(fixtures_dir / "A.ckpt", d / "trunc.ckpt", 0.5),
        "ckpt-truncated-tail": _truncate(fixtures_dir / "A.ckpt", d / "trunc-tail.ckpt", 0.999),
        "st-truncated": _truncate(converted["ema"], d / "trunc.safetensors", 0.5),
        "st-truncated-tail": _truncate(converted["ema"], d / "trunc-tail.safetensors", 0.999),
        "ckpt-unrelated": d / "unrelated.ckpt",
        "ckpt-no-deco-entries": d / "other-model.ckpt",
        "ckpt-wrong-shape": d / "wrong-shape.ckpt",
        "ckpt-unknown-name": d / "unknown-name.ckpt",
        "st-no-metadata": d / "plain.safetensors",
        "st-wrong-shape": d / "wrong-shape.safetensors",
        "st-bad-config": d / "bad-config.safetensors",
        "not-a-file": d / "random.bin",
        "st-converted": converted["ema"],
    }
    torch.save({"optimizer": {"lr": 0.1}, "weights": torch.zeros(3)}, files["ckpt-unrelated"])
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(2, 2)}}, files["ckpt-no-deco-entries"])
    ckpt = torch.load(fixtures_dir / "A.ckpt", map_location="cpu", weights_only=True)
    wrong = dict(ckpt, state_dict=dict(ckpt["state_dict"]))
    wrong["state_dict"]["ema_denoiser.blocks.1.attn.proj.bias"] = torch.zeros(63)
    torch.save(wrong, files["ckpt-wrong-shape"])
    unknown = dict(ckpt, state_dict=dict(ckpt["state_dict"]))
    unknown["state_dict"]["ema_denoiser.extra_head.weight"] = torch.zeros(3)
    torch.save(unknown, files["ckpt-unknown-name"])
    weights = load_file(converted["ema"])
    save_file(weights, files["st-no-metadata"])
    config_json = R.load_weights(converted["ema"])[0].to_json()
    bad = dict(weights, **{"decoder.final.bias": np.zeros(4, np.float32)})
    save_file(bad, files["st-wrong-shape"], metadata={FORMAT_KEY: FORMAT_VERSION, "config": config_json})
    save_file(weights, files["st-bad-config"], metadata={FORMAT_KEY: FORMAT_VERSION, "config": "{oops"})
    files["not-a-file"].write_bytes(np.random.default_rng(0).bytes(4096))
    return files


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("ckpt-truncated", "checkpoint"),
        ("ckpt-truncated-tail", "checkpoint"),
        ("ckpt-unrelated", "checkpoint"),
        ("ckpt-no-deco-entries", "checkpoint"),
        ("ckpt-wrong-shape", "weights"),
        ("ckpt-unknown-name", "checkpoint"),
        ("not-a-file", "checkpoint"),
        ("st-truncated", "checkpoint"),  # a safetensors file is not a torch checkpoint either
        ("st-converted", "checkpoint"),
    ],
)
def test_read_release_checkpoint_rejects(bad_files: dict[str, Path], key: str, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}:"):
        read_release_checkpoint(bad_files[key])


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("st-truncated", "path"),
        ("st-truncated-tail", "path"),
        ("st-no-metadata", "path"),
        ("st-wrong-shape", "weights"),
        ("st-bad-config", "config"),
        ("not-a-file", "path"),
        ("ckpt-unrelated", "path"),
    ],
)
def test_load_weights_rejects(bad_files: dict[str, Path], key: str, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}:"):
        R.load_weights(bad_files[key])
    with pytest.raises(ValueError, match=rf"^{name}:"):
        R.load_model(bad_files[key])


def test_missing_files_and_bad_arguments(tmp_path: Path, fixtures_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^path:"):
        R.load_weights(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match=r"^checkpoint:"):
        read_release_checkpoint(tmp_path / "nothing.ckpt")
    with pytest.raises(ValueError, match=r"^weights:"):
        read_release_checkpoint(fixtures_dir / "A.ckpt", "both")  # type: ignore[arg-type]
    cfg = tiny_config("deco")
    w = random_weights(cfg)
    del w["decoder.final.bias"]
    with pytest.raises(ValueError, match=r"^weights:"):
        R.save_weights(tmp_path / "x.safetensors", cfg, w)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "key", ["ckpt-truncated", "ckpt-unrelated", "ckpt-no-deco-entries", "ckpt-wrong-shape", "not-a-file",
            "st-truncated", "st-converted"],
)
def test_cli_convert_bad_checkpoint(bad_files: dict[str, Path], tmp_path: Path, key: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(["convert", str(bad_files[key]), str(out)], capsys)
    assert_one_line_error(code, err, "deco convert")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_cli_convert_missing_input_and_output_folder(tmp_path: Path, fixtures_dir: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.ckpt")
    code, _, err = run_cli(["convert", missing, str(tmp_path / "o.safetensors")], capsys)
    assert_one_line_error(code, err, "missing.ckpt")
    code, _, err = run_cli(
        ["convert", str(fixtures_dir / "A.ckpt"), str(tmp_path / "no" / "dir" / "o.safetensors")], capsys
    )
    assert_one_line_error(code, err, "output")
    code, _, err = run_cli(["convert", str(fixtures_dir / "A.ckpt"), str(tmp_path / "o"), "--weights", "x"],
                           capsys)
    assert_one_line_error(code, err, "--weights")


def test_cli_convert_reports_success(tmp_path: Path, fixtures_dir: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.safetensors"
    code, stdout, err = run_cli(["convert", str(fixtures_dir / "A.ckpt"), str(out), "--weights", "online"],
                                capsys)
    assert code == 0 and err == ""
    assert "online" in stdout and out.is_file()


@pytest.mark.parametrize(("weights", "prefix"), [("ema", "ema_denoiser."), ("online", "denoiser.")])
def test_convert_text_model_takes_exactly_the_chosen_weight_set(fixtures_dir: Path, tmp_path: Path,
                                                                weights: str, prefix: str) -> None:
    ckpt = release_fixture("T.ckpt")
    out = tmp_path / "T.safetensors"
    assert cli.main(["convert", str(ckpt), str(out), "--weights", weights]) == 0
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    chosen = {k: v.numpy() for k, v in state.items() if k.startswith(prefix)}
    got = load_file(out)
    # The same values whatever the names (the (1, T, D) position table is stored as (T, D)).
    assert sorted(v.tobytes() for v in got.values()) == sorted(v.tobytes() for v in chosen.values())
    config, _ = R.load_weights(out)
    assert config.architecture == "t2i"
    assert {k: v.shape for k, v in got.items()} == parameter_shapes(config)
