"""The ports that ship with the conformance kit (deco.conformance): the float64 reference, the
optimized PyTorch model in float64 and float32, and an exported ONNX graph (the forward passes
only: `forward` of a class graph, `t2i_forward` of a text graph).

`ReferencePort` is also the source of every vector: expected outputs are what it returns.

The optimized ports import `deco.optimized` (and with it torch) inside their methods, and the ONNX
port onnxruntime: the kit, its vectors and the reference port run where only NumPy and SciPy
exist, as a porter's machine may.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from deco import reference as ref
from deco.config import DeCoConfig
from deco.conformance.stage_ports import OptimizedStages, ReferenceStages, TorchVelocity
from deco.reference import model as ref_model
from deco.reference import sampling as ref_sampling
from deco.reference import text_to_image as ref_t2i

Array = NDArray[Any]
Precision = Literal["float64", "float32"]


class ReferencePort(ReferenceStages):
    """The protocol implemented by `deco.reference` (float64): the source of every vector."""

    precision: Precision = "float64"

    rgb_to_ycbcr = staticmethod(ref.rgb_to_ycbcr)
    block_dct = staticmethod(ref.block_dct)
    frequency_weights = staticmethod(ref.frequency_weights)
    frequency_aware_loss = staticmethod(ref.frequency_aware_loss)
    timestep_features = staticmethod(ref_model.timestep_features)
    rope_angles = staticmethod(ref_model.rope_angles)
    apply_rope = staticmethod(ref_model.apply_rope)
    dct_position_features = staticmethod(ref_model.dct_position_features)
    text_rope_angles = staticmethod(ref_t2i.text_rope_angles)
    text_position_features = staticmethod(ref_t2i.text_position_features)
    time_grid = staticmethod(ref.time_grid)
    adams_weights = staticmethod(ref_sampling.adams_weights)

    @staticmethod
    def dit_block(x: Array, c: Array, weights: Mapping[str, Array], num_heads: int,
                  angles: Array) -> Array:
        return ref_model.dit_block(x, c, _prefixed(weights, "blocks.0."), 0, num_heads, angles)

    @staticmethod
    def decoder_block(x: Array, cond: Array, weights: Mapping[str, Array]) -> Array:
        return ref_model.decoder_block(x, cond, _prefixed(weights, "decoder.blocks.0."), 0)

    @staticmethod
    def text_embedding(text: Array, weights: Mapping[str, Array]) -> Array:
        return ref_t2i.text_embedding(text, _prefixed(weights, ""))

    @staticmethod
    def text_refine_block(x: Array, c: Array, weights: Mapping[str, Array], num_heads: int) -> Array:
        return ref_t2i.text_refine_block(x, c, _prefixed(weights, "text_blocks.0."), 0, num_heads)

    @staticmethod
    def joint_dit_block(x: Array, text: Array, c: Array, weights: Mapping[str, Array],
                        num_heads: int, angles: Array) -> Array:
        return ref_t2i.joint_dit_block(x, text, c, _prefixed(weights, "blocks.0."), 0, num_heads,
                                       angles)

    @staticmethod
    def forward(config: dict[str, Any], weights: Mapping[str, Array], x: Array, t: Array,
                y: Array) -> Array:
        return ref.Model(DeCoConfig.from_dict(config), weights).forward(x, t, y)

    @staticmethod
    def t2i_forward(config: dict[str, Any], weights: Mapping[str, Array], x: Array, t: Array,
                    text: Array) -> Array:
        cfg = _text_config(config)
        return ref_t2i.t2i_forward(x, t, text, cfg, ref.Model(cfg, weights).weights)

    @staticmethod
    def euler(model: Any, noise: Array, labels: Array, steps: int, timeshift: float,
              guidance: float, interval: tuple[float, float]) -> Array:
        grid = ref.time_grid(steps, timeshift)
        return ref_sampling.euler(model, noise, labels, grid, guidance, interval)

    @staticmethod
    def heun(model: Any, noise: Array, labels: Array, steps: int, timeshift: float,
             guidance: float, interval: tuple[float, float], exact: bool) -> Array:
        grid = ref.time_grid(steps, timeshift)
        return ref_sampling.heun(model, noise, labels, grid, guidance, interval, exact=exact)

    @staticmethod
    def adams(model: Any, noise: Array, cond: Array, null: Array | None, steps: int,
              timeshift: float, guidance: float, interval: tuple[float, float], order: int) -> Array:
        # `sample` broadcasts a (T, E) null text over the batch and checks the condition.
        return ref_sampling.sample(model, noise, cond, null, steps=steps, guidance=guidance,
                                   interval=interval, timeshift=timeshift, solver="adams",
                                   order=order)


def _prefixed(weights: Mapping[str, Array], prefix: str) -> dict[str, Array]:
    """Block-local weights as float64 under the model's names (`prefix` + name)."""
    return {f"{prefix}{k}": np.asarray(w, np.float64) for k, w in weights.items()}


