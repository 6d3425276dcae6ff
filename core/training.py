"""The training job behind `deco train`: data, Trainer, logging, checkpoints, samples, DDP.

    run = RunConfig(steps=2000)          # the built-in digits, DeCo-tiny/4
    summary = train(run)                 # writes run.out/{checkpoint,model}.safetensors, ...

Launched by `torchrun --nproc-per-node N`, every process trains on its shard of each global
batch under DistributedDataParallel and rank 0 alone writes files. Multi-node works the same way
(torchrun's --nnodes/--rdzv-*; the run folder must be on a shared filesystem for `--resume`).
FSDP (sharded weights for models that do not fit one GPU) is future work: DeCo-XL/16 (~680M
parameters) trains comfortably with plain DDP on 80 GB GPUs.

Reproducibility: the model initialisation, the data order (`deco.data.BatchStream`) and the
training draws (noise, times, label dropout: the Trainer's generator) all derive from `seed`.
Every rank draws the whole global batch's randoms from the same generator and keeps its share,
so a run on N processes follows the same trajectory as one process on the same global batch
(up to the order of floating-point reductions), and rank 0's generator state, saved in the
checkpoint, is every rank's state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoint import CHECKPOINT_NAME, MODEL_NAME, load_checkpoint, save_checkpoint
from .config import PRESETS, DeCoConfig, parameter_count
from .data import BatchStream, TrainDataset, open_dataset
from .evaluation import SampleSettings, class_labels, generate, grid_image, save_png, to_uint8, write_json

LOG_NAME = "log.jsonl"
METRICS_NAME = "metrics.json"
SAMPLES_NAME = "samples.png"
LOSS_CURVE_NAME = "loss.png"


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the message says why and where."""


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. `None` fields take the dataset's defaults (`defaults`)."""

    out: Path | None = None  # default runs/<timestamp>
    data: Path | None = None  # None: the built-in digits
    resolution: int | None = None
    model: str | None = None  # a preset of deco.config.PRESETS or a .json file of DeCoConfig fields
    batch_size: int | None = None  # global batch (split over processes)
    lr: float | None = None
    steps: int | None = None
    ema_decay: float | None = None
    train_timeshift: float | None = None  # s > 1 trains more at high noise (where class is decided)
    freq_weight: float = 1.0
    repa_weight: float = 0.0  # no pretrained encoder offline: REPA off
    quality: int = 85
    label_dropout: float = 0.1
    bf16: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    compile: bool = False
    checkpoint_every: int | None = None
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    sample: SampleSettings | None = None  # the final sample grid
    grid_columns: int = 10
    resume: bool = False


#: Defaults for the built-in digits, chosen by short sweeps (bench/RESULTS_training.md) so that the
#: default run reaches >= 90% class accuracy on its own samples in under 10 minutes on 2 CPU cores.
#: The time shift 2 matters most: the class of a digit is decided at high noise, and training
#: there more often raised the 2000-step accuracy from 36% to 98% in our sweep (same lr and batch).
DIGITS_DEFAULTS: dict[str, Any] = {
    "model": "DeCo-tiny/4", "batch_size": 64, "lr": 1e-3, "steps": 2000, "ema_decay": 0.995,
    "train_timeshift": 2.0,
    "checkpoint_every": 500,
    "sample": SampleSettings(steps=25, guidance=3.0, interval=(0.0, 1.0), timeshift=1.0, solver="euler"),
}
#: Defaults for an image folder: the release's recipe (AdamW 1e-4, EMA 0.9999, batch 32/GPU x 8).
FOLDER_DEFAULTS: dict[str, Any] = {
    "model": "DeCo-XL/16", "batch_size": 256, "lr": 1e-4, "steps": 400_000, "ema_decay": 0.9999,
    "train_timeshift": 1.0,
    "checkpoint_every": 5000, "resolution": 256,
    "sample": SampleSettings(steps=100, guidance=3.2, interval=(0.1, 1.0), timeshift=1.0, solver="euler"),
}

#: Settings that change the training trajectory: a resumed run must keep the checkpoint's.
TRAJECTORY_FIELDS = ("data", "resolution", "model", "batch_size", "lr", "ema_decay", "train_timeshift",
                     "freq_weight",
                     "repa_weight", "quality", "label_dropout", "seed", "bf16")


