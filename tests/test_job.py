"""The training job's configuration (deco.train.job): one RunConfig containing the step's TrainConfig and
the grid's SampleSettings, dataset defaults, overrides, resume rules, and the memory check."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from deco.cli.train import OPTIONS, flag_of
from deco.config import PRESETS, parameter_count
from deco.optimized import FieldError, TrainConfig
from deco.optimized.sampling import SampleSettings
from deco.train.memory import BYTES_PER_PARAMETER, check_memory, estimate_bytes
from deco.train.run_config import (
    DIGITS_DEFAULTS,
    FOLDER_DEFAULTS,
    RunConfig,
    changed_fields,
    resolve,
    with_overrides,
)

GIB = 1024**3


def test_every_option_names_a_real_field() -> None:
    """The flag table is the only map from flags to fields: each field exists where it says."""
    run = resolve(RunConfig())
    for _, field, _ in OPTIONS:
        section, _, name = field.rpartition(".")
        owner = getattr(run, section) if section else run
        assert name in {f.name for f in dataclasses.fields(owner)}, field


def test_flags_of_fields() -> None:
    assert flag_of("train.lr") == "--lr"
    assert flag_of("train.timeshift") == "--train-timeshift"  # --timeshift is the grid's
    assert flag_of("sample.timeshift") == "--timeshift"
    assert flag_of("sample.steps") == "--sample-steps"
    assert flag_of("batch_size") == "--batch-size"


def test_dataset_defaults_fill_only_what_is_unset() -> None:
    run = resolve(RunConfig(steps=7))
    assert run.steps == 7 and run.model == DIGITS_DEFAULTS["model"]
    assert run.train == DIGITS_DEFAULTS["train"] and run.train.timeshift == 2.0
    folder = resolve(RunConfig(data=Path("x")))
    assert folder.train == TrainConfig() and folder.sample == FOLDER_DEFAULTS["sample"]


def test_overrides_start_from_the_dataset_default_of_their_section() -> None:
    run = with_overrides(RunConfig(), {"train.lr": 5e-4, "sample.guidance": 2.0, "steps": 3})
    assert run.train is not None and run.sample is not None
    assert run.train.lr == 5e-4 and run.train.timeshift == DIGITS_DEFAULTS["train"].timeshift
    assert run.sample.guidance == 2.0 and run.sample.steps == DIGITS_DEFAULTS["sample"].steps
    folder = with_overrides(RunConfig(), {"data": Path("x"), "train.lr": 5e-4})
    assert folder.train is not None and folder.train.timeshift == 1.0 and folder.train.ema_decay == 0.9999


@pytest.mark.parametrize(("overrides", "field"), [
    ({"train.lr": -1.0}, "train.lr"),
    ({"train.quality": 0}, "train.quality"),
    ({"sample.interval": (0.9, 0.1)}, "sample.interval"),
    ({"sample.solver": "rk4"}, "sample.solver"),
    ({"steps": 0}, "steps"),
    ({"model": "DeCo-huge/3"}, "model"),
    ({"device": "tpu"}, "device"),
])
def test_errors_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(FieldError) as info:
        with_overrides(RunConfig(), overrides)
    assert info.value.field == field and str(info.value).startswith(field + ":")


def test_run_config_round_trips_through_json_types() -> None:
    run = resolve(RunConfig(out=Path("o"), steps=5, train=TrainConfig(lr=2e-4, betas=(0.9, 0.95))))
    assert RunConfig.from_dict(run.to_dict()) == run
    assert run.to_dict()["train"]["betas"] == [0.9, 0.95]


def test_resume_keeps_the_trajectory_and_takes_the_rest() -> None:
    stored = resolve(RunConfig(steps=10))
    more = RunConfig(steps=20, sample=SampleSettings(steps=3))
    assert changed_fields(more, stored, {"steps", "sample"}) == {"steps": 20, "sample": more.sample}
    for name, given in [("train.lr", with_overrides(RunConfig(), {"train.lr": 0.5})),
                        ("train", RunConfig(train=TrainConfig(seed=3))),
                        ("batch_size", RunConfig(batch_size=7))]:
        with pytest.raises(FieldError, match="differs from the checkpoint") as info:
            changed_fields(given, stored, {name})
        assert info.value.field == name
    # The same value given again is not a change.
    assert changed_fields(with_overrides(RunConfig(), {"train.lr": 1e-3}), stored, {"train.lr"}) == {
        "train.lr": 1e-3}


# ----------------------------------------------------------------------------- memory
def test_memory_estimate_counts_the_optimizer_state_and_activations() -> None:
    config = PRESETS["DeCo-XL/16"]
    state = BYTES_PER_PARAMETER * parameter_count(config)
    assert BYTES_PER_PARAMETER >= 4 * 5  # weights, gradients, two AdamW moments, EMA
    assert estimate_bytes(config, 1, 32) > state
    # Activations grow with the batch and with the number of tokens.
    one = estimate_bytes(config, 1, 256) - state
    assert estimate_bytes(config, 8, 256) - state == pytest.approx(8 * one)
    assert estimate_bytes(config, 1, 256) > estimate_bytes(config, 1, 128)


def test_memory_check_refuses_with_the_numbers_and_the_flag() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(FieldError) as info:
        check_memory(PRESETS["DeCo-XL/16"], 64, 32, cpu, free=8 * GIB)
    message = str(info.value)
    assert info.value.field == "model" and "8.0 GiB" in message and "--batch-size" in message
    assert "682,282,851 parameters" in message
    check_memory(PRESETS["DeCo-tiny/4"], 64, 32, cpu, free=8 * GIB)  # the digits run fits
