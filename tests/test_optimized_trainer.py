"""`deco.optimized.trainer` against independent oracles: the float64 reference (`deco.reference.flow`,
the frequency loss and `Model`), closed forms (EMA, gradient clipping) and behaviour on a tiny DeCo
(overfitting, REPA alignment, reproducibility, resume, refusal of non-finite losses)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_weights, rel_err, tiny_config
from hypothesis import settings
from torch import Tensor, nn

from deco import reference as R
from deco.optimized import layers
from deco.optimized import trainer as T
from deco.optimized.model import DiffusionTransformer
from deco.optimized.weights import build_model
from deco.reference import model as RM

SETTINGS = settings(max_examples=20, deadline=None)
F64_RTOL = 1e-10
PATCH = 4
ENC_DIM = 16


class PatchEncoder(nn.Module):
    """A frozen stand-in for DINOv2: a conv patch embedding with fixed random weights, images
    (B, 3, H, W) -> tokens (B, (H/4)(W/4), 16), the DiT's grid."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, ENC_DIM, PATCH, stride=PATCH, dtype=dtype)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator, dtype=dtype))
            assert self.conv.bias is not None
            self.conv.bias.copy_(torch.randn(ENC_DIM, generator=generator, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        features: Tensor = self.conv(x)  # (B, 16, H/4, W/4)
        return features.flatten(2).transpose(1, 2)


def tiny_model(dtype: torch.dtype = torch.float64, weight_seed: int | None = 0) -> DiffusionTransformer:
    """Tiny DeCo (3 DiT blocks, 10 classes); random non-zero weights (a fresh DeCo predicts 0)."""
    config = tiny_config()
    model = build_model(config).to(dtype)
    if weight_seed is not None:
        weights = random_weights(config, seed=weight_seed)
        model.load_state_dict({k: torch.from_numpy(v).to(dtype) for k, v in weights.items()})
    return model


def batch(seed: int, b: int = 3, h: int = 8, w: int = 12) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=generator, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 10, (b,), generator=generator)
    return x, y


def flat_params(module: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().double().reshape(-1).numpy() for p in module.parameters()])

def reference_repa_loss(trainer: T.Trainer, tokens: np.ndarray, xn: np.ndarray) -> float:
    """REPA's term in NumPy: mean 1 - cos(projector(DiT tokens), PatchEncoder(images)), with the
    trainer's projector weights (3 linears, SiLU) and encoder weights."""
    assert trainer.projector is not None and isinstance(trainer.encoder, PatchEncoder)
    proj = {k: v.detach().numpy().copy() for k, v in trainer.projector.state_dict().items()}
    h = RM.silu(tokens @ proj["0.weight"].T + proj["0.bias"])
    h = RM.silu(h @ proj["2.weight"].T + proj["2.bias"])
    h = h @ proj["4.weight"].T + proj["4.bias"]
    conv = trainer.encoder.conv
    assert conv.bias is not None
    enc = RM.patchify(xn, PATCH) @ conv.weight.detach().numpy().reshape(ENC_DIM, -1).T
    enc = enc + conv.bias.detach().numpy()
    cos = np.sum(h * enc, -1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(enc, axis=-1))
    return float(np.mean(1.0 - cos))



# ------------------------------------------------------------------ a step vs the reference
STEP_CONFIG = T.TrainConfig(
    label_dropout=0.5, timeshift=3.0, freq_weight=0.7, quality=40, gamma=1.5,
    repa_weight=0.3, repa_layer=2, repa_encoder_dim=ENC_DIM, seed=1,
)


