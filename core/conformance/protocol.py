"""The port protocol's data (deco.conformance): a vector, the sampler `model` a port is handed,
how a port's function is looked up, and the calling code of the components that exist for the
domain and stage vectors (flow matching, the time shift, the loss's padding and weighted error,
guidance, one sampler update). The calling code of the original components is `kit.CALLERS`,
which includes these.

A caller takes (port, vector, all vectors by name) and returns the port's answer in the shape of
the vector's `expected`; a port without the function raises `Skip` (reported as skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from deco import reference as ref
from deco.config import DeCoConfig

Array = NDArray[Any]


@dataclass(frozen=True)
class Vector:
    """One test vector: the arguments of one call of `component` and the reference's answer.
    `domain` says which region of the spec's domain the vector covers (shown by `--list`);
    `stage_of` names the composite vector (a loss or a sampler) whose intermediate stage this
    vector checks, on the same inputs."""

    name: str
    component: str
    inputs: dict[str, Array]
    args: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Array] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    velocity_model: str | None = None  # samplers: name of the forward vector giving the model
    expected: Array | None = None
    domain: str = ""
    stage_of: str | None = None


class Skip(Exception):
    """Raised by a calling function when the port does not provide the component."""


class VelocityModel:
    """The `model` passed to a port's `euler`/`heun`/`adams` (and the guidance and step stages):
    a `config` (the model's `DeCoConfig`: `num_classes`, `is_text`, `text_length`, `text_dim`,
    ...) and `forward(x, t, y)` (NumPy in and out; y: labels, or text (B, T, E) for a text model),
    backed by the float64 reference. Samplers are checked with the reference's velocity so that a
    sampler's result does not depend on the port's forward pass (which has vectors of its own)."""

    def __init__(self, config: dict[str, Any], weights: Mapping[str, Array]) -> None:
        self.config = DeCoConfig.from_dict(config)
        self._model = ref.Model(self.config, weights)

    def forward(self, x: Any, t: Any, y: Any) -> Array:
        return self._model.forward(x, t, y)

    __call__ = forward


Caller = Callable[[Any, Vector, Mapping[str, Vector]], Any]


def port_function(port: Any, name: str) -> Callable[..., Any]:
    """The port's function `name`; `Skip` when it has none."""
    fn = getattr(port, name, None)
    if fn is None or not callable(fn):
        raise Skip(f"port has no {name}")
    return fn  # type: ignore[no-any-return]


def sampler_model(vector: Vector, vectors: Mapping[str, Vector]) -> VelocityModel:
    """The reference model holding the weights of the vector's `velocity_model`."""
    source = vectors[str(vector.velocity_model)]
    assert source.config is not None
    return VelocityModel(source.config, source.weights)


def _interval(v: Vector) -> tuple[float, float]:
    return (v.args["interval"][0], v.args["interval"][1])


def _call_scales(name: str) -> Caller:
    """`guidance_at` / `adams_guidance_at`: one scalar per time of `in.t`, stacked."""
    def call(port: Any, v: Vector, _: Mapping[str, Vector]) -> Any:
        fn = port_function(port, name)
        return np.array([float(fn(float(t), v.args["guidance"], _interval(v)))
                         for t in v.inputs["t"].tolist()])

    return call


def _call_guided_velocity(port: Any, v: Vector, vectors: Mapping[str, Vector]) -> Any:
    cond = v.inputs["text"] if "text" in v.inputs else v.inputs["labels"]
    return port_function(port, "guided_velocity")(
        sampler_model(v, vectors), v.inputs["x"], v.args["t"], cond, v.inputs.get("null"),
        v.args["guidance"])


def _call_step(name: str) -> Caller:
    """`euler_step` / `heun_step`: one update of a class-model sampler from t_cur to t_next."""
    def call(port: Any, v: Vector, vectors: Mapping[str, Vector]) -> Any:
        return port_function(port, name)(
            sampler_model(v, vectors), v.inputs["x"], v.inputs["labels"], v.args["t_cur"],
            v.args["t_next"], v.args["guidance"])

    return call


#: The components of the domain and stage vectors -> how their vectors are passed to the port.
STAGE_CALLERS: dict[str, Caller] = {
    "interpolate": lambda p, v, _: port_function(p, "interpolate")(
        v.inputs["x"], v.inputs["noise"], v.inputs["t"]),
    "target_velocity": lambda p, v, _: port_function(p, "target_velocity")(
        v.inputs["x"], v.inputs["noise"]),
    "time_shift": lambda p, v, _: port_function(p, "time_shift")(v.inputs["t"], v.args["shift"]),
    "reflect_pad": lambda p, v, _: port_function(p, "reflect_pad")(v.inputs["x"]),
    # A scalar, stored with shape (1,) like the loss.
    "weighted_error": lambda p, v, _: np.array([float(port_function(p, "weighted_error")(
        v.inputs["coeffs_pred"], v.inputs["coeffs_target"], v.inputs["weights"]))]),
    "guidance_at": _call_scales("guidance_at"),
    "adams_guidance_at": _call_scales("adams_guidance_at"),
    "guided_velocity": _call_guided_velocity,
    "euler_step": _call_step("euler_step"),
    "heun_step": _call_step("heun_step"),
}
