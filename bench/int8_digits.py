"""int8 on the digits demo: what onnxruntime's dynamic int8 quantisation costs (issue 18 §4).

Exports the generator graph of a digits run three times (float32, float16, int8: `deco
export-onnx --generator --dtype ...`), plus for comparison a generator around onnxruntime's
static int8 quantisation calibrated on the digits (`export_static`; not an export option),
generates PER_CLASS samples of each digit with each graph from the same noise, scores them with
`deco evaluate`'s classifier (deco.evaluate.digits), and times the graphs in onnxruntime's CPU
provider with the same threads, in alternating rounds (float32, float16, int8, int8-static,
float32, ...), so a change of the machine's load hits all alike.

    nice -n 10 python bench/int8_digits.py /work/scratch/int8run --per-class 50 --threads 1

Prints a Markdown table (accuracy, its drop vs float32, per-class accuracies, Fréchet distance,
the share of samples whose predicted class matches float32's, file size, seconds per image and the
speed-up over float32) and writes the numbers as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DTYPES = ["float32", "float16", "int8"]


def export_all(run: Path, folder: Path) -> dict[str, Path]:
    """The generator graph of `run` in each dtype, with the run's recorded sampler settings."""
    from deco.deploy.generator import export_generator_checkpoint
    from deco.deploy.quantize import export_int8_checkpoint

    paths = {}
    for dtype in DTYPES:
        path = folder / f"generator_{dtype}.onnx"
        if dtype == "int8":
            export_int8_checkpoint(run, path, generator=True)
        else:
            export_generator_checkpoint(run, path, dtype=dtype)
        paths[dtype] = path
    paths["int8-static"] = export_static(run, folder / "generator_int8_static.onnx")
    return paths


def export_static(run: Path, path: Path, batches: int = 16, batch: int = 16) -> Path:
    """For comparison only (the export uses dynamic quantisation): onnxruntime's *static* int8
    quantisation (QDQ, per-channel int8 weights, uint8 activations with scales calibrated once),
    calibrated on what the sampler feeds the model: x_t = t x + (1 - t) noise for real digits x
    at the run's own grid times, their labels (and the null class where the sampler guides)."""
    import onnx
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from deco.data import load_digits_arrays, upsample_digits
    from deco.deploy.export import export_onnx
    from deco.deploy.generator import recorded_settings
    from deco.deploy.generator_graph import build_generator, sampler_tables
    from deco.generate import load_for_sampling

    loaded = load_for_sampling(run, torch.device("cpu"), text=True)
    model, settings = loaded.model, recorded_settings(loaded)
    raw, labels = load_digits_arrays()
    images = upsample_digits(raw).numpy()
    rng = np.random.default_rng(1)
    times = sampler_tables(settings).times
    feeds = []
    for i in range(batches):
        rows = rng.choice(len(labels), batch, replace=False)
        t = times[rng.integers(0, len(times), batch)].astype(np.float32)
        noise = rng.standard_normal(images[rows].shape).astype(np.float32)
        x = t[:, None, None, None] * images[rows] + (1 - t[:, None, None, None]) * noise
        y = labels[rows].astype(np.int64)
        if settings.guidance != 1.0 and i % 2:
            y = np.full_like(y, model.config.num_classes)
        feeds.append({"x": x.astype(np.float32), "t": t, "y": y})

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    velocity = export_onnx(model, path.with_name("static_velocity.onnx"))
    quantized = path.with_name("static_velocity_int8.onnx")
    quantize_static(velocity, quantized, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["MatMul", "Gemm"], activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    proto = build_generator(onnx.load(str(quantized)), model.config, settings, settings.guidance != 1.0,
                            None, None)
    onnx.save(proto, str(path))
    return path


def metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def session(path: Path, threads: int) -> Any:
    """A CPU session with `threads` intra-op threads (errors only in its log)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def generate(sess: Any, noise: np.ndarray, labels: np.ndarray, guidance: float | None,
             batch: int) -> np.ndarray:
    """The graph's `sample` for every row, `batch` rows per call."""
    out = []
    for i in range(0, len(labels), batch):
        feed = {"noise": noise[i:i + batch], "labels": labels[i:i + batch]}
        if guidance is not None:
            feed["guidance"] = np.asarray(guidance, np.float32)
        out.append(sess.run(["sample"], feed)[0])
    return np.concatenate(out)


def time_rounds(sessions: dict[str, Any], noise: np.ndarray, labels: np.ndarray,
                guidance: float | None, rounds: int) -> dict[str, float]:
    """Median seconds per image of one call on the whole timing batch, alternating graphs."""
    for sess in sessions.values():  # warm-up
        generate(sess, noise, labels, guidance, len(labels))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            generate(sess, noise, labels, guidance, len(labels))
            times[name].append((time.perf_counter() - t0) / len(labels))
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a digits run folder or checkpoint (deco train)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds per graph")
    parser.add_argument("--time-batch", type=int, default=10, help="images per timed call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the graphs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from deco.evaluate.digits import DigitsClassifier, score_samples

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        paths = export_all(args.run, folder)
        meta = metadata(paths["float32"])
        guidance = float(meta["deco_guidance"]) if meta["deco_guided"] == "true" else None
        rng = np.random.default_rng(args.seed)
        labels = np.repeat(np.arange(10), args.per_class).astype(np.int64)
        noise = rng.standard_normal((len(labels), 3, 32, 32)).astype(np.float32)
        sessions = {k: session(p, args.threads) for k, p in paths.items()}
        samples = {k: generate(s, noise, labels, guidance, 50) for k, s in sessions.items()}
        classifier = DigitsClassifier()
        scores = {k: score_samples(v, labels, classifier) for k, v in samples.items()}
        predicted = {k: classifier.predict(v) for k, v in samples.items()}
        seconds = time_rounds(sessions, noise[: args.time_batch], labels[: args.time_batch], guidance,
                              args.rounds)
        sizes = {k: os.path.getsize(p) for k, p in paths.items()}
    settings = {k: v for k, v in meta.items() if k.startswith("deco_") and "checkpoint" not in k}
    result: dict[str, Any] = {"run": str(args.run), "settings": settings, "per_class": args.per_class,
                              "threads": args.threads, "load_average": os.getloadavg(), "graphs": {}}
    base = scores["float32"]["accuracy"]
    for k in paths:
        result["graphs"][k] = {
            "accuracy": scores[k]["accuracy"], "drop_points": 100 * (base - scores[k]["accuracy"]),
            "accuracy_per_class": scores[k]["accuracy_per_class"],
            "frechet_distance": scores[k]["frechet_distance"],
            "same_class_as_float32": float(np.mean(predicted[k] == predicted["float32"])),
            "max_abs_diff_vs_float32": float(np.max(np.abs(samples[k] - samples["float32"]))),
            "bytes": sizes[k], "seconds_per_image": seconds[k],
            "speedup_vs_float32": seconds["float32"] / seconds[k]}
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table, one row per graph."""
    lines = ["| graph | accuracy | drop (points) | same class as float32 | max abs diff | Fréchet | "
             "size (KB) | s / image | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for k, g in result["graphs"].items():
        lines.append(
            f"| {k} | {g['accuracy']:.3f} | {g['drop_points']:+.1f} | {g['same_class_as_float32']:.3f} | "
            f"{g['max_abs_diff_vs_float32']:.3f} | {g['frechet_distance']:.3f} | {g['bytes'] / 1000:.0f} | "
            f"{g['seconds_per_image']:.4f} | {g['speedup_vs_float32']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