def reference_step_losses(
    trainer: T.Trainer, weights: dict[str, np.ndarray], x: Tensor, y: Tensor, draws: T.Draws
) -> dict[str, float]:
    """The loss terms of a step recomputed with `deco.reference` alone (NumPy, float64)."""
    cfg, config = trainer.config, trainer.model.config
    xn, noise = x.numpy(), draws.noise.numpy()
    labels = R.drop_labels(y.numpy(), draws.label_uniform.numpy(), cfg.label_dropout, config.null_class)
    t = R.time_shift(R.logit_normal_time(draws.time.numpy(), cfg.time_mean, cfg.time_std), cfg.timeshift)
    x_t, v = R.interpolate(xn, noise, t), R.target_velocity(xn, noise)
    pred = R.Model(config, weights).forward(x_t, t, labels)
    fm = R.flow_matching_loss(pred, v)
    freq = R.frequency_aware_loss(pred, v, cfg.quality, cfg.gamma)
    # REPA: DiT tokens after block `repa_layer` = the reference trunk cut to that depth.
    cut = dataclasses.replace(config, depth=cfg.repa_layer)
    tokens, _, _ = RM.dit_trunk(x_t, t, labels, cut, weights)
    repa = reference_repa_loss(trainer, tokens, xn)
    loss = fm + cfg.freq_weight * freq + cfg.repa_weight * repa
    return {"loss": loss, "fm": fm, "freq": freq, "repa": repa}


def step_errors() -> dict[str, float]:
    """Relative errors of a float64 trainer step's logged losses against the reference."""
    config = tiny_config()
    weights = random_weights(config, seed=3)
    model = tiny_model(weight_seed=3)
    trainer = T.Trainer(model, STEP_CONFIG, encoder=PatchEncoder())
    x, y = batch(0)
    generator = torch.Generator().manual_seed(5)
    draws = T.Draws(
        label_uniform=torch.tensor([0.2, 0.7, 0.4], dtype=torch.float64),  # labels 0 and 2 dropped
        time=torch.randn(3, generator=generator, dtype=torch.float64),
        noise=torch.randn(x.shape, generator=generator, dtype=torch.float64),
    )
    expected = reference_step_losses(trainer, weights, x, y, draws)  # before the update
    logs = trainer.step(x, y, draws)
    return {k: rel_err(logs[k], expected[k]) for k in expected}


def test_step_losses_match_reference_float64() -> None:
    errors = step_errors()
    assert max(errors.values()) <= F64_RTOL, errors


def no_dct_scale(p: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    f = torch.linspace(0, 8, 8, dtype=torch.float64)
    return ORIGINAL_DCT_FEATURES(p, device, torch.float64) * (1.0 + f[:, None] * f).reshape(1, 64)


ORIGINAL_DCT_FEATURES = layers.dct_position_features


@pytest.mark.parametrize(
    ("module", "name", "broken"),
    [
        (layers, "dct_position_features", no_dct_scale),  # decoder without the 1/(1 + fa fb) scale
        (T, "time_shift", lambda t, shift=1.0: t),  # time shift forgotten
        (T, "null_where", lambda labels, uniform, p, null: labels),  # no label dropout
    ],
    ids=["dct-scale", "time-shift", "label-dropout"],
)
def test_broken_variants_fail_the_step_comparison(
    module: Any, name: str, broken: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(module, name, broken)
    errors = step_errors()
    assert max(errors.values()) > F64_RTOL, errors


# ------------------------------------------------------------------------------ behaviour
def test_few_steps_overfit_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config())  # real initialisation, float32
    trainer = T.Trainer(model, T.TrainConfig(lr=3e-3, label_dropout=0.0, seed=0))
    x, y = (v.float() if v.is_floating_point() else v for v in batch(1, b=4, h=8, w=8))
    draws = trainer.draw(x)  # held-out draws on which the objective is measured
    before = trainer.losses(x, y, draws)["loss"].item()
    for _ in range(40):
        trainer.step(x, y)
    after = trainer.losses(x, y, draws)["loss"].item()
    assert after < 0.7 * before, (before, after)


def test_label_dropout_one_feeds_the_null_class() -> None:
    seen: list[Tensor] = []
    model = tiny_model()
    model.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    x, y = batch(2)
    T.Trainer(model, T.TrainConfig(label_dropout=1.0)).step(x, y)
    assert torch.equal(seen[-1], torch.full_like(y, 10))
    T.Trainer(model, T.TrainConfig(label_dropout=0.0)).step(x, y)
    assert torch.equal(seen[-1], y)


def test_update_ema_closed_form_on_a_toy_module() -> None:
    decay, k = 0.8, 5
    net = nn.Linear(4, 3, dtype=torch.float64)
    ema = copy.deepcopy(net)
    e0 = flat_params(ema)
    history = []
    for i in range(k):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype))
        history.append(flat_params(net))
        T.update_ema(list(ema.parameters()), list(net.parameters()), decay)
    expected = decay**k * e0 + (1 - decay) * sum(decay ** (k - 1 - i) * h for i, h in enumerate(history))
    assert rel_err(flat_params(ema), expected) <= F64_RTOL


