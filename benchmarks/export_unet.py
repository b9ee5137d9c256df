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
from pathlib import Path

from tree_rss import run_sampled


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
        code, seconds, peak = run_sampled(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        data = json.loads((out / "manifest.json").read_text()) if code == 0 else {}
        size = data.get("stages", {}).get("export", {}).get("components", {}).get(args.component, {}).get("bytes", 0)
    print(json.dumps({"preset": args.preset, "component": args.component, "exit_code": code,
                      "wall_seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2),
                      "onnx_bytes": size, "peak_over_weights": round(peak / size, 2) if size else None}, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
