"""Issue 20, points 1, 4 and 5: `deco sample --count` never mixes another plan's shards, one
overwrite rule for every command's output, and one-line error texts.

Oracles: a fresh run into a new folder (what a rerun after --restart must equal, byte for byte),
the bytes of the earlier output (what a refusal must leave), Pillow's own reading of the file
(a JPEG is a JPEG)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deco.cli import main
from deco.config import DeCoConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = ["--steps", "2", "--device", "cpu"]


def _tiny_model(path: Path, seed: int) -> Path:
    from deco.optimized import build_model

    torch.manual_seed(seed)
    build_model(DeCoConfig.preset("DeCo-tiny/4", num_classes=10)).save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two models of the same shape and class count, different weights."""
    folder = tmp_path_factory.mktemp("models")
    return _tiny_model(folder / "a.safetensors", 0), _tiny_model(folder / "b.safetensors", 1)


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run `deco argv`; it must fail with one line on stderr (returned) and exit status 2."""
    capsys.readouterr()  # what earlier commands printed
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- 1. stale shards
def _count(model: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", str(model), "--count", "6", "--shard-size", "4", *SAMPLE, "--guidance", "3",
            "--out", str(out), *extra]


def _npz(path: Path) -> bytes:
    with np.load(path) as f:
        return bytes(f["arr_0"].tobytes()) + bytes(f["arr_1"].tobytes())


def test_sample_count_refuses_another_models_shards(models: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    a, b = models
    out = tmp_path / "s.npz"
    assert main(_count(a, out)) == 0
    out.unlink()  # as if killed after the shards: the batch is assembled again from them
    err = _fails(capsys, _count(b, out))
    assert "model_sha256" in err and "--restart" in err and "s.shards" in err, err
    assert not out.exists()
    assert main(_count(b, out, "--restart")) == 0
    assert main(_count(b, tmp_path / "fresh.npz")) == 0  # the oracle: model b from scratch
    assert _npz(out) == _npz(tmp_path / "fresh.npz")


def test_sample_count_refuses_a_changed_setting(models: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = models
    out = tmp_path / "s.npz"
    assert main(_count(a, out)) == 0
    out.unlink()
    changed = [*_count(a, out)]
    changed[changed.index("--guidance") + 1] = "1.5"
    err = _fails(capsys, changed)
    assert "sampler.guidance 3.0 -> 1.5" in err and "--restart" in err, err
    for flag, value in (("--steps", "3"), ("--resolution", "16"), ("--seed", "1")):
        argv = [*_count(a, out), flag, value]
        err = _fails(capsys, argv)
        assert "another plan" in err, (flag, err)
    # the batch size only decides how the images are computed: a rerun may change it
    assert main([*_count(a, out), "--batch-size", "2"]) == 0


# ----------------------------------------------------------------------------- 4. overwrite rule
def _refused_then_forced(capsys: pytest.CaptureFixture[str], argv: list[str], output: Path) -> None:
    """`argv` writes `output`, which exists: refused (one line, exit 2, bytes untouched), then
    replaced with --force."""
    before = output.read_bytes() if output.is_file() else None
    err = _fails(capsys, argv)
    assert "already exists" in err and "--force" in err and str(output) in err, err
    if before is not None:
        assert output.read_bytes() == before
    assert main([*argv, "--force"]) == 0, capsys.readouterr().err
    if before is not None:
        assert output.read_bytes() != before


def test_every_command_refuses_an_existing_output(models: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = models
    for name in ("g.png", "g.jpg", "g.npz", "c.npz", "m.onnx", "f.json", "spectrum.json"):
        (tmp_path / name).write_bytes(b"earlier output")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.png").write_bytes(b"earlier")
    for name in ("g.png", "g.jpg", "g.npz"):
        _refused_then_forced(capsys, ["sample", str(a), "--labels", "1", *SAMPLE, "--out",
                                      str(tmp_path / name)], tmp_path / name)
    _refused_then_forced(capsys, ["sample", str(a), "--labels", "1", *SAMPLE, "--out",
                                  str(tmp_path / "folder")], tmp_path / "folder")
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["000000_class1.png"]
    _refused_then_forced(capsys, _count(a, tmp_path / "c.npz"), tmp_path / "c.npz")
    _refused_then_forced(capsys, ["export-onnx", str(a), str(tmp_path / "m.onnx")], tmp_path / "m.onnx")
    dummy = tmp_path / "g.npz"
    err = _fails(capsys, ["fid", str(dummy), str(dummy), "--inception-weights", str(dummy),
                          "--json", str(tmp_path / "f.json")])
    assert "f.json already exists" in err and "--force" in err
    err = _fails(capsys, ["spectrum", str(a), "--count", "2", "--out", str(tmp_path)])
    assert "spectrum.json already exists" in err
    err = _fails(capsys, ["conformance", "--write", str(tmp_path / "folder")])
    assert "already exists" in err and "--force" in err
    err = _fails(capsys, ["conformance", "--export-vector-model", str(tmp_path / "m.onnx")])
    assert "already exists" in err


def test_convert_refuses_an_existing_output_in_both_formats(fixtures_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"someone's file")
    _refused_then_forced(capsys, ["convert", str(fixtures_dir / "A.ckpt"), str(out)], out)
    pytest.importorskip("diffusers")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "notes.txt").write_text("earlier")
    _refused_then_forced(capsys, ["convert", str(out), str(pipe), "--to", "diffusers"], pipe)
    assert not (pipe / "notes.txt").exists() and (pipe / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_every_writing_command_documents_force() -> None:
    from deco.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    choices: dict[str, object] = sub.choices  # type: ignore[assignment]
    for name in ("convert", "export-onnx", "sample", "fid", "spectrum", "conformance"):
        text = choices[name].format_help()  # type: ignore[attr-defined]
        assert "--force" in text and "refused" in text, name


# ----------------------------------------------------------------------------- 5. error text
def test_a_text_file_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, not weights\n")
    for argv in (["sample", str(text)], ["convert", str(text), str(tmp_path / "o.safetensors")],
                 ["export-onnx", str(text), str(tmp_path / "o.onnx")]):
        err = _fails(capsys, argv)
        assert "is not a checkpoint" in err and "notes.ckpt" in err, err
        assert "path: checkpoint:" not in err and "checkpoint: checkpoint:" not in err, err


class _Runs:
    """A pickle that would run code when unpickled (must be refused, never run)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_a_code_pickle_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": _Runs()}, f)
    err = _fails(capsys, ["sample", str(evil)])
    assert "not a checkpoint of tensors" in err and "weights_only" not in err, err
    assert not Path("pwned").exists()


def test_sample_out_suffixes(models: tuple[Path, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = models
    assert main(["sample", str(a), "--labels", "1", "2", *SAMPLE, "--out", str(tmp_path / "grid.jpg")]) == 0
    with Image.open(tmp_path / "grid.jpg") as image:
        assert image.format == "JPEG" and image.size == (2 * 34 + 2, 34 + 2)
    err = _fails(capsys, ["sample", str(a), *SAMPLE, "--out", str(tmp_path / "grid.unknownext")])
    assert "unknown suffix" in err
    assert not (tmp_path / "grid.unknownext").exists()


def test_convert_to_diffusers_prints_no_library_warning(models: tuple[Path, Path], tmp_path: Path,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffusers")
    a, _ = models
    assert main(["convert", str(a), str(tmp_path / "pipe"), "--to", "diffusers"]) == 0
    out, err = capfd.readouterr()
    assert "float32" not in err and err.strip() == "", err
    assert out.startswith("wrote ")
