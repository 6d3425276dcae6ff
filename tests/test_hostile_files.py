"""Files crafted as an attacker or a broken tool would craft them (issue 28), each against the real
`deco` command: one line on stderr naming the file, exit status 2, no traceback, and memory spent
on what was checked, not on what a header claims. Path containment is tests/test_hostile_paths.py's.

Memory: the cases whose header claims gigabytes either run in a subprocess under an address-space
limit (RLIMIT_AS, `limited`) or assert that the reader that would allocate is never reached."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import save_checkpoint, tiny_config, tiny_model
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from deco.cli import main
from deco.config import DeCoConfig

DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads before issue 28


def deco(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run `deco ARGV` in this process; assert exit status 2 and exactly one line on stderr
    (an escaped exception fails the test with its traceback). Returns that line."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("deco ")]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err and err.strip().endswith(lines[0]), err
    return lines[0]


def safetensors_with(path: Path, metadata: dict[str, str], tensors: dict[str, Any] | None = None) -> Path:
    save_numpy(tensors or {"w": np.zeros(2, np.float32)}, str(path), metadata=metadata)
    return path


def raw_safetensors(path: Path, header: dict[str, Any], data: bytes = b"") -> Path:
    """A safetensors file written byte by byte (any header, even one the library refuses)."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tiny_model(tiny_config(), seed=0), tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2-step training run (checkpoint, log) to tamper with."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--out", str(out), "--steps", "2", "--checkpoint-every", "2", "--batch-size", "4",
                 "--sample-steps", "1", "--device", "cpu"]) == 0
    return out


def tampered_checkpoint(run: Path, folder: Path, edit: Any) -> Path:
    """A copy of `run` whose checkpoint's state tree is `edit(tree)` (tensors kept)."""
    copy = folder / "run"
    shutil.copytree(run, copy)
    path = copy / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    meta["state"] = json.dumps(edit(json.loads(meta["state"])))
    save_file(tensors, str(path), metadata=meta)
    return copy


# --------------------------------------------------------------------- JSON (depth, numbers)
def test_deeply_nested_model_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.json"
    path.write_text(DEEP)
    line = deco(capsys, "train", "--model", str(path), "--out", str(tmp_path / "o"), "--steps", "1")
    assert "m.json" in line and "JSON nested 100000 deep" in line, line


def test_config_with_an_overflowing_mlp_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(tiny_config().to_dict()).replace('"mlp_ratio": 4.0', '"mlp_ratio": 1e400'))
    line = deco(capsys, "train", "--model", str(path), "--out", str(tmp_path / "o"), "--steps", "1")
    assert "1e400" in line and "m.json" in line
    with pytest.raises(ValueError, match="mlp_ratio: expected a positive finite"):
        DeCoConfig.preset("DeCo-tiny/4", mlp_ratio=float("inf"))


@pytest.mark.parametrize(("config", "refusal"), [
    (DEEP, "JSON nested 100000 deep"), ('{"mlp_ratio": NaN}', "NaN is not a finite number"),
    (json.dumps({**tiny_config().to_dict(), "depth": 10**9}), "1000000002 blocks for 67 tensors")],
    ids=["deep", "nan", "depth-1e9"])
def test_weight_file_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str], model_file: Path,
                              config: str, refusal: str) -> None:
    """A weight file's config metadata: nested, non-finite, or claiming 1e9 blocks (a table of
    1e9 parameter names before issue 28) with the tensors of a tiny model."""
    path = tmp_path / "m.safetensors"
    with safe_open(str(model_file), framework="pt") as f:
        meta = {**f.metadata(), "config": config}
    save_file(load_file(str(model_file)), str(path), metadata=meta)
    line = deco(capsys, "sample", str(path), "--out", str(tmp_path / "s.png"), "--steps", "1")
    assert refusal in line, line


@pytest.mark.parametrize(("side", "refusal"), [(1 << 15, "data_offsets"), (1 << 20, "more than")])
def test_weight_file_header_claiming_gigabytes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               side: int, refusal: str) -> None:
    """4 GiB claimed in a file of a few hundred bytes; 4 TiB, beyond the memory budget."""
    path = raw_safetensors(tmp_path / "m.safetensors", {
        "__metadata__": {"deco_format": "1", "config": tiny_config().to_json()},
        "w": {"dtype": "F32", "shape": [side, side], "data_offsets": [0, 4 * side * side]}})
    line = deco(capsys, "sample", str(path), "--out", str(tmp_path / "s.png"))
    assert "m.safetensors" in line and refusal in line


# ------------------------------------------------------------------------------ checkpoints
TAMPERED = {"deep": "JSON nested 500 deep", "no-config": "has no 'config' entry",
            "wrong-config": "does not match its config", "no-trainer": "has no 'trainer' entry"}


