"""The graph of a generator (deco.deploy.generator, spec/04-sampling.md §7): the exported velocity
graph's nodes become the body of an ONNX `Loop` (or, unrolled, one copy per step) that carries
the sampler's state, and the sampler's constants become small tables indexed by the evaluation
number (`sampler_tables`). See deco.deploy.generator for the solvers' update rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from deco.config import DeCoConfig
from deco.optimized.sampling import SampleSettings, adams_weights, time_grid

#: Adams order of the generator (the release's and `deco.optimized.sample`'s default).
ADAMS_ORDER = 2
OUTPUTS = ["sample", "image"]
_FLOAT, _INT64, _BOOL, _UINT8 = 1, 7, 9, 2  # onnx.TensorProto data types


def input_names(config: DeCoConfig, guided: bool) -> list[str]:
    """The generator's inputs, in order: noise, the condition (labels, or text and for a guided
    graph null_text), and for a guided graph the scalar guidance."""
    cond = (["text", *(["null_text"] if guided else [])]) if config.is_text else ["labels"]
    return ["noise", *cond, *(["guidance"] if guided else [])]


# ------------------------------------------------------------------------------ sampler tables
@dataclass(frozen=True)
class Tables:
    """Per evaluation k = 0..N-1: the model's time, whether the interval guides it, and the
    update coefficients (`coefficients[k]`, solver-specific, see the module docstring)."""

    times: np.ndarray  # (N,) float32
    guided: np.ndarray  # (N,) bool
    coefficients: np.ndarray  # (N, m) float32


def sampler_tables(settings: SampleSettings) -> Tables:
    """The constant tables of `settings`, computed in float64 with the arithmetic of
    `deco.optimized.sampling` (the Adams time is its running sum, not the grid)."""
    grid = time_grid(settings.steps, settings.timeshift)
    low, high = settings.interval
    n = settings.steps
    dts = [grid[i + 1] - grid[i] for i in range(n)]
    if settings.solver == "adams":
        times, t = [], 0.0
        for dt in dts:
            times.append(t)
            t += dt
        guided = [low < s < high for s in times]
        rows = adams_weights(grid, ADAMS_ORDER)
        weights = [[0.0] * (ADAMS_ORDER - len(r)) + r for r in rows]
        coefficients = [[dt, *w] for dt, w in zip(dts, weights, strict=True)]
    else:
        times = grid[:n]
        step_guided = [low < s <= high for s in grid[:n]]
        if settings.solver == "euler":
            guided, coefficients = step_guided, [[dt] for dt in dts]
        else:  # heun: evaluation k >= 1 is step k-1's corrector, with step k-1's scale
            guided = [step_guided[0], *step_guided[: n - 1]]
            coefficients = [[dts[k], 0.0 if k == 0 else dts[k - 1] * 0.5] for k in range(n)]
    return Tables(np.asarray(times, np.float32), np.asarray(guided, bool),
                  np.asarray(coefficients, np.float32))


# ------------------------------------------------------------------------------ graph building
class _Emitter:
    """ONNX nodes being appended to one graph, each output named `<prefix><op>_<n>`."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.count = prefix, 0
        self.nodes: list[Any] = []

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        from onnx import helper  # here: onnx is an optional extra

        name = f"{self.prefix}{op_type}_{self.count}"
        self.count += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper  # here: onnx is an optional extra

        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def take(self, table: str, index: str) -> str:
        """table[index] (a scalar for a 1-D table, a row for a 2-D one)."""
        return self.op("Gather", table, index, axis=0)


@dataclass
class _Velocity:
    """The velocity graph split for inlining: its Constant nodes and initializers (emitted once,
    in the main graph) and its other nodes (copied into each evaluation)."""

    shared: list[Any]
    body: list[Any]
    initializers: list[Any]
    cond: str  # "y" or "text"

    def emit(self, g: _Emitter, x: str, t: str, cond: str) -> str:
        """Copy the model's nodes into `g`, fed x, t and the condition; returns v's name."""
        from onnx import helper  # here: onnx is an optional extra

        rename = {"x": x, "t": t, self.cond: cond}
        for node in self.body:
            for out in node.output:
                rename[out] = f"{g.prefix}v/{out}"
            g.nodes.append(helper.make_node(
                node.op_type, [rename.get(i, i) for i in node.input],
                [rename[o] for o in node.output], name=f"{g.prefix}v/{node.name}", domain=node.domain,
            ))
            g.nodes[-1].attribute.extend(node.attribute)
        return rename["v"]


def _outer_names(graph: Any) -> set[str]:
    """The names a subgraph reads from enclosing scopes (its own and its nested subgraphs')."""
    import onnx  # here: onnx is an optional extra

    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    read: set[str] = set()
    for node in graph.node:
        read.update(i for i in node.input if i)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                        attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else []):
                read |= _outer_names(sub)
        local.update(node.output)
    return read - local