def test_trainer_ema_is_the_closed_form_average() -> None:
    decay, k = 0.7, 3
    trainer = T.Trainer(tiny_model(), T.TrainConfig(lr=1e-2, ema_decay=decay))
    p0 = flat_params(trainer.model)
    x, y = batch(3)
    history = []
    for _ in range(k):
        trainer.step(x, y)
        history.append(flat_params(trainer.model))
    expected = decay**k * p0 + (1 - decay) * sum(decay ** (k - 1 - i) * h for i, h in enumerate(history))
    assert rel_err(flat_params(trainer.ema), expected) <= F64_RTOL
    assert rel_err(flat_params(trainer.ema), history[-1]) > 1e-3  # the EMA lags the weights


def test_repa_term_decreases_with_training() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config())
    config = T.TrainConfig(lr=1e-3, repa_layer=2, repa_encoder_dim=ENC_DIM, label_dropout=0.0)
    trainer = T.Trainer(model, config, encoder=PatchEncoder(dtype=torch.float32))
    assert trainer.projector is not None
    projector_before = flat_params(trainer.projector)
    x, y = (v.float() if v.is_floating_point() else v for v in batch(4, b=4, h=16, w=16))
    draws = trainer.draw(x)
    before = trainer.losses(x, y, draws)["repa"].item()
    for _ in range(30):
        logs = trainer.step(x, y)
    after = trainer.losses(x, y, draws)["repa"].item()
    assert logs["repa"] > 0 and after < 0.8 * before, (before, after)
    assert rel_err(flat_params(trainer.projector), projector_before) > 1e-3  # the optimizer trains it


def test_grad_clip_bounds_the_gradient() -> None:
    clip = 1e-3
    x, y = batch(5)
    clipped = T.Trainer(tiny_model(), T.TrainConfig(grad_clip=clip))
    free = T.Trainer(tiny_model(), T.TrainConfig(grad_clip=None))
    draws = clipped.draw(x)
    logs = clipped.step(x, y, draws)
    free_logs = free.step(x, y, draws)
    grads = torch.cat([p.grad.reshape(-1) for p in clipped.params if p.grad is not None])
    raw = torch.cat([p.grad.reshape(-1) for p in free.params if p.grad is not None])
    assert logs["grad_norm"] > 100 * clip  # the pre-clip norm is logged
    assert rel_err(logs["grad_norm"], torch.linalg.vector_norm(raw).item()) <= 1e-12
    assert torch.linalg.vector_norm(grads).item() <= clip * (1 + 1e-9)
    assert rel_err(grads.numpy(), raw.numpy() * clip / (free_logs["grad_norm"] + 1e-6)) <= 1e-12


def test_same_seed_reproduces_the_run() -> None:
    x, y = batch(6)
    model = tiny_model()

    def run(seed: int) -> tuple[list[dict[str, float]], np.ndarray]:
        trainer = T.Trainer(copy.deepcopy(model), T.TrainConfig(seed=seed))
        return [trainer.step(x, y) for _ in range(3)], flat_params(trainer.model)

    logs_a, params_a = run(7)
    logs_b, params_b = run(7)
    logs_c, _ = run(8)
    assert logs_a == logs_b and np.array_equal(params_a, params_b)
    assert logs_a != logs_c


