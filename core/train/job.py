"""The training job behind `deco train`: data, Trainer, logging, checkpoints, samples, DDP.

    run = RunConfig(steps=2000)          # the built-in digits, DeCo-tiny/4
    summary = train(run)                 # writes run.out/{checkpoint,model}.safetensors, ...

The run's settings are one `RunConfig` (deco.train.run_config), which contains the step's
`TrainConfig` and the final grid's `SampleSettings`.

Launched by `torchrun --nproc-per-node N`, every process trains on its shard of each global
batch under DistributedDataParallel and rank 0 alone writes files. Multi-node works the same way
(torchrun's --nnodes/--rdzv-*; the run folder must be on a shared filesystem for `--resume`).
FSDP (sharded weights for models that do not fit one GPU) is future work: DeCo-XL/16 (~680M
parameters) trains comfortably with plain DDP on 80 GB GPUs.

Reproducibility: the model initialisation, the data order (`deco.data.BatchStream`) and the
training draws (noise, times, label dropout: the Trainer's generator) all derive from
`run.train.seed`. Every rank draws the whole global batch's randoms and keeps its shard
(`Trainer.draw(x, shard=(rank, world))`), so a run on N processes follows the same trajectory as
one process on the same global batch (up to the order of floating-point reductions), and rank
0's generator state, saved in the checkpoint, is every rank's state.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from deco.checkpoint import (
    CHECKPOINT_NAME,
    MODEL_NAME,
    check_training_state,
    load_checkpoint,
    save_checkpoint,
)
from deco.config import DeCoConfig, parameter_count
from deco.data import BatchStream, TrainDataset, open_dataset
from deco.distributed import Dist, all_ok, broadcast_object, setup_distributed
from deco.errors import FieldError
from deco.generate import class_labels, generate, load_for_sampling
from deco.lora import ADAPTER_NAME, add_lora, merge_adapter, resolve_targets, save_adapter, trainable_count
from deco.optimized import NonFiniteLossError, Trainer, build_model, cpu_gemm
from deco.optimized.trainer import TrainConfig
from deco.outputs import grid_image, plot_loss, read_log, save_png, to_uint8, write_json, write_log
from deco.paths_inside import refuse_symlinked_output, resolve_inside
from deco.text.job import ShardStream, TextSource, open_text_source
from deco.text.sampling import text_grid
from deco.train.memory import check_memory
from deco.train.repa import load_repa_encoder
from deco.train.run_config import (
    RunConfig,
    changed_fields,
    check_inputs,
    check_model_file,
    input_identity,
    model_config,
    resolve,
    with_overrides,
)

LOG_NAME = "log.jsonl"
METRICS_NAME = "metrics.json"
SAMPLES_NAME = "samples.png"
LOSS_CURVE_NAME = "loss.png"

__all__ = ["Dist", "Job", "RunConfig", "TrainingError", "setup_distributed", "train"]


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the message says why and where."""


