"""deco.diffusers: the diffusers transformer, pipelines and schedulers.

Oracles: `deco.optimized.sample` with the same noise (float32, 1e-5 of the output's size), the
release's own samples in the fixtures (A.npz, T.npz), closed-form ODE solutions for the
schedulers, the spec's guidance-interval rules written out by hand, and bit-for-bit equality for
save/load round trips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import FIXTURE_RTOL, rel_err, require_module, tiny_text_encoder

require_module("diffusers")
transformers = require_module("transformers")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from deco import optimized  # noqa: E402
from deco.cli import main as cli_main  # noqa: E402
from deco.diffusers import (  # noqa: E402
    DeCoAdamsScheduler,
    DeCoHeunScheduler,
    DeCoPipeline,
    DeCoTextPipeline,
    DeCoTransformer2DModel,
    imagenet_id2label,
    write_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: (id, scheduler factory, the deco.optimized.sample options it must reproduce)
SOLVERS = [
    ("euler", FlowMatchEulerDiscreteScheduler, {"solver": "euler"}),
    ("heun", DeCoHeunScheduler, {"solver": "heun"}),
    ("heun-exact", lambda: DeCoHeunScheduler(exact=True), {"solver": "heun", "exact_heun": True}),
    ("adams", DeCoAdamsScheduler, {"solver": "adams"}),
    ("adams-3", lambda: DeCoAdamsScheduler(order=3), {"solver": "adams", "order": 3}),
]
#: Bounds on grid points of a 10-step grid (i / 10): the interval rules' edge cases matter.
SETTINGS = {"steps": 10, "guidance": 2.5, "interval": (0.2, 0.7), "timeshift": 1.0}


def rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return rel_err(got.detach().numpy(), expected.detach().numpy())


def public(config: Any) -> dict[str, Any]:
    """A diffusers config without its bookkeeping entries (_name_or_path, ...)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def quiet(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe: Any, cond: Any, settings: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    """The pipeline's raw output ("latent": the sampler's result, unclamped)."""
    key = "prompt_embeds" if isinstance(pipe, DeCoTextPipeline) else "class_labels"
    out: torch.Tensor = pipe(**{key: cond}, guidance_scale=settings["guidance"],
                             guidance_interval=settings["interval"],
                             num_inference_steps=settings["steps"], timeshift=settings["timeshift"],
                             output_type="latent", **kwargs).images
    return out


@pytest.fixture(scope="module")
def class_model(fixtures_dir: Path) -> optimized.DeCo:
    """A.ckpt's DeCo with its label table scaled by 20: the fixture's random labels barely move
    the output (guidance changes a sample by ~1e-4), too little to tell the interval rules apart
    at 1e-5; here guiding one step more or less changes it by ~5e-4."""
    model = optimized.load_model(fixtures_dir / "A.ckpt")
    assert isinstance(model, optimized.DeCo)
    with torch.no_grad():
        model.y_embed.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def npz(fixtures_dir: Path) -> Any:
    return np.load(fixtures_dir / "A.npz")


@pytest.fixture(scope="module")
def class_pipe(class_model: optimized.DeCo) -> DeCoPipeline:
    return quiet(DeCoPipeline(DeCoTransformer2DModel.from_deco(class_model, sample_size=16),
                              FlowMatchEulerDiscreteScheduler()))


# ------------------------------------------------------------------------ schedulers alone
def drive(scheduler: Any, velocity: Any, x: torch.Tensor, steps: int, timeshift: float) -> torch.Tensor:
    """Run a scheduler on dx/dt = velocity(x, t) as a pipeline does (model_output = -v)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        grid = optimized.time_grid(steps, timeshift)
        scheduler.set_timesteps(sigmas=[1.0 - t for t in grid[:-1]])
        times = grid[:-1]
    else:
        scheduler.set_timesteps(steps, timeshift=timeshift)
        times = scheduler.model_times
    for timestep, t in zip(scheduler.timesteps, times, strict=True):
        x = scheduler.step(-velocity(x, t), timestep, x).prev_sample
    return x


@pytest.mark.parametrize(("make", "steps"), [(f, n) for _, f, _ in SOLVERS for n in (1, 2, 5)])
def test_schedulers_integrate_constant_velocity_exactly(make: Any, steps: int) -> None:
    """dx/dt = c: every solver lands on x0 + c at t = 1 (the steps sum to 1); a sign error in
    the model_output convention would give x0 - c."""
    x0, c = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = drive(make(), lambda x, t: c, x0, steps, timeshift=2.0)
    assert rel(out, x0 + c) < 1e-6


@pytest.mark.parametrize("exact", [False, True])
def test_heun_is_exact_for_a_velocity_linear_in_time(exact: bool) -> None:
    """dx/dt = a + b t: the trapezoidal corrector is exact per step, the plain Euler last step
    misses b dt^2 / 2 (closed form: x0 + a + b / 2 - b dt_last^2 / 2)."""
    x0, a, b = torch.randn(3, 3, 4, 4).double().unbind(0)
    steps = 4
    out = drive(DeCoHeunScheduler(exact=exact), lambda x, t: a + b * t, x0, steps, timeshift=1.0)
    dt = 1.0 / steps
    assert rel(out, x0 + a + b / 2 - b * dt**2 / 2) < 1e-12


def test_adams_weights_match_the_release_fixture(fixtures_dir: Path) -> None:
    """The release's AdamLMSampler coefficients (T.npz adam_coeffs, row i zero-padded)."""
    t = np.load(fixtures_dir / "T.npz")
    config = json.loads(bytes(t["config"]))["adam"]
    scheduler = DeCoAdamsScheduler(order=int(config.get("order", 2)))
    scheduler.set_timesteps(int(config["num_steps"]), timeshift=float(config["timeshift"]))
    expected = t["adam_coeffs"]
    for i, row in enumerate(scheduler.weights):
        np.testing.assert_allclose(row, expected[i, : len(row)], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scheduler.model_times, t["adam_timesteps"][:-1], atol=1e-6)


def test_guidance_plans_follow_the_spec_interval_rules() -> None:
    """Which evaluations are guided for the grid 0, .2, .4, .6, .8 and interval (0.2, 0.6),
    written out from spec/04: Euler low < t_i <= high; Heun both evaluations of step i by t_i
    (reused predictor = previous corrector); Adams low < t < high, strict."""
    g, interval = 3.0, (0.2, 0.6)
    heun = DeCoHeunScheduler()
    heun.set_timesteps(5)  # grid 0 .. 1; evaluations at 0, then correctors at .2, .4, .6, .8
    # decided at step starts 0, 0, .2, .4, .6: 0.2 < 0.2 is false, 0.6 <= 0.6 is true
    assert [heun.guidance_scale(i, g, interval) for i in range(5)] == [1, 1, 1, g, g]
    exact = DeCoHeunScheduler(exact=True)
    exact.set_timesteps(5)  # (0, .2) (.2, .4) (.4, .6) (.6, .8) (.8): pairs share step i's scale
    assert [exact.guidance_scale(i, g, interval) for i in range(9)] == [1, 1, 1, 1, g, g, g, g, 1]
    adams = DeCoAdamsScheduler()
    adams.set_timesteps(5)
    # times 0, .2, .4, .6, .8 (the running sum is exact here): strict at both bounds
    assert [adams.guidance_scale(i, g, interval) for i in range(5)] == [1, 1, g, 1, 1]


def test_scheduler_save_load_round_trip(tmp_path: Path) -> None:
    for scheduler in (DeCoHeunScheduler(exact=True), DeCoAdamsScheduler(order=3)):
        scheduler.save_pretrained(tmp_path / type(scheduler).__name__)
        loaded = type(scheduler).from_pretrained(tmp_path / type(scheduler).__name__)
        assert public(loaded.config) == public(scheduler.config)
        scheduler.set_timesteps(7, timeshift=2.0)
        loaded.set_timesteps(7, timeshift=2.0)
        assert loaded.model_times == scheduler.model_times
        assert torch.equal(loaded.timesteps, scheduler.timesteps)


def test_scheduler_errors() -> None:
    with pytest.raises(ValueError, match=r"^order: "):
        DeCoAdamsScheduler(order=0)
    scheduler = DeCoHeunScheduler()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(torch.zeros(1), 0.0, torch.zeros(1))
    scheduler.set_timesteps(1)
    scheduler.step(torch.zeros(1), scheduler.timesteps[0], torch.zeros(1))
    with pytest.raises(RuntimeError, match="evaluations of the plan are done"):
        scheduler.step(torch.zeros(1), scheduler.timesteps[0], torch.zeros(1))


# --------------------------------------------------------------------- class-to-image
@pytest.mark.parametrize(("make", "options"), [pytest.param(f, o, id=i) for i, f, o in SOLVERS])
def test_class_pipeline_equals_optimized_sample(class_model: optimized.DeCo, class_pipe: DeCoPipeline,
                                                make: Any, options: dict[str, Any]) -> None:
    noise, labels = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    class_pipe.scheduler = make()
    got = run(class_pipe, labels, SETTINGS, latents=noise)
    expected = optimized.sample(class_model, noise, labels, steps=SETTINGS["steps"],
                                guidance=SETTINGS["guidance"], interval=SETTINGS["interval"],
                                timeshift=SETTINGS["timeshift"], **options)
    assert isinstance(expected, torch.Tensor)
    assert rel(got, expected) < 1e-5
    # The interval's bounds are grid times: guiding one step more or less is visible at 1e-5.
    later = optimized.sample(class_model, noise, labels, steps=SETTINGS["steps"],
                             guidance=SETTINGS["guidance"], interval=(0.3, 0.7), **options)
    assert rel(later, expected) > 1e-4


def test_class_pipeline_non_square(class_model: optimized.DeCo, class_pipe: DeCoPipeline) -> None:
    """A non-square image (8 x 20, patch 4), its noise drawn from the generator."""
    class_pipe.scheduler = DeCoAdamsScheduler()
    got = run(class_pipe, [4], SETTINGS, height=8, width=20,
              generator=torch.Generator().manual_seed(3))
    noise = torch.randn(1, 3, 8, 20, generator=torch.Generator().manual_seed(3))
    expected = optimized.sample(class_model, noise, torch.tensor([4]), steps=SETTINGS["steps"],
                                guidance=SETTINGS["guidance"], interval=SETTINGS["interval"],
                                solver="adams")
    assert isinstance(expected, torch.Tensor) and got.shape == (1, 3, 8, 20)
    assert rel(got, expected) < 1e-5


def test_class_pipeline_reproduces_release_samples(tmp_path: Path, fixtures_dir: Path, npz: Any) -> None:
    """`deco convert A.ckpt DIR --to diffusers`, loaded back, reproduces the release's Euler and
    Heun samples (A.npz euler_out, heun_out) from the same noise."""
    out = tmp_path / "A"
    assert cli_main(["convert", str(fixtures_dir / "A.ckpt"), str(out), "--to", "diffusers",
                     "--sample-size", "16"]) == 0
    pipe = quiet(DeCoPipeline.from_pretrained(out))
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    config = json.loads(bytes(npz["config"]))
    noise, labels = torch.from_numpy(npz["sample_noise"]).float(), npz["sample_cond"].tolist()
    for key, scheduler in (("euler", pipe.scheduler), ("heun", DeCoHeunScheduler())):
        c = config[key]
        pipe.scheduler = scheduler
        got = pipe(labels, guidance_scale=c["guidance"], num_inference_steps=c["num_steps"],
                   guidance_interval=(c["guidance_interval_min"], c["guidance_interval_max"]),
                   timeshift=c["timeshift"], latents=noise, output_type="latent").images
        assert rel_err(got.numpy(), npz[f"{key}_out"]) < FIXTURE_RTOL, key


def test_null_class_comes_from_the_config(class_model: optimized.DeCo, class_pipe: DeCoPipeline) -> None:
    """Guidance 0 is the unconditional sample: the labels of the null class num_classes (10 here,
    not ImageNet's 1000); that label is accepted, one above it is refused."""
    class_pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    noise = torch.randn(2, 3, 16, 16)
    settings = {**SETTINGS, "guidance": 0.0, "interval": (0.0, 1.0)}
    got = run(class_pipe, [1, 2], settings, latents=noise)
    grid = optimized.time_grid(settings["steps"])
    # t = 0 is never guided: the first step uses labels 1, 2; every later one the null class.
    x = noise + (grid[1] - grid[0]) * class_model(noise, torch.zeros(2), torch.tensor([1, 2]))
    expected = x
    for i in range(1, settings["steps"]):
        v = class_model(expected, torch.full((2,), grid[i]), torch.tensor([10, 10]))
        expected = expected + (grid[i + 1] - grid[i]) * v
    assert rel(got, expected) < 1e-5
    assert class_pipe.null_class == 10
    run(class_pipe, [10], SETTINGS, latents=noise[:1])  # an unconditional sample
    with pytest.raises(ValueError, match=r"^class_labels: ids must lie in 0\.\.10"):
        run(class_pipe, [11], SETTINGS, latents=noise[:1])


def test_label_names(class_model: optimized.DeCo) -> None:
    """ImageNet names -> ids (the converter's default id2label for 1000 classes) and names from
    a model's own id2label."""
    names = imagenet_id2label()
    assert len(names) == 1000 and names["0"] == "tench" and names["1"] == "goldfish"
    assert names["207"] == "golden retriever" and names["999"] == "toilet tissue"
    digits = {str(i): f"digit {i}" for i in range(10)}
    pipe = DeCoPipeline(DeCoTransformer2DModel.from_deco(class_model, id2label=digits, sample_size=16),
                        FlowMatchEulerDiscreteScheduler())
    assert pipe.get_label_ids(["digit 3", "digit 0"]) == [3, 0]
    assert pipe.class_ids(["digit 7", 2], torch.device("cpu")).tolist() == [7, 2]
    with pytest.raises(ValueError, match=r"^label: 'tench' is not a class name"):
        pipe.get_label_ids("tench")
    with pytest.raises(ValueError, match=r"^id2label: expected the ids 0\.\.9"):
        DeCoTransformer2DModel(**class_model.config.to_dict(), id2label=names)


def test_convert_names_imagenet_classes(tmp_path: Path) -> None:
    """A 1000-class checkpoint's pipeline carries the ImageNet names; its null class is 1000."""
    from deco.config import DeCoConfig

    model = optimized.build_model(DeCoConfig.preset("DeCo-tiny/4", num_classes=1000))
    model.save(tmp_path / "m.safetensors")
    pipe = write_pipeline(tmp_path / "m.safetensors", tmp_path / "p", sample_size=16)
    loaded = DeCoPipeline.from_pretrained(tmp_path / "p")
    for p in (pipe, loaded):
        assert p.get_label_ids(["tench", "golden retriever", "toilet tissue"]) == [0, 207, 999]
        assert p.null_class == 1000


def test_output_types_and_generator(class_pipe: DeCoPipeline) -> None:
    """"np" / "pt" are the raw sample mapped from [-1, 1] to [0, 1] (clamped), "pil" its 8-bit
    images; without latents the noise is torch.randn from the generator."""
    class_pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    settings = {**SETTINGS, "steps": 2}
    raw = run(class_pipe, [1, 2], settings, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(raw, run(class_pipe, [1, 2], settings, latents=noise))
    expected = (raw / 2 + 0.5).clamp(0, 1)
    common = {"guidance_scale": 2.5, "num_inference_steps": 2, "latents": noise}
    pt = class_pipe([1, 2], output_type="pt", **common).images
    assert torch.allclose(pt, expected, atol=1e-7)
    arr = class_pipe([1, 2], output_type="np", **common).images
    assert arr.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(arr, expected.permute(0, 2, 3, 1).numpy(), atol=1e-7)
    images = class_pipe([1, 2], output_type="pil", **common).images
    assert [im.size for im in images] == [(16, 16), (16, 16)]
    assert np.abs(np.asarray(images[1], dtype=np.float64) - arr[1] * 255).max() <= 1.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_inference_steps": 0}, r"^num_inference_steps: "),
    ({"guidance_scale": float("nan")}, r"^guidance_scale: "),
    ({"guidance_interval": (0.5, 0.2)}, r"^guidance_interval: "),
    ({"guidance_interval": 0.5}, r"^guidance_interval: "),
    ({"timeshift": 0.0}, r"^timeshift: "),
    ({"output_type": "jpg"}, r"^output_type: "),
    ({"height": 15}, r"^height: "),
    ({"latents": torch.zeros(1, 3, 16, 16)}, r"^latents: "),
])
def test_pipeline_bad_arguments(class_pipe: DeCoPipeline, kwargs: dict[str, Any], message: str) -> None:
    class_pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises((ValueError, TypeError), match=message):
        class_pipe([1, 2], num_inference_steps=kwargs.pop("num_inference_steps", 1), **kwargs)


