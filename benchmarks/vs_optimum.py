"""Whole-pipeline export against optimum-cli on the same saved folder: wall time and peak RSS.

    make optimum-venvs                                                        # once: optimum's venv
    .venv/bin/python benchmarks/export_memory.py save sd15-random /tmp/bench/sd15      # once
    flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/vs_optimum.py /tmp/bench/sd15 \\
        --work /tmp/bench/vs-optimum --json /tmp/bench/vs-optimum.json

optimum runs in its own virtual environment (it pins an older transformers): by default the
optimum-onnx venv of `make optimum-venvs` (~/.cache/diffprism/venvs/optimum-onnx), or `--optimum
PATH/bin/optimum-cli`. Each command runs once, alone, in a fresh process, on the same folder; peak
RSS is the sum over the command's process tree, sampled every 50 ms. Runs:
- optimum: `optimum-cli export onnx --task text-to-image` (validates its outputs after the export,
  at one shape per component: the UNet at batch 2, 64x64 latents);
- default: `diffprism export FOLDER --out DIR` with no options, as a user runs it (streamed from the
  folder; references at the standard points: min, opt (the UNet at batch 2, 512x512) and a small
  off-square point). The target: at most 1x optimum's wall time and 0.3x its peak RSS, with
  references at >= 2 shape points per component;
- opt / all: `--reference-points opt` and `--reference-points all` for the record (all: references
  up to the UNet's max batch x 1024x1024).
Each run's output is measured (bytes on disk) and removed unless --keep, so the work folder never
holds more than one run's output.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tree_rss import run_sampled

ROOT = Path(__file__).resolve().parents[1]
VENVS = Path(os.environ.get("DIFFPRISM_VENVS", Path.home() / ".cache" / "diffprism" / "venvs"))
TARGET = {"time_vs_optimum": 1.0, "rss_vs_optimum": 0.3, "min_reference_points": 2}
OPTIMUM_PACKAGES = ("optimum", "optimum-onnx", "onnxruntime", "onnx", "torch", "transformers", "diffusers")


def measure(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    with open(log, "w") as out:
        code, seconds, peak = run_sampled(cmd, cwd=ROOT, stdout=out, stderr=out, env=env)
    if code:
        raise SystemExit(f"failed ({code}), see {log}: {' '.join(cmd)}")
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2), "command": " ".join(cmd)}


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def versions(python: Path, packages: tuple[str, ...]) -> dict:
    code = ("import json, importlib.metadata as m\n"
            f"v = {{}}\nfor p in {list(packages)!r}:\n"
            "    try: v[p] = m.version(p)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(v))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def reference_points(out: Path) -> dict:
    """What the diffprism export stored: streamed or not, and the shape points per component."""
    import numpy as np

    export = json.loads((out / "manifest.json").read_text())["stages"]["export"]
    points = {}
    for npz in sorted((out / "reference").glob("*.npz")):
        with np.load(npz) as z:
            points[npz.stem] = sorted(json.loads(str(z["__cases__"])))
    return {"streamed": export.get("streamed"), "reference_points": export.get("reference_points"),
            "points": points}


def optimum_notes(log: Path) -> list[str]:
    """Lines of optimum's log that say its export is not the same work (weights it did not load)."""
    keys = ("were not initialized", "not used when initializing", "newly initialized")
    text = log.read_text(errors="replace").replace("\r", "\n")  # progress bars rewrite their line with \r
    return [ln.strip()[:300] for ln in text.splitlines() if any(k in ln for k in keys)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="saved diffusers folder (safetensors)")
    ap.add_argument("--optimum", type=Path, default=VENVS / "optimum-onnx" / "bin" / "optimum-cli",
                    help="optimum-cli of a virtual environment with optimum-onnx installed (make optimum-venvs)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench/vs-optimum"))
    ap.add_argument("--only", choices=("optimum", "default", "opt", "all"), action="append",
                    help="run only these (repeatable; default: optimum and default)")
    ap.add_argument("--keep", action="store_true", help="keep each run's output under --work")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    runs = args.only or ["optimum", "default"]
    if "optimum" in runs and not args.optimum.is_file():
        raise SystemExit(f"no optimum-cli at {args.optimum}: run 'make optimum-venvs' or pass --optimum")
    for tok in sorted(args.folder.glob("tokenizer*")):
        if not (tok / "vocab.json").is_file():  # optimum's transformers reads the slow BPE files
            raise SystemExit(f"{tok} has no vocab.json/merges.txt, which optimum's transformers needs: "
                             "save the folder with benchmarks/export_memory.py save")
    args.work.mkdir(parents=True, exist_ok=True)
    weights = sum(f.stat().st_size for f in args.folder.rglob("*.safetensors"))
    results: dict = {"folder": str(args.folder), "fp32_weight_gb": round(weights / 1e9, 2),
                     "cpus": os.cpu_count(), "load_average_start": os.getloadavg()[0],
                     "versions": {"diffprism_env": versions(Path(sys.executable), OPTIMUM_PACKAGES[3:])}}
    if "optimum" in runs:
        results["versions"]["optimum_env"] = versions(args.optimum.parent / "python", OPTIMUM_PACKAGES)
    for run in runs:
        out = args.work / run
        shutil.rmtree(out, ignore_errors=True)
        log = args.work / f"{run}.log"
        env = None
        if run == "optimum":
            cmd = [str(args.optimum), "export", "onnx", "--model", str(args.folder), "--task", "text-to-image", str(out)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}  # the folder only; nothing of diffprism's
        else:
            cmd = [sys.executable, "-m", "diffprism.cli", "-q", "export", str(args.folder), "--out", str(out)]
            if run != "default":
                cmd += ["--reference-points", run]
        print(f"running {run} ...", flush=True)
        results[run] = measure(cmd, log, env)
        results[run]["disk_gb"] = round(disk_bytes(out) / 1e9, 2)
        if run == "optimum":
            results[run]["notes"] = optimum_notes(log)
        else:
            results[run].update(reference_points(out))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(results[run]), flush=True)
    results["load_average_end"] = os.getloadavg()[0]
    if "optimum" in results:
        for run in ("default", "opt", "all"):
            if run in results:
                results[run]["time_vs_optimum"] = round(results[run]["seconds"] / results["optimum"]["seconds"], 2)
                results[run]["rss_vs_optimum"] = round(results[run]["peak_rss_gb"] / results["optimum"]["peak_rss_gb"], 2)
        if "default" in results:
            d = results["default"]
            fewest = min((len(p) for p in d["points"].values()), default=0)
            results["target"] = {**TARGET, "met": d["time_vs_optimum"] <= TARGET["time_vs_optimum"]
                                 and d["rss_vs_optimum"] <= TARGET["rss_vs_optimum"]
                                 and fewest >= TARGET["min_reference_points"]}
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