# ----------------------------------------------------------------------------- the run
class Job:
    """A training run: resume or start (`_start`), build data, model and trainer (`_build`),
    wrap the model for DDP (`_wrap`); then `fit` trains and `finish` writes the outputs."""

    def __init__(self, run: RunConfig, dist_env: Dist, dataset: TrainDataset | None = None,
                 explicit: set[str] | None = None) -> None:
        self.d = dist_env
        resume_state = self._start(run, explicit or set())
        self._build(dataset, resume_state)
        self._wrap()
        if resume_state is not None:
            self._restore(resume_state)

    # ---------------------------------------------------------------------------- set-up
    def _start(self, run: RunConfig, explicit: set[str]) -> dict[str, Any] | None:
        """Choose the run folder and settings: a fresh run's, or the checkpoint's on --resume."""
        out = run.out
        if out is None:
            out = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
            out = Path(broadcast_object(str(out), self.d))
        self.out = out
        state = None
        if run.resume:
            ckpt = resolve_inside(out, CHECKPOINT_NAME, what=f"resume: the run folder {out}")
            if not ckpt.is_file():
                raise FieldError("resume", f"no checkpoint {ckpt} (give the run folder with --out)")
            state = load_checkpoint(ckpt, validate=check_training_state(ckpt))
            stored = resolve(RunConfig.from_dict(state["run"]))
            followed = recorded_paths(stored, explicit)
            if followed and self.d.is_main:  # paths read from a file: say so (SECURITY.md)
                print(f"deco train: --resume reads {followed}, as {ckpt} records", file=sys.stderr)
            run = with_overrides(stored, changed_fields(run, stored, explicit))
            run = dataclasses.replace(run, resume=True)
            check_model_file(stored, state["config"], out)
        elif (out / CHECKPOINT_NAME).exists():
            raise FieldError("out", f"{out} already holds a run; continue it with --resume or choose "
                                    f"another folder")
        elif self.d.is_main and os.path.lexists(out / LOG_NAME):  # a dangling link too
            (out / LOG_NAME).unlink()  # records of a run killed before its first checkpoint
        self.run = resolve(dataclasses.replace(run, out=out))
        self.inputs = input_identity(self.run)
        if state is not None and "inputs" in state:  # checkpoints from before issue 20 have none
            check_inputs(state["inputs"], self.inputs, out)
        return state

    def _build(self, dataset: TrainDataset | None, state: dict[str, Any] | None) -> None:
        """Dataset, model (checked against the memory it will need), Trainer and data stream."""
        run = self.run
        assert run.batch_size is not None and run.train is not None
        assert run.accumulation is not None
        if run.batch_size % (self.d.world_size * run.accumulation):
            raise FieldError("batch_size", f"the global batch {run.batch_size} must be divisible by "
                                           f"the number of processes {self.d.world_size} times the "
                                           f"accumulation {run.accumulation}")
        self.local_batch = run.batch_size // self.d.world_size
        init = None
        if state is not None:  # the checkpoint's config: an edited .json file cannot change it
            self.config = DeCoConfig.from_dict(state["config"])
        elif run.init is not None:  # a fine-tune: the trained model's config and EMA weights
            try:
                init = load_for_sampling(run.init, torch.device("cpu"), text=True).model
            except (FileNotFoundError, ValueError) as exc:
                raise FieldError("init", str(exc)) from None
            self.config = init.config
        elif run.task == "t2i":
            assert run.model is not None
            self.config = model_config(run.model, None)
        self.text: TextSource | None = None
        if run.task == "t2i":
            self._check_task()
            opened, self.text = open_text_source(run, self.config, self.out, self.d)
            dataset = opened if dataset is None else dataset
        self.dataset = dataset if dataset is not None else open_dataset(run.data, run.resolution)
        if state is None and init is None and run.task == "c2i":
            assert run.model is not None
            self.config = model_config(run.model, self.dataset.num_classes)
        self._check_task()
        if not self.config.is_text and self.config.num_classes != self.dataset.num_classes:
            raise FieldError("data", f"{self.dataset.num_classes} classes, but the checkpoint's model "
                                     f"has {self.config.num_classes}")
        if self.dataset.resolution % self.config.patch_size:
            raise FieldError("resolution", f"{self.dataset.resolution} is not a multiple of the patch "
                                           f"size {self.config.patch_size} of {self.model_name}")
        micro_batch = self.local_batch // run.accumulation  # what one forward pass holds
        check_memory(self.config, micro_batch, self.dataset.resolution, self.d.device)
        torch.manual_seed(run.train.seed)  # identical initial weights on every rank
        self.model = build_model(self.config).to(self.d.device)
        if init is not None:
            self.model.load_state_dict(init.state_dict())
        self._fine_tuning()
        if run.compile:
            self.model.compile()  # in place: parameter names (checkpoints) stay unprefixed
        self.net: torch.nn.Module = self.model
        self.stream: Any = BatchStream(self.dataset, self.local_batch, seed=run.train.seed, rank=self.d.rank,
                                       world_size=self.d.world_size, num_workers=run.num_workers) \
            if isinstance(self.dataset, TrainDataset) else ShardStream(self.dataset, self.local_batch,
                                                                       run.num_workers)
        self.trainer_class = Trainer

    @property
    def model_name(self) -> str:
        """The preset or .json file of the model, or the --init checkpoint it starts from."""
        return self.run.model or f"the model of {self.run.init}"

    def _fine_tuning(self) -> None:
        """LoRA layers (frozen base) when the run asks for them; activation checkpointing."""
        run = self.run
        if run.lora_rank is not None:
            try:
                add_lora(self.model, run.lora_rank, resolve_targets(self.model, run.lora_targets))
            except ValueError as exc:
                field, _, message = str(exc).partition(": ")
                raise FieldError(field, message) from None
        self.model.set_gradient_checkpointing(run.grad_checkpointing)

    def _check_task(self) -> None:
        if self.config.is_text != (self.run.task == "t2i"):
            kind = "text" if self.config.is_text else "class"
            raise FieldError("model", f"{self.model_name} is a {kind}-conditional model, but the task "
                                      f"is {self.run.task}")

    def _wrap(self) -> None:
        """Under torchrun, the Trainer's forward goes through DistributedDataParallel, which
        all-reduces the gradients in backward; checkpoints, EMA and REPA hooks use the bare model."""
        if self.d.world_size > 1:
            ids = [self.d.local_rank] if self.d.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        train_config, encoder = self._repa()
        null = None if self.text is None else self.text.null
        self.trainer = self.trainer_class(self.model, train_config, encoder=encoder, net=self.net,
                                          null_text=null)
        self.records: list[dict[str, float]] = []
        self.elapsed = 0.0

    def _repa(self) -> tuple[TrainConfig, torch.nn.Module | None]:
        """REPA's frozen encoder when the run names one (deco.train.repa), and the step's config
        with the encoder's feature width; without one, REPA is off."""
        train_config = self.run.train
        assert train_config is not None
        if self.run.repa_encoder is None:
            return train_config, None

        try:
            encoder = load_repa_encoder(self.run.repa_encoder, self.d.device,
                                        base_patch_size=self.config.patch_size)
        except (FileNotFoundError, ValueError) as exc:
            raise FieldError("repa_encoder", str(exc).removeprefix("path: ")) from None
        if not train_config.repa_layer <= self.config.depth:
            raise FieldError("train.repa_layer", f"expected a DiT block in 1..{self.config.depth} "
                                                 f"for {self.model_name}, got {train_config.repa_layer}")
        return dataclasses.replace(train_config, repa_encoder_dim=encoder.dim), encoder

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimizer, generator, data position, logs."""
        self.trainer.load_state_dict(state["trainer"])
        self.stream.load_state(state["data"])
        self.elapsed = float(state.get("elapsed", 0.0))
        # Records written after the checkpoint belong to steps that will be redone.
        # Its records are copied into the new log: a link out of the folder is refused, not read.
        log = resolve_inside(self.out, LOG_NAME, what=f"resume: the run folder {self.out}")
        self.records = read_log(log, self.trainer.step_count)
        if self.d.is_main:
            write_log(self.out / LOG_NAME, self.records)
            for stale in self.out.glob(".*.tmp"):  # temporaries of a write cut short by a kill
                stale.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        trainer_state = self.trainer.state_dict()
        trainer_state["model"] = self.model.state_dict()  # without DDP's "module." prefix
        return {
            "trainer": trainer_state,
            "data": self.stream.state(),
            "run": self.run.to_dict(),
            "config": self.config.to_dict(),
            "elapsed": self.elapsed,
            "inputs": self.inputs,
        }

    def save(self) -> None:
        if self.d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.out / CHECKPOINT_NAME, self.state())

    def append_log(self, record: dict[str, float]) -> None:
        self.records.append(record)
        if self.d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            log = refuse_symlinked_output(self.out / LOG_NAME, what=f"the run folder {self.out}")
            with open(log, "a") as f:  # appends: a link would be written through
                f.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------------------- steps
    def reduce_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Loss terms averaged over ranks: the global batch's losses (equal shard sizes)."""
        if self.d.world_size == 1:
            return logs
        keys = ["loss", "fm", "freq", "repa"]
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return {**logs, **dict(zip(keys, (values / self.d.world_size).tolist(), strict=True))}

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, condition) on the device: labels, or text embeddings (B, T, E)."""
        for x, y in self.stream:
            cond = y.to(self.d.device, non_blocking=True) if self.text is None else self.text.embed(y)
            yield x.to(self.d.device, non_blocking=True), cond

    def fit(self) -> None:
        run = self.run
        assert run.steps is not None and run.checkpoint_every is not None and run.accumulation is not None
        start = self.trainer.step_count
        if start >= run.steps:
            return
        bar = tqdm(total=run.steps, initial=start, desc="train", unit="step", file=sys.stderr,
                   disable=not self.d.is_main, dynamic_ncols=True, mininterval=0.5)
        window: list[dict[str, float]] = []
        batches = self.batches()
        shard = (self.d.rank, self.d.world_size)
        began = time.perf_counter() - self.elapsed
        try:
            for step in range(start + 1, run.steps + 1):
                x, y = next(batches)
                try:
                    logs = self.trainer.step(x, y, self.trainer.draw(x, shard=shard),
                                             accumulation=run.accumulation)
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
        run = self.run
        assert run.sample is not None and run.steps is not None and run.train is not None
        summary: dict[str, Any] = {}
        if not self.d.is_main:
            return summary
        ema: Any = self.trainer.ema
        if run.lora_rank is not None:  # the adapter, and the model with it merged
            save_adapter(ema, self.out / ADAPTER_NAME)
            ema = merge_adapter(copy.deepcopy(ema))
        ema.save(self.out / MODEL_NAME)
        t0 = time.perf_counter()
        if self.text is not None:
            text_grid(ema, self.text, run.sample, self.out / SAMPLES_NAME, seed=run.train.seed,
                      size=(self.dataset.resolution, getattr(self.dataset, "width", self.dataset.resolution)))
        else:
            labels = class_labels(min(self.config.num_classes, 10), run.grid_columns)
            images = generate(ema, labels, run.sample, seed=run.train.seed,
                              resolution=self.dataset.resolution)
            save_png(grid_image(to_uint8(images), run.grid_columns), self.out / SAMPLES_NAME)
        sample_seconds = time.perf_counter() - t0
        if self.records:
            plot_loss(self.records, self.out / LOSS_CURVE_NAME)
        last = self.records[-max(1, min(len(self.records), 10)) :]
        summary = {
            "steps": self.trainer.step_count,
            "train_seconds": round(self.elapsed, 2),
            "steps_per_second": round(self.trainer.step_count / self.elapsed, 3) if self.elapsed else None,
            "sample_seconds": round(sample_seconds, 2),
            "final_loss": {k: sum(r[k] for r in last) / len(last) for k in ("loss", "fm", "freq")}
            if last else None,
            "model": run.model,
            "config": self.config.to_dict(),
            "parameters": parameter_count(self.config),
            "trainable_parameters": trainable_count(self.model),
            "dataset": self.dataset.description,
            "run": run.to_dict(),
            "world_size": self.d.world_size,
            "device": str(self.d.device),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_gemm": cpu_gemm(),
            "files": {"checkpoint": CHECKPOINT_NAME, "model": MODEL_NAME, "samples": SAMPLES_NAME,
                      "loss_curve": LOSS_CURVE_NAME, "log": LOG_NAME,
                      **({"adapter": ADAPTER_NAME} if run.lora_rank is not None else {})},
        }
        write_json(self.out / METRICS_NAME, summary)  # replaces any earlier evaluation: the weights changed
        return summary


def recorded_paths(stored: RunConfig, explicit: set[str]) -> str:
    """The input paths a resumed run takes from its checkpoint rather than the command line
    ("--data DIR, --embeddings DIR"; "" for none): the continued run's own settings, followed as
    recorded and named on stderr."""
    names = ["data", "embeddings", "text_encoder", "repa_encoder"]
    if stored.model is not None and str(stored.model).endswith(".json"):
        names.append("model")
    return ", ".join(f"--{name.replace('_', '-')} {getattr(stored, name)}" for name in names
                     if getattr(stored, name) is not None and name not in explicit)


def train(run: RunConfig, dataset: TrainDataset | None = None,
          explicit: set[str] | None = None) -> dict[str, Any]:
    """Run (or resume) a training job and return the metrics summary (empty on ranks > 0).

    dataset: overrides the one `run` names (tests inject small or faulty datasets). explicit:
    on --resume, the fields the user set ("steps", "train.lr", "sample"): they override the
    checkpoint's, and a differing trajectory field is refused."""
    d = setup_distributed(run.device)
    try:
        job = Job(run, d, dataset, explicit)
        if d.is_main:
            job.out.mkdir(parents=True, exist_ok=True)
            mode = f"resuming at step {job.trainer.step_count}" if job.run.resume else "training"
            print(f"deco train: {mode} {job.model_name} ({parameter_count(job.config):,} parameters) on "
                  f"{job.dataset.description}, {d.world_size} process(es) on {d.device}, "
                  f"writing to {job.out}", file=sys.stderr)
        job.fit()
        return job.finish()
    finally:
        if d.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