def _split_velocity(proto: Any, config: DeCoConfig) -> _Velocity:
    import onnx  # here: onnx is an optional extra

    # A subgraph node (the chunked decoder's Scan) is copied as it is: its body may read outer
    # values only from the initializers, which keep their names in the generator's main graph.
    weights = {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            outer = set().union(*(_outer_names(sub) for sub in subs)) - weights
            if outer:
                raise ValueError(f"model: the velocity graph's {node.op_type} node reads "
                                 f"{sorted(outer)[0]!r} from outside; the generator cannot inline it")
    shared = [n for n in proto.graph.node if n.op_type == "Constant"]
    body = [n for n in proto.graph.node if n.op_type != "Constant"]
    return _Velocity(shared, body, list(proto.graph.initializer), "text" if config.is_text else "y")


@dataclass
class _Plan:
    """Names of main-graph values every evaluation reads."""

    velocity: _Velocity
    solver: str
    guided: bool
    batch: str  # (1,) int64: B
    cond: str  # (B, ...) the condition
    cond2: str  # (2B, ...) [null; cond], guided graphs only
    not_one: str  # bool scalar: guidance != 1, guided graphs only


def _evaluate(g: _Emitter, plan: _Plan, point: str, time: str, interval_guides: str) -> str:
    """The (guided) velocity at `point`, time `time` (float32 scalar)."""
    if not plan.guided:
        t = g.op("Expand", time, g.op("Shape", point, start=0, end=1))
        return plan.velocity.emit(g, point, t, plan.cond)
    flag = g.op("And", interval_guides, plan.not_one)
    flag_int = g.op("Cast", flag, to=_INT64)
    repeats = g.op("Concat", g.op("Add", flag_int, g.const([1], np.int64)), g.const([1, 1, 1], np.int64),
                   axis=0)
    x2 = g.op("Tile", point, repeats)  # [x; x] when guided, else x
    t2 = g.op("Expand", time, g.op("Shape", x2, start=0, end=1))
    # [null; cond] from row 0 when guided, cond (rows B..2B) otherwise
    start = g.op("Mul", plan.batch, g.op("Sub", g.const([1], np.int64), flag_int))
    y2 = g.op("Slice", plan.cond2, start, g.const([np.iinfo(np.int64).max], np.int64), g.const([0], np.int64))
    out = plan.velocity.emit(g, x2, t2, y2)
    zero = g.const([0], np.int64)
    axes = g.const([0], np.int64)
    uncond = g.op("Slice", out, zero, plan.batch, axes)
    cond = g.op("Slice", out, g.op("Neg", plan.batch), g.const([np.iinfo(np.int64).max], np.int64), axes)
    scale = g.op("Where", flag, "guidance", g.const(1.0))
    # u + g (c - u), as deco.optimized; unguided, u and c are the same rows and this is c + 1 * 0.
    return g.op("Add", uncond, g.op("Mul", scale, g.op("Sub", cond, uncond)))


def _step(g: _Emitter, plan: _Plan, k: str, state: list[str]) -> list[str]:
    """One iteration: evaluation k and its update of the carried state (see the module docs)."""
    time, guides = g.take("deco_times", k), g.take("deco_guided", k)
    row = g.take("deco_coefficients", k)
    columns = {"euler": 1, "heun": 2, "adams": 1 + ADAMS_ORDER}[plan.solver]
    coeff = [g.op("Gather", row, g.const(j, np.int64), axis=0) for j in range(columns)]
    if plan.solver == "euler":
        (x,) = state
        v = _evaluate(g, plan, x, time, guides)
        return [g.op("Add", x, g.op("Mul", coeff[0], v))]
    if plan.solver == "heun":
        x, point, v_prev = state
        v = _evaluate(g, plan, point, time, guides)
        x = g.op("Add", x, g.op("Mul", coeff[1], g.op("Add", v_prev, v)))
        return [x, g.op("Add", x, g.op("Mul", coeff[0], v)), v]
    x, v_prev = state  # adams, order 2: w0 v_{k-1} + w1 v_k
    v = _evaluate(g, plan, x, time, guides)
    combined = g.op("Add", g.op("Mul", coeff[1], v_prev), g.op("Mul", coeff[2], v))
    return [g.op("Add", x, g.op("Mul", coeff[0], combined)), v]


def _initial_state(g: _Emitter, solver: str) -> list[str]:
    zeros = g.op("Mul", "noise", g.const(0.0))
    return {"euler": ["noise"], "heun": ["noise", "noise", zeros], "adams": ["noise", zeros]}[solver]


def _loop(g: _Emitter, plan: _Plan, steps: int, state: list[str]) -> list[str]:
    """An ONNX Loop of `steps` iterations of `_step` over the carried `state`."""
    from onnx import helper  # here: onnx is an optional extra

    body = _Emitter("b/")
    carried = [f"b/in{i}" for i in range(len(state))]
    outs = _step(body, plan, "b/k", carried)
    body.nodes.append(helper.make_node("Identity", ["b/cond_in"], ["b/cond_out"]))
    float_value = [helper.make_tensor_value_info(n, _FLOAT, None) for n in carried]
    graph = helper.make_graph(
        body.nodes, "generator_step",
        [helper.make_tensor_value_info("b/k", _INT64, []),
         helper.make_tensor_value_info("b/cond_in", _BOOL, []), *float_value],
        [helper.make_tensor_value_info("b/cond_out", _BOOL, []),
         *[helper.make_tensor_value_info(n, _FLOAT, None) for n in outs]])
    names = [f"loop_out{i}" for i in range(len(state))]
    trips = g.const(steps, np.int64)
    # An explicit `true` condition rather than "" (allowed too): onnx's reference evaluator runs
    # no iteration for an empty condition input.
    always = g.const(True, np.bool_)
    g.nodes.append(helper.make_node("Loop", [trips, always, *state], names, body=graph, name="steps"))
    return names


def _unrolled(g: _Emitter, plan: _Plan, steps: int, state: list[str]) -> list[str]:
    """`steps` copies of `_step` (for measurement: the export uses the Loop)."""
    for k in range(steps):
        sub = _Emitter(f"s{k}/")
        state = _step(sub, plan, sub.const(k, np.int64), state)
        g.nodes.extend(sub.nodes)
    return state


def build_generator(velocity: Any, config: DeCoConfig, settings: SampleSettings, guided: bool,
                    batch: int | None, resolution: tuple[int, int] | None,
                    unrolled: bool = False) -> Any:
    """The generator ModelProto around the exported velocity ModelProto `velocity`."""
    from onnx import helper, numpy_helper  # here: onnx is an optional extra

    parts = _split_velocity(velocity, config)
    tables = sampler_tables(settings)
    g = _Emitter("g/")
    g.nodes.extend(parts.shared)
    batch_of = g.op("Shape", "noise", start=0, end=1)
    cond = "text" if config.is_text else "labels"
    cond2 = not_one = ""
    if guided:
        null = "null_text" if config.is_text else g.op(
            "Expand", g.const(config.num_classes, np.int64), g.op("Shape", "labels"))
        cond2 = g.op("Concat", null, cond, axis=0)
        not_one = g.op("Not", g.op("Equal", "guidance", g.const(1.0)))
    plan = _Plan(parts, settings.solver, guided, batch_of, cond, cond2, not_one)
    state = _initial_state(g, settings.solver)
    run = _unrolled if unrolled else _loop
    final = run(g, plan, settings.steps, state)
    x = final[1] if settings.solver == "heun" else final[0]
    g.nodes.append(helper.make_node("Clip", [x, g.const(-1.0), g.const(1.0)], ["sample"], name="clamp"))
    # deco.outputs.to_uint8: round((x + 1) * 127.5), half to even (ONNX Round, torch.round)
    pixels = g.op("Round", g.op("Mul", g.op("Add", "sample", g.const(1.0)), g.const(127.5)))
    g.nodes.append(helper.make_node("Transpose", [g.op("Cast", pixels, to=_UINT8)], ["image"],
                                    perm=[0, 2, 3, 1], name="nhwc"))
    tensors = [numpy_helper.from_array(tables.times, "deco_times"),
               numpy_helper.from_array(tables.guided, "deco_guided"),
               numpy_helper.from_array(tables.coefficients, "deco_coefficients")]
    graph = helper.make_graph(g.nodes, "deco_generator", _inputs(config, guided, batch, resolution),
                              _outputs(config.in_channels, batch, resolution),
                              [*parts.initializers, *tensors])
    model = helper.make_model(graph, opset_imports=list(velocity.opset_import),
                              producer_name="deco", ir_version=velocity.ir_version)
    return model


def _inputs(config: DeCoConfig, guided: bool, batch: int | None,
            resolution: tuple[int, int] | None) -> list[Any]:
    from onnx import helper  # here: onnx is an optional extra

    b: Any = batch or "batch"
    h, w = resolution or ("height", "width")
    text = (b, config.text_length, config.text_dim)
    shapes = {"noise": (_FLOAT, [b, config.in_channels, h, w]), "labels": (_INT64, [b]),
              "text": (_FLOAT, text), "null_text": (_FLOAT, text), "guidance": (_FLOAT, [])}
    return [helper.make_tensor_value_info(n, *shapes[n]) for n in input_names(config, guided)]


def _outputs(channels: int, batch: int | None, resolution: tuple[int, int] | None) -> list[Any]:
    from onnx import helper  # here: onnx is an optional extra

    b: Any = batch or "batch"
    h, w = resolution or ("height", "width")
    return [helper.make_tensor_value_info("sample", _FLOAT, [b, channels, h, w]),
            helper.make_tensor_value_info("image", _UINT8, [b, h, w, channels])]
