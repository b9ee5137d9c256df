"""Size and UNet latency of each ONNX Runtime variant against fp32, on this machine's CPU, in one run.

    flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/ort_variants.py /tmp/bench/ort-sd15 \\
        --source sd15-random --runs 5

Exports the UNet alone (batch 2 = one CFG step, 512x512), captures calibration inputs from
the source pipeline (1 prompt x 2 steps), builds every variant with `compile_job`, then
times the UNet on ONNX Runtime CPU (median of --runs after one warm-up run).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import numpy as np
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feeds import captured_feed  # noqa: E402
from diffprism.jobs import calibrate_job, compile_job, export_job  # noqa: E402
from exporters.errors import SourceError  # noqa: E402
from exporters.export import ONNX_DIR  # noqa: E402
from exporters.inputs import make_feed  # noqa: E402
from exporters.precision import graph  # noqa: E402
from exporters.spec import ShapeRequest  # noqa: E402
from exporters.tree import read_tree_info  # noqa: E402
from runtimes.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402
from validation.metrics import cosine, rel_l2  # noqa: E402

PRECISIONS = ("fp16", "bf16", "int8", "int8-dynamic", "int4")


def latency(model_dir: Path, spec, feed, runs: int) -> tuple[float, np.ndarray]:
    """Median seconds per UNet call after one warm-up, and the output for the quality columns."""
    with OnnxRuntimeRunner(spec, model_dir / "model.onnx") as runner:
        out = runner.infer(feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            runner.infer(feed)
            times.append(time.perf_counter() - start)
    return statistics.median(times), out[spec.output_names[0]]


def unet_feed(out: Path, spec) -> dict:
    """A real denoising input (a captured UNet call), else a random feed at the spec's opt point."""
    try:
        return captured_feed(out / "calibration")
    except SourceError:  # no capture: random inputs still time the graph
        return make_feed(spec, "opt", seed=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--source", default="sd15-random")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--reuse", action="store_true", help="time variants already built in OUT instead of rebuilding them")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = args.out
    if not (out / ONNX_DIR / "unet").is_dir():
        export_job(args.source, out, components=["unet"],
                   shapes=ShapeRequest(batch=(2, 2, 2), image=(args.size, args.size, args.size)))
    if not (out / "calibration" / "unet.npz").is_file():
        calibrate_job(out, num_prompts=1, steps=2)
    _, specs = read_tree_info(out / ONNX_DIR)
    spec = specs["unet"]
    feed = unet_feed(out, spec)
    seconds, ref = latency(out / ONNX_DIR / "unet", spec, feed, args.runs)
    rows = [{"variant": "fp32", "bytes": graph.size_bytes(out / ONNX_DIR / "unet"), "seconds": seconds,
             "cosine": 1.0, "rel_l2": 0.0}]
    for precision in args.precisions.split(","):
        variant_dir = out / f"{ONNX_DIR}-{precision}"
        if args.reuse and (variant_dir / "unet" / "model.onnx").is_file():  # measure an earlier build again
            built, method = None, read_tree_info(variant_dir)[0]["variant"]["unet"]["method"]
        else:
            start = time.perf_counter()
            result = compile_job(out, target="onnxruntime", precision=precision, components=["unet"])
            built, method = round(time.perf_counter() - start, 1), result.details["unet"]["method"]
            variant_dir = result.out_dir
        unet = variant_dir / "unet"
        seconds, got = latency(unet, spec, feed, args.runs)
        rows.append({"variant": precision, "method": method, "bytes": graph.size_bytes(unet),
                     "build_seconds": built, "seconds": seconds,
                     "cosine": cosine(ref, got), "rel_l2": rel_l2(ref, got)})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print("\n| variant | UNet size (MB) | size vs fp32 | UNet latency (s) | speed vs fp32 | cosine vs fp32 | rel L2 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['bytes'] / 1e6:.0f} | {r['bytes'] / base['bytes']:.2f}x | {r['seconds']:.2f} | "
              f"{base['seconds'] / r['seconds']:.2f}x | {r['cosine']:.5f} | {r['rel_l2']:.3g} |")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