def test_state_dict_resumes_exactly() -> None:
    x, y = batch(7)
    config = T.TrainConfig(repa_layer=3, repa_encoder_dim=ENC_DIM, lr=1e-3)
    a = T.Trainer(tiny_model(weight_seed=1), config, encoder=PatchEncoder())
    for _ in range(2):
        a.step(x, y)
    state = copy.deepcopy(a.state_dict())
    logs_a = [a.step(x, y) for _ in range(2)]
    b = T.Trainer(tiny_model(weight_seed=2), dataclasses.replace(config, seed=9), encoder=PatchEncoder())
    b.load_state_dict(state)
    logs_b = [b.step(x, y) for _ in range(2)]
    assert logs_a == logs_b and a.step_count == b.step_count == 4
    for left, right in ((a.model, b.model), (a.ema, b.ema), (a.projector, b.projector)):
        assert left is not None and right is not None
        assert np.array_equal(flat_params(left), flat_params(right))


def test_non_finite_loss_raises_and_leaves_the_weights() -> None:
    trainer = T.Trainer(tiny_model(), T.TrainConfig(repa_layer=1, repa_encoder_dim=ENC_DIM),
                        encoder=PatchEncoder())
    x, y = batch(8)
    trainer.step(x, y)
    before = [flat_params(m) for m in (trainer.model, trainer.ema, trainer.projector) if m is not None]
    optimizer_before = copy.deepcopy(trainer.optimizer.state_dict())
    bad = x.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(T.NonFiniteLossError, match=r"^step 1: non-finite"):
        trainer.step(bad, y)
    after = [flat_params(m) for m in (trainer.model, trainer.ema, trainer.projector) if m is not None]
    assert all(np.array_equal(u, v) for u, v in zip(before, after, strict=True))
    optimizer_after = trainer.optimizer.state_dict()
    for key, value in optimizer_before["state"].items():
        assert all(torch.equal(value[k], optimizer_after["state"][key][k]) for k in value)
    assert trainer.step_count == 1
    assert np.isfinite(trainer.step(x, y)["loss"])  # training goes on


# ----------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"ema_decay": 1.5}, "ema_decay"),
        ({"label_dropout": -0.1}, "label_dropout"),
        ({"time_sampling": "normal"}, "time_sampling"),
        ({"time_std": 0.0}, "time_std"),
        ({"timeshift": -1.0}, "timeshift"),
        ({"quality": 0}, "quality"),
        ({"quality": 101}, "quality"),
        ({"gamma": float("inf")}, "gamma"),
        ({"repa_layer": 0}, "repa_layer"),
        ({"repa_encoder_dim": 0}, "repa_encoder_dim"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_rejects_bad_values(overrides: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}"):
        T.TrainConfig(**overrides)


def test_trainer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"^repa_layer"):
        T.Trainer(tiny_model(), T.TrainConfig(repa_layer=4, repa_encoder_dim=ENC_DIM), encoder=PatchEncoder())
    trainer = T.Trainer(tiny_model(), T.TrainConfig(repa_layer=1, repa_encoder_dim=8), encoder=PatchEncoder())
    x, y = batch(9)
    with pytest.raises(ValueError, match=r"^encoder"):
        trainer.step(x, y)
    plain = T.Trainer(tiny_model())
    with pytest.raises(TypeError, match=r"^y"):
        plain.step(x, y.double())
    with pytest.raises(ValueError, match=r"^y"):
        plain.step(x, y[:2])
    with pytest.raises(TypeError, match=r"^x"):
        plain.step(x[0], y)
    draws = plain.draw(x[:2])
    with pytest.raises(ValueError, match=r"^draws"):
        plain.step(x, y, draws)


def test_uniform_time_sampling_runs() -> None:
    trainer = T.Trainer(tiny_model(), T.TrainConfig(time_sampling="uniform"))
    x, _ = batch(10)
    draws = trainer.draw(x)
    assert bool(((draws.time >= 0) & (draws.time < 1)).all())
    times = trainer.times(draws.time)
    assert rel_err(times.numpy(), R.time_shift(R.uniform_time(draws.time.numpy()), 1.0)) <= F64_RTOL


#: |loss(cpu_bf16) / loss(float32) - 1| on the tiny model: 3e-5 .. 2.2e-3 over 20 weight/batch
#: draws (calibrated); the bound leaves 4.5x of the largest, float32 alone differs by ~1e-7.
CPU_BF16_LOSS_RTOL = 1e-2


