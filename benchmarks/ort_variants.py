"""Size and UNet latency of each ONNX Runtime variant against fp32, on this machine's CPU, in one run.

    flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/ort_variants.py /tmp/bench/ort-sd15 \\
        --source sd15-random --runs 5

Exports the UNet alone (batch 2 = one CFG step, 512x512), captures calibration inputs from
the source pipeline (--calibration-prompts x --calibration-steps UNet calls), builds every
variant with `compile_job`, then times fp32 and every variant back to back on ONNX Runtime
CPU (median of --runs after one warm-up run), so one timing phase holds all rows. Each build
runs in a child process whose peak RSS (process tree, sampled) is recorded.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feeds import captured_feed  # noqa: E402
from tree_rss import run_sampled  # noqa: E402
from diffprism.jobs import calibrate_job, compile_job, export_job  # noqa: E402
from exporters.errors import SourceError  # noqa: E402
from exporters.export import ONNX_DIR  # noqa: E402
from exporters.inputs import make_feed  # noqa: E402
from exporters.precision import graph  # noqa: E402
from exporters.spec import ShapeRequest  # noqa: E402
from exporters.tree import read_tree_info  # noqa: E402
from runtimes.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402
from validation.metrics import cosine, rel_l2  # noqa: E402

# variant -> (precision, compile options); the tree is onnx-<variant>
VARIANTS = {
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "int8": ("int8", {}),
    "int8-dynamic": ("int8-dynamic", {}),
    "int4": ("int4", {}),
    "pruned": ("pruned", {}),
    "pruned-structured": ("pruned", {"structured": True}),
    "qat": ("qat", {}),
}
TORCH_SIDE = ("pruned", "pruned-structured", "qat")


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


def build(out: Path, variant: str, distill_steps: int) -> None:
    """Child-process entry: one compile_job."""
    precision, options = VARIANTS[variant]
    if variant in TORCH_SIDE:  # one feed per forward: a batch of two 512 px CFG feeds costs ~4 GB more
        options = {**options, "distill_steps": distill_steps, "distill_batch": 1}
    compile_job(out, target="onnxruntime", precision=precision, components=["unet"], options=options)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--source", default="sd15-random")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calibration-prompts", type=int, default=2)
    ap.add_argument("--calibration-steps", type=int, default=4)
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="fine-tune steps for pruned/qat (full-size fine-tuning does not fit a 24 GB CPU machine)")
    ap.add_argument("--reuse", action="store_true", help="time variants already built in OUT instead of rebuilding them")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--build-one", help=argparse.SUPPRESS)  # child process: build this variant and exit
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = args.out
    if args.build_one:
        build(out, args.build_one, args.distill_steps)
        return
    if not (out / ONNX_DIR / "unet").is_dir():
        export_job(args.source, out, components=["unet"],
                   shapes=ShapeRequest(batch=(2, 2, 2), image=(args.size, args.size, args.size)))
    if not (out / "calibration" / "unet.npz").is_file():
        calibrate_job(out, num_prompts=args.calibration_prompts, steps=args.calibration_steps)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    builds = {}
    for variant in variants:
        if args.reuse and (out / f"{ONNX_DIR}-{variant}" / "unet" / "model.onnx").is_file():
            continue
        cmd = [sys.executable, __file__, str(out), "--build-one", variant, "--distill-steps", str(args.distill_steps)]
        code, seconds, peak = run_sampled(cmd)
        if code:
            sys.exit(f"building {variant} failed (exit {code})")
        builds[variant] = {"build_seconds": round(seconds, 1), "build_peak_rss_gb": round(peak / 1e9, 2)}
        print(json.dumps({"variant": variant, **builds[variant]}), flush=True)
    if args.build_only:
        return

    _, specs = read_tree_info(out / ONNX_DIR)
    spec = specs["unet"]
    feed = unet_feed(out, spec)
    load_before = os.getloadavg()[0]
    seconds, ref = latency(out / ONNX_DIR / "unet", spec, feed, args.runs)
    rows = [{"variant": "fp32", "method": "fp32", "bytes": graph.size_bytes(out / ONNX_DIR / "unet"),
             "seconds": seconds, "cosine": 1.0, "rel_l2": 0.0}]
    for variant in variants:
        tree = out / f"{ONNX_DIR}-{variant}"
        info = read_tree_info(tree)[0]["variant"]["unet"]
        seconds, got = latency(tree / "unet", spec, feed, args.runs)
        rows.append({"variant": variant, "method": info["method"], "bytes": graph.size_bytes(tree / "unet"),
                     "parameters": info.get("parameters_after"), "sparsity": info.get("weights", {}).get("sparsity"),
                     "seconds": seconds, "cosine": cosine(ref, got), "rel_l2": rel_l2(ref, got),
                     **builds.get(variant, {})})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print(f"\nload average: {load_before:.2f} before timing, {os.getloadavg()[0]:.2f} after")
    print("| variant | UNet size (MB) | size vs fp32 | UNet latency (s) | speed vs fp32 | cosine vs fp32 | rel L2 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['bytes'] / 1e6:.0f} | {r['bytes'] / base['bytes']:.2f}x | {r['seconds']:.2f} | "
              f"{base['seconds'] / r['seconds']:.2f}x | {r['cosine']:.5f} | {r['rel_l2']:.3g} |")
    print(json.dumps(rows, indent=1))
    (out / "ort_variants.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