@pytest.mark.parametrize("edit", sorted(TAMPERED))
def test_sample_from_a_tampered_training_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    run_folder: Path, edit: str) -> None:
    def change(tree: dict[str, Any]) -> Any:
        if edit == "deep":
            return json.loads("[" * 500 + "]" * 500)  # parseable, deeper than the limit
        if edit == "no-config":
            del tree["config"]
        elif edit == "wrong-config":
            tree["config"]["hidden_size"] = 128
        else:
            del tree["trainer"]
        return tree

    run = tampered_checkpoint(run_folder, tmp_path, change)
    line = deco(capsys, "sample", str(run), "--out", str(tmp_path / "s.png"), "--steps", "1")
    assert "checkpoint.safetensors" in line and TAMPERED[edit] in line, line


@pytest.mark.parametrize("edit", ["no-config", "wrong-config"])
def test_resume_from_a_tampered_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           run_folder: Path, edit: str) -> None:
    def change(tree: dict[str, Any]) -> Any:
        if edit == "no-config":
            del tree["config"]
        else:
            tree["config"]["depth"] = 2
        return tree

    run = tampered_checkpoint(run_folder, tmp_path, change)
    line = deco(capsys, "train", "--out", str(run), "--resume", "--steps", "3")
    assert "checkpoint.safetensors" in line and TAMPERED[edit] in line, line


def test_resume_with_a_log_record_without_step(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               run_folder: Path) -> None:
    run = tampered_checkpoint(run_folder, tmp_path, lambda tree: tree)
    log = run / "log.jsonl"
    log.write_text('{"loss": 1.0}\n' + log.read_text())
    line = deco(capsys, "train", "--out", str(run), "--resume", "--steps", "3")
    assert "log.jsonl line 1: expected a log record" in line


# ------------------------------------------------------------------------------ archives
def zip_bomb(path: Path, inflated: int) -> Path:
    """A zip whose one deflated member inflates to `inflated` zero bytes (about 1000x)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data.pkl", "w", force_zip64=True) as member:
            chunk = bytes(1 << 20)
            for _ in range(inflated >> 20):
                member.write(chunk)
    return path


def test_ckpt_zip_bomb_is_refused_before_torch_reads_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = zip_bomb(tmp_path / "bomb.ckpt", 256 << 20)
    assert bomb.stat().st_size < 1 << 20

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load reached")

    monkeypatch.setattr(torch, "load", never)
    line = deco(capsys, "convert", str(bomb), str(tmp_path / "out.safetensors"))
    assert "bomb.ckpt" in line and "(more than 50x: a zip bomb?)" in line


@pytest.mark.parametrize(("count", "refusal"), [(100000, "more than"), (1000, "but holds 64 bytes")])
def test_sample_batch_shard_claiming_gigabytes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               model_file: Path, count: int, refusal: str) -> None:
    """`deco sample --count`: a shard whose .npy header declares (COUNT, 1024, 1024, 3) uint8
    (300 GB: beyond the budget; 3 GB: within it, but not in the file) in a few hundred bytes,
    dropped into the shard folder of a finished plan."""
    out = tmp_path / "b.npz"
    argv = ["sample", str(model_file), "--count", "4", "--shard-size", "2", "--out", str(out), "--steps", "1"]
    assert main(argv) == 0
    shards = tmp_path / "b.npz.shards" if (tmp_path / "b.npz.shards").is_dir() else None
    folder = shards or next(p for p in tmp_path.iterdir() if p.is_dir())
    shard = sorted(folder.glob("shard_*.npz"))[0]
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                   "shape": (count, 1024, 1024, 3)})
    with zipfile.ZipFile(shard, "w") as archive:
        archive.writestr("images.npy", header.getvalue() + bytes(64))
        archive.writestr("labels.npy", header.getvalue())
    out.unlink()
    line = deco(capsys, *argv)
    assert shard.name in line and refusal in line


def test_gzip_caption_shard_with_a_huge_member(tmp_path: Path) -> None:
    from deco.text.captions import CaptionDataError, WebDatasetCaptions

    shard = tmp_path / "s.tar.gz"
    with gzip.open(shard, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 64 << 20  # 64 MiB of caption, 64 KiB on disk
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert shard.stat().st_size < 1 << 20
    with pytest.raises(CaptionDataError, match=r"s\.tar\.gz.*'a\.txt' declares 67108864 bytes"):
        list(WebDatasetCaptions(shard, 8).iter_captions())


# ------------------------------------------------------------------------ conformance files
def test_bfloat16_and_huge_outputs_fail_their_vector_only(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    save_file({"out": torch.zeros(6, dtype=torch.bfloat16)}, str(outputs / "time_grid.safetensors"))
    # 2 GiB declared, sparse on disk: refused from the header, never read
    big = raw_safetensors(outputs / "ycbcr.safetensors", {"out": {"dtype": "F32", "shape": [1 << 29],
                                                                   "data_offsets": [0, 1 << 31]}})
    with open(big, "r+b") as f:
        f.truncate(big.stat().st_size + (1 << 31))
    capsys.readouterr()
    assert main(["conformance", "--outputs", str(outputs)]) == 1
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines()
            if len(line.split()) > 1 and not line.startswith("FAIL")}
    assert "ycbcr" in rows, out
    assert "FAIL (dtype bfloat16, expected float64 or float32)" in rows["time_grid"]
    assert "ycbcr.safetensors" in rows["ycbcr"] and "not read" in rows["ycbcr"]


def test_deeply_nested_vector_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vectors = tmp_path / "v"
    vectors.mkdir()
    meta = {"deco_vectors": "1", "component": "rgb_to_ycbcr", "args": DEEP}
    safetensors_with(vectors / "x.safetensors", meta,
                     {"expected": np.zeros(2)})
    line = deco(capsys, "conformance", "--list", "--vectors", str(vectors))
    assert "x.safetensors (args): JSON nested 100000 deep" in line, line


def test_fixtures_file_missing_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     fixtures_dir: Path) -> None:
    folder = tmp_path / "fixtures"
    shutil.copytree(fixtures_dir, folder)
    with np.load(fixtures_dir / "A.npz") as data:
        arrays = {k: data[k] for k in data.files if k != "forward_out"}
    np.savez(folder / "A.npz", **arrays)
    line = deco(capsys, "check-fixtures", "--fixtures", str(folder))
    assert "A.npz" in line and "'forward_out'" in line


# ------------------------------------------------------------------------------ memory bound
LIMITED = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (BYTES, BYTES))
from deco.cli import main
sys.exit(main(sys.argv[1:]))
"""


