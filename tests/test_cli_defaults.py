"""Every default that `deco <command> --help` prints is checked against its home: the config
dataclass field (TrainConfig, RunConfig, SampleSettings), the dataset's defaults table
(DIGITS_DEFAULTS, FOLDER_DEFAULTS, T2I_DEMO_DEFAULTS, T2I_DEFAULTS) or the function that uses the
value. A default written twice can therefore not drift: change the home and a stale help text
fails here. The release's sampling settings (`deco.config.RELEASE_SAMPLING`) are read against the
spec's own sentences.

The printed defaults are found by patterns ("(85)", "(default 1, t2i on --data: 3)", "default:
auto", "c2i: ... (default)", ...); an option whose help mentions a default that no pattern reads,
while argparse has a value for it, fails too, so a new way of writing a default is noticed.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from deco.cli import build_parser
from deco.config import PRESETS, RELEASE_SAMPLING, DeCoConfig
from deco.deploy.check import check_onnx
from deco.deploy.export import export_onnx
from deco.evaluate.adm import evaluate_sample_batches
from deco.evaluate.sample_batches import ShardPlan
from deco.generate import generate
from deco.optimized.sampling import SampleSettings
from deco.optimized.trainer import TrainConfig
from deco.release import read_release_checkpoint
from deco.text.embeddings import embed_captions
from deco.text.encoder import Qwen3TextEncoder
from deco.text.job import T2I_DEFAULTS, T2I_DEMO_DEFAULTS
from deco.train.run_config import DIGITS_DEFAULTS, FOLDER_DEFAULTS, RunConfig

SPEC = Path(__file__).resolve().parents[1] / "spec"
TABLES = {"digits": DIGITS_DEFAULTS, "folder": FOLDER_DEFAULTS, "t2i demo": T2I_DEMO_DEFAULTS,
          "t2i": T2I_DEFAULTS}
#: Which tables a qualifier in `deco train`'s help speaks of.
QUALIFIED = {"t2i on --data": ("t2i",), "t2i default": ("t2i demo", "t2i")}
DATA_TABLES = ("folder", "t2i")  # "... for --data": the tables of a run on a dataset


def _param(function: Any, name: str) -> Any:
    return inspect.signature(function).parameters[name].default


def _field(cls: Any, name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


#: Options (other than `deco train`'s) whose argparse default must equal the default of the
#: function or dataclass that receives the value.
HOMES: dict[tuple[str, str], tuple[Any, str]] = {
    ("sample", "seed"): (generate, "seed"),
    ("sample", "batch_size"): (generate, "batch_size"),
    ("sample", "shard_size"): (ShardPlan, "shard_size"),
    ("sample", "negative_prompt"): (Qwen3TextEncoder.null, "negative"),
    ("evaluate", "seed"): (generate, "seed"),
    ("export-onnx", "opset"): (export_onnx, "opset"),
    ("export-onnx", "decoder_chunks"): (export_onnx, "decoder_chunk_rows"),
    ("onnx-check", "batch"): (check_onnx, "batch"),
    ("onnx-check", "guidance"): (check_onnx, "guidance"),
    ("onnx-check", "seed"): (check_onnx, "seed"),
    ("embed-text", "dtype"): (embed_captions, "dtype"),
    ("embed-text", "batch_size"): (embed_captions, "batch_size"),
    ("embed-text", "shard_size"): (embed_captions, "shard_size"),
    ("fid", "batch_size"): (evaluate_sample_batches, "batch_size"),
    ("convert", "weights"): (read_release_checkpoint, "weights"),
}


# ----------------------------------------------------------------------------- reading help
VALUE = r"""[-\w.$"'/<>]+(?: [-\d.e]+)*"""  # one word, or numbers separated by spaces
NUMBER = r"-?[\d.]+(?:e-?\d+)?"
QUALIFIER = "t2i on --data|t2i default|text models"


def printed_defaults(text: str) -> list[tuple[str, str]]:
    """(qualifier, value) of every default the help text states; qualifier "" for the plain one.
    A value that is a description ("the run's", "runs/<timestamp>") is kept as written."""
    found: list[tuple[str, str]] = []
    for m in re.finditer(r"\(default:? ([^;,)]+)", text):
        found.append(("", m.group(1).strip()))
    # "(85)", "(samples.png)"; a number may also go on: "(0.5; needs ...)", "(8, t2i on --data: 6)".
    for m in re.finditer(rf"\(({VALUE})\)|\(({NUMBER})(?=; |, {QUALIFIER})", text):
        value = m.group(1) or m.group(2)
        if not value.startswith("default"):
            found.append(("", value))
    for m in re.finditer(rf"({QUALIFIER}): ([-\w.]+)", text):
        found.append((m.group(1), m.group(2)))
    for m in re.finditer(r"(?:^|\W)'?(\w+)'?(?::[^;()]*)? \(default\)", text):
        found.append(("", m.group(1)))
    m = re.fullmatch(r"default: (\S+)", text)
    if m:
        found.append(("", m.group(1)))
    return found


def _is_description(value: str) -> bool:
    return (" " in value and not re.fullmatch(r"[-\d.e ]+", value)) or "<" in value or "$" in value


def same(printed: str, value: Any) -> bool:
    """Whether the printed text denotes `value` (numbers compared as numbers, on/off as bools)."""
    if isinstance(value, bool):
        return printed == ("on" if value else "off")
    if isinstance(value, (tuple, list)):
        parts = printed.split()
        return len(parts) == len(value) and all(same(p, v) for p, v in zip(parts, value, strict=True))
    if isinstance(value, (int, float)):
        try:
            return float(printed) == float(value)
        except ValueError:
            return False
    return printed.strip("\"'") == str(value)


def train_expected(dest: str, table: dict[str, Any]) -> Any:
    """The value of `deco train`'s option `dest` ("train.lr", "sample.solver", "log_every") that a
    run on the dataset of `table` starts from."""
    section, _, name = dest.rpartition(".")
    if section:
        return getattr(table[section], name)
    return table[name] if name in table else _field(RunConfig, name)


def mismatches(command: str, action: argparse.Action, text: str) -> list[str]:
    """What is wrong with the defaults that `text` (the help of `action` in `deco command`) prints."""
    where = f"deco {command} {action.option_strings[0] if action.option_strings else action.dest}"
    problems: list[str] = []
    printed = printed_defaults(text)
    values = [(q, v) for q, v in printed if not _is_description(v)]
    if command == "train":
        plain = DATA_TABLES if "for --data" in text else tuple(TABLES)
        for qualifier, value in values:
            for table in QUALIFIED.get(qualifier, plain):
                if qualifier == "" and any(table in QUALIFIED[q] for q, _ in values if q):
                    continue  # a qualified default speaks for this table
                expected = train_expected(action.dest, TABLES[table])
                if not same(value, expected):
                    problems.append(f"{where}: prints {value!r}, the {table} default is {expected!r}")
        return problems
    if action.default is None:  # the words describe what None means ("all", "the run's")
        values = [(q, v) for q, v in values if q]
    for qualifier, value in values:
        if qualifier == "text models":
            expected = SampleSettings.release("t2i").solver
        else:
            expected = action.default
        if not same(value, expected):
            problems.append(f"{where}: prints {value!r}, its default is {expected!r}")
    if not values and action.default not in (None, False) and "default" in text:
        problems.append(f"{where}: mentions a default, but no value is read from {text!r}")
    return problems


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def option_helps() -> list[tuple[str, argparse.Action, str]]:
    """(command, action, help as printed) for every option of every sub-command; each help is
    checked to appear in the sub-command's `--help` output."""
    out = []
    for name, parser in subcommands().items():
        formatter = parser._get_formatter()
        whole = "".join(parser.format_help().split())  # wrapping may break a line at a hyphen
        for action in parser._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                continue
            text = " ".join(formatter._expand_help(action).split())
            assert "".join(text.split()) in whole, (name, action.dest)
            out.append((name, action, text))
    return out


# ----------------------------------------------------------------------------- the tests
def test_every_printed_default_is_its_homes() -> None:
    helps = option_helps()
    assert {c for c, _, _ in helps} >= {"train", "sample", "evaluate", "spectrum", "convert",
                                        "export-onnx", "onnx-check", "embed-text", "fid"}
    problems = [p for command, action, text in helps for p in mismatches(command, action, text)]
    assert problems == []
    checked = {(c, a.dest) for c, a, t in helps
               if any(not _is_description(v) for _, v in printed_defaults(t))}
    # The reader sees what it checks: these defaults are read from the printed help.
    assert {("train", "train.quality"), ("train", "train.repa_layer"), ("train", "accumulation"),
            ("train", "train.bf16"), ("train", "device"), ("train", "task"), ("train", "sample.solver"),
            ("sample", "per_label"), ("sample", "solver"), ("spectrum", "times"),
            ("export-onnx", "batch"), ("embed-text", "shard_size")} <= checked


def test_argparse_defaults_are_the_functions_defaults() -> None:
    actions = {(c, a.dest): a for c, parser in subcommands().items() for a in parser._actions}
    for (command, dest), (home, name) in HOMES.items():
        expected = _field(home, name) if dataclasses.is_dataclass(home) else _param(home, name)
        assert actions[command, dest].default == expected, (command, dest)


@pytest.mark.slow  # importing diffusers takes ~10 s
def test_convert_sample_size_is_the_pipelines() -> None:
    diffusers_convert = pytest.importorskip("deco.diffusers.convert")
    action = _action("convert", "sample_size")
    assert action.default == _param(diffusers_convert.build_pipeline, "sample_size")


def test_sample_description_states_the_spec_defaults() -> None:
    text = " ".join(subcommands()["sample"].description.split())  # type: ignore[union-attr]
    m = re.search(r"the spec's \((\d+) (\w+) steps, no guidance\)", text)
    assert m is not None
    assert int(m.group(1)) == _field(SampleSettings, "steps")
    assert m.group(2).lower() == _field(SampleSettings, "solver")
    assert _field(SampleSettings, "guidance") == 1.0


def test_the_model_help_names_deco_configs_default() -> None:
    helps = {(c, a.dest): t for c, a, t in option_helps()}
    assert "DeCo-XL/16's" in helps["train", "model"]
    assert DeCoConfig() == PRESETS["DeCo-XL/16"]


# ----------------------------------------------------------------------------- the checker fails
def _action(parser_command: str, dest: str) -> argparse.Action:
    return next(a for a in subcommands()[parser_command]._actions if a.dest == dest)


@pytest.mark.parametrize(("command", "dest", "text", "wrong"), [
    ("train", "train.quality", "JPEG quality of the frequency weights (86)", "86"),
    ("train", "train.freq_weight", "weight of the frequency-aware loss (default 2; 0: plain)", "2"),
    # The help before this test existed: t2i on --data starts from block 6, not 8.
    ("train", "train.repa_layer", "DiT block whose tokens REPA aligns (8; needs --repa-encoder)", "8"),
    ("train", "accumulation", "micro-batches (gradient accumulation; default 1, t2i on --data: 2)", "2"),
    ("train", "sample.solver", "solver of the final grid (t2i default: euler)", "euler"),
    ("train", "train.bf16", "bf16 autocast on CUDA (default off; ignored on the CPU)", "off"),
    ("train", "device", "default: cpu", "cpu"),
    ("train", "task", "c2i: class-to-image; t2i: text-to-image (default)", "t2i"),
    ("sample", "batch_size", "images per forward pass (255)", "255"),
    ("sample", "solver", "ODE solver (default: the run's) (text models: heun)", "heun"),
    ("spectrum", "times", "t values (0.25 0.5 0.8)", "0.25 0.5 0.8"),
    ("export-onnx", "batch", "'static' (default) or a fixed batch size", "static"),
    ("embed-text", "dtype", "storage dtype (default: float16, what the release feeds its model)", "float16"),
])
def test_a_planted_wrong_default_is_caught(command: str, dest: str, text: str, wrong: str) -> None:
    problems = mismatches(command, _action(command, dest), text)
    assert problems and all(f"prints {wrong!r}" in p for p in problems), problems


def test_an_unreadable_default_is_caught() -> None:
    text = "images per pass (by default two hundred)"
    problems = mismatches("sample", _action("sample", "batch_size"), text)
    assert problems and "no value is read" in problems[0]


def test_the_reader_reads_each_form() -> None:
    assert printed_defaults("REPA weight (0.5; needs --repa-encoder)") == [("", "0.5")]
    assert printed_defaults("x (default 1, t2i on --data: 3)") == [("", "1"), ("t2i on --data", "3")]
    assert printed_defaults("t values (0.25 0.5 0.75)") == [("", "0.25 0.5 0.75")]
    assert printed_defaults("default: auto") == [("", "auto")]
    assert printed_defaults("image folder (default: built-in digits)") == [("", "built-in digits")]


# ----------------------------------------------------------------------------- against the spec
def test_release_sampling_is_the_specs() -> None:
    """RELEASE_SAMPLING against the sentences of spec/04 §5 (DeCo-XL at 256 px) and spec/06 §6
    (the text model's fine-tuning config and demo)."""
    s04 = " ".join((SPEC / "04-sampling.md").read_text().split())
    m = re.search(r"DeCo-XL 256 px (\d+) Euler steps, g = ([\d.]+), interval \(([\d.]+), ([\d.]+)\)", s04)
    assert m is not None and "time shift 1 throughout" in s04
    assert RELEASE_SAMPLING["c2i"] == {"steps": int(m.group(1)), "guidance": float(m.group(2)),
                                       "interval": (float(m.group(3)), float(m.group(4))),
                                       "timeshift": 1.0, "solver": "euler"}
    s06 = " ".join((SPEC / "06-text-to-image.md").read_text().split())
    m = re.search(r"sample with Adams \(04 §6\): (\d+) steps, guidance ([\d.]+), time shift ([\d.]+), "
                  r"order 2, interval \(([\d.]+), ([\d.]+)\)", s06)
    assert m is not None
    assert RELEASE_SAMPLING["t2i"] == {"steps": int(m.group(1)), "guidance": float(m.group(2)),
                                       "interval": (float(m.group(4)), float(m.group(5))),
                                       "timeshift": float(m.group(3)), "solver": "adams"}
    assert SampleSettings.release("c2i") == FOLDER_DEFAULTS["sample"]
    assert SampleSettings.release("t2i") == T2I_DEFAULTS["sample"]


def test_train_config_is_importable_from_both_paths() -> None:
    from deco.optimized import TrainConfig as A
    from deco.optimized.train_config import TrainConfig as B

    assert A is B is TrainConfig
