"""Where an OpenVINO IR spends its time on this CPU: per-op-type totals of one profiled inference.

    .venv/bin/python benchmarks/openvino_ops.py /tmp/ovbench/work/openvino-fp16/unet/openvino_model.xml \\
        --feed /tmp/ovbench/work/calibration
    .venv/bin/python benchmarks/openvino_ops.py --matmul-peak

The feed is a captured UNet call (`diffprism calibrate`); --batch N slices it (the IR is reshaped
to the feed). --matmul-peak times a 4096^3 MatMul in bf16 and f32: the throughput this CPU really
reaches, against which a model's FLOP count gives its latency floor.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feeds import captured_feed  # noqa: E402


def matmul_peak(n: int = 4096, repeat: int = 5) -> None:
    import openvino as ov
    import openvino.opset13 as ops

    a = ops.parameter([n, n], np.float32, name="a")
    weight = ops.constant(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    model = ov.Model([ops.matmul(a, weight, False, False)], [a])
    x = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    for hint in ("bf16", "f32"):
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        request.infer({0: x})
        start = time.perf_counter()
        for _ in range(repeat):
            request.infer({0: x})
        seconds = (time.perf_counter() - start) / repeat
        print(f"MatMul {n}^3 {hint}: {2 * n ** 3 / seconds / 1e12:.3f} TFLOP/s")


def profile(xml: Path, feed_dir: Path, component: str, hint: str, batch: int | None) -> None:
    import openvino as ov

    feed = captured_feed(feed_dir, component)
    if batch:
        feed = {k: v[:batch] for k, v in feed.items()}
    core = ov.Core()
    model = core.read_model(str(xml))
    model.reshape({p.get_any_name(): list(feed[p.get_any_name()].shape) for p in model.inputs})
    props = {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}
    if hint != "default":
        props["INFERENCE_PRECISION_HINT"] = hint
    compiled = core.compile_model(model, "CPU", props)
    request = compiled.create_infer_request()
    request.infer(feed)  # warm-up
    start = time.perf_counter()
    request.infer(feed)
    print(f"latency {time.perf_counter() - start:.2f} s, inference precision "
          f"{compiled.get_property('INFERENCE_PRECISION_HINT')}")
    by_type: collections.Counter = collections.Counter()
    by_kernel: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for info in request.get_profiling_info():
        ms = info.real_time.total_seconds() * 1e3
        by_type[info.node_type] += ms
        by_kernel[f"{info.node_type} ({info.exec_type})"] += ms
        count[info.node_type] += 1
    print(f"sum of op times {sum(by_type.values()):.0f} ms")
    for kind, ms in by_type.most_common(8):
        print(f"  {kind:28s} {ms:7.0f} ms  ({count[kind]} ops)")
    print("by kernel:")
    for kind, ms in by_kernel.most_common(8):
        print(f"  {kind:50s} {ms:7.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("xml", type=Path, nargs="?", help="openvino_model.xml")
    ap.add_argument("--feed", type=Path, help="calibration folder holding <component>.npz")
    ap.add_argument("--component", default="unet")
    ap.add_argument("--hint", default="default", choices=("default", "bf16", "f32"))
    ap.add_argument("--batch", type=int, help="slice the captured feed to this batch")
    ap.add_argument("--matmul-peak", action="store_true")
    args = ap.parse_args()
    if args.matmul_peak:
        matmul_peak()
    if args.xml:
        if not args.feed:
            ap.error("--feed is required with an IR")
        profile(args.xml, args.feed, args.component, args.hint, args.batch)


if __name__ == "__main__":
    main()