def limited(argv: list[str], limit: int = 3 << 30) -> subprocess.CompletedProcess[str]:
    """`deco ARGV` in a subprocess whose address space is capped at `limit` bytes (torch's
    import takes about 1 GiB of it)."""
    code = LIMITED.replace("BYTES", str(limit))
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def lying_zip(path: Path, declared: int) -> Path:
    """A zip whose one deflated member declares `declared` bytes in both of its headers (the
    sizes torch's zip reader allocates before inflating), with a few bytes of data."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", bytes(1024))
    data = bytearray(path.read_bytes())
    local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, declared)
    struct.pack_into("<I", data, central + 24, declared)
    path.write_bytes(bytes(data))
    return path


def test_memory_is_bounded_by_the_data_not_the_header(tmp_path: Path) -> None:
    """A .ckpt of a few hundred bytes declaring a 3.5 GiB member, under a 2 GiB address-space
    limit (the command's peak is about 0.8 GiB on a real checkpoint): one line, exit 2."""
    bomb = lying_zip(tmp_path / "bomb.ckpt", 7 << 29)
    result = limited(["convert", str(bomb), str(tmp_path / "o.safetensors")], limit=2 << 30)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "bomb.ckpt" in result.stderr, result.stderr


def lying_legacy_pickle(path: Path, declared: int) -> Path:
    """A checkpoint in torch's legacy (non-zip) format, still written by
    `torch.save(..., _use_new_zipfile_serialization=False)` and found in old .pth files, whose one
    float32 storage declares `declared` elements in the pickle and in the size record before its
    data, followed by the 16 bytes of four floats."""
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buffer, _use_new_zipfile_serialization=False)
    data, numel = buffer.getvalue(), b"X\x03\x00\x00\x00cpuq\x06K\x04"  # ..., 'cpu', BININT1 4
    values = torch.arange(4.0).numpy().tobytes()
    assert data.count(numel) == 1 and data.endswith(struct.pack("<q", 4) + values)
    data = data.replace(numel, numel[:-2] + b"J" + struct.pack("<i", declared))  # BININT
    path.write_bytes(data[:-24] + struct.pack("<q", declared) + values)
    return path


def test_legacy_pickle_declaring_gigabytes_costs_only_its_bytes(tmp_path: Path) -> None:
    """torch's legacy reader allocates a storage of the declared size before reading it (the
    case `check_zip` covers for zip archives); the allocation is lazy, and only the bytes the
    file really holds are written: a 200-byte file declaring 8 GiB ends in one line with the
    resident-set peak (VmHWM, reset first) not 64 MiB above where it was."""
    clear = Path("/proc/self/clear_refs")
    if not clear.exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    from deco.safe_load import load_weights_only

    bomb = lying_legacy_pickle(tmp_path / "old.pth", 2**31 - 1)
    assert bomb.stat().st_size < 1024

    def mib(key: str) -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) / 1024

    clear.write_text("5")
    before = mib("VmRSS")
    with pytest.raises(ValueError, match=r"old\.pth is not a readable checkpoint") as refused:
        load_weights_only(bomb)
    assert "\n" not in str(refused.value) and mib("VmHWM") - before < 64
    assert load_weights_only(lying_legacy_pickle(tmp_path / "fine.pth", 4))["w"].tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------------------ ONNX metadata
