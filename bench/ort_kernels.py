"""What single onnxruntime CPU kernels cost on the pixel decoder's shapes: the measurements behind
the forms of the lowered decoder (deco.deploy.optimize) and of `image_to_pixels`
(bench/RESULTS.md §6).

    python bench/ort_kernels.py [--rows 4096] [--runs 60]

Each case is a one- or two-node graph on a (rows, 32) float32 activation (one decoder chunk);
the time is onnxruntime's own profile of the node(s) (median kernel time, microseconds), at one
and at two intra-op threads, so graph inputs and outputs crossing into Python are not counted.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

WIDTH = 32


def node(op: str, inputs: list[str], output: str, **attrs: Any) -> Any:
    return helper.make_node(op, inputs, [output], name=output, **attrs)


def cases(rows: int) -> dict[str, tuple[list[Any], dict[str, np.ndarray], dict[str, tuple[int, ...]]]]:
    """name -> (nodes, initializers, inputs and their shapes). Timed: every node but `keep`."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((WIDTH, WIDTH))
    b = rng.standard_normal(WIDTH)
    act = {"x": (rows, WIDTH)}
    act3 = {"x": (1, rows, WIDTH)}
    return {
        "Gemm (rows, 32) x (32, 32) + bias": ([node("Gemm", ["x", "w", "b"], "y", transB=1)],
                                              {"w": w.T, "b": b}, act),
        "MatMul (rows, 32) x (32, 32)": ([node("MatMul", ["x", "w"], "y")], {"w": w}, act),
        "MatMul (rows, 33) x (33, 32)": ([node("MatMul", ["x", "w"], "y")],
                                         {"w": rng.standard_normal((WIDTH + 1, WIDTH))},
                                         {"x": (rows, WIDTH + 1)}),
        "MatMul (rows, 32) x (32, 33)": ([node("MatMul", ["x", "w"], "y")],
                                         {"w": rng.standard_normal((WIDTH, WIDTH + 1))}, act),
        "Add of a (32,) bias (broadcast)": ([node("Add", ["x", "b"], "y")], {"b": b}, act),
        "Add of a (rows, 32) tensor": ([node("Add", ["x", "x"], "y")], {}, act),
        "Concat of a (rows, 1) column": ([node("Concat", ["x", "k"], "y", axis=-1)],
                                         {"k": np.full((rows, 1), 32.0)}, act),
        "LayerNormalization over 32": ([node("LayerNormalization", ["x", "g"], "y", axis=-1, epsilon=1e-6)],
                                       {"g": np.ones(WIDTH)}, act),
        "InstanceNormalization of (1, rows, 32)": (
            [node("InstanceNormalization", ["x", "g", "z"], "y", epsilon=1e-6)],
            {"g": np.ones(rows), "z": np.zeros(rows)}, act3),
        "Transpose (2, 3, 16, 16, 16, 16), one six-axis permutation": (
            [node("Transpose", ["x"], "y", perm=[0, 2, 4, 3, 5, 1])], {}, {"x": (2, 3, 16, 16, 16, 16)}),
        "the same as two transposes (channels last, then 48-value blocks)": (
            [node("Transpose", ["x"], "t", perm=[0, 2, 3, 1]),
             node("Reshape", ["t", "s"], "r"), node("Transpose", ["r"], "y", perm=[0, 1, 3, 2, 4])],
            {"s": np.array([2, 16, 16, 16, 48], np.int64)}, {"x": (2, 3, 256, 256)}),
    }


def time_case(nodes: list[Any], inits: dict[str, np.ndarray], inputs: dict[str, tuple[int, ...]],
              threads: int, runs: int, folder: str) -> float:
    tensors = [numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k)
               for k, v in inits.items()]
    values = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(s)) for k, s in inputs.items()]
    output = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "case", values, [output], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(folder, "profile")
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    feed = {k: rng.standard_normal(s).astype(np.float32) for k, s in inputs.items()}
    for _ in range(runs):
        session.run(None, feed)
    events = json.load(open(session.end_profiling()))
    per_run: dict[int, float] = {}
    count: dict[str, int] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            k = count[event["name"]] = count.get(event["name"], 0) + 1
            per_run[k] = per_run.get(k, 0.0) + event["dur"]
    return statistics.median(list(per_run.values())[5:])  # the first runs warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    print(f"| kernel ({args.rows} rows) | 1 thread (µs) | 2 threads (µs) |")
    print("| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for name, (nodes, inits, inputs) in cases(args.rows).items():
            one, two = (time_case(nodes, inits, inputs, t, args.runs, folder) for t in (1, 2))
            print(f"| {name} | {one:.0f} | {two:.0f} |")
    print(f"\nonnxruntime {ort.__version__}, median node time of {args.runs - 5} runs")


if __name__ == "__main__":
    main()
