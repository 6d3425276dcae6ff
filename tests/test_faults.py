"""Faults, tested as faults (issue 20): SIGKILL at seeded points of every long command, a full
disk, a folder the user cannot write, a changed plan on resume.

SIGKILL: each command runs in a subprocess whose file-system calls (os.replace, os.fsync,
os.mkdir, os.unlink, os.rename, os.rmdir and every open() for writing) are counted; a first,
uninterrupted run gives the number of such events and the outputs (the oracle), then the
command is killed with SIGKILL at seeded random events, and re-run. The re-run must give the
uninterrupted run's files byte for byte, and at no moment may a visible file (one a user would
take for output: not a hidden `.NAME.*.tmp`) be a partial one."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deco.cli import main
from deco.config import DeCoConfig

pytestmark = pytest.mark.usefixtures("one_thread")

#: Kill points per command (seeded: the same points on every run of the suite).
KILLS = 2
SEED = 20

#: Runs deco's CLI with the file-system calls counted; DECO_KILL_AT=n sends SIGKILL to itself
#: at the n-th (0: never), and the count goes to DECO_EVENTS_FILE at exit.
RUNNER = r"""
import atexit, builtins, os, signal, sys
from deco.cli import main
kill_at, count = int(os.environ.get("DECO_KILL_AT", "0")), [0]
def event():
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
def hooked(fn):
    def call(*args, **kwargs):
        event()
        return fn(*args, **kwargs)
    return call
for name in ("replace", "fsync", "mkdir", "unlink", "rename", "rmdir"):
    setattr(os, name, hooked(getattr(os, name)))
