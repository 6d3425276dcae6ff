"""The training step of the text-to-image model and gradient accumulation, against oracles.

Oracles: the float64 reference (`deco.reference`: caption dropout `drop_text`, the text model's
forward, the frequency loss, REPA recomputed from the reference trunk) on identical draws; and,
for accumulation, the same step computed on the whole batch at once (k micro-batches of b rows
must equal one batch of k b rows: the loss is a mean, so the averaged gradients are the batch's).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_weights, rel_err, tiny_config
from test_optimized_trainer import ENC_DIM, PatchEncoder, flat_params, reference_repa_loss
from torch import Tensor

from deco import reference as R
from deco.config import DeCoConfig
from deco.optimized import trainer as T
from deco.optimized.weights import build_model
from deco.reference import text_to_image as RT

F64_RTOL = 1e-10
TEXT = DeCoConfig.preset("DeCo-T2I-tiny/4")  # T = 8, E = 48
CONFIG = T.TrainConfig(label_dropout=0.5, timeshift=3.0, freq_weight=0.7, quality=40, gamma=1.5,
                       repa_weight=0.3, repa_layer=2, repa_encoder_dim=ENC_DIM, seed=1)


def text_model(seed: int = 3, config: DeCoConfig = TEXT) -> Any:
    model = build_model(config).double()
    weights = random_weights(config, seed=seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model


def text_batch(seed: int, b: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """Images (b, 3, 8, 12), text (b, 8, 48), null text (8, 48), float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 8, 12, generator=g, dtype=torch.float64) * 2 - 1
    text = torch.randn(b, TEXT.text_length, TEXT.text_dim, generator=g, dtype=torch.float64)
    null = torch.randn(TEXT.text_length, TEXT.text_dim, generator=g, dtype=torch.float64)
    return x, text, null


def reference_losses(trainer: T.Trainer, weights: dict[str, np.ndarray], x: Tensor, text: Tensor,
                     null: Tensor, draws: T.Draws) -> dict[str, float]:
    """The step's loss terms from `deco.reference` alone (NumPy, float64)."""
    cfg = trainer.config
    xn, noise = x.numpy(), draws.noise.numpy()
    cond = R.drop_text(text.numpy(), draws.label_uniform.numpy(), cfg.label_dropout, null.numpy())
    t = R.time_shift(R.logit_normal_time(draws.time.numpy(), cfg.time_mean, cfg.time_std), cfg.timeshift)
    x_t, v = R.interpolate(xn, noise, t), R.target_velocity(xn, noise)
    pred = R.Model(TEXT, weights).forward(x_t, t, cond)
    fm = R.flow_matching_loss(pred, v)
    freq = R.frequency_aware_loss(pred, v, cfg.quality, cfg.gamma)
    tokens, _ = RT.t2i_trunk(x_t, t, cond, dataclasses.replace(TEXT, depth=cfg.repa_layer), weights)
    repa = reference_repa_loss(trainer, tokens, xn)
    loss = fm + cfg.freq_weight * freq + cfg.repa_weight * repa
    return {"loss": loss, "fm": fm, "freq": freq, "repa": repa}


def text_step_errors() -> dict[str, float]:
    x, text, null = text_batch(0)
    trainer = T.Trainer(text_model(), CONFIG, encoder=PatchEncoder(), null_text=null)
    g = torch.Generator().manual_seed(5)
    draws = T.Draws(torch.tensor([0.2, 0.7, 0.4], dtype=torch.float64),  # samples 0 and 2 dropped
                    torch.randn(3, generator=g, dtype=torch.float64),
                    torch.randn(x.shape, generator=g, dtype=torch.float64))
    expected = reference_losses(trainer, random_weights(TEXT, seed=3), x, text, null, draws)
    logs = trainer.step(x, text, draws)
    return {k: rel_err(logs[k], expected[k]) for k in expected}


def test_text_step_matches_the_reference_float64() -> None:
    errors = text_step_errors()
    assert max(errors.values()) <= F64_RTOL, errors


def test_forgotten_caption_dropout_fails_the_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "drop_text", lambda text, uniform, p, null: text)
    errors = text_step_errors()
    assert max(errors.values()) > F64_RTOL, errors


def test_caption_dropout_one_feeds_the_null_text() -> None:
    seen: list[Tensor] = []
    model = text_model()
    model.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    x, text, null = text_batch(1)
    T.Trainer(model, T.TrainConfig(label_dropout=1.0), null_text=null).step(x, text)
    assert torch.equal(seen[-1], null.expand_as(text))
    T.Trainer(model, T.TrainConfig(label_dropout=0.0), null_text=null).step(x, text)
    assert torch.equal(seen[-1], text)