def test_pipeline_refuses_a_shifted_euler_scheduler(class_pipe: DeCoPipeline) -> None:
    class_pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with pytest.raises(ValueError, match=r"^scheduler: .*shift"):
        class_pipe([1], num_inference_steps=1)
    class_pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(TypeError, match=r"^class_labels: "):
        class_pipe([1.5], num_inference_steps=1)


def test_transformer_round_trip_is_exact(class_model: optimized.DeCo, tmp_path: Path) -> None:
    transformer = DeCoTransformer2DModel.from_deco(class_model, sample_size=16)
    transformer.save_pretrained(tmp_path / "t")
    loaded = DeCoTransformer2DModel.from_pretrained(tmp_path / "t")
    assert public(loaded.config) == public(transformer.config)
    a, b = transformer.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k.removeprefix("model.") for k in a} == set(class_model.state_dict())
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 10])
    assert torch.equal(loaded(x, t, class_labels=y).sample, class_model(x, t, y))


def test_pipeline_round_trip_and_fresh_process(class_pipe: DeCoPipeline, tmp_path: Path) -> None:
    """save_pretrained -> from_pretrained gives the same samples bit for bit, in this process
    (DeCoPipeline) and in a new one through diffusers' generic DiffusionPipeline."""
    class_pipe.scheduler = DeCoHeunScheduler()
    noise = torch.randn(2, 3, 16, 16)
    np.save(tmp_path / "noise.npy", noise.numpy())
    expected = run(class_pipe, [3, 4], SETTINGS, latents=noise)
    class_pipe.save_pretrained(tmp_path / "pipe")
    loaded = quiet(DeCoPipeline.from_pretrained(tmp_path / "pipe"))
    assert torch.equal(run(loaded, [3, 4], SETTINGS, latents=noise), expected)
    script = f"""
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "pipe")!r}, trust_remote_code=True)
print(type(pipe).__module__, type(pipe).__name__, type(pipe.scheduler).__name__)
noise = torch.from_numpy(np.load({str(tmp_path / "noise.npy")!r}))
out = pipe([3, 4], guidance_scale={SETTINGS["guidance"]}, guidance_interval={SETTINGS["interval"]},
           num_inference_steps={SETTINGS["steps"]}, latents=noise, output_type="latent").images
np.save({str(tmp_path / "out.npy")!r}, out.numpy())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=offline_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert "deco.diffusers.pipelines DeCoPipeline DeCoHeunScheduler" in done.stdout
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected.numpy())


def offline_env() -> dict[str, str]:
    """The environment of a fresh process: no network, one thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_convert_cli_errors(tmp_path: Path, fixtures_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").mkdir()
    assert cli_main(["convert", str(fixtures_dir / "A.ckpt"), str(tmp_path / "taken"),
                     "--to", "diffusers"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert cli_main(["convert", str(fixtures_dir / "T.ckpt"), str(tmp_path / "t"),
                     "--to", "diffusers"]) == 2
    assert "--text-encoder" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    with pytest.raises(FileExistsError, match=r"^output: "):
        write_pipeline(fixtures_dir / "A.ckpt", tmp_path / "taken")


# ---------------------------------------------------------------------- text-to-image
CORPUS = ["a photo of a cat", "a painting of a red fox in the snow", "an astronaut riding a horse",
          "a bowl of fruit on a wooden table", "the city at night, long exposure"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 (hidden 32, narrower than T.ckpt's text width 48, so the states are
    zero-padded) and a BPE tokenizer trained here with `tokenizers`, saved as one folder."""
    return tiny_text_encoder(tmp_path_factory.mktemp("qwen3"), CORPUS)


def reference_encoding(folder: Path, prompts: list[str], length: int, width: int) -> torch.Tensor:
    """The release's text condition built by hand: each prompt's token ids, truncated to
    `length` and right-padded with the pad id (mask 0 there), through the encoder; every
    position's last hidden state, zero-padded to `width`."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    encoder = transformers.Qwen3Model.from_pretrained(folder).eval()
    ids = [tokenizer(p)["input_ids"][:length] for p in prompts]
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (length - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in ids])
    with torch.no_grad():
        states = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return torch.cat([states, states.new_zeros(*states.shape[:2], width - states.shape[2])], dim=-1)


@pytest.fixture(scope="module")
def text_model(fixtures_dir: Path) -> Any:
    """T.ckpt's text model with its text values scaled by 300: with the fixture's weights the
    text moves the output by ~1e-5 of its size (spec/06 §9), here by ~4e-3."""
    model = optimized.load_model(fixtures_dir / "T.ckpt")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.kv_text.weight.mul_(300.0)
    return model


TEXT_SOLVERS = [s for s in SOLVERS if s[0] in ("euler", "heun", "adams")]


@pytest.mark.parametrize(("make", "options"), [pytest.param(f, o, id=i) for i, f, o in TEXT_SOLVERS])
def test_text_pipeline_equals_optimized_sample(text_model: Any, encoder_dir: Path, make: Any,
                                               options: dict[str, Any]) -> None:
    """Prompts through the tokenizer and encoder (one longer than the 8 text tokens), the
    negative prompt as the null text; the same noise through deco.optimized.sample."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_dir)
    encoder = transformers.AutoModel.from_pretrained(encoder_dir).eval()
    pipe = quiet(DeCoTextPipeline(tokenizer, encoder, DeCoTransformer2DModel.from_deco(
        text_model, sample_size=16), make()))
    prompts = ["a photo of a cat", "a painting of a red fox in the snow at night, long exposure"]
    cond = reference_encoding(encoder_dir, prompts, 8, 48)
    null = reference_encoding(encoder_dir, ["a bowl"], 8, 48)[0]
    assert torch.allclose(pipe.encode_prompt(prompts, do_classifier_free_guidance=False)[0], cond,
                          atol=1e-6)
    noise = torch.randn(2, 3, 16, 16)
    settings = {**SETTINGS, "timeshift": 3.0}
    got = pipe(prompts, negative_prompt="a bowl", guidance_scale=settings["guidance"],
               guidance_interval=settings["interval"], num_inference_steps=settings["steps"],
               timeshift=settings["timeshift"], latents=noise, output_type="latent").images
    expected = optimized.sample(text_model, noise, cond, null, steps=settings["steps"],
                                guidance=settings["guidance"], interval=settings["interval"],
                                timeshift=settings["timeshift"], **options)
    assert rel(got, expected) < 1e-5
    unguided = optimized.sample(text_model, noise, cond, steps=settings["steps"],
                                timeshift=settings["timeshift"], **options)
    assert rel(unguided, expected) > 1e-4  # the guidance (and the null text) is exercised


def test_text_pipeline_reproduces_release_samples(tmp_path: Path, fixtures_dir: Path,
                                                  encoder_dir: Path) -> None:
    """`deco convert T.ckpt DIR --to diffusers --text-encoder ENC`, loaded back (Adams of order 2,
    as the release's text config), reproduces T.npz's Euler and Adams samples from the release's
    text embeddings, and loads in a fresh process through DiffusionPipeline."""
    out = tmp_path / "T"
    assert cli_main(["convert", str(fixtures_dir / "T.ckpt"), str(out), "--to", "diffusers",
                     "--text-encoder", str(encoder_dir), "--sample-size", "16"]) == 0
    pipe = quiet(DeCoTextPipeline.from_pretrained(out))
    assert isinstance(pipe.scheduler, DeCoAdamsScheduler) and pipe.scheduler.config.order == 2
    t = np.load(fixtures_dir / "T.npz")
    config = json.loads(bytes(t["config"]))
    noise = torch.from_numpy(t["sample_noise"]).float()
    for key, scheduler in (("adam", pipe.scheduler), ("euler", FlowMatchEulerDiscreteScheduler())):
        c = config[key]
        pipe.scheduler = scheduler
        got = pipe(prompt_embeds=torch.from_numpy(t["sample_text"]).float(),
                   negative_prompt_embeds=torch.from_numpy(t["sample_null_text"]).float(),
                   guidance_scale=c["guidance"], num_inference_steps=c["num_steps"],
                   guidance_interval=(c["guidance_interval_min"], c["guidance_interval_max"]),
                   timeshift=c["timeshift"], latents=noise, output_type="latent").images
        assert rel_err(got.numpy(), t[f"{key}_out"]) < FIXTURE_RTOL, key

    pipe.scheduler = DeCoAdamsScheduler()
    expected = pipe("a photo of a cat", latents=noise[:1], num_inference_steps=3,
                    output_type="latent").images
    np.save(tmp_path / "noise.npy", noise[:1].numpy())
    script = f"""
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
print(type(pipe).__name__, type(pipe.text_encoder).__name__, type(pipe.scheduler).__name__)
noise = torch.from_numpy(np.load({str(tmp_path / "noise.npy")!r}))
out = pipe("a photo of a cat", latents=noise, num_inference_steps=3, output_type="latent").images
np.save({str(tmp_path / "out.npy")!r}, out.numpy())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=offline_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DeCoTextPipeline Qwen3Model DeCoAdamsScheduler" in done.stdout
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected.numpy())


def test_text_pipeline_bad_arguments(text_model: Any, encoder_dir: Path, class_pipe: DeCoPipeline) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_dir)
    encoder = transformers.AutoModel.from_pretrained(encoder_dir).eval()
    transformer = DeCoTransformer2DModel.from_deco(text_model, sample_size=16)
    pipe = quiet(DeCoTextPipeline(tokenizer, encoder, transformer, DeCoAdamsScheduler()))
    with pytest.raises(ValueError, match=r"^prompt: pass exactly one"):
        pipe(num_inference_steps=1)
    with pytest.raises(TypeError, match=r"^prompt: "):
        pipe([3], num_inference_steps=1)
    with pytest.raises(TypeError, match=r"^negative_prompt: "):
        pipe("a cat", negative_prompt=[], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"^prompt_embeds: expected shape \(B, 8, E\)"):
        pipe(prompt_embeds=torch.zeros(1, 7, 48), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"^negative_prompt_embeds: expected shape \(2, 8, E\)"):
        pipe(prompt_embeds=torch.zeros(2, 8, 48), negative_prompt_embeds=torch.zeros(3, 8, 48),
             num_inference_steps=1)
    with pytest.raises(TypeError, match=r"^class_labels: the text-to-image model"):
        transformer(torch.zeros(1, 3, 16, 16), 0.5, class_labels=torch.tensor([1]))
    with pytest.raises(TypeError, match=r"^encoder_hidden_states: the class-to-image model"):
        class_pipe.transformer(torch.zeros(1, 3, 16, 16), 0.5, encoder_hidden_states=torch.zeros(1, 8, 48))
    with pytest.raises(TypeError, match=r"^transformer: DeCoPipeline needs a class-to-image"):
        DeCoPipeline(transformer, DeCoAdamsScheduler())([1], num_inference_steps=1)
    with pytest.raises(TypeError, match=r"^transformer: DeCoTextPipeline needs a text-to-image"):
        DeCoTextPipeline(tokenizer, encoder, class_pipe.transformer, DeCoAdamsScheduler())(
            "a cat", num_inference_steps=1)


def test_convert_from_safetensors_with_labels(tmp_path: Path, fixtures_dir: Path) -> None:
    """A DeCo .safetensors file (from `deco convert`) converts to the same pipeline weights as
    the release .ckpt; --labels names the classes."""
    assert cli_main(["convert", str(fixtures_dir / "A.ckpt"), str(tmp_path / "A.safetensors")]) == 0
    names = [f"class {i}" for i in range(10)]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    assert cli_main(["convert", str(tmp_path / "A.safetensors"), str(tmp_path / "p"), "--to",
                     "diffusers", "--labels", str(tmp_path / "labels.txt"), "--sample-size", "16"]) == 0
    pipe = DeCoPipeline.from_pretrained(tmp_path / "p")
    reference = optimized.load_model(fixtures_dir / "A.ckpt").state_dict()
    state = pipe.transformer.state_dict()
    assert state.keys() == {f"model.{k}" for k in reference}
    assert all(torch.equal(state[f"model.{k}"], v) for k, v in reference.items())
    assert pipe.get_label_ids(["class 9", "class 0"]) == [9, 0]
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_deco", "DeCoPipeline"]
    assert index["transformer"] == ["deco.diffusers.transformer", "DeCoTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert cli_main(["convert", str(tmp_path / "A.safetensors"), str(tmp_path / "p64"), "--to",
                     "diffusers", "--dtype", "float64"]) == 0
    from safetensors.torch import load_file

    (stored,) = (tmp_path / "p64" / "transformer").glob("*.safetensors")
    state64 = load_file(stored)  # diffusers loads it as float32 unless given torch_dtype
    assert state64.keys() == state.keys()
    assert all(v.dtype == torch.float64 and torch.equal(v, state[k].double()) for k, v in state64.items())
