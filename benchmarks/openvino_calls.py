"""Compile time, first call and steady calls of OpenVINO IRs, each in a fresh process.

    .venv/bin/python benchmarks/openvino_calls.py /tmp/bench/ovdeploy/openvino-fp16/unet/openvino_model.xml \\
        /tmp/bench/ovdeploy-optimum/optimum-fp16/unet/openvino_model.xml \\
        --shape sample=2,4,64,64 --shape timestep=2 --shape encoder_hidden_states=2,77,768

The first call of a compiled model costs more than the later ones (the CPU plugin finishes its
kernels' setup there), and the deployed image pays it once per model: this script separates the
two. Inputs are seeded random values of each input's element type; a dynamic input takes the
shape given by --shape (a static one its own). The device's default inference precision is used.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from targets.openvino import ir_summary  # noqa: E402


def measure(xml: str, shapes: dict[str, list[int]], calls: int) -> dict:
    import numpy as np
    import openvino as ov

    core = ov.Core()
    start = time.perf_counter()
    model = core.read_model(xml)
    feed = {}
    rng = np.random.default_rng(0)
    for port in model.inputs:
        name = port.get_any_name()
        shape = port.get_partial_shape()
        dims = [d.get_length() for d in shape] if shape.is_static else shapes.get(name)
        if dims is None:
            raise SystemExit(f"{xml}: input '{name}' is dynamic ({shape}); give its shape with --shape {name}=D,D,...")
        feed[name] = rng.standard_normal(dims).astype(port.get_element_type().to_dtype())
    compiled = core.compile_model(model, "CPU")
    compile_s = time.perf_counter() - start
    request = compiled.create_infer_request()
    times = []
    for _ in range(calls + 1):
        t = time.perf_counter()
        request.infer(feed)
        times.append(time.perf_counter() - t)
    ops = ir_summary(model)["ops"]
    return {"xml": xml, "compile_s": round(compile_s, 5), "first_call_s": round(times[0], 5),
            "later_call_median_s": round(statistics.median(times[1:]), 5),
            "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
            "ops": {k: ops.get(k, 0) for k in ("GroupNormalization", "MVN", "Reshape", "ShapeOf")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xml", nargs="+")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=D,D,...")
    parser.add_argument("--calls", type=int, default=5, help="steady calls after the first (median)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = {}
    for item in args.shape:
        name, _, dims = item.partition("=")
        shapes[name] = [int(d) for d in dims.split(",")]
    if args.child:
        print(json.dumps(measure(args.xml[0], shapes, args.calls)))
        return
    rows = []
    for xml in args.xml:  # a fresh process per IR: nothing compiled or cached from the one before
        cmd = [sys.executable, __file__, xml, "--child", "--calls", str(args.calls)]
        cmd += [f"--shape={s}" for s in args.shape]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"{xml}: exit {done.returncode}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