def resolve(run: RunConfig) -> RunConfig:
    """`run` with every `None` replaced by its dataset's default."""
    defaults = DIGITS_DEFAULTS if run.data is None else FOLDER_DEFAULTS
    updates = {k: v for k, v in defaults.items() if getattr(run, k) is None}
    if run.data is None and run.resolution is None:
        updates["resolution"] = 32
    run = dataclasses.replace(run, **updates)
    check_run(run)
    return run


def check_run(run: RunConfig) -> None:
    """Validate the settings; errors name the command-line option."""
    if run.model not in PRESETS and not str(run.model).endswith(".json"):
        raise ValueError(f"--model: unknown preset {run.model!r}; expected one of {sorted(PRESETS)} "
                         f"or a .json file of DeCoConfig fields")
    for name in ("batch_size", "steps", "checkpoint_every", "log_every", "resolution", "grid_columns"):
        value = getattr(run, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {value!r}")
    if run.num_workers < 0:
        raise ValueError(f"--num-workers: expected an int >= 0, got {run.num_workers}")
    if run.seed < 0:
        raise ValueError(f"--seed: expected an int >= 0, got {run.seed}")
    if not (isinstance(run.lr, float) and 0 < run.lr < math.inf):
        raise ValueError(f"--lr: expected a positive finite float, got {run.lr!r}")
    if not (run.ema_decay is not None and 0.0 <= run.ema_decay <= 1.0):
        raise ValueError(f"--ema-decay: expected a float in [0, 1], got {run.ema_decay!r}")
    if not (run.train_timeshift is not None and 0 < run.train_timeshift < math.inf):
        raise ValueError(f"--train-timeshift: expected a positive finite float, got {run.train_timeshift!r}")
    if not 0.0 <= run.label_dropout <= 1.0:
        raise ValueError(f"--label-dropout: expected a float in [0, 1], got {run.label_dropout}")
    if not 1 <= run.quality <= 100:
        raise ValueError(f"--quality: expected an int in [1, 100], got {run.quality}")
    for name in ("freq_weight", "repa_weight"):
        value = getattr(run, name)
        if not 0.0 <= value < math.inf:
            raise ValueError(f"--{name.replace('_', '-')}: expected a finite float >= 0, got {value}")
    if run.repa_weight > 0:
        raise ValueError("--repa-weight: REPA needs a pretrained image encoder (DINOv2), which this "
                         "command does not load; use the Python API (Trainer(encoder=...)) for REPA")
    if run.sample is not None:
        check_sampler(run.sample, "--sample-")
    if run.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {run.device!r}")
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but torch sees no CUDA device")


def model_config(model: str, num_classes: int, stored: dict[str, Any] | None = None) -> DeCoConfig:
    """The DeCoConfig of a preset name or a .json file, for `num_classes` classes. A resumed run
    passes the checkpoint's config (`stored`), so an edited .json file cannot change it."""
    if stored is not None:
        return DeCoConfig.from_dict(stored)
    if model in PRESETS:
        return DeCoConfig.preset(model, num_classes=num_classes)
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"--model: no such preset or .json file: {model}")
    try:
        config = DeCoConfig.from_json(path.read_text())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--model: {path}: {exc}") from None
    return dataclasses.replace(config, num_classes=num_classes)


def check_sampler(s: SampleSettings, prefix: str) -> None:
    """Validate sampler settings up front (not after hours of training); errors name the option
    (`prefix` + name: "--" for `deco sample`, "--sample-" for the grid of `deco train`)."""
    if not isinstance(s.steps, int) or s.steps < 1:
        raise ValueError(f"{prefix}steps: expected a positive int, got {s.steps!r}")
    low, high = s.interval
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"--interval: expected 0 <= LOW <= HIGH <= 1, got {low} {high}")
    if not (math.isfinite(s.guidance) and 0 < s.timeshift < math.inf):
        raise ValueError(f"--guidance/--timeshift: expected finite values and a shift > 0, got "
                         f"{s.guidance} and {s.timeshift}")
    if s.solver not in ("euler", "heun"):
        raise ValueError(f"--solver: expected euler or heun, got {s.solver!r}")


def run_to_json(run: RunConfig) -> dict[str, Any]:
    data = dataclasses.asdict(run)
    for key in ("out", "data"):
        data[key] = None if data[key] is None else str(data[key])
    return data


