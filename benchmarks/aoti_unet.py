"""Benchmark: one UNet (sd15-random at 512x512, batch 2 = one image under guidance) on AOTInductor vs OpenVINO and ONNX Runtime.

One run exports the UNet, captures calibration inputs (OpenVINO int8 and the timed input need
them), builds every variant with `diffprism compile` in its own process (wall time and peak RSS
of that build: the compile cost), then measures each variant in its own child process: median
latency on a captured denoising input after one warm-up, peak RSS of that process (load included),
artifact size, and the output's cosine / relative L2 against PyTorch fp32 eager on the same input.
Stages whose output exists are skipped, so an interrupted run resumes.

    flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/aoti_unet.py --write-docs

Smoke test (tiny UNet, seconds per variant, numbers meaningless):

    .venv/bin/python benchmarks/aoti_unet.py --preset tiny-sd --size 64 --runs 2 --work /tmp/aoti-smoke

Variants: torch-fp32 (eager, the reference), aoti-fp32, aoti-bf16, aoti-int8 (torchao dynamic
int8, if it builds), ov-fp16 (static shapes, plugin default hint: bf16 compute on AVX512-BF16/AMX
CPUs), ov-int8 (hybrid, calibrated), ort-fp32 (the exported graph).
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
SECTION = "## AOTInductor"
# variant -> (target, precision, compile options, runner options); None target: PyTorch eager
VARIANTS: dict[str, tuple[str | None, str, list[str], dict]] = {
    "torch-fp32": (None, "fp32", [], {}),
    "aoti-fp32": ("aotinductor", "fp32", [], {}),
    "aoti-bf16": ("aotinductor", "bf16", [], {}),
    "aoti-int8": ("aotinductor", "int8", [], {}),
    "ov-fp16": ("openvino", "fp16", ["static"], {"hint": "default"}),
    "ov-int8": ("openvino", "int8", ["static"], {"hint": "default"}),
    "ort-fp32": ("onnxruntime", "fp32", [], {}),
}


def records(work: Path) -> Path:
    """Where the benchmark keeps its own files: beside the export, never inside it (the manifest owns that)."""
    folder = work.with_name(work.name + "-bench")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run(cmd: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes of the command and its children)."""
    return run_sampled(cmd, cwd=ROOT)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffprism.cli", "-q", *args]


def static_options(size: int) -> list[str]:
    return ["--option", f"static={size}x{size}", "--option", "batch=1"]  # one image: the UNet's batch 2


def variant_folder(work: Path, variant: str, size: int) -> Path | None:
    from diffprism.variant import Variant

    target, precision, options, _ = VARIANTS[variant]
    if target is None:
        return None
    chosen = {"static": f"{size}x{size}", "batch": 1} if "static" in options else {}
    return Variant.of(target, precision, chosen).folder(work)


def prepare(work: Path, preset: str, size: int, num_prompts: int, steps: int) -> dict[str, dict]:
    """Export, calibrate and build every variant; {variant: {"build_s", "build_peak_rss_gb"} or {"error"}}."""
    builds: dict[str, dict] = {}
    record = records(work) / "builds.json"
    if record.is_file():
        builds = json.loads(record.read_text())
    if not (work / "onnx").is_dir():
        print(f"exporting {preset} unet ...", flush=True)
        code, seconds, peak = run(cli("export", preset, "--out", str(work), "--components", "unet"))
        if code:
            raise SystemExit(f"export failed ({code})")
        builds["ort-fp32"] = {"build_s": seconds, "build_peak_rss_gb": peak / 1e9}  # the export is its build
    if not (work / "calibration" / "info.json").is_file():
        print(f"calibrating ({num_prompts} prompts x {steps} steps) ...", flush=True)
        if run(cli("calibrate", str(work), "--num-prompts", str(num_prompts), "--steps", str(steps)))[0]:
            raise SystemExit("calibration failed")
    for variant, (target, precision, options, _) in VARIANTS.items():
        folder = variant_folder(work, variant, size)
        if target in (None, "onnxruntime") or (folder is not None and folder.is_dir()):
            continue
        print(f"compiling {variant} ...", flush=True)
        extra = static_options(size) if "static" in options else []
        code, seconds, peak = run(cli("compile", str(work), "--target", target, "--precision", precision, *extra))
        builds[variant] = ({"build_s": seconds, "build_peak_rss_gb": peak / 1e9} if code == 0
                           else {"error": f"compile exited {code}"})
        record.write_text(json.dumps(builds, indent=2))
    record.write_text(json.dumps(builds, indent=2))
    return builds