def generator_graph(path: Path, metadata: dict[str, str]) -> Path:
    """A graph with a generator's inputs and outputs (noise, labels -> sample, image) and the
    given metadata_props: what a broken or hostile tool could write."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["noise"], ["sample"]),
         helper.make_node("Cast", ["noise"], ["image"], to=TensorProto.UINT8)],
        "g", [helper.make_tensor_value_info("noise", TensorProto.FLOAT, [2, 3, 8, 8]),
              helper.make_tensor_value_info("labels", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [2, 3, 8, 8]),
         helper.make_tensor_value_info("image", TensorProto.UINT8, [2, 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


GENERATOR = {"deco_format": "1", "config": tiny_config().to_json(), "deco_graph": "generator",
             "deco_solver": "euler", "deco_steps": "4", "deco_guidance": "1.0", "deco_guided": "false",
             "deco_interval": "0.0 1.0", "deco_timeshift": "1.0", "deco_inputs": "noise,labels",
             "deco_outputs": "sample,image", "deco_batch": "2", "deco_resolution": "8x8"}


@pytest.mark.parametrize(("change", "refusal"), [
    ({"deco_steps": None}, "without ['deco_steps']"),  # a KeyError before issue 28
    ({"deco_steps": "1000000000"}, "deco_steps"),
    ({"deco_resolution": "1000000000x8"}, "deco_resolution"),
    ({"deco_resolution": "16x16"}, "the graph's input is 8x8"),
    ({"deco_batch": "1000000000"}, "deco_batch"),
    ({"deco_inputs": "noise,text"}, "deco_inputs"),
    ({"deco_graph": "velocity"}, "no output 'v'"),
    ({"deco_interval": "0.0 inf"}, "finite"),
    ({"config": DEEP}, "nested"),
], ids=["no-steps", "steps-1e9", "resolution-1e9", "resolution-mismatch", "batch-1e9", "inputs", "kind",
        "interval", "deep-config"])
def test_onnx_metadata_is_checked_against_the_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    change: dict[str, str | None], refusal: str) -> None:
    pytest.importorskip("onnxruntime")
    meta = {k: v for k, v in {**GENERATOR, **change}.items() if v is not None}
    path = generator_graph(tmp_path / "g.onnx", meta)
    line = deco(capsys, "onnx-check", str(path))
    assert "g.onnx" in line and refusal in line, line


# ------------------------------------------------------------------------------ text encoder
def test_text_encoder_folder_with_pickled_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Qwen3 folder whose model.safetensors is a pickle: refused from its header (transformers'
    SafetensorError escaped as a traceback before issue 28)."""
    pytest.importorskip("transformers")
    from deco.text.encoder import build_tiny_qwen3

    folder = build_tiny_qwen3(tmp_path / "qwen", seed=0)
    state = {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}  # not mapped
    torch.save(state, folder / "model.safetensors")
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    (data / "a.txt").write_text("a caption")
    line = deco(capsys, "embed-text", "--text-encoder", str(folder), "--length", "8", "--width", "32",
                str(data), str(tmp_path / "out"))
    assert "model.safetensors: not a safetensors file" in line, line


HEAD = '{"format": "deco-text-embeddings", "version": 1'


@pytest.mark.parametrize(("index", "refusal"), [
    (DEEP, "JSON nested"), (HEAD + "}", "no valid length"),
    (HEAD + ', "length": 4, "width": 3, "count": 1, "shards": [{"file": 7}]}', "no valid shards[0]")],
    ids=["deep", "no-fields", "bad-shard"])
def test_embedding_index(tmp_path: Path, capsys: pytest.CaptureFixture[str], index: str,
                         refusal: str) -> None:
    """`deco train --task t2i --embeddings DIR` with a nested or incomplete index.json (a
    RecursionError or KeyError traceback before issue 28)."""
    folder = tmp_path / "emb"
    folder.mkdir()
    (folder / "index.json").write_text(index)
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (16, 16)).save(data / "a.png")
    (data / "a.txt").write_text("a caption")
    line = deco(capsys, "train", "--task", "t2i", "--data", str(data), "--embeddings", str(folder),
                "--model", "DeCo-T2I-demo/8", "--resolution", "16", "--out", str(tmp_path / "o"),
                "--steps", "1")
    assert "index.json" in line and refusal in line, line
