"""Conformance with the public release: the float64 reference reproduces every output in A.npz.

The weights go through the real `deco convert` CLI (release .ckpt -> safetensors) and
`deco.reference.load_model`, i.e. the path a user takes. The release computed in float32, so the
tolerance is 1e-5 relative to the largest magnitude of each expected array.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import FIXTURE_RTOL, fixtures_folder, rel_err

from deco import cli
from deco import reference as R
from deco.conformance import fixtures as F
from deco.reference.sampling import euler, time_grid

#: Inputs stored in A.npz; every other key is an output of the release the reference must reproduce.
INPUT_KEYS = {"config", "forward_x", "forward_t", "forward_y", "sample_noise", "sample_cond"}
#: Inputs of T.npz (text-to-image); its outputs are checked as `T.<key>`.
T_INPUT_KEYS = {"config", "forward_x", "forward_t", "forward_text", "sample_noise", "sample_text",
                "sample_null_text"}


def _output_keys() -> list[str]:
    """Output keys of A.npz and, prefixed `T.`, of T.npz, read at collection time (a placeholder
    when the fixtures are absent: the test then skips or, under CI, fails through `fixtures_dir`)."""
    npz = fixtures_folder() / "A.npz"
    if not npz.is_file():
        return ["fixtures-missing"]
    with np.load(npz) as a:
        keys = sorted(k for k in a.files if k not in INPUT_KEYS and not k.endswith(("_pred", "_target")))
    if (fixtures_folder() / "T.npz").is_file():
        with np.load(fixtures_folder() / "T.npz") as t:
            keys += sorted("T." + k for k in t.files if k not in T_INPUT_KEYS)
    return keys


@pytest.fixture(scope="module")
def npz(fixtures_dir: Path) -> Any:
    return np.load(fixtures_dir / "A.npz")


@pytest.fixture(scope="module")
def settings_(npz: Any) -> dict[str, Any]:
    return json.loads(bytes(npz["config"]))


@pytest.fixture(scope="module")
def models(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, R.Model]:
    out = tmp_path_factory.mktemp("fixture-models")
    files = {
        "deco": (fixtures_dir / "A.ckpt", []),
        "baseline": (fixtures_dir / "A-baseline.ckpt", []),
        "deco-online": (fixtures_dir / "A.ckpt", ["--weights", "online"]),
    }
    loaded = {}
    for name, (ckpt, extra) in files.items():
        path = out / f"{name}.safetensors"
        assert cli.main(["convert", str(ckpt), str(path), *extra]) == 0
        loaded[name] = R.load_model(path)
    return loaded


def _close(got: Any, expected: Any) -> None:
    err = rel_err(got, expected)
    assert err <= FIXTURE_RTOL, f"relative error {err:.3e} > {FIXTURE_RTOL:.0e}"


# ------------------------------------------------------------------------------------- model
def test_forward(models: dict[str, R.Model], npz: Any) -> None:
    x, t, y = npz["forward_x"], npz["forward_t"], npz["forward_y"]
    assert y[-1] == models["deco"].config.num_classes  # the batch includes the null class
    _close(models["deco"].forward(x, t, y), npz["forward_out"])


def test_forward_semantic(models: dict[str, R.Model], npz: Any) -> None:
    x, t, y = npz["forward_x"], npz["forward_t"], npz["forward_y"]
    _close(models["deco"].semantic(x, t, y), npz["forward_dit_out"])


def test_baseline_forward(models: dict[str, R.Model], npz: Any) -> None:
    x, t, y = npz["forward_x"], npz["forward_t"], npz["forward_y"]
    assert models["baseline"].config.architecture == "baseline"
    _close(models["baseline"].forward(x, t, y), npz["baseline_forward_out"])


def test_online_weights_do_not_reproduce_the_ema_output(models: dict[str, R.Model], npz: Any) -> None:
    x, t, y = npz["forward_x"], npz["forward_t"], npz["forward_y"]
    online = models["deco-online"].forward(x, t, y)
    assert rel_err(online, npz["forward_out"]) > 100 * FIXTURE_RTOL
    assert rel_err(models["deco"].forward(x, t, y), online) > 100 * FIXTURE_RTOL


def test_model_config_matches_the_fixture(models: dict[str, R.Model], settings_: dict[str, Any]) -> None:
    m, cfg = settings_["model"], models["deco"].config
    assert (cfg.patch_size, cfg.hidden_size, cfg.num_heads, cfg.num_classes) == (
        m["patch_size"], m["hidden_size"], m["num_groups"], m["num_classes"])
    assert (cfg.depth, cfg.decoder_depth, cfg.decoder_width) == (
        m["num_cond_blocks"], m["num_blocks"] - m["num_cond_blocks"], m["hidden_size_x"])


# --------------------------------------------------------------------------------- frequency
def test_dct_matrix(npz: Any) -> None:
    _close(R.dct_matrix(8), npz["dct_matrix"])


def test_frequency_weights(npz: Any, settings_: dict[str, Any]) -> None:
    assert settings_["qualities"]
    for q in settings_["qualities"]:
        _close(R.frequency_weights(q), npz[f"freq_weight_q{q}"])


@pytest.mark.parametrize("j", [0, 1])
def test_losses(npz: Any, settings_: dict[str, Any], j: int) -> None:
    pred, target = npz[f"loss{j}_pred"], npz[f"loss{j}_target"]
    assert list(pred.shape) == settings_["loss_shapes"][j]
    ycc = R.rgb_to_ycbcr(pred)
    _close(ycc, npz[f"loss{j}_ycbcr"])
    _close(R.block_dct(ycc), npz[f"loss{j}_dct"])
    _close(R.flow_matching_loss(pred, target), npz[f"loss{j}_fm"])
    for q in settings_["qualities"]:
        _close(R.frequency_aware_loss(pred, target, quality=q), npz[f"loss{j}_freq_q{q}"])


def test_loss1_needs_reflect_padding(npz: Any) -> None:
    h, w = npz["loss1_pred"].shape[2:]
    assert h % 8 or w % 8  # the fixture exercises the padded path


# ---------------------------------------------------------------------------------- sampling
def _sampler_kwargs(s: dict[str, Any], solver: str) -> dict[str, Any]:
    return {
        "steps": s["num_steps"], "guidance": s["guidance"], "timeshift": s["timeshift"],
        "interval": (s["guidance_interval_min"], s["guidance_interval_max"]), "solver": solver,
        "exact_heun": bool(s.get("exact_henu", False)),
    }


def test_euler(models: dict[str, R.Model], npz: Any, settings_: dict[str, Any]) -> None:
    s = settings_["euler"]
    noise, labels = npz["sample_noise"], npz["sample_cond"]
    grid = time_grid(s["num_steps"], s["timeshift"])
    _close(grid, npz["euler_timesteps"])
    _close(R.sample(models["deco"], noise, labels, **_sampler_kwargs(s, "euler")), npz["euler_out"])
    traj: list[np.ndarray] = []
    euler(models["deco"], noise.astype(np.float64), labels, grid, s["guidance"],
          (s["guidance_interval_min"], s["guidance_interval_max"]), traj)
    _close(np.stack(traj), npz["euler_traj"])


def test_heun(models: dict[str, R.Model], npz: Any, settings_: dict[str, Any]) -> None:
    s = settings_["heun"]
    assert not s.get("exact_henu", False)  # the release's default, reusing variant
    _close(time_grid(s["num_steps"], s["timeshift"]), npz["heun_timesteps"])
    out = R.sample(models["deco"], npz["sample_noise"], npz["sample_cond"], **_sampler_kwargs(s, "heun"))
    _close(out, npz["heun_out"])
    exact = R.sample(models["deco"], npz["sample_noise"], npz["sample_cond"],
                     **dict(_sampler_kwargs(s, "heun"), exact_heun=True))
    # the exact variant differs measurably (about 2e-4 here): the fixture tells the variants apart
    assert rel_err(exact, npz["heun_out"]) > 10 * FIXTURE_RTOL


# ---------------------------------------------------------------- deco.conformance.fixtures and the CLI
@pytest.fixture(scope="module")
def checks(fixtures_dir: Path) -> dict[str, F.Check]:
    result = F.reference_checks(fixtures_dir)
    names = [c.name for c in result]
    assert len(names) == len(set(names))
    return {c.name: c for c in result}


@pytest.mark.parametrize("name", _output_keys())
def test_reference_check_passes(checks: dict[str, F.Check], name: str) -> None:
    # every output of A.npz has a check in deco.conformance.fixtures, and it passes
    assert name in checks, f"deco.conformance.fixtures.reference_checks() has no check for {name}"
    c = checks[name]
    assert c.passed, f"{name}: max rel err {c.max_rel:.3e} > {c.tolerance:.0e}"
    assert c.tolerance == FIXTURE_RTOL


def test_checks_cover_only_fixture_outputs(checks: dict[str, F.Check]) -> None:
    assert set(checks) == set(_output_keys())


def test_compare_fails_when_it_should() -> None:
    expected = np.array([1.0, -2.0, 4.0])
    assert F.compare("ok", expected * (1 + 1e-7), expected).passed
    assert not F.compare("off", expected + 4e-4, expected).passed  # 1e-4 relative to max |4|
    assert not F.compare("shape", expected[:2], expected).passed
    assert not F.compare("nan", np.array([np.nan, 0, 0]), expected).passed


def test_cli_check_fixtures(fixtures_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["check-fixtures", "--fixtures", str(fixtures_dir)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["output", "max"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert set(rows) == set(_output_keys())
    assert all(row[-1] == "pass" for row in rows.values())
    n = len(rows)
    assert lines[-1] == f"{n}/{n} release outputs reproduced"


def test_cli_check_fixtures_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["check-fixtures", "--fixtures", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