def child_measure(work: Path, preset: str, variant: str, size: int, runs: int) -> None:
    """Load, warm up, time `runs` inferences; save the output and the timings."""
    from exporters.tree import read_tree_info

    feed = captured_feed(work / "calibration")
    spec = read_tree_info(work / "onnx")[1]["unet"]
    target, _, _, runner_options = VARIANTS[variant]
    if target is None:
        import torch

        from diffprism import presets
        from exporters.families import exporter_for
        from runtimes.torch_runner import TorchRunner

        pipe = presets.build(preset)
        runner = TorchRunner(spec, exporter_for(pipe, "unet").wrap(pipe.unet, spec))
        del pipe
        torch.set_grad_enabled(False)
    else:
        from targets.base import get_target

        folder = variant_folder(work, variant, size)
        if (folder / "diffprism.json").is_file():  # a static build checks feeds against its own spec
            spec = read_tree_info(folder)[1].get("unet", spec)
        runner = get_target(target).runner(folder, spec, **runner_options)
    times = []
    with runner:
        out = runner.infer(feed)  # warm-up (first-run allocations, lazy compilation)
        for _ in range(runs):
            start = time.perf_counter()
            out = runner.infer(feed)
            times.append(time.perf_counter() - start)
    np.save(records(work) / f"{variant}.npy", out["out_sample"])
    (records(work) / f"{variant}.json").write_text(json.dumps({"times": times, "runner": runner.describe()}))


def artifact_bytes(work: Path, variant: str, size: int) -> int:
    folder = variant_folder(work, variant, size)
    root = (work / "onnx" / "unet") if folder is None else folder / "unet"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def measure(work: Path, preset: str, size: int, runs: int, builds: dict[str, dict]) -> dict[str, dict]:
    from validation.metrics import cosine, rel_l2

    rows: dict[str, dict] = {}
    for variant in VARIANTS:
        build = builds.get(variant, {})
        if "error" in build:
            rows[variant] = {"error": build["error"]}
            continue
        print(f"measuring {variant} ...", flush=True)
        code, _, peak = run([sys.executable, __file__, "--work", str(work), "--preset", preset, "--size", str(size),
                             "--child-measure", variant, "--runs", str(runs)])
        if code:
            rows[variant] = {"error": f"measuring exited {code}"}
            continue
        data = json.loads((records(work) / f"{variant}.json").read_text())
        rows[variant] = {"median_s": statistics.median(data["times"]), "min_s": min(data["times"]),
                         "peak_rss_gb": peak / 1e9, "size_gb": artifact_bytes(work, variant, size) / 1e9,
                         "runner": data["runner"], **build}
    ref = np.load(records(work) / "torch-fp32.npy")
    for variant, row in rows.items():
        if "error" not in row:
            out = np.load(records(work) / f"{variant}.npy")
            row["cosine"], row["rel_l2"] = cosine(ref, out), rel_l2(ref, out)
    return rows


def table(rows: dict[str, dict]) -> str:
    eager = rows["torch-fp32"]["median_s"]
    lines = ["| variant | compute | median s | x eager | build s | build peak RSS GB | run peak RSS GB | size GB | "
             "cosine vs torch | rel L2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, r in rows.items():
        if "error" in r:
            lines.append(f"| {variant} | {r['error']} | | | | | | | | |")
            continue
        runner = r["runner"]
        compute = runner.get("inference_precision") or runner.get("precision") or runner.get("dtype", "")
        build = f"{r['build_s']:.0f}" if "build_s" in r else ""
        build_rss = f"{r['build_peak_rss_gb']:.1f}" if "build_peak_rss_gb" in r else ""
        lines.append(f"| {variant} | {compute} | {r['median_s']:.3f} | {r['median_s'] / eager:.2f} | {build} | "
                     f"{build_rss} | {r['peak_rss_gb']:.1f} | {r['size_gb']:.3f} | {r['cosine']:.5f} | {r['rel_l2']:.3g} |")
    return "\n".join(lines)


def write_docs(rows: dict[str, dict], command: str, preset: str, size: int, runs: int, load: str) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    body = (f"{SECTION}\n\n{preset} UNet, latent batch 2 at {size}x{size} px (one image under guidance), median of {runs}"
            f" runs after one warm-up on a captured denoising input, on {cpu} ({psutil.cpu_count()} cores, load average"
            f" {load}). AOTInductor packages keep the export's dynamic shapes; OpenVINO IRs are static at the benchmark"
            f" size. Build s / build peak RSS: the `diffprism compile` process (for ort-fp32, the export). Run peak RSS:"
            f" the measuring process (load + runs). Cosine and rel L2 compare out_sample with PyTorch fp32 eager.\n\n"
            f"Command: `{command}`\n\n{table(rows)}\n")
    text = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start >= 0:  # replace our section only
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    DOCS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--size", type=int, default=512,
                        help="image side in pixels: the export's preferred size, which calibration captures at "
                             "(512 for sd15-random, 64 for tiny-sd)")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--write-docs", action="store_true", help=f"write the table into {DOCS.name} ({SECTION})")
    parser.add_argument("--child-measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or ROOT / "bench-out" / f"aoti-unet-{args.preset}"
    size = args.size
    if args.child_measure:
        child_measure(args.work, args.preset, args.child_measure, size, args.runs)
        return 0
    load_before = os.getloadavg()[0]
    builds = prepare(args.work, args.preset, size, args.num_prompts, args.steps)
    rows = measure(args.work, args.preset, size, args.runs, builds)
    load = f"{load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    print(table(rows))
    print(json.dumps(rows, indent=2, default=str))
    if args.write_docs:
        command = "flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/aoti_unet.py " + " ".join(sys.argv[1:])
        write_docs(rows, command, args.preset, size, args.runs, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
