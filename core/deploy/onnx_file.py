"""Writing an exported ONNX graph (deco.deploy.export, .generator, .quantize): weights above
`EXTERNAL_DATA_THRESHOLD` in one external data file `<graph>.data` beside the graph, the full
ONNX checker on the saved file, the move of a staged graph (and its data) into place in an order
that fails cleanly.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from deco.atomic import fsync_dir

#: protobuf cannot serialise a message of 2 GiB or more; half of that keeps the graph's own
#: structure and constants far from the limit, and every model under it stays one file (simpler
#: to copy, and what most tools expect).
EXTERNAL_DATA_THRESHOLD = 1 << 30


def data_file(path: str | Path) -> Path:
    """The external data file of the graph at `path`: `<path>.data`."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def _install(staged: Path, path: Path, external: bool) -> None:
    """Move the staged graph (and its data file) to `path`.

    Two files cannot be renamed at once, so the order is chosen to fail cleanly: an earlier graph
    whose data file is about to be replaced is removed first (a reader then finds no graph,
    never an old graph reading offsets into new data), the data goes next and the graph last. A
    stale data file of an earlier external export goes when the new graph has none."""
    staged_data, target_data = data_file(staged), data_file(path)
    moves = [(staged_data, target_data)] if external else []
    if external:  # onnx creates the data file as 0600; give it the graph's normal permissions
        shutil.copymode(staged, staged_data)
    for src, _ in [*moves, (staged, path)]:
        with open(src, "rb") as f:
            os.fsync(f.fileno())
    if external and target_data.exists():
        path.unlink(missing_ok=True)
    for src, dst in [*moves, (staged, path)]:
        os.replace(src, dst)
    if not external:
        target_data.unlink(missing_ok=True)
    fsync_dir(path.parent)


def tensor_bytes(proto: Any) -> int:
    """Bytes of tensor data in a model's main graph: initializers and Constant nodes."""
    import onnx  # here: onnx is an optional extra

    total = sum(t.ByteSize() for t in proto.graph.initializer)
    for node in proto.graph.node:
        total += sum(a.t.ByteSize() for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return int(total)


def save_checked(proto: Any, staged: Path, props: dict[str, str], external_data: bool | None) -> bool:
    """Save `proto` with `props` added to its metadata at `staged` (weights in `<staged>.data`
    when external; None: above `EXTERNAL_DATA_THRESHOLD`), run the full ONNX checker on the path,
    and say whether the data is external. The caller's `proto` is consumed."""
    import onnx  # here: onnx is an optional extra

    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    external = tensor_bytes(proto) > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    if external:
        _mark_external(proto, data_file(staged).name)
        onnx.save_model(proto, str(staged))  # writes the marked tensors to the one data file
    else:
        onnx.save_model(proto, str(staged))
    del proto
    # On the path, not the proto: the checker then reads external data itself, with no 2 GiB limit.
    onnx.checker.check_model(str(staged), full_check=True)
    return external


def _mark_external(proto: Any, location: str) -> None:
    """Mark the initializers for ONE external data file `location` (beside the graph), as
    onnx.save_model(save_as_external_data=True) does, minus its check that `location` does not
    exist, which it makes relative to the working directory rather than to the graph: an earlier
    export's data file in the working directory made every re-export (--force, or a re-run
    after a kill) fail."""
    from onnx import external_data_helper as helper  # here: onnx is an optional extra

    tensors = getattr(helper, "_get_initializer_tensors", lambda m: m.graph.initializer)(proto)
    for tensor in tensors:  # onnx's default size_threshold: 1024 bytes
        if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= 1024:
            helper.set_external_data(tensor, location)
