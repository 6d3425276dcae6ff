"""The training step of DeCo (spec/01-flow-matching.md §6, spec/02-frequency-loss.md), no framework:
`Trainer` (AdamW, EMA, the optional REPA projector) and the step's random draws; its settings,
`TrainConfig`, are in `deco.optimized.train_config` (importable from here too).

    trainer = Trainer(build_model(config), TrainConfig(), encoder=None)
    for x, y in batches:             # x (B, 3, H, W) in [-1, 1], y (B,) class labels
        logs = trainer.step(x, y)    # {"loss", "fm", "freq", "repa", "grad_norm", "lr"}

A text-to-image model ("t2i") takes text embeddings y (B, T, E) instead of labels, and the
Trainer needs the null embedding (T, E): `Trainer(model, config, null_text=encoder.null())`;
caption dropout replaces a sample's text by it with probability `label_dropout` (same draw).

Gradient accumulation: `trainer.step(x, y, draws, accumulation=k)` splits the batch into k
micro-batches, rows j, j + k, ... for micro-batch j (with their draws), and averages their
gradients before one optimizer step. With `deco.data.BatchStream`'s sharding (rank r holds rows
r::w of the global batch) micro-batch j of rank r is global rows (r + w j)::(w k): k
micro-batches on one process follow the trajectory of k processes, up to float rounding.

A step: drop labels to the null class with probability `label_dropout`; t = time_shift(
sigmoid(mean + std n)) (or uniform); x_t = t x + (1 - t) noise (t = 1 is data); target velocity
v = x - noise; loss = FM + freq_weight * frequency-aware + repa_weight * REPA; AdamW; EMA.

Choices, after the public release (AdamW lr 1e-4, weight decay 0, EMA 0.9999 on every step
from a copy of the initial weights, label dropout 0.1, logit-normal(0, 1) times, bf16 autocast):
- Gradient clipping: the release does not clip. We clip the global norm to 1.0 by default as a
  guard against rare spikes (with Adam it only acts on outliers); `grad_clip=None` is the release.
- REPA: the release aligns the tokens output by DiT block `align_layer` (1-based, 8) through a
  3-layer SiLU MLP with the encoder's patch tokens, 1 - cosine similarity. When the encoder
  returns fewer tokens than the DiT has, the release keeps the DiT's first ones; so do we, and
  we refuse an encoder with more tokens (the release would crash there). In practice the encoder
  should see the image at a size giving exactly the DiT's token grid (the release's DINOv2 wrapper
  resizes by 14/16 for that).
- Every random draw comes from one `torch.Generator` seeded by `seed`, so a run is reproducible,
  and goes through the small deterministic functions of `deco.optimized.flow` (`logit_normal_time`,
  `time_shift`, `drop_labels`, `interpolate`), which mirror `reference/flow.py`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_batch, check_label_range, check_text_batch
from .flow import (
    drop_text,
    flow_matching_loss,
    interpolate,
    logit_normal_time,
    null_where,
    target_velocity,
    time_shift,
    uniform_time,
)
from .frequency import checked_frequency_loss
from .gemm import Linear
from .model import DiffusionTransformer
from .train_config import TimeSampling, TrainConfig

__all__ = ["Draws", "NonFiniteLossError", "TimeSampling", "TrainConfig", "Trainer", "make_ema",
           "make_projector", "update_ema"]


class NonFiniteLossError(ValueError):
    """The loss or the gradient norm of a step is NaN or infinite; the weights were not updated."""


@dataclass
class Draws:
    """The random numbers of one step: label-dropout uniforms (B,), time draws (B,) (normal for
    logit-normal sampling, uniform otherwise) and the noise (B, C, H, W)."""

    label_uniform: Tensor
    time: Tensor
    noise: Tensor

    def micro(self, j: int, k: int) -> Draws:
        """The draws of micro-batch j of k: rows j, j + k, ... (see `Trainer.step`)."""
        if k == 1:
            return self
        return Draws(self.label_uniform[j::k], self.time[j::k], self.noise[j::k])


# ------------------------------------------------------------------------------------ EMA
@torch.no_grad()
def update_ema(ema: list[Tensor], params: list[Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, for all tensors in two fused (_foreach) ops."""
    params = [p if p.dtype == e.dtype else p.to(e.dtype) for e, p in zip(ema, params, strict=True)]
    torch._foreach_mul_(ema, decay)
    torch._foreach_add_(ema, params, alpha=1.0 - decay)


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of the model, float32 if the model is bf16/fp16 (the average of many small
    updates needs the precision)."""
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if next(ema.parameters()).dtype in (torch.bfloat16, torch.float16):
        ema.float()
    return ema


def make_projector(dim: int, hidden: int, out: int) -> nn.Sequential:
    """REPA's projection head from DiT tokens to encoder features (release: 3 linears, SiLU)."""
    return nn.Sequential(
        Linear(dim, hidden), nn.SiLU(), Linear(hidden, hidden), nn.SiLU(), Linear(hidden, out)
    )


