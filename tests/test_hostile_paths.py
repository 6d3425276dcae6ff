"""Paths stay where they belong (issue 28, SECURITY.md): folders crafted as an attacker would
craft them, against the real commands.

Each case builds a hostile folder in `work/`, with the targets its links or paths point to in a
sibling `outside/`, runs the `deco` command, and asserts: exit status 2, one line on stderr
naming the file and the entry, and not a byte changed outside (`outside/` keeps its files,
sizes, contents and mtimes; the command's own output is not created). The oracle is the tree
on disk before the command, not anything deco computes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deco.checkpoint import CHECKPOINT_NAME, save_checkpoint
from deco.cli import main
from deco.config import DeCoConfig
from deco.optimized import build_model
from deco.optimized.sampling import SampleSettings
from deco.optimized.trainer import TrainConfig
from deco.paths_inside import OutsideFolder, refuse_symlinked_output, resolve_inside
from deco.train.job import train
from deco.train.run_config import RunConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- helpers
#: A tqdm progress line ("sampling (rank 0): 100%|...|"), not an error line.
PROGRESS = re.compile(r"^[^:]+: +\d+%\|")


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under `root` (links not followed): kind, size, mtime and content hash."""
    out: dict[str, tuple[Any, ...]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            if path.is_symlink():
                out[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif path.is_dir():
                out[str(path.relative_to(root))] = ("dir", st.st_mtime_ns)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


class Arena:
    """`work/` (the hostile folders) and `outside/` (what they point to: must stay untouched)."""

    def __init__(self, root: Path) -> None:
        self.work, self.outside = root / "work", root / "outside"
        self.work.mkdir()
        self.outside.mkdir()
        (self.outside / "secret.txt").write_text("not deco's\n")
        self.before: dict[str, tuple[Any, ...]] = {}

    def freeze(self) -> None:
        self.before = tree(self.outside)

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
        """Run `deco argv`; assert exit 2 with one line on stderr, `outside/` untouched; the line."""
        self.freeze()
        capsys.readouterr()
        code = main(list(argv))
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not PROGRESS.match(line)]
        assert code == 2 and len(err) == 1, (code, err)
        assert tree(self.outside) == self.before, "a file outside the command's folders changed"
        return err[0]


@pytest.fixture
def arena(tmp_path: Path) -> Arena:
    return Arena(tmp_path)


def tiny_weights(folder: Path) -> Path:
    """A class-conditional DeCo-tiny/4 weight file (random weights: only the paths matter)."""
    torch.manual_seed(0)
    model = build_model(DeCoConfig.preset("DeCo-tiny/4"))
    path = folder / "m.safetensors"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) training run: one step, a checkpoint, log.jsonl and metrics.json."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(RunConfig(out=out, steps=1, checkpoint_every=1, model="DiT-tiny/4", batch_size=8, log_every=1,
                    device="cpu", grid_columns=1, train=TrainConfig(lr=1e-3),
                    sample=SampleSettings(steps=1)))
    return out


def copy_run(run_folder: Path, arena: Arena) -> Path:
    run = arena.work / "run"
    shutil.copytree(run_folder, run)
    return run


def link_out(path: Path, arena: Arena, name: str) -> Path:
    """Replace `path` by a link to a copy of it in `outside/` (same content: only the link is
    wrong); the copy's path."""
    target = arena.outside / name
    shutil.copyfile(path, target)
    path.unlink()
    path.symlink_to(target)
    return target


# ----------------------------------------------------------------------------- the rule itself
@pytest.mark.parametrize("entry", ["/etc/passwd", "../x", "a/../../x", "a/..", "C:\\x", "\\\\host\\share\\x",
                                   "C:x", "", "a\x00b", None, 3, ["a"]])
def test_resolve_inside_refuses_paths_out_of_the_folder(entry: object, tmp_path: Path) -> None:
    with pytest.raises(OutsideFolder, match=r"^F: entry: "):
        resolve_inside(tmp_path, entry, what="F: entry")


