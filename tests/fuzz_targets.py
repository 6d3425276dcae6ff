"""The reader entry points of deco as fuzz targets (issue 28), shared by the hypothesis tests
(tests/test_fuzz_readers.py, in CI) and the coverage-guided atheris runs (tests/fuzz/atheris_readers.py,
`nox -s fuzz`).

Each target writes the fuzzed bytes where a command would find its file, inside a scratch folder,
and calls the reader. `run_target` checks the contract of every reader of an outside file: a valid
result or one of the errors the `deco` command reports as one line with exit status 2 (ValueError,
TypeError, OSError), whose message has no line break; Python memory (tracemalloc: NumPy's arrays
included, torch's not) under `memory_bound(data)`; and no file written, created, renamed or
deleted outside the scratch folder (an audit hook watches every open for writing and every os
call that changes the file system)."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from helpers import fixtures_folder

from deco.config import DeCoConfig

#: The smallest DeCo config: hidden 16, 4 heads, one DiT block and one decoder block.
SMALL = DeCoConfig("deco", 3, 4, 16, 4, 1, 1, 4, 2)
#: The errors a reader may raise for a bad file: what `deco`'s main reports in one line, exit 2.
ONE_LINE_ERRORS = (ValueError, TypeError, OSError)


def memory_bound(data: bytes) -> int:
    """Most bytes of Python memory a reader may hold at once for `data`: 40 times its size
    (decoded text, parsed JSON objects, one copy of each array) plus 16 MiB of fixed cost."""
    return 40 * len(data) + (16 << 20)


# ------------------------------------------------------------------------------ the watch
class Watch:
    """An audit hook (installed once: hooks cannot be removed) that, while `folder` is set,
    records every file-system change outside it."""

    installed: ClassVar[Watch | None] = None
    MUTATING = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
                "os.truncate", "os.chmod", "shutil.rmtree", "shutil.move", "shutil.copyfile"})

    def __init__(self) -> None:
        self.folder: str | None = None
        self.outside: list[str] = []

    @classmethod
    def get(cls) -> Watch:
        if cls.installed is None:
            cls.installed = Watch()
            sys.addaudithook(cls.installed.hook)
        return cls.installed

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.folder is None:
            return
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writing:
                self._check(args[0], event)
        elif event in self.MUTATING:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)):
                    self._check(arg, event)

    def _check(self, path: Any, event: str) -> None:
        assert self.folder is not None
        full = os.path.realpath(os.fsdecode(path))
        if not (full == self.folder or full.startswith(self.folder + os.sep)):
            self.outside.append(f"{event} {full}")


def run_target(name: str, data: bytes, folder: Path) -> str:
    """Run target `name` on `data` in the empty folder `folder`; AssertionError unless the
    reader kept the contract. Returns "ok" or the error's first words (for corpus statistics)."""
    watch = Watch.get()
    watch.folder, watch.outside = os.path.realpath(folder), []
    tracemalloc.start()
    outcome = "ok"
    try:
        TARGETS[name](data, folder)
    except ONE_LINE_ERRORS as exc:
        message = str(exc)
        assert "\n" not in message.strip(), f"{name}: a multi-line error: {message!r}"
        assert message.strip(), f"{name}: an error without a message: {type(exc).__name__}"
        outcome = type(exc).__name__
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        watch.folder = None
    assert peak <= memory_bound(data), f"{name}: {peak} bytes of Python memory for {len(data)} bytes of input"
    assert not watch.outside, f"{name}: touched files outside its folder: {watch.outside[:3]}"
    return outcome


# ------------------------------------------------------------------------------ targets
def _json(data: bytes, folder: Path) -> None:
    from deco.untrusted import parse_json

    parse_json(data, "fuzz")


def _config(data: bytes, folder: Path) -> None:
    DeCoConfig.from_json(data.decode("utf-8", errors="replace"))


def _weights(data: bytes, folder: Path) -> None:
    from deco.optimized.weights import load_weights

    (folder / "m.safetensors").write_bytes(data)
    load_weights(folder / "m.safetensors")


def _reference_weights(data: bytes, folder: Path) -> None:
    from deco.reference.weights import load_weights

    (folder / "m.safetensors").write_bytes(data)
    load_weights(folder / "m.safetensors")


def _checkpoint(data: bytes, folder: Path) -> None:
    from deco.checkpoint import check_training_state, load_checkpoint

    path = folder / "checkpoint.safetensors"
    path.write_bytes(data)
    load_checkpoint(path, validate=check_training_state(path))


def _index(data: bytes, folder: Path) -> None:
    from deco.text.embeddings import read_index

    (folder / "index.json").write_bytes(data)
    read_index(folder)


def _plan(data: bytes, folder: Path) -> None:
    from deco.evaluate.sample_batches import PLAN_FILE, ShardPlan, _check_plan_file

    (folder / PLAN_FILE).write_bytes(data)
    _check_plan_file(folder, ShardPlan(count=4, num_classes=2, shard_size=2, seed=0), None)


def _npz_shard(data: bytes, folder: Path) -> None:
    from deco.evaluate.sample_batches import read_shard

    (folder / "shard_00000.npz").write_bytes(data)
    read_shard(folder / "shard_00000.npz")


def _vector(data: bytes, folder: Path) -> None:
    from deco.conformance.kit import load_vector

    (folder / "v.safetensors").write_bytes(data)
    load_vector(folder / "v.safetensors")


def _output(data: bytes, folder: Path) -> None:
    from deco.conformance.outputs import read_output

    (folder / "o.safetensors").write_bytes(data)
    read_output(folder / "o.safetensors", elements=64)


