"""The conformance kit: spec/vectors, the runner that checks a port against them, the ports the
kit checks itself with, and the check of the reference against the release's fixtures.

`kit` holds the vectors' format and the runner; `ports` the Python ports (reference, optimized,
ONNX); `vectors` writes spec/vectors from the reference; `fixtures` compares the reference with
`../shared/fixtures`. The runner's names are re-exported here, so a port is named
`deco.conformance:ReferencePort` on the command line."""

from deco.conformance.kit import (
    CALLERS,
    COMPONENTS,
    FORMAT_KEY,
    FORMAT_VERSION,
    TOLERANCE,
    Array,
    Result,
    Skip,
    Vector,
    VelocityModel,
    comparable,
    default_folder,
    format_table,
    load_port,
    load_vector,
    load_vectors,
    passed,
    port_precision,
    run_port,
    run_vector,
    save_vector,
    summary,
)
from deco.conformance.ports import OnnxPort, OptimizedPort, OptimizedPort32, Precision, ReferencePort

__all__ = [
    "CALLERS", "COMPONENTS", "FORMAT_KEY", "FORMAT_VERSION", "TOLERANCE", "Array", "OnnxPort",
    "OptimizedPort", "OptimizedPort32", "Precision", "ReferencePort", "Result", "Skip", "Vector",
    "VelocityModel", "comparable", "default_folder", "format_table", "load_port", "load_vector",
    "load_vectors", "passed", "port_precision", "run_port", "run_vector", "save_vector", "summary",
]