def linear_output_dtypes(trainer: T.Trainer, x: Tensor, y: Tensor, draws: T.Draws) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in trainer.model.modules() if isinstance(m, nn.Linear)]
    try:
        trainer.losses(x, y, draws)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_bf16_runs_the_products_in_bf16_within_the_calibrated_bound(seed: int) -> None:
    """cpu_bf16: the forward runs under CPU bf16 autocast (the linears return bfloat16), the
    loss stays within CPU_BF16_LOSS_RTOL of the float32 step's and is not the float32 loss."""
    model = tiny_model(torch.float32, weight_seed=seed)
    x, y = batch(seed, b=4)
    plain = T.Trainer(model, T.TrainConfig(label_dropout=0.0))
    mixed = T.Trainer(model, T.TrainConfig(label_dropout=0.0, cpu_bf16=True))
    draws = plain.draw(x.float())
    assert linear_output_dtypes(plain, x, y, draws) == {torch.float32}
    assert torch.bfloat16 in linear_output_dtypes(mixed, x, y, draws)
    expected, got = plain.losses(x, y, draws)["loss"].item(), mixed.losses(x, y, draws)["loss"].item()
    assert 1e-6 < abs(got / expected - 1) <= CPU_BF16_LOSS_RTOL


def test_cpu_bf16_step_reduces_the_loss_and_keeps_float32_weights() -> None:
    torch.manual_seed(0)
    trainer = T.Trainer(tiny_model(torch.float32), T.TrainConfig(lr=3e-3, label_dropout=0.0, cpu_bf16=True))
    x, y = batch(1, b=4, h=8, w=8)
    draws = trainer.draw(x.float())
    before = trainer.losses(x, y, draws)["loss"].item()
    for _ in range(40):
        trainer.step(x, y)
    assert trainer.losses(x, y, draws)["loss"].item() < 0.7 * before
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("field", ["bf16", "cpu_bf16"])
def test_precision_switches_must_be_bools(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        T.TrainConfig(**{field: "yes"})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_step_reduces_the_loss() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config()).cuda()
    trainer = T.Trainer(model, T.TrainConfig(lr=3e-3, label_dropout=0.0))
    x, y = (v.cuda().float() if v.is_floating_point() else v.cuda() for v in batch(1, b=4, h=8, w=8))
    draws = trainer.draw(x)
    before = trainer.losses(x, y, draws)["loss"].item()
    for _ in range(40):
        trainer.step(x, y)
    assert trainer.losses(x, y, draws)["loss"].item() < 0.7 * before
    assert next(trainer.ema.parameters()).dtype == torch.float32


# ------------------------------------------------------------------- the wrapped net and shards
class CountingWrapper(nn.Module):
    """Stands in for DistributedDataParallel: forwards to the model and counts the calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model
        self.calls = 0

    def forward(self, *args: Any) -> Any:
        self.calls += 1
        return self.module(*args)


def test_the_forward_pass_goes_through_the_given_net() -> None:
    model = tiny_model()
    net = CountingWrapper(model)
    trainer = T.Trainer(model, T.TrainConfig(), net=net)
    x, y = batch(0)
    trainer.step(x, y)
    assert net.calls == 1 and trainer.model is model
    assert set(trainer.state_dict()["model"]) == set(model.state_dict())  # no wrapper prefix
    with pytest.raises(TypeError, match=r"^net"):
        T.Trainer(model, T.TrainConfig(), net="ddp")  # type: ignore[arg-type]


def test_shard_draws_are_the_rows_of_the_global_batch() -> None:
    """Rank r of w keeps rows r, r + w, ... of what one process draws for the global batch."""
    x, _ = batch(1, b=6)
    whole = T.Trainer(tiny_model(), T.TrainConfig(seed=5)).draw(x)
    for rank in range(3):
        part = T.Trainer(tiny_model(), T.TrainConfig(seed=5)).draw(x[:2], shard=(rank, 3))
        for name in ("label_uniform", "time", "noise"):
            assert torch.equal(getattr(part, name), getattr(whole, name)[rank::3]), (rank, name)
    with pytest.raises(ValueError, match=r"^shard"):
        T.Trainer(tiny_model(), T.TrainConfig()).draw(x, shard=(3, 3))