# -------------------------------------------------------------------------------- trainer
@dataclass
class _Capture:
    tokens: list[Tensor] = field(default_factory=list)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.tokens.append(output[0] if isinstance(output, tuple) else output)


class Trainer:
    """Model, EMA, optional REPA projector, AdamW and the random generator of a training run.

    model: a `DeCo`/`BaselineDiT` (anything with `.config`, `.blocks` and forward(x, t, y)); its
    parameters' device is the run's, and their dtype too (at least float32: the draws and the
    loss arithmetic). encoder: optional frozen module mapping the clean images (B, 3, H, W) in
    [-1, 1] to features (B, N, repa_encoder_dim), doing its own normalisation and resizing (the
    release feeds DINOv2 ImageNet-normalised [0, 1] images); given, REPA is on. null_text: the
    null text embedding (T, E) that caption dropout substitutes, required for (and only for) a
    text-to-image model, whose condition y is text embeddings (B, T, E). net: what the
    forward pass calls, default the model itself; a wrapper of it such as DistributedDataParallel
    (which all-reduces the gradients in backward). Hooks, EMA and state_dict use the bare model.
    """

    def __init__(self, model: DiffusionTransformer, config: TrainConfig | None = None,
                 encoder: nn.Module | None = None, net: nn.Module | None = None, *,
                 null_text: Tensor | None = None) -> None:
        config = TrainConfig() if config is None else config
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model: expected a DeCo or BaselineDiT module, got {type(model).__name__}")
        if net is not None and not isinstance(net, nn.Module):
            raise TypeError(f"net: expected an nn.Module wrapping the model, got {type(net).__name__}")
        self.config = config
        self.model = model.train()
        self.net: nn.Module = self.model if net is None else net
        first = next(model.parameters())
        self.device = first.device
        self.dtype = first.dtype if first.dtype in (torch.float32, torch.float64) else torch.float32
        self.null_class: int = model.config.num_classes
        self.text = bool(getattr(model.config, "is_text", False))
        self.null_text = self._check_null_text(null_text)
        self.ema = make_ema(model)

        self.encoder = encoder
        self.projector: nn.Sequential | None = None
        if encoder is not None:
            depth = len(model.blocks)
            if not config.repa_layer <= depth:
                raise ValueError(f"repa_layer: expected a block index in 1..{depth}, got {config.repa_layer}")
            encoder.requires_grad_(False).eval()
            d = model.config.hidden_size
            hidden = d if config.repa_hidden is None else config.repa_hidden
            self.projector = make_projector(d, hidden, config.repa_encoder_dim)
            self.projector.to(device=self.device, dtype=self.dtype)

        params = [p for p in model.parameters() if p.requires_grad]
        if self.projector is not None:
            params += list(self.projector.parameters())
        self.params = params
        self.optimizer = torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, eps=config.eps,
            weight_decay=config.weight_decay,
            # The fused kernel: one pass over all parameters (on the CPU 13 ms against 30-40 ms
            # for the loop or foreach versions at DeCo-S size, measured with 2 threads).
            fused=self.device.type in ("cuda", "cpu"),
        )
        # Cached tensor lists for the fused EMA update (same order in the model and its copy),
        # trainable parameters only: a frozen one (a LoRA fine-tune's base) keeps its value.
        pairs = [(e, p) for e, p in zip(self.ema.parameters(), model.parameters(), strict=True)
                 if p.requires_grad]
        self._ema_params: list[Tensor] = [e for e, _ in pairs]
        self._model_params: list[Tensor] = [p for _, p in pairs]
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.step_count = 0

    def _check_null_text(self, null_text: Tensor | None) -> Tensor | None:
        """The null embedding (T, E) on the run's device and dtype; None for a class model."""
        if not self.text:
            if null_text is not None:
                raise ValueError("null_text: only a text-to-image model takes a null text embedding")
            return None
        cfg = self.model.config
        shape = (cfg.text_length, cfg.text_dim)
        if not isinstance(null_text, Tensor) or not null_text.is_floating_point():
            got = "None" if null_text is None else type(null_text).__name__
            raise TypeError(f"null_text: a text-to-image model needs the null text embedding, a "
                            f"floating-point tensor {shape}, got {got}")
        if tuple(null_text.shape) != shape:
            raise ValueError(f"null_text: expected shape {shape}, got {tuple(null_text.shape)}")
        return null_text.detach().to(self.device, self.dtype)

    # ---------------------------------------------------------------------------- pieces
    def draw(self, x: Tensor, shard: tuple[int, int] = (0, 1)) -> Draws:
        """Fresh draws for the batch x, from the trainer's generator.

        shard (rank, world): x is this process's share of a global batch of world * len(x)
        samples, rows rank, rank + world, ... (how deco.data.BatchStream splits a batch). Every
        process draws the whole global batch's randoms from the same generator and keeps its
        rows, so N processes follow the trajectory of one process on the global batch."""
        rank, world = shard
        if not (isinstance(rank, int) and isinstance(world, int) and 0 <= rank < world):
            raise ValueError(f"shard: expected (rank, world) with 0 <= rank < world, got {shard!r}")
        b, g, device, dtype = x.shape[0] * world, self.generator, self.device, self.dtype
        label_uniform = torch.rand(b, generator=g, device=device, dtype=dtype)
        if self.config.time_sampling == "logit_normal":
            time = torch.randn(b, generator=g, device=device, dtype=dtype)
        else:
            time = torch.rand(b, generator=g, device=device, dtype=dtype)
        noise = torch.randn((b, *x.shape[1:]), generator=g, device=device, dtype=dtype)
        if world == 1:
            return Draws(label_uniform, time, noise)
        return Draws(label_uniform[rank::world], time[rank::world], noise[rank::world])

    def times(self, draw: Tensor) -> Tensor:
        """Training times t (B,) from the time draws: logit-normal or uniform, then shifted."""
        cfg = self.config
        if cfg.time_sampling == "logit_normal":
            t = logit_normal_time(draw, cfg.time_mean, cfg.time_std)
        else:
            t = uniform_time(draw)
        return time_shift(t, cfg.timeshift)

    def _autocast(self) -> torch.autocast:
        cfg, kind = self.config, self.device.type
        enabled = (kind == "cuda" and cfg.bf16) or (kind == "cpu" and cfg.cpu_bf16)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def losses(self, x: Tensor, y: Tensor, draws: Draws) -> dict[str, Tensor]:
        """The loss terms (scalar tensors, differentiable) of one step on given draws."""
        x, y = self._check_batch(x, y)
        return self._losses(x, y, draws)

    def _losses(self, x: Tensor, y: Tensor, draws: Draws) -> dict[str, Tensor]:
        """`losses` on a batch `_check_batch` has checked and moved to the device (`step` checks
        the whole batch once, on the host, not each micro-batch again on the device)."""
        cfg = self.config
        b = x.shape[0]
        if (tuple(draws.label_uniform.shape), tuple(draws.time.shape)) != ((b,), (b,)) or (
            draws.noise.shape != x.shape
        ):
            raise ValueError(f"draws: expected label_uniform and time of shape ({b},) and noise of "
                             f"shape {tuple(x.shape)}")
        if self.null_text is not None:
            y = drop_text(y, draws.label_uniform, cfg.label_dropout, self.null_text)
        else:
            y = null_where(y, draws.label_uniform, cfg.label_dropout, self.null_class)
        t = self.times(draws.time)
        x_t = interpolate(x, draws.noise, t)
        v = target_velocity(x, draws.noise)
        capture = _Capture()
        handle = None
        if self.projector is not None:
            handle = self.model.blocks[cfg.repa_layer - 1].register_forward_hook(capture)
        try:
            with self._autocast():
                pred = self.net(x_t, t, y)
        finally:
            if handle is not None:
                handle.remove()
        fm = flow_matching_loss(pred, v)
        freq = checked_frequency_loss(pred, v, cfg.quality, cfg.gamma)
        loss = fm + cfg.freq_weight * freq
        repa = torch.zeros_like(loss)
        if self.projector is not None:
            repa = self._repa_loss(capture.tokens[0], x)
            loss = loss + cfg.repa_weight * repa
        return {"loss": loss, "fm": fm, "freq": freq, "repa": repa}

    def _repa_loss(self, tokens: Tensor, x: Tensor) -> Tensor:
        """mean over batch and tokens of 1 - cos(projector(DiT tokens), encoder features)."""
        assert self.encoder is not None and self.projector is not None
        with torch.no_grad(), self._autocast():
            target = self.encoder(x)
        b, n_dit = tokens.shape[:2]
        if target.ndim != 3 or target.shape[0] != b or target.shape[2] != self.config.repa_encoder_dim:
            raise ValueError(
                f"encoder: expected features (B={b}, N, {self.config.repa_encoder_dim}), "
                f"got {tuple(target.shape)}"
            )
        n = target.shape[1]
        if n > n_dit:
            raise ValueError(f"encoder: returned {n} tokens, more than the DiT's {n_dit}")
        with self._autocast():
            proj = self.projector(tokens[:, :n])  # the release keeps the first n DiT tokens
        cos = F.cosine_similarity(_at_least_float32(proj), _at_least_float32(target), dim=-1)
        return (1.0 - cos).mean()

    def _check_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not self.text:
            check_batch(x, y)
            # Checked here, on the batch as given (usually still on the CPU: no device sync),
            # since the model's forward checks no values.
            check_label_range("y", y, self.null_class)
            return x.to(self.device, self.dtype), y.to(self.device)
        check_text_batch(x, y, self.model.config.text_length, self.model.config.text_dim)
        return x.to(self.device, self.dtype), y.to(self.device, self.dtype)

    # ------------------------------------------------------------------------------ step
    def step(self, x: Tensor, y: Tensor, draws: Draws | None = None, *,
             accumulation: int = 1) -> dict[str, float]:
        """One optimisation step on the batch (x, y); draws default to fresh ones. Returns the
        loss terms before the update (averaged over micro-batches), the gradient norm before
        clipping, and the learning rate.

        accumulation k: the batch is processed as k micro-batches (rows j::k, j = 0..k-1) whose
        losses, each a mean over its rows, are averaged: with equal micro-batches that is the
        whole batch's mean, so the step is the same as with k = 1, in k times less memory.
        Under DDP the gradients are all-reduced once, after the last micro-batch.

        Raises NonFiniteLossError, without touching weights, optimizer or EMA, if the loss or the
        gradient norm is not finite."""
        x, y = self._check_batch(x, y)
        if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
            raise ValueError(f"accumulation: expected a positive int, got {accumulation!r}")
        if x.shape[0] % accumulation:
            raise ValueError(f"accumulation: the batch of {x.shape[0]} rows does not split into "
                             f"{accumulation} equal micro-batches")
        draws = self.draw(x) if draws is None else draws
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        names = ["loss", "fm", "freq", "repa"]
        total = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        for j in range(accumulation):
            last = j == accumulation - 1
            no_sync = getattr(self.net, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                terms = self._losses(x[j::accumulation], y[j::accumulation], draws.micro(j, accumulation))
                torch.autograd.backward(terms["loss"] / accumulation)
            total += torch.stack([terms[k].detach().double() for k in names]) / accumulation
        max_norm = math.inf if self.config.grad_clip is None else self.config.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # One device sync per step: every logged number in a single transfer.
        values = torch.cat([total, grad_norm.double().reshape(1)]).tolist()
        logs = dict(zip([*names, "grad_norm"], values, strict=True))
        if not (math.isfinite(logs["loss"]) and math.isfinite(logs["grad_norm"])):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"step {self.step_count}: non-finite loss {logs['loss']} or gradient norm "
                f"{logs['grad_norm']}; the weights were not updated"
            )
        self.optimizer.step()
        update_ema(self._ema_params, self._model_params, self.config.ema_decay)
        with torch.no_grad():
            for ema_buffer, buffer in zip(self.ema.buffers(), self.model.buffers(), strict=True):
                ema_buffer.copy_(buffer)
        self.step_count += 1
        logs["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return logs

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: weights, EMA, optimizer, projector, step, RNG."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "projector": None if self.projector is None else self.projector.state_dict(),
            "step": self.step_count,
            "generator": self.generator.get_state(),
            "train_config": self.config.to_dict(),  # informational, not loaded
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"model", "ema", "optimizer", "projector", "step", "generator"} - set(state)
        if missing:
            raise ValueError(f"state: missing entries {sorted(missing)}")
        if (state["projector"] is None) != (self.projector is None):
            raise ValueError("state: REPA projector present in exactly one of the state and the trainer")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if self.projector is not None:
            self.projector.load_state_dict(state["projector"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()

