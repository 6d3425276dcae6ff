"""`TrainConfig`: the hyper-parameters of the training step (spec/01-flow-matching.md §6,
spec/02-frequency-loss.md), validated once, here, where they enter; `deco.optimized.trainer.Trainer`
and the loss it calls use them unchecked. Also importable as `deco.optimized.trainer.TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from deco.config import FREQ_GAMMA, JPEG_QUALITY, config_from_dict, config_to_dict
from deco.errors import (
    FieldError,
    field_finite,
    field_int,
    field_non_negative,
    field_positive,
    field_probability,
)

TimeSampling = Literal["logit_normal", "uniform"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the training step, validated once, here. Defaults are the release's
    class-to-image recipe, except `grad_clip` (see deco.optimized.trainer).
    `deco.train.run_config.RunConfig` contains one."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's defaults: the release passes none
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping (the release)
    ema_decay: float = 0.9999
    label_dropout: float = 0.1  # P(label -> null class); the release's DeCo-XL configs use 0.2
    time_sampling: TimeSampling = "logit_normal"
    time_mean: float = 0.0  # logit-normal location and scale
    time_std: float = 1.0
    timeshift: float = 1.0  # s > 1 moves training times towards noise
    freq_weight: float = 1.0  # lambda of the frequency-aware loss
    quality: int = JPEG_QUALITY  # JPEG quality of the frequency weights
    gamma: float = FREQ_GAMMA  # exponent of the frequency weights
    repa_weight: float = 0.5  # used only when the Trainer is given an encoder
    repa_layer: int = 8  # 1-based index of the DiT block whose output tokens are aligned
    repa_encoder_dim: int = 768  # feature width of the encoder (768: DINOv2-B)
    repa_hidden: int | None = None  # projector width; None: the model's hidden size (release)
    bf16: bool = True  # bf16 autocast on CUDA; ignored on other devices
    # bf16 autocast on the CPU (the release's bf16-mixed): ~2x faster products where the CPU has
    # native bf16 (AVX512-BF16, AMX: bench/RESULTS.md §9), slower where it emulates them
    cpu_bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        field_positive(self, "lr", "eps", "time_std", "timeshift")
        field_non_negative(self, "weight_decay", "freq_weight", "repa_weight")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise FieldError("betas", f"expected two floats in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None:
            field_positive(self, "grad_clip")
        field_probability(self, "ema_decay", "label_dropout")
        if self.time_sampling not in ("logit_normal", "uniform"):
            raise FieldError("time_sampling",
                             f"expected 'logit_normal' or 'uniform', got {self.time_sampling!r}")
        field_finite(self, "time_mean", "gamma")
        field_int(self, "quality", 1, 100)
        field_int(self, "repa_layer", 1)
        field_int(self, "repa_encoder_dim", 1)
        if self.repa_hidden is not None:
            field_int(self, "repa_hidden", 1)
        field_int(self, "seed", 0)
        for name in ("bf16", "cpu_bf16"):
            if not isinstance(getattr(self, name), bool):
                raise FieldError(name, f"expected a bool, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON types (`deco.config.config_to_dict`: betas as a list)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of `to_dict` (`deco.config.config_from_dict`)."""
        return config_from_dict(cls, data)