def test_resolve_inside_follows_links_only_inside(tmp_path: Path) -> None:
    folder, elsewhere = tmp_path / "folder", tmp_path / "elsewhere"
    (folder / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (folder / "sub" / "a.txt").write_text("a")
    (folder / "inside").symlink_to(folder / "sub" / "a.txt")
    (folder / "out").symlink_to(elsewhere)
    (folder / "dangling").symlink_to(elsewhere / "nothing")
    assert resolve_inside(folder, "sub/a.txt", what="w") == folder / "sub" / "a.txt"
    assert resolve_inside(folder, "inside", what="w") == folder / "inside"
    assert resolve_inside(folder, "not-yet", what="w") == folder / "not-yet"
    for name in ("out", "out/x", "dangling"):
        with pytest.raises(OutsideFolder, match="outside"):
            resolve_inside(folder, name, what="w")
    link = tmp_path / "link-to-folder"  # the folder itself may be a link: the user named it
    link.symlink_to(folder)
    assert resolve_inside(link, "sub/a.txt", what="w") == link / "sub" / "a.txt"
    with pytest.raises(OutsideFolder, match="symbolic link"):
        refuse_symlinked_output(folder / "inside", what="--out")
    assert refuse_symlinked_output(folder / "sub", what="--out") == folder / "sub"


# ----------------------------------------------------------------------------- sample --count
@pytest.mark.parametrize("restart", [False, True], ids=["resume", "restart"])
def test_sample_count_does_not_write_through_a_linked_shard_folder(
        arena: Arena, restart: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """`s.shards -> outside/elsewhere`: deco would write plan.json and the shards there (and,
    with --restart, delete the shards it finds there)."""
    weights = tiny_weights(arena.work)
    elsewhere = arena.outside / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "shard_00000.npz").write_bytes(b"someone else's")
    (arena.work / "s.shards").symlink_to(elsewhere)
    line = arena.run(capsys, "sample", str(weights), "--count", "2", "--shard-size", "1", "--steps", "1",
                     "--out", str(arena.work / "s.npz"), *(["--restart"] if restart else []))
    assert "s.shards" in line and "symbolic link" in line, line
    assert not (arena.work / "s.npz").exists()


@pytest.mark.parametrize("member", ["shard_00000.npz", "plan.json"])
def test_sample_count_does_not_read_a_shard_or_plan_linking_out(arena: Arena, member: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A plan folder copied from elsewhere whose shard (copied into the batch) or plan.json is a
    link out of the folder: refused, naming it (the same content inside the folder is accepted)."""
    weights, shards, out = tiny_weights(arena.work), arena.work / "sh", arena.work / "s.npz"
    args = ["sample", str(weights), "--count", "2", "--shard-size", "1", "--steps", "1",
            "--shard-dir", str(shards), "--out", str(out)]
    assert main(args) == 0
    out.unlink()
    link_out(shards / member, arena, member)
    line = arena.run(capsys, *args)
    assert member in line and "outside" in line, line
    assert not out.exists()


# ----------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("kind", ["climbs", "absolute", "link"])
def test_embedding_index_shard_paths_stay_inside(arena: Arena, kind: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """index.json names its shards; `../`, an absolute path or a link out is refused before any
    shard is opened (training used a shard from outside the embeddings folder)."""
    import json

    data, emb = arena.work / "data", arena.work / "emb"
    data.mkdir()
    emb.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"caption {i}")
    (arena.outside / "x.safetensors").write_bytes(b"not a shard")
    name = {"climbs": "../../outside/x.safetensors", "absolute": str(arena.outside / "x.safetensors"),
            "link": "shard-00000.safetensors"}[kind]
    if kind == "link":
        (emb / name).symlink_to(arena.outside / "x.safetensors")
    index = {"format": "deco-text-embeddings", "version": 1, "encoder": "e", "length": 24, "width": 32,
             "dtype": "float32", "shard_size": 2, "count": 2, "captions_sha256": "0" * 64, "complete": True,
             "shards": [{"file": name, "rows": 2, "captions_sha256": "0" * 64}]}
    (emb / "index.json").write_text(json.dumps(index))
    line = arena.run(capsys, "train", "--task", "t2i", "--data", str(data), "--embeddings", str(emb),
                     "--model", "DeCo-T2I-demo/8", "--resolution", "16", "--batch-size", "2",
                     "--accumulation", "1", "--steps", "1", "--out", str(arena.work / "r"))
    assert "index.json: shards[0].file" in line, line
    assert not (arena.work / "r" / CHECKPOINT_NAME).exists()


# ----------------------------------------------------------------------------- recorded encoder
@pytest.mark.parametrize("recorded", ["absolute", "climbs"])
def test_a_recorded_text_encoder_outside_the_run_is_not_followed(arena: Arena, recorded: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A text checkpoint records its encoder's folder; a path out of the checkpoint's folder is
    refused, naming the entry and the flag that names an encoder on the command line."""
    config = DeCoConfig.preset("DeCo-T2I-demo/8")
    torch.manual_seed(0)
    state = build_model(config).state_dict()
    qwen = arena.outside / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text("{}")
    path = str(qwen) if recorded == "absolute" else "../../outside/qwen"
    run = arena.work / "run"
    run.mkdir()
    save_checkpoint(run / CHECKPOINT_NAME, {"trainer": {"ema": state}, "config": config.to_dict(),
                                            "run": {"task": "t2i", "data": "captions", "text_encoder": path,
                                                    "resolution": 16}})
    line = arena.run(capsys, "sample", str(run), "--prompt", "a cat", "--steps", "1",
                     "--out", str(arena.work / "g.png"))
    assert "run.text_encoder" in line and "--text-encoder" in line, line
    assert not (arena.work / "g.png").exists()


# ----------------------------------------------------------------------------- run folders
def test_resume_refuses_a_log_linking_out(run_folder: Path, arena: Arena,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """log.jsonl's records are copied into the resumed run's log: a link out is refused."""
    run = copy_run(run_folder, arena)
    link_out(run / "log.jsonl", arena, "log.jsonl")
    line = arena.run(capsys, "train", "--resume", "--out", str(run), "--steps", "2")
    assert "log.jsonl" in line and "outside" in line, line


def test_resume_and_sample_refuse_a_checkpoint_linking_out(run_folder: Path, arena: Arena,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(run_folder, arena)
    link_out(run / CHECKPOINT_NAME, arena, CHECKPOINT_NAME)
    line = arena.run(capsys, "train", "--resume", "--out", str(run), "--steps", "2")
    assert CHECKPOINT_NAME in line and "outside" in line, line
    line = arena.run(capsys, "sample", str(run), "--steps", "1", "--out", str(arena.work / "g.png"))
    assert CHECKPOINT_NAME in line and "outside" in line, line


def test_evaluate_refuses_a_metrics_file_linking_out(run_folder: Path, arena: Arena,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """deco evaluate merges its section into the run's metrics.json (copying what is there)."""
    run = copy_run(run_folder, arena)
    link_out(run / "metrics.json", arena, "metrics.json")
    line = arena.run(capsys, "evaluate", str(run), "--steps", "1", "--per-class", "2")
    assert "metrics.json" in line and "outside" in line, line


def test_resume_names_the_input_paths_it_takes_from_the_checkpoint(tmp_path: Path) -> None:
    """--resume continues the user's run with the paths its checkpoint records, and says so;
    a path the user gives again is not listed."""
    from deco.train.job import recorded_paths

    stored = RunConfig(task="t2i", data=tmp_path / "d", embeddings=tmp_path / "e", model="m.json")
    d, e = tmp_path / "d", tmp_path / "e"
    assert recorded_paths(stored, set()) == f"--data {d}, --embeddings {e}, --model m.json"
    assert recorded_paths(stored, {"data", "model"}) == f"--embeddings {tmp_path / 'e'}"
    assert recorded_paths(RunConfig(), set()) == ""


def test_a_fresh_run_does_not_append_to_a_planted_log_link(arena: Arena) -> None:
    """A dangling log.jsonl link in a new run folder is removed, not followed (appending would
    create its target outside)."""
    out = arena.work / "run"
    out.mkdir()
    (out / "log.jsonl").symlink_to(arena.outside / "created.jsonl")
    arena.freeze()
    train(RunConfig(out=out, steps=1, checkpoint_every=1, model="DiT-tiny/4", batch_size=8, log_every=1,
                    device="cpu", grid_columns=1, train=TrainConfig(lr=1e-3), sample=SampleSettings(steps=1)))
    assert tree(arena.outside) == arena.before
    assert not (out / "log.jsonl").is_symlink() and (out / "log.jsonl").is_file()


# ----------------------------------------------------------------------------- missing extras
#: Makes the named top-level modules unimportable (Python's own ModuleNotFoundError, and
#: importlib.util.find_spec returns None, as for a package that is not installed), then runs deco
#: commands in order, printing each one's status and stderr.
_BLOCKED = """
import contextlib, io, json, sys
for name in sys.argv[1].split(","):  # None in sys.modules: import raises, find_spec says absent
    sys.modules[name] = None
from deco.cli import main
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    print(json.dumps([code, err.getvalue()]))
"""


def test_a_missing_extra_is_named_in_one_line(tmp_path: Path) -> None:
    """Each command that needs an optional extra, with its packages made unimportable: exit 2,
    one line naming the extra to install (deco.extras)."""
    import json

    weights = tiny_weights(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "dino").mkdir()
    commands = {
        "onnx": ["export-onnx", str(weights), str(tmp_path / "m.onnx")],
        "diffusers": ["convert", str(weights), str(tmp_path / "pipe"), "--to", "diffusers"],
        "text": ["embed-text", str(tmp_path / "data"), str(tmp_path / "emb"), "--text-encoder",
                 str(tmp_path), "--length", "4", "--width", "8"],
        "repa": ["train", "--repa-encoder", str(tmp_path / "dino"), "--model", "DiT-tiny/4",
                 "--batch-size", "8", "--steps", "1", "--out", str(tmp_path / "r")],
    }
    done = subprocess.run([sys.executable, "-c", _BLOCKED, "onnx,onnxruntime,onnxscript,diffusers,"
                           "transformers,tokenizers", json.dumps(list(commands.values()))],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.strip().splitlines()[-len(commands):]]
    for (extra, argv), (code, err) in zip(commands.items(), results, strict=True):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (argv[0], code, err[-2000:])
        assert lines[0].startswith(f"deco {argv[0]}: error: ") and \
            f"pip install 'deco-diffusion[{extra}]'" in lines[0], lines[0]
    assert not any((tmp_path / n).exists() for n in ("m.onnx", "pipe", "emb", "r"))


# ----------------------------------------------------------------------------- ONNX, conformance
@pytest.mark.parametrize("where", ["climbs", "absolute"])
def test_onnx_check_refuses_external_data_outside_the_graphs_folder(
        arena: Arena, where: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A graph whose external-data `location` leaves its folder (onnx's and onnxruntime's own
    checks refuse it; deco's part is the one line)."""
    onnx = pytest.importorskip("onnx")
    graph = arena.work / "m.onnx"
    assert main(["export-onnx", str(tiny_weights(arena.work)), str(graph), "--external-data"]) == 0
    data = graph.with_name("m.onnx.data")
    target = arena.outside / "w.data"
    shutil.move(data, target)
    proto = onnx.load(str(graph), load_external_data=False)
    location = "../../outside/w.data" if where == "climbs" else str(target)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    graph.write_bytes(proto.SerializeToString())
    line = arena.run(capsys, "onnx-check", str(graph))
    assert "m.onnx" in line, line


def test_conformance_does_not_read_an_output_linking_out(arena: Arena,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A port's output folder whose `<vector>.safetensors` links out of it: that vector fails,
    named, and the file is not read (its content there would pass)."""
    from safetensors.numpy import save_file

    from deco.conformance.kit import load_vectors
    from deco.conformance.outputs import run_outputs

    vector = next(v for v in load_vectors() if v.component == "rgb_to_ycbcr")
    outputs = arena.work / "out"
    outputs.mkdir()
    save_file({"out": np.asarray(vector.expected, dtype=np.float64)}, str(arena.outside / "o.safetensors"))
    own = outputs / f"{vector.name}.safetensors"
    shutil.copyfile(arena.outside / "o.safetensors", own)
    assert run_outputs(outputs, [vector])[0].status == "pass"  # the same bytes, inside: accepted
    own.unlink()
    own.symlink_to(arena.outside / "o.safetensors")
    arena.freeze()
    [result] = run_outputs(outputs, [vector])
    assert result.status == "FAIL" and "outside" in result.note, result
    assert tree(arena.outside) == arena.before


def test_the_readme_fault_table_names_tests_that_exist() -> None:
    """README "Faults and abuse": every `file.py::test_name` (a trailing * matches a prefix) is a
    test function of that file, so the table cannot cite a test that was renamed or removed."""
    import ast
    import fnmatch

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text(encoding="utf-8")
    section = text.split("### Faults and abuse", 1)[1].split("\n#", 1)[0]
    cited = re.findall(r"`(test_\w+\.py)(?:::(test_[\w*]+))?`", section)
    assert len(cited) >= 15, cited
    for file, name in cited:
        path = root / "tests" / file
        assert path.is_file(), file
        if name:
            tests = [n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                     if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
            assert fnmatch.filter(tests, name), f"{file}::{name} is not a test"
