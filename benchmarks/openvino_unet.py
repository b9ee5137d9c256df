"""Benchmark: sd15-random's UNet at 512x512 (latent 2x4x64x64, the CFG batch) on PyTorch eager and OpenVINO.

One run exports the UNet, captures calibration inputs, compiles every OpenVINO variant
(static 512x512, batch 2) and measures each in its own child process: median latency,
peak RSS of that process (sampled every 50 ms, load and compile included), IR size, and
the output's cosine / relative L2 against PyTorch fp32 on a real denoising input (a
captured UNet call). Stages whose output exists are skipped, so an interrupted run resumes.

    flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/openvino_unet.py --write-docs

Variants: torch-fp32 (eager), ov-fp32 (f32 hint), ov-fp16 (plugin default hint: bf16 on
AVX512-BF16/AMX CPUs), ov-int8 (hybrid: activations quantized), ov-int8-full (linear layers'
activations quantized too), ov-int4 (weight-only int4).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from feeds import captured_feed
from tree_rss import run_sampled

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## OpenVINO"
STATIC = ["--option", "static=512x512", "--option", "batch=1"]  # one image: the UNet's batch 2 under guidance
# variant -> (compile precision or None, extra options, runner hint)
VARIANTS = {
    "torch-fp32": (None, [], None),
    "ov-fp32": ("fp32", [], "f32"),
    "ov-fp16": ("fp16", [], "default"),
    "ov-int8": ("int8", [], "default"),
    "ov-int8-full": ("int8", ["--option", "int8_scheme=full"], "default"),
    "ov-int4": ("int4", [], "default"),
}


def run(cmd: list[str]) -> tuple[float, int]:
    """Run a command; (wall seconds, peak RSS bytes of it and its children). Raises on failure."""
    code, seconds, peak = run_sampled(cmd, cwd=ROOT)
    if code:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}")
    return seconds, peak


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffprism.cli", "-q", *args]


def variant_dir(work: Path, variant: str) -> Path:
    precision = VARIANTS[variant][0]
    return work / ("openvino-int8-full" if variant == "ov-int8-full" else f"openvino-{precision}")


def prepare(work: Path, num_prompts: int, steps: int) -> None:
    if not (work / "onnx").is_dir():
        print("exporting sd15-random unet ...", flush=True)
        run(cli("export", "sd15-random", "--out", str(work), "--components", "unet", "--batch", "1:2:4"))
    if not (work / "calibration" / "info.json").is_file():
        print(f"calibrating ({num_prompts} prompts x {steps} steps) ...", flush=True)
        run(cli("calibrate", str(work), "--num-prompts", str(num_prompts), "--steps", str(steps)))
    for variant, (precision, options, _) in VARIANTS.items():
        if precision is None or variant_dir(work, variant).is_dir():
            continue
        print(f"compiling {variant} ...", flush=True)
        if variant == "ov-int8-full":  # a second int8 folder: build through the target with another name
            run([sys.executable, __file__, "--work", str(work), "--child-build-full"])
        else:
            run(cli("compile", str(work), "--target", "openvino", "--precision", precision, *STATIC, *options))


def child_build_full(work: Path) -> None:
    from exporters.tree import read_tree_info
    from targets.openvino import OpenVinoTarget

    target = OpenVinoTarget()
    config = target.config(precision="int8", static="512x512", batch=1, int8_scheme="full")
    plan = target.plan(work / "onnx", read_tree_info(work / "onnx")[1], config)
    plan["out_name"] = "openvino-int8-full"
    target.build(plan, work)


def child_measure(work: Path, variant: str, runs: int) -> None:
    """Load, warm up, time `runs` inferences; save the output and the timings."""
    feed = captured_feed(work / "calibration")
    if variant == "torch-fp32":
        import torch

        from diffprism import presets
        from exporters.families import exporter_for
        from exporters.tree import read_tree_info
        from runtimes.torch_runner import TorchRunner

        pipe = presets.build("sd15-random")
        spec = read_tree_info(work / "onnx")[1]["unet"]
        wrapper = exporter_for(pipe, "unet").wrap(pipe.unet, spec)
        del pipe
        runner = TorchRunner(spec, wrapper)
        torch.set_grad_enabled(False)
    else:
        from exporters.tree import read_tree_info
        from targets.openvino import OpenVinoTarget

        folder = variant_dir(work, variant)
        spec = read_tree_info(folder)[1]["unet"]
        runner = OpenVinoTarget().runner(folder, spec, hint=VARIANTS[variant][2])
    times = []
    with runner:
        out = runner.infer(feed)  # warm-up (first-run allocations, lazy compilation)
        for _ in range(runs):
            start = time.perf_counter()
            out = runner.infer(feed)
            times.append(time.perf_counter() - start)
    result = {"times": times, "runner": runner.describe()}
    np.save(work / "bench" / f"{variant}.npy", out["out_sample"])
    (work / "bench" / f"{variant}.json").write_text(json.dumps(result))


def ir_bytes(folder: Path) -> int:
    return sum((folder / "unet" / n).stat().st_size for n in ("openvino_model.xml", "openvino_model.bin"))


def measure(work: Path, runs: int) -> dict[str, dict]:
    from validation.metrics import cosine, rel_l2

    (work / "bench").mkdir(exist_ok=True)
    rows = {}
    for variant in VARIANTS:
        print(f"measuring {variant} ...", flush=True)
        _, peak = run([sys.executable, __file__, "--work", str(work), "--child-measure", variant, "--runs", str(runs)])
        data = json.loads((work / "bench" / f"{variant}.json").read_text())
        size = None
        if variant == "torch-fp32":
            size = sum(p.stat().st_size for p in (work / "onnx" / "unet").iterdir() if p.name.startswith("model.onnx"))
        else:
            size = ir_bytes(variant_dir(work, variant))
        rows[variant] = {"median_s": statistics.median(data["times"]), "min_s": min(data["times"]),
                         "peak_rss_gb": peak / 1e9, "size_gb": size / 1e9, "runner": data["runner"]}
    ref = np.load(work / "bench" / "torch-fp32.npy")
    for variant, row in rows.items():
        out = np.load(work / "bench" / f"{variant}.npy")
        row["cosine"], row["rel_l2"] = cosine(ref, out), rel_l2(ref, out)
    return rows


def table(rows: dict[str, dict]) -> str:
    eager = rows["torch-fp32"]["median_s"]
    lines = ["| variant | hint / compute | median s | min s | x eager (median) | peak RSS GB | size GB | cosine vs torch | rel L2 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, r in rows.items():
        hint = r["runner"].get("inference_precision", r["runner"].get("dtype", ""))
        lines.append(f"| {variant} | {hint} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['median_s'] / eager:.2f} | "
                     f"{r['peak_rss_gb']:.1f} | {r['size_gb']:.2f} | {r['cosine']:.5f} | {r['rel_l2']:.3g} |")
    return "\n".join(lines)


def write_docs(rows: dict[str, dict], command: str, runs: int, load: str) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    body = (f"{SECTION}\n\nsd15-random UNet (random weights, SD 1.5 architecture), latent 2x4x64x64 (512x512, CFG batch),"
            f" static-shape IRs, median of {runs} runs after one warm-up, on {cpu} ({psutil.cpu_count()} cores, load"
            f" average {load} over the run). Peak RSS is the whole measuring process (load + compile + runs). Cosine and rel L2"
            f" compare out_sample with PyTorch fp32 on a captured denoising input.\n\n"
            f"Command: `{command}`\n\n{table(rows)}\n")
    text = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start >= 0:  # replace our section only
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "openvino-unet")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--write-docs", action="store_true", help=f"write the table into {DOCS.name} ({SECTION})")
    parser.add_argument("--child-measure", help=argparse.SUPPRESS)
    parser.add_argument("--child-build-full", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_measure:
        child_measure(args.work, args.child_measure, args.runs)
        return 0
    if args.child_build_full:
        child_build_full(args.work)
        return 0
    prepare(args.work, args.num_prompts, args.steps)
    load_before = os.getloadavg()[0]
    rows = measure(args.work, args.runs)
    load = f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    print(table(rows))
    print(json.dumps(rows, indent=2, default=str))
    if args.write_docs:
        command = "flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/openvino_unet.py " + " ".join(
            a for a in sys.argv[1:])
        write_docs(rows, command, args.runs, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