def _release_ckpt(data: bytes, folder: Path) -> None:
    from deco.release import read_release_checkpoint

    (folder / "r.ckpt").write_bytes(data)
    read_release_checkpoint(folder / "r.ckpt")


def _tar_shard(data: bytes, folder: Path) -> None:
    from deco.text.captions import WebDatasetCaptions

    (folder / "s.tar").write_bytes(data)
    for _ in WebDatasetCaptions(folder / "s.tar", 8).iter_captions():
        pass


def _log(data: bytes, folder: Path) -> None:
    from deco.outputs import read_log

    (folder / "log.jsonl").write_bytes(data)
    read_log(folder / "log.jsonl", up_to_step=10)


class _Port:
    def __init__(self, name: str, shape: list[Any]) -> None:
        self.name, self.shape = name, shape


class _Session:
    """The two calls `check_metadata` makes of an onnxruntime session: a generator graph's
    inputs and outputs, as `deco export-onnx --generator` writes them (batch 2, 8x8)."""

    def get_inputs(self) -> list[_Port]:
        return [_Port("noise", [2, 3, 8, 8]), _Port("labels", [2])]

    def get_outputs(self) -> list[_Port]:
        return [_Port("sample", [2, 3, 8, 8]), _Port("image", [2, 8, 8, 3])]


def _onnx_metadata(data: bytes, folder: Path) -> None:
    """Metadata as `key=value` lines (what a graph's metadata_props hold) against a session."""
    from deco.deploy.runtime import check_metadata

    lines = data.decode("utf-8", errors="replace").split("\n")
    meta = dict(line.partition("=")[::2] for line in lines if "=" in line)
    check_metadata(meta, _Session(), folder / "g.onnx")


TARGETS: dict[str, Callable[[bytes, Path], None]] = {
    "json": _json, "config": _config, "weights": _weights, "reference_weights": _reference_weights,
    "checkpoint": _checkpoint, "index": _index, "plan": _plan, "npz_shard": _npz_shard,
    "vector": _vector, "output": _output, "release_ckpt": _release_ckpt, "tar_shard": _tar_shard,
    "log": _log, "onnx_metadata": _onnx_metadata,
}


# ------------------------------------------------------------------------------ seeds
def seeds(folder: Path) -> dict[str, bytes]:
    """A valid input of each target (what the mutations start from), written with deco's own
    writers into `folder`."""
    import torch

    from deco.checkpoint import save_checkpoint
    from deco.evaluate.sample_batches import _write_shard
    from deco.optimized.weights import build_model

    torch.manual_seed(0)
    model = build_model(SMALL)
    model.save(folder / "m.safetensors")
    weights = model.state_dict()
    save_checkpoint(folder / "c.safetensors", {"config": SMALL.to_dict(), "run": {"resolution": 8},
                                               "trainer": {"ema": weights, "model": weights}})
    _write_shard(folder / "s.npz", np.zeros((2, 8, 8, 3), np.uint8), np.arange(2, dtype=np.int64))
    from safetensors.numpy import save

    output = save({"out": np.zeros(8, np.float32)})
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        for name, content in (("a.txt", b"a caption"), ("a.jpg", b"\xff\xd8not really")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    release = fixtures_folder() / "A.ckpt"  # the release's tiny checkpoint, when present
    ckpt = io.BytesIO()
    torch.save({"state_dict": {"ema_denoiser.x": torch.zeros(2)}}, ckpt)  # else a refused one
    index = {"format": "deco-text-embeddings", "version": 1, "count": 2, "length": 4, "width": 8,
             "dtype": "bfloat16", "shards": [{"file": "shard-00000.safetensors", "rows": 2}]}
    plan = {"count": 4, "num_classes": 2, "shard_size": 2, "seed": 0}
    generator = {"deco_format": "1", "config": SMALL.to_json(), "deco_graph": "generator",
                 "deco_solver": "euler", "deco_steps": "4", "deco_guidance": "1.0", "deco_guided": "false",
                 "deco_interval": "0.0 1.0", "deco_timeshift": "1.0", "deco_inputs": "noise,labels",
                 "deco_outputs": "sample,image", "deco_batch": "2", "deco_resolution": "8x8"}
    return {
        "json": json.dumps({"a": [1, 2.5, {"b": None}], "c": "d"}).encode(),
        "config": SMALL.to_json().encode(),
        "weights": (folder / "m.safetensors").read_bytes(),
        "reference_weights": (folder / "m.safetensors").read_bytes(),
        "checkpoint": (folder / "c.safetensors").read_bytes(),
        "index": json.dumps(index).encode(),
        "plan": json.dumps(plan).encode(),
        "npz_shard": (folder / "s.npz").read_bytes(),
        "vector": vector_seed(),
        "output": output,
        "release_ckpt": release.read_bytes() if release.is_file() else ckpt.getvalue(),
        "tar_shard": tar.getvalue(),
        "log": b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n',
        "onnx_metadata": "\n".join(f"{k}={v}" for k, v in generator.items()).encode(),
    }


def vector_seed() -> bytes:
    """The smallest shipped conformance vector's bytes."""
    from deco.conformance.kit import default_folder

    smallest = min(default_folder().glob("*.safetensors"), key=lambda p: p.stat().st_size)
    return smallest.read_bytes()


def zip_members(data: bytes) -> list[str]:
    """Member names of a zip in bytes (for the statistics of a corpus), [] if it is none."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, ValueError, EOFError):
        return []
