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
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deco.cli import main
from deco.config import DeCoConfig

pytestmark = pytest.mark.usefixtures("one_thread")

#: Kill points per command (seeded: the same points on every run of the suite).
KILLS = 3
SEED = 20

#: A fork server: imports deco's CLI and its heavy libraries once, then for each request (a JSON
#: line: argv, cwd, kill_at, log) forks a child that counts its file-system calls, sends itself
#: SIGKILL at the kill_at-th (0: never) and runs the command; the reply is a JSON line with the
#: child's status (its exit code, or -9) and its number of events. Forking spares every run the
#: seconds of importing torch (and diffusers), which would dominate this suite's time.
SERVER = r"""
import builtins, json, os, signal, sys
from deco.cli import main
import deco.generate, deco.deploy.export, deco.text.embeddings  # noqa: F401
import deco.train.job, safetensors.torch  # noqa: F401
for optional in ("diffusers", "deco.diffusers.convert", "transformers", "onnxruntime"):
    try:
        __import__(optional)
    except ImportError:
        pass


def child(request):
    os.chdir(request["cwd"])
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    kill_at, count = request["kill_at"], [0]
    counter = os.open(request["log"] + ".events", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def event():
        count[0] += 1
        os.pwrite(counter, str(count[0]).encode().ljust(12), 0)
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
    try:
        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(request)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with open(request["log"] + ".events") as f:
        events = int(f.read().strip() or 0)
    print(json.dumps({"code": code, "events": events}), flush=True)
"""


class Run:
    """What a forked run left: its exit code (-9 when killed), events counted, its output."""

    def __init__(self, code: int, events: int, log: Path) -> None:
        self.returncode, self.events, self.stderr = code, events, log.read_text(errors="replace")


class ForkServer:
    """Runs `deco` commands in forks of one process that has imported everything (see SERVER)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.runs = folder, 0
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})

    def __call__(self, argv: list[str], cwd: Path, kill_at: int = 0) -> Run:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.runs += 1
        log = self.folder / f"run{self.runs}.log"
        request = {"argv": argv, "cwd": str(cwd), "kill_at": kill_at, "log": str(log)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return Run(reply["code"], reply["events"], log)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def deco(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path_factory.mktemp("forkserver"))
    try:
        yield server
    finally:
        server.close()


def canonical(name: str, data: bytes) -> bytes:
    """A file's bytes, with a safetensors header's JSON in sorted key order: safetensors writes its
    metadata from a Rust HashMap, whose order differs between processes (the tensors, their
    offsets and every byte of data are the same)."""
    if not name.endswith(".safetensors") or len(data) < 8:
        return data
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        return data  # not a whole header: a torn file, compared as it is
    return json.dumps(header, sort_keys=True).encode() + data[8 + size :]


def visible_files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes (`canonical`) of every file under `root` that a user would take for
    output (not hidden, not inside a hidden folder)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = canonical(path.name, path.read_bytes())
    return out


def _tiny_model(path: Path, seed: int = 0) -> Path:
    from deco.optimized import build_model

    torch.manual_seed(seed)
    build_model(DeCoConfig.preset("DeCo-tiny/4", num_classes=10)).save(path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("model") / "a.safetensors")


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


def kill_and_rerun(deco: ForkServer, tmp_path: Path, argv: list[str], *,
                   rerun: Callable[[Path], list[str]] | None = None,
                   mutable: frozenset[str] | set[str] = frozenset(),
                   outputs: Callable[[Path], dict[str, bytes]] = visible_files) -> None:
    """The oracle run, then KILLS seeded kills, each followed by a re-run (`rerun(case)`: the
    argv of the re-run, default the same command)."""
    ref = tmp_path / "reference"
    ref.mkdir()
    done = deco(argv, ref)
    assert done.returncode == 0, done.stderr
    want = outputs(ref)
    assert done.events >= KILLS, done.events
    points = sorted(random.Random(f"{SEED}:{argv[0]}").sample(range(1, done.events + 1), KILLS))
    for k in points:
        case = tmp_path / f"kill{k}"
        case.mkdir()
        killed = deco(argv, case, kill_at=k)
        assert killed.returncode == -signal.SIGKILL, (k, killed.returncode, killed.stderr[-2000:])
        _no_partial(outputs(case), want, set(mutable))
        again = deco(rerun(case) if rerun else argv, case)
        if again.returncode == 2 and "already exists" in again.stderr:
            pass  # killed after its last rename: the output was complete (checked just below)
        else:
            assert again.returncode == 0, (k, again.stderr[-2000:])
        _same_files(outputs(case), want)


# ----------------------------------------------------------------------------- SIGKILL
@pytest.mark.slow
def test_kill_sample_count(deco: ForkServer, model: Path, tmp_path: Path) -> None:
    kill_and_rerun(deco, tmp_path, ["sample", str(model), "--count", "6", "--shard-size", "2", "--steps", "2",
                                    "--device", "cpu", "--out", "s.npz"], mutable={"s.shards/plan.json"})


@pytest.mark.slow
def test_kill_export_onnx_external_data(deco: ForkServer, model: Path, tmp_path: Path) -> None:
    """`--external-data` makes the tiny model take the path of a model over the 1 GiB threshold:
    the weights in a second file, moved before the graph."""
    def outputs(root: Path) -> dict[str, bytes]:
        files = visible_files(root)
        if "m.onnx" in files:  # a graph is never visible without its own data
            assert "m.onnx.data" in files
        return files

    kill_and_rerun(deco, tmp_path, ["export-onnx", str(model), "m.onnx", "--external-data"], outputs=outputs,
                   mutable={"m.onnx.data"})  # moved first: alone it is no output (the graph is)


@pytest.mark.slow
def test_kill_convert_to_safetensors(deco: ForkServer, fixtures_dir: Path, tmp_path: Path) -> None:
    kill_and_rerun(deco, tmp_path, ["convert", str(fixtures_dir / "A.ckpt"), "a.safetensors"])


@pytest.mark.slow
def test_kill_convert_to_diffusers(deco: ForkServer, model: Path, tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    kill_and_rerun(deco, tmp_path, ["convert", str(model), "pipe", "--to", "diffusers"])


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A caption folder of 6 images and a tiny random Qwen3."""
    pytest.importorskip("transformers")
    from deco.text.encoder import build_tiny_qwen3

    root = tmp_path_factory.mktemp("captions")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a photo of {i} cats")
    return data, build_tiny_qwen3(root / "qwen", seed=0)