def run_from_json(data: dict[str, Any]) -> RunConfig:
    data = dict(data)
    for key in ("out", "data"):
        data[key] = None if data[key] is None else Path(data[key])
    if data.get("sample") is not None:
        sample = dict(data["sample"])
        sample["interval"] = tuple(sample["interval"])
        data["sample"] = SampleSettings(**sample)
    return RunConfig(**data)


def merge_resumed(stored: RunConfig, given: RunConfig, explicit: set[str]) -> RunConfig:
    """The stored run's settings, with the explicitly given ones that may change on resume.

    A differing trajectory setting (`TRAJECTORY_FIELDS`) is an error: the resumed run would not
    be the continuation of the interrupted one."""
    for name in sorted(explicit & set(TRAJECTORY_FIELDS)):
        if getattr(given, name) != getattr(stored, name):
            raise ValueError(f"--{name.replace('_', '-')}: {getattr(given, name)!r} differs from the "
                             f"checkpoint's {getattr(stored, name)!r}; a resumed run keeps its settings")
    changes = {k: getattr(given, k) for k in explicit if k not in TRAJECTORY_FIELDS}
    changes.update(out=given.out, resume=True)
    return dataclasses.replace(stored, **changes)


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    """This process's place in the job (world size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the process group when torchrun (or a test) set WORLD_SIZE > 1: NCCL on GPUs, gloo
    on the CPU. Each process uses GPU `LOCAL_RANK`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return Dist(device=dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def broadcast_object(value: Any, d: Dist) -> Any:
    """Rank 0's value on every rank."""
    if d.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ok(ok: bool, d: Dist) -> bool:
    """Whether `ok` holds on every rank (so all ranks stop together)."""
    if d.world_size == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


