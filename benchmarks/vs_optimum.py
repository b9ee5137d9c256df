"""Whole-pipeline export against optimum-cli on the same saved folder: wall time and peak RSS.

    python benchmarks/export_memory.py save sd15-random /tmp/bench/sd15       # once
    flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/vs_optimum.py /tmp/bench/sd15 \\
        --optimum /tmp/optimum-venv/bin/optimum-cli --work /tmp/bench/vs-optimum

optimum needs its own virtual environment (it pins an older transformers); pass its optimum-cli.
Each command runs once, alone, in a fresh process; peak RSS is the sum over the command's process
tree, sampled every 50 ms. Runs:
- optimum: `optimum-cli export onnx --task text-to-image` (validates its outputs after the export,
  at batch 2 and 512x512 for the UNet);
- default: `diffprism export FOLDER --out DIR` with no options, as a user runs it (streamed from the
  folder; references at the standard points: min, opt (the UNet at batch 2, 512x512) and a small
  off-square point). The target: at most 1x optimum's wall time and 0.3x its peak RSS.
- opt / all: `--reference-points opt` and `--reference-points all` for the record (all: references
  up to the UNet's max batch x 1024x1024).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from tree_rss import run_sampled

ROOT = Path(__file__).resolve().parents[1]


def measure(cmd: list[str], log: Path) -> dict:
    with open(log, "w") as out:
        code, seconds, peak = run_sampled(cmd, cwd=ROOT, stdout=out, stderr=out)
    if code:
        raise SystemExit(f"failed ({code}), see {log}: {' '.join(cmd)}")
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2), "command": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="saved diffusers folder (safetensors)")
    ap.add_argument("--optimum", required=True, help="optimum-cli of a virtual environment with optimum installed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench/vs-optimum"))
    ap.add_argument("--only", choices=("optimum", "default", "opt", "all"), action="append",
                    help="run only these (repeatable; default: optimum and default)")
    args = ap.parse_args()
    runs = args.only or ["optimum", "default"]
    args.work.mkdir(parents=True, exist_ok=True)
    weights = sum(f.stat().st_size for f in args.folder.rglob("*.safetensors"))
    results = {"fp32_weight_gb": round(weights / 1e9, 2), "load_average_start": os.getloadavg()[0]}
    for run in runs:
        out = args.work / run
        shutil.rmtree(out, ignore_errors=True)
        if run == "optimum":
            cmd = [args.optimum, "export", "onnx", "--model", str(args.folder), "--task", "text-to-image", str(out)]
        else:
            cmd = [sys.executable, "-m", "diffprism.cli", "-q", "export", str(args.folder), "--out", str(out)]
            if run != "default":
                cmd += ["--reference-points", run]
        print(f"running {run} ...", flush=True)
        results[run] = measure(cmd, args.work / f"{run}.log")
        print(json.dumps(results[run]), flush=True)
    results["load_average_end"] = os.getloadavg()[0]
    if "optimum" in results:
        for run in ("default", "opt", "all"):
            if run in results:
                results[run]["time_vs_optimum"] = round(results[run]["seconds"] / results["optimum"]["seconds"], 2)
                results[run]["rss_vs_optimum"] = round(results[run]["peak_rss_gb"] / results["optimum"]["peak_rss_gb"], 2)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