real_open = builtins.open
def opened(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if any(c in mode for c in "wax+"):
        event()  # after the open: a kill here leaves an empty (torn) file
    return f
builtins.open = opened
atexit.register(lambda: real_open(os.environ["DECO_EVENTS_FILE"], "w").write(str(count[0]))
                if os.environ.get("DECO_EVENTS_FILE") else None)
sys.exit(main(sys.argv[1:]))
"""


def deco(argv: list[str], cwd: Path, kill_at: int = 0,
         events: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DECO_KILL_AT": str(kill_at),
           "DECO_EVENTS_FILE": str(events or "")}
    return subprocess.run([sys.executable, "-c", RUNNER, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def visible_files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `root` that a user would take for output (not
    hidden, not inside a hidden folder)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = path.read_bytes()
    return out


def _tiny_model(path: Path, seed: int = 0) -> Path:
    from deco.optimized import build_model

    torch.manual_seed(seed)
    build_model(DeCoConfig.preset("DeCo-tiny/4", num_classes=10)).save(path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("model") / "a.safetensors")


Compare = Callable[[dict[str, bytes], dict[str, bytes]], None]


def _same_files(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name


def _no_partial(got: dict[str, bytes], want: dict[str, bytes], allowed_extra: set[str]) -> None:
    """After a kill: every visible file is one of the uninterrupted run's, complete, or a file that
    the command rewrites on its re-run (`allowed_extra`: plan files, logs, checkpoints)."""
    for name, data in got.items():
        if name in allowed_extra:
            continue
        assert name in want, f"unexpected visible file {name} after a kill"
        assert data == want[name], f"{name} is visible but partial or different after a kill"


def kill_and_rerun(tmp_path: Path, argv: list[str], *, prepare: Callable[[Path], None] | None = None,
                   rerun: Callable[[Path], list[str]] | None = None, compare: Compare = _same_files,
                   mutable: frozenset[str] | set[str] = frozenset(),
                   outputs: Callable[[Path], dict[str, bytes]] = visible_files) -> None:
    """The oracle run, then KILLS seeded kills, each followed by a re-run (`rerun(case)`: the
    argv of the re-run, default the same command)."""
    ref = tmp_path / "reference"
    ref.mkdir()
    if prepare:
        prepare(ref)
    events = tmp_path / "events"
    done = deco(argv, ref, events=events)
    assert done.returncode == 0, done.stderr
    want = outputs(ref)
    total = int(events.read_text())
    assert total > 3, total
    points = sorted(random.Random(f"{SEED}:{argv[0]}").sample(range(1, total + 1), KILLS))
    for k in points:
        case = tmp_path / f"kill{k}"
        case.mkdir()
        if prepare:
            prepare(case)
        killed = deco(argv, case, kill_at=k)
        assert killed.returncode == -signal.SIGKILL, (k, killed.returncode, killed.stderr[-2000:])
        _no_partial(outputs(case), want, set(mutable))
        again = deco(rerun(case) if rerun else argv, case)
        if again.returncode == 2 and "already exists" in again.stderr:
            pass  # killed after its last rename: the output was complete (checked just below)
        else:
            assert again.returncode == 0, (k, again.stderr[-2000:])
        compare(outputs(case), want)


# ----------------------------------------------------------------------------- SIGKILL
@pytest.mark.slow
def test_kill_sample_count(model: Path, tmp_path: Path) -> None:
    kill_and_rerun(tmp_path, ["sample", str(model), "--count", "6", "--shard-size", "2", "--steps", "2",
                              "--device", "cpu", "--out", "s.npz"], mutable={"s.shards/plan.json"})


@pytest.mark.slow
def test_kill_export_onnx_external_data(model: Path, tmp_path: Path) -> None:
    """`--external-data` makes the tiny model take the path of a model over the 1 GiB threshold:
    the weights in a second file, moved before the graph."""
    def outputs(root: Path) -> dict[str, bytes]:
        files = visible_files(root)
        if "m.onnx" in files:  # a graph is never visible without its own data
            assert "m.onnx.data" in files
        return files

    kill_and_rerun(tmp_path, ["export-onnx", str(model), "m.onnx", "--external-data"], outputs=outputs,
                   mutable={"m.onnx.data"})  # moved first: alone it is no output (the graph is)


@pytest.mark.slow
def test_kill_convert_to_safetensors(fixtures_dir: Path, tmp_path: Path) -> None:
    kill_and_rerun(tmp_path, ["convert", str(fixtures_dir / "A.ckpt"), "a.safetensors"])


@pytest.mark.slow
def test_kill_convert_to_diffusers(model: Path, tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    kill_and_rerun(tmp_path, ["convert", str(model), "pipe", "--to", "diffusers"])


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A caption folder of 6 images and a tiny random Qwen3."""
    pytest.importorskip("transformers")
    from deco.text_encoder import build_tiny_qwen3

    root = tmp_path_factory.mktemp("captions")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a photo of {i} cats")
    return data, build_tiny_qwen3(root / "qwen", seed=0)


@pytest.mark.slow
def test_kill_embed_text(captions: tuple[Path, Path], tmp_path: Path) -> None:
    data, qwen = captions
    kill_and_rerun(tmp_path, ["embed-text", str(data), "emb", "--text-encoder", str(qwen), "--length", "24",
                              "--width", "32", "--dtype", "float32", "--shard-size", "2", "--no-progress",
                              "--device", "cpu"], mutable={"emb/index.json"})


def _train_outputs(root: Path) -> dict[str, bytes]:
    """What a training run must reproduce: the EMA weights, the sample grid and the log's records
    (less their wall-clock time); the checkpoint and metrics.json hold times too."""
    files = visible_files(root)
    out = {k: v for k, v in files.items() if k in ("run/model.safetensors", "run/samples.png")}
    if "run/log.jsonl" in files:
        records = []
        for line in files["run/log.jsonl"].decode().splitlines():
            record = json.loads(line)  # a torn last line would fail here: the log is append-only
            record.pop("time")
            records.append(record)
        out["run/log.jsonl"] = json.dumps(records).encode()
    return out


def _train_rerun(argv: list[str]) -> Callable[[Path], list[str]]:
    """The re-run of a killed `deco train`: --resume once a checkpoint exists."""
    return lambda case: [*argv, "--resume"] if (case / "run" / "checkpoint.safetensors").is_file() else argv


@pytest.mark.slow
def test_kill_train_c2i(tmp_path: Path) -> None:
    argv = ["train", "--out", "run", "--steps", "4", "--checkpoint-every", "2", "--log-every", "1",
            "--batch-size", "8", "--sample-steps", "2", "--device", "cpu"]
    kill_and_rerun(tmp_path, argv, rerun=_train_rerun(argv), outputs=_train_outputs,
                   mutable={"run/log.jsonl"})


@pytest.mark.slow
def test_kill_train_t2i(captions: tuple[Path, Path], tmp_path: Path) -> None:
    from deco.captions import CaptionFolderDataset
    from deco.embed_text import embed_captions
    from deco.text_encoder import Qwen3TextEncoder

    data, qwen = captions
    store = tmp_path / "store"
    embed_captions(list(CaptionFolderDataset(data, 16).iter_captions()),
                   Qwen3TextEncoder(qwen, 24, 32, device="cpu"), store, dtype="float32", progress=False)
    argv = ["train", "--task", "t2i", "--data", str(data), "--embeddings", str(store), "--model",
            "DeCo-T2I-demo/8", "--resolution", "16", "--out", "run", "--steps", "2", "--checkpoint-every",
            "1", "--log-every", "1", "--batch-size", "2", "--accumulation", "1", "--sample-steps", "2",
            "--device", "cpu"]
    (tmp_path / "t").mkdir()
    kill_and_rerun(tmp_path / "t", argv, rerun=_train_rerun(argv), outputs=_train_outputs,
                   mutable={"run/log.jsonl"})


# ----------------------------------------------------------------------------- a full disk
def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _one_line(capsys: pytest.CaptureFixture[str], code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    last = err.replace("\r", "\n").splitlines()[-1]
    assert "Traceback" not in err and all(n in last for n in needles), err
    return last


def test_full_disk_injected(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """The disk fills as a file is flushed (os.fsync fails with ENOSPC, as it does on a full
    NFS or delayed-allocation filesystem): one line naming the output, exit 2, the previous
    output intact, no visible half-written file."""
    for name in ("g.png", "m.onnx", "o.npz"):
        (tmp_path / name).write_bytes(b"previous output")
    before = visible_files(tmp_path)
    monkeypatch.setattr(os, "fsync", _enospc)
    for argv, out in ((["sample", str(model), "--labels", "1", "--steps", "2", "--out", "g.png", "--force"],
                       "g.png"),
                      (["sample", str(model), "--labels", "1", "--steps", "2", "--out", "o.npz", "--force"],
                       "o.npz"),
                      (["export-onnx", str(model), "m.onnx", "--force"], "m.onnx"),
                      (["sample", str(model), "--count", "2", "--steps", "2", "--out", "c.npz"], "c.shards"),
                      (["train", "--out", "run", "--steps", "1", "--batch-size", "4", "--sample-steps", "1",
                        "--device", "cpu"], "run")):
        monkeypatch.chdir(tmp_path)
        _one_line(capsys, main([*argv]), "cannot write", out, "No space left on device")
        after = visible_files(tmp_path)
        assert {k: after[k] for k in before} == before  # previous outputs intact
        extra = set(after) - set(before)
        assert extra <= {"run/log.jsonl"}, extra  # the log is append-only, records before the fault


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


def test_full_disk_tmpfs(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    """A real full filesystem: a 1.5 MB tmpfs holding an earlier 1 MB export, replaced with
    --force by one that does not fit. Skipped where this process may not mount (then
    test_full_disk_injected covers the same paths)."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "1500k"):
        pytest.skip("cannot mount a tmpfs here (needs root); test_full_disk_injected covers this")
    try:
        from deco.onnx_export import export_checkpoint

        export_checkpoint(model, tmp_path / "b.onnx")
        shutil.copyfile(tmp_path / "b.onnx", small / "b.onnx")
        old = (small / "b.onnx").read_bytes()
        monkeypatch.chdir(small)
        _one_line(capsys, main(["export-onnx", str(model), "b.onnx", "--external-data", "--force"]),
                  "cannot write b.onnx: No space left on device")
        assert (small / "b.onnx").read_bytes() == old
        _one_line(capsys, main(["sample", str(model), "--count", "40", "--shard-size", "20", "--steps", "1",
                                "--resolution", "64", "--device", "cpu", "--out", "c.npz"]),
                  "cannot write", "No space left on device")
        assert (small / "b.onnx").read_bytes() == old
        for name in visible_files(small):  # only complete shards (and the plan) beside it
            assert name == "b.onnx" or name.startswith("c.shards/"), name
            if name.endswith(".npz"):
                with np.load(small / name) as f:
                    assert f["images"].shape == (20, 64, 64, 3)
    finally:
        monkeypatch.chdir(tmp_path)
        subprocess.run(["umount", str(small)], check=True)


# ----------------------------------------------------------------------------- no permission
PERMISSION_SCRIPT = r"""
import contextlib, io, json, sys
from deco.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([argv, code, err.getvalue()])
print(json.dumps(results))
"""


def _unprivileged() -> list[str]:
    """A command prefix that runs without CAP_DAC_OVERRIDE (root ignores mode bits), or [] when
    this process is not root anyway."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        message = "running as root and util-linux setpriv is missing: cannot drop CAP_DAC_OVERRIDE"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


@pytest.mark.slow
def test_no_permission_is_one_line_for_every_writing_command(model: Path, tmp_path: Path,
                                                             fixtures_dir: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cases = [["export-onnx", str(model), f"{ro}/b.onnx"],
             ["convert", str(fixtures_dir / "A.ckpt"), f"{ro}/a.safetensors"],
             ["sample", str(model), "--labels", "1", "--steps", "1", "--out", f"{ro}/g.png"],
             ["sample", str(model), "--labels", "1", "--steps", "1", "--out", f"{ro}/pngs"],
             ["sample", str(model), "--count", "2", "--steps", "1", "--out", f"{ro}/s.npz"],
             ["train", "--out", f"{ro}/run", "--steps", "1", "--batch-size", "4", "--device", "cpu"],
             ["conformance", "--write", f"{ro}/vectors"],
             ["spectrum", str(model), "--count", "2", "--out", str(ro)],
             ["evaluate", str(model), "--per-class", "2", "--steps", "1", "--out", f"{ro}/m.json"]]
    done = subprocess.run([*_unprivileged(), sys.executable, "-c", PERMISSION_SCRIPT, json.dumps(cases)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for argv, code, err in json.loads(done.stdout.strip().splitlines()[-1]):
        last = err.replace("\r", "\n").strip().splitlines()[-1]
        assert code == 2 and "Traceback" not in err, (argv, err)
        assert last.startswith(f"deco {argv[0]}: error: cannot write {ro}"), (argv, last)
        assert last.endswith("Permission denied"), (argv, last)
    assert list(ro.iterdir()) == []


# ----------------------------------------------------------------------------- a changed plan
def test_train_resume_refuses_an_edited_model_file(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The run's --model .json file is the model's identity: editing it between the run and its
    --resume is refused (the checkpoint's model would silently win), naming the changed field."""
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps({**DeCoConfig.preset("DeCo-tiny/4").to_dict(), "depth": 1}))
    argv = ["train", "--model", str(cfg), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "4",
            "--sample-steps", "1", "--device", "cpu"]
    assert main(argv) == 0
    cfg.write_text(json.dumps({**DeCoConfig.preset("DeCo-tiny/4").to_dict(), "depth": 2}))
    capsys.readouterr()
    _one_line(capsys, main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "2"]),
              "--model", "depth 1 -> 2", "another --out")


def test_embed_text_refuses_a_changed_plan_and_restarts(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from deco.embed_text import embed_captions

    class Encoder:
        identity, length, width = "fake", 2, 3

        def __init__(self, scale: float) -> None:
            self.scale = scale

        def encode(self, prompts: list[str]) -> torch.Tensor:
            return self.scale * torch.ones(len(prompts), 2, 3)

        def null(self, negative: str = "") -> torch.Tensor:
            return torch.zeros(2, 3)

    out = tmp_path / "e"
    embed_captions(["a", "b", "c"], Encoder(1.0), out, dtype="float32", shard_size=2, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"different dtype .*--restart"):
        embed_captions(["a", "b", "c"], Encoder(1.0), out, dtype="float16", shard_size=2, progress=False)  # type: ignore[arg-type]
    embed_captions(["a", "b", "c"], Encoder(2.0), out, dtype="float16", shard_size=2, progress=False,  # type: ignore[arg-type]
                   restart=True)
    fresh = tmp_path / "fresh"
    embed_captions(["a", "b", "c"], Encoder(2.0), fresh, dtype="float16", shard_size=2, progress=False)  # type: ignore[arg-type]
    assert visible_files(out) == visible_files(fresh)
