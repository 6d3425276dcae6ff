"""LoRA (deco.lora, issue 27): peft's layers on deco.optimized models against the closed form
W + (alpha / r) B A, the adapter file read by diffusers' own loader (and diffusers' file read by
ours) with the same images, fusing, the trainer (only the adapter trains, EMA of the adapter),
`deco train --lora` / `deco sample --lora` / `deco convert --lora` and the fused model's ONNX
export in onnxruntime, an exact --resume; the class embedding's adapter (`y_embed`) too. Tiny
models: the release fixtures' A.ckpt (class) and T.ckpt (text)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import require_module
from safetensors import safe_open
from safetensors.torch import save_file

peft = require_module("peft")

from deco import lora, optimized  # noqa: E402
from deco.cli import main as cli_main  # noqa: E402
from deco.optimized.trainer import TrainConfig, Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def randomized(model: Any, seed: int, dtype: torch.dtype = torch.float32) -> Any:
    """The model in `dtype` with every weight redrawn (the fixtures' zero-initialised outputs too)."""
    model = copy.deepcopy(model).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.2)
    return model


def with_random_adapter(model: Any, rank: int, alpha: float, seed: int, targets: Any = None) -> Any:
    """`model` (copied) with LoRA layers whose A and B are both random (B = 0 changes nothing)."""
    model = copy.deepcopy(model)
    lora.add_lora(model, rank, lora.resolve_targets(model, targets), alpha=alpha)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model


def inputs(model: Any, batch: int = 2, size: int = 32) -> tuple[torch.Tensor, ...]:
    cfg, dtype = model.config, next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=gen, dtype=dtype)
    t = torch.rand(batch, generator=gen, dtype=dtype)
    cond = (torch.randn(batch, cfg.text_length, cfg.text_dim, generator=gen, dtype=dtype) if cfg.is_text
            else torch.arange(batch) % cfg.num_classes)
    return x, t, cond


@pytest.fixture(scope="module")
def models(fixtures_dir: Path) -> dict[str, Any]:
    return {"class": optimized.load_model(fixtures_dir / "A.ckpt"),
            "text": optimized.load_model(fixtures_dir / "T.ckpt")}


# ------------------------------------------------------------------------------- the layers
@pytest.mark.parametrize("kind", ["class", "text"])
def test_peft_layers_equal_the_closed_form_and_merge_to_it(models: dict[str, Any], kind: str) -> None:
    """float64: the model with LoRA equals the plain model whose targeted weights are
    W + (alpha / r) B A, built by hand; merge_adapter gives that model with its plain names."""
    base = randomized(models[kind], seed=0, dtype=torch.float64)
    adapted = with_random_adapter(base, rank=3, alpha=6.0, seed=2)
    targets = lora.resolve_targets(base)
    assert targets and all(n.split(".")[-1] in lora.DEFAULT_TARGETS[kind] for n in targets)
    by_hand = copy.deepcopy(base)
    params = dict(adapted.named_parameters())
    with torch.no_grad():
        for name in targets:
            a, b = params[f"{name}.lora_A.default.weight"], params[f"{name}.lora_B.default.weight"]
            by_hand.get_submodule(name).weight += (6.0 / 3) * b @ a
    x = inputs(base)
    expected, plain = by_hand(*x), base(*x)
    got = adapted(*x)
    assert (expected - plain).abs().max() > 1e-2 * plain.abs().max()  # the adapter matters
    assert torch.allclose(got, expected, rtol=0, atol=1e-10 * expected.abs().max().item())
    merged = lora.merge_adapter(adapted)
    assert set(merged.state_dict()) == set(base.state_dict()) and not lora.has_lora(merged)
    assert torch.allclose(merged(*x), expected, rtol=0, atol=1e-10 * expected.abs().max().item())


