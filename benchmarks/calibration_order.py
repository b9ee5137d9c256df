"""Peak RSS of ONNX Runtime's MinMax calibration run in each session execution order.

    flock /tmp/diffprism-heavy.lock .venv/bin/python benchmarks/calibration_order.py /tmp/bench/ort-sd15

Augments OUT's fp32 UNet as ONNX Runtime's calibrator does (a ReduceMin/ReduceMax output for
every input and output of its Conv/MatMul/Gemm nodes), then runs one captured feed through it
in a child process per execution order, sampling the process RSS; a run above --limit GB is
stopped and reported as such.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feeds import captured_feed  # noqa: E402
from exporters.export import ONNX_DIR  # noqa: E402
from exporters.precision.quantize import STATIC_OPS  # noqa: E402

ORDERS = ("DEFAULT", "PRIORITY_BASED")


def augment(out: Path, work: Path) -> Path:
    from onnxruntime.quantization import MinMaxCalibrater

    path = work / "augmented.onnx"
    calibrator = MinMaxCalibrater(out / ONNX_DIR / "unet" / "model.onnx", list(STATIC_OPS),
                                  augmented_model_path=str(path), use_external_data_format=True)
    calibrator.augment_graph()
    return path


def child(path: Path, out: Path, order: str) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the calibrator's session
    opts.execution_order = getattr(ort.ExecutionOrder, order)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    session.run(None, {k: v for k, v in captured_feed(out / "calibration").items() if k in names})


def measure(cmd: list[str], limit: float) -> dict:
    start = time.perf_counter()
    proc = psutil.Popen(cmd)
    peak, stopped = 0, False
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            pass
        if peak > limit * 1e9:
            proc.kill()
            proc.wait()
            stopped = True
            break
        time.sleep(0.02)
    return {"peak_rss_gb": round(peak / 1e9, 2), "seconds": round(time.perf_counter() - start, 1),
            "stopped_at_limit": stopped, "exit": proc.returncode}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path, help="an export with onnx/unet and calibration/ (benchmarks/ort_variants.py)")
    ap.add_argument("--limit", type=float, default=20.0, help="GB at which a run is stopped")
    ap.add_argument("--child", nargs=2, metavar=("AUGMENTED", "ORDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), args.out, args.child[1])
        return
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        path = augment(args.out, Path(tmp))
        for order in ORDERS:
            facts = measure([sys.executable, __file__, str(args.out), "--child", str(path), order], args.limit)
            print(json.dumps({"execution_order": order, **facts}), flush=True)


if __name__ == "__main__":
    main()
