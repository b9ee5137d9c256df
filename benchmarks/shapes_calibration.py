"""Calibration choices for int8 on tiny-shapes, in one run: build time, image PSNR/SSIM vs PyTorch, prompt match.

    diffprism export tiny-shapes --out /tmp/ts/cal
    diffprism calibrate /tmp/ts/cal --prompts examples/tiny-shapes-prompts.txt --steps 12
    nice python benchmarks/shapes_calibration.py /tmp/ts/cal --steps 12

Builds (with 'diffprism compile', timed: wall and CPU seconds of this process) and measures
every choice below on the 45 held-out prompts, as benchmarks/shapes_match.py does: ONNX
Runtime static int8 with each of onnxruntime.quantization's calibration methods, and
OpenVINO int8 with the hybrid and the full scheme. `--reuse` measures variants already built.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shapes_match import measure, print_table  # noqa: E402
from diffprism.jobs import compile_job  # noqa: E402
from diffprism.placement import Runners  # noqa: E402
from diffprism.shapes import check, scenes  # noqa: E402
from diffprism.variant import Variant  # noqa: E402

# (row name, target, precision, options): the default of each target first.
CHOICES = (
    ("ORT int8, MinMax (default)", "onnxruntime", "int8", {}),
    ("ORT int8, MinMax moving average", "onnxruntime", "int8", {"calibrate_moving_average": True}),
    ("ORT int8, Entropy", "onnxruntime", "int8", {"calibrate_method": "Entropy"}),
    ("ORT int8, Percentile 99.999", "onnxruntime", "int8", {"calibrate_method": "Percentile"}),
    ("ORT int8, Percentile 99.99", "onnxruntime", "int8",
     {"calibrate_method": "Percentile", "calibrate_percentile": 99.99}),
    ("OpenVINO int8, hybrid (default)", "openvino", "int8", {}),
    ("OpenVINO int8, full", "openvino", "int8", {"int8_scheme": "full"}),
)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build(out: Path, target: str, precision: str, options: dict) -> dict:
    wall, cpu = time.perf_counter(), cpu_seconds()
    compile_job(out, target=target, precision=precision, options=options)
    return {"build_s": f"{time.perf_counter() - wall:.1f}", "build_cpu_s": f"{cpu_seconds() - cpu:.1f}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="'diffprism export tiny-shapes' folder with a calibration capture")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--reuse", action="store_true", help="measure variants already built (no build times)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared; one thread is steadier
    load_before = os.getloadavg()
    variants = [(name, Variant.of(t, p, o), t, p, o) for name, t, p, o in CHOICES]
    times = {}
    for name, variant, target, precision, options in variants:
        if args.reuse and variant.folder(args.out).is_dir():
            continue
        times[name] = build(args.out, target, precision, options)
        print(f"built {variant.key} in {times[name]['build_s']} s", file=sys.stderr, flush=True)
    load_built = os.getloadavg()
    _, held_out = scenes.split()
    prompts = [s.caption for s in held_out]
    runners = Runners(args.out)
    kw = dict(steps=args.steps, guidance_scale=args.guidance_scale)
    ref_matches, ref = check.generate_matches(runners.source_pipeline(), prompts, **kw)
    rows = [{"variant": "PyTorch", **check.rates(ref_matches)}]
    for name, variant, *_ in variants:
        row = measure(runners, variant, prompts, ref, **kw)
        rows.append({**row, "key": row["variant"], "variant": name, **times.get(name, {})})
        print(f"measured {variant.key}", file=sys.stderr, flush=True)
    print(json.dumps({"rows": rows, "load_before": load_before, "load_after_builds": load_built,
                      "load_after": os.getloadavg()}, indent=1))
    print(f"\n{len(prompts)} held-out prompts, {args.steps} steps, guidance {args.guidance_scale}; "
          f"load average {load_before[0]:.1f} before, {load_built[0]:.1f} after the builds\n")
    print_table(rows, extra=("key", "build_s", "build_cpu_s"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