def _text_config(config: dict[str, Any]) -> DeCoConfig:
    """The config of a `t2i_forward` vector, which must be a text model's."""
    cfg = DeCoConfig.from_dict(config)
    if not cfg.is_text:
        raise ValueError(f"config: t2i_forward needs architecture 't2i', got {cfg.architecture!r}")
    return cfg


class OnnxPort:
    """The forward passes only (`forward`, `t2i_forward`), by an exported graph
    (`deco.deploy.runtime.OnnxVelocityModel`). The graph must hold the vector's weights
    (`deco conformance --export-vector-model`); vectors of another config are skipped."""

    precision: Precision = "float32"

    def __init__(self, model: Any) -> None:
        self.model = model

    def forward(self, config: dict[str, Any], weights: Mapping[str, Array], x: Array, t: Array,
                y: Array) -> Array:
        self._same_config(config)
        return np.asarray(self.model.forward(x, t, y))

    def t2i_forward(self, config: dict[str, Any], weights: Mapping[str, Array], x: Array, t: Array,
                    text: Array) -> Array:
        self._same_config(config)
        return np.asarray(self.model.forward(x, t, text))

    def _same_config(self, config: dict[str, Any]) -> None:
        if DeCoConfig.from_dict(config) != self.model.config:
            raise NotImplementedError(
                f"the graph is a {self.model.config.architecture} model of another config")


