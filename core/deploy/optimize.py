"""Shaping exported graphs for onnxruntime's CPU provider (bench/RESULTS.md §6 measures each lever).

Three parts:

- **The pixel decoder as a Scan over chunks** (`lowered_decoders` + `lower_decoders`, used by
  `deco.deploy.export` with `decoder_chunk_rows`). The decoder is a chain of small products and
  elementwise passes over (N*P, w) activations: 65536 x 32 floats (8 MiB) each at 256x256. torch
  runs it in chunks that stay in cache (`PixelDecoder.chunk_rows`); a traced graph runs every pass
  at full size through memory: onnxruntime took 109 ms for DeCo-S/16's decoder at 256x256 where
  torch takes 81 ms (a decoder-only graph, one thread, CPU time, loaded machine). Here the
  decoder becomes a standard ONNX `Scan` whose body decodes a fixed number of patches: inputs
  padded with zero patches to a whole number of chunks, the rows of the padding dropped after.
  The condition projection (`cond_proj`, one large weight) runs once before the Scan.
  The body computes the decoder from weights folded exactly as `PixelDecoder.rows` folds them
  (`embed_weights`, `modulation_weights`), in the forms onnxruntime runs fastest on these narrow
  rows (each measured in bench/RESULTS.md §6): bias-free MatMuls, the biases carried by a
  constant column (`CARRIER`), one product per shift/scale/gate (a Slice of one product would
  copy), and InstanceNormalization for the LayerNorm (`norm_op`). The export checks the result
  against torch; tests/test_onnx_optimize.py against the float64 reference.
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
#: Rows (pixels) per Scan iteration of a lowered decoder: 4096 x 32 floats (512 KiB) per
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


#: The constant channel the lowered decoder carries through SiLU in place of a bias: every weight
#: row it meets is divided by it. A power of two (the division is exact) with sigmoid(32) = 1 to
#: float32 rounding (1 - 1.3e-14), so silu(32) = 32.
CARRIER = 32.0


def _folded(decoder: Any, j: int) -> dict[str, Tensor]:
    """Block j's weights for the lowered body as (inputs, outputs) matrices without bias: each
    bias becomes a last row, read by a carrier column of value K = CARRIER.

    With u' = [u, K] (the carrier comes out of cond_proj and through the SiLU) and shift',
    scale', gate of `modulation_weights`: scale = u' @ scale, gate = u' @ gate,
    pre = u' @ pre = shift' W1^T + b1 (fc1's input shift and its bias moved in front of it), so
    f = (LN(z) * scale) @ fc1 + pre = fc1(LN(z) * scale + shift'); and with s' = [silu(f), K],
    s' @ fc2 = fc2(silu(f)) with its bias."""
    import torch  # here: deco.deploy.runtime's sampler runs without torch

    block = decoder.blocks[j]
    weight, bias = block.modulation_weights()
    dtype = weight.dtype
    # Folded in float64, rounded once to the graph's dtype.
    (w_shift, w_scale, w_gate), (b_shift, b_scale, b_gate) = weight.double().chunk(3), bias.double().chunk(3)
    w1, b1 = block.fc1.weight.double(), block.fc1.bias.double()
    w2, b2 = block.fc2.weight.double(), block.fc2.bias.double()

    def carried(matrix: Tensor, row: Tensor) -> Tensor:  # (w, n) + bias row (n,) -> (w+1, n)
        return torch.cat([matrix, row[None] / CARRIER])

    out = {"scale": carried(w_scale.T, b_scale), "gate": carried(w_gate.T, b_gate),
           "pre": carried(w_shift.T @ w1.T, b_shift @ w1.T + b1), "fc1": w1.T, "fc2": carried(w2.T, b2)}
    return {k: v.to(dtype) for k, v in out.items()}


def norm_op(dtype: Any) -> str:
    """The ONNX operator of the lowered decoder's LayerNorm (no affine) for weights of `dtype`:
    InstanceNormalization over (1, rows, w), each pixel a "channel" normalised over its w values,
    because onnxruntime's LayerNormalization kernel is 1.3x slower on these 32-wide rows at one
    thread and 3x at two (bench/RESULTS.md §6); LayerNormalization for bfloat16, which
    InstanceNormalization does not take (to opset 21)."""
    import torch  # here: deco.deploy.runtime's sampler runs without torch

    return "LayerNormalization" if dtype == torch.bfloat16 else "InstanceNormalization"


def _body(decoder: Any, b: _Builder, body: _Builder, patches: int) -> Any:
    """The Scan body decoding one chunk: k = `patches` padded patches' pixels (k, P, C) and
    conditions (k, P*(w+1)) (each pixel's w condition values and the carrier's input) -> (k*P, C)."""
    import onnx  # here: an optional extra
    import torch  # here: deco.deploy.runtime's sampler runs without torch

    from deco.config import NORM_EPS

    p2, c = decoder.patch_size ** 2, decoder.final.out_features
    width, dtype = decoder.final.in_features, decoder.final.weight.dtype
    rows = patches * p2
    e_weight, e_bias = decoder.embed_weights(dtype)  # (w, C), (P, w)
    i64 = b.int64
    chunk_pix, cond = body.node_prefix + "pixels", body.node_prefix + "cond"
    instance = norm_op(dtype) == "InstanceNormalization"
    ones = b.const("norm.scale", torch.ones(rows if instance else width, dtype=dtype))

    def norm(x: str) -> str:
        if not instance:
            return body.op("LayerNormalization", x, ones, axis=-1, epsilon=NORM_EPS)
        zeros = b.const("norm.bias", torch.zeros(rows, dtype=dtype))
        return body.op("InstanceNormalization", x, ones, zeros, epsilon=NORM_EPS)

    def silu(x: str) -> str:
        return body.op("Mul", x, body.op("Sigmoid", x))

    u = silu(body.op("Reshape", cond, i64("rows_carried", [1, rows, width + 1])))  # (1, rows, w+1)
    z = body.op("Add", body.op("MatMul", chunk_pix, b.const("embed.w", e_weight.T)),
                b.const("embed.b", e_bias))  # (k, P, w)
    z = body.op("Reshape", z, i64("rows", [1, rows, width]))
    carrier = b.const("carrier", torch.full((1, rows, 1), CARRIER, dtype=dtype))
    # Products without bias (MatMul): onnxruntime runs a Gemm, and a MatMul followed by a bias
    # Add (which it fuses into a Gemm), on one thread only, and a broadcast bias Add is a pass of
    # its own; a product with 33 outputs costs 1.4x one with 32, hence the Concat for fc2.
    for j in range(len(decoder.blocks)):
        folded = {k: b.const(f"blocks.{j}.{k}", v) for k, v in _folded(decoder, j).items()}
        scale, gate, pre = (body.op("MatMul", u, folded[k]) for k in ("scale", "gate", "pre"))
        f = body.op("Add", body.op("MatMul", body.op("Mul", norm(z), scale), folded["fc1"]), pre)
        h = body.op("MatMul", body.op("Concat", silu(f), carrier, axis=-1), folded["fc2"])  # (1, rows, w)
        z = body.op("Add", z, body.op("Mul", gate, h))
    flat = body.op("Reshape", norm(z), i64("flat", [rows, width]))
    final = decoder.final
    out = body.op("Gemm", flat, b.const("final.w", final.weight), b.const("final.b", final.bias),
                  transB=1)  # (rows, C)
    elem = _tensor("x", torch.zeros(0, dtype=dtype)).data_type
    return onnx.helper.make_graph(
        body.nodes, "decoder_chunk",
        [onnx.helper.make_tensor_value_info(chunk_pix, elem, [patches, p2, c]),
         onnx.helper.make_tensor_value_info(cond, elem, [patches, p2 * (width + 1)])],
        [onnx.helper.make_tensor_value_info(out, elem, [rows, c])])


def _lower_one(node: Any, decoder: Any, index: int, scan: int,
               chunk_rows: int) -> tuple[list[Any], list[Any]]:
    """(nodes, initializers) computing the placeholder's output with a Scan over chunks."""
    import onnx  # here: an optional extra
    import torch  # here: deco.deploy.runtime's sampler runs without torch

    p2, c = decoder.patch_size ** 2, decoder.final.out_features
    patches = max(1, chunk_rows // p2)
    b = _Builder(f"/decoder{index}/", f"/decoder_scan{scan}/")
    body = _Builder(b.prefix, f"/decoder_scan{scan}/body/")
    pixels, s = node.input
    i64 = b.int64
    n = b.op("Gather", b.op("Shape", pixels), i64("zero", 0), axis=0)
    trips = b.op("Div", b.op("Add", n, i64("k_minus_1", patches - 1)), i64("k", patches))
    extra = b.op("Unsqueeze", b.op("Sub", b.op("Mul", trips, b.prefix + "k"), n), i64("axis0", [0]))
    zeros = i64("zeros2", [0, 0])
    pix_pad = b.op("Pad", pixels, b.op("Concat", i64("zeros3", [0, 0, 0]), extra, zeros, axis=0))
    # cond_proj once over all patches, outside the chunks (per chunk of a few patches it would
    # read its whole (P*w, D) weight, 12 MiB at D = 384, again), as a MatMul on s padded with
    # zero patches and a column of ones for the bias: onnxruntime's Gemm, and a MatMul plus a
    # broadcast bias Add, are slower (bench/RESULTS.md §6); padding s instead of the product also
    # copies 20x less. Each pixel gets one more output: the carrier's input, weight 0, bias CARRIER.
    s_pad = b.op("Pad", s, b.op("Concat", zeros, extra, i64("one1", [1]), axis=0),
                 b.const("one", torch.ones((), dtype=decoder.cond_proj.weight.dtype)))  # (N', D+1)
    with torch.no_grad():  # the folded weights are plain tensors
        proj = decoder.cond_proj
        width, d = decoder.final.in_features, proj.weight.shape[1]
        weight = torch.cat([proj.weight.reshape(p2, width, d), proj.weight.new_zeros(p2, 1, d)], dim=1)
        bias = torch.cat([proj.bias.reshape(p2, width), proj.bias.new_full((p2, 1), CARRIER)], dim=1)
        affine = torch.cat([weight.reshape(-1, d), bias.reshape(-1, 1)], dim=1).T  # (D+1, P*(w+1))
        cond_pad = b.op("MatMul", s_pad, b.const("cond_proj", affine))  # (N', P*(w+1))
        graph = _body(decoder, b, body, patches)
    # Scan hands the body each chunk as a view of its input (a Loop body would Slice a copy)
    # and writes each chunk's rows into place in its (M, k*P, C) output.
    pix_chunks = b.op("Reshape", pix_pad, i64("pix_chunks", [-1, patches, p2, c]))
    cond_chunks = b.op("Reshape", cond_pad, i64("cond_chunks", [-1, patches, p2 * (width + 1)]))
    scan_out = b.node_prefix + "chunks"
    b.nodes.append(onnx.helper.make_node("Scan", [pix_chunks, cond_chunks], [scan_out], name=scan_out,
                                         body=graph, num_scan_inputs=2))
    flat = b.op("Reshape", scan_out, i64("shape", [-1, c]))
    count = b.op("Unsqueeze", b.op("Mul", n, i64("P", p2)), b.prefix + "axis0")
    b.nodes.append(onnx.helper.make_node("Slice", [flat, i64("zero1", [0]), count, b.prefix + "axis0"],
                                         list(node.output), name=b.node_prefix + "rows"))
    return b.nodes, b.initializers


def lower_decoders(proto: Any, decoders: list[Any], chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Any:
    """Replace every placeholder of `lowered_decoders` in `proto` (in place) by a Scan decoding
    `chunk_rows` pixels per iteration (whole patches, at least one); returns `proto`."""
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"decoder_chunk_rows: expected a positive int, got {chunk_rows!r}")
    graph = proto.graph
    nodes = list(graph.node)
    del graph.node[:]
    names = {t.name for t in graph.initializer}
    scans = 0
    for node in nodes:
        if node.domain == DOMAIN and node.op_type == OP:
            index = next(a.i for a in node.attribute if a.name == "index")
            new_nodes, inits = _lower_one(node, decoders[index], index, scans, chunk_rows)
            scans += 1
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
