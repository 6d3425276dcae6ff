"""`deco.config`: presets, validation, (de)serialisation and config inference from weight shapes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deco.config import (
    PRESETS,
    DeCoConfig,
    config_from_dict,
    config_to_dict,
    parameter_count,
    parameter_shapes,
)
from deco.release import check_shapes, infer_config


def test_release_preset_parameter_counts() -> None:
    # Counted from the release's model classes (the numbers).
    assert parameter_count(PRESETS["DeCo-XL/16"]) == 682_282_851
    assert parameter_count(PRESETS["DeCo-L/16"]) == 426_938_019


def test_parameter_count_is_the_sum_of_shapes() -> None:
    cfg = PRESETS["DeCo-tiny/4"]
    h, w, p, d = 64, 16, 4, 170  # hidden, decoder width, patch, SwiGLU width int(2 * 256 / 3)
    block = h + 3 * h * h + 2 * 16 + h * h + h + h + 2 * d * h + h * d + 6 * h * h + 6 * h
    dec_block = 2 * w + w * w + w + w * w + w + 3 * w * w + 3 * w
    expected = (h * 256 + h + h * h + h + 11 * h + h * 3 * p * p + h + 3 * block
                + w * (3 + 64) + w + p * p * w * h + p * p * w + w * w + w + 2 * dec_block + 3 * w + 3)
    assert cfg.mlp_hidden == d
    assert parameter_count(cfg) == expected


def test_presets_are_valid_and_named_consistently() -> None:
    for name, cfg in PRESETS.items():
        assert cfg.architecture in (("deco", "t2i") if name.startswith("DeCo") else ("baseline",))
        assert name.endswith(f"/{cfg.patch_size}")
        assert infer_config(parameter_shapes(cfg)) == cfg
    assert DeCoConfig.preset("DeCo-S/16", num_classes=10).num_classes == 10


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"architecture": "unet"}, "architecture"),
        ({"in_channels": 0}, "in_channels"),
        ({"patch_size": -1}, "patch_size"),
        ({"patch_size": 2.0}, "patch_size"),
        ({"depth": True}, "depth"),
        ({"num_classes": 0}, "num_classes"),
        ({"decoder_depth": 0}, "decoder_depth"),
        ({"decoder_width": 0}, "decoder_width"),
        ({"hidden_size": 100, "num_heads": 3}, "hidden_size"),
        ({"hidden_size": 24, "num_heads": 4}, r"hidden_size/num_heads"),  # head dim 6: not /4
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}:"):
        dataclasses.replace(PRESETS["DeCo-tiny/4"], **kwargs)


def test_baseline_ignores_decoder_fields() -> None:
    cfg = DeCoConfig("baseline", 3, 4, 64, 4, 2, 0, 0, 10)
    assert not any(k.startswith("decoder.") for k in parameter_shapes(cfg))
    assert "head.linear.weight" in parameter_shapes(cfg)


def test_preset_and_json_errors() -> None:
    with pytest.raises(ValueError, match=r"^preset:"):
        DeCoConfig.preset("DeCo-H/2")
    with pytest.raises(ValueError, match=r"^config:"):
        DeCoConfig.from_json("{not json")
    with pytest.raises(ValueError, match=r"^config:"):
        DeCoConfig.from_json("[1, 2]")
    with pytest.raises(ValueError, match=r"^config:"):
        DeCoConfig.from_json('{"hidden": 3}')


CONFIGS = st.builds(
    lambda arch, c, p, heads, hd, depth, dd, dw, nc, ratio: DeCoConfig(
        arch, c if arch == "deco" else 3, p, heads * hd, heads, depth,
        dd if arch == "deco" else 0, dw if arch == "deco" else 0, nc, ratio),
    st.sampled_from(["deco", "baseline"]), st.integers(1, 4), st.integers(1, 8), st.integers(1, 6),
    st.sampled_from([4, 8, 12, 16, 64]), st.integers(1, 4), st.integers(1, 3), st.integers(1, 40),
    st.integers(1, 1000), st.sampled_from([4.0, 4.0, 2.0, 3.0, 2.5, 1.5, 6.0]),
)


@settings(max_examples=40, deadline=None)
@given(cfg=CONFIGS)
def test_json_round_trip(cfg: DeCoConfig) -> None:
    assert DeCoConfig.from_json(cfg.to_json()) == cfg
    assert DeCoConfig.from_dict(cfg.to_dict()) == cfg


@settings(max_examples=40, deadline=None)
@given(cfg=CONFIGS)
def test_infer_config_from_shapes(cfg: DeCoConfig) -> None:
    shapes = parameter_shapes(cfg)
    inferred = infer_config(shapes)
    # mlp_ratio is only recorded through the SwiGLU width int(2 int(h r) / 3), which several ratios
    # share; the inferred config must give exactly the same shapes, and be equal for the release's 4.
    assert parameter_shapes(inferred) == shapes
    if cfg.mlp_ratio == 4.0:
        assert inferred == cfg
    else:
        assert dataclasses.replace(inferred, mlp_ratio=cfg.mlp_ratio) == cfg
    assert inferred.architecture == cfg.architecture  # baseline and DeCo are told apart


def test_check_shapes_errors() -> None:
    cfg = PRESETS["DeCo-tiny/4"]
    shapes = dict(parameter_shapes(cfg))
    shapes["blocks.0.attn.proj.bias"] = (3,)
    with pytest.raises(ValueError, match=r"^weights: blocks\.0\.attn\.proj\.bias"):
        check_shapes(cfg, shapes)
    with pytest.raises(ValueError, match=r"^weights:"):
        check_shapes(PRESETS["DiT-tiny/4"], parameter_shapes(cfg))
    with pytest.raises(ValueError, match=r"^checkpoint:"):
        infer_config({"something.weight": (3, 3)})


TEXT_CONFIGS = st.builds(
    lambda c, p, heads, hd, depth, dd, dw, ratio, td, te, tl: DeCoConfig(
        "t2i", c, p, heads * hd, heads, depth, dd, dw, 0, ratio, td, te, tl),
    st.integers(1, 4), st.integers(1, 8), st.integers(1, 6), st.sampled_from([4, 8, 12, 16]),
    st.integers(1, 4), st.integers(1, 3), st.integers(1, 40), st.sampled_from([4.0, 2.0, 3.0, 2.5]),
    st.integers(1, 4), st.integers(1, 100), st.integers(1, 130),
)


@settings(max_examples=25, deadline=None)
@given(cfg=TEXT_CONFIGS)
def test_infer_text_config_from_shapes(cfg: DeCoConfig) -> None:
    # The text model's SwiGLU width int(h r) has no 2/3 factor, so the inferred ratio gives the
    # same shapes; for the release's ratio 4 the whole config is recovered.
    inferred = infer_config(parameter_shapes(cfg))
    assert parameter_shapes(inferred) == parameter_shapes(cfg)
    assert dataclasses.replace(inferred, mlp_ratio=cfg.mlp_ratio) == cfg


def test_infer_text_config_errors() -> None:
    shapes = dict(parameter_shapes(PRESETS["DeCo-T2I-tiny/4"]))
    del shapes["text_pos_embed"]
    with pytest.raises(ValueError, match=r"^checkpoint: missing core text-to-image"):
        infer_config(shapes)
    shapes = dict(parameter_shapes(PRESETS["DeCo-T2I-tiny/4"]))
    shapes["blocks.1.attn.kv_text.weight"] = (64, 64)
    with pytest.raises(ValueError, match=r"^weights: blocks\.1\.attn\.kv_text\.weight"):
        infer_config(shapes)


# ----------------------------------------------------------------------------- one serializer
@dataclasses.dataclass(frozen=True)
class _Inner:
    pair: tuple[float, float] = (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class _Outer:
    path: Path | None = None
    rows: tuple[tuple[int, ...], ...] = ((1, 2), (3,))
    inner: _Inner | None = None
    name: str = "x"


def test_config_serializer_converts_by_the_field_types() -> None:
    outer = _Outer(Path("a/b"), ((4,), (5, 6)), _Inner((0.1, 0.9)))
    data = config_to_dict(outer)
    assert data == {"path": "a/b", "rows": [[4], [5, 6]], "inner": {"pair": [0.1, 0.9]}, "name": "x"}
    assert json.loads(json.dumps(data)) == data  # plain JSON types
    assert config_from_dict(_Outer, data) == outer
    assert config_from_dict(_Outer, {"inner": None}) == _Outer()  # missing fields: defaults
    with pytest.raises(TypeError, match="unknown"):
        config_from_dict(_Outer, {"unknown": 1})