class OptimizedPort(OptimizedStages):
    """The protocol implemented by `deco.optimized` (PyTorch, CPU) in float64; `OptimizedPort32`
    runs it in float32. Each function calls the optimized module that does the work in the
    model (layers, loss, sampling), so the kit checks the code that trains and samples."""

    precision: Precision = "float64"

    def __init__(self) -> None:
        import torch  # here: the kit runs without torch (module docstring)

        self.torch = torch
        self.dtype = torch.float64 if self.precision == "float64" else torch.float32

    def _t(self, a: Any) -> Any:
        return self.torch.as_tensor(np.asarray(a), dtype=self.dtype)

    def _np(self, x: Any) -> Array:
        return np.asarray(x.detach().double().numpy())

    def _load(self, module: Any, weights: Mapping[str, Array]) -> Any:
        state = {k: self._t(v) for k, v in weights.items()}
        module.to(self.dtype).load_state_dict(state, strict=True)
        return module.eval()

    def rgb_to_ycbcr(self, x: Array) -> Array:
        from deco.optimized.frequency import (
            rgb_to_ycbcr,  # here: the kit runs without torch (module docstring)
        )

        return self._np(rgb_to_ycbcr(self._t(x)))

    def block_dct(self, x: Array) -> Array:
        from deco.optimized.frequency import block_dct  # here: the kit runs without torch (module docstring)

        return self._np(block_dct(self._t(x)))

    def frequency_weights(self, quality: int, gamma: float) -> Array:
        from deco.optimized.frequency import (
            frequency_weights,  # here: the kit runs without torch (module docstring)
        )

        return self._np(frequency_weights(quality, gamma, dtype=self.dtype))

    def frequency_aware_loss(self, pred: Array, target: Array, quality: int, gamma: float) -> float:
        from deco.optimized.frequency import (
            frequency_aware_loss,  # here: the kit runs without torch (module docstring)
        )

        return float(frequency_aware_loss(self._t(pred), self._t(target), quality, gamma))

    def timestep_features(self, t: Array) -> Array:
        from deco.optimized.layers import (
            timestep_features,  # here: the kit runs without torch (module docstring)
        )

        return self._np(timestep_features(self._t(t), self.dtype))

    def rope_angles(self, grid_h: int, grid_w: int, head_dim: int) -> Array:
        from deco.optimized.layers import rope_angles  # here: the kit runs without torch (module docstring)

        return self._angles(rope_angles(grid_h, grid_w, head_dim, self.torch.device("cpu"), self.dtype))

    def text_rope_angles(self, grid_h: int, grid_w: int, head_dim: int) -> Array:
        from deco.optimized.layers import (
            text_rope_angles,  # here: the kit runs without torch (module docstring)
        )

        return self._angles(text_rope_angles(grid_h, grid_w, head_dim, self.torch.device("cpu"),
                                             self.dtype))

    def _angles(self, tables: tuple[Any, Any]) -> Array:
        """(L, d_h/2) angles from the model's (cos, sin) tables (L, 1, d_h/2); the kit compares
        angles modulo 2 pi, so atan2's branch does not matter."""
        cos, sin = tables
        return self._np(self.torch.atan2(sin, cos)[:, 0, :])

    def apply_rope(self, x: Array, angles: Array) -> Array:
        from deco.optimized.layers import apply_rope  # here: the kit runs without torch (module docstring)

        a = self._t(angles)[:, None, :]
        return self._np(apply_rope(self._t(x), self.torch.cos(a), self.torch.sin(a)))

    def dit_block(self, x: Array, c: Array, weights: Mapping[str, Array], num_heads: int,
                  angles: Array) -> Array:
        from deco.optimized.layers import DiTBlock  # here: the kit runs without torch (module docstring)

        width, mlp_hidden = weights["mlp.w1.weight"].shape[1], weights["mlp.w1.weight"].shape[0]
        block = self._load(DiTBlock(width, num_heads, mlp_hidden), weights)
        a = self._t(angles)[:, None, :]
        with self.torch.no_grad():
            return self._np(block(self._t(x), self._t(c), self.torch.cos(a), self.torch.sin(a)))

    def _text_block(self, weights: Mapping[str, Array], num_heads: int, joint: bool) -> Any:
        """A text-model DiTBlock (fused SwiGLU) holding `weights`: mlp.w3 is (D, F)."""
        from deco.optimized.layers import DiTBlock  # here: the kit runs without torch (module docstring)

        width, mlp_hidden = weights["mlp.w3.weight"].shape
        block = DiTBlock(width, num_heads, mlp_hidden, joint=joint, fused_mlp=True)
        return self._load(block, weights)

    def text_refine_block(self, x: Array, c: Array, weights: Mapping[str, Array],
                          num_heads: int) -> Array:
        block = self._text_block(weights, num_heads, joint=False)
        with self.torch.no_grad():
            return self._np(block(self._t(x), self._t(c), None, None))

    def joint_dit_block(self, x: Array, text: Array, c: Array, weights: Mapping[str, Array],
                        num_heads: int, angles: Array) -> Array:
        block = self._text_block(weights, num_heads, joint=True)
        a = self._t(angles)[:, None, :]
        with self.torch.no_grad():
            return self._np(block(self._t(x), self._t(c), self.torch.cos(a), self.torch.sin(a),
                                  self._t(text)))

    def text_embedding(self, text: Array, weights: Mapping[str, Array]) -> Array:
        from deco.optimized.text_to_image import (
            TextEmbedder,  # here: the kit runs without torch (module docstring)
        )

        width, text_dim = weights["text_embed.weight"].shape
        local = {k.removeprefix("text_embed."): v for k, v in weights.items() if k != "text_pos_embed"}
        embedder = self._load(TextEmbedder(text_dim, width), local)
        with self.torch.no_grad():  # as TextDeCo.condition: embedder, then the position table
            return self._np(embedder(self._t(text)) + self._t(weights["text_pos_embed"]))

    def text_position_features(self, patch_size: int) -> Array:
        from deco.optimized.layers import (
            text_position_features,  # here: the kit runs without torch (module docstring)
        )

        return self._np(text_position_features(patch_size, self.torch.device("cpu"), self.dtype))

    def dct_position_features(self, patch_size: int) -> Array:
        from deco.optimized.layers import (
            dct_position_features,  # here: the kit runs without torch (module docstring)
        )

        return self._np(dct_position_features(patch_size, self.torch.device("cpu"), self.dtype))

    def decoder_block(self, x: Array, cond: Array, weights: Mapping[str, Array]) -> Array:
        from deco.optimized.layers import DecoderBlock  # here: the kit runs without torch (module docstring)

        width = x.shape[-1]
        block = self._load(DecoderBlock(width), weights)
        f = self.torch.nn.functional
        with self.torch.no_grad():
            # The pixel decoder applies SiLU to the condition once and the block's adaln (with
            # the LayerNorm affine folded in) to the result; the spec's block does both.
            mod = f.linear(f.silu(self._t(cond).reshape(-1, width)), *block.modulation_weights())
            return self._np(block(self._t(x).reshape(-1, width), mod).reshape(x.shape))

    def forward(self, config: dict[str, Any], weights: Mapping[str, Array], x: Array, t: Array,
                y: Array) -> Array:
        from deco.optimized.weights import build_model  # here: the kit runs without torch (module docstring)

        model = self._load(build_model(DeCoConfig.from_dict(config)), weights)
        with self.torch.no_grad():
            return self._np(model(self._t(x), self._t(t), self.torch.as_tensor(y)))

    def t2i_forward(self, config: dict[str, Any], weights: Mapping[str, Array], x: Array, t: Array,
                    text: Array) -> Array:
        from deco.optimized.weights import build_model  # here: the kit runs without torch (module docstring)

        model = self._load(build_model(_text_config(config)), weights)
        with self.torch.no_grad():
            return self._np(model(self._t(x), self._t(t), self._t(text)))

    def time_grid(self, steps: int, timeshift: float) -> Array:
        from deco.optimized.sampling import time_grid  # here: the kit runs without torch (module docstring)

        return np.asarray(time_grid(steps, timeshift))

    def _sample(self, model: Any, noise: Array, cond: Array, steps: int, timeshift: float,
                guidance: float, interval: tuple[float, float], solver: str, *, exact: bool = False,
                null: Array | None = None, order: int = 2) -> Array:
        from deco.optimized.sampling import sample  # here: the kit runs without torch (module docstring)

        is_text = model.config.is_text  # text (B, T, E) in the model's dtype, else int labels
        convert = self._t if is_text else self.torch.as_tensor
        out = sample(TorchVelocity(model, self.torch), self._t(noise), convert(cond),
                     None if null is None else convert(null), steps=steps, guidance=guidance,
                     interval=interval, timeshift=timeshift, solver=solver, exact_heun=exact,
                     order=order)
        assert isinstance(out, self.torch.Tensor)
        return self._np(out)

    def euler(self, model: Any, noise: Array, labels: Array, steps: int, timeshift: float,
              guidance: float, interval: tuple[float, float]) -> Array:
        return self._sample(model, noise, labels, steps, timeshift, guidance, interval, "euler")

    def heun(self, model: Any, noise: Array, labels: Array, steps: int, timeshift: float,
             guidance: float, interval: tuple[float, float], exact: bool) -> Array:
        return self._sample(model, noise, labels, steps, timeshift, guidance, interval, "heun",
                            exact=exact)

    def adams_weights(self, grid: Array, order: int) -> list[list[float]]:
        from deco.optimized.sampling import (
            adams_weights,  # here: the kit runs without torch (module docstring)
        )

        return adams_weights([float(t) for t in grid], order)

    def adams(self, model: Any, noise: Array, cond: Array, null: Array | None, steps: int,
              timeshift: float, guidance: float, interval: tuple[float, float], order: int) -> Array:
        return self._sample(model, noise, cond, steps, timeshift, guidance, interval, "adams",
                            null=null, order=order)


class OptimizedPort32(OptimizedPort):
    precision: Precision = "float32"