def test_class_embedding_lora_equals_the_closed_form(models: dict[str, Any]) -> None:
    """float64: a LoRA on `y_embed` (peft's embedding LoRA) equals the plain model whose
    embedding table is E + (alpha / r) (B A)^T (row i gains B A[:, i]), built by hand; merged too."""
    base = randomized(models["class"], seed=0, dtype=torch.float64)
    adapted = with_random_adapter(base, rank=3, alpha=6.0, seed=2, targets=["y_embed"])
    assert lora.has_lora(adapted) and lora.trainable_count(adapted) == 3 * (11 + 64)
    params = dict(adapted.named_parameters())
    a, b = params["y_embed.lora_embedding_A.default"], params["y_embed.lora_embedding_B.default"]
    assert (tuple(a.shape), tuple(b.shape)) == ((3, 11), (64, 3))
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        by_hand.y_embed.weight += (6.0 / 3) * (b @ a).T
    x = inputs(base)
    expected, plain = by_hand(*x), base(*x)
    assert (expected - plain).abs().max() > 1e-2 * plain.abs().max()
    assert torch.allclose(adapted(*x), expected, rtol=0, atol=1e-10 * expected.abs().max().item())
    merged = lora.merge_adapter(adapted)
    assert set(merged.state_dict()) == set(base.state_dict()) and not lora.has_lora(merged)
    assert torch.allclose(merged(*x), expected, rtol=0, atol=1e-10 * expected.abs().max().item())


def test_targets_skip_folded_decoder_weights_and_refuse_unknown_ones(models: dict[str, Any]) -> None:
    """The decoder folds its blocks' adaln, pixel_embed and input_proj into other products: a
    LoRA there would be ignored, so "adaln" takes the DiT blocks' only and "pixel_embed" fails."""
    model = models["class"]
    names = lora.resolve_targets(model, ["adaln"])
    assert names and all(n.startswith("blocks.") for n in names)
    assert any(n.startswith("decoder.blocks.") for n, _ in model.named_modules() if n.endswith("adaln"))
    with pytest.raises(ValueError, match=r"lora_targets: decoder\.pixel_embed is not called"):
        lora.resolve_targets(model, ["pixel_embed"])
    with pytest.raises(ValueError, match="lora_targets: 'w12' names no linear"):
        lora.resolve_targets(model, ["w12"])


# ------------------------------------------------------------------------- files, diffusers
def test_adapter_file_is_diffusers_format(models: dict[str, Any], tmp_path: Path) -> None:
    """Keys `transformer.model.<module>.lora_A/B.weight`, LoraConfig fields as JSON metadata
    (`transformer.r`, ...), read back by deco.lora into a fresh model with the same output."""
    base = randomized(models["class"], seed=0)
    adapted = with_random_adapter(base, rank=2, alpha=4.0, seed=3)
    path = tmp_path / lora.ADAPTER_NAME
    lora.save_adapter(adapted, path)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.model.blocks.") for k in keys)
    fields = json.loads(meta["lora_adapter_metadata"])
    assert (fields["transformer.r"], fields["transformer.lora_alpha"]) == (2, 4.0)
    loaded = lora.load_adapter(copy.deepcopy(base), path)
    x = inputs(base)
    assert torch.equal(loaded(*x), adapted(*x))


@pytest.mark.parametrize(("kind", "targets"), [("class", None), ("text", None), ("class", ("y_embed",)),
                                               ("class", ("qkv", "y_embed"))])