@pytest.mark.slow
def test_kill_embed_text(deco: ForkServer, captions: tuple[Path, Path], tmp_path: Path) -> None:
    data, qwen = captions
    argv = ["embed-text", str(data), "emb", "--text-encoder", str(qwen), "--length", "24", "--width", "32",
            "--dtype", "float32", "--shard-size", "2", "--no-progress", "--device", "cpu"]
    kill_and_rerun(deco, tmp_path, argv, mutable={"emb/index.json"})


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
def test_kill_train_c2i(deco: ForkServer, tmp_path: Path) -> None:
    argv = ["train", "--out", "run", "--steps", "4", "--checkpoint-every", "2", "--log-every", "1",
            "--batch-size", "8", "--sample-steps", "2", "--device", "cpu"]
    kill_and_rerun(deco, tmp_path, argv, rerun=_train_rerun(argv), outputs=_train_outputs,
                   mutable={"run/log.jsonl"})


@pytest.mark.slow
def test_kill_train_t2i(deco: ForkServer, captions: tuple[Path, Path], tmp_path: Path) -> None:
    from deco.text.captions import CaptionFolderDataset
    from deco.text.embeddings import embed_captions
    from deco.text.encoder import Qwen3TextEncoder

    data, qwen = captions
    store = tmp_path / "store"
    embed_captions(list(CaptionFolderDataset(data, 16).iter_captions()),
                   Qwen3TextEncoder(qwen, 24, 32, device="cpu"), store, dtype="float32", progress=False)
    argv = ["train", "--task", "t2i", "--data", str(data), "--embeddings", str(store), "--model",
            "DeCo-T2I-demo/8", "--resolution", "16", "--out", "run", "--steps", "2", "--checkpoint-every",
            "1", "--log-every", "1", "--batch-size", "2", "--accumulation", "1", "--sample-steps", "2",
            "--device", "cpu"]
    (tmp_path / "t").mkdir()
    kill_and_rerun(deco, tmp_path / "t", argv, rerun=_train_rerun(argv), outputs=_train_outputs,
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
        from deco.deploy.export import export_checkpoint

        export_checkpoint(model, tmp_path / "b.onnx")
        shutil.copyfile(tmp_path / "b.onnx", small / "b.onnx")
        old = (small / "b.onnx").read_bytes()
        monkeypatch.chdir(small)
        _one_line(capsys, main(["export-onnx", str(model), "b.onnx", "--external-data", "--force"]),
                  "cannot write b.onnx: No space left on device")
        assert (small / "b.onnx").read_bytes() == old
        with pytest.raises(OSError) as info:  # safetensors says it in a SafetensorError's text
            _tiny_model(small / "w.safetensors")
        assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(small / "w.safetensors"))
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
    secret = tmp_path / "secret.safetensors"  # an input the user cannot read
    shutil.copyfile(model, secret)
    secret.chmod(0o000)
    cases.append(["sample", str(secret), "--out", str(tmp_path / "g.png")])
    done = subprocess.run([*_unprivileged(), sys.executable, "-c", PERMISSION_SCRIPT, json.dumps(cases)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for argv, code, err in json.loads(done.stdout.strip().splitlines()[-1]):
        last = err.replace("\r", "\n").strip().splitlines()[-1]
        assert code == 2 and "Traceback" not in err, (argv, err)
        expected = f"cannot read {secret}" if str(secret) in argv else f"cannot write {ro}"
        assert last.startswith(f"deco {argv[0]}: error: {expected}"), (argv, last)
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
    from deco.text.embeddings import embed_captions

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


def test_reexport_with_external_data_in_the_working_folder(model: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """onnx checks that an external data file does not exist relative to the working folder, not
    to the graph: an earlier export's m.onnx.data there made `--force` (and a re-run after a kill
    between the data's and the graph's rename) fail. Found by test_kill_export_onnx_external_data."""
    monkeypatch.chdir(tmp_path)
    argv = ["export-onnx", str(model), "m.onnx", "--external-data"]
    assert main(argv) == 0
    first = visible_files(tmp_path)
    assert main([*argv, "--force"]) == 0
    assert visible_files(tmp_path) == first  # the same model gives the same pair of files


def test_a_run_killed_before_its_first_checkpoint_starts_clean(tmp_path: Path) -> None:
    """Records a run logged before it was killed (no checkpoint yet) are not kept by the new run:
    its log holds its own steps only (the oracle: a run into an empty folder)."""
    argv = ["--steps", "2", "--log-every", "1", "--batch-size", "4", "--sample-steps", "1", "--device", "cpu"]
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    assert main(["train", "--out", str(tmp_path / "killed"), *argv]) == 0
    assert main(["train", "--out", str(tmp_path / "clean"), *argv]) == 0

    def records(run: Path) -> list[dict[str, float]]:
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in (run / "log.jsonl").read_text().splitlines()]

    assert records(tmp_path / "killed") == records(tmp_path / "clean")


def test_train_resume_refuses_remade_embeddings(captions: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The text embeddings a t2i run reads are part of its identity: made again differently
    (embed-text --restart into the same folder) between the run and its --resume, refused."""
    from deco.text.captions import CaptionFolderDataset
    from deco.text.embeddings import embed_captions
    from deco.text.encoder import Qwen3TextEncoder

    data, qwen = captions
    store, run = tmp_path / "store", tmp_path / "run"
    texts = list(CaptionFolderDataset(data, 16).iter_captions())
    encoder = Qwen3TextEncoder(qwen, 24, 32, device="cpu")
    embed_captions(texts, encoder, store, dtype="float32", progress=False)
    assert main(["train", "--task", "t2i", "--data", str(data), "--embeddings", str(store), "--model",
                 "DeCo-T2I-demo/8", "--resolution", "16", "--out", str(run), "--steps", "1",
                 "--batch-size", "2", "--accumulation", "1", "--sample-steps", "1", "--device", "cpu"]) == 0
    embed_captions(texts, encoder, store, dtype="float16", progress=False, restart=True)
    capsys.readouterr()
    _one_line(capsys, main(["train", "--out", str(run), "--resume", "--steps", "2"]),
              "--embeddings", "dtype 'float32' -> 'float16'", "another --out")
