"""Benchmark: Core ML conversion of sd15-random's UNet (SD 1.5 architecture, random weights).

Times each stage in one process (build the preset, torch.export trace, lowering, ct.convert,
save, optional compression) and samples the process RSS every 50 ms for the peak. Shapes are
the export defaults (batch 1:2:4, 256..1024 px as RangeDims) unless --static is given.

    flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/coreml_unet.py [--compress palettize4]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class PeakRss:
    """Peak resident memory of this process, sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        self.proc, self.interval, self.peak = psutil.Process(os.getpid()), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp16", choices=("fp16", "fp32"))
    parser.add_argument("--compress", default="none", choices=("none", "linear8", "palettize4", "palettize6"))
    parser.add_argument("--static", action="store_true", help="convert at the opt point (2x4x64x64) only")
    args = parser.parse_args()

    from diffprism import presets
    from exporters.export import plan_specs, trace_component
    from targets import coreml_convert as cc
    from targets.coreml_inspect import inspect_package

    times: dict[str, float] = {}

    def stage(name: str, fn):
        start = time.perf_counter()
        value = fn()
        times[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {times[name]}s", file=sys.stderr)
        return value

    with PeakRss() as rss, tempfile.TemporaryDirectory() as tmp:
        pipe = stage("build_preset", lambda: presets.build("sd15-random"))
        spec = plan_specs(pipe, ["unet"])[1]["unet"]
        if args.static:
            spec = cc.static_spec(spec)
        mode = "static" if args.static else "range"
        _, program = stage("trace", lambda: trace_component(pipe, spec))
        program = stage("lower", lambda: cc.lower(program))
        model = stage("convert", lambda: cc.convert(program, spec, precision=args.precision, mode=mode,
                                                    deployment_target="macOS14", compute_units="all"))
        model = stage("compress", lambda: cc.compress(model, args.compress))
        facts = {"diffprism.component": "unet", "diffprism.precision": args.precision, "diffprism.compress": args.compress,
                 "diffprism.shapes": mode, "diffprism.spec": json.dumps(spec.to_json()),
                 "diffprism.source": json.dumps({"kind": "preset", "preset": "sd15-random"}),
                 "diffprism.source_name": "sd15-random", "diffprism.versions": "{}"}
        cc.set_metadata(model, spec, facts, mode, None)
        path = Path(tmp) / "unet.mlpackage"
        stage("save", lambda: model.save(str(path)))
        checked = inspect_package(path, spec, precision=args.precision, compress=args.compress)
    result = {
        "model": "sd15-random unet", "precision": args.precision, "compress": args.compress, "shapes": mode,
        "seconds": times, "peak_rss_gib": round(rss.peak / 2**30, 2), "package_mib": round(checked["bytes"] / 2**20, 1),
        "structure_ok": checked["ok"], "problems": checked["problems"], "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