def test_diffusers_pipelines_load_fuse_and_save_our_adapters(models: dict[str, Any], tmp_path: Path,
                                                             kind: str, targets: Any) -> None:
    """diffusers' load_lora_weights on both pipelines gives deco's images with the adapter
    (float32, 1e-5: the same products in another order); set_adapters(0) and unfuse_lora give the
    base model's; fuse_lora the adapter's; save_lora_weights writes a file deco.lora reads. The
    class embedding's LoRA (peft's lora_embedding_A/B) too, alone (a file whose first key is no
    lora_A) and with linears."""
    require_module("diffusers")
    from deco.diffusers import DeCoPipeline, DeCoTextPipeline, DeCoTransformer2DModel

    pipeline = DeCoPipeline if kind == "class" else DeCoTextPipeline
    base = randomized(models[kind], seed=0)
    adapted = with_random_adapter(base, rank=2, alpha=2.0, seed=4, targets=targets)
    folder = tmp_path / kind
    folder.mkdir()
    lora.save_adapter(adapted, folder / lora.ADAPTER_NAME)
    transformer = DeCoTransformer2DModel.from_deco(copy.deepcopy(base), sample_size=32)
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = (None, None) if kind == "text" else ()
    pipe = pipeline(*parts, transformer, FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    x, _, cond = inputs(base, batch=2)
    null = (torch.zeros_like(cond[0]) if kind == "text" else None)

    def images(p: Any = pipe, x: torch.Tensor = x, cond: torch.Tensor = cond,
               null: Any = null, kind: str = kind) -> torch.Tensor:
        args = ({"prompt_embeds": cond, "negative_prompt_embeds": null} if kind == "text"
                else {"class_labels": cond})
        out: torch.Tensor = p(**args, guidance_scale=2.0, guidance_interval=(0.0, 1.0), timeshift=1.0,
                              num_inference_steps=3, latents=x, output_type="latent").images
        return out

    def sample(model: Any, x: torch.Tensor = x, cond: torch.Tensor = cond, null: Any = null,
               kind: str = kind) -> torch.Tensor:
        extra = (null,) if kind == "text" else ()
        out: torch.Tensor = optimized.sample(model, x, cond, *extra, steps=3, guidance=2.0)
        return out

    plain, expected = sample(base), sample(adapted)
    assert (expected - plain).abs().max() > 1e-2 * plain.abs().max()
    read = lora.load_adapter(copy.deepcopy(base), folder / lora.ADAPTER_NAME)  # deco sample --lora's way
    assert (sample(read) - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (images() - plain).abs().max() <= 1e-5 * plain.abs().max()
    pipe.load_lora_weights(folder, adapter_name="tuned")
    scale = expected.abs().max().item()
    assert (images() - expected).abs().max() <= 1e-5 * scale
    pipe.set_adapters(["tuned"], [0.0])
    assert (images() - plain).abs().max() <= 1e-5 * scale
    pipe.set_adapters(["tuned"], [1.0])
    pipe.fuse_lora()
    assert (images() - expected).abs().max() <= 1e-5 * scale
    pipe.unfuse_lora()
    layers = peft.get_peft_model_state_dict(pipe.transformer, adapter_name="tuned")
    pipe.save_lora_weights(tmp_path / f"{kind}-saved", transformer_lora_layers=layers)
    pipe.unload_lora_weights()
    assert (images() - plain).abs().max() <= 1e-5 * scale
    again = lora.load_adapter(copy.deepcopy(base), tmp_path / f"{kind}-saved" / lora.ADAPTER_NAME)
    assert (sample(again) - expected).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize(("keys", "message"), [
    ({"model.blocks.0.attn.qkv.lora_A.weight": (2, 16)}, "not a DeCo LoRA adapter"),
    ({"transformer.model.blocks.0.attn.qkv.lora_A.weight": (2, 16)}, "needs lora_A"),
    ({"transformer.model.nothing.lora_A.weight": (2, 16),
      "transformer.model.nothing.lora_B.weight": (16, 2)}, "not a linear layer"),
    ({"transformer.model.blocks.0.attn.qkv.lora_A.weight": (2, 15),
      "transformer.model.blocks.0.attn.qkv.lora_B.weight": (48, 2)}, "has shape"),
    ({"transformer.model.y_embed.lora_embedding_A": (2, 11),
      "transformer.model.y_embed.lora_B.weight": (64, 2)}, "needs lora_A"),
    ({"transformer.model.y_embed.lora_embedding_A": (2, 10),
      "transformer.model.y_embed.lora_embedding_B": (64, 2)}, "has shape"),
    ({"transformer.model.blocks.0.attn.qkv.lora_embedding_A": (2, 64),
      "transformer.model.blocks.0.attn.qkv.lora_embedding_B": (192, 2)}, "not an embedding"),
])
def test_bad_adapter_files_exit_2_in_one_line(models: dict[str, Any], tmp_path: Path, keys: dict[str, Any],
                                              message: str, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "m.safetensors"
    models["class"].save(ckpt)
    bad = tmp_path / "bad.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(bad))
    code = cli_main(["sample", str(ckpt), "--lora", str(bad), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("deco sample: error: --lora:") and message in err
    assert len(err.splitlines()) == 1


# ---------------------------------------------------------------------------- training, CLI
def test_trainer_trains_only_the_adapter_with_its_ema(models: dict[str, Any]) -> None:
    base = randomized(models["class"], seed=0)
    model = copy.deepcopy(base)
    lora.add_lora(model, 2, lora.resolve_targets(model))
    trainer = Trainer(model, TrainConfig(lr=1e-2, ema_decay=0.9, seed=0))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    y = torch.tensor([0, 1, 2, 3]) % model.config.num_classes
    for _ in range(2):
        trainer.step(x, y)
    frozen = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    plain = base.state_dict()
    assert all(torch.equal(v, plain[k.replace(".base_layer", "")]) for k, v in frozen.items())
    ema = trainer.ema.state_dict()
    assert all(torch.equal(ema[k], v) for k, v in frozen.items())  # no rounding drift in the EMA
    moved = [k for k, v in model.state_dict().items() if ".lora_B" in k and v.abs().max() > 0]
    assert moved and all(not torch.equal(ema[k], model.state_dict()[k]) for k in moved)
    assert lora.trainable_count(model) == sum(p.numel() for p in trainer.params)


def test_cli_fine_tune_sample_convert_and_onnx(models: dict[str, Any], tmp_path: Path) -> None:
    """deco train --init --lora on a tiny model; the run's merged model equals the base with
    its adapter (deco sample --lora) to float32 rounding; deco convert --lora writes that model
    as a plain file, and its ONNX export runs in onnxruntime within 1e-4 of torch."""
    import dataclasses

    from deco.generate import load_for_sampling

    base = randomized(models["class"], seed=0)
    tiny = optimized.build_model(dataclasses.replace(base.config, num_classes=10))
    tiny.load_state_dict({k: v if k != "y_embed.weight" else torch.randn(11, v.shape[1]) * 0.2
                          for k, v in base.state_dict().items()}, strict=True)
    init = tmp_path / "base.safetensors"
    tiny.save(init)
    run = tmp_path / "run"
    assert cli_main(["train", "--out", str(run), "--init", str(init), "--lora", "2", "--lora-targets", "qkv",
                     "adaln", "y_embed", "--steps", "2", "--batch-size", "4", "--sample-steps", "2",
                     "--ema-decay", "0.5", "--grad-checkpointing"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["trainable_parameters"] < metrics["parameters"] / 5
    merged = load_for_sampling(run, torch.device("cpu")).model
    with_adapter = lora.load_adapter(optimized.load_model(init), run / lora.ADAPTER_NAME)
    x = inputs(merged, batch=2)
    ref = with_adapter(*x)
    assert (merged(*x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (merged(*x) - tiny.eval()(*x)).abs().max() > 1e-4 * ref.abs().max()  # it trained
    fused = tmp_path / "fused.safetensors"
    assert cli_main(["convert", str(init), str(fused), "--lora", str(run / lora.ADAPTER_NAME)]) == 0
    plain = optimized.load_model(fused)
    assert not lora.has_lora(plain) and (plain(*x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    onnxruntime = require_module("onnxruntime")
    assert cli_main(["export-onnx", str(fused), str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, [v.numpy() for v in x], strict=True)))[0]
    assert abs(torch.from_numpy(got) - ref).max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize(("argv", "message"), [
    (["--lora", "2"], "--lora: LoRA fine-tunes a trained model"),
    (["--lora-targets", "qkv"], "--lora-targets: expected module names, and --lora RANK"),
    (["--init", "{init}", "--model", "DeCo-tiny/4"], "--model: the model of a fine-tune is --init's"),
    (["--init", "{init}", "--lora", "2", "--lora-targets", "pixel_embed"], "--lora-targets: decoder"),
])
def test_fine_tune_usage_errors(models: dict[str, Any], tmp_path: Path, argv: list[str], message: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    init = tmp_path / "base.safetensors"
    optimized.build_model(models["class"].config.__class__.preset("DeCo-tiny/4")).save(init)
    argv = [a.format(init=init) for a in argv]
    with pytest.raises(SystemExit) as exc:
        code = cli_main(["train", "--out", str(tmp_path / "r"), "--steps", "1", *argv])
        raise SystemExit(code)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_lora_resume_continues_the_exact_trajectory(models: dict[str, Any], tmp_path: Path) -> None:
    """A LoRA fine-tune of 4 steps straight vs 2 steps, then --resume to 4: the same losses,
    adapter, EMA of the adapter, optimizer state, generator and step count, bit for bit (the
    oracle: the uninterrupted run), and the same adapter file."""
    from deco.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from deco.optimized.sampling import SampleSettings
    from deco.train.job import LOG_NAME, RunConfig, train

    init = tmp_path / "base.safetensors"
    randomized(models["class"], seed=0).save(init)
    common: dict[str, Any] = dict(init=init, lora_rank=2, lora_targets=("qkv", "adaln", "y_embed"),
                                  batch_size=4,
                                  log_every=1, device="cpu", checkpoint_every=100, grid_columns=1,
                                  train=TrainConfig(lr=1e-2, ema_decay=0.5), sample=SampleSettings(steps=1))
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(RunConfig(out=straight, steps=4, **common))
    train(RunConfig(out=split, steps=2, **common))
    train(RunConfig(out=split, steps=4, resume=True), explicit={"steps"})

    def log(run: Path) -> list[Any]:
        return [json.loads(line) | {"time": None} for line in (run / LOG_NAME).read_text().splitlines()]

    def trainer_state(run: Path) -> dict[str, Any]:
        state = load_checkpoint(run / CHECKPOINT_NAME)["trainer"]
        return {k: state[k] for k in ("model", "ema", "optimizer", "generator", "step")}

    assert [r["step"] for r in log(split)] == [1, 2, 3, 4] and log(split) == log(straight)
    a, b = trainer_state(straight), trainer_state(split)
    assert a["step"] == b["step"] == 4
    adapter = [k for k in a["ema"] if ".lora_B." in k]
    assert adapter and all(a["ema"][k].abs().max() > 0 for k in adapter)  # the adapter trained
    assert a["model"].keys() == b["model"].keys() and a["ema"].keys() == b["ema"].keys()
    assert all(torch.equal(a[s][k], b[s][k]) for s in ("model", "ema") for k in a[s])
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"]) > 0
    assert all(torch.equal(x[n], y[n]) for x, y in zip(a["optimizer"]["state"].values(),
                                                       b["optimizer"]["state"].values(), strict=True)
               for n in x if isinstance(x[n], torch.Tensor))
    assert torch.equal(a["generator"], b["generator"])
    with safe_open(str(straight / lora.ADAPTER_NAME), framework="pt") as f, \
            safe_open(str(split / lora.ADAPTER_NAME), framework="pt") as g:
        assert set(f.keys()) == set(g.keys()) and all(torch.equal(f.get_tensor(k), g.get_tensor(k))
                                                      for k in f.keys())
    # Repeating the run's --lora on --resume is allowed; another rank is a changed trajectory.
    assert cli_main(["train", "--out", str(split), "--resume", "--steps", "4", "--lora", "2"]) == 0
    assert cli_main(["train", "--out", str(split), "--resume", "--steps", "4", "--lora", "3"]) == 2
