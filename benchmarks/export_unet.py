"""Benchmark: wall time and peak RSS of `diffprism export` for one component of a preset.

Runs the CLI in a child process and samples its RSS (and its children's) every 50 ms,
so the figure is the real peak of the export process, not an estimate.

    python benchmarks/export_unet.py --preset sd15-random --component unet
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def peak_rss_of(cmd: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of a command and its descendants."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    return proc.returncode, time.perf_counter() - start, peak


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="sd15-random")
    parser.add_argument("--component", default="unet")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more export arguments")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "diffprism.cli", "--json", "export", args.preset, "--out", str(out),
               "--components", args.component, *args.extra]
        code, seconds, peak = peak_rss_of(cmd)
        data = json.loads((out / "manifest.json").read_text()) if code == 0 else {}
        size = data.get("stages", {}).get("export", {}).get("components", {}).get(args.component, {}).get("bytes", 0)
    print(json.dumps({"preset": args.preset, "component": args.component, "exit_code": code,
                      "wall_seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2),
                      "onnx_bytes": size, "peak_over_weights": round(peak / size, 2) if size else None}, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