# ----------------------------------------------------------------------------- logs
def read_log(path: Path, up_to_step: int | None = None) -> list[dict[str, float]]:
    """The records of log.jsonl (step <= up_to_step); a torn last line (killed run) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (up_to_step is None or record.get("step", 0) <= up_to_step):
            records.append(record)
    return records


def write_log(path: Path, records: list[dict[str, float]]) -> None:
    from .atomic import atomic_write

    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def plot_loss(records: list[dict[str, float]], path: Path) -> None:
    """Loss terms against step (log scale), raw and smoothed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .atomic import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    steps = np.array([r["step"] for r in records])
    for key, colour in (("loss", "C0"), ("fm", "C1"), ("freq", "C2"), ("repa", "C3")):
        values = np.array([r.get(key, np.nan) for r in records], dtype=np.float64)
        if len(values) == 0 or not np.any(values > 0):
            continue
        ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        width = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(width) / width, mode="valid")
        ax.plot(steps[width - 1 :], smooth, color=colour, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------- the run
class Job:
    """A training run: builds everything, trains, checkpoints, writes the outputs."""

    def __init__(self, run: RunConfig, dist_env: Dist, dataset: TrainDataset | None = None,
                 explicit: set[str] | None = None) -> None:
        from deco.optimized import TrainConfig, Trainer, build_model

        self.d = dist_env
        out = run.out
        if out is None:
            out = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
            out = Path(broadcast_object(str(out), self.d))
        self.out = out
        resume_state = None
        if run.resume:
            ckpt = out / CHECKPOINT_NAME
            if not ckpt.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint {ckpt} (give the run folder with --out)")
            resume_state = load_checkpoint(ckpt)
            run = merge_resumed(run_from_json(resume_state["run"]), run, explicit or set())
        elif (out / CHECKPOINT_NAME).exists():
            raise ValueError(f"--out: {out} already holds a run; continue it with --resume or choose "
                             f"another folder")
        self.run = run = resolve(dataclasses.replace(run, out=out))
        self.dataset = dataset if dataset is not None else open_dataset(run.data, run.resolution)
        assert run.batch_size is not None and run.model is not None
        if run.batch_size % self.d.world_size:
            raise ValueError(f"--batch-size: the global batch {run.batch_size} must be divisible by "
                             f"the number of processes {self.d.world_size}")
        self.local_batch = run.batch_size // self.d.world_size
        self.config = model_config(run.model, self.dataset.num_classes,
                                   None if resume_state is None else resume_state["config"])
        if self.config.num_classes != self.dataset.num_classes:
            raise ValueError(f"--data: {self.dataset.num_classes} classes, but the checkpoint's model has "
                             f"{self.config.num_classes}")
        if self.dataset.resolution % self.config.patch_size:
            raise ValueError(f"--resolution: {self.dataset.resolution} is not a multiple of the "
                             f"patch size {self.config.patch_size} of {run.model}")

        torch.manual_seed(run.seed)  # identical initial weights on every rank
        self.model = build_model(self.config).to(self.d.device)
        if run.compile:
            self.model.compile()  # in place: parameter names (checkpoints) stay unprefixed
        assert run.lr is not None and run.ema_decay is not None and run.train_timeshift is not None
        train_config = TrainConfig(
            lr=run.lr, ema_decay=run.ema_decay, label_dropout=run.label_dropout,
            timeshift=run.train_timeshift,
            freq_weight=run.freq_weight, freq_quality=run.quality, repa_weight=run.repa_weight,
            bf16=run.bf16, seed=run.seed,
        )
        self.trainer = Trainer(self.model, train_config)
        self.stream = BatchStream(self.dataset, self.local_batch, seed=run.seed, rank=self.d.rank,
                                  world_size=self.d.world_size, num_workers=run.num_workers)
        self.records: list[dict[str, float]] = []
        self.elapsed = 0.0
        if resume_state is not None:
            self.trainer.load_state_dict(resume_state["trainer"])
            self.stream.load_state(resume_state["data"])
            self.elapsed = float(resume_state.get("elapsed", 0.0))
            # Records written after the checkpoint belong to steps that will be redone.
            self.records = read_log(out / LOG_NAME, self.trainer.step_count)
            if self.d.is_main:
                write_log(out / LOG_NAME, self.records)
                for stale in out.glob(".*.tmp"):  # temporaries of a write cut short by a kill
                    stale.unlink(missing_ok=True)
        if self.d.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # The Trainer's forward goes through `trainer.net`: routing it through DDP all-reduces
            # the gradients in backward. Checkpoints, EMA and REPA hooks use the bare model.
            ids = [self.d.local_rank] if self.d.device.type == "cuda" else None
            self.trainer.net = DistributedDataParallel(self.model, device_ids=ids)

    # ---------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        trainer_state = self.trainer.state_dict()
        trainer_state["model"] = self.model.state_dict()  # without DDP's "module." prefix
        return {
            "trainer": trainer_state,
            "data": self.stream.state(),
            "run": run_to_json(self.run),
            "config": self.config.to_dict(),
            "elapsed": self.elapsed,
        }

    def save(self) -> None:
        if self.d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.out / CHECKPOINT_NAME, self.state())

    def append_log(self, record: dict[str, float]) -> None:
        self.records.append(record)
        if self.d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / LOG_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------------------- steps
    def draws(self, x: Tensor) -> Any:
        """This rank's share of the global batch's draws (see the module docstring)."""
        from deco.optimized import Draws

        shape = (self.local_batch * self.d.world_size, *x.shape[1:])
        full = self.trainer.draw(x[:1].expand(shape))
        r, w = self.d.rank, self.d.world_size
        return Draws(full.label_uniform[r::w], full.time[r::w], full.noise[r::w])

    def reduce_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Loss terms averaged over ranks: the global batch's losses (equal shard sizes)."""
        if self.d.world_size == 1:
            return logs
        keys = ["loss", "fm", "freq", "repa"]
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return {**logs, **dict(zip(keys, (values / self.d.world_size).tolist(), strict=True))}

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.stream:
            yield x.to(self.d.device, non_blocking=True), y.to(self.d.device, non_blocking=True)

    def fit(self) -> None:
        from tqdm import tqdm

        from deco.optimized import NonFiniteLossError

        run = self.run
        assert run.steps is not None and run.checkpoint_every is not None
        start = self.trainer.step_count
        if start >= run.steps:
            return
        bar = tqdm(total=run.steps, initial=start, desc="train", unit="step", file=sys.stderr,
                   disable=not self.d.is_main, dynamic_ncols=True, mininterval=0.5)
        window: list[dict[str, float]] = []
        batches = self.batches()
        began = time.perf_counter() - self.elapsed
        try:
            for step in range(start + 1, run.steps + 1):
                x, y = next(batches)
                try:
                    logs = self.trainer.step(x, y, self.draws(x))
                    failure = None
                except NonFiniteLossError as exc:
                    logs, failure = {}, str(exc)
                if not all_ok(failure is None, self.d):
                    # The Trainer's message starts with its own 0-based count; keep the detail.
                    detail = failure.split(": ", 1)[-1] if failure else "on another process"
                    last = self.out / CHECKPOINT_NAME
                    where = f"last checkpoint: {last}" if last.is_file() else "no checkpoint was written"
                    raise TrainingError(f"step {step}: {detail}; training stopped, nothing saved for this "
                                        f"step ({where})")
                logs = self.reduce_logs(logs)
                window.append(logs)
                # Also log at checkpoints, so a resumed run's records match an uninterrupted one's.
                if step % run.log_every == 0 or step % run.checkpoint_every == 0 or step == run.steps:
                    record = {"step": step, **{k: sum(w[k] for w in window) / len(window)
                                               for k in ("loss", "fm", "freq", "repa", "grad_norm")}}
                    record["time"] = round(time.perf_counter() - began, 3)
                    self.append_log(record)
                    window.clear()
                    bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "fm", "freq")}, refresh=False)
                bar.update(1)
                if step % run.checkpoint_every == 0 or step == run.steps:
                    self.elapsed = time.perf_counter() - began
                    self.save()
        finally:
            bar.close()

    # ---------------------------------------------------------------------------- outputs
    def finish(self) -> dict[str, Any]:
        """Sample grid, loss curve, portable EMA weights and metrics.json (rank 0)."""
        from deco.optimized import cpu_gemm

        run = self.run
        assert run.sample is not None and run.steps is not None
        summary: dict[str, Any] = {}
        if self.d.is_main:
            ema: Any = self.trainer.ema
            ema.save(self.out / MODEL_NAME)
            rows = min(self.config.num_classes, 10)
            labels = class_labels(rows, run.grid_columns)
            t0 = time.perf_counter()
            images = generate(ema, labels, run.sample, seed=run.seed, resolution=self.dataset.resolution)
            sample_seconds = time.perf_counter() - t0
            save_png(grid_image(to_uint8(images), run.grid_columns), self.out / SAMPLES_NAME)
            if self.records:
                plot_loss(self.records, self.out / LOSS_CURVE_NAME)
            last = self.records[-max(1, min(len(self.records), 10)) :]
            summary = {
                "steps": self.trainer.step_count,
                "train_seconds": round(self.elapsed, 2),
                "steps_per_second": round(self.trainer.step_count / self.elapsed, 3)
                if self.elapsed else None,
                "sample_seconds": round(sample_seconds, 2),
                "final_loss": {k: sum(r[k] for r in last) / len(last) for k in ("loss", "fm", "freq")}
                if last else None,
                "model": run.model,
                "config": self.config.to_dict(),
                "parameters": parameter_count(self.config),
                "dataset": self.dataset.description,
                "run": run_to_json(run),
                "world_size": self.d.world_size,
                "device": str(self.d.device),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "cpu_gemm": cpu_gemm(),
                "files": {"checkpoint": CHECKPOINT_NAME, "model": MODEL_NAME, "samples": SAMPLES_NAME,
                          "loss_curve": LOSS_CURVE_NAME, "log": LOG_NAME},
            }
            path = self.out / METRICS_NAME
            write_json(path, summary)  # replaces any earlier evaluation: the weights changed
        return summary


def train(run: RunConfig, dataset: TrainDataset | None = None,
          explicit: set[str] | None = None) -> dict[str, Any]:
    """Run (or resume) a training job and return the metrics summary (empty on ranks > 0).

    dataset: overrides the one `run` names (tests inject small or faulty datasets). explicit:
    the fields the user set on the command line (those may differ from a resumed checkpoint)."""
    d = setup_distributed(run.device)
    try:
        job = Job(run, d, dataset, explicit)
        if d.is_main:
            job.out.mkdir(parents=True, exist_ok=True)
            mode = f"resuming at step {job.trainer.step_count}" if run.resume else "training"
            print(f"deco train: {mode} {job.run.model} ({parameter_count(job.config):,} parameters) on "
                  f"{job.dataset.description}, {d.world_size} process(es) on {d.device}, "
                  f"writing to {job.out}", file=sys.stderr)
        job.fit()
        return job.finish()
    finally:
        if d.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

