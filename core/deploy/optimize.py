"""Shaping exported graphs for onnxruntime's CPU provider (bench/RESULTS.md §6 measures each lever).

Three parts:

- **The pixel decoder as a Loop over chunks** (`lowered_decoders` + `lower_decoders`, used by
  `deco.deploy.export` with `decoder_chunk_rows`). The decoder is a chain of small products and
  elementwise passes over (N*P, w) activations: 65536 x 32 floats (8 MiB) each at 256x256. torch
  runs it in chunks that stay in cache (`PixelDecoder.chunk_rows`); a traced graph runs every pass
  at full size through memory: onnxruntime took 109 ms for DeCo-S/16's decoder at 256x256 where
  torch takes 81 ms (a decoder-only graph, one thread, CPU time, loaded machine). Here
  the decoder becomes a standard ONNX `Loop` whose body decodes a fixed number of patches: inputs
  padded with zero patches to a whole number of chunks, the rows of the padding dropped after.
  The condition projection (`cond_proj`, one large weight) runs once before the Loop.
  The body computes the decoder from weights folded exactly as `PixelDecoder.rows` folds them
  (`embed_weights`, `modulation_weights`), with one product per shift/scale/gate (a Slice of one
  product would copy) and ONNX's LayerNormalization; the export checks the result against torch.
- **Session options** (`session_options`): threads, optimisation level, and a path where
  onnxruntime saves the graph it optimised.
- **`optimize_for_ort`**: that offline optimisation as a file beside the graph, loaded back
  without repeating the optimisation. The saved graph holds onnxruntime-only (contrib) operators
  (fused normalisations, QuickGelu) and, at level "all", layouts for this CPU: for onnxruntime
  on the same kind of machine only; the exported graph itself stays standard ONNX.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deco.atomic import fsync_dir

if TYPE_CHECKING:  # torch only where a graph is built: deco.deploy.runtime runs without it
    from torch import Tensor

DOMAIN, OP = "ai.deco", "PixelDecoderRows"
#: Rows (pixels) per Loop iteration of a lowered decoder: 4096 x 32 floats (512 KiB) per
#: activation, several of which stay in a 2 MiB L2 cache (bench/RESULTS.md §6 compares sizes).
DEFAULT_CHUNK_ROWS = 4096
LEVELS = ("disable", "basic", "extended", "all")


# ------------------------------------------------------------------------- decoder lowering
@contextlib.contextmanager
def lowered_decoders() -> Iterator[list[Any]]:
    """While active, `PixelDecoder.rows` traces as one placeholder node `ai.deco::PixelDecoderRows`
    (attribute `index` into the yielded list of decoders) that `lower_decoders` replaces. The
    placeholder still computes the rows in torch, so the trace sees true shapes and values."""
    from deco.optimized.layers import PixelDecoder  # here: deco.deploy.runtime's sampler runs without torch

    decoders: list[Any] = []
    original = PixelDecoder.rows

    def rows(self: PixelDecoder, pixels: Tensor, s: Tensor) -> Tensor:
        if self not in decoders:
            decoders.append(self)
        out: Tensor = _placeholder(self, decoders.index(self), original).apply(pixels, s)
        return out

    PixelDecoder.rows = rows  # type: ignore[method-assign]
    try:
        yield decoders
    finally:
        PixelDecoder.rows = original  # type: ignore[method-assign]


def _placeholder(decoder: Any, index: int, original: Any) -> Any:
    import torch  # here: deco.deploy.runtime's sampler runs without torch

    class Rows(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, pixels: Tensor, s: Tensor) -> Tensor:
            # Computed outside the trace: only the placeholder node is recorded.
            state = torch._C._get_tracing_state()
            torch._C._set_tracing_state(None)  # type: ignore[attr-defined]
            try:
                out: Tensor = original(decoder, pixels, s)
            finally:
                torch._C._set_tracing_state(state)  # type: ignore[attr-defined]
            return out

        @staticmethod
        def symbolic(g: Any, pixels: Any, s: Any) -> Any:
            out = g.op(f"{DOMAIN}::{OP}", pixels, s, index_i=index)
            # (N*P, C), N dynamic: a typed output keeps the exporter from warning on stderr.
            out.setType(pixels.type().with_sizes([None, decoder.final.out_features]))
            return out

    return Rows


def _tensor(name: str, value: Tensor) -> Any:
    """An ONNX tensor of `value` in its own dtype (raw bytes: NumPy has no bfloat16)."""
    import onnx  # here: an optional extra
    import torch  # here: deco.deploy.runtime's sampler runs without torch

    types = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
             torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.int64: onnx.TensorProto.INT64,
             torch.bool: onnx.TensorProto.BOOL}
    value = value.detach().cpu().contiguous()
    raw = (value.view(torch.int16) if value.dtype == torch.bfloat16 else value).numpy().tobytes()
    return onnx.helper.make_tensor(name, types[value.dtype], list(value.shape), raw, raw=True)


class _Builder:
    """Initializers named under `prefix` (one per decoder: shared by all its Loops) and nodes
    under `node_prefix` (one per Loop: a generator graph calls the same decoder at every step)."""

    def __init__(self, prefix: str, node_prefix: str) -> None:
        self.prefix, self.node_prefix = prefix, node_prefix
        self.nodes, self.initializers, self.count = [], [], 0  # type: ignore[var-annotated]

    def const(self, name: str, value: Tensor) -> str:
        """The initializer `name` (the first value given under that name)."""
        full = self.prefix + name
        if all(t.name != full for t in self.initializers):
            self.initializers.append(_tensor(full, value))
        return full

    def int64(self, name: str, value: Any) -> str:
        """The int64 initializer `name` holding `value` (a number or a list)."""
        import torch  # here: deco.deploy.runtime's sampler runs without torch

        return self.const(name, torch.tensor(value, dtype=torch.int64))

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        import onnx  # here: an optional extra

        self.count += 1
        out = f"{self.node_prefix}{op_type}_{self.count}"
        self.nodes.append(onnx.helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out


def _body(decoder: Any, b: _Builder, body: _Builder, pix: str, cond_all: str, patches: int) -> Any:
    """The Loop body decoding chunk `iter` of the padded (N', P, C) pixels and (N', P*w)
    conditions."""
    import onnx  # here: an optional extra
    import torch  # here: deco.deploy.runtime's sampler runs without torch

    p2, c = decoder.patch_size ** 2, decoder.final.out_features
    width, dtype = decoder.final.in_features, decoder.final.weight.dtype
    rows = patches * p2
    e_weight, e_bias = decoder.embed_weights(dtype)  # (w, C), (P, w)
    ones = b.const("ones", torch.ones(width, dtype=dtype))
    i64 = b.int64
    step, cond_in = body.node_prefix + "iter", body.node_prefix + "cond"
    start = body.op("Unsqueeze", body.op("Mul", step, i64("k", patches)), i64("axis0", [0]))
    end = body.op("Add", start, i64("k1", [patches]))
    chunk_pix = body.op("Slice", pix, start, end, b.prefix + "axis0")  # (k, P, C)
    cond = body.op("Slice", cond_all, start, end, b.prefix + "axis0")  # (k, P*w)

    def gemm(x: str, name: str, weight: Tensor, bias: Tensor) -> str:
        return body.op("Gemm", x, b.const(name + ".w", weight), b.const(name + ".b", bias), transB=1)

    def silu(x: str) -> str:
        return body.op("Mul", x, body.op("Sigmoid", x))

    def norm(x: str) -> str:
        return body.op("LayerNormalization", x, ones, axis=-1, epsilon=float(decoder.blocks[0].norm.eps))

    flat = i64("rows", [rows, width])
    u = silu(body.op("Reshape", cond, flat))  # (k*P, w)
    z = body.op("Add", body.op("MatMul", chunk_pix, b.const("embed.w", e_weight.T)),
                b.const("embed.b", e_bias))  # (k, P, w)
    z = body.op("Reshape", z, flat)
    for j, block in enumerate(decoder.blocks):
        weight, bias = block.modulation_weights()
        shift, scale, gate = (gemm(u, f"blocks.{j}.mod{part}", w, bb)
                              for part, w, bb in zip("012", weight.chunk(3), bias.chunk(3), strict=True))
        h = body.op("Add", body.op("Mul", norm(z), scale), shift)
        h = gemm(silu(gemm(h, f"blocks.{j}.fc1", block.fc1.weight, block.fc1.bias)),
                 f"blocks.{j}.fc2", block.fc2.weight, block.fc2.bias)
        z = body.op("Add", z, body.op("Mul", gate, h))
    out = gemm(norm(z), "final", decoder.final.weight, decoder.final.bias)  # (k*P, C)
    cond_out = body.op("Identity", cond_in)
    elem = _tensor("x", torch.zeros(0, dtype=dtype)).data_type
    return onnx.helper.make_graph(
        body.nodes, "decoder_chunk",
        [onnx.helper.make_tensor_value_info(step, onnx.TensorProto.INT64, []),
         onnx.helper.make_tensor_value_info(cond_in, onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info(cond_out, onnx.TensorProto.BOOL, []),
         onnx.helper.make_tensor_value_info(out, elem, [rows, c])])


def _lower_one(node: Any, decoder: Any, index: int, loop: int,
               chunk_rows: int) -> tuple[list[Any], list[Any]]:
    """(nodes, initializers) computing the placeholder's output with a Loop over chunks."""
    import onnx  # here: an optional extra

    p2, c = decoder.patch_size ** 2, decoder.final.out_features
    patches = max(1, chunk_rows // p2)
    b = _Builder(f"/decoder{index}/", f"/decoder_loop{loop}/")
    body = _Builder(b.prefix, f"/decoder_loop{loop}/body/")
    pixels, s = node.input
    i64 = b.int64
    n = b.op("Gather", b.op("Shape", pixels), i64("zero", 0), axis=0)
    trips = b.op("Div", b.op("Add", n, i64("k_minus_1", patches - 1)), i64("k", patches))
    extra = b.op("Unsqueeze", b.op("Sub", b.op("Mul", trips, b.prefix + "k"), n), i64("axis0", [0]))
    zeros = i64("zeros2", [0, 0])
    pix_pad = b.op("Pad", pixels, b.op("Concat", i64("zeros3", [0, 0, 0]), extra, zeros, axis=0))
    # cond_proj once over all patches, outside the Loop: inside, each chunk of a few patches
    # would read its whole (P*w, D) weight (12 MiB at D = 384) again.
    cond = b.op("Gemm", s, b.const("cond_proj.w", decoder.cond_proj.weight),
                b.const("cond_proj.b", decoder.cond_proj.bias), transB=1)  # (N, P*w)
    cond_pad = b.op("Pad", cond, b.op("Concat", zeros, extra, i64("zero1", [0]), axis=0))
    import torch  # here: deco.deploy.runtime's sampler runs without torch

    with torch.no_grad():  # the folded weights are plain tensors
        graph = _body(decoder, b, body, pix_pad, cond_pad, patches)
    loop_out = b.node_prefix + "chunks"
    # An explicit true condition: onnx's reference evaluator runs no iteration without one.
    true = b.const("true", torch.tensor(True))
    b.nodes.append(onnx.helper.make_node("Loop", [trips, true], [loop_out], name=loop_out, body=graph))
    # The chunks' rows, (M, k*P, C) stacked (onnx's reference evaluator concatenates: (M*k*P, C)).
    flat = b.op("Reshape", loop_out, i64("shape", [-1, c]))
    count = b.op("Unsqueeze", b.op("Mul", n, i64("P", p2)), b.prefix + "axis0")
    b.nodes.append(onnx.helper.make_node("Slice", [flat, b.prefix + "zero1", count, b.prefix + "axis0"],
                                         list(node.output), name=b.node_prefix + "rows"))
    return b.nodes, b.initializers


def lower_decoders(proto: Any, decoders: list[Any], chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Any:
    """Replace every placeholder of `lowered_decoders` in `proto` (in place) by a Loop decoding
    `chunk_rows` pixels per iteration (whole patches, at least one); returns `proto`."""
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"decoder_chunk_rows: expected a positive int, got {chunk_rows!r}")
    graph = proto.graph
    nodes = list(graph.node)
    del graph.node[:]
    names = {t.name for t in graph.initializer}
    loops = 0
    for node in nodes:
        if node.domain == DOMAIN and node.op_type == OP:
            index = next(a.i for a in node.attribute if a.name == "index")
            new_nodes, inits = _lower_one(node, decoders[index], index, loops, chunk_rows)
            loops += 1
            graph.node.extend(new_nodes)
            graph.initializer.extend(t for t in inits if t.name not in names)  # once per decoder
            names.update(t.name for t in inits)
        else:
            graph.node.append(node)
    del graph.value_info[:]  # the trace's shapes after the placeholder were static; onnxruntime re-infers
    kept = [o for o in proto.opset_import if o.domain != DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto


# ---------------------------------------------------------------------- onnxruntime sessions
def session_options(threads: int | None = None, level: str = "all",
                    optimized_model_path: str | Path | None = None, sequential: bool = True,
                    memory_pattern: bool = True, cpu_arena: bool = True, spinning: bool = True) -> Any:
    """`onnxruntime.SessionOptions` for a DeCo graph: `threads` intra-op threads (None:
    onnxruntime's choice), graph optimisation `level` (one of LEVELS), and where onnxruntime
    should save the graph it optimised (`optimized_model_path`). `spinning` False makes idle
    intra-op threads sleep instead of spin: on a host whose cores other processes share, that
    halved a 2-thread run (bench/RESULTS.md §6). Errors only in the log: a
    float16 graph makes the CPU provider warn once per node it cannot constant-fold."""
    import onnxruntime as ort  # here: an optional extra

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {', '.join(LEVELS)}, got {level!r}")
    levels = ort.GraphOptimizationLevel
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "disable": levels.ORT_DISABLE_ALL, "basic": levels.ORT_ENABLE_BASIC,
        "extended": levels.ORT_ENABLE_EXTENDED, "all": levels.ORT_ENABLE_ALL}[level]
    if threads is not None:
        options.intra_op_num_threads = threads
    options.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if sequential
                              else ort.ExecutionMode.ORT_PARALLEL)
    options.enable_mem_pattern = memory_pattern
    options.enable_cpu_mem_arena = cpu_arena
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def optimized_path(path: str | Path, level: str = "extended") -> Path:
    """Where `optimize_for_ort` puts the optimised graph of `path`: `<stem>.ort-<level>.onnx`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.ort-{level}.onnx")


def optimize_for_ort(path: str | Path, level: str = "extended", out: str | Path | None = None) -> Path:
    """Let onnxruntime optimise the graph at `path` at `level` and save the result beside it
    (`optimized_path`, or `out`); returns the saved path. Load it back with
    `session_options(level="disable")`: the work is done. The result has onnxruntime-only
    operators; at level "all" also layouts of this CPU (onnxruntime's own advice: "extended"
    for a file to keep). The graph must keep its weights inside (no external data)."""
    import onnxruntime as ort  # here: an optional extra

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {path}")
    target = Path(out) if out is not None else optimized_path(path, level)
    # onnxruntime writes the file itself: into a temporary name, moved into place when complete.
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        options = session_options(level=level, optimized_model_path=partial)
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    fsync_dir(target.parent)
    return target
