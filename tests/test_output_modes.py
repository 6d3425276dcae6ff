"""Every kind of file the commands write gets the permissions a plain `open()` / `mkdir` would give
under the process's umask (0644 / 0755 under 022), checked after the REAL writers (safetensors,
JSON, PNG, JPEG, npz, ONNX with external data, a diffusers folder), not a stand-in: safetensors
0.8's save_file replaces the file it is given, which once undid atomic_write's chmod (issue 20).

The oracle is what the operating system gives a file created by `open(path, "w")` and a folder
created by `mkdir` under the same umask, measured in the same folder."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import umask_fixture

from deco.cli import main
from deco.config import DeCoConfig

pytestmark = pytest.mark.usefixtures("one_thread")


umask = umask_fixture(0o022, 0o077)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _oracle(folder: Path) -> tuple[int, int]:
    """(file mode, folder mode) that open() and mkdir give here under the current umask."""
    (folder / "oracle.txt").write_text("x")
    (folder / "oracle.d").mkdir()
    modes = _mode(folder / "oracle.txt"), _mode(folder / "oracle.d")
    (folder / "oracle.txt").unlink()
    (folder / "oracle.d").rmdir()
    return modes


def _tiny_model(path: Path, seed: int = 0) -> Path:
    from deco.optimized import build_model

    torch.manual_seed(seed)
    build_model(DeCoConfig.preset("DeCo-tiny/4", num_classes=10)).save(path)
    return path


def _assert_modes(root: Path, file_mode: int, dir_mode: int) -> list[str]:
    """Every file under `root` (or `root` itself) has file_mode, every folder dir_mode; returns
    the relative names checked."""
    checked = []
    paths = [root] if root.is_file() else [root, *root.rglob("*")]
    for path in paths:
        want = dir_mode if path.is_dir() else file_mode
        assert _mode(path) == want, f"{path}: {oct(_mode(path))}, expected {oct(want)}"
        checked.append(str(path.relative_to(root.parent)))
    return checked


def test_every_writer_gives_open_and_mkdir_modes(tmp_path: Path, umask: int) -> None:
    from deco.checkpoint import save_checkpoint
    from deco.deploy.export import export_checkpoint
    from deco.evaluate.sample_batches import ShardPlan, generate_shards
    from deco.outputs import save_png, save_samples, write_json
    from deco.reference.weights import save_weights

    file_mode, dir_mode = _oracle(tmp_path)
    assert file_mode == 0o666 & ~umask and dir_mode == 0o777 & ~umask
    model = _tiny_model(tmp_path / "model.safetensors")  # optimized: safetensors.torch
    config = DeCoConfig.preset("DeCo-tiny/4", num_classes=10)
    from helpers import random_weights

    save_weights(tmp_path / "ref.safetensors", config, random_weights(config))  # safetensors.numpy
    save_checkpoint(tmp_path / "checkpoint.safetensors", {"w": torch.ones(3), "step": 1})
    write_json(tmp_path / "metrics.json", {"a": 1})
    save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "grid.png")
    images = torch.zeros(2, 3, 4, 4)
    save_samples(images, [0, 1], tmp_path / "grid.jpg", 2)
    save_samples(images, [0, 1], tmp_path / "s.npz", 2)
    save_samples(images, [0, 1], tmp_path / "pngs", 2)  # a folder, staged and renamed
    generate_shards(lambda y, s: np.zeros((len(y), 4, 4, 3), np.uint8), tmp_path / "shards",
                    ShardPlan(count=2, num_classes=2, shard_size=1), progress=False)
    onnx = export_checkpoint(model, tmp_path / "m.onnx", external_data=True)
    checked = []
    for name in ("model.safetensors", "ref.safetensors", "checkpoint.safetensors", "metrics.json",
                 "grid.png", "grid.jpg", "s.npz", "pngs", "shards", "m.onnx", "m.onnx.data"):
        checked += _assert_modes(tmp_path / name, file_mode, dir_mode)
    assert onnx.with_name("m.onnx.data").is_file()
    assert "shards/shard_00001.npz" in checked and "pngs/000001_class1.png" in checked


def test_cli_convert_outputs(tmp_path: Path, umask: int, fixtures_dir: Path) -> None:
    """`deco convert` to safetensors (from the release's .ckpt) and to a diffusers folder."""
    pytest.importorskip("diffusers")
    file_mode, dir_mode = _oracle(tmp_path)
    assert main(["convert", str(fixtures_dir / "A.ckpt"), str(tmp_path / "a.safetensors")]) == 0
    _assert_modes(tmp_path / "a.safetensors", file_mode, dir_mode)
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "pipe"),
                 "--to", "diffusers"]) == 0
    checked = _assert_modes(tmp_path / "pipe", file_mode, dir_mode)
    assert any(name.endswith(".safetensors") for name in checked)
    assert "pipe/transformer" in checked and "pipe/model_index.json" in checked