@pytest.mark.parametrize(
    ("kwargs", "y", "error", "match"),
    [
        ({}, None, TypeError, r"^null_text: a text-to-image model needs the null text embedding"),
        ({"null_text": torch.zeros(8, 32)}, None, ValueError, r"^null_text: expected shape \(8, 48\)"),
        ({"null_text": torch.zeros(8, 48)}, torch.tensor([1, 2, 3]), TypeError,
         r"^y: expected text embeddings"),
        ({"null_text": torch.zeros(8, 48)}, torch.zeros(3, 8, 32), ValueError,
         r"^y: expected text embeddings of shape \(3, 8, 48\)"),
    ],
    ids=["no-null", "null-shape", "labels", "text-shape"],
)
def test_text_trainer_bad_input(kwargs: dict[str, Any], y: Tensor | None, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        trainer = T.Trainer(text_model(), T.TrainConfig(), **kwargs)
        trainer.step(torch.zeros(3, 3, 8, 12), y)


def test_class_trainer_refuses_a_null_text() -> None:
    with pytest.raises(ValueError, match=r"^null_text: only a text-to-image model"):
        T.Trainer(build_model(tiny_config()), T.TrainConfig(), null_text=torch.zeros(8, 48))


# ------------------------------------------------------------------------ accumulation
def _steps(model: Any, x: Tensor, y: Tensor, k: int, null: Tensor | None,
           steps: int = 3) -> tuple[Any, list[Any]]:
    torch.manual_seed(0)  # the REPA projector's initialisation
    trainer = T.Trainer(model, dataclasses.replace(CONFIG, lr=1e-2, grad_clip=0.5), encoder=PatchEncoder(),
                        null_text=null)
    logs = [trainer.step(x, y, accumulation=k) for _ in range(steps)]
    return trainer, logs


@pytest.mark.parametrize("task", ["c2i", "t2i"])
def test_two_micro_batches_equal_one_batch_of_twice_the_size(task: str) -> None:
    """k = 2 on a batch of 4 = k = 1 on the same 4 rows (same draws from the same seed): float64."""
    x, text, null = text_batch(2, b=4)
    if task == "c2i":
        def make() -> Any:
            model = build_model(tiny_config()).double()
            weights = random_weights(tiny_config(), 4)
            model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
            return model
        y: Tensor = torch.tensor([1, 5, 0, 9])
        null_text = None
    else:
        def make() -> Any:
            return text_model(seed=4)
        y, null_text = text, null
    one, logs_one = _steps(make(), x, y, 1, null_text)
    two, logs_two = _steps(make(), x, y, 2, null_text)
    assert rel_err(flat_params(two.model), flat_params(one.model)) <= F64_RTOL
    assert rel_err(flat_params(two.ema), flat_params(one.ema)) <= F64_RTOL
    for a, b in zip(logs_one, logs_two, strict=True):
        assert max(rel_err(b[key], a[key]) for key in ("loss", "fm", "freq", "repa", "grad_norm")) <= F64_RTOL
    # and it did move: three clipped steps of lr 1e-2 change the weights
    assert rel_err(flat_params(one.model), flat_params(make())) > 1e-4


def test_accumulation_uses_rows_j_mod_k() -> None:
    """Micro-batch j is rows j, j + k, ...: what the model sees, in order."""
    seen: list[Tensor] = []
    x, text, null = text_batch(3, b=6)
    model = text_model()
    model.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    T.Trainer(model, T.TrainConfig(label_dropout=0.0), null_text=null).step(x, text, accumulation=3)
    assert [torch.equal(s, text[j::3]) for j, s in enumerate(seen)] == [True, True, True]


@pytest.mark.parametrize(("k", "match"), [(0, r"^accumulation: expected a positive int"),
                                          (4, r"^accumulation: the batch of 6 rows")])
def test_accumulation_bad_input(k: int, match: str) -> None:
    x, text, null = text_batch(3, b=6)
    with pytest.raises(ValueError, match=match):
        T.Trainer(text_model(), T.TrainConfig(), null_text=null).step(x, text, accumulation=k)


# -------------------------------------------------------------------------- drop_text
def test_drop_text_replaces_exactly_the_drawn_rows() -> None:
    from deco.optimized.flow import drop_text

    _, text, null = text_batch(4, b=5)
    uniform = torch.tensor([0.05, 0.5, 0.3, 0.99, 0.0], dtype=torch.float64)
    got = drop_text(text, uniform, 0.3, null)
    ref = R.drop_text(text.numpy(), uniform.numpy(), 0.3, null.numpy())
    assert np.array_equal(got.numpy(), ref)
    # rows 0 and 4 (u < 0.3) are the null text, the others untouched (0.3 itself is kept)
    assert [torch.equal(got[i], null) for i in range(5)] == [True, False, False, False, True]
    assert [torch.equal(got[i], text[i]) for i in range(5)] == [False, True, True, True, False]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(2, 8, 48), torch.zeros(2), 1.5, torch.zeros(8, 48)), r"^p: expected a probability"),
        ((torch.zeros(2, 8, 48), torch.zeros(2), 0.1, torch.zeros(8, 47)), r"^null: expected shape"),
        ((torch.zeros(2, 8, 48), torch.zeros(3), 0.1, torch.zeros(8, 48)), r"^uniform: expected shape"),
    ],
    ids=["p", "null", "uniform"],
)
def test_drop_text_bad_input_on_both_sides(args: tuple[Any, ...], match: str) -> None:
    from deco.optimized.flow import drop_text

    with pytest.raises(ValueError, match=match):
        drop_text(*args)
    with pytest.raises(ValueError, match=match):
        R.drop_text(*(a.numpy() if isinstance(a, Tensor) else a for a in args))
