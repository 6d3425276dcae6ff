"""ONNX symbolics for the TorchScript exporter (deco.deploy.export), written for what the model
uses: `rms_norm` (no built-in symbolic), `layer_norm` over the last axis with a traced normalized
shape (as ONNX's LayerNormalization op), `linspace` (the built-in one returns NaN for one step)
and an `addcmul` that keeps a float16/bfloat16 graph in its dtype (the built-in one multiplies
by a float32 constant).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.onnx import symbolic_helper, utils


def _check_last_axis(normalized_shape: Any, op: str) -> None:
    node = normalized_shape.node()
    if node.kind() == "prim::ListConstruct":
        count = len(list(node.inputs()))
    else:
        count = len(symbolic_helper._maybe_get_const(normalized_shape, "is"))
    if count != 1:
        raise ValueError(f"model: {op} over {count} axes is not supported by the ONNX export")


def _mean_last(g: Any, x: Any) -> Any:
    if g.opset >= 18:  # ReduceMean takes its axes as an input from opset 18 on
        axes = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.long))
        return g.op("ReduceMean", x, axes, keepdims_i=1)
    return g.op("ReduceMean", x, axes_i=[-1], keepdims_i=1)


def _eps(g: Any, eps: Any, like: Any) -> Any:
    value = symbolic_helper._maybe_get_const(eps, "f")
    return g.op("CastLike", g.op("Constant", value_t=torch.tensor(float(value))), like)


def _rms_norm(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    """x / sqrt(mean(x^2) + eps) * weight; onnxruntime fuses this pattern into one kernel."""
    _check_last_axis(normalized_shape, "rms_norm")
    square = g.op("Pow", x, g.op("CastLike", g.op("Constant", value_t=torch.tensor(2.0)), x))
    out = g.op("Div", x, g.op("Sqrt", g.op("Add", _mean_last(g, square), _eps(g, eps, x))))
    return out if symbolic_helper._is_none(weight) else g.op("Mul", out, weight)


def _layer_norm(g: Any, x: Any, normalized_shape: Any, weight: Any, bias: Any, eps: Any,
                cudnn_enable: Any) -> Any:
    """ONNX's LayerNormalization (opset 17) over the last axis: one kernel in onnxruntime, where
    the decomposed mean/centre/variance/divide chain makes six passes over the activations (the
    pixel decoder's are (N*P, w) with N*P = 65536 at 256x256). Without a weight its required
    Scale input is ones of the last axis' (run-time) size."""
    _check_last_axis(normalized_shape, "layer_norm")
    value = float(symbolic_helper._maybe_get_const(eps, "f"))
    if symbolic_helper._is_none(weight):
        last = g.op("Slice", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([-1])),
                    g.op("Constant", value_t=torch.tensor([torch.iinfo(torch.int64).max])))
        weight = g.op("CastLike", g.op("ConstantOfShape", last, value_t=torch.tensor([1.0])), x)
    inputs = [x, weight] if symbolic_helper._is_none(bias) else [x, weight, bias]
    return g.op("LayerNormalization", *inputs, axis_i=-1, epsilon_f=value)


def _addcmul(g: Any, x: Any, t1: Any, t2: Any, value: Any) -> Any:
    """x + value t1 t2 in the inputs' own type. The exporter's symbolic multiplies by `value` as
    a float32 constant, which turns every float16/bfloat16 AdaLN modulation (and all that
    follows it) into float32."""
    product = g.op("Mul", t1, t2)
    scale = symbolic_helper._maybe_get_const(value, "f")
    if not isinstance(scale, (int, float)):
        product = g.op("Mul", product, g.op("CastLike", value, product))
    elif scale != 1:
        product = g.op("Mul", product, g.op("CastLike", g.op(
            "Constant", value_t=torch.tensor(float(scale))), product))
    return g.op("Add", x, product)


_ONNX_FLOAT, _ONNX_INT64, _ONNX_DOUBLE = 1, 7, 11  # onnx.TensorProto data types
_TORCH_TO_ONNX = {6: _ONNX_FLOAT, 7: _ONNX_DOUBLE}  # torch ScalarType codes: float, double


def _linspace(g: Any, start: Any, end: Any, steps: Any, dtype: Any, layout: Any, device: Any,
              pin_memory: Any) -> Any:
    """start + i (end - start) / max(steps - 1, 1), computed in double and cast.

    The exporter's own linspace divides by steps - 1, which is 0 for a one-row or one-column
    token grid (the RoPE positions): with a dynamic grid size that is inf * 0 = NaN at run time,
    whereas torch returns [start]."""
    code = symbolic_helper._maybe_get_const(dtype, "i")
    target = _ONNX_FLOAT if symbolic_helper._is_none(dtype) else _TORCH_TO_ONNX.get(code)
    if target is None:
        raise ValueError(f"model: linspace of dtype code {code} is not supported by the ONNX export")
    one = g.op("Constant", value_t=torch.tensor(1, dtype=torch.int64))
    count = g.op("Cast", steps, to_i=_ONNX_INT64)
    index = g.op("Range", g.op("Constant", value_t=torch.tensor(0, dtype=torch.int64)), count, one)
    first = g.op("Cast", start, to_i=_ONNX_DOUBLE)
    span = g.op("Sub", g.op("Cast", end, to_i=_ONNX_DOUBLE), first)
    step = g.op("Div", span, g.op("Cast", g.op("Max", g.op("Sub", count, one), one), to_i=_ONNX_DOUBLE))
    out = g.op("Add", g.op("Mul", g.op("Cast", index, to_i=_ONNX_DOUBLE), step), first)
    return g.op("Cast", out, to_i=target)


@contextlib.contextmanager
def symbolics(opset: int) -> Iterator[None]:
    """Register our symbolics for the duration of one export (they are global state)."""
    pairs: list[tuple[str, Callable[..., Any]]] = [
        ("aten::rms_norm", _rms_norm), ("aten::layer_norm", _layer_norm),
        ("aten::linspace", _linspace), ("aten::addcmul", _addcmul)]
    for name, fn in pairs:
        utils.register_custom_op_symbolic(name, fn, opset)
    try:
        yield
    finally:
        for name, _ in pairs:
            utils.unregister_custom_op_symbolic(name, opset)
