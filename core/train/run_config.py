"""The settings of a training run (`deco train`), for deco.train.job.

One config: `RunConfig` holds what the job needs (data, model, batch, steps, files) and
*contains* the training step's `TrainConfig` (`run.train`) and the final grid's `SampleSettings`
(`run.sample`), each validated once, by its own class, with errors naming the field
(`FieldError`). A field left `None` takes the dataset's default (`DIGITS_DEFAULTS`,
`FOLDER_DEFAULTS`, the text task's in deco.text.job; `run.train` None: that dataset's whole
TrainConfig). `with_overrides` applies "train.lr"-style overrides (the command line's), and
`changed_fields` decides what a resumed run may change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deco.config import PRESETS, DeCoConfig, config_from_dict, config_to_dict
from deco.errors import FieldError, field_int
from deco.optimized.sampling import SampleSettings
from deco.optimized.trainer import TrainConfig
from deco.plan_identity import file_sha256, plan_changes
from deco.text.job import T2I_DEFAULTS, T2I_DEMO_DEFAULTS
from deco.untrusted import read_json

__all__ = ["DIGITS_DEFAULTS", "FOLDER_DEFAULTS", "TRAJECTORY_FIELDS", "RunConfig", "changed_fields",
           "check_inputs", "check_model_file", "defaults", "input_identity", "model_config", "resolve",
           "with_overrides"]


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. `None` fields take the dataset's defaults (`resolve`)."""

    out: Path | None = None  # default runs/<timestamp>
    task: str = "c2i"  # "c2i" class-to-image, "t2i" text-to-image (deco.text.job)
    data: Path | None = None  # None: the built-in digits (t2i: the built-in digit-pairs demo)
    text_encoder: Path | None = None  # t2i: a Qwen3 folder, run on every batch's captions
    embeddings: Path | None = None  # t2i: a `deco embed-text` store of the captions of `data`
    resolution: int | None = None
    model: str | None = None  # a preset of deco.config.PRESETS or a .json file of DeCoConfig fields
    batch_size: int | None = None  # global batch (split over processes, then micro-batches)
    # Micro-batches per optimizer step. A RunConfig field, not a TrainConfig one: like the number
    # of processes it only decides how a global batch is computed (the trajectory is the same),
    # so a resumed run may change it, e.g. to fit other GPUs.
    accumulation: int | None = None
    steps: int | None = None
    checkpoint_every: int | None = None
    log_every: int = 10
    compile: bool = False
    num_workers: int = 0
    device: str = "auto"
    grid_columns: int = 10
    resume: bool = False
    repa_encoder: Path | None = None  # DINOv2 (.pth or Hugging Face folder): turns REPA on
    train: TrainConfig | None = None  # the training step's settings (lr, EMA, losses, seed, ...)
    sample: SampleSettings | None = None  # the final sample grid
    # Fine-tuning (issue 27): start from a trained model's weights (its config too), and with
    # lora_rank train only a LoRA adapter of that rank on `lora_targets` (None: deco.lora's
    # defaults). Activation checkpointing changes memory, not the trajectory.
    init: Path | None = None
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] | None = None
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.task not in ("c2i", "t2i"):
            raise FieldError("task", f"expected c2i or t2i, got {self.task!r}")
        for name in ("text_encoder", "embeddings"):
            if self.task == "c2i" and getattr(self, name) is not None:
                raise FieldError(name, "text embeddings are for --task t2i")
        for name in ("resolution", "batch_size", "steps", "checkpoint_every", "accumulation"):
            if getattr(self, name) is not None:
                field_int(self, name, 1)
        field_int(self, "log_every", 1)
        field_int(self, "grid_columns", 1)
        field_int(self, "num_workers", 0)
        if self.model is not None and self.model not in PRESETS and not str(self.model).endswith(".json"):
            raise FieldError("model", f"unknown preset {self.model!r}; expected one of {sorted(PRESETS)} "
                                      f"or a .json file of DeCoConfig fields")
        if self.device not in ("auto", "cpu", "cuda"):
            raise FieldError("device", f"expected auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise FieldError("device", "cuda requested but torch sees no CUDA device")
        self._check_fine_tuning()

    def _check_fine_tuning(self) -> None:
        # On --resume the checkpoint holds --init; a repeated --lora/--lora-targets is then
        # compared with the checkpoint's (changed_fields), not refused here.
        if self.lora_rank is not None:
            field_int(self, "lora_rank", 1)
            if self.init is None and not self.resume:
                raise FieldError("lora_rank", "LoRA fine-tunes a trained model: give it with --init")
        if self.lora_targets is not None and (
                (self.lora_rank is None and not self.resume) or not self.lora_targets or not all(
                isinstance(t, str) and t for t in self.lora_targets)):
            raise FieldError("lora_targets", "expected module names, and --lora RANK")
        if self.init is not None and self.model is not None:
            raise FieldError("model", "the model of a fine-tune is --init's; give one of --model and --init")
        if not isinstance(self.grad_checkpointing, bool):
            raise FieldError("grad_checkpointing", f"expected a bool, got {self.grad_checkpointing!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON types (`deco.config.config_to_dict`: paths as strings, `train` and
        `sample` as their own dicts)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """The inverse of `to_dict` (`deco.config.config_from_dict`)."""
        return config_from_dict(cls, data)


#: Defaults for the built-in digits, chosen by short sweeps (bench/RESULTS_training.md) so that the
#: default run reaches >= 90% class accuracy on its own samples in under 10 minutes on 2 CPU cores.
#: The time shift 2 matters most: the class of a digit is decided at high noise, and training
#: there more often raised the 2000-step accuracy from 36% to 98% in our sweep (same lr and batch).
DIGITS_DEFAULTS: dict[str, Any] = {
    "model": "DeCo-tiny/4", "batch_size": 64, "steps": 2000, "checkpoint_every": 500, "resolution": 32,
    "accumulation": 1,
    "train": TrainConfig(lr=1e-3, ema_decay=0.995, timeshift=2.0),
    "sample": SampleSettings(steps=25, guidance=3.0, interval=(0.0, 1.0), timeshift=1.0, solver="euler"),
}
#: Defaults for an image folder: the release's recipe (AdamW 1e-4, EMA 0.9999, batch 32/GPU x 8) and
#: its DeCo-XL 256 px sampler (`deco.config.RELEASE_SAMPLING["c2i"]`).
FOLDER_DEFAULTS: dict[str, Any] = {
    "model": "DeCo-XL/16", "batch_size": 256, "steps": 400_000, "checkpoint_every": 5000, "resolution": 256,
    "accumulation": 1,
    "train": TrainConfig(),
    "sample": SampleSettings.release("c2i"),
}

#: Fields that change the training trajectory (every field of `train` does): a resumed run must
#: keep the checkpoint's values of these.
TRAJECTORY_FIELDS = ("task", "data", "text_encoder", "embeddings", "resolution", "model", "batch_size",
                     "repa_encoder", "train", "init", "lora_rank", "lora_targets")


def defaults(data: Path | None, task: str = "c2i") -> dict[str, Any]:
    """The dataset's defaults: the built-in digits' or an image folder's (c2i); the built-in
    digit-pairs demo's or a caption dataset's (t2i, `deco.text.job`)."""
    if task == "t2i":
        return T2I_DEMO_DEFAULTS if data is None else T2I_DEFAULTS
    return DIGITS_DEFAULTS if data is None else FOLDER_DEFAULTS


def resolve(run: RunConfig) -> RunConfig:
    """`run` with every `None` replaced by its dataset's default (the model stays None for a
    fine-tune: --init gives it)."""
    updates = {k: v for k, v in defaults(run.data, run.task).items() if getattr(run, k) is None}
    if run.init is not None:  # a fine-tune's model is its --init checkpoint's
        updates.pop("model", None)
    return dataclasses.replace(run, **updates)


def with_overrides(run: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """`run` with fields replaced; "train.x" and "sample.x" name a field of `run.train` or
    `run.sample` (an unset one starts from the dataset's default). A FieldError names the field
    with its section ("train.lr")."""
    top = {k: v for k, v in overrides.items() if "." not in k}
    for section in ("train", "sample"):
        fields = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(section + ".")}
        if fields:
            base = getattr(run, section) or defaults(top.get("data", run.data),
                                                     top.get("task", run.task))[section]
            try:
                top[section] = dataclasses.replace(base, **fields)
            except FieldError as exc:
                raise FieldError(f"{section}.{exc.field}", exc.message) from None
    return dataclasses.replace(run, **top)


def changed_fields(given: RunConfig, stored: RunConfig, explicit: set[str]) -> dict[str, Any]:
    """The explicitly given settings as overrides of the stored run, refusing a trajectory
    setting that differs: the resumed run would not continue the interrupted one."""
    base = defaults(stored.data, stored.task)
    given = dataclasses.replace(given, **{k: base[k] for k in ("train", "sample")
                                          if getattr(given, k) is None})
    overrides: dict[str, Any] = {}
    for name in sorted(explicit):
        section, _, field = name.rpartition(".")
        new, old = (getattr(getattr(r, section) if section else r, field) for r in (given, stored))
        if (section == "train" or name in TRAJECTORY_FIELDS) and new != old:
            raise FieldError(name, f"{new!r} differs from the checkpoint's {old!r}; a resumed run "
                                   f"keeps its settings")
        overrides[name] = new
    return overrides


def model_config(model: str, num_classes: int | None) -> DeCoConfig:
    """The DeCoConfig of a preset name or a .json file of DeCoConfig fields (an omitted field takes
    DeCoConfig's default, i.e. DeCo-XL/16's), for `num_classes` classes (None: as given)."""
    if model in PRESETS:
        config = DeCoConfig.preset(model)
    else:
        path = Path(model)
        if not path.is_file():
            raise FieldError("model", f"no such preset or .json file: {model}")
        try:
            config = DeCoConfig.from_json(path.read_text())
        except (ValueError, TypeError) as exc:
            raise FieldError("model", f"{path}: {exc}") from None
    return config if num_classes is None else dataclasses.replace(config, num_classes=num_classes)


def check_model_file(stored: RunConfig, config: dict[str, Any], out: Path) -> None:
    """On --resume: a FieldError if the run's --model .json file now describes another model than
    the checkpoint's `config` (a dict): the resumed run keeps the checkpoint's model, so an
    edited file would be silently ignored. A file that is gone is no conflict."""
    if stored.model is None or stored.model in PRESETS or not Path(stored.model).is_file():
        return
    wanted = model_config(stored.model, None if stored.task == "t2i" else config.get("num_classes"))
    changes = plan_changes(config, wanted.to_dict())
    if changes:
        raise FieldError("model", f"{stored.model} changed since the run in {out} started "
                                  f"({'; '.join(changes[:3])}); a resumed run keeps its model: restore "
                                  f"the file, or start a new run with another --out")


def input_identity(run: RunConfig) -> dict[str, Any]:
    """What the files a run reads are, beyond their paths (which `changed_fields` compares): the
    text embeddings' encoder and captions (index.json) and the REPA encoder file's SHA-256.
    Recorded in every checkpoint; a --resume whose files now differ is refused (`check_inputs`)."""
    inputs: dict[str, Any] = {}
    if run.embeddings is not None and (run.embeddings / "index.json").is_file():
        try:
            index = read_json(run.embeddings / "index.json")
        except (OSError, ValueError):
            index = {}
        if not isinstance(index, dict):
            index = {}
        inputs["embeddings"] = {k: index.get(k) for k in ("encoder", "length", "width", "dtype", "count",
                                                           "captions_sha256")}
    if run.repa_encoder is not None and run.repa_encoder.is_file():
        inputs["repa_encoder"] = {"sha256": file_sha256(run.repa_encoder)}
    return inputs


def check_inputs(recorded: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    """A FieldError naming the first input file that changed since the checkpoint was written."""
    changes = plan_changes(recorded, current)
    if changes:
        field = changes[0].split(".", 1)[0].split(" ", 1)[0]
        raise FieldError(field, f"changed since the run in {out} started ({'; '.join(changes[:3])}); a "
                                f"resumed run needs the same files: restore them, or start a new run "
                                f"with another --out")
